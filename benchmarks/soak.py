"""Soak: hostile clients against one sft-cloud while two legitimate edges train.

Why it exists: the hostile-client tests each check one attack for a few seconds; this runs
a mix of them at once, for minutes, against a real ``sft-cloud`` process without tokens (so
anyone on loopback can open sessions), beside two real edges (ORT engines driving the
trainer's loop, ``tests/cloud_harness.py``). The attackers:

- never-readers: open a websocket, say hello (or not), flood pings, never read;
- flooders: hello, then several TRAIN frames without waiting for answers (``in_flight``);
- poisoners: a session that sends finite but huge activations (``non_finite``);
- churners: a new session id per connection, one step each (eviction, disk budget);
- hogs: PREDICT loops at the server's largest batch (the compute thread's fairness).

The attackers run in a child process of their own (``--attack URL``), so that their busy
loops do not stall the edges' event loop; they still share the machine's two cores.

Reported: the cloud's peak RSS (``VmHWM``) and the state dir's peak size, both against the
same two edges trained without attackers; the edges' wall time with attackers against
without (the slowdown: attackers, edges and cloud share this machine's cores, so it
includes the attackers' own CPU); and whether both edges' final weights, edge and cloud,
equal their unattacked run's. The attackers stop when the edges finish or after
``--seconds``.

Run: ``python -m benchmarks.soak`` (MiniLM split 3 rank 8, 2 edges × 40 steps of 8).
Writes docs/bench/soak.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from benchmarks.load import _bundle
from benchmarks.report import ROOT, write_section
from edge_runtime.client import Backoff, CloudClient
from splitwire.bundle import Bundle, load_bundle
from splitwire.errors import SplitftError
from splitwire.protocol import DEFAULT_MAX_BATCH
from tests.cloud_harness import (
    SCHEDULE, SEED, CloudProcess, EdgeSession, NeverReader, hello_frame, review_data, train_edge, train_frame,
    train_request,
)
from tests.conftest import movie_reviews_path

ATTACKERS = ("never_read", "flood", "poison", "churn", "hog")
CLOUD_FLAGS = ("--max-sessions", "8", "--max-state-mb", "1024", "--hello-timeout", "5", "--send-timeout", "10")
NO_RETRY = Backoff(first_s=0.05, max_s=0.2, give_up_after_s=1.0)


@dataclass
class Attack:
    """What the attackers did, by kind: connections opened, and the errors the cloud answered."""

    connections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTACKERS, 0))
    refusals: dict[str, int] = field(default_factory=dict)

    def refused(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    bundle = load_bundle(_bundle(args.model, Path(args.bundles)))
    if args.attack:
        asyncio.run(_attack_until_terminated(bundle, args.attack, args.attackers))
        return
    runs = [EdgeSession(bundle, f"edge-{i}", review_data(movie_reviews_path(), slice(200 * i, 200 * (i + 1))),
                        seed=i, steps=args.steps, batch_size=8, checkpoint_every=10) for i in range(2)]
    quiet = _run(bundle, runs, attackers=0, seconds=args.seconds, model=args.model, bundles=args.bundles)
    print(json.dumps({k: v for k, v in quiet.items() if k != "weights"}), flush=True)
    attacked = _run(bundle, runs, attackers=args.attackers, seconds=args.seconds, model=args.model,
                    bundles=args.bundles)
    print(json.dumps({k: v for k, v in attacked.items() if k != "weights"}), flush=True)
    equal = {name: _equal(quiet["weights"][name], attacked["weights"][name]) for name in quiet["weights"]}
    _report(args, quiet, attacked, equal)
    if not all(equal.values()):
        raise SystemExit(f"the attacked run's weights differ from the quiet run's: {equal}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "minilm"), default="minilm")
    p.add_argument("--steps", type=int, default=40, help="training steps of each legitimate edge")
    p.add_argument("--attackers", type=int, default=2, help="attackers of each kind")
    p.add_argument("--seconds", type=float, default=300, help="the longest a run may take")
    p.add_argument("--bundles", default=str(ROOT / "runs" / "bench" / "load"), help="export cache")
    p.add_argument("--attack", metavar="URL", help=argparse.SUPPRESS)  # the attackers' child process
    return p


def _run(bundle: Bundle, runs: list[EdgeSession], *, attackers: int, seconds: float, model: str,
         bundles: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cloud = CloudProcess(bundle.root, work / "state", log_path=work / "cloud.log", extra=CLOUD_FLAGS).start()
        attack = None
        if attackers:
            attack = subprocess.Popen([sys.executable, "-m", "benchmarks.soak", "--model", model, "--bundles", bundles,
                                       "--attackers", str(attackers), "--attack", cloud.url],
                                      stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            result = asyncio.run(_soak(runs, cloud, work, seconds=seconds))
            result["cloud_peak_rss_mib"] = round(cloud.vm_hwm_kib() / 1024, 1)
        finally:
            if attack is not None:
                attack.send_signal(signal.SIGTERM)
                output, _ = attack.communicate(timeout=60)
            cloud.stop()
        result["attack"] = json.loads(output.strip().splitlines()[-1]) if attack is not None else {}
        for run in runs:
            cloud_weights = cloud.saved_weights(run.session)
            result["weights"] |= {f"{run.session}.cloud.{k}": v for k, v in cloud_weights.items()}
        result["cloud_events"] = _count(cloud.events())
    return result


async def _soak(runs: list[EdgeSession], cloud: CloudProcess, work: Path, *, seconds: float) -> dict:
    stop, peak_disk = asyncio.Event(), [0]
    tasks = [asyncio.create_task(_watch_disk(cloud.state_dir, peak_disk, stop))]
    started = time.perf_counter()
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*(train_edge(run, cloud.url, work / run.session)
                                                           for run in runs)), seconds)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    weights = {f"{run.session}.edge.{k}": v for run, o in zip(runs, outcomes) for k, v in o.parameters.items()}
    return {"edge_seconds": round(time.perf_counter() - started, 1),
            "steps": [len(o.result.steps) for o in outcomes], "reconnects": [o.reconnects for o in outcomes],
            "state_dir_peak_mib": round(peak_disk[0] / 2**20, 1), "weights": weights,
            "load_average": round(os.getloadavg()[0], 1)}


async def _attack_until_terminated(bundle: Bundle, url: str, attackers: int) -> None:
    """The attackers' process: every kind, ``attackers`` of each, until SIGTERM; then their counts as JSON."""
    attack, stop = Attack(), asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [asyncio.create_task(_attacker(kind, i, bundle, url, attack, stop))
             for kind in ATTACKERS for i in range(attackers)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(attack.__dict__), flush=True)


async def _watch_disk(state_dir: Path, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError):
            peak[0] = max(peak[0], sum(p.stat().st_size for p in state_dir.iterdir() if p.is_file()))
        await asyncio.sleep(0.5)


async def _attacker(kind: str, index: int, bundle: Bundle, url: str, attack: Attack, stop: asyncio.Event) -> None:
    """One attacker of ``kind``, reconnecting until ``stop``."""
    serial = 0
    while not stop.is_set():
        serial += 1
        attack.connections[kind] += 1
        try:
            await asyncio.wait_for(_ATTACKS[kind](bundle, url, f"{kind}-{index}-{serial}", attack, stop), 30)
        except SplitftError as exc:
            attack.refused(exc.code)
        except (OSError, WebSocketException, TimeoutError):
            attack.refused("connection")
        await asyncio.sleep(0.05)


async def _never_read(bundle: Bundle, url: str, name: str, attack: Attack, stop: asyncio.Event) -> None:
    says_hello = int(name.rsplit("-", 1)[1]) % 2 == 1  # every other connection is welcomed first
    reader = NeverReader(url, hello=hello_frame(bundle, name, None) if says_hello else None, ssl=None)
    await reader.run(flood_for_s=20)
    if reader.cut_after_s is not None:
        attack.refused("cut_off")


async def _flood(bundle: Bundle, url: str, name: str, attack: Attack, stop: asyncio.Event) -> None:
    async with connect(url, compression=None, max_size=None) as ws:
        await ws.send(hello_frame(bundle, name, None))
        await ws.recv()
        for step in (1, 2, 3):
            await ws.send(train_frame(bundle, name, step))
        with contextlib.suppress(WebSocketException):
            while True:
                await ws.recv()
    attack.refused("flood_closed")


async def _poison(bundle: Bundle, url: str, name: str, attack: Attack, stop: asyncio.Event) -> None:
    client = await CloudClient.connect(url, bundle=bundle, session_id=name.rsplit("-", 1)[0], token=None,
                                       schedule=SCHEDULE, seed=SEED, retry=NO_RETRY)
    async with client:
        step = client.resume_step + 1
        request = train_request(bundle, step)
        await client.train_step(step, request.z * np.float32(1e30), request.lengths, request.labels)


async def _churn(bundle: Bundle, url: str, name: str, attack: Attack, stop: asyncio.Event) -> None:
    client = await CloudClient.connect(url, bundle=bundle, session_id=name, token=None, schedule=SCHEDULE,
                                       seed=SEED, retry=NO_RETRY)
    async with client:
        request = train_request(bundle, 1)
        await client.train_step(1, request.z, request.lengths, request.labels)


async def _hog(bundle: Bundle, url: str, name: str, attack: Attack, stop: asyncio.Event) -> None:
    rng = np.random.default_rng(0)
    length = bundle.max_length
    z = rng.standard_normal((DEFAULT_MAX_BATCH, length, bundle.wire_width)).astype(np.float32)
    lengths = np.full(DEFAULT_MAX_BATCH, length, dtype=np.int32)
    client = await CloudClient.connect(url, bundle=bundle, session_id=name.rsplit("-", 1)[0], token=None,
                                       schedule=SCHEDULE, seed=SEED, retry=NO_RETRY)
    async with client:
        while not stop.is_set():
            await client.predict(z, lengths)


_ATTACKS = {"never_read": _never_read, "flood": _flood, "poison": _poison, "churn": _churn, "hog": _hog}


def _count(events: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        counts[event] = counts.get(event, 0) + 1
    return dict(sorted(counts.items()))


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _report(args: argparse.Namespace, quiet: dict, attacked: dict, equal: dict[str, bool]) -> None:
    rows = [("edges' wall time (s)", quiet["edge_seconds"], attacked["edge_seconds"]),
            ("cloud peak RSS (MiB)", quiet["cloud_peak_rss_mib"], attacked["cloud_peak_rss_mib"]),
            ("state dir peak (MiB)", quiet["state_dir_peak_mib"], attacked["state_dir_peak_mib"]),
            ("edge reconnects", sum(quiet["reconnects"]), sum(attacked["reconnects"])),
            ("load average (1 min, at the end)", quiet["load_average"], attacked["load_average"])]
    table = ["| | 2 edges alone | 2 edges + attackers | ratio |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {a} | {b} | {b / a:.2f}× |" if a else f"| {name} | {a} | {b} | |" for name, a, b in rows]
    same = sum(equal.values())
    events = attacked["cloud_events"]
    body = "\n".join(table) + (
        f"\n\nFinal weights, both edges, edge and cloud halves: **{same} of {len(equal)} tensors bit-equal** to the "
        f"run without attackers.\n\nAttackers ({args.attackers} of each kind, reconnecting until the edges finished): "
        f"connections {attacked['attack']['connections']}; what they got: {attacked['attack']['refusals']}. "
        f"The cloud logged: aborted {events.get('aborted', 0)}, refused {events.get('refused', 0)}, evicted "
        f"{events.get('evicted', 0)}, trimmed {events.get('trimmed', 0)}, new sessions "
        f"{events.get('new_session', 0)}.\n\nAttackers, edges and the cloud share this machine's cores, so the "
        "slowdown includes the attackers' own CPU (the hogs' PREDICT batches above all).\n")
    write_section("soak", title="Soak: hostile clients beside two training edges", command="python -m benchmarks.soak",
                  settings={"model": args.model, "steps per edge": args.steps, "batch": 8,
                            "attackers per kind": args.attackers, "kinds": ",".join(ATTACKERS),
                            "cloud flags": " ".join(CLOUD_FLAGS), "time limit s": args.seconds},
                  body=body, results={"quiet": {k: v for k, v in quiet.items() if k != "weights"},
                                      "attacked": {k: v for k, v in attacked.items() if k != "weights"},
                                      "equal_tensors": same, "tensors": len(equal)})


if __name__ == "__main__":
    main()
