"""The event journal: every decision of the learner, in order, on a single-partition topic.

The learner is event-sourced. Its state is the latest snapshot (:mod:`streamcl.stream.snapshots`)
plus a replay of the journal entries after it. **The journal is the source of truth: an entry
that is in the journal happened, by definition.** An entry is one typed value of
:mod:`streamcl.stream.entries` (``start``, ``batch``, ``snapshot``, ``publish``, ``reject``),
stored as one JSON Kafka record on partition 0 of ``<name>.journal`` (:func:`journal_topic`),
key ``str(seq)``; ``seq`` is 0, 1, 2, ... with no gaps (the position in the log).

**Write-behind.** :meth:`Journal.append` hands an entry to the producer and returns at once:
training goes on while the broker acknowledges it (``acks=all``; idempotent, so the order is
kept and a retry cannot write an entry twice). What a crash can lose is therefore only entries
not yet acknowledged, and the in-memory training after them, which recovery redoes from the log
(for a batch the log does not hold, the input is simply read again). The other direction must
never happen: nothing outside the process may depend on an entry the log might not hold. So
every effect seen outside (a snapshot, a registry publication, an announcement, a consumer-group
commit) first calls :meth:`Journal.sync`, which returns only once every entry appended so far is
acknowledged. That ordering is written once, in :class:`streamcl.learner.Effects`.

**One writer, fenced by Kafka.** A writing journal is a transactional producer whose
``transactional.id`` is the learner's (:func:`writer_id`). Opening one makes the broker bump
that id's producer epoch *before* the new writer reads where the log ends, so an older instance
with the same name is fenced: its next append comes back ``PRODUCER_FENCED``, its next
:meth:`~Journal.sync` raises :class:`JournalFenced`, and since every outside effect waits for a
sync, it writes nothing more anywhere. Transactions are used for that fence only, not for
visibility: readers read every record (``read_uncommitted``), because tansu does not hide
uncommitted records from ``read_committed`` readers (measured) and every reader must see the
same log. The open transaction is committed at each sync (and at least every
``commit_every_s``) so that a real Kafka broker never times it out.

Recovery: take the newest valid snapshot (its ``covers_seq`` = *S*), then
``journal.read(from_seq=S + 1)`` and re-apply every entry (:func:`streamcl.learner.rebuild`).
A snapshot whose ``covers_seq`` is beyond the journal's last entry means the journal was lost:
it must not be resumed silently. Readers skip entry types they do not know
(:class:`~streamcl.stream.entries.Unknown`); a retried duplicate of an entry (same ``seq``) is
skipped by :meth:`Journal.read`; a gap in the numbering raises :class:`JournalError`. After a
failed append the writer refuses further appends: reopen the journal (which reads where the log
really ends) and recover from it.

**Finding the end of the log.** ``KafkaConsumer.end_offsets`` (ListOffsets "latest") is not
the high watermark on tansu 0.6: it returns the base offset of the last record *batch* plus one
(:mod:`streamcl.stream.broker`). It is still a lower bound of the high watermark on every broker,
and the high watermark that the broker sends in every *fetch* response is right on tansu too
(checked by the tests). So a read seeks, fetches, and reads until its position reaches the high
watermark of its first fetch response: the end as it was when the read began.

Offsets: entry *k* sits at offset >= *k* (offsets only grow; duplicates and transaction markers
only push later entries further), so ``read(from_seq=k)`` seeks straight to offset *k* and reads
forward to entry *k*. The journal topic must keep its records (on a real cluster:
``retention.ms=-1``, no compaction); a deleted range is an error, never silently skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streamcl.stream.broker import RECONNECT_BACKOFF_MAX_MS, ensure_topics
from streamcl.stream.entries import Entry, EntryError, entry_from_json

log = logging.getLogger(__name__)

_PARTITION = 0
_WHY_S = 2.0  # how long a failing writer asks librdkafka why
E = TypeVar("E", bound=Entry)


class JournalError(RuntimeError):
    """The journal cannot be read or written as the log it must be (the message says why)."""


class JournalFenced(JournalError):
    """Another instance of the same learner opened the journal for writing: this one must stop
    and write nothing more (the message says so in one line)."""


class JournalLost(JournalError):
    """The log holds less than this learner knows was written (a snapshot covers entries it
    lacks, or acknowledged entries are gone): the broker was emptied or replaced. Resuming
    would silently fork history, so the service stops with one line naming the fix."""


def journal_topic(name: str) -> str:
    """The journal topic of the learner ``name``.

    >>> journal_topic("digits")
    'digits.journal'
    """
    return f"{name}.journal"


def writer_id(name: str) -> str:
    """The ``transactional.id`` of learner ``name``'s journal writer (one per learner).

    >>> writer_id("digits")
    'streamcl.digits'
    """
    return f"streamcl.{name}"


class Journal:
    """The numbered log of decisions on ``topic`` (a single-partition Kafka topic).

    Read-only unless ``writer`` (a :func:`writer_id`) is given. A writing journal creates the
    topic with one partition when missing (an existing topic with more than one is refused: the
    log's order would be lost), fences any older writer with the same id, then reads its last
    entry so that :attr:`next_seq` continues the numbering. ``client_config`` holds security
    settings (:func:`~streamcl.stream.broker.kafka_config`); ``timeout_s`` bounds each broker
    round trip (a sync, a read).
    """

    def __init__(self, bootstrap: str, topic: str, client_config: dict[str, Any] | None = None,
                 *, timeout_s: float = 30.0, create: bool = True, writer: str | None = None,
                 commit_every_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_config = dict(client_config or {})
        self.timeout_s = timeout_s
        self._tp = TopicPartition(topic, _PARTITION)
        self._writer: _Writer | None = None
        if create and writer is not None:
            # without the right to create topics, it may be provisioned already
            with contextlib.suppress(KafkaError):
                ensure_topics(bootstrap, [topic], partitions=1,
                              client_config=self.client_config, timeout_s=timeout_s)
        self._check_partitions()
        if writer is not None:  # the fence comes first: the tail read after it is final
            self._writer = _Writer(bootstrap, topic, writer, self.client_config, timeout_s,
                                   commit_every_s)
        last = self.last()
        #: the entry with the highest seq when this instance was made or last appended
        self.last_entry: Entry | None = last
        #: the seq the next :meth:`append` gets
        self.next_seq: int = 0 if last is None else last.seq + 1

    # -- writing ----------------------------------------------------------------------------
    def append(self, entry: E) -> E:
        """Send ``entry`` as the next numbered entry and return it numbered (``seq``, ``ts``);
        does not wait for the broker (see :meth:`sync`).

        An entry that is not JSON-serialisable (NaN included) raises ``ValueError`` without
        using up a seq. A failure reported for an earlier append raises :class:`JournalError`
        (:class:`JournalFenced` when another writer took over) and the writer refuses further
        appends.
        """
        if self._writer is None:
            raise JournalError(f"{self.topic}: opened read-only (no writer id)")
        numbered = entry.numbered(self.next_seq, time.time())
        value = json.dumps(numbered.to_json(), separators=(",", ":"), allow_nan=False).encode()
        self._writer.send(numbered.seq, value)
        self.next_seq = numbered.seq + 1
        self.last_entry = numbered
        return numbered

    def sync(self) -> int:
        """Wait until every appended entry is acknowledged; return the last such seq (-1:
        none). Raises :class:`JournalFenced` or :class:`JournalError` instead."""
        if self._writer is not None:
            self._writer.sync()
        return self.next_seq - 1

    @property
    def unacknowledged(self) -> int:
        """Entries appended whose acknowledgement has not come back yet."""
        return 0 if self._writer is None else self._writer.pending

    @property
    def acknowledged(self) -> int:
        """The highest seq the broker has acknowledged to this writer (-1: none yet)."""
        return -1 if self._writer is None else self._writer.acked

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for acknowledgements, without committing; return how many
        entries are still unacknowledged. Raises as :meth:`sync` does on a failure."""
        return 0 if self._writer is None else self._writer.flush(timeout_s)

    def stalled_s(self) -> float:
        """How long the broker has been out of reach as the writer sees it: seconds since the
        oldest unacknowledged entry was sent with no acknowledgement since, or since librdkafka
        reported every broker down; 0 when neither."""
        return 0.0 if self._writer is None else self._writer.stalled_s()

    def probe(self, timeout_s: float) -> bool:
        """Whether a broker answers a metadata request within ``timeout_s`` (clears a "brokers
        down" report when one does). Cheap: used while idle or waiting out an outage."""
        return self._writer is not None and self._writer.probe(timeout_s)

    # -- reading ----------------------------------------------------------------------------
    def read(self, from_seq: int = 0, to_seq: int | None = None) -> Iterator[Entry]:
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
                if entry.seq < expect:
                    if entry.seq >= from_seq:
                        log.warning("%s: duplicate of entry %d at offset %d skipped",
                                    self.topic, entry.seq, offset)
                    continue
                if entry.seq > expect:
                    raise JournalError(f"{self.topic}: entry {expect} is missing (offset "
                                       f"{offset} holds entry {entry.seq})")
                yield entry
                expect += 1
                if to_seq is not None and expect > to_seq:
                    return

    def last(self, kind: type[E] | None = None) -> E | Entry | None:
        """The newest entry (of type ``kind``, if given), or ``None``; reads back from the
        log's tail in growing windows."""
        with self._reader() as reader:
            hi = reader.end()
            window = 16
            while hi > reader.start:
                lo = max(reader.start, hi - window)
                found = [e for _, e in reader.entries(lo, stop=hi)
                         if kind is None or isinstance(e, kind)]
                if found:
                    return max(found, key=lambda e: e.seq)
                hi, window = lo, window * 4
        return None

    def _reader(self) -> _Reader:
        return _Reader(self)

    def _check_partitions(self) -> None:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap,
                                 reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                                 **self.client_config)
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
        """Sync what can be synced (a clean stop loses nothing), then close the writer."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def abandon(self) -> None:
        """Close without waiting for the broker: entries not yet acknowledged may or may not be
        in the log, which is what the next writer reads (recovery after an outage)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abandon()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Writer:
    """The journal's transactional, idempotent librdkafka producer (``confluent-kafka``).

    Why librdkafka: its sender threads are C, so acknowledgements arrive without competing with
    training for the interpreter lock (kafka-python's Python sender thread slowed the training
    step measurably). Delivery reports are collected by callbacks; :meth:`sync` flushes them all
    and commits the open transaction.
    """

    _KEYS: ClassVar[dict[str, str]] = {
        "security_protocol": "security.protocol", "ssl_cafile": "ssl.ca.location",
        "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
        "sasl_mechanism": "sasl.mechanism", "sasl_plain_username": "sasl.username",
        "sasl_plain_password": "sasl.password"}

    def __init__(self, bootstrap: str, topic: str, transactional_id: str,
                 client_config: dict[str, Any], timeout_s: float, commit_every_s: float) -> None:
        import confluent_kafka

        conf = {"bootstrap.servers": bootstrap, "transactional.id": transactional_id,
                "acks": "all", "enable.idempotence": True, "linger.ms": 0,
                "transaction.timeout.ms": 60_000,
                "message.timeout.ms": max(200, min(60_000, int(timeout_s * 1000))),
                "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
                "log.connection.close": False, "error_cb": self._error,
                # librdkafka's own log lines go to Python logging, not straight to stderr, and
                # only critical ones: a refused connection during an outage is logged at every
                # retry, and what matters of it reaches error_cb anyway
                "logger": logging.getLogger("streamcl.librdkafka"), "log_level": 2}
        for key, value in client_config.items():
            if key not in self._KEYS:
                raise ValueError(f"journal: no librdkafka equivalent for client setting {key}")
            secret = getattr(value, "get_secret_value", None)
            conf[self._KEYS[key]] = secret() if secret else value
        self._kafka = confluent_kafka
        self.topic, self.id, self.timeout_s = topic, transactional_id, timeout_s
        self.commit_every_s = commit_every_s
        self._producer = confluent_kafka.Producer(conf)
        self._failed: str | None = None    # the first failure, once one happened
        self._reports: list[tuple[int | None, Any, Any]] = []  # (seq, error, message)
        self._fenced = False
        self._vague = False  # a failure that does not say why (see _check)
        self._txn_since: float | None = None  # when the open transaction began
        self.pending = 0
        self.acked = -1                      # the highest acknowledged seq
        self._waiting_since: float | None = None  # entries pending, no acknowledgement since
        self._down_since: float | None = None     # librdkafka: all brokers down
        try:
            self._producer.init_transactions(timeout_s)
        except confluent_kafka.KafkaException as exc:
            raise JournalError(f"{topic}: cannot open the journal for writing as {self.id!r}: "
                               f"{exc.args[0].str()}") from None

    def send(self, seq: int, value: bytes) -> None:
        self._check()
        if self._txn_since is None:
            self._call(self._producer.begin_transaction)
            self._txn_since = time.monotonic()
        if self.pending == 0:
            self._waiting_since = time.monotonic()
        self.pending += 1
        try:
            self._producer.produce(self.topic, value, str(seq).encode(), partition=_PARTITION,
                                   on_delivery=lambda err, msg: self._delivered(seq, err, msg))
        except self._kafka.KafkaException as exc:
            self.pending -= 1
            self._refused(exc)
        self._poll()  # serve delivery reports that are in
        self._check()
        if time.monotonic() - self._txn_since >= self.commit_every_s:
            self.sync()

    def _delivered(self, seq: int, err: Any, msg: Any) -> None:
        """librdkafka's delivery report. Only stored here: the binding may call it with a
        Python exception pending (after a fatal error), when even ``err.code()`` fails; it
        is read by :meth:`_check`, outside the callback."""
        self.pending -= 1
        self._reports.append((seq, err, msg))

    def _error(self, err: Any) -> None:
        """librdkafka's error callback (stored, like a delivery report): a fatal error (being
        fenced is one) ends the writer; the others are transient and retried by librdkafka."""
        self._reports.append((None, err, None))

    def _fail(self, err: Any, seq: int | None = None) -> None:
        fenced = err.code() in (self._kafka.KafkaError._FENCED,
                                self._kafka.KafkaError.PRODUCER_FENCED,
                                self._kafka.KafkaError.INVALID_PRODUCER_EPOCH)
        self._fenced = self._fenced or fenced
        k = self._kafka.KafkaError
        self._vague = self._vague or err.code() in (k._FATAL, k._STATE, k._PURGE_QUEUE,
                                                    k._PURGE_INFLIGHT)
        if self._failed is None:
            where = "" if seq is None else f"entry {seq} "
            self._failed = f"{where}not acknowledged: {err.name()}: {err.str()}"

    def _read_reports(self) -> None:
        while self._reports:
            seq, err, msg = self._reports.pop(0)
            if err is not None:
                if seq is not None or err.fatal():
                    self._fail(err, seq)
                elif err.code() == self._kafka.KafkaError._ALL_BROKERS_DOWN:
                    self._down_since = self._down_since or time.monotonic()
                continue
            assert seq is not None
            self.acked = max(self.acked, seq)
            self._down_since = None
            self._waiting_since = time.monotonic() if self.pending else None
            offset = msg.offset()
            if offset is not None and offset < seq and self._failed is None:
                # entry k can only sit at offset >= k (see the module docstring)
                self._failed = (f"entry {seq} landed at offset {offset}: the topic holds "
                                "records that are not this journal's")

    def _check(self) -> None:
        self._read_reports()
        if self._vague and not self._fenced:
            # after a fatal error librdkafka answers "fatal error", "erroneous state" or
            # "purged", and does not always tell the error callback why; a transactional call
            # raises the fatal error itself (being fenced, say). The writer is failing anyway,
            # so aborting the open transaction costs nothing.
            self._vague = False
            try:
                self._producer.abort_transaction(_WHY_S)
            except self._kafka.KafkaException as exc:
                self._fail(exc.args[0])
            self._read_reports()
        if self._fenced:
            raise JournalFenced(f"{self.topic}: another instance opened this journal as "
                                f"{self.id!r} (same learner name); this one stops and writes "
                                "nothing more")
        if self._failed is not None:
            raise JournalError(f"{self.topic}: {self._failed}; reopen the journal and recover "
                               "from what it holds")

    def _call(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except self._kafka.KafkaException as exc:
            self._refused(exc)

    def _refused(self, exc: Any) -> None:
        """The producer refused a call: record why, and raise."""
        self._fail(exc.args[0])
        self._check()

    def _poll(self) -> None:
        """Serve the callbacks that are due. After a fatal error (being fenced) the binding
        may raise it from here instead of, or as well as, reporting it: it is then recorded
        like a report, and :meth:`_check` says what it means."""
        try:
            self._producer.poll(0)
        except self._kafka.KafkaException as exc:
            self._reports.append((None, exc.args[0], None))

    def stalled_s(self) -> float:
        self._poll()
        self._read_reports()
        since = [t for t in (self._waiting_since, self._down_since) if t is not None]
        return time.monotonic() - min(since) if since else 0.0

    def probe(self, timeout_s: float) -> bool:
        try:
            self._producer.list_topics(self.topic, timeout=timeout_s)
        except self._kafka.KafkaException:
            return False
        self._down_since = None
        return True

    def flush(self, timeout_s: float) -> int:
        self._check()
        self._flush(timeout_s)
        self._check()
        return self.pending

    def sync(self) -> None:
        self._check()
        left = self._flush(self.timeout_s)
        self._check()
        if left:
            self._failed = f"{left} entries not acknowledged within {self.timeout_s:g} s"
            self._check()
        if self._txn_since is not None:
            self._call(self._producer.commit_transaction, self.timeout_s)
            self._txn_since = None

    def _flush(self, timeout_s: float) -> int:
        """librdkafka's flush (delivery reports served); the entries left unacknowledged."""
        left = self.pending
        try:
            left = self._producer.flush(timeout_s)
        except (self._kafka.KafkaException, SystemError) as exc:
            # after a fatal error (fenced) flush raises, or fails inside the binding: the
            # error callback has recorded why
            if isinstance(exc, self._kafka.KafkaException):
                self._reports.append((None, exc.args[0], None))
            self._read_reports()
            self._failed = self._failed or f"flush failed: {exc!r}"
        self._read_reports()
        return left

    def close(self) -> None:
        if self._failed is None and not self._fenced:
            with contextlib.suppress(JournalError):
                self.sync()

    def abandon(self) -> None:
        """Drop whatever is unacknowledged without waiting (the writer failed, or the broker is
        out of reach): the log decides what happened, the next writer reads it."""
        with contextlib.suppress(Exception):
            self._producer.purge()
        with contextlib.suppress(Exception):
            self._producer.flush(0)


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
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS, **journal.client_config)
        try:
            self.consumer.assign([self.tp])
            self.start = self.consumer.beginning_offsets([self.tp], timeout_ms)[self.tp]
            self.lower_end = self.consumer.end_offsets([self.tp], timeout_ms)[self.tp]
        except BaseException:
            self.consumer.close(autocommit=False, timeout_ms=2000)
            raise
        self._end: int | None = None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close(autocommit=False, timeout_ms=2000)

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

    def entries(self, offset: int, stop: int | None = None) -> Iterator[tuple[int, Entry]]:
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

    def _decode(self, record: Any) -> Entry:
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
        try:
            return entry_from_json(entry)
        except EntryError as exc:
            raise JournalError(f"{where}: {exc}") from None
