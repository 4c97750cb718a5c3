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
