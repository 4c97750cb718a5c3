"""Micro-batches from a Kafka topic: validated, cut by size and time, replayable by offsets.

:class:`BatchConsumer` reads one topic in a consumer group with manual commits: the service
journals a batch's offset ranges, learns from it, and only then commits, so a crash never skips
a sample. Every message is decoded on arrival (:class:`~streamcl.stream.messages.Decoder`);
those it cannot use go to the dead-letter topic (``<topic>.dlq``,
:class:`~streamcl.stream.dead_letter.DeadLetterWriter`) with the original value bytes and headers
plus the reason and source coordinates, and are counted by reason. They still count
in the batch's offset ranges, so committing the batch moves past them and
:meth:`BatchConsumer.read_ranges` (journal replay) rebuilds exactly the same batch from the same
ranges.

Within a batch, samples are ordered by (partition, offset): Kafka orders only within a
partition, so that is the one order a replay can reproduce. A continual-learning stream whose
order matters belongs in a single-partition topic.

This module does not import torch (the prefetching consumer's process runs it, and torch takes
about a second to import): batches are assembled as numpy arrays (:class:`ArrayBatch`), and
:meth:`ArrayBatch.to_torch` makes the :class:`MicroBatch` the trainer gets, without copying.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from streamcl.stream.broker import RECONNECT_BACKOFF_MAX_MS
from streamcl.stream.dead_letter import DeadLetterError, DeadLetterWriter, dead_letter_topic
from streamcl.stream.entries import owns
from streamcl.stream.messages import Decoder, Rejection, Sample

if TYPE_CHECKING:
    import torch

__all__ = ["FETCH_DEFAULTS", "ArrayBatch", "BatchConsumer", "DeadLetterError", "MicroBatch",
           "RangeReader", "assemble", "assemble_arrays"]

#: Fetch settings for throughput: big fetches, many records per poll, a short broker wait so a
#: partial batch is not held back by the fetch itself. Reconnection backs off to
#: :data:`~streamcl.stream.broker.RECONNECT_BACKOFF_MAX_MS` at most.
FETCH_DEFAULTS: dict[str, Any] = {
    "fetch_max_bytes": 64 << 20,
    "max_partition_fetch_bytes": 16 << 20,
    "max_poll_records": 10_000,
    "fetch_max_wait_ms": 100,
    "receive_buffer_bytes": 4 << 20,
    "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
}


@dataclass
class MicroBatch:
    """Valid samples of a run of consecutive offsets, and the exact ranges they came from.

    ``x`` keeps the element type of the messages (uint8 stays uint8: image bytes the trainer
    scales); with no valid sample it is an empty float32 tensor. ``task`` is ``None`` when no
    sample has one, else one value per sample with ``-1`` where a sample has none. ``ranges``
    maps partition to (first, last) offset consumed, rejected messages included;
    ``timestamp_ms`` is the newest Kafka record timestamp among them.
    """

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor | None
    ranges: dict[int, tuple[int, int]]
    rejected: int
    timestamp_ms: int | None
    ids: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def next_offsets(self) -> dict[int, int]:
        """What to commit once the batch is safely handled: the offset after each range."""
        return {p: last + 1 for p, (_, last) in self.ranges.items()}


@dataclass
class ArrayBatch:
    """A :class:`MicroBatch` as numpy arrays: ``x`` in the messages' element type, ``y`` and
    ``task`` int64 (what the prefetching consumer's process, which has no torch, assembles and
    ships; :meth:`to_torch` makes the MicroBatch in the process that trains)."""

    x: np.ndarray
    y: np.ndarray
    task: np.ndarray | None
    ranges: dict[int, tuple[int, int]]
    rejected: int
    timestamp_ms: int | None
    ids: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    def to_torch(self) -> MicroBatch:
        """The same batch as tensors sharing these arrays' memory (``torch.from_numpy``)."""
        import torch  # here, not at the top: the consumer process never calls this

        return MicroBatch(torch.from_numpy(self.x), torch.from_numpy(self.y),
                          None if self.task is None else torch.from_numpy(self.task),
                          self.ranges, self.rejected, self.timestamp_ms, self.ids)


_Item = tuple[Any, Sample | Rejection]  # (ConsumerRecord, its decoding)
_UNSET = object()


class BatchConsumer:
    """Validated micro-batches from every partition of ``topic``; offsets committed to consumer
    group ``group_id``.

    ``poll_batch`` returns up to ``max_records`` valid samples, or fewer once ``max_wait_s``
    has passed; with ``cut_at_task_change`` a batch never straddles a change of the producer's
    task value (so the trainer's oracle boundaries fall between batches), and a batch never
    mixes element types. Offsets are committed only by :meth:`commit`. ``client_config`` holds
    security settings (:func:`~streamcl.stream.broker.kafka_config`); ``consumer_config``
    overrides any kafka-python consumer setting.

    The partitions are assigned, not subscribed (:meth:`_assign_every_partition` says why): no
    group join, no rebalance. Without a :meth:`seek`, a partition starts at the group's
    committed offset (else ``auto_offset_reset``), so after a restart batches returned but not
    yet committed come again: delivery is at least once. ``session_timeout_ms`` is kept for
    callers; with no group membership it bounds nothing.

    A :class:`~streamcl.stream.sources.BatchSource` and a
    :class:`~streamcl.stream.sources.RangeSource`.
    """

    def __init__(self, bootstrap: str, topic: str, group_id: str, decoder: Decoder, *,
                 dlq_topic: str | None = None, cut_at_task_change: bool = False,
                 client_config: dict[str, Any] | None = None,
                 consumer_config: dict[str, Any] | None = None,
                 auto_offset_reset: str = "earliest", session_timeout_ms: int = 10_000,
                 hold_until_seek: bool = False, replica: tuple[int, int] | None = None
                 ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.decoder = decoder
        self.dlq_topic = dlq_topic or dead_letter_topic(topic)
        self.cut_at_task_change = cut_at_task_change
        self.client_config = dict(client_config or {})
        self._config = {**FETCH_DEFAULTS, "session_timeout_ms": session_timeout_ms,
                        "heartbeat_interval_ms": min(3000, session_timeout_ms // 3),
                        "auto_offset_reset": auto_offset_reset, **self.client_config,
                        **(consumer_config or {})}
        #: rejected messages seen by poll_batch, by reason code (replays are not counted)
        self.rejections: Counter[str] = Counter()
        self._pending: deque[_Item] = deque()
        #: join the group but fetch nothing until the first seek (a recovering service knows
        #: where to start only after its replay, and must not have its CPU taken meanwhile)
        self._hold = hold_until_seek
        #: where rejected messages go (its producer is made at the first one)
        self.dead_letters = DeadLetterWriter(bootstrap, self.dlq_topic,
                                             client_config=self.client_config)
        self._replay: RangeReader | None = None
        #: ``(rank, world_size)`` of a data-parallel replica: it reads only its partitions
        self.replica = replica
        self._consumer = KafkaConsumer(**{
            **self._config, "bootstrap_servers": bootstrap, "group_id": group_id,
            "enable_auto_commit": False, "value_deserializer": None, "key_deserializer": None})
        try:
            self._assign_every_partition()
        except BaseException:
            self._consumer.close(autocommit=False)
            raise

    def _assign_every_partition(self, timeout_s: float = 30.0) -> None:
        """Take every partition of the topic, without a group join.

        Why not subscribe: one learner reads the whole topic (a second instance of the same
        learner is fenced by the journal, a different learner has its own group), and where
        to read is decided by the journal, not by the group; a group join only adds its wait
        (tansu answers a new group's first join after half the session timeout: 5 s of every
        start). The group still holds the committed offsets, for other tools and for where to
        start without a journal. Partitions added to the topic later are read after a restart.
        """
        deadline = time.monotonic() + timeout_s
        parts = self._consumer.partitions_for_topic(self.topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval of a metadata refresh
            parts = self._consumer.partitions_for_topic(self.topic)
        if not parts:
            raise TimeoutError(f"no topic {self.topic!r} on {self.bootstrap} after "
                               f"{timeout_s:g} s")
        tps = [TopicPartition(self.topic, p) for p in self._mine(parts)]
        self._consumer.assign(tps)
        if self._hold:
            self._consumer.pause(*tps)

    # -- the live stream ----------------------------------------------------------------------
    def poll_batch(self, max_records: int, max_wait_s: float,
                   interrupt: threading.Event | None = None) -> MicroBatch | None:
        """The next micro-batch, or ``None`` if no message arrived within ``max_wait_s``.

        A batch may hold no valid sample (all rejected): it is still returned, so that its
        offsets get journaled and committed. Dead letters are flushed before it is returned.
        Once ``interrupt`` is set, the wait ends within ~0.1 s with ``None`` and the records
        gathered so far stay queued for the next call (the batch is not cut short: cuts stay
        a function of the data and ``max_wait_s``, not of who interrupted).
        """
        batch = self.poll_arrays(max_records, max_wait_s, interrupt)
        return None if batch is None else batch.to_torch()

    def poll_arrays(self, max_records: int, max_wait_s: float,
                    interrupt: threading.Event | None = None) -> ArrayBatch | None:
        """:meth:`poll_batch`, the batch as numpy arrays (no torch needed)."""
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        deadline = time.monotonic() + max_wait_s
        items: list[_Item] = []
        valid, key, polled = 0, _UNSET, False
        while True:
            cut = False
            while self._pending and valid < max_records:
                decoded = self._pending[0][1]
                if isinstance(decoded, Sample):
                    k = self._key(decoded)
                    if key is _UNSET:
                        key = k
                    elif k != key:
                        cut = True
                        break
                    valid += 1
                items.append(self._pending.popleft())
            if cut or valid >= max_records:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 and polled:
                break
            if interrupt is not None:
                if interrupt.is_set():
                    self._pending.extendleft(reversed(items))
                    return None
                remaining = min(remaining, 0.1)
            if not self._consumer.assignment():  # a replica with no partition: wait, as poll would
                (interrupt or threading.Event()).wait(max(0.0, remaining))
                polled = True
                continue
            records = self._consumer.poll(timeout_ms=max(0, int(remaining * 1000)),
                                          max_records=max_records - valid)
            polled = True
            decode = self.decoder.decode
            for recs in records.values():
                self._pending.extend((r, decode(r.value, r.headers)) for r in recs)
        if not items:
            return None
        rejected = [(r, d) for r, d in items if isinstance(d, Rejection)]
        if rejected:
            self.rejections.update(d.code for _, d in rejected)
            self.dead_letters.write(rejected)
        return assemble_arrays(items, self.decoder)

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit next-offsets (partition -> offset of the first record *not* yet handled)."""
        self._consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                               for p, o in offsets.items()})

    def seek(self, offsets: dict[int, int]) -> None:
        """Continue the live stream at these next-offsets (e.g. the end of a replayed journal)."""
        for p, o in offsets.items():
            self._consumer.seek(TopicPartition(self.topic, p), o)
            self._pending = deque(it for it in self._pending if it[0].partition != p)
        self._release()

    def _release(self) -> None:
        if self._hold:
            self._hold = False
            self._consumer.resume(*self._consumer.paused())

    # -- replay -------------------------------------------------------------------------------
    def read_ranges(self, ranges: dict[int, tuple[int, int]],
                    timeout_s: float = 30.0) -> MicroBatch:
        """Rebuild the batch of these offset ranges (see :meth:`RangeReader.read_ranges`)."""
        return self._replay_reader().read_ranges(ranges, timeout_s)

    def read_many(self, many: Iterable[dict[int, tuple[int, int]]],
                  timeout_s: float = 30.0) -> Iterator[MicroBatch]:
        """The batches of these offset ranges, in order (see :meth:`RangeReader.read_many`)."""
        return self._replay_reader().read_many(many, timeout_s)

    def _replay_reader(self) -> RangeReader:
        if self._replay is None:
            self._replay = RangeReader(self.bootstrap, self.topic, self.decoder,
                                       consumer_config=self._config)
        return self._replay

    def seek_to_beginning(self, timeout_s: float = 30.0) -> dict[int, int]:
        """Continue the live stream at the start of every partition's log (not at the group's
        committed offsets); returns the offsets sought."""
        kc = self._consumer
        deadline = time.monotonic() + timeout_s
        parts = kc.partitions_for_topic(self.topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)  # polling interval of a metadata refresh
            parts = kc.partitions_for_topic(self.topic)
        if not parts:
            self._release()
            return {}
        tps = [TopicPartition(self.topic, p) for p in self._mine(parts)]
        if not tps:
            self._release()
            return {}
        offsets = {tp.partition: o for tp, o in kc.beginning_offsets(tps).items()}
        self.seek(offsets)
        return offsets

    def lag(self) -> dict[int, int]:
        """Messages between this consumer's position and each assigned partition's end, as of
        the last fetch (prefetched, not yet returned records count as consumed)."""
        out = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                with contextlib.suppress(Exception):
                    out[tp.partition] = max(0, high - self._consumer.position(tp))
        return out

    # -- internals ----------------------------------------------------------------------------
    def _mine(self, partitions: Iterable[int]) -> list[int]:
        """The partitions this consumer reads: all, or a replica's share."""
        if self.replica is None:
            return sorted(partitions)
        rank, world = self.replica
        return [p for p in sorted(partitions) if owns(p, rank, world)]

    def _key(self, sample: Sample) -> tuple[Any, ...]:
        """What may not change inside a batch: the element type, and the task if asked."""
        return (sample.x.dtype, sample.task) if self.cut_at_task_change else (sample.x.dtype,)

    def close(self) -> None:
        """Close without committing anything, and flush pending dead letters."""
        self.dead_letters.close()
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        self._consumer.close(autocommit=False)

    def __enter__(self) -> BatchConsumer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def assemble(items: list[_Item], decoder: Decoder) -> MicroBatch:
    """One MicroBatch from decoded records: samples in (partition, offset) order."""
    return assemble_arrays(items, decoder).to_torch()


def assemble_arrays(items: list[_Item], decoder: Decoder) -> ArrayBatch:
    """:func:`assemble`, as numpy arrays."""
    by_partition: dict[int, list[_Item]] = {}
    for item in items:  # arrival order is offset order within a partition
        by_partition.setdefault(item[0].partition, []).append(item)
    if len(by_partition) > 1:
        items = [it for p in sorted(by_partition) for it in by_partition[p]]
    ranges = {p: (its[0][0].offset, its[-1][0].offset) for p, its in by_partition.items()}
    samples = [d for _, d in items if type(d) is Sample]
    if samples:
        x = np.stack([s.x for s in samples])
    else:
        x = np.empty((0, *decoder.input_shape), dtype=np.float32)
    y = np.array([s.y for s in samples], dtype=np.int64)
    tasks = [s.task for s in samples]
    task = (None if all(t is None for t in tasks) else
            np.array([-1 if t is None else t for t in tasks], dtype=np.int64))
    stamps = [r.timestamp for r, _ in items if r.timestamp is not None and r.timestamp >= 0]
    return ArrayBatch(x, y, task, ranges, len(items) - len(samples),
                      max(stamps) if stamps else None, [s.id for s in samples])


class RangeReader:
    """Re-reads exact offset ranges of ``topic`` outside any consumer group (journal replay).

    Rejected messages are skipped again but not re-sent to the dead-letter topic (they were
    sent when first consumed). ``auto_offset_reset`` is ``none``: a range that retention
    already deleted raises kafka-python's ``OffsetOutOfRangeError`` instead of silently
    reading something else. A :class:`~streamcl.stream.sources.RangeSource`.
    """

    def __init__(self, bootstrap: str, topic: str, decoder: Decoder, *,
                 client_config: dict[str, Any] | None = None,
                 consumer_config: dict[str, Any] | None = None) -> None:
        self.topic = topic
        self.decoder = decoder
        self._consumer = KafkaConsumer(**{
            **FETCH_DEFAULTS, **(client_config or {}), **(consumer_config or {}),
            "bootstrap_servers": bootstrap, "group_id": None, "enable_auto_commit": False,
            "auto_offset_reset": "none", "value_deserializer": None, "key_deserializer": None})

    def read_ranges(self, ranges: dict[int, tuple[int, int]],
                    timeout_s: float = 30.0) -> MicroBatch:
        """The batch of these (partition -> (first, last)) ranges, decoded as when consumed;
        ``TimeoutError`` if the records cannot all be read in time."""
        return self.read_arrays(ranges, timeout_s).to_torch()

    def read_arrays(self, ranges: dict[int, tuple[int, int]],
                    timeout_s: float = 30.0) -> ArrayBatch:
        """:meth:`read_ranges`, the batch as numpy arrays (no torch needed)."""
        consumer = self._consumer
        deadline = time.monotonic() + timeout_s
        decode = self.decoder.decode
        items: list[_Item] = []
        for p in sorted(ranges):
            first, last = ranges[p]
            tp = TopicPartition(self.topic, p)
            # consecutive ranges (a journal replayed in order) continue from the records
            # already fetched: a seek or a new assignment would drop them and cost a round trip
            if consumer.assignment() != {tp}:
                consumer.assign([tp])
                consumer.seek(tp, first)
            elif consumer.position(tp) != first:
                consumer.seek(tp, first)
            while consumer.position(tp) <= last:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"could not read offsets {first}..{last} of "
                                       f"{self.topic}[{p}] within {timeout_s:g} s")
                records = consumer.poll(timeout_ms=int(remaining * 1000),
                                        max_records=last - consumer.position(tp) + 1)
                items.extend((r, decode(r.value, r.headers)) for r in records.get(tp, ())
                             if first <= r.offset <= last)
        return assemble_arrays(items, self.decoder)

    def read_many(self, many: Iterable[dict[int, tuple[int, int]]],
                  timeout_s: float = 30.0) -> Iterator[MicroBatch]:
        """The batches of these offset ranges, in order."""
        for ranges in many:
            yield self.read_ranges(ranges, timeout_s)

    def close(self) -> None:
        self._consumer.close(autocommit=False)
