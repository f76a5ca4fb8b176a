"""What people notice, continued: progress on a terminal (counts, rate, time left) and none
off it; help that reads right (flags without a value type, every group with an example,
trash restore --dry-run); a message restored by sync in its place; no store or backend
file left behind by a dry run or a refused remote; a malformed login URL is a usage error."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from chatsave.errors import ExitCode
from chatsave.output import Output
from tests.conftest import Ran, table_dump

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# What a progress display leaves in a stream: its bar, a carriage return, escape codes.
PROGRESS_TRACES = ("━", "\r", "\x1b[", "messages/s", "chats/s", "B/s")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def jsonl(path: Path, chat_id: str, times: list[int], *, first: int = 1,
          words: str = "text") -> Path:
    """Messages m{first}.. of one chat, at 10:00 + the given minutes, one a line."""
    with path.open("a", encoding="utf-8") as fh:
        for n, minute in enumerate(times, start=first):
            fh.write(json.dumps({"chat_id": chat_id, "id": f"m{n}",
                                 "role": "user" if n % 2 else "assistant",
                                 "content": f"{words} {n}",
                                 "created_at": f"2025-08-04T10:{minute:02d}:00.000Z"}) + "\n")
    return path


def exported_ids(cli: Callable[..., Ran], store: Path, chat_id: str) -> list[str]:
    ran = cli("export", chat_id, "--store", str(store))
    assert ran.exit_code == ExitCode.OK, ran.stderr
    return [json.loads(line)["id"] for line in ran.stdout.splitlines()]


# ----------------------------------------------------------------------- 8. progress
def terminal() -> tuple[Output, io.StringIO]:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, stderr=True)
    return Output(err_console=console), buf


def test_progress_on_a_terminal_shows_counts_rate_and_time_left() -> None:
    out, buf = terminal()
    with out.progress("saving") as progress:
        progress(stage="sending", total=1000, unit="message")
        for _ in range(6):
            progress(100)
            time.sleep(0.06)
        shown = plain(buf.getvalue())
    assert "sending" in shown
    assert "/1,000 messages" in shown  # done of total, in its unit
    assert re.search(r"[\d,]+ messages/s", shown), shown  # the rate
    assert re.search(r"\d:\d\d:\d\d", shown), shown  # the time left
    assert "━" in shown  # the bar


def test_progress_counts_bytes_as_sizes_and_a_new_stage_from_zero() -> None:
    out, buf = terminal()
    with out.progress("importing") as progress:
        progress(stage="importing", total=2_000_000, unit="byte")
        progress(500_000)
        time.sleep(0.15)
        progress(stage="comparing", total=4, unit="chat")
        progress(1)
        time.sleep(0.15)
    shown = plain(buf.getvalue())
    assert "0.5/2.0 MB" in shown or "500.0 kB/2.0 MB" in shown, shown
    assert "1/4 chats" in shown, shown


@pytest.mark.parametrize("mode", [{"quiet": True}, {"json_mode": True}])
def test_no_progress_with_quiet_or_json_even_on_a_terminal(mode: dict[str, bool]) -> None:
    buf = io.StringIO()
    out = Output(err_console=Console(file=buf, force_terminal=True, stderr=True), **mode)
    with out.progress("saving") as progress:
        progress(stage="sending", total=10, unit="message")
        progress(10)
    assert buf.getvalue() == ""


class Recorder:
    """A progress callback that keeps what it was told, stage by stage."""

    def __init__(self) -> None:
        self.stages: list[dict[str, Any]] = []

    def __call__(self, advance: int = 0, /, *, total: int | None = None,
                 stage: str | None = None, unit: str | None = None) -> None:
        if stage is not None:
            self.stages.append({"stage": stage, "total": total, "unit": unit, "done": 0})
        elif advance:
            self.stages[-1]["done"] += advance

    def stage(self, name: str) -> dict[str, Any]:
        return next(s for s in self.stages if s["stage"] == name)


def test_operations_report_totals_and_what_is_done(tmp_path: Path) -> None:
    from chatsave.formats import Source
    from chatsave.ops.diff import diff
    from chatsave.ops.importing import ImportOptions, import_source
    from chatsave.ops.save import SaveOptions, save
    from chatsave.ops.sync import SyncOptions, sync
    from chatsave.remote.embedded import EmbeddedRemote
    from chatsave.store.store import Store

    dump = jsonl(tmp_path / "in.jsonl", "c1", [1, 2, 3])
    jsonl(dump, "c2", [4, 5], first=4)
    with Store.open(tmp_path / "store.db") as store, \
            EmbeddedRemote(tmp_path / "backend.db") as remote:
        imported = Recorder()
        source = Source.open(str(dump))
        try:
            import_source(store, source, ImportOptions(), progress=imported)
        finally:
            source.close()
        size = dump.stat().st_size
        assert imported.stage("importing") == {"stage": "importing", "total": size,
                                               "unit": "byte", "done": size}
        saved = Recorder()
        save(store, remote, None, SaveOptions(), progress=saved)
        assert saved.stage("sending") == {"stage": "sending", "total": 5, "unit": "message",
                                          "done": 5}
        compared = Recorder()
        diff(store, remote, None, progress=compared)
        assert compared.stage("comparing") == {"stage": "comparing", "total": 2,
                                               "unit": "chat", "done": 2}
        synced = Recorder()
        sync(store, remote, None, SyncOptions(), progress=synced)
        assert synced.stage("comparing")["done"] == synced.stage("comparing")["total"] == 2


def _every_command(cli: Callable[..., Ran], tmp_path: Path, *extra: str) -> dict[str, Ran]:
    """import, save, sync, diff, dedupe, gc and fetch, as a user runs them."""
    dump = jsonl(tmp_path / "in.jsonl", "c1", [1, 2, 3, 4])
    jsonl(dump, "c2", [5, 6], first=5)
    remote = ("--remote", str(tmp_path / "backend.db"))
    return {
        "import": cli("import", str(dump), *extra),
        "save": cli("save", "--all", *remote, *extra),
        "sync": cli("sync", "--all", *remote, *extra),
        "diff": cli("diff", "--all", *remote, *extra),
        "dedupe": cli("dedupe", "--all", "--dry-run", *remote, *extra),
        "gc": cli("gc", "--budget", "1KB", *remote, *extra),
        "fetch": cli("fetch", "--all", *remote, *extra),
    }


def test_every_long_command_shows_its_progress_on_a_terminal(
        cli: Callable[..., Ran], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    ran = _every_command(cli, tmp_path)
    expected = {"import": ("importing", "kB"), "save": ("sending", "messages"),
                "sync": ("comparing", "chats"), "diff": ("comparing", "chats"),
                "dedupe": ("examining", "chats"), "gc": ("checking", "chats"),
                "fetch": ("fetching", "messages")}
    for name, (stage, unit) in expected.items():
        assert ran[name].exit_code in (ExitCode.OK, ExitCode.DIFFERENCES), \
            (name, ran[name].stderr)
        shown = plain(ran[name].stderr)
        assert stage in shown and unit in shown, (name, shown)
        assert "━" in shown, (name, shown)
    assert "6/6 messages" in plain(ran["save"].stderr)
    assert "2/2 chats" in plain(ran["diff"].stderr)


@pytest.mark.parametrize("extra", [(), ("--quiet",), ("--json",)], ids=repr)
def test_no_progress_on_stderr_off_a_terminal_or_with_quiet_or_json(
        cli: Callable[..., Ran], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        extra: tuple[str, ...]) -> None:
    if extra:
        monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal, but --quiet or --json
    for name, ran in _every_command(cli, tmp_path, *extra).items():
        assert ran.exit_code in (ExitCode.OK, ExitCode.DIFFERENCES), (name, ran.stderr)
        for trace in PROGRESS_TRACES:
            assert trace not in ran.stderr, (name, trace, ran.stderr)
        for stage in ("importing", "sending", "comparing", "examining", "checking",
                      "fetching"):
            assert stage not in ran.stderr, (name, ran.stderr)


# ----------------------------------------------------------------------- 18. help
def test_flags_show_no_value_type_and_ids_read_once_in_brackets(
        cli: Callable[..., Ran]) -> None:
    for path in (["save"], ["sync"], ["trash", "restore"], [], ["serve"], ["login"]):
        ran = cli(*path, "--help")
        assert ran.exit_code == 0
        assert "<bool>" not in ran.stdout, path
        assert "[[" not in ran.stdout, path
    usage = cli("save", "--help").stdout
    assert "Usage: chatsave save [OPTIONS] [CHAT_ID]..." in usage


@pytest.mark.parametrize("path", [[], ["trash"], ["serve", "token"]], ids=repr)
def test_every_group_has_an_example(cli: Callable[..., Ran], path: list[str]) -> None:
    ran = cli(*path, "--help")
    assert ran.exit_code == 0
    assert re.search(r"Example: chatsave \S", ran.stdout), ran.stdout


def test_trash_restore_dry_run_says_what_it_would_restore_and_changes_nothing(
        cli: Callable[..., Ran], tmp_path: Path, store_path: Path) -> None:
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", "c1", [1, 2, 3]))).exit_code == 0
    assert cli("delete", "c1", "m2", "--yes").exit_code == 0
    before = table_dump(store_path)
    ran = cli("trash", "restore", "m2", "--dry-run")
    assert ran.exit_code == ExitCode.DIFFERENCES, ran.stderr
    assert "would restore 1 message(s)" in ran.stderr
    assert "'m2'" in ran.stderr
    assert table_dump(store_path) == before
    as_json = cli("trash", "restore", "m2", "--dry-run", "--json")
    assert as_json.summary["would_restore"] == 1
    planned = [e for e in as_json.json_lines() if e["type"] == "planned"]
    assert [(e["chat_id"], e["id"]) for e in planned] == [("c1", "m2")]
    assert table_dump(store_path) == before
    assert exported_ids(cli, store_path, "c1") == ["m1", "m3"]


def test_trash_restore_dry_run_with_nothing_to_restore_exits_0(
        cli: Callable[..., Ran], tmp_path: Path, store_path: Path) -> None:
    # v1 is edited into v2 and back: v1's entry in the trash is the version live again.
    jsonl(tmp_path / "v1.jsonl", "c1", [1, 2])
    jsonl(tmp_path / "v2.jsonl", "c1", [1, 2], words="edited")
    assert cli("import", str(tmp_path / "v1.jsonl")).exit_code == 0
    assert cli("import", str(tmp_path / "v2.jsonl"), "--update").exit_code == 0
    first_edit = cli("trash", "list", "--json").json_lines()[0]["run_id"]
    assert cli("import", str(tmp_path / "v1.jsonl"), "--update").exit_code == 0
    before = table_dump(store_path)
    ran = cli("trash", "restore", "--run", str(first_edit), "--dry-run")
    assert ran.exit_code == ExitCode.OK, ran.stderr
    assert "nothing would be restored" in ran.stderr
    assert table_dump(store_path) == before


def test_trash_restore_dry_run_creates_no_store(cli: Callable[..., Ran],
                                                store_path: Path) -> None:
    ran = cli("trash", "restore", "m1", "--dry-run")
    assert ran.exit_code == ExitCode.USAGE  # not in the (empty) trash
    assert not store_path.exists()


# ------------------------------------------------- 20. a message restored in its place
def test_a_message_restored_by_sync_takes_its_place_and_leaves_the_trash(
        cli: Callable[..., Ran], tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    remote = ("--remote", str(tmp_path / "backend.db"))
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", "c", [1, 2, 3, 4])),
               "--store", str(a)).exit_code == 0
    assert cli("sync", "--all", "--store", str(a), *remote).exit_code == 0
    assert cli("sync", "--all", "--store", str(b), *remote).exit_code == 0
    # b deletes m2 (on the backend too); a's sync takes the deletion (m2 to a's trash).
    assert cli("delete", "c", "m2", "--yes", "--store", str(b), *remote).exit_code == 0
    assert cli("sync", "--all", "--store", str(a), *remote).exit_code == 0
    assert exported_ids(cli, a, "c") == ["m1", "m3", "m4"]
    assert [e["id"] for e in cli("trash", "list", "--json", "--store", str(a)).json_lines()
            if e["type"] == "trash"] == ["m2"]
    # b restores it (on the backend too); a's sync brings it back.
    assert cli("trash", "restore", "m2", "--store", str(b), *remote).exit_code == 0
    synced = cli("sync", "--all", "--store", str(a), *remote, "--json")
    assert synced.exit_code == ExitCode.OK, synced.stderr
    assert synced.summary["plan"]["take_backend"] == 1
    assert exported_ids(cli, a, "c") == ["m1", "m2", "m3", "m4"]
    trash = [e for e in cli("trash", "list", "--json", "--store", str(a)).json_lines()
             if e["type"] == "trash"]
    assert trash == [], "the trash still says m2 is deleted"


def test_a_message_restored_from_the_trash_takes_its_place(
        cli: Callable[..., Ran], tmp_path: Path, store_path: Path) -> None:
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", "c", [1, 2, 3, 4]))).exit_code == 0
    assert cli("import", str(jsonl(tmp_path / "d.jsonl", "d", [5, 6]))).exit_code == 0
    assert cli("delete", "c", "m2", "--yes").exit_code == 0
    assert cli("trash", "restore", "m2").exit_code == 0
    assert exported_ids(cli, store_path, "c") == ["m1", "m2", "m3", "m4"]
    assert exported_ids(cli, store_path, "d") == ["m1", "m2"]


def test_a_message_coming_back_finds_its_place_without_a_free_slot(tmp_path: Path) -> None:
    """The store's order numbers are shared by every chat: when none is free between a
    message's neighbours, the chat's later messages move behind it (other chats stay)."""
    from chatsave.model import Message
    from chatsave.store.store import Store

    def msg(chat_id: str, mid: str, minute: int, text: str = "x") -> Message:
        return Message.model_validate({"chat_id": chat_id, "id": mid, "role": "user",
                                       "content": f"{text} {mid}",
                                       "created_at": f"2025-08-04T10:{minute:02d}:00Z"})

    with Store.open(tmp_path / "store.db") as store:
        with store.transaction():
            store.upsert_chat("c", None)
            store.upsert_chat("d", None)
            store.add_messages("c", [msg("c", "m1", 1), msg("c", "m3", 3)])
            store.add_messages("d", [msg("d", "n1", 1), msg("d", "n2", 2)])
            store.add_messages("c", [msg("c", "m4", 4)])
            store.trash_messages("c", ["m3"], "deleted with chatsave", None)
        with store.transaction():
            # m2 was never here; m3 comes back in another version.
            store.bring_back(msg("c", "m2", 2), None)
            store.replace_message(msg("c", "m3", 3, "other"), None,
                                  "replaced by the backend's version")
        assert [m.id for m in store.iter_messages("c")] == ["m1", "m2", "m3", "m4"]
        assert [m.id for m in store.iter_messages("d")] == ["n1", "n2"]
        (reason,) = store.conn.execute("SELECT reason FROM trash WHERE id = 'm3'").fetchone()
        assert reason == "deleted with chatsave; then replaced by the backend's version"
        assert store.tombstone("c", "m3") is None


# ------------------------------------------------------------------ loose ends
def test_login_with_a_malformed_url_is_a_usage_error(cli: Callable[..., Ran]) -> None:
    ran = cli("login", "--remote", "http://[::1", input="token\n")
    assert ran.exit_code == ExitCode.USAGE, ran.stderr
    assert "malformed remote URL 'http://[::1'" in ran.stderr
    assert "internal" not in ran.stderr


def test_dry_runs_of_import_and_save_create_no_store_and_no_backend(
        cli: Callable[..., Ran], tmp_path: Path, store_path: Path) -> None:
    dump = jsonl(tmp_path / "in.jsonl", "c", [1, 2])
    backend = tmp_path / "backend.db"
    ran = cli("import", str(dump), "--dry-run")
    assert ran.exit_code == ExitCode.DIFFERENCES, ran.stderr
    assert "would import 2 new message(s)" in ran.stderr
    assert not store_path.exists()
    ran = cli("save", "--from", str(dump), "--dry-run", "--remote", str(backend))
    assert ran.exit_code == ExitCode.DIFFERENCES, ran.stderr
    assert "would send 2 message(s)" in ran.stderr
    assert "not created" in ran.stderr
    assert not store_path.exists()
    assert not backend.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "in.jsonl"]


def test_a_dry_run_of_sync_creates_no_embedded_backend(
        cli: Callable[..., Ran], tmp_path: Path) -> None:
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", "c", [1]))).exit_code == 0
    backend = tmp_path / "backend.db"
    ran = cli("sync", "--all", "--dry-run", "--remote", str(backend), "--json")
    assert ran.exit_code == ExitCode.DIFFERENCES, ran.stderr
    assert ran.summary["plan"]["push"] == 1
    assert not backend.exists()
    assert cli("status", "--json").summary["backends"] == []  # nothing recorded either


@pytest.mark.parametrize("command", [["save", "--all"], ["sync", "--all"]], ids=" ".join)
def test_a_refused_remote_leaves_no_new_store_behind(
        cli: Callable[..., Ran], store_path: Path, command: list[str]) -> None:
    ran = cli(*command, "--remote", "127.0.0.1:8000")
    assert ran.exit_code == ExitCode.USAGE, ran.stderr
    assert "http://127.0.0.1:8000" in ran.stderr
    assert not store_path.exists()
    assert not store_path.parent.joinpath("store.db.lock").exists()
