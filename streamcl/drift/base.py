"""Common API of the drift detectors: River-style updates plus JSON-only state."""

from __future__ import annotations

import abc
import inspect
import math
from typing import Any, ClassVar, Self

JSONValue = Any  # int, float, str, bool, None, list or dict with str keys


def encode_float(x: float) -> float | str:
    """Map a float to a strict-JSON value (non-finite floats become strings)."""
    return x if math.isfinite(x) else repr(x)


def decode_float(x: float | str) -> float:
    """Invert :func:`encode_float`."""
    return float(x)


class DriftDetector(abc.ABC):
    """Base class of the drift detectors.

    Subclasses monitor a stream of floats, one :meth:`update` at a time. After each update,
    ``drift_detected`` tells whether a drift was signalled, ``direction`` whether the monitored
    mean went up (+1) or down (-1) (0 when no drift), and ``statistic`` holds the detector's
    evidence. As in River, a detector that signalled a drift forgets everything it has seen at
    the start of its next update.

    The whole state is available as JSON values through :meth:`state_dict`, and a fresh detector
    built with the same parameters continues bit-for-bit after :meth:`load_state_dict`.
    """

    name: ClassVar[str]
    # Constructor arguments that only seed the initial state (not compared on load).
    _STATE_ONLY_PARAMS: ClassVar[tuple[str, ...]] = ()

    drift_detected: bool
    direction: int
    n_detections: int
    _statistic: float

    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the constructor's parameters."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @property
    def params(self) -> dict[str, JSONValue]:
        """The parameters that define the detector (stored under their River names)."""
        return {p: getattr(self, p) for p in self.param_names() if p not in self._STATE_ONLY_PARAMS}

    @property
    def statistic(self) -> float:
        """The detector's evidence at the last update (see each detector for its meaning)."""
        return self._statistic

    def reset(self) -> None:
        """Forget everything, including the number of detections."""
        self.drift_detected = False
        self.direction = 0
        self.n_detections = 0
        self._statistic = 0.0
        self._reset_state()

    def update(self, x: float) -> Self:
        """Update the detector with one value; return ``self``."""
        if self.drift_detected:  # River restarts from scratch after a detection.
            self._reset_state()
        self.drift_detected = False
        self.direction = 0
        self._update(float(x))
        if self.drift_detected:
            self.n_detections += 1
        return self

    def state_dict(self) -> dict[str, JSONValue]:
        """The parameters and full state, as JSON values only."""
        return {
            "detector": self.name,
            "params": dict(self.params),
            "drift_detected": self.drift_detected,
            "direction": self.direction,
            "n_detections": self.n_detections,
            "statistic": encode_float(self._statistic),
            "state": self._get_state(),
        }

    def load_state_dict(self, state: dict[str, JSONValue]) -> None:
        """Restore a state produced by :meth:`state_dict` on a detector with the same params."""
        if state.get("detector") != self.name:
            raise ValueError(f"state is for detector {state.get('detector')!r}, not {self.name!r}")
        if state["params"] != self.params:
            raise ValueError(f"state params {state['params']} differ from {self.params}")
        self.drift_detected = bool(state["drift_detected"])
        self.direction = int(state["direction"])
        self.n_detections = int(state["n_detections"])
        self._statistic = decode_float(state["statistic"])
        self._set_state(state["state"])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    @abc.abstractmethod
    def _reset_state(self) -> None:
        """Clear the detector-specific state (called on reset and after each drift)."""

    @abc.abstractmethod
    def _update(self, x: float) -> None:
        """Process ``x``; set ``drift_detected``, ``direction`` and ``_statistic``."""

    @abc.abstractmethod
    def _get_state(self) -> dict[str, JSONValue]:
        """The detector-specific state as JSON values."""

    @abc.abstractmethod
    def _set_state(self, state: dict[str, JSONValue]) -> None:
        """Restore the detector-specific state from :meth:`_get_state`'s output."""
