"""Dark Experience Replay (DER) and DER++, Buzzega et al., NeurIPS 2020.

A reservoir over the stream stores each sample with the logits the model produced for it at
insertion time (the pre-update forward of the step that saw it, as in the authors' code).
Replay then matches those logits ("dark knowledge") with an MSE term weighted by ``alpha``;
DER++ adds a cross-entropy term on a second memory sample's labels, weighted by ``beta``:

    loss = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

The head grows as labels appear, so stored logits become narrower than today's output (the
reference implementation fails with a shape error there). When the head grows, each stored row
is padded with its own smallest logit: the model that produced it gave the not-yet-existing
classes no probability, and the row's least likely class is the finite stand-in for that. The
MSE then also teaches "not these new classes" on old samples — the part of DER that works in
class-incremental learning, where a fixed head's untrained outputs carry the same message.
(Padding with zeros and masking the new columns out leaves DER no better than fine-tuning.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy
from streamcl.strategies.buffer import ReservoirBuffer


class DER(Strategy):
    name = "der"

    def __init__(self, model, optimizer, generator, *, mem_size: int = 500,
                 batch_size_mem: int = 32, alpha: float = 0.1, beta: float = 0.0) -> None:
        super().__init__(model, optimizer, generator)
        self.batch_size_mem = batch_size_mem
        self.alpha = alpha
        self.beta = beta
        self.buffer = ReservoirBuffer(mem_size, generator)

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if not len(self.buffer):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        else:
            m1 = self.buffer.sample(self.batch_size_mem)
            parts = [x, m1["x"]]
            m2 = None
            if self.beta > 0:
                m2 = self.buffer.sample(self.batch_size_mem)
                parts.append(m2["x"])
            out = self.model(torch.cat(parts))
            k = len(m1["x"])
            loss = F.cross_entropy(out[:n], y)
            loss = loss + self.alpha * F.mse_loss(out[n:n + k], m1["logits"])
            if m2 is not None:
                loss = loss + self.beta * F.cross_entropy(out[n + k:], m2["y"])
        self.sgd_step(loss)
        logits = out[:n].detach()
        self.buffer.add(x=x, y=y, logits=logits)
        return logits

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        stored = self.buffer.fields.get("logits")
        if stored is not None and n_old:
            self.buffer.fields["logits"] = pad_logits(stored, n_new)

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])


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
