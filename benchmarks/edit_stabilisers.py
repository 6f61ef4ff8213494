"""Speed and efficacy of ENCORE's most-probable early stopping (``early_stop="top1"``) against the default
loss rule: ROME on CounterFact facts, one fact at a time, both settings in the same process and
interleaved (default then top1 for each fact), so machine load hits both alike.

    OMP_NUM_THREADS=1 python benchmarks/edit_stabilisers.py --model smollm2-135m --facts 5 \\
        --out benchmarks/results/edit_stabilisers_smollm2.json

Per fact and setting: value-optimisation steps (``metadata["values"]``), seconds in the value
optimisation and in the whole edit (``metadata["timings"]``), the new target's mean token probability on
the edit prompt after the edit, and efficacy (every target token the teacher-forced argmax on the edit
prompt after the edit). Statistics and context templates are computed (or read from the cache) by a
warm-up edit first, so they count in neither setting.
"""

from __future__ import annotations

import argparse
import time

import torch

import factlab
from factlab.edit import Request, edit
from factlab.io import write_json
from factlab.prompts import continuation_ids

from edit import requests  # benchmarks/edit.py: the first n CounterFact rewrites with distinct subjects

SETTINGS = {"default": {}, "top1": {"early_stop": "top1"}}


@torch.no_grad()
def target_top1(lm, req: Request) -> tuple[bool, float]:
    """Teacher-forced on the edit prompt: (every target token is the argmax, mean target-token probability)."""
    ids = continuation_ids(lm.tokenizer, req.filled, req.target_new)
    prompt_ids = lm.tokenizer(req.filled)["input_ids"]
    batch = lm.encode([lm.tokenizer.decode(prompt_ids + ids[:-1])])
    p = lm.forward(batch)[0].float().softmax(-1)
    n = len(prompt_ids)
    rows = [p[batch.position(0, n - 1 + j)] for j in range(len(ids))]
    return all(int(r.argmax()) == t for r, t in zip(rows, ids)), sum(float(r[t]) for r, t in zip(rows, ids)) / len(ids)


def run_one(lm, req: Request, setting: str) -> dict:
    """One ROME edit of ``req`` under ``setting``, scored, then restored."""
    t = time.perf_counter()
    res = edit(lm, [req], method="rome", hparams=SETTINGS[setting], on_known="edit")
    wall = time.perf_counter() - t
    try:
        top1, prob = target_top1(lm, req)
    finally:
        res.restore()
    v = res.metadata["values"][0]
    tm = res.metadata["timings"]
    return {"setting": setting, "subject": req.subject, "target_new": req.target_new, "steps": v["steps"][0] if isinstance(v["steps"], list) else v["steps"],
            "values_s": tm.get("values", 0.0), "total_s": tm.get("total", wall), "wall_s": wall,
            "prob_after_edit": prob, "efficacy_top1": top1}


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"facts": n, "mean_steps": sum(r["steps"] for r in rows) / n, "values_s_per_fact": sum(r["values_s"] for r in rows) / n,
            "total_s_per_fact": sum(r["total_s"] for r in rows) / n, "efficacy": sum(r["efficacy_top1"] for r in rows) / n,
            "mean_prob_after_edit": sum(r["prob_after_edit"] for r in rows) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file for the per-fact rows and the summary")
    args = ap.parse_args()
    lm = factlab.load(args.model)
    reqs = requests(args.facts)
    edit(lm, [reqs[0]], method="rome", hparams={"v_steps": 1}, on_known="edit").restore()  # warm-up: stats, templates
    rows = []
    for req in reqs:
        for setting in SETTINGS:
            r = run_one(lm, req, setting)
            rows.append(r)
            print(f"{setting:8s} {req.subject[:30]:30s} steps {r['steps']:2d}  values {r['values_s']:6.2f}s  "
                  f"total {r['total_s']:6.2f}s  p(new) {r['prob_after_edit']:.3f}  top1 {r['efficacy_top1']}", flush=True)
    summ = {s: summary([r for r in rows if r["setting"] == s]) for s in SETTINGS}
    base, fast = summ["default"], summ["top1"]
    ratio = {"values_s": fast["values_s_per_fact"] / base["values_s_per_fact"], "total_s": fast["total_s_per_fact"] / base["total_s_per_fact"],
             "steps": fast["mean_steps"] / base["mean_steps"]}
    for s, m in summ.items():
        print(f"{s:8s} steps {m['mean_steps']:.1f}  values {m['values_s_per_fact']:.2f} s/fact  total {m['total_s_per_fact']:.2f} s/fact  "
              f"efficacy {m['efficacy']:.2f}  p(new) {m['mean_prob_after_edit']:.3f}")
    print(f"top1 / default: values time x{ratio['values_s']:.2f}, edit time x{ratio['total_s']:.2f}, steps x{ratio['steps']:.2f} "
          f"(torch threads {torch.get_num_threads()})")
    if args.out:
        write_json(args.out, {"model": args.model, "threads": torch.get_num_threads(), "rows": rows, "summary": summ, "ratio_top1_vs_default": ratio})


if __name__ == "__main__":
    main()
