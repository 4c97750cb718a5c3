"""The event journal: every decision of the learner, in order, on a single-partition topic.

The learner is event-sourced. Each decision is appended to the journal *before* it takes
effect, and its state is the latest snapshot (:mod:`streamcl.stream.snapshots`) plus a replay
of the journal entries after it. **The journal is the source of truth: an entry that is in the
journal happened, by definition.** A crash can therefore leave a ``batch`` entry journaled but
not yet trained (or trained but its snapshot never written): recovery re-trains it, because it
is part of the log. The converse cannot happen, since nothing acts on a decision before
:meth:`Journal.append` returns, and ``append`` returns only once the broker has acknowledged
the entry with ``acks="all"``.

An entry is a JSON object with a ``type``, a ``seq`` (0, 1, 2, ... with no gaps: the position
in the log) and a ``ts`` (wall-clock seconds when it was appended, informational). It is one
Kafka record on partition 0 of ``<name>.journal`` (:func:`journal_topic`), key ``str(seq)``.
The types and their fields (helpers build each one):

* ``start`` (:func:`start_entry`): a trainer process started: ``config_hash``, ``pid``,
  ``host``, and anything else the caller adds;
* ``batch`` (:func:`batch_entry`): learn from a micro-batch: ``ranges`` ``{"partition": [first,
  last]}`` (inclusive offsets of the input topic, JSON object keys are strings; read them back
  with :func:`ranges_from_json`), ``plan`` (:meth:`streamcl.trainer.Plan.to_json`),
  ``samples`` and ``rejected`` (counts);
* ``snapshot`` (:func:`snapshot_entry`): a snapshot was committed: ``path``, ``sha256``,
  ``covers_seq`` (the last seq whose effects it includes) and ``offsets`` (next input offsets
  per partition, :func:`offsets_from_json`);
* ``publish``: a model version was published (written *before* the registry is): ``version``,
  ``position`` (samples trained), ``trigger``, ``metrics`` (holdout accuracy, accuracy matrix,
  forgetting, ...), ``gate`` (the verdict); the state it publishes is the one after every
  ``batch`` entry before it, so replaying to it rebuilds the published weights;
* ``reject``: the quality gate refused a candidate: ``position``, ``trigger``, ``reason``,
  ``metrics``, ``gate``.

Recovery: take the newest valid snapshot (its ``covers_seq`` = *S*), then
``journal.read(from_seq=S + 1)`` and re-apply every ``batch`` entry in order, rebuilding each
batch from its offset ranges (:meth:`~streamcl.stream.consumer.BatchConsumer.read_ranges`) and
training with the journaled plan; then continue the live stream at the offsets after the last
batch (:meth:`~streamcl.stream.consumer.BatchConsumer.seek`). A snapshot whose ``covers_seq`` is
beyond the journal's last entry means the journal was lost (the embedded broker keeps topics in
memory only): it must not be resumed silently. Readers skip entry types they do not know.

**One writer per journal.** :class:`Journal` numbers entries from its own counter, recovered
on construction from the last entry, so a restarted process continues the numbering; two live
writers would interleave duplicate numbers (fencing them is the service's job). A retried
duplicate of an entry (same ``seq``, which an idempotent producer prevents anyway) is skipped
by :meth:`Journal.read`; a gap in the numbering raises :class:`JournalError`. After a failed
append the entry may or may not be in the log, so the instance refuses further appends: reopen
the journal (which reads where the log really ends) and recover from it.

**Finding the end of the log.** ``KafkaConsumer.end_offsets`` (ListOffsets "latest") is not
the high watermark on tansu 0.6: it returns the base offset of the last record *batch* plus one
(:mod:`streamcl.stream.broker`), so a batch of *n* records looks like one. It is still a lower
bound of the high watermark on every broker, and the high watermark that the broker sends in
every *fetch* response is right on tansu too (checked by the tests). So a read seeks, fetches,
and reads until its position reaches the high watermark of its first fetch response (at least
the ListOffsets answer): the end as it was when the read began, entries appended meanwhile are
not waited for. Nothing depends on a poll coming back empty for a while, which would confuse a
slow broker with the end of the log. Independently, :meth:`Journal.append` sends each entry as
its own record batch (``linger_ms=0``, flushed, acknowledged before the next one), so for a
journal written only by this class ListOffsets is exact even on tansu.

Offsets: entry *k* sits at offset >= *k* (offsets only grow, and a duplicate can only push later
entries further), so ``read(from_seq=k)`` seeks straight to offset *k* and reads forward to
entry *k*; replay after a snapshot does not read the whole log. The journal topic must keep its
records (on a real cluster: ``retention.ms=-1``, no compaction); a deleted range is an error,
never silently skipped.

Idempotence: the producer runs with kafka-python's ``enable_idempotence=True`` (with
``acks="all"``), which tansu supports: a producer retry after a lost acknowledgement cannot
write an entry twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError

from streamcl.stream.broker import ensure_topics

log = logging.getLogger(__name__)

#: Entry types this version writes, with the fields each must carry.
TYPES: dict[str, tuple[str, ...]] = {
    "start": ("config_hash", "pid", "host"),
    "batch": ("ranges", "plan", "samples", "rejected"),
    "snapshot": ("path", "sha256", "covers_seq", "offsets"),
    "publish": ("version", "position", "trigger", "metrics", "gate"),
    "reject": ("position", "trigger", "reason", "metrics", "gate"),
}

_PARTITION = 0
_GRACE_S = 5.0  # how long past its delivery timeout an append waits for the producer's verdict


class JournalError(RuntimeError):
    """The journal cannot be read or written as the log it must be (the message says why)."""


def journal_topic(name: str) -> str:
    """The journal topic of the learner ``name``.

    >>> journal_topic("digits")
    'digits.journal'
    """
    return f"{name}.journal"


# -- entry helpers --------------------------------------------------------------------------------
def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a configuration's canonical JSON (e.g. ``TrainerConfig.to_json()``).

    >>> config_hash({"b": 1, "a": [2]}) == config_hash({"a": [2], "b": 1})
    True
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def start_entry(config: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A ``start`` entry for this process: config hash, pid and host (plus ``extra`` fields)."""
    return {"type": "start", "config_hash": config_hash(config), "pid": os.getpid(),
            "host": socket.gethostname(), **extra}


def batch_entry(ranges: Mapping[int, tuple[int, int]], plan: Mapping[str, Any], samples: int,
                rejected: int = 0, **extra: Any) -> dict[str, Any]:
    """A ``batch`` entry: a micro-batch's offset ranges and the trainer's plan for it.

    ``plan`` is ``Plan.to_json()``; ``ranges`` is ``MicroBatch.ranges``.

    >>> batch_entry({0: (10, 41)}, {"position": 0}, samples=31, rejected=1)["ranges"]
    {'0': [10, 41]}
    """
    return {"type": "batch", "ranges": ranges_to_json(ranges), "plan": dict(plan),
            "samples": int(samples), "rejected": int(rejected), **extra}


def snapshot_entry(path: str | os.PathLike[str], sha256: str, covers_seq: int,
                   offsets: Mapping[int, int], **extra: Any) -> dict[str, Any]:
    """A ``snapshot`` entry (``offsets``: the next input offset per partition)."""
    return {"type": "snapshot", "path": os.fspath(path), "sha256": sha256,
            "covers_seq": int(covers_seq), "offsets": offsets_to_json(offsets), **extra}


def ranges_to_json(ranges: Mapping[int, tuple[int, int]]) -> dict[str, list[int]]:
    return {str(int(p)): [int(first), int(last)] for p, (first, last) in sorted(ranges.items())}


def ranges_from_json(data: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """``{"0": [10, 41]}`` -> ``{0: (10, 41)}`` (what ``BatchConsumer.read_ranges`` takes).

    >>> ranges_from_json({"1": [5, 9], "0": [10, 41]})
    {0: (10, 41), 1: (5, 9)}
    """
    return {int(p): (int(first), int(last)) for p, (first, last) in
            sorted(data.items(), key=lambda kv: int(kv[0]))}


def offsets_to_json(offsets: Mapping[int, int]) -> dict[str, int]:
    return {str(int(p)): int(o) for p, o in sorted(offsets.items())}


def offsets_from_json(data: Mapping[str, Any]) -> dict[int, int]:
    """``{"0": 42}`` -> ``{0: 42}`` (what ``BatchConsumer.seek`` and ``commit`` take)."""
    return {int(p): int(o) for p, o in sorted(data.items(), key=lambda kv: int(kv[0]))}


def _check(entry: Mapping[str, Any]) -> None:
    kind = entry.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a journal entry needs a non-empty str 'type', got {kind!r}")
    missing = [f for f in TYPES.get(kind, ()) if f not in entry]
    if missing:
        raise ValueError(f"a {kind!r} entry needs {', '.join(missing)}")


# -- the journal ----------------------------------------------------------------------------------
class Journal:
    """Append-only, numbered log of decisions on ``topic`` (a single-partition Kafka topic).

    The topic is created with one partition when missing; an existing topic with more than one
    partition is refused (the log's order would be lost). On construction the journal reads its
    last entry, so :attr:`next_seq` continues the numbering of an earlier process.
    ``client_config`` holds security settings (:func:`~streamcl.stream.broker.kafka_config`);
    ``timeout_s`` bounds each broker round trip (an append's acknowledgement, a read).
    """

    def __init__(self, bootstrap: str, topic: str, client_config: dict[str, Any] | None = None,
                 *, timeout_s: float = 30.0, create: bool = True,
                 producer: Literal["auto", "kafka-python", "confluent"] = "auto") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_config = dict(client_config or {})
        self.timeout_s = timeout_s
        self._tp = TopicPartition(topic, _PARTITION)
        self._producer: KafkaProducer | _ConfluentSender | None = None
        self._broken: str | None = None
        if create:
            # without the right to create topics, it may be provisioned already
            with contextlib.suppress(KafkaError):
                ensure_topics(bootstrap, [topic], partitions=1,
                              client_config=self.client_config, timeout_s=timeout_s)
        self._check_partitions()
        last = self._tail()
        #: the entry with the highest seq when this instance was made or last appended
        self.last_entry: dict[str, Any] | None = last
        #: the seq the next :meth:`append` gets
        self.next_seq: int = 0 if last is None else last["seq"] + 1
        if producer == "confluent" or (producer == "auto" and _ConfluentSender.available()):
            self._producer = _ConfluentSender(bootstrap, topic, self.client_config, timeout_s)
        else:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0,
                # the producer itself gives up on an entry after timeout_s (retrying until
                # then), so a failed append leaves nothing in flight behind it
                retries=2**31 - 1, request_timeout_ms=max(100, int(timeout_s * 500)),
                delivery_timeout_ms=max(200, int(timeout_s * 1000)), **self.client_config)

    # -- writing ----------------------------------------------------------------------------
    def append(self, entry: Mapping[str, Any]) -> int:
        """Write ``entry`` as the next numbered entry; return its seq once it is durable.

        Sets ``seq`` (and ``ts`` unless given); ``entry`` itself is not modified. The entry is
        sent as its own record batch and this waits for the broker's acknowledgement
        (``acks="all"``), so the caller may act on the decision as soon as this returns. An
        entry that is not JSON-serialisable (NaN included) raises ``ValueError``/``TypeError``
        without using up a seq; a failed send raises :class:`JournalError` and leaves the
        instance refusing appends (the entry's fate is unknown until the log is read again).
        """
        if self._producer is None:
            raise JournalError("the journal is closed")
        if self._broken is not None:
            raise JournalError(f"{self.topic}: an earlier append failed ({self._broken}); "
                               "reopen the journal and recover from what it holds")
        _check(entry)
        if "seq" in entry and entry["seq"] != self.next_seq:
            raise ValueError(f"entry has seq {entry['seq']!r}, the journal's next is "
                             f"{self.next_seq}")
        seq = self.next_seq
        record = {**entry, "seq": seq}
        record.setdefault("ts", time.time())
        value = json.dumps(record, separators=(",", ":"), allow_nan=False).encode()
        try:
            future = self._producer.send(self.topic, value=value, key=str(seq).encode(),
                                         partition=_PARTITION)
            self._producer.flush(timeout=self.timeout_s + _GRACE_S)
            metadata = future.get(timeout=_GRACE_S)
        except Exception as exc:
            text = str(exc)  # kafka-python's errors already start with their class name
            self._broken = text if text.startswith(type(exc).__name__) else \
                f"{type(exc).__name__}: {text}"
            raise JournalError(f"{self.topic}: entry {seq} not acknowledged: "
                               f"{self._broken}") from exc
        if metadata.offset < seq:  # entry k can only sit at offset >= k (see the docstring)
            self._broken = f"entry {seq} landed at offset {metadata.offset}"
            raise JournalError(f"{self.topic}: {self._broken}: the topic holds records that "
                               "are not this journal's")
        self.next_seq = seq + 1
        self.last_entry = record
        return seq

    # -- reading ----------------------------------------------------------------------------
    def read(self, from_seq: int = 0, to_seq: int | None = None) -> Iterator[dict[str, Any]]:
        """Entries ``from_seq`` .. ``to_seq`` (inclusive; ``None``: to the end), in order.

        The end is where the log ended when the read began. Raises :class:`JournalError` on a
        gap in the numbering or a record that is not an entry, and ``TimeoutError`` if the
        broker does not deliver the records within ``timeout_s`` of the last progress.
        """
        if from_seq < 0:
            raise ValueError(f"from_seq must be >= 0, got {from_seq}")
        if to_seq is not None and to_seq < from_seq:
            return
        with self._reader() as reader:
            expect = from_seq
            for offset, entry in reader.entries(from_seq):
                seq = entry["seq"]
                if seq < expect:
                    if seq >= from_seq:
                        log.warning("%s: duplicate of entry %d at offset %d skipped",
                                    self.topic, seq, offset)
                    continue
                if seq > expect:
                    raise JournalError(f"{self.topic}: entry {expect} is missing (offset "
                                       f"{offset} holds entry {seq})")
                yield entry
                expect += 1
                if to_seq is not None and expect > to_seq:
                    return

    def last(self, type: str | None = None) -> dict[str, Any] | None:
        """The newest entry (of ``type``, if given), or ``None``; reads the log's tail."""
        if type is None:
            return self._tail()
        with self._reader() as reader:
            hi = reader.end()
            window = 64
            while hi > reader.start:
                lo = max(reader.start, hi - window)
                found = [e for _, e in reader.entries(lo, stop=hi) if e["type"] == type]
                if found:
                    return max(found, key=lambda e: e["seq"])
                hi, window = lo, window * 4
        return None

    def _tail(self) -> dict[str, Any] | None:
        """The entry with the highest seq, reading only the last record batch."""
        with self._reader() as reader:
            if reader.end() <= reader.start:
                return None
            # under tansu lower_end - 1 is the first offset of the last record batch, elsewhere
            # the last record: either way the read from there covers the whole tail
            entries = [e for _, e in reader.entries(reader.lower_end - 1)]
        if not entries:
            raise JournalError(f"{self.topic}: the log is not empty but its tail holds no entry")
        return max(entries, key=lambda e: e["seq"])

    def _reader(self) -> _Reader:
        return _Reader(self)

    def _check_partitions(self) -> None:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, **self.client_config)
        try:
            deadline = time.monotonic() + self.timeout_s
            while True:
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions:
                    break
                if time.monotonic() > deadline:
                    raise JournalError(f"no journal topic {self.topic!r} on {self.bootstrap}")
                time.sleep(0.1)  # polling interval of a metadata refresh
        finally:
            consumer.close()
        if partitions != {_PARTITION}:
            raise JournalError(f"{self.topic}: a journal topic needs exactly one partition, "
                               f"it has {len(partitions)}")

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            # after a failed append an expired entry may still count as pending: nothing to wait
            with contextlib.suppress(KafkaError):
                producer.close(timeout=0 if self._broken else self.timeout_s)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _ConfluentSender:
    """The journal's appends through librdkafka (``confluent-kafka``), when it is installed.

    Why: an acked append is on the critical path of every step. kafka-python sends from a
    Python thread, which competes with training for the interpreter lock (measured here: 0.7 ms
    per acked append to tansu, and the training step itself slowed); librdkafka's threads are
    C (0.26 ms, no lock). Same guarantees: ``acks=all``, idempotent, one record per append,
    retried until ``timeout_s``. Offers the slice of ``KafkaProducer`` that ``append`` uses.
    """

    _KEYS: ClassVar[dict[str, str]] = {
        "security_protocol": "security.protocol", "ssl_cafile": "ssl.ca.location",
        "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
        "sasl_mechanism": "sasl.mechanism", "sasl_plain_username": "sasl.username",
        "sasl_plain_password": "sasl.password"}

    @staticmethod
    def available() -> bool:
        import importlib.util

        return importlib.util.find_spec("confluent_kafka") is not None

    def __init__(self, bootstrap: str, topic: str, client_config: dict[str, Any],
                 timeout_s: float) -> None:
        import confluent_kafka

        conf = {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                "linger.ms": 0, "message.timeout.ms": max(200, int(timeout_s * 1000)),
                "log.connection.close": False}
        for key, value in client_config.items():
            if key not in self._KEYS:
                raise ValueError(f"journal: no librdkafka equivalent for client setting {key}")
            secret = getattr(value, "get_secret_value", None)
            conf[self._KEYS[key]] = secret() if secret else value
        self._kafka = confluent_kafka
        self._producer = confluent_kafka.Producer(conf)
        self.topic = topic

    def send(self, topic: str, *, value: bytes, key: bytes, partition: int) -> _Delivered:
        done: list[tuple[Any, Any]] = []
        self._producer.produce(topic, value, key, partition=partition,
                               on_delivery=lambda err, msg: done.append((err, msg)))
        return _Delivered(self._producer, done)

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout)

    def close(self, timeout: float = 0) -> None:
        self._producer.flush(timeout)


class _Delivered:
    """A confluent-kafka delivery, read like kafka-python's future (``get`` -> metadata)."""

    def __init__(self, producer: Any, done: list[tuple[Any, Any]]) -> None:
        self._producer, self._done = producer, done

    def get(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self._done and time.monotonic() < deadline:
            self._producer.poll(max(0.0, deadline - time.monotonic()))
        if not self._done:
            raise KafkaTimeoutError("journal append: no delivery report in time")
        err, msg = self._done[0]
        if err is not None:
            raise KafkaError(f"KafkaError: {err.str()}")
        return _Metadata(msg.offset())


@dataclass(frozen=True)
class _Metadata:
    offset: int


class _Reader:
    """A group-less consumer assigned to the journal's partition, for one read.

    ``start`` is the log start offset, ``lower_end`` the ListOffsets "latest" answer (a lower
    bound of the high watermark), and :meth:`end` the high watermark of the first fetch
    response, which bounds every read made with this reader.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.tp = journal._tp
        timeout_ms = int(journal.timeout_s * 1000)
        self.consumer = KafkaConsumer(
            bootstrap_servers=journal.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="none", fetch_max_wait_ms=20, request_timeout_ms=timeout_ms + 5000,
            **journal.client_config)
        try:
            self.consumer.assign([self.tp])
            self.start = self.consumer.beginning_offsets([self.tp], timeout_ms)[self.tp]
            self.lower_end = self.consumer.end_offsets([self.tp], timeout_ms)[self.tp]
        except BaseException:
            self.consumer.close()
            raise
        self._end: int | None = None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()

    def _deadline(self) -> float:
        return time.monotonic() + self.journal.timeout_s

    def _learn_end(self) -> None:
        if self._end is None:
            hw = self.consumer.highwater(self.tp)
            if hw is not None:
                self._end = max(hw, self.lower_end)

    def end(self) -> int:
        """The high watermark as of this reader's first fetch."""
        if self._end is None:
            self.consumer.seek(self.tp, max(self.lower_end, self.start))
            deadline = self._deadline()
            while self._end is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.tp.topic}: no fetch answer within "
                                       f"{self.journal.timeout_s:g} s")
                self.consumer.poll(timeout_ms=50)
                self._learn_end()
        return self._end

    def _bound(self, stop: int | None) -> int | None:
        if self._end is None:
            return stop
        return self._end if stop is None else min(stop, self._end)

    def entries(self, offset: int, stop: int | None = None) -> Iterator[tuple[int, dict]]:
        """(offset, entry) from ``offset`` up to ``stop`` or the end (exclusive), in order."""
        # never seek past the end: that is an out-of-range error, not an empty read
        top = max(self.lower_end, self._end or 0, self.start)
        self.consumer.seek(self.tp, min(max(offset, self.start), top))
        deadline = self._deadline()
        while True:
            self._learn_end()
            bound = self._bound(stop)
            if bound is not None and self.consumer.position(self.tp) >= bound:
                return
            if time.monotonic() > deadline:
                where = self.consumer.position(self.tp)
                raise TimeoutError(f"{self.tp.topic}: no progress at offset {where} (end "
                                   f"{bound}) for {self.journal.timeout_s:g} s")
            records = self.consumer.poll(timeout_ms=100).get(self.tp, ())
            if not records:
                continue
            deadline = self._deadline()
            self._learn_end()  # the response that brought them carried the high watermark
            bound = self._bound(stop)
            for record in records:
                if bound is not None and record.offset >= bound:
                    return
                yield record.offset, self._decode(record)

    def _decode(self, record: Any) -> dict[str, Any]:
        where = f"{self.tp.topic}@{record.offset}"
        try:
            entry = json.loads(record.value)
        except (TypeError, ValueError) as exc:
            raise JournalError(f"{where}: not a journal entry ({exc})") from None
        if not isinstance(entry, dict):
            raise JournalError(f"{where}: not a journal entry (a JSON {type(entry).__name__})")
        seq, kind = entry.get("seq"), entry.get("type")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise JournalError(f"{where}: entry without a valid seq ({seq!r})")
        if not isinstance(kind, str):
            raise JournalError(f"{where}: entry {seq} without a type")
        return entry
