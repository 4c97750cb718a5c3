"""Experience replay (ER) with a reservoir over the whole stream.

Each step trains on the incoming batch concatenated with ``batch_size_mem`` samples drawn from a
memory of ``mem_size`` samples; the memory is a uniform reservoir sample of everything seen, so
it needs no experience boundaries at all (Chaudhry et al., "On Tiny Episodic Memories in
Continual Learning", 2019).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy
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
        if len(self.buffer):
            mem = self.buffer.sample(self.batch_size_mem)
            out = self.model(torch.cat([x, mem["x"]]))
            loss = F.cross_entropy(out, torch.cat([y, mem["y"]]))
        else:
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        self.sgd_step(loss)
        self.buffer.add(x=x, y=y)
        return out[:n].detach()

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
