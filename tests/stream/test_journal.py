"""The journal against a real broker: typed entries numbered without gaps across restarts,
exact ranged reads, the end of the log found despite tansu's ListOffsets answer, a log refused
rather than misread, write-behind appends that a sync waits for, and one writer per learner,
fenced by the broker."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from streamcl.stream.broker import EmbeddedBroker, ensure_topics
from streamcl.stream.entries import (
    FORMAT,
    Batch,
    Publish,
    Snapshot,
    Start,
    Unknown,
    config_hash,
    entry_from_json,
)
from streamcl.stream.journal import Journal, JournalError, JournalFenced, journal_topic
from streamcl.trainer import OnlineTrainer, TrainerConfig

FIXTURE = Path(__file__).parent.parent / "fixtures" / "journal-format0.jsonl"


@pytest.fixture
def journal_name(kafka_bootstrap: str) -> str:
    return journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def open_journal(kafka_bootstrap: str) -> Iterator[Callable[..., Journal]]:
    """``open_journal(topic, writer="w")``: a journal (a writer unless ``writer=None``)."""
    made: list[Journal] = []

    def _open(topic: str, writer: str | None = "w") -> Journal:
        journal = Journal(kafka_bootstrap, topic, timeout_s=20,
                          writer=None if writer is None else f"{topic}.{writer}")
        made.append(journal)
        return journal

    yield _open
    for journal in made:
        journal.close()


def _raw_entries(send: Callable, topic: str, seqs: list[int]) -> None:
    """Entries written by someone else, all in one produce call (one record batch on tansu)."""
    send(topic, [(json.dumps({"type": "publication", "seq": s}).encode(), [], str(s).encode())
                 for s in seqs])


def test_appends_are_numbered_in_order_and_a_reopened_journal_continues(
        open_journal: Callable[..., Journal], journal_name: str) -> None:
    trainer = OnlineTrainer(TrainerConfig(input_shape=(4,), hidden=(8,), boundaries="new-class"))
    journal = open_journal(journal_name)
    assert journal.next_seq == 0 and journal.last() is None and list(journal.read()) == []
    written: list = [journal.append(Start(config_hash=config_hash(trainer.config.to_json()),
                                          trainer_config=trainer.config.to_json()))]
    for i in range(1, 200):
        if i % 50 == 0:
            entry = Snapshot(path=f"snapshot-{i - 1:012d}.safetensors", sha256="0" * 64,
                             covers_seq=i - 1, offsets={0: 10 * i})
        else:  # the service's protocol: decide, journal the decision, then act on it
            y = torch.tensor([i % 3, 1])
            plan = trainer.plan(y)
            entry = Batch(ranges={0: (10 * i, 10 * i + 9)}, plan=plan.to_json(), samples=2,
                          rejected=8)
            if plan.boundary is not None:
                trainer.end_experience(plan.boundary)
            trainer.learn(torch.zeros(2, 4), y, plan)
        numbered = journal.append(entry)
        assert numbered.seq == i and numbered.ts is not None and entry.seq == -1
        written.append(numbered)
    assert journal.next_seq == 200 and journal.sync() == 199 and journal.unacknowledged == 0

    entries = list(journal.read())
    assert entries == written  # typed values, equal field by field after the round trip
    assert isinstance(entries[7], Batch) and entries[7].ranges == {0: (70, 79)}
    assert isinstance(entries[150], Snapshot) and entries[150].offsets == {0: 1500}

    again = open_journal(journal_name, writer="w")  # a restarted process (same writer id)
    assert again.next_seq == 200 and again.last_entry == entries[-1]
    assert again.append(Start(config_hash="0" * 64)).seq == 200
    again.sync()
    assert [e.seq for e in again.read(from_seq=50, to_seq=99)] == list(range(50, 100))
    assert [e.seq for e in again.read(from_seq=195)] == [195, 196, 197, 198, 199, 200]
    assert list(again.read(from_seq=201)) == [] and list(again.read(10, 9)) == []
    assert again.last().seq == 200  # type: ignore[union-attr]
    assert again.last(Snapshot).seq == 150  # type: ignore[union-attr]
    assert again.last(Batch).seq == 199  # type: ignore[union-attr]
    assert again.last(Publish) is None


def test_the_tail_is_found_inside_a_multi_record_batch(
        open_journal: Callable[..., Journal], journal_name: str, send: Callable,
        kafka_bootstrap: str) -> None:
    # on tansu, ListOffsets answers 1 for these 12 records (the batch's base offset + 1)
    ensure_topics(kafka_bootstrap, [journal_name])
    _raw_entries(send, journal_name, list(range(12)))
    journal = open_journal(journal_name)
    assert journal.next_seq == 12
    entries = list(journal.read())
    assert [e.seq for e in entries] == list(range(12))
    assert all(isinstance(e, Unknown) and e.kind == "publication" for e in entries)
    assert [e.seq for e in journal.read(from_seq=5)] == list(range(5, 12))
    assert journal.append(Start(config_hash="0" * 64)).seq == 12
    journal.sync()
    _raw_entries(send, journal_name, [13, 14, 15])
    assert [e.seq for e in journal.read(from_seq=11)] == [11, 12, 13, 14, 15]
    assert open_journal(journal_name, writer=None).next_seq == 16


def test_a_duplicate_is_skipped_and_a_gap_is_an_error(
        open_journal: Callable[..., Journal], kafka_bootstrap: str, send: Callable) -> None:
    dup = journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")
    ensure_topics(kafka_bootstrap, [dup])
    _raw_entries(send, dup, [0, 1, 1, 2])  # a retried send, as a non-idempotent producer may
    journal = open_journal(dup, writer=None)
    assert journal.next_seq == 3
    assert [e.seq for e in journal.read()] == [0, 1, 2]
    assert [e.seq for e in journal.read(from_seq=2)] == [2]

    gap = journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")
    ensure_topics(kafka_bootstrap, [gap])
    _raw_entries(send, gap, [0, 1, 3])
    with pytest.raises(JournalError, match="entry 2 is missing"):
        list(open_journal(gap, writer=None).read())


def test_records_that_are_not_entries_and_bad_topics_are_refused(
        open_journal: Callable[..., Journal], journal_name: str, kafka_bootstrap: str,
        send: Callable) -> None:
    ensure_topics(kafka_bootstrap, [journal_name])
    send(journal_name, [(b"not json", [])])
    with pytest.raises(JournalError, match="not a journal entry"):
        open_journal(journal_name)

    newer = journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")
    ensure_topics(kafka_bootstrap, [newer])
    send(newer, [(json.dumps({"type": "batch", "seq": 0, "format": FORMAT + 1}).encode(), [])])
    with pytest.raises(JournalError, match="upgrade streamcl"):
        open_journal(newer, writer=None)

    wide = f"streamcl-test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, [wide], partitions=2)
    with pytest.raises(JournalError, match="exactly one partition"):
        open_journal(wide)
    empty = journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")
    ensure_topics(kafka_bootstrap, [empty])
    with pytest.raises(JournalError, match="read-only"):
        open_journal(empty, writer=None).append(Start(config_hash="0"))


def test_an_entry_that_cannot_be_journaled_uses_no_seq(
        open_journal: Callable[..., Journal], journal_name: str) -> None:
    journal = open_journal(journal_name)
    with pytest.raises(ValueError):
        journal.append(Batch(ranges={0: (0, 1)}, plan={"loss": float("nan")}, samples=2))
    with pytest.raises(TypeError):
        journal.append(Batch(ranges={0: (0, 1)}, plan={"t": torch.zeros(1)}, samples=2))
    assert journal.append(Start(config_hash="0" * 64)).seq == 0
    journal.sync()
    assert [e.seq for e in journal.read()] == [0]


def test_a_journal_written_by_the_previous_format_reads_as_typed_entries(
        open_journal: Callable[..., Journal], journal_name: str, send: Callable,
        kafka_bootstrap: str) -> None:
    """tests/fixtures/journal-format0.jsonl: a real service run (il2m-der, holdout, gate,
    snapshots) written by streamcl before entries were typed (bench/state_hashes.py)."""
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert all("format" not in r for r in raw)
    typed = [entry_from_json(r) for r in raw]
    assert not any(isinstance(e, Unknown) for e in typed)
    kinds = {type(e).__name__ for e in typed}
    assert {"Start", "Batch", "Snapshot", "Publish"} <= kinds
    start = typed[0]
    assert isinstance(start, Start) and start.holdout is not None
    assert start.trainer_config is not None and start.trainer_config["strategy"] == "il2m-der"
    for r, e in zip(raw, typed, strict=True):
        back = e.to_json()
        assert back["format"] == FORMAT and back["seq"] == r["seq"] and back["type"] == r["type"]
        if isinstance(e, Publish):
            assert e.metrics.accuracy_matrix.to_json() == r["metrics"]["accuracy_matrix"]
            assert e.gate.promoted and e.version == r["version"]
        if isinstance(e, Batch):
            assert back["ranges"] == r["ranges"] and back["plan"] == r["plan"]
    # and through the broker: the journal reads the old records as the same typed entries
    ensure_topics(kafka_bootstrap, [journal_name])
    send(journal_name, [(json.dumps(r).encode(), [], str(r["seq"]).encode()) for r in raw])
    journal = open_journal(journal_name)
    assert list(journal.read()) == typed and journal.next_seq == len(raw)


def test_a_second_writer_fences_the_first(open_journal: Callable[..., Journal],
                                          journal_name: str) -> None:
    first = open_journal(journal_name, writer="learner")
    first.append(Start(config_hash="0" * 64))
    first.sync()
    second = open_journal(journal_name, writer="learner")  # same learner: takes over
    assert second.next_seq == 1
    first.append(Start(config_hash="1" * 64))  # write-behind: the refusal comes back later
    with pytest.raises(JournalFenced, match="another instance"):
        first.sync()
    with pytest.raises(JournalFenced):
        first.append(Start(config_hash="2" * 64))
    second.append(Start(config_hash="3" * 64))
    second.sync()
    assert [(e.seq, e.config_hash) for e in second.read()] == [(0, "0" * 64), (1, "3" * 64)]

    # a fenced writer that only appends (no sync) learns it from a later append, which says
    # why (not a bare "fatal error"), however the refusal reaches it
    third = open_journal(journal_name, writer="learner")
    deadline = time.monotonic() + 30
    with pytest.raises(JournalFenced, match="another instance"):
        while time.monotonic() < deadline:
            second.append(Start(config_hash="4" * 64))
    third.sync()


def test_appends_do_not_wait_and_a_sync_waits_for_a_stalled_broker() -> None:
    with EmbeddedBroker() as broker:
        journal = Journal(broker.bootstrap, "stall.journal", timeout_s=30, writer="stall")
        journal.append(Start(config_hash="0" * 64))
        journal.sync()
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)  # the broker stops answering
        try:
            for _ in range(5):  # training goes on: appends return without the broker
                journal.append(Start(config_hash="1" * 64))
            done = threading.Event()
            syncing = threading.Thread(target=lambda: (journal.sync(), done.set()))
            syncing.start()
            assert not done.wait(1.0), "sync returned while the broker could not acknowledge"
            assert journal.unacknowledged == 5
        finally:
            broker.process.send_signal(signal.SIGCONT)
        syncing.join(30)
        assert done.is_set() and journal.unacknowledged == 0
        assert [e.seq for e in journal.read()] == list(range(6))
        journal.close()


def test_an_unacknowledged_append_raises_and_stops_the_writer() -> None:
    with EmbeddedBroker(stop_timeout_s=0.2) as broker:  # tansu lingers on SIGTERM
        # 5 s: the first transaction on a fresh broker must fit in it on a busy machine (1 s
        # did not), and the lost entry is declared lost that long after the broker is gone
        journal = Journal(broker.bootstrap, "lost.journal", timeout_s=5, writer="lost")
        journal.append(Start(config_hash="0" * 64))
        journal.sync()
        broker.stop()
        journal.append(Start(config_hash="0" * 64))
        with pytest.raises(JournalError, match="not acknowledged"):
            journal.sync()
        # whether entry 1 reached the log is unknown: only a reopened journal can tell
        with pytest.raises(JournalError, match="reopen the journal"):
            journal.append(Start(config_hash="0" * 64))
        journal.close()
