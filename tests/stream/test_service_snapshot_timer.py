"""Snapshots also follow the clock: ``snapshot_every_s`` bounds the journal left to replay
even when batches are few (or the stream goes quiet)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np

from streamcl.data import Stream
from streamcl.service import TrainerService
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.trainer import TrainerConfig


def test_time_triggered_snapshots(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    data = Stream(rng.integers(0, 256, (120, 8), dtype=np.uint8),
                  rng.integers(0, 3, 120).astype(np.int64))
    produce_stream(data, kafka_bootstrap, topic)
    name = f"svc-timer-{uuid.uuid4().hex[:8]}"
    service = TrainerService(TrainerConfig(input_shape=(8,), hidden=(4,), strategy="naive"),
                             bootstrap=kafka_bootstrap, topic=topic, name=name, group_id=name,
                             snapshot_dir=str(tmp_path), batch_size=10, max_wait_s=0.5,
                             snapshot_every_batches=10**6, snapshot_every_s=1e-6,
                             session_timeout_ms=6000)
    deadline = time.monotonic() + 60
    service.run(threading.Event(), until=lambda s: (s.trainer is not None
                                                    and s.trainer.position >= 120)
                or time.monotonic() > deadline)
    with Journal(kafka_bootstrap, journal_topic(name)) as journal:
        entries = [e for e in journal.read() if e.type in ("batch", "snapshot")]
    kinds = [e.type for e in entries]
    assert kinds.count("batch") == 12
    # the batch counter never fires (10**6), so every snapshot here came from the clock:
    # one after each batch
    assert kinds == ["batch", "snapshot"] * 12, kinds
