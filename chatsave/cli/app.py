"""The Typer application: the command group, --version, usage errors, and the commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from chatsave import __version__
from chatsave.cli.runtime import HelpGroup
from chatsave.output import SCHEMA_VERSION

SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def completion_script(shell: str) -> str:
    """The shell completion script for ``shell`` (Typer's own generator for that shell)."""
    from typer.completion import get_completion_script

    # ``shell`` names the shell the script is for; nothing is run (bandit reads shell=).
    script = get_completion_script(prog_name="chatsave", complete_var="_CHATSAVE_COMPLETE",
                                   shell=shell)  # nosec B604
    return script.rstrip("\n")


def show_typer_error(exc: typer.TyperException) -> None:
    """Write a usage error to stderr as Typer itself does (usage line, hint, ``Error:``).

    ``typer.TyperException`` is the public base of every error Typer's bundled Click raises
    (Typer 0.27.2 made it so that nobody need import the private ``typer._click``). Its
    ``show()`` is what Typer calls to print one; an error without it gets the ``Error:``
    line alone (tests/test_cli_usage_errors.py fails if Typer's errors stop having it).
    """
    show = getattr(exc, "show", None)
    if callable(show):
        show()
    else:
        sys.stderr.write(f"Error: {exc.format_message()}\n")


class ChatsaveGroup(HelpGroup):
    """Command group that keeps --json honest for usage errors too (one summary line)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if len(argv) == 2 and argv[0] == "--show-completion" and argv[1] in SHELLS:
            # Typer reads the shell from the environment and ignores a named one: the script
            # asked for is printed (completions/ holds one per shell, checked by a test).
            sys.stdout.write(completion_script(argv[1]) + "\n")
            if standalone_mode:
                sys.exit(0)
            return 0
        try:
            code = super().main(argv, prog_name or "chatsave", complete_var,
                                standalone_mode=False, **extra)
        except typer.TyperException as exc:  # what Typer's bundled Click raises
            show_typer_error(exc)
            code = exc.exit_code
            if "--json" in argv:
                command = next((a for a in argv if not a.startswith("-")), None)
                line = {"type": "summary", "schema_version": SCHEMA_VERSION,
                        "command": command, "exit_code": code, "ok": False,
                        "error": {"code": "usage", "message": exc.format_message(),
                                  "hint": None}}
                sys.stdout.write(json.dumps(line) + "\n")
        except typer.Abort:
            sys.stderr.write("error: aborted (no input)\n")
            code = 2
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=ChatsaveGroup,
    name="chatsave",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chatsave {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Keep chat histories safe: a local chat store and a backend kept in agreement.

    Exit codes: 0 done, 1 differences/pending, 2 usage or invalid input, 3 partial,
    4 rejected, 5 safety guard, 6 conflicts, 7 store locked, 8 backend unavailable,
    9 backend refused, 10 local store problem, 70 internal error, 130 interrupted.

    Example: chatsave import dump.json && chatsave sync --all --remote ./backend.db
    """


def _register() -> None:
    from chatsave.cli import importexport, login, repair, save, serve, status, sync

    importexport.register(app)
    login.register(app)
    repair.register(app)
    save.register(app)
    sync.register(app)
    status.register(app)
    serve.register(app)
    from chatsave.cli import doctor  # AutoBot traps in one chat

    doctor.register(app)
    from chatsave.cli import salvage  # what a damaged store still holds

    salvage.register(app)


_register()


def run(args: list[str]) -> int:
    """Run the app on ``args``; return the exit code."""
    result = app(args=args, prog_name="chatsave", standalone_mode=False)
    return int(result or 0)
