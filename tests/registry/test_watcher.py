"""Watchers hot-swap the served model: over a real Kafka-protocol broker, and by polling."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from streamcl.registry import (
    Announcer,
    InferenceModel,
    ModelRegistry,
    ModelWatcher,
    NoModelError,
    announcement,
    models_topic,
)

Publish = Callable[..., dict[str, Any]]


@pytest.fixture
def local_registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture(scope="module")
def probe(split_digits_once: Any) -> torch.Tensor:
    """Inputs of classes 0-5, on which the exports (2 vs 6 classes) predict differently."""
    return torch.from_numpy(split_digits_once.x[:640:4].copy())


def _expected(registry: ModelRegistry, version: int, x: torch.Tensor) -> torch.Tensor:
    return InferenceModel(*registry.load(version)).predict(x)


def _read_all(bootstrap: str, topic: str, n: int, timeout_s: float = 20.0) -> list[dict]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        out: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            out += [json.loads(r.value) for recs in consumer.poll(timeout_ms=200).values()
                    for r in recs]
    finally:
        consumer.close(autocommit=False)
    return out


def test_hot_swap_over_the_broker(kafka_bootstrap: str, local_registry: ModelRegistry,
                                  publish: Publish, probe: torch.Tensor) -> None:
    registry, name = local_registry, f"svc-{uuid.uuid4().hex[:8]}"
    publish(registry, 0, aliases=["production"])
    swapped: list[int | None] = []
    with Announcer(kafka_bootstrap, name) as announcer:
        # an announcement from before the watcher started: not counted
        announcer.announce(announcement("publish", 1, alias="production", registry=registry.url))
        watcher = ModelWatcher(registry, bootstrap=kafka_bootstrap, name=name, poll_s=0.2,
                               resync_s=None, on_swap=lambda m: swapped.append(m.version))
        with watcher:
            assert watcher.version == 1 and swapped == [1]  # the initial load counts
            v1 = watcher.predict(probe)
            assert torch.equal(v1, _expected(registry, 1, probe))

            m2 = publish(registry, 2)  # published, not promoted: nothing to swap
            event = announcement("publish", 2, alias=None, registry=registry.url)
            announcer.announce(event)
            deadline = time.monotonic() + 20
            while watcher.last_announcement != event and time.monotonic() < deadline:
                time.sleep(0.01)  # polling interval of a condition with a deadline
            assert watcher.last_announcement == event
            assert watcher.announcements == 1  # the one from before start() did not count
            assert watcher.version == 1
            registry.promote(2)
            # no announcement of the promotion yet and no resync: still v1
            assert not watcher.wait_for_version(2, timeout=0.5)
            announcer.announce(announcement("promote", 2, alias="production",
                                            registry=registry.url))
            assert watcher.wait_for_version(2, timeout=20)
            assert m2["version"] == 2 and swapped == [1, 2]
            v2 = watcher.predict(probe)
            assert torch.equal(v2, _expected(registry, 2, probe))
            assert not torch.equal(v1, v2)  # the swap changed the predictions
            assert set(v2.unique().tolist()) - {0, 1}  # new classes are predicted
            assert len(watcher.swap_latency_s) == 1 and 0 <= watcher.swap_latency_s[0] < 20

            registry.rollback()
            announcer.announce(announcement("rollback", 1, alias="production",
                                            registry=registry.url))
            assert watcher.wait_for_version(1, timeout=20)
            assert torch.equal(watcher.predict(probe), v1)
            assert swapped == [1, 2, 1] and watcher.refused == 0
    events = _read_all(kafka_bootstrap, models_topic(name), 4)
    assert [(e["event"], e["version"], e["alias"]) for e in events] == [
        ("publish", 1, "production"), ("publish", 2, None), ("promote", 2, "production"),
        ("rollback", 1, "production")]
    assert all(e["registry"] == registry.url and isinstance(e["ts"], float) for e in events)


def test_corrupt_version_is_refused_and_the_old_model_keeps_serving(
        kafka_bootstrap: str, local_registry: ModelRegistry, publish: Publish,
        probe: torch.Tensor) -> None:
    registry, name = local_registry, f"svc-{uuid.uuid4().hex[:8]}"
    publish(registry, 0, aliases=["production"])
    publish(registry, 2)
    path = "versions/000002/weights.safetensors"
    data = bytearray(registry.store.read_bytes(path))
    data[-1] ^= 0xFF
    registry.store.write_bytes(path, bytes(data))
    with Announcer(kafka_bootstrap, name) as announcer, \
            ModelWatcher(registry, bootstrap=kafka_bootstrap, name=name, poll_s=0.2) as watcher:
        before = watcher.predict(probe)
        # promote verifies and would refuse v2: move the alias the way it ends up when the
        # weights are damaged after a verified promotion
        registry.set_alias("production", 2, reason="promote", verify=False)
        announcer.announce(announcement("promote", 2, alias="production", registry=registry.url))
        deadline = time.monotonic() + 20
        while watcher.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # polling interval of a condition with a deadline
        assert watcher.refused == 1 and watcher.version == 1
        assert torch.equal(watcher.predict(probe), before)
        # a good version announced afterwards is still taken
        publish(registry, 1, aliases=["production"])
        announcer.announce(announcement("publish", 3, alias="production", registry=registry.url))
        assert watcher.wait_for_version(3, timeout=20)


def test_polling_without_a_broker(local_registry: ModelRegistry, publish: Publish,
                                  probe: torch.Tensor) -> None:
    registry = local_registry
    with ModelWatcher(registry, poll_s=0.05) as watcher:
        assert watcher.model is None and watcher.version is None
        with pytest.raises(NoModelError, match="production"):
            watcher.predict(probe)
        publish(registry, 0, aliases=["production"])
        assert watcher.wait_for_version(1, timeout=10)
        publish(registry, 2, aliases=["production"])
        assert watcher.wait_for_version(2, timeout=10)
        assert torch.equal(watcher.predict(probe), _expected(registry, 2, probe))
        assert watcher.swap_latency_s == []  # no announcement, no latency to measure
        # a corrupt version is refused once, not re-tried every poll
        publish(registry, 1)
        registry.store.write_bytes("versions/000003/weights.safetensors", b"junk")
        registry.set_alias("production", 3, verify=False)  # promote would refuse it
        deadline = time.monotonic() + 10
        while watcher.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # polling interval of a condition with a deadline
        assert not watcher.wait_for_version(3, timeout=0.3)
        assert watcher.refused == 1 and watcher.version == 2
    assert watcher._thread is None  # stopped


def test_watcher_on_an_fsspec_url(publish: Publish) -> None:
    registry = ModelRegistry(f"memory://streamcl-test-{uuid.uuid4().hex}/registry")
    publish(registry, 0, aliases=["production"])
    with ModelWatcher(registry.url, alias="production", poll_s=0.05) as watcher:
        assert watcher.version == 1
        publish(registry, 1, aliases=["production"])
        assert watcher.wait_for_version(2, timeout=10)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="name"):
        ModelWatcher("registry", bootstrap="localhost:9092")
    with pytest.raises(ValueError, match="poll_s"):
        ModelWatcher("registry", poll_s=0)
    with pytest.raises(ValueError, match="event"):
        announcement("deploy", 1, alias=None, registry="r")
    with pytest.raises(ValueError, match="version"):
        announcement("publish", 0, alias=None, registry="r")
