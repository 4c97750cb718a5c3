"""The Grafana dashboard without a Grafana server: its JSON against Grafana's dashboard schema
(the typed models of ``grafana-foundation-sdk``, generated from that schema), and every query
evaluated by a real Prometheus scraping a real ``streamcl run`` that has trained, published,
rejected a candidate, dead-lettered bad messages and opened experiences, and a real
``streamcl serve`` that has hot-swapped the versions it published and answered inferences: a
panel whose query returns nothing here would be an empty panel for a user."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamcl.data import digits, split_stream
from streamcl.stream.broker import ensure_topics
from streamcl.stream.producer import produce_stream

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamcl.json"
GRAFANA_VARIABLES = {"__rate_interval": "2m", "__interval": "15s", "__range": "1h",
                     "__range_s": "3600", "__interval_ms": "15000", "instance": ".*",
                     "server": ".*"}
# Annotation options the Prometheus data source reads from the annotation itself; Grafana's
# schema leaves a data source's own options out of its typed model (they pass through).
PROMETHEUS_ANNOTATION_OPTIONS = {"step", "titleFormat", "textFormat", "tagKeys",
                                 "useValueForTime"}
DEADLINE_S = 180.0


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def unknown_fields(original: Any, typed: Any, path: str = "") -> list[str]:
    """Paths of the JSON fields the typed model did not keep (unknown to the schema), and of
    values it changed."""
    out: list[str] = []
    if isinstance(original, dict):
        if not isinstance(typed, dict):
            return [f"{path}: not an object in the schema"]
        for key, value in original.items():
            if key not in typed:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(value, typed[key], f"{path}.{key}")
    elif isinstance(original, list):
        if not isinstance(typed, list) or len(typed) != len(original):
            return [f"{path}: list changed"]
        for i, (a, b) in enumerate(zip(original, typed, strict=True)):
            out += unknown_fields(a, b, f"{path}[{i}]")
    elif original != typed:
        out.append(f"{path}: {original!r} -> {typed!r}")
    return out


def test_dashboard_matches_grafanas_schema() -> None:
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()  # panel and query types decode into their own models
    original = dashboard()
    typed = json.loads(json.dumps(Dashboard.from_json(original), cls=JSONEncoder))
    problems = [p for p in unknown_fields(original, typed)
                if not (re.match(r"\.annotations\.list\[\d+\]\.(\w+)$", p)
                        and p.rsplit(".", 1)[1] in PROMETHEUS_ANNOTATION_OPTIONS)]
    assert not problems, f"fields Grafana's dashboard schema does not have: {problems}"
    # the decoding is not vacuous: the panels became typed panels with typed queries
    assert len(typed["panels"]) == len(original["panels"]) > 20


def queries() -> list[tuple[str, str]]:
    """``(where, PromQL with Grafana's variables filled in)`` for every panel target, every
    annotation and every template variable (``label_values(m, l)`` queries ``m``)."""
    d = dashboard()
    found = [(f"panel {p['title']!r}", t["expr"]) for p in d["panels"]
             for t in p.get("targets", [])]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in d["annotations"]["list"]
              if a.get("expr")]
    for var in d["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        found.append((f"variable {var['name']!r}", match.group(1) if match else query))
    out = []
    for where, expr in found:
        filled = re.sub(r"\$\{?(\w+)\}?",
                        lambda m: GRAFANA_VARIABLES.get(m.group(1), m.group(0)), expr)
        assert "$" not in filled, f"{where}: a variable nothing defines in {expr!r}"
        out.append((where, filled))
    return out


def test_every_query_parses_with_a_promql_parser() -> None:
    import promql_parser

    for where, expr in queries():
        try:
            promql_parser.parse(expr)
        except Exception as exc:  # the parser's own error types
            pytest.fail(f"{where}: {expr!r} does not parse: {exc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _sample(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#")]
    return sum(values)


class Service:
    """`streamcl run` on the session broker, publishing often behind a strict gate."""

    def __init__(self, bootstrap: str, tmp: Path) -> None:
        self.bootstrap, self.log = bootstrap, tmp / "service.log"
        self.topic, name = f"dash-{uuid.uuid4().hex[:8]}", f"dash-{uuid.uuid4().hex[:8]}"
        self.name, self.registry = name, tmp / "registry"
        self.port = _free_port()
        config = tmp / "streamcl.yaml"
        config.write_text(yaml.safe_dump({
            "learner": {"input_shape": [64], "hidden": [16], "strategy": "naive",
                        "torch_threads": 1},
            "kafka": {"bootstrap_servers": bootstrap},
            "consumer": {"topic": self.topic, "batch_size": 16, "encoding": "json"},
            "journal": {"name": name},
            "snapshots": {"dir": str(tmp / "snapshots"), "every_batches": 5},
            "publication": {"registry": str(self.registry), "every_samples": 100,
                            "gate_tolerance": 0.0, "holdout_fraction": 0.2,
                            "holdout_size": 200},
            "metrics": {"host": "127.0.0.1", "port": self.port}}))
        ensure_topics(bootstrap, [self.topic])
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "streamcl", "run", "--config",
                                          str(config)], env=env, stdout=out,
                                         stderr=subprocess.STDOUT)

    def metrics(self) -> str:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return _metrics(self.port)
        except OSError:  # not listening yet
            return ""

    def feed(self) -> None:
        """Split digits with task switches (drift, experiences, a gate that rejects the
        candidates that forgot), then messages that must be dead-lettered."""
        from kafka import KafkaProducer

        train, _ = digits()
        produce_stream(split_stream(train, passes=2), self.bootstrap, self.topic,
                       encoding="json")
        producer = KafkaProducer(bootstrap_servers=self.bootstrap)
        for bad in (b"not json", b'{"x": [1, 2], "y": 3}', b'{"y": 1}') * 4:
            producer.send(self.topic, bad)
        producer.flush()
        producer.close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Server:
    """`streamcl serve` on the service's registry, following its announcements on the broker
    (so each publication is a hot swap with a measured latency), with a client that sends one
    inference request every ``REQUEST_EVERY_S`` from :meth:`start_requests` on."""

    REQUEST_EVERY_S = 0.2

    def __init__(self, service: Service, tmp: Path) -> None:
        self.port, self.log = _free_port(), tmp / "serve.log"
        self.name = service.name
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
        env["OMP_NUM_THREADS"] = "1"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamcl", "serve", "--registry", str(service.registry),
                 "--name", service.name, "--bootstrap", service.bootstrap, "--host",
                 "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered: dict[int, int] = {}  # HTTP status -> count

    def get(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:  # not listening yet
            return 0, b""

    def start_requests(self) -> None:
        """Send inferences of the model's input shape (from its metadata) until stopped: all
        ten digits' first samples, one per request, in turn."""
        status, body = self.get(f"/v2/models/{self.name}")
        assert status == 200, body
        [tensor] = json.loads(body)["inputs"]
        train, _ = digits()
        samples = [train.x[train.y == c][0].tolist() for c in range(10)]
        assert [-1, len(samples[0])] == tensor["shape"], tensor

        def run() -> None:
            i = 0
            while not self._stop.wait(self.REQUEST_EVERY_S):
                request = {"inputs": [{"name": tensor["name"], "datatype": "FP32",
                                       "shape": [1, len(samples[0])],
                                       "data": samples[i % len(samples)]}]}
                status, _ = self.get(f"/v2/models/{self.name}/infer", request)
                self.answered[status] = self.answered.get(status, 0) + 1
                i += 1

        self._thread = threading.Thread(target=run, name="dashboard-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_every_query_returns_data_from_a_real_prometheus(kafka_bootstrap: str, tmp_path: Path,
                                                        prometheus_server: Any) -> None:
    service = Service(kafka_bootstrap, tmp_path)
    server = Server(service, tmp_path)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "streamcl_ready 1" not in service.metrics():
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.5)
        while server.get("/v2/health/live")[0] != 200:
            assert time.monotonic() < deadline, f"`streamcl serve` never became live:\n" \
                f"{server.log.read_text()[-3000:]}"
            time.sleep(0.5)
        # Prometheus scrapes from before the first sample, so every counter is seen changing
        prom = prometheus_server([f"127.0.0.1:{service.port}", f"127.0.0.1:{server.port}"],
                                 scrape_interval_s=1.0)
        prom.wait_for("min(streamcl_ready)", 1.0)
        prom.wait_for("count(streamcl_serve_ready)", 1.0)
        service.feed()
        requests_started = False
        while True:
            text = service.metrics()
            if not requests_started and server.get("/v2/health/ready")[0] == 200:
                server.start_requests()  # the first version is served: ask it
                requests_started = True
            if (_sample(text, "streamcl_samples_trained_total") > 1000
                    and _sample(text, "streamcl_publications_total") >= 2
                    and _sample(text, "streamcl_gate_rejections_total") >= 1
                    and _sample(text, "streamcl_samples_rejected_total") >= 12
                    and requests_started and server.answered.get(200, 0) >= 10):
                break
            assert time.monotonic() < deadline, (f"the service and the server did not get "
                                                 f"there (server answered {server.answered}):"
                                                 f"\n{text}")
            time.sleep(0.5)
        # the versions the trainer announces are served (swaps with their latency measured)
        production = _sample(text, "streamcl_production_version")
        assert production >= 1, text
        prom.wait_for("max(streamcl_serve_model_version)", lambda v: v >= production)
        assert prom.value("sum(streamcl_serve_swap_latency_seconds_count)") >= 1
        empty: dict[str, str] = {}
        settle = time.monotonic() + 30
        while True:  # rates need two scrapes of a change; give them a few seconds
            empty = {where: expr for where, expr in queries() if not prom.query(expr)}
            if not empty or time.monotonic() > settle:
                break
            time.sleep(1)
        assert not empty, f"queries that return nothing from a live service: {empty}"
        assert set(server.answered) == {200}, server.answered
    finally:
        server.stop()
        service.stop()
