"""The trainer service against a real broker: end to end, kill -9 recovery, SIGTERM drain.

One module-scoped input topic holds 3 poison messages, 1,000 split-digits samples (4 tasks),
2 more poison messages and a sentinel sample of another task; every test uses its own learner
name, consumer group and snapshot directory over it. Batch cuts are deterministic: the data is
all there before a service starts, ``max_wait_s`` is far longer than any fetch (or group join),
so a batch ends only when it is full or at a task change (the sentinel cuts the last one); runs
with and without crashes therefore see the same batches and must end in bit-identical states.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamcl.data import Stream, digits, split_stream
from streamcl.learner import SNAPSHOT_EXTRAS
from streamcl.replay import replay
from streamcl.service import TrainerService
from streamcl.state import state_sha256
from streamcl.stream.broker import ensure_topics
from streamcl.stream.entries import Batch, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.stream.snapshots import SnapshotStore
from streamcl.trainer import OnlineTrainer, TrainerConfig

N_VALID = 1000
HEAD_POISON = 3
N_TOTAL = HEAD_POISON + N_VALID + 2  # the sentinel's offset: the services stop before it
BATCH, MAX_WAIT, EVERY, SESSION_MS = 16, 30.0, 5, 6000
CONFIG = TrainerConfig(input_shape=(64,), hidden=(16,), boundaries="task", lr=0.1, seed=3)
WORKER = Path(__file__).with_name("service_worker.py")


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def data(kafka_bootstrap: str) -> tuple[str, Stream]:
    from kafka import KafkaProducer

    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=0)
    stream = Stream(s.x[:N_VALID], s.y[:N_VALID], s.task[:N_VALID])
    assert len(np.unique(stream.task)) >= 3
    topic = _uid("svc-in")
    ensure_topics(kafka_bootstrap, [topic])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")

    def poison(values: list[tuple[bytes | None, bytes | None]]) -> None:
        for value, key in values:
            producer.send(topic, value=value, key=key).get(timeout=30)

    poison([(b"junk", None), (None, b"null-value"), (b'{"x": [1, 2], "y": 0}', None)])
    assert produce_stream(stream, kafka_bootstrap, topic) == N_VALID
    poison([(b"\x00" * 256, None), (b"more junk", None)])
    producer.close()
    # a sentinel sample of another task: it cuts the last real batch at once (no max_wait_s
    # timing in any cut) and is never consumed itself
    sentinel = Stream(stream.x[:1], stream.y[:1], np.array([99]))
    assert produce_stream(sentinel, kafka_bootstrap, topic) == 1
    return topic, stream


def _service(bootstrap: str, topic: str, name: str, snapdir: Path) -> TrainerService:
    return TrainerService(CONFIG, bootstrap=bootstrap, topic=topic, group_id=_uid("g"),
                          name=name, snapshot_dir=str(snapdir), batch_size=BATCH,
                          max_wait_s=MAX_WAIT, snapshot_every_batches=EVERY,
                          session_timeout_ms=SESSION_MS)


def _drained(service: TrainerService) -> bool:
    return service.offsets.get(0, 0) >= N_TOTAL


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Every live run here (in-process and worker processes) at one torch thread, a count any
    machine has; the journal records it, and replays train at it whatever their own count
    (test_replay_at_another_thread_count_is_bit_exact)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, data: tuple[str, Stream],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted in-process run over the whole topic."""
    topic, _ = data
    name, snapdir = _uid("svc-live"), tmp_path_factory.mktemp("live")
    service = _service(kafka_bootstrap, topic, name, snapdir)
    deadline = time.monotonic() + 60
    stop = threading.Event()
    summary = service.run(stop, until=lambda s: _drained(s) or time.monotonic() > deadline)
    assert _drained(service), f"not drained in time: {service.offsets}"
    return {"name": name, "snapdir": snapdir, "summary": summary,
            "sha256": service.state_sha256(), "position": service.trainer.position,
            "rejections": dict(service.consumer.rejections)}


def _entries(bootstrap: str, name: str) -> list[dict[str, Any]]:
    with Journal(bootstrap, journal_topic(name), create=False) as journal:
        return list(journal.read())


def test_end_to_end_matches_in_memory_trainer(kafka_bootstrap: str, data: tuple[str, Stream],
                                              live: dict[str, Any]) -> None:
    topic, stream = data
    assert live["position"] == N_VALID
    assert live["summary"]["samples"] == N_VALID
    assert live["summary"]["rejected"] == N_TOTAL - N_VALID
    assert sum(live["rejections"].values()) == N_TOTAL - N_VALID
    entries = _entries(kafka_bootstrap, live["name"])
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert entries[0].type == "start" and entries[0].trainer_config == CONFIG.to_json()
    batches = [e for e in entries if e.type == "batch"]
    # an in-memory trainer fed the same batches (rebuilt from the stream arrays by offset)
    ref = OnlineTrainer(CONFIG)
    seen: list[int] = []
    checkpoints: dict[int, str] = {}
    next_offset = 0
    for e in batches:
        first, last = e.ranges[0]
        assert first == next_offset  # contiguous: nothing skipped, nothing twice
        next_offset = last + 1
        idx = [o - HEAD_POISON for o in range(first, last + 1)
               if HEAD_POISON <= o < HEAD_POISON + N_VALID]
        assert e.samples == len(idx) and e.samples <= BATCH
        seen += idx
        if idx:
            task = torch.from_numpy(stream.task[idx])
            assert len(set(task.tolist())) == 1  # a batch never straddles a task change
            ref.step(torch.from_numpy(stream.x[idx]), torch.from_numpy(stream.y[idx]), task)
        checkpoints[e.seq] = state_sha256(ref.state_dict())
    assert next_offset == N_TOTAL
    assert seen == list(range(N_VALID))  # every valid sample exactly once, in order
    assert len(ref.boundaries) == len(np.unique(stream.task)) - 1
    assert state_sha256(ref.state_dict()) == live["sha256"]
    # replay of the journal, from scratch and from the snapshots, gives the live state
    assert replay(kafka_bootstrap, live["name"], topic) == (live["sha256"], len(batches))
    sha, _ = replay(kafka_bootstrap, live["name"], topic, snapshot_dir=str(live["snapdir"]))
    assert sha == live["sha256"]
    mid = batches[len(batches) // 2].seq
    assert replay(kafka_bootstrap, live["name"], topic, to_seq=mid)[0] == checkpoints[mid]
    # the final snapshot covers everything, and the group offsets followed it
    info, _ = SnapshotStore(live["snapdir"]).latest_valid()
    assert info.covers_seq >= batches[-1].seq and info.offsets == {0: N_TOTAL}


def test_replay_at_another_thread_count_is_bit_exact(kafka_bootstrap: str,
                                                     data: tuple[str, Stream],
                                                     live: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The live run trained at 1 thread; a replay in a process whose default is 2 threads
    trains each stretch at the count the journal's start entries name, so it ends in the live
    SHA-256, and hands the process its own count back. The control (thread counts ignored)
    shows the counts matter for this model at all: otherwise the test would prove nothing."""
    import contextlib

    import streamcl.learner

    topic, _ = data
    starts = [e for e in _entries(kafka_bootstrap, live["name"]) if isinstance(e, Start)]
    assert starts and all(e.torch_threads == 1 for e in starts)
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_NUM_THREADS",)}
    proc = subprocess.run(
        [sys.executable, "-m", "streamcl", "replay", "--bootstrap", kafka_bootstrap,
         "--name", live["name"], "--topic", topic],
        capture_output=True, text=True, timeout=180, env={**env, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == live["sha256"]

    torch.set_num_threads(2)
    assert replay(kafka_bootstrap, live["name"], topic)[0] == live["sha256"]
    assert torch.get_num_threads() == 2

    @contextlib.contextmanager
    def ignored(threads: int | None) -> Iterator[Any]:
        yield lambda n: None

    monkeypatch.setattr(streamcl.learner, "training_threads", ignored)
    assert replay(kafka_bootstrap, live["name"], topic)[0] != live["sha256"]
    torch.set_num_threads(1)


def test_snapshot_with_other_config_is_refused(kafka_bootstrap: str, data: tuple[str, Stream],
                                               live: dict[str, Any]) -> None:
    topic, _ = data
    other = TrainerConfig(input_shape=(64,), hidden=(8,), boundaries="task", lr=0.1, seed=3)
    service = TrainerService(other, bootstrap=kafka_bootstrap, topic=topic, group_id=_uid("g"),
                             name=live["name"], snapshot_dir=str(live["snapdir"]))
    try:
        with pytest.raises(ValueError, match="different configuration"):
            service.recover()
    finally:
        service.close()


def _start(bootstrap: str, topic: str, name: str, snapdir: Path, until: bool,
           max_wait: float = MAX_WAIT, pace: float = 0.0, group: str | None = None
           ) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "--bootstrap", bootstrap, "--topic", topic,
           "--group", group or f"{name}-group", "--name", name, "--snapshot-dir", str(snapdir),
           "--config", json.dumps(CONFIG.to_json()), "--batch-size", str(BATCH),
           "--max-wait", str(max_wait), "--snapshot-every", str(EVERY),
           "--session-timeout-ms", str(SESSION_MS), "--pace", str(pace)]
    if until:
        cmd += ["--until", str(N_TOTAL)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_seq(journal: Journal, proc: subprocess.Popen, target: int,
                  timeout_s: float = 60) -> int:
    """Poll the journal's tail until its last seq reaches ``target`` (or the process ends)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = journal.last()
        seq = -1 if last is None else last.seq
        if seq >= target or proc.poll() is not None:
            return seq
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"journal stuck before seq {target}: {proc.stderr.read()}")


def _lines(out: str, tag: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(tag) + 1:]) for line in out.splitlines()
            if line.startswith(tag + " ")]


def test_kill_9_recovery_matches_uninterrupted_run(kafka_bootstrap: str,
                                                   data: tuple[str, Stream],
                                                   live: dict[str, Any], tmp_path: Path) -> None:
    topic, _ = data
    name = _uid("svc-crash")
    ensure_topics(kafka_bootstrap, [journal_topic(name)], partitions=1)
    rng = random.Random(7)
    recoveries = []
    with Journal(kafka_bootstrap, journal_topic(name), create=False) as journal:
        for _ in range(3):
            base = -1 if journal.last() is None else journal.last().seq
            proc = _start(kafka_bootstrap, topic, name, tmp_path, until=True, pace=0.02)
            _wait_for_seq(journal, proc, base + rng.randint(4, 14))
            assert proc.poll() is None, "the worker finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            recoveries += _lines(out, "RECOVERED")
        proc = _start(kafka_bootstrap, topic, name, tmp_path, until=True)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
    recoveries += _lines(out, "RECOVERED")
    (done,) = _lines(out, "DONE")
    assert done["position"] == N_VALID
    assert done["sha256"] == live["sha256"]
    # both recovery paths were exercised: from a snapshot, and by replaying journaled batches
    assert len(recoveries) == 4
    assert any(r["snapshot_seq"] is not None for r in recoveries)
    assert any(r["replayed"] > 0 for r in recoveries[1:])
    entries = _entries(kafka_bootstrap, name)
    batches = [e for e in entries if e.type == "batch"]
    assert sum(e.samples for e in batches) == N_VALID  # nothing journaled twice
    assert replay(kafka_bootstrap, name, topic)[0] == live["sha256"]


def test_sigterm_drains_and_snapshots(kafka_bootstrap: str, data: tuple[str, Stream],
                                      tmp_path: Path) -> None:
    topic, _ = data
    name = _uid("svc-term")
    ensure_topics(kafka_bootstrap, [journal_topic(name)], partitions=1)
    with Journal(kafka_bootstrap, journal_topic(name), create=False) as journal:
        proc = _start(kafka_bootstrap, topic, name, tmp_path, until=False, max_wait=0.5,
                      pace=0.02)
        _wait_for_seq(journal, proc, 8)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    (done,) = _lines(out, "DONE")
    entries = _entries(kafka_bootstrap, name)
    last_batch = [e for e in entries if e.type == "batch"][-1]
    assert entries[-1].type == "snapshot"
    assert entries[-1].covers_seq >= last_batch.seq
    info, state = SnapshotStore(tmp_path).latest_valid()
    assert info.covers_seq == entries[-1].covers_seq
    _, last = last_batch.ranges[0]
    assert info.offsets == {0: last + 1}
    learner_state = {k: v for k, v in state.items() if k not in SNAPSHOT_EXTRAS}
    assert state_sha256(learner_state) == done["sha256"]


def test_a_second_instance_fences_the_first(kafka_bootstrap: str, data: tuple[str, Stream],
                                            live: dict[str, Any], tmp_path: Path) -> None:
    """Two real processes, one learner name: the second's journal writer fences the first
    (Kafka's producer epoch for the learner's transactional.id); the first stops at its next
    journal write with one line and exit code 3, having written nothing after the fence; the
    log stays one gap-free history that the second finishes, bit for bit as uninterrupted."""
    topic, _ = data
    name = _uid("fence")
    # separate consumer groups: both keep reading the input, so the first one keeps trying
    first = _start(kafka_bootstrap, topic, name, tmp_path / "a", until=True, pace=0.2,
                   group=f"{name}-a")
    with Journal(kafka_bootstrap, journal_topic(name), create=False) as journal:
        _wait_for_seq(journal, first, 10)
    second = _start(kafka_bootstrap, topic, name, tmp_path / "b", until=True, group=f"{name}-b")
    out_b, err_b = second.communicate(timeout=120)
    out_a, err_a = first.communicate(timeout=60)
    assert first.returncode == 3, err_a
    assert err_a.strip().splitlines()[-1].startswith("streamcl: stopped: ")
    assert "another instance" in err_a and "Traceback" not in err_a
    assert "DONE" not in out_a
    assert second.returncode == 0, err_b
    (recovered,) = _lines(out_b, "RECOVERED")
    (done,) = _lines(out_b, "DONE")
    entries = _entries(kafka_bootstrap, name)
    assert [e.seq for e in entries] == list(range(len(entries)))
    starts = [e for e in entries if isinstance(e, Start)]
    assert len(starts) == 2 and starts[1].replayed == recovered["replayed"] > 0
    batches = [e for e in entries if isinstance(e, Batch)]
    assert sum(e.samples for e in batches) == N_VALID  # nothing lost, nothing twice
    # the first wrote nothing after the fence: no entry of its own after the second's start
    # (every batch after it continues where the second recovered), no snapshot beyond it
    after = [e for e in batches if e.seq > starts[1].seq]
    assert after and after[0].ranges[0][0] == recovered["offsets"]["0"]
    fenced_snaps = [i.covers_seq for i in SnapshotStore(tmp_path / "a").list()]
    assert all(c < starts[1].seq for c in fenced_snaps)
    assert done["sha256"] == live["sha256"]
