"""The dead-letter topic: where a message the learner cannot use goes, with the reason attached.

A rejected message is copied to the dead-letter topic (``<topic>.dlq`` by default) with its
original value, key and headers, plus headers naming why it was rejected and where it came from
(:data:`H_REASON`, :data:`H_SOURCE_TOPIC`, :data:`H_SOURCE_PARTITION`,
:data:`H_SOURCE_OFFSET`), so an operator can see, fix and re-send it; the source coordinates
also let the original be found in the source topic while retention keeps it.
Two things a broker refuses are handled without losing the reason: a null value with a null
key becomes an empty value, and a value too large for the topic is dropped, each time with an
:data:`H_NOTE` saying so. Any other failure is a :class:`DeadLetterError`: a message silently
missing from the dead-letter topic would be lost, since its offset is committed with the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from streamcl.stream.broker import ensure_topics
from streamcl.stream.messages import Rejection

H_REASON = "streamcl-reason"
H_SOURCE_TOPIC = "streamcl-source-topic"
H_SOURCE_PARTITION = "streamcl-source-partition"
H_SOURCE_OFFSET = "streamcl-source-offset"
H_NOTE = "streamcl-note"
#: headers this writer sets: a message's own copies are dropped (a re-sent dead letter gets
#: its new reason and coordinates, not two of each)
DLQ_HEADERS = frozenset({H_REASON, H_SOURCE_TOPIC, H_SOURCE_PARTITION, H_SOURCE_OFFSET, H_NOTE})

#: how long one dead letter may take to be acknowledged
SEND_TIMEOUT_S = 30


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic of input ``topic``.

    >>> dead_letter_topic("samples")
    'samples.dlq'
    """
    return f"{topic}.dlq"


class DeadLetterError(RuntimeError):
    """A rejected message could not be written to the dead-letter topic (nothing committed)."""


class DeadLetterWriter:
    """Writes rejected records to the dead-letter topic ``topic`` and waits until each is
    acknowledged by all in-sync replicas.

    The producer (and the topic, where this client may create topics) is made on the first
    :meth:`write`, so a stream without bad messages never opens a second connection.
    ``client_config`` holds security settings (:func:`~streamcl.stream.broker.kafka_config`).
    """

    def __init__(self, bootstrap: str, topic: str, *,
                 client_config: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_config = dict(client_config or {})
        self._producer: KafkaProducer | None = None

    def write(self, rejected: Sequence[tuple[Any, Rejection]]) -> None:
        """Dead-letter these ``(ConsumerRecord, Rejection)`` pairs, in order; return once all
        are acknowledged, or raise :class:`DeadLetterError` naming the first that is not."""
        producer = self._open()
        sent = []
        for record, rejection in rejected:
            headers = dead_letter_headers(record, rejection)
            value = record.value
            if value is None and record.key is None:  # a client cannot send null/null
                value = b""
                headers.append((H_NOTE, b"original value and key were null"))
            sent.append((record, headers, self._send(producer, value, record.key, headers)))
        producer.flush()
        for record, headers, future in sent:
            try:
                try:
                    future.get(timeout=SEND_TIMEOUT_S)
                except (MessageSizeTooLargeError, RecordListTooLargeError):
                    # keep reason and coordinates; the bytes stay readable in the source topic
                    note = f"value dropped: {len(record.value)} bytes too large for the DLQ"
                    self._send(producer, b"", record.key,
                               [*headers, (H_NOTE, note.encode())]).get(timeout=SEND_TIMEOUT_S)
            except KafkaError as exc:
                raise DeadLetterError(f"dead letter for {record.topic}[{record.partition}]@"
                                      f"{record.offset} not written: {exc}") from exc

    def close(self) -> None:
        """Flush and close the producer (a later :meth:`write` opens a new one)."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.close()

    def __enter__(self) -> DeadLetterWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, producer: KafkaProducer, value: bytes | None, key: bytes | None,
              headers: list[tuple[str, bytes]]) -> Any:
        try:
            return producer.send(self.topic, value=value, key=key, headers=headers)
        except (MessageSizeTooLargeError, RecordListTooLargeError) as exc:
            return _Failed(exc)

    def _open(self) -> KafkaProducer:
        if self._producer is None:
            # without the right to create topics here, the DLQ topic may be provisioned already
            with contextlib.suppress(KafkaError):
                ensure_topics(self.bootstrap, [self.topic], client_config=self.client_config)
            self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                           linger_ms=5, max_request_size=64 << 20,
                                           **self.client_config)
        return self._producer


def dead_letter_headers(record: Any, rejection: Rejection) -> list[tuple[str, bytes]]:
    """The headers of ``record``'s dead letter: its own (less any of ours), then the reason
    and the source coordinates.

    >>> from types import SimpleNamespace
    >>> record = SimpleNamespace(topic="t", partition=0, offset=7,
    ...                          headers=[("trace", b"1"), (H_REASON, b"old")])
    >>> rejection = Rejection("empty: message has no value")
    >>> dead_letter_headers(record, rejection)  # doctest: +NORMALIZE_WHITESPACE
    [('trace', b'1'), ('streamcl-reason', b'empty: message has no value'),
     ('streamcl-source-topic', b't'), ('streamcl-source-partition', b'0'),
     ('streamcl-source-offset', b'7')]
    """
    headers = [(k, v) for k, v in (record.headers or ()) if k not in DLQ_HEADERS]
    headers += [(H_REASON, rejection.reason.encode()),
                (H_SOURCE_TOPIC, record.topic.encode()),
                (H_SOURCE_PARTITION, b"%d" % record.partition),
                (H_SOURCE_OFFSET, b"%d" % record.offset)]
    return headers


class _Failed:
    """A send that failed before it left (kafka-python raised instead of returning a future)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get(self, timeout: float | None = None) -> None:
        raise self.exc
