"""A fleet's shared top part data-parallel across torchrun workers (issue 17, ``cloud_backend.distributed``).

Real processes: ``torchrun`` starts the ranks (gloo, localhost), each rank serves its block of
the fleet's devices (``benchmarks.distributed_fleet``); they are compared with one worker
holding all the devices and with the one-process reference ``models.fleet.Fleet``. The tiny
BERT's dropout probabilities are 0, so the runs must agree within float rounding (with cloud
dropout each worker draws its own rows' masks: see the module's docstring).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import export_cached, reference_edge

from benchmarks.distributed_fleet import (
    REPO, RUN_ENV, SEED, adamw, device_batch, present, read_run, schedule, torchrun, torchrun_command,
)
from cloud_backend.model import load_cloud_part
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
