"""Usage errors reach the user through Typer's public API (typer.TyperException), never
through the private ``typer._click``; these tests fail if Typer moves what that relies on."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import typer
from typer.main import get_command

from chatsave.cli.app import show_typer_error
from tests.conftest import Ran


def test_errors_typer_raises_are_public_typer_exceptions_that_can_show_themselves() -> None:
    # What ChatsaveGroup.main catches and how it prints it: if Typer stops deriving its
    # Click errors from TyperException, or drops show(), this fails (not the CLI, silently).
    tiny = typer.Typer()

    @tiny.command()
    def hello(name: str) -> None:
        """Say hello."""

    for argv in (["--bogus"], [], ["a", "b"]):
        with pytest.raises(typer.TyperException) as raised:
            get_command(tiny).main(argv, "tiny", standalone_mode=False)
        assert raised.value.exit_code == 2, argv
        assert callable(getattr(raised.value, "show", None)), argv
        assert raised.value.format_message(), argv
    assert issubclass(typer.BadParameter, typer.TyperException)


def test_usage_error_shows_usage_hint_and_error_on_stderr(cli: Callable[..., Ran]) -> None:
    ran = cli("save", "--bogus")
    assert ran.exit_code == 2
    assert ran.stdout == ""
    assert ran.stderr.splitlines() == [
        "Usage: chatsave save [OPTIONS] [CHAT_ID]...",
        "Try 'chatsave save -h' for help.",
        "",
        "Error: No such option: --bogus",
    ]


def test_usage_error_with_json_writes_one_summary_line(cli: Callable[..., Ran]) -> None:
    ran = cli("save", "--bogus", "--json")
    assert ran.exit_code == 2
    assert ran.summary["error"] == {"code": "usage", "message": "No such option: --bogus",
                                    "hint": None}
    assert "Error: No such option: --bogus" in ran.stderr


def test_an_error_without_show_still_says_what_failed(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    show_typer_error(typer.TyperException("something Typer refused"))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "Error: something Typer refused\n"
