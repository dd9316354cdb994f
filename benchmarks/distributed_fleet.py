"""A fleet's shared top part on 1 or N torchrun workers: the same rounds, their weights and their timings.

Why it exists: ``cloud_backend.distributed`` makes one fleet's top part data-parallel over
torch.distributed; this runs it as torchrun runs sft-cloud workers (one process per rank,
gloo on the CPU) on ``D`` in-process devices (``EdgePart`` + AdamW each, ranks holding
contiguous blocks of them), with deterministic random batches, so that

- ``tests/test_distributed.py`` can compare 2 workers with 1 worker and with the one-process
  reference ``models.fleet.Fleet`` (every weight, every loss), and
- ``python -m benchmarks.distributed_fleet`` measures 1 against 2 workers on this machine:
  rounds/s, the cloud's share of a round (forward, backward, all-reduce, AdamW) and the
  all-reduce alone. Writes docs/bench/distributed.{md,json}.

``z`` leaves each edge detached and its ``dL/dz`` comes back, as over the wire, so the cloud's
time is its own. One worker (``--nproc-per-node 1``) runs the same code with a group of one.

A rank's run: ``torchrun --nproc-per-node N -m benchmarks.distributed_fleet worker --bundle B --out DIR``;
each rank writes ``DIR/rank-R.safetensors`` (the top part as ``top.*``, its devices' edges as
``edge.I.*``) and ``DIR/rank-R.json`` (its devices' losses and per-round timings).
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
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cloud_backend.distributed import DataParallelTop, init_from_env
from cloud_backend.model import load_cloud_part
from models.fleet import DeviceBatch
from splitwire.bundle import Bundle, load_bundle
from splitwire.schedule import Schedule
from tests.bundles import reference_edge

SEED = 11


def devices_of(rank: int, world_size: int, devices: int) -> list[int]:
    """The fleet's devices a rank serves: contiguous blocks, in device order."""
    return [i for i in range(devices) if i * world_size // devices == rank]


def device_batch(bundle: Bundle, device: int, round_: int, *, batch: int, length: int) -> DeviceBatch:
    """Device ``device``'s batch of round ``round_``: random tokens, lengths and labels, the same in every process."""
    rng = np.random.default_rng([SEED, device, round_])
    encoder = bundle.encoder
    lengths = rng.integers(2, length + 1, batch)
    mask = (np.arange(lengths.max())[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1000, encoder["vocab_size"], mask.shape), encoder["pad_token_id"])
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask),
              "position_ids": np.broadcast_to(np.arange(mask.shape[1]), mask.shape).copy()}
    labels = rng.integers(0, bundle.split["num_labels"], batch)
    return DeviceBatch({k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}, torch.from_numpy(labels))


def present(absent: Sequence[str], round_: int, device: int) -> bool:
    """Whether ``device`` takes part in ``round_`` (``absent``: ``ROUND:DEVICE`` pairs, 1-based rounds)."""
    return f"{round_}:{device}" not in absent


def schedule(rounds: int) -> Schedule:
    return Schedule(lr=1e-3, kind="linear", warmup_steps=1, total_steps=rounds)


def adamw(bundle: Bundle, params) -> torch.optim.AdamW:
    opt = bundle.manifest.optimizer
    return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def _step(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(args: argparse.Namespace) -> None:
    """One rank: its devices' edges, its copy of the top part, and every round's collectives."""
    bundle = load_bundle(args.bundle)
    me = init_from_env(torch.device("cpu"), timeout_s=60.0)
    mine = devices_of(me.rank, me.world_size, args.devices)
    edges = {i: reference_edge(bundle.root) for i in mine}
    edge_optimizers = {i: adamw(bundle, edge.parameters()) for i, edge in edges.items()}
    edge_steps = dict.fromkeys(mine, 0)
    top = DataParallelTop(load_cloud_part(bundle, device=torch.device("cpu")))
    top_optimizer = adamw(bundle, top.model.parameters())
    rate = schedule(args.rounds).rate
    torch.manual_seed(SEED + me.rank)  # this rank's rows' dropout masks
    losses: dict[int, list[float]] = {i: [] for i in mine}
    timings, applied = [], 0
    for round_ in range(1, args.rounds + 1):
        here = [i for i in mine if present(args.absent, round_, i)]
        batches = [device_batch(bundle, i, round_, batch=args.batch, length=args.length) for i in here]
        zs = [edges[i](**b.inputs) for i, b in zip(here, batches)]
        wire = [z.detach().requires_grad_(True) for z in zs]  # what crosses the wire
        dist.barrier()  # time the cloud from a common start
        start = time.perf_counter()
        share = top.backward(wire, [b.inputs["attention_mask"] for b in batches], [b.labels for b in batches])
        if share is None:
            continue
        top.reduce_gradients(refused=False)
        applied += 1
        _step(top_optimizer, rate(applied))
        timings.append({"cloud_s": time.perf_counter() - start, "reduce_s": top.reduce_s, "rows": share.total_rows})
        for i, z, w, loss in zip(here, zs, wire, share.joint.device_losses if share.joint else []):
            z.backward(w.grad)
            edge_steps[i] += 1
            _step(edge_optimizers[i], rate(edge_steps[i]))
            losses[i].append(loss)
    tensors = {f"top.{n}": p.detach().contiguous() for n, p in top.model.named_parameters()}
    for i, edge in edges.items():
        tensors |= {f"edge.{i}.{n}": p.detach().contiguous() for n, p in edge.named_parameters()}
    out = Path(args.out)
    save_file(tensors, str(out / f"rank-{me.rank}.safetensors"))
    (out / f"rank-{me.rank}.json").write_text(json.dumps({"losses": {str(i): v for i, v in losses.items()},
                                                          "rounds": applied, "timings": timings}))
    dist.destroy_process_group()


def torchrun(workers: int, bundle: Path, out: Path, *, devices: int, rounds: int, batch: int, length: int,
             absent: Sequence[str] = (), timeout_s: float = 600.0) -> None:
    """Run the fleet's rounds on ``workers`` torchrun ranks (one host, a free port)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers),
               "--standalone", "-m", "benchmarks.distributed_fleet", "worker", "--bundle", str(bundle),
               "--out", str(out), "--devices", str(devices), "--rounds", str(rounds), "--batch", str(batch),
               "--length", str(length), "--absent", *absent]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, timeout=timeout_s, env=env, cwd=Path(__file__).resolve().parents[1],
                   capture_output=True)


def read_run(out: Path, workers: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Every rank's tensors (the top part once per rank: ``rank.R.top.*``) and JSON reports."""
    tensors, reports = {}, []
    for rank in range(workers):
        for name, value in load_file(str(out / f"rank-{rank}.safetensors")).items():
            tensors[f"rank.{rank}.{name}" if name.startswith("top.") else name] = value
        reports.append(json.loads((out / f"rank-{rank}.json").read_text()))
    return tensors, reports


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "worker":
        worker(args)
        return
    measure(args)


def measure(args: argparse.Namespace) -> None:
    """1 against 2 workers on the same rounds; prints and writes docs/bench/distributed.{md,json}."""
    from benchmarks.load import _bundle
    from benchmarks.report import ROOT, write_section

    bundle = _bundle(args.model, Path(args.bundles))
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            torchrun(workers, bundle, Path(tmp), devices=args.devices, rounds=args.rounds, batch=args.batch,
                     length=args.length)
            wall = time.perf_counter() - started
            _, reports = read_run(Path(tmp), workers)
        timed = [t for t in reports[0]["timings"][1:]]  # the first round pays torch's one-time costs
        rows.append({"workers": workers, "devices": args.devices, "rounds": args.rounds, "batch": args.batch,
                     "length": args.length, "wall_s": round(wall, 1),
                     "rounds_per_s": round(len(timed) / sum(t["cloud_s"] for t in timed), 2),
                     "cloud_ms": round(1000 * statistics.median(t["cloud_s"] for t in timed), 1),
                     "reduce_ms": round(1000 * statistics.median(t["reduce_s"] for t in timed), 2),
                     "load_average": round(os.getloadavg()[0], 1)})
        print(json.dumps(rows[-1]), flush=True)
    (ROOT / "docs" / "bench" / "distributed.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_section("distributed", _table(args, rows))


def _table(args: argparse.Namespace, rows: list[dict]) -> str:
    import platform

    lines = ["| workers | devices | rows/round | rounds/s (cloud) | cloud ms/round (median) | all-reduce ms (median) "
             "| load average |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['devices']} | {r['devices'] * r['batch']} | {r['rounds_per_s']} | "
              f"{r['cloud_ms']} | {r['reduce_ms']} | {r['load_average']} |" for r in rows]
    return "\n".join(lines) + (
        f"\n\nCommand: `python -m benchmarks.distributed_fleet --model {args.model} --devices {args.devices} "
        f"--rounds {args.rounds} --batch {args.batch} --length {args.length}`, on {platform.machine()} with "
        f"{os.cpu_count()} cores shared with other jobs (the load average, 1 minute, shows how busy), gloo, "
        "one thread per worker (OMP_NUM_THREADS=1). The cloud's share of a round: the top part's forward and "
        "backward on this worker's rows, the gradient all-reduce (waiting for the slower worker included) and "
        "AdamW, timed on rank 0 from a barrier; the first round is left out.\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="one torchrun rank (started by torchrun, not by hand)")
    w.add_argument("--bundle", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--absent", nargs="*", default=[], help="ROUND:DEVICE pairs that skip a round")
    for q in (p, w):
        q.add_argument("--devices", type=int, default=4, help="devices of the fleet (default: 4)")
        q.add_argument("--rounds", type=int, default=20, help="synchronous rounds (default: 20)")
        q.add_argument("--batch", type=int, default=8, help="rows per device and round (default: 8)")
        q.add_argument("--length", type=int, default=64, help="longest row, in tokens (default: 64)")
    p.add_argument("--model", choices=("tiny", "minilm"), default="minilm")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--bundles", default="runs/bench/load", help="export cache (shared with benchmarks.load)")
    return p


if __name__ == "__main__":
    main()
