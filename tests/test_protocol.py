"""The wire protocol without sockets: round trips, and every malformed frame is refused with ProtocolError."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitwire.codecs import Carries, Fp32Codec
from splitwire.errors import AuthError, BundleMismatch, ProtocolError, ServerBusy, VersionMismatch
from splitwire.protocol import (
    HEADER, MAGIC, REPLAYED, Checkpointed, EdgeGradient, Error, Gradient, GradientSum, Hello, Kind, Predict, Prediction, SessionConfig,
    Train, Welcome, WireLimits, decode, encode, session_tag,
)
from splitwire.schedule import Schedule

LIMITS = WireLimits(max_batch=8, max_length=16, width=4, num_labels=3)
CODEC = Fp32Codec(Carries.ACTIVATION)
CONFIG = SessionConfig(Schedule(1e-3, "linear", 2, 10), 7, "fp32")
TAG = session_tag("device-1")


def _train(step: int = 1, b: int = 3, l: int = 5, **overrides: np.ndarray) -> Train:
    rng = np.random.default_rng(step)
    fields = dict(z=rng.standard_normal((b, l, LIMITS.width)).astype(np.float32),
                  lengths=np.array([l, 2, 1][:b], dtype=np.int32), labels=np.array([0, 2, 1][:b], dtype=np.int64))
    return Train(step, **(fields | overrides))


def _train_bytes(**overrides: np.ndarray) -> bytes:
    return encode(_train(**overrides).to_frame(session=TAG, codec=CODEC))


def _read_train(data: bytes) -> Train:
    return Train.from_frame(decode(data), limits=LIMITS, codec=CODEC)


def _with_header(data: bytes, **fields: int) -> bytes:
    names = ("magic", "version", "kind", "flags", "session", "step", "meta_len")
    values = dict(zip(names, HEADER.unpack_from(data))) | fields
    return HEADER.pack(*(values[n] for n in names)) + data[HEADER.size:]


def test_train_round_trip_is_exact():
    sent = _train(step=42)
    data = _train_bytes()
    got = _read_train(encode(sent.to_frame(session=TAG, codec=CODEC)))
    assert got.step == 42
    for name in ("z", "lengths", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(sent, name))
        assert getattr(got, name).dtype == getattr(sent, name).dtype
    # header + JSON meta + raw tensors: the payload is the tensors' bytes plus a small overhead
    payload = sent.z.nbytes + sent.lengths.nbytes + sent.labels.nbytes
    assert payload < len(data) < payload + 256


def test_gradient_prediction_checkpointed_round_trips():
    train = _train()
    shape = train.z.shape
    grad = Gradient(5, -train.z, 0.25, {"correct": 2.0, "count": 3.0})
    back = Gradient.from_frame(decode(encode(grad.to_frame(session=TAG, codec=CODEC, lengths=train.lengths))),
                               codec=CODEC, shape=shape, lengths=train.lengths)
    np.testing.assert_array_equal(back.dz, grad.dz)
    assert (back.step, back.loss, back.metrics) == (5, 0.25, grad.metrics)
    logits = np.arange(9, dtype=np.float32).reshape(3, 3)
    pred = Prediction.from_frame(decode(encode(Prediction(9, logits).to_frame(session=TAG))), batch=3, num_labels=3)
    np.testing.assert_array_equal(pred.logits, logits)
    assert pred.request == 9
    assert Checkpointed.from_frame(decode(encode(Checkpointed(4, True).to_frame(session=TAG)))) == Checkpointed(4, True)
    predict = Predict.from_frame(decode(encode(Predict(3, train.z, train.lengths).to_frame(session=TAG, codec=CODEC))),
                                 limits=LIMITS, codec=CODEC)
    np.testing.assert_array_equal(predict.z, train.z)


def test_hello_and_welcome_carry_hash_config_and_resume_point():
    hello = Hello("device-1", "ab" * 32, CONFIG, token="secret", resume_from=12)
    assert Hello.from_frame(decode(encode(hello.to_frame()))) == hello
    welcome = Welcome("ab" * 32, CONFIG, 12, 64)
    assert Welcome.from_frame(decode(encode(welcome.to_frame(session=TAG)))) == welcome
    shared = Welcome("ab" * 32, CONFIG, 12, 64, fleet="f", shared_edge=True)
    assert Welcome.from_frame(decode(encode(shared.to_frame(session=TAG)))) == shared
    with pytest.raises(ProtocolError, match="shared edge without a fleet"):
        Welcome.from_frame(decode(encode(dataclasses.replace(shared, fleet=None).to_frame(session=TAG))))
    huge = dataclasses.replace(hello, config=dataclasses.replace(CONFIG, seed=2**70))
    with pytest.raises(ProtocolError, match="'seed' is out of the 64-bit range"):
        Hello.from_frame(decode(encode(huge.to_frame())))
    forged = _with_header(encode(hello.to_frame()), session=session_tag("device-2"))
    with pytest.raises(ProtocolError, match="session tag"):
        Hello.from_frame(decode(forged))


def test_edge_gradients_and_their_sum_carry_exactly_the_trainable_edge_weights_finite():
    shapes = {"a.weight": (3, 2), "b.bias": (2,)}
    gradient = EdgeGradient(5, {"a.weight": np.arange(6, dtype=np.float32).reshape(3, 2),
                                "b.bias": np.ones(2, np.float32)})
    for message in (gradient, GradientSum(5, gradient.tensors)):
        back = type(message).from_frame(decode(encode(message.to_frame(session=TAG))), shapes=shapes)
        assert back.step == 5 and all(np.array_equal(back.tensors[n], v) for n, v in gradient.tensors.items())
    with pytest.raises(ProtocolError, match="exactly the trainable edge weights"):
        EdgeGradient.from_frame(decode(encode(EdgeGradient(5, {"a.weight": gradient.tensors["a.weight"]})
                                              .to_frame(session=TAG))), shapes=shapes)
    poisoned = {**gradient.tensors, "b.bias": np.array([1.0, np.inf], np.float32)}
    with pytest.raises(ProtocolError, match="finite|NaN|infinite"):
        EdgeGradient.from_frame(decode(encode(EdgeGradient(5, poisoned).to_frame(session=TAG))), shapes=shapes)
    with pytest.raises(ProtocolError):  # a sum is not a gradient
        EdgeGradient.from_frame(decode(encode(GradientSum(5, gradient.tensors).to_frame(session=TAG))), shapes=shapes)


@pytest.mark.parametrize("error", [ProtocolError("bad z"), BundleMismatch("other bundle"), AuthError("no"),
                                   ServerBusy("full")])
def test_error_frames_become_the_same_typed_exception(error):
    got = Error.from_frame(decode(encode(Error.of(error).to_frame(session=TAG, step=3)))).exception()
    assert type(got) is type(error) and str(got) == str(error)
    assert got.retryable == isinstance(error, ServerBusy)
    with pytest.raises(BundleMismatch):  # a reply that is an error raises it wherever a message is expected
        Welcome.from_frame(decode(encode(Error.of(BundleMismatch("x")).to_frame())))


def test_replayed_flag_survives_the_wire():
    frame = dataclasses.replace(decode(_train_bytes()), flags=REPLAYED)
    assert decode(encode(frame)).flags == REPLAYED


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: b"", "truncated frame"),
        (lambda d: d[:HEADER.size - 1], "truncated frame"),
        (lambda d: d[:-1], "truncated frame"),
        (lambda d: d + b"\0", "unexpected bytes"),
        (lambda d: b"XXXX" + d[4:], "not a splitft frame"),
        (lambda d: _with_header(d, kind=99), "unknown message kind"),
        (lambda d: _with_header(d, flags=0x8000), "unknown flags"),
        (lambda d: _with_header(d, meta_len=len(d)), "metadata length"),
        (lambda d: _with_header(d, meta_len=1 << 20), "metadata length"),
        (lambda d: "text", "text message"),
    ],
)
def test_decode_refuses_malformed_frames(mutate, message):
    with pytest.raises(ProtocolError, match=message):
        decode(mutate(_train_bytes()))


def test_decode_refuses_another_protocol_version():
    with pytest.raises(VersionMismatch, match="protocol version 2, this side speaks 1"):
        decode(_with_header(_train_bytes(), version=2))


def _raw_frame(meta: object, body: bytes = b"") -> bytes:
    raw = json.dumps(meta).encode() if not isinstance(meta, bytes) else meta
    return HEADER.pack(MAGIC, 1, Kind.TRAIN, 0, TAG, 1, len(raw)) + raw + body


@pytest.mark.parametrize(
    "meta,message",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"x": NaN, "tensors": []}', "not valid JSON"),
        (b'{"x": 1e999, "tensors": []}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        ({"shape": [1, 1]}, "tensor table"),
        ({"tensors": [{"name": "z", "dtype": "float64", "shape": [1]}]}, "unknown dtype"),
        ({"tensors": [{"name": "z", "dtype": "float32", "shape": [-1]}]}, "bad shape"),
        ({"tensors": [{"name": "z", "dtype": "float32", "shape": [True]}]}, "bad shape"),
        ({"tensors": [{"name": "z", "dtype": "float32", "shape": [1, 1, 1, 1, 1]}]}, "bad shape"),
        ({"tensors": [{"name": "z", "dtype": "float32", "shape": [2**40]}]}, "bad shape"),
        ({"tensors": [{"name": "z", "dtype": "int32", "shape": []}] * 2}, "repeated tensor name"),
        ({"tensors": [{"name": "z", "dtype": "int32"}]}, "bad tensor table entry"),
    ],
)
def test_decode_refuses_bad_metadata(meta, message):
    with pytest.raises(ProtocolError, match=message):
        decode(_raw_frame(meta, b"\0" * 8))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(z=np.zeros((3, 5, 4), dtype=np.float16)), "'z' must be float32"),
        (dict(z=np.zeros((3, 5, 5), dtype=np.float32)), r"'z' must have shape \(3, 5, 4\)"),
        (dict(z=np.zeros((3, 17, 4), dtype=np.float32)), "length 17 is outside 1..16"),
        (dict(z=np.zeros((9, 5, 4), dtype=np.float32), lengths=np.ones(9, np.int32), labels=np.zeros(9, np.int64)),
         "batch size 9 is outside 1..8"),
        (dict(z=np.full((3, 5, 4), np.nan, dtype=np.float32)), "NaN or infinite"),
        (dict(z=np.full((3, 5, 4), np.inf, dtype=np.float32)), "NaN or infinite"),
        (dict(lengths=np.array([5, 2, 1], dtype=np.int64)), "'lengths' must be int32"),
        (dict(lengths=np.array([5, 0, 1], dtype=np.int32)), r"lengths must be in 1..5"),
        (dict(lengths=np.array([6, 2, 1], dtype=np.int32)), r"lengths must be in 1..5"),
        (dict(lengths=np.array([5, 2], dtype=np.int32)), r"'lengths' must have shape \(3,\)"),
        (dict(labels=np.array([0, 3, 1], dtype=np.int64)), r"class labels must be in 0..2"),
        (dict(labels=np.array([0, -1, 1], dtype=np.int64)), r"class labels must be in 0..2"),
        (dict(labels=np.array([0.0, 1.0, 1.0], dtype=np.float32)), "'labels' must be int64"),
    ],
)
def test_train_refuses_tensors_that_do_not_fit_the_bundle(overrides, message):
    with pytest.raises(ProtocolError, match=message):
        _read_train(_train_bytes(**overrides))


def test_train_refuses_step_zero_extra_tensors_and_other_kinds():
    with pytest.raises(ProtocolError, match="numbered from 1"):
        _read_train(_with_header(_train_bytes(), step=0))
    frame = decode(_train_bytes())
    extra = dataclasses.replace(frame, tensors=frame.tensors | {"secret": np.zeros(2, np.int8)})
    with pytest.raises(ProtocolError, match="unexpected tensors"):
        Train.from_frame(decode(encode(extra)), limits=LIMITS, codec=CODEC)
    with pytest.raises(ProtocolError, match="expected TRAIN, got PREDICT"):
        _read_train(_with_header(_train_bytes(), kind=Kind.PREDICT))


def test_regression_labels_are_finite_float32():
    limits = dataclasses.replace(LIMITS, num_labels=1)
    data = _train_bytes(labels=np.array([0.5, -1.0, 2.0], dtype=np.float32))
    assert Train.from_frame(decode(data), limits=limits, codec=CODEC).labels.dtype == np.float32
    bad = _train_bytes(labels=np.array([0.5, np.nan, 2.0], dtype=np.float32))
    with pytest.raises(ProtocolError, match="regression labels contains NaN"):
        Train.from_frame(decode(bad), limits=limits, codec=CODEC)


def test_max_frame_bytes_bounds_the_largest_legal_frame():
    b, l = LIMITS.max_batch, LIMITS.max_length
    z = np.ones((b, l, LIMITS.width), np.float32)
    big = _train_bytes(z=z, lengths=np.full(b, l, np.int32), labels=np.zeros(b, np.int64))
    assert len(big) <= LIMITS.max_frame_bytes() < len(big) + (1 << 17)


def test_meta_must_be_json_safe_to_send():
    with pytest.raises(ProtocolError, match="not finite JSON"):
        encode(Gradient(1, np.zeros((1, 1, 4), np.float32), float("nan"), {}).to_frame(
            session=TAG, codec=CODEC, lengths=np.ones(1, np.int32)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_are_refused_cleanly(data):
    with pytest.raises(ProtocolError):
        _read_train(data)


def _mutate(data: st.DataObject, frame: bytes) -> bytes:
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    return bytes(mutated[:data.draw(st.integers(0, len(mutated)))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frames_decode_or_are_refused_cleanly(data):
    try:
        train = _read_train(_mutate(data, _train_bytes()))
    except ProtocolError:
        return
    assert np.isfinite(train.z).all() and train.z.shape[2] == LIMITS.width
    assert ((train.lengths >= 1) & (train.lengths <= train.z.shape[1])).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_hellos_decode_or_are_refused_cleanly(data):
    hello = encode(Hello("device-1", "ab" * 32, CONFIG, token="secret", resume_from=3).to_frame())
    try:
        got = Hello.from_frame(decode(_mutate(data, hello)))
    except ProtocolError:
        return
    assert got.config.schedule.lr > 0 and got.session_id.isprintable()


def test_header_layout_is_fixed():
    # magic, version, kind, flags, session, step, meta length: 28 bytes, little-endian
    assert HEADER.size == 28 and HEADER.format == "<4sBBHQQI"
    data = _train_bytes()
    assert data[:4] == MAGIC and data[4] == 1 and data[5] == Kind.TRAIN
    assert struct.unpack_from("<Q", data, 8)[0] == TAG


def test_the_edge_side_of_the_wire_imports_without_torch():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is blocked on the edge')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import edge_runtime.client, splitwire.protocol, splitwire.codecs, splitwire.errors\n"
        "assert not [m for m in sys.modules if m.startswith(('torch', 'transformers'))]\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
