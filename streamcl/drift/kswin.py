"""KSWIN drift detector with JSON-serialisable state."""

from __future__ import annotations

import collections
import itertools
import random
import warnings
from collections.abc import Iterable

from scipy import stats

from .base import DriftDetector, JSONValue, decode_float, encode_float


class KSWIN(DriftDetector):
    r"""Kolmogorov-Smirnov Windowing (KSWIN) drift detector.

    KSWIN keeps a sliding window of the last ``window_size`` values. Its last ``stat_size``
    values stand for the current concept $R$; ``stat_size`` values drawn uniformly at random
    from the older part of the window stand for the previous concept $W$. A two-sample
    Kolmogorov-Smirnov test compares the empirical distributions of $R$ and $W$: a drift is
    signalled when its p-value is at most ``alpha`` and the KS statistic exceeds 0.1, after
    which only $R$ is kept. Because the test compares whole distributions, KSWIN also sees
    changes that leave the mean unchanged, and it needs no assumption about the distribution.

    This follows River's ``drift.KSWIN``, including the random draws: the sampler is Python's
    ``random.Random(seed)``, whose state is saved as a list of integers, so a detector restored
    from JSON draws the same samples. ``statistic`` is the KS statistic of the last test (0
    before the window is full), ``p_value`` its p-value, and ``direction`` compares the mean of
    $R$ with that of $W$ (+1 if $R$'s is higher, -1 if lower).

    Parameters
    ----------
    alpha
        Significance level of the KS test; the test is sensitive, so keep it below 0.01.
    window_size
        Length of the sliding window.
    stat_size
        Size of the recent sample $R$ and of the reference sample $W$; at most half of
        ``window_size``.
    seed
        Seed of the random sampler, which is reseeded after each drift as in River. With
        ``None`` it is seeded once from the operating system and never reseeded (River reseeds
        it from the system), so that a restored detector still continues bit for bit.
    window
        Values to fill the window with at start, to avoid a cold start.

    Examples
    --------
    A uniform stream on [0, 1] that moves to [0.5, 1.5] at index 1000:

    >>> import random
    >>> from streamcl.drift import KSWIN
    >>> rng = random.Random(0)
    >>> stream = [rng.random() for _ in range(1000)] + [0.5 + rng.random() for _ in range(500)]
    >>> kswin = KSWIN(alpha=0.0001, seed=42)
    >>> for i, x in enumerate(stream):
    ...     if kswin.update(x).drift_detected:
    ...         print(f"drift at {i}, direction {kswin.direction:+d}")
    drift at 1024, direction +1

    References
    ----------
    [^1]: Christoph Raab, Moritz Heusinger and Frank-Michael Schleif. "Reactive soft prototype
    computing for concept drift streams." Neurocomputing 416, pp. 340-351, 2020.
    """

    name = "kswin"
    _STATE_ONLY_PARAMS = ("window",)

    def __init__(
        self,
        alpha: float = 0.005,
        window_size: int = 100,
        stat_size: int = 30,
        seed: int | None = None,
        window: Iterable[float] | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0 < 2 * stat_size <= window_size:
            raise ValueError(
                f"need 0 < stat_size <= window_size / 2, got {stat_size=} and {window_size=}"
            )
        self.alpha = alpha
        self.window_size = window_size
        self.stat_size = stat_size
        self.seed = seed
        self._rng = random.Random(seed)
        self.reset()
        if window is not None:
            self.window.extend(float(x) for x in window)

    def _reset_state(self) -> None:
        self.window: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self.p_value = 0.0
        self.n = 0
        if self.seed is not None:  # As River: the same draws again after each drift.
            self._rng = random.Random(self.seed)

    def _update(self, x: float) -> None:
        self.n += 1
        self.window.append(x)
        self._statistic = 0.0
        if len(self.window) < self.window_size:
            return
        n_old = self.window_size - self.stat_size
        reference = [self.window[i] for i in self._rng.sample(range(n_old), self.stat_size)]
        recent = list(itertools.islice(self.window, n_old, self.window_size))
        with warnings.catch_warnings():  # ks_2samp may warn when switching to the asymptotic
            warnings.simplefilter("ignore", category=RuntimeWarning)
            result = stats.ks_2samp(reference, recent, method="auto")
        self._statistic, self.p_value = float(result.statistic), float(result.pvalue)
        if self.p_value <= self.alpha and self._statistic > 0.1:
            self.drift_detected = True
            gap = sum(recent) / len(recent) - sum(reference) / len(reference)
            self.direction = (gap > 0) - (gap < 0)
            self.window = collections.deque(recent, maxlen=self.window_size)

    def _get_state(self) -> dict[str, JSONValue]:
        version, internal, gauss_next = self._rng.getstate()
        return {
            "window": [encode_float(v) for v in self.window],
            "p_value": encode_float(self.p_value),
            "n": self.n,
            "rng": [version, list(internal), gauss_next],
        }

    def _set_state(self, state: dict[str, JSONValue]) -> None:
        self.window = collections.deque(
            (decode_float(v) for v in state["window"]), maxlen=self.window_size
        )
        self.p_value = decode_float(state["p_value"])
        self.n = int(state["n"])
        version, internal, gauss_next = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss_next))
