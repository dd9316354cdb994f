"""Load: 16 edge devices train at once against one ``sft-cloud`` process, and every session ends
with exactly the weights (both halves) of the same session trained alone.

The edges are 16 real ORT engines driven by the trainer's ``train`` loop through their own
``CloudClient`` connections, in this process; the cloud is the real command, whose saved
state is read back after SIGTERM. Sessions differ in data and seed, so a mix-up between them
would show. ``benchmarks/load.py`` measures steps/s and the cloud's memory the same way.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from cloud_harness import CloudProcess, EdgeSession, review_data, tiny_dropout_bundle, train_edge
from conftest import movie_reviews_path

from splitwire.bundle import load_bundle

CLIENTS = 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


def sessions(bundle, name: str, steps: int) -> list[EdgeSession]:
    """``CLIENTS`` sessions with their own rows of the movie reviews and their own seeds."""
    return [EdgeSession(bundle, f"{name}-{i}", review_data(movie_reviews_path(), slice(24 * i, 24 * i + 24)),
                        seed=i, steps=steps, batch_size=4, checkpoint_every=None) for i in range(CLIENTS)]


@pytest.mark.parametrize("steps", [pytest.param(3, id="3-steps"), pytest.param(20, id="20-steps",
                                                                                  marks=pytest.mark.slow)])
def test_16_concurrent_edges_each_train_exactly_as_alone(bundle, tmp_path, steps):
    cloud = CloudProcess(bundle.root, tmp_path / "state", log_path=tmp_path / "cloud.log").start()
    solo, together = sessions(bundle, "solo", steps), sessions(bundle, "load", steps)

    async def scenario():
        alone = [await train_edge(run, cloud.url, tmp_path / run.session) for run in solo]
        at_once = await asyncio.gather(*(train_edge(run, cloud.url, tmp_path / run.session) for run in together))
        return alone, at_once

    try:
        alone, at_once = asyncio.run(scenario())
        peak_kib = cloud.vm_hwm_kib()
    finally:
        cloud.stop()
    assert peak_kib > 0
    for i, (one, many) in enumerate(zip(alone, at_once)):
        assert many.result.steps == list(range(1, steps + 1)) and many.result.losses == one.result.losses, i
        for name, value in one.parameters.items():
            np.testing.assert_array_equal(many.parameters[name], value, err_msg=f"edge {i} {name}")
        want, got = cloud.saved_weights(f"solo-{i}"), cloud.saved_weights(f"load-{i}")
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"cloud {i} {name}")
    assert len({one.result.losses[0] for one in alone}) == CLIENTS  # the sessions really differ
