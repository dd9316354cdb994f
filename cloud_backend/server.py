"""The cloud's websocket server: sessions in, gradients out, compute off the event loop.

Why it exists: this is the thin async I/O around ``splitwire.protocol``. Each connection
says hello (session id, token, bundle hash, session config, resume point); the token is
checked (``cloud_backend.auth``) before anything else is looked at, then the connection is
welcomed or refused with a typed error, then sends numbered requests, one at a time, that
are validated against the bundle before any tensor is touched. Training and prediction run
on one worker thread (the GPU when present), so the loop keeps answering pings and other
sessions meanwhile, and sessions share it fairly by compute time (``cloud_backend.fair_compute``). Each session id owns an isolated ``CloudSession``; a resent step is
answered from its replay cache.

Limits, each refused with a typed error frame and a clean close, without disturbing other
connections: frames larger than the bundle's shapes allow (the websocket layer refuses
them, close code 1009), connections and sessions beyond ``max_connections`` /
``max_sessions`` (``busy``), no hello within ``hello_timeout`` or no request within
``idle_timeout`` (``idle_timeout``), a request sent before the previous one was answered
(``in_flight``). A peer that does not read what it is sent is cut off (``cloud_backend.guard``),
and a refusal's error frame and closing handshake get ``CLOSE_GRACE_S``, after which the
connection is aborted: no connection outlives its timeouts by more than that.

Start it in-process with ``async with serve_cloud(bundle, port=0) as server: server.url``;
``sft-cloud`` (``cloud_backend.cli``) wraps the same call. One JSON log line per event; each
session's traffic, loss and step latency are kept for the status port (``cloud_backend.observe``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import ssl as ssl_module
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from cloud_backend.auth import TokenStore
from cloud_backend.fair_compute import FairCompute
from cloud_backend.fleet import FLEET_PREFIX, CloudFleet, FleetSettings, edge_shapes
from cloud_backend.guard import DEFAULT_SEND_TIMEOUT_S, SendGuard
from cloud_backend.model import pick_device
from cloud_backend.observe import Activity, FleetStatus, Metrics, SessionStatus, serve_status
from cloud_backend.session import SNAPSHOTS, CloudSession, StepResult, checkpoint_path, saved_step, session_key
from cloud_backend.state_budget import trim, used_bytes
from splitwire.atomic import remove_stale_temp_files
from splitwire.bundle import Bundle
from splitwire.steps import CloudSteps
from splitwire.codecs import Carries, Codec, codec_for
from splitwire.errors import (
    BundleMismatch, CheckpointCorrupt, ConfigMismatch, IdleTimeout, NonFinite, ProtocolError, ServerBusy, SplitftError, TooManyInFlight,
)
from splitwire.protocol import (
    Average, DEFAULT_MAX_BATCH, EdgeGradient, SessionConfig, REPLAYED, Bye, CheckpointRequest, Checkpointed, Error, Frame, Gradient, Hello, Kind, Predict, Prediction, Top,
    TopGradient, Train, Welcome, WireLimits, decode, encode, session_tag, weights_frame_bytes,
)

log = logging.getLogger("splitft.cloud")
DEFAULT_HELLO_TIMEOUT_S = 10.0
CLOSE_GRACE_S = 2.0  # for an error frame and the closing handshake after a refusal
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_SESSION_TTL_S = 3600.0  # a disconnected session older than this gives its place to a new one
DEFAULT_MAX_STATE_BYTES = 10 << 30  # 10 GiB: about 100 MiniLM or 10 bert-base sessions
RECEIVE_QUEUE_FRAMES = 2  # frames the websocket layer buffers per connection before TCP pushes back
CLOSE_POLICY = 1008  # websocket close code "policy violation": sent after an error frame

def checked_reply(build: Callable[[], bytes], parse: Callable[[Frame], Any]) -> bytes:
    """The reply ``build`` makes, after ``parse`` has read it back exactly as the edge will: what
    the cloud sends is validated like what it receives. A reply that fails is never sent."""
    try:
        reply = build()
        parse(decode(reply))
    except ProtocolError as exc:
        raise NonFinite(f"the cloud's reply would be invalid ({exc}); it was not sent") from None
    return reply


def log_event(event: str, **fields: Any) -> None:
    """One structured log line: a JSON object with the time, the event and its fields."""
    log.info(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}, default=str))


@dataclass
class ServerStats:
    """What the server did, for logs, tests and the load benchmark."""

    connections: int = 0  # websocket connections accepted
    open_connections: int = 0
    welcomed: int = 0
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by error code
    tensor_frames: int = 0  # TRAIN and PREDICT frames whose tensors were read
    steps: int = 0  # training steps applied
    replays: int = 0  # resent steps answered from a replay cache
    corrupt_checkpoints: int = 0  # snapshots set aside as unreadable or failing their checksum
    evicted: int = 0  # sessions moved from memory to the state dir to make room
    expired: int = 0  # disconnected sessions dropped from memory after session_ttl
    trimmed: int = 0  # saved sessions deleted to keep the state dir within max_state_bytes
    aborted: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by why: cut off


@dataclass
class LiveSession:
    """A session held in memory, with what its connection handler needs around it."""

    session: CloudSession
    activation: Codec
    gradient: Codec
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    connection: ServerConnection | None = None
    last_active: float = dataclasses.field(default_factory=time.monotonic)  # for eviction: least recently used
    activity: Activity = dataclasses.field(default_factory=Activity)  # for the status port (``observe``)
    fleet: CloudFleet | None = None  # a fleet member: ``session`` is the fleet's shared top part
    member: str = ""  # a fleet member's session id
    member_config: SessionConfig | None = None  # a fleet member's own schedule, seed and codec

    @classmethod
    def of(cls, session: CloudSession, fleet: CloudFleet | None = None, member: str = "",
           config: SessionConfig | None = None) -> "LiveSession":
        """``config``: a fleet member's own (its codec); the shared top steps on the fleet's schedule."""
        config = config or session.config
        return cls(session, codec_for(config.codec, Carries.ACTIVATION, seed=config.seed),
                   codec_for(config.codec, Carries.GRADIENT, seed=config.seed), fleet=fleet, member=member,
                   member_config=None if fleet is None else config)

    @property
    def config(self) -> SessionConfig:
        return self.session.config if self.member_config is None else self.member_config

    @property
    def steps(self) -> CloudSteps:
        """This device's step order and replay cache (a fleet keeps one per member)."""
        return self.session.steps if self.fleet is None else self.fleet.members[self.member]


class CloudServer:
    """Holds the sessions and answers one connection at a time per session."""

    def __init__(self, bundle: Bundle, *, device: torch.device, state_dir: Path | None, max_sessions: int,
                 max_batch: int, tokens: TokenStore | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
                 max_connections: int | None = None, hello_timeout: float = DEFAULT_HELLO_TIMEOUT_S,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT_S, session_ttl: float = DEFAULT_SESSION_TTL_S,
                 max_state_bytes: int | None = DEFAULT_MAX_STATE_BYTES, fleets: FleetSettings | None = None,
                 fleet_type: type[CloudFleet] = CloudFleet) -> None:
        self.bundle = bundle
        self.device = device
        self.state_dir = state_dir
        self.max_sessions = max_sessions
        self.max_connections = max_connections or 2 * max_sessions
        self.tokens = tokens
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self.session_ttl = session_ttl
        self.max_state_bytes = max_state_bytes
        self.guard = SendGuard(send_timeout=send_timeout, on_abort=self._aborted)
        self.limits = WireLimits.from_bundle(bundle, max_batch=max_batch)
        self.sessions: dict[str, LiveSession] = {}
        self.fleet_settings = fleets or FleetSettings()
        self.fleet_type = fleet_type  # ``cloud_backend.fleet_workers.WorkerFleet`` under torchrun
        self.fleets: dict[str, CloudFleet] = {}  # by name (``cloud_backend.fleet``)
        self.members: dict[str, LiveSession] = {}  # fleet members, by session id
        self._fleet_tasks: dict[str, asyncio.Task] = {}  # each fleet's rounds (``CloudFleet.run``), by name
        self.stats = ServerStats()
        self.url = ""
        self._opening = asyncio.Lock()
        self.compute = FairCompute(thread_name="sft-cloud-compute")
        self.metrics = Metrics(self)
        self.status_url = ""  # the status port's, when it is served

    # ------------------------------------------------------------------ connections

    async def handle(self, ws: ServerConnection) -> None:
        """One connection: hello, then requests until bye, a drop, or an error."""
        peer, where = str(ws.remote_address), {"session": 0, "step": 0}
        live: LiveSession | None = None
        self.stats.connections += 1
        self.stats.open_connections += 1
        try:
            if self.stats.open_connections > self.max_connections:
                raise ServerBusy(f"the cloud holds its limit of {self.max_connections} connections; try again later")
            raw_hello = await self._receive(ws, self.hello_timeout, "no hello")
            first = decode(raw_hello)
            if first.kind != Kind.HELLO:  # an ERROR frame's code is the peer's, never this server's refusal
                raise ProtocolError(f"expected HELLO, got {first.kind.name}")
            hello = Hello.from_frame(first)
            where["session"] = session_tag(hello.session_id)
            live = await self._welcome(ws, hello, peer)
            live.activity.received(len(raw_hello))
            await self._requests(ws, live, hello, where)
            if live.fleet is not None:
                live.fleet.leave(live.member)
            log_event("bye", session=hello.session_id, peer=peer)
        except SplitftError as exc:
            await self._refuse(ws, exc, peer=peer, **where)
        except ConnectionClosed as exc:
            log_event("disconnected", peer=peer, code=exc.rcvd.code if exc.rcvd else None)
        except Exception as exc:  # a bug or a device failure: tell the edge, keep serving the others
            log.exception("internal error")
            await self._refuse(ws, SplitftError(f"internal error on the cloud: {exc!r}"[:500]), peer=peer, **where)
        finally:
            self.stats.open_connections -= 1
            if live is not None and live.connection is ws:
                live.connection = None
                live.last_active = time.monotonic()

    @staticmethod
    async def _receive(ws: ServerConnection, timeout: float, what: str,
                       receiving: asyncio.Future | None = None) -> bytes | str:
        """The next message (``receiving``, when a receive is already under way), within ``timeout``."""
        try:
            return await asyncio.wait_for(asyncio.shield(receiving) if receiving else ws.recv(), timeout)
        except TimeoutError:
            raise IdleTimeout(f"{what} within {timeout:g} s: closing this connection") from None

    async def _requests(self, ws: ServerConnection, live: LiveSession, hello: Hello, where: dict[str, int]) -> None:
        """Answer requests one at a time until bye.

        The next message is received while a request is being answered, so a client that
        does not wait for an answer before sending again is refused (``TooManyInFlight``);
        the request under way still completes, and a training step's reply is cached.
        """
        receiving = asyncio.ensure_future(ws.recv())
        try:
            while True:
                data = await self._receive(ws, self.idle_timeout, "no request", receiving)
                live.activity.received(len(data))
                frame = decode(data)
                where["step"] = frame.step
                if frame.session != where["session"]:
                    raise ProtocolError("frame for another session on this connection")
                if frame.kind == Kind.BYE:
                    Bye.from_frame(frame)
                    return
                answering = asyncio.ensure_future(self._answer(live, frame, data))
                receiving = asyncio.ensure_future(ws.recv())
                await asyncio.wait({answering, receiving}, return_when=asyncio.FIRST_COMPLETED)
                reply = await answering
                if receiving.done():
                    receiving.result()  # a dropped connection raises ConnectionClosed here
                    raise TooManyInFlight(f"session {hello.session_id!r} sent a request before the answer to "
                                          f"step {frame.step}: send one request at a time")
                await ws.send(reply)
                live.activity.sent(len(reply))
        finally:
            receiving.cancel()
            if receiving.done() and not receiving.cancelled():
                receiving.exception()  # retrieved: a drop noticed while failing otherwise is not logged as lost

    async def _refuse(self, ws: ServerConnection, exc: SplitftError, **where: Any) -> None:
        self.stats.refused[exc.code] += 1
        log_event("refused", code=exc.code, message=str(exc), **where)
        await self._close(ws, CLOSE_POLICY, exc.code,
                          encode(Error.of(exc).to_frame(session=where["session"], step=where["step"])))

    @staticmethod
    async def _close(ws: ServerConnection, code: int, reason: str, last: bytes | None = None) -> None:
        """Send ``last`` (if any) and close, within ``CLOSE_GRACE_S``; past that, abort the transport."""
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                if last is not None:
                    await ws.send(last)
                await ws.close(code, reason)
        except ConnectionClosed:
            pass
        except TimeoutError:
            ws.abort(f"did not take its closing frames within {CLOSE_GRACE_S:g} s")

    def _aborted(self, ws: ServerConnection, reason: str) -> None:
        self.stats.aborted[reason.split()[0]] += 1
        log_event("aborted", peer=str(ws.remote_address), reason=reason)

    async def _welcome(self, ws: ServerConnection, hello: Hello, peer: str) -> LiveSession:
        if self.tokens is not None:
            self.tokens.check(hello.session_id, hello.token)
            if hello.fleet is not None:
                self.tokens.check_fleet(hello.session_id, hello.fleet)
        if hello.bundle_hash != self.bundle.hash:
            raise BundleMismatch(
                f"the edge loaded bundle {hello.bundle_hash[:12]}…, this cloud serves {self.bundle.hash[:12]}… "
                f"({self.bundle.root}): give both sides the same sft-export output"
            )
        live = await (self._session(hello) if hello.fleet is None else self._member(hello))
        if live.config != hello.config:
            raise ConfigMismatch(
                f"session {hello.session_id!r} was started with {live.session.config.to_meta()}, the edge now "
                f"asks for {hello.config.to_meta()}: resume with the same schedule, seed and codec, or use a new "
                "session id"
            )
        if live.connection is not None:  # the edge reconnected before the old connection was seen to drop
            await self._close(live.connection, 1000, "replaced by a newer connection of this session")
        live.connection = ws
        async with live.lock:
            if hello.resume_from is not None:
                await self._rewind(live, hello.resume_from)
            resume = live.steps.step
        tag = session_tag(hello.session_id)
        shared = live.fleet is not None and live.fleet.settings.edge == "shared"
        welcome = encode(Welcome(self.bundle.hash, live.config, resume, self.limits.max_batch, hello.fleet, shared)
                         .to_frame(session=tag))
        if live.fleet is not None:  # its edge weights come up for averaging: larger frames, after the token check
            ws.protocol.max_message_size = max(ws.protocol.max_message_size or 0,
                                               weights_frame_bytes(live.fleet.shapes))
        await ws.send(welcome)
        live.activity.sent(len(welcome))
        live.activity.connections += 1
        self.stats.welcomed += 1
        log_event("welcome", session=hello.session_id, peer=peer, resume_step=resume,
                  resume_from=hello.resume_from)
        return live

    # ------------------------------------------------------------------ sessions

    async def _member(self, hello: Hello) -> LiveSession:
        """A fleet member: its fleet in memory, restored from the state dir, or new (``cloud_backend.fleet``)."""
        if self.limits.label_private:
            raise ConfigMismatch("this cloud serves a label-private bundle; its sessions train alone, not in fleets")
        async with self._opening:
            fleet = self.fleets.get(hello.fleet)
            if fleet is None:
                await self._make_room()
                fleet = await self._open_fleet(hello)
            fleet.join(hello.session_id)
            live = self.members.get(hello.session_id)
            if live is None or live.fleet is not fleet or live.config != hello.config:
                live = self.members[hello.session_id] = LiveSession.of(fleet.top, fleet, hello.session_id,
                                                                       hello.config)
            return live

    async def _open_fleet(self, hello: Hello) -> CloudFleet:
        key = FLEET_PREFIX + hello.fleet
        shapes = edge_shapes(self.bundle)

        def snapshot(kind: str) -> Path | None:
            return self._snapshot(key, kind)

        fleet = None
        for _, path in sorted(self._saved(key).items(), reverse=True):
            try:
                fleet = await self.compute.run(key, self.fleet_type.restore, path, self.fleet_settings, bundle=self.bundle,
                                               device=self.device, compute=self.compute, shapes=shapes,
                                               snapshot=snapshot)
                break
            except CheckpointCorrupt as exc:
                self._set_aside(path, exc)
        if fleet is not None:
            self._forget_latest(key)
            log_event("restored_fleet", fleet=hello.fleet, step=fleet.top.step, members=len(fleet.members))
        else:
            top = await self.compute.run(key, CloudSession, session_id=key, bundle=self.bundle, config=hello.config,
                                         device=self.device)
            fleet = self.fleet_type(hello.fleet, top, self.fleet_settings, compute=self.compute, shapes=shapes,
                               snapshot=snapshot)
            log_event("new_fleet", fleet=hello.fleet, schedule=self.fleet_settings.schedule, device=str(self.device))
        self.fleets[hello.fleet] = fleet
        self._fleet_tasks[hello.fleet] = asyncio.create_task(fleet.run())
        return fleet

    async def _session(self, hello: Hello) -> LiveSession:
        """The session in memory, or restored from the state dir, or a new one."""
        async with self._opening:
            live = self.sessions.get(hello.session_id)
            if live is not None:
                return live
            await self._make_room()
            session = await self._restore_newest(hello.session_id)
            if session is not None:
                self._forget_latest(hello.session_id)
                log_event("restored", session=hello.session_id, step=session.step)
            else:
                session = await self.compute.run(hello.session_id, CloudSession, session_id=hello.session_id,
                                                 bundle=self.bundle, config=hello.config, device=self.device)
                log_event("new_session", session=hello.session_id, device=str(self.device))
            live = self.sessions[hello.session_id] = LiveSession.of(session)
            return live

    async def _restore_newest(self, session_id: str) -> CloudSession | None:
        """The session from its newest intact snapshot; a corrupt one is set aside and the next tried."""
        for _, path in sorted(self._saved(session_id).items(), reverse=True):
            restored = await self._restore(path)
            if restored is not None:
                return restored
        return None

    async def _restore(self, path: Path) -> CloudSession | None:
        try:
            return await self.compute.run(path.name, CloudSession.restore, path, bundle=self.bundle, device=self.device)
        except CheckpointCorrupt as exc:
            self._set_aside(path, exc)
            return None

    def _set_aside(self, path: Path, exc: CheckpointCorrupt) -> None:
        """Rename a corrupt snapshot to ``*.corrupt`` (kept for the operator, never read again) and log it."""
        kept = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, kept)
        self.stats.corrupt_checkpoints += 1
        log_event("corrupt_checkpoint", path=str(path), kept_as=str(kept), reason=str(exc))

    async def _make_room(self) -> None:
        """Below ``max_sessions`` (a fleet's shared top counts as one session): first drop the sessions and
        fleets disconnected for longer than ``session_ttl``, then, with a state dir, evict the least recently
        used disconnected one (saved: it comes back on its next hello). No connection can attach meanwhile:
        the caller holds ``_opening``."""
        now = time.monotonic()
        idle = sorted([(live.last_active, "session", session_id) for session_id, live in self.sessions.items()
                       if live.connection is None] + self._idle_fleets())
        for last_active, kind, key in idle:
            if now - last_active > self.session_ttl:
                await self._drop_held(kind, key, "expired")
        if len(self.sessions) + len(self.fleets) < self.max_sessions:
            return
        held = {"session": self.sessions, "fleet": self.fleets}
        victim = next(((kind, key) for _, kind, key in idle if key in held[kind]), None)
        if victim is None or self.state_dir is None:
            raise ServerBusy(f"the cloud holds its limit of {self.max_sessions} sessions"
                             f"{'' if victim is None else ' and has no --state-dir to evict one to'}; "
                             "try again later")
        await self._drop_held(*victim, "evicted")

    async def _drop_held(self, kind: str, key: str, why: str) -> None:
        await (self._drop(key, why) if kind == "session" else self._drop_fleet(key, why))

    def _idle_fleets(self) -> list[tuple[float, str, str]]:
        """Fleets no member is connected to and no round waits in, with their members' last activity. Not
        under torchrun: every worker holds its fleet, and one worker cannot leave the collectives alone."""
        if self.fleet_type is not CloudFleet:
            return []
        idle = []
        for name, fleet in self.fleets.items():
            members = [live for live in self.members.values() if live.fleet is fleet]
            if fleet.idle() and all(live.connection is None and not live.lock.locked() for live in members):
                idle.append((max((live.last_active for live in members), default=0.0), "fleet", name))
        return idle

    async def _drop_fleet(self, name: str, why: str) -> None:
        """Take an idle fleet out of memory, saving it first when there is a state dir; its members' next
        hello restores it (``_open_fleet``)."""
        fleet = self.fleets.pop(name)
        self._fleet_tasks.pop(name).cancel()
        saved = await fleet.save_latest()
        for member in [m for m, live in self.members.items() if live.fleet is fleet]:
            del self.members[member]
        setattr(self.stats, why, getattr(self.stats, why) + 1)
        log_event(why, fleet=name, step=fleet.top.step, saved=saved, sessions=len(self.sessions) + len(self.fleets))
        self._trim_state()

    async def _drop(self, session_id: str, why: str) -> None:
        """Take a disconnected session out of memory, saving it first when there is a state dir."""
        live = self.sessions[session_id]
        path = self._snapshot(session_id, "latest")
        if path is not None:
            async with live.lock:
                await self.compute.run(session_id, live.session.save, path)
        del self.sessions[session_id]
        setattr(self.stats, why, getattr(self.stats, why) + 1)
        log_event(why, session=session_id, step=live.session.step, saved=path is not None,
                  sessions=len(self.sessions))
        self._trim_state()

    def _trim_state(self, *, keep_live: bool = True) -> None:
        """Keep the state dir within ``max_state_bytes``: delete the least recently saved sessions,
        not those in memory while the server runs (``cloud_backend.state_budget``)."""
        if self.state_dir is None or self.max_state_bytes is None:
            return
        live = [*self.sessions, *(fleet.key for fleet in self.fleets.values())]
        keep = {session_key(session_id) for session_id in live} if keep_live else set()
        for deleted in trim(self.state_dir, self.max_state_bytes, keep=keep):
            self.stats.trimmed += 1
            log_event("trimmed", session_file=deleted.key, bytes=deleted.size, max_state_bytes=self.max_state_bytes)

    async def _rewind(self, live: LiveSession, resume_from: int) -> None:
        """Go back to a saved state when the edge resumes from an older step than the cloud holds.

        The edge may be one step behind (the last reply was lost: the replay cache answers
        its resend). Further behind, the session is restored from a checkpoint taken at
        exactly ``resume_from``; without one, the welcome's ``resume_step`` tells the edge
        where the cloud is and the edge decides. A fleet member goes on from where it resumes
        (``CloudFleet.resume``): the shared top part does not go back for one device.
        """
        if live.fleet is not None:
            live.fleet.resume(live.member, resume_from)
            return
        session = live.session
        if session.steps.meets(resume_from):
            return
        path = self._saved(session.session_id).get(resume_from)
        restored = None if path is None else await self._restore(path)
        if restored is not None:
            live.session = restored
            log_event("rewound", session=session.session_id, from_step=session.step, to_step=resume_from)

    def _saved(self, session_id: str) -> dict[int, Path]:
        """This session's checkpoint files in the state dir, by the step they were taken at."""
        if self.state_dir is None:
            return {}
        saved = {}
        for snapshot in SNAPSHOTS:
            path = checkpoint_path(self.state_dir, session_id, snapshot)
            try:
                if path.is_file():
                    saved[saved_step(path)] = path
            except CheckpointCorrupt as exc:
                self._set_aside(path, exc)
        return saved

    def _snapshot(self, session_id: str, snapshot: str) -> Path | None:
        return None if self.state_dir is None else checkpoint_path(self.state_dir, session_id, snapshot)

    def _forget_latest(self, session_id: str) -> None:
        """Drop the ``latest`` snapshot once the session is back in memory.

        From then on the live session is the truth and may be rewound onto another path; a
        ``latest`` file left behind would, after a crash, restore a state the edge never
        reaches again. After a crash the session restarts from its ``requested`` snapshot,
        which the edge's own checkpoint of the same step matches.
        """
        path = self._snapshot(session_id, "latest")
        if path is not None:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ requests

    async def _answer(self, live: LiveSession, frame: Frame, data: bytes) -> bytes:
        async with live.lock:
            started = time.perf_counter()
            live.last_active = time.monotonic()
            if frame.kind == Kind.TRAIN:
                reply = await self._train(live, frame, hashlib.sha256(data).hexdigest())
            elif frame.kind == Kind.TOP_GRADIENT and self.limits.label_private:
                reply = await self._finish(live, frame)
            elif frame.kind == Kind.PREDICT:
                reply = await self._predict(live, frame)
            elif frame.kind == Kind.CHECKPOINT:
                reply = await self._save(live, frame)
            elif frame.kind == Kind.AVERAGE and live.fleet is not None:
                reply = await self._average(live, frame)
            elif frame.kind == Kind.EDGE_GRADIENT and live.fleet is not None:
                reply = await self._sum_gradients(live, frame)
            else:
                raise ProtocolError(f"the cloud does not accept {frame.kind.name} here")
            elapsed = time.perf_counter() - started
            if frame.kind == Kind.TRAIN:
                live.activity.step_seconds = elapsed
                self.metrics.step_seconds.observe(elapsed)
            log_event(frame.kind.name.lower(), session=live.session.session_id, step=frame.step, up=len(data),
                      down=len(reply), ms=round(1000 * elapsed, 2))
            return reply

    def _replayed(self, session: CloudSession, step: int, reply: bytes, **fields: Any) -> bytes:
        """A cached reply, sent again with the ``REPLAYED`` flag."""
        self.stats.replays += 1
        log_event("replay", session=session.session_id, step=step, **fields)
        return encode(dataclasses.replace(decode(reply), flags=REPLAYED))

    async def _train(self, live: LiveSession, frame: Frame, digest: str) -> bytes:
        session = live.session
        if self.limits.label_private:
            return await self._begin(live, frame, digest)
        cached = live.steps.cached_reply(frame.step)
        if cached is not None:
            return self._replayed(session, frame.step, cached.reply, same_request=digest == cached.digest)
        self.stats.tensor_frames += 1
        request = Train.from_frame(frame, limits=self.limits, codec=live.activation)
        losses: list[float] = []

        def answer(result: StepResult) -> bytes:  # checked as the edge will check it, before the step is applied
            losses.append(result.loss)
            gradient = Gradient(frame.step, result.dz, result.loss, result.metrics)
            return checked_reply(lambda: encode(gradient.to_frame(session=frame.session, codec=live.gradient,
                                                                  lengths=request.lengths)),
                                 lambda reply: Gradient.from_frame(reply, codec=live.gradient, shape=request.z.shape,
                                                                   lengths=request.lengths))

        if live.fleet is not None:
            reply = await live.fleet.train(live.member, request, digest, answer)
        else:
            reply = await self.compute.run(session.session_id, session.train, request, digest=digest, answer=answer)
        self.stats.steps += 1
        if losses:  # none when a fleet member's resend was answered by the round its first send joined
            live.activity.loss = losses[-1]
        return reply

    async def _begin(self, live: LiveSession, frame: Frame, digest: str) -> bytes:
        """Label-private step, first half: a TRAIN without labels is answered with TOP, the pooled top output."""
        session = live.session
        cached = session.steps.cached_top(frame.step, digest)
        if cached is not None:
            return self._replayed(session, frame.step, cached, half="top")
        self.stats.tensor_frames += 1
        request = Train.from_frame(frame, limits=self.limits, codec=live.activation)
        batch = request.z.shape[0]

        def answer(pooled: np.ndarray) -> bytes:
            top = Top(frame.step, pooled)
            return checked_reply(lambda: encode(top.to_frame(session=frame.session, codec=live.activation)),
                                 lambda reply: Top.from_frame(reply, codec=live.activation, batch=batch,
                                                              width=self.limits.pooled))

        return await self.compute.run(session.session_id, session.begin, request, digest=digest, answer=answer)

    async def _finish(self, live: LiveSession, frame: Frame) -> bytes:
        """Label-private step, second half: TOP_GRADIENT is answered with ``dz`` alone, then the step is applied."""
        session = live.session
        cached = session.steps.cached_gradient(frame.step)
        if cached is not None:
            return self._replayed(session, frame.step, cached.reply, half="gradient")
        self.stats.tensor_frames += 1
        held = session.held
        shape = (len(held.lengths), int(held.z.shape[1]), self.limits.width)
        request = TopGradient.from_frame(frame, codec=live.gradient, batch=shape[0], width=self.limits.pooled)

        def answer(result: StepResult) -> bytes:
            gradient = Gradient(frame.step, result.dz, None, None)
            return checked_reply(lambda: encode(gradient.to_frame(session=frame.session, codec=live.gradient,
                                                                  lengths=held.lengths)),
                                 lambda reply: Gradient.from_frame(reply, codec=live.gradient, shape=shape,
                                                                   lengths=held.lengths, label_private=True))

        reply = await self.compute.run(session.session_id, session.finish, request, answer=answer)
        self.stats.steps += 1
        return reply

    async def _predict(self, live: LiveSession, frame: Frame) -> bytes:
        self.stats.tensor_frames += 1
        request = Predict.from_frame(frame, limits=self.limits, codec=live.activation)
        logits = await self.compute.run(live.session.session_id, live.session.predict, request)
        pooled = self.limits.pooled  # label-private: the pooled top output goes down, the device makes the logits
        return checked_reply(lambda: encode(Prediction(frame.step, logits).to_frame(session=frame.session,
                                                                                     pooled=pooled is not None)),
                             lambda reply: Prediction.from_frame(reply, batch=logits.shape[0],
                                                                 num_labels=self.limits.num_labels, pooled=pooled))

    async def _average(self, live: LiveSession, frame: Frame) -> bytes:
        """A fleet member's averaging round: its edge weights up, the fleet's FedAvg down."""
        averaged = await live.fleet.average(live.member, Average.from_frame(frame, shapes=live.fleet.shapes))
        return encode(averaged.to_frame(session=frame.session))

    async def _sum_gradients(self, live: LiveSession, frame: Frame) -> bytes:
        """A shared-edge member's gradient round: its edge gradient up, the round's sum down."""
        summed = await live.fleet.sum_gradients(live.member, EdgeGradient.from_frame(frame, shapes=live.fleet.shapes))
        return encode(summed.to_frame(session=frame.session))

    async def _save(self, live: LiveSession, frame: Frame) -> bytes:
        if live.fleet is not None:
            persisted = await live.fleet.checkpoint(live.member, CheckpointRequest.from_frame(frame).step)
            self._trim_state()
            return encode(Checkpointed(frame.step, persisted).to_frame(session=frame.session))
        session = live.session
        session.steps.check_checkpoint(CheckpointRequest.from_frame(frame).step)
        path = self._snapshot(session.session_id, "requested")
        if path is not None:
            await self.compute.run(session.session_id, session.save, path)
            self._trim_state()
        return encode(Checkpointed(frame.step, path is not None).to_frame(session=frame.session))

    # ------------------------------------------------------------------ the status port

    def session_statuses(self) -> list[SessionStatus]:
        """Every session in memory, by its ``session_key`` (the status port shows no session id)."""
        return [SessionStatus(session=session_key(session_id), step=live.session.step,
                              connected=live.connection is not None, **dataclasses.asdict(live.activity))
                for session_id, live in sorted(self.sessions.items())]

    def fleet_statuses(self) -> list[FleetStatus]:
        """Every fleet in memory, by the ``session_key`` of its shared top part (never its members' ids):
        its shared step, and its connected members' traffic summed, their last loss and step latency."""
        rows = []
        for fleet in sorted(self.fleets.values(), key=lambda fleet: fleet.key):
            members = [live for live in self.members.values() if live.fleet is fleet]
            latest = max(members, key=lambda live: live.activity.last_seen, default=None)
            rows.append(FleetStatus(
                fleet=session_key(fleet.key), schedule=fleet.settings.schedule, devices=len(fleet.members),
                connected=sum(live.connection is not None for live in members), step=fleet.top.step,
                bytes_in=sum(live.activity.bytes_in for live in members),
                bytes_out=sum(live.activity.bytes_out for live in members),
                loss=None if latest is None else latest.activity.loss,
                step_seconds=None if latest is None else latest.activity.step_seconds,
                last_seen=time.time() if latest is None else latest.activity.last_seen))
        return rows

    async def close(self) -> None:
        """Checkpoint every session (when there is a state dir) and stop the worker thread."""
        for session_id, live in self.sessions.items():
            path = self._snapshot(session_id, "latest")
            if path is not None:
                async with live.lock:
                    await self.compute.run(session_id, live.session.save, path)
                log_event("saved", session=session_id, step=live.session.step)
        for task in self._fleet_tasks.values():
            task.cancel()
        for name, fleet in self.fleets.items():
            if await fleet.save_latest():
                log_event("saved_fleet", fleet=name, step=fleet.top.step)
        self._trim_state(keep_live=False)
        self.compute.shutdown()


@contextlib.asynccontextmanager
async def serve_cloud(
    bundle: Bundle,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    device: str = "auto",
    state_dir: Path | None = None,
    max_sessions: int = 64,
    max_batch: int = DEFAULT_MAX_BATCH,
    ssl: ssl_module.SSLContext | None = None,
    tokens: TokenStore | None = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int | None = None,
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT_S,
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S,
    session_ttl: float = DEFAULT_SESSION_TTL_S,
    max_state_bytes: int | None = DEFAULT_MAX_STATE_BYTES,
    fleets: FleetSettings | None = None,
    fleet_type: type[CloudFleet] = CloudFleet,
    status_host: str = "127.0.0.1",
    status_port: int | None = None,
) -> AsyncIterator[CloudServer]:
    """Serve ``bundle``'s cloud half until the block exits; ``port=0`` picks a free port (see ``.url``).

    ``tokens``: each session's token (``None``: any session id is accepted, for a cloud that
    only loopback reaches). ``ssl``: serve ``wss://``. ``max_connections`` defaults to twice
    ``max_sessions``. ``send_timeout``: a peer that reads nothing of what it is sent for this long is cut off
    (``cloud_backend.guard``). Sessions: at most ``max_sessions`` in memory; one disconnected for longer
    than ``session_ttl`` makes room for a new one, and with a ``state_dir`` the least recently used
    disconnected one is evicted to disk; the state dir is kept within ``max_state_bytes`` (``None``: no
    limit) by deleting the least recently saved sessions. On exit the connections are closed (1001, going away), in-flight steps
    finish, and every session is checkpointed into ``state_dir``. ``status_port``: also serve the status page,
    its JSON and Prometheus metrics over HTTP on ``status_host`` (``cloud_backend.observe``; see ``.status_url``).
    ``fleet_type``: the class of its fleets (``cloud_backend.fleet_workers.WorkerFleet`` for a worker under torchrun).
    """
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        removed, size = remove_stale_temp_files(state_dir)
        if removed:
            log_event("removed_temp_files", state_dir=state_dir, files=removed, bytes=size)
    server = CloudServer(bundle, device=pick_device(device), state_dir=state_dir, max_sessions=max_sessions,
                         max_batch=max_batch, tokens=tokens, idle_timeout=idle_timeout,
                         max_connections=max_connections, hello_timeout=hello_timeout, send_timeout=send_timeout,
                         session_ttl=session_ttl, max_state_bytes=max_state_bytes, fleets=fleets,
                         fleet_type=fleet_type)
    try:
        async with serve(server.handle, host, port, compression=None, ssl=ssl, max_queue=RECEIVE_QUEUE_FRAMES,
                         max_size=server.limits.max_frame_bytes(), close_timeout=CLOSE_GRACE_S,
                         create_connection=server.guard.connection_factory()) as ws_server, \
                contextlib.AsyncExitStack() as status:
            bound_port = ws_server.sockets[0].getsockname()[1]
            server.url = f"{'wss' if ssl else 'ws'}://{host}:{bound_port}"
            if status_port is not None:
                served = await status.enter_async_context(serve_status(server, server.metrics, host=status_host,
                                                                       port=status_port))
                server.status_url = served.url
            log_event("listening", url=server.url, bundle=bundle.hash, device=str(server.device),
                      max_frame_bytes=server.limits.max_frame_bytes(), state_dir=state_dir,
                      tokens=None if tokens is None else len(tokens.digests), idle_timeout_s=idle_timeout,
                      hello_timeout_s=hello_timeout, send_timeout_s=send_timeout, max_sessions=max_sessions,
                      session_ttl_s=session_ttl, max_state_bytes=max_state_bytes,
                      state_bytes=None if state_dir is None else used_bytes(state_dir),
                      status_url=server.status_url or None)
            yield server
    finally:
        await server.close()
