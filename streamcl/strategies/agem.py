"""Averaged Gradient Episodic Memory (A-GEM), Chaudhry et al., ICLR 2019.

Keep an episodic memory of past experiences. Before each step, compute a reference gradient
``g_ref`` on ``sample_size`` memory samples; if the batch gradient ``g`` points against it
(``g . g_ref < 0``, the step would raise the loss on the past), project it onto the plane
orthogonal to ``g_ref``: ``g <- g - (g . g_ref / g_ref . g_ref) g_ref``. Otherwise ``g`` is
used unchanged.

During an experience, ``patterns_per_experience`` of its samples are kept by reservoir
sampling; at the boundary they join the memory. Unlike the reference implementation (whose
memory grows without limit and which breaks once experiences outnumber ``sample_size``), the
memory here is capped at ``mem_size`` in total: each experience keeps an equal share, the
oldest shares shrinking as experiences arrive, and ``g_ref`` is drawn uniformly from the whole
memory, so hundreds of experiences work the same as five.

**A spare row for the growing head.** A fixed head trains the row of a class it has not seen
yet as a negative on every sample, so when the class arrives its row already scores low on the
memory. A row grown at arrival scores like any other: the reference gradient then pushes it
down on the memory as hard as the incoming batch pulls it up, and the projection cancels much
of what the new class would learn (split Fashion-MNIST cut to 1,600 samples per experience:
31.9% final accuracy, 37.5% with a fixed head). A-GEM therefore keeps one spare row beside the
head, trained with it on the reference and the incoming batches as a class that never occurs
(plain SGD at the optimizer's learning rate), and every new label's row starts as a copy of
it. That is the row a fixed head would have had; no label set is needed in advance.

**Data-parallel** (N replicas, :mod:`streamcl.parallel`). Each replica keeps its share of the
memory and of every experience's patterns, over its own samples, and draws its share of the
``sample_size`` reference samples from its shard: together they hold and draw as many rows as
one learner would, though not the same ones (each reservoir and each draw is its replica's
own). The projection needs two
global gradients before it, so A-GEM averages them itself in one all-reduce of
``[n g, m g_ref, n, m]`` (``n``: the replica's batch, ``m``: its reference rows): ``g`` is then
the gradient of the mean loss over the step's whole batch, ``g_ref`` that over all the
reference rows, spare row included (it is no model parameter, so the trainer's average would
miss it). Projecting the global ``g`` on the global ``g_ref`` is one learner's step, taken
bit for bit alike by every replica. (Projecting each replica's gradient on its own reference
before averaging would be another method: an average of projections is no projection, and
need not keep ``g . g_ref >= 0``.) A replica with no sample in the step still draws its
reference rows, as one learner draws them whatever the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy, flat_grad, set_flat_grad, share
from streamcl.strategies.buffer import BalancedBuffer, ReservoirBuffer


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's projection: ``g`` if it agrees with ``g_ref``, else its component orthogonal to it.

    >>> project(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]))
    tensor([1., 0.])
    >>> project(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))
    tensor([1., 1.])
    """
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref).clamp_min(1e-12)) * g_ref


class AGEM(Strategy):
    name = "agem"
    data_parallel = True  # memory sharded, both gradients reduced before the projection

    def __init__(self, model, optimizer, generator, *, patterns_per_experience: int = 100,
                 sample_size: int = 64, mem_size: int = 1000) -> None:
        super().__init__(model, optimizer, generator)
        self.patterns_per_experience = patterns_per_experience
        self.sample_size = sample_size
        self.current = ReservoirBuffer(patterns_per_experience, generator)
        self.memory = BalancedBuffer(mem_size, generator)
        bound = 1.0 / math.sqrt(model.feature_dim)  # nn.Linear's initialisation
        self.spare_weight = (torch.rand(model.feature_dim, generator=generator) * 2 - 1) * bound
        self.spare_bias = (torch.rand((), generator=generator) * 2 - 1) * bound

    def shard(self, rank: int, world_size: int) -> None:
        """Replica ``rank`` keeps its share of ``mem_size`` and of each experience's
        ``patterns_per_experience`` (over its own samples) and draws its share of
        ``sample_size``: the replicas hold and draw together what one learner would."""
        self.patterns_per_experience = max(1, share(self.patterns_per_experience, rank,
                                                    world_size))
        self.sample_size = max(1, share(self.sample_size, rank, world_size))
        self.current = ReservoirBuffer(self.patterns_per_experience, self.generator)
        self.memory = BalancedBuffer(max(1, share(self.memory.capacity, rank, world_size)),
                                     self.generator)

    def logits_with_spare(self, x: torch.Tensor) -> torch.Tensor:
        """The head's logits and, as a last column, the spare row's."""
        h = self.model.features(x)
        spare = h @ self.spare_weight + self.spare_bias
        return torch.cat([self.model.head(h), spare.unsqueeze(1)], dim=1)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self._step(x, y)
        self.current.add(x=x, y=y)
        return logits[:, :-1].detach()

    def observe_empty(self) -> None:
        """The step without a batch of this replica's own: its reference rows and the same
        all-reduce, its batch gradient counting as zeros."""
        self._step(None, None)

    def _step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        """One A-GEM update on ``(x, y)`` (``None``: no sample here); the batch's logits."""
        self.spare_weight.requires_grad_(True)
        self.spare_bias.requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [self.spare_weight, self.spare_bias]
        g_ref, m = None, 0
        if len(self.memory):
            mem = self.memory.sample(self.sample_size)
            _zero_grad(params)
            F.cross_entropy(self.logits_with_spare(mem["x"]), mem["y"]).backward()
            g_ref, m = flat_grad(params), len(mem["y"])
        _zero_grad(params)
        logits, n = torch.zeros(0), 0
        if x is not None:
            logits, n = self.logits_with_spare(x), len(x)
            F.cross_entropy(logits, y).backward()
        g = None  # the gradient to apply, where it is not the one backward left
        if self.group is not None:
            g, g_ref = self._global_gradients(flat_grad(params), n, g_ref, m)
        if g_ref is not None:
            g = project(flat_grad(params) if g is None else g, g_ref)
        if g is not None:
            set_flat_grad(params, g)
        self.optimizer.step()
        with torch.no_grad():
            lr = self.optimizer.param_groups[0]["lr"]
            self.spare_weight -= lr * self.spare_weight.grad
            self.spare_bias -= lr * self.spare_bias.grad
        self.spare_weight = self.spare_weight.detach()
        self.spare_bias = self.spare_bias.detach()
        return logits

    def _global_gradients(self, g: torch.Tensor, n: int, g_ref: torch.Tensor | None,
                          m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Data-parallel: the step's gradient and reference gradient over every replica, from
        this one's (``g`` of the mean loss on its ``n`` samples, ``g_ref`` on its ``m``
        reference rows). Each is weighted by its count, as the trainer weights the gradient:
        the results are the gradients of the mean losses over all samples and over all
        reference rows, the same bits on every replica. ``g_ref`` is ``None`` while no
        replica has a memory (no projection, on every replica alike)."""
        ref = g_ref if g_ref is not None else torch.zeros_like(g)
        flat = self.reduce_sum(torch.cat([g * n, ref * m, g.new_tensor([float(n), float(m)])]))
        k = len(g)
        n_all, m_all = float(flat[-2]), float(flat[-1])
        return flat[:k] / max(n_all, 1.0), (flat[k:2 * k] / m_all if m_all else None)

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        with torch.no_grad():
            self.model.head.weight[n_old:n_new] = self.spare_weight
            self.model.head.bias[n_old:n_new] = self.spare_bias

    def on_experience_end(self) -> None:
        if len(self.current):
            batch = self.current.all()
            groups = torch.full((len(self.current),), self.experience, dtype=torch.long)
            self.memory.add(groups, **batch)
        self.current = ReservoirBuffer(self.patterns_per_experience, self.generator)

    def extra_state(self) -> dict[str, Any]:
        return {"current": self.current.state_dict(), "memory": self.memory.state_dict(),
                "spare_weight": self.spare_weight, "spare_bias": self.spare_bias}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.current.load_state_dict(state["current"])
        self.memory.load_state_dict(state["memory"])
        self.spare_weight = state["spare_weight"].clone()
        self.spare_bias = state["spare_bias"].clone()


def _zero_grad(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
