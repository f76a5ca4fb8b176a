"""AutoBot as it really runs: its session cache, clock changes, and what doctor sees and repairs.

Each test sets up the fact as AutoBot produces it (the fake in tests/autobot_fake.py, or a
chat file in AutoBot's own shape) and checks what chatsave reports and writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from chatsave.errors import ExitCode
from chatsave.model import Message
from chatsave.ops.save import SaveOptions, save
from chatsave.remote.autobot.directory import AutobotDirRemote
from chatsave.store.store import Store
from tests.autobot_fake import FakeAutobot
from tests.conftest import Ran

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def naive(minute: float) -> str:
    return (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:%S")


def msg(chat: str, mid: str, text: str, when: datetime, role: str = "user") -> Message:
    return Message(chat_id=chat, id=mid, role=role, content=text,  # type: ignore[arg-type]
                   created_at=when)


def add(store: Store, *messages: Message) -> None:
    with store.transaction():
        for m in messages:
            store.upsert_chat(m.chat_id, None)
            store.add_messages(m.chat_id, [m])


def write_chat(folder: Path, chat_id: str, messages: list[dict[str, Any]],
               created: str = "2026-03-01 09:00:00") -> Path:
    path = folder / f"{chat_id}_chat.json"
    path.write_text(json.dumps({"chatId": chat_id, "name": "Chat", "messages": messages,
                                "last_modified": "2026-03-01 10:10:00",
                                "created_time": created}))
    return path


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    folder = tmp_path / "chats"
    folder.mkdir()
    return folder


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "store.db")
    yield s
    s.close()


# ------------------------------------------------------------------ the session cache


def test_autobot_dir_writes_only_once_the_user_says_the_cache_cannot_overwrite(
        chats: Path, cli: Callable[..., Ran], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    write_chat(chats, "c1", [{"id": "u1", "sender": "user", "text": "hi",
                              "timestamp": naive(0)}])
    before = (chats / "c1_chat.json").read_bytes()
    dump = tmp_path / "new.jsonl"
    dump.write_text(json.dumps(msg("c1", "u2", "more", T0 + timedelta(minutes=1)).to_wire())
                    + "\n")
    spec = f"autobot-dir:{chats}"
    refused = cli("save", "--from", str(dump), "--remote", spec, "--json")
    assert refused.exit_code == ExitCode.USAGE
    assert "session cache" in refused.stderr and "--autobot-cache off" in refused.stderr
    assert (chats / "c1_chat.json").read_bytes() == before
    # Read-only commands need no such word.
    assert cli("diff", "c1", "--remote", spec).exit_code == ExitCode.DIFFERENCES
    monkeypatch.setenv("CHATSAVE_AUTOBOT_CACHE", "off")
    done = cli("save", "c1", "--remote", spec, "--json")
    assert done.exit_code == ExitCode.OK, done.stdout + done.stderr
    assert [m["id"] for m in json.loads((chats / "c1_chat.json").read_text())["messages"]] \
        == ["u1", "u2"]
    monkeypatch.setenv("CHATSAVE_AUTOBOT_CACHE", "maybe")
    assert cli("status").exit_code == ExitCode.USAGE


def test_a_message_the_cache_wrote_over_is_sent_again_then_listed(
        tmp_path: Path, store: Store, start_server: Callable[[Any], Any]) -> None:
    """AutoBot's next message writes its cached session over the file chatsave wrote: the
    confirmed message is gone from the backend. The next save sends it again once; if it
    vanishes again, it is listed with the reason (exit 4), and kept here."""
    fake = FakeAutobot(tmp_path / "chats").serve(start_server)
    http = httpx.Client(base_url=fake.url)
    http.post("/api/chats/c1/message", json={"message": "hello"}).raise_for_status()
    assert "c1" in fake.cache  # AutoBot holds the session in its cache
    remote = AutobotDirRemote(fake.dir, cache_off=True)  # the user said so, wrongly
    add(store, msg("c1", "mine", "written by chatsave", datetime.now(UTC)))
    first = save(store, remote, ["c1"], SaveOptions())
    assert first.exit_code == ExitCode.OK
    http.post("/api/chats/c1/message", json={"message": "again"}).raise_for_status()
    assert "mine" not in [m.get("id") for m in fake.stored("c1")]  # the cache won
    events: list[tuple[str, dict[str, Any]]] = []
    second = save(store, AutobotDirRemote(fake.dir, cache_off=True), ["c1"], SaveOptions(),
                  emit=lambda t, **f: events.append((t, f)))
    assert second.exit_code == ExitCode.OK, second.summary()
    assert second.counters["resent_lost"] == 1
    assert "mine" in [m.get("id") for m in fake.stored("c1")]
    http.post("/api/chats/c1/message", json={"message": "and again"}).raise_for_status()
    third = save(store, AutobotDirRemote(fake.dir, cache_off=True), ["c1"], SaveOptions(),
                 emit=lambda t, **f: events.append((t, f)))
    assert third.exit_code == ExitCode.REJECTED
    [listed] = [f for t, f in events if t == "rejected" and f["id"] == "mine"]
    assert "vanished" in listed["reason"] and "cache" in listed["reason"]
    assert store.get_message("c1", "mine") is not None
    http.close()


# ------------------------------------------------------------------------ clock changes


def test_a_time_the_clock_change_repeats_is_not_written(chats: Path, store: Store) -> None:
    """2026-10-25 in Berlin: 02:00-03:00 happens twice. 00:30Z and 01:10Z are 02:30 CEST and
    02:10 CET: written naive they would sort reversed, and read back an hour off."""
    add(store, msg("c1", "early", "first", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        msg("c1", "late", "second", datetime(2026, 10, 25, 1, 10, tzinfo=UTC)),
        msg("c1", "after", "third", datetime(2026, 10, 25, 3, 0, tzinfo=UTC)))
    events: list[tuple[str, dict[str, Any]]] = []
    result = save(store, AutobotDirRemote(chats, tz=BERLIN, cache_off=True), ["c1"],
                  SaveOptions(), emit=lambda t, **f: events.append((t, f)))
    assert result.exit_code == ExitCode.REJECTED
    reasons = {f["id"]: f["reason"] for t, f in events if t == "rejected"}
    assert set(reasons) == {"early", "late"}
    assert "2026-10-25 02:30:00" in reasons["early"] and "twice" in reasons["early"]
    stored = json.loads((chats / "c1_chat.json").read_text())["messages"]
    assert [(m["id"], m["timestamp"]) for m in stored] == [("after", "2026-10-25 04:00:00")]
    assert store.counts("c1")["messages"] == 3  # nothing lost here


def test_a_time_autobot_wrote_in_the_repeated_hour_is_read_as_inexact(chats: Path) -> None:
    write_chat(chats, "c1", [
        {"id": "u1", "sender": "user", "text": "in the repeated hour",
         "timestamp": "2026-10-25 02:30:00"},
        {"id": "u2", "sender": "user", "text": "an hour later",
         "timestamp": "2026-10-25 04:00:00"}])
    page = AutobotDirRemote(chats, tz=BERLIN).messages("c1").messages
    assert {m.id: m.inexact for m in page} == {"u1": True, "u2": False}


# ------------------------------------------------------------------------------ doctor


def test_doctor_reports_everything_while_a_chat_fails_to_load(
        chats: Path, cli: Callable[..., Ran]) -> None:
    write_chat(chats, "c1", [
        {"id": "u1", "sender": "user", "text": "q", "timestamp": naive(0)},
        {"id": "a1", "sender": "assistant", "text": "answer", "messageType": "llm_response",
         "timestamp": naive(0.1)},
        {"sender": "assistant", "text": "answer", "messageType": "llm_response",
         "timestamp": naive(0.1)},
        {"id": "a2", "sender": "assistant", "text": "more", "messageType": "response",
         "timestamp": "2026-03-01T10:00:30.000Z"}])
    ran = cli("doctor", "c1", "--remote", f"autobot-dir:{chats}", "--json")
    assert ran.exit_code == ExitCode.DIFFERENCES
    found = {e["trap"]: e for e in ran.json_lines() if e["type"] == "trap"}
    assert {"failed_load", "no_id", "retry_copies", "mixed_timestamps"} <= set(found)
    assert len(found["no_id"]["ids"]) == 1 and found["no_id"]["ids"][0].startswith("m-")
    assert len(found["retry_copies"]["ids"]) == 1


def test_doctor_names_a_stale_legacy_file(chats: Path, cli: Callable[..., Ran]) -> None:
    write_chat(chats, "c1", [{"id": "u1", "sender": "user", "text": "hi",
                              "timestamp": naive(0)}])
    (chats / "chat_c1.json").write_text(json.dumps({"chatId": "c1", "messages": [
        {"id": "u1", "sender": "user", "text": "hi", "timestamp": naive(0)},
        {"id": "old", "sender": "user", "text": "never shown", "timestamp": naive(1)}]}))
    ran = cli("doctor", "c1", "--remote", f"autobot-dir:{chats}", "--json")
    [stale] = [e for e in ran.json_lines() if e.get("trap") == "stale_legacy_file"]
    assert "chat_c1.json" in stale["detail"] and stale["ids"] == ["old"]


def test_doctor_repairs_a_null_id_and_a_time_without_a_date(
        chats: Path, cli: Callable[..., Ran], tmp_path: Path) -> None:
    path = write_chat(chats, "c1", [
        {"id": "u1", "sender": "user", "text": "q", "timestamp": "2026-03-04 10:00:00"},
        {"id": "null", "sender": "assistant", "text": "from an old browser",
         "messageType": "default", "timestamp": "10:05 AM"},
        {"id": "u2", "sender": "user", "text": "later", "timestamp": "2026-03-04 11:00:00"}])
    spec = f"autobot-dir:{chats}"
    seen = cli("doctor", "c1", "--remote", spec, "--json")
    found = {e["trap"]: e for e in seen.json_lines() if e["type"] == "trap"}
    assert "unreadable_message" in found and "10:05 AM" in found["unreadable_message"]["detail"]
    assert found["no_id"]["ids"] == ["#1"]
    fixed = cli("doctor", "c1", "--remote", spec, "--repair", "--autobot-cache", "off",
                "--json")
    [event] = [e for e in fixed.json_lines() if e["type"] == "repaired"]
    [renamed] = event["renamed"]
    assert renamed["was"] == "null" and renamed["id"].startswith("m-")
    [dated] = event["dated"]
    assert dated["id"] == renamed["id"] and dated["time"] == "2026-03-04 10:05:00"
    assert "nearest dated message" in dated["from"]
    assert renamed["id"] in fixed.stderr and "2026-03-04 10:05:00" in fixed.stderr
    stored = json.loads(path.read_text())["messages"]
    assert [m["id"] for m in stored] == ["u1", renamed["id"], "u2"]
    assert stored[1]["inexact"] is True and stored[1]["timestamp"] == "2026-03-04 10:05:00"
    store = Store.open(tmp_path / "home" / "store.db")
    try:
        [(original, mapped, note)] = store.mappings("message")
        assert mapped == renamed["id"] and "'null'" in original and "doctor --repair" in note
    finally:
        store.close()
    # Now the message is read (and would be pulled) like any other.
    assert cli("sync", "c1", "--remote", spec, "--autobot-cache", "off").exit_code == 0


# ------------------------------------------------------------- what AutoBot will show


def test_a_message_autobots_next_load_drops_is_not_confirmed_but_kept_here(
        chats: Path, store: Store) -> None:
    """A repeated user message AutoBot's own save stored in the file: its next load keeps
    only the first. Reading counts it as not on the backend; sync keeps a copy here, and
    the save that follows lists it with the reason instead of calling it saved."""
    from chatsave.ops.diff import diff
    from chatsave.ops.sync import SyncOptions, sync

    write_chat(chats, "c1", [
        {"id": "u1", "sender": "user", "text": "yes", "timestamp": naive(0)},
        {"id": "a1", "sender": "assistant", "text": "Deleting.", "messageType": "default",
         "timestamp": naive(1)},
        {"id": "u2", "sender": "user", "text": "yes", "timestamp": naive(5)}])
    remote = AutobotDirRemote(chats, cache_off=True)
    assert [m.id for m in remote.messages("c1").messages] == ["u1", "a1"]
    events: list[tuple[str, dict[str, Any]]] = []
    synced = sync(store, remote, ["c1"], SyncOptions(),
                  emit=lambda t, **f: events.append((t, f)))
    assert synced.exit_code == ExitCode.REJECTED
    assert {mid for mid, _ in store.message_keys("c1")} == {"u1", "a1", "u2"}
    [why] = [f["reason"] for t, f in events if t == "rejected" and f["id"] == "u2"]
    assert "first user message" in why
    later: list[tuple[str, dict[str, Any]]] = []
    assert diff(store, remote, ["c1"], emit=lambda t, **f: later.append((t, f))
                ).exit_code == ExitCode.DIFFERENCES
    assert {f["id"]: f["symbol"] for t, f in later if t == "item"} == {"u2": "+"}


def test_doctor_finds_no_trap_that_chatsaves_own_write_made(
        tmp_path: Path, store: Store, cli: Callable[..., Ran],
        start_server: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A chat AutoBot wrote, saved into by chatsave (milliseconds and all), then appended to
    by AutoBot again: one time kind, true time order, no trap."""
    monkeypatch.setenv("CHATSAVE_TZ", "Europe/Berlin")
    fake = FakeAutobot(tmp_path / "chats", tz=BERLIN).serve(start_server)
    fake.clock = lambda: T0
    http = httpx.Client(base_url=fake.url)
    http.post("/api/chats/c1/message", json={"message": "first"}).raise_for_status()
    dump = tmp_path / "mine.jsonl"
    dump.write_text("".join(json.dumps(m.to_wire()) + "\n" for m in (
        msg("c1", "m1", "from the browser", T0 + timedelta(seconds=30, milliseconds=5)),
        msg("c1", "m2", "and a reply", T0 + timedelta(seconds=31), "assistant"))))
    assert cli("import", str(dump)).exit_code == 0
    saved = cli("save", "c1", "--remote", fake.remote, "--json")
    assert saved.exit_code == ExitCode.OK, saved.stdout + saved.stderr
    fake.clock = lambda: T0 + timedelta(minutes=2)
    http.post("/api/chats/c1/message", json={"message": "later"}).raise_for_status()
    http.close()
    shown = fake.load_session("c1")
    assert [m["timestamp"] for m in shown] == sorted(m["timestamp"] for m in shown)
    assert [m.get("id") for m in shown][2:4] == ["m1", "m2"]
    assert shown[2]["timestamp"] == "2026-03-01 11:00:30.005"  # Berlin, with milliseconds
    for spec in (fake.remote, f"autobot-dir:{fake.dir}"):
        doctor = cli("doctor", "c1", "--remote", spec, "--json")
        assert doctor.exit_code == ExitCode.OK, doctor.stdout


def test_over_http_a_cached_session_shows_what_the_next_load_drops_as_not_saved(
        tmp_path: Path, store: Store, start_server: Callable[[Any], Any]) -> None:
    """With the session cached, AutoBot's export returns the raw stored list (no dedupe):
    a repeated user message is in it, but the next load without the cache drops it."""
    from chatsave.ops.diff import diff
    from chatsave.remote.autobot.http import AutobotRemote
    from chatsave.remote.retry import RetryPolicy

    fake = FakeAutobot(tmp_path / "chats").serve(start_server)
    fake.put("c1", [{"id": "u1", "sender": "user", "text": "yes", "timestamp": naive(0)},
                    {"id": "u2", "sender": "user", "text": "yes", "timestamp": naive(5)}])
    fake.cache["c1"] = json.loads(fake.new_path("c1").read_text())
    add(store, msg("c1", "u1", "yes", T0), msg("c1", "u2", "yes", T0 + timedelta(minutes=5)))
    events: list[tuple[str, dict[str, Any]]] = []
    with AutobotRemote(fake.remote, policy=RetryPolicy(attempts=2, base=0.01)) as remote:
        assert [m.id for m in remote.messages("c1").messages] == ["u1"]
        assert diff(store, remote, ["c1"], emit=lambda t, **f: events.append((t, f))
                    ).exit_code == ExitCode.DIFFERENCES
    assert {f["id"]: f["symbol"] for t, f in events if t == "item"} == {"u2": "+"}
