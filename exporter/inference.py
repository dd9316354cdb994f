"""One ONNX model for local serving, assembled from a fine-tuned run's edge and cloud halves.

Why it exists: after split fine-tuning, ``sft-edge predict`` still needs the cloud for the
top half. To serve the fine-tuned model anywhere onnxruntime runs, this module

- exports the fine-tuned **edge half** as a plain inference graph (``EDGE_INPUTS`` → ``z``):
  for ``ort-training`` with onnxruntime-training's ``Module.export_model_for_inferencing``
  (its eval graph with the checkpoint's parameters bound); for ``onnx`` the bundle's
  ``z``-only inference graph with the trained parameters (and the frozen ones) bound as
  initializers; for an edge with LoRA adapters, the plain ``EdgePart`` with every adapter
  merged into its weight (``models.lora.merged_state``), exported by ``torch.onnx.export``;
- exports the fine-tuned **cloud half** (``CloudPart`` from the cloud session's checkpoint,
  eval mode: no dropout) with ``torch.onnx.export`` at the edge graph's opset;
- for a label-private bundle, puts the device's fine-tuned head (pooling layer and classifier,
  from the edge checkpoint) on top of the cloud half, which ends at the pooled output;
- joins them with ``onnx.compose.merge_models``, connecting the edge's ``z`` and its
  ``attention_mask`` input to the cloud half's inputs.

The assembled model takes ``input_ids``, ``attention_mask``, ``token_type_ids`` and
``position_ids`` (int64, ``B×L``, as ``edge_runtime.tokenizer`` makes them) and returns
``logits`` (``B×num_labels``): the same numbers as split inference (``engine.infer`` then the
cloud's prediction). The edge checkpoint and the cloud state must come from the same run and
step; both are checked against the bundle.

Use: ``python -m exporter.inference --bundle B --edge-checkpoint runs/SESSION/step-N
--cloud-state STATE_DIR/session-….requested.safetensors --out model.onnx`` (``--edge-only``
writes just the edge half).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import compose, numpy_helper
from safetensors.numpy import load_file

from cloud_backend.session import CloudSession
from edge_runtime.engine import open_engine
from edge_runtime.engines import ort_training
from edge_runtime.ort_import import training_api
from edge_runtime.checkpoints import CheckpointDir
from exporter.bundle_writer import ExportError
from edge_runtime.label_head import PREFIX
from models import CloudPart, EdgePart, EncoderSpec, LabelHead, SplitSpec
from models.lora import merged_state
from splitwire import manifest
from splitwire.manifest import EDGE_INPUTS
from splitwire.bundle import Bundle, BundleError, load_bundle

Z, MASK, LOGITS = manifest.Z, "attention_mask", "logits"
MASK_FOR_CLOUD = "edge.attention_mask"  # the edge graph passes its mask input on under this name


def edge_inference_graph(bundle: Bundle, engine_dir: Path) -> onnx.ModelProto:
    """The edge half with the parameters saved in ``engine_dir`` (an engine checkpoint): inputs → ``z``."""
    engine = open_engine(bundle, threads=1)
    engine.restore(engine_dir)  # refuses a checkpoint of another engine or bundle
    if bundle.manifest.engine == "ort-training":
        return _exported_for_inferencing(bundle, engine_dir / ort_training.CHECKPOINT)
    frozen = load_file(str(bundle.edge_file(manifest.WEIGHTS)))
    values = {name: frozen[name] for name in bundle.manifest.edge.frozen} | engine.parameters()
    infer = onnx.load(str(bundle.edge_file(manifest.INFER)))
    if bundle.manifest.edge.adapters is not None:
        return merged_edge_graph(bundle, values, opset=_opset(infer))
    return bind_parameters(infer, values)


def merged_edge_graph(bundle: Bundle, values: dict[str, np.ndarray], *, opset: int) -> onnx.ModelProto:
    """An adapted (LoRA) edge with every adapter merged into its weight, as the plain ``EdgePart``'s graph with
    those weights as initializers: inputs → ``z``, no adapter left to compute."""
    adapters = bundle.manifest.edge.adapters
    state = merged_state({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in values.items()},
                         rank=adapters.rank, alpha=adapters.alpha)
    edge = EdgePart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split)).eval()
    edge.load_state_dict(state)
    example = tuple(torch.zeros(2, 3, dtype=torch.long) for _ in EDGE_INPUTS)
    axes = {name: {0: "batch", 1: "length"} for name in (*EDGE_INPUTS, Z)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, as for the cloud half
        torch.onnx.export(edge, example, buffer, dynamo=False, opset_version=opset, input_names=list(EDGE_INPUTS),
                          output_names=[Z], dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _exported_for_inferencing(bundle: Bundle, checkpoint: Path) -> onnx.ModelProto:
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(checkpoint))
    module = api.Module(str(bundle.edge_file(manifest.TRAINING_MODEL)), state,
                        str(bundle.edge_file(manifest.EVAL_MODEL)))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "edge.onnx"
        module.export_model_for_inferencing(str(path), [Z])
        return onnx.load(str(path))


def bind_parameters(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Turn the graph inputs named in ``values`` into initializers; the edge inputs stay inputs."""
    graph = model.graph
    missing = [i.name for i in graph.input if i.name not in values and i.name not in EDGE_INPUTS]
    if missing:
        raise ExportError(f"no trained or frozen value for the edge graph's inputs {missing[:5]}")
    bound = [i for i in graph.input if i.name in values]
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(values[i.name]), i.name) for i in bound)
    kept = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(kept)
    onnx.checker.check_model(model)
    return model



class TopWithDeviceHead(torch.nn.Module):
    """Label-private: the cloud half to the pooled output, then the device's head to the logits."""

    def __init__(self, cloud: CloudPart, head: LabelHead) -> None:
        super().__init__()
        self.cloud, self.head = cloud, head

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.cloud(z, attention_mask))


def device_head(bundle: Bundle, engine_dir: Path) -> LabelHead:
    """A label-private bundle's head with the parameters saved in ``engine_dir`` (an engine checkpoint)."""
    engine = open_engine(bundle, threads=1)
    engine.restore(engine_dir)
    head = LabelHead(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split))
    head.load_state_dict({n[len(PREFIX):]: torch.from_numpy(v) for n, v in engine.label_head.parameters().items()})
    return head


def cloud_inference_graph(model: CloudPart | TopWithDeviceHead, *, width: int, opset: int) -> onnx.ModelProto:
    """``CloudPart`` in eval mode as ONNX: ``z`` (``B×L×width``), ``attention_mask`` → ``logits``."""
    model = model.eval()
    example = (torch.zeros(2, 3, width), torch.ones(2, 3, dtype=torch.long))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (its opsets match the edge graphs'); its
        # deprecation notice and the tracer's note on the constant head-size square root are not actionable.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, buffer, dynamo=False, opset_version=opset, input_names=[Z, MASK],
                          output_names=[LOGITS], dynamic_axes={Z: {0: "batch", 1: "length"},
                                                               MASK: {0: "batch", 1: "length"}, LOGITS: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def merge_halves(edge: onnx.ModelProto, cloud: onnx.ModelProto) -> onnx.ModelProto:
    """One graph: the edge's ``z`` and ``attention_mask`` feed the cloud half; names kept apart by prefixes."""
    edge = compose.add_prefix(edge, "edge/", rename_inputs=False, rename_outputs=False)
    edge.graph.node.append(onnx.helper.make_node("Identity", [MASK], [MASK_FOR_CLOUD], name="edge/pass_mask"))
    edge.graph.output.append(onnx.helper.make_tensor_value_info(MASK_FOR_CLOUD, onnx.TensorProto.INT64, None))
    cloud = compose.add_prefix(cloud, "cloud/", rename_inputs=False, rename_outputs=False)
    cloud.ir_version = edge.ir_version
    merged = compose.merge_models(edge, cloud, io_map=[(Z, Z), (MASK_FOR_CLOUD, MASK)], outputs=[LOGITS],
                                  name="splitft fine-tuned model (edge + cloud)")
    onnx.checker.check_model(merged)
    return merged


def assemble(bundle_dir: str | Path, *, edge_checkpoint: str | Path, cloud_state: str | Path,
             out: str | Path) -> Path:
    """Write the fine-tuned edge + cloud model to ``out``.

    ``edge_checkpoint``: a checkpoint ``sft-edge train`` wrote (``runs/SESSION/step-NNNNNNNN``);
    ``cloud_state``: the cloud session's checkpoint at the same step (``sft-cloud --state-dir``).
    """
    bundle = load_bundle(bundle_dir)
    checkpoint, session = _same_run(bundle, Path(edge_checkpoint), Path(cloud_state))
    edge = edge_inference_graph(bundle, checkpoint.engine_dir)
    opset = _opset(edge)
    top = session.model if not bundle.label_private else TopWithDeviceHead(
        session.model, device_head(bundle, checkpoint.engine_dir))
    cloud = cloud_inference_graph(top, width=bundle.wire_width, opset=opset)
    out = Path(out)
    onnx.save(merge_halves(edge, cloud), str(out))
    return out


def _same_run(bundle: Bundle, edge_checkpoint: Path, cloud_state: Path):
    """The edge checkpoint and the cloud session, refused unless both are of this bundle and one step."""
    checkpoint = CheckpointDir.read(edge_checkpoint)
    if checkpoint.config.bundle_hash != bundle.hash:
        raise BundleError(f"{edge_checkpoint} was trained with another bundle than {bundle.root}")
    session = CloudSession.restore(cloud_state, bundle=bundle, device=torch.device("cpu"))
    if session.step != checkpoint.step or session.session_id != checkpoint.config.session:
        raise ExportError(
            f"the edge checkpoint is session {checkpoint.config.session!r} at step {checkpoint.step}, the cloud state "
            f"session {session.session_id!r} at step {session.step}: take both halves from the same point of training "
            "(the cloud's .requested.safetensors matches the edge's latest checkpoint)"
        )
    return checkpoint, session


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.inference", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, type=Path, help="the bundle the run trained (with its cloud/ part)")
    p.add_argument("--edge-checkpoint", required=True, type=Path,
                   help="a checkpoint of sft-edge train: runs/SESSION/step-NNNNNNNN")
    p.add_argument("--cloud-state", type=Path, help="the cloud session's checkpoint at the same step "
                   "(STATE_DIR/session-<hash>.requested.safetensors); needed unless --edge-only")
    p.add_argument("--edge-only", action="store_true", help="write only the edge half (inputs → z)")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    args = p.parse_args(argv)
    try:
        if args.edge_only:
            bundle = load_bundle(args.bundle, parts=("edge",))
            onnx.save(edge_inference_graph(bundle, CheckpointDir.read(args.edge_checkpoint).engine_dir), str(args.out))
        elif args.cloud_state is None:
            p.error("--cloud-state is needed to assemble both halves (or pass --edge-only)")
        else:
            assemble(args.bundle, edge_checkpoint=args.edge_checkpoint, cloud_state=args.cloud_state, out=args.out)
    except (ExportError, BundleError, ValueError, OSError) as exc:
        p.exit(1, f"{p.prog}: error: {exc}\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
