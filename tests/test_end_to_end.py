"""The distributed system is the algorithm: split fine-tuning over real websockets equals one process.

A real cloud server on localhost and the real edge (an engine from ``edge_runtime`` driven by
the trainer's own step loop and ``CloudClient``) train on real movie-review snippets. The
reference is the PyTorch split model of ``models/`` — ``EdgePart`` + AdamW and ``CloudPart``
+ AdamW in one process — on the same batches in the same order, with the cloud's dropout
drawn from the session's seed. Per-step losses and the final weights of both halves must
agree to 1e-4 (relative, per tensor).
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from bundles import HEADS, export_cached, head_options, reference_edge, reference_label_head
from conftest import movie_reviews_path
from families import NEW_FAMILIES, family_model_dir, family_options
from safetensors.torch import load_file

from cloud_backend.server import serve_cloud
from edge_runtime.client import CloudClient
from edge_runtime.data import Columns, infer_label_map, read_table, table_texts
from edge_runtime.engine import open_engine
from edge_runtime.label_head import PREFIX
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.batches import training_batches
from edge_runtime.trainer import train
from models import CloudPart, EncoderSpec, SplitSpec, rate_groups
from splitwire.bundle import load_bundle
from splitwire.manifest import ENGINES
from splitwire.schedule import Schedule

SEED = 5
BATCH, STEPS, ROWS = 8, 6, 40  # 40 rows / 8 = 5 steps an epoch: step 6 starts epoch 2
SCHEDULE = Schedule(lr=1e-3, kind="linear", warmup_steps=2, total_steps=STEPS)
REL = 1e-4
KEY_BIAS = "attention.key.bias"


@pytest.fixture(scope="module")
def reviews():
    """The first rows of the real movie-review snippets; positive when the mean sentiment > 0."""
    table = read_table(movie_reviews_path())
    table = type(table)(table.path, table.columns, table.rows[:ROWS])
    columns = Columns(text="text", label="sentiment")
    labels = infer_label_map(table, column="sentiment", num_labels=2, threshold=0.0)
    return table_texts(table, columns, labels)


# The tiny BERT with each engine and each compression head; every other family with the default engine
# and the paper's head (the engines' equality with torch per family is tests/test_edge_engines.py's).
CASES = [("bert", engine, head) for head in HEADS for engine in ENGINES]
CASES += [(family, "onnx", "svd") for family in NEW_FAMILIES]
CASES += [("bert", engine, "svd", "label-private") for engine in ENGINES]  # the U-shaped split (issue 15)
CASES += [("bert", "onnx", "principal+heal", "head-lr-scale")]  # the compression head at 10 × the rate (issue 16)


@pytest.fixture(scope="module", params=CASES, ids="-".join)
def bundle(request, tmp_path_factory, tiny_model_dir):
    """A tiny model with dropout 0.1 (the cloud's RNG matters), split 2, rank 4: the 4-layer BERT with the
    real uncased vocabulary, or another family's checkpoint (``families``) with its own tokenizer."""
    family, engine, head, *mode = request.param
    if family != "bert":
        return load_bundle(export_cached(tmp_path_factory, family_model_dir(tmp_path_factory, family),
                                         **family_options(engine)))
    model_dir = tmp_path_factory.mktemp("tiny-dropout") / "model"
    if not model_dir.exists():
        shutil.copytree(tiny_model_dir, model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config |= {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
        (model_dir / "config.json").write_text(json.dumps(config))
    root = export_cached(tmp_path_factory, model_dir, split=2, rank=4, init="random", max_length=48,
                         lr=SCHEDULE.lr, engine=engine, **head_options(head),
                         **({"label_private": True} if "label-private" in mode else {}),
                         **({"head_lr_scale": 10.0} if "head-lr-scale" in mode else {}))
    return load_bundle(root)


def in_process(bundle, batches, head: torch.nn.Module | None = None) -> tuple[list[float], torch.nn.Module,
                                                                          torch.nn.Module]:
    """The reference: both halves in one process, plain backprop, each half with its own AdamW. ``head``:
    a label-private bundle's ``LabelHead`` on top of the cloud part, trained in place with its own AdamW."""
    edge = reference_edge(bundle.root).train()
    for name in bundle.manifest.edge.frozen:
        edge.get_parameter(name).requires_grad_(False)
    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=True)
    cloud.load_state_dict(load_file(str(bundle.path(bundle.manifest["cloud"]["files"]["weights"]))))
    opt = bundle.manifest.optimizer
    halves = [(edge, opt.lr_scales("edge", dict(edge.named_parameters()))),
              (cloud, opt.lr_scales("cloud", dict(cloud.named_parameters()))), (head, {})]
    optimizers = [torch.optim.AdamW(rate_groups(m, scales), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                    weight_decay=opt.weight_decay) for m, scales in halves if m is not None]
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for batch in batches:
            inputs = {k: torch.from_numpy(v) for k, v in batch.inputs.feeds().items()}
            z = edge(**inputs)
            out = cloud(z, inputs["attention_mask"])
            top = cloud if head is None else head
            loss = top.loss(out if head is None else head(out), torch.from_numpy(batch.labels))
            loss.backward()
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = SCHEDULE.rate(batch.step) * group["scale"]
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
    return losses, edge, cloud


def over_the_wire(bundle, batches):
    async def run():
        engine = open_engine(bundle, threads=1)
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            async with await CloudClient.connect(server.url, bundle=bundle, session_id="e2e", schedule=SCHEDULE,
                                                 seed=SEED) as client:
                result = await train(engine=engine, client=client, batches=batches, schedule=SCHEDULE,
                                     total_steps=STEPS, progress=False)
                up, down = client.last_step_bytes
            cloud = copy.deepcopy(server.sessions["e2e"].session.model)
        return result, engine.parameters(), cloud, (up, down)

    return asyncio.run(run())


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def assert_same_weight(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if name.endswith(KEY_BIAS):
        # Its gradient is 0 in exact arithmetic (softmax ignores a shift); both frameworks return
        # ~1e-9 noise that Adam turns into steps of up to lr: compare absolutely against that bound.
        assert np.abs(got - want).max() <= 2 * SCHEDULE.lr * STEPS, name
    else:
        assert rel_err(got, want) <= REL, name


def test_split_fine_tuning_over_the_wire_equals_in_process_training(bundle, reviews):
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    batches = list(training_batches(reviews, tokenizer, batch_size=BATCH, epochs=2, seed=SEED, max_steps=STEPS))
    assert len(batches) == STEPS and any(b.inputs.attention_mask.min() == 0 for b in batches)  # padding inside

    result, edge_weights, cloud, (up, down) = over_the_wire(bundle, batches)
    head = reference_label_head(bundle.root) if bundle.label_private else None
    want_losses, want_edge, want_cloud = in_process(bundle, batches, head)

    assert len(result.losses) == STEPS
    assert rel_err(result.losses, want_losses) <= REL
    assert want_losses[-1] != want_losses[0]
    cloud_weights = {name: p.detach().numpy() for name, p in cloud.named_parameters()}
    for name, want in want_cloud.named_parameters():
        assert_same_weight(name, cloud_weights[name], want.detach().numpy())
    trained = 0
    initial = reference_edge(bundle.root).state_dict()
    for name, want in want_edge.named_parameters():
        assert_same_weight(name, edge_weights[name], want.detach().numpy())
        trained += not np.array_equal(want.detach().numpy(), initial[name].numpy())
    assert trained > 0.9 * len(want_edge.state_dict())  # the comparison is not vacuous: the edge really trained
    for name, want in (head.named_parameters() if head is not None else ()):  # the device's label head
        assert_same_weight(name, edge_weights[PREFIX + name], want.detach().numpy())

    # Bytes per step, counted by the transport: B·L·r·4 plus a small header, each way; label-private, two
    # frames each way, the second the pooled output (down) or its gradient (up), B·hidden·4 plus a header.
    last = batches[-1]
    payload = last.inputs.input_ids.size * bundle.wire_width * 4
    if head is not None:
        payload += last.inputs.shape[0] * bundle.pooled_width * 4
    assert payload < up < payload + 1024 and payload < down < payload + 1024
