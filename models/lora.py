"""Low-rank adapters (LoRA) on the edge layers' projections, and their merge into the weights.

Why it exists: a small device cannot afford a gradient and two AdamW moments for every edge
weight. With adapters, each attention projection (query, key, value, output) and each FFN
projection (``dense_in``, ``dense_out``) of the edge layers keeps its pretrained weight ``W``
frozen and learns ``ΔW = (alpha / rank) · B A`` (``A``: ``rank × in``, ``B``: ``out × rank``),
so only the adapters and the compression head train on the device (Hu et al., "LoRA",
arXiv 2106.09685). ``B`` starts at zero, so an adapted edge computes what the plain one does
until it trains. For inference the adapters merge into ``W`` (``merged_state``) and the
plain ``EdgePart`` runs with the merged weights: no extra work at all.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

TARGETS = ("attention.query", "attention.key", "attention.value", "attention.output", "ffn.dense_in",
           "ffn.dense_out")
SPLIT_TARGETS = ("query", "key", "value", "output")  # the split layer's attention block
ADAPTER_NAMES = ("lora_a", "lora_b")


class LoraLinear(nn.Linear):
    """``nn.Linear`` (same ``weight`` and ``bias``) plus a low-rank update ``(alpha / rank) · B A``."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)  # nn.Linear's default init (kaiming-uniform, a = √5)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def adapted_linears(edge: nn.Module) -> dict[str, nn.Linear]:
    """The projections that get adapters, by module path: every edge layer's and the split attention's."""
    paths = [f"layers.{i}.{t}" for i in range(len(edge.layers)) for t in TARGETS]
    paths += [f"split_attention.{t}" for t in SPLIT_TARGETS]
    return {path: edge.get_submodule(path) for path in paths}


def add_adapters(edge: nn.Module, *, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """Replace the edge's projections with ``LoraLinear`` in place (same weights, ``B`` = 0); return ``edge``."""
    if rank < 1:
        raise ValueError(f"the adapter rank must be >= 1, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    for path, linear in adapted_linears(edge).items():
        parent, _, name = path.rpartition(".")
        setattr(edge.get_submodule(parent), name, LoraLinear(linear, rank=rank, alpha=alpha, generator=generator))
    return edge


def is_adapter(name: str) -> bool:
    return name.rpartition(".")[2] in ADAPTER_NAMES


def merged_state(state: dict[str, torch.Tensor], *, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """An adapted edge's state dict with every ``B A`` merged into its weight: the plain ``EdgePart``'s."""
    scale = alpha / rank
    merged = {name: t for name, t in state.items() if not is_adapter(name)}
    for name in state:
        if name.endswith(".lora_a"):
            module = name.removesuffix(".lora_a")
            merged[f"{module}.weight"] = state[f"{module}.weight"] + scale * (state[f"{module}.lora_b"] @ state[name])
    return merged
