"""Fixtures for the streaming layer: raw topic helpers over the session's real broker
(``kafka_bootstrap``, in tests/conftest.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from streamcl.stream.broker import ensure_topics

#: (value, headers) or (value, headers, key)
Message = tuple[Any, ...]


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

