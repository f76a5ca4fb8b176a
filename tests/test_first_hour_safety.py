"""The first hour's safety rules: a mistake never looks like success, and nothing is left
lying about that others can read.

A remote is a URL, a path with a ``/`` or a ``file:`` URL, never a bare word; a malformed
URL is a usage error that quotes it; read-only commands create no store; a new store is
created atomically and private (0600 in 0700 directories).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsave.store.store import Store
from tests.conftest import Ran, run_process

MSGS = [
    {"chat_id": "c1", "id": "m1", "role": "user", "content": "hi",
     "created_at": "2026-03-01T10:00:00Z"},
    {"chat_id": "c1", "id": "m2", "role": "assistant", "content": "hello",
     "created_at": "2026-03-01T10:00:05Z"},
]


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in MSGS), encoding="utf-8")
    return path


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own: where a bare word taken as a path would land."""
    path = tmp_path / "cwd"
    path.mkdir()
    monkeypatch.chdir(path)
    return path


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask, under which files are created 0644 unless chatsave says otherwise
    (a subprocess inherits it)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def error(ran: Ran) -> dict[str, Any]:
    return dict(ran.summary["error"])


# ------------------------------------------------------------------ 1. bare-word remotes
@pytest.mark.parametrize(("spec", "said", "hint"), [
    ("127.0.0.1:18701", "did you mean http://127.0.0.1:18701?", "http://127.0.0.1:18701"),
    ("localhost:8000", "did you mean http://localhost:8000?", "http://localhost:8000"),
    ("[::1]:8000", "did you mean http://[::1]:8000?", "http://[::1]:8000"),
    ("backend.db", "'backend.db' is neither a URL nor a path", "./backend.db"),
])
@pytest.mark.parametrize("command", ["save", "diff"])
def test_a_bare_word_remote_is_refused_and_creates_nothing(
        cli: Any, dump: Path, here: Path, spec: str, said: str, hint: str,
        command: str) -> None:
    assert cli("import", str(dump)).exit_code == 0
    ran = cli(command, "--all", "--remote", spec, "--json")
    assert ran.exit_code == 2, ran.stderr
    assert said in error(ran)["message"]
    assert hint in error(ran)["hint"]
    if spec == "backend.db":
        assert "http://backend.db" in error(ran)["hint"]
    assert list(here.iterdir()) == [], "nothing is created for a refused remote"
    assert cli("status", "--json").summary.get("backends") == []


def test_a_cron_typo_in_the_remote_exits_2_in_a_real_process(
        proc_env: dict[str, str], dump: Path, here: Path) -> None:
    """The field report: sync --remote HOST:PORT saved into a new file and exited 0."""
    assert run_process("import", str(dump), env=proc_env, cwd=here).returncode == 0
    done = run_process("sync", "--all", "--remote", "127.0.0.1:18701", env=proc_env, cwd=here)
    assert done.returncode == 2, done.stderr
    assert "did you mean http://127.0.0.1:18701?" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(here.iterdir()) == []


@pytest.mark.parametrize("spelling", ["./backend.db", "sub/backend.db", "ABS", "file:backend.db",
                                      "~/backend.db"])
def test_a_new_embedded_backend_is_said_and_private(
        cli: Any, dump: Path, here: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None,
        spelling: str) -> None:
    monkeypatch.setenv("HOME", str(here))
    expected = here / ("sub/backend.db" if spelling == "sub/backend.db" else "backend.db")
    spec = str(expected) if spelling == "ABS" else spelling
    assert cli("import", str(dump)).exit_code == 0
    ran = cli("save", "--all", "--remote", spec)
    assert ran.exit_code == 0, ran.stderr
    said = [line for line in ran.stderr.splitlines() if "new embedded backend" in line]
    assert said == [f"created a new embedded backend at {expected}"]
    assert mode(expected) == 0o600
    if spelling == "sub/backend.db":
        assert mode(expected.parent) == 0o700
    again = cli("save", "--all", "--remote", spec)
    assert again.exit_code == 0 and "new embedded backend" not in again.stderr


def _recorded_as_in_0_1(store_path: Path, bare: str) -> None:
    """chatsave 0.1 recorded an embedded backend under the name it was given."""
    conn = sqlite3.connect(store_path)
    with conn:
        assert conn.execute("UPDATE backends SET url = ?", (bare,)).rowcount == 1
    conn.close()


def test_a_bare_name_the_store_already_used_keeps_working_with_a_warning(
        cli: Any, dump: Path, here: Path, store_path: Path, tmp_path: Path) -> None:
    assert cli("import", str(dump)).exit_code == 0
    assert cli("save", "--all", "--remote", "./backend.db").exit_code == 0
    _recorded_as_in_0_1(store_path, "backend.db")
    (here / "c2.jsonl").write_text(json.dumps({**MSGS[0], "chat_id": "c2"}) + "\n")
    assert cli("import", str(here / "c2.jsonl")).exit_code == 0
    ran = cli("save", "--all", "--remote", "backend.db", "--json")
    assert ran.exit_code == 0, ran.stderr
    assert ran.summary["written"] == 1
    warnings = [line for line in ran.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "./backend.db" in warnings[0], ran.stderr
    assert sorted(p.name for p in here.iterdir()) == ["backend.db", "c2.jsonl"]
    # Where that file is not (cron's working directory), the bare name is refused, not
    # created.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    refused = cli("save", "--all", "--remote", "backend.db", "--json")
    assert refused.exit_code == 2
    assert "./backend.db" in error(refused)["hint"]
    assert list(elsewhere.iterdir()) == []


def test_a_bare_name_the_store_never_used_is_refused_even_if_the_file_exists(
        cli: Any, dump: Path, here: Path) -> None:
    assert cli("import", str(dump)).exit_code == 0
    assert cli("save", "--all", "--remote", "./backend.db").exit_code == 0
    (here / "other.db").write_bytes((here / "backend.db").read_bytes())
    ran = cli("save", "--all", "--remote", "other.db", "--json")
    assert ran.exit_code == 2
    assert "./other.db" in error(ran)["hint"]


# -------------------------------------------------------------- 15. malformed URLs
@pytest.mark.parametrize("url", ["http://[::1", "http://host:99999", "https://",
                                 "http://host:abc/", "autobot+http://[::1"])
def test_a_malformed_url_is_a_usage_error_that_quotes_it(cli: Any, dump: Path,
                                                         url: str) -> None:
    assert cli("import", str(dump)).exit_code == 0
    ran = cli("save", "--all", "--remote", url, "--json")
    assert ran.exit_code == 2, ran.stderr
    assert repr(url) in error(ran)["message"]
    assert "internal error" not in ran.stderr


def test_a_malformed_url_is_exit_2_in_a_real_process(proc_env: dict[str, str],
                                                     dump: Path) -> None:
    assert run_process("import", str(dump), env=proc_env).returncode == 0
    done = run_process("sync", "--all", "--remote", "http://[::1", env=proc_env)
    assert done.returncode == 2, done.stderr
    assert "'http://[::1'" in done.stderr and "internal error" not in done.stderr


# ------------------------------------------------------- 4. read-only commands create nothing
def test_status_of_a_store_that_does_not_exist_says_so_and_creates_nothing(
        cli: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "store.db"
    ran = cli("status", "--store", str(missing))
    assert ran.exit_code == 0, ran.stderr
    assert f"no store at {missing} yet" in ran.stdout
    as_json = cli("status", "--store", str(missing), "--json")
    assert as_json.exit_code == 0
    event = next(e for e in as_json.json_lines() if e["type"] == "status")
    assert event["exists"] is False and event["chats"] == 0 and event["store"] == str(missing)
    named = cli("status", "c1", "--store", str(missing), "--json")
    assert named.exit_code == 2
    assert error(named)["message"] == f"no store at {missing} yet"
    assert error(named)["code"] == "no_store"
    assert not (tmp_path / "nonexistent").exists()


@pytest.fixture
def backend_with_c1(cli: Any, dump: Path, here: Path, tmp_path: Path) -> str:
    """./backend.db holding chat c1, saved there from another store."""
    other = str(tmp_path / "other" / "store.db")
    assert cli("import", str(dump), "--store", other).exit_code == 0
    assert cli("save", "--all", "--remote", "./backend.db", "--store", other).exit_code == 0
    return "./backend.db"


# A read-only command on a store that does not exist reads it as empty and says so; its
# exit code follows: a named chat that neither side holds is 2.
READ_ONLY = {
    "export": (("export",), 0),
    "export a chat": (("export", "c1"), 2),
    "diff": (("diff", "--all", "--remote", "./backend.db"), 1),
    "diff a chat the backend has": (("diff", "c1", "--remote", "./backend.db"), 1),
    "diff a chat nobody has": (("diff", "c9", "--remote", "./backend.db"), 2),
    "doctor": (("doctor", "c1"), 2),
    "trash list": (("trash", "list"), 0),
    "sync --dry-run": (("sync", "--all", "--dry-run", "--remote", "./backend.db"), 1),
    "dedupe --dry-run": (("dedupe", "--all", "--dry-run", "--remote", "./backend.db"), 0),
    "delete --dry-run": (("delete", "c1", "m1", "--dry-run"), 2),
    "trash empty --dry-run": (("trash", "empty", "--older-than", "1d", "--dry-run"), 0),
}


@pytest.mark.parametrize(("args", "code"), READ_ONLY.values(), ids=READ_ONLY.keys())
def test_read_only_commands_on_a_missing_store_say_so_and_create_nothing(
        cli: Any, home: Path, here: Path, backend_with_c1: str, args: tuple[str, ...],
        code: int) -> None:
    ran = cli(*args)
    assert ran.exit_code == code, ran.stderr
    said = [line for line in ran.stderr.splitlines() if "no store at" in line]
    assert said == [f"warning: no store at {home / 'store.db'} yet: read as empty, and not "
                    "created (a command that writes creates it)"], ran.stderr
    assert list(home.iterdir()) == []
    assert sorted(p.name for p in here.iterdir()) == ["backend.db"]


def test_a_command_that_writes_creates_the_store_and_says_so_once(
        cli: Any, dump: Path, tmp_path: Path) -> None:
    path = tmp_path / "new" / "store.db"
    first = cli("import", str(dump), "--store", str(path))
    assert first.exit_code == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if "store" in line]
    assert said == [f"created a new store at {path}"]
    again = cli("import", str(dump), "--store", str(path))
    assert again.exit_code == 0 and "created" not in again.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.db", "store.db.lock"]


def test_a_store_appears_only_once_its_schema_is_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chatsave.store.store as store_module

    path = tmp_path / "store.db"
    real = store_module.migrate
    seen: list[bool] = []

    def watching(conn: sqlite3.Connection, **kwargs: Any) -> int:
        seen.append(path.exists())
        return real(conn, **kwargs)

    monkeypatch.setattr(store_module, "migrate", watching)
    with Store.open(path) as store:
        assert store.created and store.schema_version > 0
    assert seen and seen[0] is False, "the schema is built before the store is in place"


def test_a_store_whose_creation_fails_leaves_nothing_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chatsave.store.store as store_module
    from chatsave.errors import StoreError

    path = tmp_path / "store.db"
    real = store_module.migrate

    def half(conn: sqlite3.Connection, **kwargs: Any) -> int:
        real(conn, **{**kwargs, "target": 1})
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_module, "migrate", half)
    with pytest.raises(StoreError):
        Store.open(path)
    assert list(tmp_path.iterdir()) == [], "no half-made store, no temporary file"


def test_two_openers_creating_one_store_share_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    barrier = threading.Barrier(4)
    ids: list[str] = []
    created: list[bool] = []

    def open_one() -> None:
        barrier.wait()
        with Store.open(path) as store:
            ids.append(store.conn.execute(
                "SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0])
            created.append(store.created)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 4
    assert created.count(True) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.db"]


# ------------------------------------------------------------------- 7. private files
def test_a_new_store_and_its_directories_are_private(proc_env: dict[str, str], dump: Path,
                                                     tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    done = run_process("import", str(dump), "--store", str(path), env=proc_env)
    assert done.returncode == 0, done.stderr
    assert mode(path) == 0o600
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    assert "warning" not in done.stderr


def test_the_wal_and_shm_files_are_private_too(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "store.db"
    with Store.open(path) as store:
        with store.transaction() as conn:
            store.upsert_chat("c1")
            conn.execute("SELECT 1")
        for name in ("store.db", "store.db-wal", "store.db-shm"):
            assert mode(tmp_path / name) == 0o600, name


def test_an_existing_store_others_can_read_gets_a_warning_not_a_chmod(
        cli: Any, dump: Path, store_path: Path) -> None:
    assert cli("import", str(dump)).exit_code == 0
    os.chmod(store_path, 0o644)
    ran = cli("status")
    assert ran.exit_code == 0
    warnings = [line for line in ran.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, ran.stderr
    assert f"chmod 600 {store_path}" in warnings[0] and "-rw-r--r--" in warnings[0]
    assert mode(store_path) == 0o644, "said, not changed behind the owner's back"
    os.chmod(store_path, 0o600)
    assert "warning" not in cli("status").stderr
