"""The fidelity report: how close the split model is to the pretrained one before any training.

Why it exists: a compression head that throws away what the pretrained layers compute
leaves the top layers to relearn it from the labels. Measured on held-out calibration
text (public text, never the fine-tuning data), the report compares the split model with
the original at two places: the split layer's output (the cloud's split FFN fed by ``z``
against the original FFN with its residual, at every real token) and the pooled sentence
vector the classifier reads. Cosine is the mean per token (per row for the pooled vector);
relative error is ``‖got − want‖ / ‖want‖`` over all of them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.nn import functional as F

from models.blocks import FeedForward
from models.split import SplitModel


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = got.double(), want.double()
    return {"cosine": round(float(F.cosine_similarity(got, want, dim=-1).mean()), 4),
            "relative_error": round(float(torch.linalg.norm(got - want) / torch.linalg.norm(want)), 4)}


@torch.no_grad()
def fidelity_report(model: SplitModel, original_ffn: FeedForward, batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """``{"split_output": {cosine, relative_error}, "pooled": {…}, "rows": n, "tokens": n}`` on ``batches``."""
    was_training = model.training
    model.eval()
    outputs, pooled = ([], []), ([], [])
    for feeds in batches:
        mask = feeds["attention_mask"]
        h = model.edge.split_input(**feeds)
        z = h if model.edge.head is None else model.edge.head(h)
        got, want = model.cloud.split_ffn(z), original_ffn(h)
        real = mask.bool()
        outputs[0].append(got[real])
        outputs[1].append(want[real])
        pooled[0].append(model.cloud.above_split(got, mask))
        pooled[1].append(model.cloud.above_split(want, mask))
    model.train(was_training)
    if not outputs[0]:
        raise ValueError("no held-out calibration batches")
    tokens, rows = (torch.cat(outputs[0]), torch.cat(outputs[1])), (torch.cat(pooled[0]), torch.cat(pooled[1]))
    return {"split_output": _compare(*tokens), "pooled": _compare(*rows), "rows": len(rows[0]), "tokens": len(tokens[0])}


def describe(report: dict) -> str:
    """One line: ``split output cos 0.55 (rel. err 0.93), pooled cos 0.74 (0.70), 256 held-out rows``."""
    s, p = report["split_output"], report["pooled"]
    return (f"split layer output cosine {s['cosine']:.3f} (relative error {s['relative_error']:.3f}), "
            f"pooled features cosine {p['cosine']:.3f} (relative error {p['relative_error']:.3f}), "
            f"on {report['rows']} held-out calibration rows")
