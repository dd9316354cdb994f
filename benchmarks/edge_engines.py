"""Edge cost of one training step: the ``onnx`` engine, the ``ort-training`` engine and plain PyTorch.

Why it exists: it answers whether the portable engine (ahead-of-time forward/backward
graphs on plain onnxruntime, numpy AdamW) is cheaper than onnxruntime-training's two-pass
step and no heavier than PyTorch. Each measurement is a fresh child process that loads its
engine, runs one warm-up step and then ``--steps`` timed steps of forward → backward(dz) →
AdamW on one fixed batch, and reports the median times and its peak RSS (``VmHWM`` from
``/proc/self/status``; ``ru_maxrss`` can carry a parent's high-water mark). Children
alternate between engines in every repeat so that drifting machine load hits all of them.

The ``onnx`` graphs have symbolic batch and length (no shape buckets), so a shorter batch
costs less; the grid's shapes show it (a bucketed engine would pay for the full length).

The ``ort-training`` engine recomputes the forward inside ``train_step`` (no call takes an
upstream gradient), so its backward column holds a second forward; the *recompute* column is
that engine's eval forward over the rest of its step: what a single-pass engine saves.

Settings (``SETTINGS``): what the edge trains, as ``sft-export`` flags: every weight, frozen
embeddings, bf16 AdamW moments, only the top edge layer (``--train-edge-layers 1``), and
that with bf16 moments, and LoRA adapters of rank 8 (``--edge-lora-rank 8``) with and
without bf16 moments. PyTorch does the same freezing (with its own float32 AdamW);
ort-training runs the first two. For each setting the table gives the step against PyTorch's
and against the all-trained step of the same engine, the peak RSS, the size of the edge
checkpoint (the onnx engine's saved state), and whether an onnx child trains inside a
``--cap`` memory cgroup on one core (``benchmarks.edge_budget``'s cap; needs root).

``--profile``: instead, where the onnx step's time goes. A child per setting runs the
forward and backward graphs (``AotGraphs``) with onnxruntime's profiler on and sums the
kernel time of every node by operator type over the timed steps (docs/bench/edge_profile.md).

Run: ``python -m benchmarks.edge_engines`` (bert-base dims with random weights, split 4,
rank 8, a batch × length grid). Writes docs/bench/edge_engines.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.assets import minilm_path
from benchmarks.report import ROOT, save_plot, write_section

KINDS = ("torch", "onnx", "ort-training")
SETTINGS = {  # what the edge trains: sft-export's options
    "all trained": {},
    "frozen embeddings": {"freeze_embeddings": True},
    "bf16 moments": {"edge_moments": "bf16"},
    "top 1 layer": {"train_edge_layers": 1},
    "top 1 layer + bf16 moments": {"train_edge_layers": 1, "edge_moments": "bf16"},
    "top 2 layers + bf16 moments": {"train_edge_layers": 2, "edge_moments": "bf16"},
    "LoRA rank 8": {"edge_lora_rank": 8},
    "LoRA rank 8 + bf16 moments": {"edge_lora_rank": 8, "edge_moments": "bf16"},
}
ORT_SETTINGS = ("all trained", "frozen embeddings")  # ort-training keeps float32 moments; the rest are onnx's
BASELINE = "all trained"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child == "profile":
        print(json.dumps(_profile_child(Path(args.bundle), threads=args.threads, steps=args.steps, batch=args.batch,
                                        length=args.length)))
        return
    if args.child:
        print(json.dumps(_child(args.child, Path(args.bundle), threads=args.threads, steps=args.steps,
                                batch=args.batch, length=args.length)))
        return
    shapes = [_shape(text) for text in args.grid]
    if args.profile:
        _profile(args, shapes[0])
        return
    runs, capped = [], {}
    for setting in args.settings:
        engines = ("onnx", "ort-training") if setting in ORT_SETTINGS else ("onnx",)
        bundles = {kind: _bundle(args, kind, setting=setting) for kind in engines}
        kinds = [k for k in KINDS if k in ("torch", *engines)]
        for repeat in range(args.repeats):
            for batch, length in shapes:
                for kind in kinds[repeat % len(kinds):] + kinds[:repeat % len(kinds)]:  # rotate who goes first
                    runs.append(_spawn(args, kind, bundles, batch=batch, length=length, setting=setting,
                                       repeat=repeat))
        if args.cap:
            capped[setting] = _capped(args, bundles["onnx"])
    _report(args, runs, shapes, capped)


def _shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base-uncased", help="model id (random weights from its config)")
    p.add_argument("--split", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--grid", nargs="+", default=["8x128"], help="batch x length cases (default 8x128)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="SETTING",
                   help=f"what the edge trains (default all): {'; '.join(SETTINGS)}")
    p.add_argument("--cap", default="512MiB",
                   help="also train each setting's onnx edge once at batch 8 x max-length on 1 core inside a memory "
                        "cgroup of this size (default 512MiB; 'none' to skip; needs root)")
    p.add_argument("--max-length", type=int, default=128, help="the bundles' max_length")
    p.add_argument("--threads", type=int, default=1, help="threads of every engine (default 1: a Pi core each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up step)")
    p.add_argument("--bundles", default=str(ROOT / "runs" / "bench" / "edge_engines"), help="export cache")
    p.add_argument("--profile", action="store_true",
                   help="instead: the onnx step's kernel time per operator type (onnxruntime's profiler), per setting, "
                        "at the first grid shape; writes docs/bench/edge_profile.md")
    p.add_argument("--child", choices=(*KINDS, "profile"), help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return p


def _bundle(args: argparse.Namespace, engine: str, *, setting: str) -> Path:
    """The bundle for ``engine`` and ``setting``, exported once into the cache directory."""
    from exporter.export import export_bundle

    slug = "" if setting == BASELINE else "-" + setting.replace(" + ", "-").replace(" ", "-")
    name = f"{Path(args.model).name}-s{args.split}-r{args.rank}-l{args.max_length}-{engine}{slug}"
    out = Path(args.bundles) / name
    if not (out / "manifest.json").is_file():
        export_bundle(model=args.model, init="random", split=args.split, rank=args.rank,
                      max_length=args.max_length, engine=engine, tokenizer=minilm_path(),  # BERT uncased, offline
                      out=out, force=True, **SETTINGS[setting])
    return out


def _capped(args: argparse.Namespace, bundle: Path) -> dict:
    """One capped training child (``benchmarks.edge_budget``): fits or killed, and its peak RSS."""
    from benchmarks.edge_budget import run_child
    from edge_runtime.doctor import parse_size

    if args.cap == "none":
        return {}
    try:
        result = run_child(bundle, cores=1, cap=parse_size(args.cap), batch=8)
    except OSError as exc:  # no memory cgroup to write (not root, or no controller)
        return {"fits": None, "why": str(exc)}
    print(f"{bundle.name} under {args.cap}: {result}", flush=True)
    return result


def _spawn(args: argparse.Namespace, kind: str, bundles: dict[str, Path], *, batch: int, length: int,
           setting: str, repeat: int) -> dict:
    bundle = bundles.get(kind, bundles["onnx"])  # torch rebuilds the EdgePart from the same initial weights
    command = [sys.executable, "-m", "benchmarks.edge_engines", "--child", kind, "--bundle", str(bundle),
               "--threads", str(args.threads), "--steps", str(args.steps), "--batch", str(batch),
               "--length", str(length)]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"kind": kind, "batch": batch, "length": length, "setting": setting, "repeat": repeat}
    print(f"{kind:>12} {batch} x {length} {setting}: step {result['step_s']:.3f} s, "
          f"peak {result['peak_mib']:.0f} MiB", flush=True)
    return result


def _child(kind: str, bundle_root: Path, *, threads: int, steps: int, batch: int, length: int) -> dict:
    """Load one engine, time ``steps`` training steps after a warm-up; peak RSS of this process."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (batch, length), dtype=np.int64)
    feeds = (ids, np.ones_like(ids), np.zeros_like(ids), np.tile(np.arange(length, dtype=np.int64), (batch, 1)))
    step, save = (_torch_step if kind == "torch" else _engine_step)(bundle_root, feeds, threads)
    timings = [_with_cpu_time(step) for _ in range(steps + 1)][1:]
    peak = _vm_hwm_mib()  # before the checkpoint is written
    return {
        "checkpoint_mib": _checkpoint_mib(save),
        "step_s": statistics.median(sum(t[:3]) for t in timings),
        "cpu_s": statistics.median(t[3] for t in timings),
        "forward_s": statistics.median(t[0] for t in timings),
        "backward_s": statistics.median(t[1] for t in timings),
        "optimizer_s": statistics.median(t[2] for t in timings),
        "peak_mib": peak,
        "load_1min": os.getloadavg()[0],  # how shared the machine was while this child ran
    }


def _checkpoint_mib(save) -> float | None:
    """Size of what the engine saves (parameters it trains and their optimizer state); None for torch."""
    if save is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        save(Path(directory))
        return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()) / 2**20


def _profile_child(bundle_root: Path, *, threads: int, steps: int, batch: int, length: int) -> dict:
    """Kernel seconds per operator type of the onnx forward and backward graphs, summed over ``steps`` steps
    after a warm-up (the profiler starts with the sessions: the warm-up step's events are dropped by count)."""
    from safetensors.numpy import load_file

    from edge_runtime.engines.onnx_engine import AotGraphs
    from splitwire.bundle import load_bundle
    from splitwire.manifest import BACKWARD, FORWARD, INFER, WEIGHTS

    bundle = load_bundle(bundle_root, parts=["edge"])
    with tempfile.TemporaryDirectory() as scratch:
        graphs = AotGraphs(*(bundle.edge_file(r) for r in (FORWARD, BACKWARD, INFER)), threads=threads,
                           profile=Path(scratch) / "edge")
        weights = load_file(str(bundle.edge_file(WEIGHTS)))
        gradients = {name: np.zeros_like(weights[name]) for name in graphs.gradients}
        ids = np.random.default_rng(0).integers(1000, 30000, (batch, length), dtype=np.int64)
        values = weights | dict(input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids),
                                position_ids=np.tile(np.arange(length, dtype=np.int64), (batch, 1)))
        dz = np.random.default_rng(1).standard_normal((batch, length, bundle.wire_width)).astype(np.float32)
        for _ in range(steps + 1):
            graphs.forward(values, keep=True)
            graphs.backward(values, dz, gradients)
        files = graphs.end_profiling()
        return {role: _kernel_seconds(json.loads(path.read_text()), runs=steps + 1, skip=1)
                for role, path in files.items()}


def _kernel_seconds(events: list[dict], *, runs: int, skip: int) -> dict[str, list[float]]:
    """Operator type → [kernel seconds per step, nodes per step], over the runs after the first ``skip``."""
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // runs
    kept = nodes[skip * per_run:]
    totals: dict[str, list[float]] = {}
    for e in kept:
        entry = totals.setdefault(e["args"]["op_name"], [0.0, 0])
        entry[0] += e["dur"] / 1e6 / (runs - skip)
        entry[1] += 1
    return {op: [seconds, count // (runs - skip)] for op, (seconds, count) in totals.items()}


def _profile(args: argparse.Namespace, shape: tuple[int, int]) -> None:
    batch, length = shape
    results, sections = {}, []
    for setting in args.settings:
        bundle = _bundle(args, "onnx", setting=setting)
        command = [sys.executable, "-m", "benchmarks.edge_engines", "--child", "profile", "--bundle", str(bundle),
                   "--threads", str(args.threads), "--steps", str(args.steps), "--batch", str(batch),
                   "--length", str(length)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False,
                              env=os.environ | {"OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            raise RuntimeError(f"profile child failed:\n{done.stderr[-3000:]}")
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
        for role, ops in results[setting].items():
            total = sum(seconds for seconds, _ in ops.values())
            top = sorted(ops.items(), key=lambda item: -item[1][0])[:8]
            cells = ", ".join(f"{op} {seconds:.3f} s ({seconds / total:.0%}, {n} nodes)" for op, (seconds, n) in top)
            sections.append(f"| {setting} | {role} | {total:.3f} | {cells} |")
            print(sections[-1], flush=True)
    body = (f"Kernel time per step of the onnx engine's graphs at batch {batch} × length {length}, "
            f"{args.threads} thread, summed by operator type (onnxruntime's profiler; the mean over {args.steps} "
            "steps after a warm-up), the largest eight. The machine was shared with other jobs: kernel times "
            "include what contention adds.\n\n| setting | graph | kernel s | largest operator types |\n"
            "|---|---|---|---|\n" + "\n".join(sections) + "\n")
    settings = {"model": f"{args.model} (random weights)", "split": args.split, "rank": args.rank,
                "batch": batch, "length": length, "threads": args.threads, "steps": args.steps}
    write_section("edge_profile", title="Where the onnx edge step's time goes", settings=settings, body=body,
                  command=f"python -m benchmarks.edge_engines --profile --grid {batch}x{length}", results=results)


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

    return step, engine.save


def _torch_step(bundle_root: Path, feeds: tuple[np.ndarray, ...], threads: int):
    import torch
    from safetensors.numpy import load_file

    from models import EdgePart, EncoderSpec, SplitSpec
    from models.lora import add_adapters
    from splitwire.bundle import load_bundle
    from splitwire.manifest import WEIGHTS

    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_root, parts=["edge"])
    edge = EdgePart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split))
    adapters = bundle.manifest.edge.adapters
    if adapters is not None:
        add_adapters(edge, rank=adapters.rank, alpha=adapters.alpha)
    edge.load_state_dict({n: torch.from_numpy(a) for n, a in load_file(str(bundle.edge_file(WEIGHTS))).items()})
    frozen = set(bundle.manifest.edge.frozen)
    for name, parameter in edge.named_parameters():
        parameter.requires_grad_(name not in frozen)
    settings = bundle.manifest.optimizer
    trained = [p for p in edge.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                  weight_decay=settings.weight_decay)
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

    return step, None


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


KEYS = ("step_s", "cpu_s", "forward_s", "backward_s", "optimizer_s", "peak_mib")


def _summary(runs: list[dict]) -> dict[tuple, dict[str, float]]:
    """Median over repeats for every (setting, batch, length, engine) that ran, in the order they ran."""
    cases: dict[tuple, list[dict]] = {}
    for r in runs:
        cases.setdefault((r["setting"], r["batch"], r["length"], r["kind"]), []).append(r)
    summary = {case: {key: statistics.median(r[key] for r in mine) for key in KEYS} for case, mine in cases.items()}
    for case, mine in cases.items():
        summary[case]["checkpoint_mib"] = mine[0]["checkpoint_mib"]
    return summary


def _cap_cell(result: dict | None) -> str:
    if not result:
        return "–"
    if result.get("fits") is None:
        return "not measured"
    if not result["fits"]:
        return "no (killed)"
    charged = f"cgroup peak {result['cgroup_peak_mib']:.0f}, " if "cgroup_peak_mib" in result else ""
    return f"yes ({charged}RSS {result['peak_rss_mib']:.0f} MiB)"


def _report(args: argparse.Namespace, runs: list[dict], shapes: list[tuple[int, int]], capped: dict) -> None:
    summary, rows = _summary(runs), []
    for (setting, b, l, kind), s in summary.items():
        torch_s, all_trained = summary[(setting, b, l, "torch")], summary.get((BASELINE, b, l, kind))
        ort = summary.get((setting, b, l, "ort-training"))
        recompute = f"{s['forward_s'] / (s['step_s'] - s['forward_s']):.0%}" if kind == "ort-training" else "–"
        versus_all = f"{s['step_s'] / all_trained['step_s']:.2f}" if all_trained else "–"
        versus_ort = f"{s['step_s'] / ort['step_s']:.2f}" if ort else "–"
        checkpoint = "–" if s["checkpoint_mib"] is None else f"{s['checkpoint_mib']:.0f}"
        cap = _cap_cell(capped.get(setting)) if kind == "onnx" and (b, l) == shapes[0] else "–"
        rows.append(f"| {setting} | {b} × {l} | {kind} | {s['step_s']:.3f} | {s['cpu_s']:.3f} | {s['forward_s']:.3f} "
                    f"| {s['backward_s']:.3f} | {s['optimizer_s']:.3f} | **{s['step_s'] / torch_s['step_s']:.2f}** "
                    f"| {s['cpu_s'] / torch_s['cpu_s']:.2f} | {versus_all} | {versus_ort} | {recompute} "
                    f"| {s['peak_mib']:.0f} | {s['peak_mib'] / torch_s['peak_mib']:.2f} | {checkpoint} | {cap} |")
    _plot(summary)
    loads = [r["load_1min"] for r in runs]
    idle = statistics.median(loads) <= args.threads + 0.5  # a child adds its own threads to the load
    load = (f"1-minute load average {min(loads):.1f}–{max(loads):.1f} (median {statistics.median(loads):.1f}) on "
            f"{os.cpu_count()} cores while the children ran")
    where = (f"Nothing else ran: {load}, the children's own {args.threads} thread(s) included.\n\n" if idle else
             f"**The machine was shared**: {load}, so wall times are inflated and noisy; the CPU-time columns are "
             "steadier.\n\n")
    body = where + (
        f"Each cell: the median over {args.repeats} fresh child processes (engines alternating) of each child's "
        f"median over {args.steps} timed steps (forward → backward(dz) → AdamW, {args.threads} thread) "
        "after a warm-up step; peak RSS is the child's VmHWM. Ratios are to PyTorch doing the same (same weights "
        "frozen, its own float32 AdamW; × torch: wall; CPU × torch: process CPU time, steadier on a shared "
        "machine), to the same engine with every weight trained (× all trained) and to ort-training, in the same "
        "run. *Recompute*: the ort-training step's eval forward over the rest of its step, i.e. the extra work "
        "of its two-pass step (`train_step` runs the forward again). *Checkpoint*: what the engine saves (its "
        f"trained parameters and their optimizer state). *{args.cap} cap*: one onnx child at batch 8 × "
        f"{args.max_length} on one core inside a memory cgroup of that size (no swap), "
        "as `benchmarks.edge_budget` caps: did it train, the cgroup's peak charge (which the cap bounds; page "
        "cache included, which the kernel reclaims at the cap) and the child's peak RSS (mapped file pages "
        "included, so it can exceed the cap).\n\n"
        f"| setting | batch × length | engine | step s | CPU s | forward s | backward s | AdamW s | × torch "
        f"| CPU × torch | × all trained | × ort-training | recompute | peak MiB | RSS × torch | checkpoint MiB "
        f"| trains in {args.cap} |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        + "\n\n![edge engines](edge_engines.png)\n")
    settings = {"model": f"{args.model} (random weights)", "split": args.split, "rank": args.rank,
                "grid": args.grid, "max_length": args.max_length, "threads": args.threads,
                "repeats": args.repeats, "steps": args.steps, "settings": args.settings, "cap": args.cap}
    write_section("edge_engines", title="Edge engines: step time and peak memory",
                  command="python -m benchmarks.edge_engines", settings=settings, body=body,
                  results={"runs": runs, "capped": capped})


def _plot(summary: dict[tuple, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cases = list(dict.fromkeys(case[:3] for case in summary))
    labels = [f"{setting}\n{b}×{l}" for setting, b, l in cases]
    width = 0.27
    for i, kind in enumerate(KINDS):
        xs = [j + (i - 1) * width for j in range(len(cases))]
        for ax, key in zip(axes, ("step_s", "peak_mib")):
            ax.bar(xs, [summary.get((*c, kind), {}).get(key, 0.0) for c in cases], width, label=kind)
    for ax, title in zip(axes, ("step time (s)", "peak RSS (MiB)")):
        ax.set_xticks(range(len(cases)), labels, fontsize=7, rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    save_plot(fig, "edge_engines")


if __name__ == "__main__":
    main()
