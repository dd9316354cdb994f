"""``sft-edge doctor``: will this bundle train on this device? Checked before a long run.

Why it exists: a small board (4 cores, 1–8 GB RAM) fails late and badly when the edge half
does not fit: the kernel kills the process mid-epoch. The doctor answers from the bundle's
manifest and weight shapes alone, without loading the engine:

- the engine's runtime imports (onnxruntime's training API for ``ort-training``, plain
  onnxruntime for ``onnx``);
- usable CPU cores;
- RAM: the estimated peak of a training step at the chosen batch × length against what
  this machine (or its cgroup, or ``--memory-limit``) allows;
- free disk for checkpoints (two kept, one being written);
- with ``--cloud``: the cloud is reachable and serves the same bundle (its hello carries
  the bundle hash; a mismatch is refused);

then prints one line per check, the fixes for what failed, and a verdict (exit status 0:
ready, 1: not ready).

The memory estimate is ``edge_runtime.memory_model``'s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_runtime.cgroup import memory_limit
from edge_runtime.client import CloudClient, client_tls, session_token
from edge_runtime.memory_model import MIB, EdgeSize
from splitwire.bundle import Bundle, load_bundle
from splitwire.errors import AuthError, BundleMismatch, ConnectionLost, SplitftError, UsageError
from splitwire.schedule import Schedule

DOCTOR_SESSION = "splitft-doctor"  # the one session id the doctor's hello opens on the cloud
CHECKPOINTS_ON_DISK = 3  # the trainer keeps two and writes the next beside them
DEFAULT_BATCH_SIZE = 32  # sft-edge train's default
CLOUD_TIMEOUT_S = 10.0
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``1GiB``, ``512MiB``, ``2G`` (binary), ``800MB`` (decimal), or plain bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 1GiB, 768MiB, 2G)")
    value, unit, binary, suffix = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    base = 1000 if suffix and not binary else 1024
    return int(float(value) * base**power)


# --- the checks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fixes: tuple[str, ...] = ()


def check_runtime(engine: str) -> Check:
    """The engine's onnxruntime imports (without torch), with the training API for ``ort-training``."""
    from edge_runtime.ort_import import onnxruntime, training_api

    try:
        ort = onnxruntime()
        if engine == "ort-training":
            training_api()
            return Check("runtime", True, f"onnxruntime {ort.__version__} with the training API")
        if not hasattr(ort, "InferenceSession"):
            raise ImportError(f"{ort.__file__} has no InferenceSession")
        return Check("runtime", True, f"onnxruntime {ort.__version__}")
    except ImportError as exc:
        fixes = ("pip install 'splitft[edge]' (plain onnxruntime: the onnx engine)",)
        if engine == "ort-training":
            fixes = ("pip install 'splitft[edge-training]' (x86_64, Python <= 3.11)",
                     "on ARM: build it with scripts/build-ort-training-aarch64.sh (docs/edge-on-arm.md)",
                     "or re-export the bundle with sft-export --engine onnx (plain onnxruntime is enough)")
        return Check("runtime", False, f"the {engine} engine cannot import its runtime: {exc}", fixes)


def check_cpus() -> Check:
    cores = len(os.sched_getaffinity(0))
    return Check("cpu", True, f"{cores} usable core{'s' * (cores != 1)} (sft-edge --threads {cores} uses them all)")


def memory_available() -> tuple[int, str]:
    """Bytes this process may still use: ``MemAvailable``, or its cgroup's limit when lower."""
    available, source = _meminfo_available(), "MemAvailable in /proc/meminfo"
    limit = memory_limit()
    if limit is not None and limit < available:
        return limit, "this cgroup's memory limit"
    return available, source


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def check_memory(size: EdgeSize, *, batch: int, length: int, limit: int, source: str) -> Check:
    peak, needed = size.peak_bytes(batch=batch, length=length), size.resident_bytes(batch=batch, length=length)
    trained = f"{size.trained / 1e6:.1f} M trained" + (
        f" in the top {size.trained_layers} of {size.layers} layers" if size.trained_layers < size.layers else "")
    mapped = (f", {needed / MIB:,.0f} MiB of it not reclaimable (frozen weights are mapped from the bundle)"
              if needed < peak else "")
    detail = (f"estimated peak {peak / MIB:,.0f} MiB{mapped} for a step of batch {batch} × length {length} "
              f"({size.parameters / 1e6:.1f} M edge parameters, {trained}"
              f"{', bf16 AdamW moments' if size.moment_bytes == 2 else ''}); "
              f"{limit / MIB:,.0f} MiB allowed ({source})")
    if needed <= limit:
        return Check("memory", True, detail)
    return Check("memory", False, detail, memory_fixes(size, batch=batch, length=length, limit=limit))


def memory_fixes(size: EdgeSize, *, batch: int, length: int, limit: int) -> tuple[str, ...]:
    """What would make a step fit ``limit``: a lighter edge (frozen embeddings, bf16 moments, fewer trained
    layers), a smaller batch, or a lighter edge and a smaller batch."""
    def fits(s: EdgeSize, b: int) -> bool:
        return s.resident_bytes(batch=b, length=length) <= limit

    def estimate(s: EdgeSize, b: int) -> str:
        return f"(estimated {s.resident_bytes(batch=b, length=length) / MIB:,.0f} MiB)"

    lighter = lighter_edges(size)
    fixes = [f"re-export with sft-export ... {flags} {estimate(s, batch)}" for flags, s in lighter if fits(s, batch)]
    smaller = _largest_batch(lambda b: fits(size, b), below=batch)
    if smaller:
        fixes.append(f"lower --batch-size to {smaller} {estimate(size, smaller)}")
    if not fixes and lighter:
        flags, lightest = lighter[-1]
        both = _largest_batch(lambda b: fits(lightest, b), below=batch)
        if both:
            fixes.append(f"re-export with {flags} and lower --batch-size to {both} {estimate(lightest, both)}")
    if not fixes:
        fixes.append("even batch 1 does not fit: re-export with a smaller --split (fewer layers on the edge) or "
                     f"a shorter --max-length than {length}, or use a device with more memory")
    return tuple(fixes)


def lighter_edges(size: EdgeSize) -> list[tuple[str, EdgeSize]]:
    """The lighter exports of this edge, lightest last, as ``sft-export`` flags and their sizes: frozen
    embeddings, bf16 moments (onnx engine), then fewer trained layers (with bf16 moments where they apply)."""
    bf16 = size.engine == "onnx" and size.moment_bytes > 2
    options = []
    if size.embeddings_trained:
        options.append(("--freeze-embeddings", size.with_frozen_embeddings()))
    if bf16:
        options.append(("--edge-moments bf16", size.with_bf16_moments()))
    for n in range(size.trained_layers - 1, -1, -1):
        fewer = size.with_trained_layers(n)
        options.append((f"--train-edge-layers {n}" + " --edge-moments bf16" * bf16,
                        fewer.with_bf16_moments() if bf16 else fewer))
    return options


def _largest_batch(fits: Callable[[int], bool], *, below: int) -> int | None:
    return next((b for b in range(below - 1, 0, -1) if fits(b)), None)


def check_disk(size: EdgeSize, directory: Path) -> Check:
    needed = CHECKPOINTS_ON_DISK * size.checkpoint_bytes()
    existing = next(p for p in (directory, *directory.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / MIB:,.0f} MiB free at {existing}, checkpoints need {needed / MIB:,.0f} MiB"
    if free >= needed:
        return Check("disk", True, detail)
    return Check("disk", False, detail, ("free space there, or pass --checkpoint-dir on a larger disk",))


async def check_cloud(url: str, bundle: Bundle, *, token: str | None, ca_file: Path | None = None) -> Check:
    """Say hello as session ``splitft-doctor`` with this bundle's hash; a mismatch is refused by either side.

    The cloud keeps that one small session (the same id on every run of the doctor)."""
    schedule = Schedule(lr=bundle.manifest.optimizer.lr)
    try:
        client = await CloudClient.connect(url, bundle=bundle, session_id=DOCTOR_SESSION, token=token,
                                           schedule=schedule, ssl=client_tls(url, ca_file),
                                           open_timeout=CLOUD_TIMEOUT_S)
    except BundleMismatch as exc:
        return Check("cloud", False, f"{url} serves another bundle: {exc}",
                     ("copy the same sft-export output to the device and the cloud",))
    except AuthError as exc:
        return Check("cloud", False, f"{url} refused the token: {exc}",
                     (f"sft-cloud checks a token per session: give session {DOCTOR_SESSION!r} a line in its --tokens "
                      "file and pass that token with --token-file (or $SFT_TOKEN)",))
    except ConnectionLost as exc:
        return Check("cloud", False, str(exc), (f"start sft-cloud --bundle ... there, or check the URL {url} and "
                                                "the network/firewall between them",))
    except (SplitftError, OSError, TimeoutError, ValueError) as exc:
        return Check("cloud", False, f"{url} refused the hello: {type(exc).__name__}: {exc}")
    await client.close()
    return Check("cloud", True, f"{url} serves this bundle ({bundle.hash[:12]}…)")


# --- the command -------------------------------------------------------------------------------------


class NotReady(SplitftError):
    """The doctor found problems; they were printed with their fixes."""

    code = "not_ready"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle directory sft-export wrote")
    parser.add_argument("--cloud", metavar="URL", help="also check that this sft-cloud serves the same bundle")
    parser.add_argument("--token-file", type=Path, help="file holding the session token (default: $SFT_TOKEN)")
    parser.add_argument("--ca-file", type=Path, help="PEM CA certificate of a wss:// cloud (default: the system's)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"rows per step to check for (default {DEFAULT_BATCH_SIZE}, sft-edge train's)")
    parser.add_argument("--max-length", type=int, help="tokens per row to check for (default: the bundle's)")
    parser.add_argument("--memory-limit", type=parse_size,
                        help="memory the run may use, e.g. 1GiB (default: what this machine/cgroup has available)")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("runs"),
                        help="where checkpoints will go (default runs/)")


def device_checks(bundle: Bundle, args: argparse.Namespace) -> list[Check]:
    """The checks of this device alone: runtime, cores, memory, disk."""
    length = args.max_length or bundle.max_length
    if args.batch_size < 1 or not 1 <= length <= bundle.max_length:
        raise UsageError(f"--batch-size must be >= 1 and --max-length within 1..{bundle.max_length}")
    limit, source = (args.memory_limit, "--memory-limit") if args.memory_limit else memory_available()
    size = EdgeSize.of(bundle)
    return [check_runtime(bundle.manifest.engine), check_cpus(),
            check_memory(size, batch=args.batch_size, length=length, limit=limit, source=source),
            check_disk(size, args.checkpoint_dir)]


def report(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<8}{check.detail}")
        lines += [f"      {'':<8}fix: {fix}" for fix in check.fixes]
    failed = [c.name for c in checks if not c.ok]
    lines.append(f"verdict: {'ready to train' if not failed else 'NOT READY: ' + ', '.join(failed)}")
    return "\n".join(lines)


async def doctor_command(args: argparse.Namespace) -> None:
    """Print the checks; raise ``NotReady`` (exit status 1) when any failed."""
    bundle = load_bundle(args.bundle, parts=("edge",))
    checks = device_checks(bundle, args)
    if args.cloud:
        checks.append(await check_cloud(args.cloud, bundle, token=session_token(args.token_file),
                                        ca_file=args.ca_file))
    print(report(checks))
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise NotReady(f"not ready: {', '.join(failed)} (see the fixes above)")
