"""Options and helpers shared by every command: --model, --device, --dtype, --json, output.

Nothing heavy is imported here: :func:`load_model` imports the loader (torch, transformers) when a command
runs; only the default model's name is read at import, so ``factlab --help`` need not load torch.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence

import typer
from rich.console import Console

from factlab.errors import InputError
from factlab.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from factlab.models import LoadedModel

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Packaged short name, local folder, .gguf file or Hub id.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda when available).")
DtypeOpt = typer.Option(None, "--dtype", help="float32 (default), bfloat16 or float16.")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")

console = Console(stderr=False)
err_console = Console(stderr=True)


def load_model(model: str, device: Optional[str], dtype: Optional[str], quiet: bool = False) -> "LoadedModel":
    """Load a model with a status spinner on stderr (never on stdout, which --json keeps clean)."""
    from factlab.models import load

    if quiet:
        return load(model, device=device, dtype=dtype)
    with err_console.status(f"loading {model} ..."):
        return load(model, device=device, dtype=dtype)


def check_prompts(prompts: Sequence[str], what: str = "prompt") -> list[str]:
    """``prompts`` as a list, or :class:`InputError` naming the first empty (or whitespace-only) one."""
    for i, p in enumerate(prompts):
        if not p or not p.strip():
            where = f" (number {i + 1})" if len(prompts) > 1 else ""
            raise InputError(f"{what}{where} is empty ({p!r}); give the text the model should continue, e.g. 'The Eiffel Tower is in'")
    return list(prompts)


def emit_json(obj: Any) -> None:
    """Write ``obj`` as strict JSON to stdout: NaN and infinities become ``null`` (bare ``NaN`` is not JSON)."""
    from factlab.io import to_json_text

    plain = json.loads(json.dumps(obj, ensure_ascii=False, default=_default))  # objects -> dicts, lists, str
    sys.stdout.write(to_json_text(plain, indent=2) + "\n")


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
