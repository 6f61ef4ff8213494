"""CounterFact metrics for one case, exactly as ROME/MEMIT compute them (see :mod:`.metrics`).

For each prompt p (rewrite, paraphrases, neighbourhood) and each candidate c in {target_new,
target_true}: ``nll(c) = -(1/m) * sum_j log P(c_j | p, c_<j)`` over the m tokens of ``" " + c``
(**per-token mean** of the log-probabilities, not the sum). Then, averaged over the case's prompts:
ES = [nll_true > nll_new], EM = exp(-nll_new) - exp(-nll_true), PS/PM the same on paraphrases,
NS = [nll_true < nll_new], NM = exp(-nll_true) - exp(-nll_new). Cases are then averaged.

Generative metrics (``gen_*``, :mod:`.generative`), with ``generative=True``: each prompt is greedily
decoded for (the longer of the two targets' token lengths + 5) tokens, cut at the first newline, and
``gen_efficacy`` / ``gen_paraphrase`` count the prompts whose text contains target_new (normalised),
``gen_efficacy_old`` / ``gen_paraphrase_old`` those that still contain target_true, and
``gen_neighborhood`` the neighbourhood prompts whose text still contains target_true.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from factlab.data import CounterFactRecord
from factlab.evaluate.fluency import GenerationConfig, TfidfReference, generate_texts, ngram_entropy
from factlab.evaluate.generative import GENERATIVE_DEFAULT, greedy_generate, target_budget
from factlab.evaluate.scoring import score_continuations
from factlab.models.loading import LoadedModel


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def prompt_sets(record: CounterFactRecord) -> dict[str, list[str]]:
    """The filled-in prompts of each kind: ``rewrite`` (1), ``paraphrase``, ``neighborhood``."""
    return {
        "rewrite": [record.filled_prompt],
        "paraphrase": list(record.paraphrase_prompts),
        "neighborhood": list(record.neighborhood_prompts),
    }


def score_record(lm: LoadedModel, record: CounterFactRecord) -> dict[str, list[dict[str, Any]]]:
    """Per prompt: ``nll_new``, ``nll_true`` (nats, per-token mean) and ``new_exact_match`` /
    ``true_exact_match`` (every token of that target is the teacher-forced argmax).

    All of the case's prompts are scored in one batch (``2 * n_prompts`` rows), so a case's
    numbers do not depend on which other cases run in the same process.
    """
    sets = prompt_sets(record)
    pairs = []
    for kind, prompts in sets.items():
        for p in prompts:
            pairs += [(p, " " + record.target_new), (p, " " + record.target_true)]
    scores = score_continuations(lm, pairs, batch_size=max(1, len(pairs)))
    out: dict[str, list[dict[str, Any]]] = {}
    i = 0
    for kind, prompts in sets.items():
        rows = []
        for _ in prompts:
            new, true = scores[i], scores[i + 1]
            i += 2
            rows.append(
                {"nll_new": new.mean_nll, "nll_true": true.mean_nll, "new_exact_match": new.all_correct, "true_exact_match": true.all_correct}
            )
        out[kind] = rows
    return out


def metrics_from_scores(scores: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """The per-case CounterFact probability metrics (fractions) from :func:`score_record` output."""
    m: dict[str, float] = {}
    for kind, name in (("rewrite", "efficacy"), ("paraphrase", "paraphrase")):
        rows = scores[kind]
        m[f"{name}_score"] = _mean([float(r["nll_true"] > r["nll_new"]) for r in rows])
        m[f"{name}_magnitude"] = _mean([math.exp(-r["nll_new"]) - math.exp(-r["nll_true"]) for r in rows])
        m[f"{name}_exact_match"] = _mean([float(r["new_exact_match"]) for r in rows])
    rows = scores["neighborhood"]
    m["neighborhood_score"] = _mean([float(r["nll_true"] < r["nll_new"]) for r in rows])
    m["neighborhood_magnitude"] = _mean([math.exp(-r["nll_true"]) - math.exp(-r["nll_new"]) for r in rows])
    m["neighborhood_exact_match"] = _mean([float(r["true_exact_match"]) for r in rows])
    return m


def generate_record(lm: LoadedModel, record: CounterFactRecord) -> dict[str, list[dict[str, Any]]]:
    """Per prompt of each kind: ``gen_text`` (greedy continuation, cut at the first newline), ``gen_new`` /
    ``gen_true`` (whether target_new / target_true appears in it, normalised). One batch per case."""
    sets = prompt_sets(record)
    targets = [" " + record.target_new, " " + record.target_true]
    prompts = [p for ps in sets.values() for p in ps]
    budgets = [target_budget(lm, p, targets) for p in prompts]
    gens = iter(greedy_generate(lm, prompts, budgets, batch_size=max(1, len(prompts))))
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, ps in sets.items():
        rows = []
        for _ in ps:
            g = next(gens)
            rows.append({"gen_text": g.text, "gen_new": g.says(record.target_new), "gen_true": g.says(record.target_true)})
        out[kind] = rows
    return out


def generative_metrics_from_scores(scores: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """The per-case generative metrics (fractions) from score rows carrying ``gen_new`` / ``gen_true``."""
    m: dict[str, float] = {}
    for kind, name in (("rewrite", "gen_efficacy"), ("paraphrase", "gen_paraphrase")):
        rows = scores[kind]
        m[name] = _mean([float(r["gen_new"]) for r in rows])
        m[f"{name}_old"] = _mean([float(r["gen_true"]) for r in rows])
    m["gen_neighborhood"] = _mean([float(r["gen_true"]) for r in scores["neighborhood"]])
    return m


def generation_metrics(
    lm: LoadedModel, record: CounterFactRecord, cfg: GenerationConfig, reference: TfidfReference | None
) -> tuple[dict[str, float], list[str]]:
    """``fluency_ngram_entropy`` (bits, mean over texts) and, with ``reference``, ``reference_tfidf_score``."""
    prompts = list(record.generation_prompts)
    if cfg.gen_prompts is not None:
        prompts = prompts[: cfg.gen_prompts]
    if not prompts:
        return {}, []
    texts = generate_texts(lm, prompts, cfg, case_seed=record.case_id)
    m = {"fluency_ngram_entropy": float(np.mean([ngram_entropy(t) for t in texts]))}
    if reference is not None:
        m["reference_tfidf_score"] = reference.score(texts, record.relation_id, record.target_new_id)
    return m, texts


def evaluate_record(
    lm: LoadedModel,
    record: CounterFactRecord,
    *,
    generation: GenerationConfig | None,
    reference: TfidfReference | None = None,
    keep_texts: bool = False,
    generative: bool = GENERATIVE_DEFAULT,
) -> dict[str, Any]:
    """All metrics of one case on the model as it is now: ``{"metrics": {...}, "scores": {...}}``.

    ``generative``: also greedy-decode every prompt and report the ``gen_*`` metrics (their per-prompt
    texts and hits join the score rows as ``gen_text`` / ``gen_new`` / ``gen_true``)."""
    scores = score_record(lm, record)
    metrics = metrics_from_scores(scores)
    if generative:
        for kind, rows in generate_record(lm, record).items():
            for row, g in zip(scores[kind], rows):
                row.update(g)
        metrics.update(generative_metrics_from_scores(scores))
    out: dict[str, Any] = {"metrics": metrics, "scores": scores}
    if generation is not None and generation.applies_to(record.case_id):
        gm, texts = generation_metrics(lm, record, generation, reference)
        metrics.update(gm)
        if keep_texts:
            out["texts"] = texts
    return out


def is_known(pre_scores: dict[str, list[dict[str, Any]]], criterion: str) -> bool:
    """Whether the unedited model knows the fact: ``"prefers"`` = nll(true) < nll(new) on the rewrite
    prompt; ``"argmax"`` = every token of target_true is the teacher-forced argmax there."""
    row = pre_scores["rewrite"][0]
    if criterion == "prefers":
        return row["nll_true"] < row["nll_new"]
    if criterion == "argmax":
        return bool(row["true_exact_match"])
    raise ValueError(f"known criterion must be 'prefers' or 'argmax', not {criterion!r}")
