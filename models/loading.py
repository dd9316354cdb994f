"""Load a BERT-family encoder from a hub id or a local directory (or build it at random).

Why it exists: ``sft-export`` and the in-process baselines both start from "a model id";
this is the one place that talks to ``transformers`` to turn that into an
``EncoderSpec`` plus canonical weights. ``init="random"`` builds the architecture from its
config (a hub id, a local directory, or a built-in preset) so bert-base-sized
measurements work without downloading weights. A fine-tuned sequence-classification
checkpoint keeps its head (the classifier and the dense layer before it). The pooling
follows the checkpoint: a sentence-transformers checkpoint whose ``1_Pooling/config.json``
asks for mean pooling gets it; otherwise the family's own classification head
(``models.adapters``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


POOLING_CHOICES = ("auto", "cls", "mean")


def load_encoder(model: str, *, init: str = "pretrained", revision: str | None = None, seed: int = 0,
                 pooling: str = "auto") -> LoadedEncoder:
    """``model`` is a hub id or a local directory; ``init`` is ``pretrained`` or ``random``.

    ``pooling``: ``auto`` (what the checkpoint says, see the module docstring), ``cls`` (the
    family's classification head on the first token) or ``mean`` (over the real tokens).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    if pooling not in POOLING_CHOICES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_CHOICES)}, got {pooling!r}")
    try:
        config = _config(model, revision, init)
    except OSError as exc:
        raise OSError(unreachable_message(model) or str(exc)) from None
    adapter = adapter_for(config.model_type)
    spec = adapter.spec_from_config(config)
    if pooling == "mean" or pooling == "auto" and sentence_transformers_pooling(model, revision) == "mean":
        spec = dataclasses.replace(spec, pooling="mean")
    if init == "pretrained":
        auto = AutoModelForSequenceClassification if _is_sequence_classifier(config) else AutoModel
        hf = auto.from_pretrained(model, revision=revision, attn_implementation="eager")
        revision = revision or getattr(config, "_commit_hash", None)
    else:
        torch.manual_seed(seed)
        hf = AutoModel.from_config(config, attn_implementation="eager")
    weights = adapter.canonical_weights(hf.state_dict())
    source = {"id": model, "revision": revision, "init": init, "weights_sha256": weights_digest(weights)}
    return LoadedEncoder(spec, weights, source, float(getattr(config, "initializer_range", 0.02)))


def _is_sequence_classifier(config) -> bool:
    """A fine-tuned ``…ForSequenceClassification`` checkpoint: its head comes along (``models.split.build_split``)."""
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or [])


def sentence_transformers_pooling(model: str, revision: str | None = None) -> str | None:
    """``mean``, ``cls``, ``max``… as the checkpoint's sentence-transformers Pooling module says; None if it has none."""
    from transformers.utils import cached_file

    def read(name: str):
        try:
            path = cached_file(model, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:  # no hub, no cache: a plain checkpoint as far as we can tell
            return None
        return json.loads(Path(path).read_text()) if path else None

    modules = read("modules.json") or []
    pooling = next((m for m in modules if m.get("type", "").endswith("models.Pooling")), None)
    settings = pooling and read(f"{pooling['path']}/config.json")
    if not settings:
        return None
    modes = [k[len("pooling_mode_"):] for k, on in settings.items() if k.startswith("pooling_mode_") and on is True]
    return {"mean_tokens": "mean", "cls_token": "cls"}.get(modes[0], modes[0]) if len(modes) == 1 else "+".join(modes)


def unreachable_message(model: str) -> str | None:
    """A clear reason when ``model`` is a hub id that offline mode keeps us from fetching; None otherwise."""
    from huggingface_hub import constants

    if Path(model).exists() or not constants.HF_HUB_OFFLINE:
        return None
    return (f"{model!r} is not a local directory and is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            "and HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE on a machine that reaches the hub, "
            "or pass a local checkpoint directory")


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and float32 bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
