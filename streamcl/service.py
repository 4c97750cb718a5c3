"""The trainer service: consume micro-batches, journal each decision, learn, snapshot, publish.

The service is the event-sourced loop of :mod:`streamcl.stream.journal`, around one
:class:`~streamcl.learner.Learner`. Follow one sample from message to published weights:

1. :meth:`TrainerService.recover` rebuilds the learner (:func:`streamcl.learner.rebuild`: newest
   valid snapshot + the journal after it, the same procedure ``streamcl replay`` uses), seeks the
   live input after the last journaled batch, and journals a ``start`` entry that carries the
   configuration, the encoding and the holdout (so a replay needs nothing but the log).
2. :meth:`TrainerService.step_once` polls a micro-batch (the consumer process has validated and
   decoded it), lets the learner prepare it (holdout split, plan), asks the publisher for a due
   verdict on the model as the previous batch left it, journals the batch entry (write-behind:
   not waited for) and applies it (:meth:`Learner.apply`, the one apply procedure).
3. Every effect seen outside the process waits first for the journal: :meth:`_outside` is the
   one barrier. A snapshot: barrier, save, journal it, commit the consumer group's offsets
   (:meth:`snapshot`). A publication: journal the verdict, barrier, write the registry and
   announce (:meth:`_publish_if_due`).

A crash anywhere loses nothing: a batch journaled but not learned is re-learned by recovery; a
batch learned but whose entry never reached the log is polled again, since recovery seeks to the
journal's end; no snapshot, publication or commit ever depends on an entry the log lacks. A
second instance with the same name fences this one (:class:`~streamcl.stream.journal.
JournalFenced` from the next barrier), which then stops without writing anything more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from streamcl.learner import Applied, Learner, Rebuilt, Step, rebuild
from streamcl.metrics.prometheus import ServiceMetrics
from streamcl.models import build_model
from streamcl.parallel import ReplicaGroup, replica_snapshot_dir
from streamcl.registry.holdout import Holdout, PooledHoldout
from streamcl.registry.publisher import Publisher
from streamcl.stream.broker import check_connection
from streamcl.stream.consumer import BatchConsumer, MicroBatch
from streamcl.stream.dead_letter import DeadLetterWriter, dead_letter_topic
from streamcl.stream.entries import (
    Batch,
    Entry,
    HoldoutSpec,
    Publish,
    Reject,
    Snapshot,
    Start,
    Verdict,
    config_hash,
)
from streamcl.stream.journal import (
    Journal,
    JournalError,
    JournalFenced,
    JournalLost,
    journal_topic,
    writer_id,
)
from streamcl.stream.messages import Decoder, Rejection
from streamcl.stream.prefetch import PrefetchingConsumer
from streamcl.stream.snapshots import SnapshotStore
from streamcl.threads import configure_threads
from streamcl.trainer import OnlineTrainer, TrainerConfig

if TYPE_CHECKING:
    from streamcl.metrics.server import MetricsServer
    from streamcl.settings import Settings

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Entry)


def wants_task_cuts(config: TrainerConfig) -> bool:
    """Whether the boundary spec includes the ``task`` trigger (batches must not straddle it)."""
    return "task" in {part.strip().split(":")[0] for part in config.boundaries.split(",")}


class _StoppedInOutage(Exception):
    """SIGTERM came while a barrier waited for an unreachable broker: stop without it."""


class _GroupStops(Exception):
    """A replica of the group was asked to stop: all stop after the same global step."""


@dataclass
class _Progress:
    """How far a recovery got: where the journal ended when it began, what it re-published,
    when it began training (the consumer process was up)."""

    end: int
    republished: int = 0
    started: float | None = None


class TrainerService:
    """One learner ``name``: input ``topic`` -> journal ``<name>.journal`` + snapshots."""

    def __init__(self, config: TrainerConfig, *, bootstrap: str, topic: str, group_id: str,
                 name: str, snapshot_dir: str, encoding: str = "binary", batch_size: int = 32,
                 max_wait_s: float = 0.5, snapshot_every_batches: int = 100,
                 snapshot_every_s: float | None = None,
                 keep_snapshots: int = 3, client_config: dict[str, Any] | None = None,
                 session_timeout_ms: int = 10_000, prefetch: bool = True,
                 holdout: Holdout | None = None, publisher: Publisher | None = None,
                 metrics: ServiceMetrics | None = None, journal_timeout_s: float = 30.0,
                 group: ReplicaGroup | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if snapshot_every_batches < 1:
            raise ValueError(f"snapshot_every_batches must be >= 1, got {snapshot_every_batches}")
        self.config, self.topic, self.name, self.encoding = config, topic, name, encoding
        self.bootstrap, self.client_config = bootstrap, dict(client_config or {})
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.snapshot_every_batches = snapshot_every_batches
        self.snapshot_every_s = snapshot_every_s
        self.holdout_spec = (None if holdout is None else
                             HoldoutSpec(fraction=holdout.fraction, size=holdout.size,
                                         seed=holdout.seed))
        self.publisher = publisher
        self.metrics = metrics or ServiceMetrics()
        #: the data-parallel replicas this service is one of (None: it is alone)
        self.group = group
        self.rank = 0 if group is None else group.rank
        if group is not None and self.rank != 0 and publisher is not None:
            raise ValueError("only replica 0 publishes: give the other replicas no publisher")
        self.snapshots = SnapshotStore(snapshot_dir, keep=keep_snapshots)
        self.snapshots.check_writable()  # a read-only volume: say so now, not after recovery
        self.journal = self._open_journal(journal_timeout_s)
        try:
            self.consumer = self._consumer(bootstrap, group_id, prefetch, client_config,
                                           session_timeout_ms)
        except BaseException:
            self.journal.close()
            raise
        self.learner: Learner | None = None
        #: newest Kafka timestamp (ms) among the samples trained on (model freshness)
        self.newest_ts_ms: int | None = None
        self.ready = False             # recovered and caught up with the journal
        self.last_loop = time.monotonic()  # liveness: the loop is turning
        self._seen_rejections: Counter[str] = Counter()
        #: next input offset per partition (after the last applied batch)
        self.offsets: dict[int, int] = {}
        #: live batches applied by this process / samples / rejected messages in them
        self.batches = self.samples = self.rejected = 0
        self.skipped_batches = 0   # re-delivered batches dropped (after a rebalance)
        self._since_snapshot = 0
        self._last_snapshot_t = time.monotonic()
        self._snapshot_seq = -1    # covers_seq of the last snapshot written or loaded
        self._progress = _Progress(end=0)  # of the last recovery
        self._down_since: float | None = None  # the broker out of reach since (monotonic)
        self._stop = threading.Event()         # run()'s stop event
        self._outage_counted = 0.0             # when the outage seconds were last counted
        # label-cap refusals (the writer connects at its first write)
        self.dead_letters = DeadLetterWriter(bootstrap, dead_letter_topic(topic),
                                             client_config=client_config)

    def _open_journal(self, timeout_s: float) -> Journal:
        """The journal: written by this process (opening it as its writer fences any older
        instance of this learner), or, for replicas other than 0, read only, once replica 0
        holds the writer (the fence aborts an older writer's open transaction: the log every
        replica then reads is final)."""
        topic = journal_topic(self.name)
        if self.rank == 0:
            journal = Journal(self.bootstrap, topic, self.client_config,
                              writer=writer_id(self.name), timeout_s=timeout_s)
        if self.group is not None:  # replica 0 holds the writer; whether it publishes
            self._group_publishes = bool(self.group.exchange(
                [int(self.publisher is not None)])[0][0])
        if self.rank != 0:
            journal = Journal(self.bootstrap, topic, self.client_config, create=False,
                              timeout_s=timeout_s)
        return journal

    def _consumer(self, bootstrap: str, group_id: str, prefetch: bool,
                  client_config: dict[str, Any] | None, session_timeout_ms: int
                  ) -> BatchConsumer | PrefetchingConsumer:
        """The live input: in a child process by default (see streamcl.stream.prefetch)."""
        decoder = Decoder(self.config.input_shape, encoding=self.encoding)
        common = {"cut_at_task_change": wants_task_cuts(self.config),
                  "client_config": client_config, "session_timeout_ms": session_timeout_ms,
                  "replica": None if self.group is None else (self.group.rank,
                                                              self.group.world_size)}
        if prefetch:
            return PrefetchingConsumer(bootstrap, self.topic, group_id, decoder,
                                       batch_size=self.batch_size, max_wait_s=self.max_wait_s,
                                       hold_until_seek=True, **common)
        return BatchConsumer(bootstrap, self.topic, group_id, decoder, **common)

    @property
    def trainer(self) -> OnlineTrainer:
        return self._learner().trainer

    @property
    def holdout(self) -> Holdout | None:
        return self._learner().holdout

    def _learner(self) -> Learner:
        if self.learner is None:
            raise RuntimeError("call recover() first")
        return self.learner

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> dict[str, Any]:
        """Rebuild the learner from snapshot + journal; seek the live stream after the last
        journaled batch; journal a ``start`` entry. Publications in the replayed journal that
        the registry lacks (a crash in between) are published now, from the replayed state."""
        t0 = time.monotonic()
        end, group = self.journal.next_seq, self.group
        if group is not None:  # every replica rebuilds to where replica 0's log ends
            end = group.exchange([end])[0][0]
        self._progress = _Progress(end=end)
        rebuilt = rebuild(self.journal, self.consumer, self.config, self.holdout_spec,
                          self.snapshots, end - 1 if group is not None else None,
                          on_start=self._restore, on_entry=self._replayed, group=group)
        self.learner, self.offsets = rebuilt.learner, rebuilt.offsets
        self._snapshot_seq = rebuilt.snapshot_seq
        self.newest_ts_ms = max(self.newest_ts_ms or 0, rebuilt.newest_ts_ms or 0) or None
        if self.publisher is not None:
            self.publisher.load_production()
            self._show_production()
        self._seek_live()
        if self.rank == 0:
            self._append_start(rebuilt.snapshot_seq, rebuilt.replayed)
        summary = {"snapshot_seq": None if rebuilt.snapshot_seq < 0 else rebuilt.snapshot_seq,
                   "replayed": rebuilt.replayed, "republished": self._progress.republished,
                   "position": self.trainer.position, "offsets": dict(self.offsets),
                   "seconds": time.monotonic() - t0,
                   "replay_seconds": time.monotonic() - (self._progress.started or
                                                         time.monotonic())}
        self.metrics.set_experience(self.learner.experience)
        self.metrics.set_journal(0, self.journal.next_seq - 1 - self._snapshot_seq)
        self.metrics.set_ready(True)
        self.ready = True
        log.info("recovered %s: %s", self.name, summary)
        return summary

    def _append_start(self, snapshot_seq: int, replayed: int) -> None:
        """Journal who trains from here on, with which configuration, at which thread count."""
        self._append(Start(config_hash=config_hash(self.config.to_json()), pid=os.getpid(),
                           host=socket.gethostname(),
                           trainer_config=self.config.to_json(), encoding=self.encoding,
                           topic=self.topic, snapshot_seq=snapshot_seq,
                           replayed=replayed, holdout=self.holdout_spec,
                           torch_threads=torch.get_num_threads(),
                           replicas=1 if self.group is None else self.group.world_size))

    def _restore(self, rebuilt: Rebuilt) -> None:
        """What the snapshot kept beside the learner: the publisher's state, the newest sample
        time. (A snapshot from before the publisher kept its state: its verdicts are re-read.)"""
        self._snapshot_seq = rebuilt.snapshot_seq
        stream = rebuilt.snapshot_extra.get("stream", {})
        self.newest_ts_ms = stream.get("newest_ts_ms")
        if self.publisher is None:
            return
        if "publisher" in rebuilt.snapshot_extra:
            self.publisher.load_state_dict(rebuilt.snapshot_extra["publisher"])
        elif rebuilt.snapshot_seq >= 0:
            for entry in self.journal.read(to_seq=rebuilt.snapshot_seq):
                if isinstance(entry, Verdict):
                    self.publisher.restore(entry)

    def _replayed(self, entry: Entry, learner: Learner) -> None:
        """An entry re-applied during recovery: verdicts restore the publisher (and publish
        what the registry lacks); the journal-lag metrics follow the progress."""
        progress = self._progress
        if isinstance(entry, Batch):  # the consumer process is up: replay's rate starts here
            progress.started = progress.started or time.monotonic()
        if isinstance(entry, Verdict) and self.publisher is not None:
            progress.republished += self._replay_verdict(entry, learner)
        self.metrics.set_journal(max(0, progress.end - 1 - entry.seq),
                                 entry.seq - self._snapshot_seq)

    def _replay_verdict(self, entry: Verdict, learner: Learner) -> int:
        """A journaled verdict met during recovery; 1 if its version had to be published."""
        assert self.publisher is not None
        if not isinstance(entry, Publish):
            self.publisher.restore(entry)
            return 0
        fields = self._manifest_fields(entry.seq, learner.position)
        return int(self.publisher.republish_if_missing(entry, learner, **fields))

    def _seek_live(self) -> None:
        if self.offsets or (self.group is not None and self._snapshot_seq >= 0):
            self.consumer.seek(self.offsets)
        else:
            # no snapshot and no journaled batch: the log start, not the group's offsets
            # (which could be ahead if a snapshot directory was lost)
            self.consumer.seek_to_beginning()

    def _show_production(self) -> None:
        pub = self.publisher
        if pub is not None and pub.production is not None:
            manifest = pub.production.manifest
            ts = manifest.get("newest_sample_ts_ms")
            self.metrics.set_production(pub.production_version or 0,
                                        None if ts is None else ts / 1e3,
                                        manifest.get("created_at"))

    # -- the loop ---------------------------------------------------------------------------
    def step_once(self) -> bool:
        """Poll, journal and learn one micro-batch; False if none arrived within max_wait_s.

        Between batches, a due publication comes first: it is judged and journaled with the
        model as the previous batch left it (an experience-end publication is due when the
        new batch's plan opens an experience, before that boundary is applied).
        """
        if self.group is not None:
            return self._step_replica()
        learner = self._learner()
        self.last_loop = time.monotonic()
        if not self._journal_keeps_up():
            return False
        batch = self.consumer.poll_batch(self.batch_size, self.max_wait_s)
        if batch is None:
            self._publish_if_due(experience_ended=False)  # the time trigger on a quiet stream
            if self._snapshot_due():  # quiet stream: still bound the journal left to replay
                self.snapshot()
            return False
        if self._redelivered(batch):
            return True
        self._train(learner, batch, lambda step: self._append(step.entry()),
                    self._snapshot_due)
        return True

    def _train(self, learner: Learner, batch: MicroBatch, journal: Callable[[Step], Batch],
               snapshot_due: Callable[[], bool]) -> None:
        """The order of effects of one step, alone or as a replica: prepare (plan, refused
        labels), a due publication with the model the previous step left, the entry in the
        journal (``journal``: the step's entry, appended), the learning step, the accounts,
        a due snapshot."""
        step = learner.prepare(batch)
        self._refuse(step)
        self._publish_if_due(step.plan is not None and step.plan.boundary is not None)
        entry = journal(step)
        t0 = time.perf_counter()
        applied = learner.apply(step, entry)
        self._account(step, applied, time.perf_counter() - t0)
        if self._since_snapshot >= self.snapshot_every_batches or snapshot_due():
            self.snapshot()

    # -- data-parallel replicas ----------------------------------------------------------------
    def _step_replica(self) -> bool:
        """:meth:`step_once` as one of N replicas: the same order of effects, each decision
        taken once for the group.

        Every turn begins with one exchange of flags, so that no replica waits alone in a
        collective: stop (any replica was asked to: all stop after the same step), hold
        (replica 0's journal does not keep up: nobody polls or trains), snapshot (replica 0's
        timer). Then each replica polls its own partitions, and if any brought something the
        global step runs: the plan (collective), a due publication (judged by replica 0 on
        the pooled holdout), the entry (every replica's ranges gathered; replica 0 appends
        it) and the learning step (gradients all-reduced). A replica with nothing brings an
        empty batch and still takes the step."""
        group, learner = self.group, self._learner()
        assert group is not None
        self.last_loop = time.monotonic()
        hold = self.rank == 0 and not self._journal_keeps_up()
        snap = self.rank == 0 and self._snapshot_due()
        flags = group.exchange([int(self._stop.is_set()), int(hold), int(snap)])
        if any(f[0] for f in flags):
            raise _GroupStops
        hold, snap = bool(flags[0][1]), bool(flags[0][2])
        if self.rank != 0:  # replica 0's outage is the group's: not ready while it lasts
            self._broker_reachable(not hold)
        if hold:
            return False
        batch = self.consumer.poll_batch(self.batch_size, self.max_wait_s)
        batch = batch if batch is not None else self._empty_batch()
        # what each replica brought: its entry's counts, exchanged once for both uses
        brought = group.exchange(Step.header_of(batch))
        if not any(sum(b) for b in brought):  # a quiet stream
            self._publish_if_due(experience_ended=False)
            if snap:
                self.snapshot()
            return False

        def journal(step: Step) -> Batch:
            entry = step.group_entry(group, brought)
            return self._append(entry) if self.rank == 0 else entry

        self._train(learner, batch, journal, lambda: snap)
        return True

    def _empty_batch(self) -> MicroBatch:
        """What a replica brings to a global step when its partitions had nothing."""
        return MicroBatch(torch.zeros((0, *self.config.input_shape)),
                          torch.zeros(0, dtype=torch.long), None, {}, 0, None)

    def _refuse(self, step: Step) -> None:
        """Dead-letter the samples the learner refused (a label past ``max_classes``) and count
        them. The learner decides (a replay refuses the same samples from the same state); only
        the live loop sends them, like the consumer's own rejections.

        The batch holds decoded arrays, not the messages, so a dead letter's value is a JSON
        record of the sample (its decoded x, label, id, index among the batch's valid samples,
        the batch's offset ranges) instead of the original bytes; its source partition is the
        batch's if it has one (else -1), its source offset -1: not known here."""
        if not step.refused:
            return
        cap, ranges = self.config.max_classes, step.batch.ranges
        partition = next(iter(ranges)) if len(ranges) == 1 else -1
        letters = []
        for r in step.refused:
            reason = (f"label_cap: label {r.label} is new and the head is full at "
                      f"learner.max_classes={cap} classes; raise learner.max_classes to learn it")
            # the sample itself too (x as decoded), so the dead letter alone can be re-sent
            value = json.dumps({"reason": reason, "label": r.label, "id": r.id, "index": r.index,
                                "ranges": {str(p): list(v) for p, v in ranges.items()},
                                "x": step.batch.x[r.index].tolist()})
            letters.append((SimpleNamespace(topic=self.topic, partition=partition, offset=-1,
                                            key=None, value=value.encode(), headers=[]),
                            Rejection(reason)))
        self.dead_letters.write(letters)
        self.metrics.rejected("label_cap", len(letters))
        self.rejected += len(letters)

    def _redelivered(self, batch: MicroBatch) -> bool:
        """A batch from before the journal's end (re-delivered after a rebalance): drop it and
        seek back to where the journal ends."""
        stale = {p: first for p, (first, _) in batch.ranges.items()
                 if p in self.offsets and first != self.offsets[p]}
        if any(first < self.offsets[p] for p, first in stale.items()):
            log.warning("batch %s re-delivered (journal is at %s): skipped", batch.ranges,
                        self.offsets)
            self.skipped_batches += 1
            self.consumer.seek({p: self.offsets[p] for p in batch.ranges if p in self.offsets})
            return True
        if stale:
            log.warning("offset gap before batch %s (expected %s)", batch.ranges, self.offsets)
        return False

    def _account(self, step: Step, applied: Applied, step_s: float) -> None:
        """Counters, offsets and metrics after a live step."""
        batch, plan, result = step.batch, step.plan, applied.result
        if plan is not None and batch.timestamp_ms is not None:
            self.newest_ts_ms = max(self.newest_ts_ms or 0, batch.timestamp_ms)
        self.offsets.update(batch.next_offsets)
        self.batches += 1
        self.samples += len(batch)
        self.rejected += batch.rejected
        self._since_snapshot += 1
        m = self.metrics
        m.observe_batch(consumed=len(batch), trained=plan.size if plan else 0,
                        holdout=applied.held, correct=result.correct if result else 0,
                        loss=result.loss if result else 0.0, step_seconds=step_s)
        rejections = Counter(self.consumer.rejections)
        for code, n in (rejections - self._seen_rejections).items():
            m.rejected(code, n)
        self._seen_rejections = rejections
        if plan is not None and plan.boundary is not None:
            m.boundary(plan.boundary.trigger, plan.boundary.experience)
        m.set_consumer_lag(self.consumer.lag())
        m.set_buffer(*self.trainer.strategy.memory_usage())
        if self.rank == 0:
            m.set_journal(0, self.journal.next_seq - 1 - self._snapshot_seq)

    def _append(self, entry: E) -> E:
        t0 = time.perf_counter()
        numbered = self.journal.append(entry)
        self.metrics.journal_appended(time.perf_counter() - t0)
        return numbered

    # -- outages ------------------------------------------------------------------------------
    #: journal entries the loop may train ahead of their acknowledgement (write-behind); past
    #: that it waits for the broker instead of training on
    MAX_IN_FLIGHT = 16
    #: no acknowledgement for this long with entries pending, or every broker reported down
    #: for this long: an outage (/readyz answers 503, the outage seconds are counted)
    OUTAGE_AFTER_S = 2.0
    #: longest wait between two reconnection attempts (the backoff doubles up to it)
    MAX_BACKOFF_S = 5.0

    def _journal_keeps_up(self) -> bool:
        """Whether the loop may poll and train another batch.

        Write-behind lets training run ahead of the broker's acknowledgements, but only by
        :attr:`MAX_IN_FLIGHT` entries: when the broker stops answering the loop waits here in
        slices of ``max_wait_s`` (so it keeps turning: liveness, SIGTERM) and trains nothing
        more, and after :attr:`OUTAGE_AFTER_S` the service reports itself not ready. Idle, with
        nothing to acknowledge, it asks the broker for metadata instead. If librdkafka gives up
        on an entry (its message timeout), :class:`JournalError` reaches :meth:`run`, which
        reconnects (:meth:`_reconnect`).
        """
        journal = self.journal
        stalled = journal.stalled_s()
        if journal.unacknowledged >= self.MAX_IN_FLIGHT or stalled > self.OUTAGE_AFTER_S:
            if journal.unacknowledged:
                journal.flush(self.max_wait_s)
            else:
                journal.probe(self.max_wait_s)
            stalled = journal.stalled_s()
        self._broker_reachable(stalled <= self.OUTAGE_AFTER_S, stalled)
        return self._down_since is None and journal.unacknowledged < self.MAX_IN_FLIGHT

    def _broker_reachable(self, reachable: bool, stalled_s: float = 0.0) -> None:
        """Readiness and the outage metrics follow the broker; an outage is dated from when
        the writer stopped hearing from it (``stalled_s`` ago), not from when it was noticed."""
        now = time.monotonic()
        if self._down_since is not None:
            self.metrics.broker_outage(now - self._outage_counted)
            self._outage_counted = now
        if reachable and self._down_since is not None:
            log.warning("broker reachable again after %.1f s", now - self._down_since)
            self._down_since = None
            self.metrics.set_broker_reachable(True)
            self.metrics.set_ready(self.ready)
        elif not reachable and self._down_since is None:
            log.warning("broker out of reach: training paused (nothing is trained that the "
                        "journal has not taken)")
            self._down_since = self._outage_counted = now - stalled_s
            self.metrics.set_broker_reachable(False)
            self.metrics.set_ready(False)

    def _reconnect(self, stop: threading.Event, cause: JournalError) -> bool:
        """The journal writer gave up on an entry: wait for a broker (backoff), open a new
        writer, and go on from what the log holds. False if ``stop`` came first.

        Every entry this process numbered may or may not be in the log. If the log ends where
        this process's numbering does, the in-memory state is exactly the log's and training
        goes on from it; otherwise the state is rebuilt from snapshot + log, as after a crash
        (:meth:`recover`). A log that lacks entries the broker acknowledged was emptied or
        replaced: :class:`JournalLost`. Batches polled but not journaled are read again (the
        input is sought to the journal's offsets).
        """
        self._broker_reachable(False)
        log.warning("journal writer failed (%s): reconnecting", cause)
        old, self.ready = self.journal, False
        numbered, acked = old.next_seq, old.acknowledged
        old.abandon()
        backoff = 0.25
        while not stop.is_set():
            self.last_loop = time.monotonic()  # waiting for the broker is not being stuck
            try:
                # a cheap probe first: a journal opened against a dead broker would wait out
                # each of its clients' own bootstrap timeouts
                check_connection(self.bootstrap, self.client_config, timeout_s=2.0)
                self.journal = Journal(self.bootstrap, old.topic, self.client_config,
                                       writer=writer_id(self.name), timeout_s=old.timeout_s)
                self._resume(numbered, acked)
                self._broker_reachable(True)
                self.metrics.set_ready(True)
                return True
            except (JournalFenced, JournalLost):
                raise
            except Exception as exc:  # the broker went away again, or is not back: retry
                log.info("journal not reachable yet (%s); next try in %.1f s", exc, backoff)
                if self.journal is not old:
                    self.journal.abandon()
                    self.journal = old
                    numbered = -1  # a rebuild may have begun: the state must be rebuilt
                self._broker_reachable(False)
                stop.wait(backoff)  # backoff between attempts, cut short by SIGTERM
                backoff = min(backoff * 2, self.MAX_BACKOFF_S)
        return False

    def _resume(self, numbered: int, acked: int) -> None:
        """Go on from what the reopened log holds (see :meth:`_reconnect`)."""
        journal = self.journal
        if journal.next_seq <= acked:
            raise JournalLost(f"{journal.topic} on {self.bootstrap} ends at entry "
                              f"{journal.next_seq - 1} but the broker had acknowledged entry "
                              f"{acked}: it was emptied or replaced; restore the journal topic, "
                              "or start a new history (another learner name, or an empty "
                              "snapshot directory)")
        if journal.next_seq == numbered:
            self._seek_live()
            self._append_start(self._snapshot_seq, 0)
            self.ready = True
        else:
            log.warning("the log ends at entry %d, this process had numbered up to %d: "
                        "rebuilding from snapshot + log", journal.next_seq - 1, numbered - 1)
            self.recover()

    def _outside(self) -> None:
        """The one barrier before any effect seen outside this process (snapshot, registry,
        announcement, group commit): every journal entry so far is acknowledged.

        It waits in slices, so that an outage met here is reported as one (readiness, the
        outage seconds) and a SIGTERM during it ends the wait (:class:`_StoppedInOutage`);
        librdkafka's message timeout still ends it with :class:`JournalError`."""
        journal = self.journal
        while journal.flush(self.max_wait_s):
            self.last_loop = time.monotonic()
            stalled = journal.stalled_s()
            self._broker_reachable(stalled <= self.OUTAGE_AFTER_S, stalled)
            if self._down_since is not None and self._stop.is_set():
                raise _StoppedInOutage
        journal.sync()

    # -- publication --------------------------------------------------------------------------
    def _publish_if_due(self, experience_ended: bool) -> Verdict | None:
        """Judge, journal and (if the gate agrees) publish the current model when due."""
        learner, pooled = self._learner(), None
        if self.group is not None:  # replica 0 decides; the gate scores every replica's shard
            if not self._group_publishes:
                return None
            due = self.publisher is not None and self.publisher.due(
                learner.position, experience_ended) is not None
            if not self.group.exchange([int(due)])[0][0]:
                return None
            pooled = PooledHoldout.gather(learner.holdout, self.group, self.config.input_shape)
        if self.publisher is None:
            return None
        t0 = time.perf_counter()
        verdict = self.publisher.judge(learner, experience_ended, self.newest_ts_ms, pooled)
        if verdict is None:
            return None
        verdict = self._append(verdict)
        if isinstance(verdict, Reject):
            self.metrics.gate_rejected("worse")
            log.info("gate rejected the candidate at %d: %s", verdict.position, verdict.reason)
            return verdict
        self._outside()
        self.publisher.commit(verdict, learner,
                              **self._manifest_fields(verdict.seq, learner.position))
        self.metrics.published(verdict.version, time.perf_counter() - t0,
                               None if self.newest_ts_ms is None else self.newest_ts_ms / 1e3)
        log.info("published v%d at %d (%s): %s", verdict.version, verdict.position,
                 verdict.trigger, verdict.gate.reason)
        return verdict

    def _manifest_fields(self, seq: int, position: int) -> dict[str, Any]:
        return {"journal_seq": seq, "journal_topic": self.journal.topic,
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "position": position, "newest_sample_ts_ms": self.newest_ts_ms}

    # -- snapshots ----------------------------------------------------------------------------
    def _snapshot_due(self) -> bool:
        return (self.snapshot_every_s is not None and self._since_snapshot > 0
                and time.monotonic() - self._last_snapshot_t >= self.snapshot_every_s)

    def snapshot(self) -> Snapshot | None:
        """Save the state covering every journal entry so far; journal it; commit offsets.

        The order is the point: (1) every entry the state depends on is acknowledged, (2) the
        state is saved (atomically), (3) the snapshot is journaled and acknowledged, (4) the
        consumer group's offsets follow. A crash between any two leaves a log that recovery
        rebuilds the same state from. Returns the entry, or ``None`` when the last snapshot
        already covers it all.
        """
        learner, group = self._learner(), self.group
        covers = self.journal.next_seq - 1
        if group is not None:  # replica 0's log decides, for all
            covers = group.exchange([covers])[0][0]
        if covers == self._snapshot_seq or covers < 0:
            return None
        offsets = dict(self.offsets)
        t0 = time.perf_counter()
        if self.rank == 0:
            self._outside()
        if group is not None:  # one model: checked before any replica keeps its shard
            group.check_identical(learner.trainer.model)
        state = learner.state_dict()
        # the thread count the batches after this snapshot are trained at (until a new start
        # entry): replay from this snapshot trains them at the same count
        state["stream"] = {"newest_ts_ms": self.newest_ts_ms,
                           "torch_threads": torch.get_num_threads()}
        if group is not None:
            state["stream"]["replicas"] = group.world_size
        if self.publisher is not None:
            state["publisher"] = self.publisher.state_dict()
        info = self.snapshots.save(state, covers_seq=covers, offsets=offsets)
        entry = Snapshot(path=str(info.path), sha256=info.sha256, covers_seq=covers,
                         offsets=offsets)
        if group is not None:  # replica 0 journals the set once every replica kept its shard
            entry = self._snapshot_set(entry)
        # the snapshot's own entry adds nothing to replay: a later snapshot() with no new batch
        # must see "nothing new", not write the same state again
        if self.rank == 0:
            entry = self._append(entry)
        if group is not None:
            entry = dataclasses.replace(entry, seq=group.exchange([entry.seq])[0][0])
        self._snapshot_seq = entry.seq
        self.metrics.snapshot_taken(time.perf_counter() - t0, 0)
        self.metrics.set_journal(0, 0)
        self._since_snapshot = 0
        self._last_snapshot_t = time.monotonic()
        if self.rank == 0:
            self._outside()  # the snapshot entry too: a fenced writer learns it here at last
        if group is not None:
            group.exchange([0])  # every replica commits once the set's entry is in the log
        if offsets:
            self.consumer.commit(offsets)
        return entry

    def _snapshot_set(self, mine: Snapshot) -> Snapshot:
        """Replica 0's snapshot entry for the set (every replica calls it once its shard is
        saved): every replica's offsets (their partitions are disjoint) and shard SHA-256."""
        assert self.group is not None
        flat = [v for p, o in sorted(mine.offsets.items()) for v in (p, o)]
        offsets = {part[i]: part[i + 1] for part in self.group.gather_ints(flat)
                   for i in range(0, len(part), 2)}
        return dataclasses.replace(mine, offsets=offsets,
                                   shards=self.group.gather_digests(mine.sha256))

    # -- running ------------------------------------------------------------------------------
    def run(self, stop: threading.Event,
            until: Callable[[TrainerService], bool] | None = None) -> dict[str, Any]:
        """``recover()``, then step until ``stop`` is set (or ``until(self)`` is true); then
        snapshot and close. Returns the recovery summary plus this run's counts."""
        self._stop = stop
        try:
            summary = self.recover()
            while True:
                done = until is not None and until(self)
                if self.group is None and (stop.is_set() or done):
                    break
                if done:  # a replica that is done asks the group to stop (see _step_replica)
                    stop.set()
                try:
                    self.step_once()
                except (JournalFenced, JournalLost):
                    raise
                except JournalError as exc:
                    if self.group is not None:  # the group restarts and recovers from the log
                        raise
                    if not self._reconnect(stop, exc):
                        break
                except (_StoppedInOutage, _GroupStops):
                    break
            if self._down_since is None:
                self.snapshot()
            else:  # stopped during an outage: what the broker acknowledged is all there is
                log.warning("stopped during a broker outage: no final snapshot")
        finally:
            self.close()
        return {**summary, "batches": self.batches, "samples": self.samples,
                "rejected": self.rejected}

    def is_ready(self) -> bool:
        """Readiness (``/readyz``): recovered, caught up, and the broker within reach."""
        return self.ready and self._down_since is None

    def alive(self, stuck_after_s: float = 120.0) -> bool:
        """Liveness: recovering, or the loop turned within ``stuck_after_s``."""
        return not self.ready or time.monotonic() - self.last_loop < stuck_after_s

    def state_sha256(self) -> str:
        """The learner's state SHA-256; a group's (every replica calls it): over every
        replica's, in rank order (:func:`~streamcl.parallel.group_sha256`)."""
        digest = self._learner().sha256()
        if self.group is None:
            return digest
        return self.group.state_sha256(digest)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.consumer.close()
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                self.publisher.close()
        with contextlib.suppress(Exception):
            self.dead_letters.close()
        if self._down_since is None:
            self.journal.close()
        else:  # no broker to wait for
            self.journal.abandon()


def service_from_settings(settings: Settings, bootstrap: str, group: ReplicaGroup | None = None
                          ) -> tuple[TrainerService, MetricsServer | None]:
    """The service ``streamcl run`` runs: trainer, holdout, registry publisher, metrics, and
    the HTTP endpoint (started, so probes answer during recovery; ``None`` when port is 0).
    One of a ``group`` of replicas: its snapshot shards go to ``<snapshots.dir>/rank-<r>``
    (each replica may have its own volume), replica 0 alone publishes, and the HTTP port is
    ``metrics.port + LOCAL_RANK`` (torchrun's replicas on one host, one port each).
    Each section of the settings goes whole to the part it configures; until TrainerService
    takes sections, its keywords are filled here, section by section."""
    from streamcl.metrics.server import MetricsServer
    from streamcl.registry.announce import Announcer
    from streamcl.registry.publisher import PublishPolicy
    from streamcl.registry.registry import ModelRegistry

    learner, consumer, journal = settings.learner, settings.consumer, settings.journal
    snapshots, publication, served = settings.snapshots, settings.publication, settings.metrics
    config = learner.trainer_config()
    configure_threads(learner.torch_threads,
                      build_model(config.model, config.input_shape, config.hidden),
                      config.input_shape, consumer.batch_size, reserve=int(consumer.prefetch))
    client = settings.kafka.client_config()
    metrics = ServiceMetrics(window=served.window, gate_reasons=("worse",))
    holdout = (Holdout(publication.holdout_fraction, publication.holdout_size, learner.seed)
               if publication.holdout_fraction > 0 else None)
    publisher, rank = None, 0 if group is None else group.rank
    if publication.enabled and rank == 0:
        policy = PublishPolicy(every_samples=publication.every_samples,
                               every_s=publication.every_s,
                               at_experience_end=publication.at_experience_end,
                               tolerance=publication.gate_tolerance,
                               keep_versions=publication.keep_versions,
                               keep_alias_history=publication.keep_alias_history)
        publisher = Publisher(ModelRegistry(publication.registry), policy,
                              announcer=Announcer(bootstrap, journal.name, client))
    service = TrainerService(
        config, bootstrap=bootstrap, client_config=client, name=journal.name,
        journal_timeout_s=journal.timeout_s,
        # consumer
        topic=consumer.topic, group_id=settings.group_id(), encoding=consumer.encoding,
        batch_size=consumer.batch_size, max_wait_s=consumer.max_wait_s,
        prefetch=consumer.prefetch,
        # snapshots
        snapshot_dir=str(snapshots.dir) if group is None else replica_snapshot_dir(snapshots.dir,
                                                                                  rank),
        snapshot_every_batches=snapshots.every_batches,
        snapshot_every_s=snapshots.every_s, keep_snapshots=snapshots.keep,
        # publication and metrics
        holdout=holdout, publisher=publisher, metrics=metrics, group=group)
    server, port = None, served.port
    if port and group is not None:
        port += int(os.environ.get("LOCAL_RANK", "0"))
    if port:
        try:
            server = MetricsServer(metrics, served.host, port,
                                   live=service.alive, ready=service.is_ready).start()
        except OSError as exc:
            service.close()
            raise ValueError(f"metrics.port {port} on {served.host}: cannot listen "
                             f"({exc.strerror or exc}); choose another metrics.port (0: no "
                             "HTTP endpoint) or stop what holds it") from None
    return service, server


def install_sigterm(stop: threading.Event, drain_timeout_s: float | None = None) -> None:
    """Set ``stop`` on SIGTERM and SIGINT (main thread only), so ``run`` drains and exits.

    The drain (finish the batch, snapshot, commit) may wait on a broker or a disk; with
    ``drain_timeout_s`` the process ends anyway that long after the signal, with one line and
    exit code 1, before an orchestrator's SIGKILL, and whatever it was waiting in (a C call
    included). Nothing is lost that way: the journal holds every acknowledged decision. A second
    signal ends it at once (an operator pressing Ctrl-C twice).
    """
    def expired() -> None:
        print(f"streamcl: stopped: the drain took longer than {drain_timeout_s:g} s "
              "(snapshots.drain_timeout_s); exiting without it (the journal holds every "
              "acknowledged decision)", file=sys.stderr, flush=True)
        os._exit(1)

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()
        if drain_timeout_s is not None:
            timer = threading.Timer(drain_timeout_s, expired)
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


__all__ = ["TrainerService", "install_sigterm", "service_from_settings", "wants_task_cuts"]
