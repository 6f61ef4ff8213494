"""Means with confidence intervals, used by every averaged result.

Three intervals, one per kind of value: :func:`mean_ci` (Student t, unbounded values),
:func:`bounded_mean_ci` (the same, kept inside the values' range, e.g. probabilities in [0, 1]) and
:func:`proportion_ci` (Wilson, for success rates). An interval never runs past what the value can be.
Every :class:`Estimate` says when it rests on fewer than :data:`SMALL_N` values (``small_n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

#: Below this many values an interval is a rough indication only (its width and coverage depend on
#: assumptions that few values cannot check): :attr:`Estimate.small_n` is true and tables mark it.
SMALL_N = 10


@dataclass(frozen=True)
class Estimate:
    """A mean with a two-sided confidence interval ``[low, high]`` over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def small_n(self) -> bool:
        """Fewer than :data:`SMALL_N` values: too few for the interval to mean much."""
        return self.n < SMALL_N

    def scaled(self, factor: float) -> "Estimate":
        """The same estimate in other units (mean and bounds times ``factor``, e.g. 100 for percent)."""
        return replace(self, mean=self.mean * factor, low=self.low * factor, high=self.high * factor)

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level, "small_n": self.small_n}

    def __str__(self) -> str:
        note = f" (n={self.n} < {SMALL_N})" if self.small_n else ""
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]{note}"


def _finite_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``values`` as a float64 vector without NaNs (``None`` counts as NaN: a missing value)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    return a[~np.isnan(a)]


#: how far (absolute) a value may stray past its declared range by rounding before it counts as a bug
RANGE_TOLERANCE = 1e-6


def _check_range(a: np.ndarray, low: float | None, high: float | None) -> None:
    """Raise ``ValueError`` when a value lies outside ``[low, high]`` by more than rounding (a caller's bug)."""
    if (low is not None and (a < low - RANGE_TOLERANCE).any()) or (high is not None and (a > high + RANGE_TOLERANCE).any()):
        raise ValueError(f"values {a.min():g}..{a.max():g} lie outside the declared range [{low}, {high}]")


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval of ``values`` (NaNs are dropped).

    For values with a range (probabilities, success rates) use :func:`bounded_mean_ci` or
    :func:`proportion_ci`: this interval can run past the range. With fewer than two values the
    interval is the point itself (n says so).
    """
    a = _finite_values(values)
    n = int(a.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    m = float(a.mean())
    if n < 2:
        return Estimate(m, m, m, n, level)
    from scipy import stats

    se = float(a.std(ddof=1)) / math.sqrt(n)
    q = float(stats.t.ppf(0.5 + level / 2, df=n - 1))
    return Estimate(m, m - q * se, m + q * se, n, level)


def bounded_mean_ci(values: Sequence[float] | np.ndarray, low: float | None = 0.0, high: float | None = 1.0,
                    level: float = 0.95) -> Estimate:
    """:func:`mean_ci` for values that lie in ``[low, high]`` (``None``: unbounded on that side), its interval
    clipped to that range. With one value and both bounds given the interval is the whole range (one value
    says nothing about the spread).

    Raises:
        ValueError: a value lies outside the range (the caller's bounds are wrong).
    """
    a = _finite_values(values)
    _check_range(a, low, high)
    if low is not None or high is not None:
        a = a.clip(low, high)  # values within rounding of a bound sit on it
    e = mean_ci(a, level)
    if e.n == 0:
        return e
    if e.n == 1 and low is not None and high is not None:
        return replace(e, low=float(low), high=float(high))
    lo = e.low if low is None else max(float(low), e.low)
    hi = e.high if high is None else min(float(high), e.high)
    return replace(e, low=lo, high=hi)


def proportion_ci(successes: Sequence[bool] | Sequence[float], level: float = 0.95) -> Estimate:
    """Fraction of successes with the Wilson score interval (inside [0, 1], sound at 0 and 1 and for small
    ``n``, unlike the normal approximation). NaNs (missing values) are dropped.

    Values may be fractions in [0, 1] (e.g. a case's share of successful prompts); ``n`` then counts the
    values, and the interval is conservative, since a [0, 1] value's variance is at most p(1 - p).

    Raises:
        ValueError: a value lies outside [0, 1].
    """
    a = _finite_values(successes)
    _check_range(a, 0.0, 1.0)
    a = a.clip(0.0, 1.0)
    n = int(a.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    from scipy import stats

    p = float(a.mean())
    z = float(stats.norm.ppf(0.5 + level / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, level)
