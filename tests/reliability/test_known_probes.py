"""Probes that passed before the bad-input work, kept so they stay passing: each user mistake through the CLI ends
in one clean error (exit 2, no traceback) before the expensive work, and through the API in the right error class
with the weights untouched."""

from __future__ import annotations

import json

import pytest

from factlab import interventions as iv
from factlab.edit import Request, edit
from factlab.edit.errors import EditError, InvalidRequestError, TargetAlreadyKnownError
from factlab.errors import SiteError, UnsupportedArchitectureError

from .conftest import known_records, run_cli, same_weights, weights_of

EDIT = ["edit", "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower"]


@pytest.fixture(scope="module")
def known(saved_tiny):
    """One record the saved tiny model 'knows' (its own top answer)."""
    import factlab

    return known_records(factlab.load(saved_tiny, device="cpu"), 1)[0]


@pytest.fixture(scope="module")
def unsupported_model(tmp_path_factory):
    """A tiny OPT model (an architecture factlab has no adapter for), saved as a folder."""
    from transformers import OPTConfig, OPTForCausalLM

    from factlab.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    OPTForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


CLI_PROBES = {
    "trace: subject not in the prompt": (["trace", "The Eiffel Tower is in", "--subject", "Louvre"], ["not in the prompt"]),
    "edit: empty target": (EDIT + ["--target", " "], ["target"]),
    "edit: layer out of range": (EDIT + ["--target", " Rome", "--layers", "99"], ["layer 99", "0..2"]),
    "edit: ROME on two layers": (EDIT + ["--target", " Rome", "--layers", "0,1"], ["one layer"]),
    "edit: unknown method": (EDIT + ["--target", " Rome", "--method", "mend"], ["unknown method", "rome"]),
    "edit: malformed requests file": (["edit", "--requests", "{bad}"], ["neither JSON nor JSONL"]),
    "edit: request without a subject": (["edit", "--requests", "{nosubject}"], ["lacks", "subject"]),
    "edit: missing requests file": (["edit", "--requests", "{missing}"], ["does not exist"]),
}


@pytest.mark.parametrize("probe", list(CLI_PROBES))
def test_cli_user_mistake_is_one_clean_error(probe, saved_tiny, tmp_path):
    args, needles = CLI_PROBES[probe]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "{} is in", "subject": ')
    nosub = tmp_path / "nosub.jsonl"
    nosub.write_text(json.dumps({"prompt": "{} is in", "target_new": " Rome"}) + "\n")
    files = {"{bad}": str(bad), "{nosubject}": str(nosub), "{missing}": str(tmp_path / "nope.jsonl")}
    args = [files.get(a, a) for a in args]
    run_cli(*args, "--model", saved_tiny, env={"FACTLAB_CACHE": str(tmp_path / "cache")}).assert_user_error(*needles)
    assert not (tmp_path / "cache" / "stats").exists() or not any((tmp_path / "cache" / "stats").iterdir())  # no work done


def test_cli_target_already_known(saved_tiny, known, tmp_path):
    r = run_cli("edit", "--prompt", known["template"], "--subject", known["subject"], "--target", known["attribute"],
                "--model", saved_tiny, env={"FACTLAB_CACHE": str(tmp_path / "cache")})
    r.assert_user_error("already predicts", "on-known" if "on-known" in r.stderr else "on_known")


def test_api_target_already_known_leaves_weights(tiny_llama, known, tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    before = weights_of(tiny_llama.model)
    with pytest.raises(TargetAlreadyKnownError, match="already predicts"):
        edit(tiny_llama, Request(known["template"], known["subject"], known["attribute"]),
             hparams={"stats_samples": 8, "stats_max_length": 32})
    assert same_weights(tiny_llama.model, before)


@pytest.mark.parametrize("kwargs, error", [
    ({"prompt": "{} is in", "subject": "", "target_new": " Rome"}, InvalidRequestError),
    ({"prompt": "{} is in", "subject": "X", "target_new": ""}, InvalidRequestError),
    ({"prompt": "{} and {} are in", "subject": "X", "target_new": " Rome"}, InvalidRequestError),
    ({"prompt": "The Louvre is in", "subject": "Eiffel", "target_new": " Rome"}, InvalidRequestError),
], ids=["empty subject", "empty target", "two placeholders", "subject not in the prompt"])
def test_api_malformed_request_refused_before_any_forward(tiny_llama, kwargs, error):
    before = weights_of(tiny_llama.model)
    forwards = []
    h = tiny_llama.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(error):
            edit(tiny_llama, kwargs, on_known="edit")
    finally:
        h.remove()
    assert forwards == [] and same_weights(tiny_llama.model, before)


def test_api_layer_out_of_range_refused_before_any_forward(tiny_llama):
    forwards = []
    h = tiny_llama.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(EditError, match="outside"):
            edit(tiny_llama, Request("{} is in", "X", " Rome"), method="memit", layers=[1, 99])
    finally:
        h.remove()
    assert forwards == []


@pytest.mark.parametrize("site", ["layer.99.resid", "layer.1.nothing", "embedz", "layer.x.mlp.out"])
def test_api_bad_site_refused_before_the_forward(tiny_llama, site):
    with pytest.raises(SiteError):
        with iv.capture(tiny_llama, [site]):
            tiny_llama.forward(tiny_llama.encode(["hello"]))


def test_api_subject_not_in_prompt(tiny_llama):
    from factlab.locate import trace
    from factlab.locate._common import TraceInputError

    with pytest.raises(TraceInputError, match="not in the prompt"):
        trace(tiny_llama, "The Eiffel Tower is in", "Louvre")


def test_unsupported_architecture(unsupported_model):
    import factlab

    with pytest.raises(UnsupportedArchitectureError, match="OPT|opt"):
        factlab.load(unsupported_model, device="cpu")
    run_cli("predict", "hello", "--model", unsupported_model).assert_user_error("opt")
