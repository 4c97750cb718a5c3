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
