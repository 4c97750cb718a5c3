"""The trainer service: consume micro-batches, journal each decision, learn, snapshot.

The service is the event-sourced loop of :mod:`streamcl.stream.journal`:

1. :meth:`TrainerService.recover` loads the newest valid snapshot (or builds a fresh trainer),
   replays every journaled ``batch`` entry after it (rebuilding each batch from its offset
   ranges and checking that the trainer plans it exactly as journaled), and seeks the live
   consumer to just after the last journaled batch; it then appends a ``start`` entry that
   carries the configuration as ``trainer_config`` and the ``encoding`` (so
   :func:`streamcl.replay.replay` can rebuild from scratch).
2. :meth:`TrainerService.step_once` polls one micro-batch, plans it, appends the ``batch``
   entry (durable before it takes effect), then applies the boundary and learns.
3. Every ``snapshot_every_batches`` batches or ``snapshot_every_s`` seconds (and on a clean
   stop) :meth:`TrainerService.snapshot` saves the trainer state with the last applied seq and
   the next input offsets, journals a ``snapshot`` entry and commits the consumer-group
   offsets (which only follow snapshots: the journal is the truth, the group offsets are a
   convenience for other tools).

A crash anywhere loses nothing: a batch journaled but not learned is re-learned by recovery;
a batch polled but not journaled is polled again, since recovery seeks to the journal's end.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from streamcl.metrics.prometheus import ServiceMetrics
from streamcl.models import build_model
from streamcl.registry.holdout import Holdout
from streamcl.registry.publisher import Publisher
from streamcl.state import state_sha256
from streamcl.stream.consumer import BatchConsumer, MicroBatch, RangeReader
from streamcl.stream.journal import (
    Journal,
    JournalError,
    batch_entry,
    journal_topic,
    ranges_from_json,
    snapshot_entry,
    start_entry,
)
from streamcl.stream.messages import Decoder
from streamcl.stream.prefetch import PrefetchingConsumer
from streamcl.stream.snapshots import SnapshotStore
from streamcl.threads import configure_threads
from streamcl.trainer import OnlineTrainer, Plan, StepResult, TrainerConfig

if TYPE_CHECKING:
    from streamcl.metrics.server import MetricsServer
    from streamcl.settings import Settings

log = logging.getLogger(__name__)


#: anything that rebuilds a batch from offset ranges
RangeSource = RangeReader | BatchConsumer | PrefetchingConsumer


class ReplayMismatch(RuntimeError):
    """Replaying a journaled batch did not reproduce the journaled decision (log and code
    disagree: different code, configuration, input data or decoding)."""


def wants_task_cuts(config: TrainerConfig) -> bool:
    """Whether the boundary spec includes the ``task`` trigger (batches must not straddle it)."""
    return "task" in {part.strip().split(":")[0] for part in config.boundaries.split(",")}


def split_holdout(batch: MicroBatch, holdout: Holdout | None
                  ) -> tuple[MicroBatch, torch.Tensor | None]:
    """The batch's training part, and the mask of its held-out samples (``None``: none)."""
    if holdout is None or holdout.fraction == 0 or not len(batch):
        return batch, None
    mask = holdout.split(len(batch))
    if not bool(mask.any()):
        return batch, None
    keep = ~mask
    task = None if batch.task is None else batch.task[keep]
    ids = [i for i, m in zip(batch.ids, mask.tolist(), strict=True) if not m]
    return MicroBatch(batch.x[keep], batch.y[keep], task, batch.ranges, batch.rejected,
                      batch.timestamp_ms, ids), mask


def keep_holdout(holdout: Holdout | None, batch: MicroBatch, mask: torch.Tensor | None,
                 experience: int) -> int:
    """File the batch's held-out samples; advance the holdout's stream index; return how many."""
    if holdout is None:
        return 0
    if mask is None:
        holdout.advance(len(batch))
        return 0
    holdout.add(batch.x[mask], batch.y[mask], experience, len(batch))
    return int(mask.sum())


def apply_batch_entry(trainer: OnlineTrainer, consumer: RangeSource,
                      entry: Mapping[str, Any], holdout: Holdout | None = None) -> MicroBatch:
    """Re-apply one journaled ``batch`` entry: rebuild the batch, split off the holdout,
    re-plan, check, learn."""
    batch = consumer.read_ranges(ranges_from_json(entry["ranges"]))
    return apply_batch(trainer, batch, entry, holdout)


def apply_batch(trainer: OnlineTrainer, batch: MicroBatch, entry: Mapping[str, Any],
                holdout: Holdout | None = None) -> MicroBatch:
    """Re-apply a journaled ``batch`` entry to the batch read back from its ranges."""
    seq = entry.get("seq")
    if len(batch) != entry["samples"] or batch.rejected != entry["rejected"]:
        raise ReplayMismatch(f"journal entry {seq}: ranges {entry['ranges']} give "
                             f"{len(batch)} samples / {batch.rejected} rejected, the journal "
                             f"says {entry['samples']} / {entry['rejected']}")
    train, mask = split_holdout(batch, holdout)
    plan = trainer.plan(train.y, train.task) if len(train) else None
    if (plan.to_json() if plan else {}) != entry["plan"]:
        raise ReplayMismatch(f"journal entry {seq}: replay plans "
                             f"{plan.to_json() if plan else {}}, the journal says {entry['plan']}")
    if plan is not None:
        if plan.boundary is not None:
            trainer.end_experience(plan.boundary)
        trainer.learn(train.x, train.y, plan)
    keep_holdout(holdout, batch, mask, trainer.strategy.experience)
    return batch


def full_state(trainer: OnlineTrainer, holdout: Holdout | None) -> dict[str, Any]:
    """Everything replay must reproduce: the trainer's state, plus the holdout's if any."""
    state = trainer.state_dict()
    if holdout is not None:
        state["holdout"] = holdout.state_dict()
    return state


class TrainerService:
    """One learner ``name``: input ``topic`` -> journal ``<name>.journal`` + snapshots."""

    def __init__(self, config: TrainerConfig, *, bootstrap: str, topic: str, group_id: str,
                 name: str, snapshot_dir: str, encoding: str = "binary", batch_size: int = 32,
                 max_wait_s: float = 0.5, snapshot_every_batches: int = 100,
                 snapshot_every_s: float | None = None,
                 keep_snapshots: int = 3, client_config: dict[str, Any] | None = None,
                 session_timeout_ms: int = 10_000, prefetch: bool = True,
                 holdout: Holdout | None = None, publisher: Publisher | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if snapshot_every_batches < 1:
            raise ValueError(f"snapshot_every_batches must be >= 1, got {snapshot_every_batches}")
        self.config = config
        self.topic = topic
        self.name = name
        self.encoding = encoding
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.snapshot_every_batches = snapshot_every_batches
        self.snapshot_every_s = snapshot_every_s
        self._last_snapshot_t = time.monotonic()
        self.snapshots = SnapshotStore(snapshot_dir, keep=keep_snapshots)
        self.journal = Journal(bootstrap, journal_topic(name), client_config)
        decoder = Decoder(config.input_shape, encoding=encoding)
        try:
            # consuming runs in a child process by default (see streamcl.stream.prefetch)
            self.consumer: BatchConsumer | PrefetchingConsumer
            if prefetch:
                self.consumer = PrefetchingConsumer(
                    bootstrap, topic, group_id, decoder, batch_size=batch_size,
                    max_wait_s=max_wait_s, cut_at_task_change=wants_task_cuts(config),
                    client_config=client_config, session_timeout_ms=session_timeout_ms,
                    hold_until_seek=True)
            else:
                self.consumer = BatchConsumer(
                    bootstrap, topic, group_id, decoder,
                    cut_at_task_change=wants_task_cuts(config), client_config=client_config,
                    session_timeout_ms=session_timeout_ms)
        except BaseException:
            self.journal.close()
            raise
        self.trainer: OnlineTrainer | None = None
        self.holdout = holdout
        self.publisher = publisher
        self.metrics = metrics
        #: newest Kafka timestamp (ms) among the samples trained on (model freshness)
        self.newest_ts_ms: int | None = None
        self.ready = False             # recovered and caught up with the journal
        self.last_loop = time.monotonic()  # liveness: the loop is turning
        self._seen_rejections: Counter[str] = Counter()
        #: next input offset per partition (after the last applied batch)
        self.offsets: dict[int, int] = {}
        #: live batches applied by this process / samples / rejected messages in them
        self.batches = 0
        self.samples = 0
        self.rejected = 0
        self.skipped_batches = 0   # re-delivered batches dropped (after a rebalance)
        self._since_snapshot = 0
        self._snapshot_seq = -1    # covers_seq of the last snapshot written or loaded

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> dict[str, Any]:
        """Snapshot + journal replay; seek the live stream after the last journaled batch.

        Publications in the replayed journal are checked against the registry: a version
        journaled but never written (a crash in between) is published now, from the replayed
        state, which is exactly the state it was journaled with.
        """
        t0 = time.monotonic()
        mine = self.config.to_json()
        found = self.snapshots.latest_valid()
        covers, offsets = -1, {}
        if found is not None:
            info, state = found
            if state.get("config") != mine:
                diff = sorted(k for k in mine if state.get("config", {}).get(k) != mine[k])
                raise ValueError(f"snapshot {info.path} was made with a different configuration "
                                 f"({', '.join(diff)}); use its configuration or another "
                                 "learner name / snapshot directory")
            if info.covers_seq >= self.journal.next_seq:
                raise JournalError(f"snapshot {info.path} covers journal entry {info.covers_seq} "
                                   f"but {self.journal.topic} ends before it (next seq "
                                   f"{self.journal.next_seq}): the journal was lost; refusing to "
                                   "resume silently")
            trainer = OnlineTrainer.from_state(state)
            if self.holdout is not None and "holdout" in state:
                self.holdout.load_state_dict(state["holdout"])
            covers, offsets = info.covers_seq, dict(info.offsets)
        else:
            trainer = OnlineTrainer(self.config)
        self.trainer = trainer
        self._snapshot_seq = covers
        if self.publisher is not None:
            self._restore_publisher(covers)
        replayed, republished = 0, 0
        end = self.journal.next_seq
        entries = list(self.journal.read(from_seq=covers + 1))
        # the batches are read ahead (by the consumer process) while earlier ones train
        batches = self.consumer.read_many([ranges_from_json(e["ranges"]) for e in entries
                                           if e["type"] == "batch"])
        first_read = None  # when the first batch was read back (the consumer process is up)
        for entry in entries:
            if entry["type"] == "batch":
                read = next(batches)
                first_read = first_read or time.monotonic()
                batch = apply_batch(trainer, read, entry, self.holdout)
                offsets.update(batch.next_offsets)
                self._note_timestamp(batch)
                replayed += 1
            elif entry["type"] == "publish" and self.publisher is not None:
                republished += self._replay_publication(entry)
            if self.metrics is not None:
                self.metrics.set_journal(max(0, end - 1 - entry["seq"]), entry["seq"] - covers)
        if self.publisher is not None:
            self._load_production()
        self.offsets = offsets
        if offsets:
            self.consumer.seek(offsets)
        else:
            # no snapshot and no journaled batch: the log start, not the group's offsets
            # (which could be ahead if a snapshot directory was lost)
            self.consumer.seek_to_beginning()
        extra = {}
        if self.holdout is not None:
            extra["holdout"] = {"fraction": self.holdout.fraction, "size": self.holdout.size,
                                "seed": self.holdout.seed}
        self._append(start_entry(mine, trainer_config=mine, encoding=self.encoding,
                                 topic=self.topic, snapshot_seq=covers, replayed=replayed,
                                 **extra))
        summary = {"snapshot_seq": None if covers < 0 else covers, "replayed": replayed,
                   "republished": republished, "position": trainer.position,
                   "offsets": dict(offsets), "seconds": time.monotonic() - t0,
                   "replay_seconds": time.monotonic() - (first_read or time.monotonic())}
        if self.metrics is not None:
            self.metrics.set_experience(trainer.strategy.experience)
            self.metrics.set_journal(0, self.journal.next_seq - 1 - covers)
            self.metrics.set_ready(True)
        self.ready = True
        log.info("recovered %s: %s", self.name, summary)
        return summary

    def _restore_publisher(self, covers: int) -> None:
        """Publication triggers and accuracy rows as of the journal's last verdict before
        ``covers`` (those after it are re-read during replay)."""
        pub = self.publisher
        assert pub is not None
        for entry in self.journal.read(to_seq=covers) if covers >= 0 else ():
            if entry["type"] in ("publish", "reject"):
                self._note_verdict(entry)

    def _load_production(self) -> None:
        pub = self.publisher
        assert pub is not None
        pub.load_production()
        if self.metrics is not None and pub.production is not None:
            manifest = pub.production.manifest
            ts = manifest.get("newest_sample_ts_ms")
            self.metrics.set_production(pub.production_version or 0,
                                        None if ts is None else ts / 1e3,
                                        manifest.get("created_at"))

    def _note_verdict(self, entry: Mapping[str, Any]) -> None:
        pub = self.publisher
        assert pub is not None
        pub.mark(entry["position"], entry.get("ts"))
        metrics = entry.get("metrics", {})
        if metrics.get("finished"):
            row = metrics.get("accuracy_matrix", {}).get(str(metrics.get("experience")))
            if row is not None:
                pub.rows[int(metrics["experience"])] = {int(c): v for c, v in row.items()}

    def _replay_publication(self, entry: Mapping[str, Any]) -> int:
        """Re-publish a journaled version the registry lacks; 1 if it had to."""
        pub = self.publisher
        assert pub is not None and self.trainer is not None
        self._note_verdict(entry)
        version = int(entry["version"])
        if pub.registry.exists(version):
            pub.production_version = version
            return 0
        log.warning("v%d was journaled but not in the registry: publishing it now", version)
        pub.commit(pub.rebuild(self.trainer, entry), version, self.trainer,
                   **self._manifest_fields(entry["seq"]))
        return 1

    # -- the loop ---------------------------------------------------------------------------
    def step_once(self) -> bool:
        """Poll, journal and learn one micro-batch; False if none arrived within max_wait_s.

        Between batches, a due publication comes first: it is judged and journaled with the
        model as the previous batch left it (an experience-end publication is due when the
        new batch's plan opens an experience, before that boundary is applied).
        """
        if self.trainer is None:
            raise RuntimeError("call recover() first")
        self.last_loop = time.monotonic()
        batch = self.consumer.poll_batch(self.batch_size, self.max_wait_s)
        if batch is None:
            self._maybe_publish(experience_ended=False)  # the time trigger on a quiet stream
            if self._snapshot_due():  # quiet stream: still bound the journal left to replay
                self.snapshot()
            return False
        stale = {p: first for p, (first, _) in batch.ranges.items()
                 if p in self.offsets and first != self.offsets[p]}
        if any(first < self.offsets[p] for p, first in stale.items()):
            # re-delivered after a rebalance: drop it and continue where the journal ends
            log.warning("batch %s re-delivered (journal is at %s): skipped", batch.ranges,
                        self.offsets)
            self.skipped_batches += 1
            self.consumer.seek({p: self.offsets[p] for p in batch.ranges if p in self.offsets})
            return True
        if stale:
            log.warning("offset gap before batch %s (expected %s)", batch.ranges, self.offsets)
        train, mask = split_holdout(batch, self.holdout)
        plan = self.trainer.plan(train.y, train.task) if len(train) else None
        self._maybe_publish(experience_ended=plan is not None and plan.boundary is not None)
        self._append(batch_entry(batch.ranges, plan.to_json() if plan else {},
                                 samples=len(batch), rejected=batch.rejected))
        t0 = time.perf_counter()
        result = None
        if plan is not None:
            if plan.boundary is not None:
                self.trainer.end_experience(plan.boundary)
            result = self.trainer.learn(train.x, train.y, plan)
            self._note_timestamp(batch)
        step_s = time.perf_counter() - t0
        held = keep_holdout(self.holdout, batch, mask, self.trainer.strategy.experience)
        self.offsets.update(batch.next_offsets)
        self.batches += 1
        self.samples += len(batch)
        self.rejected += batch.rejected
        self._since_snapshot += 1
        if self.metrics is not None:
            self._observe(batch, plan, result, held, step_s)
        if self._since_snapshot >= self.snapshot_every_batches or self._snapshot_due():
            self.snapshot()
        return True

    def _observe(self, batch: MicroBatch, plan: Plan | None, result: StepResult | None,
                 held: int, step_s: float) -> None:
        m = self.metrics
        assert m is not None and self.trainer is not None
        m.observe_batch(consumed=len(batch), trained=plan.size if plan else 0, holdout=held,
                        correct=result.correct if result else 0,
                        loss=result.loss if result else 0.0, step_seconds=step_s)
        rejections = Counter(self.consumer.rejections)
        for code, n in (rejections - self._seen_rejections).items():
            m.rejected(code, n)
        self._seen_rejections = rejections
        if plan is not None and plan.boundary is not None:
            m.boundary(plan.boundary.trigger, plan.boundary.experience)
        m.set_consumer_lag(self.consumer.lag())
        m.set_buffer(*self.trainer.strategy.memory_usage())
        m.set_journal(0, self.journal.next_seq - 1 - self._snapshot_seq)

    def _note_timestamp(self, batch: MicroBatch) -> None:
        if batch.timestamp_ms is not None:
            self.newest_ts_ms = max(self.newest_ts_ms or 0, batch.timestamp_ms)

    def _append(self, entry: Mapping[str, Any]) -> int:
        t0 = time.perf_counter()
        seq = self.journal.append(entry)
        if self.metrics is not None:
            self.metrics.journal_appended(time.perf_counter() - t0)
        return seq

    # -- publication --------------------------------------------------------------------------
    def _maybe_publish(self, experience_ended: bool) -> dict[str, Any] | None:
        """Judge, journal and (if the gate agrees) publish the current model when due."""
        pub, trainer = self.publisher, self.trainer
        if pub is None or trainer is None:
            return None
        trigger = pub.due(trainer.position, experience_ended)
        if trigger is None:
            return None
        t0 = time.perf_counter()
        candidate = pub.evaluate(trainer, self.holdout or Holdout(0, 1), trigger,
                                 trainer.strategy.experience, finished=experience_ended)
        common = {"position": trainer.position, "trigger": trigger,
                  "metrics": candidate.metrics, "gate": candidate.gate,
                  "newest_sample_ts_ms": self.newest_ts_ms}
        if not candidate.promote:
            entry = {"type": "reject", "reason": candidate.reason, **common}
            self._append(entry)
            pub.mark(trainer.position)
            if self.metrics is not None:
                self.metrics.gate_rejected("worse")
            log.info("gate rejected the candidate at %d: %s", trainer.position, candidate.reason)
            return entry
        version = pub.next_version()
        entry = {"type": "publish", "version": version, **common}
        seq = self._append(entry)  # journaled before it takes effect
        pub.commit(candidate, version, trainer, **self._manifest_fields(seq))
        pub.mark(trainer.position)
        if self.metrics is not None:
            self.metrics.published(version, time.perf_counter() - t0,
                                   None if self.newest_ts_ms is None else self.newest_ts_ms / 1e3)
        log.info("published v%d at %d (%s): %s", version, trainer.position, trigger,
                 candidate.reason)
        return entry

    def _manifest_fields(self, seq: int) -> dict[str, Any]:
        assert self.trainer is not None
        return {"journal_seq": seq, "journal_topic": self.journal.topic,
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "position": self.trainer.position, "newest_sample_ts_ms": self.newest_ts_ms}

    def _snapshot_due(self) -> bool:
        return (self.snapshot_every_s is not None and self._since_snapshot > 0
                and time.monotonic() - self._last_snapshot_t >= self.snapshot_every_s)

    def snapshot(self) -> dict[str, Any] | None:
        """Save the state covering every journal entry so far; journal it; commit offsets.

        Returns the journaled entry, or ``None`` when the last snapshot already covers it all.
        """
        if self.trainer is None:
            raise RuntimeError("call recover() first")
        covers = self.journal.next_seq - 1
        if covers == self._snapshot_seq or covers < 0:
            return None
        offsets = dict(self.offsets)
        t0 = time.perf_counter()
        info = self.snapshots.save(full_state(self.trainer, self.holdout), covers_seq=covers,
                                   offsets=offsets)
        entry = snapshot_entry(info.path, info.sha256, covers, offsets)
        # the snapshot's own entry adds nothing to replay: a later snapshot() with no new batch
        # must see "nothing new", not write the same state again
        self._snapshot_seq = self._append(entry)
        if self.metrics is not None:
            self.metrics.snapshot_taken(time.perf_counter() - t0, 0)
            self.metrics.set_journal(0, 0)
        self._since_snapshot = 0
        self._last_snapshot_t = time.monotonic()
        if offsets:
            self.consumer.commit(offsets)
        return entry

    def run(self, stop: threading.Event,
            until: Callable[[TrainerService], bool] | None = None) -> dict[str, Any]:
        """``recover()``, then step until ``stop`` is set (or ``until(self)`` is true); then
        snapshot and close. Returns the recovery summary plus this run's counts."""
        try:
            summary = self.recover()
            while not stop.is_set() and not (until is not None and until(self)):
                self.step_once()
            self.snapshot()
        finally:
            self.close()
        return {**summary, "batches": self.batches, "samples": self.samples,
                "rejected": self.rejected}

    def alive(self, stuck_after_s: float = 120.0) -> bool:
        """Liveness: recovering, or the loop turned within ``stuck_after_s``."""
        return not self.ready or time.monotonic() - self.last_loop < stuck_after_s

    def state_sha256(self) -> str:
        if self.trainer is None:
            raise RuntimeError("call recover() first")
        return state_sha256(full_state(self.trainer, self.holdout))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close()
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                self.publisher.close()
        self.journal.close()


def service_from_settings(settings: Settings, bootstrap: str
                          ) -> tuple[TrainerService, MetricsServer | None]:
    """The service ``streamcl run`` runs: trainer, holdout, registry publisher, metrics, and
    the HTTP endpoint (started, so probes answer during recovery; ``None`` when port is 0)."""
    from streamcl.metrics.server import MetricsServer
    from streamcl.registry.announce import Announcer
    from streamcl.registry.publisher import PublishPolicy
    from streamcl.registry.registry import ModelRegistry

    config = settings.trainer_config()
    configure_threads(settings.torch_threads,
                      build_model(config.model, config.input_shape, config.hidden),
                      config.input_shape, settings.batch_size, reserve=int(settings.prefetch))
    client = settings.kafka_client_config()
    metrics = ServiceMetrics(window=settings.metrics_window, gate_reasons=("worse",))
    holdout = (Holdout(settings.holdout_fraction, settings.holdout_size, settings.seed)
               if settings.holdout_fraction > 0 else None)
    policy = PublishPolicy(every_samples=settings.publish_every_samples,
                           every_s=settings.publish_every_s,
                           at_experience_end=settings.publish_at_experience_end,
                           tolerance=settings.gate_tolerance)
    publisher = None
    if policy.every_samples or policy.every_s or policy.at_experience_end:
        publisher = Publisher(ModelRegistry(settings.registry), policy,
                              announcer=Announcer(bootstrap, settings.name, client))
    service = TrainerService(
        config, bootstrap=bootstrap, topic=settings.topic,
        name=settings.name, group_id=settings.group_id or settings.name,
        snapshot_dir=str(settings.snapshot_dir), encoding=settings.encoding,
        batch_size=settings.batch_size, max_wait_s=settings.max_wait_s,
        snapshot_every_batches=settings.snapshot_every_batches,
        snapshot_every_s=settings.snapshot_every_s, keep_snapshots=settings.keep_snapshots,
        client_config=client, prefetch=settings.prefetch, holdout=holdout,
        publisher=publisher, metrics=metrics)
    server = None
    if settings.metrics_port:
        server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port,
                               live=service.alive, ready=lambda: service.ready).start()
    return service, server


def install_sigterm(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM and SIGINT (main thread only), so ``run`` drains and exits."""
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


__all__ = ["ReplayMismatch", "TrainerService", "apply_batch_entry", "full_state",
           "install_sigterm", "service_from_settings", "split_holdout", "wants_task_cuts"]
