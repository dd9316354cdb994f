"""Labels never leave the device (issue 15): the U-shaped split of ``sft-export --label-private``.

The device's head (``edge_runtime.label_head``, numpy) computes torch's loss and gradients; each
side refuses a frame of the other mode, the pooled output and its gradient are checked like every
tensor, and the cloud's step rules (``splitwire.steps``, without sockets) hold a step between its two
round trips and apply it once; every
frame of a real label-private run, recorded by a websocket proxy between a real edge and a real
``sft-cloud`` and decoded with ``splitwire.protocol``, carries no label, loss, logit or metric, and
the cloud's log and state dir hold none either (the same check on a standard run finds them, so it
is not vacuous); a connection cut between the two round trips of a step, at either point, and a
``kill -9`` of the cloud while it holds a step lose no training; and the fault tests of ``test_faults`` run here again on the label-private bundle
(imported below: they use this module's ``bundle``), so random cuts, a ``kill -9`` of the cloud and
of the edge end bit-equal to an unbroken run. Over the wire equals in process for this bundle on
both engines: ``test_end_to_end``.
"""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import torch
from cloud_harness import CloudProcess, EdgeSession, RecordingProxy, tiny_dropout_bundle, train_edge
from safetensors import safe_open
from test_faults import (  # noqa: F401 (collected here again, with this module's label-private bundle)
    assert_same, cloud_process, cloud_weights, reviews, test_connections_cut_at_random_points_lose_no_training,
    test_kill_9_of_the_cloud_mid_training_loses_no_training,
    test_kill_9_of_the_edge_resumes_from_its_checkpoint_exactly,
)

from cloud_backend.server import serve_cloud
from cloud_backend.session import CloudSession
from edge_runtime.api import EdgeTrainer
from edge_runtime.label_head import PREFIX, LabelHead as DeviceHead
from models import EncoderSpec, LabelHead, SplitSpec
from splitwire.bundle import load_bundle
from splitwire.codecs import Carries, codec_for
from splitwire.errors import BundleError, NonFinite, ProtocolError, StepOrderError
from splitwire.manifest import Manifest
from splitwire.protocol import (
    REPLAYED, Frame, Gradient, Kind, Prediction, SessionConfig, Top, TopGradient, Train, WireLimits, decode, encode,
)
from splitwire.schedule import Schedule
from splitwire.steps import CloudSteps

HIDDEN = 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    """The fault tests' tiny BERT (dropout 0.1, split 2, rank 4, ort-training), label-private."""
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir, label_private=True))


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classes", "regression"])
@pytest.mark.parametrize("pooling", ["cls-pooler", "cls-gelu", "cls-relu", "mean"])
def test_the_device_head_computes_torchs_loss_logits_and_gradients(pooling, num_labels):
    encoder = EncoderSpec(vocab_size=50, hidden_size=HIDDEN, num_layers=2, num_heads=2, intermediate_size=32,
                          max_positions=20, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
                          pad_token_id=0, hidden_dropout=0.1, attention_dropout=0.1, pooling=pooling)
    torch.manual_seed(0)
    head = LabelHead(encoder, SplitSpec(2, 4, num_labels, label_private=True))
    device = DeviceHead({n: p.detach().numpy().copy() for n, p in head.state_dict().items()}, pooling=pooling,
                        num_labels=num_labels, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    pooled = torch.randn(6, HIDDEN, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2, 0, 1]) if num_labels > 1 else torch.randn(6)
    logits = head(pooled)
    loss = head.loss(logits, labels)
    loss.backward()

    step = device.backward(pooled.detach().numpy(), labels.numpy())
    assert step.loss == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(device.logits(pooled.detach().numpy()), logits.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.dpooled, pooled.grad.numpy(), rtol=1e-4, atol=1e-7)
    gradients = device.gradients()
    assert set(gradients) == {PREFIX + n for n, _ in head.named_parameters()}
    for name, p in head.named_parameters():
        np.testing.assert_allclose(gradients[PREFIX + name], p.grad.numpy(), rtol=1e-4, atol=1e-7, err_msg=name)
    counted = "squared_error" if num_labels == 1 else "correct"
    assert step.metrics["count"] == 6 and counted in step.metrics


# ---------------------------------------------------------------------------- the protocol and the step rules

LIMITS = WireLimits(max_batch=8, max_length=16, width=4, num_labels=2, pooled=HIDDEN)
CODEC = codec_for("int8+sr+packed", Carries.GRADIENT, seed=1)


def _train(labels) -> Train:
    rng = np.random.default_rng(0)
    return Train(1, rng.standard_normal((3, 5, 4)).astype(np.float32), np.array([5, 3, 1], np.int32), labels)


def test_each_side_refuses_a_frame_of_the_other_mode():
    fp32 = codec_for("fp32", Carries.ACTIVATION)
    standard = WireLimits(8, 16, 4, 2)
    private_train = decode(encode(_train(None).to_frame(session=1, codec=fp32)))
    assert Train.from_frame(private_train, limits=LIMITS, codec=fp32).labels is None
    with pytest.raises(ProtocolError, match="lacks tensor 'labels'"):
        Train.from_frame(private_train, limits=standard, codec=fp32)
    with pytest.raises(ProtocolError, match="unexpected tensors"):  # labels never reach a label-private cloud
        Train.from_frame(decode(encode(_train(np.array([0, 1, 1])).to_frame(session=1, codec=fp32))),
                         limits=LIMITS, codec=fp32)
    dz = _train(None).z
    with_loss = decode(encode(Gradient(1, dz, 0.7, {"correct": 2.0}).to_frame(session=1, codec=fp32,
                                                                             lengths=np.array([5, 3, 1]))))
    with pytest.raises(ProtocolError, match="dz alone"):
        Gradient.from_frame(with_loss, codec=fp32, shape=dz.shape, lengths=np.array([5, 3, 1]), label_private=True)
    pooled = np.random.default_rng(1).standard_normal((3, HIDDEN)).astype(np.float32)
    prediction = decode(encode(Prediction(1, pooled).to_frame(session=1, pooled=True)))
    np.testing.assert_array_equal(Prediction.from_frame(prediction, batch=3, num_labels=2, pooled=HIDDEN).logits,
                                  pooled)
    with pytest.raises(ProtocolError, match="lacks tensor 'logits'"):  # a standard edge gets no pooled output
        Prediction.from_frame(prediction, batch=3, num_labels=2)


def test_the_pooled_output_and_its_gradient_are_checked_like_every_tensor():
    pooled = np.random.default_rng(2).standard_normal((3, HIDDEN)).astype(np.float32)
    frame = decode(encode(TopGradient(4, pooled).to_frame(session=1, codec=CODEC)))
    back = TopGradient.from_frame(frame, codec=CODEC, batch=3, width=HIDDEN).values
    assert back.shape == (3, HIDDEN) and np.abs(back - pooled).max() <= np.abs(pooled).max() / 127
    for wrong, message in ((dict(batch=4), "batch of 4"), (dict(width=HIDDEN + 1), "must have shape")):
        with pytest.raises(ProtocolError, match=message):
            TopGradient.from_frame(frame, codec=CODEC, **({"batch": 3, "width": HIDDEN} | wrong))
    with pytest.raises(ProtocolError, match="expected TOP"):
        Top.from_frame(frame, codec=CODEC, batch=3, width=HIDDEN)
    bad = pooled.copy()
    bad[1, 2] = np.nan
    fp32 = codec_for("fp32", Carries.ACTIVATION)
    with pytest.raises(ProtocolError, match="NaN"):
        Top.from_frame(decode(encode(Top(4, bad).to_frame(session=1, codec=fp32))), codec=fp32, batch=3, width=HIDDEN)
    extra = decode(encode(Frame(Kind.TOP, 1, 4, {"batch": 3, "loss": 0.5}, {"pooled": pooled})))
    with pytest.raises(ProtocolError, match="carry nothing else"):
        Top.from_frame(extra, codec=fp32, batch=3, width=HIDDEN)


def test_the_cloud_holds_a_step_between_its_round_trips_and_applies_it_once():
    steps = CloudSteps("s", step=4)
    assert steps.cached_top(5, "a") is None  # step 5 begins
    steps.began(5, "a", b"top-5")
    assert steps.cached_top(5, "a") == b"top-5"  # a resent TRAIN: the TOP already sent
    assert steps.cached_top(5, "b") is None  # another request for step 5: computed afresh
    assert steps.cached_gradient(5) is None  # the pending step is applied by its gradient
    for wrong in (4, 6):
        with pytest.raises(StepOrderError):
            steps.cached_gradient(wrong)
    with pytest.raises(StepOrderError):
        steps.cached_top(7, "a")
    pending = steps.take_pending(5)
    steps.applied(5, pending.digest, b"gradient-5", pending.top)
    assert steps.pending is None and (steps.step, steps.replay.digest, steps.replay.top) == (5, "a", b"top-5")
    assert steps.cached_top(5, "a") == b"top-5" and steps.cached_gradient(5).reply == b"gradient-5"
    assert steps.meets(4) and steps.meets(5) and not steps.meets(3)
    with pytest.raises(StepOrderError, match="no forward of step 6"):
        steps.cached_gradient(6)


def test_a_cloud_killed_between_the_two_round_trips_of_a_step_loses_no_training(bundle, reviews, tmp_path):
    """``kill -9`` of ``sft-cloud`` right after it sent the TOP of step 8 (it held step 8; its last checkpoint is
    step 6): it restarts from its state dir without the held step, the edge's reconnect finds it at step 6, goes
    back to its own checkpoint 6 and trains on, ending bit-equal to an unbroken run on both halves."""
    cloud = CloudProcess(bundle.root, tmp_path / "state", log_path=tmp_path / "cloud.log").start()
    killed = []

    def kill_after_the_top_of_step_8(direction: str, data: bytes) -> bool:
        frame = decode(data)
        if direction == "down" and (frame.kind, frame.step) == (Kind.TOP, 8) and not killed:
            cloud.kill9()
            killed.append(frame.step)
            cloud.start(wait=False)  # same port; the edge's reconnects find it once it listens
            return True
        return False

    async def between_halves():
        async with RecordingProxy(cloud.url, drop=kill_after_the_top_of_step_8) as proxy:
            return await train_edge(EdgeSession(bundle, "between", reviews, seed=9, steps=10), proxy.url,
                                    tmp_path / "between")

    try:
        crashed = asyncio.run(between_halves())
        cloud.wait_listening()
        whole = asyncio.run(train_edge(EdgeSession(bundle, "whole", reviews, seed=9, steps=10), cloud.url,
                                       tmp_path / "whole"))
    finally:
        cloud.stop()
    assert killed == [8] and crashed.reconnects >= 1 and "restored" in cloud.events()
    assert crashed.result.steps == list(range(1, 11)) and crashed.result.losses == whole.result.losses
    assert_same(crashed.parameters, whole.parameters)
    assert_same(cloud.saved_weights("between"), cloud.saved_weights("whole"))


def test_a_refused_gradient_ends_the_held_step_which_is_begun_again_exactly(bundle):
    """A TOP_GRADIENT whose step would not be finite is refused and changes nothing; the held step is gone (its
    graph was used), so its gradient alone is refused next, and the step begun again from its TRAIN ends
    exactly where a session that never saw the bad gradient does."""
    config = SessionConfig(Schedule(lr=1e-3), 0, "fp32")
    refused, clean = (CloudSession(session_id="s", bundle=bundle, config=config, device=torch.device("cpu"))
                      for _ in range(2))
    rng = np.random.default_rng(0)
    lengths = np.array([5, 3], np.int32)
    z = rng.standard_normal((2, 5, bundle.wire_width)).astype(np.float32)
    request = Train(1, z * (np.arange(5) < lengths[:, None])[..., None], lengths, None)
    good = TopGradient(1, rng.standard_normal((2, bundle.pooled_width)).astype(np.float32))
    for session in (refused, clean):
        session.begin(request, digest="a", answer=lambda pooled: b"top")
    with pytest.raises(NonFinite):
        refused.finish(TopGradient(1, np.full((2, bundle.pooled_width), 1e30, np.float32)), answer=lambda r: b"g")
    assert refused.step == 0 and refused.held is None and refused.steps.pending is None
    with pytest.raises(StepOrderError):
        refused.finish(good, answer=lambda r: b"g")
    refused.begin(request, digest="a", answer=lambda pooled: b"top")
    for session in (refused, clean):
        session.finish(good, answer=lambda r: b"g")
    assert refused.step == clean.step == 1
    assert_same(*({k: v.detach().numpy() for k, v in s.model.state_dict().items()} for s in (refused, clean)))


# ---------------------------------------------------------------------------- what crosses the wire

# Every frame kind of a label-private run, and all it may carry (fp32 codec: no codec parts).
PRIVATE_FRAMES = {  # kind: (meta keys, tensor names)
    Kind.HELLO: ({"session_id", "bundle_hash", "token", "resume_from", "schedule", "seed", "codec", "fleet"}, set()),
    Kind.WELCOME: ({"bundle_hash", "resume_step", "max_batch", "schedule", "seed", "codec", "fleet", "shared_edge"}, set()),
    Kind.TRAIN: ({"shape"}, {"z", "lengths"}),
    Kind.TOP: ({"batch"}, {"pooled"}),
    Kind.TOP_GRADIENT: ({"batch"}, {"dpooled"}),
    Kind.GRADIENT: (set(), {"dz"}),
    Kind.PREDICT: ({"shape"}, {"z", "lengths"}),
    Kind.PREDICTION: (set(), {"pooled"}),
    Kind.CHECKPOINT: (set(), set()),
    Kind.CHECKPOINTED: ({"persisted"}, set()),
    Kind.BYE: (set(), set()),
}
TRAINING, TEST = range(0, 32), range(32, 48)


def _recorded_run(bundle, data, tmp_path):
    """Train 6 steps, evaluate and predict through a recording proxy in front of a real ``sft-cloud``;
    returns the frames, the losses and metrics the edge computed, its logits, and the cloud's log and state dir."""
    tmp_path.mkdir()
    state = tmp_path / "state"
    cloud = CloudProcess(bundle.root, state, log_path=tmp_path / "cloud.log").start()

    async def scenario():
        async with RecordingProxy(cloud.url) as proxy:
            async with EdgeTrainer(bundle, cloud=proxy.url, session="private", checkpoint_dir=tmp_path / "edge",
                                   threads=1) as trainer:
                result = await trainer.fit(data.subset(TRAINING), batch_size=8, epochs=2, max_steps=6, lr=1e-3,
                                           checkpoint_every=3, seed=1)
                metrics = await trainer.evaluate(data.subset(TEST), batch_size=8)
                logits = await trainer.predict(data.subset(TEST), batch_size=8)
                pooled_to_logits = trainer.engine.label_head
                return proxy.frames, result, metrics, logits, pooled_to_logits

    try:
        frames, result, metrics, logits, head = asyncio.run(scenario())
    finally:
        cloud.stop()  # SIGTERM: it saves the session into the state dir
    return frames, result, metrics, logits, head, (tmp_path / "cloud.log").read_text(), state


def _cloud_leftovers(log: str, state) -> tuple[list[dict], dict[str, list[str]], list[bytes]]:
    """The cloud's JSON log events, its state files' tensor names, and the reply frames its checkpoints keep."""
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    names, replies = {}, []
    for path in sorted(state.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            names[path.name] = list(f.keys())
            replies += [f.get_tensor(k).tobytes() for k in f.keys() if k.startswith("replay.")]
            events.append(json.loads(f.metadata()["splitft"]))
    return events, names, replies


def _keys(value) -> set[str]:
    """Every key of every object nested in ``value``."""
    if isinstance(value, dict):
        return set(value) | set().union(*(_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value)) if value else set()
    return set()


def test_no_label_loss_logit_or_metric_crosses_the_wire_or_rests_on_the_cloud(bundle, reviews, tmp_path,
                                                                             tmp_path_factory, tiny_model_dir):
    frames, result, metrics, logits, head, log, state = _recorded_run(bundle, reviews, tmp_path / "private")

    decoded = [(direction, decode(data), data) for direction, data in frames]
    kinds = [frame.kind for _, frame, _ in decoded]
    for kind in (Kind.TRAIN, Kind.TOP, Kind.TOP_GRADIENT, Kind.GRADIENT):
        assert kinds.count(kind) == 6, kind
    assert kinds.count(Kind.PREDICT) == kinds.count(Kind.PREDICTION) == 4  # evaluate and predict: 2 batches each
    for direction, frame, data in decoded:
        meta_keys, tensors = PRIVATE_FRAMES[frame.kind]
        assert set(frame.meta) <= meta_keys and set(frame.tensors) == tensors, (direction, frame.kind)
        assert all(a.dtype == np.float32 for n, a in frame.tensors.items() if n != "lengths")
        for loss in result.losses:  # the device's losses, in any encoding the wire could use
            assert repr(loss).encode() not in data and struct.pack("<d", loss) not in data
    predictions = [frame.tensors["pooled"] for _, frame, _ in decoded if frame.kind == Kind.PREDICTION]
    assert all(p.shape[1] == bundle.pooled_width != bundle.num_labels for p in predictions)
    # The logits are the device's head on what came down, and the metrics its own.
    np.testing.assert_array_equal(np.concatenate([head.logits(np.array(p)) for p in predictions[2:]]), logits)
    assert 0.0 <= metrics["accuracy"] <= 1.0

    events, names, replies = _cloud_leftovers(log, state)
    assert any(e.get("event") == "train" for e in events) and names
    assert not _keys(events) & {"loss", "metrics", "correct", "squared_error", "labels", "logits"}
    assert all(not any(word in n for word in ("label", "logit", "classifier")) for n in sum(names.values(), []))
    assert {decode(r).kind for r in replies} == {Kind.TOP, Kind.GRADIENT}
    assert all(not decode(r).meta for r in replies if decode(r).kind == Kind.GRADIENT)

    # The control: the same checks on a standard bundle's run find the labels and the loss.
    standard = load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))
    frames, _, _, _, _, log, state = _recorded_run(standard, reviews, tmp_path / "standard")
    standard_frames = [decode(data) for _, data in frames]
    assert any("labels" in f.tensors for f in standard_frames if f.kind == Kind.TRAIN)
    assert any("logits" in f.tensors for f in standard_frames if f.kind == Kind.PREDICTION)
    assert all({"loss", "metrics"} <= set(f.meta) for f in standard_frames if f.kind == Kind.GRADIENT)
    events, names, _ = _cloud_leftovers(log, state)
    assert any("classifier" in n for n in sum(names.values(), []))


def test_a_cut_between_the_two_round_trips_of_a_step_loses_no_training(bundle, reviews, tmp_path):
    """The connection drops twice inside a step: once with the TOP of step 3 on its way down (the cloud
    holds step 3 pending), once with the GRADIENT of step 4 on its way down (the cloud has applied step 4).
    Each time the edge resends the whole step; the cloud answers it from what it holds, applies nothing
    twice, and the run ends bit-equal to an unbroken one on both halves."""
    run = EdgeSession(bundle, "halves", reviews, seed=5, steps=6)

    targets = {(Kind.TOP, 3), (Kind.GRADIENT, 4)}

    def drop(direction: str, data: bytes) -> bool:  # each target once, on its way down
        frame = decode(data)
        if direction == "down" and (frame.kind, frame.step) in targets:
            targets.discard((frame.kind, frame.step))
            return True
        return False

    async def scenario():
        async with serve_cloud(bundle, port=0, device="cpu") as server:
            whole = await train_edge(run, server.url, tmp_path / "whole")
            want_cloud = cloud_weights(server, "halves")
            del server.sessions["halves"]
            async with RecordingProxy(server.url, drop=drop) as proxy:
                cut = await train_edge(run, proxy.url, tmp_path / "cut")
            return whole, want_cloud, cut, cloud_weights(server, "halves"), proxy, server.stats

    whole, want_cloud, cut, got_cloud, proxy, stats = asyncio.run(scenario())
    assert proxy.dropped == 2 and cut.reconnects == 2
    assert stats.steps == 2 * 6  # both runs: every step applied once, none twice
    replayed = [(f.kind, f.step) for f in map(decode, (d for _, d in proxy.frames)) if f.flags & REPLAYED]
    assert replayed == [(Kind.TOP, 3), (Kind.TOP, 4), (Kind.GRADIENT, 4)]
    assert cut.result.losses == whole.result.losses
    assert_same(cut.parameters, whole.parameters)
    assert_same(got_cloud, want_cloud)


def test_the_gradient_the_cloud_receives_still_gives_the_labels_away_up_to_their_names():
    """What the U-shaped split does not hide (docs/SECURITY.md; Li et al., arXiv 2102.08504): with two
    classes and mean pooling, ``dL/dpooled`` of row ``i`` is ``(p1_i − y_i) · Wᵀ(e1 − e0) / B``, so every
    row's gradient lies on one line and its sign is its label, up to which class is which."""
    rng = np.random.default_rng(0)
    weights = {"classifier.weight": rng.normal(0, 0.02, (2, HIDDEN)).astype(np.float32),
               "classifier.bias": np.zeros(2, np.float32)}
    head = DeviceHead(weights, pooling="mean", num_labels=2, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.01)
    labels = rng.integers(0, 2, 64)
    dpooled = head.backward(rng.standard_normal((64, HIDDEN)).astype(np.float32), labels).dpooled
    cosine = dpooled @ dpooled[0] / (np.linalg.norm(dpooled, axis=1) * np.linalg.norm(dpooled[0]))
    np.testing.assert_allclose(np.abs(cosine), 1.0, atol=1e-5)  # one line
    guessed = (cosine > 0).astype(int)  # the cloud's guess: the rows on row 0's side of it share its label
    assert np.array_equal(guessed, labels == labels[0])


def test_the_manifest_records_the_mode_typed_and_checked(bundle):
    raw = json.loads((bundle.root / "manifest.json").read_text())
    assert bundle.manifest.label_private and raw["split"]["label_private"] is True
    assert raw["edge"]["files"]["label_head"] in raw["files"]  # hashed like every file
    for change, message in ((lambda m: m["split"].update(label_private="yes"), "must be true or false"),
                            (lambda m: m["edge"]["files"].pop("label_head"), "needs the edge file 'label_head'")):
        broken = json.loads(json.dumps(raw))
        change(broken)
        with pytest.raises(BundleError, match=message):
            Manifest.parse(broken, "manifest.json")
