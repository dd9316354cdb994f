"""The bundle contract: what ``manifest.json`` holds, and every name the two sides must agree on.

Why it exists: ``sft-export`` writes the manifest, and the edge (engines, tokenizer, doctor,
CLI; no torch) and the cloud (model, session) read it in other processes. Its keys, the roles
of its files, the edge graphs' input and value names and the embedding tables are defined
here once; ``Manifest.parse`` checks every field a reader trusts, and the writer parses what
it wrote, so the two cannot drift apart. Standard library only.

Format 2 dropped the fields nothing read (``task``, ``wire``, ``edge.inputs``,
``edge.dropout``; the codec is agreed per session); a format-1 manifest reads the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from splitwire.errors import BundleError

FORMAT = "splitft-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
ENGINES = ("ort-training", "onnx")
REQUIRED_KEYS = ("format", "format_version", "base_model", "encoder", "split", "max_length", "engine",
                 "edge", "cloud", "optimizer", "tokenizer", "files")

# The edge graphs' inputs, all int64 B×L, in this order (``edge_runtime.engine.EdgeBatch``'s fields).
EDGE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# The embedding tables by their PyTorch names (``--freeze-embeddings`` freezes them; DistilBERT has no token types).
EMBEDDING_TABLES = ("embeddings.word.weight", "embeddings.position.weight", "embeddings.token_type.weight")
# The edge AdamW's moment dtypes: exact float32 (the default), or bfloat16 (half the optimizer state, onnx engine).
MOMENT_DTYPES = ("fp32", "bf16")
# The compression head's parameters (new at the cut, not pretrained) by name prefix, on each side: they train at
# ``optimizer.head_lr_scale`` × the schedule's rate (``sft-export --head-lr-scale``).
HEAD_PARAMETERS = {"edge": ("head.",), "cloud": ("split_ffn.decompression.", "split_ffn.rebuild.")}
# Value names in the onnx engine's graphs: z out, dL/dz in, saved activations "saved.N", gradients "grad.<parameter>".
Z, DZ, SAVED, GRAD = "z", "dz", "saved.", "grad."

# File roles (``edge.files`` and ``cloud.files`` map them to paths) and where the exporter writes them.
WEIGHTS = "weights"  # the edge's initial weights; the cloud half's weights
FORWARD, BACKWARD, INFER = "forward", "backward", "infer"  # the onnx engine's graphs
TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT = "training_model", "eval_model", "optimizer_model", "checkpoint"
EDGE_DIR, CLOUD_DIR = "edge", "cloud"
EDGE_WEIGHTS = f"{EDGE_DIR}/edge_weights.safetensors"
CLOUD_WEIGHTS = f"{CLOUD_DIR}/weights.safetensors"
TOKENIZER = f"{EDGE_DIR}/tokenizer.json"
# The label-private (U-shaped) split's device head: pooling layer and classifier (``edge_runtime.label_head``).
LABEL_HEAD = "label_head"
LABEL_HEAD_WEIGHTS = f"{EDGE_DIR}/label_head.safetensors"
ENGINE_FILES = {  # engine → role → path; ort-training's names are the ones onnxruntime's generate_artifacts writes
    "onnx": {FORWARD: f"{EDGE_DIR}/forward.onnx", BACKWARD: f"{EDGE_DIR}/backward.onnx", INFER: f"{EDGE_DIR}/infer.onnx"},
    "ort-training": {TRAINING_MODEL: f"{EDGE_DIR}/training_model.onnx", EVAL_MODEL: f"{EDGE_DIR}/eval_model.onnx",
                     OPTIMIZER_MODEL: f"{EDGE_DIR}/optimizer_model.onnx", CHECKPOINT: f"{EDGE_DIR}/checkpoint"},
}


@dataclass(frozen=True)
class Optimizer:
    """AdamW's settings, the same on both halves (the learning rate is the peak of the session's schedule)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    name: str = "adamw"
    moments: str = "fp32"  # the edge's AdamW moments in memory and checkpoints: one of MOMENT_DTYPES
    head_lr_scale: float = 1.0  # HEAD_PARAMETERS train at this × the rate, on both halves

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "moments": self.moments, "head_lr_scale": self.head_lr_scale}

    def lr_scales(self, side: str, names: Iterable[str]) -> dict[str, float]:
        """Each of ``names`` (one side's trainable parameters) that trains at a multiple of the rate, and that
        multiple: the compression head's, unless the scale is 1."""
        return {} if self.head_lr_scale == 1.0 else dict.fromkeys(head_parameters(side, names), self.head_lr_scale)


def head_parameters(side: str, names: Iterable[str]) -> list[str]:
    """The compression head's parameters among ``names``, the ``side`` (edge or cloud) part's parameter names."""
    return [name for name in names if name.startswith(HEAD_PARAMETERS[side])]


@dataclass(frozen=True)
class TokenizerSettings:
    """``tokenizer.json`` (it truncates at ``max_length`` and does not pad) and the padding the edge adds."""

    file: str
    max_length: int
    pad_id: int
    pad_token: str
    pad_type_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Adapters:
    """LoRA on the edge layers' projections (``models.lora``): ``ΔW = (alpha / rank) · B A``."""

    rank: int
    alpha: float


@dataclass(frozen=True)
class EdgeSection:
    """The edge engine's files by role, and which of its weights train."""

    files: Mapping[str, str]
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trained_layers: int | None = None  # the top edge layers that train (below them all is frozen); None: all
    adapters: Adapters | None = None  # LoRA: only the adapters (and the compression head) train

    def to_dict(self) -> dict[str, Any]:
        return {"files": dict(self.files), "trainable": list(self.trainable), "frozen": list(self.frozen),
                "trained_layers": self.trained_layers,
                "adapters": None if self.adapters is None else asdict(self.adapters)}


@dataclass(frozen=True)
class CloudSection:
    """The cloud half's files by role, and whether it trains with dropout."""

    files: Mapping[str, str]
    dropout: bool

    def to_dict(self) -> dict[str, Any]:
        return {"files": dict(self.files), "dropout": self.dropout}


@dataclass(frozen=True, eq=False)
class Manifest(Mapping[str, Any]):
    """A checked manifest: the typed sections readers use, and the JSON object itself (a read-only
    mapping, so ``manifest["compression"]`` still shows what was written)."""

    raw: Mapping[str, Any]
    engine: str
    max_length: int
    encoder: Mapping[str, Any]  # ``models.EncoderSpec.to_dict()``, checked as far as the edge reads it
    split: Mapping[str, Any]  # ``models.SplitSpec.to_dict()``
    edge: EdgeSection
    cloud: CloudSection
    optimizer: Optimizer
    tokenizer: TokenizerSettings
    files: Mapping[str, str]  # every file's path → SHA-256
    label_private: bool = False  # the U-shaped split: labels, loss and logits stay on the device

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    @classmethod
    def parse(cls, raw: Any, where: Path | str) -> "Manifest":
        """Check ``raw`` (the parsed JSON) field by field; ``BundleError`` says which field is wrong."""
        _check_header(raw, where)
        _check_shapes(raw, where)
        _check_named_files(raw, where)
        edge, cloud, opt, tok = raw["edge"], raw["cloud"], raw["optimizer"], raw["tokenizer"]
        return cls(
            raw=raw, engine=raw["engine"], max_length=raw["max_length"], encoder=raw["encoder"], split=raw["split"],
            edge=EdgeSection(edge["files"], _names(edge, "trainable", where), _names(edge, "frozen", where),
                             _whole(raw, "edge", "trained_layers", where, minimum=0, optional=True)
                             if "trained_layers" in edge else None, _adapters(edge, where)),
            cloud=CloudSection(cloud["files"], _flag(cloud, "dropout", where)),
            optimizer=Optimizer(lr=_number(opt, "lr", where), betas=_betas(opt, where), eps=_number(opt, "eps", where),
                                weight_decay=_number(opt, "weight_decay", where, zero=True),
                                moments=_choice(opt, "moments", MOMENT_DTYPES, where),
                                head_lr_scale=_number(opt, "head_lr_scale", where) if "head_lr_scale" in opt else 1.0),
            tokenizer=TokenizerSettings(file=tok["file"], max_length=raw["max_length"],
                                        pad_id=_whole(raw, "tokenizer", "pad_id", where, minimum=0),
                                        pad_token=_text(tok, "pad_token", where),
                                        pad_type_id=_whole(raw, "tokenizer", "pad_type_id", where, minimum=0)),
            files=raw["files"],
            label_private=_label_private(raw, where),
        )


def _check_header(manifest: Any, where: Path | str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a splitft bundle manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise BundleError(
            f"{where} has bundle format version {manifest.get('format_version')!r:.20}; "
            f"this splitft reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where} lacks {', '.join(missing)}")
    if manifest["engine"] not in ENGINES:
        raise BundleError(f"{where} names unknown edge engine {str(manifest['engine'])[:40]!r}; "
                          f"known: {', '.join(ENGINES)}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise BundleError(f"{where} lists no files")


def _check_shapes(manifest: dict[str, Any], where: Path | str) -> None:
    """The fields every reader takes on trust: present, of the right type, in range."""
    for section in ("encoder", "split", "edge", "cloud", "optimizer", "tokenizer"):
        if not isinstance(manifest[section], dict):
            raise BundleError(f"{where}: {section} must be an object")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size", "max_positions"):
        _whole(manifest, "encoder", key, where)
    _whole(manifest, "encoder", "type_vocab_size", where, minimum=0)  # DistilBERT has no token types
    if "position_offset" in manifest["encoder"]:  # RoBERTa's positions start after the padding index
        offset = _whole(manifest, "encoder", "position_offset", where, minimum=0)
        if offset >= manifest["encoder"]["max_positions"]:
            raise BundleError(f"{where}: encoder.position_offset {offset} leaves no position of "
                              f"max_positions {manifest['encoder']['max_positions']}")
    _whole(manifest, "split", "split", where)
    _whole(manifest, "split", "rank", where, optional=True)
    _whole(manifest, "split", "num_labels", where)
    if type(manifest["max_length"]) is not int or manifest["max_length"] < 1:
        raise BundleError(f"{where}: max_length must be a whole number >= 1")
    if manifest["optimizer"].get("name") != "adamw":
        raise BundleError(f"{where}: both engines and the cloud run AdamW, the manifest asks for "
                          f"{str(manifest['optimizer'].get('name'))[:40]!r}")


def _check_named_files(manifest: dict[str, Any], where: Path | str) -> None:
    """Every file the manifest names for a part is in its hash table, under that part's folder
    (nothing is ever loaded unverified), and the edge names every file its engine needs."""
    named = [(EDGE_DIR, manifest["tokenizer"].get("file"))]
    for part in (EDGE_DIR, CLOUD_DIR):
        files = manifest[part].get("files")
        if not isinstance(files, dict) or WEIGHTS not in files:
            raise BundleError(f"{where}: {part}.files must map roles to files, {WEIGHTS!r} among them")
        named += [(part, relpath) for relpath in files.values()]
    for part, relpath in named:
        if not isinstance(relpath, str) or not relpath.startswith(f"{part}/") or relpath not in manifest["files"]:
            raise BundleError(f"{where} names {part} file {str(relpath)[:100]!r}, which is not under {part}/ in its "
                              "hash table: every file a bundle uses must be listed with its SHA-256")
    lacking = [role for role in ENGINE_FILES[manifest["engine"]] if role not in manifest[EDGE_DIR]["files"]]
    if lacking:
        raise BundleError(f"{where}: the {manifest['engine']} engine needs edge files for {', '.join(lacking)}")


def _label_private(manifest: dict[str, Any], where: Path | str) -> bool:
    """``split.label_private`` (absent: false); a label-private edge must name its head's weights."""
    value = manifest["split"].get("label_private", False)
    if not isinstance(value, bool):
        raise BundleError(f"{where}: split.label_private must be true or false, got {str(value)[:40]!r}")
    if value and LABEL_HEAD not in manifest[EDGE_DIR]["files"]:
        raise BundleError(f"{where}: a label-private bundle needs the edge file {LABEL_HEAD!r} (its device head)")
    return value


def _names(section: dict[str, Any], key: str, where: Path | str) -> tuple[str, ...]:
    value = section.get(key)
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise BundleError(f"{where}: edge.{key} must be a list of parameter names")
    return tuple(value)


def _flag(section: dict[str, Any], key: str, where: Path | str) -> bool:
    value = section.get(key)
    if not isinstance(value, bool):
        raise BundleError(f"{where}: cloud.{key} must be true or false, got {str(value)[:40]!r}")
    return value


def _number(section: dict[str, Any], key: str, where: Path | str, *, zero: bool = False) -> float:
    value = section.get(key)
    if type(value) not in (int, float) or not (0 <= value if zero else 0 < value) or value != value or value > 1e9:
        raise BundleError(f"{where}: optimizer.{key} must be a {'non-negative' if zero else 'positive'} number, "
                          f"got {str(value)[:40]!r}")
    return float(value)


def _betas(section: dict[str, Any], where: Path | str) -> tuple[float, float]:
    value = section.get("betas")
    if not (isinstance(value, list) and len(value) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in value)):
        raise BundleError(f"{where}: optimizer.betas must be two numbers in [0, 1), got {str(value)[:40]!r}")
    return float(value[0]), float(value[1])


def _whole(manifest: dict[str, Any], section: str, key: str, where: Path | str, *, minimum: int = 1,
           optional: bool = False) -> int | None:
    value = manifest[section].get(key)
    if optional and value is None and key in manifest[section]:
        return None
    if type(value) is not int or value < minimum:
        raise BundleError(f"{where}: {section}.{key} must be a whole number >= {minimum}"
                          f"{' or null' if optional else ''}, got {str(value)[:40]!r}")
    return value


def _adapters(section: dict[str, Any], where: Path | str) -> Adapters | None:
    value = section.get("adapters")
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"rank", "alpha"} and type(value["rank"]) is int
            and value["rank"] >= 1 and type(value["alpha"]) in (int, float) and 0 < value["alpha"] <= 1e6):
        raise BundleError(f"{where}: edge.adapters must be null or {{rank: whole number >= 1, alpha: positive "
                          f"number}}, got {str(value)[:60]!r}")
    return Adapters(value["rank"], float(value["alpha"]))


def _choice(section: dict[str, Any], key: str, choices: tuple[str, ...], where: Path | str) -> str:
    """``section[key]``, one of ``choices``; the first of them when absent (bundles written before the key)."""
    value = section.get(key, choices[0])
    if value not in choices:
        raise BundleError(f"{where}: optimizer.{key} must be one of {', '.join(choices)}, got {str(value)[:40]!r}")
    return value


def _text(section: dict[str, Any], key: str, where: Path | str) -> str:
    value = section.get(key)
    if not isinstance(value, str):
        raise BundleError(f"{where}: tokenizer.{key} must be a string, got {str(value)[:40]!r}")
    return value
