"""IL2M-DER: IL2M's dual memory whose replayed samples also carry their logits, as in DER.

Two methods that fix different things, combined without new parameters:

* **IL2M** (Belouadah & Popescu, ICCV 2019): replay from a class-balanced memory, plus the
  statistics that undo the replay's bias towards the newest classes at inference time (see
  :mod:`streamcl.strategies.il2m`). The rectification is what pays most on short or many
  experiences, where the newest classes would otherwise take most predictions.
* **Dark experience replay** (Buzzega et al., NeurIPS 2020): each stored sample keeps the
  logits the model gave it when it was stored, and replay matches them with an MSE term
  weighted by ``alpha`` (DER's 0.1). The logits carry what the model knew about *every* class
  for that sample, not only its label; on long experiences this keeps the old classes'
  decision boundaries where plain replay lets them drift.

The loss is IL2M's (one cross-entropy over the incoming batch and the replayed samples) plus
DER's term on the replayed samples:

    loss = CE([x; x'], [y; y']) + alpha * MSE(f(x'), z')

Stored logits are padded as DER pads them when the head grows (each row's smallest logit).
Data-parallel as IL2M is (see :mod:`streamcl.strategies.il2m`): the stored logits are the
shared model's, so a replica's shard of the memory needs nothing more reduced.
This is streamcl's default strategy: on the benchmark suite (``bench/suite.py``) it is the
only strategy within reach of the best one on every stream, where IL2M falls behind on long
experiences and DER++ on short ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamcl.strategies.base import replay_step_loss
from streamcl.strategies.der import pad_logits
from streamcl.strategies.il2m import IL2M


class IL2MDER(IL2M):
    name = "il2m-der"

    def __init__(self, model, optimizer, generator, *, mem_size: int = 500,
                 batch_size_mem: int = 32, alpha: float = 0.1) -> None:
        super().__init__(model, optimizer, generator, mem_size=mem_size,
                         batch_size_mem=batch_size_mem)
        self.alpha = alpha

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        mem = self.memory.sample(self.batch_size_mem) if len(self.memory) else None
        out, loss = replay_step_loss(self.model, x, y, mem)
        if mem is not None:
            loss = loss + self.alpha * F.mse_loss(out[n:], mem["logits"])
        self.sgd_step(loss)
        logits = out[:n].detach()
        self.memory.add(y, x=x, y=y, logits=logits)
        self.count(y)
        return logits

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        super().on_head_grown(n_old, n_new)
        stored = self.memory.fields.get("logits")
        if stored is not None and n_old:
            self.memory.fields["logits"] = pad_logits(stored, n_new)
