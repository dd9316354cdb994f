"""A bundle is loaded only when it is whole and unmodified; its edge half needs no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bundles import copy_bundle, export_cached, tiny_options
from splitwire.bundle import MANIFEST, BundleError, load_bundle
from splitwire.manifest import EDGE_INPUTS, REQUIRED_KEYS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(tmp_path_factory, tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny ort-training bundle, free to tamper with."""
    return copy_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training")), tmp_path / "b")


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_hashes_every_file_and_the_bundle_hash_is_the_manifests(bundle):
    loaded = load_bundle(bundle)
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(loaded.manifest["files"]) == files
    assert all(k in loaded.manifest for k in REQUIRED_KEYS)
    assert loaded.hash == hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    for role, relpath in loaded.manifest["edge"]["files"].items():
        assert loaded.edge_file(role) == bundle / relpath and relpath in files


def test_a_tampered_file_is_refused(bundle):
    path = bundle / "edge" / "checkpoint"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"edge/checkpoint does not match the manifest.*modified or corrupted"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="edge/checkpoint"):
        load_bundle(bundle, parts=["edge"])
    load_bundle(bundle, parts=["cloud"])  # the server checks only its own half


def test_a_missing_file_is_refused(bundle):
    (bundle / "cloud" / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="cloud/weights.safetensors is missing"):
        load_bundle(bundle)
    load_bundle(bundle, parts=["edge"])  # a device need not hold cloud/


def test_a_garbage_manifest_is_refused(bundle):
    (bundle / MANIFEST).write_bytes(b"\x00\xffnot json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(bundle)


def test_another_bundles_manifest_is_refused(bundle, tmp_path_factory, tiny_model_dir):
    other = export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training"), no_compression=True)
    (bundle / MANIFEST).write_bytes((other / MANIFEST).read_bytes())
    with pytest.raises(BundleError, match="does not match the manifest"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="something-else"), "not a splitft bundle"),
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.pop("optimizer"), "lacks optimizer"),
        (lambda m: m.update(engine="tensorflow"), "unknown edge engine 'tensorflow'"),
        (lambda m: m["files"].update({"edge/../../escape": "0" * 64}), "outside the bundle"),
        (lambda m: m["split"].pop("rank"), r"split.rank must be a whole number >= 1 or null"),
        (lambda m: m["split"].update(split="2"), r"split.split must be a whole number"),
        (lambda m: m["encoder"].update(hidden_size=-3), r"encoder.hidden_size must be a whole number"),
        (lambda m: m["encoder"].update(type_vocab_size=-1), r"encoder.type_vocab_size must be a whole number >= 0"),
        (lambda m: m["encoder"].update(max_positions="512"), r"encoder.max_positions must be a whole number"),
        (lambda m: m["encoder"].update(position_offset=m["encoder"]["max_positions"]),
         r"encoder.position_offset \d+ leaves no position"),
        (lambda m: m["encoder"].update(position_offset=-2), r"encoder.position_offset must be a whole number >= 0"),
        (lambda m: m.update(max_length=1.5), "max_length must be a whole number"),
        (lambda m: m["edge"]["files"].update(training_model="edge/unlisted.onnx"),
         "names edge file 'edge/unlisted.onnx', which is not under edge/ in its hash table"),
        (lambda m: m["cloud"]["files"].update(weights="edge/checkpoint"), "names cloud file 'edge/checkpoint'"),
        (lambda m: m["tokenizer"].update(file="/etc/passwd"), "names edge file '/etc/passwd'"),
        (lambda m: m["edge"]["files"].pop("eval_model"), "the ort-training engine needs edge files for eval_model"),
        (lambda m: m["cloud"]["files"].pop("weights"), "cloud.files must map roles to files, 'weights' among them"),
        (lambda m: m["edge"].update(frozen="embeddings"), "edge.frozen must be a list of parameter names"),
        (lambda m: m["cloud"].update(dropout=1), "cloud.dropout must be true or false"),
        (lambda m: m["optimizer"].update(name="sgd"), "run AdamW, the manifest asks for 'sgd'"),
        (lambda m: m["optimizer"].update(betas=[0.9, 1.5]), r"optimizer.betas must be two numbers in \[0, 1\)"),
        (lambda m: m["optimizer"].update(lr="2e-5"), "optimizer.lr must be a positive number"),
        (lambda m: m["tokenizer"].update(pad_id=-1), "tokenizer.pad_id must be a whole number >= 0"),
    ],
)
def test_an_edited_manifest_is_refused(bundle, edit, message):
    _edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_a_format_1_manifest_reads_the_same_its_dead_fields_ignored(bundle):
    """Format 2 only stopped writing fields that nothing read; bundles exported before it still load."""
    current = load_bundle(bundle).manifest
    _edit_manifest(bundle, lambda m: (m.update(format_version=1, task="classification", wire={"dtype": "float32"}),
                                      m["edge"].update(inputs=list(EDGE_INPUTS), dropout=0)))
    old = load_bundle(bundle).manifest
    assert (old.engine, old.edge, old.cloud, old.optimizer, old.tokenizer, old.files) == (
        current.engine, current.edge, current.cloud, current.optimizer, current.tokenizer, current.files)


def test_the_edge_inputs_are_one_list_the_engine_batch_and_the_torch_model_share():
    from edge_runtime.engine import EdgeBatch
    from models import EDGE_INPUTS as MODEL_INPUTS, EdgePart

    assert tuple(f.name for f in dataclasses.fields(EdgeBatch)) == EDGE_INPUTS == MODEL_INPUTS
    assert tuple(inspect.signature(EdgePart.forward).parameters)[1:] == EDGE_INPUTS


@pytest.mark.parametrize("engine", ["onnx", "ort-training"])
def test_a_garbage_model_with_its_hash_updated_is_a_bundle_error_not_a_traceback(tmp_path_factory, tiny_model_dir,
                                                                                 tmp_path, engine):
    from edge_runtime.engine import open_engine

    root = copy_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options(engine)), tmp_path / "b")
    manifest = json.loads((root / MANIFEST).read_text())
    for relpath in manifest["edge"]["files"].values():
        if relpath.endswith(".onnx"):
            (root / relpath).write_bytes(b"this is not an ONNX model")
            manifest["files"][relpath] = hashlib.sha256(b"this is not an ONNX model").hexdigest()
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"onnxruntime cannot load its {engine} edge files"):
        open_engine(load_bundle(root, parts=["edge"]), threads=1)


_NO_TORCH = """
import importlib.abc, sys

class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is not available on this device (test)")
        return None

sys.meta_path.insert(0, _Refuse())
"""

_EDGE_STEP = """
import json, sys
import numpy as np
from edge_runtime.engine import EdgeBatch, open_engine
from splitwire.bundle import load_bundle

bundle = load_bundle(sys.argv[1], parts=["edge"])
engine = open_engine(bundle, threads=1)
ids = np.array([[101, 7592, 2088, 102], [101, 2307, 102, 0]], dtype=np.int64)
mask = (ids != 0).astype(np.int64)
batch = EdgeBatch(ids, mask, np.zeros_like(ids), np.tile(np.arange(4, dtype=np.int64), (2, 1)))
z = engine.forward(batch)
names = [n for n in ("head.s", "label_head.classifier.weight") if n in engine.parameters()]
before = {n: engine.parameters()[n] for n in names}
if engine.label_head is not None:  # label-private: the device's head takes the pooled output and the labels
    engine.label_head.backward(np.ones((2, bundle.pooled_width), np.float32), np.array([0, 1]))
engine.backward(np.ones_like(z) * mask[..., None].astype(np.float32))
engine.optimizer_step()
print(json.dumps({"z": list(z.shape), "moved": [bool((engine.parameters()[n] != before[n]).any()) for n in names],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
"""


@pytest.mark.parametrize("label_private", [False, True], ids=["standard", "label-private"])
@pytest.mark.parametrize("torch_importable", [False, True], ids=["torch blocked", "torch installed"])
def test_the_edge_half_loads_and_trains_without_torch(bundle, tmp_path, torch_importable, label_private,
                                                       tmp_path_factory, tiny_model_dir):
    """Where ``import torch`` fails, and where it would work but must not happen (``loaded`` stays empty);
    label-private, the device's head trains too."""
    if label_private:
        bundle = copy_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training"),
                                           label_private=True), tmp_path / "private")
    site = tmp_path / "site"
    site.mkdir()
    if not torch_importable:
        (site / "sitecustomize.py").write_text(_NO_TORCH)
    (bundle / "cloud" / "weights.safetensors").unlink()  # a device holds only edge/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    probe = "import importlib.util as u\ntry: u.find_spec('torch')\nexcept ImportError: raise SystemExit(1)"
    assert subprocess.run([sys.executable, "-c", probe], env=env).returncode == (0 if torch_importable else 1)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_EDGE_STEP), str(bundle)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"z": [2, 4, 8], "moved": [True] * (1 + label_private), "loaded": []}
