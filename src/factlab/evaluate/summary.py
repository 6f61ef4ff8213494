"""The result of an evaluation run: per-metric means with 95% confidence intervals, config and hashes.

Intervals respect each metric's range (see :mod:`factlab.evaluate.metrics`): Wilson for success rates, a
Student-t interval clipped to the range for other means, a case bootstrap for composites. Each estimate's
``n`` counts the cases that have the metric (a case without paraphrase prompts has no PS), and estimates
over fewer than :data:`factlab.confidence.SMALL_N` cases are marked ``small_n`` (``*`` in the table).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from factlab.confidence import SMALL_N, Estimate, bounded_mean_ci, proportion_ci
from factlab.errors import InputError
from factlab.evaluate.metrics import METRICS, Metric, metrics_for

#: composite scores: name -> the three components (ROME/MEMIT harmonic mean)
COMPOSITES = {
    "score": ("efficacy_score", "paraphrase_score", "neighborhood_score"),
    "zsre_score": ("rewrite_token_accuracy", "paraphrase_token_accuracy", "specificity_token_accuracy"),
}
PHASES = ("pre", "post", "final")
BOOTSTRAP_RESAMPLES = 2000


def hmean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values (0 if any is 0; NaN if any is NaN), as scipy.stats.hmean."""
    v = [float(x) for x in values]
    if any(math.isnan(x) for x in v):
        return math.nan
    if any(x <= 0 for x in v):
        return 0.0
    return len(v) / sum(1.0 / x for x in v)


def composite_estimate(columns: list[np.ndarray], scale: float, seed: int = 0) -> Estimate:
    """Harmonic mean of the column means, with a percentile case-bootstrap 95% CI (fixed seed)."""
    n = len(columns[0])
    point = hmean([float(np.nanmean(c)) if np.isfinite(c).any() else math.nan for c in columns])
    if n < 2 or math.isnan(point):
        return Estimate(point * scale, point * scale, point * scale, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of cases that all lack a metric: NaN, left out below
        means = np.stack([np.nanmean(c[idx], axis=1) for c in columns], axis=1)
    boots = [hmean(row) for row in means]
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return Estimate(point * scale, float(lo) * scale, float(hi) * scale, n)


def metric_estimate(metric: Metric, values: Sequence[float | None]) -> Estimate:
    """The mean of one (non-composite) metric's per-case values with its range-respecting 95% interval, on the
    papers' scale (x ``metric.scale``); missing values (``None``/NaN) are left out of the mean and of ``n``."""
    v = np.asarray([math.nan if x is None else x for x in values], dtype=np.float64)
    e = proportion_ci(v) if metric.interval == "wilson" else bounded_mean_ci(v, *metric.bounds)
    return e.scaled(metric.scale)


def _column(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    """One metric's per-case values (NaN where a case lacks it or stored ``null``)."""
    return np.array([math.nan if row.get(name) is None else row[name] for row in rows], dtype=np.float64)


def summarise_metrics(records: list[dict[str, Any]], dataset: str) -> dict[str, dict[str, Estimate]]:
    """``phase -> metric -> Estimate`` (scaled as in the papers) over case records sorted by case id."""
    out: dict[str, dict[str, Estimate]] = {}
    records = sorted(records, key=lambda r: r["case_id"])
    for phase in PHASES:
        rows = [r[phase] for r in records if isinstance(r.get(phase), dict)]
        if not rows:
            continue
        ph: dict[str, Estimate] = {}
        for m in metrics_for(dataset):
            if m.name in COMPOSITES:
                parts = COMPOSITES[m.name]
                if all(any(p in row for row in rows) for p in parts):
                    ph[m.name] = composite_estimate([_column(rows, p) for p in parts], m.scale)
                continue
            if any(m.name in row for row in rows):
                ph[m.name] = metric_estimate(m, list(_column(rows, m.name)))
        out[phase] = ph
    return out


@dataclass
class Summary:
    """What ``factlab eval`` writes to ``summary.json`` and :func:`factlab.evaluate.evaluate` returns.

    ``metrics[phase][name]`` is an :class:`Estimate` on the papers' scale (x100; see
    :data:`factlab.evaluate.metrics.METRICS`); phases: ``pre`` (unedited model), ``post`` (after each
    case's edit) and, for sequential runs, ``final`` (all cases on the model after the last batch).
    ``unavailable`` maps a metric to the reason it was not computed. ``run`` holds facts about this
    execution (processes, wall time) that do not define the result.
    """

    dataset: str
    method: str
    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    n_cases: int
    metrics: dict[str, dict[str, Estimate]]
    unavailable: dict[str, str] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, phase: str = "post") -> Estimate | None:
        return self.metrics.get(phase, {}).get(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "method": self.method,
            "n_cases": self.n_cases,
            "metrics": {ph: {k: v.to_dict() for k, v in d.items()} for ph, d in self.metrics.items()},
            "unavailable": dict(self.unavailable),
            "definitions": {m.name: m.to_dict() for m in metrics_for(self.dataset)},
            "config": self.config,
            "model": self.model,
            "data": self.data,
            "run": self.run,
        }

    def to_json(self, path: str | Path) -> Path:
        from factlab.io import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Summary":
        metrics = {
            ph: {k: Estimate(v["mean"], v["low"], v["high"], v["n"], v.get("level", 0.95)) for k, v in md.items()}
            for ph, md in d["metrics"].items()
        }
        return cls(d["dataset"], d["method"], d["config"], d["model"], d["data"], d["n_cases"], metrics, d.get("unavailable", {}), d.get("run", {}))

    @classmethod
    def load(cls, path: str | Path) -> "Summary":
        """Read a run folder's ``summary.json`` (``path``: the folder or the file).

        Raises:
            InputError: there is no such folder or file, the run has not finished, or the file is not a summary.
        """
        p = Path(path)
        if p.is_dir():
            if not (p / "summary.json").is_file():
                unfinished = (p / "config.json").is_file()
                raise InputError(
                    f"{p} has no summary.json: "
                    + ("the run has not finished; rerun the same `factlab eval` command to resume it" if unfinished
                       else "it is not a `factlab eval` run folder")
                )
            p = p / "summary.json"
        elif not p.is_file():
            raise InputError(f"{p} does not exist; give a `factlab eval` run folder (--out) or its summary.json")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{p} is not a factlab evaluation summary ({type(e).__name__}: {e})") from None

    def table(self):
        """A rich table: one row per metric, columns pre / post (/ final), mean [95% CI] on the x100 scale."""
        from rich.table import Table

        phases = [p for p in PHASES if p in self.metrics]
        cfg = self.config
        dtype = self.model.get("dtype")
        title = (
            f"{self.dataset} · {self.model.get('name')}{f' ({dtype})' if dtype else ''} · method={self.method} · "
            f"batch={cfg.get('batch_size')}{' · sequential' if cfg.get('sequential') else ''} · n={self.n_cases}"
        )
        t = Table(title=title, caption=(
            "mean [95% CI], x100: Wilson for success rates, Student t clipped to the range for other means, "
            f"case bootstrap for the harmonic-mean scores; n=k: the metric covers k cases; *: fewer than {SMALL_N} cases, too few for the "
            "interval to mean much; gen_* (G-): generative, greedy decoding contains the target; all others teacher-forced"))
        t.add_column("metric")
        t.add_column("abbr")
        for p in phases:
            t.add_column(p, justify="right")
        for m in metrics_for(self.dataset):
            if m.name in self.unavailable:
                t.add_row(m.name, m.abbrev, *(["unavailable"] * len(phases)))
                continue
            cells = []
            for p in phases:
                e = self.metrics[p].get(m.name)
                cells.append(self._cell(e))
            t.add_row(m.name, m.abbrev, *cells)
        return t

    def _cell(self, e: Estimate | None) -> str:
        """``mean [low, high]``, then ``n=k`` when the metric covers fewer cases than the run and ``*`` for small n."""
        if e is None or math.isnan(e.mean):
            return "—"
        cover = f" n={e.n}" if e.n != self.n_cases else ""
        return f"{e.mean:.1f} [{e.low:.1f}, {e.high:.1f}]{cover}{'*' if e.small_n else ''}"


def metric_names() -> list[str]:
    return list(METRICS)
