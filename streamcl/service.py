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
from collections.abc import Callable, Mapping
from typing import Any

from streamcl.state import state_sha256
from streamcl.stream.consumer import BatchConsumer, MicroBatch
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
from streamcl.stream.snapshots import SnapshotStore
from streamcl.trainer import OnlineTrainer, TrainerConfig

log = logging.getLogger(__name__)


class ReplayMismatch(RuntimeError):
    """Replaying a journaled batch did not reproduce the journaled decision (log and code
    disagree: different code, configuration, input data or decoding)."""


def wants_task_cuts(config: TrainerConfig) -> bool:
    """Whether the boundary spec includes the ``task`` trigger (batches must not straddle it)."""
    return "task" in {part.strip().split(":")[0] for part in config.boundaries.split(",")}


def apply_batch_entry(trainer: OnlineTrainer, consumer: BatchConsumer,
                      entry: Mapping[str, Any]) -> MicroBatch:
    """Re-apply one journaled ``batch`` entry: rebuild the batch, re-plan, check, learn."""
    batch = consumer.read_ranges(ranges_from_json(entry["ranges"]))
    seq = entry.get("seq")
    if len(batch) != entry["samples"] or batch.rejected != entry["rejected"]:
        raise ReplayMismatch(f"journal entry {seq}: ranges {entry['ranges']} give "
                             f"{len(batch)} samples / {batch.rejected} rejected, the journal "
                             f"says {entry['samples']} / {entry['rejected']}")
    if len(batch) == 0:
        return batch  # all rejected: the entry only advances the offsets
    plan = trainer.plan(batch.y, batch.task)
    if plan.to_json() != entry["plan"]:
        raise ReplayMismatch(f"journal entry {seq}: replay plans {plan.to_json()}, the journal "
                             f"says {entry['plan']}")
    if plan.boundary is not None:
        trainer.end_experience(plan.boundary)
    trainer.learn(batch.x, batch.y, plan)
    return batch


class TrainerService:
    """One learner ``name``: input ``topic`` -> journal ``<name>.journal`` + snapshots."""

    def __init__(self, config: TrainerConfig, *, bootstrap: str, topic: str, group_id: str,
                 name: str, snapshot_dir: str, encoding: str = "binary", batch_size: int = 32,
                 max_wait_s: float = 0.5, snapshot_every_batches: int = 100,
                 snapshot_every_s: float | None = None,
                 keep_snapshots: int = 3, client_config: dict[str, Any] | None = None,
                 session_timeout_ms: int = 10_000) -> None:
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
        try:
            self.consumer = BatchConsumer(
                bootstrap, topic, group_id, Decoder(config.input_shape, encoding=encoding),
                cut_at_task_change=wants_task_cuts(config), client_config=client_config,
                session_timeout_ms=session_timeout_ms)
        except BaseException:
            self.journal.close()
            raise
        self.trainer: OnlineTrainer | None = None
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
        """Snapshot + journal replay; seek the live stream after the last journaled batch."""
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
            covers, offsets = info.covers_seq, dict(info.offsets)
        else:
            trainer = OnlineTrainer(self.config)
        self.trainer = trainer
        self._snapshot_seq = covers
        replayed = 0
        for entry in self.journal.read(from_seq=covers + 1):
            if entry["type"] == "batch":
                batch = apply_batch_entry(trainer, self.consumer, entry)
                offsets.update(batch.next_offsets)
                replayed += 1
        self.offsets = offsets
        if offsets:
            self.consumer.seek(offsets)
        else:
            self._seek_to_beginning()
        self.journal.append(start_entry(mine, trainer_config=mine, encoding=self.encoding,
                                        topic=self.topic, snapshot_seq=covers,
                                        replayed=replayed))
        summary = {"snapshot_seq": None if covers < 0 else covers, "replayed": replayed,
                   "position": trainer.position, "offsets": dict(offsets),
                   "seconds": time.monotonic() - t0}
        log.info("recovered %s: %s", self.name, summary)
        return summary

    def _seek_to_beginning(self) -> None:
        """No snapshot and no journaled batch: start at the log start (not at group offsets,
        which could be ahead if a snapshot directory was lost)."""
        from kafka import TopicPartition

        kc = self.consumer._consumer
        deadline = time.monotonic() + 30
        parts = kc.partitions_for_topic(self.topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)  # polling interval of a metadata refresh
            parts = kc.partitions_for_topic(self.topic)
        if not parts:
            return
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.seek({tp.partition: o for tp, o in kc.beginning_offsets(tps).items()})

    # -- the loop ---------------------------------------------------------------------------
    def step_once(self) -> bool:
        """Poll, journal and learn one micro-batch; False if none arrived within max_wait_s."""
        if self.trainer is None:
            raise RuntimeError("call recover() first")
        batch = self.consumer.poll_batch(self.batch_size, self.max_wait_s)
        if batch is None:
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
        plan = self.trainer.plan(batch.y, batch.task) if len(batch) else None
        self.journal.append(batch_entry(batch.ranges, plan.to_json() if plan else {},
                                        samples=len(batch), rejected=batch.rejected))
        if plan is not None:
            if plan.boundary is not None:
                self.trainer.end_experience(plan.boundary)
            self.trainer.learn(batch.x, batch.y, plan)
        self.offsets.update(batch.next_offsets)
        self.batches += 1
        self.samples += len(batch)
        self.rejected += batch.rejected
        self._since_snapshot += 1
        if self._since_snapshot >= self.snapshot_every_batches or self._snapshot_due():
            self.snapshot()
        return True

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
        info = self.snapshots.save(self.trainer.state_dict(), covers_seq=covers, offsets=offsets)
        entry = snapshot_entry(info.path, info.sha256, covers, offsets)
        # the snapshot's own entry adds nothing to replay: a later snapshot() with no new batch
        # must see "nothing new", not write the same state again
        self._snapshot_seq = self.journal.append(entry)
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

    def state_sha256(self) -> str:
        if self.trainer is None:
            raise RuntimeError("call recover() first")
        return state_sha256(self.trainer.state_dict())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close()
        self.journal.close()


def install_sigterm(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM and SIGINT (main thread only), so ``run`` drains and exits."""
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


__all__ = ["ReplayMismatch", "TrainerService", "apply_batch_entry", "install_sigterm",
           "wants_task_cuts"]
