"""The online trainer: prequential (test-then-train) learning on one micro-batch at a time.

One step has three phases, kept apart so the streaming service can journal the decision
before it takes effect:

1. :meth:`OnlineTrainer.plan` — the step's one decision, from the batch's labels and task
   value and the trainer's state alone: where it sits in the stream, whether an experience
   boundary opens before it (and why), which never-seen labels it brings.
2. :meth:`OnlineTrainer.end_experience` — if the plan has a boundary: the strategy closes the
   finished experience (A-GEM files its memory, MAS measures importance, IL2M its statistics).
3. :meth:`OnlineTrainer.learn` — grow the head for new labels, predict the batch with the
   model as it is (those predictions are the prequential record), then let the strategy train
   on it, and feed the batch's error to the drift detector.

:meth:`OnlineTrainer.step` runs all three. Labels are arbitrary integers, mapped to head rows in
order of first appearance; predictions come back as labels (``-1`` before any label is known).

>>> import torch
>>> trainer = OnlineTrainer(TrainerConfig(input_shape=(4,), hidden=(8,), strategy="naive",
...                                        boundaries="new-class"))
>>> r = trainer.step(torch.zeros(2, 4), torch.tensor([7, 7]))
>>> r.predictions.tolist(), trainer.labels, trainer.model.n_classes
([-1, -1], [7], 1)
>>> r = trainer.step(torch.ones(2, 4), torch.tensor([3, 7]))
>>> r.boundary.trigger, r.boundary.index, trainer.labels
('new-class', 2, [7, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamcl.drift.boundaries import Boundary, BoundaryPolicy
from streamcl.models import Classifier, build_model, train_forward_predicts
from streamcl.parallel import ReplicaGroup
from streamcl.settings import LearnerSettings
from streamcl.state import set_rng_state
from streamcl.strategies import Strategy, make_strategy, resolved_params

STATE_FORMAT = 1


def _default(name: str) -> Any:
    """A learner setting's default: :class:`~streamcl.settings.LearnerSettings` holds the one
    set, so a config built in code, ``streamcl simulate`` and the service cannot disagree."""
    return LearnerSettings.model_fields[name].get_default(call_default_factory=True)


@dataclass
class TrainerConfig:
    """Everything needed to rebuild a trainer; JSON-serialisable, stored in every state.

    The fields are :class:`~streamcl.settings.LearnerSettings`' (bar ``torch_threads``, which
    changes speed, not results), with its defaults; ``device`` is not a setting."""

    input_shape: tuple[int, ...]
    model: str = _default("model")
    hidden: tuple[int, ...] = tuple(_default("hidden"))
    strategy: str = _default("strategy")
    params: dict[str, Any] = field(default_factory=lambda: _default("params"))
    lr: float = _default("lr")
    momentum: float = _default("momentum")
    boundaries: str = _default("boundaries")
    detector: str = _default("detector")
    detector_params: dict[str, Any] = field(default_factory=lambda: _default("detector_params"))
    min_length: int = _default("min_length")
    cooldown: int = _default("cooldown")
    monitor: str = _default("monitor")
    seed: int = _default("seed")
    max_classes: int = _default("max_classes")
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.max_classes, int) or self.max_classes < 1:
            raise ValueError(f"max_classes must be an integer >= 1, got {self.max_classes!r}")

    def to_json(self) -> dict[str, Any]:
        """The config as stored in states and the journal's start entry. ``max_classes`` is
        left out while it has its default: states, snapshots and journals written before it
        existed then compare equal to (and hash the same as) a default config, and
        :meth:`from_json` fills the default back in."""
        out = asdict(self)
        out["input_shape"], out["hidden"] = list(self.input_shape), list(self.hidden)
        out["params"] = resolved_params(self.strategy, self.params)
        if self.max_classes == _default("max_classes"):
            del out["max_classes"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerConfig:
        data = dict(data)
        data["input_shape"], data["hidden"] = tuple(data["input_shape"]), tuple(data["hidden"])
        return cls(**data)


@dataclass(frozen=True)
class Plan:
    """A step's decision, made before any compute on the batch (journal-able as JSON)."""

    position: int                 # stream index of the batch's first sample
    size: int
    boundary: Boundary | None     # an experience that opens before this batch
    new_labels: tuple[int, ...]   # never-seen labels, in order of first appearance

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position, "size": self.size, "new_labels": list(self.new_labels),
                "boundary": self.boundary.to_json() if self.boundary else None}


@dataclass
class StepResult:
    plan: Plan
    predictions: torch.Tensor     # predicted labels, -1 where no label was known yet
    correct: int
    loss: float                   # mean prequential cross-entropy of the batch

    @property
    def boundary(self) -> Boundary | None:
        return self.plan.boundary


class OnlineTrainer:
    """Model + optimizer + strategy + boundary policy, driven one batch at a time."""

    def __init__(self, config: TrainerConfig,
                 optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
                 | None = None, group: ReplicaGroup | None = None) -> None:
        self.config = config
        #: the replicas this trainer is one of (data-parallel; None: it is alone)
        self.group = group
        self._replica_sizes: list[int] = []  # each replica's batch size in the planned step
        self._step_labels = torch.zeros(0, dtype=torch.long)  # every replica's, planned step
        self.device = torch.device(config.device)
        seeds = torch.Generator().manual_seed(config.seed)
        # one generator per consumer, so adding a draw in one place never shifts another's
        model_gen, strategy_gen = (torch.Generator().manual_seed(int(s))
                                   for s in torch.randint(0, 2**62, (2,), generator=seeds))
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,),
                                                                         generator=seeds)))
        self.model: Classifier = build_model(config.model, config.input_shape, config.hidden,
                                             model_gen).to(self.device)
        params = list(self.model.parameters())
        self.optimizer = (optimizer_factory(params) if optimizer_factory else
                          torch.optim.SGD(params, lr=config.lr, momentum=config.momentum))
        self.strategy: Strategy = make_strategy(config.strategy, self.model, self.optimizer,
                                                strategy_gen, config.params)
        if group is not None and not self.strategy.data_parallel:
            from streamcl.strategies import STRATEGIES

            able = ", ".join(n for n, cls in STRATEGIES.items() if cls.data_parallel)
            raise ValueError(f"strategy {config.strategy!r} does not run data-parallel yet "
                             "(its state must be global, not only its gradients): use one "
                             f"replica, or one of {able}")
        if group is not None:
            self.strategy.group = group
            self.strategy.shard(group.rank, group.world_size)
        self.policy = BoundaryPolicy.from_spec(
            config.boundaries, detector=config.detector, detector_params=config.detector_params,
            min_length=config.min_length, cooldown=config.cooldown, monitor=config.monitor)
        self.shared_forward = train_forward_predicts(self.model)
        self.labels: list[int] = []
        self.index: dict[int, int] = {}
        self._rebuild_tables()
        self.position = 0
        self.steps = 0
        self.boundaries: list[Boundary] = []
        self.correct = 0
        self.loss_sum = 0.0

    # -- the step ---------------------------------------------------------------------------
    def plan(self, y: torch.Tensor, task: torch.Tensor | int | None = None) -> Plan | None:
        """Decide the step for a batch with labels ``y`` (and the producer's task value).

        Data-parallel, ``y`` is this replica's part and the plan is the global step's: every
        replica's labels in rank order (a replica may bring none), the first task value; every
        replica must call it, and ``None`` means no replica brought a sample (no step)."""
        if isinstance(task, torch.Tensor):
            task = int(task.reshape(-1)[0]) if task.numel() else None
        if self.group is not None:
            headers = self.group.exchange([len(y), -1 if task is None else task])
            self._replica_sizes = [n for n, _ in headers]
            task = next((t for _, t in headers if t >= 0), None)
            y = torch.cat(self.group.gather(y.long(), self._replica_sizes))
            if not len(y):
                return None
            self._step_labels = y
        y_list = y.tolist()
        if not y_list:
            raise ValueError("an empty batch has nothing to learn; skip it instead of planning it")
        new = tuple(v for v in dict.fromkeys(y_list) if v not in self.index)
        if len(self.labels) + len(new) > self.config.max_classes:
            raise ValueError(f"the batch brings {len(new)} new labels, the head has "
                             f"{len(self.labels)} of at most max_classes="
                             f"{self.config.max_classes}; take out the samples over_cap() "
                             "marks before planning")
        boundary = self.policy.decide(self.position, batch_size=len(y_list),
                                      new_labels=bool(new), task=task)
        return Plan(self.position, len(y_list), boundary, new)

    def over_cap(self, y: torch.Tensor) -> torch.Tensor | None:
        """Mask of the samples whose label would grow the head past ``max_classes`` (``None``:
        none). New labels are admitted in order of first appearance while there is room, so
        the answer depends on the labels seen so far and on ``y`` alone: a replay of the same
        journal from the same state refuses the same samples."""
        room = self.config.max_classes - len(self.labels)
        mine = y.tolist()
        new = [v for v in dict.fromkeys(mine) if v not in self.index]
        y_list = mine
        if self.group is not None:  # the global batch's labels decide: every replica calls
            counts = self.group.exchange([len(new), len(mine)])
            if sum(c[0] for c in counts) <= room:
                return None
            sizes = [c[1] for c in counts]
            y_list = torch.cat(self.group.gather(y.long(), sizes)).tolist()
            new = [v for v in dict.fromkeys(y_list) if v not in self.index]
        if len(new) <= room:
            return None
        refused = set(new[room:])
        return torch.tensor([v in refused for v in mine], dtype=torch.bool)

    def end_experience(self, boundary: Boundary) -> None:
        """Close the current experience; the next batch belongs to ``boundary.experience``."""
        self.strategy.on_experience_end()
        self.strategy.experience = boundary.experience
        self.boundaries.append(boundary)

    def learn(self, x: torch.Tensor, y: torch.Tensor, plan: Plan) -> StepResult:
        """Predict the batch, then train on it (the plan's boundary must already be applied)."""
        if plan.position != self.position:
            raise ValueError(f"plan is for stream position {plan.position}, "
                             f"trainer is at {self.position}")
        n_known = self.model.n_classes
        if plan.new_labels:
            self._add_labels(plan.new_labels)
        if self.group is not None:
            return self._learn_replica(x, y, plan, n_known)
        pred, yi, logits = self._predict_then_train(x, y, n_known)
        hit = pred == yi
        correct = int(hit.sum())
        size = len(yi)
        if self.policy.wants_losses:
            losses = F.cross_entropy(logits, yi, reduction="none")
            loss = float(losses.mean())
            self.policy.observe(self.position, losses.tolist())
        else:
            loss = float(F.cross_entropy(logits, yi))
            if self.policy.detector is not None:
                self.policy.observe(self.position, (~hit).float().tolist())
        self.position += size
        self.steps += 1
        self.correct += correct
        self.loss_sum += loss * size
        return StepResult(plan, self._to_labels(pred), correct, loss)

    def _predict_then_train(self, x: torch.Tensor, y: torch.Tensor, n_known: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict the batch with the model as it is (over the ``n_known`` classes known
        before it: the prequential record), then let the strategy train on it. Returns the
        predicted head rows (-1 while no class is known), ``y``'s head rows and the training
        logits (one forward serves both when train mode predicts as eval mode does)."""
        x = prepare_inputs(x, self.device)
        yi = self._to_indices(y)
        if not self.shared_forward:
            scores = self._predict_scores(x, n_known)
        logits = self.strategy.observe(x, yi)
        if self.shared_forward:
            scores = self.model.rectify(logits[:, :n_known]) if n_known else None
        pred = (scores.argmax(1) if n_known else
                torch.full((len(yi),), -1, dtype=torch.long, device=self.device))
        return pred, yi, logits

    def _learn_replica(self, x: torch.Tensor, y: torch.Tensor, plan: Plan,
                       n_known: int) -> StepResult:
        """:meth:`learn` as one of N replicas: the gradient is averaged over the replicas
        (weighted by batch size) inside the strategy's optimizer step, the detector sees every
        replica's errors in rank order, the counts are global. A replica with an empty batch
        still takes the step (its gradient counts as zeros)."""
        group = self.group
        assert group is not None
        n = len(y)
        self.strategy.reduce_gradients = lambda: group.average_gradients(
            self.model.parameters(), n)
        self.strategy.step_targets = self._to_indices(self._step_labels)
        if n:
            pred, yi, logits = self._predict_then_train(x, y, n_known)
            losses = F.cross_entropy(logits, yi, reduction="none").detach()
            errors = (pred != yi).float()
        else:
            self.strategy.observe_empty()
            pred = torch.zeros(0, dtype=torch.long)
            losses = errors = torch.zeros(0)
        # every replica's errors and losses, in rank order: the counts and the detector's input
        sizes = self._replica_sizes
        parts = group.gather(torch.cat([errors.cpu(), losses.float().cpu()]),
                             [2 * s for s in sizes])
        errors = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
        losses = torch.cat([p[s:] for p, s in zip(parts, sizes, strict=True)])
        correct, loss_sum = len(errors) - float(errors.sum()), float(losses.sum())
        if self.policy.detector is not None:
            signal = losses if self.policy.wants_losses else errors
            self.policy.observe(self.position, signal.tolist())
        self.position += plan.size
        self.steps += 1
        self.correct += round(correct)
        self.loss_sum += loss_sum
        return StepResult(plan, self._to_labels(pred), round(correct), loss_sum / plan.size)

    def step(self, x: torch.Tensor, y: torch.Tensor,
             task: torch.Tensor | int | None = None) -> StepResult:
        plan = self.plan(y, task)
        if plan is None:
            raise ValueError("no replica brought a sample to this step: nothing to learn")
        if plan.boundary is not None:
            self.end_experience(plan.boundary)
        return self.learn(x, y, plan)

    # -- inference --------------------------------------------------------------------------
    def prepare_inference(self) -> None:
        """Let the strategy update inference-time state for the open experience (IL2M)."""
        self.strategy.prepare_inference()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted labels through the model's inference path (rectified where it applies)."""
        if not self.model.n_classes or not len(x):
            return torch.full((len(x),), -1, dtype=torch.long)
        out = [self._predict_scores(prepare_inputs(x[i:i + batch_size], self.device),
                                    self.model.n_classes)
               for i in range(0, len(x), batch_size)]
        return self._to_labels(torch.cat(out).argmax(1)).cpu()

    @torch.no_grad()
    def _predict_scores(self, x: torch.Tensor, n_classes: int) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        scores = self.model.rectify(self.model(x)[:, :n_classes])
        self.model.train(was_training)
        return scores

    def _to_labels(self, pred: torch.Tensor) -> torch.Tensor:
        return self._label_table.to(pred.device)[pred]  # index -1 picks the trailing -1

    def _to_indices(self, y: torch.Tensor) -> torch.Tensor:
        """Head rows of labels ``y`` (all known): a lookup table while labels are small ints."""
        if self._lut is not None and int(y.max()) < len(self._lut):
            return self._lut[y.long()].to(self.device)
        return torch.tensor([self.index[v] for v in y.tolist()], dtype=torch.long,
                            device=self.device)

    def _rebuild_tables(self) -> None:
        self._label_table = torch.tensor([*self.labels, -1], dtype=torch.long)
        top = max(self.labels, default=-1)
        self._lut = None
        if top < 1 << 16:  # dense lookup for the usual 0..K labels; a dict beyond
            self._lut = torch.full((top + 1,), -1, dtype=torch.long)
            self._lut[torch.tensor(self.labels, dtype=torch.long)] = torch.arange(len(self.labels))

    # -- head growth ------------------------------------------------------------------------
    def _add_labels(self, new: tuple[int, ...]) -> None:
        for v in new:
            self.index[v] = len(self.labels)
            self.labels.append(v)
        self._rebuild_tables()
        self._grow_to(len(self.labels))

    def _grow_to(self, n: int) -> None:
        n_old = self.model.n_classes
        if n <= n_old:
            return
        old = (self.model.head.weight, self.model.head.bias)
        self.model.grow(n - n_old, self.generator)
        for p_old, p_new in zip(old, (self.model.head.weight, self.model.head.bias), strict=True):
            replace_parameter(self.optimizer, p_old, p_new)
        self.strategy.on_head_grown(n_old, n)

    # -- state ------------------------------------------------------------------------------
    @property
    def prequential_accuracy(self) -> float:
        return self.correct / self.position if self.position else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_json(),
            "labels": list(self.labels),
            "position": self.position,
            "steps": self.steps,
            "correct": self.correct,
            "loss_sum": self.loss_sum,
            "boundaries": [b.to_json() for b in self.boundaries],
            "generator": self.generator.get_state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported state format {state.get('format')!r}")
        mine = self.config.to_json()
        if state["config"] != mine:
            diff = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise ValueError(f"state was made with a different configuration ({', '.join(diff)})")
        self._add_labels(tuple(state["labels"][len(self.labels):]))
        load_module_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.policy.load_state_dict(state["policy"])
        set_rng_state(self.generator, state["generator"])
        self.position, self.steps = state["position"], state["steps"]
        self.correct, self.loss_sum = state["correct"], state["loss_sum"]
        self.boundaries = [Boundary(**b) for b in state["boundaries"]]

    @classmethod
    def from_state(cls, state: dict[str, Any], group: ReplicaGroup | None = None
                   ) -> OnlineTrainer:
        trainer = cls(TrainerConfig.from_json(state["config"]), group=group)
        trainer.load_state_dict(state)
        return trainer


def prepare_inputs(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Inputs as float32 on ``device``; uint8 is read as image bytes and scaled to [0, 1]."""
    if x.dtype == torch.uint8:
        return x.to(device).float().div_(255.0)
    return x.to(device, torch.float32)


def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter,
                      new: nn.Parameter) -> None:
    """Point ``optimizer`` at ``new`` instead of ``old``, keeping (row-padded) per-parameter state.

    Used when the head grows: momentum or Adam moments of the existing rows carry over, the new
    rows start from zero state.
    """
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            k: (torch.cat([v, v.new_zeros((new.shape[0] - v.shape[0], *v.shape[1:]))])
                if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() else v)
            for k, v in state.items()}


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load parameters in place (shapes must match) and assign buffers (their shapes may
    differ: a rectifier's per-experience statistics grow with the stream)."""
    params = dict(module.named_parameters())
    buffers = {name for name, _ in module.named_buffers()}
    missing = (set(params) | buffers) - set(state)
    if missing:
        raise ValueError(f"model state lacks {sorted(missing)}")
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value)
            elif name in buffers:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner), leaf, value.clone())
            else:
                raise ValueError(f"model state has unknown entry {name!r}")
