"""Meta-tests: every command has help, completions are current, the public API is complete."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import chatsave
from tests.conftest import ROOT


def _commands() -> list[list[str]]:
    from typer.main import get_command

    from chatsave.cli.app import app

    group: Any = get_command(app)
    found: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            found.append([*path, name])
            walk(sub, [*path, name])

    walk(group, [])
    return found


def test_commands_exist() -> None:
    names = {" ".join(c) for c in _commands()}
    assert {"import", "export", "save", "sync", "diff", "delete", "status", "serve",
            "serve token", "serve token add"} <= names


@pytest.mark.parametrize("path", _commands(), ids=" ".join)
def test_every_command_has_help_with_an_example(cli: Any, path: list[str]) -> None:
    ran = cli(*path, "--help")
    assert ran.exit_code == 0
    assert "Example:" in ran.stdout or "Commands" in ran.stdout
    if path == ["serve"]:
        return  # the server process: no client flags, no summary
    for flag in ("--json", "--store", "--remote", "--lock-wait", "--traceback"):
        if "Example:" in ran.stdout:
            assert flag in ran.stdout


# What each shell's own script starts with: a script for the wrong shell fails here.
_SHELL_MARK = {"bash": "_chatsave_completion() {", "zsh": "#compdef chatsave",
               "fish": "complete --command chatsave"}


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_are_current(shell: str) -> None:
    from typer.completion import get_completion_script

    expected = get_completion_script(prog_name="chatsave", complete_var="_CHATSAVE_COMPLETE",
                                     shell=shell).rstrip("\n") + "\n"
    assert expected.startswith(_SHELL_MARK[shell])
    fresh = subprocess.run([sys.executable, "-m", "chatsave", "--show-completion", shell],
                           capture_output=True, text=True, check=True).stdout
    assert fresh == expected, f"chatsave --show-completion {shell} prints another shell's script"
    committed = (ROOT / "completions" / f"chatsave.{shell}").read_text()
    assert committed == expected, (
        f"completions/chatsave.{shell} is stale: regenerate with "
        f"'chatsave --show-completion {shell} > completions/chatsave.{shell}'")


def test_public_api_is_complete() -> None:
    for name in chatsave.__all__:
        assert getattr(chatsave, name) is not None
    with pytest.raises(AttributeError):
        chatsave.no_such_name  # noqa: B018
    # Every operation module's entry point is exported.
    for name in ("import_source", "export_chats", "Store", "Message", "ExitCode"):
        assert name in chatsave.__all__


def test_version_is_fast_and_light() -> None:
    code = ("import sys, time; t = time.perf_counter(); from chatsave.cli import main; "
            "main(['--version']); "
            "heavy = [m for m in ('typer', 'pydantic', 'httpx', 'rich') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == f"chatsave {chatsave.__version__}"
    assert out[1] == "[]"


def test_version_subprocess() -> None:
    ran = subprocess.run([sys.executable, "-m", "chatsave", "--version"], capture_output=True,
                         text=True, check=True)
    assert ran.stdout == f"chatsave {chatsave.__version__}\n"


def test_no_traceback_for_unknown_command() -> None:
    ran = subprocess.run([sys.executable, "-m", "chatsave", "frobnicate"], capture_output=True,
                         text=True)
    assert ran.returncode == 2
    assert "Traceback" not in ran.stderr
