"""The ``autobot-dir:PATH`` remote: AutoBot chat files read and written in place, never lost.

Files chatsave writes are AutoBot-shaped, 0600, atomic and read back identically; invalid
ids go back to their own file; nothing else in the directory is touched; what the HTTP API
cannot do (delete or overwrite one message, repair a chat AutoBot cannot load) is done here.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsave.errors import ExitCode, UnavailableError
from chatsave.formats import Source
from chatsave.model import Message
from chatsave.normalize import TimeContext
from chatsave.ops.delete import delete
from chatsave.ops.diff import diff
from chatsave.ops.importing import ImportOptions, import_source
from chatsave.ops.save import SaveOptions, save
from chatsave.ops.sync import SyncOptions, sync
from chatsave.remote.autobot.directory import AutobotDirRemote
from chatsave.remote.autobot.http import AutobotRemote
from chatsave.remote.autobot.shapes import AutobotGuard, FailedLoadError
from chatsave.remote.retry import RetryPolicy
from chatsave.store.store import Store
from tests.autobot_fake import FakeAutobot
from tests.conftest import DATA, Ran, examples

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
DEMO = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
LEGACY = "5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d"
CUT = "e5f6a7b8-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
ENCRYPTED = "0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f"
# chatsave's one form: AutoBot's own naive local time, plus milliseconds when there are any.
AUTOBOT_FORM = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{3})?")


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    """A copy of the sample AutoBot chats directory."""
    return Path(shutil.copytree(DATA / "autobot", tmp_path / "chats"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store.db")
    yield s
    s.close()


def msg(chat: str, mid: str, text: str, minute: float, role: str = "user",
        type_: str = "message", **kw: Any) -> Message:
    return Message(chat_id=chat, id=mid, role=role, content=text, type=type_,  # type: ignore[arg-type]
                   created_at=T0 + timedelta(minutes=minute), **kw)


def add(store: Store, *messages: Message) -> None:
    with store.transaction():
        for m in messages:
            store.upsert_chat(m.chat_id, None)
            store.add_messages(m.chat_id, [m])


def snapshot(path: Path, but: str | None = None) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())
            if p.name != but}


def doc(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def naive(minute: float) -> str:
    return (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------------ reading


def test_reads_both_file_names_and_refuses_unreadable_files(chats: Path) -> None:
    remote = AutobotDirRemote(chats, cache_off=True)
    listed = {c.chat_id: c for c in remote.list_chats().chats}
    assert set(listed) == {DEMO, LEGACY, CUT, ENCRYPTED, "d4e5f6a7",
                           "3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f", remote.ids.local("null")}
    legacy = remote.messages(LEGACY).messages
    assert [(m.role, m.content) for m in legacy] == [
        ("assistant", "Hello! How can I assist you today?"), ("user", "hi"),
        ("assistant", "Hello!")]
    for broken, why in ((CUT, "not valid JSON"), (ENCRYPTED, "encrypted")):
        with pytest.raises(FailedLoadError) as caught:
            remote.messages(broken)
        assert why in caught.value.message and caught.value.exit_code == ExitCode.GUARD
    assert remote.messages("nope").messages == []


def test_unreadable_files_are_never_written_over(chats: Path, store: Store) -> None:
    before = snapshot(chats)
    add(store, msg(CUT, "u1", "one more", 0), msg(ENCRYPTED, "u2", "and here", 0))
    with pytest.raises(AutobotGuard) as caught:
        save(store, AutobotDirRemote(chats, cache_off=True), [CUT, ENCRYPTED], SaveOptions())
    assert caught.value.exit_code == ExitCode.GUARD
    assert snapshot(chats) == before


# ------------------------------------------------------------------------ writing


def test_round_trip_autobot_shape_0600_atomic_identical(tmp_path: Path, store: Store) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    folder = tmp_path / "empty"
    folder.mkdir()
    local = [
        msg("c1", "u1", "list files", 0) .model_copy(
            update={"created_at": T0 + timedelta(milliseconds=120)}),
        msg("c1", "t1", "file1\nfile2", 0.1, "system", "terminal_output",
            metadata={"terminal_session_id": "t-1"}),
        msg("c1", "a1", "Here are your files", 0.2, "assistant", "response",
            metadata={"version": 12}, extra={"toolMarkers": [{"command": "ls"}],
                                             "status": "sent"}),
        msg("c1", "u2", "thanks", 3, inexact=True),
    ]
    add(store, *local)
    remote = AutobotDirRemote(folder, tz=berlin, cache_off=True)
    result = save(store, remote, ["c1"], SaveOptions())
    assert result.exit_code == ExitCode.OK and result.counters["written"] == 4
    path = folder / "c1_chat.json"
    assert [p.name for p in folder.iterdir()] == ["c1_chat.json"]  # no temporary leftovers
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = doc(path)
    assert set(written) == {"chatId", "name", "messages", "last_modified", "created_time"}
    assert written["chatId"] == "c1"
    stamps = [m["timestamp"] for m in written["messages"]]
    assert all(AUTOBOT_FORM.fullmatch(s) for s in stamps)
    assert stamps[0] == "2026-03-01 11:00:00.120"  # naive, the server's local time
    assert stamps[1] == "2026-03-01 11:00:06"  # no fraction: AutoBot's own form exactly
    assert written["messages"][2]["toolMarkers"] == [{"command": "ls"}]
    assert written["messages"][0]["sender"] == "user" and written["messages"][0]["text"]
    # Read back identically: a fresh remote, no store to borrow hashes from.
    fresh = AutobotDirRemote(folder, tz=berlin, cache_off=True)
    back = {m.id: m for m in fresh.messages("c1").messages}
    for m in local:
        got = back[m.id]
        assert got.content_hash == m.content_hash
        wire = m.to_wire()
        assert (got.role, got.content, got.created_at, got.type, got.metadata, got.extra,
                got.inexact) == (wire["role"], wire["content"], wire["created_at"],
                                 wire["type"], wire["metadata"], wire["extra"], m.inexact)
    # ... and so does chatsave's own import of AutoBot files.
    other = Store.open(tmp_path / "other.db")
    try:
        source = Source.open(str(folder))
        import_source(other, source, ImportOptions(times=TimeContext(tz=berlin)))
        source.close()
        assert sorted(other.message_keys("c1")) == sorted(store.message_keys("c1"))
    finally:
        other.close()
    assert diff(store, fresh, ["c1"]).exit_code == ExitCode.OK


def test_a_file_changed_while_writing_is_not_overwritten(chats: Path) -> None:
    remote = AutobotDirRemote(chats, cache_off=True)
    leftovers = {p.name for p in chats.iterdir() if p.name.startswith(".tmp_chat_")}
    assert leftovers == {".tmp_chat_x.json"}  # AutoBot's own, from the sample directory
    state = remote._read(DEMO, DEMO)
    path = chats / f"{DEMO}_chat.json"
    changed = doc(path)
    changed["messages"].append({"id": "x", "sender": "user", "text": "AutoBot wrote this",
                                "timestamp": "2026-03-01 10:09:00"})
    path.write_text(json.dumps(changed))
    with pytest.raises(UnavailableError) as caught:
        remote._write(state, [], "Demo chat")
    assert "changed while chatsave was writing" in caught.value.message
    assert doc(path) == changed
    assert {p.name for p in chats.iterdir() if p.name.startswith(".tmp_chat_")} == leftovers


def test_invalid_ids_go_back_to_their_file_and_nothing_else_is_touched(
        chats: Path, cli: Callable[..., Ran], tmp_path: Path) -> None:
    remote_spec = f"autobot-dir:{chats}"
    ran = cli("import", str(chats), "--rename-invalid", "--on-invalid", "skip", "--json")
    assert ran.exit_code == ExitCode.DIFFERENCES  # two unreadable files were skipped
    mapped = next(e["chat_id"] for e in ran.json_lines() if e["type"] == "renamed")
    assert mapped.startswith("null~")
    new = msg(mapped, "n1", "a message from the user's browser", 0)
    dump = tmp_path / "more.jsonl"
    dump.write_text(json.dumps(new.to_wire()) + "\n")
    before = snapshot(chats, but="null_chat.json")
    stored_before = doc(chats / "null_chat.json")["messages"]
    saved = cli("save", "--from", str(dump), "--remote", remote_spec, "--autobot-cache", "off",
                "--json")
    assert saved.exit_code == 0, saved.stdout + saved.stderr
    assert snapshot(chats, but="null_chat.json") == before
    written = doc(chats / "null_chat.json")
    assert written["chatId"] == "null"
    assert [m["text"] for m in written["messages"]] == [
        "did this get saved?", "Yes.", "a message from the user's browser"]
    # AutoBot's own messages go back exactly as they were (no id added, same time text).
    assert written["messages"][:2] == stored_before
    again = cli("diff", mapped, "--remote", remote_spec, "--json")
    assert again.exit_code == 0, again.stdout


def test_a_stale_legacy_file_is_not_the_backend_and_its_messages_are_kept_here(
        tmp_path: Path, store: Store) -> None:
    """AutoBot reads ``{id}_chat.json`` alone once it exists; the legacy file its migration
    left behind is never read again. What only that file holds is not on the backend (diff
    says +, save writes it into the file AutoBot reads), and sync keeps a copy here."""
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "chat_old.json").write_text(json.dumps(
        {"chatId": "old", "name": "Old", "messages": [
            {"id": "u1", "sender": "user", "text": "hi", "timestamp": naive(0)}]}))
    (folder / "both_chat.json").write_text(json.dumps(
        {"chatId": "both", "name": "Both", "messages": [
            {"id": "u1", "sender": "user", "text": "in the new file", "timestamp": naive(0)}]}))
    (folder / "chat_both.json").write_text(json.dumps(
        {"chatId": "both", "name": "Both", "messages": [
            {"id": "u1", "sender": "user", "text": "in the new file", "timestamp": naive(0)},
            {"id": "u2", "sender": "user", "text": "in the old file", "timestamp": naive(1)}]}))
    legacy_both = (folder / "chat_both.json").read_bytes()
    remote = AutobotDirRemote(folder, cache_off=True)
    assert [m.id for m in remote.messages("both").messages] == ["u1"]
    held = remote.held_only("both")
    assert [(m.id, "chat_both.json" in why) for m, why in held] == [("u2", True)]
    # A store that has u2 (chatsave once joined both files and called it saved): +.
    add(store, msg("both", "u1", "in the new file", 0), msg("both", "u2", "in the old file", 1))
    events: list[tuple[str, dict[str, Any]]] = []
    assert diff(store, remote, ["both"], emit=lambda t, **f: events.append((t, f))
                ).exit_code == ExitCode.DIFFERENCES
    assert {f["id"]: f["symbol"] for t, f in events if t == "item"} == {"u2": "+"}
    add(store, msg("old", "u3", "again", 5), msg("both", "u4", "new", 5))
    assert save(store, remote, ["old", "both"], SaveOptions()).exit_code == ExitCode.OK
    assert sorted(p.name for p in folder.iterdir()) == ["both_chat.json", "chat_both.json",
                                                       "chat_old.json"]
    # Only a legacy file: AutoBot reads it, so it is the one written.
    assert [m["id"] for m in doc(folder / "chat_old.json")["messages"]] == ["u1", "u3"]
    assert [m["id"] for m in doc(folder / "both_chat.json")["messages"]] == ["u1", "u2", "u4"]
    assert (folder / "chat_both.json").read_bytes() == legacy_both
    assert diff(store, remote, ["both"]).exit_code == ExitCode.OK
    # A fresh store: sync keeps a copy of what only the stale file holds.
    (folder / "chat_both.json").write_text(json.dumps(
        {"chatId": "both", "messages": [
            {"id": "u5", "sender": "user", "text": "only ever here", "timestamp": naive(2)}]}))
    fresh = Store.open(tmp_path / "fresh.db")
    try:
        synced = sync(fresh, AutobotDirRemote(folder, cache_off=True), ["both"], SyncOptions())
        assert "u5" in {mid for mid, _ in fresh.message_keys("both")}
        assert synced.counters["kept_from_backend"] == 1
    finally:
        fresh.close()


def test_what_the_loader_would_drop_is_not_written(chats: Path, store: Store) -> None:
    remote = AutobotDirRemote(chats, cache_off=True)
    sync(store, remote, [DEMO], SyncOptions())
    before = doc(chats / f"{DEMO}_chat.json")["messages"]
    add(store, msg(DEMO, "again", "list files", 30),
        msg(DEMO, "short", "ok", 0.15, "assistant", "llm_response"))
    events: list[tuple[str, dict[str, Any]]] = []
    result = save(store, remote, [DEMO], SaveOptions(),
                  emit=lambda t, **f: events.append((t, f)))
    assert result.exit_code == ExitCode.REJECTED
    reasons = {f["id"]: f["reason"] for t, f in events if t == "rejected"}
    assert "first user message" in reasons["again"]
    assert "longest" in reasons["short"]
    assert doc(chats / f"{DEMO}_chat.json")["messages"] == before


def test_overwrite_and_delete_single_messages(chats: Path, store: Store) -> None:
    remote = AutobotDirRemote(chats, cache_off=True)
    assert sync(store, remote, [DEMO], SyncOptions()).exit_code == ExitCode.OK
    answer_id = "0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e"
    # Edited here while the file still holds the version it confirmed: the edit is sent.
    with store.transaction():
        store.replace_message(msg(DEMO, answer_id, "Here are your two files", 0.12,
                                  "assistant", "llm_response"), None, "edited here")
    edited = sync(store, AutobotDirRemote(chats, cache_off=True), [DEMO], SyncOptions())
    assert edited.exit_code == ExitCode.OK, edited.summary()
    path = chats / f"{DEMO}_chat.json"
    assert {m["id"]: m["text"] for m in doc(path)["messages"]}[answer_id] == \
        "Here are your two files"
    # Changed on both sides: a conflict, until --prefer local overwrites the file's version.
    changed = doc(path)
    for m in changed["messages"]:
        if m["id"] == answer_id:
            m["text"] = "AutoBot says: two files"
    path.write_text(json.dumps(changed))
    with store.transaction():
        store.replace_message(msg(DEMO, answer_id, "Here are your 2 files", 0.12,
                                  "assistant", "llm_response"), None, "edited here")
    assert sync(store, AutobotDirRemote(chats, cache_off=True), [DEMO],
                SyncOptions()).exit_code == ExitCode.CONFLICTS
    won = sync(store, AutobotDirRemote(chats, cache_off=True), [DEMO], SyncOptions(prefer="local"))
    assert won.exit_code == ExitCode.OK, won.summary()
    texts = {m["id"]: m["text"] for m in doc(path)["messages"]}
    assert texts[answer_id] == "Here are your 2 files"
    delete(store, DEMO, ["b9d6be7b-95ac-40ce-aab1-3de9e72a74eb"])
    gone = save(store, AutobotDirRemote(chats, cache_off=True), [DEMO], SaveOptions())
    assert gone.exit_code == ExitCode.OK and gone.counters["deleted_remote"] == 1
    assert [m["id"] for m in doc(chats / f"{DEMO}_chat.json")["messages"]] == [
        "ac38c6a2-64f4-4ea0-9621-41014b878213", answer_id]


def test_dedupe_removes_retry_copies_from_the_file(chats: Path, cli: Callable[..., Ran]
                                                  ) -> None:
    path = chats / "retry_chat.json"
    path.write_text(json.dumps({"chatId": "retry", "name": "Retried", "messages": [
        {"id": "q1", "sender": "user", "text": "how big is it?", "timestamp": naive(0)},
        {"id": "a1", "sender": "assistant", "text": "About 2 GB.", "messageType": "default",
         "timestamp": naive(0.1)},
        {"id": "a2", "sender": "assistant", "text": "About 2 GB.", "messageType": "default",
         "timestamp": naive(0.1)},
        {"id": "q3", "sender": "user", "text": "thanks", "timestamp": naive(5)}]}))
    spec = f"autobot-dir:{chats}"
    assert cli("sync", "retry", "--remote", spec).exit_code == 0
    ran = cli("dedupe", "retry", "--remote", spec, "--autobot-cache", "off", "--yes",
              "--max-delete", "50%", "--json")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert ran.summary["duplicates_removed"] == 1
    assert [m["id"] for m in doc(path)["messages"]] == ["q1", "a1", "q3"]


def test_repairing_a_chat_autobot_cannot_load(chats: Path, cli: Callable[..., Ran],
                                              start_server: Callable[[Any], Any]) -> None:
    fake = FakeAutobot(chats).serve(start_server)
    fake.put("mixed", [
        {"id": "u1", "sender": "user", "text": "q", "timestamp": naive(0)},
        {"id": "a1", "sender": "assistant", "text": "answer", "messageType": "llm_response",
         "timestamp": naive(0.1)},
        {"id": "a2", "sender": "assistant", "text": "more", "messageType": "response",
         "timestamp": "2026-03-01T10:00:30.000Z"}])
    spec = f"autobot-dir:{chats}"
    broken = cli("diff", "mixed", "--remote", fake.remote, "--json")
    assert broken.exit_code == ExitCode.GUARD
    assert any(e.get("error") for e in broken.json_lines() if e["type"] == "chat")
    doctor = cli("doctor", "mixed", "--remote", fake.remote, "--json")
    assert {e["trap"] for e in doctor.json_lines() if e["type"] == "trap"} >= {"failed_load"}
    # On the server: sync keeps a copy here (AutoBot shows none of it, so nothing counts as
    # saved there: the guard names the repair), then the file is rewritten in one form.
    kept = cli("sync", "mixed", "--remote", spec, "--autobot-cache", "off", "--json")
    assert kept.exit_code == ExitCode.GUARD, kept.stdout
    assert [e["id"] for e in kept.json_lines() if e["type"] == "kept_from_backend"] == [
        "u1", "a1", "a2"]
    assert "--repair" in kept.stderr
    repaired = cli("doctor", "mixed", "--remote", spec, "--repair", "--autobot-cache", "off",
                   "--json")
    event = next(e for e in repaired.json_lines() if e["type"] == "repaired")
    assert event["changed"] is True and event["dropped"] == ["a2"]
    assert "a2" in repaired.stderr  # named: AutoBot's loader will still merge it
    assert {m["timestamp"][10] for m in fake.stored("mixed")} == {" "}
    # AutoBot loads it again; the reply its loader merges stays here, listed as only here.
    with AutobotRemote(fake.remote, policy=RetryPolicy(attempts=2, base=0.01)) as remote:
        assert [m.id for m in remote.messages("mixed").messages] == ["u1", "a1"]
    after = cli("diff", "mixed", "--remote", fake.remote, "--json")
    assert after.exit_code == ExitCode.DIFFERENCES
    assert [(e["id"], e["symbol"]) for e in after.json_lines() if e["type"] == "item"] == [
        ("a2", "+")]


def test_the_http_api_refuses_a_chat_its_merge_would_damage_and_the_directory_saves_it(
        chats: Path, store: Store, start_server: Callable[[Any], Any]) -> None:
    fake = FakeAutobot(chats).serve(start_server)
    add(store, msg(DEMO, "u9", "and the hidden ones?", 5))
    with AutobotRemote(fake.remote, policy=RetryPolicy(attempts=2, base=0.01)) as remote, \
            pytest.raises(AutobotGuard) as caught:
        save(store, remote, [DEMO], SaveOptions())
    assert "b9d6be7b-95ac-40ce-aab1-3de9e72a74eb" in caught.value.message
    assert len(fake.stored(DEMO)) == 3
    result = save(store, AutobotDirRemote(chats, cache_off=True), [DEMO],
                  SaveOptions(retry_rejected=True))
    assert result.exit_code == ExitCode.OK
    assert [m["id"] for m in fake.stored(DEMO)][-1] == "u9" and len(fake.stored(DEMO)) == 4


# ------------------------------------------------------------------ the property

_TEXTS = ["yes", "ok", "a longer answer here", "ls", "file1\nfile2"]
_TYPES = ["default", "llm_response", "response", "terminal_output"]


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_saving_into_a_file_never_loses_a_message(tmp_path: Path, data: st.DataObject) -> None:
    import uuid

    from chatsave.remote.autobot.shapes import read_items

    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    stored = []
    for n in range(data.draw(st.integers(0, 6))):
        second = data.draw(st.integers(0, 600))
        raw: dict[str, Any] = {
            "sender": data.draw(st.sampled_from(["user", "assistant", "system", "bot"])),
            "text": data.draw(st.sampled_from(_TEXTS)),
            "messageType": data.draw(st.sampled_from(_TYPES)),
            "timestamp": data.draw(st.sampled_from([
                naive(second / 60),
                (T0 + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "12:00:00 PM"]))}
        if data.draw(st.booleans()):
            raw["id"] = f"b{n}"
        stored.append(raw)
    path = folder / "c1_chat.json"
    path.write_text(json.dumps({"chatId": "c1", "name": "P", "messages": stored}))

    def shown() -> set[tuple[str, str, str]]:
        return {(i.msg.id, i.msg.role, i.msg.content)
                for i in read_items("c1", doc(path)["messages"], UTC) if i.msg is not None}

    before, file_before = shown(), path.read_bytes()
    local = {}
    for n in range(data.draw(st.integers(1, 6))):
        m = msg("c1", data.draw(st.sampled_from([f"b{n}", f"l{n}"])),
                data.draw(st.sampled_from(_TEXTS)), data.draw(st.integers(0, 600)) / 60,
                data.draw(st.sampled_from(["user", "assistant", "system"])),
                data.draw(st.sampled_from(_TYPES)))
        local[m.id] = m
    with Store.open(folder / "store.db") as store:
        add(store, *local.values())
        refused = None
        try:
            save(store, AutobotDirRemote(folder, cache_off=True), ["c1"], SaveOptions())
        except AutobotGuard as exc:
            refused = exc
        if refused is not None:
            assert path.read_bytes() == file_before
        after = shown()
        assert before <= after
        state = dict(store.conn.execute("SELECT id, state FROM remote_state").fetchall())
        for m in local.values():
            if state.get(m.id) == "confirmed":
                assert (m.id, m.role, m.content) in after
            elif refused is None:
                assert state.get(m.id) in ("rejected", "conflict"), (m.id, state)
        if path.read_bytes() != file_before:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
