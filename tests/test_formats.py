"""Import/export formats: localStorage dumps, JSONL, AutoBot chat files; sniffing; round trips."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsave.errors import InputError, InvalidItemError
from chatsave.formats import Bad, Source, SourceChat, SourceNote, read, sniff
from chatsave.formats.autobot import id_from_filename
from chatsave.formats.jsonl import write_jsonl
from chatsave.formats.localstorage import write_localstorage
from chatsave.model import (
    RESERVED_IDS,
    Message,
    canonical_json,
    chat_id_problem,
    message_id_problem,
    renamed_chat_id,
)
from chatsave.normalize import MessageNormalizer, TimeContext
from chatsave.ops.importing import derivation_basis, derived_chat_id

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "sample-dump.json"
AUTOBOT = DATA / "autobot"
DAY = TimeContext(date=date(2025, 8, 4))
FAKE_TOKEN = "FAKE-TOKEN-sample-dump-not-a-secret"


# ------------------------------------------------------------------------- helpers


@dataclass
class Outcome:
    """What reading and normalising a source gave (the importer's loop, without a store)."""

    chats: dict[str, list[Message]] = field(default_factory=dict)
    titles: dict[str, str | None] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    notes: list[SourceNote] = field(default_factory=list)
    groups: list[SourceChat] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)  # position -> derived chat id
    read: int = 0

    @property
    def accepted(self) -> int:
        return sum(len(v) for v in self.chats.values())

    def messages(self) -> list[Message]:
        return [m for msgs in self.chats.values() for m in msgs]


def _no_id(raw: Any) -> bool:
    return not isinstance(raw, str) or raw.strip() == "" or raw.lower() in RESERVED_IDS


def load(source: Source, fmt: str | None = None, times: TimeContext = DAY,
         rename: bool = True) -> Outcome:
    out = Outcome()
    shared: dict[str, MessageNormalizer] = {}
    bases: dict[str, int] = {}
    for item in read(source, fmt or sniff(source)):
        if isinstance(item, SourceNote):
            out.notes.append(item)
            continue
        out.groups.append(item)
        raw = item.raw_id
        chat_id: str | None = raw if chat_id_problem(raw) is None else None
        if chat_id is None and rename and (raw is None or (item.lost_id and _no_id(raw))):
            # A chat whose id was lost: import derives one from its content.
            elements = list(item.messages)
            item.messages = iter(elements)
            basis = derivation_basis(item.created_at, item.title, [e for _, e in elements])
            seen = bases.get(canonical_json(basis), 0)
            bases[canonical_json(basis)] = seen + 1
            if seen:
                basis["n"] = seen
            chat_id = out.derived.setdefault(item.position,
                                             derived_chat_id(canonical_json(basis)))
        elif chat_id is None and rename and raw is not None:
            chat_id = out.renamed.setdefault(str(raw), renamed_chat_id(raw))
        normalizer = None
        if chat_id is not None:
            normalizer = shared.get(chat_id) or MessageNormalizer(chat_id, times)
            if not item.closed:
                shared[chat_id] = normalizer
            out.chats.setdefault(chat_id, [])
            if item.title is not None:
                out.titles[chat_id] = item.title
        for position, element in item.messages:
            out.read += 1
            if isinstance(element, Bad):
                out.rejected.append((position, element.reason))
            elif normalizer is None or chat_id is None:
                out.rejected.append((position, f"invalid chat id {raw!r}"))
            else:
                try:
                    out.chats[chat_id].append(normalizer.normalize(element))
                except InvalidItemError as exc:
                    out.rejected.append((position, exc.message))
    return out


def open_bytes(data: bytes) -> Source:
    return Source.open("-", stdin=io.BytesIO(data))


def load_bytes(data: bytes, fmt: str | None = None, **kw: Any) -> Outcome:
    return load(open_bytes(data), fmt, **kw)


@contextmanager
def opened(path: Path) -> Iterator[Source]:
    source = Source.open(str(path))
    try:
        yield source
    finally:
        source.close()


def load_path(path: Path, fmt: str | None = None, **kw: Any) -> Outcome:
    with opened(path) as source:
        return load(source, fmt, **kw)


def dump(**keys: Any) -> bytes:
    """A localStorage dump: every value a JSON string, as a browser stores it."""
    return json.dumps({k: v if isinstance(v, str) else json.dumps(v)
                       for k, v in keys.items()}).encode()


def jsonl_bytes(messages: Iterable[Message]) -> bytes:
    buf = io.StringIO()
    write_jsonl(messages, buf)
    return buf.getvalue().encode("utf-8")


def localstorage_bytes(chats: dict[str, list[Message]],
                       titles: dict[str, str | None] | None = None) -> bytes:
    buf = io.StringIO()
    write_localstorage(((cid, (titles or {}).get(cid), None, iter(msgs))
                        for cid, msgs in chats.items()), buf)
    return buf.getvalue().encode("utf-8")


# ------------------------------------------------------------------- the sample dump


@pytest.fixture(scope="module")
def sample() -> Outcome:
    return load_path(SAMPLE)


def test_sample_dump_is_a_browser_dump_of_strings() -> None:
    raw = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert all(isinstance(v, str) for v in raw.values())
    assert SAMPLE.stat().st_size < 10_000
    state = json.loads(raw["autobot-chat-store"])
    # The whole Pinia state is persisted (paths/pick mix-up), settings included.
    assert {"sessions", "currentSessionId", "isTyping", "settings"} <= set(state)
    with opened(SAMPLE) as source:
        assert sniff(source) == "localstorage"


def test_sample_dump_groups_and_positions(sample: Outcome) -> None:
    positions = [g.position for g in sample.groups]
    assert positions == [
        "key 'autobot-chat-store' sessions[0]",
        "key 'autobot-chat-store' sessions[1]",
        "key 'autobot-chat-store' sessions[2]",
        "key 'autobot-chat-store' sessions[3]",
        "key 'chat_chat_1724200000000_messages'",
        "key 'chat_5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d_messages'",
        "key 'chat_null_messages'",
        "key 'chat_undefined_messages'",
        "key 'chat_list'[0]", "key 'chat_list'[1]", "key 'chat_list'[2]",
    ]
    raw_ids = [g.raw_id for g in sample.groups]
    # key.slice(5, -9): the underscore inside the id survives.
    assert raw_ids[4] == "chat_1724200000000"
    assert {"null", "undefined", "test/chat#1"} <= set(raw_ids)
    assert sample.titles["chat-1740823200123-4c086981"] == "Deploy notes"
    assert sample.titles["chat_1724200000000"] == "Terminal chat"


def test_sample_dump_rejections_name_position_and_reason(sample: Outcome) -> None:
    assert sample.rejected == [
        ("key 'autobot-chat-store' sessions[1].messages[4]",
         "conflicting role fields (role='user', sender='assistant')"),
        ("key 'autobot-chat-store' sessions[1].messages[5]",
         "no content (content, text or body)"),
        ("key 'chat_5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d_messages'[2]",
         "no content (content, text or body)"),
    ]
    assert sample.read == 24
    assert sample.accepted + len(sample.rejected) == sample.read


def test_sample_dump_notes_unrelated_keys_by_name_only(sample: Outcome) -> None:
    notes = {n.position: n.reason for n in sample.notes}
    assert notes["key 'chat_settings'"] == "not a chat key"
    assert notes["key 'autobot_auth'"] == "not a chat key"
    assert notes["key 'autobot-app'"] == "not a chat key"
    assert "session has no 'messages' array" in notes["key 'autobot-chat-store' sessions[3]"]
    assert len(notes) == 4
    everything = repr(sample.notes) + repr(sample.groups) + repr(sample.rejected)
    assert FAKE_TOKEN not in everything
    assert "localhost:8001" not in everything


def test_sample_dump_normalised(sample: Outcome) -> None:
    assert set(sample.chats) == {
        "9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d", "chat-1740823200123-4c086981",
        renamed_chat_id("test/chat#1"), "4e8a9c1d-2b3f-4a5e-8c7d-6f5e4d3c2b1a",
        "chat_1724200000000", "5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d",
        renamed_chat_id("null"), renamed_chat_id("undefined"),
    }
    assert sample.chats["4e8a9c1d-2b3f-4a5e-8c7d-6f5e4d3c2b1a"] == []
    chat1 = sample.chats["9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d"]
    assert [(m.role, m.type, m.extra) for m in chat1] == [
        ("user", "message", {"status": "sent"}), ("assistant", "response", {"status": "sent"})]
    assert chat1[1].metadata["version"] == 14
    deploy = sample.chats["chat-1740823200123-4c086981"]
    assert [m.role for m in deploy] == ["user", "assistant", "system", "user"]
    assert deploy[3].attachments == [{"name": "deploy.log", "size": 2048, "mime": "text/plain"}]
    terminal = sample.chats["chat_1724200000000"]
    assert all(m.inexact and m.created_at.date() == date(2025, 8, 4) for m in terminal)
    assert terminal[0].created_at == datetime(2025, 8, 4, 9, 41, 3, tzinfo=UTC)
    assert terminal[-1].role == "system" and terminal[-1].type == "terminal_command"
    # The person said "yes" twice: two messages, two ids.
    yes = [m for m in terminal if m.content == "yes"]
    assert len(yes) == 2 and yes[0].id != yes[1].id
    german = sample.chats["5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d"]
    assert [m.created_at.strftime("%H:%M:%S") for m in german] == \
        ["12:00:00", "12:00:05", "12:00:10"]
    assert german[-1].role == "system"


def test_sample_dump_ids_are_stable_across_reads(sample: Outcome) -> None:
    again = load_path(SAMPLE)
    assert [m.to_wire() for m in again.messages()] == [m.to_wire() for m in sample.messages()]


def test_sample_dump_time_only_needs_a_date() -> None:
    out = load_path(SAMPLE, times=TimeContext())
    time_only = [r for r in out.rejected if "time-only" in r[1]]
    assert len(time_only) == 14
    assert all("--date" in reason for _, reason in time_only)


def test_sample_dump_without_rename_rejects_invalid_chats() -> None:
    out = load_path(SAMPLE, rename=False)
    bad = [p for p, reason in out.rejected if reason.startswith("invalid chat id")]
    assert bad == [
        "key 'autobot-chat-store' sessions[2].messages[0]",
        "key 'chat_null_messages'[0]",
        "key 'chat_undefined_messages'[0]", "key 'chat_undefined_messages'[1]",
    ]


def test_sample_dump_through_the_cli(cli: Any) -> None:
    """The sample dump imported as the README's first block does, then status: counts,
    renames, no token shown. (The block itself runs as written in tests/test_readme.py.)"""
    ran = cli("import", str(SAMPLE), "--date", "2025-08-04", "--rename-invalid",
              "--on-invalid", "skip", "--json")
    assert ran.exit_code == 1, ran.stderr
    summary = ran.summary
    assert summary["read"] == 24 and summary["written"] == 21 and summary["rejected"] == 3
    renamed = {e["original"]: e["chat_id"] for e in ran.json_lines() if e["type"] == "renamed"}
    assert renamed == {k: renamed_chat_id(k) for k in ("test/chat#1", "null", "undefined")}
    assert FAKE_TOKEN not in ran.stdout + ran.stderr
    status = cli("status", "--json")
    assert status.exit_code == 0, status.stderr
    info = next(e for e in status.json_lines() if e["type"] == "status")
    assert info["chats"] == 8 and info["messages"] == 21 and info["inexact_times"] == 14
    human = cli("import", str(SAMPLE), "--date", "2025-08-04", "--rename-invalid",
                "--on-invalid", "skip")
    assert human.exit_code == 1
    assert "nothing new" in human.stderr
    assert "renamed invalid chat id 'null'" in human.stderr


# ---------------------------------------------------------------------- localStorage


def test_localstorage_reads_parsed_values_and_bad_values() -> None:
    msgs = [{"sender": "user", "text": "hi", "timestamp": "2026-03-01T10:00:00Z"}]
    data = json.dumps({
        "chat_a_messages": msgs,  # a dump tool that stored the value parsed
        "chat_b_messages": "[1,",
        "chat_c_messages": json.dumps({"not": "an array"}),
        "autobot-chat-store": "{broken",
        "chat_list": json.dumps({"chatId": "x"}),
    }).encode()
    out = load_bytes(data, "localstorage")
    assert [m.content for m in out.chats["a"]] == ["hi"]
    by_group = {g.position: g.raw_id for g in out.groups}
    # The chat id of a chat key, never the key; no chat id for the store or the list.
    assert by_group["key 'chat_b_messages'"] == "b"
    assert by_group["key 'autobot-chat-store'"] is None
    assert by_group["key 'chat_list'"] is None
    reasons = dict(out.rejected)
    assert reasons["key 'chat_b_messages'"].startswith("value is not valid JSON")
    assert reasons["key 'chat_c_messages'"] == "value is not a JSON array"
    assert reasons["key 'autobot-chat-store'"].startswith("value is not valid JSON")
    assert reasons["key 'chat_list'"] == "value is not a JSON array"
    assert out.read == 5


def test_localstorage_store_shapes() -> None:
    good = {"id": "s-1", "timestamp": "2026-03-01T10:00:00Z", "content": "x", "sender": "user"}
    state = {"sessions": [
        {"id": "s-1", "title": "T", "messages": [good]},
        "not a session",
        {"id": "s-3", "messages": {"0": good}},
        {"title": "no id", "messages": [good]},
    ]}
    out = load_bytes(dump(**{"autobot-chat-store": state}), rename=False)
    assert [m.id for m in out.chats["s-1"]] == ["s-1"]
    assert dict(out.rejected) == {
        "key 'autobot-chat-store' sessions[1]": "session is not a JSON object",
        "key 'autobot-chat-store' sessions[2]": "'messages' is not an array",
        "key 'autobot-chat-store' sessions[3].messages[0]": "invalid chat id None",
    }
    # A reset store ({}) holds no messages: a note, not an error.
    empty = load_bytes(dump(**{"autobot-chat-store": {}}))
    assert empty.read == 0 and empty.rejected == []
    assert [n.position for n in empty.notes] == ["key 'autobot-chat-store'"]
    assert load_bytes(dump(**{"autobot-chat-store": {"sessions": 3}})).rejected == [
        ("key 'autobot-chat-store'", "no 'sessions' array in the store")]


def _session(chat_id: Any, **more: Any) -> dict[str, Any]:
    return {"id": chat_id, "title": "T", "messages": [], **more}


@pytest.mark.parametrize(("state", "current"), [
    ({"sessions": [_session("a"), _session("b")], "currentSessionId": "b"}, [False, True]),
    # The current session's id was lost with it: isActive tells which one it is.
    ({"sessions": [_session("a"), _session(None, isActive=True)], "currentSessionId": None},
     [False, True]),
    ({"sessions": [_session("a", isActive=True), _session("b")], "currentSessionId": "b"},
     [False, True]),
    ({"sessions": [_session("a"), _session("b")], "currentSessionId": "gone"}, [False, False]),
    ({"sessions": [_session("a"), _session("b")]}, [False, False]),
])
def test_localstorage_reader_marks_the_current_session(state: dict[str, Any],
                                                       current: list[bool]) -> None:
    out = load_bytes(dump(**{"autobot-chat-store": state}), "localstorage")
    assert [g.current for g in out.groups] == current
    assert all(g.lost_id for g in out.groups)  # a session's id names nothing else


def test_localstorage_only_sessions_lose_ids() -> None:
    out = load_bytes(dump(**{"chat_null_messages": [], "chat_list": [{"chatId": "null"}],
                             "autobot-chat-store": {"sessions": [_session("null")]}}))
    assert {g.position: g.lost_id for g in out.groups} == {
        "key 'chat_null_messages'": False, "key 'chat_list'[0]": False,
        "key 'autobot-chat-store' sessions[0]": True}
    # The key and the list entry keep the name AutoBot uses; the session gets its own id.
    assert renamed_chat_id("null") in out.chats and len(out.derived) == 1


@pytest.mark.parametrize("data", [b"[1, 2]", b'"a string"', b"42", b"  [\n]"])
def test_localstorage_not_an_object_is_refused_not_ignored(data: bytes) -> None:
    out = load_bytes(data, "localstorage")
    assert out.read == 1
    assert out.rejected[0][1].startswith("not a valid localStorage dump")


def test_localstorage_broken_dump_keeps_what_came_before() -> None:
    out = load_bytes(b'{"chat_x_messages": "[]", "b": "1"} trailing', "localstorage")
    assert "x" in out.chats and [n.position for n in out.notes] == ["key 'b'"]
    assert out.rejected[0][0] == "the dump"
    assert "not a valid localStorage dump" in out.rejected[0][1]


def test_localstorage_dump_with_a_bom_and_deep_nesting() -> None:
    deep = "[" * 5000 + "]" * 5000
    data = b"\xef\xbb\xbf" + dump(chat_x_messages=[VALID_ITEM], chat_y_messages=deep)
    assert sniff(open_bytes(data)) == "localstorage"
    out = load_bytes(data)
    assert [m.content for m in out.chats["x"]] == ["hi"]
    assert out.rejected == [("key 'chat_y_messages'", "value is not valid JSON: nested too deeply")]


@pytest.mark.parametrize(("key", "raw_id"), [
    ("chat__messages", ""), ("chat_undefined_messages", "undefined"),
    ("chat_a_b_c_messages", "a_b_c"), ("chat_test/chat#1_messages", "test/chat#1"),
])
def test_localstorage_chat_keys(key: str, raw_id: str) -> None:
    out = load_bytes(dump(**{key: []}))
    assert [g.raw_id for g in out.groups] == [raw_id]


@pytest.mark.parametrize("key", ["chat_messages", "chat_settings", "chat_x_message",
                                 "xchat_y_messages", "autobot_auth"])
def test_localstorage_other_keys_are_notes(key: str) -> None:
    out = load_bytes(dump(**{key: [{"sender": "user", "text": "secret"}]}))
    assert out.groups == [] and [n.position for n in out.notes] == [f"key {key!r}"]
    assert "secret" not in repr(out.notes)


# ------------------------------------------------------------------------- AutoBot


@pytest.fixture(scope="module")
def autobot_dir() -> Outcome:
    return load_path(AUTOBOT, times=TimeContext(tz=ZoneInfo("Europe/Berlin")))


def test_autobot_directory_sniffed() -> None:
    with opened(AUTOBOT) as source:
        assert sniff(source) == "autobot-file"


def test_autobot_directory_notes_and_bad_files(autobot_dir: Outcome) -> None:
    notes = {n.position: n.reason for n in autobot_dir.notes}
    assert notes == {
        ".tmp_chat_x.json": "leftover temporary file of an interrupted write",
        "d4e5f6a7_terminal.log": "not an AutoBot chat file name",
    }
    reasons = dict(autobot_dir.rejected)
    assert len(reasons) == 2
    assert "truncated" in reasons["file e5f6a7b8-1c2d-4e3f-8a9b-0c1d2e3f4a5b_chat.json"]
    assert "encrypted" in reasons["file 0f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f_chat.json"]
    assert autobot_dir.accepted + len(autobot_dir.rejected) == autobot_dir.read == 10


def test_autobot_directory_chats(autobot_dir: Outcome) -> None:
    by_position = {g.position: g for g in autobot_dir.groups}
    orphan = by_position["file d4e5f6a7_chat.json"]
    assert orphan.raw_id == "d4e5f6a7" and orphan.title == "Terminal Session d4e5f6a7"
    assert autobot_dir.chats["d4e5f6a7"] == []
    assert autobot_dir.chats["3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f"] == []
    assert by_position["file null_chat.json"].raw_id == "null"
    assert len(autobot_dir.chats[renamed_chat_id("null")]) == 2
    demo = autobot_dir.chats["7c9e6679-7425-40de-944b-e07fc1f90ae7"]
    assert [(m.role, m.type) for m in demo] == [
        ("user", "message"), ("system", "terminal_output"), ("assistant", "llm_response")]
    # Naive backend times read in --tz (Berlin, CET in March).
    assert demo[0].created_at == datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)
    assert demo[2].extra["toolMarkers"][0]["command"] == "ls"
    assert demo[1].metadata == {"terminal_session_id": "t-1"}
    mixed = autobot_dir.chats["5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d"]
    assert by_position["file chat_5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d.json"].title == \
        "Chat 5a1e0c2d"
    assert [m.id for m in mixed][1:] == ["a1b2c3d4-0000-4000-8000-000000000001",
                                         "a1b2c3d4-0000-4000-8000-000000000002"]
    assert mixed[0].role == "assistant" and mixed[0].id.startswith("m-")
    # Local backend time (12:00 CEST) and frontend UTC times, all in UTC now.
    assert [m.created_at.strftime("%H:%M:%S") for m in mixed] == \
        ["10:00:00", "09:00:05", "09:00:09"]


@pytest.mark.parametrize(("name", "chat_id"), [
    ("3f2b_chat.json", "3f2b"), ("chat_3f2b.json", "3f2b"), ("null_chat.json", "null"),
    ("chat_123_chat.json", "chat_123"), ("chat_1724200000000.json", "1724200000000"),
    ("notes.json", None), (".tmp_chat_x.json", None), ("x_terminal.log", None),
])
def test_autobot_id_from_filename(name: str, chat_id: str | None) -> None:
    assert id_from_filename(name) == chat_id


def test_autobot_single_file_and_stdin() -> None:
    path = AUTOBOT / "7c9e6679-7425-40de-944b-e07fc1f90ae7_chat.json"
    from_file = load_path(path)
    assert from_file.groups[0].position == "file 7c9e6679-7425-40de-944b-e07fc1f90ae7_chat.json"
    from_stdin = load_bytes(path.read_bytes())
    assert from_stdin.groups[0].position == "file <stdin>"
    assert [m.to_wire() for m in from_stdin.messages()] == \
        [m.to_wire() for m in from_file.messages()]
    assert from_file.rejected == [] and from_file.read == 3
    assert from_file.groups[0].created_at == "2026-03-01 09:59:58"


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"chatId": "x", "messages": [', "truncated"),
    (b'"gAAAAABm..."', "encrypted"),
    (b'{"chatId": "x"}', "no 'messages' array"),
    (b"[]", "no 'messages' array"),
    (b'{"chatId": "x", "messages": [], "n": NaN}', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_autobot_bad_files(tmp_path: Path, body: bytes, reason: str) -> None:
    path = tmp_path / "x_chat.json"
    path.write_bytes(body)
    out = load_path(path, "autobot-file")
    assert out.read == 1 and len(out.rejected) == 1
    assert out.rejected[0][0] == "file x_chat.json"
    assert reason in out.rejected[0][1]


def test_autobot_file_id_fallbacks(tmp_path: Path) -> None:
    msg = {"sender": "user", "text": "x", "timestamp": "2026-03-01 10:00:00"}
    (tmp_path / "from-name_chat.json").write_text(json.dumps({"messages": [msg]}))
    (tmp_path / "chat_legacy.json").write_text(json.dumps({"chatId": "", "messages": [msg]}))
    (tmp_path / "other_chat.json").write_text(json.dumps({"session_id": "sess",
                                                         "messages": [msg]}))
    out = load_path(tmp_path)
    assert sorted(out.chats) == ["from-name", "legacy", "sess"]


# ---------------------------------------------------------------------------- sniff


WIRE = {"chat_id": "c-1", "id": "m-1", "role": "user", "content": "hi",
        "created_at": "2026-03-01T10:00:05.120Z", "type": "message", "metadata": {},
        "attachments": [], "extra": {}}
FILE_CHAT = {"chatId": "c-1", "name": "n", "messages": [], "last_modified": "2026-03-01 10:00:00",
             "created_time": "2026-03-01 10:00:00"}
ORPHAN = {"id": "d4e5f6a7", "name": "Terminal Session d4e5f6a7", "messages": [],
          "created_at": "2026-03-01T11:00:00", "metadata": {"auto_created": True}}


@pytest.mark.parametrize(("data", "fmt"), [
    ((json.dumps(WIRE) + "\n") * 3, "jsonl"),
    (json.dumps({**WIRE, "content": "x" * 200_000}) + "\n", "jsonl"),
    ("\ufeff" + json.dumps(WIRE) + "\n", "jsonl"),
    (dump(a="1", chat_x_messages="[]").decode(), "localstorage"),
    (json.dumps({"autobot-chat-store": "{}"}, indent=2), "localstorage"),
    ("\n\n  " + dump(chat_list=[]).decode(), "localstorage"),
    (json.dumps(FILE_CHAT), "autobot-file"),
    (json.dumps(FILE_CHAT, indent=2), "autobot-file"),
    (json.dumps(ORPHAN), "autobot-file"),
    (json.dumps(ORPHAN, indent=4), "autobot-file"),
    (json.dumps({**FILE_CHAT, "messages": [{"text": "x" * 100_000}]}), "autobot-file"),
])
def test_sniff_by_first_bytes(tmp_path: Path, data: str, fmt: str) -> None:
    raw = data.encode("utf-8")
    assert sniff(open_bytes(raw)) == fmt
    path = tmp_path / "input.data"
    path.write_bytes(raw)
    with opened(path) as source:
        assert sniff(source) == fmt
        # Sniffing consumes nothing: the reader still sees the whole input.
        assert source.stream is not None and source.stream.read() == raw


def test_sample_dump_from_stdin_reads_the_same(sample: Outcome) -> None:
    source = open_bytes(SAMPLE.read_bytes())
    assert source.name == "<stdin>"
    assert sniff(source) == "localstorage"
    again = load(source)
    assert [m.to_wire() for m in again.messages()] == [m.to_wire() for m in sample.messages()]
    assert again.rejected == sample.rejected


@pytest.mark.parametrize(("name", "body", "fmt"), [
    ("export.jsonl", "", "jsonl"),
    ("export.jsonl", "{}", "jsonl"),
    ("3f2b9c1e_chat.json", "{}", "autobot-file"),
    ("chat_3f2b9c1e.json", "[]", "autobot-file"),
    ("dump.json", json.dumps(WIRE), "jsonl"),
])
def test_sniff_by_file_name(tmp_path: Path, name: str, body: str, fmt: str) -> None:
    path = tmp_path / name
    path.write_text(body)
    with opened(path) as source:
        assert sniff(source) == fmt


@pytest.mark.parametrize(("data", "message"), [
    (b"", "is empty"), (b"  \n\t", "is empty"), (b"hello", "does not start with a JSON object"),
    (b"[1,2]", "does not start with a JSON object"),
])
def test_sniff_refuses_what_it_cannot_tell(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        sniff(open_bytes(data))


def test_source_open_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or directory"):
        Source.open(str(tmp_path / "missing.json"))
    with pytest.raises(InputError, match="unknown format 'xml'"):
        read(open_bytes(b"{}"), "xml")


# ---------------------------------------------------------------------------- JSONL


def test_jsonl_reader_groups_and_positions() -> None:
    lines = [
        json.dumps({**WIRE, "id": "m-1"}),
        "",
        "{not json",
        json.dumps({**WIRE, "chat_id": "c-2", "id": "m-2"}),
        json.dumps(["a list"]),
        json.dumps({**WIRE, "chat_id": None, "id": "m-3"}),
        json.dumps({**WIRE, "id": "m-4"}),
        '{"chat_id": "c-1", "n": NaN}',
    ]
    out = load_bytes("\n".join(lines).encode(), "jsonl")
    assert [(g.raw_id, g.closed) for g in out.groups] == [
        ("c-1", False), ("c-2", False), ("c-1", False)]
    assert [m.id for m in out.chats["c-1"]] == ["m-1", "m-4"]
    assert [m.id for m in out.chats["c-2"]] == ["m-2"]
    assert [(p, r.split(":")[0]) for p, r in out.rejected] == [
        ("line 3", "not valid JSON"), ("line 5", "not a JSON object (list)"),
        ("line 6", "no chat_id"), ("line 8", "not valid JSON")]
    assert out.read == 7


def test_jsonl_line_chat_id_follows_a_renamed_chat() -> None:
    out = load_bytes((json.dumps({**WIRE, "chat_id": "null"}) + "\n").encode(), "jsonl")
    assert out.rejected == []
    assert [m.chat_id for m in out.messages()] == [renamed_chat_id("null")]


def test_jsonl_derived_ids_continue_across_groups() -> None:
    yes = {"chat_id": "c-1", "role": "user", "content": "yes", "created_at": WIRE["created_at"]}
    other = {**yes, "chat_id": "c-2"}
    data = "\n".join(json.dumps(x) for x in (yes, other, yes)).encode()
    ids = [m.id for m in load_bytes(data, "jsonl").chats["c-1"]]
    assert len(set(ids)) == 2


def test_jsonl_import_of_renamed_chat_through_the_cli(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({**WIRE, "chat_id": "null"}) + "\n")
    ran = cli("import", str(path), "--rename-invalid", "--json")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert ran.summary["written"] == 1


@pytest.fixture(scope="module")
def sample_messages(sample: Outcome) -> dict[str, list[Message]]:
    return {cid: msgs for cid, msgs in sample.chats.items()}


def test_jsonl_round_trip_of_the_sample(sample_messages: dict[str, list[Message]]) -> None:
    originals = [m for msgs in sample_messages.values() for m in msgs]
    data = jsonl_bytes(originals)
    lines = data.decode().splitlines()
    assert len(lines) == len(originals)
    assert json.loads(lines[0]) == originals[0].to_wire()
    assert list(json.loads(lines[0])) == list(originals[0].to_wire())
    back = load_bytes(data, times=TimeContext()).messages()
    assert back == originals
    assert [m.content_hash for m in back] == [m.content_hash for m in originals]
    assert [m.inexact for m in back] == [m.inexact for m in originals]


# --------------------------------------------------------------- localStorage export


def test_localstorage_export_shape(sample_messages: dict[str, list[Message]]) -> None:
    data = localstorage_bytes(sample_messages, {"chat_1724200000000": "Terminal chat"})
    dump_obj = json.loads(data)
    assert set(dump_obj) == {"autobot-chat-store", "chat_list"}
    assert all(isinstance(v, str) for v in dump_obj.values())
    state = json.loads(dump_obj["autobot-chat-store"])
    assert [s["id"] for s in state["sessions"]] == list(sample_messages)
    for session in state["sessions"]:
        # The browser's store throws on a session without messages: every one has them.
        assert isinstance(session["messages"], list)
        assert {"id", "title", "messages", "createdAt", "updatedAt", "isActive"} <= set(session)
        for message in session["messages"]:
            assert {"id", "content", "sender", "timestamp"} <= set(message)
            assert message["timestamp"].endswith("Z")
    listing = json.loads(dump_obj["chat_list"])
    assert [e["chatId"] for e in listing] == list(sample_messages)
    assert {e["chatId"]: e["name"] for e in listing}["chat_1724200000000"] == "Terminal chat"
    assert sniff(open_bytes(data)) == "localstorage"


@pytest.mark.parametrize("current", [None, "c-2"])
def test_localstorage_export_current_session(current: str | None) -> None:
    base = {"role": "user", "content": "x", "created_at": datetime(2026, 3, 1, tzinfo=UTC)}
    chats = {c: [Message(chat_id=c, id="m", **base)] for c in ("c-1", "c-2", "c-3")}
    buf = io.StringIO()
    write_localstorage(((c, None, None, iter(msgs)) for c, msgs in chats.items()), buf,
                       current=current)
    state = json.loads(json.loads(buf.getvalue())["autobot-chat-store"])
    assert state["currentSessionId"] == current
    assert [s["id"] for s in state["sessions"] if s["isActive"]] == (
        [current] if current else [])
    back = load_bytes(buf.getvalue().encode(), times=TimeContext())
    assert [g.position for g in back.groups if g.current] == (
        ["key 'autobot-chat-store' sessions[1]"] if current else [])


def test_localstorage_round_trip_of_the_sample(sample_messages: dict[str, list[Message]]) -> None:
    data = localstorage_bytes(sample_messages)
    back = load_bytes(data, times=TimeContext())
    assert back.rejected == [] and back.notes == []
    assert {cid: msgs for cid, msgs in back.chats.items()} == sample_messages
    for cid, msgs in sample_messages.items():
        assert [m.content_hash for m in back.chats[cid]] == [m.content_hash for m in msgs]


def test_localstorage_round_trip_with_colliding_extra() -> None:
    base = {"chat_id": "c-1", "role": "tool", "content": "x",
            "created_at": datetime(2026, 3, 1, tzinfo=UTC)}
    messages = [
        Message(id="m-1", extra={"id": "null", "status": "sent"}, **base),
        Message(id="m-2", extra={"sender": "bot", "extra": {"a": 1}, "deleted": True}, **base),
        Message(id="m-3", extra={"status": "sent", "error": None}, inexact=True,
                attachments=[{"name": "a"}], metadata={"version": 2}, type="thought", **base),
    ]
    back = load_bytes(localstorage_bytes({"c-1": messages}), times=TimeContext())
    assert back.rejected == []
    assert back.chats["c-1"] == messages


# --------------------------------------------------------------------- properties

_no_surrogates = st.characters(exclude_categories=["Cs"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(_no_surrogates, max_size=6)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(_no_surrogates, max_size=5), children, max_size=3),
    max_leaves=5,
)
chat_ids = st.sampled_from(["c-1", "c-2", "chat_1724200000000", "user@example.com:chat~1",
                            "9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d"])
message_ids = st.text(_no_surrogates, min_size=1, max_size=12).filter(
    lambda s: message_id_problem(s) is None)


@st.composite
def messages(draw: st.DrawFn, chat_id: str) -> Message:
    return Message(
        chat_id=chat_id,
        id=draw(message_ids),
        role=draw(st.sampled_from(["user", "assistant", "system", "tool"])),
        content=draw(st.text(_no_surrogates, max_size=20)),
        created_at=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
            milliseconds=draw(st.integers(0, 2**42))),
        type=draw(st.sampled_from(["message", "response", "terminal_output"])),
        metadata=draw(st.dictionaries(st.text(_no_surrogates, max_size=4), json_values,
                                      max_size=2)),
        attachments=draw(st.lists(json_values, max_size=2)),
        extra=draw(st.dictionaries(st.text(_no_surrogates, min_size=1, max_size=8)
                                   | st.sampled_from(["id", "sender", "text", "extra"]),
                                   json_values, max_size=3)),
        inexact=draw(st.booleans()),
    )


@st.composite
def chat_sets(draw: st.DrawFn) -> dict[str, list[Message]]:
    ids = draw(st.lists(chat_ids, max_size=3, unique=True))
    out = {}
    for cid in ids:
        msgs = draw(st.lists(messages(cid), max_size=4, unique_by=lambda m: m.id))
        out[cid] = msgs
    return out


@given(chat_sets())
def test_jsonl_export_round_trip(chats: dict[str, list[Message]]) -> None:
    originals = [m for msgs in chats.values() for m in msgs]
    back = load_bytes(jsonl_bytes(originals), "jsonl", times=TimeContext()).messages()
    assert back == originals
    assert [m.content_hash for m in back] == [m.content_hash for m in originals]


@given(chat_sets())
def test_localstorage_export_round_trip(chats: dict[str, list[Message]]) -> None:
    data = localstorage_bytes(chats)
    back = load_bytes(data, times=TimeContext())
    assert back.rejected == []
    assert back.chats == chats
    state = json.loads(json.loads(data)["autobot-chat-store"])
    assert all(isinstance(s["messages"], list) for s in state["sessions"])
    assert [e["chatId"] for e in json.loads(json.loads(data)["chat_list"])] == list(chats)


VALID_ITEM = {"sender": "user", "text": "hi", "timestamp": "2026-03-01T10:00:00Z"}
INVALID_ITEMS = [
    {"sender": "user", "timestamp": "2026-03-01T10:00:00Z"},
    {"role": "user", "sender": "assistant", "text": "x", "timestamp": "2026-03-01T10:00:00Z"},
    {"sender": "user", "text": "x", "timestamp": "9:41:03 AM"},
    {"sender": "user", "text": "x"},
    {"sender": "3f2b9c1e", "text": {"a": 1}, "timestamp": "2026-03-01 10:00:00"},
    {"sender": "user", "text": "x", "timestamp": "2026-03-01T10:00:00Z", "deleted": True},
    {"sender": "user", "text": "x", "timestamp": "2026-03-01T10:00:00Z", "id": "a\nb"},
    42, "text", None, [1],
]
RAW_CHAT_IDS = ["c-1", "c-2", "chat_1724200000000", "null", "undefined", "", "test/chat#1"]


@st.composite
def items(draw: st.DrawFn) -> tuple[Any, bool]:
    if draw(st.booleans()):
        item = dict(VALID_ITEM)
        item["text"] = draw(st.text(_no_surrogates, max_size=8))
        if draw(st.booleans()):
            item["id"] = draw(st.sampled_from(["a", "b", "c"]))
        return item, True
    return draw(st.sampled_from(INVALID_ITEMS)), False


@st.composite
def mixed_dumps(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A dump with valid and invalid items; returns (bytes, items, valid items)."""
    keys: dict[str, Any] = {}
    total = valid = 0
    sessions = []
    for _ in range(draw(st.integers(0, 3))):
        elems = draw(st.lists(items(), max_size=5))
        raw_id = draw(st.sampled_from([*RAW_CHAT_IDS, None]))
        sessions.append({"id": raw_id, "title": "t", "messages": [e for e, _ in elems]})
        total += len(elems)
        # With --rename-invalid a session without a usable id gets a derived one.
        valid += sum(ok for _, ok in elems)
    if sessions or draw(st.booleans()):
        keys["autobot-chat-store"] = json.dumps({"sessions": sessions, "settings": {}})
    for raw_id in draw(st.lists(st.sampled_from(RAW_CHAT_IDS), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            keys[f"chat_{raw_id}_messages"] = "[{broken"
            total += 1
            continue
        elems = draw(st.lists(items(), max_size=5))
        keys[f"chat_{raw_id}_messages"] = json.dumps([e for e, _ in elems])
        total += len(elems)
        valid += sum(ok for _, ok in elems)
    for name in draw(st.lists(st.sampled_from(["chat_settings", "autobot_auth", "x"]),
                              unique=True)):
        keys[name] = json.dumps({"token": FAKE_TOKEN})
    if draw(st.booleans()):
        keys["chat_list"] = json.dumps([{"chatId": c, "name": "n"} for c in RAW_CHAT_IDS])
    order = draw(st.permutations(list(keys)))
    return json.dumps({k: keys[k] for k in order}).encode(), total, valid


@given(mixed_dumps(), st.booleans())
def test_no_input_message_silently_dropped(case: tuple[bytes, int, int], rename: bool) -> None:
    data, total, valid = case
    out = load_bytes(data, "localstorage", times=TimeContext(), rename=rename)
    assert out.read == total
    assert out.accepted + len(out.rejected) == out.read
    if rename:
        assert out.accepted == valid
    assert FAKE_TOKEN not in repr(out.notes) + repr(out.rejected)


@given(st.lists(st.one_of(
    items().map(lambda it: (json.dumps({**it[0], "chat_id": "c-1"})
                            if isinstance(it[0], dict) else json.dumps(it[0]), it[1])),
    st.just(("{broken", False)),
    st.just((json.dumps({**VALID_ITEM, "chat_id": "null"}), True)),
), max_size=12))
def test_no_jsonl_line_silently_dropped(lines: list[tuple[str, bool]]) -> None:
    data = "\n".join(text for text, _ in lines).encode()
    out = load_bytes(data, "jsonl", times=TimeContext())
    assert out.read == len(lines)
    assert out.accepted + len(out.rejected) == out.read
    assert out.accepted == sum(ok for _, ok in lines)
