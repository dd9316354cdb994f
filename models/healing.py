"""Healing: a short distillation, at export time, of the cut toward the original split layer.

Why it exists: a compression head fitted in closed form (``models.heads``) is the best
linear map of its kind, but the FFN after it is not linear, and the paper's head drops the
residual altogether. Healing trains the edge's head and the cloud's split FFN (with its
residual rebuild) for a few hundred steps to reproduce the original layer's output
(``LN(W2 act(W1 h + b1) + b2 + h)``) at the real tokens of calibration text. The FFN is
per-token, so the steps draw random tokens of the precomputed ``h``: no encoder layer runs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from models.blocks import FeedForward
from models.split import SplitModel

HEAL_LR = 1e-4  # Adam; the head and the FFN start near a good fit, so a small step keeps them there
TOKENS_PER_STEP = 1024


def heal(model: SplitModel, original_ffn: FeedForward, h: torch.Tensor, *, steps: int, seed: int = 0,
         lr: float = HEAL_LR, tokens_per_step: int = TOKENS_PER_STEP,
         on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Distil ``model``'s head + split FFN toward ``original_ffn`` on tokens ``h``; the per-step MSE losses."""
    head, ffn = model.edge.head, model.cloud.split_ffn
    if head is None:
        raise ValueError("the vanilla split has no compression head to heal")
    with torch.no_grad():
        target = original_ffn(h)
    parameters = [*head.parameters(), *ffn.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    was_training = ffn.training
    ffn.eval()  # no dropout: the target is the deterministic layer
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(h), (min(tokens_per_step, len(h)),), generator=generator)
        loss = F.mse_loss(ffn(head(h[idx])), target[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    ffn.train(was_training)
    for p in parameters:
        p.grad = None
    return losses
