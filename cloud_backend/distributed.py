"""A fleet's shared top part, data-parallel across sft-cloud workers over ``torch.distributed``.

Why it exists: one cloud process runs out (thousands of devices, or a top part that wants
several GPUs), so a fleet's devices are spread over ``N`` workers started by ``torchrun``,
each serving its share of the connections. They must still train ONE top part: every round,
each worker computes its share of the round's step on its own devices' rows, the gradients are
all-reduced (summed), and every worker steps the same AdamW on the same sum, so all of them hold
the same weights. The transport is torch.distributed's own (gloo on the CPU, NCCL on CUDA), set
up from torchrun's environment; nothing here speaks to another host by itself.

A round's loss is the mean over ALL its rows (``models.fleet.joint_loss``), so each worker
back-propagates ``sum of its rows' losses / rows of the whole round``: the row count is
all-reduced first, and the sum over workers of their shares is then the round's mean loss, its
gradient the sum of theirs, and each device's ``dL/dz`` exactly what the one-process fleet
gives it. Every worker enters every round's collectives, with zero rows if none of its devices
take part (it contributes zero gradients); a round with no rows anywhere makes no step.

Why not ``DistributedDataParallel``: its all-reduce runs inside ``backward``, before a worker
knows whether its own share may be applied (the step's ``dz`` and replies are checked first,
``cloud_backend.session``), it averages instead of summing uneven shares, and a parameter that
got no gradient would get a zero one (AdamW then decays it, which the one-process fleet does
not). Here one flat bucket carries, beside the gradients, which parameters have one and
whether any worker refused its share; if one did, every worker refuses the round, so none
steps and they stay equal.

Dropout: each worker draws its own rows' masks from its own generator (sft-cloud's worker ``r``
starts its own from the fleet's seed + ``r``), so with cloud dropout on an ``N``-worker run is an equally
valid draw of the same training, not bit-for-bit the one-process run; with a model whose
dropout probabilities are 0 it equals it within float rounding, which is what
``tests/test_distributed.py`` checks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from models.fleet import JointLoss, joint_loss
from models.split import CloudPart
from splitwire.errors import NonFinite, UsageError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def backend_for(device: torch.device) -> str:
    """gloo for a top part on the CPU, NCCL on CUDA."""
    if device.type not in BACKENDS:
        raise UsageError(f"no torch.distributed backend for device {device}; use cpu or cuda")
    return BACKENDS[device.type]


@dataclass(frozen=True)
class Worker:
    """This process's place in the group torchrun started."""

    rank: int
    world_size: int
    local_rank: int


def init_from_env(device: torch.device, *, timeout_s: float) -> Worker:
    """Join the group that torchrun's environment describes; a collective that waits longer than
    ``timeout_s`` for a worker (one that died) fails instead of hanging the round."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise UsageError(f"--distributed needs torchrun's environment ({', '.join(missing)} not set): start "
                         "sft-cloud with torchrun --nproc-per-node N -m cloud_backend.cli --distributed ...")
    worker = Worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(worker.local_rank)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device), store=_store(worker, timeout), rank=worker.rank,
                            world_size=worker.world_size, timeout=timeout)
    return worker


def _store(worker: Worker, timeout: timedelta) -> dist.Store:
    """torchrun's store, as ``env://`` would open it, with its keys kept apart per start of the group:
    torchrun keeps one store across ``--max-restarts`` restarts and ``env://`` does not prefix it, so a
    restarted worker could read a dead peer's address and fail to connect (seen with torch 2.13)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # hosted by torchrun's agent
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), worker.world_size,
                          is_master=not shared and worker.rank == 0, timeout=timeout, multi_tenant=not shared)
    return dist.PrefixStore(f"splitft/start-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def common_step(saved: Sequence[int], *, device: torch.device = torch.device("cpu"),
                group: dist.ProcessGroup | None = None) -> int | None:
    """The newest round that every worker holds a checkpoint of (``saved``: this worker's intact ones), or
    ``None``; every worker calls it with its own list when the group (re)starts. A worker killed between
    its peers' writes of one round's checkpoints leaves the group one round apart: all go back to the
    older one, which is why each keeps its previous checkpoint until the next one is written by all."""
    mine = sorted(set(saved), reverse=True)
    bound = mine[0] if mine else -1
    while True:
        newest = torch.tensor([next((s for s in mine if s <= bound), -1)], dtype=torch.int64, device=device)
        dist.all_reduce(newest, op=dist.ReduceOp.MIN, group=group)
        step = int(newest.item())
        if step < 0:
            return None
        held = torch.tensor([step in mine], dtype=torch.int64, device=device)
        dist.all_reduce(held, op=dist.ReduceOp.MIN, group=group)
        if held.item():
            return step
        bound = step - 1


@dataclass(frozen=True)
class Share:
    """One worker's share of a round: its devices' joint forward (``None`` with no rows here), the loss it
    back-propagates (its rows' loss sum over the whole round's rows) and the rows of the whole round."""

    joint: JointLoss | None
    loss: torch.Tensor | None
    total_rows: int


class DataParallelTop:
    """The collectives of one shared top part's rounds (``group``: the default group if ``None``)."""

    def __init__(self, model: CloudPart, *, group: dist.ProcessGroup | None = None) -> None:
        self.model = model
        self.group = group
        self.device = next(model.parameters()).device
        self.reduce_s = 0.0  # seconds spent in the last round's gradient all-reduce (waiting for peers included)

    def total_rows(self, local_rows: int) -> int:
        """The rows of the round across all workers (every worker calls this once a round)."""
        count = torch.tensor([local_rows], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, group=self.group)
        return int(count.item())

    def forward(self, zs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                labels: Sequence[torch.Tensor]) -> Share | None:
        """This worker's share of the round's loss, to back-propagate; ``None`` when the round has no rows
        anywhere (no step then, and no further collective)."""
        local = sum(z.shape[0] for z in zs)
        total = self.total_rows(local)
        if total == 0:
            return None
        if not zs:
            return Share(None, None, total)
        joint = joint_loss(self.model, zs, masks, labels)
        return Share(joint, joint.loss * (local / total), total)

    def reduce_gradients(self) -> None:
        """Sum the top part's gradients over the workers, in place. If another worker refused its share
        (``refuse``), ``NonFinite`` on every worker that calls this: the gradients go and nobody steps."""
        if self._all_reduce(refused=False):
            raise NonFinite("a worker of this fleet refused its share of the round (a device's step would not be "
                            "finite or could not be answered), so no worker stepped and the top part is unchanged")

    def refuse(self) -> None:
        """Enter the round's gradient all-reduce saying this worker's share cannot be applied: no worker steps."""
        self._all_reduce(refused=True)

    def _all_reduce(self, *, refused: bool) -> bool:
        """One flat bucket: which parameters have a gradient, whether this worker refused, the gradients
        (zeros for none). Whether any worker refused; if none did, each gradient is the sum."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        flags = torch.tensor([p.grad is not None for p in params] + [refused], dtype=params[0].dtype,
                             device=self.device)
        grads = [torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1) for p in params]
        bucket = torch.cat([flags, *grads])
        start = time.perf_counter()
        dist.all_reduce(bucket, group=self.group)
        self.reduce_s = time.perf_counter() - start
        if bucket[len(params)].item() > 0:
            self.model.zero_grad(set_to_none=True)
            return True
        offset = len(params) + 1
        for p, has_grad in zip(params, bucket[:len(params)].tolist()):
            p.grad = bucket[offset:offset + p.numel()].view_as(p) if has_grad > 0 else None
            offset += p.numel()
        return False
