"""Faults lose no training: runs cut by dropped connections, a ``kill -9`` of the cloud or of the
edge end with exactly the weights of an uninterrupted run, on both halves.

The cloud is a real server (in-process, or the ``sft-cloud`` command with a state dir), the
edge the real ORT engine driven by the trainer's ``train`` loop through a reconnecting
``CloudClient``; connections are cut by a TCP proxy at random byte counts. The reference is
the same session trained without faults; both run on this machine with the same thread
counts, so the weights must be bit-equal.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cloud_harness import CloudProcess, CuttingProxy, EdgeSession, review_data, tiny_dropout_bundle, train_edge
from conftest import movie_reviews_path

from cloud_backend.server import serve_cloud
from edge_runtime.trainer import CheckpointDir
from splitwire.bundle import load_bundle

STEPS = 10


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


@pytest.fixture(scope="module")
def reviews():
    return review_data(movie_reviews_path(), slice(0, 48))


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def cloud_weights(server, session: str) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in server.sessions[session].session.model.state_dict().items()}


def test_connections_cut_at_random_points_lose_no_training(bundle, reviews, tmp_path):
    run = EdgeSession(bundle, "cut", reviews, seed=7, steps=STEPS)

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            whole = await train_edge(run, server.url, tmp_path / "whole")
            want_cloud = cloud_weights(server, "cut")
            del server.sessions["cut"]  # the same session id again, from scratch
            async with CuttingProxy(int(server.url.rsplit(":", 1)[1]), seed=3,
                                    cut_between=(100, 12000), max_cuts=12) as proxy:
                cut = await train_edge(run, proxy.url, tmp_path / "cut")
            return whole, want_cloud, cut, cloud_weights(server, "cut"), proxy, server.stats

    whole, want_cloud, cut, got_cloud, proxy, stats = asyncio.run(scenario())
    assert proxy.cuts == 12 and cut.reconnects >= 10  # a cut in the hello counts as part of a reconnect
    assert stats.replays >= 1  # some cuts fell after the cloud had applied a step: answered from the cache
    assert whole.result.steps == cut.result.steps == list(range(1, STEPS + 1))
    assert cut.result.losses == whole.result.losses
    assert_same(cut.parameters, whole.parameters)
    assert_same(got_cloud, want_cloud)
    assert cut.bytes_sent > whole.bytes_sent  # resent requests are counted


@pytest.mark.slow
def test_kill_9_of_the_cloud_mid_training_loses_no_training(bundle, reviews, tmp_path):
    """The cloud dies after step 7 (its last checkpoint: step 6) and restarts from its state dir; the
    edge reconnects, is told the cloud is at step 6, goes back to its own checkpoint 6 and goes on."""
    run = EdgeSession(bundle, "crash", reviews, seed=9, steps=STEPS)
    cloud = CloudProcess(bundle.root, tmp_path / "state", log_path=tmp_path / "cloud.log").start()
    killed = []

    def kill_before_step_8(step: int) -> None:
        if step == 8 and not killed:
            cloud.kill9()
            killed.append(step)
            cloud.start(wait=False)  # same port; the edge's reconnects find it once it listens

    try:
        crashed = asyncio.run(train_edge(run, cloud.url, tmp_path / "crash", before_step=kill_before_step_8))
        cloud.wait_listening()
        whole = asyncio.run(train_edge(EdgeSession(bundle, "whole", reviews, seed=9, steps=STEPS), cloud.url,
                                       tmp_path / "whole"))
    finally:
        cloud.stop()
    assert killed == [8] and crashed.reconnects >= 1
    assert "restored" in cloud.events()
    assert crashed.result.steps == list(range(1, STEPS + 1))
    assert crashed.result.losses == whole.result.losses
    assert_same(crashed.parameters, whole.parameters)
    assert_same(cloud.saved_weights("crash"), cloud.saved_weights("whole"))
