"""Load a BERT-family encoder from a hub id or a local directory (or build it at random).

Why it exists: ``sft-export`` and the in-process baselines both start from "a model id";
this is the one place that talks to ``transformers`` to turn that into an
``EncoderSpec`` plus canonical weights. ``init="random"`` builds the architecture from its
config (a hub id, a local directory, or a built-in preset) so bert-base-sized
measurements work without downloading weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.adapters import adapter_for
from models.spec import EncoderSpec

# Configs of common checkpoints, for ``init="random"`` when no hub is reachable.
PRESETS: dict[str, dict] = {
    "bert-base-uncased": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


@dataclass
class LoadedEncoder:
    spec: EncoderSpec
    weights: dict[str, torch.Tensor] = field(repr=False)
    source: dict[str, str | None]  # id, revision, init, weights_sha256
    initializer_range: float = 0.02


def _config(model: str, revision: str | None, init: str):
    from transformers import AutoConfig, BertConfig

    if init == "random" and model in PRESETS and not Path(model).is_dir():
        try:
            return AutoConfig.from_pretrained(model, revision=revision)
        except OSError:  # offline: the preset is the published config of that checkpoint
            return BertConfig(**PRESETS[model])
    return AutoConfig.from_pretrained(model, revision=revision)


def load_encoder(model: str, *, init: str = "pretrained", revision: str | None = None, seed: int = 0) -> LoadedEncoder:
    """``model`` is a hub id or a local directory; ``init`` is ``pretrained`` or ``random``."""
    from transformers import AutoModel

    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    config = _config(model, revision, init)
    adapter = adapter_for(config.model_type)
    spec = adapter.spec_from_config(config)
    if init == "pretrained":
        hf = AutoModel.from_pretrained(model, revision=revision, attn_implementation="eager")
        revision = revision or getattr(config, "_commit_hash", None)
    else:
        torch.manual_seed(seed)
        hf = AutoModel.from_config(config, attn_implementation="eager")
    weights = adapter.canonical_weights(hf.state_dict())
    source = {"id": model, "revision": revision, "init": init, "weights_sha256": weights_digest(weights)}
    return LoadedEncoder(spec, weights, source, float(getattr(config, "initializer_range", 0.02)))


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and float32 bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
