"""DeadLetterWriter against a real broker: records copied with their bytes, key and headers, the
reason and the source coordinates added (a record's stale copies of those replaced), in order;
a null value with a null key still written, with a note."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from streamcl.stream.dead_letter import H_NOTE, DeadLetterWriter
from streamcl.stream.messages import Rejection


def test_records_go_to_the_topic_with_reason_and_source(
        kafka_bootstrap: str, topic: str, send: Callable, read_topic: Callable) -> None:
    sent = [(b"{bad json", [("trace", b"1")], b"k0"),
            (b"\x00" * 10, [("streamcl-reason", b"old"), ("streamcl-source-offset", b"99"),
                            ("trace", b"2")], b"k1"),
            (None, [], b"tombstone")]
    offsets = send(topic, sent)
    records = read_topic(topic, len(sent))
    reasons = ["bad_json: not JSON", "bad_shape: 10 bytes", "empty: message has no value"]
    dlq = f"{topic}.dead"
    with DeadLetterWriter(kafka_bootstrap, dlq) as writer:
        writer.write([(r, Rejection(why)) for r, why in zip(records, reasons, strict=True)])
    dead = read_topic(dlq, len(sent))
    for (value, headers, key), offset, why, got in zip(sent, offsets, reasons, dead, strict=True):
        assert (got.value, got.key) == (value, key)
        own = [(k, v) for k, v in headers if not k.startswith("streamcl-")]
        assert list(got.headers) == [*own, ("streamcl-reason", why.encode()),
                                     ("streamcl-source-topic", topic.encode()),
                                     ("streamcl-source-partition", b"0"),
                                     ("streamcl-source-offset", str(offset).encode())]


def test_a_null_value_with_a_null_key_is_written_empty_with_a_note(
        kafka_bootstrap: str, topic: str, read_topic: Callable) -> None:
    # a producer cannot send null/null, so this record is made here: what a client that reads
    # a compacted or foreign log might hand over
    record = SimpleNamespace(topic="source", partition=3, offset=41, key=None, value=None,
                             headers=None)
    with DeadLetterWriter(kafka_bootstrap, topic) as writer:
        writer.write([(record, Rejection("empty: message has no value"))])
    (got,) = read_topic(topic, 1)
    assert (got.value, got.key) == (b"", None)
    assert dict(got.headers)[H_NOTE] == b"original value and key were null"
    assert dict(got.headers)["streamcl-source-offset"] == b"41"
