"""Architecture adapters: a Hugging Face encoder → ``EncoderSpec`` + canonical weights.

Why it exists: the split model is defined once (``models.blocks``); each architecture
family only needs to say how its config and parameter names map onto it. BERT (and the
BERT-layout MiniLM) is here; a RoBERTa- or DistilBERT-style layout is another small
``Adapter`` registered in ``ADAPTERS``.

Canonical names: ``embeddings.{word,position,token_type,norm}.*``,
``layers.{i}.attention.{query,key,value,output,norm}.*``,
``layers.{i}.ffn.{dense_in,dense_out,norm}.*``, ``pooler.dense.*``.
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


def _bert_spec(config: Any) -> EncoderSpec:
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported (absolute only)")
    return EncoderSpec(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_positions=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=float(config.layer_norm_eps),
        hidden_act=config.hidden_act,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        hidden_dropout=float(config.hidden_dropout_prob),
        attention_dropout=float(config.attention_probs_dropout_prob),
    )


_BERT_LAYER = r"^(?:bert\.)?encoder\.layer\.(\d+)\."
BERT = Adapter(
    spec_from_config=_bert_spec,
    renames=(
        (r"^(?:bert\.)?embeddings\.word_embeddings\.", "embeddings.word."),
        (r"^(?:bert\.)?embeddings\.position_embeddings\.", "embeddings.position."),
        (r"^(?:bert\.)?embeddings\.token_type_embeddings\.", "embeddings.token_type."),
        (r"^(?:bert\.)?embeddings\.LayerNorm\.", "embeddings.norm."),
        (_BERT_LAYER + r"attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
        (_BERT_LAYER + r"attention\.output\.dense\.", r"layers.\1.attention.output."),
        (_BERT_LAYER + r"attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
        (_BERT_LAYER + r"intermediate\.dense\.", r"layers.\1.ffn.dense_in."),
        (_BERT_LAYER + r"output\.dense\.", r"layers.\1.ffn.dense_out."),
        (_BERT_LAYER + r"output\.LayerNorm\.", r"layers.\1.ffn.norm."),
        (r"^(?:bert\.)?pooler\.dense\.", "pooler.dense."),
    ),
)

ADAPTERS: dict[str, Adapter] = {"bert": BERT}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"architecture {model_type!r} is not supported; known: {', '.join(sorted(ADAPTERS))}. "
            "Add an Adapter in models/adapters.py."
        ) from None
