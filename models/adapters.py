"""Architecture adapters: a Hugging Face encoder → ``EncoderSpec`` + canonical weights.

Why it exists: the split model is defined once (``models.blocks``); each architecture
family only needs to say how its config and parameter names map onto it: BERT (and the
BERT-layout MiniLM), RoBERTa (XLM-RoBERTa, CamemBERT), ELECTRA and DistilBERT are here;
another family is one more small ``Adapter`` registered in ``ADAPTERS``.

Canonical names: ``embeddings.{word,position,token_type,norm,project}.*``,
``layers.{i}.attention.{query,key,value,output,norm}.*``,
``layers.{i}.ffn.{dense_in,dense_out,norm}.*``, ``pooler.dense.*`` (BERT's pooler, or a
fine-tuned head's dense layer), ``classifier.*`` (a fine-tuned head's classifier).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from models.spec import EncoderSpec


@dataclass(frozen=True)
class Adapter:
    """How one architecture family's config and state-dict names map to ours."""

    spec_from_config: Callable[[Any], EncoderSpec]
    renames: tuple[tuple[str, str], ...]  # (regex on the HF name, replacement)

    def canonical_weights(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in hf_state.items():
            for pattern, repl in self.renames:
                new, hits = re.subn(pattern, repl, name)
                if hits:
                    out[new] = tensor.detach().clone()
                    break
        return out


def _absolute_positions(config: Any) -> None:
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"position_embedding_type {kind!r} is not supported (absolute only)")


def _bert_spec(config: Any, **family: Any) -> EncoderSpec:
    """BERT's config names; ``family`` overrides what a BERT-layout family does differently."""
    _absolute_positions(config)
    return EncoderSpec(**{
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "max_positions": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": float(config.layer_norm_eps),
        "hidden_act": config.hidden_act,
        "pad_token_id": config.pad_token_id if config.pad_token_id is not None else 0,
        "hidden_dropout": float(config.hidden_dropout_prob),
        "attention_dropout": float(config.attention_probs_dropout_prob),
        "head_dropout": _optional_float(getattr(config, "classifier_dropout", None)),
        **family,
    })


def _roberta_spec(config: Any) -> EncoderSpec:
    """Positions count from ``padding_idx + 1`` (HF ``create_position_ids_from_input_ids``); the <s> head."""
    return _bert_spec(config, position_offset=config.pad_token_id + 1, pooling="cls-tanh")


def _electra_spec(config: Any) -> EncoderSpec:
    """Embeddings of ``embedding_size``, projected to ``hidden_size`` when they differ; a GELU <s> head."""
    width = config.embedding_size
    return _bert_spec(config, embedding_size=None if width == config.hidden_size else width, pooling="cls-gelu")


def _distilbert_spec(config: Any) -> EncoderSpec:
    """DistilBERT: no token types, LayerNorm eps fixed at 1e-12 in its code, pre_classifier + ReLU head."""
    if getattr(config, "sinusoidal_pos_embds", False):
        raise ValueError("DistilBERT with sinusoidal_pos_embds is not supported (learned positions only)")
    return EncoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_layers=config.n_layers,
        num_heads=config.n_heads,
        intermediate_size=config.hidden_dim,
        max_positions=config.max_position_embeddings,
        type_vocab_size=0,
        layer_norm_eps=1e-12,
        hidden_act=config.activation,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        hidden_dropout=float(config.dropout),
        attention_dropout=float(config.attention_dropout),
        pooling="cls-relu",
        head_dropout=float(config.seq_classif_dropout),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _prefixed(prefix: str, layer: str, embeddings: dict[str, str],
              layers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Renames under the base-model ``prefix`` of a task checkpoint (``bert.``, ``roberta.``…): embeddings
    ``name → ours``, and per-layer ``name → ours`` under ``layer`` (a pattern that captures the layer index)."""
    p = rf"^(?:{re.escape(prefix)})?"
    return tuple((p + re.escape(src) + r"\.", f"{dst}.") for src, dst in embeddings.items()) + tuple(
        (p + layer + src + r"\.", rf"layers.\1.{dst}.") for src, dst in layers.items())


def _bert_layout(prefix: str, *, pooler: bool) -> tuple[tuple[str, str], ...]:
    """BERT's parameter names, under the base-model ``prefix`` of a task checkpoint."""
    return _prefixed(prefix, r"encoder\.layer\.(\d+)\.", {
        "embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
        "embeddings.token_type_embeddings": "embeddings.token_type", "embeddings.LayerNorm": "embeddings.norm",
        "embeddings_project": "embeddings.project", **({"pooler.dense": "pooler.dense"} if pooler else {}),
    }, {
        r"attention\.self\.(query|key|value)": r"attention.\2", r"attention\.output\.dense": "attention.output",
        r"attention\.output\.LayerNorm": "attention.norm", r"intermediate\.dense": "ffn.dense_in",
        r"output\.dense": "ffn.dense_out", r"output\.LayerNorm": "ffn.norm",
    })


# A fine-tuned sequence-classification head: the dense layer before the classifier (RoBERTa's and
# ELECTRA's ``classifier.dense``, DistilBERT's ``pre_classifier``; BERT's is its pooler) and the classifier.
_BERT_HEAD = ((r"^classifier\.", "classifier."),)
_ROBERTA_HEAD = ((r"^classifier\.dense\.", "pooler.dense."), (r"^classifier\.out_proj\.", "classifier."))
_DISTIL_HEAD = ((r"^pre_classifier\.", "pooler.dense."), (r"^classifier\.", "classifier."))

BERT = Adapter(spec_from_config=_bert_spec, renames=_bert_layout("bert.", pooler=True) + _BERT_HEAD)
ROBERTA = Adapter(spec_from_config=_roberta_spec, renames=_bert_layout("roberta.", pooler=False) + _ROBERTA_HEAD)
ELECTRA = Adapter(spec_from_config=_electra_spec, renames=_bert_layout("electra.", pooler=False) + _ROBERTA_HEAD)
DISTILBERT = Adapter(spec_from_config=_distilbert_spec, renames=_DISTIL_HEAD + _prefixed(
    "distilbert.", r"transformer\.layer\.(\d+)\.", {
        "embeddings.word_embeddings": "embeddings.word", "embeddings.position_embeddings": "embeddings.position",
        "embeddings.LayerNorm": "embeddings.norm",
    }, {
        r"attention\.q_lin": "attention.query", r"attention\.k_lin": "attention.key",
        r"attention\.v_lin": "attention.value", r"attention\.out_lin": "attention.output",
        r"sa_layer_norm": "attention.norm", r"ffn\.lin1": "ffn.dense_in", r"ffn\.lin2": "ffn.dense_out",
        r"output_layer_norm": "ffn.norm",
    }))

# model_type (config.json) → adapter. CamemBERT is the RoBERTa layout under another name.
ADAPTERS: dict[str, Adapter] = {
    "bert": BERT,
    "roberta": ROBERTA,
    "xlm-roberta": ROBERTA,
    "camembert": ROBERTA,
    "electra": ELECTRA,
    "distilbert": DISTILBERT,
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}. "
            "Add an Adapter in models/adapters.py."
        ) from None
