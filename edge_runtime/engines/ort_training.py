"""The ``ort-training`` edge engine: onnxruntime-training's on-device training API.

Why it exists: it trains the exported edge graph with onnxruntime-training's Module /
Optimizer / CheckpointState, the route the paper's edge side needs without PyTorch. A
step has two passes because the API cannot take an upstream gradient directly: the
``z``-only eval graph gives ``z`` for the cloud; when ``dL/dz`` comes back,
``train_step(inputs…, g=dL/dz)`` recomputes the forward and back-propagates the loss
``Σ z·g`` whose parameter gradients are ``J(z)ᵀ dL/dz`` (see ``exporter.ort_artifacts``).
The edge part has no dropout, so both passes compute the same ``z``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_runtime.engine import EdgeBatch, EdgeEngine, checked_dz, checked_feeds, cpu_session_options, input_limits
from edge_runtime.ort_import import onnxruntime, training_api
from splitwire import manifest
from splitwire.bundle import Bundle, BundleError

CHECKPOINT = "checkpoint"  # in a saved engine directory
STAMP = "engine.json"


class Engine(EdgeEngine):
    name: ClassVar[str] = "ort-training"

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self._bundle = bundle
        self._width = bundle.wire_width
        self._trainable = list(bundle.manifest.edge.trainable)
        self._limits = input_limits(bundle)
        self._options = cpu_session_options(onnxruntime(), threads)
        self._batch: EdgeBatch | None = None
        self._has_gradients = False
        self._load(bundle.edge_file(manifest.CHECKPOINT))
        self.set_learning_rate(bundle.manifest.optimizer.lr)

    def _load(self, checkpoint: Path) -> None:
        api = training_api()
        self._state = api.CheckpointState.load_checkpoint(str(checkpoint))
        self._module = api.Module(
            str(self._bundle.edge_file(manifest.TRAINING_MODEL)),
            self._state,
            str(self._bundle.edge_file(manifest.EVAL_MODEL)),
            session_options=self._options,
        )
        self._optimizer = api.Optimizer(str(self._bundle.edge_file(manifest.OPTIMIZER_MODEL)), self._module)
        missing = [n for n in self._trainable if n not in self._state.parameters]
        if missing:
            raise BundleError(f"{checkpoint} lacks the trainable parameters {missing} that the manifest names")

    def forward(self, batch: EdgeBatch) -> np.ndarray:
        z = self.infer(batch)
        self._batch = batch
        return z

    def infer(self, batch: EdgeBatch) -> np.ndarray:
        z = self._module.eval()(*self._inputs(batch))
        return np.asarray(z, dtype=np.float32)

    def backward(self, dz: np.ndarray) -> None:
        if self._batch is None:
            raise RuntimeError("backward() needs a forward() first")
        dz = checked_dz(dz, shape=self._batch.shape, width=self._width)
        self._module.train()
        self._module.lazy_reset_grad()  # gradients replace, never accumulate
        self._module(*self._inputs(self._batch), dz)
        self._has_gradients = True

    def _inputs(self, batch: EdgeBatch) -> list[np.ndarray]:
        """The batch's inputs that the current mode's graph takes, in its order (a model without token
        types, DistilBERT, takes no ``token_type_ids``: the exporter drops an unused input)."""
        feeds = checked_feeds(batch, self._limits)
        return [feeds[name] for name in self._module.input_names() if name in feeds]

    def optimizer_step(self) -> None:
        if not self._has_gradients:
            raise RuntimeError("optimizer_step() needs a backward() first")
        self._optimizer.step()

    def gradients(self) -> dict[str, np.ndarray]:
        if not self._has_gradients:
            raise RuntimeError("no gradients yet: call backward() first")
        return {n: self._state.parameters[n].grad.copy() for n in self._trainable}

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: self._state.parameters[n].data.copy() for n in self._trainable}  # .data is a live view

    def load_parameters(self, weights: dict[str, np.ndarray]) -> None:
        for name, value in weights.items():
            self._state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def set_learning_rate(self, lr: float) -> None:
        self._optimizer.set_learning_rate(float(lr))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        training_api().CheckpointState.save_checkpoint(self._state, str(directory / CHECKPOINT), True)
        (directory / STAMP).write_text(json.dumps({"engine": self.name, "bundle": self._bundle.hash}))

    def restore(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            stamp = json.loads((directory / STAMP).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{directory} holds no {self.name} engine checkpoint: {exc}") from None
        if stamp != {"engine": self.name, "bundle": self._bundle.hash}:
            raise ValueError(f"{directory} was saved by engine {stamp.get('engine')!r} for another bundle")
        self._load(directory / CHECKPOINT)  # with the optimizer state: moments, step and learning rate
        self._batch, self._has_gradients = None, False

