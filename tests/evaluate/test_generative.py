"""Generative scoring: the batched greedy decoder against a plain one-prompt loop, normalisation, metrics,
and (slow) SmolLM2 before/after a ROME edit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factlab.errors import InputError
from factlab.evaluate import counterfact as cf
from factlab.evaluate import zsre as zs
from factlab.evaluate.generative import EXTRA_TOKENS, greedy_generate, normalise, target_appears, target_budget

from .evalhelpers import cf_records, zsre_records

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Toyota was founded in", "A", "The Colosseum is in the city of"]


@torch.no_grad()
def reference_decode(lm, prompt: str, n: int) -> list[int]:
    """One prompt at a time, a full forward over the whole sequence each step, argmax; no padding, no cache."""
    ids = lm.tokenizer(prompt)["input_ids"]
    new: list[int] = []
    for _ in range(n):
        logits = lm.model(torch.tensor([ids + new])).logits[0, -1]
        new.append(int(logits.argmax()))
    return new


def _expected(lm, ids: list[int], budget: int) -> list[int]:
    """The reference ids cut as the scorer cuts them: at EOS (dropped) and after the token holding a newline."""
    eos = lm.tokenizer.eos_token_id
    out: list[int] = []
    for t in ids[:budget]:
        if t == eos:
            break
        out.append(t)
        if "\n" in lm.tokenizer.decode(out, skip_special_tokens=True):
            break
    return out


def test_greedy_matches_plain_loop(tiny_lm):
    budgets = [12, 4, 12, 2]
    got = greedy_generate(tiny_lm, PROMPTS, budgets, batch_size=3)  # two chunks, mixed prompt lengths
    for p, b, g in zip(PROMPTS, budgets, got):
        ref = _expected(tiny_lm, reference_decode(tiny_lm, p, b), b)
        assert list(g.token_ids) == ref, (tiny_lm.adapter.family, p)
        assert g.text == tiny_lm.tokenizer.decode(ref, skip_special_tokens=True).split("\n")[0]


def test_cache_and_full_forward_paths_agree(tiny_models, monkeypatch):
    lm = tiny_models["llama"]
    assert lm.adapter.exact_kv_cache
    cached = greedy_generate(lm, PROMPTS, 7)
    monkeypatch.setattr(type(lm.adapter), "exact_kv_cache", property(lambda self: False))
    assert not lm.adapter.exact_kv_cache
    assert greedy_generate(lm, PROMPTS, 7) == cached


class force_token:
    """Within the block, the output head's logits favour ``token`` by a wide margin (a forward hook; weights untouched)."""

    def __init__(self, lm, token: int):
        self.head, self.token = lm.model.get_output_embeddings(), token

    def __enter__(self):
        def hook(_m, _i, out):
            out = out.clone()
            out[..., self.token] += 1e4
            return out

        self.handle = self.head.register_forward_hook(hook)

    def __exit__(self, *exc):
        self.handle.remove()


def test_newline_and_eos_stop(tiny_models):
    lm = tiny_models["gpt2"]
    nl = lm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    with force_token(lm, nl):
        g = greedy_generate(lm, ["Toyota was founded in"], 6)[0]
    assert g.text == "" and g.token_ids == (nl,)
    with force_token(lm, lm.tokenizer.eos_token_id):
        g = greedy_generate(lm, ["Toyota was founded in"], 6)[0]
    assert g.text == "" and g.token_ids == ()


def test_bad_inputs(tiny_models):
    lm = tiny_models["llama"]
    with pytest.raises(InputError):
        greedy_generate(lm, PROMPTS, [1, 2])
    with pytest.raises(InputError):
        greedy_generate(lm, PROMPTS, 0)
    with pytest.raises(InputError):
        target_appears("anything", " ?! ")


@pytest.mark.parametrize(
    "generated,target,ok",
    [
        (" Paris, France.", " Paris", True),
        ("the city of PARIS", "Paris", True),
        (" \"Paris\"", "Paris", True),
        (" Parisian food", "Paris", False),
        (" Romeo and Juliet", "Rome", False),
        (" New  York City", "New York", True),
        (" York, New", "New York", False),
        (" the U.S. army", "U.S.", True),
        (" St. Louis!", "St. Louis", True),
        ("", "Paris", False),
        (" Zürich.", "zürich", True),
    ],
)
def test_target_appears(generated, target, ok):
    assert target_appears(generated, target) is ok


def test_normalise():
    assert normalise("  The U.S.!  ") == "the u.s"
    assert normalise("«Paris» —  Rome") == "paris rome"
    assert normalise("...") == ""


def test_counterfact_generative_metrics_by_hand(tiny_models):
    lm = tiny_models["gptj"]
    for rec in cf_records():
        res = cf.evaluate_record(lm, rec, generation=None, generative=True)
        m = res["metrics"]

        def says(prompt, target):
            b = target_budget(lm, prompt, [" " + rec.target_new, " " + rec.target_true])
            text = lm.tokenizer.decode(_expected(lm, reference_decode(lm, prompt, b), b)).split("\n")[0]
            return float(target_appears(text, target))

        assert m["gen_efficacy"] == says(rec.filled_prompt, rec.target_new)
        assert m["gen_efficacy_old"] == says(rec.filled_prompt, rec.target_true)
        assert m["gen_paraphrase"] == pytest.approx(sum(says(p, rec.target_new) for p in rec.paraphrase_prompts) / len(rec.paraphrase_prompts))
        assert m["gen_neighborhood"] == pytest.approx(sum(says(p, rec.target_true) for p in rec.neighborhood_prompts) / len(rec.neighborhood_prompts))
        assert "gen_text" in res["scores"]["rewrite"][0]
        off = cf.evaluate_record(lm, rec, generation=None, generative=False)
        assert not any(k.startswith("gen_") for k in off["metrics"])
        assert {k: v for k, v in m.items() if not k.startswith("gen_")} == off["metrics"]


def test_generative_success_is_visible_on_a_forced_model(tiny_models):
    """Force ' Apple' (one token in the tiny vocabulary) everywhere: generative efficacy and paraphrase are 1,
    'still says the old fact' and neighbourhood (the true target still appears) are 0."""
    lm = tiny_models["llama"]
    rec = dataclasses.replace(cf_records()[0], target_new="Apple")
    tid = lm.tokenizer(" Apple", add_special_tokens=False)["input_ids"]
    assert len(tid) == 1
    with force_token(lm, tid[0]):
        m = cf.evaluate_record(lm, rec, generation=None, generative=True)["metrics"]
    assert m["gen_efficacy"] == 1.0 and m["gen_paraphrase"] == 1.0
    assert m["gen_efficacy_old"] == 0.0 and m["gen_paraphrase_old"] == 0.0 and m["gen_neighborhood"] == 0.0


def test_zsre_generative_metrics(tiny_models):
    lm = tiny_models["gpt2"]
    for rec in zsre_records():
        res = zs.evaluate_record(lm, rec, generative=True)
        m = res["metrics"]
        target = zs.zsre_target(rec, "rome")
        for key, prompt, t in (("gen_accuracy", rec.src, target), ("gen_paraphrase_accuracy", rec.rephrase, target),
                               ("gen_specificity_accuracy", rec.loc + "?", rec.loc_ans)):
            b = target_budget(lm, prompt, [" " + t])
            text = lm.tokenizer.decode(_expected(lm, reference_decode(lm, prompt, b), b)).split("\n")[0]
            assert m[key] == float(target_appears(text, t)), key
        off = zs.evaluate_record(lm, rec, generative=False)["metrics"]
        assert {k: v for k, v in m.items() if not k.startswith("gen_")} == off


def test_budget_is_target_length_plus_extra(tiny_models):
    lm = tiny_models["llama"]
    n = len(lm.tokenizer("Toyota was founded in Japan")["input_ids"]) - len(lm.tokenizer("Toyota was founded in")["input_ids"])
    assert n >= 1 and target_budget(lm, "Toyota was founded in", [" Japan"]) == n + EXTRA_TOKENS
    assert target_budget(lm, "Toyota was founded in", [" Japan", " Japan and Korea"]) > n + EXTRA_TOKENS


@pytest.mark.slow
def test_smollm2_generative_before_and_after_rome(smollm2):
    from factlab.edit import Request, edit

    lm = smollm2
    prompt = "The Eiffel Tower is located in the city of"
    g = greedy_generate(lm, [prompt], target_budget(lm, prompt, [" Paris", " Rome"]))[0]
    assert g.says("Paris") and not g.says("Rome"), g.text
    hp = {"stats_samples": 60, "context": ((5, 3), (10, 3)), "v_steps": 12}
    res = edit(lm, Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"), hparams=hp)
    try:
        g = greedy_generate(lm, [prompt], target_budget(lm, prompt, [" Paris", " Rome"]))[0]
        assert g.says("Rome"), g.text
    finally:
        res.restore()
    assert greedy_generate(lm, [prompt], 8)[0].says("Paris")


def test_evaluation_switch_turns_generative_metrics_off_and_is_part_of_the_identity(tiny_models, tmp_path):
    from factlab.evaluate import evaluate
    from factlab.evaluate.harness import RunConfigMismatch

    lm = tiny_models["llama"]
    kw = dict(method="none", generation=None)
    on = evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "on", **kw).to_dict()
    off = evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "off", generative=False, **kw).to_dict()

    def n_of(summary, metric):
        return summary["metrics"]["pre"].get(metric, {}).get("n", 0)

    assert n_of(on, "gen_efficacy") == 2 and n_of(off, "gen_efficacy") == 0
    assert n_of(on, "efficacy_score") == n_of(off, "efficacy_score") == 2  # teacher-forced scores unchanged
    with pytest.raises(RunConfigMismatch, match="generative"):
        evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "on", generative=False, **kw)
