"""Circuits and knowledge editing on SmolLM2-135M (issue #10): three tasks, edits inside vs outside, sweep, overlap, make-up.

For each task (the hierarchy facts in the head-free fact form, BLiMP determiner-noun agreement and a persona
set with the paper's classification head) learn a 5% weight-mask circuit with a density sweep on the way down;
then edit hierarchy facts inside the hierarchy circuit, its complement and a same-density random mask in both
modes (restricted and subnetwork), edit inside every sweep snapshot (restricted: edit resistance per
density), and compare the circuits (overlap matrix, make-up). Every step is one ``factlab circuit ...``
command, printed before it runs; finished steps are reused (resumable).

    python benchmarks/circuits_smollm2.py --out runs/circ --md benchmarks/results/circuits_smollm2.md

CPU cost (2 cores): about 10 minutes per circuit at 300 mask steps, 15-25 s per edit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuit_report import EDIT_HEADER, ci, edit_rows, makeup_lines, overlap_lines, run, write_report

#: task -> extra `circuit find` arguments (the head form is the paper's; hierarchy is the head-free fact form)
TASKS = {
    "hierarchy": [],
    "blimp_dna1": ["--form", "head", "--train-size", "800", "--test-size", "200"],
    "persona_e": ["--form", "head", "--train-size", "800", "--test-size", "200"],
}
FIND = ["--schedule", "anneal", "--init", "saliency", "--lr", "0.05", "--batch-size", "16", "--steps", "300"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/circ")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--sweep", default="0.5,0.35,0.25,0.15")
    ap.add_argument("--edit-limit", type=int, default=24, help="hierarchy facts edited per (mode, where) in the hierarchy circuit")
    ap.add_argument("--sweep-edit-limit", type=int, default=12, help="facts edited per sweep density (restricted; 0 = skip)")
    ap.add_argument("--md", default=None, help="write the Markdown report here (and the JSON next to it)")
    a = ap.parse_args()
    out = Path(a.out)
    tasks = [t for t in a.tasks.split(",") if t]
    finds = {t: run(["factlab", "circuit", "find", t, "--model", a.model, "--density", str(a.density), "--sweep", a.sweep,
                     *FIND, *TASKS.get(t, []), "--out", str(out / t)]) for t in tasks}
    edits, sweep_edits = {}, {}
    if "hierarchy" in tasks:
        hier = str(out / "hierarchy")
        edits = run(["factlab", "circuit", "edit", hier, "--data", "hierarchy", "--limit", str(a.edit_limit), "--task-every", "4"])["final"]
        if a.sweep_edit_limit:
            sweep_edits = run(["factlab", "circuit", "edit", hier, "--data", "hierarchy", "--limit", str(a.sweep_edit_limit),
                               "--sweep", "--no-final", "--mode", "restricted", "--where", "circuit", "--where", "random"])
    comp = run(["factlab", "circuit", "compare", *[str(out / t) for t in tasks], "--out", str(out / "compare")])

    lines = [f"# Circuits in {a.model}", "",
             f"`python benchmarks/circuits_smollm2.py --out {out}`: weight-mask circuits (every attention, MLP and norm "
             "weight of the 30 blocks, 106 M entries) learned with the `anneal` schedule (" + " ".join(FIND) + "), "
             f"density {a.density}, sweep {a.sweep}.", "",
             "## Circuits (accuracy on held-out examples; agreement = circuit's prediction equals the full model's)", "",
             "| task (form) | density | steps | time | full | circuit | complement | agreement | n | train: circuit / complement / agreement (n) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t, f in finds.items():
        acc, tr = f["accuracies"], f.get("train_accuracies") or {}
        lines.append(f"| {t} ({f['form']}) | {f['density']:.4f} | {f['steps']} | {f['seconds']:.0f} s | {acc['full']:.3f} | {acc['circuit']:.3f} | "
                     f"{acc['complement']:.3f} | {acc['agreement']:.3f} | {acc['n']} | {tr.get('circuit', float('nan')):.3f} / "
                     f"{tr.get('complement', float('nan')):.3f} / {tr.get('agreement', float('nan')):.3f} ({tr.get('n', 0)}) |")
    lines += ["", "## Density sweep (held-out accuracy of each snapshot; restricted edit ΔNLL of the new target inside it)", "",
              "| task | density | circuit | complement | agreement | edit ΔNLL(new): circuit | random |", "|---|---|---|---|---|---|---|"]
    for t, f in finds.items():
        for r in sorted(f.get("sweep", []), key=lambda r: -r["target"]):
            ra = r.get("accuracies", {})
            tag = "final" if r["target"] == a.density else f"d{r['target']:g}"
            s = (edits if tag == "final" else sweep_edits.get(tag, {})).get("summary", {}).get("restricted", {}) if t == "hierarchy" else {}
            e = {w: ci(s[w]["nll_new"]["delta"]) if w in s else "—" for w in ("circuit", "random")}
            lines.append(f"| {t} | {r['density']:.3f} | {ra.get('circuit', float('nan')):.3f} | {ra.get('complement', float('nan')):.3f} | "
                         f"{ra.get('agreement', float('nan')):.3f} | {e['circuit']} | {e['random']} |")
    if edits:
        lines += ["", f"## Editing hierarchy facts inside the hierarchy circuit, its complement and a random {a.density} mask", "",
                  "Constrained fine-tuning as in the paper (SGD lr 5e-4, 10 steps, radius 5e-4); ΔNLL (negative = more likely) "
                  "and success (new target more likely than the true one) after the edit, mean [95% CI] over facts.", "", *EDIT_HEADER,
                  *edit_rows("hierarchy", edits["summary"])]
        dmg = [(m, w, s["task_accuracy"]) for m, per in edits["summary"].items() for w, s in per.items() if "task_accuracy" in s]
        if dmg:
            lines += ["", "Task damage (hierarchy task accuracy, every 4th edit): " + "; ".join(
                f"{m}/{w} {d['before']['mean']:.2f} → {d['after']['mean']:.2f}" for m, w, d in dmg) + "."]
    lines += ["", "## Overlap between task circuits (Jaccard / overlap coefficient, all masked weights)", "",
              *overlap_lines(comp, [f["density"] for f in finds.values()]), "", "## Make-up", "", *makeup_lines(comp)]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.md:
        write_report(a.md, text, {"finds": {t: {k: v for k, v in f.items() if k != "history"} for t, f in finds.items()},
                                  "edits": edits, "sweep_edits": sweep_edits, "compare": comp},
                     [*(out / "compare").glob("*.png"), out / "hierarchy" / "edits" / "final" / "edit.png"])

if __name__ == "__main__":
    sys.exit(main())
