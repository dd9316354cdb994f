"""The matrix products of one edge step alone: onnxruntime's kernels against PyTorch's, 1 thread.

Why it exists: matrix products are 66–79 % of the ``onnx`` engine's kernel time
(docs/bench/edge_profile.md), so the engine's step can be no faster against PyTorch's than
onnxruntime's matrix kernels (MLAS) are against PyTorch's (oneDNN/MKL on x86). This times
those products alone, at the shapes of a bert-base edge layer (``batch × length`` tokens,
hidden 768, FFN 3,072), each as the graphs run it:

- forward ``x·Wᵀ + b``: onnxruntime ``Gemm`` (transB), torch ``addmm``;
- the input's gradient ``dy·W``: ``MatMul`` / ``mm``;
- the weight's gradient ``dyᵀ·x``: ``FusedMatMul`` (transA, what the backward graph holds) / ``mm``.

Each is the median of ``--repeats`` timed calls after a warm-up, on one thread, torch and
onnxruntime alternating call by call, so the ratio holds on a loaded machine too.

Run: ``python -m benchmarks.edge_gemm``; writes docs/bench/edge_gemm.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np

from benchmarks.report import write_section

HIDDEN, FFN = 768, 3072
LAYER = {(HIDDEN, HIDDEN): 4, (HIDDEN, FFN): 1, (FFN, HIDDEN): 1}  # (in, out) → linears of that shape in a layer
PRODUCTS = ("forward x·Wᵀ+b", "grad input dy·W", "grad weight dyᵀ·x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8 * 128, help="rows of every product: batch × length (default 1,024)")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    rows = []
    for (inputs, outputs), count in LAYER.items():
        for product, (ort_call, torch_call) in zip(PRODUCTS, _calls(args.tokens, inputs, outputs)):
            ort_s, torch_s = _alternating(ort_call, torch_call, repeats=args.repeats)
            rows.append({"weight": f"{outputs}×{inputs}", "per_layer": count, "product": product,
                         "ort_ms": 1e3 * ort_s, "torch_ms": 1e3 * torch_s, "ratio": ort_s / torch_s})
            print(rows[-1], flush=True)
    _report(args, rows)


def _calls(tokens: int, inputs: int, outputs: int) -> list[tuple[Callable[[], object], Callable[[], object]]]:
    """(onnxruntime, torch) calls of the three products of one ``outputs × inputs`` linear layer."""
    import torch

    from edge_runtime.engine import cpu_session_options
    from edge_runtime.ort_import import onnxruntime

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal((tokens, n), dtype=np.float32) for n in (inputs, outputs))
    w, b = rng.standard_normal((outputs, inputs), dtype=np.float32), rng.standard_normal(outputs, dtype=np.float32)
    tx, tdy, tw, tb = map(torch.from_numpy, (x, dy, w, b))
    ort = onnxruntime()

    def session(op: str, feeds: dict[str, np.ndarray], **attributes):
        from onnx import TensorProto, helper

        node = helper.make_node(op, list(feeds), ["out"], domain="com.microsoft" if op == "FusedMatMul" else "",
                                **attributes)
        graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                               for n, a in feeds.items()],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8  # what every onnxruntime since 1.10 reads
        run = ort.InferenceSession(model.SerializeToString(), cpu_session_options(ort, 1),
                                   providers=["CPUExecutionProvider"]).run
        return lambda: run(None, feeds)

    return [(session("Gemm", {"x": x, "w": w, "b": b}, transB=1), lambda: torch.addmm(tb, tx, tw.t())),
            (session("MatMul", {"dy": dy, "w": w}), lambda: tdy @ tw),
            (session("FusedMatMul", {"dy": dy, "x": x}, transA=1), lambda: tdy.t() @ tx)]


def _alternating(first: Callable[[], object], second: Callable[[], object], *, repeats: int) -> tuple[float, float]:
    """Median seconds of each call, timed in turn after one warm-up call each."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, kept in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            call()
            kept.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _report(args: argparse.Namespace, rows: list[dict]) -> None:
    import os

    ort_total, torch_total = (sum(r["per_layer"] * r[key] for r in rows) for key in ("ort_ms", "torch_ms"))
    table = "\n".join(f"| {r['weight']} | {r['per_layer']} | {r['product']} | {r['ort_ms']:.1f} | {r['torch_ms']:.1f} | "
                      f"**{r['ratio']:.2f}** |" for r in rows)
    body = (f"One bert-base edge layer's linear products at {args.tokens} tokens, 1 thread: the median of "
            f"{args.repeats} calls each, onnxruntime and torch alternating. The 1-minute load average was "
            f"{os.getloadavg()[0]:.1f} at the end. *One layer*: each product times the linears of its shape in a layer "
            "(query, key, value and output; FFN in; FFN out).\n\n| weight (out × in) | per layer | product | "
            "onnxruntime ms | torch ms | onnxruntime × torch |\n|---|---|---|---|---|---|\n"
            f"{table}\n| one layer | | | {ort_total:.1f} | {torch_total:.1f} | "
            f"**{ort_total / torch_total:.2f}** |\n")
    write_section("edge_gemm", title="The edge step's matrix products alone: onnxruntime against PyTorch",
                  command="python -m benchmarks.edge_gemm", settings={"tokens": args.tokens, "repeats": args.repeats,
                                                                       "threads": 1}, body=body, results=rows)


if __name__ == "__main__":
    main()
