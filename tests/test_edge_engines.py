"""Every edge engine computes what PyTorch computes on ``EdgePart``: ``z``, ``J(z)ᵀ g``, AdamW steps.

Written against the ``EdgeEngine`` interface and parametrized by engine name; the reference
is the ``EdgePart`` rebuilt from the same bundle's manifest and initial edge weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundles import (
    HEADS, bundle_batch, export_cached, head_options, minilm_options, padded_batch, reference_edge, tiny_options,
    upstream_gradient,
)
from families import NEW_FAMILIES, family_model_dir, family_options
from edge_runtime.engine import EdgeBatch, EdgeEngine, open_engine
from splitwire.bundle import load_bundle

ENGINES = ["ort-training", "onnx"]
REL_TOL = 1e-4  # max |engine − torch| / max |torch|, per parameter
Z_REL_TOL = 1e-5
ADAM_ATOL = 1e-6  # after AdamW steps of lr 1e-3 (updates ~3e-3): about 8 float32 ulps of an O(1) weight


@pytest.fixture(params=ENGINES)
def engine_name(request) -> str:
    return request.param


@pytest.fixture
def tiny_bundle(tmp_path_factory, tiny_model_dir, engine_name):
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options(engine_name))


def _open(root) -> EdgeEngine:
    return open_engine(load_bundle(root, parts=["edge"]), threads=1)


def _torch_z(edge, batch: EdgeBatch) -> torch.Tensor:
    return edge(*(torch.from_numpy(a) for a in batch.feeds().values()))


def _torch_gradients(edge, batch: EdgeBatch, g: np.ndarray) -> dict[str, np.ndarray]:
    edge.zero_grad()
    (_torch_z(edge, batch) * torch.from_numpy(g)).sum().backward()
    return {n: p.grad.numpy().copy() for n, p in edge.named_parameters()}


def _is_key_bias(name: str) -> bool:
    # dL/d(key bias) is exactly 0 (softmax ignores a per-row shift); both sides return
    # rounding noise, so these are compared absolutely, on the scale of the other gradients.
    return name.endswith("key.bias")


def _assert_gradients_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], context: str) -> None:
    assert set(got) == set(want), context
    scale = max(float(np.abs(w).max()) for w in want.values())
    for name, w in want.items():
        err = float(np.abs(got[name] - w).max())
        if _is_key_bias(name):
            assert err <= REL_TOL * scale, (context, name, err)
        else:
            assert err <= REL_TOL * float(np.abs(w).max()), (context, name, err, float(np.abs(w).max()))


def _check_gradients(root, shapes: list[list[int]], seed: int) -> None:
    engine, edge = _open(root), reference_edge(root)
    width = load_bundle(root, parts=["edge"]).wire_width
    rng = np.random.default_rng(seed)
    for lengths in shapes:
        batch = bundle_batch(rng, lengths, root)
        g = upstream_gradient(rng, batch, width)
        z = engine.forward(batch)
        assert z.shape == (*batch.shape, width) and z.dtype == np.float32
        engine.backward(g)
        want = _torch_gradients(edge, batch, g)
        _assert_gradients_equal(engine.gradients(), want, f"batch {batch.shape}")
        engine.backward(g)  # gradients replace earlier ones, never accumulate
        _assert_gradients_equal(engine.gradients(), want, f"batch {batch.shape}, second backward")
        touched = np.abs(engine.gradients()["embeddings.position.weight"]).sum(axis=1) > 0
        assert touched.sum() == batch.shape[1]  # one row per position, none beyond the length


@pytest.mark.parametrize("compression", ["vanilla split", *HEADS])
def test_gradients_equal_torch_for_several_batch_shapes_from_one_export(
    tmp_path_factory, tiny_model_dir, engine_name, compression
):
    """Rank 8 with every compression head (``bundles.HEADS``), and the vanilla split."""
    if compression == "vanilla split":
        options = tiny_options(engine_name) | {"no_compression": True}
    else:
        options = tiny_options(engine_name) | head_options(compression)
    root = export_cached(tmp_path_factory, tiny_model_dir, **options)
    # batch 3 × length 7 and batch 5 × length 13, rows padded differently
    _check_gradients(root, [[7, 2, 5], [13, 1, 9, 13, 4]], seed=0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_gradients_equal_torch_for_every_encoder_family(tmp_path_factory, family, engine_name):
    """RoBERTa's offset positions, DistilBERT's missing token types, ELECTRA's projection: all in the graphs."""
    root = export_cached(tmp_path_factory, family_model_dir(tmp_path_factory, family), **family_options(engine_name))
    _check_gradients(root, [[7, 2, 5], [13, 1, 9, 13]], seed=4)


def test_gradients_equal_torch_on_pretrained_minilm(tmp_path_factory, minilm_dir, engine_name):
    root = export_cached(tmp_path_factory, minilm_dir, **minilm_options(engine_name))
    _check_gradients(root, [[9, 4], [6, 16, 11]], seed=1)


def test_eval_z_equals_edge_part(tiny_bundle):
    engine, edge = _open(tiny_bundle), reference_edge(tiny_bundle)
    rng = np.random.default_rng(2)
    for lengths in ([5, 3], [20, 20, 8, 1]):
        batch = padded_batch(rng, lengths)
        with torch.no_grad():
            want = _torch_z(edge, batch).numpy()
        for z in (engine.infer(batch), engine.forward(batch)):
            assert np.abs(z - want).max() <= Z_REL_TOL * np.abs(want).max()


def test_adamw_steps_equal_torch_adamw(tiny_bundle):
    lr, steps = 1e-3, 3
    engine, edge = _open(tiny_bundle), reference_edge(tiny_bundle)
    settings = load_bundle(tiny_bundle, parts=["edge"]).manifest["optimizer"]
    optimizer = torch.optim.AdamW(edge.parameters(), lr=lr, betas=tuple(settings["betas"]), eps=settings["eps"],
                                  weight_decay=settings["weight_decay"])
    engine.set_learning_rate(lr)
    initial = {n: p.detach().numpy().copy() for n, p in edge.named_parameters()}
    rng = np.random.default_rng(3)
    for _ in range(steps):
        batch = padded_batch(rng, [9, 4, 6])
        g = upstream_gradient(rng, batch, engine.forward(batch).shape[-1])
        engine.backward(g)
        engine.optimizer_step()
        _torch_gradients(edge, batch, g)
        optimizer.step()
    got = engine.parameters()
    assert set(got) == set(initial)
    for name, p in edge.named_parameters():
        want = p.detach().numpy()
        err = float(np.abs(got[name] - want).max())
        if _is_key_bias(name):  # Adam turns gradient noise into steps of at most lr each, of random sign
            assert err <= 2 * lr * steps, (name, err)
        else:
            assert err <= ADAM_ATOL, (name, err)
            assert float(np.abs(want - initial[name]).max()) > 100 * ADAM_ATOL  # the step really moved it


def test_save_restore_then_continue_equals_uninterrupted(tiny_bundle, tmp_path):
    rng = np.random.default_rng(4)
    batches = [padded_batch(rng, [6, 3]) for _ in range(3)]
    grads = [upstream_gradient(rng, b, 8) for b in batches]

    def step(engine: EdgeEngine, i: int) -> None:
        engine.set_learning_rate(1e-3 * (i + 1))
        engine.forward(batches[i])
        engine.backward(grads[i])
        engine.optimizer_step()

    straight = _open(tiny_bundle)
    for i in range(3):
        step(straight, i)
    first = _open(tiny_bundle)
    step(first, 0)
    first.save(tmp_path)
    resumed = _open(tiny_bundle)
    resumed.restore(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.parameters().values(), first.parameters().values()))
    for i in (1, 2):
        step(resumed, i)
    want = straight.parameters()
    for name, value in resumed.parameters().items():
        assert np.array_equal(value, want[name]), name


def test_engine_refuses_what_does_not_fit(tiny_bundle):
    engine = _open(tiny_bundle)
    batch = padded_batch(np.random.default_rng(5), [4, 2])
    with pytest.raises(RuntimeError, match="forward"):
        engine.backward(np.zeros((2, 4, 8), np.float32))
    engine.forward(batch)
    for bad in (np.zeros((2, 4, 7), np.float32), np.zeros((2, 4, 8), np.float64)):
        with pytest.raises(ValueError, match="dz must be float32"):
            engine.backward(bad)
    with pytest.raises(ValueError, match="NaN"):
        engine.backward(np.full((2, 4, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="int64"):
        engine.infer(EdgeBatch(*(a.astype(np.int32) for a in batch.feeds().values())))
    too_far = EdgeBatch(batch.input_ids, batch.attention_mask, batch.token_type_ids, batch.position_ids + 200)
    with pytest.raises(ValueError, match=r"position_ids must lie in 0\.\.127"):
        engine.infer(too_far)
