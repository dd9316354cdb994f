"""The fine-tuned model as one ONNX file gives the logits of split inference.

A real run makes the halves: a cloud server on localhost and ``sft-edge train`` (its own
process) fine-tune the tiny BERT on real movie-review snippets for a few steps, with
checkpoints on both sides. ``exporter.inference.assemble`` joins the edge checkpoint and
the cloud session's state into one model; on unseen snippets, tokenized by the bundle's
tokenizer, its logits must equal split inference (the engine's ``infer`` then the cloud
session's ``predict``) to 1e-4, for each edge engine, and for a label-private bundle (the cloud
predicts the pooled output, the device's head makes the logits).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import export_cached, tiny_options
from conftest import movie_reviews_path

from cloud_backend.server import serve_cloud
from cloud_backend.session import CloudSession, checkpoint_path
from edge_runtime.engine import open_engine
from edge_runtime.ort_import import onnxruntime
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.checkpoints import CheckpointDir
from exporter.bundle_writer import ExportError
from exporter.inference import LOGITS, Z, assemble, edge_inference_graph
from splitwire.bundle import load_bundle
from splitwire.manifest import ENGINES
from splitwire.protocol import Predict

SESSION, STEPS = "reviews", 4
TOLERANCE = 1e-4


def _reviews(first: int, count: int) -> list[str]:
    rows = movie_reviews_path().read_text(encoding="utf-8").splitlines()[1 + first:1 + first + count]
    return [row.split("\t")[2] for row in rows]


@pytest.fixture(scope="module", params=[*ENGINES, "onnx-label-private"])
def trained(request, tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, Path]:
    """A bundle, the edge's checkpoint dir and the cloud's state dir after STEPS steps of ``sft-edge train``."""
    engine, private = request.param.removesuffix("-label-private"), request.param.endswith("-label-private")
    root = export_cached(tmp_path_factory, tiny_model_dir, **tiny_options(engine),
                         **({"label_private": True} if private else {}))
    work = tmp_path_factory.mktemp("run")
    lines = movie_reviews_path().read_text(encoding="utf-8").splitlines()
    (work / "train.tsv").write_text("\n".join(lines[:41]) + "\n", encoding="utf-8")

    async def run() -> tuple[int, bytes]:
        async with serve_cloud(load_bundle(root, parts=["cloud"]), port=0, device="cpu",
                               state_dir=work / "cloud") as server:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_runtime.cli", "train", "--bundle", str(root), "--cloud", server.url,
                "--session", SESSION, "--checkpoint-dir", str(work / "edge"), "--data", str(work / "train.tsv"),
                "--label-column", "sentiment", "--label-threshold", "0", "--batch-size", "8", "--lr", "1e-3",
                "--max-steps", str(STEPS), "--checkpoint-every", "2", "--threads", "1", "--no-progress",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await process.communicate()
            return process.returncode, output

    code, output = asyncio.run(run())
    assert code == 0, output.decode()
    return root, work / "edge", work / "cloud"


def test_the_assembled_model_gives_the_logits_of_split_inference(trained, tmp_path):
    root, edge_dir, cloud_dir = trained
    bundle = load_bundle(root)
    checkpoint = CheckpointDir(edge_dir).latest()
    cloud_state = checkpoint_path(cloud_dir, SESSION, "requested")
    assert checkpoint.step == STEPS
    out = assemble(root, edge_checkpoint=checkpoint.path, cloud_state=cloud_state, out=tmp_path / "model.onnx")

    batch, lengths = EdgeTokenizer.from_bundle(bundle).encode(_reviews(200, 12))  # unseen snippets
    engine = open_engine(bundle, threads=1)
    initial_z = engine.infer(batch)
    engine.restore(checkpoint.engine_dir)
    z = engine.infer(batch)
    assert np.abs(z - initial_z).max() > 1e-3  # the halves really are fine-tuned
    session = CloudSession.restore(cloud_state, bundle=bundle, device=torch.device("cpu"))
    want = session.predict(Predict(1, z, lengths))
    if bundle.label_private:  # the cloud's part ends at the pooled output: the device's head makes the logits
        want = engine.label_head.logits(want)

    ort = onnxruntime()
    served = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in served.get_inputs()) == sorted(batch.feeds())
    (logits,) = served.run([LOGITS], batch.feeds())
    assert logits.shape == (12, bundle.num_labels)
    assert np.abs(logits - want).max() <= TOLERANCE, np.abs(logits - want).max()

    edge_only = ort.InferenceSession(edge_inference_graph(bundle, checkpoint.engine_dir).SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    (edge_z,) = edge_only.run([Z], batch.feeds())
    assert np.abs(edge_z - z).max() <= 1e-5


def test_halves_from_different_steps_are_refused(trained, tmp_path):
    root, edge_dir, cloud_dir = trained
    earlier = CheckpointDir(edge_dir).all()[0]
    assert earlier.step < STEPS
    with pytest.raises(ExportError, match=f"step {earlier.step}.*step {STEPS}"):
        assemble(root, edge_checkpoint=earlier.path, cloud_state=checkpoint_path(cloud_dir, SESSION, "requested"),
                 out=tmp_path / "model.onnx")
