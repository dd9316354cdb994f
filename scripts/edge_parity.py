"""Same edge training steps, two installations: run them in each, then compare the weights.

Why it exists: the edge-only install test (a fresh venv with plain onnxruntime) and the ARM
smoke test (an aarch64 root under emulation) both have to show that an edge installed
elsewhere trains to the same weights as the development install. This file runs with the
edge's dependencies only (numpy, safetensors, onnxruntime; never torch), so the very same
code runs on both sides (with splitft installed, or ``PYTHONPATH`` at a checkout):

    python scripts/edge_parity.py run BUNDLE OUT.safetensors [--steps 3 --lr 1e-3 --seed 0]
    python scripts/edge_parity.py compare GOT WANT --lr 1e-3 --steps 3

``run`` feeds fixed pseudo-random padded batches and a fixed ``dL/dz`` (zero at padding, as
the cloud sends it) through ``forward``/``backward``/``optimizer_step`` and saves the trainable
parameters. ``compare`` accepts those files or an ``onnx`` engine's checkpoint state
(``edge_state.safetensors``, parameters under ``param/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from edge_runtime.engine import EdgeBatch, open_engine
from splitwire.bundle import load_bundle

REL_TOL = 1e-5
KEY_BIAS = "attention.key.bias"  # dL/d(key bias) is 0 in exact arithmetic: Adam steps rounding noise, <= lr each
STATE_PARAM = "param/"
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
    save_file(engine.parameters(), str(out))


def read_parameters(path: Path) -> dict[str, np.ndarray]:
    tensors = load_file(str(path))
    if any(name.startswith(STATE_PARAM) for name in tensors):  # an onnx engine checkpoint
        return {name[len(STATE_PARAM):]: t for name, t in tensors.items() if name.startswith(STATE_PARAM)}
    return tensors


def differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray], *, lr: float, steps: int
                ) -> dict[str, tuple[float, float]]:
    """Per parameter: (error, tolerance). Relative to the tensor's largest magnitude, except the
    attention key biases: absolute, against what Adam can do with noise (``2·lr·steps``)."""
    if set(got) != set(want):
        raise ValueError(f"different parameters: {sorted(set(got) ^ set(want))[:5]}")
    result = {}
    for name, w in want.items():
        err = float(np.abs(got[name].astype(np.float64) - w).max())
        if name.endswith(KEY_BIAS):
            result[name] = (err, 2 * lr * steps)
        else:
            result[name] = (err / max(float(np.abs(w).max()), 1e-12), REL_TOL)
    return result


def compare(got: Path, want: Path, *, lr: float, steps: int) -> bool:
    diffs = differences(read_parameters(got), read_parameters(want), lr=lr, steps=steps)
    relative = [err for name, (err, _) in diffs.items() if not name.endswith(KEY_BIAS)]
    key_bias = [err for name, (err, _) in diffs.items() if name.endswith(KEY_BIAS)]
    failed = {name: d for name, d in diffs.items() if d[0] > d[1]}
    print(f"{len(diffs)} parameter tensors: max relative difference {max(relative):.3g} (tolerance {REL_TOL:g}); "
          f"attention key biases max absolute difference {max(key_bias, default=0.0):.3g} "
          f"(tolerance {2 * lr * steps:g})")
    for name, (err, tol) in failed.items():
        print(f"  DIFFERENT: {name}: {err:.3g} > {tol:.3g}")
    return not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a few steps with fixed inputs, save the parameters")
    run.add_argument("bundle", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("compare", help="exit 1 unless two parameter files are equal within tolerance")
    check.add_argument("got", type=Path)
    check.add_argument("want", type=Path)
    for command in (run, check):
        command.add_argument("--steps", type=int, default=3)
        command.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.command == "run":
        run_steps(args.bundle, args.out, steps=args.steps, lr=args.lr, seed=args.seed)
        return 0
    return 0 if compare(args.got, args.want, lr=args.lr, steps=args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
