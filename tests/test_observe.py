"""sft-cloud's status port: a real sft-cloud process with tokens, real edges training through the
library API, and a real HTTP client (urllib) reading the page, the JSON and the Prometheus metrics.

What is checked is what matters to an operator: the step, loss and bytes the cloud reports are the
edge's own counts, the metrics parse with Prometheus' own parser, and nothing served reveals a
token or a session id.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from cloud_harness import CloudProcess, EdgeSession, review_data, tiny_dropout_bundle, train_edge
from conftest import movie_reviews_path
from prometheus_client.parser import text_string_to_metric_families

from cloud_backend.cli import parse_args
from cloud_backend.session import session_key
from splitwire.bundle import load_bundle

TOKENS = {"alice-phone": "alice-secret-token-0123456789", "bob-tablet": "bob-secret-token-9876543210"}
STEPS = {"alice-phone": 5, "bob-tablet": 3}


def get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of a GET, with no credentials of any kind."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def status(url: str) -> dict:
    code, kind, body = get(f"{url}/status.json")
    assert code == 200 and kind == "application/json"
    return json.loads(body)


def by_session(document: dict) -> dict[str, dict]:
    return {row["session"]: row for row in document["sessions"]}


def samples(metrics: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition, parsed by prometheus_client: (name, labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics) for s in family.samples}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    return load_bundle(tiny_dropout_bundle(tmp_path_factory, tiny_model_dir))


def test_status_port_reports_the_edges_own_counts_and_no_secret(bundle, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{session} {token}\n" for session, token in TOKENS.items()))
    cloud = CloudProcess(bundle.root, tmp_path / "state", log_path=tmp_path / "cloud.log",
                         extra=("--tokens", str(tokens), "--status-port", "0")).start()
    reviews = review_data(movie_reviews_path(), slice(0, 48))
    seen_mid_training = []

    def look_before_step_4(step: int) -> None:
        if step == 4 and not seen_mid_training:
            seen_mid_training.append(by_session(status(cloud.status_url))[session_key("alice-phone")])

    try:
        started = time.time()
        outcomes = {session: asyncio.run(train_edge(
            EdgeSession(bundle, session, reviews, seed=1, steps=steps), cloud.url, tmp_path / session,
            token=TOKENS[session], before_step=look_before_step_4 if session == "alice-phone" else None))
            for session, steps in STEPS.items()}
        document = status(cloud.status_url)
        responses = [get(f"{cloud.status_url}{path}") for path in ("/", "/status.json", "/metrics", "/nowhere")]
    finally:
        cloud.stop()

    assert seen_mid_training[0]["step"] == 3 and seen_mid_training[0]["connected"] is True
    sessions = by_session(document)
    assert sessions.keys() == {session_key(session) for session in STEPS}
    for session, outcome in outcomes.items():
        row = sessions[session_key(session)]
        assert row["step"] == STEPS[session] == outcome.result.steps[-1]
        assert row["bytes_in"] == outcome.bytes_sent and row["bytes_out"] == outcome.bytes_received
        assert row["loss"] == outcome.result.losses[-1]
        assert row["connections"] == 1 and row["connected"] is False
        assert 0 < row["step_seconds"] < 60 and started <= row["last_seen"] <= time.time()
    assert document["server"]["steps"] == sum(STEPS.values()) and document["fleets"] == []

    page, metrics = responses[0], responses[2]
    assert page[0] == 200 and page[1].startswith("text/html") and "sft-cloud status" in page[2]
    assert all(session_key(session) in page[2] for session in STEPS)
    assert metrics[0] == 200 and metrics[1].startswith("text/plain; version=")
    values = samples(metrics[2])
    for session, outcome in outcomes.items():
        label = (("session", session_key(session)),)
        assert values[("splitft_session_step", label)] == STEPS[session]
        assert values[("splitft_session_received_bytes_total", label)] == outcome.bytes_sent
        assert values[("splitft_session_sent_bytes_total", label)] == outcome.bytes_received
        assert values[("splitft_session_loss", label)] == outcome.result.losses[-1]
    assert values[("splitft_cloud_steps_total", ())] == sum(STEPS.values())
    assert values[("splitft_cloud_step_seconds_count", ())] == sum(STEPS.values())
    assert values[("splitft_cloud_welcomed_total", ())] == len(STEPS)
    assert responses[3][0] == 404
    for _, _, body in responses:
        for session, token in TOKENS.items():
            assert token not in body and session not in body


def test_status_port_is_off_by_default_and_checked():
    assert parse_args(["--bundle", "b"]).status_port is None
    with pytest.raises(SystemExit):
        parse_args(["--bundle", "b", "--status-port", "70000"])
