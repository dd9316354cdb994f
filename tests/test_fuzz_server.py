"""Fuzzing: random and mutated frames at the decoder and at a live server.

One seeded generator makes the frames: random bytes, and mutations of valid frames of every
kind — bit flips, truncations, splices, header fields (version, kind, flags, session, step,
metadata length), the JSON metadata (shapes, dtypes, names, values of the wrong type, huge
or negative numbers, missing and extra keys) and the tensor bytes (NaN, ±Inf, huge values).

At the decoder (10,000 frames, read as a standard and as a label-private edge and cloud
would read them) every frame must parse into checked values or raise a ``SplitftError``,
nothing else. At the live server, sent on fresh connections before or
after a valid hello, every frame must get an answer or a typed error and a close within a
timeout (no crash, no hang, no "internal" error), while a good session trains beside the
fuzzer and ends with exactly the weights of its run alone: a few hundred frames by
default, 10,000 with ``-m slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import struct

import numpy as np
import pytest
from cloud_harness import B, L, SCHEDULE, SEED, hello_frame, tiny_dropout_bundle, train_request
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cloud_backend.server import serve_cloud
from edge_runtime.client import CloudClient
from splitwire.bundle import load_bundle
from splitwire.codecs import Carries, Fp32Codec
from splitwire.errors import SplitftError
from splitwire.protocol import (
    HEADER, Checkpointed, Error, Frame, Gradient, Hello, Kind, Predict, Prediction, Top, TopGradient, Train, Welcome,
    WireLimits, decode, encode, session_tag,
)

FAST, SLOW = 400, 10_000
CODEC = Fp32Codec(Carries.ACTIVATION)
FUZZ_SESSIONS = ("fuzz-0", "fuzz-1", "fuzz-2")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


class FrameFuzzer:
    """Seeded random and mutated frames, built from valid frames of every kind for ``bundle``."""

    def __init__(self, bundle, seed: int) -> None:
        self.rng = random.Random(seed)
        self.bundle = bundle
        tag = session_tag(FUZZ_SESSIONS[0])
        request = train_request(bundle, 1)
        lengths = request.lengths
        self.valid = [
            hello_frame(bundle, FUZZ_SESSIONS[0], None),
            encode(request.to_frame(session=tag, codec=CODEC)),
            encode(Predict(1, request.z, lengths).to_frame(session=tag, codec=CODEC)),
            encode(Frame(Kind.CHECKPOINT, tag, 1)),
            encode(Frame(Kind.BYE, tag)),
            encode(Gradient(1, request.z, 0.5, {"count": 4.0}).to_frame(session=tag, codec=CODEC, lengths=lengths)),
            encode(Prediction(1, np.zeros((B, bundle.num_labels), np.float32)).to_frame(session=tag)),
            encode(Checkpointed(1, True).to_frame(session=tag)),
            encode(Error("protocol", "bad").to_frame(session=tag)),
            # the label-private split's: a TRAIN without labels, the pooled output and its gradient
            encode(dataclasses.replace(request, labels=None).to_frame(session=tag, codec=CODEC)),
            encode(Top(1, request.z[:, 0]).to_frame(session=tag, codec=CODEC)),
            encode(TopGradient(1, request.z[:, 0]).to_frame(session=tag, codec=CODEC)),
        ]
        self.mutations = [self._random_bytes, self._flip_bits, self._truncate, self._splice, self._header,
                          self._meta, self._tensor_values, self._insert_delete]

    def frame(self) -> bytes:
        """One fuzzed frame; one in ten is a valid frame of some kind, unchanged."""
        if self.rng.random() < 0.1:
            return self.rng.choice(self.valid)
        return self.rng.choice(self.mutations)(bytearray(self.rng.choice(self.valid)))

    def mutated_train(self, session_id: str, step: int) -> bytes:
        """A mutation of a valid training frame of ``session_id`` at ``step`` (for after a hello)."""
        request = train_request(self.bundle, step, seed=self.rng.randrange(1 << 30))
        valid = bytearray(encode(request.to_frame(session=session_tag(session_id), codec=CODEC)))
        return bytes(valid) if self.rng.random() < 0.1 else self.rng.choice(self.mutations[1:])(valid)

    # ---- mutations: each takes a valid frame's bytes and returns other bytes

    def _random_bytes(self, _: bytearray) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 27, 28, 29, 64, 300)))

    def _flip_bits(self, data: bytearray) -> bytes:
        for _ in range(self.rng.randint(1, 8)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def _truncate(self, data: bytearray) -> bytes:
        return bytes(data[:self.rng.randrange(len(data))])

    def _splice(self, data: bytearray) -> bytes:
        other = self.rng.choice(self.valid)
        return bytes(data[:self.rng.randrange(len(data) + 1)] + other[self.rng.randrange(len(other) + 1):])

    def _insert_delete(self, data: bytearray) -> bytes:
        at = self.rng.randrange(len(data) + 1)
        if self.rng.random() < 0.5:
            return bytes(data[:at] + self.rng.randbytes(self.rng.randint(1, 16)) + data[at:])
        return bytes(data[:at] + data[at + self.rng.randint(1, 16):])

    def _header(self, data: bytearray) -> bytes:
        fields = list(HEADER.unpack_from(data))
        index = self.rng.randrange(1, len(fields))
        limits = (None, 255, 255, 0xFFFF, 2**64 - 1, 2**64 - 1, 2**32 - 1)
        fields[index] = self.rng.choice((0, 1, 2, limits[index], self.rng.randint(0, limits[index])))
        return HEADER.pack(*fields) + bytes(data[HEADER.size:])

    def _meta(self, data: bytearray) -> bytes:
        """Change one thing in the JSON metadata and re-frame it with a consistent length."""
        *head, meta_len = HEADER.unpack_from(data)
        meta = json.loads(data[HEADER.size:HEADER.size + meta_len])
        body = bytes(data[HEADER.size + meta_len:])
        paths = list(_paths(meta))
        path = self.rng.choice(paths)
        _set(meta, path, self._odd_value())
        if self.rng.random() < 0.2:
            meta[self.rng.choice(("extra", "shape", "tensors", "token", "seed"))] = self._odd_value()
        raw = json.dumps(meta, allow_nan=True).encode()
        return HEADER.pack(*head, len(raw)) + raw + body

    def _odd_value(self):
        return self.rng.choice((
            None, True, -1, 0, 1, 2**31, 2**63, -(2**63) - 1, 1e308, -0.0, float("nan"), float("inf"), "", "x" * 5000,
            "float64", "int8", "<f4", [], [1], [0, 0], [-1, 4], [2**31, 1], [1.5, 2], [[1]], {}, {"a": [1] * 50},
            [[[[[[[[[]]]]]]]]], self.rng.randint(-10, 10**6), "é\u0000",
        ))

    def _tensor_values(self, data: bytearray) -> bytes:
        """Overwrite float32-aligned words of the tensor bytes with NaN, ±Inf or huge values."""
        *_, meta_len = HEADER.unpack_from(data)
        start = HEADER.size + meta_len
        words = (len(data) - start) // 4
        for _ in range(self.rng.randint(1, 4) if words else 0):
            at = start + 4 * self.rng.randrange(words)
            data[at:at + 4] = struct.pack("<f", self.rng.choice((float("nan"), float("inf"), -float("inf"), 3e38)))
        return bytes(data)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _set(root, path, value) -> None:
    if not path:
        root.clear()
        root["value"] = value
        return
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


# ---------------------------------------------------------------------------- the decoder


def read_any(data: bytes, limits: WireLimits):
    """What the cloud and the edge do with a frame of each kind: decode it and read its message."""
    frame = decode(data)
    shape, lengths = (B, L, limits.width), np.full(B, L, np.int32)
    pooled = limits.pooled or limits.width  # the fuzzer's TOP frames carry the activation's width
    readers = {
        Kind.HELLO: Hello.from_frame,
        Kind.WELCOME: Welcome.from_frame,
        Kind.TRAIN: lambda f: Train.from_frame(f, limits=limits, codec=CODEC),
        Kind.PREDICT: lambda f: Predict.from_frame(f, limits=limits, codec=CODEC),
        Kind.GRADIENT: lambda f: Gradient.from_frame(f, codec=CODEC, shape=shape, lengths=lengths),
        Kind.PREDICTION: lambda f: Prediction.from_frame(f, batch=B, num_labels=limits.num_labels,
                                                         pooled=limits.pooled),
        Kind.TOP: lambda f: Top.from_frame(f, codec=CODEC, batch=B, width=pooled),
        Kind.TOP_GRADIENT: lambda f: TopGradient.from_frame(f, codec=CODEC, batch=B, width=pooled),
        Kind.CHECKPOINTED: Checkpointed.from_frame,
        Kind.ERROR: Error.from_frame,
    }
    reader = readers.get(frame.kind)
    return frame if reader is None else reader(frame)


def fuzz_decoder(bundle, count: int, seed: int, *, label_private: bool = False) -> dict[str, int]:
    limits = WireLimits.from_bundle(bundle)
    if label_private:  # the pooled width of the fuzzer's TOP frames: the same bundle's sizes, read the other way
        limits = dataclasses.replace(limits, pooled=limits.width)
    fuzzer, outcomes = FrameFuzzer(bundle, seed), {"read": 0, "refused": 0}
    for _ in range(count):
        try:
            message = read_any(fuzzer.frame(), limits)
        except SplitftError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        if isinstance(message, Train):  # what passed is safe to compute with
            assert np.isfinite(message.z).all() and message.z.shape[2] == limits.width
            assert (message.labels is None) == label_private
            assert label_private or ((message.labels >= 0) & (message.labels < limits.num_labels)).all()
            assert ((message.lengths >= 1) & (message.lengths <= message.z.shape[1])).all()
    return outcomes


@pytest.mark.parametrize("label_private", [False, True], ids=["standard", "label-private"])
def test_the_decoder_reads_or_refuses_10000_fuzzed_frames(bundle, label_private):
    outcomes = fuzz_decoder(bundle, SLOW, seed=1, label_private=label_private)
    assert outcomes["read"] + outcomes["refused"] == SLOW
    assert outcomes["read"] > SLOW // 20 and outcomes["refused"] > SLOW // 2  # both paths were exercised


# ---------------------------------------------------------------------------- a live server


async def send_one(url: str, frames: list[bytes]) -> str:
    """Send ``frames`` on a fresh connection; what came back: ``error:<code>``, ``answer`` or ``closed``."""
    async with connect(url, compression=None, max_size=None) as ws:
        with contextlib.suppress(ConnectionClosed):
            for frame in frames:
                await ws.send(frame)
                reply = decode(await asyncio.wait_for(ws.recv(), 10))
                if reply.kind == Kind.ERROR:
                    with pytest.raises(ConnectionClosed):  # the server closes after an error
                        await asyncio.wait_for(ws.recv(), 10)
                    return f"error:{Error.from_frame(reply).code}"
            return "answer"
        return "closed"


async def good_session(url: str, bundle) -> CloudClient:
    return await CloudClient.connect(url, bundle=bundle, session_id="good", schedule=SCHEDULE, seed=SEED)


async def train_good(client: CloudClient, bundle, step: int) -> float:
    request = train_request(bundle, step, seed=99)
    return (await client.train_step(step, request.z, request.lengths, request.labels)).loss


def fuzz_server(bundle, count: int, *, steps: int) -> tuple[list[float], dict, dict[str, int], object]:
    """``count`` fuzzed frames, a good session's ``steps`` steps spread among them."""
    fuzzer = FrameFuzzer(bundle, seed=count + 1)

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu", max_sessions=16) as server:
            good = await good_session(server.url, bundle)
            losses, outcomes, step_every = [], {}, max(1, count // steps)
            for i in range(count):
                if i % step_every == 0 and len(losses) < steps:
                    losses.append(await train_good(good, bundle, len(losses) + 1))
                if fuzzer.rng.random() < 0.5:
                    frames = [fuzzer.frame()]
                else:
                    session = fuzzer.rng.choice(FUZZ_SESSIONS)
                    frames = [hello_frame(bundle, session, None), fuzzer.mutated_train(session, 1)]
                outcome = await asyncio.wait_for(send_one(server.url, frames), 30)
                outcomes[outcome.split(":")[0]] = outcomes.get(outcome.split(":")[0], 0) + 1
            while len(losses) < steps:
                losses.append(await train_good(good, bundle, len(losses) + 1))
            await good.close()
            weights = {k: v.detach().numpy().copy()
                       for k, v in server.sessions["good"].session.model.state_dict().items()}
            return losses, weights, outcomes, server.stats

    return asyncio.run(scenario())


def solo_run(bundle, steps: int) -> tuple[list[float], dict]:
    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            good = await good_session(server.url, bundle)
            losses = [await train_good(good, bundle, step) for step in range(1, steps + 1)]
            await good.close()
            return losses, {k: v.detach().numpy().copy()
                            for k, v in server.sessions["good"].session.model.state_dict().items()}

    return asyncio.run(scenario())


@pytest.mark.parametrize("count", [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="10k", marks=pytest.mark.slow)])
def test_a_live_server_survives_fuzzed_frames_and_another_session_trains_exactly(bundle, count):
    steps = 6
    want_losses, want_weights = solo_run(bundle, steps)
    losses, weights, outcomes, stats = fuzz_server(bundle, count, steps=steps)
    assert sum(outcomes.values()) == count
    assert outcomes.get("error", 0) > count // 2 and stats.refused["internal"] == 0  # typed refusals, no bug
    assert losses == want_losses
    assert weights.keys() == want_weights.keys()
    for name, value in want_weights.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
