"""Real parts for fault, load and security tests: an ``sft-cloud`` child process, a
connection-cutting TCP proxy, an in-process edge that trains one session end to end, and
synthetic training steps for tests that need no edge model.

Why it exists: the fault and load tests (and ``benchmarks/load.py``) need the same three
things, and each must be the real component: the cloud is the ``sft-cloud`` command (so
``kill -9`` kills a real process whose state dir is read back afterwards), faults are real
TCP connections cut mid-frame, and the edge is the real engine driven by the trainer's own
``train`` loop with checkpoints and rewinds, through a reconnecting ``CloudClient``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import signal
import socket
import ssl as ssl_module
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from cloud_backend.launch import CloudDidNotStart, cloud_command, read_status_url, read_url, start_cloud
from edge_runtime.api import EdgeTrainer
from edge_runtime.client import Backoff, CloudClient
from edge_runtime.data import (
    Columns,
    TextData,
    infer_label_map,
    read_table,
    table_texts,
)
from edge_runtime.trainer import TrainerCallback, TrainResult
from splitwire.bundle import Bundle
from splitwire.codecs import Carries, Fp32Codec
from splitwire.protocol import Hello, SessionConfig, Train, encode, session_tag
from splitwire.schedule import Schedule

FAST_RETRY = Backoff(first_s=0.02, factor=2.0, max_s=0.5, give_up_after_s=60.0)


@functools.lru_cache(maxsize=2)
def _reviews(path: Path) -> TextData:
    table = read_table(path)
    labels = infer_label_map(table, column="sentiment", num_labels=2, threshold=0.0)
    return table_texts(table, Columns(text="text", label="sentiment"), labels)


def review_data(path: Path, rows: slice) -> TextData:
    """Rows of the movie-review snippets (tab-separated id, sentiment, text); positive when sentiment > 0."""
    reviews = _reviews(path)
    return reviews.subset(range(len(reviews))[rows])


# ---------------------------------------------------------------------------- the cloud process


class CloudProcess:
    """``sft-cloud`` as a child process; its JSON log goes to a file (a full pipe would block it)."""

    def __init__(self, bundle_root: Path, state_dir: Path, *, log_path: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.bundle_root, self.state_dir, self.log_path = bundle_root, state_dir, log_path
        self.extra, self.env = extra, env or {}
        self.port = 0
        self.url = ""
        self.status_url = ""  # with ``--status-port`` in ``extra``
        self.proc: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> "CloudProcess":
        """Start on ``self.port`` (0 at first: a free one). ``wait``: until it listens."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        command = cloud_command("--bundle", str(self.bundle_root), "--port", str(self.port), "--device", "cpu",
                                "--state-dir", str(self.state_dir), *self.extra)
        with open(self.log_path, "a") as log:
            self.proc = start_cloud(command, log=log, env=env)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self) -> None:
        try:
            self.url = read_url(self.proc)
            if "--status-port" in self.extra:
                self.status_url = read_status_url(self.proc)
        except CloudDidNotStart as exc:
            raise CloudDidNotStart(f"{exc}\n{self.log_path.read_text()[-3000:]}") from None
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def vm_hwm_kib(self) -> int:
        """The process's peak resident memory (``VmHWM``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc status")

    def stop(self) -> None:
        """SIGTERM: it checkpoints every session into the state dir and exits 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        finally:
            self.proc.kill()
        if code != 0:
            raise RuntimeError(f"sft-cloud exited {code}:\n{self.log_path.read_text()[-3000:]}")

    def saved_weights(self, session_id: str) -> dict[str, np.ndarray]:
        """The top part's weights of ``session_id`` as the stopped process saved them."""
        from safetensors.numpy import load_file

        from cloud_backend.session import checkpoint_path

        tensors = load_file(str(checkpoint_path(self.state_dir, session_id, "latest")))
        return {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}

    def events(self) -> list[str]:
        """The ``event`` of every JSON log line so far."""
        return [json.loads(line)["event"] for line in self.log_path.read_text().splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------- faults on the wire


class CuttingProxy:
    """A TCP proxy on localhost that aborts each connection after a random number of bytes.

    Bytes are counted in both directions; the cut falls anywhere: in the websocket handshake,
    the hello, the middle of a frame going up or of a reply coming down. After ``max_cuts``
    cuts it forwards faithfully, so a run can finish.
    """

    def __init__(self, upstream_port: int, *, seed: int, cut_between: tuple[int, int], max_cuts: int) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.cut_between = cut_between
        self.max_cuts = max_cuts
        self.cuts = 0
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "CuttingProxy":
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        budget = [self.rng.randint(*self.cut_between) if self.cuts < self.max_cuts else -1]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        pumps = [asyncio.create_task(self._pump(reader, up_writer, budget)),
                 asyncio.create_task(self._pump(up_reader, writer, budget))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        if budget[0] == 0:
            self.cuts += 1
        for w in (writer, up_writer):
            w.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int]) -> None:
        """Forward until EOF, or until the shared byte budget (``-1``: none) runs out."""
        while data := await reader.read(4096):
            if budget[0] >= 0:
                data = data[:budget[0]]
                budget[0] -= len(data)
            writer.write(data)
            await writer.drain()
            if budget[0] == 0:
                return


class RecordingProxy:
    """A websocket proxy on localhost that passes every message between the edge and the cloud on
    unchanged and keeps a copy of each, as ``(direction, bytes)`` with direction ``"up"`` or ``"down"``:
    the real frames, as they crossed the wire. ``drop(direction, data)`` returning True loses that
    message and closes the connection (a cut at a chosen point: the client reconnects through the proxy)."""

    def __init__(self, upstream_url: str, *, drop: Callable[[str, bytes], bool] | None = None) -> None:
        self.upstream_url = upstream_url
        self.drop = drop
        self.dropped = 0
        self.frames: list[tuple[str, bytes]] = []
        self.url = ""
        self._server = None

    async def __aenter__(self) -> "RecordingProxy":
        from websockets.asyncio.server import serve

        self._server = await serve(self._connection, "127.0.0.1", 0, compression=None, max_size=None)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _connection(self, edge) -> None:
        from websockets.asyncio.client import connect

        async with connect(self.upstream_url, compression=None, max_size=None) as cloud:
            pumps = [asyncio.create_task(self._pump(edge, cloud, "up")),
                     asyncio.create_task(self._pump(cloud, edge, "down"))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()

    async def _pump(self, source, target, direction: str) -> None:
        async for message in source:
            if self.drop is not None and self.drop(direction, bytes(message)):
                self.dropped += 1
                await asyncio.gather(source.close(), target.close())
                return
            self.frames.append((direction, bytes(message)))
            await target.send(message)


class NeverReader:
    """A websocket client on a raw socket with a tiny receive buffer: it does the opening
    handshake, optionally says hello, then floods pings and never reads another byte.
    ``cut_after_s`` is how long the server let it live (``None``: still connected)."""

    def __init__(self, url: str, *, hello: bytes | None, ssl: ssl_module.SSLContext | None) -> None:
        self.url, self.hello, self.ssl = url, hello, ssl
        self.cut_after_s: float | None = None

    async def run(self, flood_for_s: float) -> None:
        parsed = urlparse(self.url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parsed.hostname, parsed.port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=self.ssl,
                                                       server_hostname=parsed.hostname if self.ssl else None)
        protocol = ClientProtocol(parse_uri(self.url))
        protocol.send_request(protocol.connect())
        writer.write(b"".join(protocol.data_to_send()))
        protocol.receive_data(await reader.readuntil(b"\r\n\r\n"))  # the handshake answer: the last read
        if self.hello is not None:
            protocol.send_binary(self.hello)
        started = time.monotonic()
        try:
            while time.monotonic() - started < flood_for_s:
                for _ in range(200):
                    protocol.send_ping(b"ping")
                writer.write(b"".join(protocol.data_to_send()))
                await writer.drain()
                await asyncio.sleep(0.005)
        except (ConnectionError, ssl_module.SSLError):
            self.cut_after_s = time.monotonic() - started
        finally:
            writer.transport.abort()


# ---------------------------------------------------------------------------- one edge session


@dataclass(frozen=True)
class EdgeSession:
    """What one edge session trains on, and how."""

    bundle: Bundle
    session: str
    data: TextData
    seed: int
    steps: int
    batch_size: int = 8
    checkpoint_every: int | None = 3  # None: no checkpoints (and no rewinds)
    lr: float = 1e-3


@dataclass
class EdgeOutcome:
    result: TrainResult
    parameters: dict[str, np.ndarray]
    reconnects: int
    bytes_sent: int
    bytes_received: int


class _BeforeStep(TrainerCallback):
    def __init__(self, hook: Callable[[int], None]) -> None:
        self.hook = hook

    def on_step_begin(self, step: int) -> None:
        self.hook(step)


async def train_edge(run: EdgeSession, url: str, checkpoint_dir: Path, *, token: str | None = None,
                     retry: Backoff | None = FAST_RETRY, before_step: Callable[[int], None] | None = None,
                     ssl=None) -> EdgeOutcome:
    """Train ``run`` against the cloud at ``url`` through the library API (``EdgeTrainer``), resuming
    from ``checkpoint_dir`` like ``sft-edge train`` does. ``before_step(n)`` runs before step ``n``
    is computed (every time it is: also when a rewind replays it)."""
    trainer = EdgeTrainer(run.bundle, cloud=url, session=run.session, checkpoint_dir=checkpoint_dir, token=token,
                          ssl=ssl, threads=1, retry=retry)
    config = trainer.run_config(run.data, batch_size=run.batch_size, epochs=100, max_steps=run.steps, lr=run.lr,
                                schedule="linear", warmup_steps=1, seed=run.seed)
    async with trainer:
        result = await trainer.train(run.data, config, checkpoint_every=run.checkpoint_every,
                                     callbacks=[_BeforeStep(before_step)] if before_step else ())
        client = trainer.client
    return EdgeOutcome(result, trainer.engine.parameters(), client.reconnects, client.bytes_sent,
                       client.bytes_received)


# ---------------------------------------------------------------------------- synthetic steps

SCHEDULE = Schedule(lr=1e-3, kind="constant", warmup_steps=0, total_steps=10)
SEED = 3
B, L = 4, 10


def train_request(bundle: Bundle, step: int, seed: int = 0) -> Train:
    """A valid training step with a random (finite) activation, as a device would send it."""
    rng = np.random.default_rng([seed, step])
    lengths = rng.integers(1, L + 1, B).astype(np.int32)
    z = rng.standard_normal((B, L, bundle.wire_width)).astype(np.float32)
    z *= (np.arange(L)[None, :] < lengths[:, None])[..., None]
    return Train(step, z, lengths, rng.integers(0, bundle.num_labels, B))


async def train_steps(client: CloudClient, bundle: Bundle, steps: range) -> list[float]:
    """Train ``steps`` of ``train_request`` through ``client``; their losses."""
    losses = []
    for step in steps:
        request = train_request(bundle, step)
        losses.append((await client.train_step(step, request.z, request.lengths, request.labels)).loss)
    return losses


def train_frame(bundle: Bundle, session_id: str, step: int) -> bytes:
    request = train_request(bundle, step)
    return encode(request.to_frame(session=session_tag(session_id), codec=Fp32Codec(Carries.ACTIVATION)))


def hello_frame(bundle: Bundle, session_id: str, token: str | None) -> bytes:
    return encode(Hello(session_id, bundle.hash, SessionConfig(SCHEDULE, SEED, "fp32"), token).to_frame())


# ---------------------------------------------------------------------------- the shared bundle

_TINY_DROPOUT: dict[str, Path] = {}


def tiny_dropout_bundle(tmp_path_factory, tiny_model_dir: Path, *, label_private: bool = False,
                        engine: str = "ort-training") -> Path:
    """The tiny BERT with dropout 0.1 (so the cloud's restored RNG matters), split 2, rank 4,
    ``ort-training`` (or ``engine``), max length 48: exported once per test session for these tests
    (``label_private``: the U-shaped split of the same model)."""
    from bundles import export_cached

    if "model" not in _TINY_DROPOUT:
        model_dir = tmp_path_factory.mktemp("tiny-dropout-faults") / "model"
        shutil.copytree(tiny_model_dir, model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config |= {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
        (model_dir / "config.json").write_text(json.dumps(config))
        _TINY_DROPOUT["model"] = model_dir
    return export_cached(tmp_path_factory, _TINY_DROPOUT["model"], split=2, rank=4, init="random", max_length=48,
                         lr=1e-3, engine=engine, **({"label_private": True} if label_private else {}))
