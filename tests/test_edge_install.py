"""Edge-only install: ``pip install splitft[edge]`` into a fresh venv (plain onnxruntime, no torch,
no onnxruntime-training) trains an ``onnx`` bundle to the same weights as the development install.

Why it exists: a device installs the ``edge`` extra only. This proves that extra is complete
(nothing the edge imports is missing from it), that it pulls neither torch nor the deprecated
training build, and that the portable engine on the registry's current onnxruntime computes
what it computes in the development venv (onnxruntime-training 1.19.2's onnxruntime).

About a minute (a venv and a pip install; pip's cache makes reruns quick). Skips only when pip
can reach no package index at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from bundles import export_cached, minilm_options
from splitwire.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))
import edge_parity  # noqa: E402

STEPS, LR = 1, 1e-3  # one step: after more, Adam amplifies rounding (see edge_parity.differences)
ABSENT = ("torch", "transformers", "onnxruntime-training", "onnxruntime-training-cpu")
PROBE = """
import importlib.metadata as md, json, edge_runtime, onnxruntime
def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"edge_runtime": edge_runtime.__file__, "onnxruntime": onnxruntime.__version__,
                  "dists": {n: installed(n) for n in %r}}))
""" % (ABSENT,)


def _run(*cmd: str | Path, cwd: Path, timeout: int = 900) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _require_package_index() -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "onnxruntime"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"no package index reachable for onnxruntime: {(done.stderr or done.stdout).strip()[-300:]}")


def _source_copy(to: Path) -> Path:
    """The repo's tracked files, so that pip builds outside the shared working tree."""
    files = _run("git", "ls-files", "-z", cwd=REPO).split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)
    return to


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_package_index()
    root = tmp_path_factory.mktemp("edge-install")
    source = _source_copy(root / "src")
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=root)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", f"{source}[edge]", cwd=root)
    return venv


def test_edge_extra_installs_plain_onnxruntime_without_torch_and_trains_like_the_dev_install(
    edge_venv, tmp_path, tmp_path_factory, minilm_dir
):
    python = edge_venv / "bin" / "python"
    probe = json.loads(_run(python, "-c", PROBE, cwd=tmp_path))
    assert Path(probe["edge_runtime"]).is_relative_to(edge_venv), probe  # the installed copy, not the checkout
    assert probe["dists"] == dict.fromkeys(ABSENT), probe

    # Pretrained weights, as a device trains them (a random init has all biases at 0).
    bundle = export_cached(tmp_path_factory, minilm_dir, **minilm_options("onnx"))
    installed, dev = tmp_path / "edge-only", tmp_path / "dev"
    _run(python, SCRIPTS / "edge_parity.py", "run", bundle, installed, "--steps", STEPS, "--lr", LR, cwd=tmp_path)
    edge_parity.run_steps(bundle, dev, steps=STEPS, lr=LR, seed=0)

    got, want = (load_file(str(d / edge_parity.STATE)) for d in (installed, dev))
    diffs = edge_parity.differences(got, want, lr=LR)
    assert diffs and all(err <= tol for err, tol in diffs.values()), (
        probe["onnxruntime"], {n: d for n, d in diffs.items() if d[0] > d[1]})
    initial = load_file(str(load_bundle(bundle, parts=["edge"]).edge_file("weights")))
    params = {n[len(edge_parity.PARAM):]: w for n, w in want.items() if n.startswith(edge_parity.PARAM)}
    moved = {n: float(np.abs(w - initial[n]).max()) for n, w in params.items()}
    assert min(moved.values()) > 0.5 * LR, moved  # every trainable tensor took its first Adam step (~lr)
