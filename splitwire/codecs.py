"""Wire codecs: how a ``B×L×W`` float32 activation ``z`` or gradient ``dz`` becomes wire tensors.

Why it exists: the paper sends ``z`` and ``dz`` as they are (``fp32``); cheaper encodings
(half precision, int8 with scales, sending only the real tokens) change only how that one
tensor is laid out on the wire. A codec is told which of the two it carries (an encoding
may treat them differently: stochastic rounding applies to gradients only) and turns the
tensor into named *parts* — raw arrays the protocol frames and validates — and back.

A codec sees the tensor as tokens of ``W`` values: all ``B×L`` of them (the parts keep
that shape), or with **padding-aware packing** only the ``T = Σ lengths`` real ones, as
a ``T×W`` matrix (rows are padded on the right, so that is each row's first tokens); the receiver puts zeros at padding (``dz`` is exactly zero there anyway, and the
cloud's loss does not depend on ``z`` there: padded keys are masked out of attention and
the pooler reads the first token). Wire names compose a base encoding with
options, in this order: ``<base>[+sr][+packed]``, e.g. ``fp16+packed``, ``int8+sr+packed``.

- ``fp32``: float32 values, the paper's encoding and the default; exact.
- ``fp16``: float16 values; error ≤ 2⁻¹¹·|x| for |x| ≥ 2⁻¹⁴ (≤ 2⁻²⁵ below), range ±65504.
- ``bf16``: uint16 values, float32's upper 16 bits rounded to nearest even; ≤ 2⁻⁸·|x|.
- ``int8``: int8 values + a float32 scale per token; error ≤ absmax(token)/127/2.
- ``int8-channel``: int8 values + a float32 scale per channel (over the tokens sent);
  error ≤ absmax(channel)/127/2.
- ``int4-channel``: values in ``-7..7``, two to a byte, + a float32 scale per channel; error ≤
  absmax(channel)/7/2. Half the bytes of ``int8-channel``: twice the rank for the same traffic.

``+sr`` (int8 and int4): gradients are rounded stochastically (up with probability equal to
the fraction), so the decoded gradient is unbiased; the draws are seeded from the session
seed and the step, so a replayed step encodes to the same bytes. Activations are always
rounded to nearest.

A codec declares the exact dtype and shape of every part before decoding (``parts``), so
the protocol can reject a frame whose bytes do not fit before any of them is used;
``decode`` then checks what shapes cannot (finite, non-negative scales; int8 in ±127).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from itertools import product
from typing import ClassVar

import numpy as np

from splitwire.errors import ProtocolError

Shape3 = tuple[int, int, int]  # (batch B, padded length L, width W)
PACKED = "packed"
STOCHASTIC = "sr"
INT8_MAX = 127


class Carries(Enum):
    """What a codec instance carries: the edge's activation ``z`` or the cloud's gradient ``dz``."""

    ACTIVATION = "activation"
    GRADIENT = "gradient"


@dataclass(frozen=True)
class PartSpec:
    """The dtype (a ``splitwire.protocol.DTYPES`` name) and shape one wire part must have."""

    dtype: str
    shape: tuple[int, ...]


def padding_mask(shape: Shape3, lengths: np.ndarray) -> np.ndarray:
    """``B×L`` bool: True at the real tokens of each row (rows padded on the right)."""
    return np.arange(shape[1])[None, :] < np.asarray(lengths)[:, None]


class Codec(ABC):
    """Encodes a float32 ``B×L×W`` tensor into named parts and decodes it back.

    ``lengths`` (``B``, int32) are the real tokens per row. The part named ``""`` is the
    main one. This class picks the tokens that go on the wire — ``tokens`` is their
    leading shape, ``(B, L)``, or ``(T,)`` when ``packed`` — and subclasses encode those
    tokens (``token_parts``, ``encode_tokens``, ``decode_tokens``).
    """

    base: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = (PACKED,)  # the name options this base accepts, in name order

    def __init__(self, carries: Carries, *, packed: bool = False, seed: int = 0) -> None:
        self.carries = carries
        self.packed = packed
        self.seed = seed

    @property
    def name(self) -> str:
        """The wire name, e.g. ``fp16+packed``."""
        return "+".join([self.base, *(option for option in self.options if self._has(option))])

    def _has(self, option: str) -> bool:
        return option == PACKED and self.packed

    def tokens(self, shape: Shape3, lengths: np.ndarray) -> tuple[int, ...]:
        """The leading shape of the tokens on the wire: ``(B, L)``, or ``(Σ lengths,)`` when packed."""
        return (int(np.sum(lengths, dtype=np.int64)),) if self.packed else shape[:2]

    def parts(self, shape: Shape3, lengths: np.ndarray) -> dict[str, PartSpec]:
        """The parts a tensor of ``shape`` is sent as, with their exact dtypes and shapes."""
        return self.token_parts(self.tokens(shape, lengths), shape[2])

    def encode(self, x: np.ndarray, lengths: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        """Parts matching ``parts(x.shape, lengths)``; ``step`` seeds stochastic rounding."""
        return self.encode_tokens(x[padding_mask(x.shape, lengths)] if self.packed else x, step=step)

    def decode(self, parts: dict[str, np.ndarray], shape: Shape3, lengths: np.ndarray) -> np.ndarray:
        """The float32 tensor of ``shape`` from parts already checked against ``parts``."""
        values = self.decode_tokens(parts)
        if not self.packed:
            return values
        out = np.zeros(shape, dtype=np.float32)
        out[padding_mask(shape, lengths)] = values
        return out

    def rng(self, step: int) -> np.random.Generator:
        """The random draws of ``step``: the same for the same session seed, step and direction."""
        direction = list(Carries).index(self.carries)
        return np.random.default_rng([self.seed % 2**64, step, direction])

    @abstractmethod
    def token_parts(self, tokens: tuple[int, ...], width: int) -> dict[str, PartSpec]:
        """The parts of a ``(*tokens, width)`` tensor."""

    @abstractmethod
    def encode_tokens(self, x: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        """Parts for the float32 ``(*tokens, W)`` tensor ``x``."""

    @abstractmethod
    def decode_tokens(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """The float32 ``(*tokens, W)`` tensor from its checked parts."""


class Fp32Codec(Codec):
    """The paper's encoding: the values themselves, little-endian float32."""

    base = "fp32"

    def token_parts(self, tokens: tuple[int, ...], width: int) -> dict[str, PartSpec]:
        return {"": PartSpec("float32", (*tokens, width))}

    def encode_tokens(self, x: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        return {"": x}

    def decode_tokens(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts[""]


class Fp16Codec(Codec):
    """IEEE half precision: 2 bytes a value, range ±65504."""

    base = "fp16"

    def token_parts(self, tokens: tuple[int, ...], width: int) -> dict[str, PartSpec]:
        return {"": PartSpec("float16", (*tokens, width))}

    def encode_tokens(self, x: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        with np.errstate(over="ignore"):
            half = x.astype(np.float16)
        if not np.isfinite(half).all():
            raise ProtocolError(f"the {self.carries.value} does not fit float16 (beyond ±65504, or not finite); "
                                "use bf16 or int8")
        return {"": half}

    def decode_tokens(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return parts[""].astype(np.float32)


class Bf16Codec(Codec):
    """bfloat16: the upper 16 bits of float32 (float32's range, 8 significant bits), as uint16."""

    base = "bf16"

    def token_parts(self, tokens: tuple[int, ...], width: int) -> dict[str, PartSpec]:
        return {"": PartSpec("uint16", (*tokens, width))}

    def encode_tokens(self, x: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        if not np.isfinite(x).all():
            raise ProtocolError(f"cannot encode a non-finite {self.carries.value} as bf16")
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate
        upper = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        if ((upper & 0x7F80) == 0x7F80).any():
            raise ProtocolError(f"the {self.carries.value} rounds beyond the bf16 range")
        return {"": upper}

    def decode_tokens(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        return (parts[""].astype(np.uint32) << 16).view(np.float32)


class Int8Codec(Codec):
    """int8 with a float32 scale per token: ``x ≈ q · absmax(token) / 127``, ``q`` in ``-127..127``.

    With ``stochastic`` (``+sr``), gradients are rounded up with probability equal to the
    fraction, so that the decoded gradient equals the true one in expectation.
    """

    base = "int8"
    options = (STOCHASTIC, PACKED)
    levels: ClassVar[int] = INT8_MAX  # q in -levels..levels

    def __init__(self, carries: Carries, *, packed: bool = False, stochastic: bool = False, seed: int = 0) -> None:
        super().__init__(carries, packed=packed, seed=seed)
        self.stochastic = stochastic

    def _has(self, option: str) -> bool:
        return super()._has(option) or (option == STOCHASTIC and self.stochastic)

    def scale_shape(self, tokens: tuple[int, ...], width: int) -> tuple[int, ...]:
        return tokens

    def absmax(self, x: np.ndarray) -> np.ndarray:
        """The largest magnitude each scale covers: per token."""
        return np.abs(x).max(axis=-1)

    def spread(self, scale: np.ndarray) -> np.ndarray:
        """``scale`` broadcastable against the values."""
        return scale[..., None]

    def token_parts(self, tokens: tuple[int, ...], width: int) -> dict[str, PartSpec]:
        return {"": PartSpec("int8", (*tokens, width)), "scale": PartSpec("float32", self.scale_shape(tokens, width))}

    def encode_tokens(self, x: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        if not np.isfinite(x).all():
            raise ProtocolError(f"cannot encode a non-finite {self.carries.value} as {self.base}")
        scale = (self.absmax(x) / np.float32(self.levels)).astype(np.float32)
        ratio = x / self.spread(np.where(scale > 0, scale, np.float32(1)))
        if self.stochastic and self.carries == Carries.GRADIENT:
            q = np.floor(ratio + self.rng(step).random(ratio.shape, dtype=np.float32))
        else:
            q = np.rint(ratio)
        return {"": np.clip(q, -self.levels, self.levels).astype(np.int8), "scale": scale}

    def decode_tokens(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        q, scale = parts[""], parts["scale"]
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise ProtocolError(f"{self.name} scales must be finite and >= 0")
        if (np.abs(q.astype(np.int16)) > self.levels).any():
            raise ProtocolError(f"{self.name} values must be in -{self.levels}..{self.levels}")
        with np.errstate(over="ignore"):  # an overflow is refused as non-finite by the protocol
            return q.astype(np.float32) * self.spread(scale)


class Int8ChannelCodec(Int8Codec):
    """int8 with a float32 scale per channel (one per column of ``z``, over all the tokens sent)."""

    base = "int8-channel"

    def scale_shape(self, tokens: tuple[int, ...], width: int) -> tuple[int, ...]:
        return (width,)

    def absmax(self, x: np.ndarray) -> np.ndarray:
        """The largest magnitude each scale covers: per channel."""
        return np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)

    def spread(self, scale: np.ndarray) -> np.ndarray:
        return scale


class Int4ChannelCodec(Int8ChannelCodec):
    """Values in ``-7..7`` with a float32 scale per channel, packed two to a byte.

    Each value is stored as ``q + 8`` in one nibble (the even channel in the low one); an odd width's
    last byte has ``8`` (zero) in its high nibble. A nibble of 0 (``q = -8``) is refused.
    """

    base = "int4-channel"
    levels = 7

    def token_parts(self, tokens: tuple[int, ...], width: int) -> dict[str, PartSpec]:
        return {"": PartSpec("uint8", (*tokens, (width + 1) // 2)), "scale": PartSpec("float32", (width,))}

    def encode_tokens(self, x: np.ndarray, *, step: int) -> dict[str, np.ndarray]:
        parts = super().encode_tokens(x, step=step)
        nibbles = parts[""].astype(np.uint8) + np.uint8(8)
        if nibbles.shape[-1] % 2:
            nibbles = np.concatenate([nibbles, np.full((*nibbles.shape[:-1], 1), 8, np.uint8)], axis=-1)
        return {"": nibbles[..., 0::2] | (nibbles[..., 1::2] << np.uint8(4)), "scale": parts["scale"]}

    def decode_tokens(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        packed, scale = parts[""], parts["scale"]
        width = scale.shape[0]
        nibbles = np.stack([packed & np.uint8(15), packed >> np.uint8(4)], axis=-1).reshape(*packed.shape[:-1], -1)
        if width % 2 and (nibbles[..., width] != 8).any():
            raise ProtocolError(f"{self.name}: the padding nibble of an odd width must be 8 (zero)")
        if (nibbles[..., :width] == 0).any():
            raise ProtocolError(f"{self.name} values must be in -{self.levels}..{self.levels}")
        q = nibbles[..., :width].astype(np.int8) - np.int8(8)
        return super().decode_tokens({"": q, "scale": scale})


CODECS: dict[str, type[Codec]] = {cls.base: cls for cls in (Fp32Codec, Fp16Codec, Bf16Codec, Int8Codec,
                                                             Int8ChannelCodec, Int4ChannelCodec)}


def _names() -> tuple[str, ...]:
    names = []
    for base, cls in CODECS.items():
        for chosen in product((False, True), repeat=len(cls.options)):
            names.append("+".join([base, *(opt for opt, on in zip(cls.options, chosen) if on)]))
    return tuple(names)


CODEC_NAMES: tuple[str, ...] = _names()  # every wire name, e.g. "fp32", "int8+sr+packed"


def codec_for(name: str, carries: Carries, *, seed: int = 0) -> Codec:
    """A codec by its wire name (``<base>[+sr][+packed]``); ``KeyError`` names the known ones.

    ``seed`` (the session's) seeds stochastic rounding, together with each step.
    """
    if name not in CODEC_NAMES:
        raise KeyError(f"unknown wire codec {name[:64]!r}; known: {', '.join(CODEC_NAMES)}")
    base, *options = name.split("+")
    cls = CODECS[base]
    flags = {option: option in options for option in cls.options}
    if STOCHASTIC in flags:
        return cls(carries, packed=flags[PACKED], stochastic=flags[STOCHASTIC], seed=seed)
    return cls(carries, packed=flags[PACKED], seed=seed)
