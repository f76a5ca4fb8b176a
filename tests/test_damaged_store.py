"""A damaged store is never a new store: refused (exit 10), left byte for byte, salvaged."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Ran, run_process

# Long enough that a leaf page of the messages table holds two of them: a damaged page
# loses a few messages, not the chat.
BODY = "x" * 1500
CONFIRMED = [{"chat_id": f"c{i % 4}", "id": f"m{i}", "role": "user", "content": f"{i} {BODY}",
              "created_at": f"2026-03-01T10:{i // 60:02d}:{i % 60:02d}Z"} for i in range(60)]
ONLY_HERE = [{"chat_id": "c9", "id": f"n{i}", "role": "assistant", "content": f"{i} {BODY}",
              "created_at": f"2026-03-02T10:00:{i:02d}Z"} for i in range(6)]


def write_jsonl(path: Path, messages: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(m) + "\n" for m in messages), encoding="utf-8")
    return path


@pytest.fixture
def backend_path(tmp_path: Path) -> Path:
    return tmp_path / "backend.db"


@pytest.fixture
def real_store(cli: Callable[..., Ran], tmp_path: Path, store_path: Path,
               backend_path: Path) -> Path:
    """A store built by import and save: 60 messages the backend confirmed, 6 only here."""
    assert cli("import", str(write_jsonl(tmp_path / "a.jsonl", CONFIRMED))).exit_code == 0
    assert cli("save", "--all", "--remote", str(backend_path)).exit_code == 0
    assert cli("import", str(write_jsonl(tmp_path / "b.jsonl", ONLY_HERE))).exit_code == 0
    return store_path


def messages_leaf_page(path: Path) -> tuple[int, int]:
    """(page number, page size) of a leaf page of the messages table in the middle."""
    conn = sqlite3.connect(path)
    try:
        pages = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf' "
            "ORDER BY pageno")]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    assert len(pages) >= 10
    return pages[len(pages) // 2], size


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "page":
        page, size = messages_leaf_page(path)
        with open(path, "r+b") as fh:
            fh.seek((page - 1) * size)
            fh.write(b"\xde\xad\xbe\xef" * (size // 4))
    elif how == "random":
        path.write_bytes(os.urandom(8192))
    elif how == "foreign":
        path.unlink()
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
        conn.close()
    else:
        raise AssertionError(how)


def snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    """The file's bytes, its mtime, and what lies beside it."""
    return (path.read_bytes(), path.stat().st_mtime_ns,
            sorted(p.name for p in path.parent.iterdir()))


COMMANDS: list[list[str]] = [
    ["status"], ["status", "c1"], ["import", "{dump}"], ["save", "--all", "--remote", "{be}"],
    ["sync", "--all", "--remote", "{be}"], ["diff", "--all", "--remote", "{be}"],
    ["export", "--output", "{out}"], ["trash", "list"], ["gc", "--remote", "{be}"],
    ["dedupe", "--all", "--dry-run"],
    ["fetch", "--all", "--remote", "{be}"], ["doctor", "c1"], ["delete", "c1", "m1", "--yes"],
]


@pytest.mark.parametrize("how", ["empty", "half", "page", "random", "foreign"])
@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_command_refuses_a_damaged_store_and_leaves_it_as_it_was(
        cli: Callable[..., Ran], real_store: Path, backend_path: Path, tmp_path: Path,
        how: str, args: list[str]) -> None:
    damage(real_store, how)
    (real_store.parent / "store.db.lock").unlink(missing_ok=True)
    before = snapshot(real_store)
    dump = write_jsonl(tmp_path / "c.jsonl", CONFIRMED[:1])
    argv = [a.format(dump=dump, be=backend_path, out=tmp_path / "out.jsonl") for a in args]
    ran = cli(*argv, "--json")
    assert ran.exit_code == 10, (argv, ran.stderr)
    assert ran.summary["exit_code"] == 10
    assert ran.summary["error"]["code"] == "store"
    assert "chatsave salvage" in ran.stderr and "chatsave sync --all" in ran.stderr
    assert "it was left as it is" in ran.stderr
    assert snapshot(real_store) == before


@pytest.mark.parametrize("how", ["empty", "half", "page"])
def test_a_real_process_exits_10_on_a_damaged_store(
        real_store: Path, proc_env: dict[str, str], tmp_path: Path, how: str) -> None:
    damage(real_store, how)
    before = snapshot(real_store)
    for argv in (["status"], ["import", str(write_jsonl(tmp_path / "d.jsonl", ONLY_HERE))]):
        done = run_process(*argv, env=proc_env)
        assert done.returncode == 10, done.stderr
        assert "corrupt or not a chatsave store" in done.stderr
        assert "chatsave salvage" in done.stderr
        assert "Traceback" not in done.stderr
    assert snapshot(real_store)[:2] == before[:2]


def test_an_empty_store_with_a_wal_beside_it_is_refused_and_both_are_kept(
        cli: Callable[..., Ran], store_path: Path) -> None:
    store_path.write_bytes(b"")
    wal = Path(f"{store_path}-wal")
    wal.write_bytes(b"\x37\x7f\x06\x82" + os.urandom(4092))
    wal_bytes = wal.read_bytes()
    ran = cli("status")
    assert ran.exit_code == 10
    assert "store.db-wal (4096 bytes) beside it is left as it is" in ran.stderr
    assert store_path.read_bytes() == b"" and wal.read_bytes() == wal_bytes


def test_a_wal_left_by_a_removed_store_is_not_replayed_into_a_new_one(
        cli: Callable[..., Ran], store_path: Path, tmp_path: Path) -> None:
    wal = Path(f"{store_path}-wal")
    wal.write_bytes(os.urandom(4096))
    ran = cli("import", str(write_jsonl(tmp_path / "e.jsonl", ONLY_HERE)))
    assert ran.exit_code == 10
    assert "left by a store that was removed or moved" in ran.stderr
    assert not store_path.exists()


def test_a_directory_at_the_store_path_is_exit_10(cli: Callable[..., Ran],
                                                   store_path: Path) -> None:
    store_path.mkdir()
    ran = cli("status")
    assert ran.exit_code == 10
    assert "is a directory" in ran.stderr


def test_a_backend_file_given_as_store_is_refused_and_not_migrated(
        cli: Callable[..., Ran], real_store: Path, backend_path: Path) -> None:
    before = snapshot(backend_path)
    ran = cli("status", "--store", str(backend_path))
    assert ran.exit_code == 10
    assert "not a chatsave store: it is a chatsave backend's database" in ran.stderr
    assert snapshot(backend_path)[:2] == before[:2]


def test_a_store_from_a_newer_chatsave_is_still_refused_untouched(
        cli: Callable[..., Ran], real_store: Path) -> None:
    conn = sqlite3.connect(real_store)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', '2030-01-01')")
    conn.commit()
    conn.close()
    before = snapshot(real_store)
    ran = cli("status", "--json")
    assert ran.exit_code == 10
    assert ran.summary["error"]["code"] == "store_newer"
    assert snapshot(real_store)[:2] == before[:2]


def test_a_store_the_user_cannot_read_is_exit_10(tmp_path: Path) -> None:
    """As another user than the owner (root reads everything): in a forked child that drops
    to ``nobody``, as the venv's interpreter may not be runnable by that user."""
    shared = Path(tempfile.mkdtemp(prefix="chatsave-perm-"))
    try:
        shared.chmod(0o755)
        path = shared / "store.db"
        from chatsave.store.store import Store

        Store.open(path).close()
        path.chmod(0o600)
        before = snapshot(path)
        code, stderr = _run_as_other_user(["status", "--store", str(path)])
        assert code == 10, stderr
        assert "cannot read the local store" in stderr and "Permission denied" in stderr
        assert snapshot(path) == before
    finally:
        shutil.rmtree(shared)


def _run_as_other_user(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in a child process as another user; (exit code, stderr)."""
    from typer.testing import CliRunner

    from chatsave.cli.app import app

    if os.geteuid() != 0:
        # Not root: the file is the user's own; taking its permissions away is the case.
        store = Path(argv[argv.index("--store") + 1])
        store.chmod(0o000)
        try:
            ran = CliRunner().invoke(app, argv, catch_exceptions=False)
        finally:
            store.chmod(0o600)
        return ran.exit_code, ran.stderr
    import pwd

    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.environ["HOME"] = "/nonexistent"
            ran = CliRunner().invoke(app, argv, catch_exceptions=False)
            os.write(write, json.dumps([ran.exit_code, ran.stderr]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    code, stderr = json.loads(data)
    return int(code), str(stderr)


# --------------------------------------------------------------------------- salvage
def local_ids(store: Path) -> set[tuple[str, str]]:
    conn = sqlite3.connect(store)
    try:
        return {(r[0], r[1]) for r in conn.execute("SELECT chat_id, id FROM messages")}
    finally:
        conn.close()


def test_salvage_recovers_undamaged_pages_and_sync_brings_back_the_rest(
        cli: Callable[..., Ran], real_store: Path, backend_path: Path, tmp_path: Path) -> None:
    everything = {(m["chat_id"], m["id"]) for m in CONFIRMED + ONLY_HERE}
    assert local_ids(real_store) == everything
    damage(real_store, "page")
    damaged = tmp_path / "store.db.damaged"
    real_store.rename(damaged)
    for leftover in real_store.parent.glob("store.db*"):
        leftover.unlink()
    before = snapshot(damaged)

    ran = cli("salvage", str(damaged), "--json")
    assert ran.exit_code == 1, ran.stderr  # some rows unreadable: skipped input, listed
    s = ran.summary
    unreadable = {(m["chat_id"], m["id"]) for m in s["unreadable_messages"]}
    assert s["unreadable"] == len(unreadable) >= 1
    assert s["salvaged"] == len(everything) - len(unreadable)
    assert s["invalid"] == 0
    assert local_ids(real_store) == everything - unreadable
    assert snapshot(damaged) == before
    # Salvaged messages are pending: the new store has no confirmation of any of them.
    assert cli("status", "--json").summary["pending_push"] == 0  # no backend known yet

    synced = cli("sync", "--all", "--remote", str(backend_path), "--json")
    assert synced.exit_code == 0, synced.stderr
    assert local_ids(real_store) == everything - (unreadable & {(m["chat_id"], m["id"])
                                                                for m in ONLY_HERE})
    assert cli("status", "--json").summary["pending_push"] == 0

    again = cli("salvage", str(damaged), "--json").summary
    assert again["salvaged"] == 0 and again["written"] == 0
    assert again["unchanged"] == len(everything) - len(unreadable)


def test_salvage_of_a_readable_store_is_exit_0_and_adds_no_duplicates(
        cli: Callable[..., Ran], real_store: Path, backend_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    shutil.copyfile(real_store, copy)
    ran = cli("salvage", str(copy), "--store", str(tmp_path / "new.db"), "--json")
    assert ran.exit_code == 0, ran.stderr
    assert ran.summary["salvaged"] == len(CONFIRMED) + len(ONLY_HERE)
    assert ran.summary["unreadable"] == 0
    into_itself = cli("salvage", str(copy), "--json")  # into the store it came from
    assert into_itself.exit_code == 0
    assert into_itself.summary["salvaged"] == 0
    assert into_itself.summary["unchanged"] == len(CONFIRMED) + len(ONLY_HERE)


def test_salvage_refuses_to_write_into_the_damaged_file(cli: Callable[..., Ran],
                                                        real_store: Path) -> None:
    ran = cli("salvage", str(real_store))
    assert ran.exit_code == 2
    assert "move it aside first" in ran.stderr


@pytest.mark.parametrize("how", ["empty", "random"])
def test_salvage_of_a_file_nothing_can_be_read_from_is_exit_10(
        cli: Callable[..., Ran], real_store: Path, tmp_path: Path, how: str) -> None:
    damage(real_store, how)
    damaged = tmp_path / "gone.db"
    shutil.copyfile(real_store, damaged)
    ran = cli("salvage", str(damaged), "--store", str(tmp_path / "new.db"))
    assert ran.exit_code == 10, ran.stderr
    assert "nothing in" in ran.stderr


def test_salvage_runs_as_a_real_process(real_store: Path, proc_env: dict[str, str],
                                        tmp_path: Path) -> None:
    damage(real_store, "page")
    damaged = tmp_path / "p.db"
    shutil.copyfile(real_store, damaged)
    done = run_process("salvage", str(damaged), "--store", str(tmp_path / "fresh.db"),
                       env=proc_env)
    assert done.returncode == 1, done.stderr
    assert "unreadable: chat" in done.stderr


# ----------------------------------------------------------- a store being written is whole
def test_a_store_another_process_is_writing_is_never_refused(tmp_path: Path) -> None:
    """While another process commits and checkpoints (SQLite writes the header's new page
    count before it grows the file), the check of the file never takes it for truncated."""
    from chatsave.errors import StoreError
    from chatsave.store.checks import _check_file
    from chatsave.store.store import Store

    path = tmp_path / "store.db"
    Store.open(path, create=True).close()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sqlite3
c = sqlite3.connect({str(path)!r}, isolation_level=None)
c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA synchronous=FULL')
c.execute('PRAGMA wal_autocheckpoint=50')
c.execute('CREATE TABLE filler (x BLOB)')
for i in range(60):
    c.execute('BEGIN')
    c.executemany('INSERT INTO filler VALUES (?)', [(os.urandom(3000),) for _ in range(100)])
    c.execute('COMMIT')
"""])
    checks, refused = 0, []
    try:
        while writer.poll() is None:
            checks += 1
            try:
                _check_file(path)
            except StoreError as exc:
                refused.append(exc.message)
    finally:
        writer.wait(60)
    assert writer.returncode == 0
    assert checks > 10 and refused == [], (checks, refused[:3])
