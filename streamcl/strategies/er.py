"""Experience replay (ER) with a reservoir over the whole stream.

Each step trains on the incoming batch concatenated with ``batch_size_mem`` samples drawn from a
memory of ``mem_size`` samples; the memory is a uniform reservoir sample of everything seen, so
it needs no experience boundaries at all (Chaudhry et al., "On Tiny Episodic Memories in
Continual Learning", 2019).
"""

from __future__ import annotations

from typing import Any

import torch

from streamcl.strategies.base import Strategy, replay_step_loss
from streamcl.strategies.buffer import ReservoirBuffer


class ER(Strategy):
    name = "er"

    def __init__(self, model, optimizer, generator, *, mem_size: int = 500,
                 batch_size_mem: int = 32) -> None:
        super().__init__(model, optimizer, generator)
        self.batch_size_mem = batch_size_mem
        self.buffer = ReservoirBuffer(mem_size, generator)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        mem = self.buffer.sample(self.batch_size_mem) if len(self.buffer) else None
        out, loss = replay_step_loss(self.model, x, y, mem)
        self.sgd_step(loss)
        self.buffer.add(x=x, y=y)
        return out[:n].detach()

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
