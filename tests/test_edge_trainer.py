"""The edge's training loop pieces: seeded data order, resume point, and atomic checkpoints of a real engine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundles import export_cached, padded_batch, tiny_options, upstream_gradient
from conftest import minilm_path, movie_reviews_path
from edge_runtime.data import LabelMap, TextData
from edge_runtime.engine import open_engine
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.batches import batch_plan, epoch_order, planned_steps, training_batches
from edge_runtime.checkpoints import Checkpoint, CheckpointDir, ResumeError, RunConfig, resume_point
from edge_runtime.trainer import prediction_rows
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


def test_grouping_by_length_keeps_every_row_once_and_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    plain = list(batch_plan(1000, batch_size=8, epochs=2, seed=3))
    grouped = list(batch_plan(1000, batch_size=8, epochs=2, seed=3, lengths=lengths))
    assert [s for _, s, _ in grouped] == [s for _, s, _ in plain]
    for epoch in range(2):
        rows = np.concatenate([idx for e, _, idx in grouped if e == epoch])
        assert sorted(rows.tolist()) == list(range(1000))

    def padded(plan):
        return sum(lengths[idx].max() * len(idx) for _, _, idx in plan)

    assert padded(grouped) < 0.7 * padded(plain)
    again = list(batch_plan(1000, batch_size=8, epochs=2, seed=3, lengths=lengths))
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(grouped, again))
    data = TextData(["short", "a much longer text than the other one here"], None, np.array([0, 1]))
    tokenizer = EdgeTokenizer(minilm_path() / "tokenizer.json", max_length=8, pad_id=0)
    assert tokenizer.lengths(data.texts).tolist() == [3, 8]
    assert tokenizer.encode(data.texts)[0].input_ids.shape == (2, 8)  # padding is back on after lengths()


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


def test_a_corrupt_edge_checkpoint_is_refused_with_its_path_and_a_cut_save_leaves_nothing(tiny_bundle, tmp_path):
    """Every engine file is checksummed in run.json: an overwritten, missing or added file makes
    the restore fail with ``CheckpointCorrupt`` naming the checkpoint, before the engine reads
    it. The staging dir of a save cut by a crash is removed by the next save."""
    from edge_runtime.checkpoints import restore_checkpoint
    from splitwire.errors import CheckpointCorrupt

    directory = CheckpointDir(tmp_path / "run")
    engine = open_engine(tiny_bundle, threads=1)
    checkpoint = directory.save(engine, step=1, epoch=0, config=_config(tiny_bundle))
    assert checkpoint.files and all(len(digest) == 64 for digest in checkpoint.files.values())
    assert restore_checkpoint(open_engine(tiny_bundle, threads=1), checkpoint) == 1
    victim = checkpoint.engine_dir / max(checkpoint.files, key=lambda name: (checkpoint.engine_dir / name).stat().st_size)
    original = victim.read_bytes()
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0xFF
    for damage, what in ((lambda: victim.write_bytes(bytes(corrupt)), "fails its checksum"),
                         (victim.unlink, "is missing"),
                         (lambda: (checkpoint.engine_dir / "extra.bin").write_bytes(b"x"), "was not saved")):
        damage()
        with pytest.raises(CheckpointCorrupt, match=f"{re.escape(str(checkpoint.path))}: .* {what}") as error:
            restore_checkpoint(open_engine(tiny_bundle, threads=1), directory.latest())
        assert error.value.path == str(checkpoint.path)
        victim.write_bytes(original)
        (checkpoint.engine_dir / "extra.bin").unlink(missing_ok=True)
    (directory.root / ".step-00000002-cut").mkdir()  # what kill -9 during a save leaves
    (directory.root / ".step-00000002-cut" / "state.bin").write_bytes(b"\0" * 1024)
    directory.save(engine, step=2, epoch=0, config=_config(tiny_bundle))
    assert sorted(p.name for p in directory.root.iterdir()) == ["step-00000001", "step-00000002"]


# --- sft-edge end to end: a real cloud on localhost, the edge in a process where torch cannot be imported ---

NO_TORCH = """
import signal, sys
# Ctrl-C as in a terminal: a runner started as a background job (`make test &`) passes SIGINT on ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked: the edge must not import it")
sys.meta_path.insert(0, _Refuse())
from edge_runtime.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
sys.exit(code)
"""


async def _sft_edge(*args: str, interrupt_when: Path | None = None) -> tuple[int, str]:
    """Run ``sft-edge ARGS`` torch-free; with ``interrupt_when``, send SIGINT once that path exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SFT_TOKEN": "edge-secret"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", NO_TORCH, *args, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    if interrupt_when is not None:
        while not interrupt_when.exists() and process.returncode is None:
            await asyncio.sleep(0.005)
        process.send_signal(signal.SIGINT)
    output, _ = await process.communicate()
    return process.returncode, output.decode()


def _review_files(tmp_path: Path) -> tuple[Path, Path]:
    lines = movie_reviews_path().read_text(encoding="utf-8").splitlines()
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    train.write_text("\n".join(lines[:161]) + "\n", encoding="utf-8")  # header + 160 rows
    test.write_text("\n".join(lines[:1] + lines[161:193]) + "\n", encoding="utf-8")  # header + 32 rows
    return train, test


def _final_edge_weights(bundle, directory: Path) -> dict[str, np.ndarray]:
    engine = open_engine(bundle, threads=1)
    engine.restore(CheckpointDir(directory).latest().engine_dir)
    return engine.parameters()


def test_an_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_bundle, tmp_path):
    from cloud_backend.server import serve_cloud

    train_file, test_file = _review_files(tmp_path)

    def train_args(url: str, name: str) -> list[str]:
        return ["train", "--bundle", str(tiny_bundle.root), "--cloud", url, "--session", name,
                "--checkpoint-dir", str(tmp_path / name), "--data", str(train_file), "--label-column", "sentiment",
                "--label-threshold", "0", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--seed", "3",
                "--checkpoint-every", "5", "--threads", "1", "--no-progress", "--report", str(tmp_path / f"{name}.json")]

    async def scenario() -> dict[str, tuple[int, str]]:
        cloud = load_bundle(tiny_bundle.root, parts=["cloud"])
        async with serve_cloud(cloud, port=0, device="cpu", state_dir=tmp_path / "cloud-state") as server:
            runs = {"whole": await _sft_edge(*train_args(server.url, "whole"))}
            runs["cut"] = await _sft_edge(*train_args(server.url, "cut"),
                                          interrupt_when=tmp_path / "cut" / "step-00000010")
            runs["resumed"] = await _sft_edge(*train_args(server.url, "cut"))
            runs["eval"] = await _sft_edge("eval", "--bundle", str(tiny_bundle.root), "--cloud", server.url,
                                           "--session", "cut", "--checkpoint-dir", str(tmp_path / "cut"),
                                           "--eval-file", str(test_file), "--no-progress")
            for name in ("whole", "cut"):  # equal predictions: the cloud halves ended equal too
                runs[f"predict-{name}"] = await _sft_edge(
                    "predict", "--bundle", str(tiny_bundle.root), "--cloud", server.url, "--session", name,
                    "--checkpoint-dir", str(tmp_path / name), "--input", str(test_file),
                    "--out", str(tmp_path / f"{name}.jsonl"))
        return runs

    runs = asyncio.run(scenario())
    assert runs["whole"][0] == 0, runs["whole"][1]
    assert runs["cut"][0] == 130, runs["cut"][1]
    assert "interrupted; rerun the same command" in runs["cut"][1]
    assert runs["resumed"][0] == 0, runs["resumed"][1]
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "cut.json").read_text())
    assert whole["first_step"] == 1 and whole["last_step"] == resumed["last_step"] == 40
    assert resumed["first_step"] in (11, 16, 21, 26, 31, 36)  # after the last checkpoint before the interrupt
    assert resumed["losses"] == whole["losses"][resumed["first_step"] - 1:]

    edge_whole = _final_edge_weights(tiny_bundle, tmp_path / "whole")
    edge_cut = _final_edge_weights(tiny_bundle, tmp_path / "cut")
    for name, value in edge_whole.items():
        np.testing.assert_array_equal(edge_cut[name], value, err_msg=name)
    code, output = runs["eval"]
    assert code == 0, output
    assert re.search(r"test\.tsv \(32 rows\): accuracy [01]\.\d{4}, macro_f1 .*, mcc .*, f1 ", output), output
    for name in ("whole", "cut"):
        code, output = runs[f"predict-{name}"]
        assert code == 0 and "wrote 32 predictions" in output, output
    predictions = [json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert [p["text"] for p in predictions] == [line.split("\t")[2] for line in test_file.read_text().splitlines()[1:]]
    assert {p["label"] for p in predictions} <= {"0", "1"} and all(0.5 <= p["score"] <= 1 for p in predictions)


def test_help_shows_a_worked_example_without_torch():
    result = subprocess.run([sys.executable, "-c", NO_TORCH, "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--label-threshold" in result.stdout and "sft-edge train --bundle" in result.stdout


def test_prediction_rows_name_the_label_and_its_probability():
    data = TextData(["good", "bad"], ["p1", "p2"], None)
    logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0 - np.log(4.0)]], dtype=np.float32)
    rows = prediction_rows(data, logits, LabelMap("classification", ("neg", "pos")))
    assert [(r["text"], r["text_pair"], r["label"]) for r in rows] == [("good", "p1", "pos"), ("bad", "p2", "neg")]
    assert [r["score"] for r in rows] == pytest.approx([0.75, 0.8], abs=1e-6)
    regression = prediction_rows(TextData(["x"], None, None), np.array([[2.5]], dtype=np.float32), LabelMap("regression"))
    assert regression == [{"text": "x", "label": 2.5, "score": 2.5}]


def test_sentence_pairs_reach_the_model_through_sft_edge_train_and_predict(tiny_bundle, tmp_path):
    """``--text-pair-column``: both texts go in as one pair (segment ids 0 and 1), so segment 1's
    token-type embedding trains; without it segment 1 never occurs and that row only decays."""
    from cloud_backend.server import serve_cloud
    from safetensors.numpy import load_file

    rows = [line.split("\t") for line in movie_reviews_path().read_text(encoding="utf-8").splitlines()[1:33]]
    pairs = list(zip(rows, rows[1:] + rows[:1]))  # each review with the next one as its second text
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"premise": a[2], "hypothesis": b[2], "label": int(float(a[1]) > 0)}) + "\n"
                            for a, b in pairs), encoding="utf-8")
    lr, steps = 1e-3, 4

    def train_args(url: str, name: str, *extra: str) -> list[str]:
        return ["train", "--bundle", str(tiny_bundle.root), "--cloud", url, "--session", name, "--data", str(data),
                "--checkpoint-dir", str(tmp_path / name), "--text-column", "premise", "--label-column", "label",
                "--batch-size", "8", "--epochs", "1", "--lr", str(lr), "--threads", "1", "--no-progress", *extra]

    async def scenario() -> list[tuple[int, str]]:
        async with serve_cloud(load_bundle(tiny_bundle.root, parts=["cloud"]), port=0, device="cpu") as server:
            return [await _sft_edge(*train_args(server.url, "pair", "--text-pair-column", "hypothesis")),
                    await _sft_edge(*train_args(server.url, "single")),
                    await _sft_edge("predict", "--bundle", str(tiny_bundle.root), "--cloud", server.url,
                                    "--session", "pair", "--checkpoint-dir", str(tmp_path / "pair"),
                                    "--input", str(data), "--text-column", "premise",
                                    "--text-pair-column", "hypothesis", "--out", str(tmp_path / "pred.jsonl"))]

    for code, output in asyncio.run(scenario()):
        assert code == 0, output
    initial = load_file(str(tiny_bundle.edge_file("weights")))["embeddings.token_type.weight"][1]
    moved = {name: float(np.abs(_final_edge_weights(tiny_bundle, tmp_path / name)["embeddings.token_type.weight"][1]
                                - initial).max()) for name in ("pair", "single")}
    assert moved["pair"] > 0.5 * lr, moved  # Adam steps of ~lr: segment 1 had gradients
    assert moved["single"] < 0.01 * lr * steps, moved  # weight decay alone (lr · 0.01 · |w| a step)
    predictions = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [(p["text"], p["text_pair"]) for p in predictions] == [(a[2], b[2]) for a, b in pairs]
