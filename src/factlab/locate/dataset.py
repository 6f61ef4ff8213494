"""Average causal traces over a dataset (ROME Fig. 2: the averaged indirect effect, AIE).

Only facts the model knows are traced: its clean top-1 next token must equal the first token of the
attribute (the answer), as in ROME's ``correct_prediction`` filter but on the first token. Per fact and
kind the indirect effect ``IE = score - low`` is averaged over the tokens of each class, then over facts
(with 95% Student-t intervals; no clipping). Token classes (ROME's ``average_causal_effects``):

* first subject token, middle subject tokens (pooled), last subject token -- a one-token subject counts
  as both first and last;
* first subsequent token (the token right after the subject, unless it is the last token);
* further tokens (the rest before the last token, pooled); last token.

Runs are resumable: with ``out_dir`` every fact's traces (or the fact that it was skipped) are appended to
``traces.jsonl`` as soon as they are done, and a rerun skips every fact already there. ``config.json``
pins the settings and the model's identity (weights id, dtype, attention implementation); a rerun with other
settings or another dtype is refused, naming the differences, instead of mixing them. While a process writes
``out_dir`` it holds :func:`factlab.io.run_lock` on it, so a second process fails at once naming the holder.
"""

from __future__ import annotations

import json
import random
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from factlab.confidence import mean_ci
from factlab.io import append_jsonl, read_jsonl, run_lock, write_json
from factlab.locate._common import TraceInputError, check_kind
from factlab.locate.corrupt import NoiseSpec, noise_level
from factlab.locate.trace import trace_kinds
from factlab.models.loading import LoadedModel
from factlab.progress import progress_bar

CLASSES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def token_classes(n_tokens: int, start: int, end: int) -> dict[str, list[int]]:
    """Token indices of each class for a prompt of ``n_tokens`` with the subject at ``[start, end)``."""
    last = n_tokens - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end < last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


def _answer(rec: Any) -> str:
    attr = getattr(rec, "attribute", None)
    if attr is None:
        raise TraceInputError(f"record {rec!r} has no 'attribute' (the answer); give records like known_1000's")
    return attr if attr.startswith(" ") else " " + attr


def model_knows(lm: LoadedModel, rec: Any) -> bool:
    """Whether the model's clean top-1 next token after ``rec.prompt`` is the attribute's first token."""
    from factlab.prompts import continuation_ids

    first = continuation_ids(lm.tokenizer, rec.prompt, _answer(rec))[0]
    return int(lm.next_token_probs(rec.prompt)[0].argmax()) == first


def _record_id(rec: Any, i: int) -> str:
    for name in ("known_id", "case_id", "id"):
        v = getattr(rec, name, None)
        if v is not None:
            return str(v)
    return str(i)


@dataclass
class DatasetTrace:
    """Averaged indirect effects per kind: ``kinds[kind]["aie"][class][layer]`` with 95% CI bounds."""

    model: str
    classes: list[str]
    kinds: dict[str, dict[str, Any]]
    n_total: int
    n_kept: int
    n_unknown: int
    n_failed: int
    mean_low: float
    mean_high: float
    window: int
    samples: int
    noise_level: float | None
    corruption: str = "noise"
    out_dir: str | None = None
    method: str = "exact"
    identity: dict[str, Any] = field(default_factory=dict)  #: the model's identity (id, dtype, attention)

    def peak(self, kind: str) -> dict[str, Any]:
        """The token class and layer with the largest AIE for ``kind``."""
        a = np.asarray(self.kinds[kind]["aie"], dtype=float)
        c, l = np.unravel_index(int(np.nanargmax(a)), a.shape)
        return {"class": self.classes[c], "layer": int(l), "aie": float(a[c, l])}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peaks"] = {k: self.peak(k) for k in self.kinds}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, default=lambda o: None)

    def plot(self, path: str | Path) -> Path:
        """ROME Fig. 2-style AIE figure with confidence bands."""
        from factlab.locate.plot import dataset_figure

        return dataset_figure(self, path)


def default_kinds(lm: LoadedModel) -> list[str]:
    return ["residual", "mlp", "attn"] if lm.adapter.has_attention else ["residual", "mixer", "ssm.out", "gate"]


def _swap_for(rec: Any, records: Sequence[Any], rng: random.Random) -> str:
    pool = [r.subject for r in records if getattr(r, "relation_id", None) == getattr(rec, "relation_id", None)
            and r.subject != rec.subject and getattr(r, "attribute", None) != getattr(rec, "attribute", None)]
    if not pool:
        raise TraceInputError(f"no other subject of relation {getattr(rec, 'relation_id', None)} with a different answer to swap in")
    return rng.choice(sorted(set(pool)))


def trace_dataset(
    lm: LoadedModel,
    records: Iterable[Any] | None = None,
    *,
    kinds: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    max_known: int | None = None,
    samples: int = 10,
    noise: NoiseSpec = "3x",
    window: int = 10,
    seed: int = 0,
    corruption: str = "noise",
    only_known: bool = True,
    method: str = "exact",
) -> DatasetTrace:
    """Trace every known fact of ``records`` (default: known_1000) and average the effects by token class.

    ``limit`` caps the records read; ``max_known`` stops after that many known facts. ``only_known=False``
    traces every record (target: the model's top-1; records need no ``attribute``). ``method="attribution"``
    averages the gradient estimates instead of exact traces (much faster; say so when you report it). With ``out_dir``
    the run is resumable (see the module docstring) and the averages are also written to
    ``out_dir/aie.json``.
    """
    if method not in ("exact", "attribution"):
        raise TraceInputError(f"method must be 'exact' or 'attribution', not {method!r}")
    if corruption not in ("noise", "swap"):
        raise TraceInputError(f"corruption must be 'noise' or 'swap', not {corruption!r}")
    if records is None:
        from factlab.data import load_known

        records = load_known()
    records = list(records)[:limit] if limit is not None else list(records)
    kinds = list(kinds) if kinds else default_kinds(lm)
    for k in kinds:
        check_kind(lm, k)
    level = noise_level(lm, noise) if corruption == "noise" else None
    config = {
        **lm.identity, "kinds": kinds, "samples": samples, "noise_level": level, "window": window,
        "seed": seed, "corruption": corruption, "only_known": only_known, "method": method,
    }
    with ExitStack() as stack:
        log, done = None, {}
        if out_dir is not None:
            stack.enter_context(run_lock(out_dir))
            log, done = _open_run(Path(out_dir), config)
        results = _trace_all(lm, records, done, log, kinds, samples, level, window, seed, corruption, only_known, method, max_known)
        return aggregate(results, kinds, model=lm.name, window=window, samples=samples, noise_level=level,
                         corruption=corruption, out_dir=out_dir, n_layers=lm.adapter.n_layers, method=method, identity=lm.identity)


def _open_run(out: Path, config: dict[str, Any]) -> tuple[Path, dict[str, dict]]:
    """Pin ``config`` in ``out/config.json`` (refusing another one, naming the differences) and return the log
    path and the facts already traced there."""
    cfg_path, log = out / "config.json", out / "traces.jsonl"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        old.setdefault("only_known", True)
        old.setdefault("method", "exact")
        new = json.loads(json.dumps(config))
        if old != new:
            diffs = [f"{k}: run has {old.get(k)!r}, this call {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            hint = f"; to resume it load the model as {old['dtype']} (--dtype {old['dtype']})" if old.get("dtype", new["dtype"]) != new["dtype"] else ""
            raise TraceInputError(f"{out} holds a run with other settings ({'; '.join(diffs)}); use another --out folder or the same settings{hint}")
    else:
        write_json(cfg_path, config)
    return log, {line["id"]: line for line in _repair_log(log)}


def _trace_all(lm, records, done, log, kinds, samples, level, window, seed, corruption, only_known, method, max_known) -> list[dict]:
    """Trace every record not in ``done`` (appending each line to ``log``); every record's line, in order."""
    rng = random.Random(seed)
    n_known = sum(1 for d in done.values() if d.get("known"))
    results: list[dict] = []
    with progress_bar(desc="trace dataset", total=len(records), unit="fact") as bar:
        for i, rec in enumerate(records):
            rid = _record_id(rec, i)
            swap = _swap_for(rec, records, rng) if corruption == "swap" else None
            if rid in done:
                results.append(done[rid])
                bar.update(1)
                continue
            if max_known is not None and n_known >= max_known:
                break
            line = _trace_one(lm, rec, rid, kinds, samples, level, window, seed, corruption, swap, only_known, method)
            n_known += bool(line.get("known"))
            if log is not None:
                append_jsonl(log, line)
            results.append(line)
            bar.update(1)
            bar.set_postfix(known=n_known)
    return results


def _trace_one(lm, rec, rid, kinds, samples, level, window, seed, corruption, swap, only_known, method) -> dict:
    line: dict[str, Any] = {"id": rid, "prompt": rec.prompt, "subject": rec.subject}
    try:
        if only_known and not model_knows(lm, rec):
            return {**line, "known": False}
        line["known"] = True
        line["traces"] = {}
        res = trace_kinds(lm, rec.prompt, rec.subject, kinds, window=window, samples=samples, method=method,
                          noise=level if level is not None else 0.0, seed=seed, corruption=corruption, swap_subjects=swap)
        for k, r in res.items():
            line["traces"][k] = {"scores": r.scores.tolist(), "low": r.low, "high": r.high}
        line.update(tokens=r.tokens, subject_range=list(r.subject_range), target=r.target)
    except TraceInputError as e:  # e.g. a subject that is not in its prompt: recorded, not fatal
        return {**line, "known": False, "error": str(e)}
    return line


def _repair_log(log: Path) -> list[dict]:
    """The complete lines of ``log``; a torn last line (from a killed run) is cut off so appends stay valid."""
    lines = read_jsonl(log)
    if log.exists():
        text = log.read_text(encoding="utf-8")
        if text and (not text.endswith("\n") or len([x for x in text.splitlines() if x.strip()]) != len(lines)):
            from factlab.io import atomic_path

            with atomic_path(log) as tmp:
                tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return lines


def aggregate(lines: list[dict], kinds: Sequence[str], *, model: str, window: int, samples: int,
              noise_level: float | None, corruption: str, out_dir: str | Path | None, n_layers: int,
              method: str = "exact", identity: dict[str, Any] | None = None) -> DatasetTrace:
    """Average per-fact traces (the lines of ``traces.jsonl``) into a :class:`DatasetTrace`."""
    kept = [d for d in lines if d.get("known")]
    if not kept:
        raise TraceInputError("no record is known by the model (top-1 = the attribute's first token); nothing to average")
    out: dict[str, dict[str, Any]] = {}
    for k in kinds:
        per_class = {c: [] for c in CLASSES}
        for d in kept:
            ie = np.asarray(d["traces"][k]["scores"]) - d["traces"][k]["low"]
            cls = token_classes(ie.shape[0], *d["subject_range"])
            for c in CLASSES:
                per_class[c].append(ie[cls[c]].mean(0) if cls[c] else np.full(n_layers, np.nan))
        aie, lo, hi, n = [], [], [], []
        for c in CLASSES:
            arr = np.asarray(per_class[c])
            ests = [mean_ci(arr[:, l]) for l in range(n_layers)]
            aie.append([e.mean for e in ests])
            lo.append([e.low for e in ests])
            hi.append([e.high for e in ests])
            n.append(ests[0].n)
        out[k] = {"aie": aie, "ci_low": lo, "ci_high": hi, "n": n}
    first = kinds[0]
    res = DatasetTrace(
        model=model, classes=list(CLASSES), kinds=out, n_total=len(lines), n_kept=len(kept),
        n_unknown=sum(1 for d in lines if not d.get("known") and "error" not in d),
        n_failed=sum(1 for d in lines if "error" in d),
        mean_low=float(np.mean([d["traces"][first]["low"] for d in kept])),
        mean_high=float(np.mean([d["traces"][first]["high"] for d in kept])),
        window=window, samples=samples, noise_level=noise_level, corruption=corruption,
        out_dir=str(out_dir) if out_dir is not None else None, method=method, identity=dict(identity or {}),
    )
    if out_dir is not None:
        write_json(Path(out_dir) / "aie.json", json.loads(res.to_json()))
    return res
