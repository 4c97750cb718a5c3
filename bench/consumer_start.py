"""Benchmark: how long a prefetching consumer takes from spawn to its first batch, and why.

On an embedded tansu broker (or ``--bootstrap``), a one-partition topic holds ``--messages``
784-byte uint8 samples before anything is measured. Each figure is the best of ``--repeat``
runs, each run in a fresh consumer group (a restarted service joins a group too):

* ``spawn -> first batch``: ``PrefetchingConsumer(...)`` constructed until ``poll_batch``
  returns a batch, as the service would see it if it had nothing to replay;
* ``hold + seek`` / ``hold + seek_to_beginning``: the service's path, constructed with
  ``hold_until_seek=True`` and then sought at once (its recovery took no time);

and the parts, measured apart (the consumer assigns its partitions and joins no group, so
``connect``/``group join``/``first fetch`` show what a subscribing consumer would cost instead):

* ``interpreter``: ``python -c pass``;
* ``child imports``: a fresh interpreter importing ``streamcl.stream.prefetch`` (what the child
  imports before it can do anything);
* ``connect``: a group ``KafkaConsumer`` constructed and subscribed, in this process (bootstrap
  connection and API version probe);
* ``group join``: its polls until it has an assignment (tansu answers a group's first JoinGroup
  only after about half the session timeout; real Kafka waits
  ``group.initial.rebalance.delay.ms``, 3 s by default, for a new group);
* ``first fetch``: from the assignment to the first records;
* ``no group``: a group-less consumer (``assign``) constructed until its first records: what
  start would cost without the join.

    python bench/consumer_start.py [--messages 1000] [--repeat 5] [--session-timeout-ms 10000]
                                   [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import numpy as np

from streamcl.stream.broker import EmbeddedBroker, ensure_topics
from streamcl.stream.messages import Decoder, encode_binary
from streamcl.stream.prefetch import PrefetchingConsumer

SHAPE = (784,)
BATCH = 32


def best(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def fill(bootstrap: str, topic: str, n: int) -> None:
    from kafka import KafkaProducer

    ensure_topics(bootstrap, [topic])
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in range(n):
        value, headers = encode_binary(np.full(SHAPE, i % 256, dtype=np.uint8), i % 10)
        producer.send(topic, value=value, headers=headers)
    producer.flush()
    producer.close()


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - t0


def prefetching(bootstrap: str, topic: str, session_ms: int, how: str) -> float:
    """Spawn a PrefetchingConsumer (``how``: ``live``, ``seek`` or ``beginning``) and return
    the seconds until its first batch."""
    t0 = time.perf_counter()
    consumer = PrefetchingConsumer(bootstrap, topic, f"start-{uuid.uuid4().hex[:8]}",
                                   Decoder(SHAPE, dtypes=("uint8",)), batch_size=BATCH,
                                   max_wait_s=0.1, session_timeout_ms=session_ms,
                                   hold_until_seek=how != "live")
    try:
        if how == "seek":
            consumer.seek({0: 0})
        elif how == "beginning":
            consumer.seek_to_beginning()
        while consumer.poll_batch(BATCH, 30.0) is None:
            pass
        return time.perf_counter() - t0
    finally:
        consumer.close()


def parts(bootstrap: str, topic: str, session_ms: int) -> dict[str, float]:
    """Connect, group join and first fetch of a group consumer, in this process."""
    from kafka import KafkaConsumer

    t0 = time.perf_counter()
    kc = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"parts-{uuid.uuid4().hex[:8]}",
                       enable_auto_commit=False, auto_offset_reset="earliest",
                       session_timeout_ms=session_ms,
                       heartbeat_interval_ms=min(3000, session_ms // 3))
    kc.subscribe([topic])
    t1 = time.perf_counter()
    got = {}
    while not kc.assignment():
        got = kc.poll(timeout_ms=10)
    t2 = time.perf_counter()
    while not got:
        got = kc.poll(timeout_ms=10)
    t3 = time.perf_counter()
    kc.close(autocommit=False)
    return {"connect": t1 - t0, "group join": t2 - t1, "first fetch": t3 - t2}


def groupless(bootstrap: str, topic: str) -> float:
    from kafka import KafkaConsumer, TopicPartition

    t0 = time.perf_counter()
    kc = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    kc.assign([tp])
    kc.seek(tp, 0)
    while not kc.poll(timeout_ms=10):
        pass
    elapsed = time.perf_counter() - t0
    kc.close(autocommit=False)
    return elapsed


def run(bootstrap: str, args: argparse.Namespace) -> None:
    topic = f"start-{uuid.uuid4().hex[:8]}"
    fill(bootstrap, topic, args.messages)
    n, ms = args.repeat, args.session_timeout_ms
    rows = [
        ("interpreter", best(n, lambda: wall([sys.executable, "-c", "pass"]))),
        ("child imports", best(n, lambda: wall([sys.executable, "-c",
                                                "import streamcl.stream.prefetch"]))),
    ]
    split = [parts(bootstrap, topic, ms) for _ in range(n)]
    rows += [(k, min(s[k] for s in split)) for k in split[0]]
    rows.append(("no group (connect+fetch)", best(n, lambda: groupless(bootstrap, topic))))
    for label, how in (("spawn -> first batch", "live"), ("hold + seek", "seek"),
                       ("hold + seek_to_beginning", "beginning")):
        rows.append((label, best(n, lambda how=how: prefetching(bootstrap, topic, ms, how))))
    print(f"best of {n}, session_timeout_ms={ms}, {args.messages} messages in the topic")
    for label, seconds in rows:
        print(f"  {label:<26} {seconds:7.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--session-timeout-ms", type=int, default=10_000)
    parser.add_argument("--bootstrap", help="a running broker (default: an embedded tansu)")
    args = parser.parse_args()
    if args.bootstrap:
        run(args.bootstrap, args)
    else:
        with EmbeddedBroker() as broker:
            run(broker.bootstrap, args)


if __name__ == "__main__":
    main()
