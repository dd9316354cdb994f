"""Plain-data description of an encoder and of where it is split.

Why it exists: the cloud must rebuild its half from a bundle without the Hugging Face
model (and the edge never sees torch at all), so the architecture is captured once as
a small JSON-able dataclass that both the builder and the bundle manifest use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class EncoderSpec:
    """Dimensions and hyper-parameters of a BERT-family encoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    hidden_dropout: float
    attention_dropout: float

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.hidden_act!r} is not supported; known: {', '.join(ACTIVATIONS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderSpec":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class SplitSpec:
    """Where the encoder is cut and how the split layer's activation is compressed.

    ``split`` is the 1-based number of encoder layers that run (partly) on the edge: the
    cut falls inside layer ``split``, between its attention block and its FFN.
    ``rank`` is the SVD rank of the compression head; ``None`` means no compression
    (the vanilla split, which sends the full ``hidden`` activation and keeps the residual).
    ``link_elimination`` removes the residual link around the split layer's FFN.
    """

    split: int
    rank: int | None
    num_labels: int
    link_elimination: bool = True

    @property
    def compressed(self) -> bool:
        return self.rank is not None

    def validate(self, encoder: EncoderSpec) -> None:
        if not 1 <= self.split <= encoder.num_layers:
            raise ValueError(
                f"split {self.split} is outside 1..{encoder.num_layers} "
                f"(the model has {encoder.num_layers} encoder layers)"
            )
        max_rank = min(encoder.hidden_size, encoder.intermediate_size)
        if self.rank is not None and not 1 <= self.rank <= max_rank:
            raise ValueError(
                f"rank {self.rank} is outside 1..{max_rank} (min of hidden {encoder.hidden_size} "
                f"and intermediate {encoder.intermediate_size})"
            )
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 means regression), got {self.num_labels}")
        if self.rank is None and self.link_elimination:
            raise ValueError("link elimination needs a compression head (rank); the vanilla split keeps the residual")

    @property
    def wire_width(self) -> int | None:
        """Last dimension of the tensor sent edge→cloud, or None if it is ``hidden``."""
        return self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SplitSpec":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
