"""``sft-export``: write a split fine-tuning bundle from a BERT-family model id or directory.

Why it exists: the command-line face of ``exporter.export.export_bundle``. Mistakes the
user can fix (a split or rank the model cannot take, an existing output directory, no
tokenizer) end with one line saying what to change and the exit status every splitft command
gives it (``splitwire.exit_codes``), not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from exporter.export import EXPORT_LOG, export_bundle
from exporter.progress import library_chatter
from models.loading import POOLING_CHOICES
from models.spec import HEADS
from splitwire.manifest import ENGINES, MOMENT_DTYPES
from splitwire.exit_codes import EPILOG as EXIT_STATUS, exit_code


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


EXAMPLES = """examples:
  sft-export --model bert-base-uncased --split 4 --rank 8 --out bundles/bert-s4-r8
  sft-export --model ./my-finetuned-bert --split 3 --freeze-embeddings --out bundles/pi
  sft-export --model bert-base-uncased --split 4 --train-edge-layers 1 --edge-moments bf16 --out bundles/pi-zero
      (a 512 MiB device: only the split layer's attention block and the compression head train on the edge)
  sft-export --model roberta-base --split 4 --out bundles/roberta-s4   (also xlm-roberta, distilbert, electra)
  sft-export --model sentence-transformers/all-MiniLM-L6-v2 --split 3 --out bundles/st   (mean pooling, from 1_Pooling)
  sft-export --model bert-base-uncased --split 4 --engine ort-training --out bundles/x86   (the deprecated engine)
  sft-export --model bert-base-uncased --init random --tokenizer ./minilm --split 4 --out bundles/bert-dims
      (offline: bert-base dims with random weights; any uncased BERT vocabulary as tokenizer)
  sft-export --model bert-base-uncased --split 4 --no-compression --out bundles/vanilla   (the baseline)
  sft-export --model bert-base-uncased --split 4 --label-private --out bundles/private   (labels stay on the device)
  sft-export --model bert-base-uncased --split 4 --head principal --calibration-text public.txt --heal-steps 300 \\
      --out bundles/principal   (a calibrated head, healed; public text only, never the fine-tuning data)

A device needs manifest.json and edge/ of the bundle directory; sft-cloud needs manifest.json and cloud/.
Supported families: BERT (and MiniLM), RoBERTa, XLM-RoBERTa, CamemBERT, DistilBERT, ELECTRA.
The torch exporter's own messages go to OUT/export.log (--verbose prints them).

""" + EXIT_STATUS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft-export", description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local directory, or (with --init random) a preset")
    p.add_argument("--split", required=True, type=_positive_int,
                   help="encoder layers on the edge; the cut falls inside layer SPLIT")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--rank", type=_positive_int, default=8, help="SVD rank of the compression head (default 8)")
    width.add_argument("--no-compression", action="store_true",
                       help="vanilla split: send the full hidden activation, keep the residual link")
    p.add_argument("--num-labels", type=_positive_int, default=2, help="classes; 1 means regression (default 2)")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="do not train the word, position and token-type embeddings on the edge")
    p.add_argument("--train-edge-layers", type=int, metavar="N",
                   help="train only the top N edge layers (the split layer's attention block counts as one; 0: only "
                        "the compression head); the embeddings and the layers below are frozen, so the edge's "
                        "backward stops at the first trained layer (default: all of them train)")
    p.add_argument("--edge-lora-rank", type=_positive_int, metavar="R",
                   help="LoRA adapters of rank R on the edge layers' attention and FFN projections: only the adapters "
                        "and the compression head train on the device; they merge into the weights for inference "
                        "(onnx engine)")
    p.add_argument("--edge-lora-alpha", type=float, metavar="A",
                   help="the adapters' scale is A / R (default A = 2 R)")
    p.add_argument("--edge-moments", choices=MOMENT_DTYPES, default="fp32",
                   help="dtype of the edge AdamW's two moments: fp32 (exact torch.optim.AdamW; the default) or bf16 "
                        "(half the optimizer memory and checkpoint, moments rounded each step; onnx engine only)")
    p.add_argument("--head-lr-scale", type=float, default=1.0, metavar="K",
                   help="train the compression head's parameters (new at the cut: the edge's head, the cloud's "
                        "decompression and residual rebuild) at K times the learning rate (default 1; onnx engine; "
                        "docs/USAGE.md)")
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="pretrained weights, or random weights from the config (offline bert-base-sized runs)")
    p.add_argument("--revision", help="hub revision of --model")
    p.add_argument("--tokenizer", help="directory or hub id of the tokenizer, when --model has none")
    p.add_argument("--engine", choices=ENGINES, default="onnx",
                   help="edge engine: onnx (plain onnxruntime, any platform; the default) or ort-training "
                        "(onnxruntime-training 1.19, deprecated, x86_64 and Python <= 3.11 only)")
    p.add_argument("--pooling", choices=POOLING_CHOICES, default="auto",
                   help="sentence vector for the classifier: auto (mean where the checkpoint's sentence-transformers "
                        "1_Pooling/config.json says so, else the family's head on the first token), cls, or mean")
    p.add_argument("--head", choices=HEADS, default="svd",
                   help="how the compression head is made: svd (the paper's: SVD of the split layer's W1; the "
                        "default), activation-svd (SVD of W1 whitened by its input's covariance on the calibration "
                        "text), principal (the top principal directions of that input, residual rebuilt on the "
                        "cloud); all send the same B x L x rank values")
    p.add_argument("--label-private", action="store_true",
                   help="the U-shaped split: the device also holds the pooling layer, the classifier and the loss, "
                        "so no label, loss or logit leaves it; the cloud sends down the pooled top output "
                        "(B x hidden) and gets its gradient back (docs/SECURITY.md)")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="public text (plain lines, or a column of CSV/TSV/JSONL with --calibration-column), never "
                        "the fine-tuning data: fits activation-svd/principal, heals, and gives the fidelity report")
    p.add_argument("--calibration-column", metavar="NAME", help="the text column of a CSV/TSV/JSONL --calibration-text")
    p.add_argument("--heal-steps", type=int, default=0,
                   help="steps of export-time distillation of the head and the cloud's split FFN toward the "
                        "original layer on the calibration text (default 0; a few hundred)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW eps (default 1e-8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier (and of --init random)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--verbose", action="store_true",
                   help="print the torch exporter's and transformers' own messages instead of keeping them in "
                        f"OUT/{EXPORT_LOG}")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    with contextlib.nullcontext() if args.verbose else library_chatter() as chatter:
        return exit_code("sft-export", lambda: print(_export(args, chatter)))


def _export(args: argparse.Namespace, chatter: io.StringIO | None) -> Path:
    return export_bundle(
        model=args.model, split=args.split, rank=None if args.no_compression else args.rank,
        num_labels=args.num_labels, max_length=args.max_length, freeze_embeddings=args.freeze_embeddings,
        train_edge_layers=args.train_edge_layers, edge_moments=args.edge_moments, head_lr_scale=args.head_lr_scale,
        edge_lora_rank=args.edge_lora_rank, edge_lora_alpha=args.edge_lora_alpha,
        init=args.init, revision=args.revision, tokenizer=args.tokenizer, engine=args.engine, pooling=args.pooling,
        head=args.head, label_private=args.label_private, calibration_text=args.calibration_text, calibration_column=args.calibration_column,
        heal_steps=args.heal_steps, lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), eps=args.eps, seed=args.seed,
        out=args.out, force=args.force, library_log=chatter,
    )

if __name__ == "__main__":
    sys.exit(main())
