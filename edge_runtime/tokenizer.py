"""Texts → an ``EdgeBatch`` with the bundle's own tokenizer (the ``tokenizers`` library, no transformers).

Why it exists: the edge graphs expect exactly the ids, masks and positions the exported
model was traced with. ``tokenizer.json`` files may carry a built-in padding and
truncation (the packaged MiniLM pads every row to 128) that the ``tokenizers`` library
applies silently, so both are set here explicitly: truncation to the bundle's
``max_length`` (longest-first for pairs) and right padding to the batch's longest row.

Each family's own conventions come with its ``tokenizer.json``: WordPiece with
``[CLS] a [SEP] b [SEP]`` for BERT, DistilBERT and ELECTRA, byte-level BPE with
``<s> a </s></s> b </s>`` for RoBERTa. A model with one token type (RoBERTa) or none
(DistilBERT) gets type ids of 0 whatever the post-processor says, as Hugging Face feeds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from edge_runtime.engine import EdgeBatch
from splitwire.bundle import Bundle, BundleError

class EdgeTokenizer:
    """Encodes a batch of texts (or text pairs) into the edge's int64 inputs and int32 lengths."""

    def __init__(self, path: str | Path, *, max_length: int, pad_id: int, token_types: bool = True) -> None:
        self.tokenizer = Tokenizer.from_file(str(path))
        self.token_types = token_types
        pad_token = self.tokenizer.id_to_token(pad_id)
        if pad_token is None:
            raise BundleError(f"{path}: the tokenizer has no token with the pad id {pad_id}")
        self.max_length = max_length
        self.pad_id, self.pad_token = pad_id, pad_token
        self.tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        self._pad()

    def _pad(self) -> None:
        self.tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_type_id=0, pad_token=self.pad_token,
                                      length=None)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "EdgeTokenizer":
        """From the manifest's ``tokenizer`` section: ``file`` and ``pad_id``; ``max_length`` is the bundle's."""
        settings = bundle.manifest.tokenizer
        return cls(bundle.path(settings.file), max_length=bundle.max_length, pad_id=settings.pad_id,
                   token_types=int(bundle.encoder["type_vocab_size"]) > 1)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> tuple[EdgeBatch, np.ndarray]:
        """``(batch, lengths)``: ``B×L`` int64 inputs with ``L`` the longest row, and int32 real-token counts."""
        if not texts:
            raise ValueError("cannot encode an empty batch")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        encodings = self.tokenizer.encode_batch(inputs)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        token_type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        if not self.token_types:
            token_type_ids[:] = 0
        b, length = input_ids.shape
        position_ids = np.broadcast_to(np.arange(length, dtype=np.int64), (b, length)).copy()
        lengths = attention_mask.sum(axis=1).astype(np.int32)
        return EdgeBatch(input_ids, attention_mask, token_type_ids, position_ids), lengths

    def lengths(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Real tokens per row (after truncation), without building padded batches."""
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        self.tokenizer.no_padding()
        try:
            return np.array([len(e.ids) for e in self.tokenizer.encode_batch(inputs)], dtype=np.int64)
        finally:
            self._pad()
