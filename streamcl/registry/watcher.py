"""Hot-swapping the served model when an alias moves: the inference side of the registry.

:class:`ModelWatcher` keeps the version an alias (``production`` by default) points at loaded
and ready in :attr:`ModelWatcher.model`. It follows the announcement topic
(:mod:`streamcl.registry.announce`) when it has a broker, or polls the alias file otherwise.
Either way the alias in the registry is what counts; an announcement only says "look now".

Swapping is a single reference assignment of a fully loaded, SHA-256-verified
:class:`~streamcl.registry.model.InferenceModel`, so a request in flight keeps the model it
started with and the next one gets the new model whole — never a half-loaded one. A version
that fails verification is refused: logged, counted in :attr:`ModelWatcher.refused`, and the
old model keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import torch

from streamcl.registry.announce import models_topic
from streamcl.registry.model import InferenceModel
from streamcl.registry.registry import PRODUCTION, ModelRegistry, format_version
from streamcl.registry.store import Store

log = logging.getLogger(__name__)


class NoModelError(RuntimeError):
    """The alias names no loadable version yet, so there is nothing to predict with."""


class ModelWatcher:
    """Serve the version ``alias`` points at, swapping when it moves.

    ``bootstrap`` and ``name``: follow ``<name>.models`` on that Kafka cluster (``client_config``
    holds security settings). The consumer has no group and starts at the partitions' *end*
    offsets taken in :meth:`start`, so only announcements made after it count; every
    announcement makes it re-read the alias, and so does a quiet ``resync_s`` (a safety net for
    an alias moved without an announcement; ``None`` disables it). Without ``bootstrap`` it
    polls the alias file every ``poll_s`` seconds.

    ``on_swap(model)`` is called after each swap, the initial load in :meth:`start` included
    (from the caller's thread then, from the watcher's thread afterwards); ``on_refuse(version,
    error)`` after each refusal.
    :attr:`swap_latency_s` records, per swap triggered by an announcement, the seconds from the
    announcement's ``ts`` to the swap (clocks of two machines: only as good as their sync).
    """

    def __init__(self, registry: ModelRegistry | Store | str | os.PathLike[str], *,
                 alias: str = PRODUCTION, bootstrap: str | None = None, name: str | None = None,
                 client_config: dict[str, Any] | None = None, poll_s: float = 1.0,
                 on_swap: Callable[[InferenceModel], None] | None = None,
                 on_refuse: Callable[[int, Exception], None] | None = None,
                 resync_s: float | None = 60.0, fetch_max_wait_ms: int = 50) -> None:
        if bootstrap is not None and not name:
            raise ValueError("ModelWatcher: bootstrap given without the service name whose "
                             "<name>.models topic to follow")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.registry = registry if isinstance(registry, ModelRegistry) else \
            ModelRegistry(registry)
        self.alias = alias
        self.bootstrap = bootstrap
        self.name = name
        self.client_config = dict(client_config or {})
        self.poll_s = poll_s
        self.resync_s = resync_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.on_swap = on_swap
        self.on_refuse = on_refuse
        #: the model being served (replaced whole on a swap); None until a version loads
        self.model: InferenceModel | None = None
        #: versions refused because they failed verification or could not be loaded
        self.refused = 0
        #: seconds from an announcement's ``ts`` to the swap it caused
        self.swap_latency_s: list[float] = []
        #: announcements handled so far, and the newest one (for monitoring and tests)
        self.announcements = 0
        self.last_announcement: dict[str, Any] | None = None
        self._refused_version: int | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None

    # -- serving --------------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        model = self.model
        return None if model is None else model.version

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels predicted by the current model (one model for the whole call)."""
        model = self.model  # read once: a swap during the call does not affect it
        if model is None:
            raise NoModelError(f"alias {self.alias!r} names no loadable version in "
                               f"{self.registry.url} yet")
        return model.predict(x)

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until ``version`` is served (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.version == version, timeout)

    # -- lifetime -------------------------------------------------------------------------------
    def start(self) -> ModelWatcher:
        """Position on the announcements' end, load the alias's current version (if any), and
        start following. Positioning first means an alias moved meanwhile is seen either by
        the initial read or through its announcement."""
        if self._thread is not None:
            raise RuntimeError("the watcher is already started")
        if self.bootstrap is not None:
            self._consumer = self._open_consumer()
        self._refresh(())
        target = self._follow if self._consumer is not None else self._poll
        self._thread = threading.Thread(target=target, name="streamcl-model-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        elif self._consumer is not None:  # started the consumer but not the thread
            self._close_consumer()

    def __enter__(self) -> ModelWatcher:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- following --------------------------------------------------------------------------
    def _open_consumer(self) -> Any:
        from kafka import KafkaConsumer, TopicPartition

        from streamcl.stream.broker import ensure_topics

        topic = models_topic(self.name or "")
        ensure_topics(self.bootstrap or "", [topic], client_config=self.client_config)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                 enable_auto_commit=False,
                                 fetch_max_wait_ms=self.fetch_max_wait_ms, **self.client_config)
        try:
            deadline = time.monotonic() + 30.0
            partitions = consumer.partitions_for_topic(topic)
            while not partitions:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no topic {topic!r} on {self.bootstrap}")
                time.sleep(0.1)  # polling interval of a metadata refresh, not a synchronisation
                partitions = consumer.partitions_for_topic(topic)
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the end offsets now, not lazily at the first poll
                consumer.position(tp)
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:
                log.debug("closing the announcement consumer failed", exc_info=True)

    def _follow(self) -> None:
        resync_at = time.monotonic() + (self.resync_s or 0)
        try:
            while not self._stop.is_set():
                try:
                    batches = self._consumer.poll(timeout_ms=int(min(self.poll_s, 0.5) * 1000))
                except Exception as exc:  # the broker is away: keep serving, try again
                    log.warning("model announcements: %s", exc)
                    self._stop.wait(self.poll_s)
                    continue
                events = [e for recs in batches.values() for r in recs
                          if (e := _parse(r.value)) is not None]
                if events:
                    self._refresh(events)
                    self.announcements += len(events)
                    self.last_announcement = events[-1]
                    resync_at = time.monotonic() + (self.resync_s or 0)
                elif self.resync_s is not None and time.monotonic() >= resync_at:
                    self._refresh(())
                    resync_at = time.monotonic() + self.resync_s
        finally:
            self._close_consumer()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._refresh(())

    def _refresh(self, events: Iterable[dict[str, Any]]) -> None:
        """Re-read the alias; load and swap in its version if it changed."""
        events = list(events)
        try:
            version = self.registry.alias(self.alias)
        except Exception as exc:
            log.warning("model watcher: cannot read alias %r: %s", self.alias, exc)
            return
        if version is None or version == self.version:
            return
        if version == self._refused_version and not events:
            return  # refused already; retried when something is announced
        try:
            model = self.registry.load_model(version)
        except Exception as exc:
            self.refused += 1
            self._refused_version = version
            log.error("model watcher: refusing %s of alias %r, still serving %s: %s",
                      format_version(version), self.alias,
                      format_version(self.version) if self.version else "nothing", exc)
            if self.on_refuse is not None:
                try:
                    self.on_refuse(version, exc)
                except Exception:
                    log.exception("model watcher: on_refuse callback failed")
            return
        now = time.time()
        with self._cond:
            self.model = model  # the swap: one reference assignment
            self._refused_version = None
            ts = _announced_ts(events, version, self.alias)
            if ts is not None:
                self.swap_latency_s.append(now - ts)
            self._cond.notify_all()
        log.info("model watcher: alias %r now serves %s", self.alias, format_version(version))
        if self.on_swap is not None:
            try:
                self.on_swap(model)
            except Exception:
                log.exception("model watcher: on_swap callback failed")


def _parse(value: bytes | None) -> dict[str, Any] | None:
    try:
        event = json.loads(value or b"")
    except ValueError:
        log.warning("model announcements: skipping a record that is not JSON")
        return None
    return event if isinstance(event, dict) else None


def _announced_ts(events: list[dict[str, Any]], version: int, alias: str) -> float | None:
    """The ``ts`` of the newest announcement of ``version`` (else of the newest one)."""
    def ts(e: dict[str, Any]) -> float | None:
        v = e.get("ts")
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    matching = [e for e in events if e.get("version") == version and e.get("alias") in
                (alias, None)]
    for group in (matching, events):
        stamps = [t for e in group if (t := ts(e)) is not None]
        if stamps:
            return max(stamps)
    return None
