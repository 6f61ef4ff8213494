"""One CLI error policy, bad input refused before any forward pass, and the CLI's polish.

- every user mistake below ends in one clean ``error`` message naming it, exit code 2 and no traceback (CLI), and
  in the right :class:`~factlab.errors.FactlabError` subclass before any forward pass (API, where there is one);
- ``mechanisms --out`` writes all of its files or none; a patch that does not fit its site names both shapes;
- Ctrl-C ends in one ``interrupted`` line and exit code 130; a bug still prints its traceback;
- ``--version`` exists, help pages show no ``<bool>`` on flags, ``factlab models`` keeps ``[gemma]``, the CLI
  modules import nothing heavy at module level, and results print one short line in a notebook.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import factlab.errors as errors
from .conftest import run_cli, same_weights, weights_of

PROMPT = "The capital of France is"
RELATION = "country_capital_city"


@contextmanager
def forwards(lm):
    """Count the model's forward passes inside the block (``calls[0]``)."""
    calls = [0]

    def count(module, args, kwargs):
        calls[0] += 1

    handle = lm.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------- CLI probes
#: (id, argv after the command name with {M} for the saved tiny model, words the error message must contain)
CLI_PROBES = [
    ("dtype-float8", ["predict", "x", "--model", "{M}", "--dtype", "float8"], ["float8", "float32"]),
    ("model-missing-path", ["predict", "x", "--model", "/nonexistent/path"], ["/nonexistent/path", "does not exist"]),
    ("predict-empty-prompt", ["predict", "", "--model", "{M}"], ["prompt", "empty"]),
    ("predict-blank-prompt", ["predict", "   ", "--model", "{M}"], ["prompt", "empty"]),
    ("predict-second-prompt-empty", ["predict", "ok", "", "--model", "{M}"], ["number 2", "empty"]),
    ("lens-layer-99", ["lens", PROMPT, "--relation", RELATION, "--layer", "99", "--model", "{M}"], ["layer 99", "0..2"]),
    ("lens-layer-not-a-number", ["lens", PROMPT, "--relation", RELATION, "--layer", "abc", "--model", "{M}"], ["--layer", "abc"]),
    ("lens-layer-without-relation", ["lens", PROMPT, "--layer", "1", "--model", "{M}"], ["relation"]),
    ("lens-empty-prompt", ["lens", "", "--model", "{M}"], ["prompt", "empty"]),
    ("lre-fit-layer-99", ["lre", "fit", RELATION, "--layer", "99", "--beta", "1", "--model", "{M}"], ["layer 99", "0..2"]),
    ("lre-fit-sweep-layer-99", ["lre", "fit", RELATION, "--sweep-layers", "1,99", "--model", "{M}"], ["layer 99"]),
    ("mechanisms-head-99.0", ["mechanisms", PROMPT, "--head", "99.0", "--model", "{M}"], ["layer 99", "outside"]),
    ("mechanisms-head-0.99", ["mechanisms", PROMPT, "--head", "0.99", "--model", "{M}"], ["head 99", "outside"]),
    ("mechanisms-head-malformed", ["mechanisms", PROMPT, "--head", "x", "--model", "{M}"], ["LAYER.HEAD", "'x'"]),
    ("mechanisms-dataset-unknown", ["mechanisms", "dataset", "bogus", "--model", "{M}"], ["bogus", "known_1000"]),
    ("mitigate-fraction", ["mitigate", "--select-fraction", "1.5", "--limit", "4", "--model", "{M}"], ["fraction", "1.5"]),
    ("trace-kind-unknown", ["trace", PROMPT, "-s", "France", "--kind", "bogus", "--model", "{M}"], ["bogus", "residual"]),
    ("trace-subject-not-in-prompt", ["trace", PROMPT, "-s", "Germany", "--model", "{M}"], ["Germany", "not in the prompt"]),
    ("trace-method-unknown", ["trace", PROMPT, "-s", "France", "--method", "bogus", "--model", "{M}"], ["bogus", "attribution"]),
    ("trace-corruption-unknown", ["trace", PROMPT, "-s", "France", "--corruption", "bogus", "--model", "{M}"], ["bogus", "swap"]),
    ("trace-noise-malformed", ["trace", PROMPT, "-s", "France", "--noise", "abc", "--model", "{M}"], ["abc", "3x"]),
    ("trace-empty-prompt", ["trace", "", "-s", "France", "--model", "{M}"], ["prompt", "empty"]),
    ("knockout-method-unknown", ["knockout", PROMPT, "-s", "France", "--method", "bogus", "--model", "{M}"], ["bogus", "attention"]),
    ("knockout-no-subject", ["knockout", PROMPT, "--model", "{M}"], ["--subject"]),
    ("trace-dataset-kind-unknown", ["trace-dataset", "--kinds", "bogus", "--limit", "3", "--model", "{M}"], ["bogus"]),
    ("trace-dataset-method-unknown", ["trace-dataset", "--method", "bogus", "--limit", "3", "--model", "{M}"], ["bogus", "attribution"]),
    ("trace-dataset-missing-file", ["trace-dataset", "/nonexistent/known.json", "--model", "{M}"], ["/nonexistent/known.json", "does not exist"]),
]
if not torch.cuda.is_available():
    CLI_PROBES.append(("device-cuda-on-cpu-build", ["predict", "x", "--model", "{M}", "--device", "cuda"], ["cuda", "--device cpu"]))


@pytest.mark.parametrize("argv,needles", [p[1:] for p in CLI_PROBES], ids=[p[0] for p in CLI_PROBES])
def test_cli_user_mistake_is_one_clean_error(argv, needles, saved_tiny, tmp_path):
    r = run_cli(*(a.replace("{M}", str(saved_tiny)) for a in argv), cwd=tmp_path)
    r.assert_user_error(*needles)
    assert list(tmp_path.iterdir()) == [], f"a refused command wrote {list(tmp_path.iterdir())}"


@pytest.mark.parametrize("head", ["99.0", "0.99", "x"])
def test_cli_mechanisms_bad_head_writes_nothing(head, saved_tiny, tmp_path):
    """Refused before any work: not two of four files (the lens and contributions pictures) as before."""
    out = tmp_path / "out"
    r = run_cli("mechanisms", PROMPT, "--head", head, "--out", str(out), "--model", str(saved_tiny))
    r.assert_user_error("head" if head == "x" else "outside")
    assert not out.exists()


# --------------------------------------------------------------------------- the same through the API
@pytest.fixture(scope="module")
def relation():
    from factlab.data import load_relation

    return load_relation(RELATION)


def test_api_lens_layer_99_refused_before_any_forward(tiny_llama, relation):
    from factlab.lre.lens import lens, lens_operator

    with forwards(tiny_llama) as calls:
        with pytest.raises(errors.SiteError, match="layer 99 is outside"):
            lens(tiny_llama, PROMPT, relation=relation, layer=99)
        with pytest.raises(errors.SiteError, match="layer 99 is outside"):
            lens_operator(tiny_llama, relation, layer=99)
    assert calls[0] == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"prompt": ""}, "empty"),
    ({"prompt": "  "}, "empty"),
    ({"layer": 1}, "relation"),
    ({"relation": True, "beta": float("nan")}, "beta"),
    ({"target": " "}, "target"),
], ids=["empty-prompt", "blank-prompt", "layer-without-relation", "beta-nan", "blank-target"])
def test_api_lens_bad_options_refused_before_any_forward(tiny_llama, relation, kwargs, match):
    from factlab.lre.lens import lens

    kw = {"prompt": PROMPT, **kwargs}
    if kw.pop("relation", None):
        kw["relation"] = relation
    prompt = kw.pop("prompt")
    with forwards(tiny_llama) as calls, pytest.raises(errors.InputError, match=match):
        lens(tiny_llama, prompt, **kw)
    assert calls[0] == 0


def test_api_attribute_lens_refuses_an_lre_of_another_model(tiny_llama):
    from factlab.lre import LRE, attribute_lens

    other_width = LRE(weight=torch.zeros(5, 5), bias=torch.zeros(5), layer=1, relation="r", model_id="elsewhere")
    other_depth = LRE(weight=torch.zeros(48, 48), bias=torch.zeros(48), layer=20, relation="r")
    with forwards(tiny_llama) as calls:
        with pytest.raises(errors.InputError, match="5-dimensional"):
            attribute_lens(tiny_llama, PROMPT, other_width)
        with pytest.raises(errors.SiteError, match="layer 20"):
            attribute_lens(tiny_llama, PROMPT, other_depth)
        with pytest.raises(errors.InputError, match="empty"):
            attribute_lens(tiny_llama, "")
    assert calls[0] == 0


@pytest.mark.parametrize("head,match", [("99.0", "layer 99 is outside"), ("0.99", "head 99 is outside"), ("x", "LAYER.HEAD"),
                                        ("1.2.3", "LAYER.HEAD"), ((5, 0), "layer 5 is outside")])
def test_api_mechanisms_bad_head_refused_before_any_forward(tiny_llama, tmp_path, head, match):
    from factlab.mechanisms._common import MechanismError
    from factlab.mechanisms.report import prompt_mechanisms

    for out in (None, tmp_path / "out"):
        with forwards(tiny_llama) as calls, pytest.raises(MechanismError, match=match):
            prompt_mechanisms(tiny_llama, PROMPT, head=head, out=out)
        assert calls[0] == 0
    assert not (tmp_path / "out").exists()


def test_api_mechanisms_bad_answer_and_prompt_refused_before_any_forward(tiny_llama, tmp_path):
    from factlab.mechanisms._common import MechanismError
    from factlab.mechanisms.report import prompt_mechanisms

    (tmp_path / "afile").write_text("x")
    with forwards(tiny_llama) as calls:
        with pytest.raises(MechanismError, match="empty"):
            prompt_mechanisms(tiny_llama, "", answer=" Paris")
        with pytest.raises(MechanismError, match="answer is empty"):
            prompt_mechanisms(tiny_llama, PROMPT, answer=" ")
        with pytest.raises(MechanismError, match="is a file"):
            prompt_mechanisms(tiny_llama, PROMPT, out=tmp_path / "afile")
    assert calls[0] == 0


def test_api_mechanisms_out_is_all_or_nothing(tiny_llama, tmp_path, monkeypatch):
    """A failure while writing (here: the attention picture) leaves --out as it was; a success writes all four files."""
    import factlab.mechanisms.plot as plot
    from factlab.mechanisms.report import prompt_mechanisms

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(plot, "plot_attention", broken)
    with pytest.raises(OSError, match="disk full"):
        prompt_mechanisms(tiny_llama, PROMPT, answer=" Paris", out=out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    monkeypatch.undo()
    res = prompt_mechanisms(tiny_llama, PROMPT, answer=" Paris", out=out)
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "contributions.png", "keep.txt", "lens.png", "mechanisms.json"]
    assert res.head is not None and res.attention.shape[0] == res.attention.shape[1] == len(res.tokens)


# --------------------------------------------------------------------------- patch
def test_patch_with_a_wrong_shape_names_site_and_shapes_and_removes_its_hooks(tiny_llama):
    from factlab.interventions import PatchShapeError, patch

    lm = tiny_llama
    before = weights_of(lm.model)
    batch = lm.encode([PROMPT])
    with torch.no_grad():
        clean = lm.forward(batch)
    site = "layer.1.mlp.out"
    module = lm.model.get_submodule(lm.adapter.site(site).module)
    n_hooks = len(module._forward_hooks) + len(module._forward_pre_hooks)
    d = lm.adapter.d_model
    with pytest.raises(PatchShapeError) as e:
        with torch.no_grad(), patch(lm, {site: torch.zeros(3, d + 1)}):
            lm.forward(batch)
    msg = str(e.value)
    assert isinstance(e.value, errors.FactlabError) and site in msg and f"(3, {d + 1})" in msg and f"(1, {batch.width}, {d})" in msg
    with pytest.raises(PatchShapeError, match=rf"\(1, 1, {d}\)"):  # at positions: (B, P, d)
        with torch.no_grad(), patch(lm, {site: torch.zeros(2, 2, d)}, positions=[-1]):
            lm.forward(batch)
    with pytest.raises(PatchShapeError, match="float"):  # neither a tensor nor a function: refused on entry
        with patch(lm, {site: 0.5}):
            pytest.fail("the context was entered")
    with pytest.raises(PatchShapeError, match=site):  # a function returning a value of another shape
        with torch.no_grad(), patch(lm, {site: lambda v: v[..., :-1]}):
            lm.forward(batch)
    assert len(module._forward_hooks) + len(module._forward_pre_hooks) == n_hooks
    with torch.no_grad():
        assert torch.equal(lm.forward(batch), clean)  # nothing left behind
        with patch(lm, {site: torch.zeros(d)}):  # a broadcastable value still works
            assert not torch.equal(lm.forward(batch), clean)
    assert same_weights(lm.model, before)


def test_positions_outside_the_sequence_are_a_factlab_error(tiny_llama):
    from factlab.interventions import PositionError, capture

    batch = tiny_llama.encode([PROMPT])
    with pytest.raises(PositionError, match="outside the sequence") as e:
        with torch.no_grad(), capture(tiny_llama, ["layer.0.resid"], positions=[batch.width + 3]):
            tiny_llama.forward(batch)
    assert isinstance(e.value, errors.InputError) and isinstance(e.value, IndexError)


# --------------------------------------------------------------------------- Ctrl-C and bugs
def _main(monkeypatch, argv: list[str]) -> None:
    from factlab.cli import main

    monkeypatch.setattr(sys, "argv", ["factlab", *argv])
    main()


def test_keyboard_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import factlab.cli.basic as basic

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(basic, "load_model", interrupted)
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, ["predict", "x"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "re-run the same command" in err.lower() and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_a_bug_still_raises_with_its_traceback(monkeypatch):
    import factlab.cli.basic as basic

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(basic, "load_model", bug)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        _main(monkeypatch, ["predict", "x"])


SLOW_COMMAND = """
import os, pathlib, sys, time
import factlab.cli.basic as basic
def slow(*a, **k):
    pathlib.Path(os.environ["MARKER"]).write_text("started")
    time.sleep(120)
basic.load_model = slow
from factlab.cli import main
main()
"""


def test_sigint_during_a_command_prints_interrupted_and_exits_130(tmp_path):
    marker = tmp_path / "started"
    env = {**os.environ, "MARKER": str(marker), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMMAND, "predict", "x"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.communicate(timeout=60)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


# --------------------------------------------------------------------------- polish
def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    from factlab import __version__

    line = r.stdout.strip()
    assert line.startswith(f"factlab {__version__} (torch ") and "transformers " in line and len(line.splitlines()) == 1


HELP_PAGES = [[], ["predict"], ["trace"], ["trace-dataset"], ["knockout"], ["mechanisms", "prompt"], ["lre", "fit"],
              ["circuit", "find"], ["circuit", "edit"], ["eval", "counterfact"], ["stats"], ["synth", "build"]]


@pytest.mark.parametrize("page", HELP_PAGES, ids=[" ".join(p) or "factlab" for p in HELP_PAGES])
def test_help_shows_flags_without_a_bool_type(page):
    from factlab.cli import app

    r = CliRunner().invoke(app, [*page, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "--help" in r.output and "Show this message and exit." in r.output
    assert "<bool>" not in r.output
    if page:
        assert "--json" in r.output or "--force" in r.output or "--sequential" in r.output


def test_json_output_is_strict_json(capsys):
    """``--json`` output never holds bare NaN/Infinity (not JSON: jq and browsers reject it)."""
    import json
    from pathlib import PurePosixPath

    from factlab.cli.common import emit_json

    emit_json({"relative": [0.5, float("nan")], "ci": (float("-inf"), 1.0), "file": PurePosixPath("/a/b.png"), "arr": np.array([1.5])})

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    assert json.loads(capsys.readouterr().out, parse_constant=refuse) == {
        "relative": [0.5, None], "ci": [None, 1.0], "file": "/a/b.png", "arr": [1.5]}


def test_prompts_are_printed_as_text_not_rich_markup(saved_tiny):
    """A prompt that looks like rich markup is printed as it is (it used to crash predict with a MarkupError)."""
    r = run_cli("predict", "[/x] [bold]y", "--model", str(saved_tiny), env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "[/x] [bold]y" in r.stdout


def test_models_keeps_the_gemma_extra_in_the_install_hint():
    from factlab.cli import app

    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    assert "pip install 'factlab[gemma]'" in r.output


#: the CLI's modules may import these at module level (and factlab.models only for DEFAULT_MODEL): no torch,
#: transformers, numpy or matplotlib, so `factlab --help` and `--version` start without them
LIGHT = {"__future__", "importlib", "json", "logging", "sys", "time", "enum", "pathlib", "typing", "typer", "rich", "factlab"}


def _module_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import outside functions and ``if TYPE_CHECKING`` blocks."""
    found = []

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.extend((a.name, []) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.append((node.module or "", [a.name for a in node.names]))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", []))

    visit(ast.parse(path.read_text()).body)
    return found


CLI_MODULES = ["__init__.py", "common.py", "basic.py", "locate.py", "lre.py", "mechanisms.py", "circuit.py", "synth.py"]


@pytest.mark.parametrize("name", CLI_MODULES)
def test_cli_modules_import_nothing_heavy_at_module_level(name):
    import factlab.cli

    for module, names in _module_level_imports(Path(factlab.cli.__file__).parent / name):
        top = module.split(".")[0]
        assert top in LIGHT, f"{name} imports {module} at module level"
        if module == "factlab.models" or module.startswith("factlab.models."):
            assert names == ["DEFAULT_MODEL"], f"{name} imports {names} from {module} at module level"
        elif top == "factlab":
            assert module == "factlab.errors" or module.startswith("factlab.cli"), f"{name} imports {module} at module level"


# --------------------------------------------------------------------------- short reprs
def test_trace_result_repr_is_one_short_line():
    from factlab.locate.result import TraceResult

    tokens = [f"t{i}" for i in range(20)]
    r = TraceResult(PROMPT, "France", tokens, (3, 5), "mlp", " Paris", [1], np.random.default_rng(0).random((20, 30)), 0.1, 0.9)
    text = repr(r)
    assert len(text) < 300 and "\n" not in text
    assert "kind='mlp'" in text and "subject='France'" in text and "(20, 30)" in text and f"layer {r.peak()['layer']}" in text


def test_mechanisms_result_reprs_are_short(tiny_llama):
    from factlab.mechanisms.contributions import decompose, direct_contributions
    from factlab.mechanisms.dataset import FactCase, collect
    from factlab.mechanisms.lens import logit_lens
    from factlab.mechanisms.report import prompt_mechanisms

    cases = [FactCase(PROMPT, "France", " Paris"), FactCase("Toyota was founded in", "Toyota", " Japan")]
    results = [
        direct_contributions(tiny_llama, PROMPT, " Paris"),
        decompose(tiny_llama, [PROMPT]),
        logit_lens(tiny_llama, PROMPT, " Paris"),
        collect(tiny_llama, cases),
        prompt_mechanisms(tiny_llama, PROMPT, answer=" Paris", head="1.2"),
    ]
    for res in results:
        text = repr(res)
        assert text.startswith(type(res).__name__ + "(") and len(text) < 300 and "\n" not in text, text
        assert "tensor(" not in text and "array(" not in text, text


def test_help_and_version_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom factlab.cli import main\nsys.argv = ['factlab', sys.argv[1]]\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    for flag in ("--help", "--version"):
        r = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=120)
        assert "HEAVY []" in r.stderr, r.stderr
