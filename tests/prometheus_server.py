"""A real Prometheus server for tests: start it on scrape targets, query it, stop it.

Tests that claim "Prometheus can scrape this" should let Prometheus itself scrape it: its
parser, content negotiation (it asks for OpenMetrics first) and staleness handling are what
production sees, and a hand-written parser in a test would only agree with our own output.
This runs Debian's ``/usr/bin/prometheus`` (``apt-get install prometheus``) as a subprocess
with a throwaway config and TSDB directory on loopback ports.

Use it through the ``prometheus_server`` fixture (a factory: ``prometheus_server(["127.0.0.1:
9100"])`` returns a started :class:`PrometheusServer`, stopped at teardown), which
tests/conftest.py makes available to every test directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = ("Prometheus is not installed: run `apt-get install prometheus` (Debian's package "
                "ships /usr/bin/prometheus and /usr/bin/promtool)")

#: Poll interval while waiting for Prometheus (not a synchronisation sleep: every wait below
#: re-checks a condition until a deadline).
POLL_S = 0.1


def find_binary(name: str) -> str:
    """Path of ``prometheus`` / ``promtool``, or ``FileNotFoundError`` saying how to install."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK)
                                  else None)
    if path is None:
        raise FileNotFoundError(f"{name} not found. {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (Prometheus takes its address as a flag, not port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PrometheusError(RuntimeError):
    """Prometheus failed to start or answered a query with an error."""


class PrometheusServer:
    """One Prometheus process scraping ``targets`` (``host:port`` strings) every
    ``scrape_interval_s`` seconds under job ``job``, with its data in ``workdir``."""

    def __init__(self, targets: Sequence[str], workdir: Path, *, scrape_interval_s: float = 1.0,
                 job: str = "streamcl", metrics_path: str = "/metrics") -> None:
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self.metrics_path = metrics_path
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout_s: float = 20.0) -> PrometheusServer:
        """Start Prometheus and wait until it reports ready (``/-/ready``)."""
        binary = find_binary("prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        interval = f"{max(1, round(self.scrape_interval_s * 1000))}ms"
        config = {  # YAML is a superset of JSON
            "global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": interval},
            "scrape_configs": [{"job_name": self.job, "metrics_path": self.metrics_path,
                                "static_configs": [{"targets": self.targets}]}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [binary, f"--config.file={config_path}",
                     f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    # one core is plenty for a test scrape; leave the other to the test
                    env={**os.environ, "GOMAXPROCS": "1"})
            if self._wait_ready(timeout_s):
                return self
            exited = self._proc.poll() is not None
            self.stop()
            if not (exited and "address already in use" in self.log_tail()):
                break
        raise PrometheusError(f"Prometheus did not become ready within {timeout_s} s; its log:\n"
                              f"{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(POLL_S)
        return False

    def stop(self) -> None:
        """Terminate Prometheus (SIGTERM, then SIGKILL after 10 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("Prometheus not started")
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    # -- the HTTP API -----------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (raises on an API error)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query: the result vector as ``[{"metric": {...}, "value": [ts, "v"]}]``."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gives a {data['resultType']}, not a vector")
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now, or None while it has no series (not scraped yet)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr!r} has {len(result)} series: {result}")
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, expected: float | Callable[[float], bool],
                 timeout_s: float = 30.0) -> float:
        """Poll ``expr`` until its value equals ``expected`` (or satisfies it, if callable);
        return that value. On timeout, fail with the last value, the targets' scrape status
        and Prometheus' log, which is what one needs to see why."""
        check = expected if callable(expected) else (
            lambda v: v == expected or (math.isnan(v) and math.isnan(expected)))
        deadline = time.monotonic() + timeout_s
        last: float | None = None
        while True:
            last = self.value(expr)
            if last is not None and check(last):
                return last
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{expr!r} is {last} after {timeout_s} s, expected {expected}; targets: "
                    f"{self.target_health()}; log:\n{self.log_tail(2000)}")
            time.sleep(POLL_S)

    def target_health(self) -> list[dict[str, Any]]:
        """Each active target's ``scrapeUrl``, ``health`` and ``lastError``."""
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                for t in self.api("targets", state="active")["activeTargets"]]


@pytest.fixture
def prometheus_server(tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory fixture: ``prometheus_server(targets, scrape_interval_s=1.0)`` starts a real
    Prometheus scraping ``targets`` and returns it; every one started is stopped at teardown.
    Fails (never skips) when Prometheus is not installed: a skipped monitoring test looks
    green while checking nothing."""
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], **kwargs: Any) -> PrometheusServer:
        try:
            find_binary("prometheus")
        except FileNotFoundError as exc:
            pytest.fail(str(exc))
        server = PrometheusServer(targets, tmp_path_factory.mktemp("prometheus"), **kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
