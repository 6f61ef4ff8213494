"""Where a synthetic-world model keeps its facts: train on a world variant, then trace and ROME-edit.

Trains the tiny models (or the archs given) on ``build_world(0, <tiny with --world overrides>)``, then
runs ROME's dataset-averaged causal trace (AIE per token class and layer; 3 noise samples, window 3)
on known person facts spread over relations (``--n`` of them, the same number per relation), and
optionally ROME edits at every layer (GPT-2) or layers 0-1 (Mamba). One thread. Examples (docs/synth.md):

    OMP_NUM_THREADS=1 python benchmarks/synth_sites.py /tmp/sites --edits 12           # the tiny world as it is
    OMP_NUM_THREADS=1 python benchmarks/synth_sites.py /tmp/sites_old --rels born_in,works_for,speaks,plays \\
        --world '{"documents": "sentences", "pair_only": false, "people": 40, "given_names": 16, "family_names": 24,
                  "relations": ["born_in", "works_for", "speaks", "plays", "located_in", "headquarters"]}'

``--world`` / ``--model`` / ``--train`` are JSON overrides of ``SIZES["tiny"]``, ``SPECS["tiny"][0]`` and
``SPECS["tiny"][1]``. ``--skip-train`` re-traces an existing output folder. Writes ``sites.json`` there.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--world", default="{}", help="JSON overrides of SIZES['tiny']")
    ap.add_argument("--model", default="{}", help="JSON overrides of SPECS['tiny'][0]")
    ap.add_argument("--train", default="{}", help="JSON overrides of SPECS['tiny'][1]")
    ap.add_argument("--archs", default="gpt2")
    ap.add_argument("--rels", default="born_in,works_for,speaks,plays,lives_in,citizen_of")
    ap.add_argument("--n", type=int, default=24, help="facts to trace, spread evenly over --rels")
    ap.add_argument("--edits", type=int, default=0, help="ROME edits per layer (0: none)")
    ap.add_argument("--skip-train", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)

    import factlab
    from factlab.data import load_counterfact, load_known
    from factlab.edit import Request, edit
    from factlab.locate import trace_dataset
    from factlab.locate.corrupt import embedding_std
    from factlab.synth import SIZES, build_world, load_build
    from factlab.synth.compare import _first_token_margin
    from factlab.synth.train import SPECS, train_models

    ws = replace(SIZES["tiny"], **json.loads(a.world))
    ms = replace(SPECS["tiny"][0], **json.loads(a.model))
    ts = replace(SPECS["tiny"][1], **json.loads(a.train))
    world = build_world(0, ws)
    out = Path(a.out)
    archs = tuple(a.archs.split(","))
    result: dict = {"world": json.loads(a.world), "model": json.loads(a.model), "train": json.loads(a.train), "archs": {}}
    if not a.skip_train:
        world.export(out)
        rep = train_models(world, out, "tiny", archs, 0, num_threads=1, progress=False, model_spec=ms, train_spec=ts)
        for k, r in rep.archs.items():
            print(f"{k}: steps {r.steps}, facts known {r.accuracy.train_fact:.3f}, train prompts {r.accuracy.train_prompt:.3f}, "
                  f"train CPU {r.train_cpu_seconds:.1f} s, params {r.params}")
        print(f"total CPU {rep.total_cpu_seconds:.1f} s")
    _, rep = load_build(out)
    rels = a.rels.split(",")
    shared = set(rep.known_by_all())
    known = [r for r in load_known(out / "datasets" / "known.json") if r.known_id in shared]
    facts = []
    for k in rels:
        facts += [r for r in known if r.relation_id == world.relation(k).relation_id][: a.n // len(rels)]
    for arch in archs:
        res: dict = {"train": {"steps": rep.archs[arch].steps, "train_fact": rep.archs[arch].accuracy.train_fact,
                               "train_cpu_seconds": rep.archs[arch].train_cpu_seconds}, "aie": {}, "rome": {}}
        lm = factlab.load(rep.model_dir(arch), device="cpu")
        kinds = ["residual", "mlp", "attn"] if lm.adapter.has_attention else ["residual", "mixer", "ssm.in"]
        torch.manual_seed(0)
        noise = 3 * embedding_std(lm, sorted({f.subject for f in facts}), cache=False)
        dt = trace_dataset(lm, facts, kinds=kinds, samples=3, noise=noise, window=3, seed=0)
        print(f"== {arch}: traced {dt.n_kept} facts, low {dt.mean_low:.3f}, high {dt.mean_high:.3f}")
        for kind in kinds:
            aie = np.asarray(dt.kinds[kind]["aie"], dtype=float)
            res["aie"][kind] = {c: [round(float(x), 4) for x in row] for c, row in zip(dt.classes, aie)}
            print(f"  {kind}:")
            for c, row in zip(dt.classes, aie):
                print(f"    {c:24s}", " ".join(f"{x:6.3f}" for x in row))
        if a.edits:
            recs = [r for r in load_counterfact(out / "datasets" / "counterfact.json") if r.case_id in shared]
            pick = []
            for k in rels:
                pick += [r for r in recs if r.requested_rewrite()["relation_id"] == world.relation(k).relation_id][: max(1, a.edits // len(rels))]
            hp = {"stats_corpus": str(out / "datasets" / "corpus.txt"), "stats_samples": 400, "stats_max_length": 64}
            for layer in range(lm.adapter.n_layers if lm.adapter.has_attention else 2):
                eff, para, neigh = [], [], []
                for rec in pick:
                    req = Request.from_dict(rec.requested_rewrite())
                    new, true = req.target_new, req.target_true or (" " + rec.target_true)
                    e = edit(lm, req, method="rome", hparams={**hp, "layers": [layer]}, on_known="edit")
                    try:
                        eff.append(np.mean(_first_token_margin(lm, [rec.prompt.format(rec.subject)], new, true)))
                        para.append(np.mean(_first_token_margin(lm, rec.paraphrase_prompts, new, true)))
                        if rec.neighborhood_prompts:
                            neigh.append(1 - np.mean(_first_token_margin(lm, rec.neighborhood_prompts, new, true)))
                    finally:
                        e.restore()
                res["rome"][layer] = {"n": len(eff), "efficacy": float(np.mean(eff)), "paraphrase": float(np.mean(para)),
                                      "neighborhood": float(np.mean(neigh)) if neigh else None}
                print(f"  ROME layer {layer}: efficacy {np.mean(eff):.2f}, paraphrase {np.mean(para):.2f}, "
                      f"neighborhood {np.mean(neigh) if neigh else float('nan'):.2f} (n={len(eff)})")
        result["archs"][arch] = res
    (out / "sites.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
