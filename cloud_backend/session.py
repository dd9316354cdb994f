"""One edge session on the cloud: its own ``CloudPart``, AdamW, dropout RNG, step and replay cache.

Why it exists: every device fine-tunes its own copy of the top part, and that copy must
train exactly as the in-process reference would (plain backprop: ``dz = dL/dz`` is taken
before the optimizer steps; the learning rate is ``schedule.rate(step)``), survive a
reconnect or a server restart, and not apply a resent step twice.

Dropout on the cloud draws from torch's global generator; each session keeps its own
generator state (seeded from the session's seed) and swaps it in around its step, so a
session's masks depend only on its own history. Compute runs on one worker thread, so
the swap never races.

A step is all or nothing: its loss, ``dz`` and gradients are checked, and its reply is
built and checked, before the optimizer or the generator state change. A finite but huge
activation that would make the weights NaN (or the reply unsendable) is refused with
``NonFinite`` and the session stays exactly as it was.

The label-private (U-shaped) split's step is two calls: ``begin`` runs the forward to the pooled
top output and holds its graph (with the generator state it drew), ``finish`` back-propagates the
device's ``dL/dpooled`` from there and applies the step (``splitwire.steps``: the held step is never
checkpointed; a resent ``TRAIN`` recomputes it exactly or is answered from the cache).

A checkpoint is one safetensors file (model, optimizer moments, RNG state, the cached
reply) whose metadata holds the rest as JSON, with a SHA-256 of every tensor, so that a
torn or overwritten file is found out (``CheckpointCorrupt``) rather than restored as
garbage weights; no pickle. It is written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cloud_backend.distributed import DataParallelTop
from cloud_backend.model import load_cloud_part
from models import rate_groups
from models.fleet import joint_loss
from splitwire.atomic import write_atomically
from splitwire.bundle import Bundle
from splitwire.errors import BundleMismatch, CheckpointCorrupt, ConfigMismatch, NonFinite
from splitwire.protocol import Predict, SessionConfig, TopGradient, Train
from splitwire.steps import CloudSteps, Replay

CHECKPOINT_FORMAT = "splitft-cloud-session"
CHECKPOINT_VERSION = 2  # 2: the metadata carries the tensors' checksum
SNAPSHOTS = ("requested", "latest")
# Beyond this a gradient's square overflows AdamW's float32 second moment, which then stays inf.
MAX_GRADIENT = 1e18
T = TypeVar("T")


@dataclass(frozen=True)
class StepResult:
    dz: np.ndarray
    loss: float | None  # None in the label-private split: the device computes the loss
    metrics: dict[str, float] | None


@dataclass(frozen=True)
class HeldStep:
    """A label-private step between ``begin`` and ``finish``: its graph from ``z`` to the pooled output."""

    step: int
    z: torch.Tensor
    pooled: torch.Tensor
    rng: torch.Tensor  # the generator state after the step's forward, kept once the step is applied
    lengths: np.ndarray


def checkpoint_path(state_dir: Path, session_id: str, snapshot: str) -> Path:
    """Where a session's ``snapshot`` lives: ``requested`` (the step the edge asked to keep, to match
    its own checkpoint) or ``latest`` (written at shutdown and eviction). Named by a hash: session
    ids never become paths."""
    if snapshot not in SNAPSHOTS:
        raise ValueError(f"unknown snapshot {snapshot!r}")
    return state_dir / f"session-{session_key(session_id)}.{snapshot}.safetensors"


def session_key(session_id: str) -> str:
    """The session's name in the state dir's file names."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def saved_step(path: Path) -> int:
    """The step a checkpoint file was taken at, read from its metadata alone."""
    return int(_read_checkpoint(path, tensors=False)[0]["step"])


def checkpoint_digest(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (less its checksum) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _read_checkpoint(path: Path, *, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's metadata (and, with ``tensors``, its checked tensors), or ``CheckpointCorrupt``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = json.loads(f.metadata()["splitft"])
            loaded = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"not a version-{CHECKPOINT_VERSION} cloud session checkpoint")
        int(meta["step"])
    except Exception as exc:  # safetensors raises its own error types for a torn header or body
        raise CheckpointCorrupt(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:200]})",
                                path=str(path)) from None
    if tensors and checkpoint_digest(meta, loaded) != meta.get("checksum"):
        raise CheckpointCorrupt(f"{path} fails its checksum: it was changed after it was written",
                                path=str(path))
    return meta, loaded


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's metadata and checked tensors, or ``CheckpointCorrupt``."""
    return _read_checkpoint(path, tensors=True)


def write_checkpoint(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``meta`` (with the tensors' checksum added) and ``tensors`` to ``path`` atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, "checksum": checkpoint_digest(meta, tensors)}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"splitft": json.dumps(meta)}))


def _get_rng(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class CloudSession:
    """The top part of one edge session, trained with ``torch.optim.AdamW``."""

    def __init__(self, *, session_id: str, bundle: Bundle, config: SessionConfig, device: torch.device) -> None:
        self.session_id = session_id
        self.bundle_hash = bundle.hash
        self.config = config
        self.device = device
        self.model = load_cloud_part(bundle, device=device)
        opt = bundle.manifest.optimizer
        self.optimizer = torch.optim.AdamW(
            rate_groups(self.model, opt.lr_scales("cloud", dict(self.model.named_parameters()))),
            lr=config.schedule.rate(1), betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
        )
        self.seed_rng(config.seed)
        self.steps = CloudSteps(session_id)  # step order and the replay cache (``splitwire.steps``)
        self.held: HeldStep | None = None  # label-private: the step whose gradient the device has yet to send

    def seed_rng(self, seed: int) -> None:
        """Start this session's dropout generator from ``seed`` (torch's global generator is left alone)."""
        with self._forked_rng():
            torch.manual_seed(seed)
            self.rng = _get_rng(self.device)

    @contextlib.contextmanager
    def _forked_rng(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            yield

    def _with_own_rng(self, forward: Callable[[], T]) -> tuple[T, torch.Tensor]:
        """``forward()`` drawing its dropout masks from this session's generator (torch's global one is left
        alone), and the generator's state after it, which becomes the session's once the step is applied."""
        with self._forked_rng():
            _set_rng(self.device, self.rng)
            result = forward()
            return result, _get_rng(self.device)


    def _inputs(self, z: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` on the device, and the attention mask rebuilt from the lengths (right padding)."""
        z_t = torch.tensor(z, device=self.device)
        positions = torch.arange(z.shape[1], device=self.device)
        mask = (positions[None, :] < torch.tensor(lengths, device=self.device)[:, None]).long()
        return z_t, mask

    def train(self, request: Train, *, digest: str, answer: Callable[[StepResult], bytes]) -> bytes:
        """One step: forward, mean loss, ``dz = dL/dz``, then AdamW at ``schedule.rate(step)``.

        ``answer`` turns the result into the reply frame (and checks it); only then does the
        optimizer step. The reply is cached with the step under the request's ``digest``, so a
        resend is answered from the cache and never finds the one without the other.
        """
        self.steps.check_next(request.step)
        z, mask = self._inputs(request.z, request.lengths)
        z.requires_grad_(True)
        labels = torch.tensor(request.labels, device=self.device)
        logits, rng = self._with_own_rng(lambda: self.model(z, mask))
        loss = self.model.loss(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._check_finite(request.step, loss, z.grad)
        reply = self._answered(answer, StepResult(z.grad.float().cpu().numpy(), loss.item(),
                                                  self._metrics(logits.detach(), labels)))
        self._apply(request.step, rng)
        self.steps.applied(request.step, digest, reply)
        return reply

    def begin(self, request: Train, *, digest: str, answer: Callable[[np.ndarray], bytes]) -> bytes:
        """Label-private step, first half: the forward to the pooled top output ``B×hidden``, which ``answer``
        turns into the reply (and checks); the graph is held for ``finish``, nothing changes yet."""
        self.steps.check_next(request.step)
        z, mask = self._inputs(request.z, request.lengths)
        z.requires_grad_(True)
        pooled, rng = self._with_own_rng(lambda: self.model(z, mask))
        if not torch.isfinite(pooled).all():
            raise NonFinite(f"session {self.session_id!r} step {request.step}: the pooled output would not be "
                            "finite, so the step was refused and nothing changed; check the edge's inputs")
        reply = answer(pooled.detach().float().cpu().numpy())
        self.held = HeldStep(request.step, z, pooled, rng, request.lengths)
        self.steps.began(request.step, digest, reply)
        return reply

    def finish(self, request: TopGradient, *, answer: Callable[[StepResult], bytes]) -> bytes:
        """Label-private step, second half: back-propagate the device's ``dL/dpooled``, ``answer`` with
        ``dz``, then AdamW at ``schedule.rate(step)``."""
        held, pending = self.held, self.steps.take_pending(request.step)
        self.held = None  # the backward frees the graph: a step refused from here on is begun again
        self.optimizer.zero_grad(set_to_none=True)
        held.pooled.backward(torch.tensor(request.values, device=self.device, dtype=held.pooled.dtype))
        self._check_finite(request.step, None, held.z.grad)
        reply = self._answered(answer, StepResult(held.z.grad.float().cpu().numpy(), None, None))
        self._apply(request.step, held.rng)
        self.steps.applied(request.step, pending.digest, reply, pending.top)
        return reply

    def _answered(self, answer: Callable[[StepResult], bytes], result: StepResult) -> bytes:
        """The reply for ``result``; if it cannot be made, the gradients go and nothing is applied."""
        try:
            return answer(result)
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def train_group(self, requests: Sequence[Train], answers: Sequence[Callable[[StepResult], bytes]], *,
                    parallel: DataParallelTop | None = None) -> list[bytes]:
        """One step of this top part, shared by a fleet, on its devices' requests stacked in the given
        order (``models.fleet.joint_loss``: the mean loss over all their rows), at ``schedule.rate`` of
        the group's number (``step`` counts groups). Every reply is built by its ``answers`` entry and
        checked before the optimizer steps; the devices' own step order and replay caches are the
        fleet's (``cloud_backend.fleet``). With ``parallel`` the group is this worker's share of a round
        across sft-cloud workers (``cloud_backend.distributed``): ``requests`` may be empty, the loss is
        its rows' share of the whole round's mean, the gradients are summed over the workers before
        AdamW, and a share refused on one worker is refused on all."""
        group = self.step + 1
        inputs = [self._inputs(request.z, request.lengths) for request in requests]
        zs = [z.requires_grad_(True) for z, _ in inputs]
        masks = [mask for _, mask in inputs]
        labels = [torch.tensor(request.labels, device=self.device) for request in requests]
        share, rng = self._with_own_rng(lambda: joint_loss(self.model, zs, masks, labels) if parallel is None
                                        else parallel.forward(zs, masks, labels))
        if share is None:  # no rows on any worker: no step
            return []
        joint = share if parallel is None else share.joint
        self.optimizer.zero_grad(set_to_none=True)
        if share.loss is not None:
            share.loss.backward()
        try:
            if joint is not None:
                self._check_finite(group, joint.loss, torch.cat([z.grad.reshape(-1) for z in zs]))
            replies = [answer(StepResult(z.grad.float().cpu().numpy(), loss,
                                         self._metrics(joint.logits[rows].detach(), label)))
                       for answer, z, loss, rows, label in zip(answers, zs, joint.device_losses, joint.rows, labels)
                       ] if joint is not None else []
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            if parallel is not None:
                parallel.refuse()
            raise
        if parallel is not None:
            parallel.reduce_gradients()
            self._check_finite(group, None, torch.zeros(0))  # the summed gradients: the same check on every worker
        self._apply(group, rng)
        self.steps = CloudSteps(self.session_id, step=group)
        return replies

    def _apply(self, step: int, rng: torch.Tensor) -> None:
        """AdamW at ``schedule.rate(step)`` with the gradients just taken; the RNG moves on to ``rng``."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.schedule.rate(step) * group.get("scale", 1.0)  # older checkpoints: none
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are not kept between steps: memory
        self.rng = rng

    @property
    def step(self) -> int:
        """The last training step applied."""
        return self.steps.step

    @property
    def replay(self) -> Replay | None:
        return self.steps.replay

    def _check_finite(self, step: int, loss: torch.Tensor | None, dz: torch.Tensor) -> None:
        """Refuse step ``step`` unless its loss, ``dz`` and every gradient are finite and in range."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        largest = torch.stack(torch._foreach_norm(grads, math.inf)).max().item() if grads else 0.0
        problems = [what for what, ok in (("the loss", loss is None or math.isfinite(loss.item())),
                                          ("dL/dz", bool(torch.isfinite(dz).all())),
                                          (f"the gradients (largest {largest:.3g})", largest <= MAX_GRADIENT)) if not ok]
        if problems:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFinite(f"session {self.session_id!r} step {step}: {' and '.join(problems)} would not be finite "
                            "or in range, so the step was refused and nothing changed; check the edge's inputs "
                            "and learning rate")

    def _metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        count = float(labels.shape[0])
        if self.model.spec.num_labels == 1:
            error = (logits.squeeze(-1) - labels.to(logits.dtype)).pow(2).sum()
            return {"squared_error": float(error), "count": count}
        return {"correct": float((logits.argmax(-1) == labels).sum()), "count": count}

    @torch.no_grad()
    def predict(self, request: Predict) -> np.ndarray:
        """Logits in eval mode (no dropout, no RNG drawn, nothing trained); refused unless finite."""
        self.model.eval()
        try:
            logits = self.model(*self._inputs(request.z, request.lengths)).float().cpu().numpy()
        finally:
            self.model.train()
        if not np.isfinite(logits).all():
            raise NonFinite(f"session {self.session_id!r}: the logits of prediction request {request.request} are "
                            "not finite; check the edge's inputs")
        return logits

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This session's whole state as checkpoint metadata and tensors (``write_checkpoint`` stores them)."""
        optimizer = self.optimizer.state_dict()
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for index, state in optimizer["state"].items():
            tensors |= {f"optimizer.{index}.{key}": value for key, value in state.items()}
        tensors["rng"] = self.rng
        if self.replay is not None:
            tensors["replay.reply"] = torch.frombuffer(bytearray(self.replay.reply), dtype=torch.uint8)
            if self.replay.top is not None:
                tensors["replay.top"] = torch.frombuffer(bytearray(self.replay.top), dtype=torch.uint8)
        meta = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "session_id": self.session_id,
            "bundle_hash": self.bundle_hash, "step": self.step, "config": self.config.to_meta(),
            "rng_device": self.device.type, "param_groups": optimizer["param_groups"],
            "replay": None if self.replay is None else {"step": self.replay.step, "digest": self.replay.digest},
        }
        return meta, tensors

    def save(self, path: Path) -> None:
        """Write this session's whole state to ``path`` atomically."""
        write_checkpoint(path, *self.snapshot())

    @classmethod
    def restore(cls, path: Path, *, bundle: Bundle, device: torch.device) -> "CloudSession":
        """The session exactly as ``save`` left it; ``CheckpointCorrupt`` if the file is not intact."""
        return cls.from_snapshot(*read_checkpoint(path), bundle=bundle, device=device)

    @classmethod
    def from_snapshot(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *, bundle: Bundle,
                      device: torch.device) -> "CloudSession":
        """The session that ``snapshot`` described (tensors of other prefixes are left alone)."""
        if meta["bundle_hash"] != bundle.hash:
            raise BundleMismatch(
                f"session {meta['session_id']}'s checkpoint was trained with bundle {meta['bundle_hash'][:12]}…; "
                f"this cloud serves {bundle.hash[:12]}…"
            )
        if meta["rng_device"] != device.type:
            raise ConfigMismatch(
                f"session {meta['session_id']} was trained on {meta['rng_device']}, this cloud runs on "
                f"{device.type}: its dropout would differ; start sft-cloud with --device {meta['rng_device']}"
            )
        session = cls(session_id=meta["session_id"], bundle=bundle,
                      config=SessionConfig.from_meta(meta["config"]), device=device)
        session.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        session.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        session.rng = tensors["rng"]
        replay = None
        if meta["replay"] is not None:
            reply = tensors["replay.reply"].numpy().tobytes()
            top = tensors["replay.top"].numpy().tobytes() if "replay.top" in tensors else None
            replay = Replay(int(meta["replay"]["step"]), meta["replay"]["digest"], reply, top)
        session.steps = CloudSteps(session.session_id, step=int(meta["step"]), replay=replay)
        return session
