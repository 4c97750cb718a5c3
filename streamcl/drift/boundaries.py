"""Experience boundaries: where one experience ends and the next begins, decided once per step.

A live stream never says "task 3 starts now", so boundaries are inferred. Triggers:

* ``drift``: a drift detector watching the prequential errors (or losses) flags an
  *increase* — the model got worse, the world changed. A detected *decrease* is the
  model learning, not a new experience, and is ignored.
* ``new-class``: a batch carries a label never seen before.
* ``task``: the producer's explicit ``task`` value changed (oracle mode).
* ``every:N``: every N samples (a fixed schedule, for comparison).

The decision for batch *t* is made **before** any compute on it, from batch *t*'s metadata
(labels, task value, size) and the detector's state after batch *t-1*. That makes it one
small, journal-able fact per step that any replica could share, and lets the strategies close
an experience before training on the batch that opens the next. A drift flagged while
observing batch *t-1* therefore takes effect at batch *t*.

``min_length`` (samples) suppresses inferred boundaries (drift, new-class) in an experience
shorter than that; ``cooldown`` (samples) keeps the freshly reset detector unfed right after a
boundary, while the error is still high from the switch itself. Oracle and schedule triggers
always fire.

>>> policy = BoundaryPolicy.from_spec("every:100")
>>> [policy.decide(position, batch_size=50, new_labels=False, task=None) is not None
...  for position in range(0, 300, 50)]
[False, False, True, False, True, False]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from streamcl.drift import DETECTORS, make_detector
from streamcl.drift.base import DriftDetector

TRIGGERS = ("drift", "new-class", "task", "every")

# ADWIN, DDM and Page-Hinkley are built for one observation per sample (DDM for 0/1 errors), and
# their bounds count observations: fed per-batch means, ADWIN misses the few-batch error burst
# a class-incremental switch causes. KSWIN runs a two-sample KS test on every update
# (~0.3 ms), so it watches one value per batch instead.
PER_BATCH_DETECTORS = frozenset({"kswin"})
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {"kswin": {"seed": 0}}


@dataclass(frozen=True)
class Boundary:
    """One experience boundary: the new experience starts at stream position ``index``."""

    index: int
    trigger: str
    experience: int
    statistic: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class BoundaryPolicy:
    """Combines the triggers into one boundary decision per batch (see the module docstring)."""

    def __init__(self, triggers: set[str] | frozenset[str] = frozenset({"drift"}), *,
                 detector: str = "adwin", detector_params: dict[str, Any] | None = None,
                 every: int | None = None, min_length: int = 0, cooldown: int = 0,
                 monitor: str = "error") -> None:
        unknown = set(triggers) - set(TRIGGERS)
        if unknown:
            raise ValueError(f"--boundaries: unknown trigger {sorted(unknown)[0]!r}; "
                             f"use {', '.join(TRIGGERS[:3])} or every:N")
        if "every" in triggers and (every is None or every < 1):
            raise ValueError("--boundaries every:N needs a positive sample count N")
        if monitor not in ("error", "loss"):
            raise ValueError(f"--monitor {monitor!r}: use error or loss")
        self.triggers = frozenset(triggers)
        self.every = every
        self.min_length = min_length
        self.cooldown = cooldown
        self.monitor = monitor
        self.detector_name = detector
        self.detector_params = {**DEFAULT_PARAMS.get(detector, {}), **(detector_params or {})}
        # built even when unused, so a misspelt name or parameter fails here, not later
        detector_obj = make_detector(detector, **self.detector_params)
        self.detector: DriftDetector | None = detector_obj if "drift" in triggers else None
        self.experience = 0
        self.start = 0            # stream position where the current experience began
        self.task: int | None = None
        self.pending: float | None = None  # statistic of a drift flagged on the last batch

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> BoundaryPolicy:
        """Parse ``"drift"``, ``"task"``, ``"new-class"``, ``"every:N"`` or a comma list."""
        triggers, every = set(), None
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if part.startswith("every:"):
                try:
                    every = int(part.partition(":")[2])
                except ValueError:
                    raise ValueError(f"--boundaries {part!r}: N must be an integer") from None
                triggers.add("every")
            else:
                triggers.add(part)
        if not triggers:
            raise ValueError("--boundaries: give at least one of drift, task, new-class, every:N")
        return cls(triggers, every=every, **kwargs)

    def decide(self, position: int, *, batch_size: int, new_labels: bool,
               task: int | None) -> Boundary | None:
        """The boundary (if any) that opens before the batch starting at ``position``."""
        length = position - self.start
        trigger, stat = None, None
        if "task" in self.triggers and task is not None:
            if self.task is not None and task != self.task:
                trigger = "task"
            self.task = task
        if trigger is None and "every" in self.triggers and self.every and length >= self.every:
            trigger = "every"
        inferred_ok = length >= max(self.min_length, 1)
        if trigger is None and "new-class" in self.triggers and new_labels and inferred_ok:
            trigger = "new-class"
        if trigger is None and self.pending is not None and inferred_ok:
            trigger, stat = "drift", self.pending
        self.pending = None
        if trigger is None:
            return None
        self.experience += 1
        self.start = position
        if self.detector is not None:
            self.detector.reset()
        return Boundary(position, trigger, self.experience, stat)

    @property
    def wants_losses(self) -> bool:
        """Whether :meth:`observe` needs per-sample losses (else 0/1 errors will do)."""
        return self.detector is not None and self.monitor == "loss"

    def observe(self, position: int, values: list[float]) -> None:
        """Feed the detector the prequential errors (or losses) of the batch at ``position``."""
        if self.detector is None or self.pending is not None:
            return
        if position - self.start < self.cooldown:
            return
        if self.detector_name in PER_BATCH_DETECTORS:
            values = [sum(values) / len(values)]
        for v in values:
            det = self.detector.update(v)
            if det.drift_detected and det.direction > 0:
                self.pending = float(det.statistic)
                return

    def state_dict(self) -> dict[str, Any]:
        return {"experience": self.experience, "start": self.start, "task": self.task,
                "pending": self.pending,
                "detector": self.detector.state_dict() if self.detector else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experience, self.start = state["experience"], state["start"]
        self.task, self.pending = state["task"], state["pending"]
        if self.detector is not None:
            self.detector.load_state_dict(state["detector"])


__all__ = ["DEFAULT_PARAMS", "DETECTORS", "PER_BATCH_DETECTORS", "TRIGGERS", "Boundary",
           "BoundaryPolicy"]
