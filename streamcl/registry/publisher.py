"""When to publish, whether the candidate may replace production, and the publication itself.

The trainer service asks :meth:`Publisher.due` between batches. When a trigger fires (every N
samples, every T seconds, at an experience's end), :meth:`Publisher.evaluate` exports the
candidate and scores it and the production model on the same holdout: the gate's verdict, the
continual-learning metrics (accuracy matrix over the experiences the holdout samples arrived
in, average accuracy, forgetting, backward transfer) and the negative flip rate against
production. The service journals the verdict, and only then :meth:`Publisher.commit` writes the
version, moves ``production`` and announces it — so a crash between the two is repaired by
recovery re-publishing the journaled version from the replayed state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from streamcl.metrics.continual import average_accuracy, backward_transfer, forgetting
from streamcl.registry.announce import Announcer, announcement
from streamcl.registry.holdout import (
    Holdout,
    accuracy,
    accuracy_by_experience,
    gate_decision,
    negative_flip_rate,
)
from streamcl.registry.model import InferenceModel, export_model
from streamcl.registry.registry import PRODUCTION, ModelRegistry
from streamcl.stream.journal import config_hash
from streamcl.trainer import OnlineTrainer


@dataclass(frozen=True)
class PublishPolicy:
    """Publication triggers (any that is set) and the gate's tolerance."""

    every_samples: int | None = 5000
    every_s: float | None = None
    at_experience_end: bool = True
    tolerance: float = 0.02


@dataclass
class Candidate:
    """An exported model with its gate verdict and metrics (nothing is written yet)."""

    trigger: str
    promote: bool
    reason: str
    tensors: dict[str, torch.Tensor]
    model: dict[str, Any]
    metrics: dict[str, Any]
    gate: dict[str, Any]


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


class Publisher:
    """The publication side of one trainer service (registry, gate, announcements)."""

    def __init__(self, registry: ModelRegistry, policy: PublishPolicy, *,
                 announcer: Announcer | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.policy = policy
        self.announcer = announcer
        self.clock = clock
        self.production: InferenceModel | None = None
        self.production_version: int | None = registry.alias(PRODUCTION)
        self.last_position = 0
        self.last_time = clock()
        #: holdout accuracy after each finished experience: {row experience: {column: acc}}
        self.rows: dict[int, dict[int, float]] = {}

    # -- when ---------------------------------------------------------------------------------
    def due(self, position: int, experience_ended: bool) -> str | None:
        """The trigger that fires before the batch at ``position``, if any."""
        if position == self.last_position:
            return None  # nothing new trained since the last publication
        p = self.policy
        if experience_ended and p.at_experience_end:
            return "experience-end"
        if p.every_samples is not None and position - self.last_position >= p.every_samples:
            return "samples"
        if p.every_s is not None and self.clock() - self.last_time >= p.every_s:
            return "time"
        return None

    def mark(self, position: int, ts: float | None = None) -> None:
        """A publication (or rejection) happened at ``position``: restart the triggers."""
        self.last_position = position
        self.last_time = self.clock() if ts is None else ts

    # -- whether ------------------------------------------------------------------------------
    def load_production(self) -> None:
        """(Re)load the production version from the registry, if there is one."""
        self.production_version = self.registry.alias(PRODUCTION)
        self.production = (None if self.production_version is None else
                           self.registry.load_model(self.production_version))

    def evaluate(self, trainer: OnlineTrainer, holdout: Holdout, trigger: str,
                 experience: int, *, finished: bool) -> Candidate:
        """Export the trainer's model and judge it on the holdout against production.

        ``experience`` is the experience the model last trained on; ``finished`` when it just
        ended (its accuracy row is then final and kept for the matrix).
        """
        tensors, section = export_model(trainer)
        model = InferenceModel(tensors, {"model": section})
        correct, exp = holdout.evaluate(model.predict)
        cand_acc = accuracy(correct)
        prod_acc, flips = None, math.nan
        if self.production is not None:
            prod_correct, _ = holdout.evaluate(self.production.predict)
            prod_acc = accuracy(prod_correct)
            flips = negative_flip_rate(prod_correct, correct)
        promote, reason = gate_decision(cand_acc, prod_acc, self.policy.tolerance)
        row = accuracy_by_experience(correct, exp)
        rows = dict(self.rows)
        rows[experience] = row
        if finished:
            self.rows[experience] = row
        matrix = self.matrix(rows)
        metrics = {
            "holdout_accuracy": _finite(cand_acc),
            "holdout_samples": len(correct),
            "prequential_accuracy": _finite(trainer.prequential_accuracy),
            "accuracy_matrix": {str(r): {str(c): round(v, 6) for c, v in cols.items()}
                                for r, cols in sorted(rows.items())},
            "average_accuracy": _finite(average_accuracy(matrix)),
            "forgetting": _finite(forgetting(matrix)),
            "backward_transfer": _finite(backward_transfer(matrix)),
            "negative_flip_rate": _finite(flips),
            "experience": experience,
            "finished": finished,
        }
        gate = {"decision": "promoted" if promote else "rejected", "reason": reason,
                "candidate": _finite(cand_acc),
                "production": None if prod_acc is None else _finite(prod_acc),
                "production_version": self.production_version,
                "tolerance": self.policy.tolerance}
        return Candidate(trigger, promote, reason, tensors, section, metrics, gate)

    @staticmethod
    def rebuild(trainer: OnlineTrainer, entry: Mapping[str, Any]) -> Candidate:
        """The candidate a journaled ``publish`` entry judged, exported again from the replayed
        trainer, with the entry's own verdict and metrics (nothing is re-evaluated)."""
        tensors, section = export_model(trainer)
        return Candidate(entry["trigger"], True, entry["gate"].get("reason", ""), tensors,
                         section, dict(entry["metrics"]), dict(entry["gate"]))

    @staticmethod
    def matrix(rows: dict[int, dict[int, float]]) -> list[list[float | None]]:
        """Rows as :mod:`streamcl.metrics.continual`'s matrix (``None`` where undefined)."""
        if not rows:
            return []
        order = sorted(rows)
        cols = sorted({c for r in rows.values() for c in r} | set(order))
        return [[rows[r].get(c) if c <= r else None for c in cols] for r in order]

    # -- publish ------------------------------------------------------------------------------
    def next_version(self) -> int:
        return (self.registry.latest() or 0) + 1

    def commit(self, candidate: Candidate, version: int, trainer: OnlineTrainer,
               **fields: Any) -> dict[str, Any]:
        """Write ``version`` (already journaled), make it production, announce it."""
        config = trainer.config.to_json()
        manifest = self.registry.publish(candidate.tensors, {
            "model": candidate.model, "strategy": config["strategy"],
            "params": config["params"], "config_hash": config_hash(config),
            "trainer_config": config, "metrics": candidate.metrics, "gate": candidate.gate,
            "trigger": candidate.trigger, **fields}, version=version, aliases=(PRODUCTION,))
        self.production = InferenceModel(candidate.tensors, manifest)
        self.production_version = version
        if self.announcer is not None:
            self.announcer.announce(announcement("publish", version, alias=PRODUCTION,
                                                 registry=self.registry.url))
        return manifest

    def close(self) -> None:
        if self.announcer is not None:
            self.announcer.close()
