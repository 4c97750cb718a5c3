"""Run a strategy over a stored stream, as it would run live, and measure it.

The stream is cut into micro-batches in file order (and, when task boundaries are the
trigger, also at every change of the task value, as a producer's batches would be). Each batch
goes through :meth:`OnlineTrainer.step` — predicted first, then trained. At every experience
boundary and at the end, the model is evaluated on the test set: row ``i`` of the accuracy
matrix is the accuracy after experience ``i`` on the test samples of each experience's
classes (keyed by ``(task, label)`` when both files carry a task, else by label).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from streamcl.data import Stream
from streamcl.metrics.continual import average_accuracy, backward_transfer, forgetting
from streamcl.state import state_sha256
from streamcl.trainer import OnlineTrainer, TrainerConfig


def batch_bounds(stream: Stream, batch_size: int, cut_at_tasks: bool) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each micro-batch."""
    cuts = [0, len(stream)]
    if cut_at_tasks and stream.task is not None:
        cuts += (np.flatnonzero(np.diff(stream.task)) + 1).tolist()
    cuts = sorted(set(cuts))
    for lo, hi in itertools.pairwise(cuts):
        for start in range(lo, hi, batch_size):
            yield start, min(start + batch_size, hi)


def _keys(stream: Stream, use_task: bool, n_labels: int) -> np.ndarray:
    """One integer per sample: its label, or its (task, label) pair with one shared scale."""
    return stream.task * n_labels + stream.y if use_task else stream.y


class _Evaluator:
    """Accumulates the accuracy matrix, one row per finished experience."""

    def __init__(self, trainer: OnlineTrainer, train: Stream, test: Stream) -> None:
        self.trainer, self.test = trainer, test
        use_task = train.task is not None and test.task is not None
        n_labels = int(max(train.y.max(), test.y.max())) + 1
        self.train_keys = _keys(train, use_task, n_labels)
        self.test_keys = _keys(test, use_task, n_labels)
        self.x_test = torch.from_numpy(test.x)
        self.columns: list[np.ndarray] = []   # test-sample mask of each experience
        self.matrix: list[list[float | None]] = []
        self.predictions: np.ndarray | None = None

    def close_experience(self, start: int, stop: int) -> None:
        keys = np.unique(self.train_keys[start:stop])
        self.columns.append(np.isin(self.test_keys, keys))
        pred = self.trainer.predict(self.x_test).numpy()
        hits = pred == self.test.y
        self.matrix.append([float(hits[m].mean()) if m.any() else None for m in self.columns])
        self.predictions = pred

    def summary(self) -> dict[str, Any]:
        assert self.predictions is not None
        hits = self.predictions == self.test.y
        per_class = {int(c): float(hits[self.test.y == c].mean()) for c in np.unique(self.test.y)}
        return {"samples": len(self.test), "accuracy": float(hits.mean()), "per_class": per_class,
                "accuracy_matrix": self.matrix, "average_accuracy": average_accuracy(self.matrix),
                "forgetting": forgetting(self.matrix),
                "backward_transfer": backward_transfer(self.matrix)}


def simulate(train: Stream, trainer: OnlineTrainer | TrainerConfig, *, batch_size: int = 32,
             test: Stream | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Stream ``train`` through ``trainer`` (or a fresh one built from a config); return the
    measurements as a JSON-able dict."""
    if isinstance(trainer, TrainerConfig):
        trainer = OnlineTrainer(trainer)
    config = trainer.config
    evaluator = _Evaluator(trainer, train, test) if test is not None else None
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y)
    task_all = train.task
    cut_at_tasks = "task" in trainer.policy.triggers
    seconds, exp_start = 0.0, 0
    for start, stop in batch_bounds(train, batch_size, cut_at_tasks):
        x, y = x_all[start:stop], y_all[start:stop]
        task = int(task_all[start]) if task_all is not None else None
        t0 = time.perf_counter()
        plan = trainer.plan(y, task)
        if plan.boundary is not None:
            trainer.end_experience(plan.boundary)
            seconds += time.perf_counter() - t0
            if evaluator is not None:
                evaluator.close_experience(exp_start, start)
            exp_start = start
            t0 = time.perf_counter()
        trainer.learn(x, y, plan)
        seconds += time.perf_counter() - t0
        if progress is not None:
            progress(stop - start)
    trainer.prepare_inference()
    if evaluator is not None:
        evaluator.close_experience(exp_start, len(train))
    true_switches = ([] if train.task is None else
                     (np.flatnonzero(np.diff(train.task)) + 1).tolist())
    return {
        "strategy": config.strategy,
        "params": config.to_json()["params"],
        "samples": len(train),
        "batches": trainer.steps,
        "seconds": seconds,
        "samples_per_s": len(train) / seconds if seconds else None,
        "experiences": len(trainer.boundaries) + 1,
        "boundaries": [{"index": b.index, "trigger": b.trigger, "statistic": b.statistic}
                       for b in trainer.boundaries],
        "true_switches": true_switches,
        "prequential_accuracy": trainer.prequential_accuracy,
        "state_sha256": state_sha256(trainer.state_dict()),
        "test": evaluator.summary() if evaluator is not None else None,
    }
