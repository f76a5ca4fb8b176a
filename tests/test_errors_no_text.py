"""No message text in errors: a row the store cannot read is named, never quoted."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Ran, run_process
from tests.test_first_hour_safety import MSGS

CANARY = "CANARY-7f3a-SECRET-BODY"


@pytest.fixture
def poisoned(cli: Callable[..., Ran], tmp_path: Path, store_path: Path) -> Path:
    """A store whose message c1/m2 holds the canary followed by bytes that are not UTF-8."""
    dump = tmp_path / "in.jsonl"
    dump.write_text("".join(json.dumps(m) + "\n" for m in MSGS), encoding="utf-8")
    assert cli("import", str(dump)).exit_code == 0
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE messages SET content = CAST(? AS TEXT) WHERE id = 'm2'",
                 (CANARY.encode() + b" \xff\xfe",))
    conn.commit()
    conn.close()
    return store_path


@pytest.mark.parametrize(("args", "code"), [
    (["export"], 10),
    (["export", "--json", "--output", "{out}"], 10),
    (["save", "--all", "--json", "--remote", "{be}"], 10),
    (["sync", "--all", "--json", "--remote", "{be}"], 10),
    # These read ids and hashes only: what they report is true, and they say nothing of it.
    (["status", "--json"], 0),
    (["diff", "--all", "--json", "--remote", "{be}"], 1),
])
def test_a_row_that_cannot_be_decoded_is_named_never_quoted(
        cli: Callable[..., Ran], poisoned: Path, tmp_path: Path, args: list[str],
        code: int) -> None:
    argv = [a.format(out=tmp_path / "out.jsonl", be=tmp_path / "backend.db") for a in args]
    ran = cli(*argv)
    assert CANARY not in ran.stdout and CANARY not in ran.stderr
    assert ran.exit_code == code, ran.stderr
    if code == 10:
        assert "chat_id 'c1' id 'm2'" in ran.stderr
        assert "not UTF-8 (column 'content')" in ran.stderr
    if "--json" in argv:
        summary = ran.summary
        assert summary["exit_code"] == code
        if code == 10:
            assert summary["error"]["details"]["rows"] == [
                {"table": "messages", "chat_id": "c1", "id": "m2"}]


def test_a_real_process_keeps_the_canary_out_of_its_output(
        poisoned: Path, proc_env: dict[str, str], tmp_path: Path) -> None:
    done = run_process("sync", "--all", "--json", "--remote", str(tmp_path / "b.db"),
                       env=proc_env)
    assert done.returncode == 10
    assert CANARY not in done.stdout and CANARY not in done.stderr
    assert "Traceback" not in done.stderr


def test_sqlite_error_text_loses_the_value_it_quotes() -> None:
    from chatsave.store.checks import error_text

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (content TEXT)")
    conn.execute("INSERT INTO t VALUES (CAST(? AS TEXT))", (CANARY.encode() + b"'\xff",))
    with pytest.raises(sqlite3.OperationalError) as caught:
        conn.execute("SELECT content FROM t").fetchall()
    assert CANARY in str(caught.value)  # what sqlite3 itself says
    assert error_text(caught.value) == "Could not decode to UTF-8 column 'content'"


def test_an_untranslated_sqlite_error_reaching_the_funnel_is_a_store_error(
        cli: Callable[..., Ran], poisoned: Path) -> None:
    """trash restore reads the store without the store's translation: the funnel still
    reports exit 10 without the text (not an internal error quoting it)."""
    conn = sqlite3.connect(poisoned)
    conn.execute("INSERT INTO trash (chat_id, id, content_hash, message, deleted_at)"
                 " VALUES ('c1', 'm9', 'h', CAST(? AS TEXT), '2026-03-01T10:00:00Z')",
                 (CANARY.encode() + b"\xff",))
    conn.commit()
    conn.close()
    ran = cli("trash", "restore", "m9", "--json", "--remote", str(poisoned.parent / "b.db"))
    assert CANARY not in ran.stdout and CANARY not in ran.stderr
    assert ran.exit_code == 10, ran.stderr
    assert "table trash chat_id 'c1' id 'm9'" in ran.stderr


def test_an_import_refusal_names_fields_never_their_text(cli: Callable[..., Ran],
                                                         tmp_path: Path) -> None:
    """Two content fields that disagree: the item is refused by its fields and sizes, in
    stderr, the --json rejections and the --rejects file alike."""
    dump = tmp_path / "in.jsonl"
    dump.write_text(json.dumps({**MSGS[0], "text": CANARY}) + "\n", encoding="utf-8")
    rejects = tmp_path / "rejects.jsonl"
    ran = cli("import", str(dump), "--json", "--on-invalid", "skip", "--rejects", str(rejects))
    assert ran.exit_code == 1, ran.stderr
    assert "conflicting content fields (content: 2 character(s), text: 23 character(s))" in \
        " ".join(ran.summary["rejections"])
    assert CANARY not in ran.stdout and CANARY not in ran.stderr
    reasons = [json.loads(line).get("reason", "") for line in
               rejects.read_text(encoding="utf-8").splitlines()]
    assert reasons and all(CANARY not in r for r in reasons)
