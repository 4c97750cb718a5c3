"""A service consuming several partitions: its journal alone reproduces its state.

With more than one partition, which messages form a batch depends on fetch timing, so a rerun
of the *live* service would not be bit-identical — that is exactly why each batch's offset
ranges are journaled: replaying the journal must rebuild the very same state.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from streamcl.replay import replay
from streamcl.service import TrainerService
from streamcl.stream.broker import ensure_topics
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.messages import encode_binary
from streamcl.trainer import TrainerConfig

N, PARTITIONS = 600, 3


def test_multi_partition_journal_replay_reproduces_the_state(kafka_bootstrap: str,
                                                             tmp_path: Path) -> None:
    topic, name = f"mp-{uuid.uuid4().hex[:8]}", f"svc-mp-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (N, 16), dtype=np.uint8)
    y = rng.integers(0, 4, N)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
    for i in range(N):  # round-robin over the partitions, explicitly
        value, headers = encode_binary(x[i], int(y[i]), id=str(i))
        producer.send(topic, value=value, headers=headers, partition=i % PARTITIONS)
    producer.flush()
    producer.close()

    config = TrainerConfig(input_shape=(16,), hidden=(8,), strategy="der++",
                           boundaries="drift,new-class")
    service = TrainerService(config, bootstrap=kafka_bootstrap, topic=topic, name=name,
                             group_id=name, snapshot_dir=str(tmp_path), batch_size=25,
                             max_wait_s=0.5, snapshot_every_batches=7, session_timeout_ms=6000)
    deadline = time.monotonic() + 60
    service.run(threading.Event(), until=lambda s: (s.trainer is not None and
                                                    s.trainer.position >= N)
                or time.monotonic() > deadline)
    assert service.trainer is not None and service.trainer.position == N
    live_sha = service.state_sha256()

    with Journal(kafka_bootstrap, journal_topic(name)) as journal:
        batches = [e for e in journal.read() if e.type == "batch"]
    seen = {p: set() for p in range(PARTITIONS)}
    for entry in batches:
        for p, (first, last) in entry.ranges.items():
            seen[p].update(range(first, last + 1))
    assert all(seen[p] == set(range(N // PARTITIONS)) for p in seen)  # every offset, once
    assert any(len(e.ranges) > 1 for e in batches) or len(batches) > 1

    sha, n = replay(kafka_bootstrap, name, topic)
    assert (sha, n) == (live_sha, len(batches))
    sha_snap, _ = replay(kafka_bootstrap, name, topic, snapshot_dir=str(tmp_path))
    assert sha_snap == live_sha
