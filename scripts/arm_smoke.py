"""The host-side (x86, dev venv) steps of ``scripts/arm_smoke.sh``: make its inputs, judge its outputs.

Why it exists: the ARM smoke test needs a small ``--engine onnx`` bundle and a small labelled
file (exporting needs torch, so the host makes them), and a verdict on the two runs' final edge
checkpoints: every trainable parameter equal (``edge_parity``'s tolerances) and the same losses.

    python scripts/arm_smoke.py prepare WORK
    python scripts/arm_smoke.py compare X86_CHECKPOINTS ARM_CHECKPOINTS --reports X86.json ARM.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks.assets

from benchmarks.assets import minilm_path, movie_reviews_path  # noqa: E402
from edge_parity import compare as compare_parameters  # noqa: E402

ROWS = 64  # labelled rows in train.tsv: 8 steps of batch 8
# Tiny, so that several steps stay comparable: Adam turns a gradient element at the rounding level
# into a full ±lr step of the rounding's sign; at 1e-6 those steps move the next gradients far less
# than the moments' 1e-5 tolerance, which then checks every step's gradients on both machines.
LR = 1e-6
STATE_FILE = "edge/edge_state.safetensors"  # in a checkpoint: the onnx engine's parameters and moments


def review_rows(out: Path) -> None:
    """The first ``ROWS`` movie-review snippets (``text``, ``label``: 1 when the mean sentiment > 0)."""
    with movie_reviews_path().open(encoding="utf-8", errors="replace") as f, out.open("w", newline="") as g:
        writer = csv.writer(g, delimiter="\t")
        writer.writerow(["text", "label"])
        next(f)  # the header: id, sentiment, text
        for _, line in zip(range(ROWS), f):
            _, sentiment, text = line.rstrip("\n").split("\t", 2)
            writer.writerow([text, int(float(sentiment) > 0)])


def prepare(work: Path) -> None:
    from exporter.cli import main as export

    # The real MiniLM's first 2 layers: with a random init the biases start at 0, and after a few
    # Adam steps their relative error would measure gradient rounding, not a difference.
    model = minilm_path()
    args = ["--model", str(model), "--split", "2", "--rank", "8", "--max-length", "32",
            "--engine", "onnx", "--lr", str(LR), "--out", str(work / "bundle")]
    if export(args) != 0:
        sys.exit("arm_smoke: sft-export failed")
    review_rows(work / "train.tsv")


def final_state(checkpoints: Path) -> Path:
    found = sorted(checkpoints.glob("step-*"))
    if not found or not (found[-1] / STATE_FILE).is_file():
        sys.exit(f"arm_smoke: no onnx engine checkpoint under {checkpoints}")
    return found[-1] / STATE_FILE


def compare(x86: Path, arm: Path, reports: tuple[Path, Path]) -> bool:
    (x86_state, arm_state), (x86_report, arm_report) = (final_state(x86), final_state(arm)), reports
    print(f"x86_64 {x86_state.parent.parent.name}, aarch64 {arm_state.parent.parent.name}")
    if x86_state.parent.parent.name != arm_state.parent.parent.name:
        return False
    losses = [json.loads(r.read_text())["losses"] for r in (x86_report, arm_report)]
    print(f"losses x86_64 {[round(v, 6) for v in losses[0]]}\n       aarch64 {[round(v, 6) for v in losses[1]]}")
    loss_diff = max(abs(a - b) for a, b in zip(*losses)) if len(losses[0]) == len(losses[1]) else float("inf")
    print(f"max loss difference {loss_diff:.3g}")
    same = compare_parameters(arm_state, x86_state, lr=LR)
    return same and loss_diff <= 1e-5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare").add_argument("work", type=Path)
    check = commands.add_parser("compare")
    check.add_argument("x86", type=Path)
    check.add_argument("arm", type=Path)
    check.add_argument("--reports", type=Path, nargs=2, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.work)
        return 0
    return 0 if compare(args.x86, args.arm, tuple(args.reports)) else 1


if __name__ == "__main__":
    sys.exit(main())
