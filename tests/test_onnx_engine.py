"""What is particular to the portable ``onnx`` engine (the shared checks are in test_edge_engines.py).

Its numpy AdamW against ``torch.optim.AdamW``; one export serving extreme batch shapes;
frozen parameters; graphs that hold no weights; and an edge process that never loads
torch or onnxruntime-training.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bundles import export_cached, padded_batch, reference_edge, tiny_options, upstream_gradient
from edge_runtime.adamw import AdamW, FlatParameters
from edge_runtime.engine import open_engine
from edge_runtime.engines.onnx_engine import _map_weights
from safetensors import safe_open
from splitwire.bundle import BundleError, load_bundle

SETTINGS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _assert_ulps_close(got: np.ndarray, want: np.ndarray, context) -> None:
    """Within 4 float32 ulps of the tensor's largest value: torch's lerp fuses a multiply-add, numpy does not."""
    assert np.abs(got - want).max() <= 4 * np.spacing(np.abs(want).max()), context


def test_numpy_adamw_equals_torch_adamw_on_random_tensors(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"w": (300, 70), "b": (5,), "long": (300_001,)}  # "long" spans several chunks, the last one short
    initial = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    params = FlatParameters(initial)
    adamw = AdamW(params, lr=1e-3, **SETTINGS)
    reference = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in initial.items()}
    torch_adamw = torch.optim.AdamW(reference.values(), lr=1e-3, **SETTINGS)
    grads = np.zeros_like(params.buffer)
    for step, lr in enumerate([1e-3, 3e-3, 1e-4, 2e-3]):
        adamw.lr = lr
        for group in torch_adamw.param_groups:
            group["lr"] = lr
        for name, g in params.split(grads).items():  # gradients from 1e-6 to 10 in size
            g[...] = rng.standard_normal(g.shape) * 10.0 ** rng.integers(-6, 2)
            reference[name].grad = torch.from_numpy(g.copy())
        adamw.step(grads)
        torch_adamw.step()
        for name, p in reference.items():
            state = torch_adamw.state[p]
            for got, want in ((params.views[name], p.detach()), (params.split(adamw.exp_avg)[name], state["exp_avg"]),
                              (params.split(adamw.exp_avg_sq)[name], state["exp_avg_sq"])):
                _assert_ulps_close(got, want.numpy(), (step, name))
            assert int(state["step"]) == adamw.step_count == step + 1
        assert np.abs(params.views["w"] - initial["w"]).max() > 1e-3  # it moved


def test_numpy_adamw_with_a_rate_multiple_equals_torch_adamw_with_a_parameter_group_of_its_own():
    """``lr_scales`` (``sft-export --head-lr-scale``): "head" and "tail" train at 10 × the rate, torch's second group."""
    rng = np.random.default_rng(1)
    shapes = {"a": (40, 3), "head": (200_000,), "b": (7,), "tail": (5,)}  # "head" spans two chunks
    initial = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    params = FlatParameters(initial)
    adamw = AdamW(params, lr=1e-3, lr_scales={"head": 10.0, "tail": 10.0}, **SETTINGS)
    reference = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in initial.items()}
    torch_adamw = torch.optim.AdamW([{"params": [reference["a"], reference["b"]], "scale": 1.0},
                                     {"params": [reference["head"], reference["tail"]], "scale": 10.0}],
                                    lr=1e-3, **SETTINGS)
    grads = np.zeros_like(params.buffer)
    for step, lr in enumerate([1e-3, 2e-4, 5e-4]):
        adamw.lr = lr
        for group in torch_adamw.param_groups:
            group["lr"] = lr * group["scale"]
        for name, g in params.split(grads).items():
            g[...] = rng.standard_normal(g.shape)
            reference[name].grad = torch.from_numpy(g.copy())
        adamw.step(grads)
        torch_adamw.step()
        for name, p in reference.items():
            _assert_ulps_close(params.views[name], p.detach().numpy(), (step, name))
    moved = {n: np.abs(params.views[n] - initial[n]).mean() for n in shapes}
    assert moved["head"] > 5 * moved["a"]  # the multiple really applies
    with pytest.raises(ValueError, match="names no trainable parameter"):
        AdamW(params, lr=1e-3, lr_scales={"nope": 2.0}, **SETTINGS)


def test_adamw_state_round_trips_exactly_and_refuses_other_metadata(tmp_path):
    rng = np.random.default_rng(1)
    params = FlatParameters({"a": rng.standard_normal((4, 3)).astype(np.float32)})
    adamw = AdamW(params, lr=2e-3, **SETTINGS)
    adamw.step(rng.standard_normal(12).astype(np.float32))
    adamw.save(tmp_path / "state.safetensors", metadata={"run": "x"})
    other = AdamW(FlatParameters({"a": np.zeros((4, 3), np.float32)}), lr=1.0, **SETTINGS)
    view = other.params.views["a"]
    other.restore(tmp_path / "state.safetensors", metadata={"run": "x"})
    assert view is other.params.views["a"] and np.array_equal(view, params.views["a"])  # restored in place
    assert np.array_equal(other.exp_avg_sq, adamw.exp_avg_sq) and (other.step_count, other.lr) == (1, 2e-3)
    with pytest.raises(ValueError, match="saved for"):
        other.restore(tmp_path / "state.safetensors", metadata={"run": "y"})
    wrong_layout = AdamW(FlatParameters({"b": np.zeros((4, 3), np.float32)}), lr=1.0, **SETTINGS)
    with pytest.raises(ValueError, match="other tensors"):
        wrong_layout.restore(tmp_path / "state.safetensors", metadata={"run": "x"})


@pytest.fixture(scope="module")
def tiny_onnx_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"))


def test_one_export_serves_single_rows_single_tokens_and_the_longest_batches(tiny_onnx_bundle):
    engine = open_engine(load_bundle(tiny_onnx_bundle, parts=["edge"]), threads=1)
    edge = reference_edge(tiny_onnx_bundle)
    max_length = load_bundle(tiny_onnx_bundle, parts=["edge"]).max_length
    rng = np.random.default_rng(2)
    for lengths in ([1], [1, 1, 1], [max_length], [max_length] * 2 + [3, 1, 17, 30, 2, max_length]):
        batch = padded_batch(rng, lengths)
        g = upstream_gradient(rng, batch, 8)
        z = engine.forward(batch)
        engine.backward(g)
        edge.zero_grad()
        want_z = edge(*(torch.from_numpy(a) for a in batch.feeds().values()))
        (want_z * torch.from_numpy(g)).sum().backward()
        assert z.shape == (*batch.shape, 8)
        assert np.abs(z - want_z.detach().numpy()).max() <= 1e-5 * np.abs(want_z.detach().numpy()).max()
        scale = max(float(p.grad.abs().max()) for p in edge.parameters())
        for name, got in engine.gradients().items():
            want = dict(edge.named_parameters())[name].grad.numpy()
            tolerance = 1e-4 * (scale if name.endswith("key.bias") else np.abs(want).max())
            assert np.abs(got - want).max() <= tolerance, (lengths, name)


def test_graph_files_hold_no_weights(tiny_onnx_bundle):
    bundle = load_bundle(tiny_onnx_bundle, parts=["edge"])
    weights = set(bundle.manifest["edge"]["trainable"]) | set(bundle.manifest["edge"]["frozen"])
    for role in ("forward", "backward", "infer"):
        model = onnx.load(bundle.edge_file(role))
        assert sum(t.ByteSize() for t in model.graph.initializer) < 4096, role  # a few constants only
        assert model.ir_version <= 10  # onnxruntime 1.19 reads IR ≤ 10
    forward = onnx.load(bundle.edge_file("forward"))
    assert weights | {"input_ids", "attention_mask", "token_type_ids", "position_ids"} == {
        i.name for i in forward.graph.input}
    mask = next(i for i in forward.graph.input if i.name == "attention_mask")
    assert all(d.dim_param for d in mask.type.tensor_type.shape.dim)  # symbolic batch and length


def test_frozen_embeddings_get_no_gradient_and_stay_fixed(tmp_path_factory, tiny_model_dir):
    root = export_cached(tmp_path_factory, tiny_model_dir, split=1, rank=4, init="random", max_length=16,
                         engine="onnx", freeze_embeddings=True)
    bundle = load_bundle(root, parts=["edge"])
    frozen = bundle.manifest["edge"]["frozen"]
    assert len(frozen) == 3
    backward = onnx.load(bundle.edge_file("backward"))
    assert not {o.name for o in backward.graph.output} & {f"grad.{n}" for n in frozen}
    engine, edge = open_engine(bundle, threads=1), reference_edge(root)
    for name in frozen:
        edge.get_parameter(name).requires_grad_(False)
    trainable = [p for p in edge.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, **SETTINGS)
    engine.set_learning_rate(1e-3)
    rng = np.random.default_rng(3)
    for _ in range(3):
        batch = padded_batch(rng, [9, 4, 16])
        g = upstream_gradient(rng, batch, 4)
        engine.forward(batch)
        engine.backward(g)
        engine.optimizer_step()
        optimizer.zero_grad()
        (edge(*(torch.from_numpy(a) for a in batch.feeds().values())) * torch.from_numpy(g)).sum().backward()
        optimizer.step()
    assert set(engine.parameters()) == {n for n, p in edge.named_parameters() if p.requires_grad}
    for name, got in engine.parameters().items():  # key biases: Adam steps of rounding noise, ≤ lr each
        tolerance = 3 * 2e-3 if name.endswith("key.bias") else 1e-6
        assert np.abs(got - edge.get_parameter(name).detach().numpy()).max() <= tolerance, name
    batch = padded_batch(rng, [5, 16])
    with torch.no_grad():  # z depends on the embeddings: still the bundle's, on both sides
        want = edge(*(torch.from_numpy(a) for a in batch.feeds().values())).numpy()
    assert np.abs(engine.infer(batch) - want).max() <= 1e-4 * np.abs(want).max()


def test_frozen_weights_are_views_of_the_mapped_weights_file_and_a_bad_file_is_refused(tmp_path_factory,
                                                                                      tiny_model_dir, tmp_path):
    root = export_cached(tmp_path_factory, tiny_model_dir, split=1, rank=4, init="random", max_length=16,
                         engine="onnx", freeze_embeddings=True)
    path = load_bundle(root, parts=["edge"]).edge_file("weights")
    names = set(load_bundle(root, parts=["edge"]).manifest.edge.frozen)
    mapped = _map_weights(path, frozen=names)
    with safe_open(str(path), framework="np") as f:
        for name in names:
            np.testing.assert_array_equal(mapped[name], f.get_tensor(name))
            assert not mapped[name].flags.writeable
            base = mapped[name]
            while isinstance(base, (np.ndarray, memoryview)):
                base = base.base if isinstance(base, np.ndarray) else base.obj
            assert isinstance(base, mmap.mmap), name  # no copy: the page cache holds them
    data = path.read_bytes()
    for bad in (data[:len(data) // 2], b"\xff" * 8 + data[8:], data[:8] + b"[" + data[9:]):  # tensors cut,
        # a header length past the end, a header that is not an object
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(bad)
        with pytest.raises(BundleError, match="safetensors|do not fit"):
            _map_weights(broken, frozen=names)


def test_edge_process_loads_neither_torch_nor_onnxruntime_training(tiny_onnx_bundle, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from edge_runtime.engine import EdgeBatch, open_engine
        from splitwire.bundle import load_bundle
        engine = open_engine(load_bundle({str(tiny_onnx_bundle)!r}, parts=["edge"]), threads=1)
        ids = np.array([[101, 2023, 102], [101, 102, 0]], np.int64)
        batch = EdgeBatch(ids, (ids > 0).astype(np.int64), np.zeros_like(ids), np.tile(np.arange(3), (2, 1)))
        z = engine.forward(batch)
        engine.backward(np.ones_like(z))
        engine.optimizer_step()
        engine.save({str(tmp_path)!r})
        loaded = sorted(name for name, module in sys.modules.items() if module is not None and (
            name.split(".")[0] in ("torch", "transformers") or name.startswith("onnxruntime.training")))
        print("LOADED", loaded, z.shape)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED [] (2, 3, 8)" in result.stdout
    assert (tmp_path / "edge_state.safetensors").is_file()
