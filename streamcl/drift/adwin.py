"""ADWIN drift detector with JSON-serialisable state."""

from __future__ import annotations

import math

from .base import DriftDetector, JSONValue, decode_float, encode_float


class ADWIN(DriftDetector):
    r"""Adaptive Windowing (ADWIN) drift detector.

    ADWIN keeps a window of the most recent values that is as long as possible while being
    consistent with "the mean has not changed". Every ``clock`` updates it tries each split of
    the window into an older part $W_0$ and a newer part $W_1$; when the means of the two parts
    differ by more than a Hoeffding-style bound (with a variance term and a confidence of
    $\delta' = \delta / \ln(\text{width})$), it drops the oldest data and signals a drift.
    To keep memory logarithmic in the window length, the window is summarised by an exponential
    histogram: row $i$ holds at most ``max_buckets`` buckets of $2^i$ values (ADWIN2).

    The algorithm, the arithmetic and the reset after each detection follow River's
    ``drift.ADWIN``, so both flag the same indices on the same stream. Unlike River, the state
    is plain Python lists, so it can be saved as JSON.

    After a drift, ``direction`` is +1 when the newer part's mean is above the older part's and
    -1 otherwise, and ``statistic`` is $|\mu_{W_0} - \mu_{W_1}|$ at the first cut that fired
    (0 when no drift).

    Parameters
    ----------
    delta
        Significance value: smaller values mean fewer false alarms and slower detection.
    clock
        Check for changes every ``clock`` updates (1 checks on every value).
    max_buckets
        Number of buckets of each size kept before the two oldest are merged. At least 2: with
        1, rows of the histogram can be empty and River's implementation then fails.
    min_window_length
        Splits whose older or newer part is shorter than this are not tested.
    grace_period
        No change is tested until the window holds more than this many values.

    Examples
    --------
    An error stream whose rate jumps from 10% to 60% at index 1000:

    >>> import random
    >>> from streamcl.drift import ADWIN
    >>> rng = random.Random(7)
    >>> stream = [rng.random() < 0.1 for _ in range(1000)]
    >>> stream += [rng.random() < 0.6 for _ in range(1000)]
    >>> adwin = ADWIN()
    >>> for i, err in enumerate(stream):
    ...     if adwin.update(err).drift_detected:
    ...         print(f"drift at {i}, direction {adwin.direction:+d}")
    drift at 1055, direction +1

    References
    ----------
    [^1]: Albert Bifet and Ricard Gavaldà. "Learning from time-changing data with adaptive
    windowing." In Proceedings of the 2007 SIAM International Conference on Data Mining,
    pp. 443-448, 2007.
    """

    name = "adwin"

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if clock < 1 or max_buckets < 2 or min_window_length < 0 or grace_period < 0:
            raise ValueError(
                "need clock >= 1, max_buckets >= 2, min_window_length >= 0 and grace_period >= 0"
            )
        self.delta = delta
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period
        self.reset()

    # -- window summary -------------------------------------------------------------------
    @property
    def width(self) -> float:
        """Number of values in the window."""
        return self._width

    @property
    def total(self) -> float:
        """Sum of the values in the window."""
        return self._total

    @property
    def variance(self) -> float:
        """Sum of squared deviations from the mean within the window (as River's ``variance``)."""
        return self._variance

    @property
    def estimation(self) -> float:
        """Mean of the window."""
        return self._total / self._width if self._width else 0.0

    def _reset_state(self) -> None:
        # Row i holds buckets of 2**i values, oldest first: their sums and variances.
        self._totals: list[list[float]] = [[]]
        self._variances: list[list[float]] = [[]]
        self._total = 0.0
        self._variance = 0.0
        self._width = 0.0
        self._tick = 0

    def _update(self, x: float) -> None:
        self._insert(x)
        self._tick += 1
        self._statistic = 0.0
        if self._tick % self.clock != 0 or self._width <= self.grace_period:
            return
        while (diff := self._find_cut()) is not None:
            if not self.drift_detected:
                self.drift_detected = True
                self.direction = 1 if diff < 0 else -1
                self._statistic = abs(diff)
            self._drop_oldest_bucket()

    def _insert(self, x: float) -> None:
        self._totals[0].append(x)
        self._variances[0].append(0.0)
        self._width += 1.0
        if self._width > 1.0:
            dev = x - self._total / (self._width - 1.0)
            self._variance += (self._width - 1.0) * dev * dev / self._width
        self._total += x
        # Merge the two oldest buckets of each overflowing row into one bucket of the next row.
        row = 0
        while len(self._totals[row]) == self.max_buckets + 1:
            size = float(2**row)
            (t0, t1), (v0, v1) = self._totals[row][:2], self._variances[row][:2]
            mean_gap = t0 / size - t1 / size
            if row + 1 == len(self._totals):
                self._totals.append([])
                self._variances.append([])
            merged_variance = v0 + v1 + size * size * mean_gap * mean_gap / (2 * size)
            self._totals[row + 1].append(t0 + t1)
            self._variances[row + 1].append(merged_variance)
            del self._totals[row][:2], self._variances[row][:2]
            if len(self._totals[row + 1]) <= self.max_buckets:
                break
            row += 1

    def _find_cut(self) -> float | None:
        """Scan the splits from the oldest bucket on; mean(W0) - mean(W1) at the first cut."""
        n0, n1, u0, u1 = 0.0, self._width, 0.0, self._total
        for row in range(len(self._totals) - 1, -1, -1):
            size = float(2**row)
            bucket_totals = self._totals[row]
            for k, bucket_total in enumerate(bucket_totals):
                n0 += size
                n1 -= size
                u0 += bucket_total
                u1 -= bucket_total
                if row == 0 and k == len(bucket_totals) - 1:
                    return None  # W1 would be empty.
                diff = u0 / n0 - u1 / n1
                if (
                    n1 >= self.min_window_length
                    and n0 >= self.min_window_length
                    and self._is_significant(n0, n1, diff)
                ):
                    return diff
        return None

    def _is_significant(self, n0: float, n1: float, diff: float) -> bool:
        log_term = math.log(2 * math.log(self._width) / self.delta)
        # the running variance is updated by subtraction when buckets are dropped; over a
        # window of identical values it can end a rounding error below zero (-2e-15)
        variance = max(self._variance, 0.0)
        m_inv = 1.0 / (n0 - self.min_window_length + 1) + 1.0 / (n1 - self.min_window_length + 1)
        epsilon = (
            math.sqrt(2 * m_inv * (variance / self._width) * log_term)
            + 2 / 3 * log_term * m_inv
        )
        return abs(diff) > epsilon

    def _drop_oldest_bucket(self) -> None:
        row = len(self._totals) - 1
        size = float(2**row)
        bucket_total, bucket_var = self._totals[row].pop(0), self._variances[row].pop(0)
        self._width -= size
        self._total -= bucket_total
        gap = bucket_total / size - self._total / self._width
        self._variance -= bucket_var + size * self._width * gap * gap / (size + self._width)
        if not self._totals[row]:
            self._totals.pop()
            self._variances.pop()

    # -- state ----------------------------------------------------------------------------
    def _get_state(self) -> dict[str, JSONValue]:
        return {
            "totals": [[encode_float(t) for t in row] for row in self._totals],
            "variances": [[encode_float(v) for v in row] for row in self._variances],
            "total": encode_float(self._total),
            "variance": encode_float(self._variance),
            "width": self._width,
            "tick": self._tick,
        }

    def _set_state(self, state: dict[str, JSONValue]) -> None:
        self._totals = [[decode_float(t) for t in row] for row in state["totals"]]
        self._variances = [[decode_float(v) for v in row] for row in state["variances"]]
        self._total = decode_float(state["total"])
        self._variance = decode_float(state["variance"])
        self._width = float(state["width"])
        self._tick = int(state["tick"])
