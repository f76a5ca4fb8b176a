"""What a newcomer meets first in import, export, save, sync and login: ``-`` as standard
output, empty input, rejections named with their reasons, credentials, and edits."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import ExitCode, UnavailableError
from chatsave.formats import Source
from chatsave.model import Message
from chatsave.ops.importing import ImportOptions, import_source
from chatsave.ops.save import DROPPED, REFUSED, TOO_LARGE, SaveOptions, rejection_kind, save
from chatsave.ops.trash import list_trash, restore
from chatsave.protocol import SaveAnswer
from chatsave.remote.base import Remote
from chatsave.store.store import Store
from tests.conftest import Ran

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def wire(chat_id: str, mid: str, content: str, minute: int = 0) -> dict[str, Any]:
    return {"chat_id": chat_id, "id": mid, "role": "user", "content": content,
            "created_at": (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.000Z")}


def jsonl(path: Path, *rows: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def on_backend(remote: Remote, chat_id: str) -> dict[str, tuple[str, int]]:
    """id -> (content, rev) of the live messages the backend holds in a chat."""
    out: dict[str, tuple[str, int]] = {}
    after = None
    while True:
        page = remote.messages(chat_id, after=after)
        out.update({m.id: (m.content, m.rev) for m in page.messages if not m.deleted})
        if page.next is None:
            return out
        after = page.next


@pytest.fixture
def embedded(tmp_path: Path) -> str:
    """An embedded backend, written as a path with a '/'."""
    return str(tmp_path / "backend.db")


@pytest.fixture
def imported(cli: Callable[..., Ran], tmp_path: Path) -> Path:
    """A store holding chat c: m1 and m2."""
    source = jsonl(tmp_path / "in.jsonl", wire("c", "m1", "first"), wire("c", "m2", "second", 1))
    ran = cli("import", str(source))
    assert ran.exit_code == 0, ran.stderr
    return source


# ------------------------------------------------------------------ 5. '-' is stdout
def test_export_to_dash_writes_stdout(cli: Callable[..., Ran], imported: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ran = cli("export", "-o", "-")
    assert ran.exit_code == 0, ran.stderr
    assert [json.loads(line)["id"] for line in ran.stdout.splitlines()] == ["m1", "m2"]
    assert not (tmp_path / "-").exists()
    assert "exported" not in ran.stderr  # no "to -": the data went where it was asked to


def test_export_to_dash_with_json_is_a_usage_error(cli: Callable[..., Ran], imported: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ran = cli("export", "-o", "-", "--json")
    assert ran.exit_code == 2
    lines = ran.json_lines()  # stdout holds JSON Lines and nothing else
    assert len(lines) == 1 and lines[0]["error"]["code"] == "usage"
    assert "standard output" in ran.stderr
    assert not (tmp_path / "-").exists()


def test_diff_combined_to_dash(cli: Callable[..., Ran], imported: Path, embedded: str,
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ran = cli("diff", "--all", "--remote", embedded, "--combined", "-")
    assert ran.exit_code == 1, ran.stderr
    # stdout holds the combined lines and nothing else (the report went to stderr).
    assert ran.stdout.splitlines() == ["+ c m1", "+ c m2"]
    assert "1 of 1 chat(s) differ" in ran.stderr
    assert not (tmp_path / "-").exists()
    refused = cli("diff", "--all", "--remote", embedded, "--combined", "-", "--json")
    assert refused.exit_code == 2
    assert refused.summary["error"]["code"] == "usage"  # stdout: JSON Lines only


def test_import_rejects_to_dash(cli: Callable[..., Ran], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = dict(wire("c", "m9", "x"), role="nobody")
    source = jsonl(tmp_path / "bad.jsonl", wire("c", "m1", "first"), bad)
    ran = cli("import", str(source), "--on-invalid", "skip", "--rejects", "-")
    assert ran.exit_code == 1, ran.stderr
    rejected = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [r["id"] for r in rejected] == ["m9"] and rejected[0]["item"]["role"] == "nobody"
    assert not (tmp_path / "-").exists()
    assert cli("import", str(source), "--on-invalid", "skip", "--rejects", "-",
               "--json").exit_code == 2


# ------------------------------------------------------------- 6. empty input
def test_import_of_an_empty_object_says_no_chats(cli: Callable[..., Ran],
                                                 tmp_path: Path) -> None:
    source = tmp_path / "empty.json"
    source.write_text("{}")
    ran = cli("import", str(source))
    assert ran.exit_code == 1
    assert "held no chats" in ran.stderr and "nothing new" not in ran.stderr
    as_json = cli("import", str(source), "--json")
    assert as_json.exit_code == 1
    assert as_json.summary["empty"] is True and as_json.summary["exit_code"] == 1
    assert any(e["type"] == "warning" for e in as_json.json_lines())


def test_import_of_a_directory_without_chat_files(cli: Callable[..., Ran],
                                                  tmp_path: Path) -> None:
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a chat")
    ran = cli("import", str(folder))
    assert ran.exit_code == 1
    assert "held no chats" in ran.stderr
    assert "readme.txt" in ran.stderr  # the note says what was passed over


def test_import_of_known_messages_is_still_success(cli: Callable[..., Ran],
                                                   imported: Path) -> None:
    again = cli("import", str(imported))
    assert again.exit_code == 0
    assert "nothing new" in again.stderr and "held no chats" not in again.stderr


def test_notes_cut_short_say_how_many_more(cli: Callable[..., Ran], tmp_path: Path) -> None:
    keys = {f"setting-{i:02d}": "1" for i in range(27)}
    keys["chat_c_messages"] = json.dumps([{"id": "m1", "sender": "user", "text": "hi",
                                           "timestamp": "2026-03-01T10:00:00Z"}])
    source = tmp_path / "dump.json"
    source.write_text(json.dumps(keys))
    ran = cli("import", str(source))
    assert ran.exit_code == 0, ran.stderr
    assert "27 note(s)" in ran.stderr
    assert "... and 7 more" in ran.stderr


# ------------------------------------------------------------------ 9. rejections
@pytest.mark.parametrize("reason, kind", [
    ("too large for this backend (52429052 bytes; it takes at most 8388608 per request)",
     TOO_LARGE),
    ("too large for the backend: POST /save: request too large (413)", TOO_LARGE),
    ("content larger than 1048576 bytes", TOO_LARGE),
    ("POST http://h/api/v1/chats/c/save: the backend rejected the save request "
     "(invalid: nope)", REFUSED),
    ("content_hash 'abc' does not match the content", REFUSED),
    ("not sent: AutoBot would drop it (a user message beginning like an earlier one)",
     DROPPED),
    ("its time is 2025-10-26 02:30:00 in Europe/Berlin, which happens twice there: AutoBot "
     "keeps naive local times", DROPPED),
    (None, REFUSED),
])
def test_rejection_kinds(reason: str | None, kind: str) -> None:
    assert rejection_kind(reason) == kind


@pytest.mark.parametrize("command", ["save", "sync"])
def test_save_and_sync_name_a_rejected_message_and_its_reason(
        cli: Callable[..., Ran], tmp_path: Path, embedded: str, command: str) -> None:
    big = wire("c", "big", "x" * (1024 * 1024 + 10))
    source = jsonl(tmp_path / "in.jsonl", wire("c", "m1", "first"), big)
    assert cli("import", str(source)).exit_code == 0
    ran = cli(command, "--all", "--remote", embedded)
    assert ran.exit_code == 4
    assert "message 'big'" in ran.stderr and "content larger than" in ran.stderr
    # Too large for the backend: sending it again cannot help, so that is not suggested.
    assert "--retry-rejected" not in ran.stderr
    again = cli(command, "--all", "--remote", embedded, "--json")
    assert again.exit_code == 4
    summary = again.summary
    assert summary["rejections"] == [{"chat_id": "c", "id": "big",
                                      "reason": "content larger than 1048576 bytes",
                                      "kind": TOO_LARGE}]
    assert summary["rejected_kinds"][TOO_LARGE] == 1


def test_save_lists_the_first_rejections_then_a_count(cli: Callable[..., Ran], tmp_path: Path,
                                                      embedded: str) -> None:
    rows = [wire("c", f"big{i}", "x" * (1024 * 1024 + 10), i) for i in range(7)]
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", *rows))).exit_code == 0
    ran = cli("save", "--all", "--remote", embedded)
    assert ran.exit_code == 4
    named = [line for line in ran.stderr.splitlines() if "content larger than" in line]
    assert len(named) == 5
    assert "... and 2 more" in ran.stderr


def test_a_rejection_a_retry_can_fix_keeps_the_hint(cli: Callable[..., Ran], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # 02:30 on 2025-10-26 happens twice in Berlin: AutoBot's naive local time cannot say
    # which, so the message is not written, and a retry (another zone, a repair) may be.
    monkeypatch.setenv("CHATSAVE_TZ", "Europe/Berlin")
    folder = tmp_path / "autobot"
    folder.mkdir()
    twice = dict(wire("c", "m1", "hi"), created_at="2025-10-26T00:30:00.000Z")
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", twice))).exit_code == 0
    ran = cli("save", "--all", "--remote", f"autobot-dir:{folder}", "--autobot-cache", "off")
    assert ran.exit_code == 4
    assert "message 'm1'" in ran.stderr and "happens twice" in ran.stderr
    assert "--retry-rejected" in ran.stderr


# ------------------------------------------------------------------ 11. credentials
@pytest.fixture
def guarded_server(tmp_path: Path, make_app: Callable[..., Any],
                   start_server: Callable[[Any], Any]) -> Any:
    from tests.test_security import tokens_file_for

    tokens = tokens_file_for(tmp_path / "tokens.json", alice="right-token-" + "a" * 40)
    return start_server(make_app(tokens=tokens))


def test_no_token_at_all_says_none_was_sent(cli: Callable[..., Ran], imported: Path,
                                            guarded_server: Any) -> None:
    ran = cli("save", "--all", "--remote", guarded_server.url)
    assert ran.exit_code == 9
    assert "no token was sent" in ran.stderr
    assert f"chatsave login --remote {guarded_server.url}" in ran.stderr


def test_a_wrong_token_is_named_with_where_it_comes_from(cli: Callable[..., Ran],
                                                         imported: Path, guarded_server: Any,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("CHATSAVE_TOKEN", "wrong-token-" + "b" * 40)
    ran = cli("diff", "--all", "--remote", guarded_server.url)
    assert ran.exit_code == 9
    assert "no token was sent" not in ran.stderr
    assert "does not accept the token" in ran.stderr and "CHATSAVE_TOKEN" in ran.stderr


def test_login_with_a_wrong_token_points_at_the_token_given(cli: Callable[..., Ran],
                                                            guarded_server: Any) -> None:
    ran = cli("login", "--remote", guarded_server.url, input="wrong-token-" + "c" * 40)
    assert ran.exit_code == 9
    hint = next(line for line in ran.stderr.splitlines() if line.startswith("hint:"))
    assert "stdin" in hint and "not stored" in hint
    assert "CHATSAVE_TOKEN" not in hint and "--token-file" not in hint


# ---------------------------------------------------------------------- 12. edits
def test_a_changed_message_is_refused_with_a_hint_that_names_update(
        cli: Callable[..., Ran], imported: Path, tmp_path: Path) -> None:
    changed = jsonl(tmp_path / "changed.jsonl", wire("c", "m1", "first, edited"))
    ran = cli("import", str(changed))
    assert ran.exit_code == 2
    assert "already holds different content" in ran.stderr
    hint = next(line for line in ran.stderr.splitlines() if line.startswith("hint:"))
    assert "--update" in hint
    assert "--on-invalid" not in hint and "--rename-invalid" not in hint


def test_import_update_then_save_pushes_the_edit_and_trash_restore_undoes_it(
        cli: Callable[..., Ran], imported: Path, tmp_path: Path, embedded: str) -> None:
    from chatsave.remote.embedded import EmbeddedRemote

    assert cli("save", "--all", "--remote", embedded).exit_code == 0
    changed = jsonl(tmp_path / "changed.jsonl", wire("c", "m1", "first, edited"))
    dry = cli("import", str(changed), "--update", "--dry-run")
    assert dry.exit_code == 1 and "would take 1 changed message(s)" in dry.stderr
    ran = cli("import", str(changed), "--update", "--json")
    assert ran.exit_code == 0, ran.stderr
    assert ran.summary["updated"] == 1 and ran.summary["rejected"] == 0
    assert [e["id"] for e in ran.json_lines() if e["type"] == "updated"] == ["m1"]
    trash = cli("trash", "list", "--json")
    assert any(e.get("id") == "m1" for e in trash.json_lines()), trash.stdout
    saved = cli("save", "--all", "--remote", embedded, "--json")
    assert saved.exit_code == 0, saved.stderr
    assert saved.summary["written"] == 1 and saved.summary["conflicts"] == 0
    with EmbeddedRemote(embedded) as remote:
        assert on_backend(remote, "c")["m1"] == ("first, edited", 2)
    assert cli("diff", "--all", "--remote", embedded).exit_code == 0
    # Undo: the replaced version comes back over the edit (the edit goes to the trash).
    undone = cli("trash", "restore", "m1", "--remote", embedded)
    assert undone.exit_code == 0, undone.stderr
    assert cli("diff", "--all", "--remote", embedded).exit_code == 0
    with EmbeddedRemote(embedded) as remote:
        assert on_backend(remote, "c")["m1"] == ("first", 3)
    exported = cli("export", "c")
    assert [json.loads(x)["content"] for x in exported.stdout.splitlines()] == \
        ["first", "second"]


def test_import_update_then_sync_pushes_the_edit(cli: Callable[..., Ran], imported: Path,
                                                 tmp_path: Path, embedded: str) -> None:
    from chatsave.remote.embedded import EmbeddedRemote

    assert cli("sync", "--all", "--remote", embedded).exit_code == 0
    changed = jsonl(tmp_path / "changed.jsonl", wire("c", "m2", "second, edited", 1))
    assert cli("import", str(changed), "--update").exit_code == 0
    ran = cli("sync", "--all", "--remote", embedded, "--json")
    assert ran.exit_code == 0, ran.stderr
    assert ran.summary["conflicts"] == 0 and ran.summary["written"] == 1
    with EmbeddedRemote(embedded) as remote:
        assert on_backend(remote, "c")["m2"] == ("second, edited", 2)
    assert cli("diff", "--all", "--remote", embedded).exit_code == 0


def _import(store: Store, path: Path, *, update: bool = False) -> Any:
    source = Source.open(str(path))
    try:
        return import_source(store, source, ImportOptions(update=update))
    finally:
        source.close()


class _Down:
    """A remote whose writes never get through: the batch stays open in the outbox."""

    def __init__(self, inner: Remote) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def save(self, chat_id: str, body: bytes, key: str) -> SaveAnswer:
        raise UnavailableError("down for the test")


def test_an_edit_abandons_the_open_batch_and_goes_with_base_rev(
        backend: Callable[[], Remote], stores: Callable[[str], Store], tmp_path: Path) -> None:
    store = stores("a")
    remote = backend()
    v1 = jsonl(tmp_path / "v1.jsonl", wire("c", "m1", "v1"), wire("c", "m2", "other", 1))
    assert _import(store, v1).exit_code == ExitCode.OK
    assert save(store, remote, None, SaveOptions()).exit_code == ExitCode.OK
    v2 = jsonl(tmp_path / "v2.jsonl", wire("c", "m1", "v2"))
    assert _import(store, v2, update=True).counters["updated"] == 1
    # A save of v2 whose request never gets through: its batch stays open.
    down = save(store, _Down(remote), None, SaveOptions())  # type: ignore[arg-type]
    assert down.exit_code == ExitCode.UNAVAILABLE
    ((open_id, open_key, open_body),) = store.conn.execute(
        "SELECT batch_id, idempotency_key, body FROM outbox WHERE state = 'open'").fetchall()
    sent = json.loads(open_body)["messages"]
    assert [(m["id"], m["content"], m.get("base_rev")) for m in sent] == [("m1", "v2", 1)]
    # v3 replaces v2 here before that batch was answered: the batch is abandoned, never
    # sent again under its key with other content.
    v3 = jsonl(tmp_path / "v3.jsonl", wire("c", "m1", "v3"))
    assert _import(store, v3, update=True).counters["updated"] == 1
    assert store.conn.execute("SELECT state FROM outbox WHERE batch_id = ?",
                              (open_id,)).fetchone()[0] == "abandoned"
    result = save(store, remote, None, SaveOptions())
    assert result.exit_code == ExitCode.OK, result.summary()
    assert on_backend(remote, "c") == {"m1": ("v3", 2), "m2": ("other", 1)}
    # v3 went in a batch of its own, under a new key (answered: only its key kept).
    after = store.conn.execute(
        "SELECT idempotency_key, state, message_ids, body FROM outbox WHERE batch_id > ?",
        (open_id,)).fetchall()
    assert [(state, ids, bytes(body)) for _, state, ids, body in after] == \
        [("done", "[]", b"")], after
    assert after[0][0] != open_key
    # Both replaced versions are in the trash.
    replaced = [e for e in list_trash(store, "c") if e["id"] == "m1"]
    assert len(replaced) == 2 and all(e["reason"].startswith(Store.EDITED) for e in replaced)


def test_an_edit_the_backend_never_confirmed_is_pushed_as_new(
        backend: Callable[[], Remote], stores: Callable[[str], Store], tmp_path: Path) -> None:
    store = stores("a")
    remote = backend()
    assert _import(store, jsonl(tmp_path / "v1.jsonl", wire("c", "m1", "v1"))).exit_code == 0
    assert _import(store, jsonl(tmp_path / "v2.jsonl", wire("c", "m1", "v2")),
                   update=True).counters["updated"] == 1
    assert save(store, remote, None, SaveOptions()).exit_code == ExitCode.OK
    assert on_backend(remote, "c") == {"m1": ("v2", 1)}


def test_an_edit_over_a_version_changed_on_the_backend_is_a_conflict(
        backend: Callable[[], Remote], stores: Callable[[str], Store], tmp_path: Path) -> None:
    """base_rev: the edit wins only over the version this store saw confirmed."""
    a, b = stores("a"), stores("b")
    remote = backend()
    v1 = jsonl(tmp_path / "v1.jsonl", wire("c", "m1", "v1"))
    for store in (a, b):
        assert _import(store, v1).exit_code == 0
        assert save(store, remote, None, SaveOptions()).exit_code == ExitCode.OK
    assert _import(b, jsonl(tmp_path / "b.jsonl", wire("c", "m1", "b's edit")),
                   update=True).counters["updated"] == 1
    assert save(b, remote, None, SaveOptions()).exit_code == ExitCode.OK
    assert _import(a, jsonl(tmp_path / "a.jsonl", wire("c", "m1", "a's edit")),
                   update=True).counters["updated"] == 1
    result = save(a, remote, None, SaveOptions())
    assert result.exit_code == ExitCode.CONFLICTS
    assert on_backend(remote, "c") == {"m1": ("b's edit", 2)}
    assert isinstance(a.get_message("c", "m1"), Message)
    assert a.get_message("c", "m1").content == "a's edit"  # type: ignore[union-attr]


def test_trash_restore_of_an_edited_version_without_a_remote(
        stores: Callable[[str], Store], tmp_path: Path) -> None:
    store = stores("a")
    assert _import(store, jsonl(tmp_path / "v1.jsonl", wire("c", "m1", "v1"))).exit_code == 0
    assert _import(store, jsonl(tmp_path / "v2.jsonl", wire("c", "m1", "v2")),
                   update=True).counters["updated"] == 1
    result = restore(store, None, ids=["m1"])
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 1
    assert store.get_message("c", "m1").content == "v1"  # type: ignore[union-attr]
    # Redo: the edit is in the trash now, and comes back the same way.
    assert restore(store, None, ids=["m1"]).counters["written"] == 1
    assert store.get_message("c", "m1").content == "v2"  # type: ignore[union-attr]
