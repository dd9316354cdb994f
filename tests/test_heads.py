"""The calibrated compression heads, healing, the fidelity report and ``--calibration-text``.

The heads are checked where their algebra says they must be exact (full rank) or optimal
(the whitened SVD against the paper's SVD on the calibration tokens); the export checks run
``sft-export`` itself. Every head's edge gradients and over-the-wire training are checked
in ``test_edge_engines.py`` and ``test_end_to_end.py`` (parametrised by ``bundles.HEADS``).
"""

from __future__ import annotations

import json

import pytest
import torch
from bundles import cli_args
from conftest import calibration_text_path, movie_reviews_path

from edge_runtime.tokenizer import EdgeTokenizer
from exporter.calibration import Calibration, read_calibration_text
from exporter.cli import main as export_main
from models import SplitSpec, build_split, load_encoder
from models.fidelity import fidelity_report
from models.healing import heal
from models.heads import original_split_ffn, split_inputs
from splitwire.exit_codes import FAILED

ROWS = 96


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_encoder(str(minilm_dir))


@pytest.fixture(scope="module")
def calibration(minilm_dir) -> Calibration:
    """NYT editorial snippets, tokenized at length 32 (a quarter held out)."""
    texts = read_calibration_text(calibration_text_path(), column="text")[:ROWS]
    return Calibration(texts, EdgeTokenizer(minilm_dir / "tokenizer.json", max_length=32, pad_id=0))


@pytest.fixture(scope="module")
def reviews(minilm_dir) -> list[dict[str, torch.Tensor]]:
    """Other text than the calibration's: movie-review snippets."""
    texts = read_calibration_text(movie_reviews_path(), column="text")[:16]
    inputs, _ = EdgeTokenizer(minilm_dir / "tokenizer.json", max_length=32, pad_id=0).encode(texts)
    return [{k: torch.from_numpy(v) for k, v in inputs.feeds().items()}]


def _split(minilm, calibration, head: str, rank: int):
    spec = SplitSpec(3, rank, 2, head=head)
    model = build_split(minilm.spec, minilm.weights, spec, calibration=calibration.fit).eval()
    return model, original_split_ffn(minilm.spec, minilm.weights, spec), spec


@torch.no_grad()
def test_full_rank_principal_head_reproduces_the_original_layer(minilm, calibration, reviews):
    model, original, _ = _split(minilm, calibration, "principal", minilm.spec.hidden_size)
    feeds = reviews[0]
    h = model.edge.split_input(**feeds)
    got, want = model.cloud.split_ffn(model.edge(**feeds)), original(h)
    real = feeds["attention_mask"].bool()
    assert float((got - want)[real].abs().max() / want[real].abs().max()) <= 1e-4
    report = fidelity_report(model, original, reviews)
    assert report["split_output"]["cosine"] >= 0.9999 and report["split_output"]["relative_error"] <= 1e-4
    assert report["pooled"]["cosine"] >= 0.9999 and report["pooled"]["relative_error"] <= 1e-4


@torch.no_grad()
def test_activation_svd_is_the_best_rank_r_map_of_the_calibration_inputs(minilm, calibration):
    """Lower error of the FFN pre-activation on the calibration tokens than the paper's SVD; exact at full rank."""
    w1, b1 = minilm.weights["layers.2.ffn.dense_in.weight"], minilm.weights["layers.2.ffn.dense_in.bias"]

    def pre_activation_error(head: str, rank: int) -> float:
        model, _, _ = _split(minilm, calibration, head, rank)
        h = split_inputs(model.edge, calibration.fit)
        got = model.cloud.split_ffn.decompression(model.edge.head(h))
        want = h @ w1.T + b1
        return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))

    assert pre_activation_error("activation-svd", 8) < 0.9 * pre_activation_error("svd", 8)
    assert pre_activation_error("activation-svd", minilm.spec.hidden_size) <= 1e-4


def test_healing_moves_the_split_layer_toward_the_original(minilm, calibration):
    model, original, _ = _split(minilm, calibration, "principal", 8)
    before = fidelity_report(model, original, calibration.held_out)["split_output"]
    losses = heal(model, original, split_inputs(model.edge, calibration.fit), steps=40, tokens_per_step=256)
    after = fidelity_report(model, original, calibration.held_out)["split_output"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert after["cosine"] > before["cosine"] + 0.01 and after["relative_error"] < before["relative_error"]


def _export(tmp_path, tiny_model_dir, **options) -> tuple[int, str]:
    out = tmp_path / "bundle"
    code = export_main(cli_args(tiny_model_dir, out, split=3, rank=8, init="random", max_length=32, **options))
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))  # no bundle, no staging left behind
    return code


@pytest.mark.parametrize("problem", ["missing", "empty", "blank lines", "not UTF-8", "a directory", "no column"])
def test_export_with_a_bad_calibration_file_fails_clearly_and_writes_no_bundle(
    tmp_path, tiny_model_dir, capsys, problem
):
    path = tmp_path / "public.txt"
    column = None
    if problem == "empty":
        path.write_text("")
    elif problem == "blank lines":
        path.write_text("\n  \n\t\n")
    elif problem == "not UTF-8":
        path.write_bytes(b"caf\xe9 au lait\n" * 20)
    elif problem == "a directory":
        path.mkdir()
    elif problem == "no column":
        path.write_text("id\tsentence\n" + "".join(f"{i}\tsome public text\n" for i in range(20)))
        column = "text"
    code = _export(tmp_path, tiny_model_dir, head="principal", calibration_text=path, calibration_column=column)
    message = capsys.readouterr().err
    expected = {"missing": "no such file", "empty": "no text in it", "blank lines": "no text in it",
                "not UTF-8": "not UTF-8", "a directory": "not a file", "no column": "'text'"}[problem]
    assert code == FAILED and "--calibration-text" in message and expected in message, message


@pytest.mark.parametrize("options", [{"head": "principal"}, {"heal_steps": 10}])
def test_calibrated_heads_and_healing_need_calibration_text(tmp_path, tiny_model_dir, capsys, options):
    assert _export(tmp_path, tiny_model_dir, **options) == FAILED
    assert "needs --calibration-text FILE" in capsys.readouterr().err


def test_manifest_records_the_fidelity_report(tmp_path, tiny_model_dir):
    """Plain lines as calibration text; at full rank the principal head is exact, and so is the recorded report."""
    path = tmp_path / "public.txt"
    path.write_text("\n".join(read_calibration_text(calibration_text_path(), column="text")[:64]))
    out = tmp_path / "principal"
    assert export_main(cli_args(tiny_model_dir, out, split=3, rank=32, init="random", max_length=32,
                                head="principal", calibration_text=path, heal_steps=3)) == 0
    section = json.loads((out / "manifest.json").read_text())["compression"]
    assert section["head"] == "principal" and section["heal_steps"] == 3
    assert section["calibration"]["file"] == "public.txt" and section["calibration"]["rows"] == 64
    assert section["rows"] == {"calibration": 48, "held_out": 16}
    exact = {"cosine": 1.0, "relative_error": 0.0}
    assert section["fidelity_before_healing"]["split_output"] == exact
    assert section["fidelity_before_healing"]["pooled"] == exact
    assert section["fidelity"]["rows"] == 16 and -1.0 <= section["fidelity"]["split_output"]["cosine"] <= 1.0



def test_split_spec_names_its_head_and_old_manifests_mean_the_papers(minilm):
    old = {"split": 3, "rank": 8, "num_labels": 2, "link_elimination": True}
    assert SplitSpec.from_dict(old).head == "svd" and not SplitSpec.from_dict(old).rebuilds_residual
    assert SplitSpec.from_dict(old | {"head": "principal"}).rebuilds_residual
    with pytest.raises(ValueError, match="compression head 'pca' is not known"):
        SplitSpec(3, 8, 2, head="pca").validate(minilm.spec)
    with pytest.raises(ValueError, match="needs a rank"):
        SplitSpec(3, None, 2, link_elimination=False, head="principal").validate(minilm.spec)
