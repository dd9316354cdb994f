"""The edge-engine interface: what the training loop needs from whatever runs the edge half.

Why it exists: the edge half can run on onnxruntime-training (``ort-training``: the
two-pass step, x86_64 and Python ≤ 3.11 only) or on plain onnxruntime with ahead-of-time
forward/backward graphs (``onnx``: portable, aarch64). The wire loop is written against
this interface only, and the cloud does not know which engine a device uses.

One training step: ``z = engine.forward(batch)`` → send ``z`` → receive ``dz`` →
``engine.backward(dz)`` (parameter gradients for that batch, replacing earlier ones) →
``engine.optimizer_step()``. In a fleet with a shared edge, the gradients go to the cloud
between the two (``gradients()``) and their sum over the round comes back
(``load_gradients``) before the step. A label-private bundle's engine also has a ``label_head``
(``edge_runtime.label_head``) that turns the cloud's pooled top output into the loss on the device.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from splitwire.bundle import Bundle, BundleError
from splitwire.manifest import EDGE_INPUTS


@dataclass(frozen=True)
class EdgeBatch:
    """One batch of edge inputs, all ``int64`` and ``B×L``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    position_ids: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        """By the graphs' input names (``splitwire.manifest.EDGE_INPUTS``, which these fields are)."""
        return {name: getattr(self, name) for name in EDGE_INPUTS}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


class EdgeEngine(ABC):
    """Runs the edge half (embeddings … compression head) and trains its parameters."""

    name: ClassVar[str]
    loads_gradients: ClassVar[bool] = False  # load_gradients works: the engine can train a fleet's shared edge
    label_head = None  # the label-private split's ``edge_runtime.label_head.LabelHead``; None otherwise

    @abstractmethod
    def forward(self, batch: EdgeBatch) -> np.ndarray:
        """``z`` (``B×L×r`` float32) for a training step; remembers what ``backward`` needs."""

    @abstractmethod
    def backward(self, dz: np.ndarray) -> None:
        """Back-propagate ``dL/dz`` through the last ``forward``; gradients replace earlier ones."""

    @abstractmethod
    def optimizer_step(self) -> None:
        """One AdamW step (``torch.optim.AdamW`` semantics) with the current gradients."""

    @abstractmethod
    def infer(self, batch: EdgeBatch) -> np.ndarray:
        """``z`` for evaluation or prediction; keeps no state."""

    @abstractmethod
    def gradients(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters' gradients, by their PyTorch names."""

    def load_gradients(self, gradients: dict[str, np.ndarray]) -> None:
        """Replace the current gradients with ``gradients`` (every trainable parameter's, float32 of its
        shape): a shared-edge fleet's sum, which ``optimizer_step`` then applies."""
        raise NotImplementedError(f"the {self.name} engine cannot set its gradients")

    @abstractmethod
    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters, by their PyTorch names."""

    @abstractmethod
    def load_parameters(self, weights: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable parameters named in ``weights`` (a fleet's averaged edge half);
        the optimizer's moments stay."""

    @abstractmethod
    def set_learning_rate(self, lr: float) -> None: ...

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write parameters and optimizer state into ``directory`` (which exists and is empty)."""

    @abstractmethod
    def restore(self, directory: Path) -> None:
        """Load what ``save`` wrote; training then continues exactly."""


def input_limits(bundle: Bundle) -> dict[str, int]:
    """Each edge input's exclusive upper bound: the embedding tables' sizes (the mask is 0 or 1).

    A model without token types (DistilBERT) takes type ids of 0 and ignores them; position ids
    count from 0 and the model adds its ``position_offset`` (RoBERTa), so fewer fit its table.
    """
    encoder = bundle.encoder
    return {"input_ids": encoder["vocab_size"], "attention_mask": 2,
            "token_type_ids": max(1, encoder["type_vocab_size"]),
            "position_ids": encoder["max_positions"] - encoder.get("position_offset", 0)}


def checked_feeds(batch: EdgeBatch, limits: dict[str, int]) -> dict[str, np.ndarray]:
    """The batch's four inputs by name, in graph order: 2-D int64 of one shape, each in ``0..limit-1``, contiguous.

    An out-of-range index would make the embedding ``Gather`` fail or read the wrong row.
    """
    feeds = batch.feeds()
    shape = batch.shape
    for name, array in feeds.items():
        if not isinstance(array, np.ndarray) or array.dtype != np.int64 or array.ndim != 2 or array.shape != shape:
            raise ValueError(f"{name} must be a 2-D int64 array of shape {shape}, "
                             f"got {getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', None)}")
        if array.size and (array.min() < 0 or array.max() >= limits[name]):
            raise ValueError(f"{name} must lie in 0..{limits[name] - 1}, got {array.min()}..{array.max()}")
    return {name: np.ascontiguousarray(array) for name, array in feeds.items()}


def checked_dz(dz: np.ndarray, *, shape: tuple[int, int], width: int) -> np.ndarray:
    """``dL/dz`` for a ``shape`` (``B×L``) batch: finite float32 ``B×L×width``, contiguous."""
    expected = (*shape, width)
    if not isinstance(dz, np.ndarray) or dz.dtype != np.float32 or dz.shape != expected:
        got_shape, dtype = getattr(dz, "shape", None), getattr(dz, "dtype", type(dz).__name__)
        raise ValueError(f"dz must be float32 of shape {expected}, got {dtype} {got_shape}")
    if not np.isfinite(dz).all():
        raise ValueError("dz holds NaN or infinite values")
    return np.ascontiguousarray(dz)


def cpu_session_options(ort, threads: int | None):
    """onnxruntime session options for the edge: ``threads`` intra-op threads, no spinning.

    Spinning is off because the edge alternates compute with waiting for the cloud: idle
    worker threads spinning after each graph would burn the cores the cloud (or a
    co-located server, or the rest of a small board) needs, for no gain between steps.
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


ENGINE_MODULES = {"ort-training": "edge_runtime.engines.ort_training", "onnx": "edge_runtime.engines.onnx_engine"}


def open_engine(bundle: Bundle, *, threads: int | None = None) -> EdgeEngine:
    """The engine the bundle was exported for, initialised from the bundle's weights (label-private:
    wrapped with the device's label head)."""
    name = bundle.manifest.engine
    module = importlib.import_module(ENGINE_MODULES[name])
    try:
        engine = module.Engine(bundle, threads=threads)
    except Exception as exc:
        # onnxruntime raises its own types; the training API wraps the same errors in RuntimeError
        if not (type(exc).__module__.startswith("onnxruntime") or "[ONNXRuntimeError]" in str(exc)):
            raise
        raise BundleError(f"bundle {bundle.root}: onnxruntime cannot load its {name} edge files "
                          f"({type(exc).__name__}: {str(exc)[:300]}); re-export the bundle") from exc
    if not bundle.label_private:
        return engine
    from edge_runtime.label_head import LabelHead, LabelPrivateEngine

    return LabelPrivateEngine(engine, LabelHead.from_bundle(bundle), bundle_hash=bundle.hash)
