"""Dark Experience Replay (DER) and DER++, Buzzega et al., NeurIPS 2020.

A reservoir over the stream stores each sample with the logits the model produced for it at
insertion time (the pre-update forward of the step that saw it, as in the authors' code).
Replay then matches those logits ("dark knowledge") with an MSE term weighted by ``alpha``;
DER++ adds a cross-entropy term on a second memory sample's labels, weighted by ``beta``:

    loss = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

The head grows as labels appear, so stored logits can be narrower than today's output. They
are padded with zeros and a per-sample count of valid columns is kept: the MSE compares only
the columns that existed at insertion (the reference implementation fails with a shape error
instead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from streamcl.strategies.base import Strategy, pad_cols
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
            loss = loss + self.alpha * masked_mse(out[n:n + k], m1["logits"], m1["n_logits"])
            if m2 is not None:
                loss = loss + self.beta * F.cross_entropy(out[n + k:], m2["y"])
        self.sgd_step(loss)
        logits = out[:n].detach()
        n_cls = logits.shape[1]
        self.buffer.add(x=x, y=y, logits=logits,
                        n_logits=torch.full((n,), n_cls, dtype=torch.long))
        return logits

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        self.buffer.pad_field("logits", n_new)

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


def masked_mse(out: torch.Tensor, stored: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the columns each stored row had at insertion (``< n_valid``)."""
    stored = pad_cols(stored, out.shape[1])[:, : out.shape[1]]
    mask = torch.arange(out.shape[1]).unsqueeze(0) < n_valid.unsqueeze(1)
    diff = (out - stored).pow(2) * mask
    return diff.sum() / mask.sum().clamp_min(1)
