"""The edge's peak memory in a training step, estimated from the bundle alone.

Why it exists: a small board fails late and badly when the edge half does not fit (the
kernel kills the process mid-epoch); ``sft-edge doctor`` and ``benchmarks/edge_budget.py``
answer before a run, from the manifest and the weight shapes, without loading the engine.

The memory estimate, in bytes, for ``B`` rows of ``L`` tokens, ``H`` hidden units and ``k``
edge layers (``split``; the last one is its attention block only)::

    peak ≈ runtime + 4·(P + T) + 2·m·T + e·4·W + c·B·L·H·a
    resident ≈ peak − 4·(P − T) + 4·F        (onnx engine; ort-training: resident = peak)

``P`` edge parameters (float32), ``T`` of them trained (a float32 gradient and two AdamW moments
of ``m`` bytes each: 4, or 2 with ``sft-export --edge-moments bf16``),
``W`` elements of the word-embedding table when it is trained (backward scratch for its
dense gradient: the ``onnx`` engine materialises it), ``runtime`` the interpreter,
onnxruntime and the sessions, ``c`` activation bytes saved and worked on per ``B·L·H`` per
layer, ``a`` the layers whose activations the step holds: all ``k`` when every layer trains; with
``--train-edge-layers N`` (``N < k``) the ``N`` trained ones, whose activations the backward keeps,
plus ``f`` for the frozen layers below, whose forward keeps nothing but the layer it is in (``f``
from one measured peak: bert-base split 4, ``--train-edge-layers 1``, onnx; a guess of 1 for
ort-training). ``runtime``, ``e`` and ``c`` are calibrated per engine by ``benchmarks/edge_budget.py``
on measured peak RSS (bert-base splits 2/4/6, with and without frozen embeddings, and MiniLM
split 3, batch 8 × length 128, 1 and 2 threads, glibc's default allocator): least squares,
then ``runtime`` raised until no measured peak exceeds its estimate, so the estimate errs
high (onnxruntime-training's memory arena grows in steps, not linearly; docs/BENCHMARKS.md
lists each estimate beside its measured peak). The ``B·L·H`` term is linear in the length; attention's ``L²`` part is
folded in at ``L`` = 128, so much longer sequences are underestimated somewhat.

``resident`` is what a memory cap must leave room for (``sft-edge doctor`` checks it): the
``onnx`` engine maps its ``P − T`` frozen weights from the bundle's file instead of copying
them, so they are page cache that the kernel can reclaim and read again, all but ``F``, the
largest frozen layer, which one forward reads at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from safetensors import safe_open

from splitwire.bundle import Bundle
from splitwire.manifest import EMBEDDING_TABLES, WEIGHTS

MIB = 1 << 20
MOMENT_BYTES = {"fp32": 4, "bf16": 2}  # splitwire.manifest.MOMENT_DTYPES


@dataclass(frozen=True)
class Calibration:
    """One engine's constants of the peak-memory estimate (see the module docstring)."""

    runtime_bytes: int
    activation: float  # c: bytes per B·L·H per edge layer
    embedding_scratch: float  # e: float32 copies of the trained word-embedding table in backward
    frozen_forward: float  # f: layers' worth of activations the frozen layers' forward adds (--train-edge-layers)


# Fitted by `python -m benchmarks.edge_budget` (docs/bench/edge_budget.md; rounded up); update from its output.
CALIBRATION = {
    "ort-training": Calibration(runtime_bytes=188 * MIB, activation=99.0, embedding_scratch=0.75, frozen_forward=1.0),
    "onnx": Calibration(runtime_bytes=114 * MIB, activation=135.0, embedding_scratch=1.8, frozen_forward=0.5),
}


@dataclass(frozen=True)
class EdgeSize:
    """What the edge half holds in memory: its parameters and the shape of its activations."""

    engine: str
    parameters: int
    trained: int
    embeddings_trained: int  # elements of the EMBEDDING_TABLES that are trained
    word_embeddings_trained: int
    hidden: int
    layers: int
    trained_layers: int  # the top edge layers that train (``layers`` unless --train-edge-layers)
    moment_bytes: int  # bytes per AdamW moment element: 4 (float32) or 2 (bfloat16)
    head_parameters: int  # the compression head's (trained whatever the layers do)
    layer_parameters: tuple[int, ...]  # per edge layer, bottom first (the split layer's attention block last)

    @classmethod
    def of(cls, bundle: Bundle) -> "EdgeSize":
        """From the manifest and the edge weights file's header (no tensor is read)."""
        with safe_open(str(bundle.edge_file(WEIGHTS)), framework="np") as f:
            sizes = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}
        trained = {name: n for name, n in sizes.items() if name not in set(bundle.manifest.edge.frozen)}
        layers = int(bundle.split["split"])
        trained_layers = bundle.manifest.edge.trained_layers
        blocks = [f"layers.{i}." for i in range(layers - 1)] + ["split_attention."]
        return cls(
            engine=bundle.manifest.engine,
            parameters=sum(sizes.values()),
            trained=sum(trained.values()),
            embeddings_trained=sum(trained.get(name, 0) for name in EMBEDDING_TABLES),
            word_embeddings_trained=trained.get(EMBEDDING_TABLES[0], 0),
            hidden=int(bundle.encoder["hidden_size"]),
            layers=layers,
            trained_layers=layers if trained_layers is None else trained_layers,
            moment_bytes=MOMENT_BYTES[bundle.manifest.optimizer.moments],
            head_parameters=sum(n for name, n in sizes.items() if name.startswith("head.")),
            layer_parameters=tuple(sum(n for name, n in sizes.items() if name.startswith(b)) for b in blocks),
        )

    def with_frozen_embeddings(self) -> "EdgeSize":
        """The same edge exported with ``--freeze-embeddings``."""
        return replace(self, trained=self.trained - self.embeddings_trained, embeddings_trained=0,
                       word_embeddings_trained=0)

    def with_trained_layers(self, n: int) -> "EdgeSize":
        """The same edge exported with ``--train-edge-layers n`` (``n`` below the layers it trains now)."""
        top = self.layer_parameters[len(self.layer_parameters) - n:] if n else ()
        return replace(self, trained=self.head_parameters + sum(top), embeddings_trained=0,
                       word_embeddings_trained=0, trained_layers=n)

    def with_bf16_moments(self) -> "EdgeSize":
        """The same edge exported with ``--edge-moments bf16``."""
        return replace(self, moment_bytes=MOMENT_BYTES["bf16"])

    @property
    def activation_layers(self) -> float:
        """``a``: the layers' worth of activations a step holds (see the module docstring)."""
        if self.trained_layers >= self.layers:
            return self.layers
        return self.trained_layers + CALIBRATION[self.engine].frozen_forward

    def peak_bytes(self, *, batch: int, length: int) -> int:
        """Estimated peak resident memory of one training step at ``batch × length``."""
        c = CALIBRATION[self.engine]
        weights = 4 * (self.parameters + self.trained) + 2 * self.moment_bytes * self.trained
        scratch = c.embedding_scratch * 4 * self.word_embeddings_trained
        activations = c.activation * batch * length * self.hidden * self.activation_layers
        return int(c.runtime_bytes + weights + scratch + activations)

    def resident_bytes(self, *, batch: int, length: int) -> int:
        """What a step needs in memory under a cap: the peak, less the frozen weights that the ``onnx`` engine
        maps from the bundle instead of copying (page cache, which the kernel reclaims and reads again) but for
        the largest frozen layer, which a forward reads at once. ``ort-training`` copies every weight."""
        peak = self.peak_bytes(batch=batch, length=length)
        if self.engine != "onnx":
            return peak
        frozen_layers = self.layer_parameters[:self.layers - self.trained_layers]
        return peak - 4 * (self.parameters - self.trained) + 4 * max(frozen_layers, default=0)

    def checkpoint_bytes(self) -> int:
        """One edge checkpoint: ``onnx`` saves trained parameters and moments, ``ort-training`` all parameters too."""
        if self.engine == "onnx":
            return (4 + 2 * self.moment_bytes) * self.trained
        return 4 * (self.parameters + 2 * self.trained)
