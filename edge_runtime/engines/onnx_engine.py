"""The portable ``onnx`` edge engine: ahead-of-time forward and backward graphs on plain onnxruntime.

Why it exists: onnxruntime-training is deprecated and x86_64/Python ≤ 3.11 only, and its
step runs the forward twice. This engine needs only ``onnxruntime`` (any maintained
release, aarch64 included), numpy and ``safetensors``: no torch, no onnxruntime-training.
``sft-export --engine onnx`` (``exporter.aot_graphs``) writes three graphs whose parameters
are inputs; a step is

- ``forward``: ``edge/forward.onnx`` → ``z``, keeping the saved activations as onnxruntime
  values (never copied to numpy);
- ``backward(dz)``: ``edge/backward.onnx`` (saved activations + ``dz``) → the gradients,
  written by onnxruntime straight into one flat gradient buffer;
- ``optimizer_step``: numpy AdamW (``edge_runtime.adamw``) in place on one flat parameter
  buffer whose views onnxruntime reads without copying;
- ``infer``: ``edge/infer.onnx``, the forward without saved outputs, so evaluation keeps
  no activation beyond its last use.

No forward is recomputed. The graphs have symbolic batch and length, so every batch runs
at its own shape (no buckets, no padding beyond the batch's longest row). The saved
activations stay until the next ``forward`` (``backward`` may be repeated).
Sessions run with the CPU memory arena off: the arena keeps a step's freed buffers in its
own pool, which raises the peak memory; without it they go back to malloc (the edge budget
in docs/BENCHMARKS.md is measured so). Frozen weights are not copied: they are read-only views
of the bundle's weights file mapped into memory (``_map_weights``).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import fields
from pathlib import Path
from typing import ClassVar, Mapping

import numpy as np

from edge_runtime.adamw import AdamW, FlatParameters
from edge_runtime.engine import EdgeBatch, EdgeEngine, checked_dz, checked_feeds, cpu_session_options, input_limits
from edge_runtime.ort_import import onnxruntime
from splitwire.bundle import Bundle, BundleError
from splitwire.manifest import BACKWARD, DZ, EMBEDDING_TABLES, FORWARD, GRAD, INFER, WEIGHTS, Z

STATE = "edge_state.safetensors"


class AotGraphs:
    """The forward, backward and inference sessions, fed by value name. Knows nothing of optimizers or bundles."""

    def __init__(self, forward: Path, backward: Path, infer: Path, *, threads: int | None,
                 profile: Path | None = None) -> None:
        """``profile``: onnxruntime's per-node profiler writes its JSON files under this prefix
        (``end_profiling``), for ``benchmarks.edge_engines --profile``."""
        ort = onnxruntime()

        def session(path: Path, role: str):
            options = cpu_session_options(ort, threads)
            options.enable_cpu_mem_arena = False
            if profile is not None and role != INFER:
                options.enable_profiling = True
                options.profile_file_prefix = f"{profile}-{role}"  # one file per session
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        self._ort = ort
        self._forward, self._backward, self._infer = (session(forward, FORWARD), session(backward, BACKWARD),
                                                      session(infer, INFER))
        self.forward_inputs = [i.name for i in self._forward.get_inputs()]
        self.saved = [o.name for o in self._forward.get_outputs() if o.name != Z]
        self.backward_inputs = [i.name for i in self._backward.get_inputs()]
        outputs = [o.name for o in self._backward.get_outputs()]
        infer_io = [i.name for i in self._infer.get_inputs()], [o.name for o in self._infer.get_outputs()]
        if (not all(name.startswith(GRAD) for name in outputs) or Z not in [o.name for o in self._forward.get_outputs()]
                or infer_io != (self.forward_inputs, [Z])):
            raise BundleError(f"{forward.name}, {backward.name}, {infer.name} are not the graphs of this engine")
        self.gradients = [name[len(GRAD):] for name in outputs]
        self._kept: dict[str, object] = {}

    def forward(self, values: Mapping[str, np.ndarray], *, keep: bool) -> np.ndarray:
        """``z``; with ``keep`` its saved activations replace the kept ones for ``backward``, else
        the inference graph runs and nothing changes."""
        session = self._forward if keep else self._infer
        binding = session.io_binding()
        for name in self.forward_inputs:
            binding.bind_ortvalue_input(name, self._value(values[name]))
        outputs = [Z, *self.saved] if keep else [Z]
        for name in outputs:
            binding.bind_output(name, "cpu")
        if keep:
            self._kept = {}  # the previous step's activations go before this step's arrive
        session.run_with_iobinding(binding)
        results = dict(zip(outputs, binding.get_outputs()))
        if keep:
            self._kept = {name: results[name] for name in self.saved}
        return results[Z].numpy()

    def backward(self, values: Mapping[str, np.ndarray], dz: np.ndarray, gradients: Mapping[str, np.ndarray]) -> None:
        """Write ``dL/d(parameter)`` into ``gradients[parameter]`` (float32, C-contiguous, right shape)."""
        if not self._kept:
            raise RuntimeError("backward() needs a forward() first")
        binding = self._backward.io_binding()
        for name in self.backward_inputs:
            value = self._kept.get(name)
            if value is None:  # not a saved activation: dz, a parameter or a batch input
                value = self._value(dz if name == DZ else values[name])
            binding.bind_ortvalue_input(name, value)
        for name in self.gradients:
            out = gradients[name]
            binding.bind_output(GRAD + name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self._backward.run_with_iobinding(binding)

    def end_profiling(self) -> dict[str, Path]:
        """The forward's and the backward's profile files (with ``profile``), by graph role."""
        return {FORWARD: Path(self._forward.end_profiling()), BACKWARD: Path(self._backward.end_profiling())}

    def _value(self, array: np.ndarray):
        """An onnxruntime value over ``array``'s memory (no copy)."""
        return self._ort.OrtValue.ortvalue_from_numpy(array)


class Engine(EdgeEngine):
    name: ClassVar[str] = "onnx"
    loads_gradients: ClassVar[bool] = True

    def __init__(self, bundle: Bundle, threads: int | None = None) -> None:
        self._bundle = bundle
        self._width = bundle.wire_width
        self._limits = input_limits(bundle)
        self._graphs = AotGraphs(*(bundle.edge_file(r) for r in (FORWARD, BACKWARD, INFER)),
                                 threads=threads)
        frozen = set(bundle.manifest.edge.frozen)
        weights = _map_weights(bundle.edge_file(WEIGHTS), frozen=frozen)
        _check_layout(self._graphs, weights, frozen)
        self._params = FlatParameters({n: w for n, w in weights.items() if n not in frozen})  # copied: they train
        self._frozen = {n: w for n, w in weights.items() if n in frozen}  # read-only: nothing on the edge changes them
        self._grad_buffer = np.zeros_like(self._params.buffer)
        self._grads = self._params.split(self._grad_buffer)
        settings = bundle.manifest.optimizer
        self._adamw = AdamW(self._params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                            weight_decay=settings.weight_decay, moments=settings.moments,
                            lr_scales=settings.lr_scales("edge", self._params.shapes))
        self._batch: dict[str, np.ndarray] | None = None
        self._has_gradients = False

    def forward(self, batch: EdgeBatch) -> np.ndarray:
        feeds = checked_feeds(batch, self._limits)
        z = self._graphs.forward(self._values(feeds), keep=True)
        self._batch = feeds
        return z

    def infer(self, batch: EdgeBatch) -> np.ndarray:
        return self._graphs.forward(self._values(checked_feeds(batch, self._limits)), keep=False)

    def backward(self, dz: np.ndarray) -> None:
        if self._batch is None:
            raise RuntimeError("backward() needs a forward() first")
        dz = checked_dz(dz, shape=self._batch["input_ids"].shape, width=self._width)
        self._graphs.backward(self._values(self._batch), dz, self._grads)
        self._has_gradients = True

    def optimizer_step(self) -> None:
        if not self._has_gradients:
            raise RuntimeError("optimizer_step() needs a backward() first")
        self._adamw.step(self._grad_buffer)

    def gradients(self) -> dict[str, np.ndarray]:
        if not self._has_gradients:
            raise RuntimeError("no gradients yet: call backward() first")
        return {n: g.copy() for n, g in self._grads.items()}

    def load_gradients(self, gradients: dict[str, np.ndarray]) -> None:
        if set(gradients) != set(self._grads):
            raise ValueError(f"gradients must name exactly the trainable parameters; differ in "
                             f"{sorted(set(gradients) ^ set(self._grads))[:5]}")
        for name, value in gradients.items():
            if value.shape != self._grads[name].shape:
                raise ValueError(f"gradient {name!r} has shape {value.shape}, the parameter {self._grads[name].shape}")
            self._grads[name][...] = value
        self._has_gradients = True

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: p.copy() for n, p in self._params.views.items()}

    def load_parameters(self, weights: dict[str, np.ndarray]) -> None:
        for name, value in weights.items():
            self._params.views[name][...] = value

    def set_learning_rate(self, lr: float) -> None:
        self._adamw.lr = float(lr)

    def save(self, directory: Path) -> None:
        self._adamw.save(Path(directory) / STATE, metadata=self._stamp())

    def restore(self, directory: Path) -> None:
        path = Path(directory) / STATE
        if not path.is_file():
            raise ValueError(f"{directory} holds no {self.name} engine checkpoint ({STATE} is missing)")
        self._adamw.restore(path, metadata=self._stamp())
        self._batch, self._has_gradients = None, False

    def _stamp(self) -> dict[str, str]:
        return {"engine": self.name, "bundle": self._bundle.hash}

    def _values(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**self._params.views, **self._frozen, **feeds}


def _map_weights(path: Path, *, frozen: set[str]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as a read-only view of the file mapped into memory.

    Why: frozen weights are only read, so they need not be copied. Mapped pages belong to the
    page cache: under a memory cap the kernel may drop them and read them again, and the rows
    of a frozen embedding table that no batch looks up are never read at all (``sft-export
    --train-edge-layers`` is what fits 512 MiB, docs/BENCHMARKS.md). The trained weights are
    copied from these views once, into the optimizer's flat buffer. The header is checked as
    ``safe_open`` would: every tensor float32, its bytes inside the file and of its shape's size.
    """
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        (length,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8:8 + length])
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        start = 8 + length
        out = {}
        for name, entry in sorted(header.items()):
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or entry.get("dtype") != "F32":
                raise BundleError(f"{path}: edge weights must be float32, {name!r} is not")
            begin, end = entry["data_offsets"]
            shape = tuple(int(n) for n in entry["shape"])
            if not 0 <= begin <= end <= len(mapped) - start or end - begin != 4 * math.prod(shape):
                raise BundleError(f"{path}: edge weight {name!r} has bytes {begin}..{end} that do not fit "
                                  f"its shape {shape} or the file")
            out[name] = np.frombuffer(mapped, np.float32, math.prod(shape), start + begin).reshape(shape)
            if name in frozen and name in EMBEDDING_TABLES:  # looked up row by row: no read-ahead of the table
                first = (start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_RANDOM, first, start + end - first)
        return out
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: not a safetensors file: {exc}") from None


def _check_layout(graphs: AotGraphs, weights: dict[str, np.ndarray], frozen: set[str]) -> None:
    """The graphs' parameter inputs are the weights file's tensors; gradients exist for exactly the trainable ones."""
    parameters = set(graphs.forward_inputs) - {f.name for f in fields(EdgeBatch)}
    trainable = set(weights) - frozen
    if parameters != set(weights) or set(graphs.gradients) != trainable or not frozen <= set(weights):
        raise BundleError(
            "the onnx graphs do not fit the bundle's weights: graph parameters "
            f"{sorted(parameters ^ set(weights))[:5]} differ, gradients "
            f"{sorted(set(graphs.gradients) ^ trainable)[:5]} "
            "differ from the trainable parameters"
        )
