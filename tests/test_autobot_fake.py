"""The fake AutoBot server reproduces the facts of docs/autobot.md chatsave guards against.

Plain HTTP against the live fake: if these fail, the other AutoBot tests prove nothing.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.autobot_fake import FakeAutobot


@pytest.fixture
def fake(tmp_path: Path, start_server: Callable[[Any], Any]) -> FakeAutobot:
    return FakeAutobot(tmp_path / "chats").serve(start_server)


@pytest.fixture
def http(fake: FakeAutobot) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        yield client


def user(mid: str | None, text: str, ts: str) -> dict[str, Any]:
    out = {"sender": "user", "text": text, "messageType": "default", "timestamp": ts}
    if mid:
        out["id"] = mid
    return out


def reply(mid: str | None, text: str, ts: str, type_: str = "llm_response",
          sender: str = "assistant") -> dict[str, Any]:
    out = {"sender": sender, "text": text, "messageType": type_, "timestamp": ts}
    if mid:
        out["id"] = mid
    return out


def save(http: httpx.Client, chat_id: str, messages: list[dict[str, Any]] | None,
         name: str = "") -> httpx.Response:
    body: dict[str, Any] = {} if messages is None else {"data": {"messages": messages,
                                                                  "name": name}}
    return http.post(f"/api/chats/{chat_id}/save", json=body)


def texts(fake: FakeAutobot, chat_id: str) -> list[str]:
    return [m.get("text") or m.get("content") for m in fake.stored(chat_id)]


def test_save_always_answers_200_with_null_data_even_when_nothing_is_written(
        fake: FakeAutobot, http: httpx.Client) -> None:
    fake.fail_writes = True
    answer = save(http, "c1", [user("u1", "hello", "2026-03-01 10:00:00")])
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True and body["data"] is None
    assert body["message"] == "Chat saved successfully" and "timestamp" not in body
    assert fake.read_doc("c1") is None  # nothing was written


def test_files_are_written_atomically_with_mode_0600(fake: FakeAutobot,
                                                     http: httpx.Client) -> None:
    save(http, "c1", [user("u1", "hello", "2026-03-01 10:00:00")])
    path = fake.new_path("c1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in fake.dir.iterdir()] == ["c1_chat.json"]  # no temp leftovers
    doc = json.loads(path.read_text())
    assert set(doc) == {"chatId", "name", "messages", "last_modified", "created_time"}


def test_repeated_user_messages_collapse_to_the_first_on_load(fake: FakeAutobot,
                                                              http: httpx.Client) -> None:
    fake.put("c1", [user("u1", "yes", "2026-03-01 10:00:00"),
                    reply("a1", "ok", "2026-03-01 10:00:05"),
                    user("u2", "yes", "2026-03-01 10:30:00")])
    got = http.get("/api/chat/sessions/c1/export", params={"format": "json"}).json()
    assert [m["id"] for m in got] == ["u1", "a1"]
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "a1"]  # written back cleaned


def test_adjacent_replies_within_120s_collapse_to_the_longest_on_load(
        fake: FakeAutobot, http: httpx.Client) -> None:
    fake.put("c1", [user("u1", "q", "2026-03-01 10:00:00"),
                    reply("a1", "first answer", "2026-03-01 10:00:10"),
                    reply("a2", "a second, longer answer", "2026-03-01 10:01:10", "response"),
                    reply("a3", "far later", "2026-03-01 11:00:00")])
    got = http.get("/api/chat/sessions/c1/export").json()
    assert [m["id"] for m in got] == ["u1", "a2", "a3"]


def test_mixed_naive_and_aware_replies_fail_the_load_and_the_next_write_overwrites(
        fake: FakeAutobot, http: httpx.Client) -> None:
    fake.put("c1", [user("u1", "q", "2026-03-01 10:00:00"),
                    reply("a1", "answer", "2026-03-01 10:00:10"),
                    reply("a2", "more", "2026-03-01T10:00:30.000Z", "response")])
    assert http.get("/api/chat/sessions/c1/export").json() == []
    listed = http.get("/api/chats").json()["data"]
    assert listed[0]["messageCount"] == 3  # the list still counts them
    assert len(fake.stored("c1")) == 3
    fake.add_message("c1", user("u9", "one more", "2026-03-01 10:05:00"))
    assert [m["id"] for m in fake.stored("c1")] == ["u9"]  # 3 messages became 1
    fake.put("c2", [user("u1", "q", "2026-03-01 10:00:00"),
                    reply("a1", "answer", "2026-03-01 10:00:10"),
                    reply("a2", "more", "2026-03-01T10:00:30.000Z", "response")])
    with http.stream("POST", "/api/chats/c2/message", json={"message": "hi"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert b'"type": "end"' in stream.read()
    assert {"u1", "a1", "a2"}.isdisjoint(m["id"] for m in fake.stored("c2"))


def test_save_merges_lossily_and_sorts_on_the_timestamp_text(
        fake: FakeAutobot, http: httpx.Client) -> None:
    fake.put("c1", [reply("s1", "from the backend", "2026-02-06 22:00:00", "default",
                          "system")])
    save(http, "c1", [user("u1", "aware", "2026-02-06T08:00:00.000Z"),
                      user("u2", "time only", "12:00:00 PM")])
    assert texts(fake, "c1") == ["time only", "from the backend", "aware"]


def test_an_empty_save_is_destructive(fake: FakeAutobot, http: httpx.Client) -> None:
    fake.put("c1", [user("q1", "q1", "2026-03-01 10:00:00"),
                    reply("a1", "short answer", "2026-03-01 10:00:10", "response"),
                    user("q2", "q2", "2026-03-01 10:10:00"),
                    reply("a2", "a much longer second answer", "2026-03-01 10:10:10",
                          "response")])
    save(http, "c1", [])
    assert texts(fake, "c1") == ["q1", "q2", "a much longer second answer"]
    save(http, "c1", None)  # no data at all: the same merge
    assert texts(fake, "c1") == ["q1", "q2", "a much longer second answer"]


def test_a_merge_that_raises_keeps_only_the_new_messages(fake: FakeAutobot,
                                                         http: httpx.Client) -> None:
    fake.put("c1", [user("u1", "q", "2026-03-01 10:00:00"),
                    reply("t1", "ls -la /srv/data", "2026-03-01 10:00:05", "terminal_command",
                          "system")])
    save(http, "c1", [reply("t2", "f1", "2026-03-01T10:00:06.000Z", "terminal_output",
                            "system")])
    assert [m["id"] for m in fake.stored("c1")] == ["t2"]  # backend-only messages dropped


def test_type_aliases_duplicate_without_matching_ids(fake: FakeAutobot,
                                                     http: httpx.Client) -> None:
    fake.put("c1", [reply("b1", "hello there", "2026-03-01 10:00:00")])
    save(http, "c1", [{"id": "f1", "content": "hello there", "sender": "assistant",
                       "type": "response", "timestamp": "2026-03-01 10:05:00"}])
    assert sorted(m["id"] for m in fake.stored("c1")) == ["b1", "f1"]


def test_session_page_is_capped_and_unknown_ids_are_empty(fake: FakeAutobot,
                                                         http: httpx.Client) -> None:
    fake.put("c1", [user(f"u{i}", f"message {i}", f"2026-03-01 10:{i // 60:02d}:{i % 60:02d}")
                    for i in range(150)])
    page = http.get("/api/chat/sessions/c1", params={"page": 1, "per_page": 100}).json()
    assert [m["id"] for m in page["data"]["messages"]] == [f"u{i}" for i in range(50, 150)]
    again = http.get("/api/chat/sessions/c1", params={"page": 2, "per_page": 100}).json()
    assert again["data"]["messages"] == page["data"]["messages"]  # page is ignored
    assert http.get("/api/chat/sessions/c1", params={"per_page": 101}).status_code == 422
    assert len(http.get("/api/chat/sessions/c1/export").json()) == 150
    unknown = http.get("/api/chat/sessions/nope")
    assert unknown.status_code == 200 and unknown.json()["data"]["messages"] == []


@pytest.mark.parametrize("shape", ["envelope", "bare", "chats"])
def test_chat_list_shapes(fake: FakeAutobot, http: httpx.Client, shape: str) -> None:
    fake.list_shape = shape
    fake.put("c1", [user("u1", "hi", "2026-03-01 10:00:00")], name="Demo")
    body = http.get("/api/chats").json()
    items = {"envelope": lambda b: b["data"], "bare": lambda b: b,
             "chats": lambda b: b["chats"]}[shape](body)
    assert [(i["chatId"], i["name"], i["messageCount"]) for i in items] == [("c1", "Demo", 1)]
    sessions = http.get("/api/chat/sessions").json()["data"]
    assert sessions["count"] == 1 and sessions["sessions"][0]["id"] == "c1"


def test_deleting_through_chats_is_broken_and_through_sessions_works(
        fake: FakeAutobot, http: httpx.Client) -> None:
    fake.put("c1", [user("u1", "hi", "2026-03-01 10:00:00")])
    assert http.delete("/api/chats/c1").status_code == 500
    assert fake.read_doc("c1") is not None
    assert http.put("/api/chat/sessions/c1", json={"title": "x"}).status_code == 500
    assert http.delete("/api/chat/sessions/c1").status_code == 200
    assert fake.read_doc("c1") is None
    assert http.delete("/api/chat/sessions/c1").status_code == 500  # a missing id


def test_a_new_chat_gets_a_second_empty_session(fake: FakeAutobot, http: httpx.Client) -> None:
    created = http.post("/api/chat/sessions", json={})
    assert created.status_code == 201
    backend_id = created.json()["data"]["id"]
    save(http, "9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d", [user("u1", "hi", "2026-03-01 10:00:00")])
    listed = {i["id"]: i for i in http.get("/api/chats").json()["data"]}
    assert listed[backend_id]["name"] == "New Chat" and listed[backend_id]["messageCount"] == 0
    assert len(listed) == 2


def test_a_save_migrates_a_legacy_file_and_leaves_it_behind(fake: FakeAutobot,
                                                             http: httpx.Client) -> None:
    fake.put("old", [user("u1", "hi", "2025-08-04 12:00:00")], legacy=True)
    assert [m["id"] for m in http.get("/api/chat/sessions/old/export").json()] == ["u1"]
    save(http, "old", [user("u2", "again", "2025-08-04 12:01:00")])
    legacy = json.loads(fake.legacy_path("old").read_text())
    assert [m["id"] for m in legacy["messages"]] == ["u1"]  # stale, never deleted
    assert [m["id"] for m in fake.stored("old")] == ["u1", "u2"]
    # Only the new file is read from now on: an edit of the legacy file changes nothing.
    legacy["messages"].append(user("u9", "only in the old file", "2025-08-04 12:02:00"))
    fake.legacy_path("old").write_text(json.dumps(legacy))
    fake.flush_cache()
    exported = http.get("/api/chat/sessions/old/export").json()
    assert [m["id"] for m in exported] == ["u1", "u2"]


def test_the_session_cache_writes_over_a_file_edited_behind_autobots_back(
        fake: FakeAutobot, http: httpx.Client) -> None:
    save(http, "c1", [user("u1", "hi", "2026-03-01 10:00:00")])
    doc = json.loads(fake.new_path("c1").read_text())
    doc["messages"].append(user("x1", "written by another tool", "2026-03-01 10:00:05"))
    fake.new_path("c1").write_text(json.dumps(doc))
    http.post("/api/chats/c1/message", json={"message": "next"}).raise_for_status()
    assert "x1" not in [m.get("id") for m in fake.stored("c1")]  # the cached copy won
    # With the cache flushed (or off), AutoBot reads the file again.
    fake.new_path("c1").write_text(json.dumps(doc))
    fake.flush_cache()
    http.post("/api/chats/c1/message", json={"message": "again"}).raise_for_status()
    assert "x1" in [m.get("id") for m in fake.stored("c1")]


def test_auth_and_the_unauthenticated_export(tmp_path: Path,
                                             start_server: Callable[[Any], Any]) -> None:
    fake = FakeAutobot(tmp_path / "chats", token="jwt-1").serve(start_server)
    fake.put("c1", [user("u1", "hi", "2026-03-01 10:00:00")])
    with httpx.Client(base_url=fake.url, timeout=10) as client:
        refused = client.get("/api/chats")
        assert refused.status_code == 401 and "detail" in refused.json()
        assert client.get("/api/chats", headers={"Authorization": "Bearer jwt-1"}).json()[
            "success"] is True
        assert len(client.get("/api/chat/sessions/c1/export").json()) == 1
