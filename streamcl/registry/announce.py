"""Announcements: one Kafka record per registry change, so inference services swap at once.

The registry itself is passive storage; a watcher polling it would trade freshness for load.
Instead every change — a publication, a promotion, a rollback — is announced on
``<name>.models`` (:func:`models_topic`) as one JSON record::

    {"event": "publish" | "promote" | "rollback", "version": 7, "alias": "production" | null,
     "ts": 1767225600.123, "registry": "s3://models/registry"}

``ts`` is the announcer's wall clock (seconds) when the event was made; watchers measure their
swap latency from it. ``registry`` is the store's URL (:attr:`ModelRegistry.url`), for services
watching several. An announcement is a *hint*: a watcher re-reads the alias from the registry,
which stays the source of truth, so a lost, duplicated or reordered announcement can delay a
swap but never cause a wrong one.
"""

from __future__ import annotations

import contextlib
import json
import time
from types import TracebackType
from typing import Any

from streamcl.stream.broker import ensure_topics

EVENTS = ("publish", "promote", "rollback")


def models_topic(name: str) -> str:
    """The announcement topic of service ``name``.

    >>> models_topic("streamcl")
    'streamcl.models'
    """
    return f"{name}.models"


def announcement(event: str, version: int, *, alias: str | None, registry: str,
                 ts: float | None = None) -> dict[str, Any]:
    """An announcement record (see the module docstring), checked.

    >>> a = announcement("promote", 3, alias="production", registry="/srv/reg", ts=1.0)
    >>> a["event"], a["version"], a["alias"], a["ts"], a["registry"]
    ('promote', 3, 'production', 1.0, '/srv/reg')
    """
    if event not in EVENTS:
        raise ValueError(f"announcement event {event!r}: one of {', '.join(EVENTS)}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"announcement version {version!r}: a version number >= 1")
    return {"event": event, "version": version, "alias": alias,
            "ts": time.time() if ts is None else float(ts), "registry": registry}


class Announcer:
    """Sends announcements to ``<name>.models``, each acknowledged before :meth:`announce`
    returns (``acks="all"``), so a caller that announces after promoting knows watchers can see
    it. The topic is created when missing. ``client_config`` holds security settings
    (:func:`streamcl.stream.broker.kafka_config`)."""

    def __init__(self, bootstrap: str, name: str, client_config: dict[str, Any] | None = None,
                 *, timeout_s: float = 30.0) -> None:
        from kafka import KafkaProducer

        self.topic = models_topic(name)
        self.timeout_s = timeout_s
        config = dict(client_config or {})
        ensure_topics(bootstrap, [self.topic], client_config=config, timeout_s=timeout_s)
        self._producer: Any = KafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=0,
            request_timeout_ms=max(100, int(timeout_s * 1000)), **config)

    def announce(self, event: dict[str, Any]) -> None:
        """Send ``event`` (normally built by :func:`announcement`) and wait for the ack."""
        if self._producer is None:
            raise RuntimeError("the announcer is closed")
        checked = announcement(event["event"], event["version"], alias=event.get("alias"),
                               registry=event["registry"], ts=event.get("ts"))
        value = json.dumps({**event, **checked}, separators=(",", ":"),
                           allow_nan=False).encode()
        future = self._producer.send(self.topic, value=value,
                                     key=str(checked["version"]).encode())
        self._producer.flush(timeout=self.timeout_s)
        future.get(timeout=self.timeout_s)

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=self.timeout_s)

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
