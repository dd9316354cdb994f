"""``sft-cloud``: serve a bundle's cloud half to edge devices over websockets.

Why it exists: the operator's entry point. It loads and verifies the bundle's ``cloud/``
files, starts ``serve_cloud``, prints the URL it listens on (one line on stdout, so
scripts and tests can read it, also with ``--port 0``), logs one JSON line per event on
stderr, and on SIGINT/SIGTERM stops accepting, lets in-flight steps finish, checkpoints
every session into ``--state-dir`` and exits 0.

Safe by default: it listens on loopback only. Listening on any other interface needs
per-session tokens (``--tokens FILE`` or ``$SFT_CLOUD_TOKENS``) and TLS (``--tls-cert`` and
``--tls-key``, so tokens and activations are not sent in clear), unless ``--insecure`` says
the network is trusted. Tokens are never taken from the command line. See docs/SECURITY.md.

With ``--distributed`` it is one worker of a group that torchrun started, serving its share of
a fleet's devices (``cloud_backend.fleet_workers``, docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from cloud_backend.auth import TOKENS_ENV, TokenStore
from cloud_backend.distributed import init_from_env
from cloud_backend.fleet import EDGES as FLEET_EDGES, SCHEDULES as FLEET_SCHEDULES, CloudFleet, FleetSettings
from cloud_backend.fleet_workers import WorkerFleet
from cloud_backend.guard import DEFAULT_SEND_TIMEOUT_S
from cloud_backend.launch import LISTENING, STATUS
from cloud_backend.model import pick_device
from cloud_backend.server import (
    DEFAULT_HELLO_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_STATE_BYTES, DEFAULT_SESSION_TTL_S, log_event,
    serve_cloud,
)
from splitwire.bundle import load_bundle
from splitwire.errors import UsageError
from splitwire.exit_codes import EPILOG as EXIT_STATUS, exit_code
from splitwire.protocol import DEFAULT_MAX_BATCH


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sft-cloud",
        description="Train the cloud half of a split fine-tuning bundle for edge devices that connect over "
                    "websockets. Each session id gets its own copy of the top part and its own optimizer.",
        epilog="example: sft-cloud --bundle bundles/minilm-s3-r8 --state-dir runs/cloud-state\n"
               "  (then point sft-edge at the printed ws:// URL)\n\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", required=True, type=Path, help="bundle directory written by sft-export")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the top part trains (default: auto = CUDA when present)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where sessions are checkpointed (on request and at shutdown) and restored from "
                             "after a restart; without it, sessions live in memory only")
    parser.add_argument("--max-sessions", type=int, default=64,
                        help="sessions held in memory at once; beyond it, with --state-dir, the least recently used "
                             "disconnected session is saved and evicted (default: 64)")
    parser.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_S,
                        help="a session disconnected for longer than this many seconds gives its place in memory to "
                             f"a new one (saved first with --state-dir) (default: {DEFAULT_SESSION_TTL_S:g})")
    parser.add_argument("--max-state-mb", type=int, default=DEFAULT_MAX_STATE_BYTES >> 20,
                        help="keep --state-dir within this many MiB by deleting the least recently saved sessions "
                             f"that are not in memory; 0: no limit (default: {DEFAULT_MAX_STATE_BYTES >> 20})")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"largest batch a device may send (default: {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="open connections at once (default: twice --max-sessions)")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help=f"close a connection that sends nothing for this many seconds; the edge reconnects "
                             f"(default: {DEFAULT_IDLE_TIMEOUT_S:g})")
    parser.add_argument("--hello-timeout", type=float, default=DEFAULT_HELLO_TIMEOUT_S,
                        help=f"close a connection that has not said hello after this many seconds "
                             f"(default: {DEFAULT_HELLO_TIMEOUT_S:g})")
    parser.add_argument("--send-timeout", type=float, default=DEFAULT_SEND_TIMEOUT_S,
                        help=f"cut off a peer that reads nothing of what it is sent for this many seconds "
                             f"(default: {DEFAULT_SEND_TIMEOUT_S:g})")
    parser.add_argument("--tokens", type=Path, default=None,
                        help=f"file of per-session tokens, one 'session_id token' or 'session_id sha256:HEX' a "
                             f"line, optionally followed by the fleets it may join ('... fleet-a,fleet-b') "
                             f"(default: ${TOKENS_ENV}, same lines); a session opens only with its own token")
    parser.add_argument("--status-port", type=int, default=None,
                        help="also serve over HTTP on this port (0 picks a free one, printed on stdout): a status "
                             "page (/), its JSON (/status.json) and Prometheus metrics (/metrics); they need no "
                             "token and show no token or session id (default: off)")
    parser.add_argument("--status-host", default="127.0.0.1",
                        help="interface of --status-port (default: 127.0.0.1)")
    fleets = parser.add_argument_group(
        "fleets", "sessions whose edge names a fleet (sft-edge --fleet) share one top part and one optimizer; "
                  "with --tokens, a session may join only the fleets its token line lists")
    fleets.add_argument("--fleet-schedule", choices=FLEET_SCHEDULES, default="sync",
                        help="sync: a round takes one batch from every member in a fixed order and makes one step "
                             "(deterministic); async: requests are applied as they arrive, concurrent ones stacked "
                             "into one step (default: sync)")
    fleets.add_argument("--round-timeout", type=float, default=FleetSettings.round_timeout,
                        help="sync: a round (and a checkpoint or averaging round) goes ahead without the members "
                             "missing after this many seconds; they rejoin by sending again "
                             f"(default: {FleetSettings.round_timeout:g})")
    fleets.add_argument("--fleet-quorum", type=int, default=FleetSettings.quorum,
                        help="sync: a fleet's first round waits until this many devices joined (default: 1)")
    fleets.add_argument("--fleet-max-rows", type=int, default=FleetSettings.max_rows,
                        help=f"async: rows stacked into one step at most (default: {FleetSettings.max_rows})")
    fleets.add_argument("--fleet-max-wait-ms", type=float, default=1000 * FleetSettings.max_wait,
                        help="async: how long a step waits for more requests after the first "
                             f"(default: {1000 * FleetSettings.max_wait:g})")
    fleets.add_argument("--fleet-edge", choices=FLEET_EDGES, default=FleetSettings.edge,
                        help="personal: each device trains its own edge half (FedAvg on request, sft-edge "
                             "--average-every); shared: one edge for the whole fleet, each round's edge gradients "
                             "summed through the cloud so every device applies the same step (sync schedule, onnx "
                             "engine; each step moves the edge's weight bytes up and down, docs/USAGE.md) "
                             "(default: personal)")
    fleets.add_argument("--distributed", action="store_true",
                        help="run as one worker of a group that torchrun started (torchrun --nproc-per-node N -m "
                             "cloud_backend.cli --distributed ...): each worker serves its share of a fleet's "
                             "devices and the fleet's top part is data-parallel across the workers (gloo on the "
                             "CPU, NCCL on CUDA); the worker of local rank r listens on --port + r (and "
                             "--status-port + r) and keeps its state in --state-dir/rank-R; sync schedule only "
                             "(docs/SCALING.md)")
    fleets.add_argument("--distributed-timeout", type=float, default=1800.0,
                        help="--distributed: a collective that waits longer than this many seconds for a worker "
                             "fails, and the group stops (default: 1800)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve wss:// (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without tokens or without TLS (trusted networks only)")
    args = parser.parse_args(argv)
    for flag in ("port", "status_port"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 65535:
            parser.error(f"--{flag.replace('_', '-')} {value} is outside 0..65535")
    if args.max_sessions < 1 or args.max_batch < 1 or (args.max_connections is not None and args.max_connections < 1):
        parser.error("--max-sessions, --max-batch and --max-connections must be at least 1")
    if args.max_state_mb < 0:
        parser.error("--max-state-mb must be >= 0 (0: no limit)")
    for flag in ("idle_timeout", "hello_timeout", "send_timeout", "session_ttl"):
        if not 0 < getattr(args, flag) < 1e6:
            parser.error(f"--{flag.replace('_', '-')} must be positive (seconds)")
    try:
        args.fleets = FleetSettings(args.fleet_schedule, args.round_timeout, args.fleet_quorum, args.fleet_max_rows,
                                    args.fleet_max_wait_ms / 1000, args.fleet_edge)
    except UsageError as exc:
        parser.error(str(exc))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.distributed and (args.fleet_schedule != "sync" or args.port == 0 or not args.distributed_timeout > 0):
        parser.error("--distributed needs --fleet-schedule sync, a --port other than 0 (worker r listens on "
                     "--port + r) and a positive --distributed-timeout")
    if args.distributed and args.fleet_edge == "shared":
        parser.error("--fleet-edge shared is not available with --distributed: the edge gradients would have to be "
                     "summed across the workers, which only the top part's are")
    return args


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(args: argparse.Namespace, tokens: TokenStore | None) -> None:
    """Refuse to listen beyond loopback without tokens and TLS, unless ``--insecure``."""
    if is_loopback(args.host) or args.insecure:
        return
    missing = [what for what, given in (("per-session tokens (--tokens FILE or $" + TOKENS_ENV + ")", tokens),
                                        ("TLS (--tls-cert and --tls-key)", args.tls_cert)) if given is None]
    if missing:
        raise UsageError(f"--host {args.host} is reachable from the network, but {' and '.join(missing)} "
                         "are not set; give them, or pass --insecure on a trusted network")


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _as_worker(args: argparse.Namespace) -> argparse.Namespace:
    """Join torchrun's group: the options of this worker (its port, status port and state dir)."""
    worker = init_from_env(pick_device(args.device), timeout_s=args.distributed_timeout)
    log_event("distributed_worker", rank=worker.rank, world_size=worker.world_size, local_rank=worker.local_rank,
              pid=os.getpid())
    own = {"port": args.port + worker.local_rank,
           "status_port": args.status_port and args.status_port + worker.local_rank,  # None and 0 stay
           "state_dir": None if args.state_dir is None else args.state_dir / f"rank-{worker.rank}"}
    return argparse.Namespace(**(vars(args) | own))


async def _serve(args: argparse.Namespace) -> None:
    tokens = TokenStore.load(args.tokens)
    check_exposure(args, tokens)
    tls = tls_context(args.tls_cert, args.tls_key)
    bundle = load_bundle(args.bundle, parts=["cloud"])
    args = _as_worker(args) if args.distributed else args
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_cloud(bundle, host=args.host, port=args.port, device=args.device, state_dir=args.state_dir,
                           max_sessions=args.max_sessions, max_batch=args.max_batch, ssl=tls, tokens=tokens,
                           idle_timeout=args.idle_timeout, max_connections=args.max_connections,
                           hello_timeout=args.hello_timeout, send_timeout=args.send_timeout,
                           session_ttl=args.session_ttl,
                           max_state_bytes=(args.max_state_mb << 20) or None, fleets=args.fleets,
                           fleet_type=WorkerFleet if args.distributed else CloudFleet,
                           status_host=args.status_host,
                           status_port=args.status_port) as server:
        print(f"{LISTENING}{server.url}", flush=True)
        if server.status_url:
            print(f"{STATUS}{server.status_url}", flush=True)
        await stop.wait()
    print("sft-cloud stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    return exit_code("sft-cloud", lambda: asyncio.run(_serve(args)))


if __name__ == "__main__":
    sys.exit(main())
