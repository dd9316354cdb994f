"""The label-private (U-shaped) split's top on the device: the pooling layer, the classifier and the loss.

Why it exists: with ``sft-export --label-private`` the labels, the loss and the logits never leave
the device. The cloud sends down the pooled top output ``p`` (``B×hidden``: the top encoder layer's
output at the pooled position, or the mean over the real tokens); this head turns it into logits as
``models.split.LabelHead`` does (the family's dense layer and activation, none for mean pooling,
then the classifier), computes the loss and the metrics against the device's own labels, and gives
``dL/dp`` to send back up. It is two dense layers and the same for both engines, so it runs in numpy
with its backward written out (tests/test_label_private.py checks it against torch's autograd) and
trains with the edge's numpy AdamW (``edge_runtime.adamw``) at the run's learning rate. Like the edge
part, it runs without dropout.

``LabelPrivateEngine`` wraps the bundle's engine with the head: ``optimizer_step``, ``parameters``
and ``save``/``restore`` cover both, so checkpoints, resume and rewind need nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from edge_runtime.adamw import AdamW, FlatParameters
from edge_runtime.engine import EdgeBatch, EdgeEngine
from splitwire.bundle import Bundle, BundleError
from splitwire.manifest import LABEL_HEAD

PREFIX = "label_head."  # the head's parameters among the engine's, by ``models.split.LabelHead``'s names
STATE = "label_head_state.safetensors"  # in a saved engine directory
ACTIVATIONS = {"cls-pooler": "tanh", "cls-tanh": "tanh", "cls-gelu": "gelu", "cls-relu": "relu", "mean": None}
_erf = np.vectorize(math.erf, otypes=[np.float64])


@dataclass(frozen=True)
class HeadStep:
    """The device's half of a label-private step: the batch's mean loss, its metrics and ``dL/dpooled``."""

    loss: float
    metrics: dict[str, float]
    dpooled: np.ndarray


def _activate(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``act(x)`` and ``act'(x)`` (GELU: the exact, erf one, as ``torch.nn.GELU``)."""
    if name == "tanh":
        y = np.tanh(x)
        return y, 1.0 - y * y
    if name == "relu":
        return np.maximum(x, 0.0), (x > 0).astype(x.dtype)
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    density = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2.0 * math.pi)
    return (x * cdf).astype(x.dtype), (cdf + x * density).astype(x.dtype)


def task_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean loss and ``dL/dlogits``: cross-entropy for classes, squared error for one output (regression)."""
    batch = logits.shape[0]
    if logits.shape[1] == 1:
        error = logits[:, 0] - labels.astype(np.float32)
        return float(np.mean(error.astype(np.float64) ** 2)), (2.0 * error / batch)[:, None].astype(np.float32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(batch), labels.astype(np.int64)
    loss = float(-np.mean((shifted - log_norm)[rows].astype(np.float64)))
    dlogits = np.exp(shifted - log_norm)
    dlogits[rows] -= 1.0
    return loss, (dlogits / batch).astype(np.float32)


def step_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What the cloud reports in the standard split, computed here: correct answers or squared error, and the count."""
    count = float(labels.shape[0])
    if logits.shape[1] == 1:
        return {"squared_error": float(((logits[:, 0] - labels) ** 2).sum()), "count": count}
    return {"correct": float((logits.argmax(axis=1) == labels).sum()), "count": count}


class LabelHead:
    """``models.split.LabelHead`` in numpy, trained with AdamW: ``backward`` takes the pooled output and
    the labels, keeps the head's gradients and returns ``dL/dpooled``; ``optimizer_step`` applies them."""

    def __init__(self, weights: dict[str, np.ndarray], *, pooling: str, num_labels: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        if pooling not in ACTIVATIONS:
            raise BundleError(f"the label head knows no pooling {pooling!r}")
        self.activation = ACTIVATIONS[pooling]
        hidden = weights.get("classifier.weight", np.zeros((0, 0))).shape[-1]
        shapes = {"classifier.weight": (num_labels, hidden), "classifier.bias": (num_labels,)}
        if self.activation is not None:
            shapes |= {"dense.weight": (hidden, hidden), "dense.bias": (hidden,)}
        got = {name: tuple(w.shape) for name, w in weights.items()}
        if got != shapes or any(w.dtype != np.float32 for w in weights.values()):
            raise BundleError(f"the label head's weights must be float32 {shapes}, got {got}")
        self.hidden = hidden
        self._params = FlatParameters(weights)
        self._grad_buffer = np.zeros_like(self._params.buffer)
        self._grads = self._params.split(self._grad_buffer)
        self._adamw = AdamW(self._params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._has_gradients = False

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "LabelHead":
        with safe_open(str(bundle.edge_file(LABEL_HEAD)), framework="np") as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}
        opt = bundle.manifest.optimizer
        return cls(weights, pooling=bundle.encoder.get("pooling", "cls-pooler"), num_labels=bundle.num_labels,
                   lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)

    def _forward(self, pooled: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The dense layer's pre-activation (None for mean pooling), the classifier's input, the logits."""
        if pooled.ndim != 2 or pooled.shape[1] != self.hidden or pooled.dtype != np.float32:
            raise ValueError(f"the pooled output must be float32 B×{self.hidden}, got {pooled.dtype} {pooled.shape}")
        p = self._params.views
        pre, x = None, pooled
        if self.activation is not None:
            pre = pooled @ p["dense.weight"].T + p["dense.bias"]
            x = _activate(self.activation, pre)[0]
        return pre, x, x @ p["classifier.weight"].T + p["classifier.bias"]

    def logits(self, pooled: np.ndarray) -> np.ndarray:
        """``B×num_labels`` logits for evaluation and prediction; nothing is kept."""
        return self._forward(pooled)[2]

    def backward(self, pooled: np.ndarray, labels: np.ndarray) -> HeadStep:
        """Loss, metrics and ``dL/dpooled`` of one batch; the head's gradients replace earlier ones."""
        pre, x, logits = self._forward(pooled)
        loss, dlogits = task_loss(logits, labels)
        p, g = self._params.views, self._grads
        g["classifier.weight"][...] = dlogits.T @ x
        g["classifier.bias"][...] = dlogits.sum(axis=0)
        dx = dlogits @ p["classifier.weight"]
        if pre is not None:
            dx = dx * _activate(self.activation, pre)[1]
            g["dense.weight"][...] = dx.T @ pooled
            g["dense.bias"][...] = dx.sum(axis=0)
            dx = dx @ p["dense.weight"]
        self._has_gradients = True
        return HeadStep(loss, step_metrics(logits, labels), np.ascontiguousarray(dx, dtype=np.float32))

    def optimizer_step(self) -> None:
        if not self._has_gradients:
            raise RuntimeError("optimizer_step() needs a backward() first")
        self._adamw.step(self._grad_buffer)

    def set_learning_rate(self, lr: float) -> None:
        self._adamw.lr = float(lr)

    def parameters(self) -> dict[str, np.ndarray]:
        return {PREFIX + n: w.copy() for n, w in self._params.views.items()}

    def gradients(self) -> dict[str, np.ndarray]:
        return {PREFIX + n: w.copy() for n, w in self._grads.items()}

    def load_parameters(self, weights: dict[str, np.ndarray]) -> None:
        """Overwrite the parameters named (with ``PREFIX``) in ``weights``; the moments stay."""
        for name, value in weights.items():
            self._params.views[name[len(PREFIX):]][...] = value

    def save(self, path: Path, *, stamp: dict[str, str]) -> None:
        self._adamw.save(path, metadata=stamp)

    def restore(self, path: Path, *, stamp: dict[str, str]) -> None:
        if not path.is_file():
            raise ValueError(f"{path.parent} holds no label head checkpoint ({path.name} is missing)")
        self._adamw.restore(path, metadata=stamp)
        self._has_gradients = False


class LabelPrivateEngine(EdgeEngine):
    """The bundle's engine for the bottom (embeddings … compression head) and the ``LabelHead`` on top."""

    def __init__(self, bottom: EdgeEngine, head: LabelHead, *, bundle_hash: str) -> None:
        self.bottom = bottom
        self.label_head = head
        self.name = bottom.name
        self._stamp = {"label_head": "numpy", "bundle": bundle_hash}

    def forward(self, batch: EdgeBatch) -> np.ndarray:
        return self.bottom.forward(batch)

    def backward(self, dz: np.ndarray) -> None:
        self.bottom.backward(dz)

    def optimizer_step(self) -> None:
        self.bottom.optimizer_step()
        self.label_head.optimizer_step()

    def infer(self, batch: EdgeBatch) -> np.ndarray:
        return self.bottom.infer(batch)

    def gradients(self) -> dict[str, np.ndarray]:
        return self.bottom.gradients() | self.label_head.gradients()

    def parameters(self) -> dict[str, np.ndarray]:
        return self.bottom.parameters() | self.label_head.parameters()

    def load_parameters(self, weights: dict[str, np.ndarray]) -> None:
        self.bottom.load_parameters({n: w for n, w in weights.items() if not n.startswith(PREFIX)})
        self.label_head.load_parameters({n: w for n, w in weights.items() if n.startswith(PREFIX)})

    def set_learning_rate(self, lr: float) -> None:
        self.bottom.set_learning_rate(lr)
        self.label_head.set_learning_rate(lr)

    def save(self, directory: Path) -> None:
        self.bottom.save(directory)
        self.label_head.save(Path(directory) / STATE, stamp=self._stamp)

    def restore(self, directory: Path) -> None:
        self.bottom.restore(directory)
        self.label_head.restore(Path(directory) / STATE, stamp=self._stamp)
