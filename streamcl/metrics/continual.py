"""Continual-learning metrics over an accuracy matrix.

``A[i][j]`` is the accuracy, after experience ``i``, on the test samples of experience ``j``'s
classes (``None`` where that is undefined: ``j > i``, or no test sample). Definitions follow
Lopez-Paz & Ranzato (GEM, 2017) and Chaudhry et al. (RWalk, 2018).

>>> A = [[0.9, None], [0.5, 0.8]]
>>> average_accuracy(A), forgetting(A), backward_transfer(A)
(0.65, 0.4, -0.4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

Matrix = list[list[float | None]]


def _final_row(matrix: Matrix) -> list[float | None]:
    return matrix[-1] if matrix else []


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy after the last experience over all experiences seen."""
    vals = [v for v in _final_row(matrix) if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def forgetting(matrix: Matrix) -> float:
    """Mean over old experiences of (best accuracy before the end) - (final accuracy)."""
    last = len(matrix) - 1
    drops = []
    for j in range(last):
        history = [matrix[i][j] for i in range(j, last) if matrix[i][j] is not None]
        final = matrix[last][j]
        if history and final is not None:
            drops.append(max(history) - final)
    return sum(drops) / len(drops) if drops else math.nan


def backward_transfer(matrix: Matrix) -> float:
    """Mean over old experiences of (final accuracy) - (accuracy right after learning it)."""
    last = len(matrix) - 1
    diffs = [matrix[last][j] - matrix[j][j] for j in range(last)
             if matrix[j][j] is not None and matrix[last][j] is not None]
    return sum(diffs) / len(diffs) if diffs else math.nan


@dataclass(frozen=True)
class AccuracyMatrix:
    """The accuracy matrix as journaled: ``rows[r][c]`` = accuracy after experience ``r`` on
    experience ``c``'s holdout samples; only defined cells are stored.

    The one value type for it: the publisher builds it, verdict entries and manifests carry its
    JSON (``{"r": {"c": acc}}``, keys as strings, values rounded to 6 digits), the report draws
    its :meth:`dense` form, and the metrics above read that form.

    >>> m = AccuracyMatrix({0: {0: 0.9}}).with_row(1, {0: 0.5, 1: 0.8})
    >>> m.dense(), m.average_accuracy(), AccuracyMatrix.from_json(m.to_json()) == m
    ([[0.9, None], [0.5, 0.8]], 0.65, True)
    """

    rows: dict[int, dict[int, float]] = field(default_factory=dict)

    def with_row(self, experience: int, row: dict[int, float]) -> AccuracyMatrix:
        """This matrix with the row after ``experience`` set to ``row``."""
        return AccuracyMatrix({**self.rows, experience: dict(row)})

    @property
    def row_ids(self) -> list[int]:
        return sorted(self.rows)

    @property
    def col_ids(self) -> list[int]:
        return sorted({c for r in self.rows.values() for c in r} | set(self.rows))

    def dense(self) -> Matrix:
        """Rows and columns in experience order, ``None`` where undefined or ``c > r``."""
        cols = self.col_ids
        return [[self.rows[r].get(c) if c <= r else None for c in cols] for r in self.row_ids]

    def average_accuracy(self) -> float:
        return average_accuracy(self.dense())

    def forgetting(self) -> float:
        return forgetting(self.dense())

    def backward_transfer(self) -> float:
        return backward_transfer(self.dense())

    def to_json(self) -> dict[str, dict[str, float]]:
        return {str(r): {str(c): round(v, 6) for c, v in sorted(cols.items())}
                for r, cols in sorted(self.rows.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, float]]) -> AccuracyMatrix:
        return cls({int(r): {int(c): float(v) for c, v in cols.items()}
                    for r, cols in data.items()})
