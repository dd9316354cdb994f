"""A fleet in one process: personal edge halves and one shared top part (split federated learning).

Why it exists: many devices of one organisation, each with private text, train one model
together (SplitFed). This module is the fleet in plain PyTorch: ``D`` edge halves, each with
its own AdamW, and ONE ``CloudPart`` with one AdamW. It is the reference that the cloud's
fleets are tested against (``tests/test_fleet.py``), and it runs in any PyTorch loop (the
fleet accuracy study).

One cloud step per group, on the concatenation (``joint_loss``): the group's batches are
right-padded to the longest and stacked in the fleet's fixed order, the loss is the mean
over all their rows, and each device's ``dL/dz`` is its slice of that one backward pass. A
synchronous round is such a group (one batch from every participating device, by device
order); the cloud's asynchronous schedule batches concurrent requests into the same kind of
step, so both schedules share this function. One step per round keeps the shared top's
optimizer and dropout RNG advancing once a round, whatever the fleet's size, and makes the
round deterministic. The top steps at ``rate(round)``, each edge at ``rate(its own step)``.

On request the edge halves are averaged (FedAvg weighted by examples, ``splitwire.fedavg``);
each device keeps its own AdamW moments. Or the edge is *shared* (``shared_edge``, SplitFed's
client-side model kept in step): every device holds the same edge half, the round's edge
gradient is the sum of the devices' (each device's part of the one joint loss), and every
device applies that one AdamW step; here that is one ``EdgePart`` for all and one optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from models.split import CloudPart, EdgePart
from splitwire.fedavg import fedavg

Optimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class JointLoss:
    """One cloud step's loss over a group of device batches: the mean over all rows (what is
    back-propagated) and each device's own mean (what it is told)."""

    loss: torch.Tensor
    device_losses: list[float]
    logits: torch.Tensor
    rows: list[slice]  # each device's rows of the stacked batch


def _pad_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` (``B×L`` or ``B×L×W``) right-padded with zeros to ``length`` along dimension 1."""
    missing = length - x.shape[1]
    if missing == 0:
        return x
    return F.pad(x, (0, 0, 0, missing) if x.dim() == 3 else (0, missing))


def joint_loss(cloud: CloudPart, zs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
               labels: Sequence[torch.Tensor]) -> JointLoss:
    """The shared top's forward and loss on the devices' batches stacked in the given order.

    Padding is exact: padded keys get zero attention weight and the loss reads only the real
    rows' pooled vectors, so each device's ``dL/dz`` is exactly 0 at its padding.
    """
    length = max(z.shape[1] for z in zs)
    z = torch.cat([_pad_length(z, length) for z in zs])
    mask = torch.cat([_pad_length(m, length) for m in masks])
    target = torch.cat(list(labels))
    logits = cloud(z, mask)
    if cloud.spec.num_labels == 1:
        per_row = (logits.squeeze(-1) - target.to(logits.dtype)).pow(2)
    else:
        per_row = F.cross_entropy(logits, target.long(), reduction="none")
    bounds = np.cumsum([0] + [z.shape[0] for z in zs])
    rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    return JointLoss(per_row.mean(), [per_row[r].mean().item() for r in rows], logits, rows)


@dataclass(frozen=True)
class DeviceBatch:
    """One device's batch: the edge inputs by name (``models.EDGE_INPUTS``) and the labels."""

    inputs: Mapping[str, torch.Tensor]
    labels: torch.Tensor


class Fleet:
    """``D`` personal edge halves and one shared top part, trained in synchronous rounds.

    ``optimizer`` builds each part's AdamW; ``rate(step)`` is the learning-rate schedule;
    ``seed`` seeds the top's dropout RNG (kept apart from torch's global generator).
    ``shared_edge``: ``edges`` is one ``EdgePart`` given once per device, trained by one AdamW on
    the round's summed gradient.
    """

    def __init__(self, edges: Sequence[EdgePart], cloud: CloudPart, *, optimizer: Optimizer,
                 rate: Callable[[int], float], seed: int, shared_edge: bool = False) -> None:
        self.edges = list(edges)
        if shared_edge and any(edge is not self.edges[0] for edge in self.edges):
            raise ValueError("a shared edge is one EdgePart given once per device")
        self.shared_edge = shared_edge
        self.cloud = cloud
        self.rate = rate
        self.edge_optimizers = [optimizer(edge.parameters()) for edge in self.edges[:1 if shared_edge else None]]
        self.cloud_optimizer = optimizer(cloud.parameters())
        self.edge_steps = [0] * len(self.edges)
        self.round = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rng = torch.get_rng_state()

    def train_round(self, batches: Sequence[DeviceBatch | None]) -> list[float | None]:
        """One round: device ``i`` takes part with ``batches[i]`` (``None``: it is absent this round).

        Returns each participant's mean loss (``None`` for the absent).
        """
        if len(batches) != len(self.edges):
            raise ValueError(f"a round takes one entry per device ({len(self.edges)}), got {len(batches)}")
        present = [i for i, batch in enumerate(batches) if batch is not None]
        if not present:
            raise ValueError("a round needs at least one device")
        zs = [self.edges[i](**batches[i].inputs) for i in present]
        masks = [batches[i].inputs["attention_mask"] for i in present]
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            joint = joint_loss(self.cloud, zs, masks, [batches[i].labels for i in present])
            self.rng = torch.get_rng_state()
        joint.loss.backward()
        self.round += 1
        self._step(self.cloud_optimizer, self.round)
        for i in present:
            self.edge_steps[i] += 1
            if not self.shared_edge:
                self._step(self.edge_optimizers[i], self.edge_steps[i])
        if self.shared_edge:  # the gradients of all present devices accumulated into the one edge: their sum
            self._step(self.edge_optimizers[0], self.round)
        losses: list[float | None] = [None] * len(self.edges)
        for i, loss in zip(present, joint.device_losses):
            losses[i] = loss
        return losses

    def _step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.rate(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def edge_weights(self, device: int) -> dict[str, np.ndarray]:
        """Device ``device``'s trainable edge weights as numpy copies, by name."""
        return {name: p.detach().numpy().copy() for name, p in self.edges[device].named_parameters()
                if p.requires_grad}

    @torch.no_grad()
    def average_edges(self, examples: Sequence[int], devices: Sequence[int] | None = None) -> None:
        """FedAvg the trainable edge weights of ``devices`` (default: all), weighted by ``examples``
        (one count per averaged device); every averaged device then holds the average."""
        devices = list(range(len(self.edges))) if devices is None else list(devices)
        averaged = fedavg([self.edge_weights(i) for i in devices], examples)
        for i in devices:
            for name, p in self.edges[i].named_parameters():
                if name in averaged:
                    p.copy_(torch.from_numpy(averaged[name]))
