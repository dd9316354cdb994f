"""Fleets: many edge devices train one shared top part (split federated learning, issue 14).

The in-process reference is ``models.fleet.Fleet``; the cloud's fleets are the real
``sft-cloud`` on localhost with real edges (ORT engines driven by ``EdgeTrainer``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import reference_edge
from cloud_harness import FAST_RETRY, CloudProcess, review_data, tiny_dropout_bundle
from conftest import movie_reviews_path
from safetensors.torch import load_file

from cloud_backend.auth import TokenStore
from cloud_backend.fleet import FleetSettings
from cloud_backend.rounds import Barrier, Batcher, GradientRounds
from cloud_backend.server import serve_cloud
from edge_runtime.api import EdgeTrainer
from edge_runtime.batches import training_batches
from edge_runtime.data import TextData
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.trainer import TrainerCallback, TrainResult
from models import CloudPart, EncoderSpec, SplitSpec
from models.fleet import DeviceBatch, Fleet, joint_loss
from splitwire.bundle import load_bundle
from splitwire.errors import AuthError, ProtocolError, UsageError
from splitwire.fedavg import fedavg
from splitwire.protocol import Kind, decode
from splitwire.schedule import Schedule

BATCH, SEED, LR = 4, 7, 1e-3
REL = 1e-4
KEY_BIAS = "attention.key.bias"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    """The tiny BERT with dropout 0.1 (the shared top's RNG matters), split 2, rank 4, ``ort-training``."""
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


def cloud_part(bundle) -> CloudPart:
    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=False)
    cloud.load_state_dict(load_file(str(bundle.cloud_file("weights"))))
    return cloud


def test_a_joint_step_gives_each_device_its_own_gradient_scaled_by_its_share_of_rows(bundle):
    """Stacking devices' batches of different lengths (right-padded to the longest) is exact."""
    cloud = cloud_part(bundle)
    rng = torch.Generator().manual_seed(0)
    shapes = [(3, 7), (2, 12), (4, 5)]
    zs = [torch.randn(b, length, bundle.wire_width, generator=rng, requires_grad=True) for b, length in shapes]
    masks = [(torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1), generator=rng)).long()
             for b, length in shapes]
    labels = [torch.randint(0, 2, (b,), generator=rng) for b, _ in shapes]
    joint = joint_loss(cloud, zs, masks, labels)
    joint.loss.backward()
    rows = sum(b for b, _ in shapes)
    for z, mask, label, (b, _), device_loss in zip(zs, masks, labels, shapes, joint.device_losses):
        alone = z.detach().clone().requires_grad_(True)
        loss = cloud.loss(cloud(alone, mask), label)
        loss.backward()
        assert device_loss == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(z.grad, alone.grad * b / rows, rtol=1e-4, atol=1e-7)
        assert (z.grad[mask == 0] == 0).all()  # exactly 0 at padding, as the edge needs


def test_fedavg_is_the_example_weighted_mean():
    rng = np.random.default_rng(1)
    weights = [{"a": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
               for _ in range(3)]
    examples = [10, 30, 60]
    averaged = fedavg(weights, examples)
    for name in ("a", "b"):
        want = np.average(np.stack([w[name] for w in weights]), axis=0, weights=examples)
        np.testing.assert_allclose(averaged[name], want, rtol=1e-6)
        assert averaged[name].dtype == np.float32
    with pytest.raises(ValueError):
        fedavg(weights, [1, 0, 2])



def test_a_round_waits_for_every_member_in_fixed_order_and_goes_ahead_without_the_missing_after_its_timeout():
    rounds: Barrier[str] = Barrier(timeout=5.0, quorum=3)
    for member in ("c", "a", "b"):
        rounds.join(member)
    rounds.submit("c", "c1", now=0.0)
    rounds.submit("a", "a1", now=1.0)
    assert not rounds.ready(4.9) and rounds.deadline() == 5.0 and rounds.waiting_for() == {"b"}
    rounds.submit("b", "b1", now=2.0)
    assert rounds.ready(2.0) and rounds.take(2.0) == [("a", "a1"), ("b", "b1"), ("c", "c1")]
    rounds.submit("a", "a2", now=10.0)
    rounds.submit("c", "c2", now=11.0)
    assert not rounds.ready(14.9) and rounds.ready(15.0)
    assert rounds.take(15.0) == [("a", "a2"), ("c", "c2")] and rounds.absent == {"b"}
    rounds.submit("a", "a3", now=20.0)
    rounds.submit("c", "c3", now=20.0)
    assert rounds.ready(20.0)  # b dropped: not waited for again
    rounds.take(20.0)
    rounds.submit("b", "b4", now=30.0)  # b rejoins by sending
    assert rounds.absent == set() and rounds.waiting_for() == {"a", "c"}
    rounds.leave("a")
    assert rounds.waiting_for() == {"c"}


def test_each_train_rounds_gradient_round_expects_its_members_and_never_takes_another_rounds_items():
    rounds: GradientRounds[str] = GradientRounds(timeout=5.0)
    rounds.expect(1, {"a", "b", "c"}, now=0.0)
    rounds.submit(1, "a", "a1")
    rounds.submit(1, "b", "b1")
    assert not rounds.ready(4.9) and rounds.deadline() == 5.0
    rounds.expect(2, {"a", "b"}, now=6.0)  # c was late for round 1; round 2 went on without it
    assert rounds.ready(6.0) and rounds.take(6.0) == [("a", "a1"), ("b", "b1")]  # round 1, after its timeout
    assert not rounds.is_open(1)
    with pytest.raises(ValueError, match="no place in gradient round 2"):
        rounds.submit(2, "c", "c1")  # c's late item cannot join round 2's sum
    rounds.submit(2, "b", "b2")
    rounds.leave("a")  # said bye: round 2 no longer waits for it
    assert rounds.ready(6.0) and rounds.take(6.0) == [("b", "b2")]
    rounds.expect(3, {"a"}, now=7.0)
    assert not rounds.ready(11.9) and not rounds.pending
    assert not rounds.ready(12.0) and not rounds.is_open(3)  # nobody sent: it closes empty


def test_a_gradient_that_comes_after_its_round_went_ahead_gets_that_rounds_sum_and_its_edge_stays_one(
        onnx_bundle, tmp_path):
    """``late`` sends its step-2 gradient 3 s late, past the 2 s round timeout: gradient round 2 goes ahead
    without it, and ``late`` gets round 2's sum, then makes train round 3 (which waits for it until 2 s
    after the others' step 3), so all three edges end bit-equal."""
    steps = 3

    async def scenario():
        settings = FleetSettings("sync", round_timeout=2.0, quorum=3, edge="shared")
        async with serve_cloud(onnx_bundle, port=0, device="cpu", fleets=settings) as server:
            late = trainer(onnx_bundle, server.url, "late", tmp_path / "late")

            def slow_at_2(step: int) -> None:
                if step == 2:
                    on_sending(late, Kind.EDGE_GRADIENT, wait=3.0)

            async def run_late():
                async with late:
                    await late.train(device_data(2), run_config(late, device_data(2), steps), checkpoint_every=None,
                                     callbacks=[_Hooks(begin=slow_at_2)])
                    return late.engine.parameters()

            members = await asyncio.gather(*(train_member(onnx_bundle, server.url, f"dev-{i}", device_data(i),
                                                          steps, tmp_path / f"dev-{i}") for i in range(2)), run_late())
            return *members, server.fleets["f"].top.step

    first, second, late_edge, cloud_steps = asyncio.run(scenario())
    assert cloud_steps == steps  # late missed no train round
    for name, value in first.parameters.items():
        assert np.array_equal(value, second.parameters[name]) and np.array_equal(value, late_edge[name]), name


def test_the_first_round_waits_for_its_quorum_and_the_async_batcher_takes_what_arrived():
    rounds: Barrier[str] = Barrier(timeout=1.0, quorum=2)
    rounds.join("a")
    rounds.submit("a", "a1", now=0.0)
    assert not rounds.ready(100.0) and rounds.deadline() is None  # the second device has not joined
    rounds.join("b")
    assert not rounds.ready(0.5) and rounds.ready(1.0)
    batcher: Batcher[str] = Batcher(max_rows=8, max_wait=0.01)
    batcher.submit("a", "a1", 4, now=0.0)
    assert not batcher.ready(0.005) and batcher.ready(0.01)
    batcher.submit("b", "b1", 3, now=0.006)
    batcher.submit("c", "c1", 2, now=0.007)
    assert batcher.ready(0.007)  # 9 rows waiting: over max_rows, no need to wait
    assert batcher.take(0.007) == [("a", "a1"), ("b", "b1")] and batcher.deadline() == 0.017
    assert batcher.take(0.02) == [("c", "c1")] and batcher.deadline() is None

# ---------------------------------------------------------------------------- real edges, a real cloud


def device_data(i: int, rows: int = 24) -> TextData:
    """Device ``i``'s own rows of the movie reviews."""
    return review_data(movie_reviews_path(), slice(40 * i, 40 * i + rows))


@dataclass
class Member:
    """What one fleet member did: its run, its edge weights at the end, and its client's byte counts."""

    result: TrainResult
    parameters: dict[str, np.ndarray]
    bytes_sent: int
    bytes_received: int
    averaging_bytes: int
    shared_edge_bytes: int


class _Hooks(TrainerCallback):
    def __init__(self, begin=None, end=None) -> None:
        self.begin, self.end = begin, end

    def on_step_begin(self, step: int) -> None:
        if self.begin:
            self.begin(step)

    def on_step_end(self, info) -> None:
        if self.end:
            self.end(info)


class StepTimer(TrainerCallback):
    """Each step's wall time, from its beginning to its end: ``seconds[step]``."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}

    def on_step_begin(self, step: int) -> None:
        self.started[step] = time.monotonic()

    def on_step_end(self, info) -> None:
        self.seconds[info.step] = time.monotonic() - self.started[info.step]


class Killed(Exception):
    """The device's process is gone."""


async def train_until_killed(victim: EdgeTrainer, data: TextData, steps: int, *, at: int,
                             checkpoint_every: int | None) -> None:
    """``victim`` trains until its step ``at`` begins; then its connection drops without a bye, as when
    its process is killed."""
    def die(step: int) -> None:
        if step == at:
            victim.client._ws.transport.abort()
            raise Killed

    with pytest.raises(Killed):
        async with victim:
            await victim.train(data, run_config(victim, data, steps), checkpoint_every=checkpoint_every,
                               callbacks=[_Hooks(begin=die)])


def trainer(bundle, url: str, session: str, checkpoint_dir: Path, *, fleet: str | None = "f",
            token: str | None = None) -> EdgeTrainer:
    return EdgeTrainer(bundle, cloud=url, session=session, checkpoint_dir=checkpoint_dir, token=token, threads=1,
                       retry=FAST_RETRY, fleet=fleet)


def run_config(edge: EdgeTrainer, data: TextData, steps: int):
    return edge.run_config(data, batch_size=BATCH, epochs=100, max_steps=steps, lr=LR, schedule="linear",
                           warmup_steps=1, seed=SEED)


async def train_member(bundle, url: str, session: str, data: TextData, steps: int, checkpoint_dir: Path, *,
                       checkpoint_every: int | None = None, average_every: int | None = None,
                       hooks: _Hooks | None = None, fleet: str | None = "f") -> Member:
    edge = trainer(bundle, url, session, checkpoint_dir, fleet=fleet)
    async with edge:
        result = await edge.train(data, run_config(edge, data, steps), checkpoint_every=checkpoint_every,
                                  average_every=average_every, callbacks=[hooks] if hooks else ())
        client = edge.client
    return Member(result, edge.engine.parameters(), client.bytes_sent, client.bytes_received, client.averaging_bytes,
                  client.shared_edge_bytes)


def reference(bundle, datas: list[TextData], steps: int, *,
              shared_edge: bool = False) -> tuple[Fleet, list[list[float]]]:
    """The fleet in one process on the same batches: every device in every round, in session-id order."""
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    config = run_config(trainer(bundle, "ws://unused", "ref", Path("unused"), fleet=None), datas[0], steps)
    schedule = Schedule.from_dict(config.schedule)
    opt = bundle.manifest.optimizer
    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=True)
    cloud.load_state_dict(load_file(str(bundle.cloud_file("weights"))))
    edges = [reference_edge(bundle.root)] * len(datas) if shared_edge else [reference_edge(bundle.root) for _ in datas]
    fleet = Fleet(edges, cloud, rate=schedule.rate, seed=SEED, shared_edge=shared_edge,
                  optimizer=lambda params: torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                                             weight_decay=opt.weight_decay))
    plans = [list(training_batches(data, tokenizer, batch_size=BATCH, epochs=100, seed=SEED, max_steps=steps))
             for data in datas]
    losses = []
    for batches in zip(*plans):
        losses.append(fleet.train_round([DeviceBatch({k: torch.from_numpy(v) for k, v in b.inputs.feeds().items()},
                                                     torch.from_numpy(b.labels)) for b in batches]))
    return fleet, [list(device) for device in zip(*losses)]


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def assert_close_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray], steps: int, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        if name.endswith(KEY_BIAS):  # zero gradient in exact arithmetic: Adam turns noise into steps of up to lr
            assert np.abs(got[name] - value).max() <= 2 * LR * steps, f"{what} {name}"
        else:
            assert rel_err(got[name], value) <= REL, f"{what} {name}"


def test_a_synchronous_fleet_of_4_real_edges_equals_its_in_process_reference(bundle, tmp_path):
    steps, devices = 4, 4
    datas = [device_data(i) for i in range(devices)]

    async def scenario():
        settings = FleetSettings("sync", round_timeout=60.0, quorum=devices)
        async with serve_cloud(bundle, port=0, device="cpu", fleets=settings) as server:
            members = await asyncio.gather(*(train_member(bundle, server.url, f"dev-{i}", data, steps,
                                                          tmp_path / f"dev-{i}") for i, data in enumerate(datas)))
            fleet = server.fleets["f"]
            return members, {n: p.detach().numpy().copy() for n, p in fleet.top.model.named_parameters()}, fleet

    members, top, fleet = asyncio.run(scenario())
    want, want_losses = reference(bundle, datas, steps)
    assert fleet.top.step == steps  # one shared step a round, not one per device
    assert {m: s.step for m, s in fleet.members.items()} == {f"dev-{i}": steps for i in range(devices)}
    assert_close_weights(top, {n: p.detach().numpy() for n, p in want.cloud.named_parameters()}, steps, "top")
    for i, member in enumerate(members):
        assert member.result.steps == list(range(1, steps + 1))
        assert rel_err(member.result.losses, want_losses[i]) <= REL, i
        assert_close_weights(member.parameters, want.edge_weights(i), steps, f"edge {i}")
    assert len({m.result.losses[0] for m in members}) == devices  # the devices' data really differ
    trained = reference_edge(bundle.root).state_dict()
    assert sum(not np.array_equal(v, trained[n].numpy()) for n, v in members[0].parameters.items()) > 0.9 * len(trained)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, tiny_model_dir):
    """``bundle`` exported for the ``onnx`` engine, the one that trains a shared edge."""
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir, engine="onnx"))


def test_a_shared_edge_fleet_of_4_real_edges_equals_one_edge_trained_on_the_rounds_summed_gradients(onnx_bundle,
                                                                                                     tmp_path, caplog):
    steps, devices = 4, 4
    datas = [device_data(i) for i in range(devices)]

    async def scenario():
        settings = FleetSettings("sync", round_timeout=60.0, quorum=devices, edge="shared")
        async with serve_cloud(onnx_bundle, port=0, device="cpu", fleets=settings) as server:
            members = await asyncio.gather(*(train_member(onnx_bundle, server.url, f"dev-{i}", data, steps,
                                                          tmp_path / f"dev-{i}") for i, data in enumerate(datas)))
            return members, {n: p.detach().numpy().copy() for n, p in server.fleets["f"].top.model.named_parameters()}

    members, top = asyncio.run(scenario())
    want, want_losses = reference(onnx_bundle, datas, steps, shared_edge=True)
    assert_close_weights(top, {n: p.detach().numpy() for n, p in want.cloud.named_parameters()}, steps, "top")
    for i, member in enumerate(members):
        assert rel_err(member.result.losses, want_losses[i]) <= REL, i
        assert_close_weights(member.parameters, want.edge_weights(0), steps, f"edge {i}")
        for name, value in member.parameters.items():  # one edge: every device applied the same sums
            assert np.array_equal(value, members[0].parameters[name]), f"edge {i} {name}"
    assert len({m.result.losses[0] for m in members}) == devices  # the devices' data really differ
    weight_bytes = sum(v.nbytes for v in members[0].parameters.values())
    for member in members:  # every step: its edge gradient up, the sum down, a small header each way
        assert 2 * steps * weight_bytes < member.shared_edge_bytes < 2 * steps * (weight_bytes + 32 * 1024)
        assert member.averaging_bytes == 0
    warned = [r for r in caplog.records if "nonzero rows are the token ids" in r.getMessage()]
    assert len(warned) == devices  # the word embeddings train here: each device is told what their gradient shows


def test_a_poisoned_edge_gradient_cuts_off_its_sender_and_the_shared_edge_trains_on_finite(onnx_bundle, tmp_path):
    """``bad`` sends finite gradients of 1e30 (their square would overflow every device's AdamW): it is
    refused and cut off, and ``good`` goes on alone after one round timeout, its edge finite."""
    steps = 3

    async def scenario():
        settings = FleetSettings("sync", round_timeout=1.0, quorum=2, edge="shared")
        async with serve_cloud(onnx_bundle, port=0, device="cpu", fleets=settings) as server:
            bad = trainer(onnx_bundle, server.url, "bad", tmp_path / "bad")
            honest = bad.engine.gradients
            bad.engine.gradients = lambda: {n: np.full_like(g, 1e30) for n, g in honest().items()}

            async def poison():
                with pytest.raises(ProtocolError, match=r"within ±1e\+18"):
                    async with bad:
                        await bad.train(device_data(1), run_config(bad, device_data(1), steps), checkpoint_every=None)

            good, _ = await asyncio.gather(train_member(onnx_bundle, server.url, "good", device_data(0), steps,
                                                        tmp_path / "good"), poison())
            return good

    good = asyncio.run(scenario())
    assert good.result.steps == list(range(1, steps + 1))
    assert all(np.isfinite(v).all() for v in good.parameters.values())


def test_an_ort_training_edge_is_told_it_cannot_join_a_shared_edge_fleet_before_it_trains(bundle, tmp_path):
    async def scenario():
        settings = FleetSettings("sync", round_timeout=60.0, edge="shared")
        async with serve_cloud(bundle, port=0, device="cpu", fleets=settings) as server:
            with pytest.raises(UsageError, match="--engine onnx"):
                await train_member(bundle, server.url, "old-engine", device_data(0), 2, tmp_path / "old")
            return server.fleets["f"].top.step

    assert asyncio.run(scenario()) == 0


def test_an_averaging_round_gives_every_device_the_example_weighted_numpy_average(bundle, tmp_path):
    """Three devices with 12, 20 and 28 examples average their edge halves after step 2."""
    sizes, steps = (12, 20, 28), 2
    before: dict[int, dict[str, np.ndarray]] = {}

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", fleets=FleetSettings("sync", 60.0, len(sizes))) as server:
            edges = [trainer(bundle, server.url, f"avg-{i}", tmp_path / f"avg-{i}") for i in range(len(sizes))]

            async def run(i: int, edge: EdgeTrainer):
                data = device_data(i, sizes[i])

                def keep(info) -> None:  # after the step, before the averaging that follows it
                    if info.step == steps:
                        before[i] = edge.engine.parameters()

                async with edge:
                    await edge.train(data, run_config(edge, data, steps), checkpoint_every=None,
                                     average_every=steps, callbacks=[_Hooks(end=keep)])
                    return edge.engine.parameters(), edge.client.averaging_bytes

            return await asyncio.gather(*(run(i, edge) for i, edge in enumerate(edges)))

    outcomes = asyncio.run(scenario())
    assert len({before[0][n].tobytes() != before[1][n].tobytes() for n in before[0]}) >= 1
    for name in before[0]:
        want = np.average(np.stack([before[i][name] for i in range(len(sizes))]).astype(np.float64), axis=0,
                          weights=sizes)
        for i, (after, _) in enumerate(outcomes):
            np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-7, err_msg=f"device {i} {name}")
    weight_bytes = sum(v.nbytes for v in before[0].values())
    for _, moved in outcomes:  # the weights up and the average down, a small header each way
        assert 2 * weight_bytes < moved < 2 * weight_bytes + 2 * 32 * 1024


def on_sending(edge: EdgeTrainer, kind: Kind, *, wait: float = 0.0, drop: bool = False) -> None:
    """The edge's next ``kind`` frames wait ``wait`` seconds before they go; with ``drop``, its connection
    drops once such a frame has reached the cloud, before the reply."""
    ws = edge.client._ws
    send = ws.send

    async def send_as_told(data, *args, **kwargs):
        sending = decode(data).kind == kind
        if sending:
            await asyncio.sleep(wait)
        await send(data, *args, **kwargs)
        if sending and drop:
            await asyncio.sleep(0.2)  # the frame is on the cloud's side (abort would drop unsent bytes)
            ws.transport.abort()

    ws.send = send_as_told


def test_an_average_resent_after_a_lost_reply_gets_its_rounds_average_not_a_round_of_its_own(bundle, tmp_path):
    """Device 0 loses its connection after sending its AVERAGE of step 2, before device 1's has come; it
    reconnects and sends it again."""
    sizes, steps, every = (12, 28), 3, 2
    before: dict[int, dict[str, np.ndarray]] = {}
    after: dict[int, dict[str, np.ndarray]] = {}

    async def scenario():
        settings = FleetSettings("sync", round_timeout=3.0, quorum=len(sizes))
        async with serve_cloud(bundle, port=0, device="cpu", fleets=settings) as server:
            edges = [trainer(bundle, server.url, f"resend-{i}", tmp_path / f"resend-{i}") for i in range(len(sizes))]

            async def run(i: int, edge: EdgeTrainer):
                data = device_data(i, sizes[i])

                def end(info) -> None:
                    if info.step == every:
                        before[i] = edge.engine.parameters()
                        on_sending(edge, Kind.AVERAGE, drop=i == 0, wait=1.5 * i)

                def begin(step: int) -> None:
                    if step == every + 1:
                        after[i] = edge.engine.parameters()

                async with edge:
                    await edge.train(data, run_config(edge, data, steps), checkpoint_every=None,
                                     average_every=every, callbacks=[_Hooks(begin=begin, end=end)])
                    return edge.client.reconnects

            return await asyncio.gather(*(run(i, edge) for i, edge in enumerate(edges)))

    assert asyncio.run(scenario()) == [1, 0]
    for name in before[0]:
        want = np.average(np.stack([before[i][name] for i in range(len(sizes))]).astype(np.float64), axis=0,
                          weights=sizes)
        for i in range(len(sizes)):
            np.testing.assert_allclose(after[i][name], want, rtol=1e-6, atol=1e-7, err_msg=f"device {i} {name}")


def test_an_idle_fleet_counts_as_a_session_and_is_evicted_to_the_state_dir_then_restored(bundle, tmp_path):
    """``--max-sessions 2``: a fleet whose only member has gone after step 2, then two isolated sessions. The second one's
    hello evicts the fleet (saved to the state dir); the member's next hello restores it where it was."""
    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", state_dir=tmp_path / "state", max_sessions=2,
                               fleets=FleetSettings("sync", 60.0, 1)) as server:
            await train_until_killed(trainer(bundle, server.url, "m-0", tmp_path / "m-0"), device_data(0), 4, at=3,
                                     checkpoint_every=2)
            for i in (1, 2):
                await train_member(bundle, server.url, f"solo-{i}", device_data(i), 2, tmp_path / f"solo-{i}",
                                   fleet=None)
            evicted = sorted(server.fleets), sorted(server.sessions), server.stats.evicted
            back = await train_member(bundle, server.url, "m-0", device_data(0), 4, tmp_path / "m-0",
                                      checkpoint_every=2)
            return evicted, back, server.fleets["f"], sorted(server.sessions)

    evicted, back, fleet, sessions = asyncio.run(scenario())
    assert evicted == ([], ["solo-1", "solo-2"], 1)
    assert back.result.start_step == 2 and back.result.steps == [3, 4]
    assert fleet.top.step == 4 and fleet.members["m-0"].step == 4  # restored at round 2, not a new fleet
    assert sessions == ["solo-2"]  # making room for the fleet again evicted the least recently used session


@pytest.mark.parametrize("edge", ["personal", "shared"])
def test_a_device_killed_mid_round_is_waited_for_until_the_timeout_then_rejoins_and_goes_on(edge, request, tmp_path):
    """``dev-2`` dies before its step 3 (its connection drops, no bye): round 3 goes ahead with the
    other two after the round timeout, and later rounds do not wait for it; it restarts from its
    checkpoint of step 2, rejoins, and trains to the end. With a shared edge, round 3's gradient round
    does not wait for it again, and the two devices that took part in every round end with one edge."""
    bundle = request.getfixturevalue("bundle" if edge == "personal" else "onnx_bundle")
    timeout, steps = 2.0, 6
    timer = StepTimer()
    step_seconds = timer.seconds

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", fleets=FleetSettings("sync", timeout, 3, edge=edge)) as server:
            victim = trainer(bundle, server.url, "dev-2", tmp_path / "dev-2")

            async def rejoin():
                # Back only once round 3 has gone ahead without it, however slowly a loaded machine runs the
                # rounds: its 4 remaining steps then meet the others' 3, so at least one round is its own.
                while 3 not in step_seconds:
                    await asyncio.sleep(0.05)
                return await train_member(bundle, server.url, "dev-2", device_data(2), steps, tmp_path / "dev-2",
                                          checkpoint_every=1)

            first, second, _, back = await asyncio.gather(
                train_member(bundle, server.url, "dev-0", device_data(0), steps, tmp_path / "dev-0", hooks=timer),
                train_member(bundle, server.url, "dev-1", device_data(1), steps, tmp_path / "dev-1"),
                train_until_killed(victim, device_data(2), steps, at=3, checkpoint_every=1), rejoin())
            return first, second, back, server.fleets["f"]

    first, second, back, fleet = asyncio.run(scenario())
    assert first.result.steps == list(range(1, steps + 1))
    assert step_seconds[3] >= timeout - 0.1  # round 3 waited for dev-2 until the timeout
    assert edge == "personal" or step_seconds[3] < 2 * timeout  # and its gradient round did not wait again
    assert max(step_seconds[s] for s in (4, 5, 6) if s in step_seconds) < timeout  # then not again
    assert back.result.start_step == 2 and back.result.steps == list(range(3, steps + 1))
    assert fleet.members["dev-2"].step == steps
    assert fleet.top.step > steps  # dev-2's 4 steps after its return need a round beyond the others' 6
    same = [np.array_equal(first.parameters[n], second.parameters[n]) for n in first.parameters]
    assert all(same) if edge == "shared" else not any(same)


def test_a_device_that_joins_mid_training_and_leaves_early_never_makes_the_fleet_wait_for_a_timeout(bundle, tmp_path):
    """dev-2 joins after round 2 and says bye after its 2 steps; the round timeout (60 s) never fires."""
    steps, timeout = 6, 60.0
    late: list[asyncio.Task] = []

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", fleets=FleetSettings("sync", timeout, 2)) as server:
            def join_after_round_2(info) -> None:
                if info.step == 2 and not late:
                    late.append(asyncio.get_running_loop().create_task(train_member(
                        bundle, server.url, "dev-2", device_data(2), 2, tmp_path / "dev-2")))

            started = time.monotonic()
            early = await asyncio.gather(*(train_member(bundle, server.url, f"dev-{i}", device_data(i), steps,
                                                        tmp_path / f"dev-{i}",
                                                        hooks=_Hooks(end=join_after_round_2) if i == 0 else None)
                                           for i in range(2)))
            joined = await late[0]
            return early, joined, time.monotonic() - started, server.fleets["f"]

    early, joined, seconds, fleet = asyncio.run(scenario())
    assert all(m.result.steps == list(range(1, steps + 1)) for m in early) and joined.result.steps == [1, 2]
    assert seconds < timeout  # no round waited for a device that was not there
    assert fleet.top.step == steps  # dev-2's steps went into the others' rounds, none of its own
    assert {m: s.step for m, s in fleet.members.items()} == {"dev-0": steps, "dev-1": steps, "dev-2": 2}


def test_the_asynchronous_schedule_stacks_concurrent_requests_into_fewer_cloud_steps(bundle, tmp_path):
    steps, devices = 3, 3

    async def scenario():
        settings = FleetSettings("async", max_rows=64, max_wait=0.2)
        async with serve_cloud(bundle, port=0, device="cpu", fleets=settings) as server:
            members = await asyncio.gather(*(train_member(bundle, server.url, f"dev-{i}", device_data(i), steps,
                                                          tmp_path / f"dev-{i}") for i in range(devices)))
            return members, server.fleets["f"]

    members, fleet = asyncio.run(scenario())
    assert all(m.result.steps == list(range(1, steps + 1)) for m in members)
    assert {m: s.step for m, s in fleet.members.items()} == {f"dev-{i}": steps for i in range(devices)}
    assert steps <= fleet.top.step < steps * devices  # some steps were stacked, none applied twice


def test_the_status_port_shows_the_fleet_its_shared_step_and_its_members_bytes_and_no_session_id(bundle, tmp_path):
    from test_observe import get, status

    from cloud_backend.session import session_key

    steps = 2

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", fleets=FleetSettings("sync", 60.0, 2),
                               status_port=0) as server:
            members = await asyncio.gather(*(train_member(bundle, server.url, f"dev-{i}", device_data(i), steps,
                                                          tmp_path / f"dev-{i}") for i in range(2)))
            return members, await asyncio.to_thread(status, server.status_url), \
                await asyncio.to_thread(get, server.status_url + "/metrics")

    members, document, (_, _, metrics) = asyncio.run(scenario())
    (row,) = document["fleets"]
    assert row["fleet"] == session_key("fleet:f") and row["schedule"] == "sync"
    assert row["devices"] == 2 and row["connected"] == 0 and row["step"] == steps
    assert row["bytes_in"] == sum(m.bytes_sent for m in members)
    assert row["bytes_out"] == sum(m.bytes_received for m in members)
    assert row["loss"] in {m.result.losses[-1] for m in members}
    for body in (json.dumps(document), metrics):
        assert "dev-0" not in body and "dev-1" not in body and '"f"' not in body


def test_two_torch_free_sft_edge_processes_train_one_fleet_and_end_with_the_same_averaged_edge_half(bundle, tmp_path):
    """``sft-edge train --fleet f --average-every 4`` in two processes where torch cannot be imported: both
    exit 0, their reports count the averaging bytes, and their last checkpoints hold the same edge weights."""
    from test_edge_trainer import _final_edge_weights, _sft_edge

    header, *rows = movie_reviews_path().read_text(encoding="utf-8").splitlines()
    for i, name in enumerate("ab"):  # each device its own 40 rows
        (tmp_path / f"{name}.tsv").write_text("\n".join([header, *rows[40 * i:40 * i + 40]]) + "\n", encoding="utf-8")

    def args(url: str, name: str) -> list[str]:
        return ["train", "--bundle", str(bundle.root), "--cloud", url, "--session", name, "--fleet", "f",
                "--average-every", "4", "--checkpoint-dir", str(tmp_path / name),
                "--data", str(tmp_path / f"{name}.tsv"),
                "--label-column", "sentiment", "--label-threshold", "0", "--batch-size", "8", "--max-steps", "4",
                "--lr", "1e-3", "--seed", "3", "--threads", "1", "--no-progress",
                "--report", str(tmp_path / f"{name}.json")]

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", fleets=FleetSettings("sync", 120.0, 2)) as server:
            runs = await asyncio.gather(_sft_edge(*args(server.url, "a")), _sft_edge(*args(server.url, "b")))
            return runs, server.fleets["f"].top.step

    runs, cloud_steps = asyncio.run(scenario())
    for code, output in runs:
        assert code == 0, output
        assert "fleet averaging of the edge half:" in output
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in "ab"]
    weights = [_final_edge_weights(bundle, tmp_path / name) for name in "ab"]
    weight_bytes = sum(v.nbytes for v in weights[0].values())
    assert cloud_steps == 4 and all(2 * weight_bytes < r["averaging_bytes"] < r["bytes_sent"] + r["bytes_received"]
                                    for r in reports)
    for name, value in weights[0].items():
        np.testing.assert_array_equal(weights[1][name], value, err_msg=name)
    assert reports[0]["losses"] != reports[1]["losses"]  # the two devices trained on different rows


def test_a_token_not_allowed_in_the_fleet_is_refused(bundle, tmp_path):
    alice, bob = "a" * 24, "b" * 24
    tokens = TokenStore.parse(f"alice {alice} f,g\nbob {bob}\n", source="tokens")

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", tokens=tokens) as server:
            data = device_data(0, 8)
            edge = trainer(bundle, server.url, "bob", tmp_path / "bob", token=bob)
            with pytest.raises(AuthError, match="may not join fleet 'f'"):
                async with edge:
                    await edge.train(data, run_config(edge, data, 2), checkpoint_every=None)
            alone = trainer(bundle, server.url, "bob", tmp_path / "bob-alone", token=bob, fleet=None)
            async with alone:  # bob's token still opens his own session
                await alone.train(data, run_config(alone, data, 2), checkpoint_every=None)
            member = trainer(bundle, server.url, "alice", tmp_path / "alice", token=alice)
            async with member:
                await member.train(data, run_config(member, data, 2), checkpoint_every=None)
            return set(server.fleets), set(server.fleets["f"].members), set(server.sessions)

    assert asyncio.run(scenario()) == ({"f"}, {"alice"}, {"bob"})


@pytest.mark.slow
def test_kill_9_of_the_cloud_in_the_synchronous_schedule_ends_with_the_weights_of_an_unbroken_run(bundle, tmp_path):
    """The cloud dies before round 5 (the fleet's last checkpoint: round 4, which every device asked
    for) and restarts from its state dir; the devices reconnect and go on. Everything ends equal to
    the same fleet trained without the crash."""
    steps, devices = 6, 3
    extra = ("--fleet-quorum", str(devices), "--round-timeout", "60")
    cloud = CloudProcess(bundle.root, tmp_path / "state", log_path=tmp_path / "cloud.log", extra=extra).start()
    killed = []

    def kill_before_round_5(step: int) -> None:
        if step == 5 and not killed:
            cloud.kill9()
            killed.append(step)
            cloud.start(wait=False)

    async def fleet_run(name: str, hook=None):
        return await asyncio.gather(*(train_member(bundle, cloud.url, f"{name}-{i}", device_data(i), steps,
                                                   tmp_path / name / str(i), checkpoint_every=2, fleet=name,
                                                   hooks=_Hooks(begin=hook) if hook and i == 0 else None)
                                      for i in range(devices)))

    try:
        crashed = asyncio.run(fleet_run("crash", kill_before_round_5))
        cloud.wait_listening()
        whole = asyncio.run(fleet_run("whole"))
    finally:
        cloud.stop()
    assert killed == [5] and "restored_fleet" in cloud.events()
    for i in range(devices):
        assert crashed[i].result.steps[-1] == steps
        assert crashed[i].result.losses[-2:] == whole[i].result.losses[-2:]
        for name, value in whole[i].parameters.items():
            np.testing.assert_array_equal(crashed[i].parameters[name], value, err_msg=f"edge {i} {name}")
    want, got = cloud.saved_weights("fleet:whole"), cloud.saved_weights("fleet:crash")
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"top {name}")
