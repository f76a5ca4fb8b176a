"""A clean stop: SIGTERM to a real ``chatsave serve`` during a real ``chatsave save``.

The server finishes the requests in flight (or applies none of one) and exits 0; the
client's run ends with the rest pending; the next ``save`` against the server started again
on the same database sends what is missing, and nothing is stored twice: every message
is on the backend once, at its first revision.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from chatsave.errors import ExitCode
from tests.conftest import Ran, run_process
from tests.server_fixtures import ServeProcess, wait_until

CHATS, PER_CHAT = 150, 20


def _server_messages(db: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT chat_id, id, rev FROM messages").fetchall()


def test_sigterm_during_a_save_loses_no_acknowledgement(
        tmp_path: Path, spawn_server: Callable[..., ServeProcess],
        cli: Callable[..., Ran], proc_env: dict[str, str]) -> None:
    source = tmp_path / "chats.jsonl"
    with source.open("w") as out:
        for c in range(CHATS):
            for m in range(PER_CHAT):
                out.write(json.dumps({
                    "chat_id": f"c{c:03d}", "id": f"m{m:02d}", "role": "user",
                    "content": f"message {m} of chat {c} " + "x" * 200,
                    "created_at": f"2026-03-01T10:{m:02d}:00Z"}) + "\n")
    assert cli("import", str(source)).exit_code == 0
    db = tmp_path / "server.db"
    first = spawn_server(db)
    env = {**proc_env, "CHATSAVE_RETRY_ATTEMPTS": "2"}
    client = subprocess.Popen(
        [sys.executable, "-m", "chatsave", "save", "--all", "--remote", first.url, "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: db.exists() and len(_server_messages(db)) >= 5 * PER_CHAT, 60,
                   "the save to be under way")
        os.killpg(first.pid, signal.SIGTERM)
        assert first.proc is not None and first.proc.wait(30) == 0, "a clean stop exits 0"
        stdout, stderr = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
    summary = json.loads(stdout.splitlines()[-1])
    if client.returncode == ExitCode.OK:  # it finished within the grace period
        assert summary["written"] == CHATS * PER_CHAT
    else:
        # Some chats saved, the rest pending (the server gone): a partial run.
        assert client.returncode == ExitCode.PARTIAL, (client.returncode, stderr)
        assert summary["pending_push"] > 0 and "rerun chatsave save to resume" in stderr
    stored_then = len(_server_messages(db))
    assert 5 * PER_CHAT <= stored_then <= CHATS * PER_CHAT

    second = spawn_server(db)
    again = run_process("save", "--all", "--remote", second.url, "--json", env=env,
                        timeout=180)
    assert again.returncode == ExitCode.OK, again.stderr
    after = json.loads(again.stdout.splitlines()[-1])
    assert after["pending_push"] == 0
    # Whatever the first run did not hear back about was sent again under its key: a
    # batch the server applied is replayed (answered as before), never applied twice.
    assert summary["written"] + after["written"] + after["unchanged"] == CHATS * PER_CHAT
    rows = _server_messages(db)
    assert len(rows) == CHATS * PER_CHAT == len({(c, m) for c, m, _ in rows}), "nothing missing"
    assert {rev for _, _, rev in rows} == {1}, "nothing applied twice"
