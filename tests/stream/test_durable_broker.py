"""The embedded broker on a durable store: journal, records and the service survive a restart
of the broker; without a store `streamcl run` refuses rather than start an empty one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from streamcl.data import Stream, digits
from streamcl.stream.broker import BrokerError, EmbeddedBroker, ensure_topics
from streamcl.stream.entries import Batch, Snapshot, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.producer import produce_stream

pytest.importorskip("moto.server", reason="the S3 store needs moto[server] (test extra)")
sys.path.insert(0, str(Path(__file__).parent))
from durable_broker import DurableBroker


@pytest.fixture(scope="module")
def durable() -> Iterator[DurableBroker]:
    with DurableBroker() as broker:
        yield broker


def _records(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=20_000)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        out = []
        for record in consumer:
            out.append(record.value)
            if len(out) == n:
                break
        return out
    finally:
        consumer.close()


def test_journal_and_records_survive_a_broker_restart(durable: DurableBroker) -> None:
    name = f"x-{uuid.uuid4().hex[:8]}"
    topic = journal_topic(name)
    with Journal(durable.bootstrap, topic, writer=f"streamcl.{name}", timeout_s=60) as journal:
        journal.append(Start(config_hash="h"))
        for i in range(5):
            journal.append(Batch(ranges={0: (i, i)}, plan={}, samples=1))
        journal.append(Snapshot(path="s", sha256="0" * 64, covers_seq=5, offsets={0: 5}))
        assert journal.sync() == 6
        written = list(journal.read())
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    ensure_topics(durable.bootstrap, [plain])
    producer = KafkaProducer(bootstrap_servers=durable.bootstrap)
    for i in range(3):
        producer.send(plain, f"r{i}".encode())
    producer.flush(30)
    producer.close()

    durable.restart()  # a new tansu process on the same bucket

    with Journal(durable.bootstrap, topic, writer=f"streamcl.{name}", timeout_s=60) as journal:
        assert list(journal.read()) == written  # same entries, same seqs
        assert journal.next_seq == 7
        journal.append(Batch(ranges={0: (5, 5)}, plan={}, samples=1))  # the writer id fences
        assert journal.sync() == 7                                      # and goes on
    assert _records(durable.bootstrap, plain, 3) == [b"r0", b"r1", b"r2"]


def test_memory_storage_is_the_default_and_loses_everything() -> None:
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, ["kept"])
    with EmbeddedBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=20_000)
        try:
            assert "kept" not in admin.list_topics()
        finally:
            admin.close()


def test_a_storage_engine_tansu_lacks_is_refused_in_words() -> None:
    with pytest.raises(BrokerError, match=r"cannot store on postgres://u:\*\*\*@h/db: its build "
                                          r"supports .*s3://"):
        EmbeddedBroker(storage="postgres://u:secret@h/db").start()


def _digits(n: int = 160) -> Stream:
    train, _ = digits()
    return Stream(train.x[:n], train.y[:n])


def _run(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "streamcl", "run", "--config", str(config)],
                            env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _bootstrap_of(proc: subprocess.Popen[str], log: Path) -> str:
    """The embedded broker's address, from the service's one line about it (a free port)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("streamcl: embedded broker at "):
                return line.split()[4]
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)  # polling interval, not synchronisation
    pytest.fail("the service never said where its embedded broker is")


def _trained(bootstrap: str, name: str, proc: subprocess.Popen[str], log: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    with Journal(bootstrap, journal_topic(name), timeout_s=60) as journal:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            if sum(e.samples for e in journal.read() if isinstance(e, Batch)) >= n:
                return
            time.sleep(0.2)  # polling interval, not synchronisation
    pytest.fail(f"the service did not train {n} samples in time")


def _stop(proc: subprocess.Popen[str], log: Path) -> dict:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()
    return json.loads(out.strip().splitlines()[-1])


def test_run_on_durable_embedded_storage_resumes_after_a_restart(
        durable: DurableBroker, tmp_path: Path) -> None:
    data, topic, name = _digits(), f"digits-{uuid.uuid4().hex[:8]}", f"d-{uuid.uuid4().hex[:8]}"
    produce_stream(data, durable.bootstrap, topic)
    durable.stop()  # the service runs its own tansu on the same store
    config = tmp_path / "cfg.yaml"
    config.write_text(f"consumer: {{topic: {topic}, batch_size: 20, prefetch: false}}\n"
                      f"journal: {{name: {name}}}\n"
                      "learner: {input_shape: [64], hidden: [16], strategy: er}\n"
                      f"snapshots: {{dir: {tmp_path / 'snaps'}, every_batches: 3}}\n"
                      f"kafka: {{embedded_storage: '{durable.storage}'}}\n")
    env = {**os.environ, **durable.env}
    env.pop("STREAMCL_KAFKA__BOOTSTRAP_SERVERS", None)
    try:
        log = tmp_path / "first.log"
        proc = _run(config, env, log)
        _trained(_bootstrap_of(proc, log), name, proc, log, len(data))
        first = _stop(proc, log)
        assert first["samples"] == len(data) and first["snapshot_seq"] is None

        log = tmp_path / "second.log"
        proc = _run(config, env, log)
        bootstrap = _bootstrap_of(proc, log)
        with Journal(bootstrap, journal_topic(name), timeout_s=60) as journal:
            deadline = time.monotonic() + 120  # the second start entry: recovery is done
            while sum(isinstance(e, Start) for e in journal.read()) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)  # polling interval, not synchronisation
        second = _stop(proc, log)
    finally:
        durable.start()  # the module's broker, for the tests after this one
    assert "embedded broker at" in log.read_text() and durable.storage in log.read_text()
    assert second["snapshot_seq"] is not None, second  # recovered from snapshot + journal
    assert second["position"] > 0, second              # not from scratch
    assert second["samples"] == 0, second              # nothing new to train, nothing re-trained
    assert second["state_sha256"] == first["state_sha256"]  # the very state it stopped with


def test_run_without_bootstrap_or_storage_refuses_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("learner: {input_shape: [4]}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCL_KAFKA__")}
    out = subprocess.run([sys.executable, "-m", "streamcl", "run", "--config", str(config)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("streamcl: error: kafka.bootstrap_servers is not set")
    assert "kafka.embedded_storage" in lines[0] and "streamcl demo" in lines[0]
