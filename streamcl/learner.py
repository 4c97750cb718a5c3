"""The learner: the state the journal rebuilds (trainer + holdout), and the one way to rebuild it.

A journaled ``batch`` entry is applied by :meth:`Learner.apply`, and by nothing else: the live
loop, recovery after a crash and ``streamcl replay`` all call it, so they cannot drift apart.
:func:`rebuild` is the one procedure that turns a snapshot plus the journal up to a sequence
number into a :class:`Learner`; recovery and replay both call it.

A step, in order (the live loop's, and the replay's):

1. :meth:`Learner.prepare` takes out the samples whose label would grow the head past
   ``max_classes`` (:attr:`Step.refused`: the live loop dead-letters them), splits the
   held-out samples off (the holdout keeps a deterministic share, by stream index) and plans
   the rest: the trainer's one decision. Each part is a function of the learner's state and
   the batch, so a replay takes out, holds out and plans exactly what the live loop did.
2. The live loop journals the plan as a :class:`~streamcl.stream.entries.Batch` entry; a replay
   reads that entry back.
3. :meth:`Learner.apply` checks the prepared step against the entry (same samples, same plan:
   a replay that disagrees with its log raises :class:`ReplayMismatch`), opens the experience
   the plan says, trains, and files the held-out samples.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from streamcl.parallel import ReplicaGroup
from streamcl.registry.holdout import Holdout
from streamcl.state import state_sha256
from streamcl.strategies.base import share
from streamcl.stream.consumer import MicroBatch
from streamcl.stream.entries import Batch, Entry, HoldoutSpec, Start, owns
from streamcl.stream.journal import Journal, JournalLost
from streamcl.stream.snapshots import SnapshotError, SnapshotStore
from streamcl.stream.sources import RangeSource
from streamcl.trainer import OnlineTrainer, Plan, StepResult, TrainerConfig

log = logging.getLogger(__name__)


class ReplayMismatch(RuntimeError):
    """Replaying a journaled batch did not reproduce the journaled decision (log and code
    disagree: different code, configuration, input data or decoding)."""


class Refused(NamedTuple):
    """A sample taken out of its batch because its label would grow the head past
    ``max_classes``. ``index`` is its place among the batch's valid samples (ordered by
    partition, then offset); the batch keeps decoded arrays, not per-sample offsets, so
    ``index``, ``id`` and the batch's ranges are what identify it."""

    index: int
    label: int
    id: str | None


@dataclass
class Step:
    """A batch made ready to learn: its training part, held-out mask and plan, and the samples
    refused by the label cap."""

    batch: MicroBatch
    train: MicroBatch
    mask: torch.Tensor | None   # held-out samples of ``kept`` (None: none)
    plan: Plan | None           # None: nothing to train (every sample held out, or empty)
    refused: list[Refused] = field(default_factory=list)  # over max_classes: not learned
    kept: MicroBatch | None = None  # the batch less ``refused`` (None: the whole batch)

    def entry(self) -> Batch:
        """The journal entry that records this step (data-parallel: :meth:`group_entry`)."""
        return Batch(ranges=self.batch.ranges, plan=self.plan_json(), samples=len(self.batch),
                     rejected=self.batch.rejected)

    @staticmethod
    def header_of(batch: MicroBatch) -> list[int]:
        """A replica's part of a data-parallel entry that all know before the ranges:
        ``[samples, rejected, number of partition ranges]`` of its ``batch`` (a service that
        exchanged it already, to learn whether anyone brought anything, passes it on to
        :meth:`group_entry`)."""
        return [len(batch), batch.rejected, len(batch.ranges)]

    def group_entry(self, group: ReplicaGroup, headers: list[list[int]]) -> Batch:
        """The data-parallel step's entry (every replica calls it), given every replica's
        :meth:`header_of` by rank: every replica's ranges (their partitions are disjoint, so
        one map holds them, gathered in one call) and each one's ``[samples, rejected]``."""
        flat = [v for p, (first, last) in sorted(self.batch.ranges.items())
                for v in (p, first, last)]
        parts = group.gather(torch.tensor(flat, dtype=torch.long), [3 * h[2] for h in headers])
        ranges = {int(part[i]): (int(part[i + 1]), int(part[i + 2]))
                  for part in parts for i in range(0, len(part), 3)}
        return Batch(ranges=ranges, plan=self.plan_json(), samples=sum(h[0] for h in headers),
                     rejected=sum(h[1] for h in headers), replicas=[h[:2] for h in headers])

    def plan_json(self) -> dict[str, Any]:
        return self.plan.to_json() if self.plan else {}


@dataclass
class Applied:
    """What applying a step did: the training result (None if nothing trained) and how many
    samples went to the holdout."""

    result: StepResult | None
    held: int


class Learner:
    """The trainer and its quality-gate holdout: everything replay must reproduce."""

    def __init__(self, trainer: OnlineTrainer, holdout: Holdout | None = None) -> None:
        self.trainer = trainer
        self.holdout = holdout

    @property
    def group(self) -> ReplicaGroup | None:
        """The replicas this learner is one of (``None``: it is alone)."""
        return self.trainer.group

    @classmethod
    def fresh(cls, config: TrainerConfig, holdout: HoldoutSpec | None,
              group: ReplicaGroup | None = None) -> Learner:
        return cls(OnlineTrainer(config, group=group), _holdout(holdout, group))

    @classmethod
    def from_state(cls, state: dict[str, Any], holdout: HoldoutSpec | None,
                   group: ReplicaGroup | None = None) -> Learner:
        learner = cls(OnlineTrainer.from_state(state, group), _holdout(holdout, group))
        if learner.holdout is not None and "holdout" in state:
            learner.holdout.load_state_dict(state["holdout"])
        return learner

    @property
    def position(self) -> int:
        return self.trainer.position

    @property
    def experience(self) -> int:
        return self.trainer.strategy.experience

    def prepare(self, batch: MicroBatch) -> Step:
        """Refuse samples over the label cap, split off the held-out ones, plan the rest.

        Refused samples leave before the holdout split: a label the head may never learn is
        no more use to the quality gate than to training, and they do not advance the
        holdout's stream index (like messages the decoder rejected)."""
        kept, refused = batch, []
        # data-parallel, every replica joins the global decisions, with or without samples
        alone = self.group is None
        over = self.trainer.over_cap(batch.y) if len(batch) or not alone else None
        if over is not None:
            refused = [Refused(i, int(batch.y[i]), batch.ids[i] if batch.ids else None)
                       for i in over.nonzero().flatten().tolist()]
            kept = _subset(batch, ~over)
        train, mask = _split_holdout(kept, self.holdout)
        plan = self.trainer.plan(train.y, train.task) if len(train) or not alone else None
        return Step(batch, train, mask, plan, refused, None if kept is batch else kept)

    def apply(self, step: Step, entry: Batch) -> Applied:
        """Apply ``step`` as journaled by ``entry`` (the one procedure; see the module)."""
        samples, rejected = entry.samples, entry.rejected
        if self.group is not None and entry.replicas is not None:  # this replica's part
            samples, rejected = entry.replicas[self.group.rank]
        if len(step.batch) != samples or step.batch.rejected != rejected:
            raise ReplayMismatch(f"journal entry {entry.seq}: ranges {entry.ranges} give "
                                 f"{len(step.batch)} samples / {step.batch.rejected} rejected, "
                                 f"the journal says {samples} / {rejected}")
        planned = step.plan.to_json() if step.plan else {}
        if planned != entry.plan:
            raise ReplayMismatch(f"journal entry {entry.seq}: replay plans {planned}, the "
                                 f"journal says {entry.plan}")
        result = None
        if step.plan is not None:
            if step.plan.boundary is not None:
                self.trainer.end_experience(step.plan.boundary)
            result = self.trainer.learn(step.train.x, step.train.y, step.plan)
        return Applied(result, self._keep_holdout(step))

    def _keep_holdout(self, step: Step) -> int:
        """File the held-out samples; advance the holdout's stream index; return how many."""
        if self.holdout is None:
            return 0
        kept = step.batch if step.kept is None else step.kept
        if step.mask is None:
            self.holdout.advance(len(kept))
            return 0
        self.holdout.add(kept.x[step.mask], kept.y[step.mask], self.experience, len(kept))
        return int(step.mask.sum())

    def state_dict(self) -> dict[str, Any]:
        """The trainer's state, plus the holdout's if any (what :meth:`sha256` hashes)."""
        state = self.trainer.state_dict()
        if self.holdout is not None:
            state["holdout"] = self.holdout.state_dict()
        return state

    def sha256(self) -> str:
        return state_sha256(self.state_dict())


def _holdout(spec: HoldoutSpec | None, group: ReplicaGroup | None = None) -> Holdout | None:
    """The holdout of ``spec``; a data-parallel replica holds its share of ``size`` (the
    gate pools the shards: :class:`~streamcl.registry.holdout.PooledHoldout`)."""
    if spec is None:
        return None
    size = spec.size if group is None else max(1, share(spec.size, group.rank,
                                                          group.world_size))
    return Holdout(spec.fraction, size, spec.seed)


def _split_holdout(batch: MicroBatch, holdout: Holdout | None
                   ) -> tuple[MicroBatch, torch.Tensor | None]:
    """The batch's training part, and the mask of its held-out samples (``None``: none)."""
    if holdout is None or holdout.fraction == 0 or not len(batch):
        return batch, None
    mask = holdout.split(len(batch))
    if not bool(mask.any()):
        return batch, None
    return _subset(batch, ~mask), mask


def _subset(batch: MicroBatch, keep: torch.Tensor) -> MicroBatch:
    """The samples of ``batch`` where ``keep`` is true (same ranges and counts)."""
    task = None if batch.task is None else batch.task[keep]
    ids = [i for i, k in zip(batch.ids, keep.tolist(), strict=True) if k] if batch.ids else []
    return MicroBatch(batch.x[keep], batch.y[keep], task, batch.ranges, batch.rejected,
                      batch.timestamp_ms, ids)


# -- rebuilding -------------------------------------------------------------------------------
@dataclass
class Rebuilt:
    """A learner rebuilt from a snapshot and the journal, and where that left the stream."""

    learner: Learner
    snapshot_seq: int                 # covers_seq of the snapshot started from (-1: none)
    snapshot_extra: dict[str, Any]    # what the snapshot kept beside the learner
    offsets: dict[int, int]           # next input offset per partition
    replayed: int = 0                 # batch entries applied
    newest_ts_ms: int | None = None   # newest sample timestamp trained on
    entries: list[Entry] = field(default_factory=list)  # every entry after the snapshot


#: what a snapshot may keep beside the learner's state (the service's own small state)
SNAPSHOT_EXTRAS = ("publisher", "stream")


@contextlib.contextmanager
def training_threads(threads: int | None) -> Iterator[Callable[[int | None], None]]:
    """Train at ``threads`` intra-op threads (``None``: as now) until the block ends, then go
    back to the caller's count. Yields a setter for the count a later ``start`` entry names.

    Why: the journal records the count each stretch of batches was trained at
    (:class:`~streamcl.stream.entries.Start`), since the sums inside a matrix product split
    over another number of threads come out in other last bits. A replay at the recorded count
    is bit-exact on any machine; the process's own count comes back for live training.
    """
    before = torch.get_num_threads()

    def use(n: int | None) -> None:
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)

    use(threads)
    try:
        yield use
    finally:
        use(before)


def newest_snapshot(store: SnapshotStore, config: TrainerConfig, to_seq: int | None = None
                    ) -> tuple[int, dict[int, int], dict[str, Any]] | None:
    """``(covers_seq, offsets, state)`` of the newest valid snapshot covering at most
    ``to_seq`` (``None``: any); its configuration must be ``config``'s."""
    if to_seq is None:
        found = store.latest_valid()
        if found is None:
            return None
        info, state = found
    else:
        for info in store.list():
            if info.covers_seq > to_seq:
                continue
            with contextlib.suppress(SnapshotError):
                _, state = store.load(info.covers_seq)
                break
        else:
            return None
    mine = config.to_json()
    if state.get("config") != mine:
        diff = sorted(k for k in mine if state.get("config", {}).get(k) != mine[k])
        raise ValueError(f"snapshot {info.path} was made with a different configuration "
                         f"({', '.join(diff)}); use its configuration or another learner name "
                         "/ snapshot directory")
    return info.covers_seq, dict(info.offsets), state


def _check_replicas(written_by: int, world: int, what: str) -> None:
    """A journal is replayed by as many replicas as wrote it: each replica's memory and
    holdout shard, and which partitions it read, are part of the state."""
    if written_by != world:
        raise ValueError(f"{what} written by {written_by} replica(s), this group has {world}: "
                         f"restart with {written_by} (WORLD_SIZE / --replicas), or start a new "
                         "history (another journal.name) to change the number of replicas")


def agreed_snapshot(store: SnapshotStore, config: TrainerConfig, group: ReplicaGroup,
                    to_seq: int | None = None
                    ) -> tuple[int, dict[int, int], dict[str, Any]] | None:
    """:func:`newest_snapshot` for a group of replicas (every replica calls it): the newest
    snapshot every replica holds a valid shard of, so that all start from the same journal
    entry. Shards written for the same entry are one consistent set even if the crash came
    before replica 0 journaled it: each is the state the log up to that entry makes."""
    mine = [i.covers_seq for i in store.list() if to_seq is None or i.covers_seq <= to_seq]
    common = set(mine)
    for theirs in group.gather_ints(mine):
        common &= set(theirs)
    for covers in sorted(common, reverse=True):
        found = None
        with contextlib.suppress(SnapshotError):
            found = newest_snapshot(store, config, covers)
        ok = found is not None and found[0] == covers
        if all(flag for flag, in group.exchange([int(ok)])):
            return found
    return None


def rebuild(journal: Journal, source: RangeSource, config: TrainerConfig,
            holdout: HoldoutSpec | None, snapshots: SnapshotStore | None = None,
            to_seq: int | None = None, *,
            on_start: Callable[[Rebuilt], None] | None = None,
            on_entry: Callable[[Entry, Learner], None] | None = None,
            group: ReplicaGroup | None = None) -> Rebuilt:
    """The learner as of journal entry ``to_seq`` (``None``: the log's end): the newest valid
    snapshot covering at most ``to_seq`` (or a fresh learner), then every ``batch`` entry after
    it, each batch read back from its offset ranges through ``source`` (a range source) and
    applied with :meth:`Learner.apply`. ``on_start(rebuilt)`` sees the snapshot's state
    (``snapshot_extra``: what its writer kept beside the learner) before any entry;
    ``on_entry(entry, learner)`` sees every entry after the
    snapshot, in order, right after it is applied (a ``publish`` entry thus sees the state it
    published).

    Data-parallel (``group``: every replica calls it at once), each replica starts from its
    shard of the newest snapshot set all of them hold (:func:`agreed_snapshot`), reads back
    only its own partitions' ranges of each batch entry, and applies the entry with the
    others (the plan and the gradient are collective, as they were live)."""
    if snapshots is None:
        found = None
    elif group is not None:
        found = agreed_snapshot(snapshots, config, group, to_seq)
    else:
        found = newest_snapshot(snapshots, config, to_seq)
    if found is None:
        out = Rebuilt(Learner.fresh(config, holdout, group), -1, {}, {})
    else:
        covers, offsets, state = found
        if covers >= journal.next_seq:
            raise JournalLost(f"a snapshot covers journal entry {covers} but {journal.topic} on "
                              f"{journal.bootstrap} ends before it (next seq {journal.next_seq}):"
                              " the broker was emptied or replaced; restore the journal topic, "
                              "or start a new history (another learner name, or an empty "
                              "snapshot directory)")
        extra = {k: state.pop(k) for k in SNAPSHOT_EXTRAS if k in state}
        out = Rebuilt(Learner.from_state(state, holdout, group), covers, extra, offsets)
    if on_start is not None:
        on_start(out)
    if to_seq is not None and to_seq <= out.snapshot_seq:
        return out
    out.entries = list(journal.read(from_seq=out.snapshot_seq + 1, to_seq=to_seq))
    # the batches are read ahead (by the consumer process, where there is one) while earlier
    # ones train
    rank, world = (0, 1) if group is None else (group.rank, group.world_size)
    if out.snapshot_seq >= 0:
        _check_replicas(out.snapshot_extra.get("stream", {}).get("replicas", 1), world,
                        "its snapshot was")
    for entry in out.entries:
        if isinstance(entry, Batch):
            _check_replicas(len(entry.replicas) if entry.replicas else 1, world,
                            f"journal entry {entry.seq} was")
    batches = source.read_many([{p: r for p, r in e.ranges.items() if owns(p, rank, world)}
                                for e in out.entries if isinstance(e, Batch)])
    # each stretch of batches at the thread count it was trained at: the snapshot's, then
    # each start entry's
    with training_threads(out.snapshot_extra.get("stream", {}).get("torch_threads")) as use:
        for entry in out.entries:
            if isinstance(entry, Start):
                use(entry.torch_threads)
            if isinstance(entry, Batch):
                step = out.learner.prepare(next(batches))
                out.learner.apply(step, entry)
                out.offsets.update(step.batch.next_offsets)
                if step.plan is not None and step.batch.timestamp_ms is not None:
                    out.newest_ts_ms = max(out.newest_ts_ms or 0, step.batch.timestamp_ms)
                out.replayed += 1
            if on_entry is not None:
                on_entry(entry, out.learner)
    return out


__all__ = ["Applied", "Learner", "Rebuilt", "Refused", "ReplayMismatch", "Step",
           "agreed_snapshot", "newest_snapshot", "rebuild", "training_threads"]
