"""Wire codecs: round-trip error within each format's bound, validation of every decoded part,
and split fine-tuning over a real websocket with a lossy, packed codec.

The bounds come from the formats: fp16 keeps 11 significant bits (relative error ≤ 2⁻¹¹ in
its normal range), bf16 8 (≤ 2⁻⁸), int8 rounds to the nearest multiple of absmax/127
(≤ absmax/127/2). Stochastic rounding must be unbiased: its mean error over many draws
vanishes like 1/√draws. Over the wire, a run with ``int8+sr+packed`` must equal the same
split model trained in one process with the codec's round trip applied to ``z`` and ``dz``,
and the frames must be as small as the format says.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys

import numpy as np
import pytest
import torch
from bundles import export_cached, padded_batch, reference_edge, tiny_options
from websockets.asyncio.client import connect

from cloud_backend.model import load_cloud_part
from cloud_backend.server import serve_cloud
from edge_runtime.client import CloudClient
from splitwire.bundle import Bundle, load_bundle
from splitwire.codecs import CODEC_NAMES, Carries, codec_for, padding_mask
from splitwire.errors import ConfigMismatch, ProtocolError
from splitwire.protocol import (
    HEADER, Gradient, Hello, SessionConfig, Train, WireLimits, decode, encode,
)
from splitwire.schedule import Schedule

LENGTHS = np.array([7, 3, 1, 5], dtype=np.int32)
SHAPE = (4, 7, 6)
LIMITS = WireLimits(max_batch=8, max_length=16, width=SHAPE[2], num_labels=2)


def _tensor(seed: int = 0) -> np.ndarray:
    """Values spread over six decades, both signs, with one large outlier per row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * 10.0 ** rng.uniform(-3, 3, SHAPE)
    x[:, 0, 0] = 50.0
    return x.astype(np.float32)


def _round_trip(name: str, x: np.ndarray, carries: Carries = Carries.ACTIVATION, *, step: int = 1,
                lengths: np.ndarray = LENGTHS) -> np.ndarray:
    """Through the protocol: encode a frame, decode and validate it, read the tensor back."""
    codec = codec_for(name, carries, seed=3)
    if carries == Carries.ACTIVATION:
        frame = Train(step, x, lengths, np.zeros(len(lengths), np.int64)).to_frame(session=1, codec=codec)
        limits = WireLimits(LIMITS.max_batch, LIMITS.max_length, x.shape[2], LIMITS.num_labels)
        return Train.from_frame(decode(encode(frame)), limits=limits, codec=codec).z
    frame = Gradient(step, x, 0.5, {}).to_frame(session=1, codec=codec, lengths=lengths)
    return Gradient.from_frame(decode(encode(frame)), codec=codec, shape=x.shape, lengths=lengths).dz


def _real(x: np.ndarray, lengths: np.ndarray = LENGTHS) -> np.ndarray:
    return x * padding_mask(x.shape, lengths)[..., None]


# ---------------------------------------------------------------------------- names


def test_every_name_builds_the_codec_it_names_and_others_are_refused():
    assert CODEC_NAMES[0] == "fp32"
    assert {"fp16+packed", "bf16", "int8", "int8+sr", "int8+packed", "int8+sr+packed", "int8-channel+packed"} \
        <= set(CODEC_NAMES)
    for name in CODEC_NAMES:
        assert codec_for(name, Carries.GRADIENT).name == name
    for bad in ("zstd", "packed+int8", "int8+packed+sr", "fp16+sr", "fp32+packed+packed", "int8+"):
        with pytest.raises(KeyError, match="unknown wire codec"):
            codec_for(bad, Carries.ACTIVATION)


def test_sessions_refuse_unknown_codecs():
    meta = SessionConfig(Schedule(1e-3), 0, "zstd").to_meta()
    with pytest.raises(ProtocolError, match="unknown wire codec 'zstd'; known: fp32, "):
        SessionConfig.from_meta(meta)


# ---------------------------------------------------------------------------- round-trip error


@pytest.mark.parametrize("carries", list(Carries))
@pytest.mark.parametrize("packed", ["", "+packed"])
def test_fp32_is_exact_and_packing_zeroes_only_padding(carries, packed):
    x = _tensor()
    back = _round_trip("fp32" + packed, x, carries)
    np.testing.assert_array_equal(back, _real(x) if packed else x)


@pytest.mark.parametrize("packed", ["", "+packed"])
def test_fp16_relative_error_is_at_most_2_to_the_minus_11(packed):
    x = _tensor()
    back = _round_trip("fp16" + packed, x, Carries.GRADIENT)
    want = _real(x) if packed else x
    # relative 2⁻¹¹ in fp16's normal range (|x| ≥ 2⁻¹⁴), absolute 2⁻²⁵ among its subnormals
    assert np.all(np.abs(back - want) <= np.maximum(2.0**-11 * np.abs(want), 2.0**-25))
    tiny = np.full(SHAPE, 3e-6, np.float32)
    want = _real(tiny) if packed else tiny
    assert 0 < np.abs(_round_trip("fp16" + packed, tiny) - want).max() <= 2.0**-25


@pytest.mark.parametrize("packed", ["", "+packed"])
def test_bf16_rounds_to_nearest_even_like_torch(packed):
    x = _tensor()
    back = _round_trip("bf16" + packed, x)
    want = _real(x) if packed else x
    assert np.all(np.abs(back - want) <= 2.0**-8 * np.abs(want))
    np.testing.assert_array_equal(back, torch.from_numpy(want).to(torch.bfloat16).float().numpy())
    # ties go to the even neighbour: 1 + 2⁻⁸ → 1, 1 + 3·2⁻⁸ → 1 + 2⁻⁶
    ties = np.zeros(SHAPE, np.float32)
    ties[0, 0, :2] = [1 + 2.0**-8, 1 + 3 * 2.0**-8]
    assert list(_round_trip("bf16" + packed, ties)[0, 0, :2]) == [1.0, 1 + 2.0**-6]


@pytest.mark.parametrize("name", ["int8", "int8+packed", "int8+sr", "int8+sr+packed"])
def test_int8_per_token_error_is_at_most_half_a_step_of_the_token_absmax(name):
    x = _tensor()
    want = _real(x) if "packed" in name else x
    back = _round_trip(name, x)  # activations are rounded to nearest even with +sr
    step = np.abs(want).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(back - want) <= step / 2 * (1 + 1e-5))
    grad_bound = step if "sr" in name else step / 2  # stochastic rounding may go to either neighbour
    assert np.all(np.abs(_round_trip(name, x, Carries.GRADIENT) - want) <= grad_bound * (1 + 1e-5))


@pytest.mark.parametrize("packed", ["", "+packed"])
def test_int8_per_channel_error_is_at_most_half_a_step_of_the_channel_absmax(packed):
    x = _tensor()
    sent = x[padding_mask(SHAPE, LENGTHS)] if packed else x.reshape(-1, SHAPE[2])
    step = np.abs(sent).max(axis=0) / 127  # per channel, over the tokens that go on the wire
    back = _round_trip("int8-channel" + packed, x)
    want = _real(x) if packed else x
    assert np.all(np.abs(back - want) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("width", [6, 5])  # an odd width pads its last byte
@pytest.mark.parametrize("packed", ["", "+packed"])
def test_int4_per_channel_error_is_at_most_half_a_step_of_the_channel_absmax_and_sr_is_unbiased(packed, width):
    x = np.ascontiguousarray(_tensor()[..., :width])
    sent = x[padding_mask(x.shape, LENGTHS)] if packed else x.reshape(-1, width)
    step = np.abs(sent).max(axis=0) / 7
    want = _real(x) if packed else x
    assert np.all(np.abs(_round_trip("int4-channel" + packed, x) - want) <= step / 2 * (1 + 1e-5))
    draws = 1000
    mean = sum(_round_trip("int4-channel+sr" + packed, x, Carries.GRADIENT, step=n) for n in range(draws)) / draws
    assert np.all(np.abs(mean - want) <= 5 * step / (2 * np.sqrt(draws)))


def test_stochastic_rounding_of_gradients_is_unbiased_and_replays_the_same_draws():
    x = _tensor()
    step = np.abs(x).max(axis=-1, keepdims=True) / 127
    draws = 2000
    total = np.zeros(SHAPE, np.float64)
    for n in range(1, draws + 1):
        total += _round_trip("int8+sr", x, Carries.GRADIENT, step=n)
    mean_error = total / draws - x
    # each draw errs by at most one step, independently: the mean's error is ~ step/(2√draws)
    assert np.all(np.abs(mean_error) <= 5 * step / (2 * np.sqrt(draws)))
    nearest_bias = _round_trip("int8", x, Carries.GRADIENT) - x
    assert np.abs(mean_error).mean() < np.abs(nearest_bias).mean() / 5
    one = codec_for("int8+sr", Carries.GRADIENT, seed=3)
    again = codec_for("int8+sr", Carries.GRADIENT, seed=3)
    np.testing.assert_array_equal(one.encode(x, LENGTHS, step=7)[""], again.encode(x, LENGTHS, step=7)[""])
    assert (one.encode(x, LENGTHS, step=7)[""] != one.encode(x, LENGTHS, step=8)[""]).any()


def test_all_zero_tokens_have_zero_scales_and_decode_to_zero():
    dz = _real(_tensor())  # dz is exactly zero at padding
    for name in ("int8", "int8+sr", "int8-channel"):
        codec = codec_for(name, Carries.GRADIENT)
        parts = codec.encode(dz, LENGTHS, step=1)
        if name != "int8-channel":
            assert (parts["scale"][~padding_mask(SHAPE, LENGTHS)] == 0).all()
        assert (codec.decode(parts, SHAPE, LENGTHS)[~padding_mask(SHAPE, LENGTHS)] == 0).all()


# ---------------------------------------------------------------------------- sizes and validation


def _nbytes(name: str, shape=SHAPE, lengths=LENGTHS) -> int:
    parts = codec_for(name, Carries.ACTIVATION).encode(_tensor()[:, :shape[1], :shape[2]], lengths, step=1)
    return sum(p.nbytes for p in parts.values())


def test_wire_sizes_follow_the_format():
    b, l, w = SHAPE
    t = int(LENGTHS.sum())
    assert _nbytes("fp32") == 4 * b * l * w and _nbytes("fp32+packed") == 4 * t * w
    assert _nbytes("fp16") == _nbytes("bf16") == 2 * b * l * w and _nbytes("bf16+packed") == 2 * t * w
    assert _nbytes("int8") == b * l * (w + 4) and _nbytes("int8+sr+packed") == t * (w + 4)
    assert _nbytes("int8-channel") == b * l * w + 4 * w and _nbytes("int8-channel+packed") == t * w + 4 * w
    assert _nbytes("int4-channel") == b * l * w // 2 + 4 * w and _nbytes("int4-channel+packed") == t * w // 2 + 4 * w
    assert _nbytes("int4-channel", shape=(b, l, w - 1)) == b * l * w // 2 + 4 * (w - 1)  # odd: a padded byte


def test_max_frame_bytes_covers_the_widest_codec():
    limits = WireLimits(max_batch=4, max_length=8, width=1, num_labels=2)
    full = np.full(4, 8, np.int32)
    x = np.ones((4, 8, 1), np.float32)
    for name in CODEC_NAMES:
        frame = Train(1, x, full, np.zeros(4, np.int64)).to_frame(session=1, codec=codec_for(name, Carries.ACTIVATION))
        assert len(encode(frame)) <= limits.max_frame_bytes()


def _tampered(name: str, part: str, value) -> bytes:
    codec = codec_for(name, Carries.ACTIVATION)
    frame = Train(1, _tensor(), LENGTHS, np.zeros(4, np.int64)).to_frame(session=1, codec=codec)
    tensors = dict(frame.tensors)
    tensors[part] = np.array(tensors[part])
    tensors[part].reshape(-1)[0] = value
    return encode(type(frame)(frame.kind, frame.session, frame.step, frame.meta, tensors))


@pytest.mark.parametrize(
    "name, part, value, message",
    [
        ("int8", "z.scale", -1.0, "scales must be finite and >= 0"),
        ("int8+packed", "z.scale", np.nan, "scales must be finite and >= 0"),
        ("int8-channel", "z.scale", np.inf, "scales must be finite and >= 0"),
        ("int8", "z", -128, r"values must be in -127..127"),
        ("int4-channel", "z", 0x80, r"values must be in -7..7"),  # a high nibble of 0
        ("int4-channel+packed", "z.scale", -1.0, "scales must be finite and >= 0"),
        ("int8", "z.scale", 3e38, "NaN or infinite"),  # finite scale, infinite value
        ("bf16", "z", 0x7FC0, "NaN or infinite"),
        ("fp16+packed", "z", np.inf, "NaN or infinite"),
    ],
)
def test_decode_refuses_parts_that_do_not_decode_to_finite_values(name, part, value, message):
    with pytest.raises(ProtocolError, match=message):
        Train.from_frame(decode(_tampered(name, part, value)), limits=LIMITS, codec=codec_for(name, Carries.ACTIVATION))


def test_packed_sizes_must_agree_with_the_lengths():
    codec = codec_for("fp16+packed", Carries.ACTIVATION)
    frame = Train(1, _tensor(), LENGTHS, np.zeros(4, np.int64)).to_frame(session=1, codec=codec)
    longer = dict(frame.tensors, lengths=LENGTHS + np.array([0, 1, 0, 0], np.int32))
    data = encode(type(frame)(frame.kind, frame.session, frame.step, frame.meta, longer))
    with pytest.raises(ProtocolError, match=r"'z' must have shape \(17, 6\), got \(16, 6\)"):
        Train.from_frame(decode(data), limits=LIMITS, codec=codec)


def test_encoders_refuse_what_the_format_cannot_carry():
    big = np.full(SHAPE, 1e5, np.float32)
    with pytest.raises(ProtocolError, match="does not fit float16"):
        codec_for("fp16", Carries.ACTIVATION).encode(big, LENGTHS, step=1)
    with pytest.raises(ProtocolError, match="beyond the bf16 range"):
        codec_for("bf16", Carries.ACTIVATION).encode(np.full(SHAPE, 3.4e38, np.float32), LENGTHS, step=1)
    with pytest.raises(ProtocolError, match="non-finite gradient as int8"):
        codec_for("int8", Carries.GRADIENT).encode(np.full(SHAPE, np.nan, np.float32), LENGTHS, step=1)


# ---------------------------------------------------------------------------- over the wire

CODEC = "int8+sr+packed"
SEED, STEPS, B = 9, 3, 4
SCHEDULE = Schedule(lr=1e-3, kind="constant", warmup_steps=0, total_steps=STEPS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir) -> Bundle:
    return load_bundle(export_cached(tmp_path_factory, tiny_model_dir, **tiny_options("ort-training")))


def _batches(bundle: Bundle) -> list[tuple]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        lengths = [int(bundle.max_length), *rng.integers(2, bundle.max_length // 2, B - 1)]
        batch = padded_batch(rng, lengths)
        out.append((batch, batch.attention_mask.sum(1).astype(np.int32), rng.integers(0, 2, B).astype(np.int64)))
    return out


def _adamw(module: torch.nn.Module, bundle: Bundle) -> torch.optim.AdamW:
    opt = bundle.manifest["optimizer"]
    return torch.optim.AdamW(module.parameters(), lr=SCHEDULE.lr, betas=tuple(opt["betas"]), eps=float(opt["eps"]),
                             weight_decay=float(opt["weight_decay"]))


def _z(edge: torch.nn.Module, batch) -> torch.Tensor:
    return edge(*(torch.from_numpy(a) for a in batch.feeds().values()))


def _frame_bytes(meta: dict, payload: int) -> int:
    """A frame's exact size: header, compact JSON metadata, raw tensors."""
    return HEADER.size + len(json.dumps(meta, separators=(",", ":")).encode()) + payload


def test_int8_packed_training_over_the_wire_equals_in_process_training_with_the_codec(tiny):
    data = _batches(tiny)
    edge0 = reference_edge(tiny.root)
    width = tiny.wire_width

    async def run():
        async with serve_cloud(tiny, port=0, device="cpu") as server:
            edge = copy.deepcopy(edge0)
            optimizer = _adamw(edge, tiny)
            async with await CloudClient.connect(server.url, bundle=tiny, session_id="int8", schedule=SCHEDULE,
                                                 seed=SEED, codec=CODEC) as client:
                sizes, dzs = [], []
                for step, (batch, lengths, labels) in enumerate(data, start=1):
                    z = _z(edge, batch)
                    reply = await client.train_step(step, z.detach().numpy(), lengths, labels)
                    z.backward(torch.from_numpy(reply.dz))
                    optimizer.step()
                    optimizer.zero_grad()
                    sizes.append(client.last_step_bytes)
                    dzs.append(reply.dz)
            return edge, copy.deepcopy(server.sessions["int8"].session.model), sizes, dzs

    edge, cloud, sizes, dzs = asyncio.run(run())

    # the reference: one process, with the codec's round trip applied to z and to dz
    ref_edge, ref_cloud = copy.deepcopy(edge0), load_cloud_part(tiny, device=torch.device("cpu"))
    edge_opt, cloud_opt = _adamw(ref_edge, tiny), _adamw(ref_cloud, tiny)
    up_codec, down_codec = (codec_for(CODEC, carries, seed=SEED) for carries in Carries)
    for step, (batch, lengths, labels) in enumerate(data, start=1):
        z = _z(ref_edge, batch)
        z_np = z.detach().numpy()
        z_cloud = torch.from_numpy(up_codec.decode(up_codec.encode(z_np, lengths, step=step), z_np.shape, lengths))
        z_cloud.requires_grad_(True)
        ref_cloud.loss(ref_cloud(z_cloud, torch.from_numpy(batch.attention_mask)), torch.from_numpy(labels)).backward()
        dz = down_codec.decode(down_codec.encode(z_cloud.grad.numpy(), lengths, step=step), z_np.shape, lengths)
        np.testing.assert_array_equal(dzs[step - 1], dz)
        assert (dz[batch.attention_mask == 0] == 0).all()
        z.backward(torch.from_numpy(dz))
        for optimizer in (edge_opt, cloud_opt):
            optimizer.step()
            optimizer.zero_grad()
    for got, want in ((edge, ref_edge), (cloud, ref_cloud)):
        for (name, p), q in zip(got.named_parameters(), want.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    # the bytes the transport counted: exactly the int8 values and float32 scales of the real tokens
    for (up, down), (batch, lengths, labels) in zip(sizes, data):
        t, (b, l) = int(lengths.sum()), batch.shape
        table = [{"name": "z", "dtype": "int8", "shape": [t, width]}, {"name": "z.scale", "dtype": "float32",
                                                                       "shape": [t]},
                 {"name": "lengths", "dtype": "int32", "shape": [b]}, {"name": "labels", "dtype": "int64", "shape": [b]}]
        assert up == _frame_bytes({"shape": [b, l], "tensors": table}, t * width + 4 * t + 4 * b + 8 * b)
        down_payload = t * width + 4 * t
        assert down_payload + HEADER.size < down < down_payload + HEADER.size + 300
        assert t < b * l and up < b * l * width * 4 / 2  # below half the fp32 B×L×W payload


def test_the_cloud_refuses_an_unknown_codec_and_checkpoints_the_one_it_trains_with(tiny, tmp_path):
    batch, lengths, labels = _batches(tiny)[0]
    z = _z(reference_edge(tiny.root), batch).detach().numpy()

    async def unknown() -> None:
        async with serve_cloud(tiny, port=0, device="cpu") as server:
            async with connect(server.url) as ws:
                await ws.send(encode(Hello("s", tiny.hash, SessionConfig(SCHEDULE, SEED, "zstd")).to_frame()))
                reply = decode(await ws.recv())
                assert reply.meta["code"] == "protocol" and "unknown wire codec 'zstd'" in reply.meta["message"]

    async def first() -> None:
        async with serve_cloud(tiny, port=0, device="cpu", state_dir=tmp_path) as server:
            async with await CloudClient.connect(server.url, bundle=tiny, session_id="s", schedule=SCHEDULE,
                                                 seed=SEED, codec="bf16+packed") as client:
                await client.train_step(1, z, lengths, labels)

    async def restarted() -> int:
        async with serve_cloud(tiny, port=0, device="cpu", state_dir=tmp_path) as server:
            with pytest.raises(ConfigMismatch, match="bf16\\+packed"):
                await CloudClient.connect(server.url, bundle=tiny, session_id="s", schedule=SCHEDULE, seed=SEED)
            async with await CloudClient.connect(server.url, bundle=tiny, session_id="s", schedule=SCHEDULE,
                                                 seed=SEED, codec="bf16+packed") as client:
                return client.resume_step

    asyncio.run(unknown())
    asyncio.run(first())
    assert asyncio.run(restarted()) == 1


def test_sft_edge_train_codec_reaches_the_cloud_and_is_fixed_for_the_run(tiny, tmp_path, capsys):
    from conftest import movie_reviews_path
    from edge_runtime.cli import main
    from edge_runtime.checkpoints import CheckpointDir

    data = tmp_path / "train.tsv"
    data.write_text("\n".join(movie_reviews_path().read_text(encoding="utf-8").splitlines()[:17]) + "\n")
    directory = tmp_path / "run"

    def args(url: str, codec: str) -> list[str]:
        return ["train", "--bundle", str(tiny.root), "--cloud", url, "--session", "codec", "--checkpoint-dir",
                str(directory), "--data", str(data), "--label-column", "sentiment", "--label-threshold", "0",
                "--batch-size", "8", "--epochs", "1", "--threads", "1", "--no-progress", "--codec", codec,
                "--report", str(tmp_path / "report.json")]

    async def run() -> tuple[int, str]:
        async with serve_cloud(tiny, port=0, device="cpu") as server:
            edge = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys; from edge_runtime.cli import main; sys.exit(main(sys.argv[1:]))",
                *args(server.url, "int8+packed"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
            output, _ = await edge.communicate()
            return edge.returncode, output.decode(), server.sessions["codec"].session.config.codec

    code, output, cloud_codec = asyncio.run(run())
    assert code == 0, output
    assert cloud_codec == "int8+packed" and CheckpointDir(directory).latest().config.codec == "int8+packed"
    report = json.loads((tmp_path / "report.json").read_text())
    fp32_payload = report["padded_tokens_per_step"] * tiny.wire_width * 4
    assert report["last_step"] == 2 and report["bytes_up_per_step"]["mean"] < fp32_payload / 2
    assert main(args("ws://127.0.0.1:9", "fp32")) == 1  # refused before connecting: another codec, another run
    assert "codec: was 'int8+packed', now 'fp32'" in capsys.readouterr().err
