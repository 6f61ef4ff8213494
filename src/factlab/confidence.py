"""Means with confidence intervals, used by every averaged result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


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

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.half_width:.2g}"


def mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval of ``values`` (NaNs are dropped).

    For 0/1 values this is the usual normal-approximation interval for a proportion, with the
    t quantile; with fewer than two values the interval is the point itself (n says so).
    """
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
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


def proportion_ci(successes: Sequence[bool] | Sequence[float], level: float = 0.95) -> Estimate:
    """Fraction of successes with the Wilson score interval (sound at 0 and 1 and for small ``n``, unlike the
    normal approximation)."""
    a = np.asarray(successes, dtype=np.float64).ravel()
    n = int(a.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    from scipy import stats

    p = float(a.mean())
    z = float(stats.norm.ppf(0.5 + level / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, level)
