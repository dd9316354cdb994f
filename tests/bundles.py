"""Bundles exported once per test session, and what tests compare them against.

Why it exists: an export takes seconds, so every test file asks ``export_cached`` and gets
the same directory back for the same arguments. Exports run through ``sft-export``'s own
``main`` (in-process), so every bundle in the suite is made the way a user makes one.
Treat cached bundles as read-only: copy one (``copy_bundle``) before tampering with it.

Also here: the PyTorch reference ``EdgePart`` rebuilt from a bundle's manifest and initial
edge weights, and padded random edge batches.

Use from a test module::

    from bundles import export_cached, minilm_bundle, reference_edge  # noqa: F401 (fixtures)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.engine import EdgeBatch

_CACHE: dict[tuple, Path] = {}


def cli_args(model_dir: str | Path, out: Path, **options: Any) -> list[str]:
    """``sft-export`` arguments: ``split=3`` → ``--split 3``, ``force=True`` → ``--force``."""
    args = ["--model", str(model_dir), "--out", str(out)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (tuple, list)):
            args += [flag, *map(str, value)]
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def export_cached(tmp_path_factory: pytest.TempPathFactory, model_dir: str | Path, **options: Any) -> Path:
    """The bundle ``sft-export --model model_dir **options`` writes, exported once per session.

    ``options`` are the CLI's options with underscores: ``split=3, rank=8, init="random",
    engine="onnx", no_compression=True, freeze_embeddings=True, max_length=32``.
    """
    from exporter.cli import main

    key = (str(model_dir), tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in _CACHE:
        out = tmp_path_factory.mktemp("bundle") / "bundle"
        assert main(cli_args(model_dir, out, **options)) == 0
        _CACHE[key] = out
    return _CACHE[key]


def minilm_options(engine: str) -> dict[str, Any]:
    """The real pretrained MiniLM, split 3, rank 8."""
    return dict(split=3, rank=8, engine=engine)


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """The real pretrained MiniLM, split 3, rank 8, ``ort-training``."""
    return export_cached(tmp_path_factory, minilm_dir, **minilm_options("ort-training"))


def tiny_options(engine: str) -> dict[str, Any]:
    """The small export the engine tests share: 4-layer hidden-32 BERT, split 3, rank 8."""
    return dict(split=3, rank=8, init="random", max_length=32, engine=engine)


# Every compression head, as sft-export options (named as in benchmarks/accuracy.py); the calibrated ones read
# public text (``calibration_text_path``).
HEADS = ("svd", "activation-svd", "principal", "principal+heal")


def head_options(head: str) -> dict[str, Any]:
    """``sft-export`` options for ``head`` (``HEADS``): ``"principal+heal"`` adds 20 steps of healing."""
    from conftest import calibration_text_path

    if head == "svd":
        return {}
    kind = head.removesuffix("+heal")
    options = dict(head=kind, calibration_text=calibration_text_path(), calibration_column="text")
    return options | ({"heal_steps": 20} if head.endswith("+heal") else {})


def copy_bundle(bundle: Path, to: Path) -> Path:
    return Path(shutil.copytree(bundle, to))


def reference_edge(bundle_root: Path):
    """The PyTorch ``EdgePart`` with the bundle's initial edge weights (torch tests only)."""
    import torch
    from safetensors.numpy import load_file

    from models import EdgePart, EncoderSpec, SplitSpec
    from splitwire.bundle import load_bundle

    bundle = load_bundle(bundle_root, parts=["edge"])
    edge = EdgePart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split))
    adapters = bundle.manifest.edge.adapters
    if adapters is not None:  # LoRA: the adapted projections (their initial values come from the weights file)
        from models.lora import add_adapters

        add_adapters(edge, rank=adapters.rank, alpha=adapters.alpha)
    weights = load_file(str(bundle.edge_file("weights")))
    edge.load_state_dict({name: torch.from_numpy(array) for name, array in weights.items()})
    return edge


def reference_label_head(bundle_root: Path):
    """The PyTorch ``LabelHead`` with a label-private bundle's initial device head (torch tests only)."""
    import torch
    from safetensors.numpy import load_file

    from models import EncoderSpec, LabelHead, SplitSpec
    from splitwire.bundle import load_bundle
    from splitwire.manifest import LABEL_HEAD

    bundle = load_bundle(bundle_root, parts=["edge"])
    head = LabelHead(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split))
    head.load_state_dict({name: torch.from_numpy(a) for name, a in load_file(str(bundle.edge_file(LABEL_HEAD))).items()})
    return head


def padded_batch(rng: np.random.Generator, lengths: list[int], *, vocab: int = 30522, pad_id: int = 0,
                 types: int = 2) -> EdgeBatch:
    """One row per length, right-padded to the longest; random token types (of ``types``) for the real tokens."""
    b, l = len(lengths), max(lengths)
    mask = (np.arange(l)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    input_ids = np.where(mask == 1, rng.integers(min(1000, vocab // 2), vocab, (b, l)), pad_id).astype(np.int64)
    token_type_ids = (rng.integers(0, max(types, 1), (b, l)) * mask).astype(np.int64)
    position_ids = np.broadcast_to(np.arange(l, dtype=np.int64), (b, l)).copy()
    return EdgeBatch(input_ids, mask, token_type_ids, position_ids)


def upstream_gradient(rng: np.random.Generator, batch: EdgeBatch, width: int) -> np.ndarray:
    """A random ``dL/dz``, exactly zero at padding (as the cloud sends it)."""
    g = rng.standard_normal((*batch.shape, width)).astype(np.float32)
    return g * batch.attention_mask[..., None].astype(np.float32)


def bundle_batch(rng: np.random.Generator, lengths: list[int], bundle_root: Path) -> EdgeBatch:
    """``padded_batch`` within the bundle's vocabulary, pad id and token types."""
    from splitwire.bundle import load_bundle

    encoder = load_bundle(bundle_root, parts=["edge"]).encoder
    return padded_batch(rng, lengths, vocab=encoder["vocab_size"], pad_id=encoder["pad_token_id"],
                        types=encoder["type_vocab_size"])
