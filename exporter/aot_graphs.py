"""Build the portable ``onnx`` engine's edge files: ahead-of-time forward and backward graphs.

Why it exists: onnxruntime-training is deprecated (no aarch64 or Python ≥ 3.12 wheels) and
cannot back-propagate an upstream gradient, so its step recomputes the forward. Plain,
maintained onnxruntime runs a training step if the edge part's forward and backward are
two ordinary ONNX graphs:

- ``edge/forward.onnx``: parameters + ``EDGE_INPUTS`` → ``z`` and the activations the
  backward needs (``saved.N``);
- ``edge/backward.onnx``: those activations, the parameters and inputs the backward
  reads, and ``dz`` (``dL/dz``) → ``grad.<name>`` for every trainable parameter (a frozen
  parameter gets no gradient and none of its work is in the graph);
- ``edge/infer.onnx``: the forward with ``z`` as its only output, for evaluation, so that
  no activation outlives its last use (the saved activations of a training forward grow
  with the batch).

How: AOTAutograd traces the joint forward+backward of ``EdgePart`` once (through
``torch.compile`` with a backend that only captures), decomposing to the ATen operators
that torch.onnx's function library implements, and the min-cut rematerialisation
partitioner splits it into the two FX graphs. Each FX graph is translated to ONNX as it
is, by torch.onnx's own translator (``torch.onnx._internal``, torch 2.13): going through
``torch.onnx.export`` instead would re-trace each graph twice more (``torch.export`` and
its decompositions), tripling the export time, for the same ONNX graph. Parameters are
graph inputs, not initializers, so the files are small and the engine owns the weights.

Shapes: captured symbolically, not in buckets. The trace runs with a symbolic batch ``B``
and length ``L`` (``dynamic=True``), so one pair of graphs serves every ``B×L`` up to the
model's positions: no padding compute, no per-shape files. The sizes that the two FX
graphs pass between them (``B``, ``B·L``, ``heads·B``) become size computations on a
tensor input (``attention_mask`` forward and inference, ``dz`` backward), so the ONNX graphs take
tensors only. Because a shape-specialised graph would be silently wrong at other shapes,
the export runs the graphs with onnxruntime at a second shape (``max_length``, with
padding) and compares ``z`` and every gradient with PyTorch autograd.

Cost of that choice: the graph files are small and shape-independent, the export is slower
than ort-training's (the symbolic trace dominates), and a step costs what its own shape
costs, where a bucket would charge its full length (``benchmarks/edge_engines.py`` measures
the steps, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import sympy
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec
from torch.export.graph_signature import TensorArgument

from edge_runtime.engines.onnx_engine import AotGraphs
from models import EdgePart
from splitwire.manifest import BACKWARD, DZ, EDGE_DIR, EDGE_INPUTS, ENGINE_FILES, FORWARD, GRAD, INFER, SAVED, Z

FILES = ENGINE_FILES["onnx"]
CAPTURE_SHAPE = (2, 3)  # B ≠ L, both > 1: sizes 0 and 1 would be specialised, equal sizes merged
CHECK_ROWS = 3
CHECK_TOLERANCE = 1e-3  # gross-error check: max |ort − torch| ≤ tol · max |torch| (+ tol · gradient scale)

Log = Callable[[str], None]


def write_edge_files(
    edge: EdgePart, *, out_dir: Path, frozen: list[str], optimizer: dict, max_length: int, log: Log
) -> dict[str, str]:
    """Write the forward, backward and inference graphs under ``out_dir``; return role → relative path.

    ``optimizer`` is accepted for the builders' common signature: this engine's AdamW runs in
    numpy on the device and reads its settings from the manifest.
    """
    del optimizer
    translator = OnnxTranslator()
    capture = capture_graphs(edge, frozen=frozen, decompositions=translator.decompositions)
    log(f"captured forward ({len(capture.forward.graph.nodes)} nodes) and backward "
        f"({len(capture.backward.graph.nodes)} nodes) with symbolic batch and length")
    (out_dir / EDGE_DIR).mkdir(parents=True, exist_ok=True)
    graphs = {FORWARD: forward_graph(capture, saved=True), BACKWARD: backward_graph(capture),
              INFER: forward_graph(capture, saved=False)}
    for role, graph in graphs.items():
        translator.save(graph, out_dir / FILES[role])
    error = check_graphs(capture.edge, out_dir, length=max_length)
    log(f"onnx graphs match torch at batch {CHECK_ROWS} × length {max_length} (max relative error {error:.1e})")
    return dict(FILES)


@dataclass
class Capture:
    """The partitioned AOT graphs of one ``EdgePart`` and what their placeholders are."""

    edge: EdgePart  # the traced copy, frozen parameters with requires_grad=False
    forward: fx.GraphModule
    backward: fx.GraphModule
    forward_args: list  # fake tensors and SymInts, one per forward placeholder
    backward_args: list
    primals: list[str | None]  # forward placeholder → parameter or input name (None: a size)
    batch: sympy.Symbol
    length: sympy.Symbol


def capture_graphs(edge: EdgePart, *, frozen: list[str], decompositions: dict) -> Capture:
    """Trace ``edge``'s forward and backward with AOTAutograd at symbolic ``B×L``."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    edge = _trainable_copy(edge, frozen)
    example = example_inputs(edge, *CAPTURE_SHAPE)
    graphs: dict[str, tuple[fx.GraphModule, list]] = {}

    def keep(role: str):
        def compiler(gm: fx.GraphModule, args: list):
            graphs[role] = gm, list(args)
            return make_boxed_func(gm)
        return compiler

    autograd = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                            partition_fn=min_cut_rematerialization_partition, decompositions=decompositions)
    sources: list = []

    def backend(gm: fx.GraphModule, args: list):  # the last call's graph is the one that runs
        sources[:] = [n.meta["grapharg"].example for n in gm.graph.nodes if n.op == "placeholder"]
        return autograd(gm, args)

    torch._dynamo.reset()  # a fresh trace: no cached graph of another EdgePart, no recompile limit
    # Float attributes (LayerNorm eps) stay constants: made symbolic, they force a second trace.
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(edge, backend=backend, dynamic=True, fullgraph=True)
        compiled(*example.values()).sum().backward()
    torch._dynamo.reset()
    edge.zero_grad(set_to_none=True)
    names = {id(t): n for n, t in (*edge.named_parameters(), *example.items())}
    primals = [names.get(id(s)) for s in sources]
    (forward, forward_args), (backward, backward_args) = graphs["forward"], graphs["backward"]
    ignored = {"token_type_ids"} if edge.embeddings.token_type is None else set()  # DistilBERT: the trace drops it
    if len(primals) != len(forward_args) or set(names.values()) - set(primals) - ignored:
        raise RuntimeError("cannot name the forward graph's inputs: the trace lifted parameters differently")
    batch, length = _symbols(forward_args[primals.index("attention_mask")])
    return Capture(edge, forward, backward, forward_args, backward_args, primals, batch, length)


def _trainable_copy(edge: EdgePart, frozen: list[str]) -> EdgePart:
    if any(getattr(m, p, 0.0) > 0.0 for m in edge.modules() for p in ("p_drop", "p_drop_probs")):
        raise ValueError("the edge part must have no dropout: its graphs are captured once, without randomness")
    edge = copy.deepcopy(edge).train()
    params = dict(edge.named_parameters())
    unknown = sorted(set(frozen) - set(params))
    if unknown:
        raise ValueError(f"frozen parameters {unknown} are not parameters of the edge part")
    for name, p in params.items():
        p.requires_grad_(name not in frozen)
    return edge


def example_inputs(edge: EdgePart, batch: int, length: int) -> dict[str, torch.Tensor]:
    """``EDGE_INPUTS`` of ``batch × length`` with the last row half padding (pad id, mask 0)."""
    embeddings = edge.embeddings
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(1, embeddings.word.num_embeddings, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, max(1, length // 2):] = 0
    types = 1 if embeddings.token_type is None else embeddings.token_type.num_embeddings  # DistilBERT: none
    token_types = torch.randint(0, types, (batch, length), generator=generator)
    values = (
        torch.where(mask == 1, ids, embeddings.word.padding_idx or 0),
        mask,
        token_types * mask,
        torch.arange(length).expand(batch, length).contiguous(),
    )
    return dict(zip(EDGE_INPUTS, values))


def _symbols(mask: torch.Tensor) -> tuple[sympy.Symbol, sympy.Symbol]:
    dims = [d.node.expr if isinstance(d, torch.SymInt) else d for d in mask.shape]
    if not all(isinstance(d, sympy.Symbol) for d in dims) or dims[0] == dims[1]:
        raise RuntimeError(f"the trace specialised the batch or length (attention_mask is {dims}); "
                           "the graphs would not serve other shapes")
    return dims[0], dims[1]


@dataclass
class NamedGraph:
    """An FX graph with tensor inputs only, and the ONNX names of its inputs and outputs."""

    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]


def forward_graph(capture: Capture, *, saved: bool) -> NamedGraph:
    """Parameters + ``EDGE_INPUTS`` → ``z`` (+ ``saved.N`` if ``saved``; sizes and passed-through inputs dropped)."""
    names = _forward_output_names(capture)
    outputs = [i for i, name in enumerate(names) if i == 0 or saved and name and name.startswith(SAVED)]
    return _named_graph(capture, capture.forward, capture.forward_args, capture.primals, "attention_mask",
                        outputs, [names[i] for i in outputs])


def backward_graph(capture: Capture) -> NamedGraph:
    """Saved activations, parameters and inputs it reads, ``dz`` → ``grad.<parameter>``."""
    forward_nodes = capture.forward.graph.output_node().args[0]
    by_node = dict(zip((n.name for n in forward_nodes), _forward_output_names(capture)))
    placeholders = [n.name for n in capture.backward.graph.nodes if n.op == "placeholder"]
    names = [by_node.get(p, DZ if p.startswith("tangents") else None) for p in placeholders]
    unknown = [p for p, n, a in zip(placeholders, names, capture.backward_args)
               if n is None and not isinstance(a, torch.SymInt)]
    if unknown or names.count(DZ) != 1:
        raise RuntimeError(f"cannot match the backward graph's inputs {unknown or placeholders} to forward outputs")
    gradients = capture.backward.graph.output_node().args[0]
    outputs = [i for i, g in enumerate(gradients) if g is not None]
    grad_names = [f"{GRAD}{capture.primals[i]}" for i in outputs]
    trainable = [f"{GRAD}{n}" for n, p in capture.edge.named_parameters() if p.requires_grad]
    if sorted(grad_names) != sorted(trainable):
        raise RuntimeError(f"the backward graph computes {grad_names}, expected {trainable}")
    return _named_graph(capture, capture.backward, capture.backward_args, names, DZ, outputs, grad_names)


def _forward_output_names(capture: Capture) -> list[str | None]:
    """ONNX name of each forward output: ``z``, a parameter or input passed through, ``saved.N``, or None (a size)."""
    placeholders = [n for n in capture.forward.graph.nodes if n.op == "placeholder"]
    nodes = capture.forward.graph.output_node().args[0]
    names: list[str | None] = [Z]
    for i, node in enumerate(nodes[1:], 1):
        if isinstance(node.meta.get("val"), torch.SymInt):
            names.append(None)
        elif node is nodes[0]:
            names.append(Z)
        elif node.op == "placeholder":
            names.append(capture.primals[placeholders.index(node)])
        else:
            names.append(f"{SAVED}{i}")
    return names


def _named_graph(capture: Capture, gm: fx.GraphModule, args: list, names: list[str | None], sizes_from: str,
                 outputs: list[int], output_names: list[str]) -> NamedGraph:
    """A copy of ``gm`` whose size placeholders are computed from input ``sizes_from``'s first two dims."""
    gm = copy.deepcopy(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    reference = names.index(sizes_from)
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        sizes = {
            symbol: _size_node(graph, torch.ops.aten.sym_size.int, (placeholders[reference], dim),
                               args[reference].shape[dim])
            for dim, symbol in enumerate((capture.batch, capture.length))
        }
        for placeholder, arg in zip(placeholders, args):
            if isinstance(arg, torch.SymInt):
                placeholder.replace_all_uses_with(_size_expression(graph, arg.node.expr, sizes))
                graph.erase_node(placeholder)
    output = graph.output_node()
    output.args = (tuple(output.args[0][i] for i in outputs),)
    graph.eliminate_dead_code()
    gm.recompile()
    inputs = [name for name, arg in zip(names, args) if not isinstance(arg, torch.SymInt)]
    return NamedGraph(gm, inputs, output_names)


def _size_node(graph: fx.Graph, target, args: tuple, value) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = value
    return node


def _size_expression(graph: fx.Graph, expr: sympy.Expr, sizes: dict[sympy.Symbol, fx.Node]) -> fx.Node | int:
    """Nodes computing a size expression (sums and products of ``B``, ``L`` and integers)."""
    if expr.is_Symbol:
        return sizes[expr]
    if expr.is_Integer:
        return int(expr)
    if not (expr.is_Add or expr.is_Mul):
        raise NotImplementedError(f"size expression {expr} in the edge graphs")
    combine = operator.add if expr.is_Add else operator.mul
    result = _size_expression(graph, expr.args[0], sizes)
    for term in expr.args[1:]:
        right = _size_expression(graph, term, sizes)
        value = combine(*(x.meta["val"] if isinstance(x, fx.Node) else x for x in (result, right)))
        result = _size_node(graph, combine, (result, right), value)
    return result


class OnnxTranslator:
    """torch.onnx's FX → ONNX translation, applied to graphs that are already decomposed.

    Uses ``torch.onnx._internal`` (torch 2.13): the registry of torchlib functions, the
    decomposition table matching it, the type-promotion pass and the translator.
    """

    def __init__(self) -> None:
        from torch.onnx._internal.exporter import _decomp, _registration

        self.registry = _registration.ONNXRegistry.from_torchlib()
        implemented = set(_decomp.get_onnx_implemented_overloads(self.registry))
        self.decompositions = _decomp.create_onnx_friendly_decomposition_table(implemented)

    def save(self, graph: NamedGraph, path: Path) -> None:
        from torch.onnx._internal.exporter import _core, _fx_passes

        _fx_passes.insert_type_promotion_nodes(graph.module)
        placeholders = [n.name for n in graph.module.graph.nodes if n.op == "placeholder"]
        returned = graph.module.graph.output_node().args[0]
        signature = ExportGraphSignature(
            input_specs=[InputSpec(InputKind.USER_INPUT, TensorArgument(n), None) for n in placeholders],
            output_specs=[OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None) for n in returned],
        )
        program = ExportedProgram(root=graph.module, graph=graph.module.graph, graph_signature=signature,
                                  state_dict={}, range_constraints={}, module_call_graph=[])
        onnx_program = _core._exported_program_to_onnx_program(program, registry=self.registry)
        model = onnx_program.model
        for values, names in ((model.graph.inputs, graph.inputs), (model.graph.outputs, graph.outputs)):
            if len(values) != len(names):
                raise RuntimeError(f"{path.name}: {len(values)} graph values for the names {names}")
            for value, name in zip(values, names):
                value.name = name
        onnx_program.optimize()  # constant folding (parameters are inputs: nothing of theirs folds), dead values
        onnx_program.save(path)


def check_graphs(edge: EdgePart, out_dir: Path, *, length: int) -> float:
    """Run both graphs with onnxruntime at ``CHECK_ROWS × length``; return the largest relative error vs torch."""
    example = example_inputs(edge, CHECK_ROWS, length)
    z = edge(*example.values())
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)) * example["attention_mask"][..., None]
    (z * dz).sum().backward()
    want = {n: p.grad.numpy() for n, p in edge.named_parameters() if p.requires_grad}
    edge.zero_grad(set_to_none=True)
    params = {n: p.detach().numpy() for n, p in edge.named_parameters()}
    graphs = AotGraphs(*(out_dir / FILES[role] for role in (FORWARD, BACKWARD, INFER)), threads=1)
    batch = {n: t.numpy() for n, t in example.items()}
    got_z = graphs.forward(params | batch, keep=True)
    inferred_z = graphs.forward(params | batch, keep=False)
    got = {n: np.zeros_like(w) for n, w in want.items()}
    graphs.backward(params | batch, dz.numpy(), got)
    scale = max(float(np.abs(w).max()) for w in want.values())
    errors = [_relative(zs, z.detach().numpy(), 0.0) for zs in (got_z, inferred_z)]
    errors += [_relative(got[n], w, scale) for n, w in want.items()]
    if max(errors) > CHECK_TOLERANCE:
        raise RuntimeError(f"the exported onnx graphs disagree with torch at batch {CHECK_ROWS} × length {length} "
                           f"(relative error {max(errors):.1e}); the export is wrong for this model")
    return max(errors)


def _relative(got: np.ndarray, want: np.ndarray, scale: float) -> float:
    """max |got − want| / max |want|, floored at ``CHECK_TOLERANCE·scale`` for tensors that are zero in theory."""
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), CHECK_TOLERANCE * scale, 1e-30)
