"""The snapshot store: bit-exact round trips, retention, and falling back past damaged, partial
or interrupted snapshots instead of loading them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from streamcl.state import load_state, state_sha256
from streamcl.stream.snapshots import SnapshotError, SnapshotStore, SnapshotWriteError
from streamcl.trainer import OnlineTrainer, TrainerConfig


@pytest.fixture(scope="module")
def states() -> list[dict[str, Any]]:
    """A small trainer's state after 1..6 steps (each different)."""
    trainer = OnlineTrainer(TrainerConfig(input_shape=(4,), hidden=(8,), strategy="er",
                                          boundaries="new-class"))
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(6):
        x = torch.randn(8, 4, generator=gen)
        trainer.step(x, torch.tensor([step % 3] * 4 + [(step + 1) % 3] * 4))
        out.append(trainer.state_dict())
    return out


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_round_trip_is_bit_exact(tmp_path: Path, states: list[dict[str, Any]]) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    assert store.latest_valid() is None and store.list() == []
    info = store.save(states[2], covers_seq=41, offsets={0: 420, 1: 7})
    assert info.path.name == "snapshot-000000000041.safetensors"
    assert info.sidecar.name == "snapshot-000000000041.json"
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert info.size == info.path.stat().st_size
    sidecar = json.loads(info.sidecar.read_text())
    assert sidecar["covers_seq"] == 41 and sidecar["offsets"] == {"0": 420, "1": 7}
    assert sidecar["sha256"] == info.sha256 and sidecar["size"] == info.size

    found = SnapshotStore(tmp_path / "snaps").latest_valid()  # another process
    assert found is not None
    got, state = found
    assert got == info and got.offsets == {0: 420, 1: 7}
    assert state_sha256(state) == state_sha256(states[2])
    assert state_sha256(OnlineTrainer.from_state(state).state_dict()) == state_sha256(states[2])
    assert store.skipped == [] and store.list() == [info]


def test_retention_keeps_the_newest(tmp_path: Path, states: list[dict[str, Any]]) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for i, state in enumerate(states[:5]):
        store.save(state, covers_seq=10 * i, offsets={0: i})
    assert [s.covers_seq for s in store.list()] == [40, 30]
    assert _names(tmp_path) == [f"snapshot-0000000000{n}.{ext}" for n in (30, 40)
                                for ext in ("json", "safetensors")]
    info, state = store.latest_valid()  # type: ignore[misc]
    assert info.covers_seq == 40 and state_sha256(state) == state_sha256(states[4])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped bytes": (lambda s: _flip(s.path), "does not match"),
    "truncated": (lambda s: _truncate(s.path), "truncated"),
    "state file gone": (lambda s: s.path.unlink(), "state file missing"),
    "sidecar gone": (lambda s: s.sidecar.unlink(), "incomplete: no sidecar"),
    "garbage sidecar": (lambda s: s.sidecar.write_bytes(b"\x00\xff{garbage"), "not JSON"),
    "sidecar of another snapshot": (
        lambda s: s.sidecar.write_text(json.dumps({**json.loads(s.sidecar.read_text()),
                                                   "covers_seq": 3})), "its name 9"),
    "sidecar without a hash": (
        lambda s: s.sidecar.write_text(json.dumps({**json.loads(s.sidecar.read_text()),
                                                   "sha256": None})), "not a SHA-256"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_snapshot_falls_back_to_the_previous(
        tmp_path: Path, states: list[dict[str, Any]], damage: str) -> None:
    store = SnapshotStore(tmp_path)
    store.save(states[0], covers_seq=3, offsets={0: 30})
    newest = store.save(states[1], covers_seq=9, offsets={0: 90})
    harm, reason = DAMAGE[damage]
    harm(newest)
    for reader in (store, SnapshotStore(tmp_path)):  # the writer, and a fresh process
        info, state = reader.latest_valid()  # type: ignore[misc]
        assert info.covers_seq == 3 and info.offsets == {0: 30}
        assert state_sha256(state) == state_sha256(states[0])
        assert [(s.covers_seq, s.path.name) for s in reader.skipped] == [
            (9, "snapshot-000000000009.safetensors")]
        assert reason in reader.skipped[0].reason
    with pytest.raises(SnapshotError):
        store.load(9)

    # retention counts valid snapshots only: the damaged one goes, the fallback stays
    store = SnapshotStore(tmp_path, keep=2)
    store.save(states[2], covers_seq=12, offsets={0: 120})
    assert [s.covers_seq for s in store.list()] == [12, 3]
    assert not newest.path.exists() and not newest.sidecar.exists()


def test_nothing_valid_gives_none_with_every_reason(tmp_path: Path,
                                                    states: list[dict[str, Any]]) -> None:
    store = SnapshotStore(tmp_path)
    a = store.save(states[0], covers_seq=1, offsets={})
    b = store.save(states[1], covers_seq=2, offsets={})
    _flip(a.path)
    b.sidecar.unlink()
    assert store.latest_valid() is None
    assert [s.covers_seq for s in store.skipped] == [2, 1]


def test_an_interrupted_write_is_ignored_and_cleaned_up(
        tmp_path: Path, states: list[dict[str, Any]]) -> None:
    store = SnapshotStore(tmp_path)
    store.save(states[0], covers_seq=5, offsets={0: 50})
    # what a crash mid-save leaves: temp files, the state file's partly written
    partial = (tmp_path / "snapshot-000000000005.safetensors").read_bytes()[:100]
    (tmp_path / ".snapshot-000000000008.safetensors.4242-00c0ffee.tmp").write_bytes(partial)
    (tmp_path / "..snapshot-000000000008.safetensors.4242-00c0ffee.tmp.tmp-4242").write_bytes(
        partial)
    (tmp_path / ".snapshot-000000000008.json.4242-00c0ffee.tmp").write_bytes(b'{"cov')
    info, _ = store.latest_valid()  # type: ignore[misc]
    assert info.covers_seq == 5 and store.skipped == []  # temp files are not even candidates
    assert [s.covers_seq for s in store.list()] == [5]
    store.save(states[1], covers_seq=8, offsets={0: 80})
    assert _names(tmp_path) == [f"snapshot-00000000000{n}.{ext}" for n in (5, 8)
                                for ext in ("json", "safetensors")]


class SimulatedCrash(BaseException):
    """The process dies here: no handler of the code under test runs (an OSError would be
    handled: a failed write cleans up after itself, test_a_failed_write_leaves_nothing)."""


def test_a_failed_write_leaves_nothing(tmp_path: Path, states: list[dict[str, Any]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (a full disk at the sidecar) removes the state file it wrote, says
    so in one line, and leaves the earlier snapshot valid."""
    store = SnapshotStore(tmp_path)
    store.save(states[0], covers_seq=1, offsets={0: 1})
    real_replace = os.replace

    def full_at_sidecar(src: Any, dst: Any) -> None:
        if Path(dst).name == "snapshot-000000000002.json":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_at_sidecar)
    with pytest.raises(SnapshotWriteError, match=r"cannot write snapshot 2 \(No space left"):
        store.save(states[1], covers_seq=2, offsets={0: 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert _names(tmp_path) == ["snapshot-000000000001.json", "snapshot-000000000001.safetensors"]
    assert store.latest_valid()[0].covers_seq == 1  # type: ignore[index]


def test_a_state_file_never_appears_half_written(
        tmp_path: Path, states: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path)
    store.save(states[0], covers_seq=1, offsets={0: 1})
    real_replace = os.replace
    renamed: list[tuple[str, bytes]] = []

    def crash_on_publish(src: Any, dst: Any) -> None:
        if Path(dst).name == "snapshot-000000000002.safetensors":
            # the whole state is written and loadable under its temporary name ...
            renamed.append((Path(src).name, Path(src).read_bytes()))
            assert state_sha256(load_state(src)) == state_sha256(states[1])
            # ... when the crash hits, before it is published under its final name
            raise SimulatedCrash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    with pytest.raises(SimulatedCrash):
        store.save(states[1], covers_seq=2, offsets={0: 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(renamed) == 1 and renamed[0][0].startswith(".snapshot-000000000002.")
    assert not (tmp_path / "snapshot-000000000002.safetensors").exists()
    assert not (tmp_path / "snapshot-000000000002.json").exists()
    assert _names(tmp_path) == ["snapshot-000000000001.json", "snapshot-000000000001.safetensors"]
    assert store.latest_valid()[0].covers_seq == 1  # type: ignore[index]


def test_a_crash_between_state_file_and_sidecar_leaves_an_incomplete_snapshot(
        tmp_path: Path, states: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore(tmp_path)
    store.save(states[0], covers_seq=1, offsets={0: 1})
    real_replace = os.replace

    def crash_on_commit(src: Any, dst: Any) -> None:
        if Path(dst).name == "snapshot-000000000002.json":
            raise SimulatedCrash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_commit)
    with pytest.raises(SimulatedCrash):
        store.save(states[1], covers_seq=2, offsets={0: 2})
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "snapshot-000000000002.safetensors").exists()  # complete, uncommitted
    info, _ = store.latest_valid()  # type: ignore[misc]
    assert info.covers_seq == 1
    assert [(s.covers_seq, s.reason) for s in store.skipped] == [(2, "incomplete: no sidecar")]


def test_saving_a_seq_again_replaces_it(tmp_path: Path, states: list[dict[str, Any]]) -> None:
    store = SnapshotStore(tmp_path)
    store.save(states[0], covers_seq=4, offsets={0: 1})
    store.save(states[3], covers_seq=4, offsets={0: 2})
    info, state = store.latest_valid()  # type: ignore[misc]
    assert info.offsets == {0: 2} and state_sha256(state) == state_sha256(states[3])
    assert len(_names(tmp_path)) == 2


def test_bad_arguments(tmp_path: Path, states: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="keep"):
        SnapshotStore(tmp_path, keep=0)
    store = SnapshotStore(tmp_path)
    for seq in (-1, True, 1.0):
        with pytest.raises(ValueError, match="covers_seq"):
            store.save(states[0], covers_seq=seq, offsets={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offsets"):
        store.save(states[0], covers_seq=1, offsets={0: -1})
    assert _names(tmp_path) == []
