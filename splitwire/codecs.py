"""Wire codecs: how a ``B×L×W`` float32 activation ``z`` or gradient ``dz`` becomes wire tensors.

Why it exists: the paper sends ``z`` and ``dz`` as they are (``fp32``); cheaper encodings
(half precision, int8 with scales, sending only the real tokens) change only how that one
tensor is laid out on the wire. A codec is told which of the two it carries (an encoding
may treat them differently, e.g. stochastic rounding for gradients only) and turns the
tensor into named *parts* — raw arrays the protocol frames and validates — and back.

A codec declares the exact dtype and shape of every part before decoding (``parts``), so
the protocol can reject a frame whose bytes do not fit before any of them is used. Adding
a codec is one subclass registered in ``CODECS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np

Shape3 = tuple[int, int, int]  # (batch B, padded length L, width W)


class Carries(Enum):
    """What a codec instance carries: the edge's activation ``z`` or the cloud's gradient ``dz``."""

    ACTIVATION = "activation"
    GRADIENT = "gradient"


@dataclass(frozen=True)
class PartSpec:
    """The dtype (a ``splitwire.protocol.DTYPES`` name) and shape one wire part must have."""

    dtype: str
    shape: tuple[int, ...]


class Codec(ABC):
    """Encodes a float32 ``B×L×W`` tensor into named parts and decodes it back.

    ``lengths`` (``B``, int32) are the real tokens per row (rows are padded on the right);
    a codec may use them to drop padding. The part named ``""`` is the main one.
    """

    name: ClassVar[str]

    def __init__(self, carries: Carries) -> None:
        self.carries = carries

    @abstractmethod
    def parts(self, shape: Shape3, lengths: np.ndarray) -> dict[str, PartSpec]:
        """The parts a tensor of ``shape`` is sent as, with their exact dtypes and shapes."""

    @abstractmethod
    def encode(self, x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """Parts matching ``parts(x.shape, lengths)``."""

    @abstractmethod
    def decode(self, parts: dict[str, np.ndarray], shape: Shape3, lengths: np.ndarray) -> np.ndarray:
        """The float32 tensor of ``shape`` from parts already checked against ``parts``."""


class Fp32Codec(Codec):
    """The paper's encoding: the tensor itself, little-endian float32."""

    name = "fp32"

    def parts(self, shape: Shape3, lengths: np.ndarray) -> dict[str, PartSpec]:
        return {"": PartSpec("float32", shape)}

    def encode(self, x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        return {"": x}

    def decode(self, parts: dict[str, np.ndarray], shape: Shape3, lengths: np.ndarray) -> np.ndarray:
        return parts[""]


CODECS: dict[str, type[Codec]] = {Fp32Codec.name: Fp32Codec}


def codec_for(name: str, carries: Carries) -> Codec:
    """A codec by its wire name; ``KeyError`` names the known ones."""
    try:
        return CODECS[name](carries)
    except KeyError:
        raise KeyError(f"unknown wire codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
