"""IL2M: Class-Incremental Learning with Dual Memory, Belouadah & Popescu, ICCV 2019.

Replay from a class-balanced memory biases a network towards the newest classes. IL2M's second
memory is a handful of statistics that undo that bias at inference time:

* ``init_mean[c]`` — the mean score of class ``c`` on its samples, at the end of the
  experience where ``c`` was learned;
* ``current_mean[c]`` — the same, measured again at the end of every later experience;
* ``confidence[e]`` — the model's mean top score on experience ``e``'s new classes, at its end.

When the top prediction is a new class, each old class ``c`` (learned in experience ``e_c``)
gets its score rectified: ``s_c <- s_c * init_mean[c] / current_mean[c] * confidence[last] /
confidence[e_c]``. Scores are softmax probabilities, as in the paper.

Stream-specific choices, fixing the reference implementation:

* The class-to-experience history is the model's own (``class_exp``), kept in the rectifier,
  never read from whatever data happens to be evaluated — so the rectified prediction of a
  sample is the same whichever test set it sits in.
* The rectifier is a submodule of the model (``model.rectifier``): it is in the saved weights,
  so a published IL2M model predicts rectified classes.
* A class is registered to the experience in which it was seen enough (at least a quarter of the
  average per-class count of that experience): a drift detector fires a few batches after a
  switch, and the first samples of new classes must not make them "old" already. For the same
  reason a class first seen in the last two batches before a boundary belongs to the next
  experience: a detector fires a batch or two after the switch that brought the class, and
  when it fires spuriously just before a real switch, the real switch's classes would
  otherwise be the majority of that tiny experience and be registered there with a few dozen
  samples (Fashion-MNIST, 5 x 1,600 samples with labels in runs, ADWIN boundaries: 58.1% ->
  60.4%, 3 seeds).
* Statistics are measured on the balanced memory (the samples a live stream still has).

**Data-parallel** (N replicas, :mod:`streamcl.parallel`). Each replica keeps its share of the
class-balanced memory, over its own samples, and replays its share of the replay batch. The
statistics must be global, and so must the counts that decide which classes they are taken
for:

* the per-class counts of every step are those of the whole step's batch, whose labels the
  trainer's plan has gathered already (:attr:`Strategy.step_targets`, in :meth:`IL2M.count`,
  which a replica without samples calls too), so every replica holds the counts, first steps
  and step number one learner would hold, and registers each class to the experience one
  learner registers it to;
* at an experience's end (met by every replica at the same step) each replica measures, on
  its shard, per class the sum of the class's scores and the number of rows, and the sum of
  the top scores over the new classes' rows; one all-reduce of those gives the means over the
  union of the shards: one learner's statistics, measured on the replicas' memories together
  (not on one learner's rows: each shard is balanced over its own replica's samples). Every
  replica then registers the same bits.

A publication's provisional statistics (:meth:`IL2M.prepare_inference`) are made by one
replica alone, between steps, so they can make no collective call: the counts are global
already, but the scores can only be measured on that replica's shard, an estimate of the
global means from about 1/N of the rows (a class with no row in that shard goes without
provisional statistics). They are replaced by global ones when the experience ends; a
publication's rectifier changes only the published copy (see :mod:`streamcl.registry.model`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamcl.strategies.base import Strategy, pad_rows, replay_step_loss
from streamcl.strategies.buffer import BalancedBuffer


class IL2MRectifier(nn.Module):
    """Score rectification as a module: logits in, rectified softmax scores out.

    >>> r = IL2MRectifier()
    >>> r.grow(2)
    >>> r.register(0, [0], init_mean={0: 0.9}, confidence=0.8)
    >>> r.register(1, [1], init_mean={1: 0.9}, confidence=0.9, current_mean={0: 0.3})
    >>> logits = torch.log(torch.tensor([[0.4, 0.6]]))   # raw model prefers the new class 1
    >>> r(logits).argmax(1).item()                        # 0.4 * 0.9/0.3 * 0.9/0.8 = 1.35 > 0.6
    0
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("class_exp", torch.zeros(0, dtype=torch.long))
        self.register_buffer("init_mean", torch.zeros(0))
        self.register_buffer("current_mean", torch.zeros(0))
        self.register_buffer("confidence", torch.zeros(0))
        self.register_buffer("last_exp", torch.tensor(-1))

    def grow(self, n_classes: int) -> None:
        self.class_exp = pad_rows(self.class_exp, n_classes, -1)
        self.init_mean = pad_rows(self.init_mean, n_classes, 1.0)
        self.current_mean = pad_rows(self.current_mean, n_classes, 1.0)

    def register(self, exp: int, new_classes: list[int], init_mean: dict[int, float],
                 confidence: float, current_mean: dict[int, float] | None = None) -> None:
        """Record experience ``exp``'s end: its new classes and the statistics measured then."""
        for c in new_classes:
            self.class_exp[c] = exp
            self.init_mean[c] = init_mean[c]
            self.current_mean[c] = init_mean[c]
        for c, v in (current_mean or {}).items():
            self.current_mean[c] = v
        self.confidence = pad_rows(self.confidence, exp + 1, 1.0)
        self.confidence[exp] = confidence
        self.last_exp = torch.tensor(exp)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        scores = F.softmax(logits, dim=1)
        n, last = logits.shape[1], int(self.last_exp)
        if last < 0 or n == 0:
            return scores
        ce = self.class_exp[:n]
        old = (ce >= 0) & (ce < last)
        if not bool(old.any()):
            return scores
        factor = (self.init_mean[:n] / self.current_mean[:n].clamp_min(1e-12)) * (
            self.confidence[last] / self.confidence[ce.clamp_min(0)].clamp_min(1e-12))
        factor = torch.where(old, factor, torch.ones_like(factor))
        new_top = ~old[scores.argmax(1)]
        return torch.where(new_top.unsqueeze(1), scores * factor, scores)


class IL2M(Strategy):
    name = "il2m"
    data_parallel = True  # memory sharded; counts and statistics reduced over the replicas
    shard = Strategy.shard_replay

    def __init__(self, model, optimizer, generator, *, mem_size: int = 2000,
                 batch_size_mem: int = 32) -> None:
        super().__init__(model, optimizer, generator)
        self.batch_size_mem = batch_size_mem
        self.memory = BalancedBuffer(mem_size, generator)
        if model.rectifier is None:
            model.rectifier = IL2MRectifier()
            model.rectifier.grow(model.n_classes)
        self.counts: dict[int, int] = {}  # samples per class in the current experience
        self.first_step: dict[int, int] = {}  # the experience's step that first brought it
        self.steps = 0  # steps in the current experience

    @property
    def rectifier(self) -> IL2MRectifier:
        return self.model.rectifier  # type: ignore[return-value]

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        mem = self.memory.sample(self.batch_size_mem) if len(self.memory) else None
        out, loss = replay_step_loss(self.model, x, y, mem)
        self.sgd_step(loss)
        self.memory.add(y, x=x, y=y)
        self.count(y)
        return out[:n].detach()

    def observe_empty(self) -> None:
        """The step's update (zero gradient here), then the step's count, as :meth:`observe`."""
        super().observe_empty()
        self.count(None)

    def count(self, y: torch.Tensor | None) -> None:
        """Count the step's samples per class (the registration rule needs them); data-parallel,
        those of every replica's batch (:meth:`~Strategy.step_classes`; ``None``: this replica
        brought none)."""
        counts = torch.bincount(self.step_classes(y).cpu(), minlength=self.model.n_classes)
        self.steps += 1
        for c in counts.nonzero().flatten().tolist():
            self.counts[c] = self.counts.get(c, 0) + int(counts[c])
            self.first_step.setdefault(c, self.steps)

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        self.rectifier.grow(n_new)

    def on_experience_end(self) -> None:
        unregistered = self.rectifier.class_exp
        late = {c for c, step in self.first_step.items()
                if step > self.steps - 2 and int(unregistered[c]) == -1}
        self._register(self.experience, exclude=late)
        self.counts = {c: k for c, k in self.counts.items() if c in late}
        self.first_step = dict.fromkeys(late, 0)
        self.steps = 0

    def prepare_inference(self) -> None:
        # provisional: the open experience's classes get statistics now, recomputed at its end.
        # Data-parallel, one replica calls this alone: no collective (see the module's doc).
        self._register(self.experience, alone=True)

    @torch.no_grad()
    def _register(self, exp: int, exclude: set[int] = frozenset(), alone: bool = False) -> None:
        """Statistics at the end of experience ``exp`` (its new classes, and the old ones);
        over every replica's memory unless ``alone`` (or the learner is one process)."""
        alone = alone or self.group is None
        registered = self.rectifier.class_exp
        mine = {c: k for c, k in self.counts.items()
                if int(registered[c]) in (-1, exp) and c not in exclude}
        # `mine` comes from the global counts: every replica returns here, or none does
        if not mine or (alone and not len(self.memory)):
            return
        enough = sum(mine.values()) / len(mine) / 4
        new = sorted(c for c, k in mine.items() if k >= enough)
        old = [c for c in range(len(registered)) if 0 <= int(registered[c]) < exp]
        stats = self._measure(new + old, n_new=len(new))
        if not alone:
            self.reduce_sum(stats)
        init_mean, current_mean = {}, {}
        for i, c in enumerate(new + old):
            total, rows = stats[2 * i], stats[2 * i + 1]
            if rows:
                (init_mean if c in new else current_mean)[c] = float(total / rows)
        new = [c for c in new if c in init_mean]
        if new:
            confidence = float(stats[-2] / stats[-1])
            self.rectifier.register(exp, new, init_mean, confidence, current_mean)

    def _measure(self, classes: list[int], n_new: int) -> torch.Tensor:
        """What the statistics are made of, on this replica's memory, as sums that add up over
        replicas: for each of ``classes``, its mean score on its rows times their number, and
        the number; last, the same for the top score over the rows of the first ``n_new``
        classes (the new ones). Float64: a float32 mean times a count is exact there, so alone
        the division gives back the very mean one process measures."""
        stats = torch.zeros(2 * len(classes) + 2, dtype=torch.float64)
        was_training = self.model.training
        self.model.eval()
        top = []
        for i, c in enumerate(classes):
            rows = self.memory.group_rows(c)
            if not len(rows):
                continue
            scores = F.softmax(self.model(self.memory.get(rows)["x"]), dim=1)
            stats[2 * i] = float(scores[:, c].mean()) * len(rows)
            stats[2 * i + 1] = len(rows)
            if i < n_new:
                top.append(scores.max(1).values)
        self.model.train(was_training)
        if top:
            tops = torch.cat(top)
            stats[-2], stats[-1] = float(tops.mean()) * len(tops), len(tops)
        return stats

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(),
                "counts": {str(k): v for k, v in self.counts.items()},
                "first_step": {str(k): v for k, v in self.first_step.items()},
                "steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.counts = {int(k): v for k, v in state["counts"].items()}
        self.first_step = {int(k): v for k, v in state["first_step"].items()}
        self.steps = state["steps"]
