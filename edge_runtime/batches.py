"""The data order and the batches of a run: a pure function of (seed, epoch).

Why it exists: an in-process PyTorch reference, a run resumed after a crash and a run
rewound to meet the cloud must see exactly the same batches in the same steps. Each
epoch visits every row once in a seeded order (optionally grouped by length to cut
padding); a step's batch depends on nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edge_runtime.data import TextData
from edge_runtime.engine import EdgeBatch
from edge_runtime.tokenizer import EdgeTokenizer


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(num_examples)`` that epoch ``epoch`` (0-based) visits."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def planned_steps(num_examples: int, *, batch_size: int, epochs: int, max_steps: int | None = None) -> int:
    total = epochs * math.ceil(num_examples / batch_size)
    return total if max_steps is None else min(total, max_steps)


# Batches per length group: rows are sorted by length inside groups of this many batches.
LENGTH_GROUP_BATCHES = 50


def epoch_batches(num_examples: int, *, batch_size: int, seed: int, epoch: int,
                  lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """The index batches of one epoch, in the order they are trained.

    With ``lengths`` (tokens per example), rows are grouped by length: the epoch's
    permutation is cut into groups of ``LENGTH_GROUP_BATCHES`` batches, each group sorted
    by length and cut into batches, and the batches shuffled. Every row is still seen once
    an epoch, in as many steps, with far less padding (half the compute and traffic on the
    movie-review snippets).
    """
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    group = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, num_examples, group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in shuffle]


def batch_plan(
    num_examples: int, *, batch_size: int, epochs: int, seed: int, max_steps: int | None = None,
    lengths: np.ndarray | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(epoch, step, indices)`` for every step; steps are 1-based, an epoch's last batch may be short.

    ``lengths`` groups rows of similar length into batches (see ``epoch_batches``).
    """
    if num_examples < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"nothing to train: {num_examples} examples, batch size {batch_size}, {epochs} epochs")
    total = planned_steps(num_examples, batch_size=batch_size, epochs=epochs, max_steps=max_steps)
    step = 0
    for epoch in range(epochs):
        for indices in epoch_batches(num_examples, batch_size=batch_size, seed=seed, epoch=epoch, lengths=lengths):
            step += 1
            if step > total:
                return
            yield epoch, step, indices


@dataclass(frozen=True)
class TrainBatch:
    """What one training step sends: the edge inputs, real-token counts and the labels."""

    epoch: int
    step: int
    inputs: EdgeBatch
    lengths: np.ndarray
    labels: np.ndarray


def training_batches(
    data: TextData,
    tokenizer: EdgeTokenizer,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    max_steps: int | None = None,
    after_step: int = 0,
    group_by_length: bool = False,
) -> Iterator[TrainBatch]:
    """The tokenized batches of ``batch_plan``, starting after step ``after_step`` (a resume)."""
    if data.labels is None:
        raise ValueError("training needs labelled data")
    lengths = tokenizer.lengths(data.texts, data.pairs) if group_by_length else None
    for epoch, step, indices in batch_plan(len(data), batch_size=batch_size, epochs=epochs, seed=seed,
                                           max_steps=max_steps, lengths=lengths):
        if step <= after_step:
            continue
        part = data.subset(indices)
        inputs, lengths = tokenizer.encode(part.texts, part.pairs)
        yield TrainBatch(epoch, step, inputs, lengths, part.labels)
