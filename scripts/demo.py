"""`make demo`: split fine-tuning end to end on this machine, with real model and real text.

Exports the packaged MiniLM (6 layers) split at layer 3 with a rank-8 compression head
(sft-export's defaults: the portable onnx edge engine, and mean pooling because the MiniLM is a
sentence-transformers checkpoint whose 1_Pooling/config.json says so),
starts `sft-cloud` on localhost, fine-tunes with `sft-edge` on the movie-review snippets
(a fixed-seed 90/10 train/test split; positive when the mean sentiment > 0), prints test
accuracy and the bytes per step each way, then measures the vanilla split (no
compression, full hidden activation) on the same first batches for the traffic ratio,
predicts a few sentences, and stops the servers. Everything it runs is the product's own
commands; every number it prints is measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's benchmarks.assets: where the offline model and text are

from benchmarks.assets import minilm_path, movie_reviews_path  # noqa: E402
from cloud_backend.launch import CloudDidNotStart, read_url, start_cloud  # noqa: E402
BIN = Path(sys.executable).parent
SEED = 0
VANILLA_STEPS = 5
SENTENCES = ["A gorgeous, witty and moving film.", "Tedious, predictable and far too long.",
             "The cast is fine, but the script never finds its footing.", "One of the best films of the year."]


def run(*cmd: str | Path) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def export(out: Path, *extra: str) -> None:
    if (out / "manifest.json").exists():
        print(f"(reusing bundle {out})")
        return
    run(BIN / "sft-export", "--model", minilm_path(), "--split", "3", "--max-length", "66", "--out", out, *extra)


@contextlib.contextmanager
def cloud(bundle: Path, state_dir: Path) -> Iterator[str]:
    """A real `sft-cloud` on an ephemeral localhost port; yields its URL, then stops it with SIGTERM."""
    log = open(state_dir.with_suffix(".log"), "w")
    proc = start_cloud([str(BIN / "sft-cloud"), "--bundle", str(bundle), "--port", "0", "--state-dir", str(state_dir),
                        "--device", "auto"], log=log)
    try:
        try:
            url = read_url(proc)
        except CloudDidNotStart:
            raise SystemExit(f"demo: sft-cloud did not start (see {log.name})") from None
        print(f"sft-cloud serving {bundle.name} at {url}", flush=True)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def train(bundle: Path, url: str, work: Path, session: str, report: Path, *extra: str) -> dict:
    shutil.rmtree(work / session, ignore_errors=True)
    run(BIN / "sft-edge", "train", "--bundle", bundle, "--cloud", url, "--session", session,
        "--data", movie_reviews_path(), "--text-column", "text", "--label-column", "sentiment", "--label-threshold", "0",
        "--holdout", "0.1", "--seed", str(SEED), "--batch-size", "32", "--group-by-length",
        "--checkpoint-dir", work / session, "--report", report, *extra)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of batch 32 (default 400: 1.3 epochs)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo", help="bundles, checkpoints, reports")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    sft_bundle, vanilla_bundle = work / "minilm-split3-rank8", work / "minilm-split3-vanilla"
    export(sft_bundle, "--rank", "8")
    export(vanilla_bundle, "--no-compression")

    with cloud(sft_bundle, work / "cloud-sft") as url:
        sft = train(sft_bundle, url, work, "sft", work / "sft.json", "--epochs", "2", "--max-steps", str(args.steps),
                    "--lr", str(args.lr), "--schedule", "linear", "--warmup", str(args.steps // 10))
        predictions = work / "predictions.csv"
        sentences = work / "sentences.csv"
        sentences.write_text("text\n" + "".join(json.dumps(s) + "\n" for s in SENTENCES))
        run(BIN / "sft-edge", "predict", "--bundle", sft_bundle, "--cloud", url, "--session", "sft",
            "--checkpoint-dir", work / "sft", "--input", sentences, "--out", predictions)
    with cloud(vanilla_bundle, work / "cloud-vanilla") as url:
        vanilla = train(vanilla_bundle, url, work, "vanilla", work / "vanilla.json", "--epochs", "1",
                        "--max-steps", str(VANILLA_STEPS), "--lr", str(args.lr), "--no-progress")
    summarize(sft, vanilla, predictions, time.perf_counter() - started)


def summarize(sft: dict, vanilla: dict, predictions: Path, seconds: float) -> None:
    metrics = sft["holdout_metrics"]
    same = slice(0, VANILLA_STEPS)  # the same batches: same seed, batch size and grouping
    sft_up = sum(u for u, _ in sft["step_bytes"][same]) / VANILLA_STEPS
    sft_down = sum(d for _, d in sft["step_bytes"][same]) / VANILLA_STEPS
    van_up = sum(u for u, _ in vanilla["step_bytes"][same]) / VANILLA_STEPS
    van_down = sum(d for _, d in vanilla["step_bytes"][same]) / VANILLA_STEPS
    print("\n=== splitft demo: MiniLM-L6 split at layer 3, SVD rank 8, link elimination, fp32 on the wire, "
          "onnx edge engine, mean pooling ===")
    print(f"trained {sft['last_step']} steps of 32 reviews in {sft['seconds']:.0f} s; "
          f"loss {sum(sft['losses'][:20]) / 20:.3f} (first 20 steps) -> {sum(sft['losses'][-20:]) / 20:.3f} (last 20)")
    print(f"test accuracy {metrics['accuracy']:.4f}  (macro-F1 {metrics['macro_f1']:.4f}, "
          f"MCC {metrics['mcc']:.4f}) on the 10% held-out reviews")
    print(f"bytes per step, mean of all steps: up {sft['bytes_up_per_step']['mean']:,.0f}, "
          f"down {sft['bytes_down_per_step']['mean']:,.0f}")
    print(f"on the first {VANILLA_STEPS} batches: split fine-tuning up {sft_up:,.0f} / down {sft_down:,.0f} bytes; "
          f"vanilla split up {van_up:,.0f} / down {van_down:,.0f} bytes: {van_up / sft_up:.1f}x less up, "
          f"{van_down / sft_down:.1f}x less down")
    print("predictions:")
    print(predictions.read_text().rstrip())
    print(f"demo finished in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
