"""``export_bundle``: one model id in, one verified bundle directory out.

Why it exists: the CLI, the tests and the benchmarks all export the same way. This module
loads the encoder, cuts it (``models.build_split``), has the chosen edge engine's builder
write its files, and writes the cloud weights, the initial edge weights, the tokenizer and
the manifest through ``exporter.bundle_writer``. Slow steps report their timings to ``log``.
"""

from __future__ import annotations

import importlib
import io
from importlib import metadata
from pathlib import Path

from safetensors.torch import save_file

from exporter.bundle_writer import ExportError, check_target, save_numpy_weights, staged_bundle, write_manifest
from exporter.calibration import Calibration, describe_source, heal_and_measure, read_calibration_text
from exporter.progress import Log, stderr_log, timed
from models import EdgePart, LoadedEncoder, SplitModel, SplitSpec, build_split, load_encoder
from models.loading import unreachable_message
from models.lora import add_adapters, is_adapter
from splitwire.manifest import (
    CLOUD_WEIGHTS, EDGE_WEIGHTS, EMBEDDING_TABLES, ENGINES, LABEL_HEAD, LABEL_HEAD_WEIGHTS, MOMENT_DTYPES, TOKENIZER,
    WEIGHTS, Adapters, CloudSection, EdgeSection, Optimizer, TokenizerSettings,
)

# Each engine's builder: write_edge_files(edge, *, out_dir, frozen, optimizer, max_length, log) -> role → path.
EDGE_BUILDERS = {"ort-training": "exporter.ort_artifacts", "onnx": "exporter.aot_graphs"}
EXPORT_LOG = "export.log"  # the libraries' messages during the export (``exporter.progress.library_chatter``)

def export_bundle(
    *,
    model: str,
    split: int,
    out: str | Path,
    rank: int | None = 8,
    num_labels: int = 2,
    max_length: int = 128,
    freeze_embeddings: bool = False,
    train_edge_layers: int | None = None,
    edge_moments: str = "fp32",
    head_lr_scale: float = 1.0,
    edge_lora_rank: int | None = None,
    edge_lora_alpha: float | None = None,
    init: str = "pretrained",
    revision: str | None = None,
    tokenizer: str | None = None,
    engine: str = "onnx",
    pooling: str = "auto",
    head: str = "svd",
    label_private: bool = False,
    calibration_text: str | Path | None = None,
    calibration_column: str | None = None,
    heal_steps: int = 0,
    lr: float = 2e-5,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    seed: int = 0,
    force: bool = False,
    log: Log = stderr_log,
    library_log: io.StringIO | None = None,
) -> Path:
    """Export ``model`` cut at ``split`` with SVD ``rank`` (``None``: the vanilla split) into ``out``.

    ``library_log``: the libraries' messages collected so far, written into the bundle as ``export.log``.
    ``train_edge_layers``: train only the top N edge layers (the split layer's attention block counts as one)
    and the compression head; the embeddings and the layers below are frozen, so the backward graph stops at
    the first trained layer. ``edge_moments``: the dtype of the edge AdamW's moments (``MOMENT_DTYPES``).
    ``head_lr_scale``: the compression head's parameters (``HEAD_PARAMETERS``) train at this × the rate.
    ``edge_lora_rank``: LoRA adapters of that rank (``models.lora``, scale ``edge_lora_alpha / rank``,
    alpha 2·rank by default) on the edge layers' projections; only they and the compression head train.
    ``label_private``: the U-shaped split; the edge also holds the pooling layer, the classifier and
    the loss (``edge/label_head.safetensors``), the cloud part ends at the pooled top output.
    ``head``: how the compression head is made (``models.heads``); the calibrated heads and
    ``heal_steps`` of healing need ``calibration_text``, public text that also gives the fidelity report.
    """
    out = Path(out)
    check_target(out, force=force)
    builder = _edge_builder(engine)
    _check_numbers(max_length=max_length, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if not 0 < head_lr_scale <= 1e6 or head_lr_scale != 1.0 and (engine != "onnx" or rank is None):
        raise ExportError(f"--head-lr-scale must be positive and, other than 1, needs a compression head and the "
                          f"onnx engine (onnxruntime-training has one rate for all), got {head_lr_scale} with "
                          f"{engine}{'' if rank else ', no compression'}")
    _check_edge_training(engine=engine, split=split, train_edge_layers=train_edge_layers, edge_moments=edge_moments,
                         edge_lora_rank=edge_lora_rank, edge_lora_alpha=edge_lora_alpha)
    spec = SplitSpec(split, rank, num_labels, link_elimination=rank is not None, head=head,
                     label_private=label_private)
    texts = _calibration_text(spec, calibration_text, calibration_column, heal_steps)
    tok = _tokenizer(tokenizer or model, revision=None if tokenizer else revision)
    with timed(log, f"loading {model} ({init} weights)"):
        loaded = _load(model, init=init, revision=revision, seed=seed, pooling=pooling)
    chosen = " (the checkpoint's sentence-transformers 1_Pooling; --pooling cls for the first token)"
    log(f"pooling before the classifier: {loaded.spec.pooling}" + (chosen if pooling == "auto" and
                                                                   loaded.spec.pooling == "mean" else ""))
    _check_fits(loaded, spec, max_length)
    calibration = Calibration.from_tokenizer(texts, tok, spec=loaded.spec, max_length=max_length) if texts else None
    with timed(log, f"cutting at split {split}, {f'{head} head of rank {rank}' if rank else 'no compression'}"):
        split_model = build_split(loaded.spec, loaded.weights, spec, classifier_seed=seed,
                                  initializer_range=loaded.initializer_range,
                                  calibration=None if calibration is None else calibration.fit)
    compression = None
    if calibration is not None:
        compression = heal_and_measure(split_model, loaded.spec, loaded.weights, spec, calibration,
                                       heal_steps=heal_steps, log=log)
        compression["calibration"] = describe_source(calibration_text, texts, calibration_column)
    else:
        log("no fidelity report: it needs --calibration-text")
    adapters = None
    if edge_lora_rank is not None:
        adapters = Adapters(edge_lora_rank, float(edge_lora_alpha or 2 * edge_lora_rank))
        add_adapters(split_model.edge, rank=adapters.rank, alpha=adapters.alpha, seed=seed)
    frozen = frozen_parameters(split_model.edge, freeze_embeddings=freeze_embeddings,
                               train_edge_layers=train_edge_layers, adapters=adapters is not None)
    log("classifier: the checkpoint's fine-tuned head" if split_model.fine_tuned_head
        else f"classifier: new, {spec.num_labels} outputs")
    optimizer = Optimizer(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                          moments=edge_moments, head_lr_scale=head_lr_scale).to_dict()
    with staged_bundle(out, force=force) as root:
        with timed(log, f"building the {engine} edge files"):
            edge_files = builder.write_edge_files(split_model.edge, out_dir=root, frozen=frozen,
                                                  optimizer=optimizer, max_length=max_length, log=log)
        tokenizer_info = _write_tokenizer(tok, root, loaded=loaded, max_length=max_length)
        _write_weights(split_model, root)
        if library_log is not None:
            (root / EXPORT_LOG).write_text(library_log.getvalue())
        with timed(log, "hashing and writing the manifest"):
            edge_section = _edge_section(split_model, edge_files, frozen, train_edge_layers, adapters)
            body = _manifest_body(loaded, spec, engine=engine, edge=edge_section, optimizer=optimizer,
                                  tokenizer=tokenizer_info, max_length=max_length)
            manifest = write_manifest(root, body | ({"compression": compression} if compression else {}))
    log(f"wrote {out} ({len(manifest['files'])} files, {_size_mib(out):.1f} MiB)")
    return out


def _calibration_text(spec: SplitSpec, path: str | Path | None, column: str | None, heal_steps: int) -> list[str]:
    """The calibration rows (``[]`` without a file), after checking that the head and healing have what they need."""
    if heal_steps < 0:
        raise ExportError(f"--heal-steps must be >= 0, got {heal_steps}")
    if heal_steps and not spec.compressed:
        raise ExportError("--heal-steps needs a compression head; the vanilla split has none to heal")
    if path is None:
        if spec.head != "svd" or heal_steps:
            what = f"--head {spec.head}" if spec.head != "svd" else "--heal-steps"
            raise ExportError(f"{what} needs --calibration-text FILE: public text, never the fine-tuning data "
                              "(e.g. another corpus than the task's)")
        return []
    return read_calibration_text(path, column=column)


def _edge_builder(engine: str):
    if engine not in ENGINES:
        raise ExportError(f"unknown edge engine {engine!r}; known: {', '.join(ENGINES)}")
    name = EDGE_BUILDERS[engine]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ExportError(f"--engine {engine} needs {name}, which this installation lacks") from None


def _check_numbers(*, max_length: int, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
    if max_length < 2:
        raise ExportError(f"max_length must be at least 2, got {max_length}")
    if not lr > 0 or weight_decay < 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
        raise ExportError(f"bad optimizer settings: lr {lr}, weight decay {weight_decay}, betas {betas}, eps {eps}")


def _check_edge_training(*, engine: str, split: int, train_edge_layers: int | None, edge_moments: str,
                         edge_lora_rank: int | None, edge_lora_alpha: float | None) -> None:
    if edge_lora_rank is not None:
        if edge_lora_rank < 1 or edge_lora_alpha is not None and not edge_lora_alpha > 0:
            raise ExportError(f"--edge-lora-rank must be >= 1 and --edge-lora-alpha > 0, got {edge_lora_rank} "
                              f"and {edge_lora_alpha}")
        if train_edge_layers is not None or engine != "onnx":
            raise ExportError("--edge-lora-rank needs the onnx engine and trains every edge layer's adapters "
                              "(without --train-edge-layers)")
    elif edge_lora_alpha is not None:
        raise ExportError("--edge-lora-alpha needs --edge-lora-rank")
    if train_edge_layers is not None and not 0 <= train_edge_layers <= split:
        raise ExportError(f"--train-edge-layers must lie in 0..{split} (the edge's layers at split {split}), "
                          f"got {train_edge_layers}")
    if edge_moments not in MOMENT_DTYPES:
        raise ExportError(f"--edge-moments must be one of {', '.join(MOMENT_DTYPES)}, got {edge_moments!r}")
    if edge_moments != "fp32" and engine != "onnx":
        raise ExportError(f"--edge-moments {edge_moments} needs the onnx engine (onnxruntime-training keeps its own "
                          "float32 AdamW state)")


def frozen_parameters(edge: EdgePart, *, freeze_embeddings: bool, train_edge_layers: int | None,
                      adapters: bool = False) -> list[str]:
    """The edge parameters that do not train: the embedding tables with ``freeze_embeddings``; with
    ``train_edge_layers`` N, everything below the top N edge layers (the embeddings included); with
    ``adapters``, everything but the LoRA adapters and the compression head."""
    names = list(edge.state_dict())
    if adapters:
        return [name for name in names if not is_adapter(name) and not name.startswith("head.")]
    tables = [name for name in EMBEDDING_TABLES if name in names]  # DistilBERT: no token types
    layers = [f"layers.{i}." for i in range(len(edge.layers))] + ["split_attention."]
    trained = len(layers) if train_edge_layers is None else train_edge_layers
    below = tuple(layers[:len(layers) - trained])
    below += ("embeddings.",) if below else ()
    return [name for name in names if name.startswith(below) or freeze_embeddings and name in tables]


def _load(model: str, *, init: str, revision: str | None, seed: int, pooling: str) -> LoadedEncoder:
    try:
        return load_encoder(model, init=init, revision=revision, seed=seed, pooling=pooling)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load model {model!r}: {exc}") from None


def _check_fits(loaded: LoadedEncoder, spec: SplitSpec, max_length: int) -> None:
    try:
        spec.validate(loaded.spec)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if max_length > loaded.spec.positions:
        raise ExportError(f"max_length {max_length} exceeds the model's {loaded.spec.positions} positions")


def _tokenizer(source: str, *, revision: str | None):
    """The ``tokenizer.json`` of ``source``: a directory, or a hub id (downloaded by ``tokenizers``)."""
    from tokenizers import Tokenizer

    if Path(source).is_dir():
        file = Path(source) / "tokenizer.json"
        if file.is_file():
            return Tokenizer.from_file(str(file))
        problem = f"{source} has no tokenizer.json"
    else:
        try:
            return Tokenizer.from_pretrained(source, revision=revision or "main")
        except Exception as exc:  # the hub client raises many kinds; any of them means "none here"
            offline = unreachable_message(source)
            if offline:
                raise ExportError(f"cannot load {source!r}: {offline}") from None
            problem = f"no tokenizer.json for {source!r} ({type(exc).__name__}: {exc})"
    raise ExportError(f"{problem}; pass --tokenizer DIR_OR_ID (e.g. the MiniLM directory for an uncased BERT vocabulary)")


def _write_tokenizer(tok, root: Path, *, loaded: LoadedEncoder, max_length: int) -> dict:
    """``edge/tokenizer.json`` truncating at ``max_length`` and not padding (the edge pads per batch)."""
    if tok.get_vocab_size() > loaded.spec.vocab_size:
        raise ExportError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocabulary {loaded.spec.vocab_size}"
        )
    pad_id = loaded.spec.pad_token_id
    tok.no_padding()
    tok.enable_truncation(max_length)
    (root / TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / TOKENIZER))
    return TokenizerSettings(TOKENIZER, max_length, pad_id, tok.id_to_token(pad_id)).to_dict()


def _write_weights(model: SplitModel, root: Path) -> None:
    (root / CLOUD_WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.cloud.state_dict().items()}, str(root / CLOUD_WEIGHTS))
    save_numpy_weights(root / EDGE_WEIGHTS, {k: v.detach().numpy() for k, v in model.edge.state_dict().items()})
    if model.head is not None:
        save_numpy_weights(root / LABEL_HEAD_WEIGHTS, {k: v.detach().numpy() for k, v in model.head.state_dict().items()})


def _edge_section(model: SplitModel, files: dict[str, str], frozen: list[str], trained_layers: int | None,
                  adapters: Adapters | None) -> dict:
    names = list(model.edge.state_dict())
    head = {LABEL_HEAD: LABEL_HEAD_WEIGHTS} if model.head is not None else {}
    return EdgeSection({**files, WEIGHTS: EDGE_WEIGHTS, **head}, tuple(n for n in names if n not in frozen),
                       tuple(frozen), trained_layers, adapters).to_dict()


def _manifest_body(loaded: LoadedEncoder, spec: SplitSpec, *, engine: str, edge: dict, optimizer: dict,
                   tokenizer: dict, max_length: int) -> dict:
    """Everything but the format and the file hashes, which ``write_manifest`` adds."""
    return {
        "created_by": f"splitft {_version()} sft-export",
        "base_model": loaded.source,
        "encoder": loaded.spec.to_dict(),
        "split": spec.to_dict(),
        "max_length": max_length,
        "engine": engine,
        "edge": edge,
        "cloud": CloudSection({WEIGHTS: CLOUD_WEIGHTS}, dropout=True).to_dict(),
        "optimizer": optimizer,
        "tokenizer": tokenizer,
    }


def _version() -> str:
    try:
        return metadata.version("splitft")
    except metadata.PackageNotFoundError:
        return "unknown"


def _size_mib(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
