"""The deployment files (Dockerfile, deploy/compose.yaml, deploy/k8s, their variants for N
data-parallel replicas, Prometheus, Grafana) are valid and agree with the code: every
STREAMCL_* variable is a setting, every command line parses with the real CLI, every metric a
dashboard or an alert uses is one the trainer or the inference server exports (checked against
a live ``streamcl run`` and a live ``streamcl serve``), the server's probes are its v2 health
endpoints on its port, and the alert rules fire when they should.

The checks use the real tools: promtool (config, rules and rule unit tests), hadolint, PyYAML,
the CLI's own argparse parser, the service's own settings model, and kustomize (kubectl's) to
render the Kubernetes variant for N replicas, an overlay. Building the image needs a Docker
engine, which CI does not have; everything the build depends on is checked statically.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from streamcl import healthcheck
from streamcl.cli import UsageError, build_parser, serve_settings
from streamcl.settings import Settings, env_name, sections
from streamcl.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_REPLICAS = DEPLOY / "compose.replicas.yaml"
K8S = DEPLOY / "k8s"
K8S_REPLICAS = DEPLOY / "k8s-replicas"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamcl.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamcl.yml"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yml")

SETTING_VARS = {env_name(section, name) for section, model in sections().items()
                for name in model.model_fields}
STREAMCL_IMAGE = "streamcl:latest"
#: the inference server (`streamcl serve`): its compose service, its k8s component label, the
#: Prometheus job its alerts select (compose's scrape job, the k8s Service's name), the prefix
#: of its metrics (streamcl.metrics.serving), and the Open Inference Protocol's health paths
SERVE_SERVICE = "serve"
SERVE_COMPONENT = "serve"
SERVE_JOB = "streamcl-serve"
SERVE_PREFIX = "streamcl_serve_"
LIVE_PATH, READY_PATH = "/v2/health/live", "/v2/health/ready"
#: How long `streamcl run` may take to answer: importing torch, starting the embedded broker,
#: recovering (nothing to recover here), joining the consumer group. It takes a few seconds.
SERVICE_START_S = 60.0
POLL_S = 0.2  # polling interval while waiting on a condition, never a synchronisation sleep


# -- helpers ------------------------------------------------------------------------------------

def yaml_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return list(yaml.safe_load_all(f))


def yaml_doc(path: Path) -> dict[str, Any]:
    docs = yaml_docs(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path}: expected one mapping"
    return docs[0]


def k8s_docs() -> list[dict[str, Any]]:
    """Every document under deploy/k8s (kustomization excluded), with its ``_file``."""
    return [doc | {"_file": path.name} for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml_docs(path) if doc and doc.get("kind") != "Kustomization"]


def component(doc: dict[str, Any]) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def k8s_manifests(of: str = "trainer") -> dict[str, dict[str, Any]]:
    """``kind`` -> manifest, for the documents under deploy/k8s of one component: the trainer's
    (ConfigMap, PersistentVolumeClaim, Deployment, Service, ServiceMonitor) by default, or the
    inference server's (``SERVE_COMPONENT``: Deployment, Service, ServiceMonitor)."""
    out: dict[str, dict[str, Any]] = {}
    for doc in k8s_docs():
        assert component(doc) in ("trainer", SERVE_COMPONENT), (doc["_file"], doc["kind"])
        if component(doc) == of:
            assert doc["kind"] not in out, f"two {doc['kind']} manifests of {of}"
            out[doc["kind"]] = doc
    return out


def serve_container() -> tuple[dict[str, Any], dict[str, Any], argparse.Namespace]:
    """The k8s Deployment of the inference server, its container, and its parsed args."""
    dep = k8s_manifests(SERVE_COMPONENT)["Deployment"]
    [container] = dep["spec"]["template"]["spec"]["containers"]
    args = parse_cli(container["args"], "deploy/k8s/serve-deployment.yaml")
    assert args.command == "serve"
    return dep, container, args


def compose_serve() -> tuple[dict[str, Any], argparse.Namespace]:
    """The compose service of the inference server and its parsed command."""
    svc = compose()["services"][SERVE_SERVICE]
    args = parse_cli(svc["command"], f"compose service {SERVE_SERVICE}")
    assert args.command == "serve"
    return svc, args


def compose() -> dict[str, Any]:
    return yaml_doc(COMPOSE)


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["KEY=value", ...] form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
    return env


def runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage (what the image runs)."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def parse_cli(args: list[str], where: str) -> Any:
    """Parse with the real CLI parser; any unknown subcommand or flag fails the test."""
    try:
        return build_parser().parse_args(args)
    except (SystemExit, UsageError) as exc:
        pytest.fail(f"{where}: `streamcl {shlex.join(args)}` does not parse: {exc}")


def compose_command_lines() -> list[tuple[str, list[str]]]:
    """``(service, argv after "streamcl")`` for every command line that a service running the
    streamcl image executes: its command with the image's ``streamcl`` entrypoint, or each line
    of a ``/bin/sh -c`` script (``exec`` stripped)."""
    lines: list[tuple[str, list[str]]] = []
    for name, svc in compose()["services"].items():
        if svc.get("image") != STREAMCL_IMAGE:
            continue
        entrypoint = svc.get("entrypoint")
        command = svc.get("command", ["run"])
        if entrypoint is None:
            args = shlex.split(command) if isinstance(command, str) else list(command)
            lines.append((name, args))
            continue
        entry = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        assert entry[0] in ("/bin/sh", "sh", "/bin/bash", "bash") and entry[-1].endswith("c"), (
            f"{name}: entrypoint {entry} is neither streamcl's nor a shell script")
        script = command if isinstance(command, str) else command[0]
        for raw in script.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s*&&\s*", line):
                argv = shlex.split(part)
                if argv and argv[0] == "exec":
                    argv = argv[1:]
                assert argv and argv[0] == "streamcl", f"{name}: {line!r} is not a streamcl command"
                lines.append((name, argv[1:]))
    return lines


# -- YAML ---------------------------------------------------------------------------------------

def test_every_yaml_file_under_deploy_parses() -> None:
    paths = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), ALERT_TESTS])
    assert len(paths) >= 12, paths
    for path in paths:
        docs = yaml_docs(path)  # multi-document aware; raises on a syntax error
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict) and doc, f"{path}: every document must be a mapping"


# -- Prometheus ---------------------------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml_doc(ALERTS)["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout + proc.stderr


def test_promtool_accepts_the_prometheus_config(promtool: str, tmp_path: Path) -> None:
    config = yaml_doc(PROMETHEUS_DIR / "prometheus.yml")
    rule_files = config["rule_files"]
    assert rule_files == ["alerts.yml"], "the compose file mounts deploy/prometheus whole"
    for name in ("prometheus.yml", *rule_files):  # rule files resolve next to the config
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    proc = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"SUCCESS: {len(rule_files)} rule files found" in out, out
    assert f"SUCCESS: {len(alert_rules())} rules found" in out, out


def test_alert_rules_carry_severity_summary_and_description() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names), names
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        for key in ("summary", "description"):
            assert len(rule["annotations"].get(key, "")) > 20, (rule["alert"], key)


def test_the_alerts_the_issue_asks_for_exist() -> None:
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules()}
    assert any("deriv(streamcl_consumer_lag[" in e and "streamcl_consumer_lag >" in e
               for e in exprs.values()), "consumer lag growing"
    assert any("streamcl_last_publication_timestamp_seconds" in e
               and "streamcl_production_version > 0" in e for e in exprs.values()), \
        "no publication for too long (only once a version exists)"
    assert any("increase(streamcl_gate_rejections_total[" in e for e in exprs.values())
    assert any('streamcl_drift_events_total{trigger="drift"}' in e for e in exprs.values())
    assert any("increase(streamcl_nonfinite_loss_total[" in e for e in exprs.values())
    assert any(re.search(r"\bup\{[^}]*\} == 0", e) for e in exprs.values()), "trainer down"
    assert any(e.startswith("absent(up{") for e in exprs.values()), "trainer absent"
    # the inference server: down, no model although production has one, failing, refusing
    assert any(f'up{{job="{SERVE_JOB}"}} == 0' in e for e in exprs.values()), "server down"
    assert any("streamcl_serve_ready == 0" in e and "streamcl_production_version" in e
               for e in exprs.values()), "no model served (once production has a version)"
    assert any("rate(streamcl_serve_requests_total{outcome" in e
               and "/ sum by (job, instance) (rate(streamcl_serve_requests_total[" in e
               for e in exprs.values()), "the servers' failure ratio"
    assert any("increase(streamcl_serve_refused_versions_total[" in e for e in exprs.values())


def test_serving_errors_alert_counts_server_failures_only() -> None:
    """The failure ratio's outcomes are the server's (503 unavailable, 500 error), never the
    client's mistakes: every outcome the server counts is excluded by name or is a server
    failure (an outcome added later is counted as a failure until it is excluded here)."""
    from streamcl.metrics.serving import OUTCOMES

    [rule] = [r for r in alert_rules() if r["alert"] == "StreamclServeErrors"]
    excluded = re.search(r'outcome!~"([^"]+)"', rule["expr"])
    assert excluded, rule["expr"]
    client = set(excluded.group(1).split("|"))
    assert client == {"ok", "bad_request", "not_found", "too_large"} and client < set(OUTCOMES)
    assert set(OUTCOMES) - client == {"unavailable", "error"}, OUTCOMES


def test_alert_rules_fire_on_their_situation_and_not_on_look_alikes(promtool: str,
                                                                    tmp_path: Path) -> None:
    """`promtool test rules` on tests/deploy/alerts_test.yml. promtool compares annotations
    verbatim, so the rules are copied without them (their templates are checked by `check
    rules`); every alert must have at least one case where it fires."""
    doc = yaml_doc(ALERTS)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    proc = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    fired = {case["alertname"] for test in yaml_doc(ALERT_TESTS)["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    untested = {r["alert"] for r in alert_rules()} - fired
    assert not untested, f"alerts without a firing test case in {ALERT_TESTS.name}: {untested}"


# -- settings and command lines -----------------------------------------------------------------

def k8s_env_names() -> set[str]:
    m = k8s_manifests()
    names = set(m["ConfigMap"]["data"])
    for dep in (m["Deployment"], k8s_manifests(SERVE_COMPONENT)["Deployment"]):
        for container in dep["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    return names


def smoke_env() -> dict[str, str]:
    """The ``-e STREAMCL_...=`` variables deploy/smoke.sh gives its trainer container, its
    shell variables given sample values."""
    text = (DEPLOY / "smoke.sh").read_text()
    found = re.findall(r"-e (STREAMCL_\w+)=('[^']*'|\"[^\"]*\"|\S+)", text)
    return {k: shlex.split(v.replace("$BROKER", "broker"))[0] for k, v in found}


def test_every_streamcl_variable_is_a_setting() -> None:
    sources = {
        "Dockerfile": set(dockerfile_env()),
        "deploy/k8s": k8s_env_names(),
        "deploy/smoke.sh": set(smoke_env()),
        **{f"compose service {name}": set(compose_env(svc))
           for name, svc in compose()["services"].items()},
    }
    used = {var for names in sources.values() for var in names if var.startswith("STREAMCL_")}
    assert len(used) >= 15 and len(sources["deploy/smoke.sh"]) >= 8, used  # extraction works
    for where, names in sources.items():
        unknown = {n for n in names if n.startswith("STREAMCL_")} - SETTING_VARS
        assert not unknown, (f"{where} sets {sorted(unknown)}, which are not settings of "
                             "streamcl.settings.Settings (a typo is silently ignored)")


def _settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for key in list(os.environ):
        if key.startswith("STREAMCL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()  # type: ignore[call-arg]  # everything from the environment


def test_the_deployments_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values, not only the names: each environment builds a valid Settings, as
    `streamcl run` would at start (a bad value would crash-loop the container)."""
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("STREAMCL_")}
    trainer = compose()["services"]["trainer"]
    s = _settings_from_env(monkeypatch, image_env | compose_env(trainer))
    assert s.kafka.bootstrap_servers == "kafka:9092" and s.metrics.port == 9100
    assert s.learner.input_shape == [64] and s.publication.every_samples == 1000
    cm = k8s_manifests()["ConfigMap"]["data"]
    s = _settings_from_env(monkeypatch, image_env | cm)
    assert str(s.snapshots.dir).startswith("/data/") and s.publication.registry.startswith("/data/")
    assert s.learner.params == {"mem_size": 500} and s.learner.torch_threads == 2
    s = _settings_from_env(monkeypatch, image_env | smoke_env())
    assert (s.journal.name, s.learner.hidden, s.snapshots.every_batches) == ("smoke", [64], 50)
    s = _settings_from_env(monkeypatch, image_env | {"STREAMCL_LEARNER__INPUT_SHAPE": "[784]"})
    assert (str(s.snapshots.dir), s.publication.registry) == ("/data/snapshots", "/data/registry")



def test_every_compose_command_line_parses_with_the_cli() -> None:
    lines = compose_command_lines()
    commands = {}
    for service, args in lines:
        commands[args[0] if args else "?"] = parse_cli(args, f"compose service {service}")
    assert {"run", "datasets", "produce", "serve"} <= set(commands), lines


def test_the_producer_feeds_the_trainer(tmp_path: Path) -> None:
    """The producer sends to the trainer's topic and broker a file that `streamcl datasets`
    really writes, whose samples have the trainer's input shape."""
    from streamcl.data import load_stream, write_datasets

    args = {a[0]: parse_cli(a, f"compose service {s}") for s, a in compose_command_lines()}
    trainer = compose_env(compose()["services"]["trainer"])
    produce, datasets = args["produce"], args["datasets"]
    assert produce.topic == trainer["STREAMCL_CONSUMER__TOPIC"]
    assert produce.bootstrap == trainer["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"]
    assert produce.encoding == trainer.get("STREAMCL_CONSUMER__ENCODING", "binary")
    assert produce.data.parent == datasets.out
    written = {p.name: p for p in write_datasets(tmp_path, seed=datasets.seed)}
    assert produce.data.name in written, sorted(written)
    shape = load_stream(written[produce.data.name]).input_shape
    assert list(shape) == json.loads(trainer["STREAMCL_LEARNER__INPUT_SHAPE"])


def test_the_image_and_k8s_commands_parse_with_the_cli() -> None:
    stage = dict(runtime_stage())
    assert json.loads(stage["ENTRYPOINT"]) == ["streamcl"]
    parse_cli(json.loads(stage["CMD"]), "Dockerfile CMD")
    for of in ("trainer", SERVE_COMPONENT):
        dep = k8s_manifests(of)["Deployment"]
        for container in dep["spec"]["template"]["spec"]["containers"]:
            assert container.get("command") is None, "k8s must keep the image's entrypoint"
            parse_cli(container.get("args", ["run"]), f"deploy/k8s/{dep['_file']}")


# -- Dockerfile ---------------------------------------------------------------------------------

def test_hadolint_passes(hadolint: str) -> None:
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract() -> None:
    instructions = dockerfile_instructions()
    froms = [args for k, args in instructions if k == "FROM"]
    assert len(froms) >= 2 and " AS builder" in froms[0], "multi-stage: a builder first"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions
            if k == "ARG" and "=" in a}
    # the base image and torch's source are build arguments, with the public defaults
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim-bookworm"
    assert args.get("TORCH_PIP_ARGS") == '"--index-url https://download.pytorch.org/whl/cpu"'
    builder = " ".join(a for k, a in instructions if k == "RUN")
    assert "torch==2.13.0 ${TORCH_PIP_ARGS}" in builder
    # the classic builder builds it: no BuildKit-only syntax line or flags
    text = DOCKERFILE.read_text()
    assert "# syntax=" not in text and "--mount=" not in text and "<<" not in text

    stage = runtime_stage()
    keys = [k for k, _ in stage]
    run = dict(stage)
    assert run["USER"].split(":")[0] == "10001"
    assert run["EXPOSE"].split() == [dockerfile_env()["STREAMCL_METRICS__PORT"], "8000"]
    assert run["VOLUME"] == "/data"
    assert run["HEALTHCHECK"].endswith('CMD ["python", "-m", "streamcl.healthcheck"]')
    assert "COPY" in keys and "--from=builder" in run["COPY"]
    assert keys.index("USER") > keys.index("RUN"), "drop root only after the setup"
    assert any(k == "LABEL" for k in keys)


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    copied = [token for k, args in dockerfile_instructions() if k == "COPY"
              and "--from" not in args for token in shlex.split(args)[:-1]]
    assert {"pyproject.toml", "README.md", "streamcl"} <= {c.rstrip("/") for c in copied}
    for source in copied:
        assert (ROOT / source).exists(), source
        excluded = [p for p in patterns if fnmatch(source.rstrip("/"), p.lstrip("/"))]
        assert not excluded, f".dockerignore {excluded} drops {source}, which the build copies"
    for needed_out in (".venv", ".git", "tests", "*.npz"):
        assert needed_out in patterns


# -- compose ------------------------------------------------------------------------------------

def test_compose_wiring() -> None:
    c = compose()
    services = c["services"]
    assert set(services) >= {"kafka", "trainer", "producer", "prometheus", "grafana"}
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    kenv = compose_env(kafka)
    assert kenv["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kenv["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kenv['KAFKA_NODE_ID']}@kafka:9093"
    assert "CLUSTER_ID" in kenv and "kafka" in kafka["healthcheck"]["test"][-1]
    listeners = dict(item.split("://") for item in kenv["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://") for item in kenv["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocol_map = dict(item.split(":") for item in
                        kenv["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocol_map)
    assert set(advertised) <= set(listeners) and "CONTROLLER" not in advertised
    trainer_env = compose_env(services["trainer"])
    assert trainer_env["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"] == advertised["PLAINTEXT"]

    for name in ("trainer", "producer"):
        svc = services[name]
        assert svc["image"] == STREAMCL_IMAGE
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "/data" in [v.split(":")[1] for v in services["trainer"]["volumes"]]

    for svc in services.values():  # every bind mount exists; every named volume is declared
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), volume
            else:
                assert source in c["volumes"], volume

    port = trainer_env["STREAMCL_METRICS__PORT"]
    assert f"{port}:{port}" in services["trainer"]["ports"]
    scrape = yaml_doc(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "streamcl")
    assert job["static_configs"][0]["targets"] == [f"trainer:{port}"]
    assert job["scrape_interval"] == "5s"


def test_compose_serve_follows_the_trainer() -> None:
    """The inference server: the trainer's image with the `serve` command, reading the
    trainer's registry on the trainer's volume (read-only), following the trainer's Kafka and
    name, publishing its --port, with a liveness healthcheck (the image's own probes the
    trainer's metrics port) and the trainer's restart policy; Prometheus scrapes it."""
    c = compose()
    services = c["services"]
    svc, args = compose_serve()
    trainer = services["trainer"]
    env = compose_env(trainer)
    assert svc["image"] == trainer["image"] == STREAMCL_IMAGE
    assert svc["build"] == trainer["build"], "the same image, built the same way"
    assert "entrypoint" not in svc, "the image's `streamcl` entrypoint runs `serve`"
    assert args.registry_location == env["STREAMCL_PUBLICATION__REGISTRY"]
    assert args.name == env["STREAMCL_JOURNAL__NAME"]
    assert args.bootstrap == env["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"]
    assert args.alias == "production" and args.host == "0.0.0.0"

    [trainer_data] = [v.split(":")[0] for v in trainer["volumes"] if v.split(":")[1] == "/data"]
    [mount] = svc["volumes"]
    source, target, mode = mount.split(":")
    assert (source, mode) == (trainer_data, "ro"), "the trainer's volume, read-only"
    assert args.registry_location.startswith(target.rstrip("/") + "/")

    assert svc["ports"] == [f"{args.port}:{args.port}"]
    # the image's own healthcheck, which probes serve's liveness on the command's --port
    assert "healthcheck" not in svc
    assert healthcheck.target([b"streamcl", *map(str.encode, svc["command"])], {}) == \
        f"http://127.0.0.1:{args.port}{LIVE_PATH}"

    assert svc["restart"] == trainer["restart"] == "unless-stopped"
    assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "trainer" in svc["depends_on"]
    assert SERVE_SERVICE in services["prometheus"]["depends_on"]
    scrape = yaml_doc(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]
    [job] = [j for j in scrape if f"{SERVE_SERVICE}:{args.port}" in
             [t for s in j["static_configs"] for t in s["targets"]]]
    assert job["job_name"] == SERVE_JOB, "the serving alerts select this job"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"


# -- Kubernetes ---------------------------------------------------------------------------------

def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml_doc(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    for name in listed:
        assert (K8S / name).is_file(), name
    others = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    assert others == set(listed)


def test_k8s_manifests_agree_with_each_other_and_the_image() -> None:
    m = k8s_manifests()
    dep, svc, cm, pvc = m["Deployment"], m["Service"], m["ConfigMap"], m["PersistentVolumeClaim"]
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    [container] = pod["spec"]["containers"]
    assert container["image"] == STREAMCL_IMAGE
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in container["envFrom"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics_port = int(cm["data"]["STREAMCL_METRICS__PORT"])
    assert ports == {"metrics": metrics_port}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe

    [service_port] = svc["spec"]["ports"]
    assert service_port["name"] == "metrics" and service_port["port"] == metrics_port
    assert service_port["targetPort"] in ("metrics", metrics_port)
    annotations = pod["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(metrics_port),
                           "prometheus.io/path": "/metrics"}

    uid = int(dict(runtime_stage())["USER"].split(":")[0])
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == \
        pvc["metadata"]["name"]
    for key in ("STREAMCL_SNAPSHOTS__DIR", "STREAMCL_PUBLICATION__REGISTRY"):
        assert cm["data"][key].startswith("/data/"), key

    monitor = m["ServiceMonitor"]
    assert monitor["_file"] == "servicemonitor.yaml"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service_port["name"]
    # the alert rules select job="streamcl": the ServiceMonitor's job is the Service's name
    assert svc["metadata"]["name"] == "streamcl"


def test_k8s_serve_runs_the_trainers_image_on_the_trainers_registry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's Deployment: the trainer's image, ConfigMap and Secret; its settings resolve
    (as `streamcl serve` resolves them) to the trainer's registry, name and Kafka; the
    registry's volume is the trainer's claim, mounted read-only, on the trainer's node when the
    claim is ReadWriteOnce; the trainer's security settings."""
    trainer = k8s_manifests()
    dep, container, args = serve_container()
    trainer_pod = trainer["Deployment"]["spec"]["template"]
    [tc] = trainer_pod["spec"]["containers"]
    assert container["image"] == tc["image"] and container["envFrom"] == tc["envFrom"]
    assert container["env"] == tc["env"], "the trainer's Kafka credentials"

    cm = trainer["ConfigMap"]["data"]
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("STREAMCL_")}
    _settings_from_env(monkeypatch, image_env | cm)
    registry, name, bootstrap, _ = serve_settings(args)  # what cmd_serve resolves
    assert registry == cm["STREAMCL_PUBLICATION__REGISTRY"]
    assert name == cm["STREAMCL_JOURNAL__NAME"]
    assert bootstrap == cm["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"]

    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in container["volumeMounts"]
               if registry.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True, "the server only reads the registry"
    pvc = trainer["PersistentVolumeClaim"]
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {
        "claimName": pvc["metadata"]["name"], "readOnly": True}
    if "ReadWriteOnce" in pvc["spec"]["accessModes"]:  # mountable on the trainer's node only
        [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= \
            trainer_pod["metadata"]["labels"].items()
    tmp = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp], "a writable /tmp beside the read-only root"

    assert pod["securityContext"] == trainer_pod["spec"]["securityContext"]
    assert container["securityContext"] == tc["securityContext"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["imagePullPolicy"] == tc["imagePullPolicy"]


def test_k8s_serve_probes_are_the_v2_health_endpoints_on_its_port() -> None:
    """Readiness on /v2/health/ready, liveness and startup on /v2/health/live, all on the port
    `serve --port` listens on; the Service, the scrape annotations and the ServiceMonitor use
    that port too, and select the servers only."""
    dep, container, args = serve_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [args.port]
    for probe, path in (("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH),
                        ("startupProbe", LIVE_PATH)):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == args.port, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe
    assert container["startupProbe"]["failureThreshold"] * \
        container["startupProbe"]["periodSeconds"] >= 120, "importing torch takes a while"

    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                              "prometheus.io/port": str(args.port),
                                              "prometheus.io/path": "/metrics"}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    serve, trainer = k8s_manifests(SERVE_COMPONENT), k8s_manifests()
    svc = serve["Service"]
    assert svc["metadata"]["name"] == SERVE_JOB, "the ServiceMonitor's job is the Service's name"
    assert svc["spec"]["selector"].items() <= labels.items()
    trainer_labels = trainer["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= trainer_labels.items()
    assert not trainer["Service"]["spec"]["selector"].items() <= labels.items()
    [service_port] = svc["spec"]["ports"]
    assert service_port["port"] == args.port
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == args.port

    monitor = serve["ServiceMonitor"]
    assert monitor["_file"] == "servicemonitor.yaml"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    assert not selector.items() <= trainer["Service"]["metadata"]["labels"].items()
    assert not trainer["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= \
        svc["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] == "/metrics"


# -- Grafana ------------------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def provisioned_uid() -> str:
    [source] = yaml_doc(DATASOURCES)["datasources"]
    return source["uid"]


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows hold their panels
    return out


def test_grafana_provisioning_matches_compose() -> None:
    [source] = yaml_doc(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]
    [provider] = yaml_doc(DASHBOARD_PROVIDERS)["providers"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_is_a_valid_grafana_dashboard() -> None:
    d = dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    uid = provisioned_uid()
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] >= 1 and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == uid, p["title"]
            assert t["expr"].strip(), p["title"]

    for a in d["annotations"]["list"]:
        if not a.get("builtIn"):
            assert a["datasource"]["uid"] == uid and a["expr"], a["name"]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == uid

    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    assert heatmaps and all(t["format"] == "heatmap" for p in heatmaps for t in p["targets"])
    assert any("streamcl_train_step_seconds_bucket" in t["expr"] and "by (le)" in t["expr"]
               for p in heatmaps for t in p["targets"])
    annotation_exprs = " ".join(a.get("expr", "") for a in d["annotations"]["list"])
    assert "streamcl_drift_events_total" in annotation_exprs, "drift boundaries as annotations"


_GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h",
                      "__range_s": "3600", "__interval_ms": "15000", "instance": ".*",
                      "server": ".*"}


def serving_row() -> list[dict[str, Any]]:
    """The panels of the dashboard's "Serving" row: those below its row panel and above the
    next row (rows are not collapsed, so their panels follow them in the top-level list)."""
    panels = dashboard()["panels"]
    [start] = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Serving"]
    assert not panels[start]["collapsed"] and not panels[start]["panels"]
    out = []
    for p in panels[start + 1:]:
        if p["type"] == "row":
            break
        assert p["gridPos"]["y"] > panels[start]["gridPos"]["y"], p["title"]
        out.append(p)
    return out


def test_dashboard_has_a_serving_row() -> None:
    """The inference servers' row: request rate by version and outcome, latency p50/p99, batch
    size, the version served and its age, predicted classes, swaps, refused versions and swap
    latency, each filtered by the `server` variable (the servers' instances, not the
    trainers')."""
    row = serving_row()
    assert len(row) >= 6
    exprs = []
    for p in row:
        for target in p["targets"]:
            expr = " ".join(target["expr"].split())
            names = _METRIC.findall(expr)
            assert names and all(n.startswith(SERVE_PREFIX) for n in names), (p["title"], expr)
            for selector in re.findall(r"streamcl_serve_\w+(\{[^}]*\})?", expr):
                assert 'instance=~"$server"' in selector, (p["title"], expr)
            exprs.append(expr)
    every = " ; ".join(exprs)

    def has(pattern: str) -> bool:
        return re.search(pattern, every) is not None

    assert has(r"sum by \(version, outcome\) \(rate\(streamcl_serve_requests_total\{")
    for q in ("0.5", "0.99"):
        assert has(rf"histogram_quantile\({q}, sum by \(le\) \(rate\("
                   r"streamcl_serve_request_duration_seconds_bucket\{"), q
        assert has(rf"histogram_quantile\({q}, sum by \(le\) \(rate\("
                   r"streamcl_serve_swap_latency_seconds_bucket\{"), q
    assert has(r"sum\(rate\(streamcl_serve_batch_size_sum\{[^}]*\}\[\$__rate_interval\]\)\) / "
               r"sum\(rate\(streamcl_serve_batch_size_count\{"), "mean samples per call"
    assert has(r"streamcl_serve_model_version\{") and has(r"streamcl_serve_model_age_seconds\{")
    assert has(r"sum by \(label\) \(rate\(streamcl_serve_predictions_total\{")
    assert has(r"increase\(streamcl_serve_swaps_total\{")
    assert has(r"increase\(streamcl_serve_refused_versions_total\{")
    assert has(r"streamcl_serve_ready\{")

    [server] = [v for v in dashboard()["templating"]["list"] if v["name"] == "server"]
    assert server["query"]["query"] == "label_values(streamcl_serve_ready, instance)"
    assert server["includeAll"] and server["allValue"] == ".*"
    assert server["datasource"]["uid"] == provisioned_uid()
    # and no trainer panel is filtered by the servers' variable
    for p in dashboard_panels():
        if p not in row:
            assert "$server" not in json.dumps(p.get("targets", [])), p["title"]


def dashboard_queries() -> list[tuple[str, str]]:
    """``(where, PromQL)`` for every query of the dashboard: panel targets, annotations,
    template variables (Grafana's label_values() is not PromQL: its metric is checked)."""
    d = dashboard()
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard_panels()
           for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in d["annotations"]["list"]
            if a.get("expr")]
    for var in d["templating"]["list"]:
        query = var.get("definition") or var.get("query", {}).get("query", "")
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        out.append((f"variable {var['name']!r}", match.group(1) if match else query))
    return out


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, becomes a recording rule that promtool
    parses: a typo in PromQL fails here instead of as an empty panel."""
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries()):
        filled = re.sub(r"\$\{?(\w+)\}?",
                        lambda m: _GRAFANA_VARIABLES.get(m.group(1), m.group(0)), expr)
        assert "$" not in filled, f"{where}: unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": filled})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- metric names -------------------------------------------------------------------------------

_METRIC = re.compile(r"(?<![A-Za-z0-9_])streamcl_[a-z0-9_]*[a-z0-9]")


def _of(names: set[str], exporter: str | None) -> set[str]:
    """The names of one exporter: the inference server's (``streamcl_serve_*``, exporter
    "serve"), the trainer's (the rest, "trainer"), or all (None)."""
    if exporter is None:
        return names
    return {n for n in names if n.startswith(SERVE_PREFIX) == (exporter == "serve")}


def referenced_metrics(exporter: str | None = None) -> dict[str, set[str]]:
    """Every ``streamcl_*`` name in a query of the dashboard (panels, annotations, variables)
    or in an alert rule's expression: these must be full exposition names. ``exporter``: only
    the server's or the trainer's (see :func:`_of`)."""
    alert_exprs = " ".join(r["expr"] for r in alert_rules())
    return {"deploy/grafana/dashboards/streamcl.json":
            _of({n for _, expr in dashboard_queries() for n in _METRIC.findall(expr)}, exporter),
            "deploy/prometheus/alerts.yml": _of(set(_METRIC.findall(alert_exprs)), exporter)}


def mentioned_metrics(exporter: str | None = None) -> dict[str, set[str]]:
    """Every ``streamcl_*`` name anywhere in the files, prose (descriptions, annotations)
    included, where a histogram may be named by its family (``streamcl_snapshot_seconds``)."""
    return {path.name: _of(set(_METRIC.findall(path.read_text())), exporter)
            for path in (DASHBOARD, ALERTS)}


def serving_families(gen_reference: ModuleType) -> list[dict[str, Any]]:
    """What a fresh :class:`ServingMetrics` (the inference server's) exposes, as
    ``gen_reference.metric_families()`` gives the trainer's ServiceMetrics."""
    from streamcl.metrics.serving import ServingMetrics

    return gen_reference.metric_families(ServingMetrics())


def all_families(gen_reference: ModuleType) -> list[dict[str, Any]]:
    """The trainer's and the inference server's metric families: apart by name prefix."""
    trainer, serving = gen_reference.metric_families(), serving_families(gen_reference)
    assert serving and all(f["name"].startswith(SERVE_PREFIX) for f in serving)
    assert not [f["name"] for f in trainer if f["name"].startswith(SERVE_PREFIX)]
    return trainer + serving


def exposed_names(families: list[dict[str, Any]]) -> set[str]:
    """The full exposition names (``..._total``, ``..._bucket``, ``..._info``, gauges as they
    are): what a PromQL query must use. A family name alone (``streamcl_publications``) is not
    queryable and does not count."""
    return {name for f in families for name in f["samples"]}


def assert_all_exposed(families: list[dict[str, Any]], source: str,
                       exporter: str | None = None) -> None:
    """Every name the dashboard and the alerts use (of ``exporter``, see :func:`_of`) is one
    ``families`` expose."""
    exposed = exposed_names(families)
    assert len(exposed) > 20, f"{source}: suspiciously few metrics: {sorted(exposed)}"
    for where, names in referenced_metrics(exporter).items():
        assert len(names) >= (3 if exporter == "serve" else 5), (
            f"too few streamcl_ metrics found in {where}: {names}")
        missing = names - exposed
        assert not missing, (f"{where} queries {sorted(missing)}, which {source} does not "
                             f"expose; exposed: {sorted(exposed)}")
    histograms = {f["name"] for f in families if f["type"] == "histogram"}
    for where, names in mentioned_metrics(exporter).items():
        missing = names - exposed - histograms
        assert not missing, f"{where} mentions {sorted(missing)}, unknown to {source}"


def test_dashboard_and_alerts_use_only_exported_metric_names(gen_reference: ModuleType
                                                             ) -> None:
    assert_all_exposed(all_families(gen_reference), "a fresh ServiceMetrics and ServingMetrics")
    assert_all_exposed(gen_reference.metric_families(), "a fresh ServiceMetrics", "trainer")
    assert_all_exposed(serving_families(gen_reference), "a fresh ServingMetrics", "serve")


def test_every_exported_metric_is_on_the_dashboard(gen_reference: ModuleType) -> None:
    """A metric nobody charts is one nobody looks at: a new metric needs a panel."""
    on_dashboard = referenced_metrics()["deploy/grafana/dashboards/streamcl.json"]
    for family in all_families(gen_reference):
        shown = [n for n in family["samples"] if not n.endswith("_created")]
        assert set(shown) & on_dashboard, f"{family['name']} is on no dashboard panel"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveService:
    """`streamcl run` in a subprocess on the embedded broker, with its metrics on ``port`` (or
    another streamcl command: ``what`` names it, ``serves`` says what it must answer where)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path,
                 what: str = "`streamcl run`",
                 serves: str = "/metrics, /healthz and /readyz on STREAMCL_METRICS__PORT"
                 ) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.what, self.serves = what, serves
        self.failure: str | None = None  # once it failed to come up, later tests fail at once

    def get(self, path: str, accept: str = "", data: bytes | None = None) -> tuple[int, bytes]:
        """Status and body of a GET (a POST of ``data``, as JSON): an error status is returned,
        not raised."""
        headers = {"Accept": accept} if accept else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_for(self, path: str, status: int = 200, accept: str = "") -> bytes:
        """Poll ``path`` until it answers ``status``; fail early if the service exits."""
        if self.failure is not None:
            pytest.fail(self.failure)
        deadline = time.monotonic() + SERVICE_START_S
        last: str = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.failure = (f"{self.what} exited with {self.proc.returncode} before "
                                f"{path} answered {status}; its output:\n{self.output()}")
                pytest.fail(self.failure)
            try:
                code, body = self.get(path, accept)
                if code == status:
                    return body
                last = f"HTTP {code}: {body[:200]!r}"
            except OSError as exc:  # not listening yet
                last = repr(exc)
            time.sleep(POLL_S)
        self.failure = (f"{self.what} did not answer {status} on http://127.0.0.1:"
                        f"{self.port}{path} within {SERVICE_START_S:.0f} s (last: {last}). It "
                        f"must serve {self.serves}; its output:\n{self.output()}")
        pytest.fail(self.failure)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    tmp = tmp_path_factory.mktemp("live")
    config = tmp / "streamcl.yaml"
    config.write_text(yaml.safe_dump({
        "learner": {"input_shape": [64], "hidden": [16], "strategy": "er"},
        "kafka": {"embedded_storage": "memory://tansu/"},  # opt in: a restart would lose it
        "snapshots": {"dir": str(tmp / "snapshots")},
        "publication": {"registry": str(tmp / "registry")}}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
    env |= {"STREAMCL_METRICS__PORT": str(port), "STREAMCL_METRICS__HOST": "127.0.0.1",
            "OMP_NUM_THREADS": "1"}
    log = tmp / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamcl.cli", "run", "--config",
                                 str(config)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        yield LiveService(proc, port, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drain: snapshot, commit, exit
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def test_live_service_exports_every_metric_the_dashboard_and_alerts_use(
        live_service: LiveService, gen_reference: ModuleType) -> None:
    body = live_service.wait_for("/metrics", accept=OPENMETRICS)
    families = gen_reference.parse_families(body.decode())
    assert_all_exposed(families, "a live `streamcl run` /metrics", "trainer")


def test_live_service_answers_the_probes_the_deployments_use(live_service: LiveService) -> None:
    """Docker's HEALTHCHECK and the k8s liveness probe hit /healthz, readiness /readyz."""
    assert json.loads(live_service.wait_for("/healthz")) == {"status": "ok"}
    assert json.loads(live_service.wait_for("/readyz"))["status"] == "ready"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # drain and exit
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """`streamcl serve` in a subprocess on an empty registry (``live_server.registry``),
    polling its alias (no Kafka), on ``port``."""
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
    env["OMP_NUM_THREADS"] = "1"
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamcl.cli", "serve", "--registry",
                                 str(tmp / "registry"), "--name", "deploy", "--host",
                                 "127.0.0.1", "--port", str(port), "--poll-s", "0.2"],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = LiveService(proc, port, log, what="`streamcl serve`",
                         serves=f"{LIVE_PATH}, {READY_PATH} and /metrics on --port")
    server.registry = tmp / "registry"  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        _stop(proc)


def _publish_small_model(registry: Path) -> dict[str, Any]:
    """A real export of a trainer that saw a few batches of digits (64 features), published
    as production, as the trainer service publishes."""
    import torch

    from streamcl.data import digits
    from streamcl.registry import ModelRegistry, export_model
    from streamcl.trainer import OnlineTrainer, TrainerConfig

    train, _ = digits()
    trainer = OnlineTrainer(TrainerConfig(input_shape=(64,), hidden=(16,), strategy="naive"))
    for s in range(0, 256, 32):
        trainer.step(torch.from_numpy(train.x[s:s + 32]), torch.from_numpy(train.y[s:s + 32]))
    tensors, section = export_model(trainer)
    return ModelRegistry(registry).publish(tensors, {"model": section}, aliases=["production"])


def test_live_server_answers_the_probes_the_deployments_use(
        live_server: LiveService, gen_reference: ModuleType) -> None:
    """A real `streamcl serve`: live at once, not ready (400) until the registry has a
    production version, then ready; the compose healthcheck's own command and the k8s probes'
    paths get 200 from it; it answers an inference with a label; its /metrics exposes every
    streamcl_serve_* name the dashboard and the alerts use."""
    live_server.wait_for(LIVE_PATH)
    status, body = live_server.get(READY_PATH)
    assert status == 400 and json.loads(body)["ready"] is False, (status, body)

    manifest = _publish_small_model(live_server.registry)  # type: ignore[attr-defined]
    assert json.loads(live_server.wait_for(READY_PATH)) == {"ready": True}

    # the image's healthcheck for compose's serve command, pointed at this server's port
    svc, args = compose_serve()
    url = healthcheck.target([b"streamcl", *map(str.encode, svc["command"])], {})
    assert live_server.get(url.split(f":{args.port}", 1)[1])[0] == 200
    # the k8s probes' paths
    _, container, _ = serve_container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert live_server.get(path)[0] == 200, (probe, path)

    # one inference of the shape the model's metadata gives
    meta = json.loads(live_server.wait_for("/v2/models/deploy"))
    [tensor] = meta["inputs"]
    shape = [1 if d == -1 else d for d in tensor["shape"]]
    n = 1
    for d in shape:
        n *= d
    request = {"inputs": [{"name": tensor["name"], "shape": shape,
                           "datatype": tensor["datatype"], "data": [0.5] * n}]}
    status, body = live_server.get("/v2/models/deploy/infer", data=json.dumps(request).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert answer["model_version"] == str(manifest["version"])
    [label] = [o for o in answer["outputs"] if o["name"] == "label"]
    assert label["shape"] == [1] and isinstance(label["data"][0], int)

    metrics = live_server.wait_for("/metrics", accept=OPENMETRICS)
    families = gen_reference.parse_families(metrics.decode())
    assert_all_exposed(families, "a live `streamcl serve` /metrics", "serve")
    assert 'streamcl_serve_requests_total{outcome="ok",version="' in metrics.decode()


# -- the compose file on Compose v1 and v2, and its local variant --------------------------------

def test_compose_file_suits_compose_v1_and_v2() -> None:
    """Compose v1 (Debian's docker-compose 1.29, all there is here) rejects a top-level
    ``name:``; v2 does not need it."""
    doc = compose()
    assert "name" not in doc and "version" not in doc
    assert set(doc) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        k for k in doc if k.startswith("x-")}


def test_local_compose_replaces_only_the_images_no_registry_gives() -> None:
    proc = subprocess.run([sys.executable, str(DEPLOY / "local_compose.py"), str(COMPOSE),
                           "--image", "streamcl:smoke", "--base", "/srv/deploy",
                           "--prometheus-port", "19090", "--metrics-port", "19100",
                           "--serve-port", "18000"],
                          capture_output=True, text=True, check=True, timeout=60)
    local, real = yaml.safe_load(proc.stdout), compose()
    assert set(local["services"]) == set(real["services"]) - {"grafana"}
    kafka = local["services"]["kafka"]
    assert kafka["image"] == "streamcl:smoke" and kafka["entrypoint"][0].endswith("/tansu")
    assert "tcp://kafka:9092" in kafka["command"]  # the trainer's kafka:9092 is unchanged
    prom, real_prom = local["services"]["prometheus"], real["services"]["prometheus"]
    assert prom["image"] == "local/prometheus" and prom["command"] == real_prom["command"]
    assert "/srv/deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    for name in ("trainer", "producer", SERVE_SERVICE):
        mine, theirs = local["services"][name], real["services"][name]
        assert mine["image"] == "streamcl:smoke" and "build" not in mine
        for key in set(theirs) - {"image", "build", "ports"}:
            assert mine[key] == theirs[key], (name, key)
    assert local["services"]["trainer"]["ports"] == ["127.0.0.1:19100:9100"]
    assert local["services"][SERVE_SERVICE]["ports"] == ["127.0.0.1:18000:8000"]
    assert not [k for k in local if k.startswith("x-") or k == "name"]


# -- several replicas (data-parallel): the compose override and the k8s overlay -----------------

RANK_FROM_POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def compose_replicas() -> dict[str, Any]:
    """deploy/compose.yaml with deploy/compose.replicas.yaml over it, merged as Compose (v1 and
    v2) merges an override, for the keys the files use: ``environment`` and ``depends_on`` key
    by key, ``volumes`` by container path, ``ports`` appended, anything else replaced."""
    merged, override = compose(), yaml_doc(COMPOSE_REPLICAS)
    for name, svc in override["services"].items():
        mine = merged["services"].setdefault(name, {})
        for key, value in svc.items():
            if key == "environment":
                mine[key] = compose_env(mine) | compose_env(svc)
            elif key == "depends_on":
                mine[key] = {**mine.get(key, {}), **value}
            elif key == "volumes":
                by_target = {v.split(":")[1]: v for v in [*mine.get(key, []), *value]}
                mine[key] = list(by_target.values())
            elif key == "ports":
                mine[key] = list(dict.fromkeys([*mine.get(key, []), *value]))
            else:
                mine[key] = copy.deepcopy(value)
    merged["volumes"] = {**merged.get("volumes", {}), **override.get("volumes", {})}
    return merged


def replica_services(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    """service name -> environment, for the services that are ranks of the group."""
    return {name: compose_env(svc) for name, svc in doc["services"].items()
            if "RANK" in compose_env(svc)}


def test_compose_replicas_file_suits_compose_v1_and_v2() -> None:
    doc = yaml_doc(COMPOSE_REPLICAS)
    assert "name" not in doc and "version" not in doc
    assert set(doc) <= {"services", "volumes"} | {k for k in doc if k.startswith("x-")}
    assert set(doc["services"]) <= set(compose()["services"]) | {"topics", "trainer-1"}


def test_compose_replicas_form_one_group() -> None:
    """Distinct ranks 0..N-1, one WORLD_SIZE = N, MASTER_ADDR the rank-0 service, one learner's
    settings everywhere, and each rank with its own volume and host port."""
    c = compose_replicas()
    trainers = replica_services(c)
    n = len(trainers)
    assert n >= 2, trainers
    assert sorted(int(env["RANK"]) for env in trainers.values()) == list(range(n))
    assert {env["WORLD_SIZE"] for env in trainers.values()} == {str(n)}
    rank0 = next(name for name, env in trainers.items() if env["RANK"] == "0")
    # rank 0 is the single trainer's service: Prometheus scrapes it, and its volume holds the
    # registry that only rank 0 writes
    assert rank0 == "trainer"
    assert {env["MASTER_ADDR"] for env in trainers.values()} == {rank0}
    [master_port] = {env["MASTER_PORT"] for env in trainers.values()}
    assert 0 < int(master_port) < 65536

    settings = [{k: v for k, v in env.items() if k.startswith("STREAMCL_")}
                for env in trainers.values()]
    assert all(s == settings[0] for s in settings), "the replicas must be one learner"
    assert settings[0] == compose_env(compose()["services"]["trainer"]), \
        "the single trainer's learner, on more processes"
    data_volumes, host_ports = set(), set()
    for name in trainers:
        svc = c["services"][name]
        assert svc["image"] == STREAMCL_IMAGE and svc.get("command", ["run"]) == ["run"]
        assert svc["restart"] == "unless-stopped", "the group restarts as a whole"
        [data] = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == "/data"]
        assert data in c["volumes"], data
        data_volumes.add(data)
        [port] = svc["ports"]
        host, container = str(port).split(":")
        assert container == trainers[name]["STREAMCL_METRICS__PORT"]  # LOCAL_RANK unset
        host_ports.add(host)
    assert len(data_volumes) == n, "each rank writes its snapshot shard to its own volume"
    assert len(host_ports) == n
    assert "trainer-data" in [v.split(":")[0] for v in c["services"][rank0]["volumes"]]


def test_compose_replicas_leave_the_server_reading_rank_0s_registry() -> None:
    """Only rank 0 publishes, to the registry on its volume: the server, untouched by the
    override, reads that volume."""
    c = compose_replicas()
    assert c["services"][SERVE_SERVICE] == compose()["services"][SERVE_SERVICE]
    assert SERVE_SERVICE not in yaml_doc(COMPOSE_REPLICAS)["services"]
    [source] = [v.split(":")[0] for v in c["services"][SERVE_SERVICE]["volumes"]]
    rank0 = next(n for n, env in replica_services(c).items() if env["RANK"] == "0")
    assert source in [v.split(":")[0] for v in c["services"][rank0]["volumes"]]
    for name in set(replica_services(c)) - {rank0}:
        assert source not in [v.split(":")[0] for v in c["services"][name]["volumes"]]


def test_compose_replicas_settings_are_valid_and_data_parallel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("STREAMCL_")}
    c = compose_replicas()
    for name, env in replica_services(c).items():
        unknown = {k for k in env if k.startswith("STREAMCL_")} - SETTING_VARS
        assert not unknown, f"compose.replicas.yaml {name}: {unknown} are not settings"
        s = _settings_from_env(monkeypatch, image_env | env)
        assert STRATEGIES[s.learner.strategy].data_parallel, (
            f"{name}: strategy {s.learner.strategy} does not run data-parallel")
        assert str(s.snapshots.dir).startswith("/data/") and s.publication.registry.startswith(
            "/data/")
        parse_cli(c["services"][name].get("command", ["run"]), f"compose service {name}")
    topics = compose_env(c["services"]["topics"])
    assert not {k for k in topics if k.startswith("STREAMCL_")} - SETTING_VARS


def test_compose_replicas_topic_has_a_partition_per_rank_before_anyone_uses_it() -> None:
    """`streamcl run` and `streamcl produce` create a missing topic with one partition: the
    `topics` service must create it with WORLD_SIZE partitions first."""
    c = compose_replicas()
    trainers = replica_services(c)
    topics = c["services"]["topics"]
    env = compose_env(topics)
    trainer = trainers["trainer"]
    assert env["WORLD_SIZE"] == trainer["WORLD_SIZE"]
    assert env["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"] == trainer["STREAMCL_KAFKA__BOOTSTRAP_SERVERS"]
    assert env["STREAMCL_CONSUMER__TOPIC"] == trainer["STREAMCL_CONSUMER__TOPIC"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics["restart"] == "no" and topics["image"] == STREAMCL_IMAGE
    for name in [*trainers, "producer"]:
        assert c["services"][name]["depends_on"]["topics"] == {
            "condition": "service_completed_successfully"}, name
    produce = next(parse_cli(a, "producer") for s, a in compose_command_lines()
                   if s == "producer" and a[0] == "produce")
    assert produce.topic == env["STREAMCL_CONSUMER__TOPIC"]


def test_compose_replicas_topics_script_against_a_broker(kafka_bootstrap: str) -> None:
    """The `topics` service's script, run as the container would, against a real broker: it
    creates the topic with WORLD_SIZE partitions, and refuses a topic with fewer."""
    from kafka import KafkaConsumer

    svc = yaml_doc(COMPOSE_REPLICAS)["services"]["topics"]
    assert svc["entrypoint"] == ["python", "-c"]
    [script] = svc["command"]
    topic = f"replicas-{os.getpid()}-{time.monotonic_ns()}"

    def run(world_size: int) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_")}
        env |= {"STREAMCL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
                "STREAMCL_CONSUMER__TOPIC": topic, "WORLD_SIZE": str(world_size)}
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120)

    first = run(2)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"topic {topic}: 2 partitions for 2 replicas" in first.stdout
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1}
    finally:
        consumer.close()
    again = run(2)  # idempotent
    assert again.returncode == 0, again.stdout + again.stderr
    more = run(3)  # an existing topic is never repartitioned: too few partitions is an error
    assert more.returncode != 0
    assert f"topic {topic} has 2 partition(s); 3 replicas need at least 3" in more.stderr


def test_local_compose_rewrites_the_replicas_override() -> None:
    """deploy/local_compose.py on the override alone: images swapped, no broker of its own
    added, and rank 1's host port next to rank 0's."""
    proc = subprocess.run([sys.executable, str(DEPLOY / "local_compose.py"),
                           str(COMPOSE_REPLICAS), "--image", "streamcl:smoke",
                           "--prometheus-port", "19090", "--metrics-port", "19100"],
                          capture_output=True, text=True, check=True, timeout=60)
    local, real = yaml.safe_load(proc.stdout), yaml_doc(COMPOSE_REPLICAS)
    assert set(local["services"]) == set(real["services"]), "no kafka added to an override"
    assert not [k for k in local if k.startswith("x-") or k == "name"]
    for name, svc in local["services"].items():
        theirs = real["services"][name]
        if "build" in theirs:
            assert svc["image"] == "streamcl:smoke" and "build" not in svc
        for key in set(theirs) - {"image", "build", "ports"}:
            assert svc[key] == theirs[key], (name, key)
    assert local["services"]["trainer-1"]["ports"] == ["127.0.0.1:19101:9100"]
    assert "ports" not in local["services"]["trainer"]  # the base file's 19100 stays


@pytest.fixture(scope="module")
def k8s_replicas(kustomize_build: Callable[[Path], list[dict[str, Any]]]
                 ) -> dict[str, list[dict[str, Any]]]:
    """kind -> the manifests of that kind that `kubectl apply -k deploy/k8s-replicas` sends."""
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in kustomize_build(K8S_REPLICAS):
        out.setdefault(doc["kind"], []).append(doc)
    return out


def _named(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["metadata"]["name"] == name]
    return doc


def test_k8s_replicas_replace_the_deployment_and_keep_the_rest() -> None:
    kustomization = yaml_doc(K8S_REPLICAS / "kustomization.yaml")
    listed = kustomization["resources"]
    assert "../k8s" in listed
    for name in set(listed) - {"../k8s"}:
        assert (K8S_REPLICAS / name).is_file(), name
    assert {p.name for p in K8S_REPLICAS.glob("*.yaml")} - {"kustomization.yaml"} == \
        set(listed) - {"../k8s"}


def test_k8s_replicas_render_one_statefulset_instead_of_the_deployment(
        k8s_replicas: dict[str, list[dict[str, Any]]]) -> None:
    assert "PersistentVolumeClaim" not in k8s_replicas
    # the trainer's Deployment is gone; the inference server's stays
    assert [d["metadata"]["name"] for d in k8s_replicas["Deployment"]] == \
        [k8s_manifests(SERVE_COMPONENT)["Deployment"]["metadata"]["name"]]
    assert len(k8s_replicas["StatefulSet"]) == 1
    base = k8s_manifests()
    [cm] = k8s_replicas["ConfigMap"]
    assert cm["metadata"]["name"] == base["ConfigMap"]["metadata"]["name"]
    assert cm["data"] == base["ConfigMap"]["data"], "one learner's settings, however many ranks"
    metrics = _named(k8s_replicas["Service"], base["Service"]["metadata"]["name"])
    assert metrics["spec"] == base["Service"]["spec"]
    for docs in k8s_replicas.values():
        for doc in docs:
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "streamcl"


def test_k8s_replicas_group_wiring(k8s_replicas: dict[str, list[dict[str, Any]]]) -> None:
    """RANK from the pod index, WORLD_SIZE = replicas, MASTER_ADDR = pod 0 through a headless
    Service whose names resolve before the pods are ready; pods started together, updated
    together."""
    [sts] = k8s_replicas["StatefulSet"]
    spec = sts["spec"]
    assert spec["podManagementPolicy"] == "Parallel", "pod 0 is ready only once all have joined"
    assert spec["updateStrategy"]["type"] == "OnDelete", "never a group of mixed versions"
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert pod["spec"].get("restartPolicy", "Always") == "Always"

    [container] = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == RANK_FROM_POD_INDEX
    assert env["WORLD_SIZE"]["value"] == str(spec["replicas"]) and spec["replicas"] >= 2
    assert "LOCAL_RANK" not in env, "one rank per pod: metrics on STREAMCL_METRICS__PORT"

    headless = _named(k8s_replicas["Service"], spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= labels.items()
    assert env["MASTER_ADDR"]["value"] == \
        f"{sts['metadata']['name']}-0.{headless['metadata']['name']}"
    master_port = int(env["MASTER_PORT"]["value"])
    [rendezvous] = headless["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert rendezvous["port"] == master_port == ports[rendezvous["targetPort"]]

    # Prometheus: the base's metrics Service selects every rank; the ServiceMonitor selects
    # that Service and not the headless one
    metrics = _named(k8s_replicas["Service"], k8s_manifests()["Service"]["metadata"]["name"])
    assert metrics["spec"]["selector"].items() <= labels.items()
    monitor = k8s_manifests()["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert monitor.items() <= metrics["metadata"]["labels"].items()
    assert not monitor.items() <= headless["metadata"]["labels"].items()


def test_k8s_replicas_each_pod_has_its_own_volume_and_the_probes(
        k8s_replicas: dict[str, list[dict[str, Any]]]) -> None:
    [sts] = k8s_replicas["StatefulSet"]
    pod = sts["spec"]["template"]
    [container] = pod["spec"]["containers"]
    mounts = {v["mountPath"]: v["name"] for v in container["volumeMounts"]}
    templates = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in templates, "/data must be a volume per pod"
    assert templates[mounts["/data"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not [v for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v], \
        "a claim shared by every pod"
    [cm] = k8s_replicas["ConfigMap"]
    for key in ("STREAMCL_SNAPSHOTS__DIR", "STREAMCL_PUBLICATION__REGISTRY"):
        assert cm["data"][key].startswith("/data/"), key

    # the single-replica Deployment's container, but for the group's variables and port
    base_pod = k8s_manifests()["Deployment"]["spec"]["template"]
    [base] = base_pod["spec"]["containers"]
    for key in ("image", "args", "envFrom", "startupProbe", "livenessProbe", "readinessProbe",
                "resources", "securityContext", "volumeMounts"):
        assert container[key] == base[key], key
    assert {e["name"] for e in container["env"]} - {e["name"] for e in base["env"]} == \
        {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["spec"]["securityContext"] == base_pod["spec"]["securityContext"]
    assert pod["metadata"]["annotations"] == base_pod["metadata"]["annotations"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == \
        base_pod["spec"]["terminationGracePeriodSeconds"]


def test_k8s_replicas_server_reads_rank_0s_volume(
        k8s_replicas: dict[str, list[dict[str, Any]]]) -> None:
    """The base's claim is deleted; the server mounts rank 0's claim of the StatefulSet (the
    registry is there: only rank 0 publishes), read-only, on rank 0's node. The rest of its
    Deployment is the base's."""
    [sts] = k8s_replicas["StatefulSet"]
    [trainer] = sts["spec"]["template"]["spec"]["containers"]
    data = next(m["name"] for m in trainer["volumeMounts"] if m["mountPath"] == "/data")
    rank0_claim = f"{data}-{sts['metadata']['name']}-0"  # <template>-<statefulset>-<ordinal>
    assert data in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}

    [dep] = k8s_replicas["Deployment"]
    base = k8s_manifests(SERVE_COMPONENT)["Deployment"]
    pod, base_pod = dep["spec"]["template"]["spec"], base["spec"]["template"]["spec"]
    assert pod["containers"] == base_pod["containers"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": rank0_claim,
                                                               "readOnly": True}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [rank0_claim], "the base's claim does not exist here"
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"] == {
        "matchLabels": {"statefulset.kubernetes.io/pod-name": f"{sts['metadata']['name']}-0"}}
    for key in set(base_pod) - {"affinity", "volumes"}:
        assert pod[key] == base_pod[key], key


def test_k8s_replicas_settings_are_valid_and_data_parallel(
        k8s_replicas: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    image_env = {k: v for k, v in dockerfile_env().items() if k.startswith("STREAMCL_")}
    [cm] = k8s_replicas["ConfigMap"]
    [sts] = k8s_replicas["StatefulSet"]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    names = set(cm["data"]) | {e["name"] for e in container["env"]}
    assert not {n for n in names if n.startswith("STREAMCL_")} - SETTING_VARS
    s = _settings_from_env(monkeypatch, image_env | cm["data"])
    assert STRATEGIES[s.learner.strategy].data_parallel, s.learner.strategy
    assert container.get("command") is None, "k8s must keep the image's entrypoint"
    parse_cli(container["args"], "deploy/k8s-replicas")


def test_k8s_replicas_scale_in_one_place(tmp_path: Path,
                                         kustomize_build: Callable[[Path], list[dict[str, Any]]]
                                         ) -> None:
    """The kustomization's replica count is the one knob: WORLD_SIZE follows it."""
    shutil.copytree(K8S, tmp_path / K8S.name)
    shutil.copytree(K8S_REPLICAS, tmp_path / K8S_REPLICAS.name)
    path = tmp_path / K8S_REPLICAS.name / "kustomization.yaml"
    kustomization = yaml_doc(path)
    [replicas] = kustomization["replicas"]
    replicas["count"] = 5
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    [sts] = [d for d in kustomize_build(path.parent) if d["kind"] == "StatefulSet"]
    [container] = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert sts["spec"]["replicas"] == 5 and env["WORLD_SIZE"] == "5"
