"""The edge's training loop: data order, the split step over the wire, checkpoints, evaluation.

Why it exists: this is the device half of split fine-tuning. Per step the engine computes
``z`` on the private batch, the cloud answers ``dL/dz`` (and the loss), the engine
back-propagates it and takes its AdamW step with ``schedule.rate(step)``, the same rate
the cloud used. The batch order is a pure function of (seed, epoch), so an in-process
PyTorch reference and a resumed run see exactly the same batches. Checkpoints hold the
engine's state plus the run's config as JSON, with a SHA-256 of every engine file that is
checked before a restore, written atomically; a run resumes at the step the cloud says it
has applied.

Faults during a run: the client reconnects and resends by itself; when the cloud comes
back behind the edge (``SessionRewound``: it restarted from its last checkpoint), ``train``
restores the edge's checkpoint of the same step and replays the batches from there, so the
run ends with the weights of an uninterrupted one. A fresh run checkpoints step 0 first,
so that even a cloud lost before the first periodic checkpoint has a step to meet at.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from edge_runtime import metrics
from edge_runtime.data import LabelMap, TextData
from edge_runtime.engine import EdgeBatch, EdgeEngine
from edge_runtime.tokenizer import EdgeTokenizer
from splitwire.atomic import publish_directory
from splitwire.bundle import sha256_file
from splitwire.errors import CheckpointCorrupt, SessionRewound, SplitftError
from splitwire.schedule import Schedule

if TYPE_CHECKING:
    from edge_runtime.client import CloudClient

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ENGINE_DIR = "edge"
CHECKPOINT_PREFIX = "step-"


class ResumeError(SplitftError):
    """The checkpoints on the device and the cloud's session cannot be brought to one step."""

    code = "resume"


# --- data order ------------------------------------------------------------------------------


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_examples)`` that epoch ``epoch`` (0-based) visits."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def planned_steps(num_examples: int, *, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    total = epochs * math.ceil(num_examples / batch_size)
    return total if max_steps is None else min(total, max_steps)


# Batches per length group: rows are sorted by length inside groups of this many batches.
LENGTH_GROUP_BATCHES = 50


def epoch_batches(num_examples: int, *, batch_size: int, seed: int, epoch: int,
                  lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """The index batches of one epoch, in the order they are trained.

    With ``lengths`` (tokens per example), rows are grouped by length: the epoch's
    permutation is cut into groups of ``LENGTH_GROUP_BATCHES`` batches, each group sorted
    by length and cut into batches, and the batches shuffled. Every row is still seen once
    an epoch, in as many steps, with far less padding (half the compute and traffic on the
    movie-review snippets).
    """
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    group = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, num_examples, group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in shuffle]


def batch_plan(
    num_examples: int, *, batch_size: int, epochs: int, seed: int, max_steps: int | None = None,
    lengths: np.ndarray | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(epoch, step, indices)`` for every step; steps are 1-based, an epoch's last batch may be short.

    ``lengths`` groups rows of similar length into batches (see ``epoch_batches``).
    """
    if num_examples < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"nothing to train: {num_examples} examples, batch size {batch_size}, {epochs} epochs")
    total = planned_steps(num_examples, batch_size=batch_size, epochs=epochs, max_steps=max_steps)
    step = 0
    for epoch in range(epochs):
        for indices in epoch_batches(num_examples, batch_size=batch_size, seed=seed, epoch=epoch, lengths=lengths):
            step += 1
            if step > total:
                return
            yield epoch, step, indices


@dataclass(frozen=True)
class TrainBatch:
    """What one training step sends: the edge inputs, real-token counts and the labels."""

    epoch: int
    step: int
    inputs: EdgeBatch
    lengths: np.ndarray
    labels: np.ndarray


def training_batches(
    data: TextData,
    tokenizer: EdgeTokenizer,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    max_steps: int | None = None,
    after_step: int = 0,
    group_by_length: bool = False,
) -> Iterator[TrainBatch]:
    """The tokenized batches of ``batch_plan``, starting after step ``after_step`` (a resume)."""
    if data.labels is None:
        raise ValueError("training needs labelled data")
    lengths = tokenizer.lengths(data.texts, data.pairs) if group_by_length else None
    for epoch, step, indices in batch_plan(len(data), batch_size=batch_size, epochs=epochs, seed=seed,
                                           max_steps=max_steps, lengths=lengths):
        if step <= after_step:
            continue
        part = data.subset(indices)
        inputs, lengths = tokenizer.encode(part.texts, part.pairs)
        yield TrainBatch(epoch, step, inputs, lengths, part.labels)


# --- checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """What fixes a run: resuming with anything else would train on another data order or task."""

    session: str
    bundle_hash: str
    data_sha256: str
    columns: dict[str, str | None]
    label_map: dict[str, Any]
    seed: int
    batch_size: int
    epochs: int
    max_steps: int | None
    holdout: float | None
    schedule: dict[str, Any]
    group_by_length: bool = False
    codec: str = "fp32"  # the wire codec (splitwire.codecs): the cloud session is opened with it

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Fields added later (those with defaults) may be absent from an older run's ``run.json``."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})


def check_same_run(config: RunConfig, saved: RunConfig, where: Path) -> None:
    """Refuse to resume a run with a different config: it would not be the same training."""
    changed = [name for name, value in asdict(config).items() if asdict(saved)[name] != value]
    if changed:
        details = "; ".join(f"{name}: was {asdict(saved)[name]!r}, now {asdict(config)[name]!r}" for name in changed)
        raise ResumeError(f"{where} holds a run with another config ({details}); "
                          "pass the same options, or a fresh checkpoint dir (--checkpoint-dir) to start a new run")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    epoch: int
    config: RunConfig
    files: dict[str, str] | None = None  # engine file -> SHA-256; None in checkpoints of splitft 0.1 and older

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_DIR

    def verify(self) -> None:
        """``CheckpointCorrupt`` unless the engine files are exactly those that were saved."""
        if self.files is None:
            return
        found = _engine_files(self.engine_dir)
        for name in sorted(set(self.files) | set(found)):
            if self.files.get(name) != found.get(name):
                what = "is missing" if name not in found else "was not saved" if name not in self.files else \
                    "fails its checksum"
                raise CheckpointCorrupt(f"checkpoint {self.path}: {ENGINE_DIR}/{name} {what}; delete that "
                                        "checkpoint directory to resume from an older one", path=str(self.path))


def _engine_files(engine_dir: Path) -> dict[str, str]:
    return {p.relative_to(engine_dir).as_posix(): sha256_file(p) for p in sorted(engine_dir.rglob("*")) if p.is_file()}


class CheckpointDir:
    """``root/step-NNNNNNNN/{edge/, run.json}``, each written to a temp dir, fsynced and renamed into place."""

    def __init__(self, root: str | Path, *, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def all(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        paths = sorted(p for p in self.root.glob(f"{CHECKPOINT_PREFIX}*") if (p / RUN_FILE).is_file())
        return [self.read(p) for p in paths]

    def latest(self) -> Checkpoint | None:
        found = self.all()
        return found[-1] if found else None

    @staticmethod
    def read(path: Path) -> Checkpoint:
        try:
            state = json.loads((path / RUN_FILE).read_text())
            return Checkpoint(path, int(state["step"]), int(state["epoch"]), RunConfig.from_dict(state["config"]),
                              state.get("files"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{path / RUN_FILE} is damaged ({type(exc).__name__}: {exc}); "
                              "delete that checkpoint directory to resume from an older one") from None

    def save(self, engine: EdgeEngine, *, step: int, epoch: int, config: RunConfig) -> Checkpoint:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{CHECKPOINT_PREFIX}*"):  # staging dirs of a save cut by a crash
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step:08d}-", dir=self.root))
        try:
            (staging / ENGINE_DIR).mkdir()
            engine.save(staging / ENGINE_DIR)
            state = {"step": step, "epoch": epoch, "config": asdict(config),
                     "files": _engine_files(staging / ENGINE_DIR)}
            (staging / RUN_FILE).write_text(json.dumps(state, indent=2) + "\n")
            final = self.root / f"{CHECKPOINT_PREFIX}{step:08d}"
            if final.exists():
                shutil.rmtree(final)
            publish_directory(staging, final)  # a crash leaves the old checkpoint or the new one
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._prune()
        return self.read(final)

    def _prune(self) -> None:
        for old in self.all()[:-self.keep]:
            shutil.rmtree(old.path)


def resume_point(cloud_step: int, saved: list[Checkpoint]) -> Checkpoint | None:
    """The checkpoint to continue from, given the last step the cloud has applied.

    The cloud may be one step ahead (the edge stopped after the cloud applied a step):
    that step is then resent and answered from the cloud's replay cache. ``None`` means
    the bundle's initial weights (step 0).
    """
    for checkpoint in reversed(saved):
        if checkpoint.step in (cloud_step, cloud_step - 1):
            return checkpoint
    if cloud_step in (0, 1):
        if saved and cloud_step == 0:
            raise ResumeError(
                f"the cloud holds no training for this session, but {saved[-1].path} is at step {saved[-1].step}: "
                "pass the session that run used, or a fresh --checkpoint-dir to start over"
            )
        return None
    have = ", ".join(str(c.step) for c in saved) or "none"
    raise ResumeError(
        f"the cloud's session is at step {cloud_step}, but the edge checkpoints are at steps {have}: "
        "the two halves cannot continue from the same step; start a new session with a fresh --checkpoint-dir"
    )


def restore_checkpoint(engine: EdgeEngine, checkpoint: Checkpoint | None) -> int:
    """Load ``checkpoint`` into ``engine`` (``None``: keep the bundle's initial weights); its step."""
    if checkpoint is None:
        return 0
    checkpoint.verify()
    engine.restore(checkpoint.engine_dir)
    return checkpoint.step


Rewind = Callable[[int], tuple[int, Iterable["TrainBatch"]]]


def rewind_to_checkpoint(engine: EdgeEngine, directory: CheckpointDir,
                         batches_after: Callable[[int], Iterable["TrainBatch"]]) -> Rewind:
    """What ``train`` calls when the cloud came back at an older step: restore the edge's
    checkpoint that meets it (``resume_point``) and continue with the batches after it."""
    def rewind(cloud_step: int) -> tuple[int, Iterable[TrainBatch]]:
        step = restore_checkpoint(engine, resume_point(cloud_step, directory.all()))
        return step, batches_after(step)
    return rewind


# --- the loop --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """What a callback hears after a step: the step, its loss and metrics, and the frames' bytes."""

    step: int
    total_steps: int
    loss: float
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int


class TrainerCallback:
    """Hooks into ``train`` and ``EdgeTrainer``, in the manner of Hugging Face's ``TrainerCallback``:
    subclass it and override what you need. ``on_step_begin`` runs before step ``n`` is computed,
    every time it is (a rewind trains steps again)."""

    def on_step_begin(self, step: int) -> None:
        """Before the edge's forward pass of ``step``."""

    def on_step_end(self, info: StepInfo) -> None:
        """After both halves applied ``info.step``."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After the edge (and the cloud, when it keeps a state dir) checkpointed ``step`` at ``path``."""

    def on_evaluate(self, metrics: dict[str, float]) -> None:
        """After an evaluation on labelled data."""


@dataclass
class TrainResult:
    """Per step of this call: step number, loss, batch shape ``(B, L)``, (up, down) bytes the transport counted."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    step_bytes: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    start_step: int = 0  # the step the call started after (restored from a checkpoint)

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    def forget_after(self, step: int) -> None:
        """Drop the steps after ``step``: they are trained again."""
        keep = sum(s <= step for s in self.steps)
        for values in (self.steps, self.losses, self.shapes, self.step_bytes):
            del values[keep:]


@dataclass
class Checkpointing:
    """Where and how often ``train`` checkpoints (every ``every`` steps and after the last)."""

    directory: CheckpointDir
    config: RunConfig
    every: int
    cloud_persists: bool = True  # False once the cloud said it keeps no state dir

    async def save(self, engine: EdgeEngine, client: "CloudClient", *, step: int, epoch: int,
                   callbacks: Sequence[TrainerCallback] = ()) -> None:
        """The edge's checkpoint first, then the cloud's: a resume finds the edge at or ahead of the cloud."""
        saved = self.directory.save(engine, step=step, epoch=epoch, config=self.config)
        if not await client.checkpoint(step) and self.cloud_persists:
            self.cloud_persists = False
            log.warning("the cloud keeps no state dir: this run resumes only while sft-cloud keeps running")
        for callback in callbacks:
            callback.on_checkpoint(step, saved.path)


@dataclass
class StepTimes:
    """Where one step's wall time went, in seconds (filled by ``split_step`` when given)."""

    forward: float = 0.0
    wait: float = 0.0  # for the cloud: up, the cloud's step, down
    update: float = 0.0  # backward and AdamW


async def split_step(*, engine: EdgeEngine, client: "CloudClient", batch: TrainBatch, schedule: Schedule,
                     times: StepTimes | None = None):
    """One training step of the split model; returns the cloud's reply (``dz``, loss, metrics).

    Engine compute runs in a worker thread so the event loop keeps answering the
    connection's pings during a long step on a slow device.
    """
    started = time.perf_counter()
    z = await asyncio.to_thread(engine.forward, batch.inputs)
    sent = time.perf_counter()
    reply = await client.train_step(batch.step, z, batch.lengths, batch.labels)
    received = time.perf_counter()
    engine.set_learning_rate(schedule.rate(batch.step))
    await asyncio.to_thread(_update, engine, reply.dz)
    if times is not None:
        times.forward, times.wait, times.update = sent - started, received - sent, time.perf_counter() - received
    return reply


def _update(engine: EdgeEngine, dz: np.ndarray) -> None:
    engine.backward(dz)
    engine.optimizer_step()


async def train(
    *,
    engine: EdgeEngine,
    client: "CloudClient",
    batches: Iterable[TrainBatch],
    schedule: Schedule,
    total_steps: int,
    start_step: int = 0,
    checkpointing: Checkpointing | None = None,
    rewind: Rewind | None = None,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run every batch as one split step; ``batches`` continue from ``start_step + 1``.

    With ``rewind`` (see ``rewind_to_checkpoint``), a cloud that comes back behind the edge
    is met at a checkpoint and the steps after it are trained again; without, that raises
    ``SessionRewound``.
    """
    result = TrainResult(start_step=start_step)
    started = time.perf_counter()
    with tqdm(total=total_steps, initial=start_step, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        if checkpointing and start_step == 0:
            await checkpointing.save(engine, client, step=0, epoch=0, callbacks=callbacks)
        while True:
            try:
                await _train_batches(engine=engine, client=client, batches=batches, schedule=schedule,
                                     start_step=start_step, total_steps=total_steps, checkpointing=checkpointing,
                                     result=result, bar=bar, callbacks=callbacks)
                break
            except SessionRewound as exc:
                if rewind is None:
                    raise
                start_step, batches = rewind(exc.step)
                log.warning("the cloud came back at step %d: the edge continues from its checkpoint of step %d",
                            exc.step, start_step)
                result.forget_after(start_step)
                bar.n = start_step
                bar.refresh()
    result.seconds = time.perf_counter() - started
    return result


async def _train_batches(*, engine: EdgeEngine, client: "CloudClient", batches: Iterable[TrainBatch],
                         schedule: Schedule, start_step: int, total_steps: int, checkpointing: Checkpointing | None,
                         result: TrainResult, bar: tqdm, callbacks: Sequence[TrainerCallback]) -> None:
    last: TrainBatch | None = None
    for batch in batches:
        expected = (last.step if last else start_step) + 1
        if batch.step != expected:
            raise ValueError(f"steps must be consecutive from {start_step + 1}: "
                             f"expected {expected}, got {batch.step}")
        for callback in callbacks:
            callback.on_step_begin(batch.step)
        reply = await split_step(engine=engine, client=client, batch=batch, schedule=schedule)
        last = batch
        result.steps.append(batch.step)
        result.losses.append(float(reply.loss))
        result.shapes.append(batch.inputs.shape)
        result.step_bytes.append(tuple(client.last_step_bytes))
        bar.update(1)
        bar.set_postfix({"loss": f"{reply.loss:.4f}", "up": _size(client.bytes_sent),
                         "down": _size(client.bytes_received)}, refresh=False)
        info = StepInfo(batch.step, total_steps, float(reply.loss), reply.metrics, *client.last_step_bytes)
        for callback in callbacks:
            callback.on_step_end(info)
        if checkpointing and batch.step % checkpointing.every == 0:
            await checkpointing.save(engine, client, step=batch.step, epoch=batch.epoch, callbacks=callbacks)
    if checkpointing and last is not None and last.step % checkpointing.every:
        await checkpointing.save(engine, client, step=last.step, epoch=last.epoch, callbacks=callbacks)


def _size(n: int) -> str:
    """Bytes in binary units for the progress bar."""
    units = ("B", "KiB", "MiB", "GiB")
    value, unit = float(n), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{n}B" if unit == 0 else f"{value:.1f}{units[unit]}"


# --- evaluation and prediction ---------------------------------------------------------------


async def predict_logits(
    *, engine: EdgeEngine, client: "CloudClient", data: TextData, tokenizer: EdgeTokenizer, batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """``N×num_labels`` logits for every row, in file order; nothing is trained."""
    outputs = []
    for start in tqdm(range(0, len(data), batch_size), unit="batch", disable=not progress, dynamic_ncols=True):
        part = data.subset(range(start, min(start + batch_size, len(data))))
        inputs, lengths = tokenizer.encode(part.texts, part.pairs)
        outputs.append(await client.predict(await asyncio.to_thread(engine.infer, inputs), lengths))
    return np.concatenate(outputs)


async def evaluate(
    *, engine: EdgeEngine, client: "CloudClient", data: TextData, tokenizer: EdgeTokenizer, batch_size: int,
    progress: bool = False,
) -> dict[str, float]:
    """The task's metrics on a labelled local file (the labels stay on the device)."""
    if data.labels is None:
        raise ValueError("evaluation needs labelled data")
    logits = await predict_logits(engine=engine, client=client, data=data, tokenizer=tokenizer,
                                  batch_size=batch_size, progress=progress)
    return metrics.report(data.labels, logits)


def prediction_rows(data: TextData, logits: np.ndarray, label_map: LabelMap) -> list[dict[str, Any]]:
    """One row per input: its text(s), the predicted label name (or value) and its score.

    Classification: ``score`` is the softmax probability of the predicted class.
    Regression: ``label`` and ``score`` are the predicted value.
    """
    rows = []
    for i, text in enumerate(data.texts):
        row: dict[str, Any] = {"text": text}
        if data.pairs is not None:
            row["text_pair"] = data.pairs[i]
        if label_map.task == "regression":
            row["label"] = row["score"] = float(logits[i, 0])
        else:
            shifted = np.exp(logits[i] - logits[i].max())
            best = int(np.argmax(logits[i]))
            row["label"] = label_map.name(best)
            row["score"] = round(float(shifted[best] / shifted.sum()), 6)
        rows.append(row)
    return rows
