"""Wall-clock per training step over emulated links (1, 10, 100 Mbit/s; 20–50 ms RTT): split
fine-tuning against the vanilla split, with the time split into edge compute, cloud compute
and transfer.

Why it exists: less traffic matters only if it makes training faster on a real link. Here
the real programs talk over a real TCP connection through an emulated link: ``sft-cloud``
runs in one network namespace, the edge (the ``ort-training`` engine, ``CloudClient``, the
trainer's step) in another, and nothing else is reachable from either.

The link (``benchmarks.netem``): shaped TUN devices joined by a packet delay line, so TCP
sees the real RTT. Before the shaped phases every system runs once with no shaping and no
delay: that is its compute time (plus an unshaped local hop); the rest of a shaped step is
transfer.

Per step the edge times its own compute (forward, then backward and AdamW) and the wait for
the gradient; the cloud logs its own time per request (``ms``); transfer is the wait minus
the cloud's time. Every system trains the same movie-review batches (MiniLM, pretrained,
split 3, batch 16, bundle max length 128) in every phase. A bert-base row estimates transfer
time from the bytes ``benchmarks.traffic`` measured, with the per-link fit of transfer time
against bytes measured here.

Run as root: ``python -m benchmarks.link_speed`` (about 6 minutes on 2 cores). Writes
docs/bench/link_speed.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from benchmarks.assets import minilm_path
from benchmarks.report import BENCH_DIR, ROOT, write_section, save_plot
from benchmarks.netem import CLOUD_IP, UNSHAPED, EmulatedLink, Link
from cloud_backend.launch import CloudDidNotStart, cloud_command, read_url, start_cloud

PORT = 8765
SPLIT, RANK, SEED = 3, 8, 0
# Batch 16: a vanilla-split frame (16 × L × 384 float32, about 1.5 MB) must cross 1 Mbit/s within the
# websocket keepalive's 20 s ping timeout, or the connection is dropped (see the report).
BATCH = 16
KEEPALIVE_S = 20.0  # websockets' default ping timeout, on both ends


LINKS = (Link(100, 20), Link(10, 20), Link(10, 50), Link(1, 50))


@dataclass(frozen=True)
class System:
    """What is compared: a bundle (rank ``None`` is the vanilla split) and a wire codec."""

    name: str
    rank: int | None
    codec: str


SYSTEMS = (System("vanilla split", None, "fp32"), System("SFT rank 8", RANK, "fp32"),
           System("SFT rank 8, int8+packed", RANK, "int8+packed"))


# ---------------------------------------------------------------------------- the edge (child process)


async def edge_child(args: argparse.Namespace) -> None:
    """In the edge namespace: one warm-up step, then for each phase the same batches, timed.

    Between phases it prints ``{"ready": phase}`` and waits for a line on stdin (the parent
    changes the link meanwhile). The step is the trainer's ``split_step``, which times its parts.
    """
    from benchmarks.traffic import review_batches
    from edge_runtime.client import CloudClient
    from edge_runtime.engine import open_engine
    from edge_runtime.tokenizer import EdgeTokenizer
    from edge_runtime.trainer import StepTimes, split_step
    from splitwire.bundle import load_bundle
    from splitwire.schedule import Schedule

    bundle = load_bundle(args.bundle, parts=("edge",))
    engine = open_engine(bundle, threads=1)
    batches = review_batches(EdgeTokenizer.from_bundle(bundle), args.batches, batch_size=BATCH)
    schedule = Schedule(lr=bundle.manifest.optimizer.lr)
    client = await CloudClient.connect(args.url, bundle=bundle, session_id=args.session, schedule=schedule,
                                       seed=SEED, codec=args.codec)
    step = 0

    async def timed_step(batch) -> dict[str, Any]:
        nonlocal step
        step += 1
        times = StepTimes()
        await split_step(engine=engine, client=client, batch=dataclasses.replace(batch, step=step), schedule=schedule,
                         times=times)
        up, down = client.last_step_bytes
        return {"step": step, "wall": times.forward + times.wait + times.update,
                "edge": times.forward + times.update, "wait": times.wait, "up": up, "down": down}

    async with client:
        await timed_step(batches[0])
        for phase in range(args.phases):
            print(json.dumps({"ready": phase}), flush=True)
            sys.stdin.readline()
            print(json.dumps({"phase": phase, "steps": [await timed_step(b) for b in batches]}), flush=True)


# ---------------------------------------------------------------------------- the parent


def export_bundles(out: Path) -> dict[int | None, Path]:
    """MiniLM (pretrained) split 3: rank 8 and the vanilla split."""
    from exporter.export import export_bundle

    return {rank: export_bundle(model=str(minilm_path()), split=SPLIT, rank=rank, out=out / f"r{rank}")
            for rank in (RANK, None)}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@contextlib.contextmanager
def cloud(link: EmulatedLink, bundle: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """``sft-cloud`` in the cloud namespace (CPU, one thread), its log lines written to ``log_path``."""
    with log_path.open("w") as log:
        process = start_cloud(cloud_command("--bundle", str(bundle), "--host", CLOUD_IP, "--port", str(PORT),
                                            "--device", "cpu", "--insecure", prefix=link.exec_in(link.cloud_ns)),
                              log=log, env=_env(), cwd=str(ROOT))
        try:
            try:
                read_url(process)
            except CloudDidNotStart as exc:
                raise CloudDidNotStart(f"{exc}; see {log_path}") from None
            yield process
        finally:
            process.terminate()
            process.wait(30)


def run_system(link: EmulatedLink, system: System, bundle: Path, *, batches: int) -> list[dict[str, Any]]:
    """One edge process through the unshaped phase and every link; phases with their timed steps."""
    links = (UNSHAPED, *LINKS)
    link.set(UNSHAPED)
    edge = subprocess.Popen(
        [*link.exec_in(link.edge_ns), sys.executable, "-m", "benchmarks.link_speed", "--edge-child",
         "--bundle", str(bundle), "--url", f"ws://{CLOUD_IP}:{PORT}", "--codec", system.codec,
         "--session", system.name.replace(" ", "-").replace(",", ""), "--batches", str(batches),
         "--phases", str(len(links))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    phases = []
    try:
        for shaped in links:
            ready = edge.stdout.readline()
            if not ready:
                raise RuntimeError(f"the edge of {system.name} stopped (exit {edge.wait()})")
            link.set(shaped)
            edge.stdin.write("go\n")
            edge.stdin.flush()
            line = edge.stdout.readline()
            if not line:
                raise RuntimeError(f"the edge of {system.name} failed over {shaped.label} (exit {edge.wait()})")
            result = json.loads(line)
            phases.append({"link": shaped, "steps": result["steps"]})
            print(f"{system.name}: {shaped.label}: {np.median([s['wall'] for s in result['steps']]):.2f} s/step",
                  flush=True)
        if edge.wait(60) != 0:
            raise RuntimeError(f"the edge of {system.name} exited with {edge.returncode}")
    finally:
        if edge.poll() is None:
            edge.kill()
    return phases


def cloud_times(log_path: Path) -> dict[tuple[str, int], float]:
    """Seconds the cloud spent on each (session, step) TRAIN request, from its JSON log lines."""
    times = {}
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "train":
                times[(event["session"], event["step"])] = event["ms"] / 1000
    return times


def summarise(system: System, phases: list[dict[str, Any]], cloud_s: dict[tuple[str, int], float]) -> list[dict]:
    """Per phase: median step time and its parts (edge compute, cloud compute, transfer), mean bytes."""
    session = system.name.replace(" ", "-").replace(",", "")
    rows = []
    for phase in phases:
        steps = phase["steps"]
        cloud_step = [cloud_s[(session, s["step"])] for s in steps]
        rows.append({
            "system": system.name, "codec": system.codec, "rank": system.rank, "link": phase["link"].label,
            "mbit": phase["link"].mbit, "rtt_ms": phase["link"].rtt_ms,
            "step_s": float(np.median([s["wall"] for s in steps])),
            "edge_s": float(np.median([s["edge"] for s in steps])),
            "cloud_s": float(np.median(cloud_step)),
            "transfer_s": float(np.median([s["wait"] - c for s, c in zip(steps, cloud_step)])),
            "up": float(np.mean([s["up"] for s in steps])), "down": float(np.mean([s["down"] for s in steps])),
            "steps": steps,
        })
    return rows


def bert_base_rows(rows: list[dict]) -> list[dict]:
    """Transfer time per step for bert-base's measured bytes (docs/bench/traffic.json), by a per-link
    least-squares fit of measured transfer time against bytes per step (up + down)."""
    traffic_json = BENCH_DIR / "traffic.json"
    if not traffic_json.exists():
        return []
    traffic = {(r["rank"], r["codec"]): r for r in json.loads(traffic_json.read_text())["results"]["rows"]}
    out = []
    for link in LINKS:
        measured = [r for r in rows if r["link"] == link.label]
        slope, intercept = np.polyfit([r["up"] + r["down"] for r in measured], [r["transfer_s"] for r in measured], 1)
        for name, key in (("vanilla split", ("vanilla", "fp32")), ("SFT rank 8", (8, "fp32")),
                          ("SFT rank 8, int8+packed", (8, "int8+packed"))):
            total = traffic[key]["up"] + traffic[key]["down"]
            largest = max(traffic[key]["up"], traffic[key]["down"])
            out.append({"system": name, "link": link.label, "bytes": total,
                        "transfer_s": float(intercept + slope * total), "goodput_mbit": 8e-6 / slope,
                        "frame_s": largest * 8 / (link.mbit * 1e6)})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4, help="review batches timed in every phase (default 4)")
    parser.add_argument("--edge-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--codec", help=argparse.SUPPRESS)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    parser.add_argument("--phases", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.edge_child:
        asyncio.run(edge_child(args))
        return
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.link_speed needs root (network namespaces, TUN devices, tc)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmulatedLink() as link:
        bundles = export_bundles(Path(tmp))
        for rank, bundle in bundles.items():
            log_path = Path(tmp) / f"cloud-{rank}.log"
            with cloud(link, bundle, log_path):
                phases = {s: run_system(link, s, bundle, batches=args.batches) for s in SYSTEMS if s.rank == rank}
            for system, system_phases in phases.items():
                rows += summarise(system, system_phases, cloud_times(log_path))
        packets = link.delay_line.packets
    _write(args, rows, bert_base_rows(rows), packets)


# ---------------------------------------------------------------------------- report


def _write(args, rows: list[dict], bert: list[dict], packets: int) -> None:
    plot = _plot(rows)
    by = {(r["system"], r["link"]): r for r in rows}
    ten, one = Link(10, 50).label, Link(1, 50).label
    vanilla, sft = by[("vanilla split", ten)], by[("SFT rank 8", ten)]
    slow_vanilla, slow_sft = by[("vanilla split", one)], by[("SFT rank 8", one)]
    # with compute c per step (the same for both), the step-time ratio (c + Tv) / (c + Ts) is ≥ 10× iff c ≤ this
    budget = (vanilla["transfer_s"] - 10 * sft["transfer_s"]) / 9
    ratio = vanilla["step_s"] / sft["step_s"]
    body = "\n\n".join([
        f"At **{ten}** a vanilla-split step takes **{vanilla['step_s']:.2f} s** and an SFT rank-8 step "
        f"**{sft['step_s']:.2f} s**: **{ratio:.1f}× shorter; the target (≥ 10×) is "
        f"{'met' if ratio >= 10 else 'not met on this machine'}**. The transfer alone is "
        f"{vanilla['transfer_s'] / sft['transfer_s']:.0f}× "
        f"shorter ({vanilla['transfer_s']:.2f} s against {sft['transfer_s']:.3f} s), but an SFT step is almost all "
        f"compute: {sft['edge_s']:.2f} s on the edge and {sft['cloud_s']:.2f} s on the cloud, each on one thread "
        f"of two CPU cores shared with other work (so the compute of one system varies by up to "
        f"{_compute_spread(rows):.0%} between phases). "
        f"The step-time ratio reaches 10× when compute per step is at most {budget:.2f} s at this batch; with "
        f"bert-base's traffic (below) at most {_bert_budget(bert, ten):.2f} s, e.g. a GPU cloud and a fast edge. "
        f"At **{one}**: {slow_vanilla['step_s']:.1f} s against {slow_sft['step_s']:.2f} s "
        f"(**{slow_vanilla['step_s'] / slow_sft['step_s']:.1f}×**).",
        "Median per step over the timed steps; transfer = the edge's wait for the gradient minus the cloud's "
        "own time for the request (so it includes the unshaped local hop):\n\n" + _table(rows),
        ("bert-base dims (split 4, batch 32 of the same reviews): transfer time per step estimated from the bytes "
         "`benchmarks.traffic` measured, with each link's measured fit of transfer time against bytes (compute "
         f"not included). A frame that needs more than the websocket keepalive's {KEEPALIVE_S:g} s ping timeout "
         "on the link gets the connection dropped (seen while building this benchmark: MiniLM's vanilla split "
         "at batch 32, 2.4 MB frames, over 1 Mbit/s; hence batch 16 above):\n\n" + _bert_table(bert)) if bert else "",
        f"The delay line forwarded {packets:,} packets.",
        f"![link speed]({plot.name})",
    ])
    write_section(
        "link_speed", title="Step time over emulated links: SFT vs the vanilla split",
        command="sudo python -m benchmarks.link_speed",
        settings={"model": "all-MiniLM-L6-v2 (pretrained)", "split": SPLIT, "rank": RANK, "batch": BATCH,
                  "max_length": 128, "timed_batches": args.batches, "edge": "ort-training, 1 thread",
                  "cloud": "sft-cloud, CPU, 1 thread", "shaper": "tc tbf (1 s queue) + packet delay line, TUN "
                  "devices in two network namespaces"},
        body=body, results={"rows": rows, "bert_base": bert},
    )


def _compute_spread(rows: list[dict]) -> float:
    """The largest (max − min) / median of a system's compute per step (edge + cloud) across the phases."""
    spreads = []
    for system in SYSTEMS:
        compute = [r["edge_s"] + r["cloud_s"] for r in rows if r["system"] == system.name]
        spreads.append((max(compute) - min(compute)) / float(np.median(compute)))
    return max(spreads)


def _bert_budget(bert: list[dict], link: str) -> float:
    """The compute per step below which bert-base's SFT step is 10× shorter than its vanilla step on ``link``."""
    by = {r["system"]: r["transfer_s"] for r in bert if r["link"] == link}
    return (by["vanilla split"] - 10 * by["SFT rank 8"]) / 9 if by else float("nan")


def _table(rows: list[dict]) -> str:
    lines = ["| system | link | step (s) | edge compute (s) | cloud compute (s) | transfer (s) | up (B) | down (B) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['link']} | {r['step_s']:.2f} | {r['edge_s']:.2f} | {r['cloud_s']:.2f} | "
              f"{r['transfer_s']:.3f} | {r['up']:,.0f} | {r['down']:,.0f} |" for r in rows]
    return "\n".join(lines)


def _bert_table(rows: list[dict]) -> str:
    lines = ["| system | link | bytes per step (up + down) | transfer (s) | fitted goodput (Mbit/s) | largest frame "
             "on the wire (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['link']} | {r['bytes']:,.0f} | {r['transfer_s']:.3f} | {r['goodput_mbit']:.1f} | "
              f"{r['frame_s']:.2f}{' (over the keepalive)' if r['frame_s'] > KEEPALIVE_S else ''} |" for r in rows]
    return "\n".join(lines)


LEGEND = {"edge_s": "edge compute", "cloud_s": "cloud compute", "transfer_s": "transfer"}
SHORT = {"vanilla split": "vanilla", "SFT rank 8": "SFT", "SFT rank 8, int8+packed": "int8"}


def _plot(rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = [UNSHAPED.label, *(link.label for link in LINKS)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        mine = {r["link"]: r for r in rows if r["system"] == system.name}
        x = np.arange(len(links)) + i * width
        bottom = np.zeros(len(links))
        for part, color in (("edge_s", "tab:blue"), ("cloud_s", "tab:orange"), ("transfer_s", "tab:red")):
            values = np.array([max(mine[label][part], 0.0) for label in links])
            ax.bar(x, values, width, bottom=bottom, color=color, edgecolor="black", lw=0.3,
                   label=LEGEND[part] if i == 0 else None)
            bottom += values
        for xi, total in zip(x, bottom):
            ax.text(xi, total, SHORT[system.name], fontsize=6, ha="center", va="bottom")
    ax.set_xticks(np.arange(len(links)) + width * (len(SYSTEMS) - 1) / 2, links, fontsize=8)
    ax.set_ylabel("seconds per training step")
    ax.legend()
    ax.set_title(f"MiniLM split {SPLIT}, batch {BATCH} movie reviews: vanilla split vs SFT rank {RANK}")
    return save_plot(fig, "link_speed")


if __name__ == "__main__":
    main()
