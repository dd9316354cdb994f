"""Edge budget: steps/s and peak RSS of the edge engines on 1 and 2 cores under a hard 1 GiB memory cap.

Why it exists: a Raspberry Pi-class board has 4 slow cores and 1–8 GB of RAM. This runs the
edge's training step (``forward`` → ``backward(dz)`` → ``optimizer_step``, no network: the
cloud's ``dz`` is random) for batch 8 × length 128 in a child process pinned to 1 or 2
cores (``taskset -c``) inside a memory cgroup with a hard limit (a child of this process's
own cgroup; v1 ``memory.limit_in_bytes`` + ``memory.memsw.limit_in_bytes``, or v2
``memory.max`` + ``memory.swap.max``). A child the kernel kills for memory did not fit. The
child reads its peak RSS from ``VmHWM`` and never imports torch.

Cases: bert-base (random weights, the MiniLM tokenizer) split 2/4/6 rank 8 and the real
MiniLM split 3 rank 8, both engines; for bert-base split 4 also the footprint settings:
frozen embeddings (``sft-export --freeze-embeddings``) and glibc's mmap threshold pinned
(``MALLOC_MMAP_THRESHOLD_=131072``: freed activation buffers go back to the OS instead of
fragmenting the heap). A case that does not fit is rerun without the cap to record what it
needs. The measured peaks calibrate ``edge_runtime.doctor``'s memory estimate (fitted here,
printed, and compared with the estimate the doctor makes now).

Run: ``python -m benchmarks.edge_budget`` (as root, for the cgroup; bundles are exported once
into ``bundles/bench/``). Writes ``docs/bench/edge_budget.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from benchmarks.assets import minilm_path
from benchmarks.report import BENCH_DIR, ROOT, write_section, save_plot
from edge_runtime.cgroup import CGROUP_V1, CGROUP_V2, CgroupFiles, memory_cgroups

CAP = 1 << 30
BATCH, LENGTH = 8, 128
SMALL_BATCH = 2  # a second batch size, so the calibration can tell fixed costs from activations
WARMUP, STEPS = 1, 4  # the onnx engine's heap settles after ~3 steps
CORES = (1, 2)
BUNDLES = ROOT / "bundles" / "bench"
MIB = 1 << 20
MALLOC_PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MINILM = "minilm"
BUNDLE_SOURCES = ("models", "exporter", "edge_runtime", "splitwire")  # where the exporting code lives


@dataclass(frozen=True)
class Case:
    model: str  # "bert-base-uncased" (random weights) or MINILM (the real pretrained one)
    split: int
    engine: str
    freeze_embeddings: bool = False
    malloc_pinned: bool = False
    batch: int = BATCH

    @property
    def bundle_name(self) -> str:
        model = "bert-base" if self.model == "bert-base-uncased" else self.model
        return f"{model}-s{self.split}-r8{'-frozen' if self.freeze_embeddings else ''}-{self.engine}"

    @property
    def setting(self) -> str:
        parts = ["frozen embeddings"] * self.freeze_embeddings + ["malloc pinned"] * self.malloc_pinned
        return " + ".join(parts) or "all trained"


def cases() -> list[Case]:
    found = []
    for engine in ("ort-training", "onnx"):
        found += [Case("bert-base-uncased", split, engine) for split in (2, 4, 6)]
        found += [Case("bert-base-uncased", 4, engine, freeze_embeddings=True),
                  Case("bert-base-uncased", 4, engine, freeze_embeddings=True, malloc_pinned=True),
                  Case("bert-base-uncased", 4, engine, freeze_embeddings=True, batch=SMALL_BATCH),
                  Case(MINILM, 3, engine), Case(MINILM, 3, engine, batch=SMALL_BATCH)]
    return found


# --- the child: one engine, a few steps, its own peak RSS -------------------------------------------


def child(bundle_dir: Path, *, threads: int, batch: int, warmup: int, steps: int) -> dict:
    """Rows of the bundle's ``max_length`` tokens, no padding: the longest step it will run."""
    import numpy as np

    from edge_runtime.engine import EdgeBatch, open_engine
    from splitwire.bundle import load_bundle

    bundle = load_bundle(bundle_dir, parts=("edge",))
    engine = open_engine(bundle, threads=threads)
    length = bundle.max_length
    loaded = _vm("VmRSS")
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, bundle.encoder["vocab_size"], (batch, length), dtype=np.int64)
    inputs = EdgeBatch(ids, np.ones_like(ids), np.zeros_like(ids), np.broadcast_to(np.arange(length), ids.shape).copy())
    dz = rng.standard_normal((batch, length, bundle.wire_width)).astype(np.float32)
    for step in range(warmup + steps):
        if step == warmup:
            started, cpu_started = time.perf_counter(), time.process_time()
        engine.forward(inputs)
        engine.backward(dz)
        engine.optimizer_step()
    seconds, cpu = (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps
    return {"loaded_rss_mib": loaded / MIB, "peak_rss_mib": _vm("VmHWM") / MIB, "seconds_per_step": seconds,
            "cpu_seconds_per_step": cpu, "torch_imported": "torch" in sys.modules}


def _vm(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmHWM``: peak RSS of this process alone)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


# --- the cap: a child memory cgroup of our own --------------------------------------------------------


def own_memory_cgroup() -> tuple[CgroupFiles, Path]:
    """The memory cgroup this process is in, and which layout its files follow (the limit files are
    written with the cap, in order); v2 only where its memory controller is enabled."""
    for files, group in memory_cgroups():
        if files is CGROUP_V1 or "memory" in Path(CGROUP_V2.root, "cgroup.controllers").read_text().split():
            return files, group
    raise OSError("no memory cgroup controller is available to enforce the cap")


@contextmanager
def memory_cap(limit: int, *, name: str) -> Iterator[tuple[Path, CgroupFiles]]:
    """A fresh child cgroup limited to ``limit`` bytes of memory (and no swap); removed afterwards."""
    files, parent = own_memory_cgroup()
    group = parent / name
    group.mkdir()
    try:
        for limit_file in files.limit:
            if (group / limit_file).exists():
                value = 0 if limit_file == "memory.swap.max" else limit
                (group / limit_file).write_text(str(value))
        yield group, files
    finally:
        group.rmdir()


def _oom_kills(group: Path, files: CgroupFiles) -> int:
    path, key = files.oom_kills
    for line in (group / path).read_text().splitlines():
        if line.startswith(key + " "):
            return int(line.split()[1])
    return 0


def run_child(bundle_dir: Path, *, cores: int, cap: int | None, batch: int = BATCH,
              env: dict[str, str] | None = None) -> dict:
    """Train ``bundle_dir``'s edge for a few steps on ``cores`` cores under ``cap`` bytes (None: uncapped).

    Returns ``fits`` and, when it ran to the end, the child's measurements.
    """
    command = ["taskset", "-c", ",".join(map(str, range(cores))), sys.executable, "-m", "benchmarks.edge_budget",
               "child", "--bundle", str(bundle_dir), "--threads", str(cores), "--batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), **(env or {})}
    if cap is None:
        return _result(subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT), oom=False)
    _uncache(bundle_dir)
    with memory_cap(cap, name=f"splitft-budget-{os.getpid()}") as (group, files):
        enter = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs")]
        done = subprocess.run(enter + command, capture_output=True, text=True, env=env, cwd=ROOT)
        result = _result(done, oom=_oom_kills(group, files) > 0)
        # the cgroup's high-water mark, anonymous memory and page cache together (v2 from Linux 5.19, v1)
        peak = next((group / f for f in ("memory.peak", "memory.max_usage_in_bytes") if (group / f).is_file()), None)
        if result["fits"] and peak is not None:
            result["cgroup_peak_mib"] = int(peak.read_text()) / MIB
        return result


def _uncache(bundle_dir: Path) -> None:
    """Drop the bundle's files from the page cache, so that the capped child reads them into pages charged
    to its own cgroup (a page is charged to the cgroup that first reads it: an earlier run's would be free)."""
    for path in bundle_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _result(done: subprocess.CompletedProcess, *, oom: bool) -> dict:
    if done.returncode == 0:
        return {"fits": True, **json.loads(done.stdout.splitlines()[-1])}
    if oom or done.returncode == -9:
        return {"fits": False, "killed": "out of memory"}
    raise RuntimeError(f"the budget child failed ({done.returncode}):\n{done.stderr[-3000:]}")


# --- bundles -------------------------------------------------------------------------------------------


def ensure_bundle(case: Case) -> Path:
    """The case's bundle, exported into bundles/bench/ unless one made by the same exporter, model and
    engine code is there (a stamp holds the digest of that code); bert-base offline, from its preset config."""
    from splitwire.bundle import BundleError, load_bundle

    out, stamp = BUNDLES / case.bundle_name, BUNDLES / f"{case.bundle_name}.source"
    digest = _source_digest()
    try:
        load_bundle(out, parts=("edge",))
        if stamp.read_text() == digest:
            return out
    except (BundleError, OSError):
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the preset config, without retrying an unreachable hub
    from exporter.export import export_bundle

    minilm = minilm_path()
    pretrained = case.model == MINILM
    export_bundle(model=str(minilm) if pretrained else case.model, init="pretrained" if pretrained else "random",
                  tokenizer=str(minilm), split=case.split, rank=8, max_length=LENGTH, engine=case.engine,
                  freeze_embeddings=case.freeze_embeddings, out=out, force=True)
    stamp.write_text(digest)
    return out


@functools.cache
def _source_digest() -> str:
    """SHA-256 of this repository's modules that exporting imports (the code a bundle is made by),
    listed by a fresh interpreter so that what this process imported for other reasons does not count."""
    listing = subprocess.run(
        [sys.executable, "-c", "import sys, exporter.export, exporter.aot_graphs, exporter.ort_artifacts\n"
                               "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) "
                               "if getattr(m, '__file__', None)))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    ours = [ROOT / folder for folder in BUNDLE_SOURCES]
    files = {Path(line) for line in listing.stdout.splitlines()}
    digest = hashlib.sha256()
    for path in sorted(f for f in files if any(f.is_relative_to(folder) for folder in ours)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- measuring, calibrating, reporting -------------------------------------------------------------------


def measure(case: Case) -> dict:
    """Every core count under the cap; once more without it when the case did not fit."""
    bundle, env = BUNDLES / case.bundle_name, MALLOC_PINNED if case.malloc_pinned else None
    runs = {cores: run_child(bundle, cores=cores, cap=CAP, batch=case.batch, env=env) for cores in CORES}
    for cores, run in runs.items():
        print(f"{case.bundle_name} ({case.setting}), {cores} core(s): {run}", flush=True)
    result = {"case": asdict(case), "bundle": case.bundle_name, "setting": case.setting, "runs": runs}
    if not all(run["fits"] for run in runs.values()):
        result["uncapped"] = run_child(bundle, cores=max(CORES), cap=None, batch=case.batch, env=env)
        print(f"  uncapped: {result['uncapped']}", flush=True)
    result["peak_rss_mib"] = max(r["peak_rss_mib"] for r in (*runs.values(), result.get("uncapped", {})) if "peak_rss_mib" in r)
    return result


def features(case: Case) -> dict[str, float]:
    """The doctor's estimate and the terms the calibration fits, for batch × length."""
    from edge_runtime.memory_model import EdgeSize
    from splitwire.bundle import load_bundle

    size = EdgeSize.of(load_bundle(BUNDLES / case.bundle_name, parts=("edge",)))
    return {"weights": 4 * (size.parameters + 3 * size.trained), "scratch": 4 * size.word_embeddings_trained,
            "activations": case.batch * LENGTH * size.hidden * size.layers,
            "estimate_mib": size.peak_bytes(batch=case.batch, length=LENGTH) / MIB}


def calibrate(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per engine: least-squares ``runtime``, ``e``, ``c`` (``e`` ≥ 0), then ``runtime`` raised to cover every peak."""
    import numpy as np

    fitted = {}
    for engine in sorted({r["case"]["engine"] for r in results}):
        rows = [r for r in results if r["case"]["engine"] == engine and not r["case"]["malloc_pinned"]]
        y = np.array([r["peak_rss_mib"] * MIB - r["features"]["weights"] for r in rows])
        x = np.array([[1.0, r["features"]["scratch"], r["features"]["activations"]] for r in rows])
        (runtime, e, c), *_ = np.linalg.lstsq(x, y, rcond=None)
        if e < 0:
            (runtime, c), *_ = np.linalg.lstsq(x[:, [0, 2]], y, rcond=None)
            e = 0.0
        runtime = max(y - e * x[:, 1] - c * x[:, 2])
        fitted[engine] = {"runtime_mib": runtime / MIB, "embedding_scratch": float(e), "activation": float(c)}
    return fitted


def _cell(run: dict) -> str:
    if not run["fits"]:
        return "killed (OOM) | – | no"
    cpu = f" ({run['cpu_seconds_per_step']:.1f} CPU s)" if "cpu_seconds_per_step" in run else ""
    return f"{1 / run['seconds_per_step']:.3f}{cpu} | {run['peak_rss_mib']:,.0f} | yes"


def table(results: list[dict]) -> str:
    head = ("| model | split | engine | setting | batch | " + " | ".join(
        f"{c} core{'s' * (c > 1)}: steps/s | peak MiB | fits" for c in CORES) + " | uncapped peak MiB | doctor estimate MiB |")
    lines = [head, "|" + "---|" * (5 + 3 * len(CORES) + 2)]
    for r in results:
        case = r["case"]
        cells = " | ".join(_cell(r["runs"][c]) for c in CORES)
        uncapped = f"{r['uncapped']['peak_rss_mib']:,.0f}" if "uncapped" in r else "–"
        lines.append(f"| {case['model']} | {case['split']} | {case['engine']} | {r['setting']} | {case['batch']} | {cells} | "
                     f"{uncapped} | {r['features']['estimate_mib']:,.0f} |")
    return "\n".join(lines)


def goal(results: list[dict]) -> str:
    """Which engines and settings train bert-base split 4 rank 8 inside the cap, on every core count."""
    target = [r for r in results if (r["case"]["model"], r["case"]["split"], r["case"]["batch"]) == ("bert-base-uncased", 4, BATCH)]
    fit = [f"{r['case']['engine']} with {r['setting']} (peak {r['peak_rss_mib']:,.0f} MiB)"
           for r in target if all(run["fits"] for run in r["runs"].values())]
    miss = [f"{r['case']['engine']} with {r['setting']} (needs {r['peak_rss_mib']:,.0f} MiB)"
            for r in target if not all(run["fits"] for run in r["runs"].values())]
    return (f"**Goal (bert-base split 4, rank 8, batch {BATCH} × length {LENGTH} inside {CAP // MIB} MiB):** "
            f"fits: {'; '.join(fit) or 'none'}. Does not fit: {'; '.join(miss) or 'none'}.")


def plot(results: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = [f"{r['bundle'].removesuffix('-' + r['case']['engine'])} {r['case']['engine']}"
              f"{' malloc' if r['case']['malloc_pinned'] else ''} b{r['case']['batch']}" for r in results]
    peaks = [r["peak_rss_mib"] for r in results]
    colours = ["tab:green" if all(x["fits"] for x in r["runs"].values()) else "tab:red" for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(results) + 1.2))
    ax.barh(labels, peaks, color=colours)
    ax.axvline(CAP / MIB, color="black", linestyle="--", label=f"cap {CAP // MIB} MiB")
    ax.set_xlabel("peak RSS of a training step (MiB); green: fits the cap")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    return save_plot(fig, "edge_budget")


def main(argv: list[str] | None = None) -> None:
    from edge_runtime.doctor import parse_size

    parser = argparse.ArgumentParser(prog="python -m benchmarks.edge_budget", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    inner = sub.add_parser("child", help="(internal) run the steps in this process and print one JSON line")
    capped = sub.add_parser("capped", help="run one bundle's steps in a capped child and print one JSON line")
    sub.add_parser("report", help="write the section again from the recorded runs, with the doctor's current constants")
    for role in (inner, capped):
        role.add_argument("--bundle", type=Path, required=True)
        role.add_argument("--batch", type=int, default=BATCH)
    inner.add_argument("--threads", type=int, required=True)
    capped.add_argument("--cores", type=int, default=1)
    capped.add_argument("--cap", type=parse_size, required=True, help="memory cap, e.g. 400MiB")
    args = parser.parse_args(argv)
    if args.role == "child":
        print(json.dumps(child(args.bundle, threads=args.threads, batch=args.batch, warmup=WARMUP, steps=STEPS)))
        return
    if args.role == "capped":
        print(json.dumps(run_child(args.bundle, cores=args.cores, cap=args.cap, batch=args.batch)))
        return
    if args.role == "report":  # the doctor's constants changed: its estimates again, from the recorded runs
        recorded = json.loads((BENCH_DIR / "edge_budget.json").read_text())["results"]["cases"]
        report([r | {"runs": {int(cores): run for cores, run in r["runs"].items()},  # JSON keys are text
                     "features": features(Case(**r["case"]))} for r in recorded])
        return
    results = []
    for case in cases():
        ensure_bundle(case)
        results.append(measure(case) | {"features": features(case)})
    report(results)


def report(results: list[dict]) -> None:
    """Write the section: the table, the goal, the fitted calibration and the plot."""
    fitted = calibrate(results)
    body = "\n\n".join([
        f"Each cell: a child process pinned with `taskset` to that many cores (as many onnxruntime threads) "
        f"inside a memory cgroup capped at {CAP // MIB} MiB (no swap) runs {WARMUP} warm-up and {STEPS} timed "
        f"edge training steps (forward, backward of a random `dz`, AdamW) at the row's batch × length {LENGTH}; "
        "peak RSS is the child's `VmHWM`. *killed (OOM)*: the kernel killed it at the cap; its uncapped peak "
        "is listed beside. The doctor estimate is `sft-edge doctor`'s formula with its current constants. "
        "Steps/s is wall clock, with the CPU seconds a step took in brackets: the measuring machine's cores "
        "were shared with other work, so wall-clock rates (the 2-core ones most) are noisy; CPU time is not.",
        table(results), goal(results),
        "Settings: *frozen embeddings* is `sft-export --freeze-embeddings` (word, position and token-type "
        "tables not trained: no gradient or AdamW moments for them, and for the onnx engine no dense "
        "word-embedding gradient in backward); *malloc pinned* runs with `MALLOC_MMAP_THRESHOLD_=131072`, so "
        "glibc returns freed activation buffers to the OS instead of growing a fragmented heap (the onnx "
        "engine's sessions run with the memory arena off, so its buffers come from malloc).",
        "Calibration of `edge_runtime.doctor` (peak ≈ runtime + 4·(P + 3·T) + e·4·W + c·B·L·H·k, fitted on the "
        "default-allocator rows, runtime raised to cover every measured peak): " + "; ".join(
            f"{engine}: runtime {v['runtime_mib']:.0f} MiB, e = {v['embedding_scratch']:.2f}, "
            f"c = {v['activation']:.1f} B" for engine, v in fitted.items()) + ".",
        f"![peak RSS per case]({plot(results).name})",
    ])
    write_section("edge_budget", title="Edge budget: 1–2 cores and a 1 GiB memory cap",
                  command="python -m benchmarks.edge_budget",
                  settings={"batch": BATCH, "length": LENGTH, "rank": 8, "warmup": WARMUP, "steps": STEPS,
                            "cap_mib": CAP // MIB, "cores": list(CORES)},
                  body=body, results={"cases": results, "calibration": fitted})


if __name__ == "__main__":
    main()
