"""The journal's entries as typed values: one frozen dataclass per entry type.

Why typed: the journal outlives the code that wrote it (a model published a year ago must be
rebuildable from its log), and every reader (recovery, ``streamcl replay``, ``streamcl report``,
the registry CLI) must agree on what an entry holds. So each type declares its fields once,
converts itself to and from JSON, and every entry carries the ``format`` it was written in.

Compatibility rules, which :func:`entry_from_json` applies:

* format 0 is what streamcl wrote before entries had a ``format`` field (the same fields; a
  ``start`` entry then carried the configuration's keys at its top level, which are ignored);
* a field this version does not know is ignored (a newer writer may add fields), and a field an
  older writer did not write takes its default;
* an entry type this version does not know is read as :class:`Unknown` and skipped by replay;
* a format newer than :data:`FORMAT` raises: an old reader must not half-understand a new log.

>>> e = Batch(ranges={0: (10, 41)}, plan={"position": 0}, samples=31, rejected=1)
>>> e.to_json()["ranges"], entry_from_json({**e.to_json(), "seq": 7}).ranges
({'0': [10, 41]}, {0: (10, 41)})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from streamcl.metrics.continual import AccuracyMatrix

#: the entry format this version writes
FORMAT = 1


class EntryError(ValueError):
    """A journal record is not an entry this version can read (the message says why)."""


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a configuration's canonical JSON (e.g. ``TrainerConfig.to_json()``).

    >>> config_hash({"b": 1, "a": [2]}) == config_hash({"a": [2], "b": 1})
    True
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def owns(partition: int, rank: int, world: int) -> bool:
    """Whether replica ``rank`` of ``world`` reads input ``partition``: every ``world``-th one
    from ``rank``. Fixed, so the journal's ranges say who read what: the live consumer and a
    rebuild from the journal both take their partitions by this rule."""
    return partition % world == rank


def ranges_to_json(ranges: Mapping[int, tuple[int, int]]) -> dict[str, list[int]]:
    return {str(int(p)): [int(first), int(last)] for p, (first, last) in sorted(ranges.items())}


def ranges_from_json(data: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """``{"0": [10, 41]}`` -> ``{0: (10, 41)}`` (what a range source's ``read_ranges`` takes).

    >>> ranges_from_json({"1": [5, 9], "0": [10, 41]})
    {0: (10, 41), 1: (5, 9)}
    """
    return {int(p): (int(first), int(last)) for p, (first, last) in
            sorted(data.items(), key=lambda kv: int(kv[0]))}


def offsets_to_json(offsets: Mapping[int, int]) -> dict[str, int]:
    return {str(int(p)): int(o) for p, o in sorted(offsets.items())}


def offsets_from_json(data: Mapping[str, Any]) -> dict[int, int]:
    """``{"0": 42}`` -> ``{0: 42}`` (what a batch source's ``seek`` and ``commit`` take)."""
    return {int(p): int(o) for p, o in sorted(data.items(), key=lambda kv: int(kv[0]))}


@dataclass(frozen=True, kw_only=True)
class Entry:
    """What every entry has: its position in the log and when it was appended.

    ``seq`` is -1 until :meth:`streamcl.stream.journal.Journal.append` numbers the entry (0, 1,
    2, ... with no gaps); ``ts`` is wall-clock seconds at the append (informational only:
    nothing replayed depends on it).
    """

    type: ClassVar[str] = ""
    #: fields that are not JSON as they are: field name -> (to JSON, from JSON)
    codecs: ClassVar[dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]]] = {}
    seq: int = -1
    ts: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name in self.codecs:
                value = self.codecs[f.name][0](value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        """The entry of a JSON object (unknown keys dropped, missing ones defaulted)."""
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if value is not None and f.name in cls.codecs:
                    value = cls.codecs[f.name][1](value)
                kw[f.name] = value
        return cls(**kw)

    def numbered(self, seq: int, ts: float) -> Entry:
        """This entry as appended: at ``seq``, at ``ts`` (unless it already has a ``ts``)."""
        return dataclasses.replace(self, seq=seq, ts=self.ts if self.ts is not None else ts)


@dataclass(frozen=True, kw_only=True)
class HoldoutSpec:
    """How the quality gate's holdout is drawn (replay rebuilds it from this)."""

    fraction: float
    size: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class Start(Entry):
    """A trainer process started: who, with which configuration, after how much replay.

    ``trainer_config`` is ``TrainerConfig.to_json()`` and ``encoding`` the input encoding, so
    that ``streamcl replay`` can rebuild from an empty state with nothing but the log.
    ``torch_threads`` is the intra-op thread count the batches after this entry were trained
    with: a float reduction split over 2 threads sums in another order than over 1, so the
    same batches give other weights (last bits) at another count. Replay and recovery train
    each stretch of the log at the count its ``start`` entry names (``None``: not recorded, an
    older log; the replaying process's own count is used).
    """

    type: ClassVar[str] = "start"
    codecs: ClassVar = {"holdout": (dataclasses.asdict,
                                    lambda d: HoldoutSpec(fraction=d["fraction"],
                                                          size=d["size"], seed=d["seed"]))}
    config_hash: str
    pid: int | None = None          # the writing process (None: not recorded)
    host: str | None = None
    trainer_config: dict[str, Any] | None = None
    encoding: str | None = None
    topic: str | None = None
    snapshot_seq: int = -1
    replayed: int = 0
    holdout: HoldoutSpec | None = None
    torch_threads: int | None = None
    #: how many data-parallel replicas train from here on (a journal is replayed by as many)
    replicas: int = 1


@dataclass(frozen=True, kw_only=True)
class Batch(Entry):
    """Learn from a micro-batch: its offset ranges (inclusive, per input partition), the
    trainer's plan for it (``Plan.to_json()``), and its counts of samples and rejected
    messages (which a replay checks the re-read batch against)."""

    type: ClassVar[str] = "batch"
    codecs: ClassVar = {"ranges": (ranges_to_json, ranges_from_json)}
    ranges: dict[int, tuple[int, int]]
    plan: dict[str, Any]
    samples: int
    rejected: int = 0
    #: data-parallel: each replica's ``[samples, rejected]`` in rank order (``ranges`` holds
    #: all of theirs: replica r reads the partitions p with p % len(replicas) == r)
    replicas: list[list[int]] | None = None

    @property
    def next_offsets(self) -> dict[int, int]:
        """The input offset after this batch, per partition."""
        return {p: last + 1 for p, (_, last) in self.ranges.items()}


@dataclass(frozen=True, kw_only=True)
class Snapshot(Entry):
    """A snapshot was committed: its file, digest, the last seq whose effects it includes,
    and the next input offset per partition."""

    type: ClassVar[str] = "snapshot"
    codecs: ClassVar = {"offsets": (offsets_to_json, offsets_from_json)}
    path: str
    sha256: str
    covers_seq: int
    offsets: dict[int, int]
    #: data-parallel: the SHA-256 of each replica's shard of the set, in rank order (``path``
    #: and ``sha256`` are replica 0's; each replica keeps its shard on its own volume)
    shards: list[str] | None = None


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """A candidate judged on the holdout: what a verdict entry and a manifest record.

    ``accuracy_matrix`` rows are the experiences finished so far plus the current one.
    Undefined numbers (no holdout sample, no production to compare) are ``None``.
    """

    holdout_accuracy: float | None
    holdout_samples: int
    prequential_accuracy: float | None
    accuracy_matrix: AccuracyMatrix
    average_accuracy: float | None
    forgetting: float | None
    backward_transfer: float | None
    negative_flip_rate: float | None
    experience: int
    finished: bool

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["accuracy_matrix"] = self.accuracy_matrix.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        kw = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        kw["accuracy_matrix"] = AccuracyMatrix.from_json(data.get("accuracy_matrix") or {})
        kw["holdout_samples"] = int(kw["holdout_samples"] or 0)
        kw["experience"] = int(kw["experience"] or 0)
        kw["finished"] = bool(kw["finished"])
        return cls(**kw)


@dataclass(frozen=True, kw_only=True)
class Gate:
    """The quality gate's verdict: promote the candidate or not, and on what numbers."""

    decision: str
    reason: str
    candidate: float | None
    production: float | None
    production_version: int | None
    tolerance: float

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Gate:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, kw_only=True)
class Verdict(Entry):
    """What the publication gate decided at ``position`` (samples trained), and why."""

    codecs: ClassVar = {"metrics": (Evaluation.to_json, Evaluation.from_json),
                        "gate": (Gate.to_json, Gate.from_json)}
    position: int
    trigger: str
    metrics: Evaluation
    gate: Gate
    newest_sample_ts_ms: int | None = None


@dataclass(frozen=True, kw_only=True)
class Publish(Verdict):
    """A model version was published (journaled before the registry is written); the state
    it publishes is the one after every ``batch`` entry before it."""

    type: ClassVar[str] = "publish"
    version: int


@dataclass(frozen=True, kw_only=True)
class Reject(Verdict):
    """The gate refused the candidate."""

    type: ClassVar[str] = "reject"
    reason: str


@dataclass(frozen=True, kw_only=True)
class Unknown(Entry):
    """An entry of a type this version does not know (a newer writer's): kept, not acted on."""

    type: ClassVar[str] = "unknown"
    kind: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)


#: every entry type this version reads, by its ``type`` string
TYPES: dict[str, type[Entry]] = {cls.type: cls for cls in (Start, Batch, Snapshot, Publish,
                                                           Reject)}


def entry_from_json(data: Mapping[str, Any]) -> Entry:
    """The typed entry a journal record holds (see the module docstring for old formats)."""
    kind, fmt = data.get("type"), data.get("format", 0)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise EntryError(f"entry {data.get('seq')!r} has format {fmt!r}; this version reads "
                         f"formats 0..{FORMAT}: upgrade streamcl to read this journal")
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return Unknown(seq=int(data.get("seq", -1)), ts=data.get("ts"), kind=str(kind),
                       data=dict(data))
    try:
        return cls.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise EntryError(f"entry {data.get('seq')!r}: not a valid {kind!r} entry "
                         f"({type(exc).__name__}: {exc})") from None


__all__ = ["FORMAT", "TYPES", "Batch", "Entry", "EntryError", "Evaluation", "Gate",
           "HoldoutSpec", "Publish", "Reject", "Snapshot", "Start", "Unknown", "Verdict",
           "config_hash", "entry_from_json", "offsets_from_json", "offsets_to_json",
           "ranges_from_json", "ranges_to_json"]
