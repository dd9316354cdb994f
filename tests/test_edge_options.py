"""The lighter edge's export options: frozen bottom layers, bfloat16 AdamW moments, LoRA adapters.

``--train-edge-layers N``: only the top N edge layers and the compression head train; the
backward graph stops at the first trained layer (no gradient, no parameter read and far
fewer saved activations below it), the gradients of what trains equal PyTorch's, and over
real websockets the run equals in-process training with the same parameters frozen, which
stay bit-identical. ``--edge-moments bf16``: the numpy AdamW equals ``torch.optim.AdamW``
whose moments are rounded to bfloat16 after every step, and its checkpoint is smaller.
``--edge-lora-rank R``: only the adapters and the compression head train, their gradients equal
PyTorch's, and the assembled edge with the adapters merged into its weights gives the logits
of the unmerged one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from bundles import export_cached, padded_batch, reference_edge, tiny_options, upstream_gradient
from test_end_to_end import reviews  # noqa: F401 (fixture: real movie-review snippets)
from edge_runtime.adamw import AdamW, FlatParameters
from edge_runtime.engine import open_engine
from splitwire.bundle import load_bundle

SETTINGS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


@pytest.fixture(scope="module")
def all_trained(tmp_path_factory, tiny_model_dir):
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"))


@pytest.fixture(scope="module")
def top_layer(tmp_path_factory, tiny_model_dir):
    """Split 3 of the 4-layer BERT, only the split layer's attention block (and the head) trained."""
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"), train_edge_layers=1)


def _saved_bytes(root, batch) -> int:
    """Bytes of the activations a training forward keeps for the backward."""
    engine = open_engine(load_bundle(root, parts=["edge"]), threads=1)
    engine.forward(batch)
    return sum(value.numpy().nbytes for value in engine._graphs._kept.values())


def test_train_edge_layers_freezes_everything_below_and_the_backward_stops_there(top_layer, all_trained):
    bundle = load_bundle(top_layer, parts=["edge"])
    edge = bundle.manifest.edge
    assert edge.trained_layers == 1
    assert all(n.startswith(("split_attention.", "head.")) for n in edge.trainable) and edge.trainable
    assert {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers") else "") for n in edge.frozen} == {
        "embeddings", "layers.0", "layers.1"}
    backward = onnx.load(bundle.edge_file("backward"))
    assert not {i.name for i in backward.graph.input} & set(edge.frozen)  # no frozen weight is even read
    assert {o.name for o in backward.graph.output} == {f"grad.{n}" for n in edge.trainable}
    batch = padded_batch(np.random.default_rng(0), [32, 20, 7])
    # All-trained keeps the embeddings' and two full layers' activations too: well over 3× as much.
    assert _saved_bytes(top_layer, batch) * 3 < _saved_bytes(all_trained, batch)


def test_gradients_of_the_trained_layers_equal_torch(top_layer):
    bundle = load_bundle(top_layer, parts=["edge"])
    engine, edge = open_engine(bundle, threads=1), reference_edge(top_layer)
    for name in bundle.manifest.edge.frozen:
        edge.get_parameter(name).requires_grad_(False)
    rng = np.random.default_rng(1)
    batch = padded_batch(rng, [30, 12, 32, 3])
    g = upstream_gradient(rng, batch, 8)
    engine.forward(batch)
    engine.backward(g)
    (edge(*(torch.from_numpy(a) for a in batch.feeds().values())) * torch.from_numpy(g)).sum().backward()
    got = engine.gradients()
    assert set(got) == {n for n, p in edge.named_parameters() if p.requires_grad}
    scale = max(float(p.grad.abs().max()) for p in edge.parameters() if p.requires_grad)
    for name, p in edge.named_parameters():
        if p.requires_grad:
            want = p.grad.numpy()
            tolerance = 1e-4 * (scale if name.endswith("key.bias") else np.abs(want).max())
            assert np.abs(got[name] - want).max() <= tolerance, name


def test_frozen_layers_over_the_wire_equal_in_process_training_and_stay_bit_identical(
        tmp_path_factory, tiny_model_dir, reviews):  # noqa: F811 (the fixture)
    from test_end_to_end import BATCH, SCHEDULE, SEED, STEPS, assert_same_weight, in_process, over_the_wire, rel_err

    from edge_runtime.batches import training_batches
    from edge_runtime.tokenizer import EdgeTokenizer

    root = export_cached(tmp_path_factory, tiny_model_dir, split=2, rank=4, init="random", max_length=48,
                         lr=SCHEDULE.lr, engine="onnx", train_edge_layers=1)
    bundle = load_bundle(root)
    batches = list(training_batches(reviews, EdgeTokenizer.from_bundle(bundle), batch_size=BATCH, epochs=2,
                                    seed=SEED, max_steps=STEPS))
    result, edge_weights, _, _ = over_the_wire(bundle, batches)
    want_losses, want_edge, _ = in_process(bundle, batches)
    assert rel_err(result.losses, want_losses) <= 1e-4
    frozen, initial = set(bundle.manifest.edge.frozen), reference_edge(root).state_dict()
    assert set(edge_weights) == set(bundle.manifest.edge.trainable) and frozen
    for name, want in want_edge.named_parameters():
        if name in frozen:
            assert torch.equal(want.detach(), initial[name]), name  # bit-identical after training
        else:
            assert_same_weight(name, edge_weights[name], want.detach().numpy())
            assert not torch.equal(want.detach(), initial[name]), name  # it trained
    engine = open_engine(bundle, threads=1)
    with pytest.raises(ValueError, match="read-only"):  # the edge holds its frozen weights read-only
        engine._frozen[next(iter(frozen))][...] = 0.0


def test_bf16_moments_equal_torch_adamw_with_moments_rounded_to_bf16():
    rng = np.random.default_rng(4)
    shapes = {"w": (300, 70), "long": (300_001,)}  # "long" spans several chunks, the last one short
    initial = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    params = FlatParameters(initial)
    adamw = AdamW(params, lr=1e-3, moments="bf16", **SETTINGS)
    reference = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in initial.items()}
    torch_adamw = torch.optim.AdamW(reference.values(), lr=1e-3, **SETTINGS)
    grads = np.zeros_like(params.buffer)
    for step in range(4):
        for name, g in params.split(grads).items():
            g[...] = rng.standard_normal(g.shape) * 10.0 ** rng.integers(-6, 2)
            reference[name].grad = torch.from_numpy(g.copy())
        adamw.step(grads)
        torch_adamw.step()
        for p in reference.values():  # what bf16 storage keeps for the next step
            for key in ("exp_avg", "exp_avg_sq"):
                torch_adamw.state[p][key].copy_(torch_adamw.state[p][key].bfloat16().float())
        for name, p in reference.items():
            assert np.abs(params.views[name] - p.detach().numpy()).max() <= 4 * np.spacing(
                np.abs(p.detach().numpy()).max()), (step, name)
            for moment, key in ((adamw.exp_avg, "exp_avg"), (adamw.exp_avg_sq, "exp_avg_sq")):
                stored = (params.split(moment)[name].astype(np.uint32) << 16).view(np.float32)
                want = torch_adamw.state[p][key].numpy()
                assert np.abs(stored - want).max() <= 2 * np.spacing(np.abs(want).max(), dtype=np.float32) * 2**16
    assert adamw.exp_avg.nbytes == params.buffer.nbytes // 2


def test_bf16_moments_halve_the_edge_checkpoint(tmp_path_factory, tiny_model_dir, all_trained, tmp_path):
    bf16 = export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"), edge_moments="bf16")
    assert load_bundle(bf16, parts=["edge"]).manifest.optimizer.moments == "bf16"
    sizes = {}
    for name, root in (("fp32", all_trained), ("bf16", bf16)):
        engine = open_engine(load_bundle(root, parts=["edge"]), threads=1)
        batch = padded_batch(np.random.default_rng(5), [9, 32])
        engine.forward(batch)
        engine.backward(upstream_gradient(np.random.default_rng(6), batch, 8))
        engine.optimizer_step()
        (tmp_path / name).mkdir()
        engine.save(tmp_path / name)
        restored = open_engine(load_bundle(root, parts=["edge"]), threads=1)
        restored.restore(tmp_path / name)
        assert all(np.array_equal(restored.parameters()[n], w) for n, w in engine.parameters().items())
        sizes[name] = (tmp_path / name / "edge_state.safetensors").stat().st_size
    assert sizes["bf16"] < 0.7 * sizes["fp32"]  # parameters + 2 moments: 3 units of 4 bytes → 4 + 2 + 2


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_model_dir):
    """Split 3 of the 4-layer BERT with rank-4 adapters on every edge projection."""
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"), edge_lora_rank=4)


def _trained_engine(root, tmp_path):
    """The engine after two AdamW steps at a large learning rate (the adapters' B leaves zero), and its checkpoint."""
    engine = open_engine(load_bundle(root, parts=["edge"]), threads=1)
    engine.set_learning_rate(1e-2)
    rng = np.random.default_rng(7)
    for lengths in ([32, 5], [17, 32, 9]):
        batch = padded_batch(rng, lengths)
        engine.forward(batch)
        engine.backward(upstream_gradient(rng, batch, 8))
        engine.optimizer_step()
    engine.save(tmp_path)
    return engine


def test_only_the_adapters_and_the_head_train_and_their_gradients_equal_torch(lora, tmp_path):
    bundle = load_bundle(lora, parts=["edge"])
    adapters = bundle.manifest.edge.adapters
    assert (adapters.rank, adapters.alpha) == (4, 8.0)
    trainable = set(bundle.manifest.edge.trainable)
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) or n.startswith("head.") for n in trainable)
    assert {n.rsplit(".", 2)[-2] for n in trainable if "lora" in n} == {
        "query", "key", "value", "output", "dense_in", "dense_out"}
    engine = _trained_engine(lora, tmp_path)
    edge = reference_edge(lora)
    edge.load_state_dict({n: torch.from_numpy(w) for n, w in engine.parameters().items()}, strict=False)
    for name in bundle.manifest.edge.frozen:
        edge.get_parameter(name).requires_grad_(False)
    rng = np.random.default_rng(8)
    batch = padded_batch(rng, [32, 11, 26])
    g = upstream_gradient(rng, batch, 8)
    engine.forward(batch)
    engine.backward(g)
    (edge(*(torch.from_numpy(a) for a in batch.feeds().values())) * torch.from_numpy(g)).sum().backward()
    got = engine.gradients()
    assert set(got) == trainable
    for name in trainable:
        want = edge.get_parameter(name).grad.numpy()
        assert np.abs(want).max() > 0, name  # B moved off zero, so every A has a gradient
        assert np.abs(got[name] - want).max() <= 1e-4 * np.abs(want).max(), name


def test_merged_adapters_give_the_logits_of_the_unmerged_ones(lora, tmp_path):
    import onnxruntime
    from safetensors.torch import load_file

    from exporter.inference import edge_inference_graph
    from models import CloudPart, EncoderSpec, SplitSpec

    bundle = load_bundle(lora)
    engine = _trained_engine(lora, tmp_path)
    merged = edge_inference_graph(bundle, tmp_path)
    assert not [i.name for i in merged.graph.initializer if "lora" in i.name]  # nothing left to add at run time
    session = onnxruntime.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = padded_batch(np.random.default_rng(9), [32, 12, 1])
    merged_z = session.run(["z"], batch.feeds())[0]
    unmerged_z = engine.infer(batch)
    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=False)
    cloud.load_state_dict(load_file(str(bundle.path(bundle.manifest["cloud"]["files"]["weights"]))))
    mask = torch.from_numpy(batch.attention_mask)
    with torch.no_grad():
        logits = [cloud(torch.from_numpy(z), mask).numpy() for z in (merged_z, unmerged_z)]
    assert np.abs(merged_z - unmerged_z).max() <= 1e-5 * np.abs(unmerged_z).max()
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5 * np.abs(logits[1]).max()
    initial = open_engine(bundle, threads=1).infer(batch)
    assert np.abs(unmerged_z - initial).max() > 1e-3 * np.abs(initial).max()  # the adapters changed z
