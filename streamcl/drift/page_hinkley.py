"""Page-Hinkley drift detector with JSON-serialisable state."""

from __future__ import annotations

import math

from .base import DriftDetector, JSONValue, decode_float, encode_float


class PageHinkley(DriftDetector):
    r"""Page-Hinkley test for a change in the mean.

    The test accumulates the deviations of each value from the running mean of all values seen
    so far, minus a tolerance ``delta`` (a CUSUM with forgetting factor ``alpha``). When the
    cumulative sum rises more than ``threshold`` above its running minimum, the mean has gone
    up; the mirrored sum, with ``+delta`` and compared to its running maximum, catches a
    decrease. Page-Hinkley gives no warnings, only drifts.

    This follows River's ``drift.PageHinkley`` (same updates, same reset after each detection)
    and flags the same indices. ``statistic`` is the test value that is monitored (the larger of
    the two in ``"both"`` mode; 0 before ``min_instances`` values), and ``direction`` is +1 when
    the increase test fired and -1 when the decrease test fired.

    Parameters
    ----------
    min_instances
        Number of values seen before a change can be signalled.
    delta
        Magnitude of change tolerated by the test.
    threshold
        Detection threshold (lambda) on the test statistic.
    alpha
        Forgetting factor applied to the cumulative sums.
    mode
        Monitor increases (``"up"``), decreases (``"down"``) or both (``"both"``).

    Examples
    --------
    A Gaussian stream whose mean drops from 1 to 0 at index 500:

    >>> import random
    >>> from streamcl.drift import PageHinkley
    >>> rng = random.Random(3)
    >>> stream = [rng.gauss(1.0, 0.5) for _ in range(500)]
    >>> stream += [rng.gauss(0.0, 0.5) for _ in range(500)]
    >>> ph = PageHinkley()
    >>> for i, x in enumerate(stream):
    ...     if ph.update(x).drift_detected:
    ...         print(f"drift at {i}, direction {ph.direction:+d}")
    drift at 543, direction -1

    References
    ----------
    [^1]: E. S. Page. "Continuous inspection schemes." Biometrika 41(1/2), pp. 100-115, 1954.
    [^2]: Raquel Sebastião and José M. Fernandes. "Supporting the Page-Hinkley test with
    empirical mode decomposition for change detection." ISMIS 2017, pp. 492-498.
    """

    name = "page-hinkley"
    MODES = ("up", "down", "both")
    _STATE = ("n", "mean", "sum_increase", "sum_decrease", "min_increase", "max_decrease")

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self.mode = mode
        self.reset()

    def _reset_state(self) -> None:
        self._n = 0.0
        self._mean = 0.0
        self._sum_increase = 0.0
        self._sum_decrease = 0.0
        self._min_increase = math.inf
        self._max_decrease = -1.0

    def _update(self, x: float) -> None:
        self._n += 1.0
        self._mean += (1.0 / self._n) * (x - self._mean)
        dev = x - self._mean
        self._sum_increase = self.alpha * self._sum_increase + dev - self.delta
        self._sum_decrease = self.alpha * self._sum_decrease + dev + self.delta
        self._min_increase = min(self._min_increase, self._sum_increase)
        self._max_decrease = max(self._max_decrease, self._sum_decrease)
        self._statistic = 0.0
        if self._n < self.min_instances:
            return
        up = self._sum_increase - self._min_increase if self.mode != "down" else -math.inf
        down = self._max_decrease - self._sum_decrease if self.mode != "up" else -math.inf
        self._statistic = max(up, down)
        if up > self.threshold or down > self.threshold:
            self.drift_detected = True
            self.direction = 1 if up >= down else -1

    def _get_state(self) -> dict[str, JSONValue]:
        return {key: encode_float(getattr(self, f"_{key}")) for key in self._STATE}

    def _set_state(self, state: dict[str, JSONValue]) -> None:
        for key in self._STATE:
            setattr(self, f"_{key}", decode_float(state[key]))
