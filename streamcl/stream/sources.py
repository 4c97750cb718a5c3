"""What the service needs from the streaming layer, as two narrow interfaces.

The training loop consumes a :class:`BatchSource`: micro-batches of the live stream, seeks,
commits, and the counters it exports as metrics. Recovery and ``streamcl replay`` use a
:class:`RangeSource`: the exact batches of journaled offset ranges, rebuilt outside any
consumer group. Writing them down as protocols lets the service depend on what it uses rather
than on a class: :class:`~streamcl.stream.consumer.BatchConsumer` (in-process) and
:class:`~streamcl.stream.prefetch.PrefetchingConsumer` (a child process, one batch ahead) are
both, :class:`~streamcl.stream.consumer.RangeReader` is a RangeSource only, and a test or a
file-backed source can be either without subclassing anything.

Both are ``runtime_checkable``, so ``isinstance`` checks that the members exist (not their
signatures: a type checker, or tests/stream/test_sources.py, checks those).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol, runtime_checkable

from streamcl.stream.consumer import MicroBatch


@runtime_checkable
class BatchSource(Protocol):
    """Validated micro-batches of a live stream, consumed in a consumer group.

    Offsets are next-offsets (partition -> the first offset *not* yet handled) everywhere.
    Nothing is committed unless :meth:`commit` is called.
    """

    @property
    def rejections(self) -> Mapping[str, int]:
        """Rejected messages seen in the live stream so far, by reason code (a Counter)."""
        ...

    def poll_batch(self, max_records: int, max_wait_s: float) -> MicroBatch | None:
        """The next batch of at most ``max_records`` valid samples (rejected messages ride
        along in its ranges), or ``None`` if nothing arrived within ``max_wait_s``."""
        ...

    def seek(self, offsets: dict[int, int]) -> None:
        """Continue the stream at these next-offsets (batches already read ahead are
        dropped)."""
        ...

    def seek_to_beginning(self, timeout_s: float = 30.0) -> dict[int, int]:
        """Continue at each partition's log start, not the group's committed offsets; returns
        the offsets sought."""
        ...

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit these next-offsets in the group."""
        ...

    def lag(self) -> dict[int, int]:
        """Messages between the position and the end of each assigned partition."""
        ...

    def close(self) -> None:
        """Leave the group without committing anything more."""
        ...


@runtime_checkable
class RangeSource(Protocol):
    """The batches of journaled offset ranges, decoded exactly as when first consumed."""

    def read_ranges(self, ranges: dict[int, tuple[int, int]],
                    timeout_s: float = 30.0) -> MicroBatch:
        """The batch of these ranges (partition -> (first, last) offset, both included);
        ``TimeoutError`` if they cannot all be read in time."""
        ...

    def read_many(self, many: Iterable[dict[int, tuple[int, int]]],
                  timeout_s: float = 30.0) -> Iterator[MicroBatch]:
        """The batches of these ranges, in order (an implementation may read ahead)."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...
