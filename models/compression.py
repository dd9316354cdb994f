"""The paper's compression head: SVD of the split layer's FFN input projection.

Why it exists: the split layer's FFN input projection ``W`` (``intermediate × hidden``)
is factorised once, ``W = U S Vᵀ``, truncated to rank ``r``. The edge keeps
``diag(s_r) V_rᵀ`` and sends the ``B×L×r`` result ``z``; the cloud keeps ``U_r`` and the
original bias. Both factors stay trainable.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import activation, dropout
from models.spec import EncoderSpec


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight ≈ u @ diag(s) @ vt`` with ``u: out×r``, ``s: r``, ``vt: r×in`` (float64 SVD)."""
    u, s, vt = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    dtype = weight.dtype
    return u[:, :rank].to(dtype), s[:rank].to(dtype), vt[:rank].to(dtype)


class CompressionHead(nn.Module):
    """Edge side: ``z = diag(s_r) · V_rᵀ h``; trainable ``vt`` (``r×hidden``) and ``s`` (``r``).

    ``shift`` (the principal-subspace head, ``models.heads``) adds a trainable ``r`` offset,
    ``z = diag(s) · Pᵀ h − Pᵀ μ``: the coordinates of ``h`` around its calibration mean.
    """

    def __init__(self, hidden_size: int, rank: int, *, shift: bool = False) -> None:
        super().__init__()
        self.vt = nn.Parameter(torch.empty(rank, hidden_size))
        self.s = nn.Parameter(torch.empty(rank))
        self.shift = nn.Parameter(torch.zeros(rank)) if shift else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(h, self.vt) * self.s
        return z if self.shift is None else z + self.shift


class Decompression(nn.Module):
    """Cloud side: ``U_r z + b`` with the FFN input projection's original bias."""

    def __init__(self, intermediate_size: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(intermediate_size, rank))
        self.bias = nn.Parameter(torch.empty(intermediate_size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.u, self.bias)


class SplitFeedForward(nn.Module):
    """The split layer's FFN on the cloud, fed by ``z``.

    ``LN(W2 act(U_r z + b1) + b2)``: with link elimination there is no ``+ h`` before the
    LayerNorm, because ``h`` (``B×L×hidden``) never leaves the edge. ``residual`` exists
    only to check the decomposition against the original layer in-process.

    ``rebuild`` (the principal-subspace head): instead of dropping the residual, add the
    approximation ``ĥ = μ + P z`` rebuilt from ``z`` itself (trainable ``hidden×r`` weight
    and ``hidden`` bias), so link elimination keeps what of ``h`` the ``r`` coordinates hold.
    """

    def __init__(self, spec: EncoderSpec, rank: int, *, dropout: bool = False, rebuild: bool = False) -> None:
        super().__init__()
        self.decompression = Decompression(spec.intermediate_size, rank)
        self.act = activation(spec.hidden_act)
        self.dense_out = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.rebuild = nn.Linear(rank, spec.hidden_size) if rebuild else None
        self.p_drop = spec.hidden_dropout if dropout else 0.0

    def forward(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = dropout(self.dense_out(self.act(self.decompression(z))), self.p_drop, self.training)
        if residual is None and self.rebuild is not None:
            residual = self.rebuild(z)
        return self.norm(y if residual is None else y + residual)


@torch.no_grad()
def factorise_into(
    head: CompressionHead, split_ffn: SplitFeedForward, dense_in_weight: torch.Tensor, dense_in_bias: torch.Tensor
) -> None:
    """Initialise both halves from the original FFN input projection."""
    rank = head.s.shape[0]
    u, s, vt = truncated_svd(dense_in_weight, rank)
    head.vt.copy_(vt)
    head.s.copy_(s)
    split_ffn.decompression.u.copy_(u)
    split_ffn.decompression.bias.copy_(dense_in_bias)
