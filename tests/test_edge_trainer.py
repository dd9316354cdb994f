"""The edge's training loop pieces: seeded data order, resume point, and atomic checkpoints of a real engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bundles import export_cached, padded_batch, tiny_options, upstream_gradient
from conftest import minilm_path
from edge_runtime.data import LabelMap, TextData
from edge_runtime.engine import open_engine
from edge_runtime.tokenize import EdgeTokenizer
from edge_runtime.trainer import (
    Checkpoint,
    CheckpointDir,
    ResumeError,
    RunConfig,
    batch_plan,
    epoch_order,
    planned_steps,
    resume_point,
    training_batches,
)
from splitwire.bundle import load_bundle
from splitwire.schedule import Schedule
# --- data order and resume point (edge_runtime.trainer, no server needed) -------------------------


def test_the_batch_plan_visits_every_row_once_per_epoch_in_a_seeded_order():
    plan = list(batch_plan(10, batch_size=4, epochs=3, seed=5))
    assert [step for _, step, _ in plan] == list(range(1, 10))
    assert [len(idx) for _, _, idx in plan] == [4, 4, 2] * 3
    orders = [np.concatenate([idx for e, _, idx in plan if e == epoch]) for epoch in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(10))
    assert not np.array_equal(orders[0], orders[1])
    again = list(batch_plan(10, batch_size=4, epochs=3, seed=5))
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(plan, again))
    assert not np.array_equal(orders[0], epoch_order(10, seed=6, epoch=0))
    assert len(list(batch_plan(10, batch_size=4, epochs=3, seed=5, max_steps=4))) == 4
    assert planned_steps(10, batch_size=4, epochs=3) == 9 and planned_steps(10, batch_size=4, epochs=3, max_steps=4) == 4


def test_resumed_batches_are_the_batches_of_the_full_run():
    data = TextData([f"text number {i}" for i in range(9)], None, np.arange(9, dtype=np.int64) % 2)
    tokenizer = EdgeTokenizer(minilm_path() / "tokenizer.json", max_length=16, pad_id=0)
    full = list(training_batches(data, tokenizer, batch_size=4, epochs=2, seed=1))
    resumed = list(training_batches(data, tokenizer, batch_size=4, epochs=2, seed=1, after_step=4))
    assert [b.step for b in resumed] == [5, 6] and [b.epoch for b in resumed] == [1, 1]
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a.inputs.input_ids, b.inputs.input_ids)
        np.testing.assert_array_equal(a.labels, b.labels)
    first = data.subset(epoch_order(9, seed=1, epoch=0)[:4])
    np.testing.assert_array_equal(full[0].inputs.input_ids, tokenizer.encode(first.texts)[0].input_ids)
    np.testing.assert_array_equal(full[0].labels, first.labels)


def _checkpoint(step: int) -> Checkpoint:
    return Checkpoint(Path(f"runs/x/step-{step:08d}"), step, 0, None)  # type: ignore[arg-type]


def test_resume_point_meets_the_cloud_at_its_step_or_one_before():
    saved = [_checkpoint(100), _checkpoint(200)]
    assert resume_point(0, []) is None
    assert resume_point(1, []) is None  # the cloud applied step 1; it is resent and answered from its replay cache
    assert resume_point(200, saved).step == 200
    assert resume_point(201, saved).step == 200
    assert resume_point(100, saved).step == 100
    with pytest.raises(ResumeError, match="holds no training for this session, but runs/x/step-00000200 is at step 200"):
        resume_point(0, saved)
    with pytest.raises(ResumeError, match="the cloud's session is at step 150, but the edge checkpoints are at steps 100, 200"):
        resume_point(150, saved)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training")), parts=["edge"])


def _config(bundle) -> RunConfig:
    return RunConfig(session="s", bundle_hash=bundle.hash, data_sha256="0" * 64,
                     columns={"text": "text", "pair": None, "label": "label"},
                     label_map=LabelMap("classification", ("neg", "pos")).to_dict(), seed=3, batch_size=2, epochs=1,
                     max_steps=None, holdout=0.25, schedule=Schedule(1e-3).to_dict())


def _step(engine, batch, rng, width):
    engine.forward(batch)
    engine.backward(upstream_gradient(rng, batch, width))
    engine.optimizer_step()


def test_a_checkpoint_resumes_the_engine_exactly_and_keeps_the_last_two(tiny_bundle, tmp_path):
    rng = np.random.default_rng(0)
    batches = [padded_batch(rng, [5, 3, 7]) for _ in range(4)]
    gradient_rngs = [np.random.default_rng(10 + i) for i in range(4)]
    directory = CheckpointDir(tmp_path / "run")
    config = _config(tiny_bundle)
    engine = open_engine(tiny_bundle, threads=1)
    engine.set_learning_rate(1e-3)
    for i in range(3):
        _step(engine, batches[i], gradient_rngs[i], tiny_bundle.wire_width)
        directory.save(engine, step=i + 1, epoch=0, config=config)
    at_step_3 = engine.parameters()
    _step(engine, batches[3], gradient_rngs[3], tiny_bundle.wire_width)

    assert [c.step for c in directory.all()] == [2, 3]  # pruned to the last two
    assert sorted(p.name for p in directory.root.iterdir()) == ["step-00000002", "step-00000003"]  # no staging left
    latest = directory.latest()
    assert latest.config == config and latest.epoch == 0

    resumed = open_engine(tiny_bundle, threads=1)
    resumed.restore(latest.engine_dir)
    for name, value in at_step_3.items():
        np.testing.assert_array_equal(resumed.parameters()[name], value, err_msg=name)
    resumed.set_learning_rate(1e-3)
    _step(resumed, batches[3], np.random.default_rng(13), tiny_bundle.wire_width)
    for name, value in engine.parameters().items():
        np.testing.assert_array_equal(resumed.parameters()[name], value, err_msg=name)
