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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy, flat_grad, set_flat_grad
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

    def __init__(self, model, optimizer, generator, *, patterns_per_experience: int = 100,
                 sample_size: int = 64, mem_size: int = 1000) -> None:
        super().__init__(model, optimizer, generator)
        self.patterns_per_experience = patterns_per_experience
        self.sample_size = sample_size
        self.current = ReservoirBuffer(patterns_per_experience, generator)
        self.memory = BalancedBuffer(mem_size, generator)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        g_ref = None
        if len(self.memory):
            mem = self.memory.sample(self.sample_size)
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(mem["x"]), mem["y"]).backward()
            g_ref = flat_grad(params)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        F.cross_entropy(logits, y).backward()
        if g_ref is not None:
            set_flat_grad(params, project(flat_grad(params), g_ref))
        self.optimizer.step()
        self.current.add(x=x, y=y)
        return logits.detach()

    def on_experience_end(self) -> None:
        if len(self.current):
            batch = self.current.all()
            groups = torch.full((len(self.current),), self.experience, dtype=torch.long)
            self.memory.add(groups, **batch)
        self.current = ReservoirBuffer(self.patterns_per_experience, self.generator)

    def extra_state(self) -> dict[str, Any]:
        return {"current": self.current.state_dict(), "memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.current.load_state_dict(state["current"])
        self.memory.load_state_dict(state["memory"])
