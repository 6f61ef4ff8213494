"""Causal-trace speed: factlab's exact trace vs the plain reference (one full forward per restoration).

    python benchmarks/trace.py [--facts 10] [--model smollm2-135m] [--kinds residual,mlp,attn] [--samples 10]

Prints, per fact and in total, the wall time and the process CPU time (meaningful on a shared, oversubscribed
machine) of both implementations in this run, their ratios, and the
largest absolute difference between their scores (must be <= 1e-5). Also reports the Pearson
correlation of attribution patching with the exact trace over the same facts (and its time).
Set OMP_NUM_THREADS to pin the thread count on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FACTLAB_NO_PROGRESS", "1")
os.environ.setdefault("FACTLAB_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import factlab  # noqa: E402
from factlab.data import load_known  # noqa: E402
from factlab.locate import prepare, trace, trace_kinds  # noqa: E402
from factlab.locate.trace import restorations  # noqa: E402
from tests.locate.reference import reference_trace  # noqa: E402


def work_ratio(setup, kinds: list[str], window: int) -> float:
    """Token-layers the plain reference computes / token-layers the exact engine computes (KV cache:
    positions >= t from block ``start`` on; nothing for restorations before the first corrupted token).
    The bound on the speed-up that skipping unchangeable work can give for these prompts."""
    L, W = setup.lm.adapter.n_layers, setup.width
    fast = ref = 0
    for kind in kinds:
        for r in restorations(setup, kind, window):
            ref += W * L
            if r.t >= setup.first_diff:
                fast += (W - r.t) * (L - r.start)
    return ref / max(fast, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kinds", default="residual,mlp,attn")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--no-reference", action="store_true", help="time only the fast paths")
    ap.add_argument("--bound-only", action="store_true", help="only print each fact's work bound (no timing)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    lm = factlab.load(args.model)
    facts = load_known(limit=args.facts)
    print(f"model {lm.name}  threads {torch.get_num_threads()}  facts {len(facts)}  kinds {kinds}  samples {args.samples}")
    t_fast = t_ref = t_attr = 0.0
    works = []
    c_fast = c_ref = 0.0
    worst = 0.0
    exact_all, attr_all = [], []
    for f in facts:
        setup = prepare(lm, f.prompt, f.subject, samples=args.samples)
        works.append(work_ratio(setup, kinds, 10))
        if args.bound_only:
            print(f"  {f.known_id:4d} {len(setup.tokens):2d} tok  first corrupted position {setup.first_diff}  work bound {works[-1]:.2f}x  {f.prompt!r}")
            continue
        tf = tr = ta = cf = cr = 0.0
        t0, p0 = time.perf_counter(), time.process_time()
        fast = trace_kinds(lm, f.prompt, f.subject, kinds, setup=setup)  # all kinds in one engine run
        tf, cf = time.perf_counter() - t0, time.process_time() - p0
        for kind in kinds:
            res = fast[kind]
            t0 = time.perf_counter()
            att = trace(lm, f.prompt, f.subject, kind=kind, setup=setup, method="attribution")
            ta += time.perf_counter() - t0
            exact_all.append(res.scores.ravel() - res.low)
            attr_all.append(att.scores.ravel() - att.low)
            if not args.no_reference:
                t0, p0 = time.perf_counter(), time.process_time()
                ref, _, _ = reference_trace(setup, kind, 10)
                tr += time.perf_counter() - t0
                cr += time.process_time() - p0
                worst = max(worst, float(np.abs(ref - res.scores).max()))
        t_fast, t_ref, t_attr = t_fast + tf, t_ref + tr, t_attr + ta
        c_fast, c_ref = c_fast + cf, c_ref + cr
        ratio = f"{tr / tf:5.1f}x wall, {cr / cf:5.1f}x cpu" if tr else "  -  "
        print(f"  {f.known_id:4d} {len(setup.tokens):2d} tok  fast {tf:7.2f} s ({cf:6.1f} cpu-s)  reference {tr:7.2f} s ({cr:6.1f} cpu-s)  "
              f"{ratio}  attribution {ta:6.2f} s  {f.prompt!r}")
    if args.bound_only:
        print(f"work bound over {len(works)} facts: mean {np.mean(works):.2f}x (range {min(works):.2f}-{max(works):.2f}x)")
        return
    r = float(np.corrcoef(np.concatenate(exact_all), np.concatenate(attr_all))[0, 1])
    print(f"total: fast {t_fast:.1f} s ({c_fast:.1f} cpu-s), reference {t_ref:.1f} s ({c_ref:.1f} cpu-s), "
          f"speed-up {t_ref / t_fast if t_ref else float('nan'):.2f}x wall, {c_ref / c_fast if c_ref else float('nan'):.2f}x cpu, "
          f"max |fast - reference| = {worst:.2e}")
    print(f"work bound: the reference computes {np.mean(works):.2f}x the token-layers of the exact engine on these prompts "
          f"(per fact {min(works):.2f}-{max(works):.2f}x); the measured speed-up cannot exceed this by skipping work alone")
    print(f"attribution patching: {t_attr:.1f} s ({t_fast / t_attr:.1f}x faster than exact), Pearson r vs exact IE = {r:.3f}")


if __name__ == "__main__":
    main()
