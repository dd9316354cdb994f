"""The edge's connection to ``sft-cloud``: send ``z``, get ``dz`` back. Never imports torch.

Why it exists: the training loop should see one awaitable call per step and typed errors,
not frames and sockets. This is the thin async I/O around ``splitwire.protocol`` on the
device side: it says hello (bundle hash, session config), checks the welcome, runs every
outgoing frame through the same validation the cloud will apply (so a bad batch fails
here with a clear message, before any byte is sent), validates every reply, and counts
the bytes of every frame it sends and receives.

Bytes are the lengths of the websocket messages actually sent and received (the frames),
not values computed from shapes; websocket framing (2–14 bytes a message) and TCP/IP
headers come on top; a request resent after a reconnect counts again.

Faults: given a ``Backoff``, a lost connection (or a busy or idle-closed one) is reopened
with exponential backoff and full jitter, the session resumed, and the request under way
resent. That is exact: a step the cloud already applied is answered from its replay cache,
never applied twice. When the cloud comes back *behind* the edge (it restarted from an
older checkpoint), the client raises ``SessionRewound``: the trainer must take the edge
back to its own checkpoint of that step. Label-private bundles: a step is two round trips
(``train_step_private``), and after a reconnect in either the whole step is resent from its
``TRAIN`` (``splitwire.steps``).

Every connection's opening handshake carries ``ROUTE_HEADER``: the session's 64-bit tag (a
hash of the session id, the same every frame header carries), so that a load balancer in
front of several cloud workers sends a session to the same worker every time
(deploy/haproxy/haproxy.cfg) without learning the session id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl as ssl_module
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from splitwire.bundle import Bundle
from splitwire.codecs import Carries, codec_for
from splitwire.errors import (
    BundleMismatch, ConfigMismatch, ConnectionLost, ProtocolError, RetryableError, SplitftError,
    UsageError,
)
from splitwire.protocol import (
    Average, Averaged, DEFAULT_MAX_BATCH, EdgeGradient, EdgeTensors, GradientSum, REPLAYED, Bye, CheckpointRequest, Checkpointed, Error, Frame, Gradient, Hello, Kind, Predict, Prediction, SessionConfig, Top,
    TopGradient, Train, Welcome, WireLimits, decode, encode, session_tag, weights_frame_bytes,
)
from splitwire.schedule import Schedule
from splitwire.steps import EdgeSteps

if TYPE_CHECKING:
    from edge_runtime.label_head import HeadStep

T = TypeVar("T")
ROUTE_HEADER = "X-Splitft-Session"
TOKEN_ENV = "SFT_TOKEN"  # the session token, when no --token-file is given
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnect attempts: attempt ``n`` sleeps uniformly in ``[0, min(max_s, first_s·factorⁿ)]``
    (full jitter, so devices that lost the cloud together do not return together), until
    ``give_up_after_s`` have passed since the connection was lost."""

    first_s: float = 0.25
    factor: float = 2.0
    max_s: float = 10.0
    give_up_after_s: float = 300.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_s, self.first_s * self.factor ** attempt))


@dataclass(frozen=True)
class Dial:
    """Everything needed to open (and reopen) the session's connection."""

    url: str
    bundle: Bundle
    session_id: str
    token: str | None
    config: SessionConfig
    limits: WireLimits
    ssl: ssl_module.SSLContext | None
    open_timeout: float
    fleet: str | None = None  # the fleet whose shared top part this session trains


def session_token(token_file: Path | None) -> str | None:
    """The session's token: ``token_file``'s text, else ``$SFT_TOKEN``; ``None`` without either."""
    if token_file is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        return token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {token_file}: {exc}") from None


def client_tls(url: str, ca_file: Path | None) -> ssl_module.SSLContext | None:
    """The TLS context for ``url``: ``wss://`` verifies the cloud's certificate against ``ca_file``
    (else the system's CAs) and its host name; ``ws://`` has none."""
    if not url.startswith("wss://"):
        if ca_file is not None:
            raise UsageError(f"--ca-file is for wss:// URLs; {url} is not encrypted")
        return None
    return ssl_module.create_default_context(cafile=ca_file)


@dataclass(frozen=True)
class StepReply:
    step: int
    dz: np.ndarray  # float32, same shape as the z that was sent
    loss: float  # mean over the batch
    metrics: dict[str, float]  # {"correct", "count"} (classification) or {"squared_error", "count"}
    replayed: bool = False  # answered from the cloud's replay cache (the step was already applied)


class CloudClient:
    """One session with the cloud over a websocket connection (reopened after faults when
    ``retry`` is given); requests run one at a time."""

    def __init__(self, dial: Dial, *, retry: Backoff | None, rng: random.Random | None = None) -> None:
        self._dial = dial
        self._retry = retry
        self._rng = rng or random.Random()
        self._ws: ClientConnection | None = None
        self._tag = session_tag(dial.session_id)
        self._activation = codec_for(dial.config.codec, Carries.ACTIVATION, seed=dial.config.seed)
        self._gradient = codec_for(dial.config.codec, Carries.GRADIENT, seed=dial.config.seed)
        self._limits = dial.limits
        self._request = 0
        self.session_id = dial.session_id
        self.steps = EdgeSteps(dial.session_id)  # step order, resume and resend rules (``splitwire.steps``)
        self.reconnects = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_step_bytes = (0, 0)
        self.averaging_bytes = 0  # AVERAGE and AVERAGED frames (fleet averaging of the edge weights)
        self.shared_edge_bytes = 0  # EDGE_GRADIENT and GRADIENT_SUM frames (a fleet's shared edge)
        self.shared_edge = False  # the cloud welcomed this session into a fleet with one shared edge
        self._weights_frame = 0  # the largest edge-sized frame, once this edge sent one: every connection takes it
        self._last = (0, 0)  # (up, down) bytes of the last exchange of any kind

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        bundle: Bundle,
        session_id: str,
        token: str | None = None,
        schedule: Schedule,
        seed: int = 0,
        ssl: ssl_module.SSLContext | None = None,
        open_timeout: float = 30.0,
        resume_from: int | None = None,
        codec: str = "fp32",
        max_batch: int = DEFAULT_MAX_BATCH,
        retry: Backoff | None = None,
        rng: random.Random | None = None,
        fleet: str | None = None,
    ) -> "CloudClient":
        """Open the session. ``resume_from`` is the last step this edge applied (after restoring
        its checkpoint), so the cloud can go back to its matching checkpoint; ``resume_step`` on
        the returned client says where the cloud is. Raises ``BundleMismatch`` / ``ConfigMismatch``
        when the two sides disagree, ``AuthError`` for a wrong token, ``ConnectionLost`` when the
        cloud cannot be reached (with ``retry``: within its ``give_up_after_s``)."""
        config = SessionConfig(schedule, seed, codec_for(codec, Carries.ACTIVATION).name)
        dial = Dial(url, bundle, session_id, token, config, WireLimits.from_bundle(bundle, max_batch=max_batch), ssl,
                    open_timeout, fleet)
        client = cls(dial, retry=retry, rng=rng)
        await client._retrying(lambda: client._open(resume_from), what="connecting")
        client.steps.applied(client.resume_step)
        return client

    @property
    def resume_step(self) -> int:
        """The last training step the cloud had applied when the connection (re)opened."""
        return self.steps.resume_step

    @property
    def step(self) -> int:
        """The last training step both halves have applied, as far as this client knows."""
        return self.steps.step

    async def _open(self, resume_from: int | None) -> None:
        """Open a connection and say hello; on return ``resume_step`` is where the cloud's session is."""
        dial = self._dial
        try:
            self._ws = await connect(dial.url, compression=None,
                                     max_size=max(dial.limits.max_frame_bytes(), self._weights_frame),
                                     ssl=dial.ssl, open_timeout=dial.open_timeout,
                                     additional_headers={ROUTE_HEADER: f"{self._tag:016x}"})
        except ssl_module.SSLCertVerificationError as exc:
            raise SplitftError(f"cannot verify the certificate of {dial.url}: {exc.verify_message}; "
                               "pass the CA that signed it (--ca-file)") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost(f"cannot reach the cloud at {dial.url}: {exc}") from None
        hello = Hello(dial.session_id, dial.bundle.hash, dial.config, dial.token, resume_from, dial.fleet)
        welcome = await self._exchange_once(encode(hello.to_frame()), 0, Welcome.from_frame)
        try:
            if welcome.bundle_hash != dial.bundle.hash:
                raise BundleMismatch(
                    f"the cloud serves bundle {welcome.bundle_hash[:12]}…, this edge loaded {dial.bundle.hash[:12]}… "
                    f"({dial.bundle.root}): give both sides the same sft-export output"
                )
            if welcome.fleet != dial.fleet:
                raise ConfigMismatch(f"the edge asked to train in fleet {dial.fleet!r}, the cloud welcomed session "
                                     f"{dial.session_id!r} in {welcome.fleet!r}: update sft-cloud, or drop --fleet")
            if welcome.config != dial.config:
                raise ConfigMismatch(f"the cloud welcomed session {dial.session_id!r} with "
                                     f"{welcome.config.to_meta()}, this edge asked for {dial.config.to_meta()}")
        except SplitftError:
            await self._ws.close()
            raise
        self.steps.welcomed(welcome.resume_step)
        self.shared_edge = welcome.shared_edge
        self._limits = replace(dial.limits, max_batch=min(dial.limits.max_batch, welcome.max_batch))

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], *, what: str) -> T:
        """``attempt()``, repeated after ``Backoff`` delays while it fails with a retryable error."""
        lost_at, tries = time.monotonic(), 0
        while True:
            try:
                return await attempt()
            except RetryableError as exc:
                if self._retry is None:
                    raise
                delay = self._retry.delay(tries, self._rng)
                if time.monotonic() - lost_at + delay > self._retry.give_up_after_s:
                    raise ConnectionLost(f"gave up {what} after {tries + 1} attempts in "
                                         f"{time.monotonic() - lost_at:.1f} s: {exc}") from None
                tries += 1
                log.warning("%s %s: %s; retrying in %.2f s", what, self._dial.url, exc, delay)
                await asyncio.sleep(delay)

    async def _exchange(self, data: bytes, step: int, read: Callable[[Frame], T], *, resume_from: int,
                        accept: tuple[int, ...]) -> T:
        """``_exchange_once``; after a retryable failure, reopen the session and resend ``data``.

        ``resume_from`` is the step the edge is at for this request and ``accept`` the steps the
        cloud may be at for the resend to be exact; anywhere else raises ``SessionRewound``.
        """
        return await self._resending(lambda: self._exchange_once(data, step, read), step, resume_from=resume_from,
                                     accept=accept)

    async def _resending(self, attempt: Callable[[], Awaitable[T]], step: int, *, resume_from: int,
                         accept: tuple[int, ...]) -> T:
        """``attempt()`` (one or more exchanges); after a retryable failure, reopen the session and run it again."""
        async def reopen_and_resend() -> T:
            await self._open(resume_from)
            self.reconnects += 1
            self.steps.check_resend(edge_step=resume_from, accept=accept)
            return await attempt()

        try:
            return await attempt()
        except RetryableError as exc:
            if self._retry is None:
                raise
            log.warning("lost the cloud during request %d: %s; reconnecting", step, exc)
        return await self._retrying(reopen_and_resend, what="reconnecting to")

    async def _exchange_once(self, data: bytes, step: int, read: Callable[[Frame], T]) -> T:
        """Send one frame and ``read`` the checked reply to it; an error frame raises its error.

        Any error in the reply is fatal to the connection: it is closed before the error is raised.
        """
        try:
            await self._ws.send(data)
            self.bytes_sent += len(data)
            raw = await self._ws.recv()
        except ConnectionClosed as exc:
            raise ConnectionLost(f"the connection to the cloud closed: {exc}") from None
        self.bytes_received += len(raw)
        self._last = (len(data), len(raw))
        try:
            reply = decode(raw)
            if reply.kind == Kind.ERROR:
                raise Error.from_frame(reply).exception()
            if reply.session != self._tag or reply.step != step:
                raise ProtocolError(f"reply for session {reply.session:#x} step {reply.step} to a request for "
                                    f"session {self._tag:#x} step {step}")
            return read(reply)
        except SplitftError:
            await self._ws.close()
            raise

    async def train_step(self, step: int, z: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> StepReply:
        """Send step ``step`` (1-based, consecutive; resending the last one is safe) and get ``dL/dz``.

        ``z``: float32 ``B×L×W``; ``lengths``: int32 ``(B,)`` real tokens per row, rows padded on
        the right; ``labels``: int64 ``(B,)`` (classification) or float32 ``(B,)`` (regression).
        """
        data = encode(Train(step, z, lengths, labels).to_frame(session=self._tag, codec=self._activation))
        Train.from_frame(decode(data), limits=self._limits, codec=self._activation)
        gradient, flags = await self._exchange(data, step, lambda reply: (
            Gradient.from_frame(reply, codec=self._gradient, shape=z.shape, lengths=lengths), reply.flags),
            resume_from=step - 1, accept=self.steps.train_accept(step))
        self.steps.applied(step)
        self.last_step_bytes = self._last
        return StepReply(step, np.array(gradient.dz), gradient.loss, gradient.metrics, bool(flags & REPLAYED))

    async def train_step_private(self, step: int, z: np.ndarray, lengths: np.ndarray,
                                 head: Callable[[np.ndarray], "HeadStep"]) -> StepReply:
        """A label-private step: send ``z`` without labels, get the pooled top output ``B×hidden``, send
        ``head(pooled).dpooled`` (the device computes the loss), get ``dL/dz``. ``head`` must be pure until
        the step is applied: after a reconnect both round trips run again."""
        train = encode(Train(step, z, lengths, None).to_frame(session=self._tag, codec=self._activation))
        Train.from_frame(decode(train), limits=self._limits, codec=self._activation)
        batch, width = z.shape[0], self._limits.pooled

        async def both_round_trips() -> tuple["HeadStep", Gradient, int]:
            top = await self._exchange_once(train, step, lambda reply: Top.from_frame(
                reply, codec=self._activation, batch=batch, width=width))
            first = self._last
            result = head(np.array(top.values))
            up = encode(TopGradient(step, result.dpooled).to_frame(session=self._tag, codec=self._gradient))
            TopGradient.from_frame(decode(up), codec=self._gradient, batch=batch, width=width)
            gradient, flags = await self._exchange_once(up, step, lambda reply: (Gradient.from_frame(
                reply, codec=self._gradient, shape=z.shape, lengths=lengths, label_private=True), reply.flags))
            self._last = (first[0] + self._last[0], first[1] + self._last[1])
            return result, gradient, flags

        result, gradient, flags = await self._resending(both_round_trips, step, resume_from=step - 1,
                                                        accept=self.steps.train_accept(step))
        self.steps.applied(step)
        self.last_step_bytes = self._last
        return StepReply(step, np.array(gradient.dz), result.loss, result.metrics, bool(flags & REPLAYED))

    async def predict(self, z: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits float32 ``(B, num_labels)`` for ``z`` (label-private: the pooled top output ``(B, hidden)``,
        which the device's head turns into logits); nothing is trained, no labels are sent."""
        self._request += 1
        data = encode(Predict(self._request, z, lengths).to_frame(session=self._tag, codec=self._activation))
        Predict.from_frame(decode(data), limits=self._limits, codec=self._activation)
        prediction = await self._exchange(data, self._request, lambda reply: Prediction.from_frame(
            reply, batch=z.shape[0], num_labels=self._limits.num_labels, pooled=self._limits.pooled),
            resume_from=self.step, accept=(self.step,))
        return np.array(prediction.logits)

    async def checkpoint(self, step: int) -> bool:
        """Ask the cloud to persist the session as it is after ``step``; False if it keeps no state dir."""
        reply = await self._exchange(encode(CheckpointRequest(step).to_frame(session=self._tag)), step,
                                     Checkpointed.from_frame, resume_from=step, accept=(step,))
        return reply.persisted

    async def average(self, step: int, examples: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send this fleet member's trainable edge weights after ``step`` (and the examples it trained on);
        returns the fleet's example-weighted average of them. Counted in ``averaging_bytes`` too."""
        averaged = await self._edge_exchange(Average(step, examples, weights), Averaged)
        self.averaging_bytes += sum(self._last)
        return averaged

    async def sum_gradients(self, step: int, gradients: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send this shared-edge member's edge gradient of ``step``; returns the sum over the round's members,
        the gradient every member applies. Counted in ``shared_edge_bytes`` too."""
        summed = await self._edge_exchange(EdgeGradient(step, gradients), GradientSum)
        self.shared_edge_bytes += sum(self._last)
        return summed

    async def _edge_exchange(self, request: Average | EdgeGradient, answer: type[EdgeTensors]) -> dict[str, np.ndarray]:
        """One edge-sized round trip: ``request`` checked as the cloud will read it, its answer of the same
        shapes; from now on every connection takes frames that large."""
        tensors = request.weights if isinstance(request, Average) else request.tensors
        shapes = {name: value.shape for name, value in tensors.items()}
        data = encode(request.to_frame(session=self._tag))
        type(request).from_frame(decode(data), shapes=shapes)
        self._weights_frame = weights_frame_bytes(shapes)
        self._ws.protocol.max_message_size = max(self._ws.protocol.max_message_size or 0, self._weights_frame)
        reply = await self._exchange(data, request.step, lambda frame: answer.from_frame(frame, shapes=shapes),
                                     resume_from=request.step, accept=(request.step,))
        return {name: np.array(value) for name, value in reply.tensors.items()}

    async def close(self) -> None:
        """Say bye and close the connection."""
        bye = encode(Bye().to_frame(session=self._tag))
        try:
            await self._ws.send(bye)
            self.bytes_sent += len(bye)
        except ConnectionClosed:
            pass
        await self._ws.close()

    async def __aenter__(self) -> "CloudClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
