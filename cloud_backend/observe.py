"""What sft-cloud is doing, for its operator: a status page, a JSON document and Prometheus metrics.

Why it exists: a cloud that trains many devices' sessions must be watched without reading its
log: which sessions (and fleets) train, at which step and loss, how many bytes they move, how
long a step takes, when each was last seen. ``sft-cloud --status-port PORT`` serves, on its own
HTTP port, beside the edges' websocket port:

- ``/``: a human page (refreshes itself every 5 s);
- ``/status.json``: the same as JSON (``SessionStatus``, ``FleetStatus``, the server's counters);
- ``/metrics``: Prometheus' text format, written by ``prometheus_client``.

Nothing there needs a token, so nothing there may reveal one, nor a session id: session ids are
what a device presents with its token, and the cloud does not tell which ones exist
(``cloud_backend.auth``). A session appears under ``session_key`` (a hash, the name of its files
in the state dir), no peer address is shown. HTTP itself is the websockets library's (the
``process_request`` hook answers every request; no connection is ever upgraded), on the same
event loop as the server, so what is read is never changed half-way by another thread.

Fleets plug in through ``StatusSource.fleet_statuses``: whatever holds fleets returns one
``FleetStatus`` each.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import html
import json
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, AsyncIterator, Iterator, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

REFRESH_S = 5
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LABELLED_COUNTERS = {"refused": "code", "aborted": "why"}  # ServerStats' Counter fields, by their label name
GAUGES = {"open_connections"}  # ServerStats' fields that go down as well as up


@dataclass
class Activity:
    """What one session did on the wire since this process loaded it into memory: websocket
    message bytes each way (hello, requests and bye in; welcome and replies out, as the edge
    counts them), its connections, its last loss and step latency, and when it was last seen."""

    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0
    loss: float | None = None
    step_seconds: float | None = None  # from the request's arrival to its reply: queueing included
    last_seen: float = dataclasses.field(default_factory=time.time)  # Unix time

    def received(self, size: int) -> None:
        self.bytes_in += size
        self.last_seen = time.time()

    def sent(self, size: int) -> None:
        self.bytes_out += size
        self.last_seen = time.time()


@dataclass(frozen=True)
class SessionStatus:
    """One session as the status port shows it; ``session`` is its ``session_key``, never its id."""

    session: str
    step: int
    connected: bool
    bytes_in: int
    bytes_out: int
    connections: int
    loss: float | None
    step_seconds: float | None
    last_seen: float


@dataclass(frozen=True)
class FleetStatus:
    """One fleet (sessions that train one shared top part) as the status port shows it."""

    fleet: str  # a name the operator gave, or a hash of it: never a token
    schedule: str
    devices: int  # sessions that belong to it
    connected: int  # of those, connected now
    step: int
    bytes_in: int
    bytes_out: int
    loss: float | None
    step_seconds: float | None
    last_seen: float


class StatusSource(Protocol):
    """What the status port reads: ``CloudServer`` is one."""

    stats: Any  # ``ServerStats``: ints and ``collections.Counter``s

    def session_statuses(self) -> list[SessionStatus]: ...

    def fleet_statuses(self) -> list[FleetStatus]: ...


def status_document(source: StatusSource) -> dict[str, Any]:
    """The JSON document: the time, the server's counters, every session and fleet."""
    return {"time": round(time.time(), 3), "server": dataclasses.asdict(source.stats),
            "sessions": [dataclasses.asdict(s) for s in source.session_statuses()],
            "fleets": [dataclasses.asdict(f) for f in source.fleet_statuses()]}


class Metrics:
    """The Prometheus registry of one server: its counters and every session's figures, read at
    each scrape, and a histogram of step latency fed as steps complete."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source
        self.registry = CollectorRegistry()
        self.step_seconds = Histogram("splitft_cloud_step_seconds", "Training step latency on the cloud, from the "
                                      "request's arrival to its reply (queueing included)",
                                      buckets=STEP_SECONDS_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield from self._server_metrics()
        yield from self._per("session", self.source.session_statuses())
        yield from self._per("fleet", self.source.fleet_statuses())

    def _server_metrics(self) -> Iterator[Metric]:
        for name, value in dataclasses.asdict(self.source.stats).items():
            what = f"sft-cloud's {name.replace('_', ' ')}"
            if name in GAUGES:
                yield GaugeMetricFamily(f"splitft_cloud_{name}", what, value=value)
            elif name in LABELLED_COUNTERS:
                family = CounterMetricFamily(f"splitft_cloud_{name}", what, labels=[LABELLED_COUNTERS[name]])
                for label, count in sorted(collections.Counter(value).items()):
                    family.add_metric([label], count)
                yield family
            else:
                yield CounterMetricFamily(f"splitft_cloud_{name}", what, value=value)

    @staticmethod
    def _per(kind: str, rows: list[SessionStatus] | list[FleetStatus]) -> Iterator[Metric]:
        """One family per figure, one sample per session (or fleet), labelled by its key."""
        families = {
            "step": GaugeMetricFamily(f"splitft_{kind}_step", f"Last training step the {kind} applied", labels=[kind]),
            "bytes_in": CounterMetricFamily(f"splitft_{kind}_received_bytes", f"Websocket message bytes from the "
                                            f"{kind}'s edge(s)", labels=[kind]),
            "bytes_out": CounterMetricFamily(f"splitft_{kind}_sent_bytes", f"Websocket message bytes to the "
                                             f"{kind}'s edge(s)", labels=[kind]),
            "loss": GaugeMetricFamily(f"splitft_{kind}_loss", f"Loss of the {kind}'s last step", labels=[kind]),
            "step_seconds": GaugeMetricFamily(f"splitft_{kind}_step_seconds", f"Latency of the {kind}'s last step",
                                              labels=[kind]),
            "last_seen": GaugeMetricFamily(f"splitft_{kind}_last_seen_timestamp_seconds",
                                           f"When the {kind} last sent or received a message (Unix time)",
                                           labels=[kind]),
        }
        for row in rows:
            key = row.session if isinstance(row, SessionStatus) else row.fleet
            for field, family in families.items():
                value = getattr(row, field)
                if value is not None:
                    family.add_metric([key], value)
        yield from families.values()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def status_page(document: dict[str, Any]) -> str:
    """The human page: the server's counters, then one table row per fleet and per session."""
    def table(rows: list[dict[str, Any]], caption: str) -> str:
        if not rows:
            return f"<h2>{caption}</h2><p>none</p>"
        head = "".join(f"<th>{html.escape(key)}</th>" for key in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_shown(key, value))}</td>" for key, value in row.items())
                       + "</tr>" for row in rows)
        return f"<h2>{caption}</h2><table><tr>{head}</tr>{body}</table>"

    server = [{"counter": key, "value": json.dumps(value)} for key, value in document["server"].items()]
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='{REFRESH_S}'>"
            "<title>sft-cloud status</title><style>td,th{padding:2px 8px;text-align:right}</style></head><body>"
            f"<h1>sft-cloud status</h1><p>{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(document['time']))}"
            " · <a href='status.json'>status.json</a> · <a href='metrics'>metrics</a></p>"
            + table(document["fleets"], "Fleets") + table(document["sessions"], "Sessions")
            + table(server, "Server") + "</body></html>")


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "last_seen":
        return f"{max(0.0, time.time() - value):.1f} s ago"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class StatusServer:
    """Answers the status port's requests from a ``StatusSource``."""

    def __init__(self, source: StatusSource, metrics: Metrics) -> None:
        self.source, self.metrics = source, metrics
        self.url = ""

    def answer(self, connection: ServerConnection, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            return _response(connection, self.metrics.exposition().decode(), CONTENT_TYPE_LATEST)
        if path == "/status.json":
            return _response(connection, json.dumps(status_document(self.source)), "application/json")
        if path == "/":
            return _response(connection, status_page(status_document(self.source)), "text/html; charset=utf-8")
        return _response(connection, "not found: try /, /status.json or /metrics\n", "text/plain; charset=utf-8",
                         HTTPStatus.NOT_FOUND)


def _response(connection: ServerConnection, body: str, content_type: str,
              status: HTTPStatus = HTTPStatus.OK) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]  # respond's text/plain: websockets' Headers add, never replace
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


@contextlib.asynccontextmanager
async def serve_status(source: StatusSource, metrics: Metrics, *, host: str, port: int) -> AsyncIterator[StatusServer]:
    """Serve the status port until the block exits; ``port=0`` picks a free one (see ``.url``)."""
    status = StatusServer(source, metrics)
    async with serve(lambda connection: None, host, port, process_request=status.answer,
                     compression=None) as http_server:
        status.url = f"http://{host}:{http_server.sockets[0].getsockname()[1]}"
        yield status
