"""Dark Experience Replay (DER) and DER++, Buzzega et al., NeurIPS 2020.

The memory stores each sample with the model's logits for it; replay matches those logits
("dark knowledge") with an MSE term weighted by ``alpha``, and DER++ adds a cross-entropy term
on the same replayed samples' labels, weighted by ``beta``:

    loss = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x'), y')

Three stream-specific choices, each for a measured reason:

* **Logits from the end of the experience.** The paper stores the logits of the step that saw
  the sample. In a short experience that step's model has barely learned the sample's class,
  and replay then preserves an ignorant answer. A stream has no access to the finished
  experience's data, but it has the samples its memory kept: when an experience ends, the
  rows it contributed are re-scored by the model that has learned it (the logits Avalanche
  computes over the whole experience), then join the past.
* **Past experiences only, balanced per experience** (:class:`ExperienceMemory`, as ER): the
  open experience is trained by the incoming batch already.
* **One replay batch for both terms** (as Avalanche; the paper draws two): the CE term then
  anchors the same samples whose logits are matched, and a step costs one replay forward
  instead of two.

The head grows as labels appear, so stored logits become narrower than today's output (the
reference implementation fails with a shape error there). When the head grows, each stored row
is padded with its own smallest logit: the model that produced it gave the not-yet-existing
classes no probability, and the row's least likely class is the finite stand-in for that. The
MSE then also teaches "not these new classes" on old samples. (Padding with the new rows'
current outputs instead was measured worse.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy
from streamcl.strategies.buffer import ExperienceMemory


class DER(Strategy):
    name = "der"
    #: each replica replays (and re-scores) its own shard of the memory; the stored logits are
    #: the shared model's, so a shard holds what one learner's memory would
    data_parallel = True
    shard = Strategy.shard_replay

    def __init__(self, model, optimizer, generator, *, mem_size: int = 500,
                 batch_size_mem: int = 32, alpha: float = 0.1, beta: float = 0.0) -> None:
        super().__init__(model, optimizer, generator)
        self.batch_size_mem = batch_size_mem
        self.alpha = alpha
        self.beta = beta
        self.memory = ExperienceMemory(mem_size, generator)
        self.grew_last_step = False  # the head grew on the batch trained last
        self._growing = False

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if not len(self.memory):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        else:
            mem = self.memory.sample(self.batch_size_mem)
            out = self.model(torch.cat([x, mem["x"]]))
            loss = F.cross_entropy(out[:n], y) + self.alpha * F.mse_loss(out[n:], mem["logits"])
            if self.beta > 0:
                loss = loss + self.beta * F.cross_entropy(out[n:], mem["y"])
        self.sgd_step(loss)
        logits = out[:n].detach()
        self.memory.add(x=x, y=y, logits=logits)
        self.grew_last_step, self._growing = self._growing, False
        return logits

    def on_experience_end(self) -> None:
        # A drift detector opens the next experience one batch after the switch: the head has
        # then already grown for the next classes and trained one batch on them, which hits
        # the old classes hardest. The scores taken at that growth, just before that batch,
        # are the finished experience's model; otherwise score now.
        keep = self.grew_last_step
        self.memory.close_experience(self.experience,
                                     transform=None if keep else self.rescore)
        self.grew_last_step = False

    @torch.no_grad()
    def rescore(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows`` with their logits replaced by the current model's (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return {**rows, "logits": self.model(rows["x"])}
        finally:
            self.model.train(was_training)

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        for buffer in self.memory.buffers():
            stored = buffer.fields.get("logits")
            if stored is not None and n_old:
                buffer.fields["logits"] = pad_logits(stored, n_new)
        current = self.memory.current
        if len(current) and n_old:  # the open experience's rows, before a new class trains
            fresh = self.rescore(current.all())["logits"][:, :n_old]
            current.fields["logits"][: len(current)] = pad_logits(fresh, n_new)
        self._growing = True

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "grew_last_step": self.grew_last_step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
        self.grew_last_step = state["grew_last_step"]


class DERPP(DER):
    """DER++: DER plus a cross-entropy replay term (``beta`` > 0)."""

    name = "der++"

    def __init__(self, model, optimizer, generator, *, mem_size: int = 500,
                 batch_size_mem: int = 32, alpha: float = 0.1, beta: float = 0.5) -> None:
        super().__init__(model, optimizer, generator, mem_size=mem_size,
                         batch_size_mem=batch_size_mem, alpha=alpha, beta=beta)


def pad_logits(stored: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Widen stored logits to ``n_cols``, each new column taking its row's smallest logit.

    >>> pad_logits(torch.tensor([[2.0, -1.0]]), 3)
    tensor([[ 2., -1., -1.]])
    """
    fill = stored.min(dim=1, keepdim=True).values.expand(-1, n_cols - stored.shape[1])
    return torch.cat([stored, fill], dim=1)
