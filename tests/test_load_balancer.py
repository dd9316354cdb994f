"""The shipped HAProxy configuration in front of 3 real sft-cloud workers: every session stays on
one worker for its whole life, reconnects included.

A real ``haproxy`` process runs ``deploy/haproxy/haproxy.cfg`` unchanged (only its addresses come
from the environment, as the file says); 8 sessions train through it with the edge's own client,
each closing and reopening its connection half-way. Where each session went is read from the
workers' own status JSON (``--status-port``). Without haproxy installed the test is skipped, and
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cloud_harness import SCHEDULE, SEED, CloudProcess, tiny_dropout_bundle, train_steps

from cloud_backend.session import session_key
from edge_runtime.client import CloudClient
from splitwire.bundle import load_bundle

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
WORKERS = 3
SESSIONS = [f"device-{n}" for n in range(8)]
HALF = 3  # steps before the reconnect, and after it

HAPROXY = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy): "
                                                        "the load-balancer test did not run")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"haproxy did not listen on {port}:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def haproxy(workers: list[CloudProcess], log: Path):
    """``haproxy -f deploy/haproxy/haproxy.cfg`` in the foreground, in front of ``workers``; its URL."""
    port = free_port()
    env = {**os.environ, "SFT_LB_BIND": f"127.0.0.1:{port}",
           **{f"SFT_WORKER_{n}": f"127.0.0.1:{worker.port}" for n, worker in enumerate(workers, start=1)}}
    with open(log, "w") as out:
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=out, stderr=out)
    try:
        wait_listening(port, process, log)
        yield f"ws://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def live_session(url: str, bundle, session_id: str) -> int:
    """Train ``HALF`` steps, close, reconnect (resuming) and train ``HALF`` more; the bytes sent."""
    sent = 0
    for resume_from, steps in ((None, range(1, HALF + 1)), (HALF, range(HALF + 1, 2 * HALF + 1))):
        client = await CloudClient.connect(url, bundle=bundle, session_id=session_id, schedule=SCHEDULE, seed=SEED,
                                           resume_from=resume_from)
        async with client:
            assert client.resume_step == steps.start - 1
            await train_steps(client, bundle, steps)
        sent += client.bytes_sent
    return sent


def sessions_on(worker: CloudProcess) -> dict[str, dict]:
    with urllib.request.urlopen(f"{worker.status_url}/status.json", timeout=10) as response:
        return {row["session"]: row for row in json.load(response)["sessions"]}


def test_haproxy_keeps_each_session_on_one_worker(tmp_path_factory, tiny_model_dir, tmp_path):
    bundle = load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))
    workers = [CloudProcess(bundle.root, tmp_path / f"state-{n}", log_path=tmp_path / f"worker-{n}.log",
                            extra=("--status-port", "0")) for n in range(WORKERS)]
    for worker in workers:
        worker.start(wait=False)  # the three start (import torch) at once
    try:
        for worker in workers:
            worker.wait_listening()
        with haproxy(workers, tmp_path / "haproxy.log") as url:

            async def everyone() -> list[int]:
                return await asyncio.gather(*(live_session(url, bundle, session) for session in SESSIONS))

            sent = dict(zip(SESSIONS, asyncio.run(everyone())))
        placed = [sessions_on(worker) for worker in workers]
    finally:
        for worker in workers:
            worker.stop()

    for session in SESSIONS:
        homes = [rows[session_key(session)] for rows in placed if session_key(session) in rows]
        assert len(homes) == 1, f"{session} reached {len(homes)} workers"
        (home,) = homes
        assert home["connections"] == 2 and home["step"] == 2 * HALF  # the reconnect found the same worker
        assert home["bytes_in"] == sent[session]  # and every byte the session sent went there
    assert sum(1 for rows in placed if rows) >= 2, "all sessions on one worker: the routing was not exercised"
