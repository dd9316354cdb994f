"""FedAvg of the edge halves: the average of each device's weights, weighted by its examples.

Why it exists: a fleet's edge halves are personal by default; on request they are averaged
through the cloud every N steps (McMahan et al.'s FedAvg). The cloud computes the average
from the weights the devices send, and the in-process reference (``models.fleet``) and the
tests compute it with this same function, so there is one definition. A fleet with a shared
edge sums its members' edge gradients instead (``gradient_sum``). numpy only: the
edge side shares this package and never imports torch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def fedavg(weights: Sequence[Mapping[str, np.ndarray]], examples: Sequence[int]) -> dict[str, np.ndarray]:
    """``Σ nᵢ·wᵢ / Σ nᵢ`` per tensor, summed in float64 and returned in each tensor's own dtype.

    Every device must send the same tensor names and shapes; ``examples`` are positive counts.
    """
    if not weights or len(weights) != len(examples):
        raise ValueError(f"fedavg needs one example count per device, got {len(weights)} weight sets and "
                         f"{len(examples)} counts")
    if any(n <= 0 for n in examples):
        raise ValueError(f"example counts must be positive, got {list(examples)}")
    names = set(weights[0])
    for i, device in enumerate(weights[1:], start=1):
        if set(device) != names:
            raise ValueError(f"device {i} sends other tensors than device 0: {sorted(set(device) ^ names)[:5]}")
    total = float(sum(examples))
    averaged = {}
    for name in sorted(names):
        first = weights[0][name]
        if any(device[name].shape != first.shape for device in weights):
            raise ValueError(f"tensor {name!r} has different shapes across devices")
        acc = sum(np.asarray(device[name], np.float64) * (n / total) for device, n in zip(weights, examples))
        averaged[name] = np.asarray(acc, dtype=first.dtype)
    return averaged


def gradient_sum(gradients: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each tensor's sum over the devices, in float64 in the given order, returned in float32."""
    if not gradients:
        raise ValueError("a gradient sum needs at least one device")
    names = set(gradients[0])
    if any(set(device) != names for device in gradients):
        raise ValueError("every device must send the same tensors")
    return {name: np.sum([device[name] for device in gradients], axis=0, dtype=np.float64).astype(np.float32)
            for name in sorted(names)}
