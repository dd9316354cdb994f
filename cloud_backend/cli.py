"""``sft-cloud``: serve a bundle's cloud half to edge devices over websockets.

Why it exists: the operator's entry point. It loads and verifies the bundle's ``cloud/``
files, starts ``serve_cloud``, prints the URL it listens on (one line on stdout, so
scripts and tests can read it, also with ``--port 0``), logs one JSON line per event on
stderr, and on SIGINT/SIGTERM stops accepting, lets in-flight steps finish, checkpoints
every session into ``--state-dir`` and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from cloud_backend.server import serve_cloud
from splitwire.bundle import BundleError, load_bundle
from splitwire.protocol import DEFAULT_MAX_BATCH


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sft-cloud",
        description="Train the cloud half of a split fine-tuning bundle for edge devices that connect over "
                    "websockets. Each session id gets its own copy of the top part and its own optimizer.",
        epilog="Example: sft-cloud --bundle bundles/minilm-s3-r8 --state-dir runs/cloud-state "
               "(then point sft-edge at the printed ws:// URL).",
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory written by sft-export")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the top part trains (default: auto = CUDA when present)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where sessions are checkpointed (on request and at shutdown) and restored from "
                             "after a restart; without it, sessions live in memory only")
    parser.add_argument("--max-sessions", type=int, default=64, help="sessions held at once (default: 64)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"largest batch a device may send (default: {DEFAULT_MAX_BATCH})")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is outside 0..65535")
    if args.max_sessions < 1 or args.max_batch < 1:
        parser.error("--max-sessions and --max-batch must be at least 1")
    return args


async def _serve(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle, parts=["cloud"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_cloud(bundle, host=args.host, port=args.port, device=args.device, state_dir=args.state_dir,
                           max_sessions=args.max_sessions, max_batch=args.max_batch) as server:
        print(f"sft-cloud listening on {server.url}", flush=True)
        await stop.wait()
    print("sft-cloud stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve(args))
    except (BundleError, ValueError, OSError) as exc:
        print(f"sft-cloud: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
