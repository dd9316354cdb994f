"""A cloud on a network: tokens, TLS and limits against hostile clients.

Hostile clients here are raw websocket connections sending hand-made frames to a real
server; a good session trains beside them through a real ``CloudClient``. What is checked
is what the server did (its counters and sessions), not only what the client saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys

import pytest
from cloud_harness import (
    SCHEDULE, SEED, CloudProcess, hello_frame, tiny_dropout_bundle, train_frame, train_steps,
)
from conftest import movie_reviews_path
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cloud_backend.auth import TOKENS_ENV, TokenFileError, TokenStore
from cloud_backend.cli import check_exposure, parse_args
from cloud_backend.server import serve_cloud
from edge_runtime.client import Backoff, CloudClient, client_tls
from splitwire.bundle import load_bundle
from splitwire.errors import AuthError, SplitftError
from splitwire.protocol import Error, Kind, decode

ALICE, BOB = "alice-device-token-0123456789", "bob-device-token-9876543210"
TOKENS = f"# session token\nalice {ALICE}\nbob sha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


async def refused_with(url: str, *frames: bytes) -> tuple[list[str], str, int]:
    """Send ``frames`` without waiting for answers: the kinds of the answers before the error,
    the error's code, and the close code that follows it."""
    async with connect(url, compression=None) as ws:
        with contextlib.suppress(ConnectionClosed):  # the server may refuse before it reads them all
            for frame in frames:
                await ws.send(frame)
        answers = [decode(await ws.recv())]
        while answers[-1].kind != Kind.ERROR:
            answers.append(decode(await ws.recv()))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        return [a.kind.name for a in answers[:-1]], Error.from_frame(answers[-1]).code, closed.value.rcvd.code


def _connect(url: str, bundle, session_id: str, token: str | None, **kwargs) -> CloudClient:
    return CloudClient.connect(url, bundle=bundle, session_id=session_id, token=token, schedule=SCHEDULE, seed=SEED,
                               **kwargs)


# ---------------------------------------------------------------------------- tokens


def test_token_file_holds_plain_or_hashed_tokens_and_refuses_weak_ones(tmp_path, monkeypatch):
    store = TokenStore.parse(TOKENS, source="tokens")
    store.check("alice", ALICE)
    store.check("bob", BOB)
    for session, token in (("alice", None), ("alice", ALICE + "x"), ("bob", ALICE), ("mallory", ALICE), ("alice", "")):
        with pytest.raises(AuthError, match="missing or wrong token"):
            store.check(session, token)
    for text, message in (("alice short\n", "shorter than 16"), (f"alice {ALICE}\nalice {BOB}\n", "listed twice"),
                          (f"alice {ALICE} fleet extra\n", "two or three"), ("bob sha256:abc\n", "64 lowercase hex"),
                          ("# nothing\n\n", "no tokens")):
        with pytest.raises(TokenFileError, match=message):
            TokenStore.parse(text, source="tokens")
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    assert TokenStore.load(None) is None
    assert TokenStore.load(path).digests == store.digests
    monkeypatch.setenv(TOKENS_ENV, TOKENS)
    assert TokenStore.load(None).digests == store.digests


def test_a_session_opens_only_with_its_own_token_and_nothing_is_decoded_before(bundle):
    """Missing, wrong, another session's and an unknown session's tokens are refused at the hello,
    though a training frame follows at once on the same connection: the server reads no tensor,
    creates no session, and alice's session is untouched."""
    tokens = TokenStore.parse(TOKENS, source="tokens")

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", tokens=tokens) as server:
            async with await _connect(server.url, bundle, "alice", ALICE) as alice:
                await train_steps(alice, bundle, range(1, 3))
            decoded = server.stats.tensor_frames
            outcomes = [await refused_with(server.url, hello_frame(bundle, session, token),
                                           train_frame(bundle, session, 3 if session == "alice" else 1))
                        for session, token in (("alice", None), ("alice", BOB), ("bob", ALICE), ("alice", "x" * 40),
                                               ("mallory", ALICE))]
            with pytest.raises(AuthError, match="missing or wrong token"):
                await _connect(server.url, bundle, "bob", ALICE, retry=Backoff())  # not retried
            return outcomes, decoded, server.stats, set(server.sessions), server.sessions["alice"].session.step

    outcomes, decoded, stats, sessions, alice_step = asyncio.run(scenario())
    assert outcomes == [([], "auth", 1008)] * 5
    assert decoded == 2 and stats.tensor_frames == 2  # the two steps alice trained, nothing after
    assert stats.refused["auth"] == 6 and stats.welcomed == 1
    assert sessions == {"alice"} and alice_step == 2


# ---------------------------------------------------------------------------- TLS


def test_sft_cloud_over_tls_with_tokens_trains_sft_edge_and_refuses_unverified_peers(bundle, certificates,
                                                                                      tmp_path):
    """The commands as an operator runs them: ``sft-cloud --tls-cert --tls-key --tokens``,
    ``sft-edge --cloud wss://… --ca-file --token-file``; a client that cannot verify the cloud's
    certificate (no CA given, or another CA) or speaks plain ws:// gets nowhere."""
    (tmp_path / "tokens").write_text(TOKENS)
    (tmp_path / "alice.token").write_text(ALICE + "\n")
    lines = movie_reviews_path().read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(lines[:17]) + "\n")
    cloud = CloudProcess(bundle.root, tmp_path / "state", log_path=tmp_path / "cloud.log",
                         extra=("--tls-cert", str(certificates / "server.pem"), "--tls-key",
                                str(certificates / "server.key"), "--tokens", str(tmp_path / "tokens"))).start()

    async def refused() -> list[str]:
        errors = []
        for url, ca in ((cloud.url, None), (cloud.url, certificates / "other.pem"),
                        (cloud.url.replace("wss://", "ws://"), None)):
            with pytest.raises(SplitftError) as error:
                await _connect(url, bundle, "alice", ALICE, ssl=client_tls(url, ca), retry=Backoff(max_s=0.1,
                               give_up_after_s=0.5))
            errors.append(str(error.value))
        return errors

    try:
        assert cloud.url.startswith("wss://127.0.0.1:")
        trained = subprocess.run(
            [sys.executable, "-m", "edge_runtime.cli", "train", "--bundle", str(bundle.root), "--cloud", cloud.url,
             "--ca-file", str(certificates / "ca.pem"), "--session", "alice", "--token-file",
             str(tmp_path / "alice.token"), "--checkpoint-dir", str(tmp_path / "runs"), "--data",
             str(tmp_path / "train.tsv"), "--label-column", "sentiment", "--label-threshold", "0", "--batch-size", "8",
             "--max-steps", "2", "--no-progress"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        errors = asyncio.run(refused())
    finally:
        cloud.stop()
    assert trained.returncode == 0, trained.stderr
    assert "trained steps 1..2 of 2" in trained.stdout
    assert cloud.events().count("train") == 2
    for error in errors[:2]:  # not retried: a certificate that does not verify will not verify later
        assert "cannot verify the certificate" in error and "--ca-file" in error
    assert errors[2].startswith("gave up connecting")  # plain ws:// to a TLS port: no websocket handshake


def test_sft_cloud_listens_beyond_loopback_only_with_tokens_and_tls(tmp_path, monkeypatch, capsys):
    from cloud_backend.cli import main

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    tokens = TokenStore.parse(TOKENS, source="tokens")
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(parse_args(["--bundle", "b", "--host", host]), None)
    check_exposure(parse_args(["--bundle", "b", "--host", "0.0.0.0", *tls]), tokens)
    check_exposure(parse_args(["--bundle", "b", "--host", "0.0.0.0", "--insecure"]), None)
    for args, store, missing in ((["--host", "0.0.0.0"], None, "per-session tokens .* and TLS"),
                                 (["--host", "10.1.2.3", *tls], None, "per-session tokens"),
                                 (["--host", "cloud.example"], tokens, "TLS")):
        with pytest.raises(ValueError, match=f"reachable from the network, but {missing}"):
            check_exposure(parse_args(["--bundle", "b", *args]), store)
    assert main(["--bundle", str(tmp_path), "--host", "0.0.0.0"]) == 1
    assert "--insecure" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--bundle", "b", "--tls-cert", "c.pem"])
    assert client_tls("ws://h:1", None) is None
    with pytest.raises(ValueError, match="--ca-file is for wss://"):
        client_tls("ws://h:1", tmp_path / "ca.pem")


# ---------------------------------------------------------------------------- limits


async def settled(server, open_connections: int) -> None:
    """Until the server has finished with all but ``open_connections`` connections."""
    while server.stats.open_connections != open_connections:
        await asyncio.sleep(0.01)


def test_limits_refuse_the_offender_with_a_typed_error_and_keep_serving_the_others(bundle):
    async def scenario():
        results = {}
        async with serve_cloud(bundle, port=0, device="cpu", max_connections=3) as server:
            async with await _connect(server.url, bundle, "good", None) as good:
                await train_steps(good, bundle, range(1, 2))
                # one request in flight: a second step sent before the first is answered
                results["in_flight"] = await refused_with(server.url, hello_frame(bundle, "eager", None),
                                                          train_frame(bundle, "eager", 1),
                                                          train_frame(bundle, "eager", 2))
                eager = server.sessions["eager"].session
                results["eager_step"] = (eager.step, eager.replay.step)  # step 1 was applied and cached
                # a frame larger than the bundle's shapes allow: the websocket layer closes with 1009
                async with connect(server.url, compression=None) as ws:
                    await ws.send(hello_frame(bundle, "big", None))
                    await ws.recv()
                    await ws.send(b"\0" * (server.limits.max_frame_bytes() + 1))
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.recv()
                    results["too_big"] = closed.value.rcvd.code
                # connections beyond the limit: the good one and two silent ones hold all 3
                await settled(server, 1)
                silent = [await connect(server.url, compression=None) for _ in range(2)]
                results["busy"] = await refused_with(server.url, hello_frame(bundle, "late", None))
                for ws in silent:
                    await ws.close()
                await train_steps(good, bundle, range(2, 4))
                results["good"] = server.sessions["good"].session.step
            results["stats"] = server.stats
        async with serve_cloud(bundle, port=0, device="cpu", idle_timeout=0.3) as server:
            async with await _connect(server.url, bundle, "good", None, retry=Backoff(first_s=0.01)) as good:
                await train_steps(good, bundle, range(1, 2))
                # a connection that says nothing is closed after the idle timeout …
                async with connect(server.url, compression=None) as ws:
                    await ws.send(hello_frame(bundle, "idle", None))
                    await ws.recv()
                    results["idle"] = Error.from_frame(decode(await asyncio.wait_for(ws.recv(), 5))).code
                await asyncio.sleep(0.4)  # … the good one too, meanwhile: its client reconnects by itself
                await train_steps(good, bundle, range(2, 4))
                results["idle_good"] = (server.sessions["good"].session.step, good.reconnects)
        return results

    results = asyncio.run(scenario())
    assert results["in_flight"] == (["WELCOME"], "in_flight", 1008) and results["eager_step"] == (1, 1)
    assert results["too_big"] == 1009
    assert results["busy"] == ([], "busy", 1008)
    assert results["good"] == 3
    assert results["stats"].refused == {"in_flight": 1, "busy": 1}
    assert results["idle"] == "idle_timeout"
    assert results["idle_good"] == (3, 1)
