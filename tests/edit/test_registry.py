"""The solver/policy registry: ROME/MEMIT/EMMET bit-identical to the old string dispatch, solvers and policies
registered from outside, ``history`` and ``solves[i]["site"]``, AlphaEdit and MEMIT-with-history through ``edit``."""

from __future__ import annotations

import pytest
import torch

from factlab.edit import EditError, Request, edit, resolve_hparams
from factlab.edit.api import _to_param
from factlab.edit.context import context_templates
from factlab.edit.policy import projection_output, single_layer, spread
from factlab.edit.registry import (
    Policy,
    PolicyRun,
    Solver,
    get_method,
    get_policy,
    get_solver,
    projector_path,
    register_policy,
    register_solver,
    solver_names,
    unregister_policy,
    unregister_solver,
)
from factlab.edit.result import edited_value
from factlab.edit.solvers import dense, emmet_factors, memit_factors, rome_factors
from factlab.edit.stats import second_moment

from .edit_helpers import TINY_HP, same_weights, snapshot

REQS = [
    Request("{} is located in the city of", "The big tower", " Rome"),
    Request("{} plays the instrument", "Miles Davis", " violin"),
]


def _old_dispatch_deltas(lm, reqs, method: str, hp) -> dict[str, torch.Tensor]:
    """The pre-registry ``edit()`` dispatch, kept plain: the objective's if/else on the method and the choice of
    ``single_layer`` vs ``spread``, calling the solver functions directly. Restores the weights; returns deltas."""
    projs = {layer: lm.adapter.projection(layer, hp.projection) for layer in hp.layers}
    names = {layer: f"{p.module}.weight" for layer, p in projs.items()}
    C = {layer: second_moment(lm, p.key_site, samples=hp.stats_samples, max_length=hp.stats_max_length) for layer, p in projs.items()}
    templates = context_templates(lm, hp.context)
    key_templates = templates if hp.key_mode == "prefix_avg" else ["{}"]
    params = dict(lm.model.named_parameters(remove_duplicate=False))
    originals = {n: params[n].data.clone() for n in names.values()}
    deltas = {n: torch.zeros(originals[n].shape, dtype=torch.float64) for n in names.values()}

    def objective(layer, K, R):
        if method == "rome":
            return rome_factors(C[layer].factor(1.0, hp.ridge), K[0], R[0])
        L = C[layer].factor(hp.mom2_update_weight, hp.ridge)
        if method == "emmet":
            return emmet_factors(L, K.T, R.T, hp.emmet_lambda)
        return memit_factors(L, K.T, R.T)

    @torch.no_grad()
    def update(layer, A, B):
        name = names[layer]
        a, b = _to_param(projs[layer], lm.model, A, B)
        deltas[name] += dense(a, b)
        params[name].data.copy_(edited_value(originals[name], deltas[name].float()))

    kw = dict(hp=hp, templates=templates, key_templates=key_templates, objective=objective, update=update, timings={})
    keep_all = lambda vals: list(range(len(vals.known)))  # noqa: E731
    try:
        if method == "rome":
            for r in reqs:
                single_layer(lm, [r], projs[hp.layers[0]], check_values=keep_all, **kw)
        elif len(hp.layers) == 1 and method == "emmet":
            single_layer(lm, reqs, projs[hp.layers[0]], check_values=keep_all, **kw)
        else:
            spread(lm, reqs, projs, check_values=keep_all, **kw)
    finally:
        with torch.no_grad():
            for n, orig in originals.items():
                params[n].data.copy_(orig)
    return {n: d.float() for n, d in deltas.items()}


@pytest.mark.parametrize("method,layers", [("rome", (1,)), ("memit", (0, 1)), ("emmet", (1,)), ("emmet", (0, 1))])
def test_registry_deltas_bit_identical_to_old_dispatch(method, layers, tiny_models, tiny_env):
    lm = tiny_models["llama"]
    snap = snapshot(lm)
    hp = resolve_hparams(lm, method, {**TINY_HP, "layers": layers, "mom2_update_weight": 20.0})
    old = _old_dispatch_deltas(lm, REQS, method, hp)
    assert same_weights(lm, snap)
    res = edit(lm, REQS, method=method, hparams=hp, on_known="edit")
    res.restore()
    assert set(res.deltas) == set(old)
    for name in old:
        assert old[name].abs().max() > 0
        assert torch.equal(res.deltas[name], old[name]), name
    assert res.metadata["policy"] == ("single" if method == "rome" or len(layers) == 1 else "spread")


def _double_lambda_memit(s):
    """A solver defined outside the package: MEMIT with twice the hyperparameters' lambda."""
    return memit_factors(s.stats.factor(2 * s.hp.mom2_update_weight, s.hp.ridge), s.K, s.R)


def test_solver_registered_from_outside_edits(tiny_models, tiny_env):
    lm = tiny_models["gpt2"]
    register_solver("test_double_lambda", Solver(_double_lambda_memit, doc="test"))
    try:
        with pytest.raises(EditError, match="already registered"):
            register_solver("test_double_lambda", Solver(_double_lambda_memit))
        register_solver("test_double_lambda", Solver(_double_lambda_memit), replace=True)
        assert "test_double_lambda" in solver_names()
        with pytest.raises(EditError, match="test_double_lambda"):  # the listing names it
            resolve_hparams(lm, "no_such_method")
        hp = resolve_hparams(lm, "memit", {**TINY_HP, "layers": (1,), "mom2_update_weight": 10.0})
        mine = edit(lm, REQS, method="test_double_lambda", hparams=hp, on_known="edit")
        mine.restore()
        ref = edit(lm, REQS, method="memit", hparams=hp.replace(mom2_update_weight=20.0), on_known="edit")
        ref.restore()
        assert mine.method == "test_double_lambda" and mine.metadata["solver"]["name"] == "test_double_lambda"
        for name in ref.deltas:
            assert torch.equal(mine.deltas[name], ref.deltas[name])
        # its defaults start from MEMIT's
        assert resolve_hparams(lm, "test_double_lambda").layers == resolve_hparams(lm, "memit").layers
    finally:
        unregister_solver("test_double_lambda")
    with pytest.raises(EditError, match="unknown method"):
        get_solver("test_double_lambda")
    with pytest.raises(EditError, match="built-in"):
        register_solver("memit", Solver(_double_lambda_memit), replace=True)


def _last_layer_only(run: PolicyRun) -> None:
    """A policy defined outside the package: one solve at the highest edit layer."""
    proj = run.projs[max(run.projs)]
    single_layer(run.lm, run.requests, proj, hp=run.hp, templates=run.templates, key_templates=run.key_templates,
                 objective=run.objective, update=run.update, check_values=run.check_values(0), timings=run.timings)


def test_policy_registered_from_outside(tiny_models, tiny_env):
    lm = tiny_models["gpt2"]
    snap = snapshot(lm)
    register_policy("test_last_layer", Policy(_last_layer_only, label=lambda hp: "single"))
    try:
        with pytest.raises(EditError, match="already registered"):
            register_policy("test_last_layer", Policy(_last_layer_only))
        res = edit(lm, REQS, method="memit", policy="test_last_layer", hparams={**TINY_HP, "layers": (0, 1)}, on_known="edit")
        res.restore()
        assert [s["layer"] for s in res.solves] == [1] and res.metadata["solver"]["policy"] == "test_last_layer"
        assert get_method("memit", "test_last_layer")[1] is get_policy("test_last_layer")
    finally:
        unregister_policy("test_last_layer")
    assert same_weights(lm, snap)
    with pytest.raises(EditError, match="unknown policy"):
        edit(lm, REQS, method="memit", policy="test_last_layer", hparams=TINY_HP, on_known="edit")
    with pytest.raises(EditError, match="edits one layer"):
        edit(lm, REQS, method="memit", policy="single_layer", hparams={**TINY_HP, "layers": (0, 1)}, on_known="edit")


def _history_from(res) -> dict[str, torch.Tensor]:
    """What a stream accumulates: sum K K^T per key site from ``solves``."""
    H: dict[str, torch.Tensor] = {}
    for s in res.solves:
        H[s["site"]] = H.get(s["site"], 0) + s["keys"].T @ s["keys"]
    return H


def test_memit_history_in_edit_matches_rls_formula_and_history_ignored_elsewhere(tiny_models, tiny_env):
    lm = tiny_models["gpt2"]
    snap = snapshot(lm)
    hp = resolve_hparams(lm, "memit_history", {**TINY_HP, "layers": (1,), "mom2_update_weight": 10.0})
    first = edit(lm, REQS[:1], method="memit_history", hparams=hp, on_known="edit")
    first.restore()
    assert first.solves[0]["site"] == "layer.1.mlp.key"
    plain = edit(lm, REQS[:1], method="memit", hparams=hp, on_known="edit")
    plain.restore()
    for n in plain.deltas:  # no history: MEMIT (a different factorisation, so close, not equal)
        torch.testing.assert_close(first.deltas[n], plain.deltas[n], rtol=1e-4, atol=1e-7)
    H = _history_from(first)
    assert H["layer.1.mlp.key"].dtype == torch.float64
    res = edit(lm, REQS[1:], method="memit_history", hparams=hp, on_known="edit", history={**H, "layer.9.mlp.key": torch.eye(3)})
    res.restore()
    assert same_weights(lm, snap)
    s = res.solves[0]
    C = second_moment(lm, s["site"], samples=hp.stats_samples, max_length=hp.stats_max_length).matrix(ridge=hp.ridge)
    K, R = s["keys"], s["residuals"]  # (n, d_in), (n, d_out)
    ref = R.T @ K @ torch.linalg.inv(hp.mom2_update_weight * C + H[s["site"]] + K.T @ K)
    proj = lm.adapter.projection(1)
    d = res.deltas[f"{proj.module}.weight"].double()
    torch.testing.assert_close(d.T if proj.transposed else d, ref.float().double(), rtol=1e-4, atol=1e-7)
    # the history changed the update; ROME ignores it (bit-identical with and without)
    assert not torch.allclose(res.deltas[f"{proj.module}.weight"], edit_and_restore(lm, REQS[1:], "memit_history", hp).deltas[f"{proj.module}.weight"])
    rh = resolve_hparams(lm, "rome", {**TINY_HP, "layers": (1,)})
    a = edit_and_restore(lm, REQS[1:], "rome", rh, history=H)
    b = edit_and_restore(lm, REQS[1:], "rome", rh)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    with pytest.raises(EditError, match="history"):
        edit(lm, REQS[1:], method="memit_history", hparams=hp, on_known="edit", history={"layer.1.mlp.key": torch.eye(3)})
    assert same_weights(lm, snap)


def edit_and_restore(lm, reqs, method, hp, **kw):
    res = edit(lm, reqs, method=method, hparams=hp, on_known="edit", **kw)
    res.restore()
    return res


def test_alphaedit_keeps_preserved_space_and_moves_targets(tiny_models, tiny_env, monkeypatch):
    lm = tiny_models["llama"]
    snap = snapshot(lm)
    layer = 1
    proj = lm.adapter.projection(layer)
    hp = resolve_hparams(lm, "alphaedit", {**TINY_HP, "layers": (layer,)})
    stats = second_moment(lm, proj.key_site, samples=hp.stats_samples, max_length=hp.stats_max_length)
    evals, U = torch.linalg.eigh(stats.mom2.double())
    thr = float(evals[len(evals) // 2])  # keep the lower half as the null space
    # a tiny model's keys are small against the reference l2 = 10, which would write almost nothing
    hp = hp.replace(nullspace_threshold=thr, alphaedit_l2=1e-4)
    res = edit(lm, REQS, method="alphaedit", hparams=hp, on_known="edit")
    try:
        info = res.metadata["solver"]["solves"][0]
        kept = int((evals < thr).sum())
        assert info["kept_dim"] == kept == len(evals) // 2 and info["nullspace_threshold"] == thr and info["dim"] == len(evals)
        assert projector_path(stats, thr).exists()
        d = res.deltas[f"{proj.module}.weight"].double()
        D = d.T if proj.transposed else d  # (d_out, d_in)
        X = U[:, evals >= thr]  # the preserved space: C's large-eigenvalue directions
        assert (D @ X).abs().max() < 1e-5 * D.abs().max()
        s = res.solves[0]
        moved = D @ s["keys"].T  # the target keys' outputs change
        assert moved.norm() > 0.5 * s["residuals"].norm()
        # the edited projection's outputs on preserved keys equal the unedited ones
        x = X @ torch.randn(X.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        after = projection_output(lm, proj, x.T.float())
    finally:
        res.restore()
    before = projection_output(lm, proj, x.T.float())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    # the projector is read from the cache, not recomputed
    import factlab.edit.registry as registry

    monkeypatch.setattr(registry, "null_space_projector", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = edit(lm, REQS, method="alphaedit", hparams=hp, on_known="edit", history=_history_from(res))
    again.restore()
    assert again.metadata["solver"]["solves"][0]["history"] is True
    monkeypatch.undo()
    assert same_weights(lm, snap)
    with pytest.raises(EditError, match="nullspace_threshold"):
        edit(lm, REQS, method="alphaedit", hparams=hp.replace(nullspace_threshold=float(evals[0]) * 0.5), on_known="edit")
    assert same_weights(lm, snap)
