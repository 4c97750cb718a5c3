"""BatchConsumer against a real broker: exactly-once in-order delivery of valid samples, poison
messages in the dead-letter topic with their original bytes, replay by offset ranges, and
batches cut by size, time, task and element type."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from streamcl.stream.consumer import BatchConsumer, MicroBatch
from streamcl.stream.messages import Decoder, encode_binary, encode_json

SHAPE = (784,)
MAX_BYTES = 4096


def _decoder() -> Decoder:
    return Decoder(SHAPE, dtypes=("uint8", "float32"), max_bytes=MAX_BYTES)


@pytest.fixture
def make_consumer(kafka_bootstrap: str, group_id: str,
                  session_timeout_ms: int) -> Iterator[Callable[..., BatchConsumer]]:
    made: list[BatchConsumer] = []

    def _make(topic: str, group: str | None = None, **kwargs: object) -> BatchConsumer:
        consumer = BatchConsumer(kafka_bootstrap, topic, group or group_id, _decoder(),
                                 session_timeout_ms=session_timeout_ms,
                                 **kwargs)  # type: ignore[arg-type]
        made.append(consumer)
        return consumer

    yield _make
    for consumer in made:
        consumer.close()


def _drain(consumer: BatchConsumer, n_records: int, max_records: int,
           timeout_s: float = 30.0, max_wait_s: float = 0.5) -> list[MicroBatch]:
    """Batches until ``n_records`` offsets (valid or not) are covered, within a deadline."""
    batches: list[MicroBatch] = []
    covered = 0
    deadline = time.monotonic() + timeout_s
    while covered < n_records:
        assert time.monotonic() < deadline, f"only {covered} of {n_records} records arrived"
        batch = consumer.poll_batch(max_records, max_wait_s)
        if batch is not None:
            batches.append(batch)
            covered += sum(last - first + 1 for first, last in batch.ranges.values())
    assert covered == n_records
    return batches


def _image(i: int) -> np.ndarray:
    return ((np.arange(784) + i) % 256).astype(np.uint8)


def _poison() -> list[tuple[bytes | None, list[tuple[str, bytes]], str]]:
    """One or more bad messages of every kind: (value, headers, expected reason code)."""
    good_value, good_headers = encode_binary(_image(0), 1)
    nan = np.zeros(784, dtype=np.float32)
    nan[3] = np.inf

    def hdr(**changes: bytes | None) -> list[tuple[str, bytes]]:
        merged = dict(good_headers)
        for key, raw in changes.items():
            if raw is None:
                merged.pop("streamcl-" + key)
            else:
                merged["streamcl-" + key] = raw
        return [("trace", b"abc"), *merged.items()]

    def js(**fields: object) -> bytes:
        return json.dumps(fields).encode()

    zeros = [0] * 784
    return [
        (b"\x00" * (MAX_BYTES + 1), [("trace", b"big")], "oversize"),
        (None, [("trace", b"tombstone")], "empty"),  # keyed: a client cannot send null/null
        (b"{not json", [], "bad_json"),
        (b"\xff\xfe garbage", [("trace", b"\x00\x01")], "bad_json"),
        (b"[1, 2, 3]", [], "bad_schema"),
        (js(y=1), [], "bad_schema"),
        (js(x=[0] * 783, y=1), [], "bad_shape"),
        (good_value[:-1], hdr(), "bad_shape"),
        (good_value, hdr(shape=b"28,27"), "bad_shape"),
        (good_value, hdr(dtype=b"complex64"), "bad_dtype"),
        (js(x=["a"] * 784, y=1), [], "bad_dtype"),
        (nan.tobytes(), hdr(dtype=b"float32"), "non_finite"),
        (b'{"x": [NaN' + b", 0" * 783 + b'], "y": 1}', [], "non_finite"),
        (js(x=zeros), [], "bad_label"),
        (js(x=zeros, y=2.5), [], "bad_label"),
        (good_value, hdr(y=b"-1"), "bad_label"),
        (good_value, hdr(y=None), "bad_label"),
        (js(x=zeros, y=1, task="t"), [], "bad_task"),
        (good_value, hdr(task=b"1.5"), "bad_task"),
        (js(x=zeros, y=1, ts="noon"), [], "bad_meta"),
        (good_value, hdr(id=b"\xff\xfe"), "bad_meta"),
    ]


def test_end_to_end_valid_once_in_order_poison_to_dlq_and_replay(
        kafka_bootstrap: str, topic: str, send: Callable, read_topic: Callable,
        make_consumer: Callable[..., BatchConsumer]) -> None:
    n_valid = 500
    poison = _poison()
    messages: list[tuple[bytes | None, list]] = []
    expected_poison: list[tuple[int, bytes | None, list, str]] = []  # message index, ...
    labels = [(i * 7) % 10 for i in range(n_valid)]
    slots = {23 * (k + 1) - 3: p for k, p in enumerate(poison)}  # spread through the stream
    for i in range(n_valid):
        if i in slots:
            value, headers, code = slots[i]
            expected_poison.append((len(messages), value, headers, code))
            messages.append((value, headers, b"key-%d" % i))
        meta = {"id": f"s{i}", "ts": 1700000000.0 + i}
        if i % 5 == 4:  # every fifth valid sample as JSON: one topic, both encodings
            messages.append((encode_json(_image(i), labels[i], **meta), []))
        else:
            messages.append(encode_binary(_image(i), labels[i], **meta))
    assert len(expected_poison) == len(poison)
    offsets = send(topic, messages)
    assert offsets == list(range(len(messages)))

    consumer = make_consumer(topic)
    batches = _drain(consumer, len(messages), max_records=64)

    # every valid sample exactly once, in order, with its label and bytes
    ids = [i for b in batches for i in b.ids]
    assert ids == [f"s{i}" for i in range(n_valid)]
    y = torch.cat([b.y for b in batches])
    assert y.tolist() == labels
    x = torch.cat([b.x for b in batches])
    assert x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(np.stack([_image(i) for i in range(n_valid)])))
    assert all(len(b) <= 64 for b in batches)
    assert all(b.task is None for b in batches)

    # ranges tile the topic without gap or overlap, rejected messages included
    spans = [b.ranges[0] for b in batches]
    assert spans[0][0] == 0 and spans[-1][1] == len(messages) - 1
    assert all(nxt[0] == prev[1] + 1 for prev, nxt in itertools.pairwise(spans))
    assert sum(b.rejected for b in batches) == len(poison)
    assert consumer.rejections == Counter(code for *_, code in poison)
    stamps = [b.timestamp_ms for b in batches]
    assert all(s is not None and s > 0 for s in stamps)

    # every poison message in the DLQ: original bytes and headers, source, reason
    dlq = read_topic(f"{topic}.dlq", len(poison))
    for record, (index, value, headers, code) in zip(dlq, expected_poison, strict=True):
        assert record.value == value
        assert record.key == messages[index][2]
        got = list(record.headers)
        assert got[:len(headers)] == list(headers)
        extra = dict(got[len(headers):])
        assert extra["streamcl-source-topic"] == topic.encode()
        assert extra["streamcl-source-partition"] == b"0"
        assert extra["streamcl-source-offset"] == str(offsets[index]).encode()
        assert extra["streamcl-reason"].decode().startswith(code + ": ")

    # replaying the recorded ranges rebuilds identical batches and sends nothing new to the DLQ
    for batch in batches:
        again = consumer.read_ranges(batch.ranges)
        assert torch.equal(again.x, batch.x) and torch.equal(again.y, batch.y)
        assert again.x.dtype == batch.x.dtype
        assert again.task is None and again.ranges == batch.ranges
        assert (again.rejected, again.ids, again.timestamp_ms) == (
            batch.rejected, batch.ids, batch.timestamp_ms)
    read_topic(f"{topic}.dlq", len(poison))  # still exactly that many
    assert consumer.rejections == Counter(code for *_, code in poison)


def test_max_wait_cuts_a_partial_batch(topic: str, send: Callable,
                                       make_consumer: Callable[..., BatchConsumer]) -> None:
    send(topic, [encode_binary(_image(i), i) for i in range(5)])
    consumer = make_consumer(topic)
    max_wait = 0.5
    deadline = time.monotonic() + 30
    batch = None
    while batch is None:
        assert time.monotonic() < deadline, "no batch arrived"
        started = time.monotonic()
        batch = consumer.poll_batch(100, max_wait)
        elapsed = time.monotonic() - started
        assert elapsed < max_wait + 2.0  # every call honours the wait bound
    assert len(batch) == 5 and batch.y.tolist() == [0, 1, 2, 3, 4]
    assert batch.ranges == {0: (0, 4)}
    assert elapsed >= max_wait - 0.05  # it waited for more before cutting the partial batch
    started = time.monotonic()
    assert consumer.poll_batch(100, 0.2) is None  # an idle topic: None after the wait
    assert time.monotonic() - started < 2.0


def test_size_cut_and_all_rejected_batch(topic: str, send: Callable, read_topic: Callable,
                                         make_consumer: Callable[..., BatchConsumer]) -> None:
    send(topic, [(b"bad", []), (b"worse", []), *(encode_binary(_image(i), i) for i in range(7))])
    consumer = make_consumer(topic)
    batches = _drain(consumer, 9, max_records=3)
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 7 and max(sizes) == 3
    first = batches[0]  # the poison leads the stream: it rides with the first batch
    assert first.rejected == 2 and first.ranges[0][0] == 0
    assert [i for b in batches for i in b.y.tolist()] == list(range(7))
    read_topic(f"{topic}.dlq", 2)


def test_batch_of_only_rejected_messages_is_returned(
        topic: str, send: Callable, make_consumer: Callable[..., BatchConsumer]) -> None:
    send(topic, [(b"bad", []), (None, [], b"tombstone-key")])
    consumer = make_consumer(topic)
    (batch,) = _drain(consumer, 2, max_records=10)
    assert len(batch) == 0 and batch.rejected == 2
    assert batch.ranges == {0: (0, 1)} and batch.next_offsets == {0: 2}
    assert batch.x.shape == (0, *SHAPE) and batch.y.shape == (0,)
    again = consumer.read_ranges(batch.ranges)
    assert len(again) == 0 and again.rejected == 2 and again.ranges == batch.ranges


def test_batches_never_straddle_a_task_or_dtype_change(
        topic: str, send: Callable, make_consumer: Callable[..., BatchConsumer]) -> None:
    tasks = [0] * 6 + [1] * 4 + [0] * 3
    messages = [encode_binary(_image(i), i, task=t) for i, t in enumerate(tasks)]
    messages.insert(7, (b"poison", []))
    floats = [encode_binary(np.full(784, 0.5, np.float32), 99, task=0) for _ in range(2)]
    messages += [*floats, encode_binary(_image(0), 100, task=0)]
    send(topic, messages)
    consumer = make_consumer(topic, cut_at_task_change=True)
    batches = _drain(consumer, len(messages), max_records=64)
    runs = [(b.x.dtype, b.task.unique().tolist()) for b in batches if len(b)]
    assert runs == [(torch.uint8, [0]), (torch.uint8, [1]), (torch.uint8, [0]),
                    (torch.float32, [0]), (torch.uint8, [0])]
    assert [len(b) for b in batches if len(b)] == [6, 4, 3, 2, 1]
    assert sum(b.rejected for b in batches) == 1
    for batch in batches:
        again = consumer.read_ranges(batch.ranges)
        assert torch.equal(again.x, batch.x) and torch.equal(again.task, batch.task)


def test_commit_resumes_the_group_after_the_committed_offsets(
        topic: str, group_id: str, send: Callable,
        make_consumer: Callable[..., BatchConsumer]) -> None:
    send(topic, [encode_binary(_image(i), i) for i in range(10)])
    first = make_consumer(topic)
    batches = _drain(first, 10, max_records=4)
    first.commit(batches[0].next_offsets)  # only the first batch was handled
    first.close()
    second = make_consumer(topic, group=group_id)
    rest = _drain(second, 10 - batches[0].next_offsets[0], max_records=100)
    assert [v for b in rest for v in b.y.tolist()] == list(range(batches[0].next_offsets[0], 10))


def test_seek_continues_after_a_replayed_journal(
        topic: str, send: Callable, make_consumer: Callable[..., BatchConsumer]) -> None:
    send(topic, [encode_binary(_image(i), i) for i in range(8)])
    consumer = make_consumer(topic)
    consumer.seek({0: 5})  # offsets 0..4 were journaled and replayed already
    (batch,) = _drain(consumer, 3, max_records=100, max_wait_s=1.0)
    assert batch.y.tolist() == [5, 6, 7] and batch.ranges == {0: (5, 7)}


def test_read_ranges_times_out_on_offsets_not_yet_written(
        topic: str, send: Callable, make_consumer: Callable[..., BatchConsumer]) -> None:
    send(topic, [encode_binary(_image(0), 0)])
    consumer = make_consumer(topic)
    with pytest.raises(TimeoutError):
        consumer.read_ranges({0: (0, 5)}, timeout_s=1.0)


def test_several_partitions_replay_in_partition_order(
        kafka_bootstrap: str, make_consumer: Callable[..., BatchConsumer]) -> None:
    from kafka import KafkaProducer

    from streamcl.stream.broker import ensure_topics

    topic = f"streamcl-test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, [topic], partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(30):
        value, headers = encode_binary(_image(i), i) if i % 7 else (b"poison", [])
        producer.send(topic, value=value, headers=headers, partition=i % 3)
    producer.flush()
    producer.close()
    consumer = make_consumer(topic)
    batches = _drain(consumer, 30, max_records=8)
    got = sorted(v for b in batches for v in b.y.tolist())
    assert got == [i for i in range(30) if i % 7]
    per_partition: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for batch in batches:
        labels = batch.y.tolist()
        assert labels == sorted(labels, key=lambda v: v % 3)  # grouped by partition
        for v in labels:
            per_partition[v % 3].append(v)
        again = consumer.read_ranges(batch.ranges)
        assert torch.equal(again.x, batch.x) and torch.equal(again.y, batch.y)
        assert again.ranges == batch.ranges and again.rejected == batch.rejected
    assert all(vs == sorted(vs) for vs in per_partition.values())  # in order per partition
