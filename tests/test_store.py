"""The local store: schema migrations, the process lock between real processes, a full disk."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import StoreNewerError
from chatsave.model import Message, digest_of_sorted_lines
from chatsave.store.backend import BackendView
from chatsave.store.base import hash_sql, hash_value
from chatsave.store.migrations import LATEST, MIGRATIONS
from chatsave.store.store import Store
from tests.conftest import Soak, run_process, table_dump

EXPECTED_TABLES = {
    "schema_migrations": {"version", "name", "applied_at"},
    "meta": {"key", "value"},
    "chats": {"chat_id", "title", "created_at", "updated_at"},
    "messages": {"ord", "chat_id", "id", "role", "content", "created_at", "type", "metadata",
                 "attachments", "extra", "inexact", "content_hash", "fingerprint", "size",
                 "evicted", "run_id"},
    "id_mappings": {"kind", "original", "mapped", "source", "created_at", "run_id"},
    "runs": {"run_id", "command", "args", "started_at", "finished_at", "exit_code", "summary",
             "pid", "host", "version"},
    "backends": {"backend_key", "backend_id", "url", "first_seen", "last_seen", "last_sync"},
    "remote_state": {"backend_key", "chat_id", "id", "state", "rev", "content_hash", "reason",
                     "updated_at"},
    "outbox": {"batch_id", "backend_id", "chat_id", "kind", "idempotency_key", "body",
               "message_ids", "state", "attempts", "last_error", "created_at", "updated_at",
               "run_id"},
    "tombstones": {"chat_id", "id", "content_hash", "deleted_at", "reason", "run_id"},
    "trash": {"trash_id", "chat_id", "id", "content_hash", "message", "deleted_at", "reason",
              "run_id"},
    "sync_state": {"backend_id", "chat_id", "version", "digest", "synced_at"},
    "current_chat": {"place", "chat_id", "source", "recorded_at", "run_id"},
    "backend_checks": {"backend_id", "chat_id", "backend_digest", "confirmed_digest",
                       "checked_at"},
}


def schema(path: Path) -> dict[str, set[str]]:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        conn.close()


def test_blank_store_migrates_to_latest(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store.open(path) as store:
        assert store.schema_version == LATEST
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert schema(path) == EXPECTED_TABLES
    versions = sqlite3.connect(path).execute(
        "SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert versions == [(v, n) for v, n, _ in MIGRATIONS]


@pytest.mark.parametrize("old", [v for v, _, _ in MIGRATIONS[:-1]])
def test_store_saved_by_an_older_schema_migrates_keeping_data(tmp_path: Path, old: int) -> None:
    path = tmp_path / "old.db"
    with Store.open(path, target=old) as store:
        assert store.schema_version == old
        # Data as an older chatsave wrote it.
        store.conn.execute("INSERT INTO chats VALUES ('c1', 'T', NULL, '2026-01-01')")
        store.conn.execute(
            "INSERT INTO messages (chat_id, id, role, content, created_at, type, metadata,"
            " attachments, extra, content_hash, fingerprint, size) VALUES"
            " ('c1', 'm1', 'user', 'hi', '2026-01-01T00:00:00.000Z', 'message', '{}', '[]',"
            " '{}', 'h', 'f', 10)")
    with Store.open(path) as store:
        assert store.schema_version == LATEST
        assert [m.id for m in store.iter_messages("c1")] == ["m1"]
    assert schema(path) == EXPECTED_TABLES


def test_store_before_the_current_chat_migrates_and_records_one(tmp_path: Path) -> None:
    """A store of schema 2 (before the browser's current chat was kept) gains the table,
    keeps its chats, has no current chat until an import names one, then keeps it."""
    path = tmp_path / "v2.db"
    with Store.open(path, target=2) as store:
        assert "current_chat" not in schema(path)
        store.conn.execute("INSERT INTO chats VALUES ('c1', 'T', NULL, '2026-01-01')")
    with Store.open(path) as store:
        assert store.schema_version == LATEST >= 3
        assert store.chat_ids() == ["c1"]
        assert store.current_chat() is None
        with store.transaction():
            store.set_current_chat("c1", "key 'autobot-chat-store' sessions[0]", None)
    assert schema(path)["current_chat"] == EXPECTED_TABLES["current_chat"]
    with Store.open(path) as store:
        assert store.current_chat() == "c1"
        with store.transaction():
            store.set_current_chat("c2", None, None)
        assert store.current_chat() == "c2"
        assert store.conn.execute("SELECT COUNT(*) FROM current_chat").fetchone()[0] == 1
    versions = sqlite3.connect(path).execute(
        "SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert (3, "current_chat") in versions and versions[-1][0] == LATEST


def test_confirmations_of_schema_4_migrate_to_backend_keys_and_hash_bytes(
        tmp_path: Path) -> None:
    """A store as 0.1 wrote it (schema 4: confirmations keyed by the backend id, hashes and
    fingerprints as hex text) migrates to backend keys and 32-byte hashes, and every
    reading of it is the same: states, confirmed digests, what is pending, counts,
    fingerprints. A hash a backend answered that is not 64 hex digits stays as it came,
    and a confirmation whose backend has no row keeps it."""
    path = tmp_path / "v4.db"
    m1, m2 = (Message.model_validate({"chat_id": "c1", "id": f"m{n}", "role": "user",
                                      "content": f"text {n}",
                                      "created_at": f"2026-01-0{n}T00:00:00Z"})
              for n in (1, 2))
    with Store.open(path, target=4) as store, store.transaction():
        store.upsert_chat("c1", None)
        for m in (m1, m2):
            store.conn.execute(
                "INSERT INTO messages (chat_id, id, role, content, created_at, type,"
                " metadata, attachments, extra, content_hash, fingerprint, size)"
                " VALUES ('c1', ?, 'user', ?, ?, 'message', '{}', '[]', '{}', ?, ?, 10)",
                (m.id, m.content, m.created_at_text, m.content_hash, m.fingerprint))
        store.conn.executemany(
            "INSERT INTO backends (backend_id, url, first_seen, last_seen)"
            " VALUES (?, ?, '2026-01-01', '2026-01-02')",
            [("b-one", "http://one"), ("b-two", "http://two")])
        store.conn.executemany(
            "INSERT INTO remote_state VALUES (?, 'c1', ?, ?, ?, ?, ?, '2026-01-03')",
            [("b-one", "m1", "confirmed", 1, m1.content_hash, None),
             ("b-one", "m2", "conflict", 2, "not a hex hash", "different_content"),
             ("b-two", "m1", "rejected", None, m1.content_hash, "too large"),
             ("b-gone", "m1", "confirmed", 4, m1.content_hash, None)])
    with Store.open(path) as store:
        assert store.schema_version == LATEST
        one, two, gone = (BackendView(store, b) for b in ("b-one", "b-two", "b-gone"))
        assert one.states("c1") == {"m1": ("confirmed", 1, m1.content_hash),
                                    "m2": ("conflict", 2, "not a hex hash")}
        assert one.state_of("c1", "m2") == {"state": "conflict", "rev": 2,
                                            "content_hash": "not a hex hash",
                                            "reason": "different_content"}
        assert two.states("c1") == {"m1": ("rejected", None, m1.content_hash)}
        assert gone.states("c1") == {"m1": ("confirmed", 4, m1.content_hash)}
        expected = digest_of_sorted_lines([f"m1:{m1.content_hash}"])
        assert one.confirmed_digests({"c1"}) == {"c1": expected}
        assert [m.id for m in one.pending("c1")] == []
        assert [m.id for m in two.pending("c1")] == ["m2"]
        assert [m.id for m in two.pending("c1", retry_rejected=True)] == ["m1", "m2"]
        assert one.chat_counts()["c1"] == {"confirmed": 1, "pending_push": 0,
                                           "conflicts": 1, "rejected": 0}
        assert [(r[0], r[1]) for r in store.fingerprints("c1")] == [
            ("m1", m1.fingerprint), ("m2", m2.fingerprint)]
        stored = dict(store.conn.execute(
            "SELECT b.backend_id || '/' || r.id, typeof(r.content_hash) FROM remote_state r"
            " JOIN backends b USING (backend_key)").fetchall())
        assert stored == {"b-one/m1": "blob", "b-one/m2": "text", "b-two/m1": "blob",
                          "b-gone/m1": "blob"}
        assert store.conn.execute("SELECT url FROM backends WHERE backend_id = 'b-gone'"
                                  ).fetchone() == ("",)
        assert {t for t, in store.conn.execute("SELECT typeof(fingerprint) FROM messages")
                } == {"blob"}
        three = BackendView.register(store, "b-three", "http://three")
        with store.transaction():
            three.set_states("c1", [("m2", "confirmed", 7, m2.content_hash, None)])
        assert three.states("c1") == {"m2": ("confirmed", 7, m2.content_hash)}
        assert one.states("c1")["m1"] == ("confirmed", 1, m1.content_hash)
        assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.parametrize("text, kept_as", [
    ("0" * 64, "blob"), ("9f" * 32, "blob"),
    ("9F" * 32, "text"), ("9f" * 31 + "9", "text"), ("9f" * 32 + "\n", "text"),
    ("g" * 64, "text"), ("sha256:" + "9f" * 32, "text"), ("é" * 64, "text"), (None, "null")])
def test_a_hash_is_kept_as_bytes_only_when_it_is_64_hex_digits(text: str | None,
                                                               kept_as: str) -> None:
    """hash_value keeps 64 lowercase hex digits as their 32 bytes and anything else as it
    came; hash_sql reads either back as the text it was."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (h TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (hash_value(text),))
    assert conn.execute(f"SELECT typeof(h), {hash_sql('h')} FROM t").fetchone() == (
        kept_as, text)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 'x')", (LATEST + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreNewerError, match="newer than this chatsave"):
        Store.open(path)


def test_transaction_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.upsert_chat("c1", "T")
        raise RuntimeError("boom")
    assert store.chat_ids() == []


# --------------------------------------------------------------------------- the lock
def _holder(proc_env: dict[str, str]) -> subprocess.Popen[str]:
    """A real `chatsave import -` that holds the store lock while it waits for stdin."""
    proc = subprocess.Popen([sys.executable, "-m", "chatsave", "import", "-"], env=proc_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lock = Path(proc_env["CHATSAVE_HOME"]) / "store.db.lock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the holder never took the lock")


GOOD_LINE = json.dumps({"chat_id": "c1", "id": "m1", "role": "user", "content": "hi",
                        "created_at": "2026-01-01T00:00:00.000Z"}) + "\n"


def _lock_holder_pid(lock: Path) -> int:
    """The pid the lock file names (its holder writes it once it holds the flock)."""
    return int(json.loads(lock.read_text())["pid"])


def _wait_until_open(proc: subprocess.Popen[str], path: Path) -> None:
    """Wait until ``proc`` has ``path`` open (it reached the lock), or fail."""
    fds = Path(f"/proc/{proc.pid}/fd")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, ("it ended before it reached the lock",
                                     proc.communicate())
        with contextlib.suppress(OSError):  # an fd closed while we read the directory
            if any(os.readlink(fd) == str(path.resolve()) for fd in fds.iterdir()):
                return
        time.sleep(0.02)
    raise AssertionError(f"pid {proc.pid} never opened {path}")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/<pid>/fd")
def test_lock_contention_between_two_processes(proc_env: dict[str, str], tmp_path: Path) -> None:
    holder = _holder(proc_env)
    lock = Path(proc_env["CHATSAVE_HOME"]) / "store.db.lock"
    waiter: subprocess.Popen[str] | None = None
    try:
        assert _lock_holder_pid(lock) == holder.pid
        source = tmp_path / "in.jsonl"
        source.write_text(GOOD_LINE)
        second = run_process("import", str(source), "--json", env=proc_env)
        assert second.returncode == 7, second.stderr
        assert f"pid {holder.pid}" in second.stderr
        assert "chatsave import" in second.stderr
        summary = json.loads(second.stdout.splitlines()[-1])
        assert summary["exit_code"] == 7 and summary["error"]["code"] == "locked"
        # With --lock-wait the second waits for the first to finish, then runs.
        waiter = subprocess.Popen([sys.executable, "-m", "chatsave", "import", str(source),
                                   "--lock-wait", "30", "--json"], env=proc_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Once it has the lock file open it is at the lock; the holder still holds it
        # (its pid is in the file), so the waiter is waiting: it cannot have run.
        _wait_until_open(waiter, lock)
        assert _lock_holder_pid(lock) == holder.pid
        assert waiter.poll() is None, waiter.communicate()
        _, err = holder.communicate(GOOD_LINE, timeout=30)
        assert holder.returncode == 0, err
        out, waited_err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, waited_err
        assert json.loads(out.splitlines()[-1])["exit_code"] == 0
        # It ran after the holder had finished, not beside it.
        with sqlite3.connect(Path(proc_env["CHATSAVE_HOME"]) / "store.db") as db:
            runs = dict(db.execute("SELECT pid, started_at FROM runs").fetchall())
            held_until = db.execute("SELECT finished_at FROM runs WHERE pid = ?",
                                    (holder.pid,)).fetchone()[0]
        assert set(runs) == {holder.pid, waiter.pid}, runs
        assert runs[waiter.pid] >= held_until, (runs, held_until)
        assert lock.read_text() == "", "released: the file names no holder"
    finally:
        for proc in (holder, *([waiter] if waiter is not None else [])):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_lock_of_a_killed_process_is_taken_over(proc_env: dict[str, str], tmp_path: Path) -> None:
    holder = _holder(proc_env)
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=10)
    source = tmp_path / "in.jsonl"
    source.write_text(GOOD_LINE)
    ran = run_process("import", str(source), env=proc_env)
    assert ran.returncode == 0, ran.stderr
    assert "stale lock" in ran.stderr and f"pid {holder.pid}" in ran.stderr


def test_read_only_commands_do_not_need_the_lock(proc_env: dict[str, str]) -> None:
    holder = _holder(proc_env)
    try:
        ran = run_process("status", env=proc_env)
        assert ran.returncode == 0, ran.stderr
    finally:
        holder.kill()
        holder.communicate()


# ------------------------------------------------------------------------- disk full
def _big_dump(path: Path, chats: int = 300, per_chat: int = 20) -> Path:
    data = {}
    for c in range(chats):
        msgs = [{"sender": "user" if i % 2 else "bot", "text": f"chat {c} message {i} " * 20,
                 "timestamp": f"2025-08-04 10:{i // 60:02d}:{i % 60:02d}"}
                for i in range(per_chat)]
        data[f"chat_c{c}_messages"] = json.dumps(msgs)
    path.write_text(json.dumps(data))
    return path


def _limit_file_size(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_import_leaves_store_as_it_was(proc_env: dict[str, str],
                                                       tmp_path: Path, store_path: Path) -> None:
    source = tmp_path / "first.jsonl"
    source.write_text(GOOD_LINE)
    assert run_process("import", str(source), env=proc_env).returncode == 0
    before = table_dump(store_path)
    big = _big_dump(tmp_path / "big.json")
    ran = run_process("import", str(big), "--json", env=proc_env,
                      preexec_fn=_limit_file_size(store_path.stat().st_size + 256 * 1024))
    assert ran.returncode == 10, ran.stderr
    assert "Traceback" not in ran.stderr
    assert "nothing was half-written" in ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1])["exit_code"] == 10
    assert table_dump(store_path) == before
    with Store.open(store_path) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # Once there is room, the same import goes through.
    again = run_process("import", str(big), env=proc_env)
    assert again.returncode == 0, again.stderr
    with Store.open(store_path) as store:
        assert store.counts()["messages"] == 1 + 300 * 20


# ------------------------------------------------------------------- bounded memory
@pytest.mark.slow
def test_large_legacy_dump_imports_in_bounded_memory(tmp_path: Path, store: Store,
                                                     soak: Soak) -> None:
    """10,000 chat_{id}_messages keys stream through: memory does not follow the dump's size.
    (A plain run: 2,000 keys; the bounds follow the size, json.load still needs > size.)"""
    import tracemalloc

    from chatsave.formats import Source
    from chatsave.normalize import TimeContext
    from chatsave.ops.importing import ImportOptions, import_source

    chats = soak.size(10_000, 2_000)
    path = tmp_path / "huge.json"
    with path.open("w") as fh:
        fh.write("{")
        for c in range(chats):
            msgs = [{"sender": "user" if i % 2 else "bot", "text": f"message {i} of chat {c} " * 8,
                     "timestamp": f"{1_724_200_000_000 + c * 1000 + i}"} for i in range(4)]
            fh.write(("," if c else "") + json.dumps(f"chat_c{c}_messages") + ":"
                     + json.dumps(json.dumps(msgs)))
        fh.write("}")
    size = path.stat().st_size
    assert size > 1_000 * chats  # 10 MB at full size
    source = Source.open(str(path))
    tracemalloc.start()
    try:
        result = import_source(store, source, ImportOptions(times=TimeContext()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        source.close()
    assert result.exit_code == 0
    assert result.counters["written"] == 4 * chats
    # Streaming: the peak stays a small fraction of the dump (json.load alone needs > size):
    # under 8 MB at full size.
    print(f"peak {peak} bytes for a {size}-byte dump")
    assert peak < 800 * chats, f"peak {peak} bytes for a {size}-byte dump"


def test_a_group_commit_commits_when_its_outermost_block_ends(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store.db") as store:
        group = store.group_commit(interval=0)
        with group:
            with group:  # a block inside another (a batch loaded while answers are read)
                store.upsert_chat("c1", None)
            assert store.conn.in_transaction, "the inner block does not commit"
            store.upsert_chat("c2", None)
        assert not store.conn.in_transaction
        with Store.open(tmp_path / "store.db") as other:
            assert other.chat_ids() == ["c1", "c2"]
