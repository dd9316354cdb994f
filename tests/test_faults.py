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
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cloud_harness import (
    SCHEDULE, CloudProcess, CuttingProxy, EdgeSession, review_data, tiny_dropout_bundle, train_edge,
)
from conftest import movie_reviews_path

from cloud_backend.server import serve_cloud
from edge_runtime.client import Backoff, CloudClient
from edge_runtime.checkpoints import CheckpointDir
from splitwire.bundle import load_bundle
from splitwire.errors import ConnectionLost

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


def test_reconnects_back_off_exponentially_with_full_jitter_and_give_up_in_time(bundle):
    backoff = Backoff(first_s=0.05, factor=2.0, max_s=0.4, give_up_after_s=1.0)
    rng = random.Random(0)
    for attempt in range(6):
        cap = min(0.4, 0.05 * 2 ** attempt)
        delays = [backoff.delay(attempt, rng) for _ in range(300)]
        assert 0 <= min(delays) < 0.1 * cap and 0.9 * cap < max(delays) <= cap  # uniform over [0, cap]
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionLost, match=r"gave up connecting after (\d+) attempts") as lost:
        asyncio.run(CloudClient.connect(f"ws://127.0.0.1:{port}", bundle=bundle, session_id="nobody",
                                        schedule=SCHEDULE,
                                        retry=backoff))
    assert lost.value.retryable and time.monotonic() - started <= 1.0 + 0.5
    assert int(re.search(r"after (\d+) attempts", str(lost.value)).group(1)) >= 4


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


# ---------------------------------------------------------------------------- the edge's own input


def _reviews_tsv(path: Path, rows: int) -> Path:
    lines = movie_reviews_path().read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cloud_process(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud-process")
    cloud = CloudProcess(bundle.root, root / "state", log_path=root / "cloud.log").start()
    yield cloud
    cloud.stop()


THRESHOLD = ("--label-threshold", "0")
REVIEWS = None  # the first rows of the real movie-review snippets

BAD_INPUTS = {  # case: (file name, content, options, what the error says)
    "missing text column": ("train.tsv", "id\tsentiment\tbody\n1\t0.5\tgood\n", THRESHOLD, "no column 'text'"),
    "missing label column": ("train.tsv", "id\tscore\ttext\n1\t0.5\tgood\n", THRESHOLD, "no column 'sentiment'"),
    "empty file": ("train.tsv", "", THRESHOLD, "the file is empty"),
    "header only": ("train.tsv", "id\tsentiment\ttext\n", THRESHOLD, "no data rows"),
    "ragged row": ("train.tsv", "id\tsentiment\ttext\n1\t0.5\n", THRESHOLD, "train.tsv:2: 2 fields, but the header has 3"),
    "malformed JSONL": ("train.jsonl", '{"text": "good", "sentiment": 1}\n{"text": "bad", \n', THRESHOLD,
                        "train.jsonl:2: malformed JSON"),
    "not UTF-8": ("train.tsv", b"id\tsentiment\ttext\n1\t0.5\t\xff\xfe\n", THRESHOLD, "not UTF-8"),
    "not a number": ("train.tsv", "id\tsentiment\ttext\n1\tgreat\tgood\n", THRESHOLD,
                     "train.tsv:2: column 'sentiment': expected a finite number"),
    "bundle for another task": ("train.tsv", "id\tsentiment\ttext\n1\tpos\ta\n2\tneg\tb\n3\tneutral\tc\n", (),
                                r"3 distinct labels \(neg, neutral, pos\), but the bundle's head has 2 outputs"),
    "unknown label in the eval file": ("train.tsv", "id\tsentiment\ttext\n1\tpos\ta\n2\tneg\tb\n", ("--eval-file", "EVAL"),
                                       "eval.tsv:3: column 'sentiment': unknown label 'neutral'; this run's labels "
                                       "are neg, pos"),
    "empty train set": ("train.tsv", REVIEWS, (*THRESHOLD, "--holdout", "0.99"), "leaves an empty train or test set"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_before_any_state_is_made(case, cloud_process, bundle, tmp_path, capsys):
    """Exit 1 with a message naming the file (and line and column), no checkpoint dir, no cloud session."""
    from edge_runtime.cli import main

    name, content, options, message = BAD_INPUTS[case]
    data = tmp_path / name
    if content is REVIEWS:
        _reviews_tsv(data, 8)
    elif isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content, encoding="utf-8")
    (tmp_path / "eval.tsv").write_text("id\tsentiment\ttext\n1\tpos\tfine\n2\tneutral\tunsure\n")
    options = [str(tmp_path / "eval.tsv") if option == "EVAL" else option for option in options]
    events_before = cloud_process.events()
    checkpoints = tmp_path / "runs"
    code = main(["train", "--bundle", str(bundle.root), "--cloud", cloud_process.url, "--session", "bad",
                 "--checkpoint-dir", str(checkpoints), "--data", str(data), "--label-column", "sentiment",
                 "--max-steps", "1", "--no-progress", *options])
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.search(message, err), err
    assert err.startswith("sft-edge train: error: ") and "Traceback" not in err
    assert not checkpoints.exists()  # no partial state on the edge …
    assert cloud_process.events() == events_before  # … and the cloud never heard of it


def test_good_input_with_an_over_long_text_trains_and_makes_state(cloud_process, bundle, tmp_path, capsys):
    """The control for the test above: the same command on good data reaches the cloud and checkpoints;
    a text far longer than the bundle's max_length is truncated to it, as the help says."""
    from edge_runtime.cli import build_parser, main
    from edge_runtime.tokenizer import EdgeTokenizer

    data = _reviews_tsv(tmp_path / "train.tsv", 8)
    long_text = " ".join(["unforgettable"] * 5000)
    data.write_text(data.read_text() + f"9\t1.5\t{long_text}\n")
    batch, lengths = EdgeTokenizer.from_bundle(bundle).encode([long_text, "short"])
    assert batch.shape == (2, bundle.max_length) and lengths.tolist()[0] == bundle.max_length
    assert "truncated" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    code = main(["train", "--bundle", str(bundle.root), "--cloud", cloud_process.url, "--session", "good",
                 "--checkpoint-dir", str(tmp_path / "runs"), "--data", str(data), "--label-column", "sentiment",
                 "--label-threshold", "0", "--batch-size", "9", "--max-steps", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert [c.step for c in CheckpointDir(tmp_path / "runs").all()] == [0, 1]
    assert {"new_session", "welcome", "train"} <= set(cloud_process.events())


def _final_edge(bundle, directory: Path) -> dict[str, np.ndarray]:
    from edge_runtime.engine import open_engine

    engine = open_engine(bundle, threads=1)
    engine.restore(CheckpointDir(directory).latest().engine_dir)
    return engine.parameters()


def test_kill_9_of_the_edge_resumes_from_its_checkpoint_exactly(cloud_process, bundle, tmp_path):
    """``sft-edge train`` is killed (SIGKILL: no cleanup) after its step-6 checkpoint; the same command
    run again resumes (the cloud rewinds to its matching checkpoint) and ends where an unbroken run ends."""
    data = _reviews_tsv(tmp_path / "train.tsv", 96)

    def command(session: str) -> list[str]:
        return [sys.executable, "-m", "edge_runtime.cli", "train", "--bundle", str(bundle.root), "--cloud",
                cloud_process.url, "--session", session, "--checkpoint-dir", str(tmp_path / session), "--data",
                str(data), "--label-column", "sentiment", "--label-threshold", "0", "--batch-size", "8",
                "--max-steps", "12", "--checkpoint-every", "3", "--lr", "1e-3", "--seed", "4", "--threads", "1",
                "--no-progress", "--report", str(tmp_path / f"{session}.json")]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(command("whole"), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "killed" / "step-00000006").exists() and killed.poll() is None:
        time.sleep(0.002)
    time.sleep(0.05)  # a step or so further, wherever that falls
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    resumed = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    whole_report = json.loads((tmp_path / "whole.json").read_text())
    resumed_report = json.loads((tmp_path / "killed.json").read_text())
    first = resumed_report["first_step"]
    assert 7 <= first <= 10 and resumed_report["last_step"] == 12  # after checkpoint 6 or 9
    assert resumed_report["losses"] == whole_report["losses"][first - 1:]
    assert_same(_final_edge(bundle, tmp_path / "killed"), _final_edge(bundle, tmp_path / "whole"))
    cloud_process.stop()  # saves both sessions; the module's next user restarts it
    try:
        assert_same(cloud_process.saved_weights("killed"), cloud_process.saved_weights("whole"))
    finally:
        cloud_process.start()
