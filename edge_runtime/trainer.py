"""The edge's training loop: the split step over the wire, callbacks, and evaluation.

Why it exists: this is the device half of split fine-tuning. Per step the engine computes
``z`` on the private batch (``edge_runtime.batches``), the cloud answers ``dL/dz`` (and the
loss), the engine back-propagates it and takes its AdamW step with ``schedule.rate(step)``,
the same rate the cloud used; every N steps both halves checkpoint
(``edge_runtime.checkpoints``).

Faults during a run: the client reconnects and resends by itself; when the cloud comes
back behind the edge (``SessionRewound``: it restarted from its last checkpoint), ``train``
restores the edge's checkpoint of the same step and replays the batches from there, so the
run ends with the weights of an uninterrupted one. A fresh run checkpoints step 0 first,
so that even a cloud lost before the first periodic checkpoint has a step to meet at.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from edge_runtime import metrics
from edge_runtime.batches import TrainBatch
from edge_runtime.checkpoints import CheckpointDir, Rewind, RunConfig
from edge_runtime.data import LabelMap, TextData
from edge_runtime.engine import EdgeEngine
from edge_runtime.tokenizer import EdgeTokenizer
from splitwire.errors import SessionRewound, UsageError
from splitwire.manifest import EMBEDDING_TABLES
from splitwire.schedule import Schedule

if TYPE_CHECKING:
    from edge_runtime.client import CloudClient

log = logging.getLogger(__name__)


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
class Averaging:
    """Every ``every`` steps a fleet member's trainable edge weights are averaged through the cloud
    (FedAvg weighted by ``examples``, the device's training examples); only weights travel."""

    every: int
    examples: int

    async def average(self, engine: EdgeEngine, client: "CloudClient", step: int) -> None:
        before = client.averaging_bytes
        engine.load_parameters(await client.average(step, self.examples, engine.parameters()))
        log.info("averaged the edge half with the fleet after step %d (%d bytes)", step,
                 client.averaging_bytes - before)


@dataclass
class StepTimes:
    """Where one step's wall time went, in seconds (filled by ``split_step`` when given)."""

    forward: float = 0.0
    wait: float = 0.0  # for the cloud: up, the cloud's step, down
    update: float = 0.0  # backward and AdamW


async def split_step(*, engine: EdgeEngine, client: "CloudClient", batch: TrainBatch, schedule: Schedule,
                     times: StepTimes | None = None):
    """One training step of the split model; returns the cloud's reply (``dz``, loss, metrics). With a
    label-private engine the loss and metrics are the device's own (``edge_runtime.label_head``).

    Engine compute runs in a worker thread so the event loop keeps answering the
    connection's pings during a long step on a slow device.
    """
    started = time.perf_counter()
    z = await asyncio.to_thread(engine.forward, batch.inputs)
    sent = time.perf_counter()
    head = engine.label_head
    if head is None:
        reply = await client.train_step(batch.step, z, batch.lengths, batch.labels)
    else:
        reply = await client.train_step_private(batch.step, z, batch.lengths,
                                                lambda pooled: head.backward(pooled, batch.labels))
    received = time.perf_counter()
    engine.set_learning_rate(schedule.rate(batch.step))
    if client.shared_edge:  # the fleet's one edge: every member applies the round's summed gradient
        await asyncio.to_thread(engine.backward, reply.dz)
        summed = await client.sum_gradients(batch.step, engine.gradients())
        await asyncio.to_thread(_apply, engine, summed)
    else:
        await asyncio.to_thread(_update, engine, reply.dz)
    if times is not None:
        times.forward, times.wait, times.update = sent - started, received - sent, time.perf_counter() - received
    return reply


def _update(engine: EdgeEngine, dz: np.ndarray) -> None:
    engine.backward(dz)
    engine.optimizer_step()


def _apply(engine: EdgeEngine, gradients: dict[str, np.ndarray]) -> None:
    engine.load_gradients(gradients)
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
    averaging: Averaging | None = None,
) -> TrainResult:
    """Run every batch as one split step; ``batches`` continue from ``start_step + 1``.

    With ``rewind`` (see ``rewind_to_checkpoint``), a cloud that comes back behind the edge
    is met at a checkpoint and the steps after it are trained again; without, that raises
    ``SessionRewound``.
    """
    if client.shared_edge and not engine.loads_gradients:
        raise UsageError(f"the cloud trains this fleet with one shared edge, which the {engine.name} engine cannot "
                         "take part in (it cannot set its gradients): export the bundle with --engine onnx")
    if client.shared_edge and EMBEDDING_TABLES[0] in engine.parameters():
        log.warning("this fleet's shared edge sends the word-embedding gradient every step, and its nonzero rows "
                    "are the token ids of the step's batch: export with --freeze-embeddings to keep them on the "
                    "device (docs/SECURITY.md)")
    result = TrainResult(start_step=start_step)
    started = time.perf_counter()
    with tqdm(total=total_steps, initial=start_step, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        if checkpointing and start_step == 0:
            await checkpointing.save(engine, client, step=0, epoch=0, callbacks=callbacks)
        while True:
            try:
                await _train_batches(engine=engine, client=client, batches=batches, schedule=schedule,
                                     start_step=start_step, total_steps=total_steps, checkpointing=checkpointing,
                                     result=result, bar=bar, callbacks=callbacks, averaging=averaging)
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
                         result: TrainResult, bar: tqdm, callbacks: Sequence[TrainerCallback],
                         averaging: Averaging | None = None) -> None:
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
        if averaging and batch.step % averaging.every == 0:
            await averaging.average(engine, client, batch.step)
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
    """``N×num_labels`` logits for every row, in file order; nothing is trained. Label-private, the cloud
    sends the pooled top output and the device's head makes the logits."""
    outputs = []
    for start in tqdm(range(0, len(data), batch_size), unit="batch", disable=not progress, dynamic_ncols=True):
        part = data.subset(range(start, min(start + batch_size, len(data))))
        inputs, lengths = tokenizer.encode(part.texts, part.pairs)
        values = await client.predict(await asyncio.to_thread(engine.infer, inputs), lengths)
        outputs.append(values if engine.label_head is None else engine.label_head.logits(values))
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
