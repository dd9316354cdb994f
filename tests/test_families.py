"""Every supported encoder family is Hugging Face's model, tokenized as Hugging Face does, and exports.

Checkpoints are built offline (``families``): random weights from each family's own config
class, a tokenizer trained on the spot. The reference is transformers itself: its
sequence-classification model and its tokenizer loaded from the same directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILIES, NEW_FAMILIES, family_model_dir, family_options, make_sentence_transformers
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from bundles import export_cached
from edge_runtime.tokenizer import EdgeTokenizer
from exporter.cli import main
from models import SplitSpec, build_split, load_encoder
from models.split import has_fine_tuned_head
from splitwire.bundle import load_bundle
from splitwire.exit_codes import FAILED

TOL = 1e-5
TEXTS = ["A gorgeous, witty and moving film.", "Tedious.", "The cast is fine, but the script never finds its footing."]
PAIRS = ["One of the best films of the year.", "Far too long, and the ending falls flat on its face.", "Fine."]
SFT_EXPORT = Path(sys.executable).with_name("sft-export")


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def _edge_tokenizer(model_dir: Path, spec) -> EdgeTokenizer:
    return EdgeTokenizer(model_dir / "tokenizer.json", max_length=spec.positions, pad_id=spec.pad_token_id,
                         token_types=spec.type_vocab_size > 1)


def test_edge_tokenizer_encodes_texts_and_pairs_as_hugging_face(tmp_path_factory, family):
    family_dir = family_model_dir(tmp_path_factory, family)
    spec = load_encoder(str(family_dir), init="random").spec
    hf = AutoTokenizer.from_pretrained(family_dir)
    edge = _edge_tokenizer(family_dir, spec)
    for pairs in (None, PAIRS):
        want = hf(TEXTS, pairs, padding=True, return_tensors="np")
        got, lengths = edge.encode(TEXTS, pairs)
        np.testing.assert_array_equal(got.input_ids, want["input_ids"])
        np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])
        want_types = want.get("token_type_ids", np.zeros_like(want["input_ids"]))  # RoBERTa, DistilBERT: none
        np.testing.assert_array_equal(got.token_type_ids, want_types)
        np.testing.assert_array_equal(lengths, want["attention_mask"].sum(1))
    if spec.type_vocab_size > 1:  # BERT, ELECTRA: segment B is type 1
        assert set(edge.encode(TEXTS, PAIRS)[0].token_type_ids.ravel()) == {0, 1}


@torch.no_grad()
def test_full_rank_split_with_the_residual_equals_hugging_face(tmp_path_factory, family):
    """Split 2 of 3, SVD at full rank, residual link kept: hidden states and logits are HF's (the
    checkpoint's fine-tuned head comes along)."""
    family_dir = family_model_dir(tmp_path_factory, family)
    loaded = load_encoder(str(family_dir))
    spec = loaded.spec
    full_rank = min(spec.hidden_size, spec.intermediate_size)
    model = build_split(spec, loaded.weights, SplitSpec(2, full_rank, 2, link_elimination=False)).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(family_dir, attn_implementation="eager").eval()

    batch, _ = _edge_tokenizer(family_dir, spec).encode(TEXTS, PAIRS)
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds().items()}
    seen: dict[str, torch.Tensor] = {}
    model.edge.split_attention.register_forward_hook(lambda m, a, out: seen.update(h=out))
    model.cloud.pooler.register_forward_hook(lambda m, a, out: seen.update(last=a[0]))
    z = model.edge(**feeds)
    logits = model.cloud(z, feeds["attention_mask"], residual=seen["h"])

    hf_inputs = {"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]}
    if spec.type_vocab_size > 1:
        hf_inputs["token_type_ids"] = feeds["token_type_ids"]
    want = hf(**hf_inputs, output_hidden_states=True)
    real = feeds["attention_mask"].bool()
    assert (seen["last"][real] - want.hidden_states[-1][real]).abs().max() <= TOL
    assert (logits - want.logits).abs().max() <= TOL
    assert logits.abs().max() > 10 * TOL  # not vacuous: the head is not zero


def test_a_head_of_another_shape_is_drawn_new(tmp_path_factory, family):
    loaded = load_encoder(str(family_model_dir(tmp_path_factory, family)))  # fine-tuned with 2 labels
    model = build_split(loaded.spec, loaded.weights, SplitSpec(2, 4, 3))
    assert has_fine_tuned_head(build_split(loaded.spec, loaded.weights, SplitSpec(2, 4, 2)).cloud, loaded.weights)
    assert not has_fine_tuned_head(model.cloud, loaded.weights)
    assert not model.cloud.classifier.bias.detach().any()  # zeros, Hugging Face's initialisation


@pytest.mark.parametrize("engine", ["onnx", "ort-training"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_sft_export_writes_a_bundle_for_every_family(tmp_path_factory, family, engine):
    model_dir = family_model_dir(tmp_path_factory, family)
    bundle = load_bundle(export_cached(tmp_path_factory, model_dir, **family_options(engine)))
    expected = load_encoder(str(model_dir), init="random").spec
    assert bundle.encoder == expected.to_dict() and bundle.manifest["engine"] == engine
    assert bundle.manifest["tokenizer"]["pad_id"] == expected.pad_token_id
    log = bundle.root / "export.log"
    assert log.is_file() and "export.log" in bundle.manifest["files"]


def test_a_sentence_transformers_checkpoint_exports_with_mean_pooling(tmp_path_factory, tmp_path):
    bert = family_model_dir(tmp_path_factory, "bert")
    st_dir = tmp_path / "st"
    st_dir.mkdir()
    for item in bert.iterdir():
        (st_dir / item.name).symlink_to(item)
    make_sentence_transformers(st_dir)
    bundle = load_bundle(export_cached(tmp_path_factory, st_dir, **family_options("ort-training")))  # the quicker
    assert bundle.encoder["pooling"] == "mean"
    assert load_encoder(str(st_dir), pooling="cls").spec.pooling == "cls-pooler"  # the flag overrides

    loaded = load_encoder(str(st_dir))
    full_rank = min(loaded.spec.hidden_size, loaded.spec.intermediate_size)
    model = build_split(loaded.spec, loaded.weights, SplitSpec(2, full_rank, 2, link_elimination=False)).eval()
    assert not [n for n, _ in model.cloud.named_parameters() if n.startswith("pooler.")]
    batch, _ = _edge_tokenizer(st_dir, loaded.spec).encode(TEXTS)
    feeds = {k: torch.from_numpy(v) for k, v in batch.feeds().items()}
    seen: dict[str, torch.Tensor] = {}
    model.edge.split_attention.register_forward_hook(lambda m, a, out: seen.update(h=out))
    with torch.no_grad():
        pooled = model.cloud.pooled(model.edge(**feeds), feeds["attention_mask"], residual=seen["h"])
        hidden = AutoModel.from_pretrained(st_dir, attn_implementation="eager").eval()(
            **{k: feeds[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).last_hidden_state
    mask = feeds["attention_mask"][..., None].float()
    want = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
    assert (pooled - want).abs().max() <= TOL
    assert (pooled - hidden[:, 0]).abs().max() > 1e-2  # really the mean, not the first token


def test_an_unsupported_family_is_refused_naming_the_supported_ones(tmp_path_factory, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    tokenizer = family_model_dir(tmp_path_factory, "bert")
    assert main(["--model", str(tmp_path), "--split", "1", "--init", "random", "--tokenizer", str(tokenizer),
                 "--out", str(tmp_path / "out")]) == FAILED
    err = capsys.readouterr().err
    assert "architecture 'gpt2' is not supported" in err and "Traceback" not in err
    assert all(name in err for name in ("bert", "roberta", "xlm-roberta", "distilbert", "electra"))


def test_a_hub_id_offline_without_a_cache_names_the_id(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(SFT_EXPORT), "--model", "roberta-base", "--split", "2", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == FAILED and "Traceback" not in done.stderr
    assert "'roberta-base' is not a local directory and is not in the Hugging Face cache" in done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr
