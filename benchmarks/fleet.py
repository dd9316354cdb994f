"""Fleets against isolated sessions: the cloud's memory and its steps/s as devices are added.

Why it exists: issue 14's claim is that one fleet costs the cloud one top part whatever its
size, where isolated sessions cost one top part (and one optimizer) each, and that the
asynchronous schedule turns concurrent requests into fewer, larger cloud steps. For each
count of devices N (1, 8, 32), a fresh ``sft-cloud`` child process (one compute thread, CPU)
serves N devices that train at once, as isolated sessions, as one fleet in the asynchronous
schedule (concurrent requests stacked into one step) and as one fleet in the synchronous
schedule (a round of N batches is one step). Reported: the cloud's peak resident memory
(``VmHWM``), steps/s summed over the devices, the cloud's CPU ms per device step, and how
many cloud steps the devices' steps became. The measurement is ``benchmarks/load.py``'s
(its bundles, its CPU clock), but the devices are real ``CloudClient`` connections sending
random activations of a fixed shape (``tests/cloud_harness.train_request``: 4 rows × 10
tokens), so that 32 devices cost this machine no 32 edge models and the figures are the
cloud's alone; ``tests/test_fleet.py`` checks the same fleets train exactly with real edges.

Run: ``python -m benchmarks.fleet`` (tiny BERT and MiniLM split 3 rank 8, 10 steps a device).
Writes docs/bench/fleet.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from benchmarks.load import MODELS, _bundle, cloud_usage
from benchmarks.report import BENCH_DIR, ROOT, save_plot, write_section
from cloud_backend.session import checkpoint_path, saved_step
from edge_runtime.client import CloudClient
from splitwire.bundle import Bundle, load_bundle
from tests.cloud_harness import FAST_RETRY, SCHEDULE, SEED, CloudProcess, train_steps

FLEET = "bench"
MODES = ("isolated", "fleet-async", "fleet-sync")
DEVICES = [1, 8, 32]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    rows = []
    for model in args.models:
        bundle = load_bundle(_bundle(model, Path(args.bundles)))
        for mode in args.modes:
            for devices in args.devices:
                rows.append({"model": model, "mode": mode, "devices": devices,
                             **_measure(bundle, mode, devices, args.steps, args.max_wait_ms)})
                print(json.dumps(rows[-1]), flush=True)
    _report(args, rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--devices", type=int, nargs="+", default=DEVICES, help=f"devices at once (default: {DEVICES})")
    p.add_argument("--steps", type=int, default=10, help="training steps per device")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the async schedule's --fleet-max-wait-ms")
    p.add_argument("--bundles", default=str(ROOT / "runs" / "bench" / "load"), help="export cache (load.py's)")
    return p


def _cloud_options(mode: str, devices: int, max_wait_ms: float) -> tuple[str, ...]:
    if mode == "fleet-async":
        return "--fleet-schedule", "async", "--fleet-max-wait-ms", str(max_wait_ms)
    if mode == "fleet-sync":
        return "--fleet-schedule", "sync", "--fleet-quorum", str(devices), "--round-timeout", "600"
    return ()


def _measure(bundle: Bundle, mode: str, devices: int, steps: int, max_wait_ms: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cloud = CloudProcess(bundle.root, work / "state", log_path=work / "cloud.log",
                             extra=_cloud_options(mode, devices, max_wait_ms)).start()
        fleet = None if mode == "isolated" else FLEET
        try:
            asyncio.run(_train_all(bundle, cloud.url, "warm-up", 1, 2, fleet=None))  # torch's first-use costs
            row = cloud_usage(cloud, lambda: asyncio.run(_train_all(bundle, cloud.url, "device", devices, steps,
                                                                    fleet=fleet)), steps=devices * steps)
        finally:
            cloud.stop()
        cloud_steps = row["steps"] if fleet is None else saved_step(checkpoint_path(work / "state", "fleet:" + fleet,
                                                                                    "latest"))
    return {**row, "cloud_steps": cloud_steps}


async def _train_all(bundle: Bundle, url: str, prefix: str, devices: int, steps: int, *, fleet: str | None) -> None:
    async def device(i: int) -> None:
        client = await CloudClient.connect(url, bundle=bundle, session_id=f"{prefix}-{i}", schedule=SCHEDULE,
                                           seed=SEED, retry=FAST_RETRY, fleet=fleet)
        async with client:
            await train_steps(client, bundle, range(1, steps + 1))

    await asyncio.gather(*(device(i) for i in range(devices)))


def plot(rows: list[dict]) -> None:
    """docs/bench/fleet.png from the rows (``python -c 'from benchmarks.fleet import *; replot()'`` redraws it
    from fleet.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        mine = [r for r in rows if r["model"] == model and r["mode"] == mode]
        for axis, key in zip(axes, ("cloud_peak_mib", "steps_per_s")):
            axis.plot([r["devices"] for r in mine], [r[key] for r in mine], marker="o", label=f"{model} {mode}")
    for axis, label in zip(axes, ("cloud peak RSS (MiB)", "steps/s, all devices (log)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("devices training at once")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    axes[1].set_yscale("log")
    save_plot(figure, "fleet")


def replot() -> None:
    plot(json.loads((BENCH_DIR / "fleet.json").read_text())["results"])


def _report(args: argparse.Namespace, rows: list[dict]) -> None:
    table = ["| model | mode | devices | device steps | cloud steps | seconds | steps/s (all devices) | "
             "cloud CPU ms/step | cloud peak RSS MiB | load average |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['mode']} | {r['devices']} | {r['steps']} | {r['cloud_steps']} | {r['seconds']} | "
              f"{r['steps_per_s']} | {r['cloud_cpu_ms_per_step']} | {r['cloud_peak_mib']} | {r['load_average']} |"
              for r in rows]
    plot(rows)
    body = "\n".join(table) + "\n\n" + "\n".join(f"- {name}: {text}" for name, text in MODELS.items()) + (
        "\n\n*isolated*: every device its own top part and AdamW (the default); *fleet-async*: one fleet, "
        f"requests stacked as they arrive (max wait {args.max_wait_ms:g} ms); *fleet-sync*: one fleet, one step a "
        "round of every device. Devices are `CloudClient` connections sending random activations of 4 rows × 10 "
        "tokens (no edge model runs), so the figures are the cloud's; all of them ran on this machine, whose "
        "cores other jobs shared (the load average column). Peak RSS includes one warm-up session.\n\n"
        "![fleet](fleet.png)\n")
    write_section("fleet", title="Fleets: the cloud's memory and steps/s, one shared top part against isolated "
                                 "sessions", command="python -m benchmarks.fleet",
                  settings={"models": ",".join(args.models), "steps per device": args.steps,
                            "requests": "4 rows x 10 tokens, random z", "cloud": "1 process, CPU, 1 compute thread"},
                  body=body, results=rows)


if __name__ == "__main__":
    main()
