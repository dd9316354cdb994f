"""scripts/gpu_check.py in the mode this machine can run: the top part in float32 on the CPU against
float64, cloud steps timed, and a real 2-process gloo all-reduce round. Its CUDA and NCCL paths need
a GPU (docs/SCALING.md says they are unverified here); without one, asking for them exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def run(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *options], capture_output=True, text=True, timeout=300)


def test_cpu_gloo_mode_checks_parity_throughput_and_an_allreduce_round(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = run("--device", "cpu", "--backend", "gloo", "--batch-sizes", "1", "2", "--length", "16", "--steps", "1",
               "--rounds", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["parameters"] == 5_928_962  # MiniLM-L6 split 3, rank 8: 3 layers, the split FFN, pooling, head
    assert result["parity"]["passed"] and result["parity"]["worst"] <= 1e-4 and result["parity"]["tensors"] > 50
    assert [row["batch"] for row in result["throughput"]] == [1, 2]
    assert all(row["step_s"] > 0 and row["examples_per_s"] > 0 for row in result["throughput"])
    reduce = result["allreduce"]
    assert reduce["passed"] and reduce["max_error"] == 0.0 and reduce["bytes"] == 4 * result["parameters"]
    assert "parity (float32 on cpu vs float64 CPU" in done.stdout
    again = run("--report", str(out))  # the recorded run's report and scaling model, measuring nothing
    two_workers_10_gbit_ms = 1000 * (4 * result["parameters"]) * 8 / 10e9  # ring factor 2(n-1)/n = 1
    assert again.returncode == 0 and f"10 Gbit/s: {two_workers_10_gbit_ms:.1f} / " in again.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_cuda_path_exits_2_and_says_why():
    done = run("--device", "cuda")
    assert done.returncode == 2 and "torch sees no CUDA device" in done.stderr
