"""The edge's connection to ``sft-cloud``: send ``z``, get ``dz`` back. Never imports torch.

Why it exists: the training loop should see one awaitable call per step and typed errors,
not frames and sockets. This is the thin async I/O around ``splitwire.protocol`` on the
device side: it says hello (bundle hash, session config), checks the welcome, runs every
outgoing frame through the same validation the cloud will apply (so a bad batch fails
here with a clear message, before any byte is sent), validates every reply, and counts
the bytes of every frame it sends and receives.

Bytes are the lengths of the websocket messages actually sent and received (the frames),
not values computed from shapes; websocket framing (2–14 bytes a message) and TCP/IP
headers come on top.
"""

from __future__ import annotations

import ssl as ssl_module
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Callable, TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from splitwire.bundle import Bundle
from splitwire.codecs import Carries, codec_for
from splitwire.errors import BundleMismatch, ConfigMismatch, ConnectionLost, ProtocolError, SplitftError
from splitwire.protocol import (
    DEFAULT_MAX_BATCH, REPLAYED, Checkpointed, Error, Frame, Gradient, Hello, Kind, Predict, Prediction, SessionConfig, Train,
    Welcome, WireLimits, decode, encode, session_tag,
)
from splitwire.schedule import Schedule

T = TypeVar("T")


@dataclass(frozen=True)
class StepReply:
    step: int
    dz: np.ndarray  # float32, same shape as the z that was sent
    loss: float  # mean over the batch
    metrics: dict[str, float]  # {"correct", "count"} (classification) or {"squared_error", "count"}
    replayed: bool = False  # answered from the cloud's replay cache (the step was already applied)


class CloudClient:
    """One session with the cloud over one websocket connection; requests run one at a time."""

    def __init__(self, ws: ClientConnection, *, session_id: str, config: SessionConfig, limits: WireLimits) -> None:
        self._ws = ws
        self._tag = session_tag(session_id)
        self._activation = codec_for(config.codec, Carries.ACTIVATION, seed=config.seed)
        self._gradient = codec_for(config.codec, Carries.GRADIENT, seed=config.seed)
        self._limits = limits
        self._request = 0
        self.session_id = session_id
        self.resume_step = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_step_bytes = (0, 0)
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
    ) -> "CloudClient":
        """Open the session. ``resume_from`` is the last step this edge applied (after restoring
        its checkpoint), so the cloud can go back to its matching checkpoint; ``resume_step`` on
        the returned client says where the cloud is. Raises ``BundleMismatch`` / ``ConfigMismatch``
        when the two sides disagree, ``ConnectionLost`` when the cloud cannot be reached."""
        config = SessionConfig(schedule, seed, codec_for(codec, Carries.ACTIVATION).name)
        limits = WireLimits.from_bundle(bundle, max_batch=max_batch)
        try:
            ws = await connect(url, compression=None, max_size=limits.max_frame_bytes(), ssl=ssl,
                               open_timeout=open_timeout)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionLost(f"cannot reach the cloud at {url}: {exc}") from None
        client = cls(ws, session_id=session_id, config=config, limits=limits)
        try:
            hello = Hello(session_id, bundle.hash, config, token, resume_from)
            welcome = await client._exchange(encode(hello.to_frame()), 0, Welcome.from_frame)
            if welcome.bundle_hash != bundle.hash:
                raise BundleMismatch(
                    f"the cloud serves bundle {welcome.bundle_hash[:12]}…, this edge loaded {bundle.hash[:12]}… "
                    f"({bundle.root}): give both sides the same sft-export output"
                )
            if welcome.config != config:
                raise ConfigMismatch(f"the cloud welcomed session {session_id!r} with {welcome.config.to_meta()}, "
                                     f"this edge asked for {config.to_meta()}")
        except BaseException:
            await ws.close()
            raise
        client.resume_step = welcome.resume_step
        client._limits = replace(limits, max_batch=min(max_batch, welcome.max_batch))
        return client

    async def _exchange(self, data: bytes, step: int, read: Callable[[Frame], T]) -> T:
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
            Gradient.from_frame(reply, codec=self._gradient, shape=z.shape, lengths=lengths), reply.flags))
        self.last_step_bytes = self._last
        return StepReply(step, np.array(gradient.dz), gradient.loss, gradient.metrics, bool(flags & REPLAYED))

    async def predict(self, z: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits float32 ``(B, num_labels)`` for ``z``; nothing is trained, no labels are sent."""
        self._request += 1
        data = encode(Predict(self._request, z, lengths).to_frame(session=self._tag, codec=self._activation))
        Predict.from_frame(decode(data), limits=self._limits, codec=self._activation)
        prediction = await self._exchange(data, self._request, lambda reply: Prediction.from_frame(
            reply, batch=z.shape[0], num_labels=self._limits.num_labels))
        return np.array(prediction.logits)

    async def checkpoint(self, step: int) -> bool:
        """Ask the cloud to persist the session as it is after ``step``; False if it keeps no state dir."""
        reply = await self._exchange(encode(Frame(Kind.CHECKPOINT, self._tag, step)), step, Checkpointed.from_frame)
        return reply.persisted

    async def close(self) -> None:
        """Say bye and close the connection."""
        bye = encode(Frame(Kind.BYE, self._tag))
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
