"""What every strategy is: one training step on a micro-batch, plus experience-boundary hooks.

A strategy sees only what a live stream has: the current batch, the current experience id and
boundary events. It never needs the list of future classes or experiences.

The contract of :meth:`Strategy.observe` is narrow on purpose: train on ``(x, y)`` with one
optimizer step and return the batch's logits *from the forward pass made before that step*.
The trainer turns those logits into the batch's prequential predictions, so a strategy's own
training forward doubles as the test-then-train prediction at no extra cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from streamcl.models import Classifier
from streamcl.state import set_rng_state

if TYPE_CHECKING:
    from streamcl.parallel import ReplicaGroup


class Strategy:
    """Base class: holds the model, the optimizer and the strategy's own random generator."""

    name: ClassVar[str] = "base"
    #: whether N replicas running this strategy, their gradients averaged at each optimizer
    #: step (:mod:`streamcl.parallel`), act as one learner: true when every update goes
    #: through :meth:`sgd_step` once per batch and no other state must be global, or when the
    #: strategy makes the rest global itself (:meth:`reduce_sum`, with :meth:`observe_empty`
    #: joining the same collectives)
    data_parallel: ClassVar[bool] = False
    #: set by a data-parallel trainer: averages the gradients over the replicas
    reduce_gradients: Callable[[], object] | None = None
    #: set by a data-parallel trainer before :meth:`shard`: the replicas, for state that must
    #: be global (``group.all_reduce_sum``); ``None`` when the learner is one process
    group: ReplicaGroup | None = None
    #: set by a data-parallel trainer before each :meth:`observe` / :meth:`observe_empty`:
    #: the head rows of the whole step's batch (every replica's part, in rank order), which
    #: the plan gathered already; per-step class statistics take them instead of a collective
    step_targets: torch.Tensor | None = None

    def __init__(self, model: Classifier, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator) -> None:
        self.model = model
        self.optimizer = optimizer
        self.generator = generator
        self.experience = 0

    # -- the step ---------------------------------------------------------------------------
    def observe(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Train on one batch (``y`` are head indices); return its pre-update logits, detached."""
        raise NotImplementedError

    def observe_empty(self) -> None:
        """Data-parallel: this replica brought no sample to the global step, but the others
        did; take the step anyway, joining every collective :meth:`observe` makes (here the
        gradient average, this replica's gradient counting as zeros), so all replicas stay
        one model."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.reduce_gradients is not None:
            self.reduce_gradients()
        self.optimizer.step()

    def shard(self, rank: int, world_size: int) -> None:
        """Become replica ``rank`` of ``world_size`` (data-parallel): take this replica's share
        of whatever is sized for the whole learner (a replay memory and its batch), so that N
        replicas together hold and replay what one learner would. Called once, before any
        batch."""

    def shard_replay(self, rank: int, world_size: int) -> None:
        """:meth:`shard` for a replay strategy (``memory`` sized by ``mem_size``, a replay
        batch of ``batch_size_mem``): N replicas hold ``mem_size`` together and replay
        ``batch_size_mem`` samples per global step, as one learner would (replaying the full
        batch on every replica outweighs the incoming samples N times over)."""
        memory = self.memory  # type: ignore[attr-defined]
        self.batch_size_mem = max(1, share(self.batch_size_mem, rank, world_size))  # type: ignore[attr-defined]
        self.memory = type(memory)(max(1, share(memory.capacity, rank, world_size)),
                                   self.generator)

    def step_classes(self, y: torch.Tensor | None) -> torch.Tensor:
        """The head rows of the step's incoming batch: ``y``, or data-parallel every
        replica's (:attr:`step_targets`; ``y`` is then this replica's part, or ``None``)."""
        if self.step_targets is not None:
            return self.step_targets
        assert y is not None
        return y

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the replicas (in place; alone: as they are). For strategy
        state measured on each replica's data that one learner would measure on all of it:
        every replica must call it at the same point of the same step (so an
        :meth:`observe` that calls it needs an :meth:`observe_empty` that does too)."""
        return values if self.group is None else self.group.all_reduce_sum(values)

    # -- stream events ----------------------------------------------------------------------
    def on_experience_end(self) -> None:
        """The current experience just ended (called before ``experience`` is incremented)."""

    def prepare_inference(self) -> None:
        """Bring inference-time state up to date for the still-open experience (called before
        a final evaluation or a publication; a live stream's last experience never ends)."""

    def on_head_grown(self, n_old: int, n_new: int) -> None:
        """The head went from ``n_old`` to ``n_new`` rows (the optimizer is already re-pointed)."""

    def memory_usage(self) -> tuple[int, int]:
        """Samples held in the replay memory (a strategy's ``memory``) and its capacity, for
        the metrics; ``(0, 0)`` for a strategy without one."""
        memory = getattr(self, "memory", None)
        return memory.usage() if memory is not None else (0, 0)

    # -- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Strategy-specific state (buffers, importances...); tensors and JSON values only."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "experience": self.experience,
                "generator": self.generator.get_state(), **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"state is for strategy {state['name']!r}, not {self.name!r}")
        self.experience = state["experience"]
        set_rng_state(self.generator, state["generator"])
        self.load_extra_state(state)

    # -- helpers shared by several strategies ------------------------------------------------
    def sgd_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.reduce_gradients is not None:  # data-parallel: the step's global gradient
            self.reduce_gradients()
        self.optimizer.step()


def share(n: int, rank: int, world_size: int) -> int:
    """Replica ``rank``'s part of ``n`` items split ``world_size`` ways (the first ``n %
    world_size`` replicas take one more).

    >>> [share(5, r, 2) for r in range(2)]
    [3, 2]
    """
    return n // world_size + (1 if rank < n % world_size else 0)


def replay_step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     mem: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the batch with the memory samples appended (if any): the logits of all
    rows and the cross-entropy over all of them (plain replay's loss)."""
    if mem is not None:
        x, y = torch.cat([x, mem["x"]]), torch.cat([y, mem["y"]])
    out = model(x)
    return out, F.cross_entropy(out, y)


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """All gradients as one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])


def set_flat_grad(params: list[nn.Parameter], vector: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = vector[offset:offset + n].view_as(p).clone()
        offset += n


def pad_rows(t: torch.Tensor, n_rows: int, value: float = 0.0) -> torch.Tensor:
    """``t`` with extra rows appended (along dim 0) up to ``n_rows``."""
    extra = n_rows - t.shape[0]
    if extra <= 0:
        return t
    return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)])


def pad_cols(t: torch.Tensor, n_cols: int, value: float = 0.0) -> torch.Tensor:
    """``t`` (2-D) with extra columns appended up to ``n_cols``."""
    extra = n_cols - t.shape[1]
    if extra <= 0:
        return t
    return torch.cat([t, t.new_full((t.shape[0], extra), value)], dim=1)
