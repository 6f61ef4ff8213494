"""Shared pieces of the circuit studies (``circuits_synth.py``, ``circuits_smollm2.py``): run a factlab command with
``--json`` and turn its output into Markdown tables (edits with 95% CIs, overlap matrix, make-up both ways)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path


def run(cmd: list[str]) -> dict:
    """Run one factlab command with --json (printed first); return its parsed output."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    out = subprocess.run(cmd + ["--json"], check=True, capture_output=True, text=True, env={**os.environ, "FACTLAB_NO_PROGRESS": "1"})
    return json.loads(out.stdout)


def ci(e: dict) -> str:
    """A signed mean with its 95% interval."""
    return f"{e['mean']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"


def frac(e: dict) -> str:
    """A proportion with its 95% interval."""
    return f"{e['mean']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"


def edit_rows(label: str, summary: dict) -> list[str]:
    """Table rows ``| label | mode | where | ΔNLL(new) | ΔNLL(true) | success after | paraphrase after |`` of one edit summary."""
    lines = []
    for mode, per in summary.items():
        for where, m in per.items():
            para = frac(m["paraphrase_success"]["after"]) if "paraphrase_success" in m else "—"
            lines.append(f"| {label} | {mode} | {where} | {ci(m['nll_new']['delta'])} | {ci(m['nll_true']['delta'])} | "
                         f"{frac(m['success']['after'])} | {para} | {m['n']} |")
    return lines


EDIT_HEADER = ["| circuit | mode | where | ΔNLL(new) | ΔNLL(true) | success after | paraphrase success after | n |",
               "|---|---|---|---|---|---|---|---|"]


def overlap_lines(comp: dict, densities: list[float]) -> list[str]:
    """The Jaccard / overlap-coefficient matrix of ``factlab circuit compare`` and what independent masks would give."""
    ov = comp["overlap"]
    names = ov["names"]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join(f"{ov['jaccard']['all'][i][j]:.3f} / {ov['overlap_coefficient']['all'][i][j]:.3f}"
                                              for j in range(len(names))) + " |")
    dens = sum(densities) / len(densities)
    return lines + ["", f"Two independent random masks of density {dens:.3f} would give Jaccard ≈ {dens / (2 - dens):.3f} and overlap "
                        f"coefficient ≈ {dens:.3f}."]


def makeup_lines(comp: dict) -> list[str]:
    """Make-up both ways: share of the circuit's weights by type, and share of each type's weights kept."""
    lines = ["| circuit | share of circuit: attn / mlp / norm | share of each type kept: attn / mlp / norm |", "|---|---|---|"]
    for m in comp["makeup"]:
        sc, sk = m["share_of_circuit"], m["share_kept"]
        lines.append(f"| {m['name']} | {sc.get('attn', 0):.3f} / {sc.get('mlp', 0):.3f} / {sc.get('norm', 0):.4f} | "
                     f"{sk.get('attn', 0):.3f} / {sk.get('mlp', 0):.3f} / {sk.get('norm', 0):.3f} |")
    return lines


def write_report(md: str | Path, text: str, payload: dict, pictures: list[Path] = ()) -> None:
    """Write the Markdown report, its JSON next to it, and copies of ``pictures`` in a folder of the same stem."""
    md = Path(md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    md.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    for png in pictures:
        if png.exists():
            md.with_suffix("").mkdir(exist_ok=True)
            shutil.copyfile(png, md.with_suffix("") / png.name)
