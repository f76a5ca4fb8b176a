"""The support flow end to end, through the front door, against the fake AutoBot, step by step.

The README's support-flow block itself runs as written in tests/test_readme.py (its exit
codes and outcome); this test walks the same recipe through ``--json`` and checks what
each step reports: the symbols, the traps, the rejections, the copies removed, and a
localStorage image under a budget small enough to leave a chat out.

A user's chats lost messages: the backend kept two, the browser's localStorage holds seven
(two of them copies a retried save made) and a second chat the backend never got. Support
imports the dump, compares it with the backend, saves what is missing (AutoBot refuses
the copies itself, and chatsave says so), removes the copies, checks the chat, and gives
the user a pruned localStorage image. Nothing is lost on the way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from chatsave.errors import ExitCode
from tests.autobot_fake import FakeAutobot
from tests.conftest import DATA, Ran

SUPPORT = DATA / "autobot-support"
S = "9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d"
T = "c2d3e4f5-6a7b-4c8d-9e0f-1a2b3c4d5e6f"
NEW_CHAT = "5b1d8a52-0c1e-4f11-9a0e-5d7f4b1c2e3a"


def mid(n: int) -> str:
    return f"a1b2c3d4-0000-4000-8000-{n:012d}"


def events(ran: Ran, type_: str) -> list[dict[str, Any]]:
    return [e for e in ran.json_lines() if e["type"] == type_]


def test_support_flow(cli: Callable[..., Ran], tmp_path: Path,
                      start_server: Callable[[Any], Any],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The AutoBot server runs in Berlin: its naive times are Berlin time.
    monkeypatch.setenv("CHATSAVE_TZ", "Europe/Berlin")
    chats = Path(shutil.copytree(SUPPORT / "chats", tmp_path / "chats"))
    fake = FakeAutobot(chats, tz=ZoneInfo("Europe/Berlin")).serve(start_server)
    remote = ("--remote", fake.remote)

    # 1. Import the user's localStorage dump (secrets in it are passed over, never shown).
    imported = cli("import", str(SUPPORT / "dump.json"), "--json")
    assert imported.exit_code == 0, imported.stderr
    assert imported.summary["written"] == 9
    assert "a-users-secret-jwt" not in imported.stdout + imported.stderr

    # 2. Diff against the backend: what is missing there, the copies, and no conflict
    #    (same id, role and text is the same message: the backend's seconds-precision
    #    Berlin times, its llm_response type and the browser's metadata do not matter).
    compared = cli("diff", "--all", *remote, "--json")
    assert compared.exit_code == ExitCode.DIFFERENCES
    symbols = {e["id"]: e["symbol"] for e in events(compared, "item")}
    assert symbols == {mid(3): "+", mid(4): "+", mid(5): "D", mid(6): "D", mid(7): "+",
                       mid(8): "+", mid(9): "+"}
    assert compared.summary["conflicts"] == 0

    # 3. Doctor names the traps: the copy AutoBot's loader would collapse, and the empty
    #    second "New Chat" the web client left behind.
    doctor = cli("doctor", S, *remote, "--json")
    traps = {(e["where"], e["trap"]) for e in events(doctor, "trap")}
    assert ("local", "repeated_user_message") in traps
    assert ("backend", "empty_new_chat") in traps

    # 4. Save what is missing: the full list each time, read back; AutoBot refuses the
    #    two copies (its loader keeps the first user message, its merge the longest of
    #    two replies 30 s apart): reported, exit 4, both kept here.
    saved = cli("save", "--all", *remote, "--json")
    assert saved.exit_code == ExitCode.REJECTED, saved.stderr
    assert saved.summary["written"] == 5 and saved.summary["unchanged"] == 2
    assert {e["id"] for e in events(saved, "rejected")} == {mid(5), mid(6)}
    on_backend = [m["id"] for m in fake.stored(S)]
    assert on_backend == [mid(n) for n in (1, 2, 3, 4, 7)]
    assert [m["id"] for m in fake.stored(T)] == [mid(8), mid(9)]
    assert {m["timestamp"] for m in fake.stored(S)} >= {"2026-03-01 11:01:00",
                                                      "2026-03-01 11:05:00"}

    # 5. Dedupe finds the two copies AutoBot refused. The backend holds the messages they
    #    copy, by hash, so dedupe removes them here (to the trash, undoable).
    deduped = cli("dedupe", S, *remote, "--yes", "--max-delete", "50%", "--json")
    assert deduped.exit_code == ExitCode.OK, deduped.stderr
    assert deduped.summary["duplicates_found"] == 2
    assert deduped.summary["duplicates_removed"] == 2
    assert {e["id"] for e in events(deduped, "duplicate")} == {mid(5), mid(6)}
    assert all(e["removable_here"] and not e["on_backend"]
               for e in events(deduped, "duplicate"))
    trash = cli("trash", "list", "--json")
    assert {e["id"] for e in events(trash, "trash")} == {mid(5), mid(6)}

    # 6. Both sides agree now; the backend holds every message exactly once.
    agreed = cli("diff", "--all", *remote, "--json")
    assert agreed.exit_code == 0, agreed.stdout
    assert sorted(m["id"] for m in fake.stored(S)) == [mid(n) for n in (1, 2, 3, 4, 7)]

    # 7. A pruned localStorage image for the user: no copies, every message in it on the
    #    backend, within the budget; what is left out is safe on the backend.
    image = tmp_path / "restore.json"
    exported = cli("export", "--format", "localstorage", "--budget", "3KB", *remote,
                   "--output", str(image), "--json")
    assert exported.exit_code == 0, exported.stderr
    dump = json.loads(image.read_text())
    state = json.loads(dump["autobot-chat-store"])
    kept = {m["id"] for s in state["sessions"] for m in s["messages"]}
    backend = {m["id"] for c in (S, T) for m in fake.stored(c)}
    assert kept and kept <= backend and not kept & {mid(5), mid(6)}
    browser_bytes = sum(2 * (len(k) + len(v)) for k, v in dump.items())
    assert browser_bytes <= 3000
    left_out = {e["chat_id"] for e in events(exported, "left_out")}
    assert left_out == {S}  # the older chat; the recent one fits
    assert {s["id"] for s in state["sessions"]} == {T}
    full = tmp_path / "full.json"
    assert cli("export", "--format", "localstorage", "--output", str(full)).exit_code == 0
    everything = json.loads(json.loads(full.read_text())["autobot-chat-store"])
    assert {m["id"] for s in everything["sessions"] for m in s["messages"]} == backend
