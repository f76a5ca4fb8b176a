"""``chatsave doctor``: the AutoBot traps in one chat, on the backend's copy and the local one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import ExitCode
from chatsave.remote.autobot import rules
from tests.autobot_fake import FakeAutobot
from tests.conftest import DATA, Ran

DEMO = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def traps(ran: Ran) -> dict[str, dict[str, Any]]:
    return {f"{e['where']}:{e['trap']}": e for e in ran.json_lines() if e["type"] == "trap"}


def write_chat(folder: Path, chat_id: str, messages: list[dict[str, Any]],
               name: str = "Chat") -> None:
    (folder / f"{chat_id}_chat.json").write_text(json.dumps(
        {"chatId": chat_id, "name": name, "messages": messages,
         "last_modified": "2026-03-01 10:10:00", "created_time": "2026-03-01 10:00:00"}))


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    folder = tmp_path / "chats"
    folder.mkdir()
    return folder


def test_names_every_trap_in_a_chat_file(chats: Path, cli: Callable[..., Ran]) -> None:
    write_chat(chats, "c1", [
        {"id": "u1", "sender": "user", "text": "yes", "timestamp": "2026-03-01 10:00:00"},
        {"id": "a1", "sender": "assistant", "text": "short", "messageType": "llm_response",
         "timestamp": "2026-03-01 10:00:05"},
        {"id": "a2", "sender": "assistant", "text": "a longer reply", "messageType": "response",
         "timestamp": "2026-03-01 10:01:00"},
        {"sender": "user", "text": "yes", "timestamp": "2026-03-01T10:30:00.000Z"}])
    ran = cli("doctor", "c1", "--remote", f"autobot-dir:{chats}", "--json")
    assert ran.exit_code == ExitCode.DIFFERENCES
    found = traps(ran)
    assert set(found) >= {"backend:mixed_timestamps", "backend:repeated_user_message",
                          "backend:adjacent_streaming", "backend:no_id"}
    assert found["backend:adjacent_streaming"]["ids"] == ["a1"]
    assert len(found["backend:repeated_user_message"]["ids"]) == 1
    assert ran.summary["traps_found"] == len(found)
    assert "yes" not in json.dumps(list(found.values()))  # ids and reasons, never bodies


def test_a_clean_chat_has_no_trap(chats: Path, cli: Callable[..., Ran]) -> None:
    write_chat(chats, "c1", [
        {"id": "u1", "sender": "user", "text": "hello", "timestamp": "2026-03-01 10:00:00"},
        {"id": "a1", "sender": "assistant", "text": "hi", "messageType": "llm_response",
         "timestamp": "2026-03-01 10:00:05"}])
    ran = cli("doctor", "c1", "--remote", f"autobot-dir:{chats}", "--json")
    assert ran.exit_code == 0 and traps(ran) == {}


def test_the_local_copy_is_checked_as_autobot_would_hold_it(cli: Callable[..., Ran],
                                                            tmp_path: Path) -> None:
    lines = [{"chat_id": "c1", "id": "u1", "role": "user", "content": "yes",
              "created_at": "2026-03-01T10:00:00.000Z"},
             {"chat_id": "c1", "id": "u2", "role": "user", "content": "yes",
              "created_at": "2026-03-01T11:00:00.000Z"}]
    dump = tmp_path / "c1.jsonl"
    dump.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli("import", str(dump)).exit_code == 0
    ran = cli("doctor", "c1", "--json")
    assert ran.exit_code == ExitCode.DIFFERENCES
    assert traps(ran)["local:repeated_user_message"]["ids"] == ["u2"]
    refused = cli("doctor", "c1", "--remote", str(tmp_path / "backend.db"), "--json")
    assert refused.exit_code == ExitCode.USAGE
    assert cli("doctor", "nope", "--json").exit_code == ExitCode.USAGE


def test_a_failed_load_and_the_empty_second_session_through_http(
        chats: Path, cli: Callable[..., Ran], start_server: Callable[[Any], Any]) -> None:
    fake = FakeAutobot(chats).serve(start_server)
    fake.put("c1", [
        {"id": "u1", "sender": "user", "text": "q", "timestamp": "2026-03-01 10:00:00"},
        {"id": "a1", "sender": "assistant", "text": "answer", "messageType": "llm_response",
         "timestamp": "2026-03-01 10:00:10"},
        {"id": "a2", "sender": "assistant", "text": "more", "messageType": "response",
         "timestamp": "2026-03-01T10:00:30.000Z"}])
    fake.save_session("5b1d8a52-0c1e-4f11-9a0e-5d7f4b1c2e3a", [], "New Chat")
    ran = cli("doctor", "c1", "--remote", fake.remote, "--json")
    found = traps(ran)
    assert "backend:failed_load" in found
    assert found["backend:empty_new_chat"]["ids"] == ["5b1d8a52-0c1e-4f11-9a0e-5d7f4b1c2e3a"]
    itself = cli("doctor", "5b1d8a52-0c1e-4f11-9a0e-5d7f4b1c2e3a", "--remote", fake.remote,
                 "--json")
    assert set(traps(itself)) == {"backend:empty_new_chat"}


def test_the_sample_files(tmp_path: Path, cli: Callable[..., Ran]) -> None:
    chats = Path(shutil.copytree(DATA / "autobot", tmp_path / "chats"))
    spec = f"autobot-dir:{chats}"
    demo = traps(cli("doctor", DEMO, "--remote", spec, "--json"))
    # The backend's own example: one time form, ids, nothing its loader merges; but the
    # empty "New Chat" created two seconds after it is the second id of a new chat.
    assert set(demo) == {"backend:empty_new_chat"}
    assert demo["backend:empty_new_chat"]["ids"] == ["3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f"]
    legacy = traps(cli("doctor", "5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d", "--remote", spec,
                       "--json"))
    assert {"backend:mixed_timestamps", "backend:no_id"} <= set(legacy)
    cut = traps(cli("doctor", "e5f6a7b8-1c2d-4e3f-8a9b-0c1d2e3f4a5b", "--remote", spec,
                    "--json"))
    assert "not valid JSON" in cut["backend:failed_load"]["detail"]


def test_find_traps_through_the_save_merge() -> None:
    stored = [{"id": "u1", "sender": "user", "text": "list files",
               "timestamp": "2026-03-01 10:00:00"},
              {"id": "t1", "sender": "system", "text": "ls", "messageType": "terminal_command",
               "timestamp": "2026-03-01 10:00:02"},
              {"id": "t2", "sender": "system", "text": "file1\nfile2",
               "messageType": "terminal_output", "timestamp": "2026-03-01 10:00:04"}]
    assert rules.find_traps(stored) == []
    found = {t.code: t for t in rules.find_traps(stored, through_save=True)}
    assert found["adjacent_streaming_on_save"].ids == ["t1"]
