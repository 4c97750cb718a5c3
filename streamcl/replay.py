"""Rebuild a learner's state from its journal (audit, debugging, "what was the model at seq k").

:func:`replay` starts from scratch (the ``trainer_config`` of the journal's first ``start``
entry that carries one, or the one given) or from the newest valid snapshot covering at most
``to_seq``, and re-applies every journaled ``batch`` entry up to ``to_seq`` exactly as the
service's recovery does (:func:`streamcl.service.apply_batch_entry`: same ranges, same decoded
batches, same plans checked). Since training is deterministic, the result's
:func:`~streamcl.state.state_sha256` equals the live service's after the same entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from streamcl.registry.holdout import Holdout
from streamcl.service import apply_batch_entry, full_state
from streamcl.state import state_sha256
from streamcl.stream.consumer import RangeReader
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.messages import Decoder
from streamcl.stream.snapshots import SnapshotError, SnapshotStore
from streamcl.trainer import OnlineTrainer, TrainerConfig


def replay_trainer(bootstrap: str, name: str, topic: str, to_seq: int | None = None,
                   snapshot_dir: str | None = None, config: TrainerConfig | None = None,
                   progress: Callable[[int], Any] | None = None, *,
                   encoding: str | None = None,
                   client_config: dict[str, Any] | None = None
                   ) -> tuple[OnlineTrainer, int, Holdout | None]:
    """The trainer as of journal entry ``to_seq`` (``None``: the end), the number of batch
    entries applied, and the quality gate's holdout (``None`` when the service kept none; its
    configuration comes from the journal's ``start`` entry). ``progress(seq)`` is called after
    each applied batch entry."""
    journal = Journal(bootstrap, journal_topic(name), client_config, create=False)
    try:
        start = None
        if config is None or encoding is None:
            start = next((e for e in journal.read(to_seq=to_seq)
                          if e["type"] == "start" and "trainer_config" in e), None)
        if config is None:
            if start is None:
                raise ValueError(f"{journal.topic}: no start entry with a config (before seq "
                                 f"{to_seq}); pass config=")
            config = TrainerConfig.from_json(start["trainer_config"])
        if encoding is None:
            encoding = (start or {}).get("encoding", "auto")
        if start is None:
            start = next((e for e in journal.read(to_seq=to_seq)
                          if e["type"] == "start" and "trainer_config" in e), None)
        spec = (start or {}).get("holdout")
        holdout = None if spec is None else Holdout(spec["fraction"], spec["size"], spec["seed"])
        trainer, covers = None, -1
        if snapshot_dir is not None:
            store = SnapshotStore(snapshot_dir)
            for info in store.list():
                if to_seq is not None and info.covers_seq > to_seq:
                    continue
                with contextlib.suppress(SnapshotError):
                    _, state = store.load(info.covers_seq)
                    trainer, covers = OnlineTrainer.from_state(state), info.covers_seq
                    if holdout is not None and "holdout" in state:
                        holdout.load_state_dict(state["holdout"])
                    break
            if trainer is not None and trainer.config.to_json() != config.to_json():
                raise ValueError(f"snapshot {covers} has a different configuration")
        if trainer is None:
            trainer = OnlineTrainer(config)
        consumer = RangeReader(bootstrap, topic, Decoder(config.input_shape, encoding=encoding),
                               client_config=client_config)
        batches = 0
        try:
            if to_seq is None or to_seq > covers:
                for entry in journal.read(from_seq=covers + 1, to_seq=to_seq):
                    if entry["type"] == "batch":
                        apply_batch_entry(trainer, consumer, entry, holdout)
                        batches += 1
                        if progress is not None:
                            progress(entry["seq"])
        finally:
            consumer.close()
        return trainer, batches, holdout
    finally:
        journal.close()


def replay(bootstrap: str, name: str, topic: str, to_seq: int | None = None,
           snapshot_dir: str | None = None, config: TrainerConfig | None = None,
           progress: Callable[[int], Any] | None = None, *, encoding: str | None = None,
           client_config: dict[str, Any] | None = None) -> tuple[str, int]:
    """``(state_sha256, batch entries applied)`` of the state rebuilt up to ``to_seq``."""
    trainer, batches, holdout = replay_trainer(bootstrap, name, topic, to_seq, snapshot_dir,
                                               config, progress, encoding=encoding,
                                               client_config=client_config)
    return state_sha256(full_state(trainer, holdout)), batches
