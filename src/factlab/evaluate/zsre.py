"""zsRE metrics for one case, as ROME/MEMIT compute them (teacher-forced token accuracy).

For target tokens t_1..t_m of ``" " + answer`` a token is correct when it is the argmax of the
next-token distribution after ``prompt + t_<j`` (teacher forcing on token ids; the reference
decodes the prefix to text and re-tokenises, which is the same for byte-level BPE). A case's value
is the mean over its tokens; the dataset value is the mean over cases.

- rewrite: the question ``src`` with target = the edit target;
- paraphrase: ``rephrase`` with the same target;
- specificity: ``loc + "?"`` with target ``" " + loc_ans`` -- measured on the evaluated (edited) model.

Edit target convention: ``"rome"`` (ROME/MEMIT's zsRE runner: target_new = ``answers[0]``) or
``"mend"`` (MEND/EasyEdit: target_new = ``alt``). ROME's is the default because the published
GPT-2 XL / GPT-J zsRE tables use it.

Generative metrics (``generative=True``, :mod:`.generative`): each of the three questions is greedily
decoded for (its target's token length + 5) tokens, cut at the first newline; ``gen_accuracy``,
``gen_paraphrase_accuracy`` and ``gen_specificity_accuracy`` are 1 when the normalised target
(``loc_ans`` for specificity) appears in the text.
"""

from __future__ import annotations

from typing import Any, Literal

from factlab.data import ZsreRecord
from factlab.evaluate.generative import GENERATIVE_DEFAULT, greedy_generate, target_budget
from factlab.evaluate.scoring import score_continuations
from factlab.models.loading import LoadedModel

Convention = Literal["rome", "mend"]


def zsre_target(record: ZsreRecord, convention: Convention) -> str:
    """The answer the edit writes (no leading space)."""
    rw = record.requested_rewrite(convention)
    return str(rw["target_new"]["str"])


_GEN_NAMES = {"rewrite": "gen_accuracy", "paraphrase": "gen_paraphrase_accuracy", "specificity": "gen_specificity_accuracy"}


def evaluate_record(
    lm: LoadedModel, record: ZsreRecord, *, convention: Convention = "rome", generative: bool = GENERATIVE_DEFAULT
) -> dict[str, Any]:
    """``{"metrics": {rewrite_token_accuracy, paraphrase_token_accuracy, specificity_token_accuracy},
    "scores": per-kind lists of per-token correctness}`` on the model as it is now.

    ``generative``: also the ``gen_*`` metrics, and ``scores["generations"]``: kind -> greedy text."""
    target = " " + zsre_target(record, convention)
    pairs = [(record.src, target), (record.rephrase, target), (record.loc + "?", " " + record.loc_ans)]
    s = score_continuations(lm, pairs, batch_size=len(pairs))
    names = ("rewrite", "paraphrase", "specificity")
    out: dict[str, Any] = {
        "metrics": {f"{n}_token_accuracy": x.token_accuracy for n, x in zip(names, s)},
        "scores": {n: list(x.token_correct) for n, x in zip(names, s)},
    }
    if generative:
        budgets = [target_budget(lm, p, [t]) for p, t in pairs]
        gens = greedy_generate(lm, [p for p, _ in pairs], budgets, batch_size=len(pairs))
        out["scores"]["generations"] = {n: g.text for n, g in zip(names, gens)}
        out["metrics"].update({_GEN_NAMES[n]: float(g.says(t)) for n, g, (_, t) in zip(names, gens, pairs)})
    return out


def request_dict(record: ZsreRecord, convention: Convention = "rome") -> dict[str, Any]:
    """The edit request of a case (ROME's dict shape)."""
    return record.requested_rewrite(convention)
