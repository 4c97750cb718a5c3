"""Write-behind journal, seen from the service on a broker that stops acknowledging.

Training goes on while the journal's entries wait for the broker (a step returns with its
entry unacknowledged), but no effect seen outside the process — a registry publication, a
snapshot, a consumer-group commit — goes out before the entries it depends on are
acknowledged. The broker is really stopped (SIGSTOP on tansu), not faked.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamcl.data import Stream, digits, split_stream
from streamcl.registry.holdout import Holdout
from streamcl.registry.publisher import Publisher, PublishPolicy
from streamcl.registry.registry import ModelRegistry
from streamcl.service import TrainerService
from streamcl.stream.broker import EmbeddedBroker
from streamcl.stream.entries import Batch, Publish
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream
from streamcl.trainer import TrainerConfig

N, BATCH = 600, 16
CONFIG = TrainerConfig(input_shape=(64,), hidden=(16,), strategy="naive", boundaries="task",
                       seed=3)
STALL_S = 1.5  # how long a blocked effect is watched for going out anyway


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A broker of its own: stopping it must not stall the session's other tests."""
    with EmbeddedBroker() as b:
        yield b


def _stalled(call: Callable[[], object]) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def run() -> None:
        call()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_no_outside_effect_goes_out_ahead_of_its_entries(broker: EmbeddedBroker,
                                                         tmp_path: Path) -> None:
    train, _ = digits()
    s = split_stream(train, classes_per_exp=2, seed=0)
    topic, name = f"wb-{uuid.uuid4().hex[:8]}", f"wb-{uuid.uuid4().hex[:8]}"
    assert produce_stream(Stream(s.x[:N], s.y[:N], s.task[:N]), broker.bootstrap, topic) == N
    registry = ModelRegistry(tmp_path / "registry")
    publisher = Publisher(registry, PublishPolicy(every_samples=10**9, at_experience_end=False))
    service = TrainerService(CONFIG, bootstrap=broker.bootstrap, topic=topic, group_id=name,
                             name=name, snapshot_dir=str(tmp_path / "snaps"), batch_size=BATCH,
                             max_wait_s=5.0, snapshot_every_batches=10**6, prefetch=False,
                             holdout=Holdout(0.1, 100, seed=0), publisher=publisher)
    snaps = tmp_path / "snaps"
    assert broker.process is not None
    pid = broker.process.pid
    try:
        service.recover()
        deadline = time.monotonic() + 60  # the group join comes first
        while service.batches < 4 and time.monotonic() < deadline:
            service.step_once()  # the consumer fetches ahead: later steps need no broker
        assert service.batches == 4
        service.snapshot()
        before_snaps, before_versions = sorted(os.listdir(snaps)), registry.versions()

        os.kill(pid, signal.SIGSTOP)
        try:
            # training goes on: a step returns with its entry not yet acknowledged
            assert service.step_once()
            assert service.journal.unacknowledged >= 1
            # a snapshot waits for it: no state file, no snapshot entry, no commit meanwhile
            snapshot, snapshot_done = _stalled(service.snapshot)
            assert not snapshot_done.wait(STALL_S), "snapshot went out unacknowledged"
            assert sorted(os.listdir(snaps)) == before_snaps
        finally:
            os.kill(pid, signal.SIGCONT)
        snapshot.join(60)
        assert snapshot_done.is_set() and len(os.listdir(snaps)) > len(before_snaps)

        # a due publication: journaled, and the registry waits until the broker has it
        publisher.policy = PublishPolicy(every_samples=1, at_experience_end=False,
                                         tolerance=1.0)
        os.kill(pid, signal.SIGSTOP)
        try:
            step, step_done = _stalled(service.step_once)
            assert not step_done.wait(STALL_S), "publication went out unacknowledged"
            assert registry.versions() == before_versions
        finally:
            os.kill(pid, signal.SIGCONT)
        step.join(60)
        assert step_done.is_set()
        (version,) = [v for v in registry.versions() if v not in before_versions]
        seq = registry.manifest(version)["journal_seq"]
    finally:
        os.kill(pid, signal.SIGCONT)
        service.close()

    with Journal(broker.bootstrap, journal_topic(name), create=False) as journal:
        entries = list(journal.read())
    published = [e for e in entries if isinstance(e, Publish)]
    assert [(e.seq, e.version) for e in published] == [(seq, version)]
    # every batch the published state includes is in the log before the publication
    trained = sum(e.plan.get("size", 0) for e in entries if isinstance(e, Batch) and e.seq < seq)
    assert trained == published[0].position > 0
