"""When to publish, whether the candidate may replace production, and the publication itself.

The trainer service asks :meth:`Publisher.judge` between batches. When a trigger fires (every N
samples, every T seconds, at an experience's end), the publisher exports the candidate and
scores it and the production model on the same holdout: the gate's verdict, the
continual-learning metrics (accuracy matrix over the experiences the holdout samples arrived
in, average accuracy, forgetting, backward transfer) and the negative flip rate against
production. It returns its verdict as a journal entry (:class:`~streamcl.stream.entries.Publish`
or :class:`~streamcl.stream.entries.Reject`). The service journals it and waits for the
journal's acknowledgement, and only then :meth:`Publisher.commit` writes the version, moves
``production`` and announces it — so a crash between the two is repaired by recovery
re-publishing the journaled version from the replayed state (:meth:`Publisher.restore`).

Its own state (when it last published, the accuracy rows of finished experiences) is small and
goes into every snapshot (:meth:`state_dict`), so recovery reads only the journal after it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from streamcl.metrics.continual import AccuracyMatrix
from streamcl.registry.announce import Announcer, announcement
from streamcl.registry.holdout import (
    Holdout,
    PooledHoldout,
    accuracy,
    accuracy_by_experience,
    gate_decision,
    negative_flip_rate,
)
from streamcl.registry.model import InferenceModel, export_model
from streamcl.registry.registry import PRODUCTION, ModelRegistry, RegistryError
from streamcl.stream.entries import Evaluation, Gate, Publish, Reject, Verdict, config_hash

if TYPE_CHECKING:
    from streamcl.learner import Learner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishPolicy:
    """Publication triggers (any that is set) and the gate's tolerance."""

    every_samples: int | None = 5000
    every_s: float | None = None
    at_experience_end: bool = True
    tolerance: float = 0.02
    #: retention after each publication (:meth:`ModelRegistry.gc`); ``None``: keep every version
    keep_versions: int | None = None
    keep_alias_history: int | None = None


@dataclass
class Candidate:
    """An exported model with its evaluation and the gate's verdict (nothing is written yet)."""

    tensors: dict[str, torch.Tensor]
    model: dict[str, Any]
    metrics: Evaluation
    gate: Gate


def _finite(value: float | None) -> float | None:
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
        #: holdout accuracy after each finished experience
        self.finished = AccuracyMatrix()
        self._candidate: tuple[int, Candidate] | None = None  # (version, judged candidate)

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

    def judge(self, learner: Learner, experience_ended: bool,
              newest_sample_ts_ms: int | None = None, holdout: PooledHoldout | None = None
              ) -> Publish | Reject | None:
        """The verdict on the learner's model if a trigger is due (``None`` if not), as the
        journal entry that records it. A ``Publish`` is then :meth:`commit`-ted by the caller
        once the entry is acknowledged; the triggers restart either way."""
        trigger = self.due(learner.position, experience_ended)
        if trigger is None:
            return None
        candidate = self.evaluate(learner, finished=experience_ended, holdout=holdout)
        common: dict[str, Any] = {"position": learner.position, "trigger": trigger,
                                  "metrics": candidate.metrics, "gate": candidate.gate,
                                  "newest_sample_ts_ms": newest_sample_ts_ms}
        self.mark(learner.position)
        if not candidate.gate.promoted:
            return Reject(reason=candidate.gate.reason, **common)
        version = self.next_version()
        self._candidate = (version, candidate)
        return Publish(version=version, **common)

    def evaluate(self, learner: Learner, *, finished: bool,
                 holdout: PooledHoldout | None = None) -> Candidate:
        """Export the learner's model and judge it on its holdout against production
        (``holdout``: every replica's, pooled, for a data-parallel learner).

        The accuracy row is for the experience the model last trained on; ``finished`` when
        that experience just ended (its row is then final and kept for the matrix).
        """
        tensors, section = export_model(learner.trainer)
        model = InferenceModel(tensors, {"model": section})
        if holdout is None:
            holdout = learner.holdout or Holdout(0, 1)
        correct, exp = holdout.evaluate(model.predict)
        cand_acc = accuracy(correct)
        prod_acc, flips = None, math.nan
        if self.production is not None:
            prod_correct, _ = holdout.evaluate(self.production.predict)
            prod_acc = accuracy(prod_correct)
            flips = negative_flip_rate(prod_correct, correct)
        promote, reason = gate_decision(cand_acc, prod_acc, self.policy.tolerance)
        row = accuracy_by_experience(correct, exp)
        matrix = self.finished.with_row(learner.experience, row)
        if finished:
            self.finished = matrix
        metrics = Evaluation(
            holdout_accuracy=_finite(cand_acc), holdout_samples=len(correct),
            prequential_accuracy=_finite(learner.trainer.prequential_accuracy),
            accuracy_matrix=matrix, average_accuracy=_finite(matrix.average_accuracy()),
            forgetting=_finite(matrix.forgetting()),
            backward_transfer=_finite(matrix.backward_transfer()),
            negative_flip_rate=_finite(flips), experience=learner.experience, finished=finished)
        gate = Gate(decision="promoted" if promote else "rejected", reason=reason,
                    candidate=_finite(cand_acc),
                    production=None if prod_acc is None else _finite(prod_acc),
                    production_version=self.production_version,
                    tolerance=self.policy.tolerance)
        return Candidate(tensors, section, metrics, gate)

    # -- restoring ------------------------------------------------------------------------------
    def restore(self, entry: Verdict) -> None:
        """Take a journaled verdict (read during recovery) as if just decided: restart the
        triggers at its position and time, keep a finished experience's accuracy row."""
        self.mark(entry.position, entry.ts)
        m = entry.metrics
        if m.finished and m.experience in m.accuracy_matrix.rows:
            self.finished = self.finished.with_row(m.experience,
                                                   m.accuracy_matrix.rows[m.experience])

    def republish_if_missing(self, entry: Publish, learner: Learner, **fields: Any) -> bool:
        """Recovery met a journaled publication: write it if the registry lacks it (a crash
        between journal and registry), from ``learner`` as replayed to that entry, with the
        entry's own verdict and metrics (nothing is re-evaluated). True if it had to."""
        self.restore(entry)
        if self.registry.exists(entry.version):
            self.production_version = entry.version
            return False
        newest = self.registry.latest()
        if newest is not None and newest > entry.version:
            # a later version made it to the registry, so this one did too: retention (or an
            # operator's gc) removed it since, which a replay must not undo
            return False
        log.warning("v%d was journaled but not in the registry: publishing it now",
                    entry.version)
        tensors, section = export_model(learner.trainer)
        self._candidate = (entry.version, Candidate(tensors, section, entry.metrics, entry.gate))
        self.commit(entry, learner, **fields)
        return True

    def state_dict(self) -> dict[str, Any]:
        """The publisher's own state, for the snapshot (JSON)."""
        return {"last_position": self.last_position, "last_time": self.last_time,
                "finished": self.finished.to_json()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_position = int(state["last_position"])
        self.last_time = float(state["last_time"])
        self.finished = AccuracyMatrix.from_json(state["finished"])

    # -- publish ------------------------------------------------------------------------------
    def next_version(self) -> int:
        return (self.registry.latest() or 0) + 1

    def commit(self, entry: Publish, learner: Learner, **fields: Any) -> dict[str, Any]:
        """Write the version ``entry`` journaled (acknowledged already), make it production,
        announce it."""
        if self._candidate is None or self._candidate[0] != entry.version:
            raise RuntimeError(f"v{entry.version} was not judged by this publisher")
        candidate = self._candidate[1]
        self._candidate = None
        config = learner.trainer.config.to_json()
        manifest = self.registry.publish(candidate.tensors, {
            "model": candidate.model, "strategy": config["strategy"],
            "params": config["params"], "config_hash": config_hash(config),
            "trainer_config": config, "metrics": candidate.metrics.to_json(),
            "gate": candidate.gate.to_json(), "trigger": entry.trigger, **fields},
            version=entry.version, aliases=(PRODUCTION,))
        self.production = InferenceModel(candidate.tensors, manifest)
        self.production_version = entry.version
        if self.policy.keep_versions:
            self.prune()
        if self.announcer is not None:
            self.announcer.announce(announcement("publish", entry.version, alias=PRODUCTION,
                                                 registry=self.registry.url))
        return manifest

    def prune(self) -> list[int]:
        """Apply the retention policy; return the versions removed. A failure is logged, not
        raised: the version is committed and production moved, and a registry that cannot
        shed old versions is an operator's problem, not a reason to stop learning."""
        try:
            removed = self.registry.gc(self.policy.keep_versions or 0,
                                       keep_history=self.policy.keep_alias_history).removed
        except (RegistryError, OSError) as exc:
            log.warning("retention after v%s skipped: %s", self.production_version, exc)
            return []
        if removed:
            log.info("retention removed %d old version(s)", len(removed))
        return removed

    def close(self) -> None:
        if self.announcer is not None:
            self.announcer.close()
