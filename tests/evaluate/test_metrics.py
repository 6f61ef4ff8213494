"""Each metric against a value computed by hand (plain per-sequence forwards, no batching) on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from factlab.evaluate import GenerationConfig, TfidfReference, evaluate, hmean, ngram_entropy, score_continuations
from factlab.evaluate import counterfact as cf
from factlab.evaluate import zsre as zs
from factlab.evaluate.mquake import answer_matches

from .evalhelpers import cf_records, zsre_records


def hand_nll(lm, prompt: str, target: str) -> tuple[float, bool]:
    """Mean per-token NLL of ' '+target after prompt, from one unbatched forward; and all-argmax."""
    tok = lm.tokenizer
    p = tok(prompt)["input_ids"]
    full = tok(prompt + " " + target)["input_ids"]
    t = full[len(p):]
    assert full[: len(p)] == p
    with torch.no_grad():
        logits = lm.model(torch.tensor([full])).logits[0].double()
    lps = [logits[len(p) + j - 1].log_softmax(-1)[t[j]].item() for j in range(len(t))]
    argmax = all(int(logits[len(p) + j - 1].argmax()) == t[j] for j in range(len(t)))
    return -sum(lps) / len(lps), argmax


def test_counterfact_metrics_by_hand(tiny_models):
    lm = tiny_models["llama"]
    per_case = []
    for rec in cf_records():
        got = cf.evaluate_record(lm, rec, generation=None)["metrics"]
        rw = [hand_nll(lm, rec.filled_prompt, x)[0] for x in (rec.target_new, rec.target_true)]
        para = [[hand_nll(lm, p, x)[0] for x in (rec.target_new, rec.target_true)] for p in rec.paraphrase_prompts]
        neigh = [[hand_nll(lm, p, x)[0] for x in (rec.target_new, rec.target_true)] for p in rec.neighborhood_prompts]
        want = {
            "efficacy_score": float(rw[1] > rw[0]),
            "efficacy_magnitude": math.exp(-rw[0]) - math.exp(-rw[1]),
            "paraphrase_score": np.mean([float(t > n) for n, t in para]),
            "paraphrase_magnitude": np.mean([math.exp(-n) - math.exp(-t) for n, t in para]),
            "neighborhood_score": np.mean([float(t < n) for n, t in neigh]),
            "neighborhood_magnitude": np.mean([math.exp(-t) - math.exp(-n) for n, t in neigh]),
            "efficacy_exact_match": float(hand_nll(lm, rec.filled_prompt, rec.target_new)[1]),
        }
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-5), k
        per_case.append(want)
    # the summary: mean over cases x100, S = harmonic mean of the three dataset means
    s = evaluate(lm, ("counterfact", cf_records()), generation=None, pre_cache_dir=None, out=None)
    for k in ("efficacy_score", "paraphrase_magnitude", "neighborhood_score"):
        assert s.get(k).mean == pytest.approx(100 * np.mean([c[k] for c in per_case]), abs=1e-3)
    means = [np.mean([c[k] for c in per_case]) for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")]
    assert s.get("score").mean == pytest.approx(100 * hmean(means), abs=1e-6)
    assert "reference_tfidf_score" in s.unavailable and "fluency_ngram_entropy" in s.unavailable


def test_mean_not_sum_of_logprobs(tiny_models):
    lm = tiny_models["gpt2"]
    (sc,) = score_continuations(lm, [("The Eiffel Tower is in", " Paris, the capital of France")])
    assert sc.n_tokens > 1
    assert sc.mean_nll == pytest.approx(-sc.sum_logprob / sc.n_tokens)
    assert sc.geometric_mean_prob == pytest.approx(math.exp(sc.sum_logprob / sc.n_tokens))


def test_batching_and_padding_do_not_change_scores(tiny_models):
    lm = tiny_models["llama"]
    pairs = [("The Colosseum is in", " Rome"), ("Toyota was founded in the country of", " Japan and Korea"), ("A", " b")]
    batched = score_continuations(lm, pairs, batch_size=3)
    single = [score_continuations(lm, [p])[0] for p in pairs]
    for a, b in zip(batched, single):
        assert a.token_ids == b.token_ids and a.token_correct == b.token_correct
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def rome_style_token_acc(lm, prompt: str, target: str) -> list[bool]:
    """ROME's zsRE recipe: prompt + decode(prefix tokens), argmax at the last position == next token."""
    tok = lm.tokenizer
    t = tok(" " + target)["input_ids"]
    out = []
    for j in range(len(t)):
        ids = tok(prompt + tok.decode(t[:j]))["input_ids"]
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1]
        out.append(int(logits.argmax()) == t[j])
    return out


def test_zsre_token_accuracy_by_hand(tiny_models):
    lm = tiny_models["llama"]
    for rec in zsre_records():
        got = zs.evaluate_record(lm, rec, convention="rome")
        target = rec.answers[0]
        assert got["scores"]["rewrite"] == rome_style_token_acc(lm, rec.src, target)
        assert got["scores"]["paraphrase"] == rome_style_token_acc(lm, rec.rephrase, target)
        assert got["scores"]["specificity"] == rome_style_token_acc(lm, rec.loc + "?", rec.loc_ans)
        m = got["metrics"]
        assert m["rewrite_token_accuracy"] == pytest.approx(np.mean(got["scores"]["rewrite"]))
    got = zs.evaluate_record(lm, zsre_records()[0], convention="mend")
    assert got["scores"]["rewrite"] == rome_style_token_acc(lm, zsre_records()[0].src, "Canada")


def test_ngram_entropy_by_hand():
    # words a b a b: bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx(np.mean([2 / 3 * h2, 4 / 3 * 1.0]))
    assert ngram_entropy("one") == 0.0


def test_tfidf_reference_by_hand(tmp_path):
    vocab = {"paris": 0, "france": 1, "city": 2}
    idf = np.array([2.0, 1.0, 0.5])
    np.save(tmp_path / "idf.npy", idf)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps(vocab))
    snippets = [{"relation_id": "P1", "target_id": "Q1", "samples": [{"text": "Paris is a city"}, {"text": "France France"}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    ref = TfidfReference(tmp_path)
    a = np.array([1, 0, 1]) * idf  # "Paris city." (a 1-letter word is ignored by the token pattern)
    b = np.array([1, 2, 1]) * idf
    want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert ref.score(["Paris", "city. x"], "P1", "Q1") == pytest.approx(want)
    assert math.isnan(ref.score(["Paris"], "P1", "Q9"))
    with pytest.raises(FileNotFoundError, match="idf.npy"):
        TfidfReference(tmp_path / "nowhere")


def test_fluency_is_seeded_per_case(tiny_models):
    lm = tiny_models["llama"]
    rec = cf_records()[0]
    g = GenerationConfig(gen_prompts=1, max_length=16)
    a = cf.evaluate_record(lm, rec, generation=g, keep_texts=True)
    b = cf.evaluate_record(lm, rec, generation=g, keep_texts=True)
    assert a["texts"] == b["texts"] and len(a["texts"]) == 1
    assert a["texts"][0].startswith("Danielle Darrieux was born in")
    assert a["metrics"]["fluency_ngram_entropy"] == pytest.approx(ngram_entropy(a["texts"][0]))


def test_hmean_and_answer_matching():
    assert hmean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert hmean([1.0, 0.0]) == 0.0
    assert answer_matches(" The language is Arabic.\nQ: next", ["Arabic"])
    assert not answer_matches(" Arabica coffee", ["Arabic"])
    assert answer_matches("\n Arabic", ["Arabic"]) and not answer_matches(" English\nArabic", ["Arabic"])
    assert answer_matches(" en", ["English", "en"])


def test_generative_metrics_in_summaries_with_wilson_intervals(tiny_models):
    """The gen_* metrics reach every batch summary beside ES/PS/NS, named apart, with Wilson intervals."""
    from factlab.confidence import proportion_ci
    from factlab.evaluate.metrics import METRICS

    lm = tiny_models["llama"]
    for dataset, recs, names in (
        ("counterfact", cf_records(), ("gen_efficacy", "gen_paraphrase", "gen_neighborhood", "gen_efficacy_old", "gen_paraphrase_old")),
        ("zsre", zsre_records(), ("gen_accuracy", "gen_paraphrase_accuracy", "gen_specificity_accuracy")),
    ):
        per_case = [(cf.evaluate_record(lm, r, generation=None) if dataset == "counterfact" else zs.evaluate_record(lm, r))["metrics"] for r in recs]
        s = evaluate(lm, (dataset, recs), generation=None, pre_cache_dir=None, out=None)
        for k in names:
            assert METRICS[k].dataset == dataset and METRICS[k].interval == "wilson" and METRICS[k].abbrev.startswith("G-")
            want = proportion_ci([c[k] for c in per_case]).scaled(100)
            got = s.get(k, "pre")
            assert (got.mean, got.low, got.high, got.n) == pytest.approx((want.mean, want.low, want.high, want.n)), k
        assert k in s.to_dict()["definitions"]
        from rich.console import Console

        console = Console(width=400, record=True)
        console.print(s.table())
        text = console.export_text()
        assert all(k in text for k in names) and ("efficacy_score" in text or "rewrite_token_accuracy" in text)
