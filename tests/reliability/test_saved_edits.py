"""Saved edits that cannot corrupt or double a model (issue #16).

A saved edit carries the sha256 of every tensor and of the weights it was made on (and of the edited weights):
NaN bytes or a flipped byte are refused at load, applying the same edit twice (a re-run notebook cell) or onto
other weights is refused with the weights left bit-identical, ``apply(stack=True)`` stacks on request, and
``factlab edit apply`` never writes a broken model nor silently replaces a folder.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import factlab
from factlab.edit import (
    AlreadyAppliedError,
    BaseMismatchError,
    CorruptEditError,
    DivergenceError,
    EditNotFoundError,
    EditResult,
    Request,
    edit,
    resolve_hparams,
)
from factlab.edit.result import edited_value, tensor_digest
from factlab.errors import FactlabError, InputError, IntegrityError

from ..edit.edit_helpers import TINY_HP
from .conftest import run_cli, same_weights, weights_of

NAME = "model.layers.1.mlp.down_proj.weight"


# ---------------------------------------------------------------------- helpers
def _param(lm, name: str = NAME) -> torch.nn.Parameter:
    return dict(lm.model.named_parameters())[name]


def _make_edit(lm, folder: Path, *, scale: float = 0.01) -> torch.Tensor:
    """Save a small dense edit of ``NAME`` to ``folder`` (the model is restored afterwards); returns the delta."""
    g = torch.Generator().manual_seed(1)
    w0 = _param(lm).detach().clone()
    res = EditResult.from_weights(lm, {NAME: w0 + scale * torch.randn(w0.shape, generator=g)}, method="test")
    res.save(folder)
    res.restore()
    return res.deltas[NAME]


def _tensor_span(file: Path, key: str) -> tuple[int, int, str]:
    """Byte range ``[start, end)`` of tensor ``key`` inside a safetensors file, and its dtype code."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8: 8 + n])[key]
    start, end = entry["data_offsets"]
    return 8 + n + start, 8 + n + end, entry["dtype"]


def _write_bytes(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _nan_bytes(code: str) -> bytes:
    dtype = {"F64": torch.float64, "F32": torch.float32}[code]
    return torch.full((4,), float("nan"), dtype=dtype).numpy().tobytes()


def _poison_with_nan(folder: Path) -> None:
    """Write NaN bytes over the start of the delta's data (what a damaged disk or a stray write would do)."""
    f = folder / "deltas.safetensors"
    start, _, code = _tensor_span(f, f"delta/{NAME}")
    _write_bytes(f, start, _nan_bytes(code))


@pytest.fixture(scope="module")
def saved_edit(saved_tiny, tmp_path_factory) -> Path:
    """A saved edit of the tiny Llama folder ``saved_tiny`` (what ``--model saved_tiny`` loads)."""
    folder = tmp_path_factory.mktemp("saved_edit") / "e"
    _make_edit(factlab.load(str(saved_tiny)), folder)
    return folder


@pytest.fixture()
def edit_copy(saved_edit, tmp_path) -> Path:
    """A private copy of ``saved_edit`` that a test may damage."""
    return Path(shutil.copytree(saved_edit, tmp_path / "e"))


@pytest.fixture()
def base_lm(saved_tiny):
    """A fresh copy of the tiny Llama the saved edit was made on."""
    return factlab.load(str(saved_tiny))


# ---------------------------------------------------------------------- integrity
def test_nan_bytes_in_deltas_are_refused_at_load(edit_copy, base_lm):
    _poison_with_nan(edit_copy)
    before = weights_of(base_lm.model)
    with pytest.raises(IntegrityError, match="checksum") as e:
        EditResult.load(edit_copy, base_lm)
    assert isinstance(e.value, CorruptEditError)
    assert "deltas.safetensors" in str(e.value) and f"delta/{NAME}" in str(e.value)
    assert same_weights(base_lm.model, before)


def test_nan_delta_is_refused_even_when_checksums_match(edit_copy, base_lm):
    """An edit saved from a NaN delta (checksums recomputed to match) is still refused: NaN/inf are never loaded."""
    from safetensors.torch import load_file, save_file

    f = edit_copy / "deltas.safetensors"
    tensors = load_file(str(f))
    tensors[f"delta/{NAME}"][0, 0] = float("nan")
    save_file(tensors, str(f))
    info = json.loads((edit_copy / "edit.json").read_text())
    info["checksums"] = {k: tensor_digest(v) for k, v in tensors.items()}
    (edit_copy / "edit.json").write_text(json.dumps(info))
    with pytest.raises(CorruptEditError, match="NaN/inf") as e:
        EditResult.load(edit_copy, base_lm)
    assert f"delta/{NAME}" in str(e.value)


def test_a_flipped_byte_fails_the_checksum(edit_copy, base_lm):
    f = edit_copy / "deltas.safetensors"
    start, end, _ = _tensor_span(f, f"delta/{NAME}")
    pos = (start + end) // 2
    raw = bytearray(f.read_bytes())
    _write_bytes(f, pos, bytes([raw[pos] ^ 0x01]))  # one bit of a finite value: still a finite number
    with pytest.raises(CorruptEditError, match="sha256 checksum") as e:
        EditResult.load(edit_copy, base_lm)
    assert "deltas.safetensors" in str(e.value) and f"delta/{NAME}" in str(e.value)


@pytest.mark.parametrize("damage", ["missing", "no_edit_json", "truncated", "bad_json", "a_file"])
def test_missing_or_damaged_edit_is_a_clean_error(damage, edit_copy, base_lm, tmp_path):
    path = edit_copy
    if damage == "missing":
        path = tmp_path / "nope"
    elif damage == "no_edit_json":
        (edit_copy / "edit.json").unlink()
    elif damage == "truncated":
        raw = (edit_copy / "deltas.safetensors").read_bytes()
        (edit_copy / "deltas.safetensors").write_bytes(raw[: len(raw) // 2])
    elif damage == "bad_json":
        (edit_copy / "edit.json").write_text("{not json")
    else:
        path = edit_copy / "edit.json"
    with pytest.raises(FactlabError) as e:
        EditResult.load(path, base_lm)
    expected = EditNotFoundError if damage in ("missing", "no_edit_json", "a_file") else CorruptEditError
    assert isinstance(e.value, expected) and str(path) in str(e.value)


def test_old_format_edits_still_load_with_a_warning(edit_copy, base_lm):
    info = json.loads((edit_copy / "edit.json").read_text())
    info["format"] = "factlab-edit/1"
    del info["checksums"]
    for p in info["parameters"].values():
        del p["weights"]
    (edit_copy / "edit.json").write_text(json.dumps(info))
    before = weights_of(base_lm.model)
    with pytest.warns(UserWarning, match="cannot be verified"):
        res = EditResult.load(edit_copy, base_lm)
    res.apply()
    assert not torch.equal(_param(base_lm), before[NAME])
    res.restore()
    assert same_weights(base_lm.model, before)


# ---------------------------------------------------------------------- no double application
def test_applying_a_saved_edit_twice_is_refused(saved_edit, base_lm):
    w0 = _param(base_lm).detach().clone()
    first = EditResult.load(saved_edit, base_lm).apply()
    once = weights_of(base_lm.model)
    assert torch.equal(_param(base_lm), edited_value(w0, first.deltas[NAME]))
    again = EditResult.load(saved_edit, base_lm)  # a re-run notebook cell
    with pytest.raises(AlreadyAppliedError, match="already carries this edit"):
        again.apply()
    assert same_weights(base_lm.model, once) and not again.applied
    first.restore()
    assert torch.equal(_param(base_lm), w0)


def test_stacking_is_possible_when_asked(saved_edit, base_lm):
    w0 = _param(base_lm).detach().clone()
    EditResult.load(saved_edit, base_lm).apply()
    once = _param(base_lm).detach().clone()
    second = EditResult.load(saved_edit, base_lm).apply(stack=True)
    assert torch.equal(_param(base_lm), edited_value(once, second.deltas[NAME]))  # W0 + 2Δ, on request
    second.restore()
    assert torch.equal(_param(base_lm), once)
    assert not torch.equal(once, w0)


def test_applying_onto_a_different_base_is_refused(saved_edit, base_lm):
    with torch.no_grad():
        _param(base_lm).mul_(1.5)  # other weights (another checkpoint, or an unsaved change)
    before = weights_of(base_lm.model)
    with pytest.raises(BaseMismatchError, match="not the weights this edit was made on"):
        EditResult.load(saved_edit, base_lm).apply()
    assert same_weights(base_lm.model, before)


def test_edit_made_in_float32_applies_once_to_a_bfloat16_copy(saved_edit, saved_tiny):
    """The base digest is recorded per dtype: the same checkpoint loaded in bfloat16 is recognised as the base."""
    lm = factlab.load(str(saved_tiny))
    lm.model.to(torch.bfloat16)
    w0 = _param(lm).detach().clone()
    res = EditResult.load(saved_edit, lm).apply()
    assert torch.equal(_param(lm), edited_value(w0, res.deltas[NAME]))
    with pytest.raises(AlreadyAppliedError):
        EditResult.load(saved_edit, lm).apply()


def test_real_edit_round_trip_is_recognised(tmp_path, monkeypatch):
    """A ROME edit on a tiny model, saved and re-applied to a fresh copy, gives the same bits and applies once."""
    from factlab.models.tiny import tiny_model

    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("llama")
    req = Request("{} is located in the city of", "The big tower", " Rome")
    res = edit(lm, req, hparams=resolve_hparams(lm, "rome", TINY_HP), on_known="edit")
    edited = weights_of(lm.model)
    res.save(tmp_path / "rome")
    fresh = tiny_model("llama")
    EditResult.load(tmp_path / "rome", fresh).apply()
    assert same_weights(fresh.model, edited)
    with pytest.raises(AlreadyAppliedError):
        EditResult.load(tmp_path / "rome", fresh).apply()
    assert same_weights(fresh.model, edited)
    res.restore()
    assert len(repr(res)) < 1000 and "rome" in repr(res)


def test_an_overflowing_delta_is_never_applied(saved_tiny, tmp_path):
    """A finite delta whose sum overflows float32 passes the checks on the file but is refused at apply."""
    lm = factlab.load(str(saved_tiny))
    delta = torch.full(_param(lm).shape, 1e39, dtype=torch.float64)
    EditResult(lm, {NAME: delta}, {NAME: _param(lm).detach().clone()}, "test").save(tmp_path / "big")
    before = weights_of(lm.model)
    with pytest.raises(DivergenceError, match="NaN/inf"):
        EditResult.load(tmp_path / "big", lm).apply()
    assert same_weights(lm.model, before)


# ---------------------------------------------------------------------- save and repr
def test_save_onto_an_existing_file_is_refused_and_the_file_untouched(base_lm, tmp_path):
    target = tmp_path / "afile"
    target.write_text("precious")
    w0 = _param(base_lm).detach().clone()
    res = EditResult.from_weights(base_lm, {NAME: w0 + 0.01}, method="test")
    with pytest.raises(InputError, match="existing file"):
        res.save(target)
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing moved aside, no temporary left
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a saved edit"):
        res.save(notes)  # a folder holding other things is never replaced
    assert (notes / "todo.txt").read_text() == "keep me"
    res.save(tmp_path / "e")
    res.save(tmp_path / "e")  # an earlier saved edit is replaced
    res.restore()


def test_repr_is_short(base_lm):
    w0 = _param(base_lm).detach().clone()
    res = EditResult.from_weights(base_lm, {NAME: w0 + 0.01}, method="test", metadata={"requests": [{"a": 1}]})
    text = repr(res.restore())  # what a notebook cell ending in res.restore() prints
    assert len(text) < 1000, text
    assert "method='test'" in text and "applied=False" in text and NAME in text and "(48, 96)" in text
    assert "requests=1" in text
    assert len(res._repr_html_()) < 2000


# ---------------------------------------------------------------------- the CLI
def test_cli_edit_apply_refuses_nan_and_writes_nothing(edit_copy, saved_tiny, tmp_path):
    _poison_with_nan(edit_copy)
    out = tmp_path / "m"
    run_cli("edit", "apply", edit_copy, "--model", saved_tiny, "--out", out).assert_user_error(
        "deltas.safetensors", f"delta/{NAME}")
    assert not out.exists()


def test_cli_edit_apply_refuses_an_overflowing_edit_and_writes_nothing(saved_tiny, tmp_path):
    lm = factlab.load(str(saved_tiny))
    delta = torch.full(_param(lm).shape, 1e39, dtype=torch.float64)
    EditResult(lm, {NAME: delta}, {NAME: _param(lm).detach().clone()}, "test").save(tmp_path / "big")
    out = tmp_path / "m"
    run_cli("edit", "apply", tmp_path / "big", "--model", saved_tiny, "--out", out).assert_user_error("NaN/inf", NAME)
    assert not out.exists()


def test_cli_edit_apply_refuses_an_existing_out_without_force(saved_edit, saved_tiny, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_cli("edit", "apply", saved_edit, "--model", saved_tiny, "--out", out).assert_user_error("already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = run_cli("edit", "apply", saved_edit, "--model", saved_tiny, "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists()
    written, base = factlab.load(str(out)), factlab.load(str(saved_tiny))
    delta = EditResult.load(saved_edit, base).deltas[NAME]
    assert torch.equal(_param(written), edited_value(_param(base).detach(), delta))


def test_cli_edit_apply_twice_needs_stack(saved_edit, saved_tiny, tmp_path):
    """Applying the edit to a model written by ``edit apply`` (it carries the edit) is refused; --stack adds it again."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert run_cli("edit", "apply", saved_edit, "--model", saved_tiny, "--out", once).returncode == 0
    run_cli("edit", "apply", saved_edit, "--model", once, "--out", twice).assert_user_error("--stack")
    assert not twice.exists()
    r = run_cli("edit", "apply", saved_edit, "--model", once, "--out", twice, "--stack")
    assert r.returncode == 0, r.stderr
    w1 = _param(factlab.load(str(once))).detach()
    delta = EditResult.load(saved_edit, factlab.load(str(saved_tiny))).deltas[NAME]
    assert torch.equal(_param(factlab.load(str(twice))), edited_value(w1, delta))


@pytest.mark.parametrize("damage", ["missing", "truncated", "no_edit_json"])
def test_cli_edit_apply_of_a_missing_or_damaged_edit(damage, edit_copy, saved_tiny, tmp_path):
    path = tmp_path / "nope" if damage == "missing" else edit_copy
    if damage == "truncated":
        raw = (edit_copy / "deltas.safetensors").read_bytes()
        (edit_copy / "deltas.safetensors").write_bytes(raw[: len(raw) // 2])
    elif damage == "no_edit_json":
        (edit_copy / "edit.json").unlink()
    run_cli("edit", "apply", path, "--model", saved_tiny, "--out", tmp_path / "m").assert_user_error(str(path))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, needle", [
    (["--hparams", "{bad json"], "--hparams is not valid JSON"),
    (["--hparams", "[1, 2]"], "JSON object"),
    (["--layers", "a,b"], "--layers takes comma-separated integers"),
    (["--layers", "4.5"], "--layers takes comma-separated integers"),
    (["--layers", ","], "--layers takes comma-separated integers"),
])
def test_cli_edit_bad_hparams_and_layers(args, needle, saved_tiny):
    r = run_cli("edit", "--model", saved_tiny, "--prompt", "{} is in", "--subject", "The tower", "--target", " Rome", *args)
    r.assert_user_error(needle)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_edit_save_onto_a_file_is_refused_before_editing(saved_tiny, tmp_path):
    target = tmp_path / "afile"
    target.write_text("precious")
    run_cli("edit", "--model", saved_tiny, "--prompt", "{} is in", "--subject", "The tower", "--target", " Rome",
            "--save", target).assert_user_error("existing file")
    assert target.read_text() == "precious"


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_cli_stats_import_of_a_missing_or_corrupt_file(damage, saved_tiny, tmp_path):
    f = tmp_path / "stats.safetensors"
    if damage == "garbage":
        f.write_bytes(b"this is not a safetensors file")
    run_cli("stats", "--model", saved_tiny, "--site", "layer.1.mlp.key", "--import", f).assert_user_error(str(f))
