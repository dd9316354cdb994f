"""A fleet's shared top part data-parallel across torchrun workers (issue 17, ``cloud_backend.distributed``).

Real processes: ``torchrun`` starts the ranks (gloo, localhost). First the data-parallel step
alone: each rank trains its block of in-process devices (``benchmarks.distributed_fleet``).
Then real ``sft-cloud --distributed`` workers under torchrun, with real edges (ORT engines
driven by ``EdgeTrainer``, as in ``tests/test_fleet.py``) connected to each worker's port.
Both are compared with one worker holding all the devices and with the one-process reference
``models.fleet.Fleet``. The tiny BERT's dropout probabilities are 0, so the runs must agree
within float rounding (with cloud dropout each worker draws its own rows' masks: see
``cloud_backend.distributed``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import export_cached, reference_edge
from safetensors.numpy import load_file as load_numpy
from test_fleet import (StepTimer, _Hooks, assert_close_weights, device_data, reference as fleet_reference, run_config,
                        train_member, train_until_killed)
from test_fleet import trainer as fleet_trainer

from benchmarks.distributed_fleet import (
    REPO, RUN_ENV, SEED, adamw, device_batch, present, read_run, schedule, torchrun, torchrun_command,
)
from cloud_backend.fleet_workers import Offer, decide, header, offer
from cloud_backend.launch import LISTENING
from cloud_backend.model import load_cloud_part
from cloud_backend.rounds import Barrier
from cloud_backend.session import checkpoint_path, saved_step
from models.fleet import Fleet
from splitwire.bundle import load_bundle

DEVICES, ROUNDS, BATCH, LENGTH = 4, 4, 3, 12
LR, REL = 1e-3, 1e-4
KEY_BIAS = "attention.key.bias"
# Round 2 goes ahead without device 1; in round 3 neither of rank 1's devices takes part, so that rank
# enters the round's collectives with zero rows.
ABSENT = ("2:1", "3:2", "3:3")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(export_cached(tmp_path_factory, tiny_model_dir, split=2, rank=4, init="random",
                                     max_length=48, lr=LR, engine="ort-training"))


def reference(bundle) -> tuple[Fleet, list[list[float]]]:
    """The same rounds in one process: one stacked step a round over the present devices."""
    fleet = Fleet([reference_edge(bundle.root) for _ in range(DEVICES)], load_cloud_part(bundle, device=torch.device("cpu")),
                  optimizer=lambda params: adamw(bundle, params), rate=schedule(ROUNDS).rate, seed=SEED)
    losses: list[list[float]] = [[] for _ in range(DEVICES)]
    for round_ in range(1, ROUNDS + 1):
        batches = [device_batch(bundle, i, round_, batch=BATCH, length=LENGTH) if present(ABSENT, round_, i) else None
                   for i in range(DEVICES)]
        for i, loss in enumerate(fleet.train_round(batches)):
            if loss is not None:
                losses[i].append(loss)
    return fleet, losses


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / max(want.double().abs().max(), 1e-12))


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        if name.endswith(KEY_BIAS):  # zero gradient in exact arithmetic: Adam turns noise into steps of up to lr
            assert (got[name] - value).abs().max() <= 2 * LR * ROUNDS, f"{what} {name}"
        else:
            assert rel_err(got[name], value) <= REL, f"{what} {name}"


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def test_two_gloo_workers_with_two_devices_each_equal_one_worker_with_all_four_and_the_reference(bundle, tmp_path):
    runs = {}
    for workers in (2, 1):
        torchrun(workers, bundle.root, tmp_path / f"w{workers}", devices=DEVICES, rounds=ROUNDS, batch=BATCH,
                 length=LENGTH, absent=ABSENT, timeout_s=300)
        runs[workers] = read_run(tmp_path / f"w{workers}", workers)
    want, want_losses = reference(bundle)
    want_top = {n: p.detach() for n, p in want.cloud.named_parameters()}

    (two, reports), (one, one_reports) = runs[2], runs[1]
    top0, top1 = part(two, "rank.0.top."), part(two, "rank.1.top.")
    assert all(torch.equal(top0[n], top1[n]) for n in top0)  # the same sum, the same AdamW: the same weights
    assert [r["rounds"] for r in reports] == [ROUNDS, ROUNDS]  # rank 1 stepped in round 3 without rows
    assert [t["rows"] for t in reports[1]["timings"]] == [4 * BATCH, 3 * BATCH, 2 * BATCH, 4 * BATCH]
    assert_close(top0, want_top, "2 workers' top")
    assert_close(part(one, "rank.0.top."), want_top, "1 worker's top")
    trained = load_cloud_part(bundle, device=torch.device("cpu")).state_dict()
    assert sum(not torch.equal(v, trained[n]) for n, v in top0.items()) > 0.9 * len(top0)  # it did train
    for i in range(DEVICES):
        edge = {n: torch.from_numpy(v) for n, v in want.edge_weights(i).items()}
        assert_close(part(two, f"edge.{i}."), edge, f"2 workers' edge {i}")
        assert_close(part(one, f"edge.{i}."), edge, f"1 worker's edge {i}")
        rank = 0 if i < DEVICES // 2 else 1
        got = reports[rank]["losses"][str(i)]
        assert len(got) == len(want_losses[i]) and np.allclose(got, want_losses[i], rtol=REL), i
        assert np.allclose(one_reports[0]["losses"][str(i)], want_losses[i], rtol=REL), i


def progress(out: Path, rank: int) -> dict | None:
    try:
        return json.loads((out / f"rank-{rank}.progress").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_kill_9_of_one_worker_then_torchruns_restart_of_the_group_ends_with_the_weights_of_an_unbroken_run(
        bundle, tmp_path):
    """Rank 1 is killed with SIGKILL in round 4 (checkpoints after rounds 2, 4, 6); rank 0 fails in its next
    collective, torchrun restarts the whole group once, both ranks resume from the newest round they both
    hold, and the run ends bit-equal to one never interrupted."""
    rounds = 8
    options = dict(devices=DEVICES, rounds=rounds, batch=BATCH, length=LENGTH, absent=ABSENT, checkpoint_every=2)
    torchrun(2, bundle.root, tmp_path / "unbroken", state=tmp_path / "state-unbroken", timeout_s=300, **options)
    out = tmp_path / "broken"
    command = torchrun_command(2, bundle.root, out, state=tmp_path / "state", pace=0.4, max_restarts=1, **options)
    with open(tmp_path / "torchrun.log", "w") as log:
        group = subprocess.Popen(command, env=RUN_ENV, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while (seen := progress(out, 1)) is None or seen["round"] < 4:
            assert group.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
            time.sleep(0.05)
        assert seen["restarts"] == 0
        os.kill(seen["pid"], signal.SIGKILL)
        assert group.wait(timeout=240) == 0, (tmp_path / "torchrun.log").read_text()
    (got, reports), (want, want_reports) = read_run(out, 2), read_run(tmp_path / "unbroken", 2)
    assert [r["restarts"] for r in reports] == [1, 1]
    assert [r["resumed_from"] for r in reports] in ([2, 2], [4, 4])  # the same round on both
    assert [r["resumed_from"] for r in want_reports] == [None, None]
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert [r["losses"] for r in reports] == [r["losses"] for r in want_reports]


# ---------------------------------------------------------------------------- sft-cloud --distributed


def free_ports(count: int) -> int:
    """A base port with ``count`` free ports from it (worker r listens on base + r)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count <= 65535 and all(_free(base + r) for r in range(count)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Workers:
    """``torchrun --nproc-per-node N -m cloud_backend.cli --distributed``: its workers' output in one log."""

    def __init__(self, bundle_root: Path, state_dir: Path, log_path: Path, *, workers: int, extra: tuple[str, ...],
                 max_restarts: int = 0) -> None:
        self.state_dir, self.log_path, self.workers = state_dir, log_path, workers
        self.base = free_ports(workers)
        self.command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers), "--standalone",
                        "--max-restarts", str(max_restarts), "-m", "cloud_backend.cli", "--distributed",
                        "--bundle", str(bundle_root), "--port", str(self.base), "--device", "cpu",
                        "--state-dir", str(state_dir), *extra]
        self.proc: subprocess.Popen | None = None

    def url(self, rank: int) -> str:
        return f"ws://127.0.0.1:{self.base + rank}"

    def start(self) -> "Workers":
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.command, env=RUN_ENV, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.wait_listening(1)
        return self

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def wait_listening(self, times: int, timeout_s: float = 180) -> None:
        """Until the log holds ``times`` x workers "listening" lines (``times``: starts of the group)."""
        deadline = time.monotonic() + timeout_s
        while sum(line.startswith(LISTENING) for line in self.lines()) < times * self.workers:
            assert self.proc.poll() is None and time.monotonic() < deadline, "\n".join(self.lines()[-40:])
            time.sleep(0.1)

    def events(self, name: str) -> list[dict]:
        events = [json.loads(line) for line in self.lines() if line.startswith("{")]
        return [e for e in events if e["event"] == name]

    def pid(self, rank: int) -> int:
        """The live process of worker ``rank``: torchrun's child with ``RANK=rank`` in its environment."""
        for pid in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
        raise AssertionError(f"torchrun has no worker of rank {rank}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        finally:
            self.proc.kill()

    def saved_top(self, rank: int, fleet: str) -> tuple[int, dict[str, np.ndarray]]:
        """Worker ``rank``'s requested checkpoint of ``fleet``: its step and the shared top's weights (and,
        as ``"rng"``, its dropout generator's state)."""
        path = checkpoint_path(self.state_dir / f"rank-{rank}", f"fleet:{fleet}", "requested")
        tensors = load_numpy(str(path))
        top = {n[len("model."):]: v for n, v in tensors.items() if n.startswith("model.")}
        return saved_step(path), top | {"rng": tensors["rng"]}


def run_fleet(bundle, group: Workers, tmp: Path, steps: int, *, checkpoint_every: int, hook=None):
    """4 real edges, device i on worker i * workers // 4, all in fleet ``f``."""
    return asyncio.run(_gather(*(train_member(bundle, group.url(i * group.workers // 4), f"dev-{i}", device_data(i),
                                              steps, tmp / f"dev-{i}", checkpoint_every=checkpoint_every,
                                              hooks=_Hooks(begin=hook) if hook and i == 0 else None)
                                 for i in range(4))))


async def _gather(*runs):
    return await asyncio.gather(*runs)


@pytest.mark.slow
def test_two_sft_cloud_workers_under_torchrun_with_two_real_edges_each_equal_one_worker_with_all_four(bundle, tmp_path):
    steps = 4
    runs = {}
    for workers in (2, 1):
        extra = ("--fleet-quorum", str(4 // workers), "--round-timeout", "60")
        group = Workers(bundle.root, tmp_path / f"state-{workers}", tmp_path / f"w{workers}.log", workers=workers,
                        extra=extra).start()
        group.wait_listening(1)
        try:
            members = run_fleet(bundle, group, tmp_path / f"edges-{workers}", steps, checkpoint_every=steps)
        finally:
            group.stop()
        runs[workers] = members, [group.saved_top(rank, "f") for rank in range(workers)]
    want, want_losses = fleet_reference(bundle, [device_data(i) for i in range(4)], steps)
    want_top = {n: p.detach().numpy() for n, p in want.cloud.named_parameters()}
    (two, two_tops), (one, one_tops) = runs[2], runs[1]
    assert [step for step, _ in two_tops + one_tops] == [steps] * 3  # one shared step a round, on every worker
    # Each worker's own dropout stream (none is drawn at dropout 0): worker 0's is one process's, worker 1's its own.
    rng_0, rng_1, rng_alone = (top.pop("rng") for _, top in two_tops + one_tops)
    assert np.array_equal(rng_0, rng_alone) and not np.array_equal(rng_0, rng_1)
    assert all(np.array_equal(two_tops[0][1][n], two_tops[1][1][n]) for n in want_top)  # the workers agree exactly
    assert_close_weights(two_tops[0][1], want_top, steps, "2 workers' top")
    assert_close_weights(one_tops[0][1], want_top, steps, "1 worker's top")
    for i in range(4):
        for members, what in ((two, "2 workers"), (one, "1 worker")):
            assert members[i].result.steps == list(range(1, steps + 1))
            assert np.allclose(members[i].result.losses, want_losses[i], rtol=REL), f"{what} losses {i}"
            assert_close_weights(members[i].parameters, want.edge_weights(i), steps, f"{what} edge {i}")


@pytest.mark.slow
def test_kill_9_of_one_sft_cloud_worker_then_a_restart_of_the_group_ends_with_the_weights_of_an_unbroken_run(
        bundle, tmp_path):
    """Worker 1 is killed with SIGKILL before round 5 (the fleet's last checkpoint: round 4, which every device
    asked for and every worker wrote); worker 0's next collective fails and it exits, torchrun restarts the
    group (``--max-restarts 1``), both workers restore round 4 from their own state dirs and agree on it, the
    devices reconnect and go on. Everything ends bit-equal to the same fleet trained without the crash."""
    steps = 6
    extra = ("--fleet-quorum", "2", "--round-timeout", "60")
    runs = {}
    for name in ("crash", "whole"):
        group = Workers(bundle.root, tmp_path / f"state-{name}", tmp_path / f"{name}.log", workers=2, extra=extra,
                        max_restarts=1).start()
        killed = []

        def kill_before_round_5(step: int) -> None:
            if name == "crash" and step == 5 and not killed:
                os.kill(group.pid(1), signal.SIGKILL)
                killed.append(step)

        try:
            members = run_fleet(bundle, group, tmp_path / name, steps, checkpoint_every=2, hook=kill_before_round_5)
        finally:
            group.stop()
        runs[name] = members, [group.saved_top(rank, "f") for rank in range(2)], group, killed
    (crashed, crashed_tops, group, killed), (whole, whole_tops, _, _) = runs["crash"], runs["whole"]
    assert killed == [5]
    assert len(group.events("distributed_worker")) == 4  # the group started twice
    assert [e["step"] for e in group.events("restored_fleet")] == [4, 4]
    for i in range(4):
        assert crashed[i].result.steps[-1] == steps
        assert crashed[i].result.losses[-2:] == whole[i].result.losses[-2:]
        for name, value in whole[i].parameters.items():
            np.testing.assert_array_equal(crashed[i].parameters[name], value, err_msg=f"edge {i} {name}")
    for (got_step, got), (want_step, want) in zip(crashed_tops, whole_tops):
        assert got_step == want_step == steps
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"top {name}")


# ---------------------------------------------------------------------------- the header's rules, without I/O


def test_the_header_runs_a_round_once_every_worker_is_ready_and_one_holds_items():
    here, there = Barrier(timeout=30.0, quorum=2), Barrier(timeout=30.0, quorum=1)
    assert offer(here, 0.0, None, 30.0) == Offer(False, False)  # its quorum has not joined: not ready
    for member in ("a", "b"):
        here.join(member)
    there.join("c")
    here.submit("a", 1, now=1.0)
    assert offer(here, 2.0, None, 30.0) == Offer(True, False)  # still waits for b
    assert offer(there, 2.0, None, 30.0) == Offer(False, False)  # waits for c, which has sent nothing
    assert offer(there, 2.0 + 30.0, 2.0, 30.0) == Offer(False, True)  # the round opened elsewhere 30 s ago
    assert offer(here, 31.0, None, 30.0) == Offer(True, True)  # its own first item came 30 s ago
    here.submit("b", 2, now=3.0)
    assert offer(here, 3.0, None, 30.0) == Offer(True, True)
    there.leave("c")
    assert offer(there, 3.0, None, 30.0) == Offer(False, True)  # nobody to wait for: zero rows

    def summed(*workers: tuple[Offer, Offer, Offer]) -> list[int]:  # the all-reduce of the workers' headers
        return [sum(column) for column in zip(*(header(offers) for offers in workers))]

    ready, idle, waiting = Offer(True, True), Offer(False, True), Offer(True, False)  # (train, checkpoint, average)
    assert decide(summed((ready, idle, idle), (idle, idle, idle)), 2) == "train"  # worker 1: no rows, waits for nobody
    assert decide(summed((waiting, idle, idle), (idle, idle, idle)), 2) is None  # worker 0 still waits for a device
    assert decide(summed((waiting, ready, idle), (idle, ready, idle)), 2) == "checkpoint"  # the train round waits
    assert decide(summed((idle, idle, ready), (idle, idle, idle)), 2) == "average"
    assert decide(summed((idle, idle, idle), (idle, idle, idle)), 2) is None  # nothing held anywhere: no round
    assert here.take(3.0, force=True) == [("a", 1), ("b", 2)]


@pytest.mark.slow
def test_an_averaging_round_across_two_workers_gives_every_device_the_weighted_average_of_all_four(bundle, tmp_path):
    """Devices with 12, 20, 28 and 16 examples, two on each worker, average their edge halves after step 2."""
    sizes, steps = (12, 20, 28, 16), 2
    status = free_ports(2)  # worker r's status port: status + r
    group = Workers(bundle.root, tmp_path / "state", tmp_path / "avg.log", workers=2,
                    extra=("--fleet-quorum", "2", "--round-timeout", "60", "--status-port", str(status))).start()
    before: dict[int, dict[str, np.ndarray]] = {}

    async def run(i: int):
        edge = fleet_trainer(bundle, group.url(i // 2), f"avg-{i}", tmp_path / f"avg-{i}")
        data = device_data(i, sizes[i])

        def keep(info) -> None:  # after the step, before the averaging that follows it
            if info.step == steps:
                before[i] = edge.engine.parameters()

        async with edge:
            await edge.train(data, run_config(edge, data, steps), checkpoint_every=None, average_every=steps,
                             callbacks=[_Hooks(end=keep)])
            return edge.engine.parameters(), edge.client.averaging_bytes

    try:
        outcomes = asyncio.run(_gather(*(run(i) for i in range(4))))
        fleets = [json.loads(urllib.request.urlopen(f"http://127.0.0.1:{status + r}/status.json", timeout=30).read())
                  ["fleets"] for r in range(2)]
    finally:
        group.stop()
    assert [[(f["devices"], f["step"]) for f in shown] for shown in fleets] == [[(2, steps)], [(2, steps)]]
    assert not group.events("saved_fleet")  # no latest snapshot at shutdown: the workers do not stop at one round
    assert any(not np.array_equal(before[0][n], before[2][n]) for n in before[0])  # the devices really differ
    for name in before[0]:
        want = np.average(np.stack([before[i][name] for i in range(4)]).astype(np.float64), axis=0, weights=sizes)
        for i, (after, _) in enumerate(outcomes):
            np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-7, err_msg=f"device {i} {name}")
    weight_bytes = sum(v.nbytes for v in before[0].values())
    for _, moved in outcomes:  # the weights up and the average down, a small header each way
        assert 2 * weight_bytes < moved < 2 * weight_bytes + 2 * 32 * 1024


@pytest.mark.slow
def test_a_device_gone_from_one_worker_holds_the_round_on_the_other_only_until_the_round_timeout(bundle, tmp_path):
    """dev-2, worker 1's only device, dies before its step 3 (no bye). Worker 1 then holds nothing, and learns
    from the header that round 3 opened on worker 0: it goes ahead without dev-2 a round timeout later, and
    later rounds do not wait for it (its rejoining is tests/test_fleet's, the same on a worker)."""
    timeout, steps = 4.0, 6
    group = Workers(bundle.root, tmp_path / "state", tmp_path / "gone.log", workers=2,
                    extra=("--fleet-quorum", "1", "--round-timeout", str(timeout))).start()
    timer = StepTimer()
    step_seconds = timer.seconds

    async def scenario():
        victim = fleet_trainer(bundle, group.url(1), "dev-2", tmp_path / "dev-2")
        first, _, _ = await asyncio.gather(
            train_member(bundle, group.url(0), "dev-0", device_data(0), steps, tmp_path / "dev-0", hooks=timer),
            train_member(bundle, group.url(0), "dev-1", device_data(1), steps, tmp_path / "dev-1"),
            train_until_killed(victim, device_data(2), steps, at=3, checkpoint_every=None))
        return first

    try:
        first = asyncio.run(scenario())
    finally:
        group.stop()
    assert first.result.steps == list(range(1, steps + 1))
    assert step_seconds[3] >= timeout - 0.1  # round 3 waited on worker 1 for dev-2 until the timeout
    assert max(step_seconds[s] for s in (4, 5, 6)) < timeout  # then not again
