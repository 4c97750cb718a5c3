"""Two data-parallel replicas of one learner as `streamcl run --replicas 2` runs them (torchrun
underneath), gloo over loopback, a real broker, an input topic of 4 partitions (2 per replica).

The group is killed with SIGKILL, one replica at a time, at random points; torchrun restarts the
whole group (``--max-restarts``), which recovers from its snapshot set and the journal. With
several partitions per replica, which messages form a batch depends on fetch timing (see
test_service_partitions.py), so "the uninterrupted run" is the one that trains the journaled
batches without a crash: a fresh group of two replaying the journal from its first entry with
no snapshot (``streamcl replay`` launches it). The crashed group's final state must be that,
bit for bit (SHA-256 over both replicas' states), and so must a replay from the snapshot sets.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from streamcl.cli import main
from streamcl.stream.broker import ensure_topics
from streamcl.stream.entries import Batch, Snapshot, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.messages import encode_binary

N, PARTITIONS, RATE = 2400, 4, 500.0


def _produce(bootstrap: str, topic: str, done: threading.Event) -> None:
    """Samples round-robin over the partitions, paced (so that kills land mid-stream)."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (N, 16), dtype=np.uint8)
    y = (x[:, 0] // 64).astype(np.int64)  # learnable: 4 classes from the first feature
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    t0 = time.monotonic()
    for i in range(N):
        value, headers = encode_binary(x[i], int(y[i]), id=str(i))
        producer.send(topic, value=value, headers=headers, partition=i % PARTITIONS)
        delay = t0 + i / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the producer's pace, not synchronisation
    producer.flush()
    producer.close()
    done.set()


def _workers(launcher: int) -> dict[int, int]:
    """RANK -> pid of the replicas: the children of the torchrun agent that ``streamcl run
    --replicas`` (pid ``launcher``) started."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    agents = [pid for pid, ppid in parents.items() if ppid == launcher]
    out = {}
    for pid, ppid in parents.items():
        if ppid not in agents:
            continue
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text()
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = pid
    return out


def _journal(bootstrap: str, name: str) -> list:
    with Journal(bootstrap, journal_topic(name), create=False) as journal:
        return list(journal.read())


def _wait(predicate, proc: subprocess.Popen, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the group ended before {what}: {proc.communicate()[1][-3000:]}")
        if predicate():
            return
        time.sleep(0.1)  # polling interval, not synchronisation
    proc.kill()
    pytest.fail(f"timed out waiting for {what}: {proc.communicate()[1][-3000:]}")


def test_two_replicas_survive_kill_9_of_either_and_match_the_uninterrupted_state(
        kafka_bootstrap: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    topic, name = f"rep-{uuid.uuid4().hex[:8]}", f"svc-rep-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    ensure_topics(kafka_bootstrap, [journal_topic(name)], partitions=1)
    config = tmp_path / "streamcl.yaml"
    config.write_text(
        f"consumer: {{topic: {topic}, batch_size: 16, max_wait_s: 0.5}}\n"
        f"journal: {{name: {name}}}\n"
        "learner: {input_shape: [16], hidden: [16], strategy: er, params: {mem_size: 200},"
        " torch_threads: 1}\n"
        f"snapshots: {{every_batches: 10, dir: {tmp_path / 'snaps'}}}\n"
        f"publication: {{registry: {tmp_path / 'registry'}, every_samples: 600,"
        " holdout_fraction: 0.1, holdout_size: 100, gate_tolerance: 1.0}\n"
        "metrics: {port: 0}\n")
    env = {**os.environ, "STREAMCL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "OMP_NUM_THREADS": "1"}
    produced = threading.Event()
    threading.Thread(target=_produce, args=(kafka_bootstrap, topic, produced),
                     daemon=True).start()
    proc = subprocess.Popen(  # torchrun --standalone --nproc-per-node 2 --max-restarts 3
        [sys.executable, "-m", "streamcl", "run", "--replicas", "2", "--max-restarts", "3",
         "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(5)
    try:
        for victim in (1, 0):  # either replica: a worker (rank 1), the journal's writer (rank 0)
            starts = sum(isinstance(e, Start) for e in _journal(kafka_bootstrap, name))
            _wait(lambda s=starts: sum(isinstance(e, Start)
                                       for e in _journal(kafka_bootstrap, name)) > s,
                  proc, "the group to start")
            base = len(_journal(kafka_bootstrap, name))
            target = base + rng.randint(3, 12)
            _wait(lambda t=target: len(_journal(kafka_bootstrap, name)) >= t, proc,
                  f"{target} journal entries")
            pid = _workers(proc.pid)[victim]
            os.kill(pid, signal.SIGKILL)

        def all_trained() -> bool:
            entries = _journal(kafka_bootstrap, name)
            return produced.is_set() and sum(
                e.samples + e.rejected for e in entries if isinstance(e, Batch)) >= N
        _wait(all_trained, proc, "every sample to be journaled", timeout_s=180)
        # the launcher passes it to torchrun, torchrun to the replicas: they drain together
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    # each replica prints its summary (the two lines may interleave on the shared stdout)
    digests = re.findall(r'"state_sha256": "([0-9a-f]{64})"', out)
    assert len(digests) == 2, err[-3000:]
    assert digests[0] == digests[1]  # one digest for the group, printed by both
    live = digests[0]

    entries = _journal(kafka_bootstrap, name)
    starts = [e for e in entries if isinstance(e, Start)]
    assert len(starts) == 3 and all(s.replicas == 2 for s in starts)  # two restarts
    # every message journaled exactly once, each partition read by its replica in order
    for p in range(PARTITIONS):
        spans = [e.ranges[p] for e in entries if isinstance(e, Batch) and p in e.ranges]
        assert spans[0][0] == 0 and spans[-1][1] == N // PARTITIONS - 1
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    batches = [e for e in entries if isinstance(e, Batch)]
    assert all(e.replicas is not None and len(e.replicas) == 2 for e in batches)
    assert sum(e.samples for e in batches) == N
    sets = [e for e in entries if isinstance(e, Snapshot)]
    assert sets and all(e.shards is not None and len(e.shards) == 2 for e in sets)
    assert entries[-1].type == "snapshot"  # drained together: the last set is journaled
    assert any(e.type == "publish" for e in entries)  # replica 0 published, gate pooled

    capfd.readouterr()
    # the uninterrupted run over the same batches: a fresh group, from the first entry
    assert main(["replay", "--bootstrap", kafka_bootstrap, "--name", name,
                 "--topic", topic]) == 0
    scratch = capfd.readouterr().out.split()[0]
    assert scratch == live
    # and from the snapshot sets the crashed group left
    assert main(["replay", "--bootstrap", kafka_bootstrap, "--name", name, "--topic", topic,
                 "--snapshot-dir", str(tmp_path / "snaps")]) == 0
    assert capfd.readouterr().out.split()[0] == live
