"""``sft-edge``: fine-tune, evaluate and predict on the device, with the cloud training the top half.

Why it exists: the command a device's user runs. It reads the local file, fixes the
run's config (data order, label map, schedule) in its checkpoints so that a rerun of the
same command resumes where the cloud and the device left off, and reports loss, speed,
bytes on the wire and test metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from edge_runtime.api import EdgeTrainer
from edge_runtime.batches import planned_steps
from edge_runtime.checkpoints import CheckpointDir, ResumeError, RunConfig
from edge_runtime.client import Backoff, CloudClient, client_tls, session_token
from edge_runtime.data import (
    Columns,
    LabelMap,
    Table,
    TextData,
    holdout_split,
    infer_label_map,
    output_format,
    read_table,
    table_texts,
    write_rows,
)
from edge_runtime.doctor import add_arguments as add_doctor_arguments
from edge_runtime.doctor import doctor_command
from edge_runtime.trainer import TrainResult, prediction_rows
from splitwire.bundle import Bundle, BundleError, load_bundle, sha256_file
from splitwire.codecs import CODEC_NAMES
from splitwire.errors import UsageError
from splitwire.exit_codes import EPILOG as EXIT_STATUS
from splitwire.exit_codes import exit_code
from splitwire.schedule import SCHEDULES, Schedule

DEFAULTS = {"seed": 0, "batch_size": 32, "epochs": 3, "schedule": "constant", "warmup": 0, "session": "default",
            "codec": "fp32"}

EXAMPLE = """\
example (the movie-review snippets: tab-separated id, sentiment, text; positive when sentiment > 0):

  sft-export --model MODEL_DIR_OR_HUB_ID --split 3 --rank 8 --max-length 66 --out bundles/minilm-s3-r8
  sft-cloud --bundle bundles/minilm-s3-r8 --port 8765 --state-dir runs/cloud &     # on the server
  sft-edge train --bundle bundles/minilm-s3-r8 --cloud ws://127.0.0.1:8765 --session reviews \\
      --data movieReviewSnippets_GroundTruth.txt --text-column text \\
      --label-column sentiment --label-threshold 0 --holdout 0.2 --epochs 1 --batch-size 32
  sft-edge eval --bundle bundles/minilm-s3-r8 --cloud ws://127.0.0.1:8765 --session reviews \\
      --eval-file my_test.tsv
  sft-edge predict --bundle bundles/minilm-s3-r8 --cloud ws://127.0.0.1:8765 --session reviews \\
      --input unlabelled.csv --out predictions.csv

Checkpoints go to runs/<session> (--checkpoint-dir). Rerun the same `train` command after an
interruption and it resumes at the step the cloud has applied, with the same data order.
The token for the cloud comes from --token-file or the SFT_TOKEN environment variable.

""" + EXIT_STATUS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle directory sft-export wrote")
    parser.add_argument("--cloud", required=True, metavar="URL",
                        help="the sft-cloud server, ws://host:port or wss://…")
    parser.add_argument("--session", help="this training run's name on the cloud (default: 'default', or the run's)")
    parser.add_argument("--token-file", type=Path, help="file holding the session token (default: $SFT_TOKEN)")
    parser.add_argument("--fleet", metavar="NAME",
                        help="train (and predict with) the top part this fleet of devices shares on the cloud; "
                             "this device's edge half stays its own (default: a top part of this session alone)")
    parser.add_argument("--ca-file", type=Path,
                        help="PEM CA certificate that signed a wss:// cloud's certificate (default: the system's)")
    parser.add_argument("--reconnect-for", type=float, default=300.0, metavar="SECONDS",
                        help="after a lost connection, keep reconnecting (exponential backoff with jitter) and "
                             "resume for this long; 0 gives up at once (default 300)")
    parser.add_argument("--checkpoint-dir", type=Path, help="where checkpoints live (default: runs/<session>)")
    parser.add_argument("--batch-size", type=_positive,
                        help=f"rows per step (default {DEFAULTS['batch_size']}, or the run's)")
    parser.add_argument("--threads", type=_positive, help="CPU threads for the edge engine (default: onnxruntime's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _columns(parser: argparse.ArgumentParser, *, labels: bool) -> None:
    parser.add_argument("--format", choices=("csv", "tsv", "jsonl"),
                        help="file format (default: from the suffix, else sniffed)")
    parser.add_argument("--text-column", help="column with the text (default 'text', or the run's); texts longer "
                        "than the bundle's max_length tokens are truncated to it (pairs: the longer text first)")
    parser.add_argument("--text-pair-column", help="column with the second text of a sentence pair")
    if labels:
        parser.add_argument("--label-column", help="column with the label (default 'label', or the run's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-edge",
        description="Split fine-tuning, device side: your text stays here; only a compressed activation "
                    "(batch × length × rank numbers) goes to the cloud, and its gradient comes back.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,doctor}")

    train_cmd = commands.add_parser("train", help="fine-tune on a labelled local file (resumes if interrupted)",
                                    epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(train_cmd)
    train_cmd.add_argument("--data", required=True, type=Path, help="labelled training file: .csv, .tsv or .jsonl")
    _columns(train_cmd, labels=True)
    train_cmd.add_argument("--label-threshold", type=float,
                           help="binary label from a numeric column: 1 when value > THRESHOLD, else 0")
    train_cmd.add_argument("--labels", help="comma-separated label names in class-id order (default: inferred)")
    train_cmd.add_argument("--holdout", type=float,
                           help="hold out this fraction of --data (fixed by --seed) and evaluate on it at the end")
    train_cmd.add_argument("--eval-file", type=Path, help="labelled test file to evaluate on at the end")
    train_cmd.add_argument("--epochs", type=_positive, help=f"passes over the data (default {DEFAULTS['epochs']})")
    train_cmd.add_argument("--max-steps", type=_positive, help="stop after this many steps in all")
    train_cmd.add_argument("--lr", type=float, help="peak learning rate (default: the bundle's)")
    train_cmd.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default constant)")
    train_cmd.add_argument("--warmup", type=int, help="linear warm-up steps (default 0)")
    train_cmd.add_argument("--seed", type=int, help="data-order seed, also the cloud's dropout seed (default 0)")
    train_cmd.add_argument("--group-by-length", action="store_true", default=None,
                           help="batch rows of similar length together (seeded): far less padding, so less "
                                "compute and traffic per epoch")
    train_cmd.add_argument("--codec", choices=CODEC_NAMES, metavar="CODEC",
                           help="wire encoding of z and dz, <base>[+sr][+packed] with base fp32 (default, the "
                                "paper's), fp16, bf16, int8 (scale per token) or int8-channel; +sr: stochastic "
                                "rounding of gradients; +packed: real tokens only, no padding. Fixed for the run")
    train_cmd.add_argument("--checkpoint-every", type=_positive, default=200,
                           help="steps between checkpoints (default 200)")
    train_cmd.add_argument("--average-every", type=_positive, metavar="N",
                           help="with --fleet: every N steps, average the edge half with the fleet's other devices "
                                "through the cloud (FedAvg weighted by examples; only weights travel, counted in "
                                "the summary's averaging_bytes)")
    train_cmd.add_argument("--report", type=Path, help="also write a JSON summary (losses, bytes, metrics) here")

    eval_cmd = commands.add_parser("eval", help="accuracy/F1/MCC (or Pearson/Spearman) on a labelled local file",
                                   epilog=EXIT_STATUS)
    _common(eval_cmd)
    eval_cmd.add_argument("--eval-file", required=True, type=Path, help="labelled test file")
    _columns(eval_cmd, labels=True)

    predict_cmd = commands.add_parser("predict", help="write predicted labels for an unlabelled local file",
                                      epilog=EXIT_STATUS)
    _common(predict_cmd)
    predict_cmd.add_argument("--input", required=True, type=Path, help="file with the texts to label")
    predict_cmd.add_argument("--out", required=True, type=Path, help="predictions: .csv or .jsonl")
    _columns(predict_cmd, labels=False)

    doctor_cmd = commands.add_parser("doctor", help="check this device before a long run: runtime, cores, memory "
                                     "for the batch, disk, and (with --cloud) the cloud's bundle; exit 1 if not ready",
                                     epilog=EXIT_STATUS)
    add_doctor_arguments(doctor_cmd)
    return parser


# --- the run's config ------------------------------------------------------------------------


def _pick(value: Any, saved: Any, default: Any = None) -> Any:
    return value if value is not None else saved if saved is not None else default


def run_config(args: argparse.Namespace, *, bundle: Bundle, table_columns: Columns, label_map: LabelMap,
               num_examples: int, saved: RunConfig | None) -> RunConfig:
    """The run's config from the arguments, the saved run's values filling what was not given."""
    old = asdict(saved) if saved else {}
    old_schedule = old.get("schedule", {})
    seed = _pick(args.seed, old.get("seed"), DEFAULTS["seed"])
    batch_size = _pick(args.batch_size, old.get("batch_size"), DEFAULTS["batch_size"])
    epochs = _pick(args.epochs, old.get("epochs"), DEFAULTS["epochs"])
    max_steps = _pick(args.max_steps, old.get("max_steps"))
    holdout = _pick(args.holdout, old.get("holdout"))
    num_train = num_examples if holdout is None else len(holdout_split(num_examples, fraction=holdout, seed=seed)[0])
    schedule = Schedule(
        lr=_pick(args.lr, old_schedule.get("lr"), bundle.manifest.optimizer.lr),
        kind=_pick(args.schedule, old_schedule.get("kind"), DEFAULTS["schedule"]),
        warmup_steps=_pick(args.warmup, old_schedule.get("warmup_steps"), DEFAULTS["warmup"]),
        total_steps=planned_steps(num_train, batch_size=batch_size, epochs=epochs, max_steps=max_steps),
    )
    return RunConfig(
        session=_pick(args.session, old.get("session"), DEFAULTS["session"]),
        bundle_hash=bundle.hash,
        data_sha256=sha256_file(args.data),
        columns=asdict(table_columns),
        label_map=label_map.to_dict(),
        seed=seed,
        batch_size=batch_size,
        epochs=epochs,
        max_steps=max_steps,
        holdout=holdout,
        schedule=schedule.to_dict(),
        group_by_length=_pick(args.group_by_length, old.get("group_by_length"), False),
        codec=_pick(args.codec, old.get("codec"), DEFAULTS["codec"]),
    )


def _train_columns(args: argparse.Namespace, saved: RunConfig | None) -> Columns:
    old = saved.columns if saved else {}
    return Columns(
        text=_pick(args.text_column, old.get("text"), "text"),
        pair=_pick(args.text_pair_column, old.get("pair")),
        label=_pick(args.label_column, old.get("label"), "label"),
    )


def _train_label_map(args: argparse.Namespace, table: Table, columns: Columns, bundle: Bundle,
                     saved: RunConfig | None) -> LabelMap:
    if saved and args.label_threshold is None and args.labels is None and columns.label == saved.columns["label"]:
        return LabelMap.from_dict(saved.label_map)
    names = args.labels.split(",") if args.labels else None
    return infer_label_map(table, column=columns.label, num_labels=bundle.num_labels,
                           threshold=args.label_threshold, names=names)


def _checkpoint_dir(args: argparse.Namespace) -> CheckpointDir:
    return CheckpointDir(args.checkpoint_dir or Path("runs") / (args.session or DEFAULTS["session"]))


def _edge_trainer(args: argparse.Namespace, bundle: Bundle, directory: CheckpointDir) -> EdgeTrainer:
    return EdgeTrainer(bundle, cloud=args.cloud, checkpoint_dir=directory.root, token=session_token(args.token_file),
                       ssl=client_tls(args.cloud, args.ca_file), threads=args.threads,
                       retry=Backoff(give_up_after_s=args.reconnect_for) if args.reconnect_for > 0 else None,
                       progress=args.progress, fleet=args.fleet)


# --- commands --------------------------------------------------------------------------------


async def train_command(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(args.bundle, parts=("edge",))
    directory = _checkpoint_dir(args)
    saved = directory.all()
    previous = saved[-1].config if saved else None
    table = read_table(args.data, fmt=args.format)
    columns = _train_columns(args, previous)
    label_map = _train_label_map(args, table, columns, bundle, previous)
    data = table_texts(table, columns, label_map)
    config = run_config(args, bundle=bundle, table_columns=columns, label_map=label_map, num_examples=len(data),
                        saved=previous)
    train_data, held_out = _holdout(data, config.holdout, seed=config.seed)
    eval_data = _labelled(args.eval_file, args, columns, label_map)  # every input checked before any state is made
    async with _edge_trainer(args, bundle, directory) as trainer:
        if args.average_every and not args.fleet:
            raise UsageError("--average-every averages the edge halves of a fleet: give --fleet too")
        result = await trainer.train(train_data, config, checkpoint_every=args.checkpoint_every,
                                     average_every=args.average_every)
        summary = _train_summary(result, total=config.schedule["total_steps"], client=trainer.client)
        for name, test in (("holdout", held_out), ("eval_file", eval_data)):
            if test is not None:
                summary[f"{name}_metrics"] = await trainer.evaluate(test, batch_size=config.batch_size)
    _print_train(summary, directory)
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _holdout(data: TextData, fraction: float | None, *, seed: int) -> tuple[TextData, TextData | None]:
    if fraction is None:
        return data, None
    train_idx, test_idx = holdout_split(len(data), fraction=fraction, seed=seed)
    return data.subset(train_idx), data.subset(test_idx)


def _labelled(path: Path | None, args: argparse.Namespace, columns: Columns, label_map: LabelMap) -> TextData | None:
    return None if path is None else table_texts(read_table(path, fmt=args.format), columns, label_map)


def _train_summary(result: TrainResult, *, total: int, client: CloudClient) -> dict[str, Any]:
    """What the run did, as JSON: per-step losses, and bytes per step as the transport counted them."""
    ran = len(result.steps)
    summary: dict[str, Any] = {
        "first_step": result.start_step + 1,
        "last_step": result.last_step or result.start_step,
        "total_steps": total,
        "seconds": round(result.seconds, 3),
        "losses": result.losses,
        "step_bytes": [list(pair) for pair in result.step_bytes],
        "bytes_sent": client.bytes_sent,
        "bytes_received": client.bytes_received,
        "averaging_bytes": client.averaging_bytes,
        "shared_edge_bytes": client.shared_edge_bytes,
    }
    if ran:
        ups, downs = zip(*result.step_bytes)
        summary |= {
            "bytes_up_per_step": {"mean": sum(ups) / ran, "max": max(ups)},
            "bytes_down_per_step": {"mean": sum(downs) / ran, "max": max(downs)},
            "padded_tokens_per_step": sum(b * l for b, l in result.shapes) / ran,
        }
    return summary


def _print_train(summary: dict[str, Any], directory: CheckpointDir) -> None:
    ran = len(summary["losses"])
    if not ran:
        print(f"nothing to train: the run is at step {summary['last_step']} of {summary['total_steps']}")
    else:
        tail = summary["losses"][-50:]
        up, down = summary["bytes_up_per_step"], summary["bytes_down_per_step"]
        print(f"trained steps {summary['first_step']}..{summary['last_step']} of {summary['total_steps']} "
              f"in {summary['seconds']:.1f} s ({ran / max(summary['seconds'], 1e-9):.2f} steps/s); "
              f"mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}")
        print(f"bytes per step: up {up['mean']:.0f} (max {up['max']}), down {down['mean']:.0f} (max {down['max']}), "
              f"for {summary['padded_tokens_per_step']:.0f} tokens (batch × padded length) a step; "
              f"in all: up {summary['bytes_sent']}, down {summary['bytes_received']}")
        if summary["averaging_bytes"]:
            print(f"fleet averaging of the edge half: {summary['averaging_bytes']} bytes (included above)")
        if summary["shared_edge_bytes"]:
            print(f"the fleet's shared edge (edge gradients up, their sums down): {summary['shared_edge_bytes']} bytes "
                  "(included above)")
        print(f"checkpoint: {directory.latest().path}")
    for key in ("holdout_metrics", "eval_file_metrics"):
        if key in summary:
            print(f"{key.removesuffix('_metrics').replace('_', ' ')}: {_format_metrics(summary[key])}")


def _format_metrics(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())


def _saved_run(args: argparse.Namespace) -> tuple[Bundle, RunConfig]:
    """The bundle and the config of the latest run in the checkpoint dir, checked against the arguments."""
    bundle = load_bundle(args.bundle, parts=("edge",))
    directory = _checkpoint_dir(args)
    saved = directory.all()
    if not saved:
        raise ResumeError(f"no checkpoint in {directory.root}: run `sft-edge train` first (same --session or "
                          "--checkpoint-dir)")
    config = saved[-1].config
    if args.session is not None and args.session != config.session:
        raise ResumeError(f"{directory.root} holds session {config.session!r}, not {args.session!r}")
    if config.bundle_hash != bundle.hash:
        raise BundleError(f"{directory.root} was trained with another bundle than {args.bundle}")
    return bundle, replace(config, batch_size=_pick(args.batch_size, config.batch_size))


def _run_columns(args: argparse.Namespace, config: RunConfig, *, labels: bool) -> Columns:
    return Columns(
        text=_pick(args.text_column, config.columns["text"]),
        pair=_pick(args.text_pair_column, config.columns["pair"]),
        label=_pick(args.label_column, config.columns["label"]) if labels else None,
    )


async def eval_command(args: argparse.Namespace) -> dict[str, float]:
    bundle, config = _saved_run(args)
    data = table_texts(read_table(args.eval_file, fmt=args.format), _run_columns(args, config, labels=True),
                       LabelMap.from_dict(config.label_map))
    async with _edge_trainer(args, bundle, _checkpoint_dir(args)) as trainer:
        values = await trainer.evaluate(data, batch_size=config.batch_size)
    print(f"{args.eval_file} ({len(data)} rows): {_format_metrics(values)}")
    return values


async def predict_command(args: argparse.Namespace) -> None:
    bundle, config = _saved_run(args)
    data = table_texts(read_table(args.input, fmt=args.format), _run_columns(args, config, labels=False))
    output_format(args.out)
    async with _edge_trainer(args, bundle, _checkpoint_dir(args)) as trainer:
        logits = await trainer.predict(data, batch_size=config.batch_size)
    rows = prediction_rows(data, logits, LabelMap.from_dict(config.label_map))
    columns = ["text"] + (["text_pair"] if data.pairs is not None else []) + ["label", "score"]
    write_rows(args.out, rows, columns=columns)
    print(f"wrote {len(rows)} predictions to {args.out}")


COMMANDS = {"train": train_command, "eval": eval_command, "predict": predict_command, "doctor": doctor_command}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(f"sft-edge {args.command}", lambda: asyncio.run(COMMANDS[args.command](args)),
                     interrupted="interrupted; rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
