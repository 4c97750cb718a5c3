"""Drift detectors (ADWIN, Page-Hinkley, DDM, KSWIN) whose state can be saved as JSON.

They follow River's implementations (same parameters, defaults and algorithms) but keep their
state in plain Python values, see :meth:`DriftDetector.state_dict`.
"""

from __future__ import annotations

from typing import Any

from .adwin import ADWIN
from .base import DriftDetector
from .ddm import DDM
from .kswin import KSWIN
from .page_hinkley import PageHinkley

DETECTORS: dict[str, type[DriftDetector]] = {
    "adwin": ADWIN,
    "page-hinkley": PageHinkley,
    "ddm": DDM,
    "kswin": KSWIN,
}


def make_detector(name: str, **params: Any) -> DriftDetector:
    """Build the detector registered under ``name`` with the given parameters.

    >>> make_detector("adwin", delta=0.01)
    ADWIN(delta=0.01, clock=32, max_buckets=5, min_window_length=5, grace_period=10)
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown drift detector {name!r}; valid names: {', '.join(DETECTORS)}")
    cls = DETECTORS[name]
    valid = cls.param_names()
    unknown = [p for p in params if p not in valid]
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for drift detector {name!r}; "
            f"valid parameters: {', '.join(valid)}"
        )
    return cls(**params)


__all__ = ["ADWIN", "DDM", "DETECTORS", "KSWIN", "DriftDetector", "PageHinkley", "make_detector"]
