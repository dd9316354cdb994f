"""The edge as a Python library: ``EdgeTrainer`` fine-tunes a bundle's edge half with a cloud.

Why it exists: people add split fine-tuning to the scripts they already have, not only
through ``sft-edge``. ``EdgeTrainer`` opens a bundle, connects to ``sft-cloud``, trains on
any iterable of examples, evaluates, predicts, checkpoints and resumes, and calls
``TrainerCallback`` hooks on the way. ``sft-edge``, the tests' harness and the benchmarks
drive training through it, so the wiring of engine, checkpoints, rewind and client exists
once. docs/API.md has a worked example.
"""

from __future__ import annotations

import hashlib
import json
import ssl as ssl_module
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator, Sequence

import numpy as np

from edge_runtime import metrics as task_metrics
from edge_runtime.batches import TrainBatch, planned_steps, training_batches
from edge_runtime.checkpoints import (
    CheckpointDir,
    ResumeError,
    RunConfig,
    check_same_run,
    restore_checkpoint,
    resume_point,
    rewind_to_checkpoint,
)
from edge_runtime.client import Backoff, CloudClient
from edge_runtime.data import LabelMap, TextData
from edge_runtime.engine import open_engine
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.trainer import (
    Averaging,
    Checkpointing,
    TrainerCallback,
    TrainResult,
    predict_logits,
    train,
)
from splitwire.bundle import Bundle, load_bundle
from splitwire.schedule import Schedule

DEFAULT_RETRY = Backoff()


@dataclass(frozen=True)
class Example:
    """One training or test example: a text (and the second text of a pair), and its label:
    a class id ``0..num_labels-1``, or a float target for a regression bundle."""

    text: str
    label: int | float | None = None
    pair: str | None = None


def as_text_data(examples: Iterable[Example] | TextData, *, task: str) -> TextData:
    """``TextData`` from examples (labels kept only when every example has one)."""
    if isinstance(examples, TextData):
        return examples
    rows = list(examples)
    if not rows:
        raise ValueError("no examples")
    pairs = [row.pair for row in rows]
    if any(p is not None for p in pairs) and any(p is None for p in pairs):
        raise ValueError("either every example has a pair text or none has")
    labels = None
    if all(row.label is not None for row in rows):
        labels = np.asarray([row.label for row in rows], dtype=np.float32 if task == "regression" else np.int64)
    return TextData([row.text for row in rows], None if pairs[0] is None else pairs, labels)


def data_digest(data: TextData) -> str:
    """A SHA-256 of the examples: a resumed run must train on the same data."""
    content = {"texts": data.texts, "pairs": data.pairs,
               "labels": None if data.labels is None else data.labels.tolist()}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


class EdgeTrainer:
    """The edge half of one split fine-tuning session.

    ``bundle``: what ``sft-export`` wrote (a path or a loaded ``Bundle``); ``cloud``: the
    ``ws://`` or ``wss://`` URL ``sft-cloud`` printed; ``session``: the session id (its token
    from ``token``); checkpoints go to ``checkpoint_dir`` (default ``runs/<session>``). A lost
    connection is reopened with ``retry`` (``None``: not at all). ``fleet``: train the shared top part
    of that fleet on the cloud (its edge half stays this device's own, unless the cloud shares the
    fleet's edge: ``sft-cloud --fleet-edge shared``), and predict with it.
    """

    def __init__(self, bundle: str | Path | Bundle, *, cloud: str, session: str = "default",
                 checkpoint_dir: str | Path | None = None, token: str | None = None,
                 ssl: ssl_module.SSLContext | None = None, threads: int | None = None,
                 retry: Backoff | None = DEFAULT_RETRY, progress: bool = False, fleet: str | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, parts=("edge",))
        self.cloud, self.session, self.token, self.ssl, self.retry = cloud, session, token, ssl, retry
        self.fleet = fleet
        self.checkpoints = CheckpointDir(checkpoint_dir if checkpoint_dir is not None else Path("runs") / session)
        self.engine = open_engine(self.bundle, threads=threads)
        self.tokenizer = EdgeTokenizer.from_bundle(self.bundle)
        self.progress = progress
        self.client: CloudClient | None = None
        self.config: RunConfig | None = None  # the run the engine holds, once trained or restored

    @property
    def task(self) -> str:
        return "regression" if self.bundle.num_labels == 1 else "classification"

    def label_map(self) -> LabelMap:
        """Class ``i`` is named ``"i"`` (regression: the target itself)."""
        if self.task == "regression":
            return LabelMap("regression")
        return LabelMap("classification", tuple(str(i) for i in range(self.bundle.num_labels)))

    def run_config(self, data: TextData, *, batch_size: int = 32, epochs: int = 1, max_steps: int | None = None,
                   lr: float | None = None, schedule: str = "constant", warmup_steps: int = 0, seed: int = 0,
                   codec: str = "fp32", group_by_length: bool = False, label_map: LabelMap | None = None) -> RunConfig:
        """What fixes a run on ``data``: its order, schedule, codec and label map."""
        total = planned_steps(len(data), batch_size=batch_size, epochs=epochs, max_steps=max_steps)
        rate = Schedule(lr=float(lr if lr is not None else self.bundle.manifest.optimizer.lr), kind=schedule,
                        warmup_steps=warmup_steps, total_steps=total)
        return RunConfig(session=self.session, bundle_hash=self.bundle.hash, data_sha256=data_digest(data),
                         columns={}, label_map=(label_map or self.label_map()).to_dict(), seed=seed,
                         batch_size=batch_size, epochs=epochs, max_steps=max_steps, holdout=None,
                         schedule=rate.to_dict(), group_by_length=group_by_length, codec=codec)

    async def fit(self, examples: Iterable[Example] | TextData, *, checkpoint_every: int | None = 50,
                  callbacks: Sequence[TrainerCallback] = (), average_every: int | None = None,
                  **options) -> TrainResult:
        """Train on ``examples`` (``options``: those of ``run_config``); resumes a run of the same
        config from ``checkpoint_dir`` at the step the cloud has applied. ``average_every``: as ``train``."""
        data = as_text_data(examples, task=self.task)
        return await self.train(data, self.run_config(data, **options), checkpoint_every=checkpoint_every,
                                callbacks=callbacks, average_every=average_every)

    async def train(self, data: TextData, config: RunConfig, *, checkpoint_every: int | None = 50,
                    callbacks: Sequence[TrainerCallback] = (), average_every: int | None = None) -> TrainResult:
        """Train ``data`` as ``config`` says. ``checkpoint_every=None``: no checkpoints, and so no rewind
        when the cloud comes back behind the edge. ``average_every``: in a fleet, average the edge half
        with the other members' every that many steps (FedAvg weighted by examples; ``client.averaging_bytes``
        counts what it moved)."""
        if data.labels is None:
            raise ValueError("training needs a label on every example")
        if average_every is not None and (self.fleet is None or average_every < 1):
            raise ValueError("average_every needs a fleet and a positive step count")
        saved = self.checkpoints.all()
        if saved:
            check_same_run(config, saved[-1].config, self.checkpoints.root)
        schedule = Schedule.from_dict(config.schedule)
        client = await self._connect(config, resume_from=saved[-1].step if saved else None)
        self.config = config

        def batches_after(step: int) -> Iterator[TrainBatch]:
            return training_batches(data, self.tokenizer, batch_size=config.batch_size, epochs=config.epochs,
                                    seed=config.seed, max_steps=config.max_steps, after_step=step,
                                    group_by_length=config.group_by_length)

        start = restore_checkpoint(self.engine, resume_point(client.resume_step, saved))
        checkpoints = checkpoint_every is not None
        return await train(engine=self.engine, client=client, batches=batches_after(start), schedule=schedule,
                           total_steps=schedule.total_steps, start_step=start,
                           checkpointing=Checkpointing(self.checkpoints, config, checkpoint_every) if checkpoints
                           else None,
                           rewind=rewind_to_checkpoint(self.engine, self.checkpoints, batches_after) if checkpoints
                           else None,
                           progress=self.progress, callbacks=callbacks,
                           averaging=Averaging(average_every, len(data)) if average_every else None)

    async def predict(self, examples: Iterable[Example | str] | TextData, *, batch_size: int = 32) -> np.ndarray:
        """``N×num_labels`` logits; nothing is trained, no label leaves the device."""
        rows = examples if isinstance(examples, TextData) else [
            e if isinstance(e, Example) else Example(e) for e in examples]
        client = await self._ready()
        return await predict_logits(engine=self.engine, client=client, data=as_text_data(rows, task=self.task),
                                    tokenizer=self.tokenizer, batch_size=batch_size, progress=self.progress)

    async def evaluate(self, examples: Iterable[Example] | TextData, *, batch_size: int = 32,
                       callbacks: Sequence[TrainerCallback] = ()) -> dict[str, float]:
        """The task's metrics on labelled examples, computed on the device."""
        data = as_text_data(examples, task=self.task)
        if data.labels is None:
            raise ValueError("evaluation needs a label on every example")
        values = task_metrics.report(data.labels, await self.predict(data, batch_size=batch_size))
        for callback in callbacks:
            callback.on_evaluate(values)
        return values

    async def _ready(self) -> CloudClient:
        """The open session; without one, the latest run's, with the edge restored at the cloud's step."""
        if self.client is not None:
            return self.client
        saved = self.checkpoints.all()
        if not saved:
            raise ResumeError(f"no checkpoint in {self.checkpoints.root}: train first (same session or "
                              "checkpoint_dir)")
        client = await self._connect(saved[-1].config, resume_from=saved[-1].step)
        match = [c for c in saved if c.step == client.resume_step]
        if not match:
            raise ResumeError(f"the cloud's session is at step {client.resume_step}, the checkpoints in "
                              f"{self.checkpoints.root} at {', '.join(str(c.step) for c in saved)}: resume training "
                              "first")
        restore_checkpoint(self.engine, match[-1])
        self.config = saved[-1].config
        return client

    async def _connect(self, config: RunConfig, *, resume_from: int | None) -> CloudClient:
        await self.close()
        self.client = await CloudClient.connect(
            self.cloud, bundle=self.bundle, session_id=config.session, token=self.token,
            schedule=Schedule.from_dict(config.schedule), seed=config.seed, codec=config.codec, ssl=self.ssl,
            retry=self.retry, resume_from=resume_from, fleet=self.fleet)
        return self.client

    async def close(self) -> None:
        """Say bye to the cloud (the session stays there, to resume later)."""
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()

    async def __aenter__(self) -> "EdgeTrainer":
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()
