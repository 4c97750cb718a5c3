"""The quality gate's holdout: recent labelled samples the trainer never learns from.

A live stream has no test set, so the service makes one: a fixed share of the valid samples
(``fraction``) is diverted before planning, and kept in a class-balanced buffer of ``size``
samples, tagged with the experience they arrived in. Each class keeps about
``size / n_classes`` samples and a new sample replaces a random one of its class: the holdout
follows the stream (a sample's expected age is about one class quota), so after a drift the
gate judges candidates on the new concept, not on a reservoir of the whole past. Candidates
and the production model are scored on it by the gate (:func:`gate_decision`), and per
experience for the accuracy matrix.

Which samples are held out must be reproducible by replay without storing a mask per batch:
sample ``k`` of the stream (counting every valid sample, trained or not) is held out iff
``splitmix64(seed, k)`` falls below ``fraction`` — a pure function of the stream index.

>>> h = Holdout(fraction=0.25, size=8, seed=0)
>>> mask = h.split(8)
>>> mask.tolist() == Holdout(fraction=0.25, size=8, seed=0).split(8).tolist()
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamcl.state import set_rng_state
from streamcl.strategies.buffer import BalancedBuffer

if TYPE_CHECKING:
    from streamcl.parallel import ReplicaGroup

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


class Holdout:
    """Which samples are held out, and the class-balanced reservoir of them."""

    def __init__(self, fraction: float, size: int, seed: int = 0) -> None:
        if not 0 <= fraction < 1:
            raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
        if size < 1:
            raise ValueError(f"holdout size must be >= 1, got {size}")
        self.fraction, self.size, self.seed = fraction, size, seed
        self.generator = torch.Generator().manual_seed(seed + 0x5EED)
        self.buffer = BalancedBuffer(size, self.generator)
        #: valid samples seen so far (held out or trained): the index the split hashes
        self.seen = 0

    def split(self, n: int) -> torch.Tensor:
        """Mask of the next ``n`` samples that are held out (does not advance the index)."""
        if self.fraction == 0 or n == 0:
            return torch.zeros(n, dtype=torch.bool)
        k = np.arange(self.seen, self.seen + n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = _splitmix64(np.uint64(self.seed) * _GOLDEN + k * _GOLDEN)
        u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return torch.from_numpy(u < self.fraction)

    def add(self, x: torch.Tensor, y: torch.Tensor, experience: int, n_seen: int) -> None:
        """Keep held-out samples ``x, y`` of ``experience``; advance the index by ``n_seen``
        (the batch's valid samples, held out or not)."""
        if len(y):
            buf = self.buffer
            buf.add(y, x=x, y=y, exp=torch.full((len(y),), experience, dtype=torch.long))
            quota = buf.capacity // len(buf.slots)
            for g in buf.seen:  # counts capped at the quota: replacement, not a reservoir
                buf.seen[g] = min(buf.seen[g], quota)
        self.advance(n_seen)

    def advance(self, n_seen: int) -> None:
        """Move the stream index past ``n_seen`` samples (a batch with none held out)."""
        self.seen += n_seen

    def __len__(self) -> int:
        return len(self.buffer)

    def evaluate(self, predict: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(correct mask, experience of each sample)`` of ``predict`` on the holdout, in
        slot order (the same order for every model, so flips can be compared)."""
        if not len(self.buffer):
            return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        data = self.buffer.all()
        return predict(data["x"]) == data["y"], data["exp"]

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "size": self.size, "seed": self.seed,
                "seen": self.seen, "generator": self.generator.get_state(),
                "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.fraction, self.size, self.seed)
        if (state["fraction"], state["size"], state["seed"]) != mine:
            raise ValueError(f"holdout state was made with (fraction, size, seed) = "
                             f"{(state['fraction'], state['size'], state['seed'])}, not {mine}")
        self.seen = state["seen"]
        set_rng_state(self.generator, state["generator"])
        self.buffer.load_state_dict(state["buffer"])


class PooledHoldout:
    """Every replica's holdout shard, pooled in rank order: what the quality gate of a
    data-parallel learner scores candidate and production on (replica 0 judges; each replica
    held out from its own samples). Inputs are pooled as the float32 the model sees."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, exp: torch.Tensor) -> None:
        self.x, self.y, self.exp = x, y, exp

    @classmethod
    def gather(cls, holdout: Holdout | None, group: ReplicaGroup,
               input_shape: tuple[int, ...]) -> PooledHoldout:
        """Pool every replica's ``holdout`` (every replica calls it at once)."""
        from streamcl.trainer import prepare_inputs

        if holdout is not None and len(holdout):
            data = holdout.buffer.all()
            x, y, exp = prepare_inputs(data["x"], torch.device("cpu")), data["y"], data["exp"]
        else:
            x = torch.zeros((0, *input_shape))
            y = exp = torch.zeros(0, dtype=torch.long)
        labels = group.gather_rows(torch.stack([y.long(), exp.long()], 1))  # one gather, not two
        return cls(group.gather_rows(x), labels[:, 0], labels[:, 1])

    def __len__(self) -> int:
        return len(self.y)

    def evaluate(self, predict: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`Holdout.evaluate`, over the pooled samples."""
        if not len(self.y):
            return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        return predict(self.x) == self.y, self.exp


def accuracy(correct: torch.Tensor) -> float:
    return float(correct.float().mean()) if len(correct) else math.nan


def accuracy_by_experience(correct: torch.Tensor, exp: torch.Tensor) -> dict[int, float]:
    """Holdout accuracy per experience the samples arrived in (a row of the accuracy matrix)."""
    return {int(e): float(correct[exp == e].float().mean()) for e in torch.unique(exp)}


def negative_flip_rate(before: torch.Tensor, after: torch.Tensor) -> float:
    """Share of holdout samples the old model got right and the new one gets wrong."""
    return float((before & ~after).float().mean()) if len(before) else math.nan


def gate_decision(candidate: float, production: float | None, tolerance: float
                  ) -> tuple[bool, str]:
    """Promote unless the candidate is worse than production by more than ``tolerance``.

    >>> gate_decision(0.80, 0.81, 0.02)
    (True, 'within tolerance')
    >>> gate_decision(0.70, 0.81, 0.02)[0]
    False
    """
    if production is None:
        return True, "no production version yet"
    if math.isnan(candidate):
        return False, "empty holdout"
    if math.isnan(production) or candidate >= production - tolerance:
        return True, "within tolerance" if candidate < production else "not worse"
    return False, (f"worse: holdout accuracy {candidate:.4f} < production {production:.4f} - "
                   f"tolerance {tolerance:g}")
