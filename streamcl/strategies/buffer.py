"""Replay memories shared by the strategies: a reservoir over the stream and a balanced store.

Both keep named tensor fields (``x``, ``y``, ``logits``...) in preallocated storage, draw every
random choice from the owning strategy's generator, and save as plain tensors.

>>> import torch
>>> buf = ReservoirBuffer(capacity=3, generator=torch.Generator().manual_seed(0))
>>> buf.add(x=torch.arange(10.0).unsqueeze(1), y=torch.arange(10))
>>> len(buf), buf.seen
(3, 10)
"""

from __future__ import annotations

from typing import Any

import torch


class _Storage:
    """Preallocated named fields with ``capacity`` rows; rows ``[0, size)`` are in use."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 1:
            raise ValueError(f"mem_size must be >= 1, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.size = 0
        self.fields: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.size

    def usage(self) -> tuple[int, int]:
        """Rows held and capacity."""
        return self.size, self.capacity

    def _allocate(self, batch: dict[str, torch.Tensor]) -> None:
        if not self.fields:
            self.fields = {k: v.new_zeros((self.capacity, *v.shape[1:])) for k, v in batch.items()}

    def _write(self, slot: int, batch: dict[str, torch.Tensor], i: int) -> None:
        for k, v in batch.items():
            self.fields[k][slot] = v[i]

    def get(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.fields.items()}

    def all(self) -> dict[str, torch.Tensor]:
        return {k: v[: self.size] for k, v in self.fields.items()}

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """``min(n, size)`` distinct stored rows, uniformly at random."""
        index = torch.randperm(self.size, generator=self.generator)[:n]
        return self.get(index)

    def pad_field(self, name: str, n_cols: int) -> None:
        """Widen a 2-D field (e.g. stored logits when the head grows) with zero columns."""
        t = self.fields.get(name)
        if t is not None and t.shape[1] < n_cols:
            self.fields[name] = torch.cat([t, t.new_zeros(t.shape[0], n_cols - t.shape[1])], 1)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "size": self.size,
                "fields": {k: v[: self.size] for k, v in self.fields.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity, self.size = state["capacity"], state["size"]
        self.fields = {}
        if state["fields"]:
            self._allocate({k: v[:1] for k, v in state["fields"].items()})
            for k, v in state["fields"].items():
                self.fields[k][: self.size] = v


class ReservoirBuffer(_Storage):
    """Reservoir sampling (Vitter's algorithm R): every sample seen so far is stored with equal
    probability ``capacity / seen``, without knowing the stream's length in advance."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        super().__init__(capacity, generator)
        self.seen = 0

    def add(self, **batch: torch.Tensor) -> None:
        self._allocate(batch)
        n = len(next(iter(batch.values())))
        fill = min(n, self.capacity - self.size)
        if fill:
            for k, v in batch.items():
                self.fields[k][self.size:self.size + fill] = v[:fill]
            self.size += fill
        rest = n - fill
        if rest:
            # the sample at stream position p replaces slot j ~ U[0, p] when j < capacity
            pos = torch.arange(self.seen + fill, self.seen + n, dtype=torch.float64)
            j = (torch.rand(rest, generator=self.generator, dtype=torch.float64) * (pos + 1)).long()
            for i, slot in enumerate(j.tolist()):
                if slot < self.capacity:
                    self._write(slot, batch, fill + i)
        self.seen += n

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = state["seen"]


class BalancedBuffer(_Storage):
    """Capacity split equally among groups (classes, or experiences), reservoir within a group.

    When a new group arrives, room is made by evicting random rows of the largest group, so
    the memory stays bounded however many groups the stream brings (each keeps
    ``capacity // n_groups`` rows, give or take one).
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        super().__init__(capacity, generator)
        self.seen: dict[int, int] = {}
        self.slots: dict[int, list[int]] = {}

    def add(self, groups: torch.Tensor, **batch: torch.Tensor) -> None:
        self._allocate(batch)
        draws = torch.rand(len(groups), 2, generator=self.generator, dtype=torch.float64).tolist()
        for i, g in enumerate(groups.tolist()):
            self.seen[g] = self.seen.get(g, 0) + 1
            mine = self.slots.setdefault(g, [])
            quota = self.capacity // len(self.slots)
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            elif len(mine) < quota:
                largest = max(self.slots, key=lambda k: (len(self.slots[k]), -k))
                victims = self.slots[largest]
                slot = victims.pop(int(draws[i][0] * len(victims)))
            else:
                j = int(draws[i][1] * self.seen[g])  # reservoir within the group
                if j >= len(mine):
                    continue
                slot = mine.pop(j)
            mine.append(slot)
            self._write(slot, batch, i)

    def group_rows(self, g: int) -> torch.Tensor:
        return torch.tensor(sorted(self.slots.get(g, [])), dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        # slot numbers are kept as they are: row i of `fields` is slot i
        return {**super().state_dict(), "seen": {str(k): v for k, v in self.seen.items()},
                "slots": {str(k): v for k, v in self.slots.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = {int(k): v for k, v in state["seen"].items()}
        self.slots = {int(k): list(v) for k, v in state["slots"].items()}


class ExperienceMemory:
    """A replay memory of *past* experiences, balanced per experience, and a reservoir of the
    open one that becomes its share when the experience ends.

    Why past only: the incoming batch already trains the open experience's classes. A memory
    that also replays them (a reservoir over the whole stream) gives the newest classes a
    second share of every step and tilts the head towards them; the older classes are then
    predicted less and less. Holding the open experience apart until its boundary keeps every
    replayed sample from the past. Why balanced: each finished experience keeps an equal share
    (``mem_size / experiences``), so an experience seen five times in a row, or one ten times
    longer than the others, does not crowd out the rest.

    While no experience has ended yet there is no past, and replay draws from the open
    experience's reservoir instead: a stream whose labels come in runs would otherwise forget
    its first classes before its first boundary.

    The open experience's reservoir holds at most the share it will get
    (``mem_size // (finished + 1)``), so the memory never holds more than 1.5 x ``mem_size``.
    A ``transform`` given to :meth:`close_experience` may rewrite the rows as they join the
    past (DER re-scores their logits with the model that has learned the experience).

    >>> import torch
    >>> mem = ExperienceMemory(4, torch.Generator().manual_seed(0))
    >>> mem.add(x=torch.zeros(6, 1), y=torch.zeros(6, dtype=torch.long))
    >>> mem.sample(2)["y"].tolist()          # no past yet: the open experience replays
    [0, 0]
    >>> mem.close_experience(0)
    >>> mem.add(x=torch.ones(6, 1), y=torch.ones(6, dtype=torch.long))
    >>> sorted(set(mem.sample(4)["y"].tolist()))   # only the finished experience replays
    [0]
    """

    def __init__(self, mem_size: int, generator: torch.Generator) -> None:
        self.mem_size = mem_size
        self.generator = generator
        self.past = BalancedBuffer(mem_size, generator)
        self.current = ReservoirBuffer(mem_size, generator)

    def __len__(self) -> int:
        """Rows that :meth:`sample` draws from."""
        return len(self.past) or len(self.current)

    @property
    def capacity(self) -> int:
        """What the past holds at most (``mem_size``), as a buffer's ``capacity``."""
        return self.mem_size

    def usage(self) -> tuple[int, int]:
        """Rows held (past and open experience) and the past's capacity."""
        return len(self.past) + len(self.current), self.mem_size

    def add(self, **batch: torch.Tensor) -> None:
        self.current.add(**batch)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        return (self.past if len(self.past) else self.current).sample(n)

    def buffers(self) -> tuple[_Storage, ...]:
        return (self.past, self.current)

    def close_experience(self, experience: int, transform=None) -> None:
        """File the open experience's reservoir as experience ``experience``'s share."""
        if len(self.current):
            rows = self.current.all()
            if transform is not None:
                rows = transform(rows)
            groups = torch.full((len(self.current),), experience, dtype=torch.long)
            self.past.add(groups, **rows)
        share = max(1, self.mem_size // (len(self.past.slots) + 1))
        self.current = ReservoirBuffer(share, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"past": self.past.state_dict(), "current": self.current.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.past.load_state_dict(state["past"])
        self.current = ReservoirBuffer(1, self.generator)
        self.current.load_state_dict(state["current"])
