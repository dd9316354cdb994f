"""Many devices, one cloud: training steps per second and the cloud's memory as edges are added.

Why it exists: it measures what one ``sft-cloud`` process sustains. For each count of
devices N, a fresh ``sft-cloud`` child process (one compute thread, CPU) serves N sessions
that train at once; the N edges are real ORT engines in this process, each driving the
trainer's ``train`` loop through its own connection (``tests/cloud_harness.py``, the same
harness ``tests/test_load.py`` checks for exactness). Reported per N: steps/s summed over
the sessions (wall clock from the first connection to the last step, engines opened and
checkpoints at step 0 and at the end included), the cloud's CPU seconds per step
(``/proc/<pid>/stat``) and its peak resident memory (``VmHWM``). One warm-up session runs
first, so that torch's one-time costs in the cloud process are not counted. Edges and cloud share this
machine's cores, so the steps/s are a floor for a cloud whose devices are elsewhere.

Run: ``python -m benchmarks.load`` (tiny BERT and the real MiniLM split 3 rank 8, batch 8,
20 steps a session). Writes docs/bench/load.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks.report import ROOT, write_section, save_plot
from splitwire.bundle import load_bundle
from tests.cloud_harness import CloudProcess, EdgeSession, review_data, train_edge
from tests.conftest import TINY_CONFIG, minilm_path, movie_reviews_path

MODELS = {"tiny": "4-layer hidden-32 BERT (random weights), split 2, rank 4",
          "minilm": "MiniLM-L6 (pretrained, hidden 384), split 3, rank 8"}
DEVICES = {"tiny": [1, 4, 16, 32], "minilm": [1, 4, 8]}  # MiniLM edges hold ~0.3 GiB each, all in this process


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    rows = []
    for model in args.models:
        bundle = load_bundle(_bundle(model, Path(args.bundles)))
        for clients in args.clients or DEVICES[model]:
            rows.append({"model": model, "clients": clients, **_measure(bundle, clients, args.steps, args.batch)})
            print(json.dumps(rows[-1]), flush=True)
    _report(args, rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--clients", type=int, nargs="+", help=f"devices at once (default: {DEVICES})")
    p.add_argument("--steps", type=int, default=20, help="training steps per session")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bundles", default=str(ROOT / "runs" / "bench" / "load"), help="export cache")
    return p


def _bundle(model: str, cache: Path) -> Path:
    """The bundle for ``model``, exported once into ``cache``."""
    from exporter.export import export_bundle

    out = cache / model
    if (out / "manifest.json").is_file():
        return out
    if model == "minilm":
        export_bundle(model=str(minilm_path()), split=3, rank=8, max_length=64, engine="ort-training", out=out,
                      force=True)
        return out
    source = cache / "tiny-model"
    source.mkdir(parents=True, exist_ok=True)
    config = TINY_CONFIG | {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (source / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, source / name)
    export_bundle(model=str(source), init="random", split=2, rank=4, max_length=48, engine="ort-training", out=out,
                  force=True)
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cloud_usage(cloud: CloudProcess, work: Callable[[], None], *, steps: int) -> dict:
    """Run ``work`` (devices training ``steps`` steps in all against ``cloud``): the wall clock, steps/s,
    the cloud's CPU ms per step and its peak resident memory, with the machine's load average."""
    cpu_before, started = _cpu_seconds(cloud.proc.pid), time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds(cloud.proc.pid) - cpu_before
    return {"load_average": round(os.getloadavg()[0], 1), "steps": steps, "seconds": round(seconds, 2),
            "steps_per_s": round(steps / seconds, 2), "cloud_cpu_ms_per_step": round(1000 * cpu / steps, 1),
            "cloud_peak_mib": round(cloud.vm_hwm_kib() / 1024, 1)}


def _measure(bundle, clients: int, steps: int, batch: int) -> dict:
    rows = 3 * batch
    runs = [EdgeSession(bundle, f"device-{i}", review_data(movie_reviews_path(), slice(rows * i, rows * (i + 1))),
                        seed=i, steps=steps, batch_size=batch, checkpoint_every=steps) for i in range(clients)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cloud = CloudProcess(bundle.root, work / "state", log_path=work / "cloud.log").start()
        try:
            warm_up = EdgeSession(bundle, "warm-up", runs[0].data, seed=0, steps=2, batch_size=batch)
            asyncio.run(_train_all([warm_up], cloud.url, work))  # torch's first-use costs, not the load's
            return cloud_usage(cloud, lambda: asyncio.run(_train_all(runs, cloud.url, work)), steps=clients * steps)
        finally:
            cloud.stop()


async def _train_all(runs: list[EdgeSession], url: str, work: Path) -> None:
    outcomes = await asyncio.gather(*(train_edge(run, url, work / run.session) for run in runs))
    assert all(o.result.steps == list(range(1, run.steps + 1)) for o, run in zip(outcomes, runs))


def _report(args: argparse.Namespace, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = ["| model | devices | steps | seconds | steps/s (all devices) | cloud CPU ms/step | cloud peak RSS MiB "
             "| load average |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['clients']} | {r['steps']} | {r['seconds']} | {r['steps_per_s']} | "
              f"{r['cloud_cpu_ms_per_step']} | {r['cloud_peak_mib']} | {r['load_average']} |" for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        axes[0].plot([r["clients"] for r in mine], [r["steps_per_s"] for r in mine], marker="o", label=model)
        axes[1].plot([r["clients"] for r in mine], [r["cloud_peak_mib"] for r in mine], marker="o", label=model)
    for axis, label in zip(axes, ("steps/s, all devices", "cloud peak RSS (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("devices training at once")
        axis.set_ylabel(label)
        axis.legend()
    save_plot(figure, "load")
    body = "\n".join(table) + "\n\n" + "\n".join(f"- {name}: {text}" for name, text in MODELS.items()) + (
        "\n\nEvery session trains its own rows and seed; `tests/test_load.py` checks that each ends with the "
        "weights of its solo run. Edges and the cloud share this machine's cores, so steps/s is what the "
        "pair sustains here, not the cloud alone; the cloud's CPU time per step is its own. The load average "
        "(1 minute, at the end of each row) shows how busy the machine was with other work.\n\n![load](load.png)\n")
    write_section("load", title="Load: devices training at once against one sft-cloud",
                  command="python -m benchmarks.load", settings={
                      "models": ",".join(args.models),
                      "steps per session": args.steps, "batch": args.batch, "cloud": "1 process, CPU, 1 thread",
                      "edge engine": "ort-training, 1 thread each"}, body=body, results=rows)


if __name__ == "__main__":
    main()
