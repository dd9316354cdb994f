"""``sft-edge doctor`` says what a capped device will do, and finds a cloud with another bundle.

The verdict for a memory cap is checked against the real thing: the edge engine training
in a child process inside a memory cgroup with that cap (``python -m benchmarks.edge_budget
capped``), where the kernel kills what does not fit. At 400 MiB the tiny BERT fits and the
MiniLM split 3 at batch 8 × 128 does not, and the doctor says so before anything runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import copy_bundle, export_cached, minilm_bundle, tiny_options  # noqa: F401 (fixture)

from cloud_backend.server import serve_cloud
from edge_runtime.cli import main
from edge_runtime.doctor import check_cloud, parse_size
from splitwire.bundle import load_bundle

CAP = "400MiB"
BATCH = 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir) -> Path:
    return export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training"))


def _doctor(bundle: Path, *, capsys, batch: int = BATCH, cap: str = CAP) -> tuple[int, str]:
    code = main(["doctor", "--bundle", str(bundle), "--batch-size", str(batch), "--memory-limit", cap])
    return code, capsys.readouterr().out


def _can_cap_memory() -> bool:
    """Whether this process may make a capped child cgroup (v1 or v2), as ``benchmarks.edge_budget`` does."""
    from benchmarks.edge_budget import own_memory_cgroup

    try:
        _, group = own_memory_cgroup()
    except OSError:
        return False
    return os.access(group, os.W_OK)


def _train_capped(bundle: Path, *, batch: int) -> bool:
    """Whether a few real training steps of ``bundle``'s edge ran to the end on one core inside a cgroup capped at CAP."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.edge_budget", "capped", "--bundle", str(bundle),
                           "--cap", CAP, "--batch", str(batch)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])["fits"]


def test_the_verdict_for_a_bundle_that_fits_and_one_that_does_not(tiny, minilm_bundle, capsys):
    code, output = _doctor(tiny, capsys=capsys)
    assert code == 0, output
    assert "ok    memory" in output and output.rstrip().endswith("verdict: ready to train")

    code, output = _doctor(minilm_bundle, capsys=capsys)
    assert code == 1, output
    assert "FAIL  memory" in output and "400 MiB allowed (--memory-limit)" in output
    assert output.rstrip().endswith("verdict: NOT READY: memory")
    assert "fix: re-export with sft-export ... --train-edge-layers 2 (estimated" in output  # a lighter edge fits


@pytest.mark.skipif(not _can_cap_memory(), reason="needs a writable memory cgroup (root) to enforce the cap")
def test_the_verdicts_are_what_the_engine_does_under_that_cap(tiny, minilm_bundle):
    assert _train_capped(tiny, batch=BATCH)
    assert not _train_capped(minilm_bundle, batch=BATCH)


def test_a_proposed_smaller_batch_is_the_largest_that_fits(minilm_bundle, capsys):
    code, output = _doctor(minilm_bundle, cap="560MiB", capsys=capsys)
    assert code == 1, output
    fix = next(line for line in output.splitlines() if "fix: lower --batch-size to" in line)
    smaller = int(fix.split("lower --batch-size to ")[1].split()[0])
    assert 1 <= smaller < BATCH
    assert _doctor(minilm_bundle, cap="560MiB", batch=smaller, capsys=capsys)[0] == 0
    assert _doctor(minilm_bundle, cap="560MiB", batch=smaller + 1, capsys=capsys)[0] == 1


def test_the_cloud_check_accepts_the_same_bundle_and_refuses_another(tiny, tmp_path):
    other = copy_bundle(tiny, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest | {"created_by": "another export"}))

    async def checks():
        async with serve_cloud(load_bundle(tiny, parts=["cloud"]), port=0, device="cpu") as server:
            same = await check_cloud(server.url, load_bundle(tiny, parts=["edge"]), token=None)
            different = await check_cloud(server.url, load_bundle(other, parts=["edge"]), token=None)
        unreachable = await check_cloud(server.url, load_bundle(tiny, parts=["edge"]), token=None)
        return same, different, unreachable

    same, different, unreachable = asyncio.run(checks())
    assert same.ok and "serves this bundle" in same.detail
    assert not different.ok and "serves another bundle" in different.detail
    assert not unreachable.ok and "cannot reach" in unreachable.detail and unreachable.fixes


def test_the_lighter_exports_the_doctor_proposes_are_what_sft_export_makes(tmp_path_factory, tiny_model_dir):
    """Its estimate for ``--train-edge-layers N --edge-moments bf16`` is that of the bundle exported so."""
    from edge_runtime.doctor import lighter_edges
    from edge_runtime.memory_model import EdgeSize

    full = EdgeSize.of(load_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx")),
                                   parts=["edge"]))
    proposed = dict(lighter_edges(full))
    for n in (2, 0):
        flags = f"--train-edge-layers {n} --edge-moments bf16"
        root = export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("onnx"), train_edge_layers=n,
                             edge_moments="bf16")
        assert proposed[flags] == EdgeSize.of(load_bundle(root, parts=["edge"])), flags
        assert proposed[flags].peak_bytes(batch=8, length=32) < full.peak_bytes(batch=8, length=32)
    assert "--freeze-embeddings" in proposed and "--edge-moments bf16" in proposed


@pytest.mark.parametrize("text, size", [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("2G", 2 << 30),
                                        ("800MB", 800_000_000), ("1.5GiB", 3 << 29), ("4096", 4096)])
def test_memory_sizes(text, size):
    assert parse_size(text) == size
