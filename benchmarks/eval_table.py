"""CounterFact / zsRE table on a model for no edit, ROME, MEMIT, EMMET (batch sizes 1, 10, 100), next to
the published GPT-2 XL / GPT-J numbers (algorithms.md §5.7, §6.4), plus the batch-size plot.

    python benchmarks/eval_table.py run   [--model smollm2-135m] [--limit 100] [--rome-limit 50] [--only NAME ...]
    python benchmarks/eval_table.py table [--out benchmarks/results/eval_table.md]

``run`` executes the ``factlab eval`` commands one after another (each resumable; finished runs are
skipped), writing run dirs under ``runs/eval_*``. ``table`` reads whatever summaries exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"

# published numbers (x100), algorithms.md §5.7 (ROME Table 4 / Table 1) and §6.4 (MEMIT Tables 1-2, 10,000 edits)
PUBLISHED_CF = [
    ("GPT-2 XL unedited (ROME T4)", dict(S=30.5, ES=22.2, PS=24.7, NS=78.1, EM=-4.8, PM=-5.0, NM=5.0, GE=626.6, RS=31.9)),
    ("GPT-2 XL ROME (ROME T4)", dict(S=89.2, ES=100.0, PS=96.4, NS=75.4, EM=97.9, PM=62.7, NM=4.2, GE=621.9, RS=41.9)),
    ("GPT-J unedited (ROME T4)", dict(S=23.6, ES=16.3, PS=18.6, NS=83.0, EM=-7.2, PM=-7.4, NM=7.3, GE=621.8, RS=29.8)),
    ("GPT-J ROME (ROME T4)", dict(S=91.5, ES=99.9, PS=99.1, NS=78.9, EM=99.4, PM=74.1, NM=5.2, GE=620.1, RS=43.0)),
    ("GPT-J unedited (MEMIT T2)", dict(S=22.4, ES=15.2, PS=17.7, NS=83.5, GE=622.4, RS=29.4)),
    ("GPT-J ROME 10k seq. (MEMIT T2)", dict(S=50.3, ES=50.2, PS=50.4, NS=50.2, GE=589.6, RS=3.3)),
    ("GPT-J MEMIT 10k batch (MEMIT T2)", dict(S=85.8, ES=98.9, PS=88.6, NS=73.7, GE=619.9, RS=40.1)),
]
PUBLISHED_ZSRE = [
    ("GPT-2 XL unedited (ROME T1)", dict(Efficacy=22.2, Paraphrase=21.3, Specificity=24.2)),
    ("GPT-2 XL ROME (ROME T1)", dict(Efficacy=99.8, Paraphrase=88.1, Specificity=24.2)),
    ("GPT-J unedited (MEMIT T1)", dict(Score=26.4, Efficacy=26.4, Paraphrase=25.8, Specificity=27.0)),
    ("GPT-J ROME 10k (MEMIT T1)", dict(Score=2.6, Efficacy=21.0, Paraphrase=19.6, Specificity=0.9)),
    ("GPT-J MEMIT 10k (MEMIT T1)", dict(Score=50.7, Efficacy=96.7, Paraphrase=89.7, Specificity=26.6)),
]

CF_COLS = [("S", "score"), ("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score"),
           ("EM", "efficacy_magnitude"), ("PM", "paraphrase_magnitude"), ("NM", "neighborhood_magnitude"), ("GE", "fluency_ngram_entropy"),
           ("RS", "reference_tfidf_score")]
ZS_COLS = [("Score", "zsre_score"), ("Efficacy", "rewrite_token_accuracy"), ("Paraphrase", "paraphrase_token_accuracy"),
           ("Specificity", "specificity_token_accuracy")]


def plan(model: str, limit: int, zsre_limit: int, batch_sizes: list[int], rome_limit: int | None = None,
         zsre_rome_limit: int | None = None) -> list[tuple[str, list[str]]]:
    """The ``factlab eval`` runs in the order they are executed: the largest batches first (their values
    fill the value cache that the smaller batch sizes then reuse), ROME, the smaller batches, zsRE."""
    def cf(n):
        return ["--known-only", "--limit", str(n), "--gen-prompts", "1", "--gen-every", "10"]

    def zs(n):
        return ["--limit", str(n)]

    out = []

    def add(ds, method, bs, extra):
        name = f"eval_{ds}_{method}" + (f"_b{bs}" if method != "none" else "")
        out.append((name, ["factlab", "eval", ds, "--model", model, "--method", method, "--batch-size", str(bs), *extra, "--out", str(RUNS / name)]))

    sizes = sorted(batch_sizes, reverse=True)
    big = sizes[0]

    def edits(ds, extra, rome_extra):
        if big > 1:
            add(ds, "memit", big, extra)
            add(ds, "emmet", big, extra)
        add(ds, "rome", 1, rome_extra)
        for bs in sizes:
            if bs != big or bs == 1:
                add(ds, "memit", bs, extra)
                add(ds, "emmet", bs, extra)

    add("counterfact", "none", 1, cf(limit))
    add("zsre", "none", 1, zs(zsre_limit))
    edits("counterfact", cf(limit), cf(rome_limit or limit))
    edits("zsre", zs(zsre_limit), zs(zsre_rome_limit or zsre_limit))
    return out


def cmd_run(a) -> None:
    for name, cmd in plan(a.model, a.limit, a.zsre_limit, a.batch_sizes, a.rome_limit, a.zsre_rome_limit):
        if a.only and name not in a.only:
            continue
        if (RUNS / name / "summary.json").exists():
            print(f"[done] {name}", flush=True)
            continue
        print(f"[run ] {shlex.join(cmd)}", flush=True)
        # one thread: on a shared, oversubscribed CPU two OpenMP threads were 2-5x slower than one
        env = {"FACTLAB_DATA": str(ROOT.parent / "shared" / "data"), "OMP_NUM_THREADS": str(a.threads), **os.environ}
        r = subprocess.run(cmd, cwd=ROOT, env=env)
        print(f"[exit {r.returncode}] {name}", flush=True)


def _fmt(e) -> str:
    if e is None:
        return "—"
    return f"{e['mean']:.1f} ± {(e['high'] - e['low']) / 2:.1f}"


def _partial(d: Path, ds: str) -> dict | None:
    """Summary-like dict from the cases finished so far in a run that is still going (marked partial)."""
    from factlab.evaluate.harness import read_records
    from factlab.evaluate.summary import summarise_metrics

    cfg_file = d / "config.json"
    recs = list(read_records(d).values()) if cfg_file.exists() else []
    if not recs:
        return None
    cfg = json.loads(cfg_file.read_text())["config"]
    metrics = {ph: {k: v.to_dict() for k, v in m.items()} for ph, m in summarise_metrics(recs, ds).items()}
    unavailable = {"reference_tfidf_score": "no snippet/IDF files"} if ds == "counterfact" else {}
    return {"method": cfg["method"], "config": cfg, "model": {"name": "smollm2-135m"}, "metrics": metrics,
            "n_cases": len(recs), "unavailable": unavailable, "partial": True}


def cmd_table(a) -> None:
    lines = []
    for ds, cols, pub in (("counterfact", CF_COLS, PUBLISHED_CF), ("zsre", ZS_COLS, PUBLISHED_ZSRE)):
        lines.append(f"\n### {ds}\n")
        lines.append("| model / method | n | " + " | ".join(c for c, _ in cols) + " |")
        lines.append("|---" * (len(cols) + 2) + "|")
        def order(d: Path) -> tuple[int, int]:
            parts = d.name.split("_")  # eval_<ds>_<method>[_b<size>]
            method = parts[2] if len(parts) > 2 else ""
            size = int(parts[3][1:]) if len(parts) > 3 and parts[3][1:].isdigit() else 0
            return (["none", "rome", "memit", "emmet"].index(method) if method in ("none", "rome", "memit", "emmet") else 9, size)

        for d in sorted(RUNS.glob(f"eval_{ds}_*"), key=order):
            f = d / "summary.json"
            s = json.loads(f.read_text()) if f.exists() else _partial(d, ds)
            if s is None:
                continue
            phase = "pre" if s["method"] == "none" else "post"
            m = s["metrics"][phase]
            label = f"{s['model']['name']} {s['method'].upper() if s['method'] != 'none' else 'unedited'}"
            if s["method"] != "none":
                label += f" b={s['config']['batch_size']}"
            if s.get("partial"):
                label += " (unfinished run)"
            cells = ["n/a" if k in s.get("unavailable", {}) else _fmt(m.get(k)) for _, k in cols]
            lines.append(f"| {label} | {s['n_cases']} | " + " | ".join(cells) + " |")
        for label, vals in pub:
            lines.append(f"| *{label}* | published | " + " | ".join(f"{vals[c]:.1f}" if c in vals else "" for c, _ in cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    dirs = [d for d in sorted(RUNS.glob("eval_counterfact_*")) if (d / "summary.json").exists()]
    if dirs and a.plot:
        from factlab.evaluate.plot import plot_batch_sizes

        plot_batch_sizes(dirs, ["efficacy_score", "paraphrase_score", "neighborhood_score", "score"], a.plot)
        print(f"wrote {a.plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--limit", type=int, default=100)
    r.add_argument("--zsre-limit", type=int, default=100)
    r.add_argument("--rome-limit", type=int, default=None, help="cases for the ROME runs (default --limit; ROME edits one at a time)")
    r.add_argument("--zsre-rome-limit", type=int, default=None)
    r.add_argument("--only", nargs="*")
    r.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100])
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table")
    t.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_table.md"))
    t.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "eval_batch_size.png"))
    a = p.parse_args()
    cmd_run(a) if a.cmd == "run" else cmd_table(a)


if __name__ == "__main__":
    sys.exit(main())
