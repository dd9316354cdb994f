"""sft-cloud over real websockets on localhost equals in-process PyTorch training.

The cloud is a real server (in-process, or the ``sft-cloud`` command) and the edge a real
``CloudClient``; the edge half's compute is a torch ``EdgePart`` here (the ORT edge is
tested elsewhere). The reference is the same split model trained in one process:
``EdgePart`` + AdamW and ``CloudPart`` + AdamW on the same batches, with the cloud's
dropout drawn from the session's seed.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import copy_bundle, export_cached, reference_edge
from safetensors.torch import load_file
from websockets.asyncio.client import connect

from cloud_backend.server import CloudServer, serve_cloud
from edge_runtime.client import CloudClient, StepReply
from models import CloudPart, EncoderSpec, SplitSpec
from models.split import default_position_ids
from splitwire.bundle import Bundle, load_bundle
from splitwire.codecs import Carries, Fp32Codec
from splitwire.errors import BundleMismatch, ConfigMismatch, ProtocolError, ServerBusy, StepOrderError
from splitwire.protocol import Error, Train, decode, encode, session_tag
from splitwire.schedule import Schedule

SEED = 11
STEPS = 4
B, L = 4, 12
RANK, NUM_LABELS, MAX_LENGTH = 4, 2, 16
SCHEDULE = Schedule(lr=2e-3, kind="linear", warmup_steps=1, total_steps=6)
REL = 1e-5


@dataclasses.dataclass(frozen=True)
class Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1).numpy().astype(np.int32)


def batches(n: int, seed: int = 0, *, num_labels: int = NUM_LABELS) -> list[Batch]:
    """Batches padded on the right, of varied real lengths; float labels when ``num_labels`` is 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        lengths[0] = L
        mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1000, 5000, (B, L), generator=g) * mask
        labels = torch.randint(0, num_labels, (B,), generator=g) if num_labels > 1 else torch.randn(B, generator=g)
        out.append(Batch(ids, mask, labels))
    return out


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir) -> Bundle:
    """``sft-export`` of the tiny BERT with dropout 0.1 (so the cloud's dropout RNG is tested), split 2, rank 4."""
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("tiny-dropout") / "model"))
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (model_dir / "config.json").write_text(json.dumps(config))
    root = export_cached(tmp_path_factory, model_dir, split=2, rank=RANK, num_labels=NUM_LABELS, init="random",
                         max_length=MAX_LENGTH, lr=SCHEDULE.lr)
    return load_bundle(root)


def other_bundle(bundle: Bundle, to: Path) -> Bundle:
    """The same files under another manifest: another bundle hash."""
    root = copy_bundle(bundle.root, to)
    manifest = json.loads((root / "manifest.json").read_text()) | {"created_by": "another export"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(root)


def split_halves(bundle: Bundle) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The split model the bundle starts from: its edge and cloud halves in PyTorch."""
    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=True)
    cloud.load_state_dict(load_file(str(bundle.path(bundle.manifest["cloud"]["files"]["weights"]))))
    return reference_edge(bundle.root), cloud


@pytest.fixture(scope="module")
def initial(bundle) -> tuple[torch.nn.Module, torch.nn.Module]:
    halves = split_halves(bundle)
    assert halves[1].p_drop == 0.1
    return halves


def _adamw(module: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as the bundle's manifest sets it (the exporter's defaults)."""
    return torch.optim.AdamW(module.parameters(), lr=SCHEDULE.rate(1), betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.01)


def _step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = SCHEDULE.rate(step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _edge_z(edge: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return edge(batch.ids, batch.mask, torch.zeros_like(batch.ids), default_position_ids(batch.ids))


@dataclasses.dataclass
class Reference:
    """The split model trained in one process: what the distributed run must equal."""

    edge: torch.nn.Module
    cloud: torch.nn.Module
    dz: list[np.ndarray]
    losses: list[float]


def train_in_process(initial: tuple[torch.nn.Module, torch.nn.Module], data: list[Batch]) -> Reference:
    edge, cloud = (copy.deepcopy(m).train() for m in initial)
    edge_opt, cloud_opt = _adamw(edge), _adamw(cloud)
    dzs, losses = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for step, batch in enumerate(data, start=1):
            z = _edge_z(edge, batch)
            z_cloud = z.detach().requires_grad_(True)
            loss = cloud.loss(cloud(z_cloud, batch.mask), batch.labels)
            loss.backward()
            z.backward(z_cloud.grad)
            _step(cloud_opt, step)
            _step(edge_opt, step)
            dzs.append(z_cloud.grad.numpy().copy())
            losses.append(loss.item())
    return Reference(edge, cloud, dzs, losses)


@pytest.fixture(scope="module")
def reference(initial) -> Reference:
    return train_in_process(initial, batches(STEPS))


class Edge:
    """The test's edge: a torch ``EdgePart`` + AdamW driving a real ``CloudClient``."""

    def __init__(self, initial: tuple[torch.nn.Module, torch.nn.Module]) -> None:
        self.model = copy.deepcopy(initial[0])
        self.optimizer = _adamw(self.model)

    async def step(self, client: CloudClient, step: int, batch: Batch) -> StepReply:
        z = _edge_z(self.model, batch)
        reply = await client.train_step(step, z.detach().numpy(), batch.lengths, batch.labels.numpy())
        z.backward(torch.from_numpy(reply.dz))
        _step(self.optimizer, step)
        return reply


def _connect(server: CloudServer, bundle: Bundle, session_id: str = "device-1", **kwargs) -> CloudClient:
    return CloudClient.connect(server.url, bundle=bundle, session_id=session_id,
                               **({"schedule": SCHEDULE, "seed": SEED} | kwargs))


def rel_err(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def assert_weights_equal(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Every parameter within ``REL`` (both sides run the same torch ops on this CPU: in practice bit-equal,
    attention key biases included, whose ~1e-6 gradient noise Adam would otherwise amplify)."""
    want_params = dict(want.named_parameters())
    for name, p in got.named_parameters():
        assert rel_err(p.detach(), want_params[name].detach()) <= REL, name


def cloud_model(server: CloudServer, session_id: str = "device-1") -> torch.nn.Module:
    return server.sessions[session_id].session.model


# ---------------------------------------------------------------------------- tests


def test_training_over_the_wire_equals_in_process_reference(bundle, initial, reference):
    data = batches(STEPS)

    async def run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            edge = Edge(initial)
            async with await _connect(server, bundle) as client:
                assert client.resume_step == 0
                replies = [await edge.step(client, step, b) for step, b in enumerate(data, start=1)]
                up, down = client.last_step_bytes
                logits = await client.predict(_edge_z(edge.model, data[0]).detach().numpy(), data[0].lengths)
                totals = client.bytes_sent, client.bytes_received
            return replies, edge, copy.deepcopy(cloud_model(server)), (up, down), logits, totals

    replies, edge, cloud, (up, down), logits, (sent, received) = asyncio.run(run())
    for step, (reply, dz, loss) in enumerate(zip(replies, reference.dz, reference.losses), start=1):
        assert reply.step == step and not reply.replayed
        assert reply.dz.shape == (B, L, RANK) and reply.dz.dtype == np.float32
        assert rel_err(reply.dz, dz) <= REL, step
        assert abs(reply.loss - loss) <= REL * abs(loss)
        assert reply.metrics["count"] == B and 0 <= reply.metrics["correct"] <= B
        padded = data[step - 1].mask.numpy() == 0
        assert (reply.dz[padded] == 0).all()  # the cloud reads only real tokens
    assert_weights_equal(cloud, reference.cloud)
    assert_weights_equal(edge.model, reference.edge)
    # bytes per step, counted by the transport: B·L·r·4 and a small header each way
    payload = B * L * RANK * 4
    assert payload < up < payload + 512 and payload < down < payload + 512
    assert sent > STEPS * payload and received > STEPS * payload
    with torch.no_grad():
        want = reference.cloud.eval()(_edge_z(reference.edge, data[0]), data[0].mask)
    reference.cloud.train()
    assert logits.shape == (B, NUM_LABELS) and rel_err(logits, want) <= REL


def test_resent_step_is_answered_from_the_replay_cache_not_applied_twice(bundle, initial):
    data = batches(3)

    async def run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            edge = Edge(initial)
            async with await _connect(server, bundle, "replay") as client:
                await edge.step(client, 1, data[0])
                z2 = _edge_z(edge.model, data[1]).detach().numpy()
                first = await client.train_step(2, z2, data[1].lengths, data[1].labels.numpy())
                after_two = copy.deepcopy(cloud_model(server, "replay").state_dict())
                again = await client.train_step(2, z2, data[1].lengths, data[1].labels.numpy())
                assert again.replayed and not first.replayed
                np.testing.assert_array_equal(again.dz, first.dz)
                assert again.loss == first.loss
                for name, value in cloud_model(server, "replay").state_dict().items():
                    assert torch.equal(value, after_two[name]), name  # not applied twice
                with pytest.raises(StepOrderError, match="expected step 3, got 5"):
                    await client.train_step(5, z2, data[1].lengths, data[1].labels.numpy())
            # A reconnect resumes the session where it is; the resend still comes from the cache.
            async with await _connect(server, bundle, "replay", resume_from=1) as client:
                assert client.resume_step == 2
                resent = await client.train_step(2, z2, data[1].lengths, data[1].labels.numpy())
                assert resent.replayed and np.array_equal(resent.dz, first.dz)
                assert not (await client.train_step(3, z2, data[2].lengths, data[2].labels.numpy())).replayed

    asyncio.run(run())


def test_bad_frames_are_refused_with_a_typed_error_and_others_keep_training(bundle, initial):
    data = batches(2)
    codec = Fp32Codec(Carries.ACTIVATION)

    async def run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            edge = Edge(initial)
            async with await _connect(server, bundle, "good") as good:
                await edge.step(good, 1, data[0])
                # A hostile peer: garbage first, then a NaN-laden step after a valid hello.
                async with connect(server.url, compression=None) as ws:
                    await ws.send(b"GET / HTTP/1.1\r\nHost: cloud.example\r\n\r\n")
                    error = Error.from_frame(decode(await ws.recv()))
                    assert error.code == "protocol" and "not a splitft frame" in error.message
                async with await _connect(server, bundle, "hostile") as hostile:
                    z = np.full((B, L, RANK), np.nan, np.float32)
                    with pytest.raises(ProtocolError, match="NaN"):  # refused before sending
                        await hostile.train_step(1, z, data[0].lengths, data[0].labels.numpy())
                    nan = Train(1, z, data[0].lengths, data[0].labels.numpy())
                    await hostile._ws.send(encode(nan.to_frame(session=session_tag("hostile"), codec=codec)))
                    error = Error.from_frame(decode(await hostile._ws.recv()))
                    assert error.code == "protocol" and "NaN" in error.message
                assert cloud_model(server, "hostile") is not None and server.sessions["hostile"].session.step == 0
                reply = await edge.step(good, 2, data[1])
                assert reply.step == 2 and np.isfinite(reply.dz).all()

    asyncio.run(run())


def test_mismatched_bundle_or_config_is_refused_on_both_sides(bundle, tmp_path, caplog):
    other = other_bundle(bundle, tmp_path / "other")
    assert other.hash != bundle.hash

    async def run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            with pytest.raises(BundleMismatch, match=f"the edge loaded bundle {other.hash[:12]}.*serves {bundle.hash[:12]}"):
                await _connect(server, other)
            async with await _connect(server, bundle, "cfg"):
                pass
            with pytest.raises(ConfigMismatch, match="'seed': 12"):
                await _connect(server, bundle, "cfg", seed=SEED + 1)

    with caplog.at_level(logging.INFO, logger="splitft.cloud"):
        asyncio.run(run())
    refused = [json.loads(r.getMessage()) for r in caplog.records if '"refused"' in r.getMessage()]
    assert [r["code"] for r in refused] == ["bundle_mismatch", "config_mismatch"]
    assert other.hash[:12] in refused[0]["message"]


def test_restart_restores_sessions_exactly(bundle, initial, reference, tmp_path):
    data = batches(STEPS)
    state = tmp_path / "state"

    async def run():
        edge = Edge(initial)
        async with serve_cloud(bundle, port=0, device="cpu", state_dir=state) as server:
            async with await _connect(server, bundle) as client:
                for step in (1, 2):
                    await edge.step(client, step, data[step - 1])
                assert await client.checkpoint(2)
                saved_edge = copy.deepcopy(edge)
                await edge.step(client, 3, data[2])
        # shut down: the session (at step 3) was saved; a new server process restores it
        async with serve_cloud(bundle, port=0, device="cpu", state_dir=state) as server:
            async with await _connect(server, bundle) as client:
                assert client.resume_step == 3
                await edge.step(client, 4, data[3])
                first_run = copy.deepcopy(cloud_model(server))
            # an edge that crashed after step 2 resumes from its checkpoint: the cloud rewinds
            async with await _connect(server, bundle, resume_from=2) as client:
                assert client.resume_step == 2
                for step in (3, 4):
                    await saved_edge.step(client, step, data[step - 1])
                return first_run, copy.deepcopy(cloud_model(server)), edge, saved_edge

    first_run, rewound, edge, saved_edge = asyncio.run(run())
    for cloud, edge_model in ((first_run, edge.model), (rewound, saved_edge.model)):
        assert_weights_equal(cloud, reference.cloud)
        assert_weights_equal(edge_model, reference.edge)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sft_cloud_command_serves_logs_and_saves_on_sigterm_or_sigint(bundle, initial, tmp_path, stop):
    data = batches(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_backend.cli", "--bundle", str(bundle.root), "--port", "0", "--device", "cpu",
         "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("sft-cloud listening on ws://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[-1]

        async def run():
            async with await CloudClient.connect(url, bundle=bundle, session_id="cli", schedule=SCHEDULE,
                                                 seed=SEED) as client:
                return await Edge(initial).step(client, 1, data[0])

        assert asyncio.run(run()).step == 1
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "sft-cloud stopped" in out
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events[:3] == ["listening", "new_session", "welcome"] and "train" in events and "saved" in events
    assert len(list((tmp_path / "state").glob("session-*.safetensors"))) == 1


def test_session_limit_evicts_a_saved_idle_session_or_refuses(bundle, initial, tmp_path):
    data = batches(1)

    async def run():
        async with serve_cloud(bundle, port=0, device="cpu", max_sessions=1) as server:
            async with await _connect(server, bundle, "a"):
                pass
            with pytest.raises(ServerBusy, match="limit of 1 sessions") as refused:  # nowhere to save "a"
                await _connect(server, bundle, "b")
            assert refused.value.retryable
        async with serve_cloud(bundle, port=0, device="cpu", max_sessions=1, state_dir=tmp_path) as server:
            async with await _connect(server, bundle, "a") as a:
                await Edge(initial).step(a, 1, data[0])
            async with await _connect(server, bundle, "b") as b:
                assert b.resume_step == 0 and list(server.sessions) == ["b"]  # "a" was saved, then evicted
            async with await _connect(server, bundle, "a") as a:
                assert a.resume_step == 1 and list(server.sessions) == ["a"]

    asyncio.run(run())


def test_regression_trains_with_mse_over_the_wire(tmp_path_factory, tiny_model_dir):
    bundle = load_bundle(export_cached(tmp_path_factory, tiny_model_dir, split=3, rank=RANK, num_labels=1,
                                       init="random", max_length=MAX_LENGTH, lr=SCHEDULE.lr))
    initial = split_halves(bundle)
    data = batches(2, num_labels=1)
    reference = train_in_process(initial, data)

    async def run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            edge = Edge(initial)
            async with await _connect(server, bundle, "sts") as client:
                replies = [await edge.step(client, step, b) for step, b in enumerate(data, start=1)]
            return replies, edge, copy.deepcopy(cloud_model(server, "sts"))

    replies, edge, cloud = asyncio.run(run())
    for reply, dz, loss in zip(replies, reference.dz, reference.losses):
        assert rel_err(reply.dz, dz) <= REL and abs(reply.loss - loss) <= REL * loss
        assert reply.metrics["count"] == B
        assert abs(reply.metrics["squared_error"] - B * reply.loss) <= 1e-5 * B * reply.loss  # MSE is the mean
    assert_weights_equal(cloud, reference.cloud)
    assert_weights_equal(edge.model, reference.edge)
