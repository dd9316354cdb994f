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
    """Word + position + token-type embeddings, then LayerNorm (and dropout when enabled)."""

    def __init__(self, spec: EncoderSpec, *, dropout: bool = False) -> None:
        super().__init__()
        self.p_drop = spec.hidden_dropout if dropout else 0.0
        self.word = nn.Embedding(spec.vocab_size, spec.hidden_size, padding_idx=spec.pad_token_id)
        self.position = nn.Embedding(spec.max_positions, spec.hidden_size)
        self.token_type = nn.Embedding(spec.type_vocab_size, spec.hidden_size)
        self.norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        return dropout(self.norm(x), self.p_drop, self.training)


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
    """BERT pooler: ``tanh(W h[CLS] + b)``."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.dense = nn.Linear(spec.hidden_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))
