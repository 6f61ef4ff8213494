"""Per-relation evaluation: known filter, sweep (training data only), faithfulness and causality on
held-out known samples with baselines, over several trials (seeds), with 95% CIs over trials.

``evaluate_relations`` appends one JSON line per finished relation to ``OUT/results.jsonl`` and skips
relations already there, so an interrupted run resumes where it stopped. ``OUT/settings.json`` pins the
settings, seed and the model's identity (weights id, dtype, attention implementation): a folder written with
others is refused, naming the differences, instead of mixing rows. While a process writes ``OUT`` it holds
:func:`factlab.io.run_lock` on it, so a second process fails at once naming the holder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from factlab.confidence import SMALL_N, bounded_mean_ci, proportion_ci
from factlab.data.lre import Relation, Sample
from factlab.errors import InputError
from factlab.io import append_jsonl, read_jsonl, run_lock, write_json
from factlab.lre.fit import fit, identity, learned_linear, translation
from factlab.lre.metrics import causality, decode_topk, edit_pairs, faithfulness, insert_subject, score_predictions
from factlab.lre.prompts import KnownFilter, filter_known, icl_prompt, resolve_prefix
from factlab.lre.states import Layer, compute_states
from factlab.lre.sweep import DEFAULT_BETAS, sweep
from factlab.models.loading import LoadedModel

FAITH_METHODS = ("lre", "identity", "translation", "lre_emb", "learned_linear", "lm")
CAUSAL_METHODS = ("lre", "insert_subject")


@dataclass
class EvalSettings:
    """Knobs of an evaluation run (all recorded with the results)."""

    n_train: int = 5
    trials: int = 3
    min_known: int = 12
    max_samples: int | None = 200
    layers: list[Layer] | None = None
    betas: list[float] = field(default_factory=lambda: list(DEFAULT_BETAS))
    ranks: list[int] | None = None
    k: int = 3
    prefix: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RelationResult:
    """One row of the table: faithfulness (recall@1 per method) and causality (efficacy per method), each a
    mean with a 95% CI over trials; ``status`` is ``ok`` or ``too few known``."""

    relation: str
    category: str
    n_samples: int
    n_known: int
    status: str
    trials: list[dict] = field(default_factory=list)
    faithfulness: dict[str, dict] = field(default_factory=dict)
    causality: dict[str, dict] = field(default_factory=dict)
    message: str = ""
    n_tested: int = 0  #: samples the known filter tested (at most ``max_samples``); 0 in results written before it was kept

    def known_cell(self) -> str:
        """``"known/tested"``, with the relation's size when only a sample of it was tested."""
        tested = self.n_tested
        if not tested:  # older results: read it back from the message "K of N tested samples known"
            m = re.match(r"\d+ of (\d+) tested", self.message)
            tested = int(m.group(1)) if m else self.n_samples
        return f"{self.n_known}/{tested}" + (f" (of {self.n_samples})" if tested < self.n_samples else "")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "RelationResult":
        return cls(**d)


def _trial(lm: LoadedModel, relation: Relation, known: Sequence[Sample], seed: int, s: EvalSettings) -> dict:
    sw = sweep(lm, relation, known, seed=seed, n_train=s.n_train, layers=s.layers, betas=s.betas, ranks=s.ranks, prefix=s.prefix)
    split = sw.split
    train, test = split.train, split.test
    pre = resolve_prefix(lm, s.prefix)
    template = relation.prompt_templates[0]
    prompts = [icl_prompt(template, x.subject, train, prefix=pre) for x in test]
    subjects, objects = [x.subject for x in test], [x.object for x in test]
    layers = list(dict.fromkeys([sw.layer, sw.edit_layer, "emb"]))
    st = compute_states(lm, prompts, subjects, layers)
    out: dict = {"seed": seed, "layer": sw.layer, "beta": sw.beta, "edit_layer": sw.edit_layer, "rank": sw.rank, "n_test": len(test), "n_val": len(split.val), "train": [x.to_dict() for x in train]}
    # the sweep fitted these layers on the same training split already (unless it came from the cache)
    lre = sw.operator(sw.layer, beta=sw.beta) or fit(lm, relation, layer=sw.layer, train=train, beta=sw.beta, prefix=pre)
    ops = {
        "lre": lre,
        "identity": identity(lm, relation, layer=sw.layer, train=train, prefix=pre),
        "translation": translation(lm, relation, layer=sw.layer, train=train, prefix=pre),
        "lre_emb": fit(lm, relation, layer="emb", train=train, beta=sw.beta, prefix=pre),
        "learned_linear": learned_linear(lm, relation, layer=sw.layer, train=train, prefix=pre, seed=seed),
    }
    faith, hits = {}, {}
    for name, op in ops.items():
        f = faithfulness(lm, op, st.h[op.layer], objects, k=s.k)
        faith[name], hits[name] = f.recall, f.hits
    own = score_predictions(decode_topk(lm, st.z, s.k), objects)  # the LM's own recall on the same prompts
    faith["lm"], hits["lm"] = own.recall, own.hits
    out["faithfulness"] = faith
    edit_op = lre if sw.edit_layer == sw.layer else sw.operator(sw.edit_layer) or fit(lm, relation, layer=sw.edit_layer, train=train, prefix=pre)
    edit_op = edit_op.with_(edit_rank=sw.rank)
    pairs = edit_pairs(test, seed)
    h_e = st.h[sw.edit_layer]
    c = causality(lm, edit_op, prompts, subjects, objects, h_e, st.z, pairs)
    b = insert_subject(lm, sw.edit_layer, prompts, subjects, objects, h_e, pairs)
    out["causality"] = {"lre": c.to_dict(), "insert_subject": b.to_dict()}
    out["hits"] = {"faithfulness": hits, "causality": {"lre": list(c.success), "insert_subject": list(b.success)}}
    return out


def summarise(per_trial: Sequence[float], per_sample: Sequence[bool]) -> dict:
    """Mean with a 95% CI: over trials (Student t, clipped to [0, 1]) when there are at least two, else over
    the test samples (Wilson); ``over`` says which, and ``samples`` always holds the pooled per-sample estimate."""
    pooled = proportion_ci(per_sample).to_dict()
    if len(per_trial) >= 2:
        return {**bounded_mean_ci(per_trial, 0.0, 1.0).to_dict(), "over": "trials", "samples": pooled}
    return {**pooled, "mean": float(per_trial[0]) if per_trial else pooled["mean"], "over": "samples", "samples": pooled}


def evaluate_relation(lm: LoadedModel, relation: Relation, settings: EvalSettings | None = None, *, seed: int = 0) -> RelationResult:
    """Filter known samples, then ``settings.trials`` trials (seeds ``seed..seed+trials-1``)."""
    s = settings or EvalSettings()
    kf: KnownFilter = filter_known(lm, relation, n_icl=s.n_train, seed=seed, max_samples=s.max_samples, prefix=s.prefix)
    n_tested = kf.n_known + len(kf.unknown)
    res = RelationResult(relation.name, relation.category, len(relation.samples), kf.n_known, "ok", n_tested=n_tested)
    res.message = f"{kf.n_known} of {n_tested} tested samples known"
    if kf.n_known < s.min_known:
        res.status = "too few known"
        return res
    for t in range(s.trials):
        res.trials.append(_trial(lm, relation, kf.known, seed + t, s))
    for m in FAITH_METHODS:
        res.faithfulness[m] = summarise([tr["faithfulness"][m][0] for tr in res.trials],
                                        [h for tr in res.trials for h in tr["hits"]["faithfulness"][m]])
    for m in CAUSAL_METHODS:
        res.causality[m] = summarise([tr["causality"][m]["efficacy"] for tr in res.trials],
                                     [h for tr in res.trials for h in tr["hits"]["causality"][m]])
    return res


def evaluate_relations(
    lm: LoadedModel,
    relations: Sequence[Relation],
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    seed: int = 0,
    on_result: Callable[[RelationResult], None] | None = None,
) -> list[RelationResult]:
    """Evaluate each relation, appending to ``out_dir/results.jsonl`` (resumable); writes ``table.json``,
    ``table.md`` and returns all rows (earlier ones included)."""
    s = settings or EvalSettings()
    out = Path(out_dir)
    with run_lock(out):
        _pin_settings(out, {"model": lm.name, **lm.identity, "seed": seed, **s.to_dict()})
        return _evaluate_missing(lm, relations, out, s, seed, on_result)


def _pin_settings(out: Path, settings: dict) -> None:
    """Write ``out/settings.json``, or refuse a folder whose results were made with other settings or another
    model/dtype (the display name ``model`` may differ)."""
    path = out / "settings.json"
    new = json.loads(json.dumps(settings))
    if path.exists() and (out / "results.jsonl").exists():
        old = json.loads(path.read_text())
        keys = sorted((set(old) | set(new)) - {"model"})
        diffs = [f"{k}: folder has {old.get(k)!r}, this run {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
        if diffs:
            raise InputError(f"{out} holds LRE results made with other settings ({'; '.join(diffs)}); "
                             "use another --out folder, or the same model, dtype and settings to resume it")
    write_json(path, settings)


def _evaluate_missing(lm: LoadedModel, relations: Sequence[Relation], out: Path, s: EvalSettings, seed: int,
                      on_result: Callable[[RelationResult], None] | None) -> list[RelationResult]:
    """Evaluate the relations not yet in ``out/results.jsonl`` (appending each), then write the tables."""
    done = {r["relation"]: RelationResult.from_dict(r) for r in read_jsonl(out / "results.jsonl")}
    rows = []
    for rel in relations:
        if rel.name in done:
            rows.append(done[rel.name])
            continue
        r = evaluate_relation(lm, rel, s, seed=seed)
        append_jsonl(out / "results.jsonl", r.to_dict())
        rows.append(r)
        if on_result is not None:
            on_result(r)
        write_table(rows, out)
    write_table(rows, out)
    return rows


def _fmt(e: dict | None) -> str:
    if not e or e.get("n", 0) == 0:
        return "–"
    return f"{e['mean']:.2f} [{e['low']:.2f}, {e['high']:.2f}]" if e["n"] > 1 else f"{e['mean']:.2f}"


def table_markdown(rows: Sequence[RelationResult]) -> str:
    """The per-relation table as Markdown (faithfulness = recall@1; causality = efficacy; mean [95% CI], the
    CI over trials when there are several, else over test samples — the note under the table says which)."""
    head = ["relation", "category", "known/tested", "layer", "β", "edit layer", "rank", *[f"F {m}" for m in FAITH_METHODS], *[f"C {m}" for m in CAUSAL_METHODS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r.category, r.relation)):
        if r.status != "ok":
            lines.append("| " + " | ".join([r.relation, r.category, r.known_cell(), r.status] + [""] * (len(head) - 4)) + " |")
            continue
        tr = r.trials
        lay = ",".join(str(t["layer"]) for t in tr)
        beta = ",".join(f"{t['beta']:g}" for t in tr)
        el = ",".join(str(t["edit_layer"]) for t in tr)
        rk = ",".join(str(t["rank"]) for t in tr)
        cells = [r.relation, r.category, r.known_cell(), lay, beta, el, rk]
        cells += [_fmt(r.faithfulness.get(m)) for m in FAITH_METHODS] + [_fmt(r.causality.get(m)) for m in CAUSAL_METHODS]
        lines.append("| " + " | ".join(cells) + " |")
    ests = [e for r in rows if r.status == "ok" for e in (*r.faithfulness.values(), *r.causality.values())]
    overs = {e.get("over", "trials") for e in ests}
    note = {"trials": "95% CIs over trials (Student t, clipped to [0, 1]).", "samples": "95% CIs over test samples (Wilson; one trial)."}
    lines.append("")
    lines += [note[o] for o in sorted(overs)]
    small = sorted({e["n"] for e in ests if 0 < e.get("n", 0) < SMALL_N})
    if small:
        lines.append(f"Intervals over {', '.join(map(str, small))} value(s) (fewer than {SMALL_N}) are a rough indication only.")
    return "\n".join(lines) + "\n"


def category_means(rows: Sequence[RelationResult]) -> dict[str, dict[str, float]]:
    """Mean over relations (status ok) per category of each method's faithfulness and causality."""
    cats: dict[str, list[RelationResult]] = {}
    for r in rows:
        if r.status == "ok":
            cats.setdefault(r.category, []).append(r)
    out = {}
    for c, rs in sorted(cats.items()):
        d: dict = {"n_relations": len(rs)}
        for key, m, part in [*(("F", m, "faithfulness") for m in FAITH_METHODS), *(("C", m, "causality") for m in CAUSAL_METHODS)]:
            # a relation whose test samples share one object has no causality pairs (mean NaN): left out of the mean
            vals = [v for r in rs if (v := getattr(r, part)[m]["mean"]) == v]
            d[f"{key} {m}"] = sum(vals) / len(vals) if vals else float("nan")
        out[c] = d
    return out


def write_table(rows: Sequence[RelationResult], out_dir: str | Path) -> None:
    out = Path(out_dir)
    write_json(out / "table.json", {"rows": [r.to_dict() for r in rows], "categories": category_means(rows)})
    md = table_markdown(rows)
    cm = category_means(rows)
    if cm:
        keys = list(next(iter(cm.values())).keys())
        md += "\n| category | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1) + "\n"
        for c, d in cm.items():
            md += f"| {c} | " + " | ".join(f"{d[k]:.2f}" if isinstance(d[k], float) else str(d[k]) for k in keys) + " |\n"
    (out / "table.md").write_text(md)
