"""The wire protocol between edge and cloud: frames, messages and their validation. No I/O.

Why it exists: edge and cloud are different programs (the edge without torch) that must
agree on every byte, and the cloud listens on a network. Keeping the protocol pure
(bytes in, checked values out) lets both sides share one implementation, lets tests and
fuzzers drive it without sockets, and keeps the async transport around it thin.

A frame is one binary websocket message::

    header   28 bytes, little-endian: magic "SPFT", version u8, kind u8, flags u16,
             session u64 (tag of the session id), step u64, meta length u32
    meta     UTF-8 JSON object; its "tensors" entry lists [{name, dtype, shape}, ...]
    tensors  the raw little-endian bytes of each listed tensor, in order, nothing after

``decode`` checks the structure (magic, version, kind, flags, JSON, that the tensor table
accounts for every byte); each message's ``from_frame`` then checks its fields and every
tensor's dtype and shape against ``WireLimits`` (from the bundle) and finiteness, before
any value is used. Senders run the same checks on what they are about to send.

Messages (``step`` is the header's step field):

==============  ==========  ===============================================================
kind            direction   carries
==============  ==========  ===============================================================
HELLO           edge→cloud  session id, token, bundle hash, session config, resume point
WELCOME         cloud→edge  bundle hash, session config, ``resume_step``, limits
TRAIN           edge→cloud  step n ≥ 1: ``z`` (codec parts, ``B×L×W``), ``lengths`` int32
                            ``(B,)`` (rows padded on the right), ``labels`` int64 ``(B,)``
                            (classification) or float32 ``(B,)`` (regression)
GRADIENT        cloud→edge  step n: ``dz`` (codec parts, same shape as ``z``), loss, metrics;
                            flag ``REPLAYED`` when answered from the replay cache
PREDICT         edge→cloud  request number: ``z``, ``lengths``; no training, no labels sent
PREDICTION      cloud→edge  request number: ``logits`` float32 ``(B, num_labels)``
CHECKPOINT      edge→cloud  step n: persist the session as it is after step n
CHECKPOINTED    cloud→edge  step n: whether it was persisted
AVERAGE         edge→cloud  step n: a fleet member's trainable edge weights and its example
                            count, for FedAvg (``splitwire.fedavg``)
AVERAGED        cloud→edge  step n: the fleet's example-weighted average of those weights
EDGE_GRADIENT   edge→cloud  step n: a shared-edge fleet member's edge gradient of step n (its
                            part of the round's one loss), one tensor per trainable edge weight
GRADIENT_SUM    cloud→edge  step n: the sum of the edge gradients of the round's members
ERROR           either      ``code`` (``splitwire.errors``) and message; then the sender closes
BYE             edge→cloud  polite end of the connection
TOP             cloud→edge  label-private step n, first reply: ``pooled`` (codec parts, ``B×1×hidden``)
TOP_GRADIENT    edge→cloud  label-private step n: ``dpooled`` (codec parts, ``B×1×hidden``)
==============  ==========  ===============================================================

Evaluation is ``PREDICT``: the edge scores the logits against labels that never leave it.

The label-private (U-shaped) split (``WireLimits.pooled`` set) changes three messages and adds
two: ``TRAIN`` carries no labels, the cloud answers it with ``TOP`` (the pooled top output), the
edge sends ``TOP_GRADIENT`` (its gradient, from the loss the device computed), and the cloud's
``GRADIENT`` carries ``dz`` alone, no loss and no metrics; ``PREDICTION`` carries ``pooled``
(``B×hidden`` float32) instead of logits. Each side refuses a frame of the other mode.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from splitwire.codecs import CODEC_NAMES, Carries, Codec, PartSpec, Shape3, codec_for
from splitwire.errors import ProtocolError, SplitftError, VersionMismatch, error_from_code
from splitwire.schedule import Schedule

MAGIC = b"SPFT"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHQQI")
MAX_META_BYTES = 1 << 16
MAX_DIMS = 4
MAX_NAME = 64
MAX_METRICS = 32
DEFAULT_MAX_BATCH = 256
REPLAYED = 1  # flag: this GRADIENT is a resend from the replay cache
KNOWN_FLAGS = REPLAYED

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (("float32", "<f4"), ("float16", "<f2"), ("int64", "<i8"), ("int32", "<i4"),
                       ("uint16", "<u2"), ("int8", "i1"), ("uint8", "u1"))
}


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    TRAIN = 3
    GRADIENT = 4
    PREDICT = 5
    PREDICTION = 6
    CHECKPOINT = 7
    CHECKPOINTED = 8
    ERROR = 9
    BYE = 10
    AVERAGE = 13
    AVERAGED = 14
    EDGE_GRADIENT = 15
    GRADIENT_SUM = 16
    TOP = 11
    TOP_GRADIENT = 12


@dataclass(frozen=True)
class Frame:
    """One decoded frame. ``tensors`` decoded from bytes are read-only views of the frame."""

    kind: Kind
    session: int = 0
    step: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    flags: int = 0


def session_tag(session_id: str) -> int:
    """The header's 64-bit session field: the first 8 bytes of SHA-256 of the session id."""
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "little")


# ---------------------------------------------------------------------------- frames


def encode(frame: Frame) -> bytes:
    """The frame's bytes. Tensors are converted to their little-endian wire dtype."""
    table, blobs = [], []
    for name, array in frame.tensors.items():
        if array.dtype.name not in DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {array.dtype}, which the wire does not carry")
        wire = np.ascontiguousarray(array, dtype=DTYPES[array.dtype.name])
        table.append({"name": name, "dtype": array.dtype.name, "shape": list(wire.shape)})
        blobs.append(wire.tobytes())
    try:
        meta = json.dumps({**frame.meta, "tensors": table}, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise ProtocolError(f"{frame.kind.name} metadata is not finite JSON: {exc}") from None
    if len(meta) > MAX_META_BYTES:
        raise ProtocolError(f"{frame.kind.name} metadata is {len(meta)} bytes; the limit is {MAX_META_BYTES}")
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, frame.kind, frame.flags, frame.session, frame.step, len(meta))
    return b"".join([header, meta, *blobs])


def decode(data: bytes | bytearray | memoryview | str) -> Frame:
    """Parse and structurally validate one frame; raises ``ProtocolError`` (or ``VersionMismatch``)."""
    if isinstance(data, str):
        raise ProtocolError("got a text message; splitft frames are binary")
    data = bytes(data)
    if len(data) < HEADER.size:
        raise ProtocolError(f"truncated frame: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, kind, flags, session, step, meta_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"not a splitft frame (magic {magic!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"the peer speaks splitft wire protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
            "install the same splitft release on the edge and the cloud"
        )
    if kind not in Kind._value2member_map_:
        raise ProtocolError(f"unknown message kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags {flags:#06x}")
    end = HEADER.size + meta_len
    if meta_len > MAX_META_BYTES or end > len(data):
        raise ProtocolError(f"metadata length {meta_len} exceeds the frame ({len(data)} bytes) or the limit")
    meta = _parse_meta(data[HEADER.size:end])
    tensors, offset = {}, end
    for name, dtype, shape in _tensor_table(meta.pop("tensors", None)):
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(data):
            raise ProtocolError(f"truncated frame: tensor {name!r} needs {nbytes} bytes, {len(data) - offset} left")
        tensors[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes
    if offset != len(data):
        raise ProtocolError(f"{len(data) - offset} unexpected bytes after the last tensor")
    return Frame(Kind(kind), session, step, meta, tensors, flags)


def _parse_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"metadata is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("metadata must be a JSON object")
    return meta


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in metadata")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is not a finite number")
    return value


def _tensor_table(table: Any) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    if not isinstance(table, list):
        raise ProtocolError("metadata lacks the tensor table")
    entries, names = [], set()
    for entry in table:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise ProtocolError(f"bad tensor table entry {str(entry)[:100]}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in names:
            raise ProtocolError(f"bad or repeated tensor name {str(name)[:100]!r}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r} has unknown dtype {str(dtype)[:32]!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise ProtocolError(f"tensor {name!r} has a bad shape {str(shape)[:100]}")
        names.add(name)
        entries.append((name, DTYPES[dtype], tuple(shape)))
    return entries


# ---------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class WireLimits:
    """What every tensor is checked against: the bundle's shapes and the server's batch limit."""

    max_batch: int
    max_length: int
    width: int  # last dimension of z: the rank, or hidden for a vanilla split
    num_labels: int  # 1 means regression
    pooled: int | None = None  # label-private split: the width (hidden) of the pooled top output; else None

    @classmethod
    def from_bundle(cls, bundle: Any, *, max_batch: int = DEFAULT_MAX_BATCH) -> "WireLimits":
        """From a ``splitwire.bundle.Bundle``."""
        return cls(max_batch, bundle.max_length, bundle.wire_width, bundle.num_labels, bundle.pooled_width)

    @property
    def label_private(self) -> bool:
        return self.pooled is not None

    def max_frame_bytes(self) -> int:
        """The largest frame either side may send: the widest codec at full batch and length (or, for the
        label-private split's pooled output and its gradient, at full batch)."""
        shapes = [((self.max_batch, self.max_length, self.width), np.full(self.max_batch, self.max_length, np.int32))]
        if self.pooled is not None:
            shapes.append(_pooled_shape(self.max_batch, self.pooled))
        activation = max(_nbytes(codec_for(name, Carries.ACTIVATION).parts(shape, lengths))
                         for name in CODEC_NAMES for shape, lengths in shapes)
        outputs = max(self.num_labels, self.pooled or 0)
        per_row = DTYPES["int32"].itemsize + DTYPES["int64"].itemsize + DTYPES["float32"].itemsize * outputs
        return HEADER.size + MAX_META_BYTES + activation + self.max_batch * per_row


def _nbytes(parts: dict[str, PartSpec]) -> int:
    return sum(math.prod(p.shape) * DTYPES[p.dtype].itemsize for p in parts.values())


def tensor(frame: Frame, name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """``frame.tensors[name]``, which must have exactly ``dtype`` and ``shape``."""
    array = frame.tensors.get(name)
    if array is None:
        raise ProtocolError(f"{frame.kind.name} lacks tensor {name!r}")
    if array.dtype != DTYPES[dtype]:
        raise ProtocolError(f"{frame.kind.name} tensor {name!r} must be {dtype} (little-endian), got {array.dtype}")
    if array.shape != shape:
        raise ProtocolError(f"{frame.kind.name} tensor {name!r} must have shape {shape}, got {array.shape}")
    return array


def finite(array: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ProtocolError(f"{what} contains NaN or infinite values")
    return array


def only(frame: Frame, names: set[str]) -> None:
    extra = set(frame.tensors) - names
    if extra:
        raise ProtocolError(f"{frame.kind.name} carries unexpected tensors {sorted(extra)[:5]}")


def field_of(meta: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    """``meta[key]``, which must be of ``kind`` (``int`` excludes ``bool``; ``float`` accepts ints)."""
    if key not in meta or (optional and meta[key] is None):
        if optional:
            return None
        raise ProtocolError(f"metadata lacks {key!r}")
    value = meta[key]
    ok = type(value) is int if kind is int else (
        type(value) in (int, float) if kind is float else isinstance(value, kind))
    if not ok:
        raise ProtocolError(f"metadata field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if type(value) is int and not -2**63 <= value < 2**63:
        raise ProtocolError(f"metadata field {key!r} is out of the 64-bit range")
    if kind is str and len(value) > 4096:
        raise ProtocolError(f"metadata field {key!r} is too long")
    return float(value) if kind is float else value


def expect(frame: Frame, kind: Kind) -> Frame:
    """``frame`` if it is of ``kind``; an ``ERROR`` frame raises the error it carries."""
    if frame.kind == Kind.ERROR and kind != Kind.ERROR:
        raise Error.from_frame(frame).exception()
    if frame.kind != kind:
        raise ProtocolError(f"expected {kind.name}, got {frame.kind.name}")
    return frame


def coded(frame: Frame, name: str, codec: Codec, shape: Shape3, lengths: np.ndarray) -> np.ndarray:
    """Read the float32 tensor ``name`` sent as ``codec`` parts; every part is checked first."""
    parts = {key: tensor(frame, _part_name(name, key), spec.dtype, spec.shape)
             for key, spec in codec.parts(shape, lengths).items()}
    value = codec.decode(parts, shape, lengths)
    if value.dtype != np.float32 or value.shape != shape:
        raise ProtocolError(f"codec {codec.name} decoded {name!r} as {value.dtype}{value.shape}, not float32{shape}")
    return finite(value, f"{frame.kind.name} tensor {name!r}")


def coded_parts(name: str, codec: Codec, x: np.ndarray, lengths: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
    return {_part_name(name, key): part for key, part in codec.encode(x, lengths, step=step).items()}


def _part_name(name: str, key: str) -> str:
    return f"{name}.{key}" if key else name


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class SessionConfig:
    """What both halves must agree on to train as one model: schedule, seed, wire codec."""

    schedule: Schedule
    seed: int
    codec: str

    def to_meta(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "seed": self.seed, "codec": self.codec}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "SessionConfig":
        raw = field_of(meta, "schedule", dict)
        try:
            schedule = Schedule.from_dict(raw)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"bad schedule {str(raw)[:200]}: {exc}") from None
        codec = field_of(meta, "codec", str)
        if codec not in CODEC_NAMES:
            raise ProtocolError(f"unknown wire codec {codec[:32]!r}; known: {', '.join(CODEC_NAMES)}")
        return cls(schedule, field_of(meta, "seed", int), codec)


def _fleet_name(meta: dict[str, Any]) -> str | None:
    """The optional ``fleet`` field: 1 to 64 printable characters, or absent (an isolated session)."""
    fleet = field_of(meta, "fleet", str, optional=True)
    if fleet is not None and not (0 < len(fleet) <= MAX_NAME and fleet.isprintable()):
        raise ProtocolError("fleet must be 1 to 64 printable characters")
    return fleet


@dataclass(frozen=True)
class Hello:
    """The edge opens a session (or resumes it: ``resume_from`` = the last step the edge applied);
    ``fleet`` names the fleet whose shared top part it trains (``None``: its own top part)."""

    session_id: str
    bundle_hash: str
    config: SessionConfig
    token: str | None = None
    resume_from: int | None = None
    fleet: str | None = None

    def to_frame(self) -> Frame:
        meta = {"session_id": self.session_id, "bundle_hash": self.bundle_hash, "token": self.token,
                "resume_from": self.resume_from, "fleet": self.fleet, **self.config.to_meta()}
        return Frame(Kind.HELLO, session_tag(self.session_id), 0, meta)

    @classmethod
    def from_frame(cls, frame: Frame) -> "Hello":
        meta = expect(frame, Kind.HELLO).meta
        only(frame, set())
        session_id = field_of(meta, "session_id", str)
        if not 0 < len(session_id) <= 128 or not session_id.isprintable():
            raise ProtocolError("session_id must be 1 to 128 printable characters")
        if frame.session != session_tag(session_id):
            raise ProtocolError("the header's session tag does not match the session id")
        resume_from = field_of(meta, "resume_from", int, optional=True)
        if resume_from is not None and resume_from < 0:
            raise ProtocolError("resume_from must be >= 0")
        return cls(session_id, field_of(meta, "bundle_hash", str), SessionConfig.from_meta(meta),
                   field_of(meta, "token", str, optional=True), resume_from, _fleet_name(meta))


@dataclass(frozen=True)
class Welcome:
    """The cloud accepts: its bundle hash and the session's config (the edge checks both),
    the last training step it has applied for this session, its batch limit, and the fleet the
    session trains in (a cloud without fleets sends none: the edge then refuses to go on), and
    whether that fleet shares one edge (each step's edge gradient summed, ``EDGE_GRADIENT``)."""

    bundle_hash: str
    config: SessionConfig
    resume_step: int
    max_batch: int
    fleet: str | None = None
    shared_edge: bool = False

    def to_frame(self, *, session: int) -> Frame:
        meta = {"bundle_hash": self.bundle_hash, "resume_step": self.resume_step, "max_batch": self.max_batch,
                "fleet": self.fleet, "shared_edge": self.shared_edge, **self.config.to_meta()}
        return Frame(Kind.WELCOME, session, 0, meta)

    @classmethod
    def from_frame(cls, frame: Frame) -> "Welcome":
        meta = expect(frame, Kind.WELCOME).meta
        resume_step, max_batch = field_of(meta, "resume_step", int), field_of(meta, "max_batch", int)
        if resume_step < 0 or max_batch < 1:
            raise ProtocolError(f"bad welcome: resume_step {resume_step}, max_batch {max_batch}")
        fleet, shared = _fleet_name(meta), field_of(meta, "shared_edge", bool)
        if shared and fleet is None:
            raise ProtocolError("bad welcome: a shared edge without a fleet")
        return cls(field_of(meta, "bundle_hash", str), SessionConfig.from_meta(meta), resume_step, max_batch,
                   fleet, shared)


def _activation_shape(frame: Frame, limits: WireLimits) -> tuple[Shape3, np.ndarray]:
    """The ``B×L×W`` shape of ``z`` and the checked ``lengths``."""
    shape = frame.meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)):
        raise ProtocolError(f"{frame.kind.name} metadata needs shape [batch, length]")
    batch, length = shape
    if not 1 <= batch <= limits.max_batch:
        raise ProtocolError(f"batch size {batch} is outside 1..{limits.max_batch}")
    if not 1 <= length <= limits.max_length:
        raise ProtocolError(f"sequence length {length} is outside 1..{limits.max_length} (the bundle's max_length)")
    lengths = tensor(frame, "lengths", "int32", (batch,))
    if not ((lengths >= 1) & (lengths <= length)).all():
        raise ProtocolError(f"lengths must be in 1..{length} (real tokens per row)")
    return (batch, length, limits.width), lengths


def _activation_frame(kind: Kind, session: int, step: int, codec: Codec, z: np.ndarray,
                      lengths: np.ndarray, **extra: np.ndarray) -> Frame:
    if z.ndim != 3:
        raise ProtocolError(f"z must be B×L×W, got shape {z.shape}")
    tensors = {**coded_parts("z", codec, z, lengths, step=step), "lengths": lengths, **extra}
    return Frame(kind, session, step, {"shape": list(z.shape[:2])}, tensors)


@dataclass(frozen=True)
class Train:
    """One training step's forward message; label-private, without ``labels`` (``None``)."""

    step: int
    z: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray | None

    def to_frame(self, *, session: int, codec: Codec) -> Frame:
        labels = {} if self.labels is None else {"labels": self.labels}
        return _activation_frame(Kind.TRAIN, session, self.step, codec, self.z, self.lengths, **labels)

    @classmethod
    def from_frame(cls, frame: Frame, *, limits: WireLimits, codec: Codec) -> "Train":
        expect(frame, Kind.TRAIN)
        if frame.step < 1:
            raise ProtocolError("training steps are numbered from 1")
        shape, lengths = _activation_shape(frame, limits)
        z = coded(frame, "z", codec, shape, lengths)
        if limits.label_private:  # the labels never leave the device: a TRAIN that carries any is refused
            only(frame, _names("z", codec, shape, lengths) | {"lengths"})
            return cls(frame.step, z, lengths, None)
        if limits.num_labels == 1:
            labels = finite(tensor(frame, "labels", "float32", shape[:1]), "regression labels")
        else:
            labels = tensor(frame, "labels", "int64", shape[:1])
            if not ((labels >= 0) & (labels < limits.num_labels)).all():
                raise ProtocolError(f"class labels must be in 0..{limits.num_labels - 1}")
        only(frame, _names("z", codec, shape, lengths) | {"lengths", "labels"})
        return cls(frame.step, z, lengths, labels)


@dataclass(frozen=True)
class Predict:
    """Logits for ``z`` without training; ``request`` numbers it (the header's step field)."""

    request: int
    z: np.ndarray
    lengths: np.ndarray

    def to_frame(self, *, session: int, codec: Codec) -> Frame:
        return _activation_frame(Kind.PREDICT, session, self.request, codec, self.z, self.lengths)

    @classmethod
    def from_frame(cls, frame: Frame, *, limits: WireLimits, codec: Codec) -> "Predict":
        expect(frame, Kind.PREDICT)
        shape, lengths = _activation_shape(frame, limits)
        z = coded(frame, "z", codec, shape, lengths)
        only(frame, _names("z", codec, shape, lengths) | {"lengths"})
        return cls(frame.step, z, lengths)


def _names(name: str, codec: Codec, shape: Shape3, lengths: np.ndarray) -> set[str]:
    return {_part_name(name, key) for key in codec.parts(shape, lengths)}


@dataclass(frozen=True)
class Gradient:
    """The cloud's answer to ``Train``: ``dL/dz``, the batch's mean loss and metrics. Label-private, the
    answer to ``TopGradient``, with ``dz`` alone (``loss`` and ``metrics`` are ``None``: the device has them)."""

    step: int
    dz: np.ndarray
    loss: float | None
    metrics: dict[str, float] | None

    def to_frame(self, *, session: int, codec: Codec, lengths: np.ndarray) -> Frame:
        meta = {} if self.loss is None else {"loss": self.loss, "metrics": self.metrics}
        tensors = coded_parts("dz", codec, self.dz, lengths, step=self.step)
        return Frame(Kind.GRADIENT, session, self.step, meta, tensors)

    @classmethod
    def from_frame(cls, frame: Frame, *, codec: Codec, shape: Shape3, lengths: np.ndarray,
                   label_private: bool = False) -> "Gradient":
        expect(frame, Kind.GRADIENT)
        dz = coded(frame, "dz", codec, shape, lengths)
        only(frame, _names("dz", codec, shape, lengths))
        if label_private:
            if frame.meta:
                raise ProtocolError(f"a label-private GRADIENT carries dz alone, not {sorted(frame.meta)[:5]}")
            return cls(frame.step, dz, None, None)
        loss = field_of(frame.meta, "loss", float)
        metrics = field_of(frame.meta, "metrics", dict)
        if len(metrics) > MAX_METRICS or not all(
                isinstance(k, str) and len(k) <= MAX_NAME and type(v) in (int, float) for k, v in metrics.items()):
            raise ProtocolError("metrics must map at most 32 short names to numbers")
        return cls(frame.step, dz, loss, {k: float(v) for k, v in metrics.items()})


@dataclass(frozen=True)
class Prediction:
    """The cloud's answer to ``Predict``: float32 logits ``(B, num_labels)``; label-private (``pooled``
    is the width), the pooled top output ``(B, hidden)`` that the device's head turns into logits."""

    request: int
    logits: np.ndarray

    def to_frame(self, *, session: int, pooled: bool = False) -> Frame:
        return Frame(Kind.PREDICTION, session, self.request, {}, {"pooled" if pooled else "logits": self.logits})

    @classmethod
    def from_frame(cls, frame: Frame, *, batch: int, num_labels: int, pooled: int | None = None) -> "Prediction":
        expect(frame, Kind.PREDICTION)
        name, width = ("logits", num_labels) if pooled is None else ("pooled", pooled)
        logits = finite(tensor(frame, name, "float32", (batch, width)), name)
        only(frame, {name})
        return cls(frame.step, logits)


def _pooled_shape(batch: int, width: int) -> tuple[Shape3, np.ndarray]:
    """A pooled ``B×hidden`` tensor goes through the codecs as ``B`` rows of one token."""
    return (batch, 1, width), np.ones(batch, dtype=np.int32)


@dataclass(frozen=True)
class PooledMessage:
    """A label-private step's ``B×hidden`` float32 tensor, sent through the codecs as ``B`` rows of one
    token, with the batch size as its only metadata: ``Top`` and ``TopGradient``."""

    step: int
    values: np.ndarray
    KIND: ClassVar[Kind]
    NAME: ClassVar[str]

    def to_frame(self, *, session: int, codec: Codec) -> Frame:
        if self.values.ndim != 2:
            raise ProtocolError(f"{self.NAME} must be B×hidden, got shape {self.values.shape}")
        shape, lengths = _pooled_shape(*self.values.shape)
        parts = coded_parts(self.NAME, codec, self.values.reshape(shape), lengths, step=self.step)
        return Frame(self.KIND, session, self.step, {"batch": self.values.shape[0]}, parts)

    @classmethod
    def from_frame(cls, frame: Frame, *, codec: Codec, batch: int, width: int) -> "PooledMessage":
        """Checked against the step's ``batch`` and the model's ``width`` (hidden)."""
        expect(frame, cls.KIND)
        if field_of(frame.meta, "batch", int) != batch or set(frame.meta) != {"batch"}:
            raise ProtocolError(f"{frame.kind.name} must be for the step's batch of {batch} and carry nothing else")
        shape, lengths = _pooled_shape(batch, width)
        values = coded(frame, cls.NAME, codec, shape, lengths)
        only(frame, _names(cls.NAME, codec, shape, lengths))
        return cls(frame.step, values.reshape(batch, width))


class Top(PooledMessage):
    """Label-private step, the cloud's first answer: the pooled top output ``B×hidden``."""

    KIND, NAME = Kind.TOP, "pooled"


class TopGradient(PooledMessage):
    """Label-private step, the edge's second message: ``dL/dpooled`` ``B×hidden``, from the device's loss."""

    KIND, NAME = Kind.TOP_GRADIENT, "dpooled"


@dataclass(frozen=True)
class CheckpointRequest:
    """The edge asks the cloud to persist the session as it is after ``step``."""

    step: int

    def to_frame(self, *, session: int) -> Frame:
        return Frame(Kind.CHECKPOINT, session, self.step)

    @classmethod
    def from_frame(cls, frame: Frame) -> "CheckpointRequest":
        expect(frame, Kind.CHECKPOINT)
        only(frame, set())
        return cls(frame.step)


@dataclass(frozen=True)
class Bye:
    """The edge ends the connection politely; the session stays on the cloud."""

    def to_frame(self, *, session: int) -> Frame:
        return Frame(Kind.BYE, session)

    @classmethod
    def from_frame(cls, frame: Frame) -> "Bye":
        expect(frame, Kind.BYE)
        only(frame, set())
        return cls()


@dataclass(frozen=True)
class Checkpointed:
    """The cloud's answer to a ``CHECKPOINT`` request for ``step``."""

    step: int
    persisted: bool

    def to_frame(self, *, session: int) -> Frame:
        return Frame(Kind.CHECKPOINTED, session, self.step, {"persisted": self.persisted})

    @classmethod
    def from_frame(cls, frame: Frame) -> "Checkpointed":
        expect(frame, Kind.CHECKPOINTED)
        return cls(frame.step, field_of(frame.meta, "persisted", bool))


def _weights(frame: Frame, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The frame's tensors, which must be exactly ``shapes``' names, float32 of those shapes, finite."""
    if set(frame.tensors) != set(shapes):
        raise ProtocolError(f"{frame.kind.name} must carry exactly the trainable edge weights; differs in "
                            f"{sorted(set(frame.tensors) ^ set(shapes))[:5]}")
    return {name: finite(tensor(frame, name, "float32", shape), f"{frame.kind.name} weight {name!r}")
            for name, shape in shapes.items()}


def weights_frame_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The largest edge-sized frame (``AVERAGE``, ``AVERAGED``, ``EDGE_GRADIENT``, ``GRADIENT_SUM``) for ``shapes``."""
    return HEADER.size + MAX_META_BYTES + sum(math.prod(s) for s in shapes.values()) * DTYPES["float32"].itemsize


@dataclass(frozen=True)
class Average:
    """A fleet member's trainable edge weights after its step ``step``, and the examples it trained on."""

    step: int
    examples: int
    weights: dict[str, np.ndarray]

    def to_frame(self, *, session: int) -> Frame:
        return Frame(Kind.AVERAGE, session, self.step, {"examples": self.examples}, self.weights)

    @classmethod
    def from_frame(cls, frame: Frame, *, shapes: dict[str, tuple[int, ...]]) -> "Average":
        expect(frame, Kind.AVERAGE)
        examples = field_of(frame.meta, "examples", int)
        if examples < 1:
            raise ProtocolError("examples must be at least 1")
        return cls(frame.step, examples, _weights(frame, shapes))


@dataclass(frozen=True)
class EdgeTensors:
    """One tensor per trainable edge weight at step ``step``: the base of the fleet's edge-sized frames."""

    KIND: ClassVar[Kind]
    step: int
    tensors: dict[str, np.ndarray]

    def to_frame(self, *, session: int) -> Frame:
        return Frame(self.KIND, session, self.step, {}, self.tensors)

    @classmethod
    def from_frame(cls, frame: Frame, *, shapes: dict[str, tuple[int, ...]]):
        expect(frame, cls.KIND)
        return cls(frame.step, _weights(frame, shapes))


class Averaged(EdgeTensors):
    """The cloud's answer to ``Average``: the fleet's example-weighted average of the edge weights."""

    KIND = Kind.AVERAGED


class EdgeGradient(EdgeTensors):
    """A shared-edge fleet member's gradient of its step ``step`` for every trainable edge weight."""

    KIND = Kind.EDGE_GRADIENT


class GradientSum(EdgeTensors):
    """The cloud's answer to ``EdgeGradient``: the sum over the round's members, which every one applies."""

    KIND = Kind.GRADIENT_SUM


@dataclass(frozen=True)
class Error:
    """A typed failure; the sender closes the connection after it."""

    code: str
    message: str

    @classmethod
    def of(cls, error: SplitftError) -> "Error":
        return cls(error.code, str(error)[:2000])

    def exception(self) -> SplitftError:
        return error_from_code(self.code, self.message)

    def to_frame(self, *, session: int = 0, step: int = 0) -> Frame:
        return Frame(Kind.ERROR, session, step, {"code": self.code, "message": self.message})

    @classmethod
    def from_frame(cls, frame: Frame) -> "Error":
        expect(frame, Kind.ERROR)
        return cls(field_of(frame.meta, "code", str)[:64], field_of(frame.meta, "message", str))
