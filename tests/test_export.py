"""``sft-export``: the real MiniLM bundle trains a split step; user mistakes are clear CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bundles import cli_args, export_cached, minilm_bundle, tiny_options  # noqa: F401 (fixture)
from edge_runtime.engine import open_engine
from edge_runtime.tokenizer import EdgeTokenizer
from exporter.bundle_writer import staged_bundle
from exporter.cli import main
from models import CloudPart, EncoderSpec, SplitSpec
from splitwire.bundle import load_bundle
from splitwire.exit_codes import FAILED, USAGE

SFT_EXPORT = Path(sys.executable).with_name("sft-export")


def test_minilm_bundle_runs_one_split_training_step(minilm_bundle, minilm_dir):
    bundle = load_bundle(minilm_bundle)
    manifest = bundle.manifest
    assert manifest["split"] == {"split": 3, "rank": 8, "num_labels": 2, "link_elimination": True, "head": "svd",
                                 "label_private": False}
    assert manifest["base_model"]["id"] == str(minilm_dir) and manifest["base_model"]["init"] == "pretrained"
    assert manifest["format_version"] == 2 and not {"task", "wire"} & set(manifest)  # format 2: no dead fields
    assert manifest["optimizer"] == {"name": "adamw", "lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                     "weight_decay": 0.01, "moments": "fp32", "head_lr_scale": 1.0}
    assert manifest["edge"]["frozen"] == [] and set(manifest["edge"]) == {"files", "trainable", "frozen",
                                                                          "trained_layers", "adapters"}
    assert manifest.edge.trained_layers is None and manifest.edge.adapters is None
    assert manifest.optimizer.betas == (0.9, 0.999) and manifest.cloud.dropout

    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=False)
    cloud.load_state_dict(load_file(str(bundle.path(manifest["cloud"]["files"]["weights"]))))
    texts = ["a gripping, beautifully acted film", "dull and far too long", "fine"]
    batch, _ = EdgeTokenizer.from_bundle(bundle).encode(texts)
    engine = open_engine(bundle, threads=1)
    engine.set_learning_rate(1e-3)
    z = torch.from_numpy(engine.forward(batch)).requires_grad_()
    assert tuple(z.shape) == (*batch.shape, 8)
    loss = cloud.loss(cloud(z, torch.from_numpy(batch.attention_mask)), torch.tensor([1, 0, 1]))
    loss.backward()
    before = engine.parameters()
    engine.backward(z.grad.numpy())
    engine.optimizer_step()
    after = engine.parameters()
    assert set(after) == set(manifest["edge"]["trainable"])
    assert all(float(np.abs(engine.gradients()[n]).max()) > 0 for n in ("head.vt", "head.s", "embeddings.norm.weight"))
    assert float(np.abs(after["head.vt"] - before["head.vt"]).max()) > 1e-4


def test_frozen_embeddings_stay_out_of_training(tmp_path_factory, tiny_model_dir):
    root = export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training"), freeze_embeddings=True)
    bundle = load_bundle(root)
    frozen = ["embeddings.word.weight", "embeddings.position.weight", "embeddings.token_type.weight"]
    assert bundle.manifest["edge"]["frozen"] == frozen
    engine = open_engine(bundle, threads=1)
    assert set(engine.parameters()) == set(bundle.manifest["edge"]["trainable"])
    assert not set(frozen) & set(engine.parameters())


def _tiny_args(model_dir: Path, out: Path, **options) -> list[str]:
    return cli_args(model_dir, out, init="random", max_length=16, **options)


def test_refuses_to_overwrite_without_force(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(_tiny_args(tiny_model_dir, out, split=2)) == FAILED
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"

    assert main(_tiny_args(tiny_model_dir, out, split=2, force=True)) == 0
    assert not (out / "precious.txt").exists()
    assert load_bundle(out).split["split"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_bundle(out, force=False) as root:
            (root / "edge").mkdir()
            (root / "edge" / "half.onnx").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        ({"split": 5}, FAILED, "split 5 is outside 1..4 (the model has 4 encoder layers)"),
        ({"split": 2, "rank": 40}, FAILED, "rank 40 is outside 1..32"),
        ({"split": 2, "max_length": 500}, FAILED, "max_length 500 exceeds the model's 128 positions"),
        ({"split": 0}, USAGE, "argument --split: must be a positive integer"),
        ({"split": 2, "rank": 4, "no_compression": True}, USAGE, "not allowed with argument"),
    ],
)
def test_bad_arguments_are_clear_cli_errors(tiny_model_dir, tmp_path, capsys, options, code, message):
    try:
        returned = main(cli_args(tiny_model_dir, tmp_path / "out", init="random", **options))
    except SystemExit as exc:  # argparse's usage errors
        returned = exc.code
    assert returned == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_installed_command_reports_a_bad_split_without_a_traceback(tiny_model_dir, tmp_path):
    done = subprocess.run([str(SFT_EXPORT), *_tiny_args(tiny_model_dir, tmp_path / "out", split=9)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == FAILED
    assert "sft-export: error: split 9 is outside 1..4" in done.stderr
    assert "Traceback" not in done.stderr


def test_random_init_without_a_tokenizer_says_to_pass_one(tmp_path, tiny_model_dir, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    assert main(_tiny_args(config_only, tmp_path / "out", split=2)) == FAILED
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(_tiny_args(config_only, tmp_path / "out", split=2, tokenizer=tiny_model_dir)) == 0
    assert load_bundle(tmp_path / "out").manifest["tokenizer"]["pad_token"] == "[PAD]"


def test_export_of_the_packaged_minilm_is_quiet_and_keeps_the_chatter_in_the_bundle(minilm_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([str(SFT_EXPORT), "--model", str(minilm_dir), "--split", "1", "--max-length", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 30, lines
    assert all(line.startswith("sft-export: ") for line in done.stderr.splitlines())
    assert "pooling before the classifier: mean" in done.stderr  # its 1_Pooling/config.json says mean
    log = (out / "export.log").read_text()
    assert "nn_module_stack" in log  # the torch exporter's per-node notices, kept out of the terminal
    assert load_bundle(out).manifest["engine"] == "onnx"  # the default engine


def test_library_chatter_is_collected_and_errors_still_reach_stderr(capfd):
    import logging

    from exporter.progress import library_chatter

    with library_chatter() as chatter:
        logging.getLogger("torch.onnx._internal.exporter._core").warning("nn_module_stack not found for node 'x'")
        logging.getLogger("transformers.modeling_utils").error("a real problem")
    err = capfd.readouterr().err
    assert "nn_module_stack" in chatter.getvalue() and "a real problem" in chatter.getvalue()
    assert "nn_module_stack" not in err and "a real problem" in err
    logging.getLogger("torch.onnx").warning("after the export")
    assert "after the export" not in chatter.getvalue()  # outside, the libraries' own handlers are back


@pytest.mark.parametrize("options, message", [
    (dict(head_lr_scale=10.0, engine="ort-training"), "needs a compression head and the onnx engine"),
    (dict(head_lr_scale=10.0, no_compression=True), "needs a compression head"),
    (dict(head_lr_scale=0.0), "must be positive"),
])
def test_a_head_learning_rate_multiple_the_bundle_cannot_train_is_refused_and_writes_nothing(
        options, message, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_tiny_args(tiny_model_dir, out, split=2, **options)) == FAILED
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_head_learning_rate_multiple_is_recorded_for_both_halves(tmp_path_factory, tiny_model_dir):
    bundle = load_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"), head_lr_scale=4.0))
    optimizer = bundle.manifest.optimizer
    assert optimizer.head_lr_scale == 4.0
    assert set(optimizer.lr_scales("edge", bundle.manifest.edge.trainable)) == {"head.vt", "head.s"}
    assert optimizer.lr_scales("cloud", ["split_ffn.decompression.u", "split_ffn.dense_out.weight"]) == {
        "split_ffn.decompression.u": 4.0}
