"""The journal against a real broker: gap-free numbering that survives a restart, exact ranged
reads, the end of the log found despite tansu's ListOffsets answer, and a log that is refused
rather than misread when it is not one."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch

from streamcl.stream.broker import EmbeddedBroker, ensure_topics
from streamcl.stream.journal import (
    Journal,
    JournalError,
    batch_entry,
    config_hash,
    journal_topic,
    offsets_from_json,
    ranges_from_json,
    snapshot_entry,
    start_entry,
)
from streamcl.trainer import OnlineTrainer, TrainerConfig


@pytest.fixture
def journal_name(kafka_bootstrap: str) -> str:
    return journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["kafka-python", "confluent"])
def open_journal(kafka_bootstrap: str,
                 request: pytest.FixtureRequest) -> Iterator[Callable[[str], Journal]]:
    """Journals appending through kafka-python, and through librdkafka (confluent-kafka)."""
    made: list[Journal] = []

    def _open(topic: str) -> Journal:
        journal = Journal(kafka_bootstrap, topic, timeout_s=20, producer=request.param)
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
        open_journal: Callable[[str], Journal], journal_name: str) -> None:
    trainer = OnlineTrainer(TrainerConfig(input_shape=(4,), hidden=(8,), boundaries="new-class"))
    journal = open_journal(journal_name)
    assert journal.next_seq == 0 and journal.last() is None and list(journal.read()) == []
    written = [start_entry(trainer.config.to_json())]
    assert journal.append(written[0]) == 0
    for i in range(1, 200):
        if i % 50 == 0:
            entry = snapshot_entry(f"snapshot-{i - 1:012d}.safetensors", "0" * 64, i - 1,
                                   {0: 10 * i})
            assert journal.append(entry) == i
        else:  # the service's protocol: decide, journal the decision, then act on it
            y = torch.tensor([i % 3, 1])
            plan = trainer.plan(y)
            entry = batch_entry({0: (10 * i, 10 * i + 9)}, plan.to_json(), samples=2,
                                rejected=8)
            assert journal.append(entry) == i
            if plan.boundary is not None:
                trainer.end_experience(plan.boundary)
            trainer.learn(torch.zeros(2, 4), y, plan)
        written.append(entry)
    assert journal.next_seq == 200

    entries = list(journal.read())
    assert [e["seq"] for e in entries] == list(range(200))
    for entry, original in zip(entries, written, strict=True):
        assert {k: v for k, v in entry.items() if k not in ("seq", "ts")} == original
    assert entries[0]["config_hash"] == config_hash(trainer.config.to_json())
    assert ranges_from_json(entries[7]["ranges"]) == {0: (70, 79)}
    assert offsets_from_json(entries[150]["offsets"]) == {0: 1500}

    again = open_journal(journal_name)  # a restarted process
    assert again.next_seq == 200 and again.last_entry == entries[-1]
    assert again.append({"type": "publication", "version": 1}) == 200
    assert [e["seq"] for e in again.read(from_seq=50, to_seq=99)] == list(range(50, 100))
    assert [e["seq"] for e in again.read(from_seq=195)] == [195, 196, 197, 198, 199, 200]
    assert list(again.read(from_seq=201)) == [] and list(again.read(10, 9)) == []
    assert again.last()["seq"] == 200  # type: ignore[index]
    assert again.last("snapshot")["seq"] == 150  # type: ignore[index]
    assert again.last("start")["seq"] == 0  # type: ignore[index]  (several windows back)
    assert again.last("nothing") is None


def test_the_tail_is_found_inside_a_multi_record_batch(
        open_journal: Callable[[str], Journal], journal_name: str, send: Callable,
        kafka_bootstrap: str) -> None:
    # on tansu, ListOffsets answers 1 for these 12 records (the batch's base offset + 1)
    ensure_topics(kafka_bootstrap, [journal_name])
    _raw_entries(send, journal_name, list(range(12)))
    journal = open_journal(journal_name)
    assert journal.next_seq == 12
    assert [e["seq"] for e in journal.read()] == list(range(12))
    assert [e["seq"] for e in journal.read(from_seq=5)] == list(range(5, 12))
    assert journal.append({"type": "publication"}) == 12
    _raw_entries(send, journal_name, [13, 14, 15])
    assert [e["seq"] for e in journal.read(from_seq=11)] == [11, 12, 13, 14, 15]
    assert open_journal(journal_name).next_seq == 16


def test_a_duplicate_is_skipped_and_a_gap_is_an_error(
        open_journal: Callable[[str], Journal], kafka_bootstrap: str, send: Callable) -> None:
    dup = journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")
    ensure_topics(kafka_bootstrap, [dup])
    _raw_entries(send, dup, [0, 1, 1, 2])  # a retried send, as a non-idempotent producer may
    journal = open_journal(dup)
    assert journal.next_seq == 3
    assert [e["seq"] for e in journal.read()] == [0, 1, 2]
    assert [e["seq"] for e in journal.read(from_seq=2)] == [2]

    gap = journal_topic(f"streamcl-test-{uuid.uuid4().hex[:12]}")
    ensure_topics(kafka_bootstrap, [gap])
    _raw_entries(send, gap, [0, 1, 3])
    with pytest.raises(JournalError, match="entry 2 is missing"):
        list(open_journal(gap).read())


def test_records_that_are_not_entries_and_bad_topics_are_refused(
        open_journal: Callable[[str], Journal], journal_name: str, kafka_bootstrap: str,
        send: Callable) -> None:
    ensure_topics(kafka_bootstrap, [journal_name])
    send(journal_name, [(b"not json", [])])
    with pytest.raises(JournalError, match="not a journal entry"):
        open_journal(journal_name)

    wide = f"streamcl-test-{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, [wide], partitions=2)
    with pytest.raises(JournalError, match="exactly one partition"):
        open_journal(wide)


def test_an_entry_that_cannot_be_journaled_uses_no_seq(
        open_journal: Callable[[str], Journal], journal_name: str) -> None:
    journal = open_journal(journal_name)
    with pytest.raises(ValueError, match="needs ranges, plan, samples, rejected"):
        journal.append({"type": "batch"})
    with pytest.raises(ValueError, match="non-empty str 'type'"):
        journal.append({"ranges": {}})
    with pytest.raises(ValueError):
        journal.append({"type": "publication", "loss": float("nan")})
    with pytest.raises(TypeError):
        journal.append({"type": "publication", "tensor": torch.zeros(1)})
    with pytest.raises(ValueError, match="next is 0"):
        journal.append({"type": "publication", "seq": 5})
    assert journal.append({"type": "publication", "seq": 0}) == 0
    assert journal.append({"type": "publication"}) == 1
    assert [e["seq"] for e in journal.read()] == [0, 1]


@pytest.mark.parametrize("producer", ["kafka-python", "confluent"])
def test_an_unacknowledged_append_raises_and_stops_the_writer(producer: str) -> None:
    with EmbeddedBroker(stop_timeout_s=0.2) as broker:  # tansu lingers on SIGTERM
        journal = Journal(broker.bootstrap, "lost.journal", timeout_s=1,
                          producer=producer)  # type: ignore[arg-type]
        assert journal.append({"type": "publication"}) == 0
        broker.stop()
        with pytest.raises(JournalError, match="entry 1 not acknowledged"):
            journal.append({"type": "publication"})
        # whether entry 1 reached the log is unknown: only a reopened journal can tell
        with pytest.raises(JournalError, match="reopen the journal"):
            journal.append({"type": "publication"})
        journal.close()
