"""Second-moment statistics: exact against a direct computation, cached, resumable, exportable."""

from __future__ import annotations

import pytest
import torch

from factlab.edit import StatsMismatchError, export_stats, import_stats, second_moment, second_moments
from factlab.edit.stats import StatsSpec, stats_path
from factlab.prompts import pad

TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox {i} jumps over the lazy dog near the river bank, and the city of Paris sleeps."
    * (1 + i % 3)
    for i in range(30)
)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text(TEXT)
    return p


def _direct(lm, site, corpus, samples, max_length):
    """Plain reference: tokenise the paragraphs, cut into chunks, one forward per chunk, sum k k^T / count."""
    from factlab.data import load_text_corpus

    docs = list(load_text_corpus(corpus).documents())
    chunks = []
    for d in docs:
        ids = lm.tokenizer(d, add_special_tokens=False)["input_ids"]
        chunks += [ids[s: s + max_length] for s in range(0, len(ids), max_length) if len(ids[s: s + max_length]) >= 2]
    chunks = chunks[:samples]
    total, count = 0, 0
    for c in chunks:
        with torch.no_grad():
            from factlab.interventions import capture

            with capture(lm, [site]) as acts:
                lm.forward(pad([c], pad_id=0))
        k = acts[site][0].double()
        total = total + k.T @ k
        count += k.shape[0]
    return total / count, count


@pytest.mark.parametrize("family, site", [("llama", "layer.1.mlp.key"), ("mamba", "layer.1.mixer.key"), ("gpt2", "layer.0.mlp.key")])
def test_stats_match_direct_computation(family, site, tiny_models, tiny_env, corpus):
    lm = tiny_models[family]
    m = second_moment(lm, site, corpus=corpus, samples=12, max_length=32, batch_size=5)
    ref, count = _direct(lm, site, corpus, 12, 32)
    assert m.count == count
    torch.testing.assert_close(m.mom2.double(), ref, rtol=1e-5, atol=1e-7)
    assert stats_path(m.spec).exists()
    again = second_moment(lm, site, corpus=corpus, samples=12, max_length=32)  # from the cache
    assert torch.equal(again.mom2, m.mom2) and again.spec == m.spec


def test_several_sites_in_one_pass(tiny_models, tiny_env, corpus):
    lm = tiny_models["gpt_neox"]
    both = second_moments(lm, ["layer.0.mlp.key", "layer.2.mlp.key"], corpus=corpus, samples=6, max_length=32, use_cache=False)
    one = second_moment(lm, "layer.2.mlp.key", corpus=corpus, samples=6, max_length=32, use_cache=False)
    torch.testing.assert_close(both["layer.2.mlp.key"].mom2, one.mom2)


def test_interrupted_run_resumes(tiny_models, tiny_env, corpus):
    lm = tiny_models["llama"]
    kw = dict(corpus=corpus, samples=20, max_length=24, batch_size=4, checkpoint_every=1)
    full = second_moment(lm, "layer.2.mlp.key", use_cache=False, **kw)

    class Stop(Exception):
        pass

    def interrupt(done, tokens):
        if done >= 8:
            raise Stop

    with pytest.raises(Stop):
        second_moment(lm, "layer.2.mlp.key", on_batch=interrupt, **kw)
    seen = []
    resumed = second_moment(lm, "layer.2.mlp.key", on_batch=lambda d, t: seen.append(d), **kw)
    assert seen[0] == 12  # continued after the 8 chunks already counted
    assert resumed.count == full.count
    torch.testing.assert_close(resumed.mom2, full.mom2, rtol=1e-6, atol=1e-8)


def test_export_import(tiny_models, tiny_env, corpus, tmp_path):
    lm = tiny_models["llama"]
    m = second_moment(lm, "layer.0.mlp.key", corpus=corpus, samples=4, max_length=32)
    path = export_stats(m, tmp_path / "exported.safetensors")
    stats_path(m.spec).unlink()
    got = import_stats(path, lm, "layer.0.mlp.key")
    assert torch.equal(got.mom2, m.mom2) and stats_path(m.spec).exists()
    with pytest.raises(StatsMismatchError):
        import_stats(path, lm, "layer.1.mlp.key")
    with pytest.raises(StatsMismatchError):
        import_stats(path, tiny_models["gpt2"])
    assert got.spec.numerics == lm.numerics  # the spec records the numerics the model ran in


def test_spec_key_covers_every_field():
    base = StatsSpec("m@1", "layer.1.mlp.key", "wikitext-2@abc", 10, 64, model_dtype="float32", attn_implementation="sdpa")
    keys = {base.key()}
    changes = [dict(model_id="m@2"), dict(site="layer.2.mlp.key"), dict(corpus_id="x@1"), dict(samples=11), dict(max_length=65),
               dict(model_dtype="bfloat16"), dict(attn_implementation="eager"), dict(model_dtype=None, attn_implementation=None)]
    for change in changes:
        keys.add(StatsSpec(**{**base.to_dict(), **change}).key())
    assert len(keys) == 1 + len(changes)


def test_interrupted_before_the_first_batch_resumes_cleanly(tiny_models, tiny_env, corpus, monkeypatch):
    """An interruption before any chunk is counted saves nothing, so the rerun starts over instead of reading an empty checkpoint."""
    import factlab.edit.stats as stats_mod

    lm = tiny_models["llama"]
    kw = dict(corpus=corpus, samples=6, max_length=24, batch_size=3, checkpoint_every=1)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(stats_mod, "run_and_capture", stop)
        with pytest.raises(Stop):
            second_moment(lm, "layer.1.mlp.key", **kw)
    assert not list(stats_mod.stats_dir().glob("partial_*"))
    assert second_moment(lm, "layer.1.mlp.key", **kw).count > 0


def test_bad_sizes_are_refused_before_reading_the_corpus(tiny_models, tiny_env, tmp_path):
    from factlab.errors import InputError

    lm = tiny_models["llama"]
    for bad in (dict(samples=0), dict(batch_size=0), dict(max_length=0)):
        with pytest.raises(InputError):
            second_moment(lm, "layer.1.mlp.key", corpus=tmp_path / "missing.txt", **bad)


def test_cached_statistics_answer_when_the_corpus_is_gone(tiny_models, tiny_env, corpus):
    """Offline with imported/cached statistics but no corpus: the cache answers; anything not cached names the corpus."""
    from factlab.data.errors import DatasetNotFoundError

    lm = tiny_models["llama"]
    m = second_moment(lm, "layer.0.mlp.key", corpus=corpus, samples=7, max_length=16)
    corpus.unlink()
    again = second_moment(lm, "layer.0.mlp.key", corpus=corpus, samples=7, max_length=16)
    assert torch.equal(again.mom2, m.mom2) and again.spec == m.spec
    with pytest.raises(DatasetNotFoundError):
        second_moment(lm, "layer.0.mlp.key", corpus=corpus, samples=8, max_length=16)  # other size: not cached
    with pytest.raises(DatasetNotFoundError):
        second_moments(lm, ["layer.0.mlp.key", "layer.1.mlp.key"], corpus=corpus, samples=7, max_length=16)
