"""Rebuild a learner's state from its journal (audit, debugging, "what was the model at seq k").

:func:`replay_learner` takes the configuration, input encoding and holdout from the journal's
first ``start`` entry that carries a configuration (or the one given), then calls
:func:`streamcl.learner.rebuild` — the procedure recovery uses too — from the newest valid
snapshot covering at most ``to_seq`` (or from scratch). Since training is deterministic, the
result's SHA-256 equals the live service's after the same entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from streamcl.learner import Learner, rebuild
from streamcl.parallel import ReplicaGroup, replica_snapshot_dir
from streamcl.stream.consumer import RangeReader
from streamcl.stream.entries import Batch, Entry, Start
from streamcl.stream.journal import Journal, journal_topic
from streamcl.stream.messages import Decoder
from streamcl.stream.snapshots import SnapshotStore
from streamcl.trainer import TrainerConfig


def first_start(journal: Journal, to_seq: int | None = None) -> Start | None:
    """The journal's first ``start`` entry that carries a trainer configuration."""
    with contextlib.closing(journal.read(to_seq=to_seq)) as entries:
        return next((e for e in entries
                     if isinstance(e, Start) and e.trainer_config is not None), None)


def replay_learner(bootstrap: str, name: str, topic: str, to_seq: int | None = None,
                   snapshot_dir: str | None = None, config: TrainerConfig | None = None,
                   progress: Callable[[int], Any] | None = None, *,
                   encoding: str | None = None,
                   client_config: dict[str, Any] | None = None,
                   group: ReplicaGroup | None = None) -> tuple[Learner, int]:
    """The learner as of journal entry ``to_seq`` (``None``: the end) and the number of batch
    entries applied; ``progress(seq)`` is called after each applied batch entry.

    A journal written by N data-parallel replicas is replayed by N (``group``: this process's
    place among them; each reads its own partitions' ranges and its shards of the snapshots
    under ``<snapshot_dir>/rank-<r>``), since each replica's memory shard is part of the
    state."""
    with Journal(bootstrap, journal_topic(name), client_config, create=False) as journal:
        start = first_start(journal, to_seq)
        if config is None:
            if start is None or start.trainer_config is None:
                raise ValueError(f"{journal.topic}: no start entry with a config (before seq "
                                 f"{to_seq}); pass config=")
            config = TrainerConfig.from_json(start.trainer_config)
        encoding = encoding or (start.encoding if start else None) or "auto"
        source = RangeReader(bootstrap, topic, Decoder(config.input_shape, encoding=encoding),
                             client_config=client_config)

        def on_entry(entry: Entry, learner: Learner) -> None:
            if progress is not None and isinstance(entry, Batch):
                progress(entry.seq)

        if group is not None and snapshot_dir is not None:
            snapshot_dir = replica_snapshot_dir(snapshot_dir, group.rank)
        try:
            rebuilt = rebuild(journal, source, config, start.holdout if start else None,
                              None if snapshot_dir is None else SnapshotStore(snapshot_dir),
                              to_seq, on_entry=on_entry, group=group)
        finally:
            source.close()
    return rebuilt.learner, rebuilt.replayed


def replay(bootstrap: str, name: str, topic: str, to_seq: int | None = None,
           snapshot_dir: str | None = None, config: TrainerConfig | None = None,
           progress: Callable[[int], Any] | None = None, *, encoding: str | None = None,
           client_config: dict[str, Any] | None = None,
           group: ReplicaGroup | None = None) -> tuple[str, int]:
    """``(state SHA-256, batch entries applied)`` of the state rebuilt up to ``to_seq``."""
    learner, batches = replay_learner(bootstrap, name, topic, to_seq, snapshot_dir, config,
                                      progress, encoding=encoding, client_config=client_config,
                                      group=group)
    digest = learner.sha256()
    if group is None:
        return digest, batches
    return group.state_sha256(digest), batches


def replicas_of(bootstrap: str, name: str, to_seq: int | None = None,
                client_config: dict[str, Any] | None = None) -> int:
    """How many data-parallel replicas wrote the journal (its first start entry says)."""
    with Journal(bootstrap, journal_topic(name), client_config, create=False) as journal:
        start = first_start(journal, to_seq)
    return 1 if start is None else start.replicas
