"""Tiny checkpoints of every supported encoder family, built offline the way the hub ships them.

Why it exists: no hub is reachable here, so each family's checkpoint is made on the spot: a
Hugging Face sequence-classification model with random weights from its own config class,
saved with ``save_pretrained``, beside a tokenizer trained on real movie-review text with
``tokenizers`` (byte-level BPE with ``<s>``/``</s>`` for the RoBERTa layouts, WordPiece for
BERT, DistilBERT and ELECTRA) and saved through the family's transformers tokenizer class, so
that ``AutoTokenizer`` and ``AutoModel*`` load the directory as they would a downloaded one.
Configs are tiny (3 layers, hidden 32) with dropout 0.1, so the cloud's dropout RNG matters
in training comparisons.

Use from a test module::

    from families import FAMILIES, family_model_dir, family_options
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import movie_reviews_path

HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_LENGTH = 32, 3, 4, 64, 48
VOCAB = 600
DROPOUT = 0.1


@dataclass(frozen=True)
class Family:
    """One family's config class, tokenizer class, vocabulary style and config overrides."""

    config_class: str
    tokenizer_class: str
    vocabulary: str  # "bpe" (byte-level, RoBERTa), "unigram" (SentencePiece, XLM-R) or "wordpiece"
    config: dict[str, Any]


_BERT_DIMS = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
# RoBERTa positions start at padding_idx + 1 = 2, so its table has 2 rows more than the longest sequence.
_ROBERTA = dict(_BERT_DIMS, max_position_embeddings=MAX_LENGTH + 2, type_vocab_size=1, pad_token_id=1,
                bos_token_id=0, eos_token_id=2)
FAMILIES: dict[str, Family] = {
    "bert": Family("BertConfig", "BertTokenizerFast", "wordpiece", dict(_BERT_DIMS, max_position_embeddings=64)),
    "roberta": Family("RobertaConfig", "RobertaTokenizerFast", "bpe", _ROBERTA),
    "xlm-roberta": Family("XLMRobertaConfig", "XLMRobertaTokenizerFast", "unigram", _ROBERTA),
    "distilbert": Family("DistilBertConfig", "DistilBertTokenizerFast", "wordpiece",
                         dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
                              max_position_embeddings=64, dropout=DROPOUT, attention_dropout=DROPOUT,
                              seq_classif_dropout=0.2, pad_token_id=0)),
    "camembert": Family("CamembertConfig", "CamembertTokenizerFast", "unigram", _ROBERTA),  # RoBERTa's layout
    # A discriminator whose embeddings (16) are narrower than the encoder (32): the projection is exercised.
    "electra": Family("ElectraConfig", "ElectraTokenizerFast", "wordpiece",
                      dict(_BERT_DIMS, embedding_size=16, max_position_embeddings=64)),
}
# The families with their own code paths in the exporter and engines (CamemBERT's are RoBERTa's).
NEW_FAMILIES = ["roberta", "xlm-roberta", "distilbert", "electra"]


def review_texts(rows: int = 400) -> list[str]:
    lines = movie_reviews_path().read_text(encoding="utf-8", errors="replace").splitlines()[:rows]
    return [line.split("\t", 2)[2] for line in lines if line.count("\t") >= 2]


_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(vocabulary: str, texts: list[str]):
    """A ``tokenizers`` tokenizer with the family's special tokens, ids and pair template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocabulary == "unigram":  # as transformers converts XLM-R's SentencePiece model
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=_ROBERTA_SPECIALS,
                                                               unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    elif vocabulary == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=_ROBERTA_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def _special_tokens(vocabulary: str) -> dict[str, str]:
    if vocabulary != "wordpiece":
        return dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                    unk_token="<unk>", mask_token="<mask>")
    return dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")


def build_family_dir(name: str, root: Path, *, num_labels: int = 2, seed: int = 0) -> Path:
    """Write ``root`` as a downloaded checkpoint of family ``name`` (random weights) would look."""
    import torch
    import transformers

    family = FAMILIES[name]
    tok = train_tokenizer(family.vocabulary, review_texts())
    fast = getattr(transformers, family.tokenizer_class)(tokenizer_object=tok, **_special_tokens(family.vocabulary))
    fast.save_pretrained(root)
    config = getattr(transformers, family.config_class)(vocab_size=tok.get_vocab_size(), num_labels=num_labels,
                                                        **family.config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model.save_pretrained(root)
    return root


def make_sentence_transformers(model_dir: Path) -> Path:
    """Add what sentence-transformers writes beside a Transformer module: modules.json and mean Pooling."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (model_dir / "modules.json").write_text(json.dumps(modules))
    (model_dir / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return model_dir


_DIRS: dict[str, Path] = {}


def family_model_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The checkpoint directory of family ``name``, built once per session."""
    if name not in _DIRS:
        _DIRS[name] = build_family_dir(name, tmp_path_factory.mktemp(f"family-{name}") / "model")
    return _DIRS[name]


def family_options(engine: str) -> dict[str, Any]:
    """The export every family test shares: split 2 of 3, rank 4, lr 1e-3 (visible steps)."""
    return dict(split=2, rank=4, max_length=MAX_LENGTH, lr=1e-3, engine=engine)
