"""Build the ``ort-training`` engine's edge files with onnxruntime-training's artifact generator.

Why it exists: onnxruntime-training can train an ONNX graph on the device, but has no
"back-propagate this upstream gradient" call (onnxruntime's GitHub issue 16232). This
recipe, whose gradients tests/test_edge_engines.py compares with torch's, turns the traced
edge graph into training artifacts anyway:

- the loss is ``ReduceSum(z · g)`` with ``g`` a graph input shaped like ``z``, so its
  parameter gradients are exactly ``J(z)ᵀ g``, the chain rule with the cloud's ``dL/dz``;
- LayerNorm's optional ``Mean``/``InvStdDev`` outputs are exposed first (the gradient
  builder needs them, onnxruntime's GitHub issue 19427);
- AdamW is built with torch semantics (``adam_mode=0``; the stock block hard-codes the
  Hugging Face variant) and the manifest's eps and weight decay; the optimizer graph is
  stamped with IR version 10, which onnxruntime 1.19 accepts;
- the generated eval graph, which still computes the loss and wants a dummy ``g``, is cut
  down to the ``z``-only forward that the engine runs for the first pass of a step.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import onnx
from onnxruntime.training import artifacts, onnxblock
from onnxruntime.training.onnxblock.optim.optim import AdamWOptimizer

from exporter.onnx_graph import OUTPUT, trace_edge
from exporter.progress import timed
from models import EdgePart
from splitwire import manifest

UPSTREAM_GRADIENT = "g"
OPTIMIZER_IR_VERSION = 10
_NATIVE_INFO = re.compile(r"\[[IV]:onnxruntime:")
FILES = manifest.ENGINE_FILES["ort-training"]  # role → bundle path, named as generate_artifacts names them
NAMES = {role: Path(path).name for role, path in FILES.items()}


class UpstreamGradientLoss(onnxblock.Block):
    """``loss = Σ z·g``: its gradient w.r.t. the parameters is the vector–Jacobian product ``J(z)ᵀ g``."""

    def build(self, z: str) -> str:
        g = onnxblock.blocks.InputLike(z)(UPSTREAM_GRADIENT)
        return onnxblock.blocks.ReduceSum(keepdims=False)(onnxblock.blocks.Mul()(z, g))


class _TorchAdamWNode(AdamWOptimizer):
    def _build_optimizer_node(self, input_names, output_name, node_name, node_attributes):  # type: ignore[override]
        return super()._build_optimizer_node(input_names, output_name, node_name, {**node_attributes, "adam_mode": 0})


class TorchAdamW(onnxblock.optim.AdamW):
    """AdamW with ``torch.optim.AdamW`` semantics (decoupled decay ``θ ← θ − lr·λ·θ``, eps outside the root)."""

    def __init__(self, *, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        super().__init__(betas=betas, eps=eps, weight_decay=weight_decay)
        self._adamw = _TorchAdamWNode(betas=betas, eps=eps, weight_decay=weight_decay)


def expose_layer_norm_statistics(model: onnx.ModelProto) -> int:
    """Give every ``LayerNormalization`` its optional ``Mean`` and ``InvStdDev`` outputs; returns how many."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.name}.mean", f"{node.name}.inv_std_dev"])
            count += 1
    return count


def cut_to_forward(model: onnx.ModelProto, *, output: str = OUTPUT) -> onnx.ModelProto:
    """Keep only the nodes and inputs that ``output`` depends on (drops the loss and ``g``)."""
    graph = model.graph
    needed, nodes = {output}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(node.input)
    kept_inputs = [i for i in graph.input if i.name in needed]
    kept_outputs = [o for o in graph.output if o.name == output]
    del graph.node[:], graph.input[:], graph.output[:]
    graph.node.extend(reversed(nodes))
    graph.input.extend(kept_inputs)
    graph.output.extend(kept_outputs)
    onnx.checker.check_model(model)
    return model


def write_edge_files(
    edge: EdgePart,
    *,
    out_dir: Path,
    frozen: list[str],
    optimizer: dict,
    max_length: int,
    log: Callable[[str], None],
) -> dict[str, str]:
    """Write training/eval/optimizer graphs and the checkpoint under ``out_dir/edge``.

    ``out_dir`` is the bundle root; returns role → path relative to it.
    """
    with timed(log, "tracing the edge part (TorchScript exporter, opset 17, training mode)"):
        model = trace_edge(edge, max_length=max_length)
    log(f"traced {len(model.graph.node)} nodes; "
        f"{expose_layer_norm_statistics(model)} LayerNorms expose their statistics")
    target = Path(out_dir) / manifest.EDGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    names = list(edge.state_dict())
    unknown = sorted(set(frozen) - set(names))
    if unknown:
        raise ValueError(f"cannot freeze {unknown}: the edge part has no such parameters")
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch, timed(log, "generating onnxruntime-training artifacts"):
        with _without_native_info_logs():
            artifacts.generate_artifacts(
                model,
                requires_grad=[n for n in names if n not in frozen],
                frozen_params=list(frozen),
                loss=UpstreamGradientLoss(),
                optimizer=TorchAdamW(
                    betas=tuple(optimizer["betas"]), eps=optimizer["eps"], weight_decay=optimizer["weight_decay"]
                ),
                artifact_directory=scratch,
                additional_output_names=[OUTPUT],
            )
        _finish(Path(scratch), target)
    log(f"{len(names) - len(frozen)} trainable and {len(frozen)} frozen tensors")
    return dict(FILES)


def _finish(scratch: Path, target: Path) -> None:
    """Cut the eval graph, stamp the optimizer's IR version, move everything into ``target``."""
    eval_model = cut_to_forward(onnx.load(scratch / NAMES[manifest.EVAL_MODEL]))
    onnx.save(eval_model, target / NAMES[manifest.EVAL_MODEL])
    optimizer_model = onnx.load(scratch / NAMES[manifest.OPTIMIZER_MODEL])
    optimizer_model.ir_version = OPTIMIZER_IR_VERSION
    onnx.save(optimizer_model, target / NAMES[manifest.OPTIMIZER_MODEL])
    for role in (manifest.TRAINING_MODEL, manifest.CHECKPOINT):
        (scratch / NAMES[role]).replace(target / NAMES[role])


@contextmanager
def _without_native_info_logs() -> Iterator[None]:
    """The C++ gradient builder logs every graph transformer at info level, straight to file
    descriptor 2; pass its warnings and errors on, drop the info lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if not _NATIVE_INFO.search(line):
                    print(line, file=sys.stderr)
