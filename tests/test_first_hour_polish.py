"""What people notice: one summary schema everywhere, errors that always say whether there is a
hint, completions for the shell asked for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chatsave.errors import ExitCode
from chatsave.output import SCHEMA_VERSION
from chatsave.store.migrations import LATEST
from tests.conftest import Ran


def test_status_json_says_the_summary_schema_and_the_store_schema_apart(
        cli: Callable[..., Ran], tmp_path: Path) -> None:
    dump = tmp_path / "one.jsonl"
    dump.write_text('{"chat_id": "c1", "id": "m1", "role": "user", "content": "hi", '
                    '"created_at": "2026-03-01T10:00:00.000Z"}\n')
    assert cli("import", str(dump)).exit_code == 0
    ran = cli("status", "--json")
    assert ran.exit_code == ExitCode.OK, ran.stderr
    assert ran.summary["schema_version"] == SCHEMA_VERSION == 1
    assert ran.summary["store_schema_version"] == LATEST


def test_an_error_in_json_always_carries_a_hint_field(cli: Callable[..., Ran]) -> None:
    with_hint = cli("save", "--all", "--json")  # no backend: usage error with a hint
    assert with_hint.exit_code == ExitCode.USAGE
    assert with_hint.summary["error"]["hint"]
    without = cli("trash", "list", "--chat", "not valid!", "--json")
    assert without.exit_code == ExitCode.USAGE
    assert "hint" in without.summary["error"]
    bad_flag = cli("save", "--no-such-flag", "--json")
    assert bad_flag.exit_code == ExitCode.USAGE
    assert bad_flag.summary["error"]["hint"] is None
