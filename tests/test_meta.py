"""Meta-tests: every command has help, completions are current, the public API is complete."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import chatsave
from tests.conftest import ROOT


def _commands() -> list[list[str]]:
    """Every command and group below the top level, as its path of names."""
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


def _is_group(path: list[str]) -> bool:
    from typer.main import get_command

    from chatsave.cli.app import app

    cmd: Any = get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return hasattr(cmd, "commands")


def test_commands_exist() -> None:
    names = {" ".join(c) for c in _commands()}
    assert {"import", "export", "save", "sync", "diff", "delete", "status", "serve",
            "serve token", "serve token add", "trash", "trash restore"} <= names


@pytest.mark.parametrize("path", [[], *_commands()], ids=lambda p: " ".join(p) or "chatsave")
def test_every_command_has_help_with_an_example(cli: Any, path: list[str]) -> None:
    """Every command and every group (the top level, trash, serve token too) shows an
    example; a flag shows no value type, and a usage line no doubled brackets."""
    ran = cli(*path, "--help")
    assert ran.exit_code == 0
    assert "Example: chatsave" in ran.stdout
    assert "<bool>" not in ran.stdout
    usage = next(line for line in ran.stdout.splitlines() if "Usage:" in line)
    assert "[[" not in usage and "]...]" not in usage, usage
    if path == ["serve"] or _is_group(path):
        return  # the server process and the groups: no client flags
    for flag in ("--json", "--store", "--remote", "--lock-wait", "--traceback"):
        assert flag in ran.stdout


@pytest.mark.parametrize("path", [["save"], ["sync"], ["diff"], ["dedupe"], ["fetch"],
                                  ["export"], ["delete"], ["trash", "restore"]],
                         ids=" ".join)
def test_variadic_ids_read_once_in_brackets(cli: Any, path: list[str]) -> None:
    usage = next(line for line in cli(*path, "--help").stdout.splitlines()
                 if "Usage:" in line)
    assert "[CHAT_ID]..." in usage or "[MESSAGE_ID]..." in usage, usage


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
