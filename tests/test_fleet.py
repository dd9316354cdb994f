"""Fleets: many edge devices train one shared top part (split federated learning, issue 14).

The in-process reference is ``models.fleet.Fleet``; the cloud's fleets are the real
``sft-cloud`` on localhost with real edges (ORT engines driven by ``EdgeTrainer``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundles import export_cached, reference_edge
from safetensors.torch import load_file

from models import CloudPart, EncoderSpec, SplitSpec
from models.fleet import joint_loss
from splitwire.bundle import load_bundle
from splitwire.fedavg import fedavg


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(export_cached(tmp_path_factory, tiny_model_dir, split=2, rank=4, init="random",
                                     max_length=48, lr=1e-3, engine="ort-training"))


def cloud_part(bundle) -> CloudPart:
    cloud = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split), dropout=False)
    cloud.load_state_dict(load_file(str(bundle.cloud_file("weights"))))
    return cloud


def test_a_joint_step_gives_each_device_its_own_gradient_scaled_by_its_share_of_rows(tiny_bundle):
    """Stacking devices' batches of different lengths (right-padded to the longest) is exact."""
    cloud = cloud_part(tiny_bundle)
    rng = torch.Generator().manual_seed(0)
    shapes = [(3, 7), (2, 12), (4, 5)]
    zs = [torch.randn(b, length, tiny_bundle.wire_width, generator=rng, requires_grad=True) for b, length in shapes]
    masks = [(torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1), generator=rng)).long()
             for b, length in shapes]
    labels = [torch.randint(0, 2, (b,), generator=rng) for b, _ in shapes]
    joint = joint_loss(cloud, zs, masks, labels)
    joint.loss.backward()
    rows = sum(b for b, _ in shapes)
    for z, mask, label, (b, _), device_loss in zip(zs, masks, labels, shapes, joint.device_losses):
        alone = z.detach().clone().requires_grad_(True)
        loss = cloud.loss(cloud(alone, mask), label)
        loss.backward()
        assert device_loss == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(z.grad, alone.grad * b / rows, rtol=1e-4, atol=1e-7)
        assert (z.grad[mask == 0] == 0).all()  # exactly 0 at padding, as the edge needs


def test_fedavg_is_the_example_weighted_mean():
    rng = np.random.default_rng(1)
    weights = [{"a": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
               for _ in range(3)]
    examples = [10, 30, 60]
    averaged = fedavg(weights, examples)
    for name in ("a", "b"):
        want = np.average(np.stack([w[name] for w in weights]), axis=0, weights=examples)
        np.testing.assert_allclose(averaged[name], want, rtol=1e-6)
        assert averaged[name].dtype == np.float32
    with pytest.raises(ValueError):
        fedavg(weights, [1, 0, 2])
