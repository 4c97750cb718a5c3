"""The label cap against a real broker: a label past ``learner.max_classes`` is dead-lettered
with reason ``label_cap`` and never trained, and a replay of the journal refuses the same.

Why its own module (not test_service.py): it needs its own small stream with more labels than
the cap, and a cap small enough to reach in a few batches.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamcl.replay import replay
from streamcl.service import TrainerService
from streamcl.stream.dead_letter import H_REASON, H_SOURCE_OFFSET, H_SOURCE_TOPIC
from streamcl.stream.messages import encode_binary
from streamcl.trainer import TrainerConfig

CAP = 3
CONFIG = TrainerConfig(input_shape=(4,), hidden=(8,), strategy="naive", boundaries="new-class",
                       lr=0.1, seed=1, max_classes=CAP)
#: labels in stream order: 0, 1, 2 fill the head; 7 and 8 come after, 1 and 2 again between
LABELS = [0, 1, 0, 2, 7, 1, 8, 2, 7, 0, 1, 2]


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "in-process"])
def test_labels_past_max_classes_go_to_the_dlq_and_are_never_trained(
        kafka_bootstrap: str, topic: str, send: Callable[..., list[int]],
        read_topic: Callable[..., list[Any]], tmp_path: Path, prefetch: bool) -> None:
    rng = np.random.default_rng(0)
    messages = []
    for i, y in enumerate(LABELS):
        value, headers = encode_binary(rng.random(4, dtype=np.float32), y, id=f"s{i}")
        messages.append((value, headers))
    send(topic, messages)
    name = f"cap-{uuid.uuid4().hex[:10]}"
    service = TrainerService(CONFIG, bootstrap=kafka_bootstrap, topic=topic,
                             group_id=f"g-{name}", name=name, snapshot_dir=str(tmp_path),
                             batch_size=4, max_wait_s=5.0, prefetch=prefetch)
    deadline = time.monotonic() + 60
    summary = service.run(threading.Event(),
                          until=lambda s: s.offsets.get(0, 0) >= len(LABELS)
                          or time.monotonic() > deadline)
    assert service.offsets.get(0, 0) == len(LABELS), service.offsets

    refused = [i for i, y in enumerate(LABELS) if y in (7, 8)]
    assert service.trainer.labels == [0, 1, 2]
    assert service.trainer.model.n_classes == CAP  # head rows == cap: 7 and 8 never trained
    assert service.trainer.position == len(LABELS) - len(refused)
    assert summary["rejected"] == len(refused)
    assert service.metrics.value("streamcl_samples_rejected_total",
                                 {"reason": "label_cap"}) == len(refused)

    letters = read_topic(f"{topic}.dlq", len(refused))
    for record, index in zip(letters, refused, strict=True):
        headers = dict(record.headers)
        reason = headers[H_REASON].decode()
        assert reason.startswith(f"label_cap: label {LABELS[index]} ")
        assert f"max_classes={CAP}" in reason and "raise learner.max_classes" in reason
        assert headers[H_SOURCE_TOPIC] == topic.encode() and headers[H_SOURCE_OFFSET] == b"-1"
        body = json.loads(record.value)
        assert body["label"] == LABELS[index] and body["id"] == f"s{index}"
        assert body["reason"] == reason and body["ranges"]["0"][0] <= index

    # the journal alone rebuilds the same state: the replay refuses the same samples
    sha, batches = replay(kafka_bootstrap, name, topic)
    assert sha == service.state_sha256() and batches == service.batches
