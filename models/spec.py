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
# How the classifier's input is made from the last hidden states (``models.blocks.Pooler``):
# BERT's pretrained pooler on [CLS]; a new dense on <s> with tanh (RoBERTa) or GELU (ELECTRA),
# dropout before and after; DistilBERT's pre_classifier + ReLU on [CLS]; the mean over real tokens.
POOLINGS = ("cls-pooler", "cls-tanh", "cls-gelu", "cls-relu", "mean")
# How the compression head is made (``models.heads``): the paper's SVD of W1; SVD of W1 whitened by
# the covariance of its input h on calibration text; the principal subspace of h with the residual rebuilt.
HEADS = ("svd", "activation-svd", "principal")


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
    pooling: str = "cls-pooler"
    head_dropout: float | None = None  # dropout before the classifier; None: hidden_dropout
    position_offset: int = 0  # added to the 0-based position ids (RoBERTa: padding_idx + 1)
    embedding_size: int | None = None  # ELECTRA: embeddings narrower than hidden, then a projection

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.hidden_act!r} is not supported; known: {', '.join(ACTIVATIONS)}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not supported; known: {', '.join(POOLINGS)}")
        if not 0 <= self.position_offset < self.max_positions:
            raise ValueError(f"position_offset {self.position_offset} is outside 0..{self.max_positions - 1}")

    @property
    def positions(self) -> int:
        """Longest sequence the position table serves (``max_positions`` less the offset)."""
        return self.max_positions - self.position_offset

    @property
    def classifier_dropout(self) -> float:
        return self.hidden_dropout if self.head_dropout is None else self.head_dropout

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderSpec":
        """Fields with a default may be absent (manifests written before they existed)."""
        fields = dataclasses.fields(cls)
        return cls(**{f.name: data[f.name] for f in fields if f.name in data or f.default is dataclasses.MISSING})


@dataclass(frozen=True)
class SplitSpec:
    """Where the encoder is cut and how the split layer's activation is compressed.

    ``split`` is the 1-based number of encoder layers that run (partly) on the edge: the
    cut falls inside layer ``split``, between its attention block and its FFN.
    ``rank`` is the SVD rank of the compression head; ``None`` means no compression
    (the vanilla split, which sends the full ``hidden`` activation and keeps the residual).
    ``link_elimination`` removes the residual link around the split layer's FFN.
    ``head`` is how the compression head is made (``HEADS``, ``models.heads``); only
    ``principal`` changes the modules (an edge ``shift`` and the cloud's residual rebuild).
    ``label_private`` is the U-shaped split: the cloud's part ends at the pooled top output, and
    the family's pooling layer, the classifier and the loss run on the device (``models.split.LabelHead``),
    so that no label, loss or logit leaves it.
    """

    split: int
    rank: int | None
    num_labels: int
    link_elimination: bool = True
    head: str = "svd"
    label_private: bool = False

    @property
    def compressed(self) -> bool:
        return self.rank is not None

    @property
    def rebuilds_residual(self) -> bool:
        """The cloud rebuilds an approximate residual from ``z`` (the principal-subspace head)."""
        return self.head == "principal"

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
        if self.head not in HEADS:
            raise ValueError(f"compression head {self.head!r} is not known; known: {', '.join(HEADS)}")
        if self.rank is None and self.head != "svd":
            raise ValueError(f"the {self.head} compression head needs a rank; the vanilla split has no head")

    @property
    def wire_width(self) -> int | None:
        """Last dimension of the tensor sent edge→cloud, or None if it is ``hidden``."""
        return self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SplitSpec":
        """``head`` and ``label_private`` may be absent (manifests written before they existed: the paper's SVD
        head, the cloud computing the loss)."""
        fields = dataclasses.fields(cls)
        return cls(**{f.name: data[f.name] for f in fields if f.name in data or f.default is dataclasses.MISSING})
