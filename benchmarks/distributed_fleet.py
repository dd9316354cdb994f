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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cloud_backend.distributed import DataParallelTop, common_step, init_from_env
from cloud_backend.model import load_cloud_part
from models.fleet import DeviceBatch
from splitwire.atomic import write_atomically
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


class Rank:
    """One rank's part of the fleet: its devices' edges and AdamWs, its copy of the top part and its AdamW."""

    def __init__(self, bundle: Bundle, args: argparse.Namespace, rank: int, world_size: int) -> None:
        self.bundle, self.args, self.rank = bundle, args, rank
        self.mine = devices_of(rank, world_size, args.devices)
        self.edges = {i: reference_edge(bundle.root) for i in self.mine}
        self.edge_optimizers = {i: adamw(bundle, edge.parameters()) for i, edge in self.edges.items()}
        self.top = DataParallelTop(load_cloud_part(bundle, device=torch.device("cpu")))
        self.top_optimizer = adamw(bundle, self.top.model.parameters())
        self.rate = schedule(args.rounds).rate
        torch.manual_seed(SEED + rank)  # this rank's rows' dropout masks
        self.done = 0  # rounds run, with or without rows
        self.applied = 0  # rounds that stepped (the top's step count)
        self.edge_steps = dict.fromkeys(map(str, self.mine), 0)
        self.losses: dict[str, list[float]] = {str(i): [] for i in self.mine}
        self.timings: list[dict] = []

    def run_round(self, round_: int) -> None:
        """Round ``round_``: the present devices' edges forward, the top's data-parallel step, the edges' steps."""
        here = [i for i in self.mine if present(self.args.absent, round_, i)]
        batches = [device_batch(self.bundle, i, round_, batch=self.args.batch, length=self.args.length) for i in here]
        zs = [self.edges[i](**b.inputs) for i, b in zip(here, batches)]
        wire = [z.detach().requires_grad_(True) for z in zs]  # what crosses the wire
        dist.barrier()  # time the cloud from a common start
        start = time.perf_counter()
        share = self.top.forward(wire, [b.inputs["attention_mask"] for b in batches], [b.labels for b in batches])
        self.done = round_
        if share is None:
            return
        if share.loss is not None:
            share.loss.backward()
        self.top.reduce_gradients()
        self.applied += 1
        _step(self.top_optimizer, self.rate(self.applied))
        self.timings.append({"cloud_s": time.perf_counter() - start, "reduce_s": self.top.reduce_s,
                             "rows": share.total_rows, "reduce_alone_s": self._reduce_alone()})
        for i, z, w, loss in zip(here, zs, wire, share.joint.device_losses if share.joint else []):
            z.backward(w.grad)
            self.edge_steps[str(i)] += 1
            _step(self.edge_optimizers[i], self.rate(self.edge_steps[str(i)]))
            self.losses[str(i)].append(loss)

    def _reduce_alone(self) -> float:
        """Seconds of an all-reduce of the top part's size once every worker is there (no waiting counted)."""
        bucket = torch.zeros(sum(p.numel() for p in self.top.model.parameters()) + 1)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(bucket)
        return time.perf_counter() - start

    def parts(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        return {"top": (self.top.model, self.top_optimizer),
                **{f"edge.{i}": (self.edges[i], self.edge_optimizers[i]) for i in self.mine}}

    def save(self, path: Path) -> None:
        """This rank's whole state after round ``done`` (weights, AdamW moments, RNG, counters), atomically."""
        tensors = {"rng": torch.get_rng_state()}
        for prefix, (module, optimizer) in self.parts().items():
            tensors |= {f"{prefix}.weights.{n}": v.contiguous() for n, v in module.state_dict().items()}
            for index, state in optimizer.state_dict()["state"].items():
                tensors |= {f"{prefix}.adamw.{index}.{k}": v for k, v in state.items()}
        meta = {"done": self.done, "applied": self.applied, "edge_steps": self.edge_steps, "losses": self.losses}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"run": json.dumps(meta)}))

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["run"])
        for prefix, (module, optimizer) in self.parts().items():
            weights = f"{prefix}.weights."
            module.load_state_dict({k[len(weights):]: v for k, v in tensors.items() if k.startswith(weights)})
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(f"{prefix}.adamw."):
                    index, name = key[len(prefix) + len(".adamw."):].split(".", 1)
                    state.setdefault(int(index), {})[name] = value
            optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        self.done, self.applied = meta["done"], meta["applied"]
        self.edge_steps, self.losses = meta["edge_steps"], meta["losses"]

    def write_results(self, out: Path, **extra: object) -> None:
        tensors = {f"top.{n}": p.detach().contiguous() for n, p in self.top.model.named_parameters()}
        for i, edge in self.edges.items():
            tensors |= {f"edge.{i}.{n}": p.detach().contiguous() for n, p in edge.named_parameters()}
        save_file(tensors, str(out / f"rank-{self.rank}.safetensors"))
        (out / f"rank-{self.rank}.json").write_text(json.dumps(
            {"losses": self.losses, "rounds": self.applied, "timings": self.timings, **extra}))


def checkpoints(state: Path, rank: int) -> dict[int, Path]:
    """This rank's checkpoints in ``state``, by the round they were taken after."""
    return {int(p.name.split(".")[1].removeprefix("round-")): p for p in state.glob(f"rank-{rank}.round-*.safetensors")}


def worker(args: argparse.Namespace) -> None:
    """One rank: every round's collectives; with ``--state``, a checkpoint every ``--checkpoint-every`` rounds
    (each rank its own file, the round committed once all have written) and a (re)start from the newest
    round all ranks hold (``cloud_backend.distributed.common_step``)."""
    bundle = load_bundle(args.bundle)
    me = init_from_env(torch.device("cpu"), timeout_s=60.0)
    rank, out = Rank(bundle, args, me.rank, me.world_size), Path(args.out)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    state = Path(args.state) if args.state else None
    resumed = None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
        resumed = common_step(list(checkpoints(state, me.rank)))
        if resumed is not None:
            rank.load(checkpoints(state, me.rank)[resumed])
    for round_ in range(rank.done + 1, args.rounds + 1):
        time.sleep(args.pace)
        write_atomically(out / f"rank-{me.rank}.progress", lambda tmp: tmp.write_text(json.dumps(
            {"round": round_, "pid": os.getpid(), "restarts": restarts})))
        rank.run_round(round_)
        if state is not None and round_ % args.checkpoint_every == 0:
            rank.save(state / f"rank-{me.rank}.round-{round_}.safetensors")
            dist.barrier()  # every rank has written this round: the older checkpoints can go
            for old, path in checkpoints(state, me.rank).items():
                if old < round_:
                    path.unlink()
    rank.write_results(out, restarts=restarts, resumed_from=resumed)
    dist.destroy_process_group()


def torchrun_command(workers: int, bundle: Path, out: Path, *, devices: int, rounds: int, batch: int, length: int,
                     absent: Sequence[str] = (), state: Path | None = None, checkpoint_every: int = 1,
                     pace: float = 0.0, max_restarts: int = 0) -> list[str]:
    """``torchrun`` running the fleet's rounds on ``workers`` ranks (one host, a free port)."""
    out.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--standalone",
            "--max-restarts", str(max_restarts), "-m", "benchmarks.distributed_fleet", "worker",
            "--bundle", str(bundle), "--out", str(out), "--devices", str(devices), "--rounds", str(rounds),
            "--batch", str(batch), "--length", str(length), "--pace", str(pace),
            "--checkpoint-every", str(checkpoint_every), *(["--state", str(state)] if state else []),
            "--absent", *absent]


RUN_ENV = os.environ | {"OMP_NUM_THREADS": "1"}
REPO = Path(__file__).resolve().parents[1]


def torchrun(workers: int, bundle: Path, out: Path, *, timeout_s: float = 600.0, **options: object) -> None:
    """Run ``torchrun_command`` to its end."""
    subprocess.run(torchrun_command(workers, bundle, out, **options), check=True, timeout=timeout_s, env=RUN_ENV,
                   cwd=REPO, capture_output=True)


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
    """1 against 2 workers on the same rounds; writes docs/bench/distributed.{md,json}."""
    from benchmarks.load import _bundle
    from benchmarks.report import write_section

    bundle = _bundle(args.model, Path(args.bundles))
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            torchrun(workers, bundle, Path(tmp), devices=args.devices, rounds=args.rounds, batch=args.batch,
                     length=args.length)
            _, reports = read_run(Path(tmp), workers)
        timed = reports[0]["timings"][1:]  # the first round pays torch's one-time costs
        rows.append({"workers": workers, "rounds_per_s": round(len(timed) / sum(t["cloud_s"] for t in timed), 2),
                     "cloud_ms": round(1000 * statistics.median(t["cloud_s"] for t in timed), 1),
                     "reduce_ms": round(1000 * statistics.median(t["reduce_s"] for t in timed), 2),
                     "reduce_alone_ms": round(1000 * statistics.median(t["reduce_alone_s"] for t in timed), 2),
                     "load_average": round(os.getloadavg()[0], 1)})
        print(json.dumps(rows[-1]), flush=True)
    table = ["| workers | rounds/s (cloud) | cloud ms/round (median) | all-reduce in the round, ms (median) "
             "| all-reduce alone, ms (median) | load average |", "|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['workers']} | {r['rounds_per_s']} | {r['cloud_ms']} | {r['reduce_ms']} | {r['reduce_alone_ms']} "
              f"| {r['load_average']} |" for r in rows]
    body = "\n".join(table) + (
        "\n\nThe cloud's share of a round, timed on rank 0 from a barrier: the top part's forward and backward on "
        "its own devices' rows, the gradient all-reduce (waiting for the slower worker included) and AdamW; "
        "the first round is left out. The all-reduce alone: a bucket of the top part's size, all-reduced right "
        "after a barrier in each round (what the wire costs without the wait). Workers and the in-process edges share this machine's cores with other "
        "engineers' jobs (the load average, 1 minute, after each row, shows how busy it was), so these are "
        "figures of this machine at that time, not of the method. docs/SCALING.md sets them beside its model.\n")
    command = (f"python -m benchmarks.distributed_fleet --model {args.model} --devices {args.devices} --rounds "
               f"{args.rounds} --batch {args.batch} --length {args.length} --workers {' '.join(map(str, args.workers))}")
    write_section("distributed", title="A fleet's top part on 1 and 2 torchrun workers (gloo, CPU)", command=command,
                  settings={"model": args.model, "devices": args.devices, "rows_per_round": args.devices * args.batch,
                            "length": args.length, "rounds": args.rounds, "threads_per_worker": 1},
                  body=body, results=rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="one torchrun rank (started by torchrun, not by hand)")
    w.add_argument("--bundle", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--absent", nargs="*", default=[], help="ROUND:DEVICE pairs that skip a round")
    w.add_argument("--state", help="checkpoint directory (resume from it on a (re)start)")
    w.add_argument("--checkpoint-every", type=int, default=1, help="rounds between checkpoints (default: 1)")
    w.add_argument("--pace", type=float, default=0.0, help="seconds each round waits first, as devices would")
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
