"""Hostile clients, round two: a peer that never reads, a finite poison, torn and corrupted
checkpoints, session churn, a compute hog and values that pass parsing.

Every attacker here is a real socket against a real in-process ``serve_cloud`` (or the
``sft-cloud`` command); the legitimate session beside it is a real ``CloudClient``, and
what is asserted is what the server did and what the good session ended with.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl as ssl_module

import numpy as np
import pytest
from cloud_harness import SCHEDULE, SEED, NeverReader, hello_frame, tiny_dropout_bundle, train_steps

from cloud_backend.auth import TokenStore
from cloud_backend.server import CLOSE_GRACE_S, serve_cloud
from edge_runtime.client import Backoff, CloudClient, client_tls
from splitwire.bundle import load_bundle

TOKEN = "good-device-token-0123456789"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


def tokens_for(*sessions: str) -> TokenStore:
    return TokenStore.parse("".join(f"{s} {TOKEN}\n" for s in sessions), source="test tokens")


def cloud_weights(server, session_id: str) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in server.sessions[session_id].session.model.state_dict().items()}


async def connect_good(url: str, bundle, session_id: str, *, token: str | None, ssl=None, **kwargs) -> CloudClient:
    return await CloudClient.connect(url, bundle=bundle, session_id=session_id, token=token, schedule=SCHEDULE,
                                     seed=SEED, ssl=ssl, **kwargs)


# ---------------------------------------------------------------------------- a peer that never reads


@pytest.mark.parametrize("tokens,tls", [(False, False), (True, False), (True, True)],
                         ids=["no-tokens", "tokens", "tokens-wss"])
def test_a_peer_that_never_reads_is_cut_off_and_a_good_edge_trains_meanwhile(bundle, certificates, tokens, tls):
    """Four never-reading connections (two before hello, two after a valid hello) hold the
    whole connection limit. Each is cut off within its hello or idle timeout plus the close
    grace (sooner when its unread replies fill the send buffer), the good edge (which arrives while they hold every slot) gets in, and it trains to
    the weights of a run without attackers."""
    store = tokens_for("good", "bad-0", "bad-1") if tokens else None
    token = TOKEN if tokens else None
    server_tls = client_context = None
    if tls:
        server_tls = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(certificates / "server.pem", certificates / "server.key")
        client_context = client_tls("wss://127.0.0.1:1", certificates / "ca.pem")
    hello_timeout, idle_timeout, send_timeout = 1.0, 2.0, 1.0

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", tokens=store, ssl=server_tls, max_connections=4,
                               hello_timeout=hello_timeout, idle_timeout=idle_timeout,
                               send_timeout=send_timeout) as server:
            attackers = [NeverReader(server.url, hello=None, ssl=client_context) for _ in range(2)]
            attackers += [NeverReader(server.url, hello=hello_frame(bundle, f"bad-{i}", token), ssl=client_context)
                          for i in range(2)]
            floods = [asyncio.create_task(a.run(flood_for_s=20)) for a in attackers]
            while server.stats.open_connections < 4:
                await asyncio.sleep(0.01)
            async with await connect_good(server.url, bundle, "good", token=token, ssl=client_context,
                                          retry=Backoff(first_s=0.05, max_s=0.5, give_up_after_s=15)) as good:
                await train_steps(good, bundle, range(1, 4))
            await asyncio.gather(*floods)
            while server.stats.open_connections:
                await asyncio.sleep(0.01)
            return [a.cut_after_s for a in attackers], server.stats, cloud_weights(server, "good")

    async def solo():
        async with serve_cloud(bundle, port=0, device="cpu", tokens=store, ssl=server_tls) as server:
            async with await connect_good(server.url, bundle, "good", token=token, ssl=client_context) as good:
                await train_steps(good, bundle, range(1, 4))
            return cloud_weights(server, "good")

    cut_after, stats, weights = asyncio.run(scenario())
    slack = 1.0  # the flood loop's own pace, and two cores shared with the server
    assert all(t is not None for t in cut_after), cut_after
    assert max(cut_after[:2]) < hello_timeout + CLOSE_GRACE_S + slack, cut_after
    assert max(cut_after[2:]) < idle_timeout + CLOSE_GRACE_S + slack, cut_after
    assert sum(stats.aborted.values()) >= 4, stats.aborted
    assert stats.welcomed >= 1 and stats.refused["busy"] >= 1  # the good edge came while they held every slot
    reference = asyncio.run(solo())
    assert weights.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(weights[name], reference[name], err_msg=name)


# ---------------------------------------------------------------------------- a finite poison


def session_state(server, session_id: str) -> dict[str, np.ndarray]:
    """Everything a step changes: weights, AdamW moments, generator state, step."""
    session = server.sessions[session_id].session
    state = {f"model.{k}": v.numpy().copy() for k, v in session.model.state_dict().items()}
    for index, moments in session.optimizer.state_dict()["state"].items():
        state |= {f"optimizer.{index}.{k}": v.numpy().copy() for k, v in moments.items()}
    return state | {"rng": session.rng.numpy().copy(), "step": np.array(session.step)}


def test_a_finite_poison_is_refused_before_anything_changes_and_the_session_goes_on(bundle):
    """Huge but finite activations (validation lets them through) would make the weights NaN:
    the step and the prediction are refused with ``non_finite``, nothing of the session
    changes, nothing is cached, and the edge goes on from where it was to the weights of a
    run that was never poisoned."""
    from cloud_harness import train_request

    from splitwire.errors import NonFinite

    async def poisoned_run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            async with await connect_good(server.url, bundle, "good", token=None) as good:
                await train_steps(good, bundle, range(1, 3))
            before = session_state(server, "good")
            refusals = []
            for scale in (1e30, 1e35):
                async with await connect_good(server.url, bundle, "good", token=None, resume_from=2) as edge:
                    request = train_request(bundle, 3)
                    with pytest.raises(NonFinite) as refused:
                        await edge.train_step(3, request.z * np.float32(scale), request.lengths, request.labels)
                    refusals.append(str(refused.value))
                async with await connect_good(server.url, bundle, "good", token=None, resume_from=2) as edge:
                    with pytest.raises(NonFinite):
                        await edge.predict(request.z * np.float32(1e30), request.lengths)
            after = session_state(server, "good")
            replay = server.sessions["good"].session.replay.step
            async with await connect_good(server.url, bundle, "good", token=None, resume_from=2) as good:
                await train_steps(good, bundle, range(3, 5))
            return before, after, replay, refusals, server.stats, cloud_weights(server, "good")

    async def clean_run():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            async with await connect_good(server.url, bundle, "good", token=None) as good:
                await train_steps(good, bundle, range(1, 5))
            return cloud_weights(server, "good")

    before, after, replay, refusals, stats, weights = asyncio.run(poisoned_run())
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert replay == 2  # the refused step cached nothing
    assert stats.refused["non_finite"] == 4 and "nothing changed" in refusals[0]
    reference = asyncio.run(clean_run())
    for name in reference:
        assert np.isfinite(weights[name]).all()
        np.testing.assert_array_equal(weights[name], reference[name], err_msg=name)


# ---------------------------------------------------------------------------- corrupt checkpoints


def overwrite_middle(path, size: int = 1 << 16) -> None:
    """Overwrite ``size`` bytes (at most half the file) in the middle of the file's tensor bytes."""
    data = bytearray(path.read_bytes())
    size = min(size, len(data) // 2)
    start = len(data) - size - len(data) // 8
    data[start:start + size] = bytes((b + 1) % 256 for b in data[start:start + size])
    path.write_bytes(bytes(data))


def test_a_corrupt_cloud_snapshot_is_set_aside_and_the_last_good_one_is_used(bundle, tmp_path):
    """A ``latest`` snapshot with 64 KiB overwritten fails its checksum: it is renamed
    ``*.corrupt`` and logged with its path, and the session comes back from its intact
    ``requested`` snapshot (step 2) with exactly that step's state. Truncated snapshots (both)
    give a fresh session instead of an ``internal`` error on every hello. Temp files from a
    writer killed mid-save are removed at start-up."""
    from cloud_backend.session import checkpoint_path

    state_dir = tmp_path / "state"
    latest = checkpoint_path(state_dir, "s", "latest")
    requested = checkpoint_path(state_dir, "s", "requested")

    async def train_and_stop():
        async with serve_cloud(bundle, port=0, device="cpu", state_dir=state_dir) as server:
            async with await connect_good(server.url, bundle, "s", token=None) as edge:
                await train_steps(edge, bundle, range(1, 3))
                assert await edge.checkpoint(2)
                at_two = session_state(server, "s")
                await train_steps(edge, bundle, range(3, 5))
        return at_two

    async def come_back():
        async with serve_cloud(bundle, port=0, device="cpu", state_dir=state_dir) as server:
            async with await connect_good(server.url, bundle, "s", token=None, resume_from=4) as edge:
                return edge.resume_step, session_state(server, "s"), server.stats

    at_two = asyncio.run(train_and_stop())
    assert latest.is_file() and requested.is_file()
    overwrite_middle(latest)
    (state_dir / f".{latest.name}.12345.tmp").write_bytes(b"\0" * 4096)  # a save cut by kill -9
    resume_step, state, stats = asyncio.run(come_back())
    assert resume_step == 2 and stats.corrupt_checkpoints == 1
    assert latest.with_name(latest.name + ".corrupt").is_file() and not list(state_dir.glob(".*.tmp"))
    for name in at_two:
        np.testing.assert_array_equal(state[name], at_two[name], err_msg=name)

    shutil.rmtree(state_dir)
    asyncio.run(train_and_stop())
    for path in (latest, requested):  # now both torn
        path.write_bytes(path.read_bytes()[:1000])
    resume_step, state, stats = asyncio.run(come_back())
    assert resume_step == 0 and stats.corrupt_checkpoints == 2


# ---------------------------------------------------------------------------- values that pass parsing


@pytest.mark.parametrize("schedule,message", [
    ({"lr": "inf", "kind": "constant", "warmup_steps": 0, "total_steps": 0}, "lr must be a number"),
    ({"lr": 1e308, "kind": "linear", "warmup_steps": 2**62, "total_steps": 2**62 + 1}, "lr must be a number in"),
    ({"lr": 1e-3, "kind": "linear", "warmup_steps": 2**62, "total_steps": 2**62 + 1}, "warmup_steps must be"),
    ({"lr": 1e-3, "kind": "constant", "warmup_steps": True, "total_steps": 0}, "warmup_steps must be"),
    ({"lr": 1e-3, "kind": "constant", "warmup_steps": 1.5, "total_steps": 0}, "warmup_steps must be"),
    ({"lr": 1e-3, "kind": "constant", "warmup_steps": 0, "total_steps": 0, "extra": 1}, "exactly lr, kind"),
], ids=["lr-string-inf", "lr-1e308", "warmup-2^62", "bool-steps", "float-steps", "extra-key"])
def test_a_schedule_out_of_range_is_refused_at_hello_and_opens_no_session(bundle, schedule, message):
    from websockets.asyncio.client import connect

    from splitwire.protocol import Error, Frame, Kind, decode, encode, session_tag

    meta = {"session_id": "s", "bundle_hash": bundle.hash, "token": None, "resume_from": None,
            "schedule": schedule, "seed": 0, "codec": "fp32"}

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            async with connect(server.url, compression=None) as ws:
                await ws.send(encode(Frame(Kind.HELLO, session_tag("s"), 0, meta)))
                return Error.from_frame(decode(await ws.recv())), set(server.sessions), server.stats

    error, sessions, stats = asyncio.run(scenario())
    assert error.code == "protocol" and message in error.message, error
    assert sessions == set() and "internal" not in stats.refused


# ---------------------------------------------------------------------------- session churn


def test_session_churn_stays_within_the_memory_and_disk_limits(bundle, tmp_path):
    """Ten session ids opened one after another against ``max_sessions=2``: with a state dir the
    least recently used disconnected session is evicted to disk and the state dir is trimmed to
    its byte budget (the most recent sessions survive, and come back at their step); without
    one, sessions disconnected for longer than ``session_ttl`` give their place, and otherwise
    a new id is refused as ``busy`` rather than growing memory."""
    from cloud_backend.state_budget import saved_sessions, used_bytes
    from splitwire.errors import ConnectionLost

    state_dir = tmp_path / "state"

    async def churn(ids, **limits):
        peaks = {"sessions": 0, "bytes": 0}
        async with serve_cloud(bundle, port=0, device="cpu", max_sessions=2, **limits) as server:
            for session_id in ids:
                async with await connect_good(server.url, bundle, session_id, token=None,
                                              retry=Backoff(give_up_after_s=0.1)) as edge:
                    await train_steps(edge, bundle, range(1, 3))
                    assert await edge.checkpoint(2) == (limits.get("state_dir") is not None)
                peaks["sessions"] = max(peaks["sessions"], len(server.sessions))
                if state_dir.is_dir():
                    peaks["bytes"] = max(peaks["bytes"], used_bytes(state_dir))
                await asyncio.sleep(limits.get("session_ttl", 0) * 1.5)
            return peaks, server.stats

    asyncio.run(churn(["probe"], state_dir=state_dir))
    one_session = used_bytes(state_dir)
    shutil.rmtree(state_dir)
    budget = int(4.5 * one_session)
    ids = [f"churn-{i}" for i in range(10)]
    peaks, stats = asyncio.run(churn(ids, state_dir=state_dir, max_state_bytes=budget))
    assert peaks["sessions"] <= 2 and peaks["bytes"] <= budget, (peaks, budget)
    assert stats.evicted == 8 and stats.trimmed >= 5 and used_bytes(state_dir) <= budget

    async def come_back(session_id):
        async with serve_cloud(bundle, port=0, device="cpu", state_dir=state_dir) as server:
            async with await connect_good(server.url, bundle, session_id, token=None, resume_from=2) as edge:
                return edge.resume_step

    assert len(saved_sessions(state_dir)) == 4
    assert asyncio.run(come_back(ids[-3])) == 2 and asyncio.run(come_back(ids[0])) == 0

    _, stats = asyncio.run(churn(ids[:4], session_ttl=0.2))  # no state dir: places freed by the ttl
    assert stats.expired == 3 and stats.welcomed == 4
    with pytest.raises(ConnectionLost, match="limit of 2 sessions and has no --state-dir"):  # busy, retried
        asyncio.run(churn(ids[:3]))
