"""The split model in PyTorch reproduces BERT, and its SVD head is the paper's decomposition."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from models import EncoderSpec, SplitSpec, build_full, build_split, load_encoder
from models.blocks import attention_bias
from models.split import default_position_ids


def _batch(seed: int = 0, b: int = 3, l: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (b, l), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids * mask, mask


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    """With BERT's pooler: the packaged MiniLM is a sentence-transformers checkpoint, mean-pooled by default."""
    return load_encoder(str(minilm_dir), pooling="cls")


def _upper_layers(model, h, mask):
    x = model.cloud.split_ffn(h)
    for layer in model.cloud.layers:
        x = layer(x, attention_bias(mask, x.dtype))
    return x


@torch.no_grad()
def test_vanilla_split_reproduces_hugging_face_bert(minilm, minilm_dir):
    hf = AutoModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    ids, mask = _batch()
    ref = hf(input_ids=ids, attention_mask=mask)
    for split in (1, 3, 6):
        model = build_split(minilm.spec, minilm.weights, SplitSpec(split, None, 2, link_elimination=False)).eval()
        h = model.edge(ids, mask, torch.zeros_like(ids), default_position_ids(ids))
        x = _upper_layers(model, h, mask)
        real = mask.bool()
        assert torch.allclose(x[real], ref.last_hidden_state[real], atol=1e-5), split
        assert torch.allclose(model.cloud.pooler(x, mask), ref.pooler_output, atol=1e-5)


@torch.no_grad()
def test_full_rank_svd_head_with_residual_reproduces_the_layer(minilm):
    ids, mask = _batch(1)
    args = (ids, mask, torch.zeros_like(ids), default_position_ids(ids))
    vanilla = build_split(minilm.spec, minilm.weights, SplitSpec(3, None, 2, link_elimination=False)).eval()
    full_rank = min(minilm.spec.hidden_size, minilm.spec.intermediate_size)
    sft = build_split(minilm.spec, minilm.weights, SplitSpec(3, full_rank, 2)).eval()
    h = vanilla.edge(*args)
    z = sft.edge(*args)
    original = vanilla.cloud.split_ffn(h)
    decomposed = sft.cloud.split_ffn(z, residual=h)
    assert (decomposed - original).abs().max() / original.abs().max() <= 1e-4
    # Link elimination: the same layer, minus the residual inside the LayerNorm.
    eliminated = sft.cloud.split_ffn(z)
    ffn = vanilla.cloud.split_ffn
    expected = ffn.norm(ffn.dense_out(ffn.act(ffn.dense_in(h))))
    assert (eliminated - expected).abs().max() / expected.abs().max() <= 1e-4
    assert (eliminated - original).abs().max() > 1e-2  # the residual really is gone


def test_rank_r_head_sends_r_values_per_token(minilm):
    ids, mask = _batch()
    model = build_split(minilm.spec, minilm.weights, SplitSpec(3, 8, 2))
    z = model.edge(ids, mask, torch.zeros_like(ids), default_position_ids(ids))
    assert z.shape == (3, 11, 8)
    trainable = {n for n, p in model.edge.named_parameters() if p.requires_grad}
    assert {"head.vt", "head.s"} <= trainable
    assert "split_ffn.decompression.u" in {n for n, _ in model.cloud.named_parameters()}


def test_plain_pytorch_loop_trains_both_halves(minilm):
    torch.manual_seed(0)
    model = build_split(minilm.spec, minilm.weights, SplitSpec(3, 8, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask = _batch()
    labels = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(5):
        loss = model.loss(model(ids, mask), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ("edge.embeddings.word.weight", "edge.head.vt", "cloud.split_ffn.decompression.u", "cloud.classifier.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_regression_head_uses_mse(minilm):
    model = build_split(minilm.spec, minilm.weights, SplitSpec(2, 4, 1))
    ids, mask = _batch()
    logits = model(ids, mask)
    assert logits.shape == (3, 1)
    labels = torch.tensor([0.5, -1.0, 2.0])
    assert torch.isclose(model.loss(logits, labels), ((logits.squeeze(-1) - labels) ** 2).mean())


def test_full_finetuning_baseline_has_all_layers_with_dropout(minilm):
    model = build_full(minilm.spec, minilm.weights, 2)
    assert len(model.edge.layers) == minilm.spec.num_layers - 1 and len(model.cloud.layers) == 0
    assert model.edge.embeddings.p_drop == minilm.spec.hidden_dropout


@pytest.mark.parametrize(
    "split,rank,message",
    [(0, 8, "split 0 is outside 1..6"), (7, 8, "split 7 is outside 1..6"), (3, 0, "rank 0 is outside 1..384"),
     (3, 385, "rank 385 is outside 1..384")],
)
def test_bad_split_or_rank_is_refused(minilm, split, rank, message):
    with pytest.raises(ValueError, match=message):
        build_split(minilm.spec, minilm.weights, SplitSpec(split, rank, 2))


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_encoder(str(tmp_path), init="random")


def test_random_init_preset_builds_bert_base_dims_offline():
    enc = load_encoder("bert-base-uncased", init="random")
    assert (enc.spec.hidden_size, enc.spec.num_layers, enc.spec.intermediate_size) == (768, 12, 3072)
    assert enc.source["init"] == "random"


def test_spec_round_trips_through_json():
    spec = EncoderSpec(30522, 32, 4, 4, 64, 128, 2, 1e-12, "gelu", 0, 0.1, 0.1)
    assert EncoderSpec.from_dict(spec.to_dict()) == spec


def test_a_manifest_written_before_the_family_fields_reads_as_bert():
    spec = EncoderSpec(30522, 32, 4, 4, 64, 128, 2, 1e-12, "gelu", 0, 0.1, 0.1)
    older = {k: v for k, v in spec.to_dict().items()
             if k not in ("pooling", "head_dropout", "position_offset", "embedding_size")}
    assert EncoderSpec.from_dict(older) == spec and spec.pooling == "cls-pooler" and spec.positions == 128
    with pytest.raises(KeyError, match="vocab_size"):  # a field without a default stays required
        EncoderSpec.from_dict({k: v for k, v in older.items() if k != "vocab_size"})
