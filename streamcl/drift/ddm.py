"""DDM drift detector with JSON-serialisable state."""

from __future__ import annotations

import math

from .base import DriftDetector, JSONValue, decode_float, encode_float


class DDM(DriftDetector):
    r"""Drift Detection Method (DDM) for a stream of errors.

    While the data are stationary, the error rate $p_i$ of a learner should not grow. DDM tracks
    $p_i$ and its binomial standard deviation $s_i = \sqrt{p_i (1 - p_i) / i}$, and remembers
    $p_{min}$ and $s_{min}$ at the update where $p_i + s_i$ was smallest. It warns when
    $p_i + s_i > p_{min} + w \cdot s_{min}$ and signals a drift when
    $p_i + s_i > p_{min} + d \cdot s_{min}$, with $w$ = ``warning_threshold`` and
    $d$ = ``drift_threshold``. Only increases of the error rate are detected, so ``direction``
    is always +1 after a drift; ``statistic`` is $p_i + s_i$.

    The input is 1 for an error and 0 for a correct prediction; values in [0, 1] (e.g. a
    per-sample loss squashed to that range) are accepted too. This follows River's
    ``drift.binary.DDM`` and flags the same indices.

    Parameters
    ----------
    warm_start
        Number of values seen before a warning or a drift can be signalled.
    warning_threshold
        Number of standard deviations above the minimum that raises a warning.
    drift_threshold
        Number of standard deviations above the minimum that signals a drift.

    Examples
    --------
    Errors at a rate of 10% up to index 1000, then 40%:

    >>> import random
    >>> from streamcl.drift import DDM
    >>> rng = random.Random(11)
    >>> stream = [int(rng.random() < 0.1) for _ in range(1000)]
    >>> stream += [int(rng.random() < 0.4) for _ in range(1000)]
    >>> ddm = DDM()
    >>> for i, err in enumerate(stream):
    ...     if ddm.update(err).drift_detected:
    ...         print(f"drift at {i}")
    drift at 1064

    References
    ----------
    [^1]: João Gama, Pedro Medas, Gladys Castillo and Pedro Rodrigues. "Learning with drift
    detection." SBIA 2004, Lecture Notes in Computer Science 3171, pp. 286-295.
    """

    name = "ddm"
    _STATE = ("n", "p", "p_min", "s_min", "ps_min")

    def __init__(
        self, warm_start: int = 30, warning_threshold: float = 2.0, drift_threshold: float = 3.0
    ) -> None:
        self.warm_start = warm_start
        self.warning_threshold = warning_threshold
        self.drift_threshold = drift_threshold
        self.reset()

    def _reset_state(self) -> None:
        self.warning_detected = False
        self._n = 0.0
        self._p = 0.0
        self._p_min = math.nan  # Set at the first update after the warm start.
        self._s_min = math.nan
        self._ps_min = math.inf

    def _update(self, x: float) -> None:
        self._n += 1.0
        self._p += (1.0 / self._n) * (x - self._p)
        p, n = self._p, self._n
        s = math.sqrt(p * (1 - p) / n)
        self._statistic = p + s
        if n <= self.warm_start:
            return
        if p + s <= self._ps_min:
            self._p_min, self._s_min = p, s
            self._ps_min = p + s
        self.warning_detected = p + s > self._p_min + self.warning_threshold * self._s_min
        if p + s > self._p_min + self.drift_threshold * self._s_min:
            self.drift_detected = True
            self.warning_detected = False
            self.direction = 1

    def _get_state(self) -> dict[str, JSONValue]:
        state = {key: encode_float(getattr(self, f"_{key}")) for key in self._STATE}
        return {**state, "warning": self.warning_detected}

    def _set_state(self, state: dict[str, JSONValue]) -> None:
        for key in self._STATE:
            setattr(self, f"_{key}", decode_float(state[key]))
        self.warning_detected = bool(state["warning"])
