"""MetricsServer over real HTTP: /metrics content negotiation, probe transitions, 404s, port 0,
clean stop, and no per-request noise on stderr."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from streamcl.metrics.prometheus import ServiceMetrics
from streamcl.metrics.server import MetricsServer

OPENMETRICS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                      "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def get(url: str, *, method: str = "GET", headers: dict[str, str] | None = None
        ) -> tuple[int, str, bytes]:
    """(status, Content-Type, body), also for 4xx/5xx answers."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(url: str) -> tuple[int, Any]:
    status, ctype, body = get(url)
    assert ctype == "application/json"
    return status, json.loads(body)


@pytest.fixture
def metrics() -> ServiceMetrics:
    m = ServiceMetrics()
    m.observe_batch(consumed=8, trained=8, holdout=0, correct=6, loss=0.4, step_seconds=0.002)
    return m


def test_metrics_endpoint_speaks_both_exposition_formats(metrics: ServiceMetrics) -> None:
    with MetricsServer(metrics, "127.0.0.1", 0, live=lambda: True, ready=lambda: True) as server:
        status, ctype, body = get(f"{server.url}/metrics")
        assert status == 200
        assert ctype.startswith("text/plain; version=0.0.4")
        assert b"streamcl_samples_trained_total 8.0" in body
        assert body == metrics.render()
        # what Prometheus sends: it gets OpenMetrics
        status, ctype, body = get(f"{server.url}/metrics?x=1",
                                  headers={"Accept": OPENMETRICS_ACCEPT})
        assert status == 200 and ctype.startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n") and b"streamcl_samples_trained_total 8.0" in body
        status, _, body = get(f"{server.url}/metrics", method="HEAD")
        assert status == 200 and body == b""
        status, body_json = get_json(f"{server.url}/nope")
        assert status == 404 and "/metrics" in body_json["endpoints"]


def test_probes_follow_liveness_and_readiness(metrics: ServiceMetrics) -> None:
    live, ready = threading.Event(), threading.Event()
    live.set()
    metrics.set_journal(lag_entries=7, since_snapshot=3)
    with MetricsServer(metrics, "127.0.0.1", 0, live=live.is_set,
                       ready=ready.is_set) as server:
        assert get_json(f"{server.url}/healthz") == (200, {"status": "ok"})
        status, body = get_json(f"{server.url}/readyz")
        assert status == 503
        assert body["status"] == "not ready" and "recover" in body["reason"]
        assert body["journal_lag_entries"] == 7
        ready.set()  # caught up after recovery
        assert get_json(f"{server.url}/readyz") == (200, {"status": "ready"})
        live.clear()  # the loop died
        status, body = get_json(f"{server.url}/healthz")
        assert status == 503 and body["status"] == "unhealthy"


def test_a_probe_that_raises_answers_503(metrics: ServiceMetrics) -> None:
    def broken() -> bool:
        raise RuntimeError("loop state unreadable")

    with MetricsServer(metrics, "127.0.0.1", 0, live=broken, ready=broken) as server:
        for path in ("/healthz", "/readyz"):
            status, body = get_json(f"{server.url}{path}")
            assert status == 503 and "loop state unreadable" in body["reason"]
        assert get(f"{server.url}/metrics")[0] == 200  # the server itself is fine


def test_port_zero_stop_and_restart(metrics: ServiceMetrics) -> None:
    server = MetricsServer(metrics, "127.0.0.1", 0, live=lambda: True, ready=lambda: True)
    with pytest.raises(RuntimeError):
        _ = server.port  # not bound yet
    server.start()
    port = server.port
    assert port > 0
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    # the same port can be bound again at once (SO_REUSEADDR), as a restarted service would
    with MetricsServer(metrics, "127.0.0.1", port, live=lambda: True,
                       ready=lambda: True) as again:
        assert again.port == port
        assert get(f"{again.url}/healthz")[0] == 200


def test_requests_are_not_logged_to_stderr(metrics: ServiceMetrics,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    with MetricsServer(metrics, "127.0.0.1", 0, live=lambda: True, ready=lambda: False) as server:
        for path in ("/metrics", "/healthz", "/readyz", "/missing"):
            get(f"{server.url}{path}")
    out, err = capfd.readouterr()
    assert err == "" and out == ""
