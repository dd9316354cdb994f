"""The split model: ``EdgePart`` (bottom) and ``CloudPart`` (top), and their composition.

Why it exists: this is the paper's model in plain PyTorch. The same modules are traced
into the edge's ONNX graphs, run by the cloud server, and used as the in-process
reference that the distributed system is tested against. ``SplitModel`` composes both
halves so an existing training loop needs only a few changed lines (docs/USAGE.md).
"""

from __future__ import annotations

from typing import Iterable

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import AttentionBlock, Embeddings, EncoderLayer, FeedForward, Pooler, attention_bias, dropout
from models.compression import CompressionHead, SplitFeedForward, factorise_into
from models.heads import calibrate_head, split_inputs
from models.spec import EncoderSpec, SplitSpec


class EdgePart(nn.Module):
    """Embeddings, encoder layers ``0..k-2``, the attention block of layer ``k-1`` and the
    compression head. Output ``z``: ``B×L×r`` (``B×L×hidden`` for the vanilla split)."""

    def __init__(self, encoder: EncoderSpec, split: SplitSpec, *, dropout: bool = False) -> None:
        super().__init__()
        split.validate(encoder)
        self.embeddings = Embeddings(encoder, dropout=dropout)
        self.layers = nn.ModuleList(EncoderLayer(encoder, dropout=dropout) for _ in range(split.split - 1))
        self.split_attention = AttentionBlock(encoder, dropout=dropout)
        self.head = (CompressionHead(encoder.hidden_size, split.rank, shift=split.rebuilds_residual)
                     if split.compressed else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        h = self.split_input(input_ids, attention_mask, token_type_ids, position_ids)
        return h if self.head is None else self.head(h)

    def split_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
        """``h``: the split layer's attention output, the FFN input the compression head reads."""
        bias = attention_bias(attention_mask, self.embeddings.norm.weight.dtype)
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        for layer in self.layers:
            x = layer(x, bias)
        return self.split_attention(x, bias)


class CloudPart(nn.Module):
    """The split layer's FFN (fed by ``z``, residual link eliminated), encoder layers
    ``k..N-1``, pooler and the classification/regression head. In the label-private (U-shaped)
    split it ends at the pooled top output: the pooling layer and the head are the device's ``LabelHead``."""

    def __init__(self, encoder: EncoderSpec, split: SplitSpec, *, dropout: bool = True) -> None:
        super().__init__()
        split.validate(encoder)
        self.spec = split
        self.split_ffn: nn.Module = (
            SplitFeedForward(encoder, split.rank, dropout=dropout, rebuild=split.rebuilds_residual)
            if split.compressed
            else FeedForward(encoder, dropout=dropout)
        )
        self.layers = nn.ModuleList(
            EncoderLayer(encoder, dropout=dropout) for _ in range(encoder.num_layers - split.split)
        )
        self.pooler = Pooler(encoder, dropout=dropout, select_only=split.label_private)
        self.classifier = None if split.label_private else nn.Linear(encoder.hidden_size, split.num_labels)
        self.p_drop = encoder.classifier_dropout if dropout else 0.0

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; label-private, the pooled top output ``B×hidden`` the device's ``LabelHead`` reads.
        ``residual`` (the split layer's ``h``, in-process checks only) restores the eliminated link."""
        pooled = self.pooled(z, attention_mask, residual)
        if self.classifier is None:
            return pooled
        return self.classifier(dropout(pooled, self.p_drop, self.training))

    def pooled(self, z: torch.Tensor, attention_mask: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The sentence vector the classifier reads (``models.blocks.Pooler``)."""
        x = self.split_ffn(z) if residual is None else self.split_ffn(z, residual=residual)
        return self.above_split(x, attention_mask)

    def above_split(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layers ``k..N-1`` and the pooler on the split layer's output ``x``."""
        bias = attention_bias(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return self.pooler(x, attention_mask)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.spec.num_labels)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression (``num_labels`` 1)."""
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.long())


class LabelHead(nn.Module):
    """The top of the U-shaped split, on the device (``sft-export --label-private``): the family's
    pooling layer (``models.blocks.Pooler``'s dense and activation; none for mean pooling) on the
    cloud's pooled top output, the classifier and the loss. The labels, the logits and the loss stay
    where the data is. No dropout: the device runs its graphs without randomness."""

    def __init__(self, encoder: EncoderSpec, split: SplitSpec) -> None:
        super().__init__()
        mode, hidden = encoder.pooling, encoder.hidden_size
        self.dense = None if mode == "mean" else nn.Linear(hidden, hidden)
        self.act = None if mode == "mean" else Pooler.ACTIVATIONS[mode]()
        self.classifier = nn.Linear(hidden, split.num_labels)
        self.num_labels = split.num_labels

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits from the pooled top output ``B×hidden``."""
        return self.classifier(pooled if self.dense is None else self.act(self.dense(pooled)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, labels, self.num_labels)


class SplitModel(nn.Module):
    """Both halves in one process: a drop-in module for an ordinary PyTorch loop. With a ``head`` (the
    label-private split) the cloud part gives the pooled top output and the head the logits."""

    def __init__(self, edge: EdgePart, cloud: CloudPart, head: LabelHead | None = None) -> None:
        super().__init__()
        self.edge = edge
        self.cloud = cloud
        self.head = head
        self.fine_tuned_head = False  # whether build_split took the classifier from a fine-tuned checkpoint

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        position_ids = default_position_ids(input_ids) if position_ids is None else position_ids
        z = self.edge(input_ids, attention_mask, token_type_ids, position_ids)
        top = self.cloud(z, attention_mask)
        return top if self.head is None else self.head(top)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (self.cloud if self.head is None else self.head).loss(logits, labels)


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, l = input_ids.shape
    return torch.arange(l, device=input_ids.device).expand(b, l)


# Parameters that do not come from the pretrained encoder: set by ``build_split`` itself.
_DERIVED = ("classifier.", "head.", "split_ffn.decompression.", "split_ffn.rebuild.")
_NEW_HEAD = ("pooler.",)  # a pooling head that is not BERT's pretrained pooler starts new, like the classifier


def _load(module: nn.Module, state: dict[str, torch.Tensor], prefix_map: dict[str, str],
          derived: tuple[str, ...] = _DERIVED) -> None:
    """Load ``module`` from canonical encoder weights renamed by ``prefix_map`` (ours → canonical)."""
    target = module.state_dict()
    for name in target:
        if name.startswith(derived):
            continue
        source = next((c + name[len(o):] for o, c in prefix_map.items() if name.startswith(o)), None)
        if source not in state:
            raise KeyError(f"pretrained weights lack {source or name!r} needed for {name!r}")
        target[name] = state[source]
    module.load_state_dict(target)


def build_split(
    encoder: EncoderSpec,
    weights: dict[str, torch.Tensor],
    split: SplitSpec,
    *,
    classifier_seed: int = 0,
    initializer_range: float = 0.02,
    cloud_dropout: bool = True,
    calibration: Iterable[dict[str, torch.Tensor]] | None = None,
) -> SplitModel:
    """Cut the encoder whose canonical ``weights`` are given (see ``models.adapters``).

    The split layer ``k-1``'s FFN input projection is factorised by SVD into the
    compression head (edge) and decompression (cloud); the calibrated heads
    (``split.head``, ``models.heads``) are fitted instead to the split layer's input on the
    ``calibration`` batches (``splitwire.manifest.EDGE_INPUTS`` → tensors of public text, never training data).
    The classifier (and a family's new pooling layer, ``models.blocks.Pooler``) is the
    checkpoint's own when ``weights`` hold a fine-tuned head of this shape and the family's
    pooling is kept; otherwise it is new, drawn from ``N(0, initializer_range)`` with
    ``classifier_seed``, as Hugging Face initialises it. ``split.label_private``: the same weights,
    with the pooling layer and the classifier moved into the device's ``LabelHead``.
    """
    split.validate(encoder)
    k = split.split - 1  # index of the split layer
    edge = EdgePart(encoder, split)
    edge_map = {"embeddings.": "embeddings.", "split_attention.": f"layers.{k}.attention."}
    edge_map |= {f"layers.{i}.": f"layers.{i}." for i in range(k)}
    _load(edge, weights, edge_map)

    cloud = CloudPart(encoder, dataclasses.replace(split, label_private=False), dropout=cloud_dropout)
    cloud_map = {f"layers.{i - split.split}.": f"layers.{i}." for i in range(split.split, encoder.num_layers)}
    cloud_map |= {"pooler.": "pooler.", "split_ffn.dense_out.": f"layers.{k}.ffn.dense_out.",
                  "split_ffn.norm.": f"layers.{k}.ffn.norm.", "split_ffn.dense_in.": f"layers.{k}.ffn.dense_in."}
    new_head = encoder.pooling != "cls-pooler"
    _load(cloud, weights, cloud_map, _DERIVED + _NEW_HEAD if new_head else _DERIVED)
    fine_tuned = has_fine_tuned_head(cloud, weights)
    if split.compressed:
        w, b = weights[f"layers.{k}.ffn.dense_in.weight"], weights[f"layers.{k}.ffn.dense_in.bias"]
        factorise_into(edge.head, cloud.split_ffn, w, b)
        if split.head != "svd":
            if calibration is None:
                raise ValueError(f"the {split.head} head needs calibration text")
            calibrate_head(edge.head, cloud.split_ffn, split.head, w, b, split_inputs(edge, calibration))
    generator = torch.Generator().manual_seed(classifier_seed)
    head_layers = {"classifier.": cloud.classifier}
    if new_head and cloud.pooler.dense is not None:
        head_layers["pooler.dense."] = cloud.pooler.dense
    with torch.no_grad():
        for prefix, layer in head_layers.items():
            if fine_tuned:
                layer.load_state_dict({n: weights[prefix + n] for n in ("weight", "bias")})
            else:
                layer.weight.normal_(0.0, initializer_range, generator=generator)
                layer.bias.zero_()
    model = SplitModel(edge, cloud) if not split.label_private else u_shaped(encoder, split, edge, cloud, cloud_dropout)
    model.fine_tuned_head = fine_tuned
    return model


def u_shaped(encoder: EncoderSpec, split: SplitSpec, edge: EdgePart, cloud: CloudPart,
             cloud_dropout: bool) -> SplitModel:
    """The label-private split of a built ``cloud``: the same weights, its pooling layer and classifier
    moved into the device's ``LabelHead``."""
    top = CloudPart(encoder, split, dropout=cloud_dropout)
    head = LabelHead(encoder, split)
    moved = {"pooler.dense.": "dense.", "classifier.": "classifier."}
    state = cloud.state_dict()
    head.load_state_dict({moved[p] + n[len(p):]: v for n, v in state.items() for p in moved if n.startswith(p)})
    top.load_state_dict({n: v for n, v in state.items() if not n.startswith(tuple(moved))})
    return SplitModel(edge, top, head)


def has_fine_tuned_head(cloud: "CloudPart", weights: dict[str, torch.Tensor]) -> bool:
    """Whether ``weights`` hold a sequence-classification head that fits ``cloud``: a classifier of its
    shape and, for a family whose head has its own dense layer, that layer (mean pooling has none: a
    head fine-tuned on the first token's vector would not fit the mean)."""
    if cloud.pooler.mode == "mean":
        return False
    needed = {"classifier.weight": cloud.classifier.weight.shape}
    if cloud.pooler.mode != "cls-pooler":
        needed["pooler.dense.weight"] = cloud.pooler.dense.weight.shape
    return all(name in weights and weights[name].shape == shape for name, shape in needed.items())


def build_full(
    encoder: EncoderSpec, weights: dict[str, torch.Tensor], num_labels: int, *, classifier_seed: int = 0
) -> SplitModel:
    """The full fine-tuning baseline: the unsplit model with dropout everywhere.

    It is a vanilla split at the last layer with edge dropout on, which is exactly standard
    BERT sequence classification (a vanilla split is the unsplit model, cut anywhere).
    """
    split = SplitSpec(split=encoder.num_layers, rank=None, num_labels=num_labels, link_elimination=False)
    model = build_split(encoder, weights, split, classifier_seed=classifier_seed)
    full_edge = EdgePart(encoder, split, dropout=True)
    full_edge.load_state_dict(model.edge.state_dict())
    return SplitModel(full_edge, model.cloud)


def rate_groups(module: nn.Module, lr_scales: dict[str, float]) -> list[dict]:
    """``module``'s trainable parameters as optimizer groups, one per rate multiple (its ``"scale"``): those
    named in ``lr_scales`` at theirs (``splitwire.manifest.Optimizer.lr_scales``), the others at 1."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            groups.setdefault(float(lr_scales.get(name, 1.0)), []).append(parameter)
    return [{"params": params, "scale": scale} for scale, params in groups.items()]
