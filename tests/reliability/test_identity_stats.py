"""The model's numerics in every cache identity, and second-moment statistics that cannot be silently wrong or lost.

- float32 and bfloat16 runs never share a cached artefact computed by running the model (statistics, optimised
  values, context templates, noise level, LRE sweep), and each records the identity it was made with;
- statistics holding NaN/inf, made for other numerics, or written before the numerics were recorded are refused
  on import (API and ``factlab stats --import``: exit 2, one clean line) and before any value optimisation;
- an edit layer, site or statistics key that does not exist is refused before any forward pass;
- SIGINT and SIGTERM during ``factlab stats`` save the progress and say how to resume; the rerun resumes and
  ends with the same numbers, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from factlab.edit import Request, edit, resolve_hparams
from factlab.edit.errors import EditError, NonFiniteStatisticsError, StatsMismatchError
from factlab.edit.stats import SecondMoment, StatsSpec, export_stats, import_stats, second_moment, stats_dir, stats_path
from factlab.errors import IntegrityError, SiteError
from factlab.models.tiny import tiny_model

from .conftest import run_cli, same_weights, weights_of

SITE = "layer.1.mlp.key"
REQ = Request("{} is located in the city of", "The big tower", " Rome")
TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox {i} jumps over the lazy dog near the river bank, and the city of Paris sleeps."
    * (1 + i % 3)
    for i in range(40)
)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    p = tmp_path / "small.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A private factlab cache for this test (statistics, templates, values, noise, sweeps)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("FACTLAB_CACHE", str(root))
    return root


def _pair() -> dict[str, object]:
    """The same tiny Llama (same ``model_id``) loaded in float32 and in bfloat16."""
    return {"float32": tiny_model("llama"), "bfloat16": tiny_model("llama", dtype=torch.bfloat16)}


# --------------------------------------------------------------------------- numerics in every cache identity
def _stats_entry(lm, root: Path, corpus: Path) -> Path:
    return stats_path(second_moment(lm, SITE, corpus=corpus, samples=6, max_length=24).spec)


def _values_entry(lm, root: Path, corpus: Path) -> Path:
    from factlab.edit.value_cache import ValueCache, cached_values

    hp = resolve_hparams(lm, "memit", {"layers": (1,), "v_steps": 2})
    vc = ValueCache(root / "values")
    cached_values(lm, [REQ], site="layer.1.resid", layer=1, templates=["{}"], hp=hp, cache=vc)
    return vc.root / f"{vc.key(lm, 'layer.1.resid', 1, ['{}'], hp, REQ)}.json"


def _newest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_mtime_ns)


def _context_entry(lm, root: Path, corpus: Path) -> Path:
    from factlab.edit.context import context_templates

    context_templates(lm, ((3, 2),))
    return _newest(root / "edit" / "context", "*.json")


def _noise_entry(lm, root: Path, corpus: Path) -> Path:
    from factlab.locate.corrupt import embedding_std

    embedding_std(lm, ["The Eiffel Tower", "Toyota"], cache=root / "noise")
    return _newest(root / "noise", "*.json")


def _sweep_entry(lm, root: Path, corpus: Path) -> Path:
    from factlab.data.lre import Relation, Sample
    from factlab.lre.sweep import sweep

    rel = Relation(name="city", relation_type="factual", prompt_templates=["{} is in the city of"])
    known = [Sample(s, o) for s, o in [("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Toyota", "Japan"),
                                       ("Canada", "Ottawa"), ("Miles Davis", "trumpet"), ("Brazil", "Portuguese")]]
    sweep(lm, rel, known, n_train=2, layers=[1], betas=[1.0], ranks=[2])
    return _newest(root / "lre" / "sweeps", "*/*.json")


def _recorded_dtype(path: Path) -> str | None:
    """The dtype an entry says it was computed in."""
    if path.suffix == ".safetensors":
        return SecondMoment.load(path).spec.model_dtype
    return (json.loads(path.read_text()).get("identity") or {}).get("dtype")


@pytest.mark.parametrize("entry", [_stats_entry, _values_entry, _context_entry, _noise_entry, _sweep_entry],
                         ids=["statistics", "values", "context", "noise", "lre-sweep"])
def test_float32_and_bfloat16_never_share_a_cache_entry(entry, cache, corpus):
    """The same weights in another dtype get their own entry (same model_id, other numerics), which records its dtype."""
    models = _pair()
    paths = {dtype: entry(lm, cache, corpus) for dtype, lm in models.items()}
    assert paths["float32"] != paths["bfloat16"]
    for dtype, p in paths.items():
        assert p.exists() and _recorded_dtype(p) == dtype


def test_bfloat16_model_never_reuses_float32_statistics(cache, corpus):
    """A bf16 run computes its own statistics (different numbers) instead of reading the float32 file."""
    models = _pair()
    m32 = second_moment(models["float32"], SITE, corpus=corpus, samples=6, max_length=24)
    mbf = second_moment(models["bfloat16"], SITE, corpus=corpus, samples=6, max_length=24)
    assert (m32.spec.model_dtype, mbf.spec.model_dtype) == ("float32", "bfloat16")
    assert stats_path(m32.spec) != stats_path(mbf.spec)
    assert not torch.equal(m32.mom2, mbf.mom2)
    assert torch.equal(second_moment(models["float32"], SITE, corpus=corpus, samples=6, max_length=24).mom2, m32.mom2)


@pytest.mark.parametrize("old", ["unrecorded numerics", "other dtype"])
def test_cache_without_matching_numerics_is_not_reused_when_the_corpus_is_gone(old, cache, corpus):
    """Offline fallback (corpus gone): a cached file of other or unrecorded numerics never answers for this model."""
    from factlab.data import load_text_corpus
    from factlab.data.errors import DatasetNotFoundError

    lm = tiny_model("llama")
    corpus_id = load_text_corpus(corpus).id
    fields = dict(model_dtype="bfloat16", attn_implementation=lm.attn_implementation) if old == "other dtype" else {}
    try:
        spec = StatsSpec(lm.model_id, SITE, corpus_id, 6, 24, **fields)
    except TypeError:  # a factlab that has no numerics fields
        spec = StatsSpec(lm.model_id, SITE, corpus_id, 6, 24)
    d = lm.adapter.d_mlp
    SecondMoment(torch.eye(d), 100, spec).save(stats_path(spec))
    corpus.unlink()
    with pytest.raises(DatasetNotFoundError):
        second_moment(lm, SITE, corpus=corpus, samples=6, max_length=24)


# --------------------------------------------------------------------------- refused statistics: import
def _exported(tmp_path: Path, lm, corpus: Path) -> tuple[SecondMoment, Path]:
    m = second_moment(lm, SITE, corpus=corpus, samples=6, max_length=24)
    return m, export_stats(m, tmp_path / "exported.safetensors")


def _nan_copy(m: SecondMoment, path: Path) -> Path:
    mom2 = m.mom2.clone()
    mom2[0, 0] = float("nan")
    return SecondMoment(mom2, m.count, m.spec).save(path)


def _old_format_copy(m: SecondMoment, path: Path) -> Path:
    s = m.spec
    return SecondMoment(m.mom2, m.count, StatsSpec(s.model_id, s.site, s.corpus_id, s.samples, s.max_length, version=1)).save(path)


@pytest.mark.parametrize("case", ["nan", "other dtype", "old format"])
def test_import_refuses_bad_statistics(case, cache, corpus, tmp_path):
    lm = tiny_model("llama")
    m, exported = _exported(tmp_path, lm, corpus)
    stats_path(m.spec).unlink()
    target = lm
    if case == "nan":
        path, error, needles = _nan_copy(m, tmp_path / "nan.safetensors"), IntegrityError, ["nan", "nan.safetensors", "recompute"]
    elif case == "other dtype":
        path, error, needles = exported, StatsMismatchError, ["float32", "bfloat16"]
        target = tiny_model("llama", dtype=torch.bfloat16)
    else:
        path, error, needles = _old_format_copy(m, tmp_path / "old.safetensors"), StatsMismatchError, ["older factlab", "recompute"]
    with pytest.raises(error) as info:
        import_stats(path, target, SITE)
    for n in needles:
        assert n in str(info.value).lower()
    assert not list(stats_dir().glob("*.safetensors"))  # nothing was copied into the cache


def test_cli_import_refuses_nan_other_dtype_and_missing_files(saved_tiny, corpus, tmp_path, monkeypatch):
    """``factlab stats --import``: exit 2 with one clean line naming the file or both dtypes."""
    import factlab

    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "api-cache"))
    m, exported = _exported(tmp_path, factlab.load(saved_tiny, device="cpu"), corpus)
    nan = _nan_copy(m, tmp_path / "nan.safetensors")
    env = {"FACTLAB_CACHE": str(tmp_path / "cli-cache")}
    base = ["stats", "--model", str(saved_tiny), "--device", "cpu", "--site", SITE, "--json"]
    run_cli(*base, "--import", nan, env=env).assert_user_error("nan.safetensors", "NaN", "recompute")
    run_cli(*base, "--import", exported, "--dtype", "bfloat16", env=env).assert_user_error("float32", "bfloat16")
    run_cli(*base, "--import", tmp_path / "missing.safetensors", env=env).assert_user_error("missing.safetensors", "does not exist")
    assert not list((tmp_path / "cli-cache").rglob("*.safetensors"))  # nothing was imported


# --------------------------------------------------------------------------- refused statistics: edit
def _tiny_edit_hp(corpus: Path) -> dict[str, object]:
    return {"layers": (1,), "stats_corpus": str(corpus), "stats_samples": 8, "stats_max_length": 32, "context": ((3, 2),), "v_steps": 2}


def _no_value_optimisation(monkeypatch) -> None:
    import factlab.edit.value_cache as value_cache

    def refuse(*args, **kwargs):
        raise AssertionError("the value optimisation started before the statistics were checked")

    monkeypatch.setattr(value_cache, "optimise_values", refuse)


@pytest.mark.parametrize("source", ["given", "cached"])
def test_nan_statistics_refused_before_value_optimisation(source, tiny_llama, cache, corpus, monkeypatch):
    lm = tiny_llama
    site = lm.adapter.projection(1).key_site
    stats = None
    if source == "given":
        d = lm.adapter.d_mlp
        stats, error, needle = {site: SecondMoment(torch.full((d, d), float("nan")), 10)}, NonFiniteStatisticsError, site
    else:
        m = second_moment(lm, site, corpus=corpus, samples=8, max_length=32)
        _nan_copy(m, stats_path(m.spec))
        error, needle = IntegrityError, str(stats_path(m.spec))
    _no_value_optimisation(monkeypatch)
    before = weights_of(lm.model)
    with pytest.raises(error) as info:
        edit(lm, REQ, method="rome", hparams=_tiny_edit_hp(corpus), stats=stats, on_known="edit")
    assert "NaN" in str(info.value) and needle in str(info.value)
    assert same_weights(lm.model, before)


@pytest.mark.parametrize("bad", ["layer 99", "projection", "stats for another layer"])
def test_bad_edit_layer_site_or_stats_key_refused_before_any_forward_pass(bad, tiny_llama, cache, corpus, monkeypatch):
    lm = tiny_llama
    kw: dict[str, object] = {"hparams": _tiny_edit_hp(corpus)}
    if bad == "layer 99":
        kw["layers"], error = [99], EditError
    elif bad == "projection":
        kw["projection"], error = "nope", SiteError
    else:
        d = lm.adapter.d_mlp
        kw["stats"], error = {"layer.2.mlp.key": torch.eye(d)}, EditError

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the input was checked")

    monkeypatch.setattr(lm.model, "forward", no_forward)
    before = weights_of(lm.model)
    with pytest.raises(error):
        edit(lm, REQ, method="rome", on_known="edit", **kw)
    assert same_weights(lm.model, before)


# --------------------------------------------------------------------------- statistics progress survives signals
def test_sigterm_raises_only_inside_the_block_and_restores_the_handler():
    from factlab.progress import Terminated, sigterm_raises

    seen = []

    def mine(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Terminated):
            with sigterm_raises():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler raises at once; the sleep only guards against it not running
        assert signal.getsignal(signal.SIGTERM) is mine
        in_thread = []
        t = threading.Thread(target=lambda: in_thread.append(_enter_in_thread(sigterm_raises)))
        t.start()
        t.join()
        assert in_thread == [True]  # a no-op outside the main thread (handlers can only be set there)
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with sigterm_raises():  # a process that ignores SIGTERM keeps ignoring it
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _enter_in_thread(cm) -> bool:
    before = signal.getsignal(signal.SIGTERM)
    with cm():
        same = signal.getsignal(signal.SIGTERM) is before
    return same


#: ``factlab stats`` with a pause after every batch's forward pass and a marker line on stderr, so a test can
#: signal it in the middle of the loop. SIGINT gets Python's default handler, as in a terminal (a parent shell
#: that started this suite in the background may have set SIGINT to be ignored).
_SLOW_STATS = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import factlab.edit.stats as stats
_real = stats.run_and_capture
def _paused(*args, **kwargs):
    out = _real(*args, **kwargs)
    print("factlab-test: batch", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("FACTLAB_TEST_PAUSE", "0")))
    return out
stats.run_and_capture = _paused
from factlab.cli import main
main()
"""
SAMPLES, BATCH, MAX_LENGTH = 24, 2, 24


def _stats_args(model: Path, corpus: Path) -> list[str]:
    return ["stats", "--model", str(model), "--device", "cpu", "--site", SITE, "--corpus", str(corpus), "--samples", str(SAMPLES),
            "--batch-size", str(BATCH), "--max-length", str(MAX_LENGTH), "--json"]


def _env(cache_dir: Path, pause: float) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FACTLAB_NO_PROGRESS": "1",
            "FACTLAB_CACHE": str(cache_dir), "FACTLAB_TEST_PAUSE": str(pause)}


def _interrupt_after(args: list[str], env: dict[str, str], batches: int, sig: int) -> subprocess.CompletedProcess:
    """Run the paused ``factlab stats``, send ``sig`` once ``batches`` forward passes are done, wait for the end."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STATS, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, lines = 0, []
    for line in proc.stderr:
        lines.append(line)
        if "factlab-test: batch" in line:
            seen += 1
            if seen == batches:
                proc.send_signal(sig)
                break
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(lines) + err)


@pytest.fixture(scope="module")
def uninterrupted(saved_tiny, tmp_path_factory):
    """``factlab stats`` run to the end without interruption: its JSON row and its statistics file."""
    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "small.txt").write_text(TEXT)
    r = run_cli(*_stats_args(saved_tiny, root / "small.txt"), env={"FACTLAB_CACHE": str(root / "cache")})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stats_signal_saves_progress_and_the_rerun_resumes_to_the_same_numbers(sig, saved_tiny, corpus, tmp_path, uninterrupted):
    cache_dir = tmp_path / "cache"
    args = _stats_args(saved_tiny, corpus)
    stopped = _interrupt_after(args, _env(cache_dir, pause=0.5), batches=3, sig=sig)
    assert stopped.returncode == 128 + sig, f"exit {stopped.returncode}\n{stopped.stderr}"  # as shells report the signal
    assert "Traceback" not in stopped.stderr, stopped.stderr
    found = re.search(rf"interrupted by {sig.name} after (\d+) of {SAMPLES} chunks.*run the same command again to resume",
                      stopped.stderr)
    assert found, stopped.stderr
    done = int(found.group(1))
    assert 0 < done < SAMPLES and done % BATCH == 0
    assert len(list((cache_dir / "stats").glob("partial_*.safetensors"))) == 1

    rerun = subprocess.run([sys.executable, "-c", _SLOW_STATS, *args], env=_env(cache_dir, pause=0), text=True,
                           capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("factlab-test: batch") == (SAMPLES - done) // BATCH  # resumed: only the rest was computed
    row = json.loads(rerun.stdout)[0]
    assert row["tokens"] == uninterrupted["tokens"] and row["trace"] == uninterrupted["trace"]
    assert torch.equal(SecondMoment.load(row["file"]).mom2, SecondMoment.load(uninterrupted["file"]).mom2)
    assert not list((cache_dir / "stats").glob("partial_*"))

