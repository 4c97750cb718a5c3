"""Naive fine-tuning: one SGD step on each batch, nothing done against forgetting.

The lower bound every continual-learning method must beat, and the fastest possible step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy


class Naive(Strategy):
    name = "naive"
    data_parallel = True

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.sgd_step(F.cross_entropy(logits, y))
        return logits.detach()
