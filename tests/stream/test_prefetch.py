"""PrefetchingConsumer against a real broker: the same batches as an in-process BatchConsumer,
dead letters and rejection counts, seeks that drop stale prefetched batches, commits that reach
the group, and a child that exits when its parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from streamcl.stream.consumer import MicroBatch
from streamcl.stream.messages import Decoder, encode_binary
from streamcl.stream.prefetch import PrefetchingConsumer

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
