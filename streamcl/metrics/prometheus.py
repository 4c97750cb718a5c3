"""The service's Prometheus metrics: one :class:`ServiceMetrics` per running learner.

Every metric lives in the instance's own :class:`prometheus_client.CollectorRegistry`, not in
the library's global one, so several services (or tests) in one process never collide and each
``/metrics`` endpoint shows exactly one learner. The metric names are a contract: the
dashboards and alert rules are written against them, so renaming one breaks monitoring
silently (a query on a missing series is just empty).

The service calls a handful of small methods (:meth:`ServiceMetrics.observe_batch`,
:meth:`~ServiceMetrics.published`, ...) and never touches a ``prometheus_client`` object, so
the wiring stays one line per event and the exposition can change without touching the loop.

Label values that always exist (the decoder's rejection codes, the boundary triggers, and any
gate reasons given to the constructor) are created at 0 up front: ``rate()`` and
``increase()`` need a series to exist *before* its first increment, or the first rejection of
a run is invisible to alerts.

>>> m = ServiceMetrics(window=5)
>>> m.observe_batch(consumed=3, trained=2, holdout=1, correct=1, loss=0.5, step_seconds=0.01)
>>> m.observe_batch(consumed=4, trained=4, holdout=0, correct=4, loss=0.25, step_seconds=0.01)
>>> m.accuracy, m.loss, m.window_samples
(0.8333333333333334, 0.3333333333333333, 6)
>>> m.observe_batch(consumed=4, trained=4, holdout=0, correct=0, loss=1.0, step_seconds=0.01)
>>> m.accuracy, m.loss, m.window_samples  # the first batch has left the window
(0.5, 0.625, 8)
>>> b'streamcl_samples_trained_total 10.0' in m.render()
True
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from streamcl import __version__
from streamcl.drift.boundaries import TRIGGERS
from streamcl.stream.messages import REASONS

#: Train-step latency buckets (seconds): doubling from 0.5 ms, since a CPU micro-batch step
#: takes milliseconds and a regression by 2x must move a bucket.
TRAIN_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
                      0.512, 1.024, 2.048)
#: Publication latency (export + save + hash + announce).
PUBLICATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Snapshot latency (serialise + hash + atomic write of the full state).
SNAPSHOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Acknowledged journal append latency (one produce round trip).
JOURNAL_APPEND_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                          0.5, 1.0)

#: The prequential window's default size in samples.
DEFAULT_WINDOW = 1000


class PrequentialWindow:
    """Accuracy and mean loss over (at least) the last ``size`` prequentially scored samples.

    The service only has per-batch sums (correct count, mean loss, batch size), so the window
    is made of whole batches: the most recent batches whose sizes add up to at least ``size``
    (all of them while fewer have been seen). A batch is never split, because splitting would
    invent per-sample values the batch does not carry; with batches much smaller than the
    window the overshoot is at most one batch.

    A ring (deque) of per-batch ``(n, correct, loss_sum)`` plus running totals makes each
    update O(1) amortised. The float loss total is recomputed exactly (``math.fsum``) once per
    full turn of the ring, so add/subtract rounding cannot accumulate over a long-running
    service; the integer counts are exact.
    """

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1 sample, got {size}")
        self.size = int(size)
        self._ring: deque[tuple[int, int, float]] = deque()
        self._n = 0
        self._correct = 0
        self._loss_sum = 0.0
        self._evicted = 0

    def add(self, n: int, correct: int, mean_loss: float) -> None:
        """Add one batch of ``n`` samples, ``correct`` of them right, with mean loss
        ``mean_loss`` (finite: the caller filters NaN/inf, which would poison the sums)."""
        if n < 0 or not 0 <= correct <= n:
            raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
        if not math.isfinite(mean_loss):
            raise ValueError(f"mean_loss must be finite, got {mean_loss}")
        if n == 0:
            return
        loss_sum = mean_loss * n
        self._ring.append((n, correct, loss_sum))
        self._n += n
        self._correct += correct
        self._loss_sum += loss_sum
        while self._n - self._ring[0][0] >= self.size:
            old_n, old_correct, old_loss = self._ring.popleft()
            self._n -= old_n
            self._correct -= old_correct
            self._loss_sum -= old_loss
            self._evicted += 1
        if self._evicted >= len(self._ring):
            self._loss_sum = math.fsum(item[2] for item in self._ring)
            self._evicted = 0

    @property
    def samples(self) -> int:
        """Samples in the window now (>= ``size`` once that many have been seen)."""
        return self._n

    @property
    def accuracy(self) -> float:
        """Fraction correct in the window; NaN while it is empty (no score yet, not 0%)."""
        return self._correct / self._n if self._n else math.nan

    @property
    def loss(self) -> float:
        """Mean loss per sample in the window; NaN while it is empty."""
        return self._loss_sum / self._n if self._n else math.nan


class ServiceMetrics:
    """All Prometheus metrics of one learner service, in a registry of its own.

    ``window`` is the prequential window in samples. ``clock`` (unix seconds) is read for the
    publication timestamp and, at scrape time, for the model's freshness; tests inject a fake
    one instead of sleeping. ``gate_reasons`` pre-creates those
    ``streamcl_gate_rejections_total`` series at 0. Every method is thread-safe: the service
    loop updates while the HTTP server's threads scrape.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, *, clock: Callable[[], float] = time.time,
                 gate_reasons: Iterable[str] = (), version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._window = PrequentialWindow(window)
        self._newest_sample_ts: float | None = None
        self._partitions: set[str] = set()
        self._ready = False
        reg = self.registry

        # -- the input stream -----------------------------------------------------------------
        self.samples_consumed = Counter(
            "streamcl_samples_consumed_total", "Valid samples read from the input topic.",
            registry=reg)
        self.samples_trained = Counter(
            "streamcl_samples_trained_total", "Samples the model was trained on.", registry=reg)
        self.samples_holdout = Counter(
            "streamcl_samples_holdout_total",
            "Samples kept out of training for the publication quality gate.", registry=reg)
        self.samples_rejected = Counter(
            "streamcl_samples_rejected_total",
            "Messages sent to the dead-letter topic, by rejection reason code.",
            ["reason"], registry=reg)
        self.consumer_lag = Gauge(
            "streamcl_consumer_lag",
            "Messages between the consumer's position and the partition's end offset.",
            ["partition"], registry=reg)

        # -- learning ---------------------------------------------------------------------------
        self.train_step_seconds = Histogram(
            "streamcl_train_step_seconds", "Wall time of one train step (predict + train).",
            buckets=TRAIN_STEP_BUCKETS, registry=reg)
        self.prequential_accuracy = Gauge(
            "streamcl_prequential_accuracy",
            f"Prequential (test-then-train) accuracy over the last {window} samples "
            "(NaN before the first).", registry=reg)
        self.prequential_loss = Gauge(
            "streamcl_prequential_loss",
            f"Mean prequential cross-entropy over the last {window} samples "
            "(NaN before the first).", registry=reg)
        self.nonfinite_loss = Counter(
            "streamcl_nonfinite_loss_total",
            "Batches whose loss was NaN or infinite (kept out of the prequential window).",
            registry=reg)
        self.drift_events = Counter(
            "streamcl_drift_events_total", "Experience boundaries, by trigger.", ["trigger"],
            registry=reg)
        self.experience = Gauge(
            "streamcl_experience", "Current experience id.", registry=reg)
        self.replay_buffer_samples = Gauge(
            "streamcl_replay_buffer_samples", "Samples held in the replay buffer.", registry=reg)
        self.replay_buffer_capacity = Gauge(
            "streamcl_replay_buffer_capacity", "Replay buffer capacity in samples.",
            registry=reg)

        # -- publication --------------------------------------------------------------------
        self.production_version = Gauge(
            "streamcl_production_version",
            "Version of the model in production (0: none published yet).", registry=reg)
        self.publications = Counter(
            "streamcl_publications_total", "Models published to the registry.", registry=reg)
        self.gate_rejections = Counter(
            "streamcl_gate_rejections_total",
            "Candidate models the quality gate refused, by reason.", ["reason"], registry=reg)
        self.publication_seconds = Histogram(
            "streamcl_publication_seconds",
            "Wall time of one publication (export + save + hash + announce).",
            buckets=PUBLICATION_BUCKETS, registry=reg)
        self.model_freshness = Gauge(
            "streamcl_model_freshness_seconds",
            "Age of the newest sample the production model has trained on (NaN: unknown).",
            registry=reg)
        self.model_freshness.set_function(self._freshness)
        self.last_publication = Gauge(
            "streamcl_last_publication_timestamp_seconds",
            "Unix time of the last publication (0: none yet).", registry=reg)

        # -- durability -----------------------------------------------------------------------
        self.snapshot_seconds = Histogram(
            "streamcl_snapshot_seconds", "Wall time of one state snapshot.",
            buckets=SNAPSHOT_BUCKETS, registry=reg)
        self.journal_append_seconds = Histogram(
            "streamcl_journal_append_seconds", "Latency of one acknowledged journal append.",
            buckets=JOURNAL_APPEND_BUCKETS, registry=reg)
        self.journal_lag_entries = Gauge(
            "streamcl_journal_lag_entries",
            "Journal entries not yet applied to the state (> 0 while recovering).",
            registry=reg)
        self.journal_entries_since_snapshot = Gauge(
            "streamcl_journal_entries_since_snapshot",
            "Journal entries after the last snapshot (what a crash would replay).",
            registry=reg)
        self.broker_outage_seconds = Counter(
            "streamcl_broker_outage_seconds_total",
            "Seconds the broker was out of reach (training paused, not ready).", registry=reg)
        self.broker_reachable = Gauge(
            "streamcl_broker_reachable",
            "0 while the broker is out of reach (no acknowledgement, or every broker down).",
            registry=reg)
        self.broker_reachable.set(1)
        self.ready_gauge = Gauge(
            "streamcl_ready", "1 once the service has caught up after recovery.", registry=reg)
        self.build_info = Info(
            "streamcl_build", "The streamcl package version of this process.", registry=reg)
        self.build_info.info({"version": version})

        for reason in REASONS:
            self.samples_rejected.labels(reason=reason)
        for trigger in TRIGGERS:
            self.drift_events.labels(trigger=trigger)
        for reason in gate_reasons:
            self.gate_rejections.labels(reason=reason)
        self.prequential_accuracy.set(math.nan)
        self.prequential_loss.set(math.nan)

    # -- the service's events -----------------------------------------------------------------
    def observe_batch(self, *, consumed: int, trained: int, holdout: int, correct: int,
                      loss: float, step_seconds: float) -> None:
        """One micro-batch: ``consumed`` valid samples, of which ``trained`` were learned
        (predicted first: ``correct`` of them right, mean cross-entropy ``loss``) and
        ``holdout`` kept for the quality gate; the train step took ``step_seconds``.

        A batch with nothing trained adds no step to the histogram (a non-step would drag its
        quantiles towards 0) and nothing to the window. A NaN/inf ``loss`` counts in
        ``streamcl_nonfinite_loss_total`` and stays out of the window, which it would poison
        for the next ``window`` samples.
        """
        if min(consumed, trained, holdout) < 0 or not 0 <= correct <= trained:
            raise ValueError(f"bad batch counts: consumed={consumed}, trained={trained}, "
                             f"holdout={holdout}, correct={correct}")
        self.samples_consumed.inc(consumed)
        self.samples_trained.inc(trained)
        self.samples_holdout.inc(holdout)
        if trained == 0:
            return
        self.train_step_seconds.observe(step_seconds)
        if not math.isfinite(loss):
            self.nonfinite_loss.inc()
            return
        with self._lock:
            self._window.add(trained, correct, loss)
            self.prequential_accuracy.set(self._window.accuracy)
            self.prequential_loss.set(self._window.loss)

    def rejected(self, reason: str, n: int = 1) -> None:
        """``n`` messages dead-lettered with reason code ``reason`` (a :data:`REASONS` key, e.g.
        :attr:`Rejection.code`). A full ``"code: detail"`` reason is cut to its code: one series
        per detail text would grow without bound."""
        if n:
            code = reason.split(":", 1)[0].strip()  # a full reason would explode cardinality
            self.samples_rejected.labels(reason=code).inc(n)

    def boundary(self, trigger: str, experience: int) -> None:
        """An experience boundary by ``trigger`` opened experience ``experience``."""
        self.drift_events.labels(trigger=trigger).inc()
        self.experience.set(experience)

    def set_experience(self, experience: int) -> None:
        """The current experience without a new boundary (after recovery from a snapshot)."""
        self.experience.set(experience)

    def set_consumer_lag(self, lags: Mapping[int, int]) -> None:
        """Lag per assigned partition. Partitions missing from ``lags`` (revoked in a
        rebalance) lose their series, or their last lag would stay frozen on the dashboard
        and page someone about a partition another instance now owns."""
        current = {str(p): lag for p, lag in lags.items()}
        with self._lock:
            for gone in self._partitions - current.keys():
                self.consumer_lag.remove(gone)
            for partition, lag in current.items():
                self.consumer_lag.labels(partition=partition).set(lag)
            self._partitions = set(current)

    def set_buffer(self, samples: int, capacity: int) -> None:
        """Replay buffer fill level and capacity, in samples."""
        self.replay_buffer_samples.set(samples)
        self.replay_buffer_capacity.set(capacity)

    def published(self, version: int, seconds: float, newest_sample_ts_s: float | None) -> None:
        """Model ``version`` went to production after ``seconds`` of publishing; the newest
        sample it has trained on was produced at ``newest_sample_ts_s`` (unix seconds; None
        when the samples carry no ``ts``: freshness becomes unknown, NaN)."""
        self.publications.inc()
        self.publication_seconds.observe(seconds)
        self.production_version.set(version)
        self.last_publication.set(self._clock())
        self._newest_sample_ts = newest_sample_ts_s

    def set_production(self, version: int, newest_sample_ts_s: float | None,
                       published_at_s: float | None) -> None:
        """The production version found at start (recovery): gauges only, nothing counted."""
        self.production_version.set(version)
        if published_at_s is not None:
            self.last_publication.set(published_at_s)
        self._newest_sample_ts = newest_sample_ts_s

    def gate_rejected(self, reason: str) -> None:
        """The quality gate refused a candidate model, for ``reason`` (a short code)."""
        self.gate_rejections.labels(reason=reason).inc()

    def snapshot_taken(self, seconds: float, entries_since_snapshot: int = 0) -> None:
        """A snapshot took ``seconds``; ``entries_since_snapshot`` journal entries are after it
        (0 when it covers the whole journal, the usual case)."""
        self.snapshot_seconds.observe(seconds)
        self.journal_entries_since_snapshot.set(entries_since_snapshot)

    def journal_appended(self, seconds: float) -> None:
        """One journal append was acknowledged after ``seconds``."""
        self.journal_append_seconds.observe(seconds)

    def set_journal(self, lag_entries: int, since_snapshot: int) -> None:
        """Journal entries not yet applied (recovery progress) and entries after the last
        snapshot (the replay a crash now would cost)."""
        self.journal_lag_entries.set(lag_entries)
        self.journal_entries_since_snapshot.set(since_snapshot)

    def broker_outage(self, seconds: float) -> None:
        """The broker stayed out of reach ``seconds`` longer."""
        self.broker_outage_seconds.inc(max(0.0, seconds))

    def set_broker_reachable(self, reachable: bool) -> None:
        self.broker_reachable.set(1 if reachable else 0)

    def set_ready(self, ready: bool) -> None:
        """Whether the service has caught up after recovery (``/readyz`` and
        ``streamcl_ready``)."""
        self._ready = bool(ready)
        self.ready_gauge.set(1 if ready else 0)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    # -- read-only views ------------------------------------------------------------------------
    @property
    def accuracy(self) -> float:
        """Prequential accuracy over the window (NaN before the first scored sample)."""
        with self._lock:
            return self._window.accuracy

    @property
    def loss(self) -> float:
        """Mean prequential loss over the window (NaN before the first scored sample)."""
        with self._lock:
            return self._window.loss

    @property
    def window_samples(self) -> int:
        """Samples in the prequential window now."""
        with self._lock:
            return self._window.samples

    @property
    def window_size(self) -> int:
        """The configured window, in samples."""
        return self._window.size

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def freshness_seconds(self) -> float:
        """What ``streamcl_model_freshness_seconds`` would show if scraped now."""
        return self._freshness()

    @property
    def consumer_lag_partitions(self) -> frozenset[int]:
        """Partitions that have a ``streamcl_consumer_lag`` series."""
        with self._lock:
            return frozenset(int(p) for p in self._partitions)

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's current value by its exposed name (``streamcl_samples_trained_total``,
        ``streamcl_train_step_seconds_count``, ...), or None when there is no such series."""
        value = self.registry.get_sample_value(name, dict(labels) if labels else None)
        return None if value is None else float(value)

    def _freshness(self) -> float:
        newest = self._newest_sample_ts
        return math.nan if newest is None else self._clock() - newest


__all__ = ["DEFAULT_WINDOW", "JOURNAL_APPEND_BUCKETS", "PUBLICATION_BUCKETS", "SNAPSHOT_BUCKETS",
           "TRAIN_STEP_BUCKETS", "PrequentialWindow", "ServiceMetrics"]
