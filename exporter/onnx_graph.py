"""Trace the edge half (``EdgePart``) into a plain ONNX forward graph.

Why it exists: both edge engines start from the same traced graph of embeddings …
compression head. The recipe is the one that gives correct training gradients (the
engine tests compare them with torch's): the TorchScript exporter (``dynamo=False``) at opset 17 in training mode without
constant folding (an eval-mode or optimising export folds parameters together), dynamic
batch and length axes, and ``position_ids`` as an explicit input (with dynamic axes the
position-embedding gradient is otherwise silently wrong). Graph initialisers keep the
``EdgePart.state_dict()`` names, so every later artifact speaks PyTorch's names.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch

from models import EdgePart
from splitwire.manifest import EDGE_INPUTS, Z as OUTPUT

OPSET = 17
_DUMMY_SHAPE = (2, 8)  # batch × length of the example input; both axes are dynamic


def dummy_inputs(edge: EdgePart, *, length: int) -> tuple[torch.Tensor, ...]:
    """Example ``(input_ids, attention_mask, token_type_ids, position_ids)`` for tracing."""
    b, l = _DUMMY_SHAPE[0], min(_DUMMY_SHAPE[1], length)
    vocab = edge.embeddings.word.num_embeddings
    input_ids = torch.arange(b * l).reshape(b, l) % vocab
    attention_mask = torch.ones(b, l, dtype=torch.long)
    attention_mask[1, l // 2:] = 0
    return input_ids, attention_mask, torch.zeros_like(input_ids), torch.arange(l).expand(b, l).contiguous()


def trace_edge(edge: EdgePart, *, max_length: int) -> onnx.ModelProto:
    """The edge forward graph: inputs ``EDGE_INPUTS`` (int64, ``B×L``), output ``z``."""
    buffer = io.BytesIO()
    axes = {name: {0: "batch", 1: "length"} for name in (*EDGE_INPUTS, OUTPUT)}
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see the module docstring); its
        # deprecation and tracer notices (e.g. the padding_idx one, handled by the cloud
        # sending zero gradients at padding) are not actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            edge,
            dummy_inputs(edge, length=max_length),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            export_params=True,
            input_names=list(EDGE_INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=axes,
        )
    model = onnx.load_from_string(buffer.getvalue())
    _check_parameter_names(model, edge)
    return model


def _check_parameter_names(model: onnx.ModelProto, edge: EdgePart) -> None:
    """Every trainable tensor must survive tracing under its PyTorch name, unfolded."""
    traced = {init.name for init in model.graph.initializer}
    missing = [name for name in edge.state_dict() if name not in traced]
    if missing:
        raise RuntimeError(f"the traced edge graph lost parameters {missing}; was it folded?")
