"""The ``factlab`` command line. Each area adds its commands through a ``register(app)`` function.

One error policy (:func:`main`): factlab's own errors (user mistakes) end in one ``error: ...`` line and exit
code 2; usage errors keep click's exit code 2; Ctrl-C ends in one ``interrupted`` line and exit code 130;
anything else is a bug and prints its traceback. The CLI's modules import nothing heavy at module level
(torch, transformers, numpy, matplotlib come with the commands that use them), so that ``--help`` and
``--version`` can start fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from factlab.errors import FactlabError, Interrupted

#: exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130
#: exit code of a user mistake (factlab's own errors, like click's usage errors)
EXIT_USER_ERROR = 2
INTERRUPTED_MESSAGE = (
    "interrupted. Re-run the same command to resume: commands that keep a run folder or cache (eval, "
    "trace-dataset, lre eval, stats, edit stream) continue where they stopped; the others start again"
)


def _plain_flags(command: Any, ctx: typer.Context) -> None:
    """Show on/off flags (``--json``, ``--help``, ...) without a ``<bool>`` type in help, here and in every
    subcommand: a flag takes no value, and typer's rich help would otherwise print one."""
    for param in command.get_params(ctx):  # includes the --help option
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for name, sub in getattr(command, "commands", {}).items():
        _plain_flags(sub, typer.Context(sub, info_name=name, parent=ctx))


class FactlabGroup(TyperGroup):
    """The root command: plain flags in every help page, and Ctrl-C as one line and exit code 130."""

    def make_context(self, info_name: Optional[str], args: list[str], parent: Any = None, **extra: Any) -> Any:
        _plain_flags(self, typer.Context(self, info_name=info_name, parent=parent))
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.secho(INTERRUPTED_MESSAGE, fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="factlab",
    cls=FactlabGroup,
    help="Find where a language model stores a fact, read it out, rewrite it, and prove what the rewrite did.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def version_text() -> str:
    """``factlab X (torch Y, transformers Z, python W)``, read from package metadata (imports neither)."""
    from importlib.metadata import PackageNotFoundError, version

    import factlab

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    py = ".".join(map(str, sys.version_info[:3]))
    return f"factlab {factlab.__version__} (torch {ver('torch')}, transformers {ver('transformers')}, python {py})"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print factlab's version (and torch's, transformers') and exit."),
) -> None:
    """Options of ``factlab`` itself (the app's ``help`` is its description)."""


#: modules (relative to factlab.cli) whose register(app) adds commands, in help order
AREAS: tuple[str, ...] = ("basic", "locate", "edit", "evaluate", "lre", "mechanisms", "circuit", "synth")

for _area in AREAS:
    importlib.import_module(f"factlab.cli.{_area}").register(app)


def main() -> None:
    """Console-script entry point: one line and exit code 2 for factlab's own errors, one line and 130 for
    Ctrl-C, click's usage errors as click prints them (exit 2), and a traceback for anything else (a bug)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except Interrupted as e:  # stopped by a signal, progress saved: say how to resume, exit as the signal would
        typer.secho(f"interrupted: {e}", fg=typer.colors.YELLOW, err=True)
        raise SystemExit(e.exit_code) from None
    except FactlabError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:  # outside a command (the commands' own is handled by FactlabGroup.invoke)
        typer.secho(INTERRUPTED_MESSAGE, fg=typer.colors.YELLOW, err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
