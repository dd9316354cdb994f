"""The encoder's building blocks, written out explicitly.

Why it exists: the edge half is traced to ONNX training graphs, and the split layer is
taken apart (attention on the edge, FFN on the cloud). Owning the arithmetic, rather than
calling into Hugging Face layer classes whose signatures change between releases, keeps
the traced graph simple (eager attention, explicit ``position_ids``) and lets the
compression head and link elimination sit exactly where the paper puts them. Weights are
copied from the Hugging Face model by an architecture adapter (``models.adapters``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.spec import EncoderSpec


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unsupported activation {name!r}")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that leaves no node in a traced graph when disabled (the edge's case)."""
    return F.dropout(x, p, training) if p > 0.0 and training else x


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B×L`` 0/1 mask → additive ``B×1×1×L`` bias; masked keys get exactly zero weight."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class Embeddings(nn.Module):
    """Word + position (+ token-type) embeddings, then LayerNorm (and dropout when enabled).

    The families differ only in details: RoBERTa's positions start at ``padding_idx + 1``
    (``spec.position_offset``, added here so the edge always sends 0-based positions);
    DistilBERT has no token types (``type_vocab_size`` 0: the input is accepted and
    ignored); ELECTRA's embeddings are narrower than the encoder and projected up.
    """

    def __init__(self, spec: EncoderSpec, *, dropout: bool = False) -> None:
        super().__init__()
        width = spec.embedding_width
        self.p_drop = spec.hidden_dropout if dropout else 0.0
        self.position_offset = spec.position_offset
        self.word = nn.Embedding(spec.vocab_size, width, padding_idx=spec.pad_token_id)
        self.position = nn.Embedding(spec.max_positions, width)
        self.token_type = nn.Embedding(spec.type_vocab_size, width) if spec.type_vocab_size else None
        self.norm = nn.LayerNorm(width, eps=spec.layer_norm_eps)
        self.project = nn.Linear(width, spec.hidden_size) if width != spec.hidden_size else None

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.position_offset:
            position_ids = position_ids + self.position_offset
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids)
        x = dropout(self.norm(x), self.p_drop, self.training)
        return x if self.project is None else self.project(x)


class AttentionBlock(nn.Module):
    """Multi-head self-attention, output projection, residual, LayerNorm.

    ``dropout=True`` applies the spec's attention-probability and hidden dropout (cloud
    side and the full model); the edge runs without dropout so that its two-pass step
    recomputes exactly the ``z`` it sent.
    """

    def __init__(self, spec: EncoderSpec, *, dropout: bool = False) -> None:
        super().__init__()
        h = spec.hidden_size
        self.num_heads = spec.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.output = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.p_drop = spec.hidden_dropout if dropout else 0.0
        self.p_drop_probs = spec.attention_dropout if dropout else 0.0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, l, h = x.shape
        return x.view(b, l, self.num_heads, h // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
        probs = dropout(torch.softmax(scores, dim=-1), self.p_drop_probs, self.training)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape)
        out = dropout(self.output(ctx), self.p_drop, self.training)
        return self.norm(out + x)


class FeedForward(nn.Module):
    """The FFN of an encoder layer: ``LN(W2 act(W1 x + b1) + b2 + x)``."""

    def __init__(self, spec: EncoderSpec, *, dropout: bool = False) -> None:
        super().__init__()
        self.dense_in = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.act = activation(spec.hidden_act)
        self.dense_out = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.p_drop = spec.hidden_dropout if dropout else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dropout(self.dense_out(self.act(self.dense_in(x))), self.p_drop, self.training)
        return self.norm(y + x)


class EncoderLayer(nn.Module):
    def __init__(self, spec: EncoderSpec, *, dropout: bool = False) -> None:
        super().__init__()
        self.attention = AttentionBlock(spec, dropout=dropout)
        self.ffn = FeedForward(spec, dropout=dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x, bias))


class Pooler(nn.Module):
    """The sentence vector the classifier reads, made as each family's classification head makes it.

    ``cls-pooler``: BERT's pretrained ``tanh(W h[CLS] + b)``. ``cls-tanh`` / ``cls-gelu``:
    RoBERTa's and ELECTRA's head, a new dense layer on ``<s>`` with dropout before it (the
    dropout after it is the classifier's). ``cls-relu``: DistilBERT's ``pre_classifier`` + ReLU.
    ``mean``: sentence-transformers' mean over the real tokens, no parameters.
    ``select_only`` (the label-private split's cloud) stops at the pooled position's vector (or the
    mean): the dense layer runs on the device (``models.split.LabelHead``).
    """

    ACTIVATIONS = {"cls-pooler": nn.Tanh, "cls-tanh": nn.Tanh, "cls-gelu": nn.GELU, "cls-relu": nn.ReLU}

    def __init__(self, spec: EncoderSpec, *, dropout: bool = False, select_only: bool = False) -> None:
        super().__init__()
        self.mode = spec.pooling
        dense = self.mode != "mean" and not select_only
        self.dense = nn.Linear(spec.hidden_size, spec.hidden_size) if dense else None
        self.act = self.ACTIVATIONS[self.mode]() if dense else None
        self.p_drop = spec.classifier_dropout if dropout and self.mode in ("cls-tanh", "cls-gelu") else 0.0

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            keep = attention_mask[..., None].to(x.dtype)
            return (x * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
        if self.dense is None:
            return x[:, 0]
        return self.act(self.dense(dropout(x[:, 0], self.p_drop, self.training)))
