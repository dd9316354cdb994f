"""Calibration text for ``sft-export``: fits the calibrated heads, heals the cut, measures fidelity.

Why it exists: the calibrated compression heads (``models.heads``), healing
(``models.healing``) and the fidelity report (``models.fidelity``) need the split layer's
input on real text. That text is *public* text chosen by whoever exports (for example
another corpus than the task's), read on the exporting machine before any device exists:
it is never the fine-tuning data, and nothing of a device's data is involved. The rows are
shuffled with a fixed seed; a quarter (at most ``HELD_OUT_MAX``) is held out and used only
for the fidelity report, the rest calibrates and heals.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from edge_runtime.data import Columns, DataError, read_table, table_texts
from edge_runtime.tokenizer import EdgeTokenizer
from exporter.bundle_writer import ExportError
from exporter.progress import Log
from models import EncoderSpec, SplitModel, SplitSpec
from models.fidelity import describe, fidelity_report
from models.healing import heal
from models.heads import original_split_ffn, split_inputs

MIN_ROWS = 8
MAX_ROWS = 1024  # enough for a hidden-768 covariance at ~30 tokens a row; an export stays seconds long
HELD_OUT_MAX = 256
BATCH = 32
_SEED = 0


def read_calibration_text(path: str | Path, *, column: str | None = None) -> list[str]:
    """Non-blank lines of a plain text file, or the ``column`` of a CSV/TSV/JSONL file.

    Raises ``ExportError`` naming the file when it is missing, unreadable, empty or too short.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"--calibration-text {path}: no such file")
    if not path.is_file():
        raise ExportError(f"--calibration-text {path}: not a file")
    try:
        if column is None:
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            texts = table_texts(read_table(path), Columns(text=column)).texts
    except UnicodeDecodeError as exc:
        raise ExportError(f"--calibration-text {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ExportError(f"--calibration-text {path}: cannot be read ({exc.strerror or exc})") from None
    except DataError as exc:
        raise ExportError(f"--calibration-text: {exc}") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ExportError(f"--calibration-text {path}: no text in it (empty, or only blank lines)")
    if len(texts) < MIN_ROWS:
        raise ExportError(f"--calibration-text {path}: {len(texts)} rows; at least {MIN_ROWS} are needed "
                          "(some to calibrate, some held out for the fidelity report)")
    return texts


def describe_source(path: str | Path, texts: list[str], column: str | None) -> dict:
    """What the manifest records of the calibration text: its name and hash, never its content."""
    return {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "column": column, "rows": len(texts)}


class Calibration:
    """Calibration rows tokenized into batches, split into a calibration and a held-out part."""

    def __init__(self, texts: list[str], tokenizer: EdgeTokenizer) -> None:
        order = np.random.default_rng(_SEED).permutation(len(texts))[:MAX_ROWS]
        held = min(HELD_OUT_MAX, max(1, len(order) // 4))
        self.fit = _batches([texts[i] for i in order[held:]], tokenizer)
        self.held_out = _batches([texts[i] for i in order[:held]], tokenizer)
        self.rows = {"calibration": len(order) - held, "held_out": held}

    @classmethod
    def from_tokenizer(cls, texts: list[str], tok: Tokenizer, *, spec: EncoderSpec, max_length: int) -> "Calibration":
        """Tokenized as the edge will tokenize (``EdgeTokenizer``), from the export's ``tokenizers`` object."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            tok.save(str(path))
            tokenizer = EdgeTokenizer(path, max_length=max_length, pad_id=spec.pad_token_id,
                                      token_types=spec.type_vocab_size > 1)
        return cls(texts, tokenizer)


def _batches(texts: list[str], tokenizer: EdgeTokenizer) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), BATCH):
        inputs, _ = tokenizer.encode(texts[start:start + BATCH])
        out.append({name: torch.from_numpy(a) for name, a in inputs.feeds().items()})
    return out


def heal_and_measure(model: SplitModel, encoder: EncoderSpec, weights: dict[str, torch.Tensor], spec: SplitSpec,
                     calibration: Calibration, *, heal_steps: int, log: Log) -> dict:
    """Heal ``model`` for ``heal_steps`` (0: not at all) and report fidelity before and after.

    Returns the manifest's ``compression`` section (less the calibration source).
    """
    original = original_split_ffn(encoder, weights, spec)
    section = {"head": spec.head, "heal_steps": heal_steps, "rows": calibration.rows}
    section["fidelity"] = fidelity_report(model, original, calibration.held_out)
    log(f"fidelity before training: {describe(section['fidelity'])}")
    if heal_steps:
        h = split_inputs(model.edge, calibration.fit)
        with tqdm(total=heal_steps, desc="sft-export: healing", unit="step", file=sys.stderr, mininterval=1.0) as bar:
            def advance(step: int, loss: float) -> None:
                bar.set_postfix(mse=f"{loss:.4f}", refresh=False)
                bar.update()

            losses = heal(model, original, h, steps=heal_steps, on_step=advance)
        section["healing"] = {"tokens": len(h), "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5)}
        section["fidelity_before_healing"] = section["fidelity"]
        section["fidelity"] = fidelity_report(model, original, calibration.held_out)
        log(f"fidelity after {heal_steps} healing steps: {describe(section['fidelity'])}")
    return section
