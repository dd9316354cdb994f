"""Calibrated compression heads: made from where the split layer's input ``h`` really lies.

Why it exists: the paper's head keeps the top-``r`` right singular directions of ``W1``
(the split layer's FFN input projection), which need not hold much of ``h``'s variance,
and link elimination drops the residual, so the split model
starts far from the pretrained one. The heads here send the same ``B×L×r`` tensor but are
fitted to statistics of ``h`` on *calibration text*: public text, never the fine-tuning
data, read on the exporting machine.

- ``activation-svd`` (after SVD-LLM): the rank-``r`` ``Â`` minimising ``E‖(W1 h + b1) −
  (Â h + b̂)‖²``, i.e. the SVD of ``W1`` whitened by the centred covariance ``C = L Lᵀ``
  of ``h``: ``W1 L = U Σ Vᵀ``, ``Â = U_r Σ_r (V_rᵀ L⁻¹)``. The edge keeps ``V_rᵀ L⁻¹`` and
  ``Σ_r`` and the cloud ``U_r``, as in the paper's head; the mean goes into the cloud's
  bias, ``b̂ = b1 + (W1 − Â) μ``. The residual stays eliminated.
- ``principal``: ``z = Pᵀ (h − μ)``, the coordinates of ``h`` in its top-``r`` centred
  principal directions ``P``. The cloud feeds ``W1 P z + b1 + W1 μ`` to the FFN and rebuilds
  the residual as ``μ + P z``. At full rank this is the original layer exactly.
"""

from __future__ import annotations

from typing import Iterable

import torch

from models.blocks import FeedForward
from models.compression import CompressionHead, SplitFeedForward
from models.spec import EncoderSpec, SplitSpec

Feeds = dict[str, torch.Tensor]  # EDGE_INPUTS → B×L int64 tensors
_RIDGE = 1e-6  # relative to the mean variance: keeps the Cholesky factor of a rank-deficient C defined


def original_split_ffn(encoder: EncoderSpec, weights: dict[str, torch.Tensor], split: SplitSpec) -> FeedForward:
    """The split layer's FFN as pretrained, residual included: what a head tries to reproduce."""
    k = split.split - 1
    ffn = FeedForward(encoder)
    ffn.load_state_dict({name: weights[f"layers.{k}.ffn.{name}"] for name in ffn.state_dict()})
    return ffn.eval()


@torch.no_grad()
def split_inputs(edge: torch.nn.Module, batches: Iterable[Feeds]) -> torch.Tensor:
    """``h`` at every real token of ``batches`` (``tokens × hidden``): the split layer's FFN input.

    ``edge`` is an ``EdgePart``; its ``split_input`` runs everything below the head.
    """
    rows = [edge.split_input(**feeds)[feeds["attention_mask"].bool()] for feeds in batches]
    if not rows:
        raise ValueError("no calibration batches")
    return torch.cat(rows)


def _centred_moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (``hidden``) and centred covariance (``hidden × hidden``) in float64."""
    h = h.double()
    mean = h.mean(0)
    centred = h - mean
    return mean, centred.T @ centred / len(h)


@torch.no_grad()
def calibrate_head(head: CompressionHead, ffn: SplitFeedForward, kind: str, w1: torch.Tensor, b1: torch.Tensor,
                   h: torch.Tensor) -> None:
    """Set the edge ``head`` and the cloud's split ``ffn`` (decompression, residual rebuild) from ``h``."""
    if kind == "principal":
        _principal_into(head, ffn, w1, b1, h)
    elif kind == "activation-svd":
        _whitened_svd_into(head, ffn, w1, b1, h)
    else:
        raise ValueError(f"the {kind!r} head is not calibrated")


def _principal_into(head: CompressionHead, ffn: SplitFeedForward, w1: torch.Tensor, b1: torch.Tensor,
                    h: torch.Tensor) -> None:
    rank = head.s.shape[0]
    mean, cov = _centred_moments(h)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    p = vectors[:, -rank:].flip(-1)  # hidden × r, largest variance first
    w, b = w1.double(), b1.double()
    dtype = head.vt.dtype
    head.vt.copy_(p.T.to(dtype))
    head.s.fill_(1.0)
    head.shift.copy_((-p.T @ mean).to(dtype))
    ffn.decompression.u.copy_((w @ p).to(dtype))
    ffn.decompression.bias.copy_((b + w @ mean).to(dtype))
    ffn.rebuild.weight.copy_(p.to(dtype))
    ffn.rebuild.bias.copy_(mean.to(dtype))


def _whitened_svd_into(head: CompressionHead, ffn: SplitFeedForward, w1: torch.Tensor, b1: torch.Tensor,
                       h: torch.Tensor) -> None:
    rank = head.s.shape[0]
    mean, cov = _centred_moments(h)
    ridge = _RIDGE * torch.diagonal(cov).mean() * torch.eye(len(cov), dtype=cov.dtype)
    lower = torch.linalg.cholesky(cov + ridge)  # C = L Lᵀ
    w, b = w1.double(), b1.double()
    u, s, vt = torch.linalg.svd(w @ lower, full_matrices=False)
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    edge_vt = torch.linalg.solve_triangular(lower, vt, upper=False, left=False)  # V_rᵀ L⁻¹
    approx = u @ torch.diag(s) @ edge_vt
    dtype = head.vt.dtype
    head.vt.copy_(edge_vt.to(dtype))
    head.s.copy_(s.to(dtype))
    ffn.decompression.u.copy_(u.to(dtype))
    ffn.decompression.bias.copy_((b + (w - approx) @ mean).to(dtype))


def variance_held(h: torch.Tensor, directions: torch.Tensor) -> float:
    """Share of ``h``'s centred variance in the span of the rows of ``directions`` (``r × hidden``)."""
    _, cov = _centred_moments(h)
    q, _ = torch.linalg.qr(directions.double().T)
    return float(torch.trace(q.T @ cov @ q) / torch.trace(cov))
