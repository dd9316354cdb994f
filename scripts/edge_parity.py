"""Same edge training steps, two installations: run them in each, then compare the weights.

Why it exists: the edge-only install test (a fresh venv with plain onnxruntime) and the ARM
smoke test (an aarch64 root under emulation) both have to show that an edge installed
elsewhere trains to the same weights as the development install. This file runs with the
edge's dependencies only (numpy, safetensors, onnxruntime; never torch), so the very same
code runs on both sides (with splitft installed, or ``PYTHONPATH`` at a checkout):

    python scripts/edge_parity.py run BUNDLE OUT_DIR [--steps 1 --lr 1e-3 --seed 0]
    python scripts/edge_parity.py compare GOT/edge_state.safetensors WANT/edge_state.safetensors --lr 1e-3

``run`` feeds fixed pseudo-random padded batches and a fixed ``dL/dz`` (zero at padding, as
the cloud sends it) through ``forward``/``backward``/``optimizer_step`` of an ``onnx`` bundle
and saves the engine's state, as an ``sft-edge`` checkpoint does. ``compare`` judges two such
states (see ``differences``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from edge_runtime.engine import EdgeBatch, open_engine
from splitwire.bundle import load_bundle

REL_TOL = 1e-5
KEY_BIAS = "attention.key.bias"  # dL/d(key bias) is 0 in exact arithmetic: both sides hold ~1e-6 rounding noise
PARAM, MOMENTS = "param/", ("exp_avg/", "exp_avg_sq/")
STATE = "edge_state.safetensors"  # the onnx engine's checkpoint: parameters, both AdamW moments, step, lr
LENGTHS = (11, 4, 7)  # one batch: rows right-padded to the longest


def edge_batch(rng: np.random.Generator, *, vocab: int) -> EdgeBatch:
    b, length = len(LENGTHS), max(LENGTHS)
    real = np.arange(length)[None, :] < np.array(LENGTHS)[:, None]
    return EdgeBatch(input_ids=np.where(real, rng.integers(1, vocab, (b, length)), 0),
                     attention_mask=real.astype(np.int64),
                     token_type_ids=np.zeros((b, length), np.int64),
                     position_ids=np.tile(np.arange(length, dtype=np.int64), (b, 1)))


def run_steps(bundle_root: Path, out: Path, *, steps: int, lr: float, seed: int) -> None:
    bundle = load_bundle(bundle_root, parts=["edge"])
    engine = open_engine(bundle, threads=1)
    engine.set_learning_rate(lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = edge_batch(rng, vocab=bundle.encoder["vocab_size"])
        z = engine.forward(batch)
        dz = rng.standard_normal(z.shape) * batch.attention_mask[..., None]
        engine.backward(dz.astype(np.float32))
        engine.optimizer_step()
    out.mkdir(parents=True, exist_ok=True)
    engine.save(out)


def differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray], *, lr: float
                ) -> dict[str, tuple[float, float]]:
    """Per tensor of two AdamW states: (error, tolerance).

    The moments are sums of gradients and of their squares: they must agree to ``REL_TOL`` of the
    tensor's largest magnitude (``2·REL_TOL`` for the squares: a relative error in g is doubled in g²);
    the key biases' moments, 0 in exact arithmetic, absolutely.
    Parameters get an absolute bound of ``2·lr·step``: Adam divides each element's gradient by its
    own magnitude, so an element whose gradient is at the rounding level (|g| ~ 1e-7 where the
    tensor's largest is ~100) takes a full ±lr step whose sign is the rounding's.
    """
    if set(got) != set(want):
        raise ValueError(f"different tensors: {sorted(set(got) ^ set(want))[:5]}")
    steps = int(want["step"])
    result = {"step": (float(abs(int(got["step"]) - steps)), 0.0), "lr": (abs(float(got["lr"]) - lr), 0.0)}
    for name, w in want.items():
        err = float(np.abs(got[name].astype(np.float64) - w).max())
        if name.startswith(PARAM):
            result[name] = (err, 2 * lr * steps)
        elif name.startswith(MOMENTS) and name.endswith(KEY_BIAS):
            result[name] = (err, REL_TOL)
        elif name.startswith(MOMENTS):
            tolerance = 2 * REL_TOL if name.startswith(MOMENTS[1]) else REL_TOL
            result[name] = (err / max(float(np.abs(w).max()), 1e-30), tolerance)
    return result


def largest_relative(got: dict[str, np.ndarray], want: dict[str, np.ndarray], prefix: str) -> tuple[float, str]:
    """The largest difference relative to its tensor's largest magnitude among ``prefix`` tensors (key biases aside)."""
    return max((float(np.abs(got[n].astype(np.float64) - w).max() / max(float(np.abs(w).max()), 1e-30)), n)
               for n, w in want.items() if n.startswith(prefix) and not n.endswith(KEY_BIAS))


def compare(got_path: Path, want_path: Path, *, lr: float) -> bool:
    got, want = load_file(str(got_path)), load_file(str(want_path))
    diffs = differences(got, want, lr=lr)
    failed = {name: d for name, d in diffs.items() if d[0] > d[1]}
    print(f"{len(diffs)} tensors after {int(want['step'])} AdamW steps; largest relative differences: "
          + ", ".join(f"{p}* {largest_relative(got, want, p)[0]:.3g}" for p in (*MOMENTS, PARAM))
          + f"; parameters' largest absolute {max(e for n, (e, _) in diffs.items() if n.startswith(PARAM)):.3g}")
    for name, (err, tol) in failed.items():
        print(f"  DIFFERENT: {name}: {err:.3g} > {tol:.3g}")
    return not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a few steps with fixed inputs, save the engine's state")
    run.add_argument("bundle", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--steps", type=int, default=1)
    check = commands.add_parser("compare", help="exit 1 unless two engine states are equal within tolerance")
    check.add_argument("got", type=Path)
    check.add_argument("want", type=Path)
    for command in (run, check):
        command.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.command == "run":
        run_steps(args.bundle, args.out, steps=args.steps, lr=args.lr, seed=args.seed)
        return 0
    return 0 if compare(args.got, args.want, lr=args.lr) else 1


if __name__ == "__main__":
    sys.exit(main())
