"""Every metric factlab reports, defined once: name, paper abbreviation, scale and exact definition.

Names are chosen so that look-alikes cannot be confused: a CounterFact ``efficacy_score`` (ES, a
probability comparison) is not a zsRE ``rewrite_token_accuracy`` (teacher-forced argmax), and
neither is ``efficacy_exact_match`` (MEMIT's ``rewrite_prompts_correct``). Per-case values are
stored as fractions (0..1) or bits; summaries and tables multiply by :attr:`Metric.scale` (100),
as the ROME/MEMIT tables do.

Each metric also says how its interval is computed (:attr:`Metric.interval`): success rates (``"wilson"``)
get the Wilson interval over cases, other means a Student-t interval kept inside :attr:`Metric.bounds`, and
composites a case bootstrap; no interval runs past what the metric can be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

#: bump when any definition below changes; it is part of every run's configuration
#: ("2": the generative ``gen_*`` metrics were added)
METRICS_VERSION = "2"


@dataclass(frozen=True)
class Metric:
    """One reported metric. ``definition`` is the exact rule; ``reference`` the code it follows.

    ``bounds``: the range of a per-case value (``None``: unbounded on that side), before scaling.
    ``interval``: ``"wilson"`` for success rates (per-case values in [0, 1], each a 0/1 outcome or a share of
    them), ``"t"`` for other means (clipped to ``bounds``), ``"bootstrap"`` for composites.
    """

    name: str
    abbrev: str
    dataset: str
    definition: str
    reference: str
    scale: float = 100.0
    higher_is_better: bool = True
    bounds: tuple[float | None, float | None] = (0.0, 1.0)
    interval: Literal["wilson", "t", "bootstrap"] = "wilson"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_CF = "kmeng01/rome experiments/py/eval_utils_counterfact.py + experiments/summarize.py"
_NLL = "mean per-token NLL (nats) of ' '+target, teacher-forced after the prompt"
_ZS = "kmeng01/rome experiments/py/eval_utils_zsre.py + summarize.py"
_DIFF = dict(bounds=(-1.0, 1.0), interval="t")  # a difference of two probabilities
_GEN = "greedy continuation of the prompt (no teacher forcing; max_new_tokens = longest target's tokens + 5; cut at EOS and the first newline)"
_GEN_MATCH = "appears as whole words after normalisation (lowercase, surrounding punctuation stripped)"
_GEN_REF = "factlab.evaluate.generative; protocol after Yang et al. 2025 (WILD, arXiv 2502.11177)"

METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("efficacy_score", "ES", "counterfact", f"mean over rewrite prompts of [nll(true) > nll(new)], nll = {_NLL}", _CF),
        Metric("efficacy_magnitude", "EM", "counterfact", "mean over rewrite prompts of exp(-nll(new)) - exp(-nll(true)) (geometric-mean token probabilities)", _CF, **_DIFF),
        Metric("paraphrase_score", "PS", "counterfact", "as ES on the paraphrase prompts, averaged within the case", _CF),
        Metric("paraphrase_magnitude", "PM", "counterfact", "as EM on the paraphrase prompts", _CF, **_DIFF),
        Metric("neighborhood_score", "NS", "counterfact", "mean over neighbourhood prompts of [nll(true) < nll(new)]", _CF),
        Metric("neighborhood_magnitude", "NM", "counterfact", "mean over neighbourhood prompts of exp(-nll(true)) - exp(-nll(new))", _CF, **_DIFF),
        Metric("score", "S", "counterfact", "harmonic mean of the dataset means of ES, PS, NS (scipy.stats.hmean); CI by case bootstrap", _CF, interval="bootstrap"),
        Metric("efficacy_exact_match", "ES-acc", "counterfact", "rewrite prompts whose every target_new token is the teacher-forced argmax (MEMIT rewrite_prompts_correct)", _CF),
        Metric("paraphrase_exact_match", "PS-acc", "counterfact", "as efficacy_exact_match on paraphrase prompts", _CF),
        Metric("neighborhood_exact_match", "NS-acc", "counterfact", "neighbourhood prompts whose every target_true token is the teacher-forced argmax", _CF),
        Metric("gen_efficacy", "G-ES", "counterfact", f"rewrite prompt whose {_GEN} contains target_new ({_GEN_MATCH})", _GEN_REF),
        Metric("gen_paraphrase", "G-PS", "counterfact", "as gen_efficacy on the paraphrase prompts, averaged within the case", _GEN_REF),
        Metric("gen_neighborhood", "G-NS", "counterfact", "neighbourhood prompts whose greedy continuation still contains target_true (as gen_efficacy)", _GEN_REF),
        Metric("gen_efficacy_old", "G-ES-old", "counterfact", "rewrite prompt whose greedy continuation still contains target_true: the model still says the old fact (lower is better after an edit)", _GEN_REF, higher_is_better=False),
        Metric("gen_paraphrase_old", "G-PS-old", "counterfact", "as gen_efficacy_old on the paraphrase prompts", _GEN_REF, higher_is_better=False),
        Metric("fluency_ngram_entropy", "GE", "counterfact", "per generated text H2/3 + 2*H3/3 (bits; Hn = entropy of the word n-gram distribution), mean over texts", "kmeng01/rome experiments/py/eval_utils_counterfact.py n_gram_entropy", 100.0, bounds=(0.0, None), interval="t"),
        Metric("reference_tfidf_score", "RS", "counterfact", "cosine of TF-IDF vectors of (all generations joined) and (all attribute snippets of (relation, target_new) joined), ROME's idf.npy / tfidf_vocab.json", "kmeng01/rome eval_utils_counterfact.py tfidf_similarity", interval="t"),
        Metric("rewrite_token_accuracy", "Efficacy", "zsre", "fraction of the tokens of ' '+target that are the teacher-forced argmax after the question; per case, then over cases", _ZS),
        Metric("paraphrase_token_accuracy", "Paraphrase", "zsre", "as rewrite_token_accuracy on the rephrased question", _ZS),
        Metric("specificity_token_accuracy", "Specificity", "zsre", "as rewrite_token_accuracy for ' '+loc_ans after loc+'?' (unrelated NQ question), on the evaluated model", _ZS),
        Metric("gen_accuracy", "G-Efficacy", "zsre", f"question whose {_GEN} contains the edit target ({_GEN_MATCH})", _GEN_REF),
        Metric("gen_paraphrase_accuracy", "G-Paraphrase", "zsre", "as gen_accuracy on the rephrased question", _GEN_REF),
        Metric("gen_specificity_accuracy", "G-Specificity", "zsre", "as gen_accuracy for loc_ans after loc+'?' (on the evaluated model)", _GEN_REF),
        Metric("zsre_score", "Score", "zsre", "harmonic mean of the dataset means of Efficacy, Paraphrase, Specificity (MEMIT Table 1); CI by case bootstrap", "kmeng01/memit paper Table 1", interval="bootstrap"),
        Metric("multihop_accuracy", "MH-acc", "mquake", "case correct if the greedy answer (first line) to ANY of its multi-hop questions contains the expected answer or an alias (word-bounded, case-insensitive); expected = new_answer after editing, answer before", "MQuAKE (Zhong et al. 2023) multi-hop accuracy, zero-shot variant"),
        Metric("multihop_accuracy_original", "MH-orig", "mquake", "as multihop_accuracy but against the original answer (how often the old chain survives)", "factlab"),
        Metric("edit_exact_match", "EW", "mquake", "fraction of the case's edited single-hop facts whose every target_new token is the teacher-forced argmax after the rewrite prompt (edit-wise success)", "MQuAKE edit-wise success, teacher-forced"),
    ]
}


def metrics_for(dataset: str) -> list[Metric]:
    """The metrics of one dataset, in table order."""
    return [m for m in METRICS.values() if m.dataset == dataset]
