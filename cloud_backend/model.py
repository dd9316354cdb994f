"""Rebuild the bundle's cloud half (``CloudPart``) from its manifest and safetensors weights.

Why it exists: the server never sees the Hugging Face model; everything it needs to
recreate the top part exactly as the exporter cut it is in the bundle (architecture and
split as plain data, weights as safetensors, whether cloud dropout is on).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from models import CloudPart, EncoderSpec, SplitSpec
from splitwire.bundle import Bundle, BundleError
from splitwire.manifest import WEIGHTS


def load_cloud_part(bundle: Bundle, *, device: torch.device) -> CloudPart:
    """A fresh ``CloudPart`` with the bundle's initial weights, in training mode, on ``device``."""
    try:
        model = CloudPart(EncoderSpec.from_dict(bundle.encoder), SplitSpec.from_dict(bundle.split),
                          dropout=bundle.manifest.cloud.dropout)
        model.load_state_dict(load_file(bundle.cloud_file(WEIGHTS)))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"bundle {bundle.root} has no usable cloud half: {str(exc)[:500]}") from None
    return model.to(device).train()


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when one is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)
