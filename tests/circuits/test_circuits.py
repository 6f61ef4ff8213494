"""Circuits: masks, straight-through training, restricted editing, baselines, overlap/make-up, save/load."""

from __future__ import annotations

import csv

import pytest
import torch

from factlab.circuits import (
    ComponentMask,
    ComponentSpace,
    DiscoveryConfig,
    MaskError,
    TaskError,
    WeightMask,
    classify_parameters,
    find_circuit,
    from_classification,
    full_mask,
    hierarchy_fact_task,
    load_mask,
    masked_params,
    random_mask,
    sample_mask,
    save_mask,
    train_head,
)
from factlab.circuits.analysis import makeup, overlap, overlap_matrix
from factlab.circuits.edit import EditConfig, EditDivergedError, compare_edits, edit_fact
from factlab.circuits.masks import masked_weight
from factlab.data import ClassificationTask, load_classification_task
from factlab.data.counterfact import CounterFactRecord


def _toy_task(n: int = 16) -> ClassificationTask:
    texts = [f"The cat {w} here" for w in ("is", "are")] * (n // 2)
    return ClassificationTask("toy", texts, [1, 0] * (n // 2), ["bad", "good"])


def _record(case_id: int = 0) -> CounterFactRecord:
    return CounterFactRecord(case_id=case_id, subject="The cat", prompt="{} is a kind of", target_new="dog", target_true="animal",
                             paraphrase_prompts=["The cat is a type of"])


@pytest.fixture()
def llama(tiny_models):
    return tiny_models["llama"]


def test_classification_covers_block_parameters(tiny_lm):
    types = classify_parameters(tiny_lm)
    assert "embed" in types.values()
    assert "norm" in types.values()
    block = {n for n in types if n.startswith(tiny_lm.adapter.layers_path + ".")}
    assert block and all(types[n] in ("attn", "mlp", "mixer", "norm") for n in block), {n: types[n] for n in block}


@pytest.mark.parametrize("form", ["next-token", "head"])
def test_all_ones_mask_reproduces_logits_exactly(tiny_lm, form):
    task = from_classification(tiny_lm, _toy_task(8), form, label_words=(" a", " b")) if form == "next-token" else from_classification(tiny_lm, _toy_task(8), "head")
    if form == "head":
        train_head(tiny_lm, task, epochs=5)
    mask = full_mask(tiny_lm, ("attn", "mlp", "mixer", "norm", "final_norm", "embed"))
    with torch.no_grad():
        ref = task.logits(tiny_lm)
        got = task.logits(tiny_lm, masked_params(tiny_lm, mask.masks))
        full = tiny_lm.forward(tiny_lm.encode(task.prompts))[:, -1]
    assert torch.equal(ref, got)
    if form == "next-token":  # head-free logits are the model's own next-token logits
        assert torch.allclose(ref, full.gather(1, task.candidates), atol=1e-5)


def test_straight_through_passes_gradients():
    torch.manual_seed(0)
    logits = torch.randn(50, 7, requires_grad=True)
    w = torch.randn(50, 7)
    for est in ("gumbel", "hard-concrete", "sigmoid"):
        g = torch.Generator().manual_seed(3)
        m = sample_mask(logits, estimator=est, generator=g)
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
        (m * w).sum().backward()
        ref = logits.grad.clone()
        logits.grad = None
        assert ref.abs().sum() > 0, est
        # the fused, memory-lean version gives the same value and gradient
        fused = masked_weight(w, logits, estimator=est, seed=3)
        assert torch.equal(fused.detach(), (m * w).detach())
        fused.sum().backward()
        assert torch.allclose(logits.grad, ref, atol=1e-6), est
        logits.grad = None


def test_random_baseline_has_requested_density(llama):
    like = full_mask(llama)
    for d in (0.05, 0.3):
        r = random_mask(like, d, seed=1)
        assert r.n_kept == round(d * like.n_total)
        assert abs(r.density - d) <= 1 / like.n_total
    per = random_mask(r, 0.5, match="per_tensor", seed=2)
    assert {n: int(m.sum()) for n, m in per.masks.items()} == {n: int(m.sum()) for n, m in r.masks.items()}
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(MaskError):
            random_mask(like, bad)


def test_overlap_and_makeup_on_hand_made_masks():
    a = WeightMask({"x": torch.tensor([1, 1, 0, 0], dtype=torch.bool), "n": torch.tensor([1, 1], dtype=torch.bool)},
                   {"x": "mlp", "n": "norm"}, "m")
    b = WeightMask({"x": torch.tensor([1, 0, 1, 0], dtype=torch.bool), "n": torch.tensor([1, 0], dtype=torch.bool)},
                   {"x": "mlp", "n": "norm"}, "m")
    o = overlap(a, b)
    assert o["mlp"]["jaccard"] == pytest.approx(1 / 3) and o["mlp"]["overlap_coefficient"] == pytest.approx(1 / 2)
    assert o["norm"]["jaccard"] == pytest.approx(1 / 2) and o["norm"]["overlap_coefficient"] == pytest.approx(1.0)
    assert o["all"]["jaccard"] == pytest.approx(2 / 5) and o["all"]["overlap_coefficient"] == pytest.approx(2 / 3)
    mat = overlap_matrix({"a": a, "b": b})
    assert mat.jaccard["all"][0][1] == pytest.approx(2 / 5) and mat.jaccard["all"][0][0] == 1.0
    mu = makeup(a)
    assert mu.share_of_circuit == {"mlp": 0.5, "norm": 0.5}
    assert mu.share_kept == {"mlp": 0.5, "norm": 1.0}
    with pytest.raises(MaskError):
        overlap(a, WeightMask(a.masks, a.types, "other-model"))


def test_mask_save_load_round_trip(tmp_path, llama, tiny_models):
    m = random_mask(full_mask(llama), 0.13, seed=4)
    m.metadata["task"] = "toy"
    path = save_mask(m, tmp_path / "mask.safetensors")
    assert path.stat().st_size < m.n_total / 8 + 20_000  # bit-packed
    back = load_mask(path, llama)
    assert back.model_id == m.model_id and back.metadata["task"] == "toy" and back.types == m.types
    assert all(torch.equal(back.masks[n], m.masks[n]) for n in m.masks)
    with pytest.raises(MaskError, match="made for model"):
        load_mask(path, tiny_models["gpt2"])
    space = ComponentSpace(llama)
    cm = ComponentMask({k: torch.rand(v.shape) > 0.5 for k, v in space.init_logits(1.0, 0.0).items()}, llama.model_id, {"x": 1})
    back_c = load_mask(save_mask(cm, tmp_path / "c.safetensors"), llama)
    assert isinstance(back_c, ComponentMask) and all(torch.equal(back_c.masks[k], cm.masks[k]) for k in cm.masks)


def test_restricted_finetuning_leaves_outside_weights_bit_identical(llama):
    before = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    mask = random_mask(full_mask(llama), 0.2, seed=0)
    fe = edit_fact(llama, _record(), mask, EditConfig(mode="restricted", lr=0.5, steps=3, radius=0.05))
    assert fe.moved > 0
    for n, new in fe.new_weights.items():
        out = ~mask.masks[n]
        assert torch.equal(new[out], before[n][out]), n
        assert (new - before[n]).abs().max() <= 0.05 + 1e-6
    for n, p in llama.model.named_parameters():  # the model itself was never changed
        assert torch.equal(p, before[n])
    assert fe.after["nll_new"] < fe.before["nll_new"]
    sub = edit_fact(llama, _record(), mask, EditConfig(mode="subnetwork", lr=0.5, steps=3, radius=0.05))
    assert all(torch.equal(v[~mask.masks[n]], before[n][~mask.masks[n]]) for n, v in sub.new_weights.items())
    assert sub.before["nll_new"] != fe.before["nll_new"]  # the subnetwork is a different model


def test_edit_comparison_resumes_and_gives_cis(tmp_path, llama):
    mask = random_mask(full_mask(llama), 0.1, seed=0)
    masks = {"circuit": mask, "complement": mask.complement(), "random": random_mask(mask, 0.1, seed=9)}
    recs = [_record(0), _record(1)]
    log = tmp_path / "edits.jsonl"
    cfg = EditConfig(lr=0.1, steps=2, radius=0.01)
    comp = compare_edits(llama, recs, masks, config=cfg, log_path=log)
    s = comp.summary()
    assert set(s) == {"restricted", "subnetwork"} and s["restricted"]["circuit"]["n"] == 2
    assert {"mean", "low", "high"} <= set(s["subnetwork"]["random"]["nll_new"]["delta"])
    again = compare_edits(llama, recs, masks, config=cfg, log_path=log)  # all rows reused
    assert again.rows == comp.rows
    comp.plot(tmp_path / "edit.png")
    # a different circuit under the same name, or other settings: those rows are redone, not reused
    other = {"circuit": random_mask(full_mask(llama), 0.1, seed=5)}
    assert other["circuit"].fingerprint() != mask.fingerprint() and mask.fingerprint() == mask.complement().complement().fingerprint()
    redone = compare_edits(llama, recs, other, modes=("restricted",), config=cfg, log_path=log)
    assert [r["mask"] for r in redone.rows] == [other["circuit"].fingerprint()] * 2
    assert redone.rows[0]["moved"] != comp.rows[0]["moved"] or redone.rows[0]["after"] != comp.rows[0]["after"]
    slower = compare_edits(llama, recs, {"circuit": mask}, modes=("restricted",), config=EditConfig(lr=0.1, steps=1, radius=0.01), log_path=log)
    assert all(r["settings"]["steps"] == 1 and r["steps"] == 1 for r in slower.rows)


def test_diverging_edit_stops_with_model_untouched(llama):
    before = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    mask = full_mask(llama)
    with pytest.raises(EditDivergedError):
        edit_fact(llama, _record(), mask, EditConfig(lr=1e38, steps=5, radius=1e38))
    assert all(torch.equal(p, before[n]) for n, p in llama.model.named_parameters())


def test_find_circuit_reaches_density_and_reports(tmp_path, llama):
    train = from_classification(llama, _toy_task(16), "next-token", label_words=(" a", " b"))
    cfg = DiscoveryConfig(target_density=0.3, sweep=(0.6,), lr=0.5, batch_size=8, max_steps=200, lambda_every=5)
    res = find_circuit(llama, train, config=cfg, out_dir=tmp_path)
    assert res.reached_target and res.density <= 0.3 and res.mask.density == res.density
    assert [r["target"] for r in res.sweep] == [0.6, 0.3] and (tmp_path / "sweep" / "d0.6.safetensors").exists()
    assert 0 <= res.accuracies.circuit <= 1 and res.accuracies.n == 16
    assert res.train_accuracies == res.accuracies  # no test set: the training examples are the test examples
    test = train.subset(range(4))
    res2 = find_circuit(llama, train.subset(range(4, 16)), test, config=cfg)
    assert res2.accuracies.n == 4 and res2.train_accuracies.n == 12 and res2.to_dict()["train_accuracies"]["n"] == 12
    d = res.to_dict()
    assert d["makeup"] and d["history"]
    res.plot(tmp_path / "train.png")
    for p in llama.model.parameters():
        assert p.grad is None


def test_component_circuit(llama):
    train = from_classification(llama, _toy_task(8), "next-token", label_words=(" a", " b"))
    cfg = DiscoveryConfig(target_density=0.5, granularity="component", lr=0.5, batch_size=8, max_steps=200, lambda_every=5)
    res = find_circuit(llama, train, config=cfg)
    assert res.reached_target and res.component_mask is not None
    assert res.components and all(c.startswith(("layer.", "norm:")) for c in res.components)
    space = ComponentSpace(llama)
    assert space.n_components == sum(v.numel() for v in res.component_mask.masks.values())
    wm = res.component_mask.to_weight_mask(space)
    assert 0 < wm.density < 1


def test_hierarchy_task_and_bad_inputs(tmp_path, llama, data_dir):
    from factlab.data import load_hierarchy_edits

    recs = load_hierarchy_edits()[:20]
    task = hierarchy_fact_task(llama, recs, seed=0)
    assert len(task) + task.meta["dropped_same_first_token"] == 20 and set(task.labels.tolist()) <= {0, 1}
    one = tmp_path / "one.csv"
    with open(one, "w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], ["a", 1], ["b", 1]])
    with pytest.raises(Exception, match="two classes"):
        load_classification_task(one)
    with pytest.raises(TaskError):
        from_classification(llama, ClassificationTask("x", ["a", "b"], [1, 1], []), "head")
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,y\na,1\nb,0\n")
    with pytest.raises(Exception, match="label"):
        load_classification_task(nolabel)
    with pytest.raises(MaskError):
        DiscoveryConfig(target_density=1.2)


def test_counterfact_json_is_a_fact_task_with_relation_filter(tmp_path, llama):
    """A CounterFact-schema file (e.g. a synthetic world's) is a head-free fact task; --relation keeps one relation."""
    import json

    from factlab.circuits.tasks import make_task

    recs = []
    for i, (rel, subj, true, new) in enumerate([("P19", "Anna Smith", "Paris", "Rome"), ("P19", "Bob Jones", "Rome", "Paris"),
                                                ("P19", "Carl Berg", "Oslo", "Lima"), ("P19", "Dora Lind", "Lima", "Oslo"),
                                                ("P108", "Anna Smith", "Google", "Apple"), ("P108", "Bob Jones", "Apple", "Google")]):
        recs.append({"case_id": i, "requested_rewrite": {"prompt": "{} was born in" if rel == "P19" else "{} works for",
                     "relation_id": rel, "subject": subj, "target_new": {"str": new}, "target_true": {"str": true}},
                     "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [], "generation_prompts": []})
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    train, test = make_task(llama, str(path), seed=0, test_frac=0.25, relation="P19")
    assert train.name == "cf:P19" and len(train) + len(test) + train.meta["dropped_same_first_token"] == 4
    assert all("born in" in p for p in train.prompts + test.prompts)
    train, test = make_task(llama, str(path), seed=0, test_frac=0.25)
    assert train.name == "cf" and len(train) + len(test) + train.meta["dropped_same_first_token"] == 6
    with pytest.raises(TaskError, match="P19, P108|P108, P19"):
        make_task(llama, str(path), relation="P36")
    with pytest.raises(TaskError, match="head-free"):
        make_task(llama, str(path), form="head")


def test_fact_edit_is_an_edit_result_with_bit_exact_restore(llama):
    before = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    mask = random_mask(full_mask(llama), 0.3, seed=1)
    fe = edit_fact(llama, _record(), mask, EditConfig(lr=0.5, steps=2, radius=0.05))
    res = fe.edit_result(llama)
    try:
        params = dict(llama.model.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in fe.new_weights.items())
    finally:
        res.restore()
    assert all(torch.equal(p, before[n]) for n, p in llama.model.named_parameters())


def test_rome_crosscheck_restores(llama):
    from factlab.circuits.edit import layer_coverage, rome_crosscheck

    before = {n: p.detach().clone() for n, p in llama.model.named_parameters()}
    mask = random_mask(full_mask(llama), 0.3, seed=1)
    cov = layer_coverage(llama, mask)
    assert set(cov) == set(range(llama.adapter.n_layers))
    out = rome_crosscheck(llama, [_record()], mask, hparams={"stats_samples": 4, "stats_max_length": 32, "v_steps": 3})
    assert set(out["summary"]) == {"circuit_layers", "other_layers"}
    assert all(torch.equal(p, before[n]) for n, p in llama.model.named_parameters())


@pytest.mark.slow
def test_smollm2_all_ones_mask_and_classification(smollm2):
    from collections import Counter

    types = classify_parameters(smollm2)
    counts = Counter(types.values())
    assert counts["attn"] == 4 * smollm2.adapter.n_layers and counts["mlp"] == 3 * smollm2.adapter.n_layers
    assert counts["norm"] == 2 * smollm2.adapter.n_layers and counts["final_norm"] == 1
    task = hierarchy_fact_task(smollm2, [_record()])
    mask = full_mask(smollm2)
    with torch.no_grad():
        assert torch.equal(task.logits(smollm2), task.logits(smollm2, masked_params(smollm2, mask.masks)))


def test_topk_finish_hits_density_when_steps_run_out(llama):
    train = from_classification(llama, _toy_task(8), "next-token", label_words=(" a", " b"))
    cfg = DiscoveryConfig(target_density=0.05, sweep=(0.5, 0.2), lr=0.01, batch_size=4, max_steps=2)
    res = find_circuit(llama, train, config=cfg)
    assert res.finished_by == "topk" and not res.reached_target
    assert abs(res.density - 0.05) < 0.01
    assert [round(r["density"], 2) for r in res.sweep] == [0.5, 0.2, 0.05]
    assert all(bool((res.sweep_masks[0.05].masks[n] <= res.sweep_masks[0.2].masks[n]).all()) for n in res.mask.masks)  # nested


def test_topk_estimator_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    logits = torch.randn(40, 9, requires_grad=True)
    w = torch.randn(40, 9)
    thr = float(logits.detach().flatten().kthvalue(40 * 9 - 36 + 1).values)  # keep the top 10%
    fused = masked_weight(w, logits, estimator="topk", threshold=thr)
    # plain reference: hard top-k mask, d(W * M)/d logit taken as W (straight through, slope 1)
    hard = (logits.detach() >= thr).float()
    assert int(hard.sum()) == 36 and torch.equal(fused.detach(), w * hard)
    up = torch.randn(40, 9)
    (fused * up).sum().backward()
    assert torch.allclose(logits.grad, up * w)
    logits.grad = None
    from factlab.circuits.masks import threshold_mask

    m = threshold_mask(logits, thr)
    assert torch.equal(m.detach(), hard)
    (m * up).sum().backward()
    assert torch.equal(logits.grad, up)
    with pytest.raises(MaskError, match="threshold"):
        masked_weight(w, logits, estimator="topk")


def test_anneal_threshold_keeps_the_requested_fraction():
    from factlab.circuits import discover

    gen = torch.Generator().manual_seed(0)
    small = {"a": torch.randn(100, 10, generator=gen), "b": torch.randn(300, generator=gen)}
    for d in (0.5, 0.05, 0.01):
        thr = discover._threshold(small, d)
        assert sum(int((v >= thr).sum()) for v in small.values()) == round(d * 1300)  # exact below the sample size
    assert discover._threshold(small, 1.0) == float("-inf")
    big = {"w": torch.randn(3_000_000, generator=gen), "v": torch.rand(1_500_000, generator=gen)}  # strided estimate
    thr = discover._threshold(big, 0.05)
    kept = sum(int((v >= thr).sum()) for v in big.values()) / 4_500_000
    assert abs(kept - 0.05) < 0.002


def test_anneal_schedule_is_monotone_and_holds_the_target():
    cfg = DiscoveryConfig(target_density=0.05, schedule="anneal", max_steps=100, anneal_frac=0.5)
    ds = [cfg.density_at(s) for s in range(0, 101)]
    assert ds[0] == 1.0 and all(a >= b for a, b in zip(ds, ds[1:]))
    assert ds[50] == pytest.approx(0.05) and ds[100] == pytest.approx(0.05) and ds[25] > 0.15
    for bad in ({"schedule": "cosine"}, {"init": "zeros"}, {"anneal_frac": 0.0}):
        with pytest.raises(MaskError):
            DiscoveryConfig(**bad)


def test_saliency_init_is_log_abs_weight_times_gradient(llama):
    """The fast path (gradient through an all-ones mask) against a plain reference (gradient of the weights)."""
    from factlab.circuits import discover
    from factlab.circuits.masks import select_parameters

    task = from_classification(llama, _toy_task(8), "next-token", label_words=(" a", " b"))
    cfg = DiscoveryConfig(schedule="anneal", init="saliency", batch_size=8, saliency_batches=1)
    params = dict(llama.model.named_parameters())
    chosen = select_parameters(llama)
    with torch.no_grad():
        targets = task.logits(llama).argmax(-1)
    like = {n: torch.zeros(params[n].shape) for n in chosen}
    got = discover._saliency_logits(llama, task, targets, None, like, cfg, torch.Generator().manual_seed(0))
    leaves = {n: params[n].detach().clone().requires_grad_(True) for n in chosen}
    out = task.logits(llama, leaves, list(range(8)), batch_size=8)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out.float(), targets), list(leaves.values()))
    for (n, w), g in zip(leaves.items(), grads):
        ref = (w.detach() * g).abs()
        assert torch.allclose(got[n].exp(), ref, rtol=1e-3, atol=float(ref.max()) * 1e-5), n


def test_anneal_circuit_hits_exact_densities_and_learns(tmp_path, llama):
    train = from_classification(llama, _toy_task(16), "next-token", label_words=(" a", " b"))
    cfg = DiscoveryConfig(target_density=0.2, sweep=(0.6, 0.4), schedule="anneal", init="saliency", lr=0.05,
                          batch_size=8, max_steps=40, anneal_frac=0.5)
    res = find_circuit(llama, train, config=cfg, out_dir=tmp_path)
    assert res.finished_by == "anneal" and res.reached_target and res.steps == 40
    n = res.mask.n_total
    assert abs(res.mask.n_kept - round(0.2 * n)) <= 2  # exact top-k (ties aside)
    assert [r["target"] for r in res.sweep] == [0.6, 0.4, 0.2]
    assert all(abs(r["density"] - r["target"]) < 0.005 for r in res.sweep)
    assert (tmp_path / "sweep" / "d0.4.safetensors").exists() and (tmp_path / "sweep" / "d0.2.safetensors").exists()
    hist = res.history
    assert hist[-1]["density"] == pytest.approx(0.2) and hist[0]["density"] > 0.85 and all(h["lambda"] == 0 for h in hist)
    assert res.train_accuracies.agreement >= 0.75  # a toy task the circuit can reproduce
    for p in llama.model.parameters():
        assert p.grad is None


def test_anneal_component_circuit(llama):
    train = from_classification(llama, _toy_task(8), "next-token", label_words=(" a", " b"))
    cfg = DiscoveryConfig(target_density=0.3, granularity="component", schedule="anneal", init="saliency", lr=0.05,
                          batch_size=8, max_steps=10)
    res = find_circuit(llama, train, config=cfg)
    space = ComponentSpace(llama)
    kept = sum(int(v.sum()) for v in res.component_mask.masks.values())
    assert res.finished_by == "anneal" and abs(kept - round(0.3 * space.n_components)) <= 1
    assert len(res.components) == kept


@pytest.mark.slow
def test_smollm2_anneal_finds_a_faithful_5_percent_circuit(smollm2, data_dir):
    """Only a trained model has a task circuit: 5% of SmolLM2's block weights alone reproduce its answers on the
    hierarchy facts they were learned on, and the other 95% do not (measured: agreement 1.00, complement 0.56)."""
    from factlab.circuits.tasks import make_task

    train, test = make_task(smollm2, "hierarchy", seed=0, train_size=48, test_size=16)
    cfg = DiscoveryConfig(target_density=0.05, schedule="anneal", init="saliency", lr=0.05, batch_size=16, max_steps=60, anneal_frac=0.5)
    res = find_circuit(smollm2, train, test, cfg)
    assert res.finished_by == "anneal" and abs(res.density - 0.05) < 1e-4
    tr = res.train_accuracies
    assert tr.full > 0.8  # the model knows these facts
    assert tr.agreement >= 0.9  # the circuit alone gives the full model's answers
    assert tr.complement <= 0.7  # the complement is near chance (0.5)
    for p in smollm2.model.parameters():
        assert p.grad is None
