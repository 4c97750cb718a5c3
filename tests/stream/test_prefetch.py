"""PrefetchingConsumer against a real broker: the same batches as an in-process BatchConsumer,
dead letters and rejection counts, seeks that drop stale prefetched batches, commits that reach
the group, a child that exits when its parent is killed and never imports torch; and the frame
that carries a batch from the child, giving back the same tensors."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch

from streamcl.stream.consumer import ArrayBatch, MicroBatch
from streamcl.stream.messages import Decoder, encode_binary
from streamcl.stream.prefetch import (
    PrefetchingConsumer,
    _batch_frame,
    _batch_from_frame,
    _parse_frame,
    _write_frame,
)

SHAPE = (16,)


def _messages(n: int, poison_every: int = 0) -> list[tuple[bytes, list]]:
    out = []
    for i in range(n):
        if poison_every and i % poison_every == poison_every - 1:
            out.append((b"not a tensor", [("streamcl-dtype", b"uint8")]))
            continue
        value, headers = encode_binary(np.full(SHAPE, i % 256, dtype=np.uint8), i % 7)
        out.append((value, headers))
    return out


def _drain(consumer: PrefetchingConsumer, n_offsets: int, timeout_s: float = 30.0
           ) -> list[MicroBatch]:
    batches, covered = [], 0
    deadline = time.monotonic() + timeout_s
    while covered < n_offsets:
        assert time.monotonic() < deadline, f"only {covered} of {n_offsets} offsets arrived"
        batch = consumer.poll_batch(8, 0.5)
        if batch is not None:
            batches.append(batch)
            covered += sum(last - first + 1 for first, last in batch.ranges.values())
    return batches


def test_prefetched_batches_match_the_stream(kafka_bootstrap: str, topic: str, group_id: str,
                                             send: Callable, read_topic: Callable,
                                             session_timeout_ms: int) -> None:
    send(topic, _messages(100, poison_every=10))
    decoder = Decoder(SHAPE, dtypes=("uint8",))
    with PrefetchingConsumer(kafka_bootstrap, topic, group_id, decoder, batch_size=8,
                             max_wait_s=0.5, session_timeout_ms=session_timeout_ms) as consumer:
        batches = _drain(consumer, 100)
        # every offset once, in order; poison counted and dead-lettered
        offsets = [o for b in batches for o in range(b.ranges[0][0], b.ranges[0][1] + 1)]
        assert offsets == list(range(100))
        valid = [i for i in range(100) if i % 10 != 9]
        assert [int(v) for b in batches for v in b.y] == [i % 7 for i in valid]
        assert [int(b.x[j, 0]) for b in batches for j in range(len(b))] == valid
        assert all(len(b) <= 8 for b in batches)
        assert sum(b.rejected for b in batches) == 10
        assert consumer.rejections == Counter({"bad_shape": 10})
        assert set(consumer.lag()) == {0}
        # replay by ranges (in the parent) gives the same batch back
        again = consumer.read_ranges(batches[3].ranges)
        assert again.ranges == batches[3].ranges and again.y.tolist() == batches[3].y.tolist()
        # a seek drops whatever was prefetched and continues at the offset asked for
        consumer.seek({0: 40})
        send(topic, _messages(4))
        after = _drain(consumer, 64)
        assert after[0].ranges[0][0] == 40
        consumer.commit({0: 60})
    # each poison message dead-lettered when read: offsets 49..99 were read twice (the seek)
    dead = read_topic(f"{topic}.dlq", 16)
    sources = Counter(int(dict(r.headers)["streamcl-source-offset"]) for r in dead)
    assert sources == Counter({i: 1 + (i >= 40) for i in range(9, 100, 10)})
    # the commit reached the group: a new member of it starts at offset 60
    with PrefetchingConsumer(kafka_bootstrap, topic, group_id, decoder, batch_size=8,
                             max_wait_s=0.5, session_timeout_ms=session_timeout_ms) as again:
        assert _drain(again, 1)[0].ranges[0][0] == 60


def test_child_exits_when_the_parent_is_killed(kafka_bootstrap: str, topic: str,
                                               group_id: str) -> None:
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from streamcl.stream.messages import Decoder
        from streamcl.stream.prefetch import PrefetchingConsumer
        c = PrefetchingConsumer({kafka_bootstrap!r}, {topic!r}, {group_id!r},
                                Decoder((16,)), batch_size=8, max_wait_s=0.2)
        print(c._proc.pid, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while _alive(child):
            assert time.monotonic() < deadline, "the consumer process outlived its parent"
            time.sleep(0.05)  # polling interval for the process table
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_consumer_process_never_imports_torch(kafka_bootstrap: str, topic: str, group_id: str,
                                              send: Callable, session_timeout_ms: int) -> None:
    """The child only decodes and copies bytes; torch would cost it about a second at start.
    Checked in the real child after it has served live batches and replay reads, by what it
    has mapped into memory (an imported torch maps its libraries), and the tensors it sent
    against the same ranges assembled in this process."""
    messages = [encode_binary(np.full(SHAPE, i, dtype=np.uint8), i % 7, task=i // 10)
                for i in range(30)]
    messages[12] = (b"not a tensor", [("streamcl-dtype", b"uint8")])
    send(topic, messages)
    decoder = Decoder(SHAPE, dtypes=("uint8",))
    with PrefetchingConsumer(kafka_bootstrap, topic, group_id, decoder, batch_size=8,
                             max_wait_s=0.2, session_timeout_ms=session_timeout_ms,
                             hold_until_seek=True) as consumer:
        assert consumer.seek_to_beginning() == {0: 0}
        batches = _drain(consumer, 30)
        replayed = list(consumer.read_many([b.ranges for b in batches]))
        with open(f"/proc/{consumer._proc.pid}/maps") as f:
            mapped = {line.split()[-1] for line in f if "/" in line}
        for batch, again in zip(batches, replayed, strict=True):
            here = consumer.read_ranges(batch.ranges)  # assembled in this process
            for got in (batch, again):
                assert got.x.dtype == torch.uint8 and got.y.dtype == torch.long
                assert got.task is not None and got.task.dtype == torch.long
                assert torch.equal(got.x, here.x) and torch.equal(got.y, here.y)
                assert torch.equal(got.task, here.task)
                assert (got.ranges, got.rejected, got.ids, got.timestamp_ms) == (
                    here.ranges, here.rejected, here.ids, here.timestamp_ms)
    assert mapped, "no file mappings read"
    assert not [path for path in mapped if "/torch/" in path]


def _arrays(kind: str) -> ArrayBatch:
    if kind == "empty":  # every message rejected
        return ArrayBatch(np.empty((0, 3, 2), np.float32), np.empty(0, np.int64), None,
                          {0: (5, 7)}, 3, None, [])
    if kind == "tasks":
        return ArrayBatch(np.arange(30, dtype=np.uint8).reshape(5, 3, 2),
                          np.array([0, 1, 2**40, 3, 4]), np.array([-1, 0, 0, 2, 2]),
                          {0: (0, 3), 2: (9, 9)}, 0, 1700000000000,
                          ["a", None, "c", "d", "e"])
    return ArrayBatch(np.linspace(-1, 1, 18).reshape(3, 3, 2), np.array([9, 8, 7]), None,
                      {1: (4, 6)}, 0, 12, [None, None, None])


@pytest.mark.parametrize("kind", ["tasks", "float64", "empty"])
def test_a_frame_gives_back_the_same_tensors(kind: str) -> None:
    sent = _arrays(kind)
    header, arrays = _batch_frame(sent, "batch")
    out = io.BytesIO()
    _write_frame(out, {"type": "ready"})
    _write_frame(out, header, arrays)
    wire = out.getvalue()
    buf = bytearray(wire[:-1])
    assert _parse_frame(buf)[0] == {"type": "ready"}  # type: ignore[index]
    assert _parse_frame(buf) is None  # one byte short: not yet
    buf += wire[-1:]
    frame = _parse_frame(buf)
    assert frame is not None and not buf
    got, want = _batch_from_frame(*frame).to_torch(), sent.to_torch()
    for name in ("x", "y", "task"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert (got.ranges, got.rejected, got.timestamp_ms, got.ids) == (
        want.ranges, want.rejected, want.timestamp_ms, want.ids)
    if len(got):  # the tensors are views of the frame's payload, not copies
        frame[1][-1] ^= 0xFF
        assert not torch.equal(got.x, want.x)
