"""Fixtures for the streaming layer: a real Kafka-compatible broker and raw topic helpers.

``kafka_bootstrap`` is, in order of preference: the cluster named by ``STREAMCL_TEST_BOOTSTRAP``
(to run these tests against real Kafka), a testcontainers Kafka when testcontainers is installed
and a Docker engine answers, else the embedded tansu broker. Every test works in its own
uuid-named topics and consumer groups, so one broker serves the whole session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from streamcl.stream.broker import EmbeddedBroker, ensure_topics

#: (value, headers) or (value, headers, key)
Message = tuple[Any, ...]


def _docker_kafka() -> Any:
    """A started testcontainers Kafka, or None when testcontainers or Docker is missing."""
    try:
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        return None
    if shutil.which("docker") is None:
        return None
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode != 0:
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return KafkaContainer().start()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("STREAMCL_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    container = _docker_kafka()
    if container is not None:
        try:
            yield container.get_bootstrap_server()
        finally:
            container.stop()
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def session_timeout_ms() -> int:
    """Consumer-group session timeout: Kafka's minimum (6 s) by default; tansu then completes a
    group's first join after about 3 s (half the session timeout)."""
    return 6000


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A fresh single-partition topic."""
    name = f"streamcl-test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, [name])
    return name


@pytest.fixture
def group_id() -> str:
    return f"streamcl-group-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def send(kafka_bootstrap: str) -> Iterator[Callable[[str, Sequence[Message]], list[int]]]:
    """``send(topic, [(value, headers[, key]), ...])``: produce in order, return the offsets."""
    from kafka import KafkaProducer  # after streamcl.stream: a quiet import

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=2)

    def _send(topic: str, messages: Sequence[Message]) -> list[int]:
        futures = [producer.send(topic, value=m[0], headers=list(m[1]),
                                 key=m[2] if len(m) > 2 else None) for m in messages]
        producer.flush()
        return [f.get(timeout=30).offset for f in futures]

    yield _send
    producer.close()


@pytest.fixture
def read_topic(kafka_bootstrap: str) -> Callable[..., list[Any]]:
    """``read_topic(topic, n, timeout_s=20)``: the records of partition 0, which must be
    exactly ``n``. (Not checked with ``end_offsets``: tansu answers ListOffsets with the last
    record *batch*'s base offset + 1, not the high watermark.)"""
    from kafka import KafkaConsumer, TopicPartition  # after streamcl.stream: a quiet import

    def _read(topic: str, n: int, timeout_s: float = 20.0) -> list[Any]:
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, 0)
            out: list[Any] = []
            deadline = time.monotonic() + timeout_s
            while len(out) < n and time.monotonic() < deadline:
                for recs in consumer.poll(timeout_ms=200).values():
                    out.extend(recs)
            # nothing more: everything was written before we were called, so one more bounded
            # fetch would return any surplus record
            out.extend(r for recs in consumer.poll(timeout_ms=300).values() for r in recs)
        finally:
            consumer.close(autocommit=False)
        assert len(out) == n, f"{topic}: {len(out)} records, want {n}"
        return out

    return _read


def _load_prometheus_helper() -> Any:
    """tests/prometheus_server.py (a real Prometheus for scrape tests), loaded by path."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "streamcl_tests_prometheus_server"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "prometheus_server.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


prometheus_server = _load_prometheus_helper().prometheus_server
