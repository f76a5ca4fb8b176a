"""Normalisation of foreign message shapes (AutoBot web client, AutoBot backend, our JSONL)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatsave.errors import InvalidItemError
from chatsave.model import Message, format_time, message_id_problem
from chatsave.normalize import (
    CONSUMED,
    MessageNormalizer,
    TimeContext,
    normalize_message,
    parse_time,
)

BERLIN = ZoneInfo("Europe/Berlin")
DAY = date(2025, 8, 4)
ISO = "2026-03-01T10:00:05.120Z"
WHEN = datetime(2026, 3, 1, 10, 0, 5, 120000, tzinfo=UTC)


def norm(raw: Any, chat_id: str = "c-1", times: TimeContext = TimeContext()) -> Message:
    return normalize_message(raw, chat_id, times)


def refused(raw: Any, times: TimeContext = TimeContext(), chat_id: str = "c-1") -> str:
    with pytest.raises(InvalidItemError) as caught:
        norm(raw, chat_id, times)
    return caught.value.message


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# ---------------------------------------------------------------------------- shapes


def test_frontend_pinia_message() -> None:
    raw = {"id": "a1b2c3d4-0000-4000-8000-000000000002", "timestamp": "2026-03-01T10:00:09.877Z",
           "content": "Here are your files…", "sender": "assistant", "type": "response",
           "status": "sent", "metadata": {"version": 14, "model": "gpt-4"}}
    m = norm(raw)
    assert m.to_wire() == {
        "chat_id": "c-1", "id": "a1b2c3d4-0000-4000-8000-000000000002", "role": "assistant",
        "content": "Here are your files…", "created_at": "2026-03-01T10:00:09.877Z",
        "type": "response", "metadata": {"version": 14, "model": "gpt-4"}, "attachments": [],
        "extra": {"status": "sent"},
    }
    assert m.inexact is False


def test_backend_message_with_tool_markers() -> None:
    raw = {"id": "0c1d2e3f", "sender": "assistant", "text": "Here are your files…",
           "messageType": "llm_response", "metadata": None, "timestamp": "2026-03-01 10:00:07",
           "toolMarkers": [{"tool_type": "terminal", "tool_action": "execute_command",
                            "timestamp": "2026-03-01 10:00:07", "command": "ls"}]}
    m = norm(raw, times=TimeContext(tz=BERLIN))
    assert m.role == "assistant" and m.content == "Here are your files…"
    assert m.type == "llm_response" and m.metadata == {}
    assert m.created_at == utc(2026, 3, 1, 9, 0, 7)
    # Foreign fields verbatim: the nested naive timestamp is not touched.
    assert m.extra == {"toolMarkers": raw["toolMarkers"]}


def test_legacy_localstorage_message() -> None:
    raw = {"sender": "bot", "text": "Hello! How can I assist you today?",
           "timestamp": "9:41:03 AM", "type": "response"}
    m = norm(raw, times=TimeContext(date=DAY))
    assert m.role == "assistant" and m.type == "response"
    assert m.created_at == utc(2025, 8, 4, 9, 41, 3)
    assert m.inexact is True
    assert m.to_wire()["inexact"] is True
    assert m.id.startswith("m-")


def test_2025_backend_message_with_raw_data() -> None:
    raw = {"sender": "bot", "text": "Hello!", "messageType": "response",
           "rawData": {"message_id": "msg-7", "model": "x"}, "timestamp": "2025-08-04 12:00:00"}
    m = norm(raw)
    assert m.metadata == {"message_id": "msg-7", "model": "x"}
    assert m.id == "msg-7"  # ChatRepository: id = msg.id || metadata.message_id || rawData...
    assert m.extra == {}


# --------------------------------------------------------------------------- roles


@pytest.mark.parametrize(("value", "role"), [
    ("user", "user"), ("assistant", "assistant"), ("bot", "assistant"), ("system", "system"),
    ("agent_terminal", "system"), ("terminal", "system"), ("tool", "tool"),
    ("User", "user"), ("BOT", "assistant"),
])
@pytest.mark.parametrize("key", ["role", "sender", "author"])
def test_role_aliases(key: str, value: str, role: str) -> None:
    m = norm({key: value, "content": "x", "created_at": ISO})
    assert m.role == role
    assert key not in m.extra


@pytest.mark.parametrize(("fields", "role"), [
    ({"role": "assistant", "sender": "bot"}, "assistant"),
    ({"role": "system", "sender": "terminal", "author": "agent_terminal"}, "system"),
    ({"role": "user", "sender": None}, "user"),
])
def test_agreeing_role_fields_accepted(fields: dict[str, Any], role: str) -> None:
    assert norm({**fields, "content": "x", "created_at": ISO}).role == role


@pytest.mark.parametrize("fields", [
    {"role": "user", "sender": "assistant"},
    {"role": "assistant", "author": "user"},
    {"sender": "bot", "author": "terminal"},
])
def test_conflicting_role_fields_refused_never_guessed(fields: dict[str, Any]) -> None:
    reason = refused({**fields, "content": "x", "created_at": ISO})
    assert "conflicting role fields" in reason
    for key, value in fields.items():
        assert f"{key}={value!r}" in reason


def test_missing_or_unknown_role_refused() -> None:
    assert "no role" in refused({"content": "x", "created_at": ISO})
    assert "no role" in refused({"role": None, "content": "x", "created_at": ISO})
    assert "unknown role sender='moderator'" in refused(
        {"sender": "moderator", "content": "x", "created_at": ISO})
    assert "unknown role role=7" in refused({"role": 7, "content": "x", "created_at": ISO})


def test_autobot_weird_shape_refused_with_a_clear_reason() -> None:
    # POST /api/chat stored add_message(session_id, message_dict) positionally (docs/autobot.md).
    raw = {"sender": "3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f",
           "text": {"content": "hello", "role": "user"}, "messageType": "default",
           "timestamp": "2026-03-01 10:00:00"}
    reason = refused(raw)
    assert reason.startswith("unknown role sender='3f2b9c1e-")
    # With a known sender, the dict-valued text is what is refused.
    reason = refused({**raw, "sender": "user"})
    assert reason == "text is not text (dict)"


# ------------------------------------------------------------------------- content


@pytest.mark.parametrize("key", ["content", "text", "body"])
def test_content_aliases(key: str) -> None:
    m = norm({"role": "user", key: "hello\nworld", "created_at": ISO})
    assert m.content == "hello\nworld"
    assert m.extra == {}


def test_content_and_text_agreeing_or_null_accepted() -> None:
    assert norm({"role": "user", "content": "a", "text": "a", "created_at": ISO}).content == "a"
    assert norm({"role": "user", "content": None, "text": "b", "created_at": ISO}).content == "b"


def test_conflicting_content_refused() -> None:
    reason = refused({"role": "user", "content": "a", "text": "b", "created_at": ISO})
    # The text is someone's conversation: sizes only, never quoted.
    assert reason == "conflicting content fields (content: 1 character(s), text: 1 character(s))"


@pytest.mark.parametrize("raw", [
    {"role": "user", "created_at": ISO},
    {"role": "user", "content": None, "text": None, "body": None, "created_at": ISO},
    {"sender": "assistant", "timestamp": ISO, "status": "error", "error": "stream interrupted"},
])
def test_no_content_refused_never_saved_empty(raw: dict[str, Any]) -> None:
    assert refused(raw) == "no content (content, text or body)"


@pytest.mark.parametrize(("value", "kind"), [(["a"], "list"), (5, "int"), ({"a": 1}, "dict")])
def test_non_text_content_refused(value: Any, kind: str) -> None:
    assert refused({"role": "user", "body": value, "created_at": ISO}) == \
        f"body is not text ({kind})"


# ---------------------------------------------------------------------------- types


@pytest.mark.parametrize(("fields", "type_"), [
    ({}, "message"),
    ({"type": "default"}, "message"),
    ({"messageType": "default"}, "message"),
    ({"type": ""}, "message"),
    ({"type": None, "messageType": None}, "message"),
    ({"type": "message"}, "message"),
    ({"messageType": "llm_response"}, "llm_response"),
    ({"type": "terminal_output"}, "terminal_output"),
    ({"type": "user"}, "user"),
    ({"type": "response", "messageType": "response"}, "response"),
    ({"type": "message", "messageType": "default"}, "message"),
])
def test_type_aliases(fields: dict[str, Any], type_: str) -> None:
    m = norm({"role": "user", "content": "x", "created_at": ISO, **fields})
    assert m.type == type_
    assert m.extra == {}


def test_conflicting_or_bad_type_refused() -> None:
    assert refused({"role": "user", "content": "x", "created_at": ISO, "type": "response",
                    "messageType": "llm_response"}).startswith("conflicting type fields")
    assert refused({"role": "user", "content": "x", "created_at": ISO, "type": 3}) == \
        "type is not text (int)"
    assert "type" in refused({"role": "user", "content": "x", "created_at": ISO,
                              "type": "t" * 129})


# ------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(("fields", "metadata"), [
    ({}, {}),
    ({"metadata": None}, {}),
    ({"rawData": None}, {}),
    ({"metadata": {"version": 3}}, {"version": 3}),
    ({"rawData": {"model": "m"}}, {"model": "m"}),
    ({"metadata": {"a": 1}, "rawData": {"a": 1}}, {"a": 1}),
    ({"metadata": None, "rawData": {"a": 1}}, {"a": 1}),
])
def test_metadata_aliases(fields: dict[str, Any], metadata: dict[str, Any]) -> None:
    m = norm({"role": "user", "content": "x", "created_at": ISO, **fields})
    assert m.metadata == metadata
    assert m.extra == {}


def test_bad_metadata_or_attachments_refused() -> None:
    base = {"role": "user", "content": "x", "created_at": ISO}
    assert refused({**base, "metadata": {"a": 1}, "rawData": {"a": 2}}).startswith(
        "conflicting metadata fields")
    assert refused({**base, "metadata": [1]}) == "metadata is not an object (list)"
    assert refused({**base, "rawData": "x"}) == "rawData is not an object (str)"
    assert refused({**base, "attachments": {"a": 1}}) == "attachments is not a list (dict)"
    assert norm({**base, "attachments": None}).attachments == []
    assert norm({**base, "attachments": [{"name": "a.png"}]}).attachments == [{"name": "a.png"}]


# ---------------------------------------------------------------------------- extra


def test_extra_keeps_unknown_fields_verbatim() -> None:
    foreign = {
        "status": "error", "error": "network", "isStreaming": False, "tokens": 12,
        "ratio": 0.25, "nested": {"timestamp": "9:41 AM", "list": [1, None, "x"]},
        "owner": None, "ünï": "ü", "toolMarkers": [],
    }
    m = norm({"sender": "user", "text": "x", "timestamp": ISO, **foreign})
    assert m.extra == foreign
    assert json.dumps(m.extra, sort_keys=True) == json.dumps(foreign, sort_keys=True)


def test_every_consumed_field_is_an_alias_or_our_own() -> None:
    assert {"role", "sender", "author", "content", "text", "body", "type", "messageType",
            "created_at", "timestamp", "createdAt", "time", "metadata", "rawData"} <= CONSUMED
    assert "status" not in CONSUMED and "toolMarkers" not in CONSUMED


def test_extra_object_merges_with_foreign_fields() -> None:
    m = norm({"role": "user", "content": "x", "created_at": ISO, "extra": {"a": 1},
              "b": 2})
    assert m.extra == {"a": 1, "b": 2}
    assert refused({"role": "user", "content": "x", "created_at": ISO, "extra": {"a": 1},
                    "a": 2}) == "field 'a' differs from extra.a"
    assert refused({"role": "user", "content": "x", "created_at": ISO, "extra": [1]}) == \
        "extra is not an object (list)"


# ----------------------------------------------------------------------------- times


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-03-01T10:00:05.120Z", utc(2026, 3, 1, 10, 0, 5, 120000)),
    ("2026-03-01T10:00:05Z", utc(2026, 3, 1, 10, 0, 5)),
    ("2026-03-01T12:00:05.120+02:00", utc(2026, 3, 1, 10, 0, 5, 120000)),
    ("2026-03-01T05:30:00-04:30", utc(2026, 3, 1, 10, 0, 0)),
    ("2026-03-01T10:00:05.123456Z", utc(2026, 3, 1, 10, 0, 5, 123000)),
    ("2026-03-01 10:00:00", utc(2026, 3, 1, 10, 0, 0)),
    ("2026-03-01T10:00:00.111593", utc(2026, 3, 1, 10, 0, 0, 111000)),
    ("2026-03-01T10:00:07.5", utc(2026, 3, 1, 10, 0, 7, 500000)),
    (1772359205, utc(2026, 3, 1, 10, 0, 5)),
    (1772359205.12, utc(2026, 3, 1, 10, 0, 5, 120000)),
    (1772359205120, utc(2026, 3, 1, 10, 0, 5, 120000)),
    (1772359205120.0, utc(2026, 3, 1, 10, 0, 5, 120000)),
    ("1772359205", utc(2026, 3, 1, 10, 0, 5)),
    ("1772359205120", utc(2026, 3, 1, 10, 0, 5, 120000)),
    ("  2026-03-01T10:00:05.120Z ", utc(2026, 3, 1, 10, 0, 5, 120000)),
    (0, utc(1970, 1, 1)),
    ("0999-01-01T00:00:00Z", utc(999, 1, 1)),
])
def test_exact_time_forms(value: Any, expected: datetime) -> None:
    when, inexact = parse_time(value)
    assert when == expected
    assert when.tzinfo is UTC or when.utcoffset() == timedelta(0)
    assert inexact is False


@pytest.mark.parametrize(("value", "expected"), [
    ("9:41:03 AM", (9, 41, 3)),
    ("9:41:03 PM", (21, 41, 3)),
    ("12:00:00 PM", (12, 0, 0)),
    ("12:00:00 AM", (0, 0, 0)),
    ("12:30:15 am", (0, 30, 15)),
    ("9:41:03 a.m.", (9, 41, 3)),
    ("9:41 PM", (21, 41, 0)),
    ("12:00:00", (12, 0, 0)),
    ("23:59:59", (23, 59, 59)),
    ("08:05", (8, 5, 0)),
    ("9:41:03AM", (9, 41, 3)),
])
def test_time_only_forms_need_the_date_and_are_inexact(value: str,
                                                       expected: tuple[int, int, int]) -> None:
    when, inexact = parse_time(value, TimeContext(date=DAY))
    assert when == utc(2025, 8, 4, *expected)
    assert inexact is True


@pytest.mark.parametrize("value", ["9:41:03 AM", "12:00:00", "21:05"])
def test_time_only_without_date_refused_mentioning_date(value: str) -> None:
    with pytest.raises(ValueError, match="--date"):
        parse_time(value)
    reason = refused({"sender": "user", "text": "x", "timestamp": value})
    assert reason.startswith("timestamp: time-only timestamp")
    assert "--date" in reason


@pytest.mark.parametrize("value", [
    "yesterday", "", "25:00:00", "12:61:00", "13:00:00 PM", "0:10:00 AM", "2026-13-01T00:00:00Z",
    "12", "1e9", "Mon Aug  4 12:00:10 CEST 2025", True, None, [2026], {"t": 1}, float("nan"),
    float("inf"), 10**400, 10**20, "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00",
])
def test_unusable_times_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_time(value, TimeContext(date=DAY))
    with pytest.raises(InvalidItemError):
        norm({"sender": "user", "text": "x", "timestamp": value}, times=TimeContext(date=DAY))


def test_unrecognised_time_reason_is_bounded() -> None:
    reason = refused({"sender": "user", "text": "x", "timestamp": "z" * 10_000})
    assert reason.startswith("timestamp: unrecognised timestamp 'zzz")
    assert len(reason) < 200


def test_tz_reads_naive_times_including_dst() -> None:
    ctx = TimeContext(tz=BERLIN)
    # Winter: CET (+01:00); summer: CEST (+02:00).
    assert parse_time("2025-01-15 12:00:00", ctx)[0] == utc(2025, 1, 15, 11, 0, 0)
    assert parse_time("2025-07-01 12:00:00", ctx)[0] == utc(2025, 7, 1, 10, 0, 0)
    assert parse_time("2025-07-01T12:00:00.250", ctx)[0] == utc(2025, 7, 1, 10, 0, 0, 250000)
    # The hour that happens twice in October reads as its first occurrence (CEST).
    assert parse_time("2025-10-26 02:30:00", ctx)[0] == utc(2025, 10, 26, 0, 30, 0)
    # Around the change, an hour apart locally is an hour apart or two in UTC.
    before = parse_time("2025-03-30 01:30:00", ctx)[0]
    after = parse_time("2025-03-30 03:30:00", ctx)[0]
    assert after - before == timedelta(hours=1)
    # Aware forms ignore --tz entirely.
    assert parse_time(ISO, ctx)[0] == WHEN
    assert parse_time("2026-03-01T10:00:05.120+00:00", ctx)[0] == WHEN
    assert parse_time(1772359205120, ctx)[0] == WHEN


def test_tz_applies_to_time_only_strings() -> None:
    summer = TimeContext(tz=BERLIN, date=DAY)
    assert parse_time("9:41:03 AM", summer) == (utc(2025, 8, 4, 7, 41, 3), True)
    winter = TimeContext(tz=BERLIN, date=date(2025, 12, 1))
    assert parse_time("12:00:00", winter) == (utc(2025, 12, 1, 11, 0, 0), True)
    fixed = TimeContext(tz=timezone(timedelta(hours=-5)), date=DAY)
    assert parse_time("11:00 PM", fixed) == (utc(2025, 8, 5, 4, 0, 0), True)


@pytest.mark.parametrize("key", ["created_at", "timestamp", "createdAt", "time"])
def test_time_aliases(key: str) -> None:
    m = norm({"role": "user", "content": "x", key: ISO})
    assert m.created_at == WHEN
    assert m.extra == {}


def test_time_fields_must_agree() -> None:
    same = norm({"role": "user", "content": "x", "timestamp": ISO,
                 "createdAt": 1772359205120, "created_at": "2026-03-01T11:00:05.120+01:00"})
    assert same.created_at == WHEN
    reason = refused({"role": "user", "content": "x", "timestamp": ISO,
                      "created_at": "2026-03-01T10:00:06.000Z"})
    assert reason.startswith("conflicting time fields")
    assert refused({"role": "user", "content": "x"}).startswith("no timestamp")


def test_inexact_survives_the_wire_flag() -> None:
    m = norm({"role": "user", "content": "x", "created_at": ISO, "inexact": True})
    assert m.inexact is True
    assert norm({"role": "user", "content": "x", "created_at": ISO}).inexact is False


# ------------------------------------------------------------------------ other checks


@pytest.mark.parametrize(("raw", "reason"), [
    ([1, 2], "not a JSON object (list)"),
    ("hello", "not a JSON object (str)"),
    (None, "not a JSON object (NoneType)"),
    ({"role": "user", "content": "x", "created_at": ISO, "deleted": True},
     "a deleted message (tombstone), not a message"),
    ({"role": "user", "content": "x", "created_at": ISO, "chat_id": "c-2"},
     "says it belongs to chat 'c-2', found in chat 'c-1'"),
    ({"role": "user", "content": "bad \ud800 surrogate", "created_at": ISO},
     "contains text that is not valid Unicode (an unpaired surrogate)"),
    ({"role": "user", "content": "x", "created_at": ISO, "status": "\udcff"},
     "contains text that is not valid Unicode (an unpaired surrogate)"),
])
def test_refusals(raw: Any, reason: str) -> None:
    assert refused(raw) == reason


def test_too_deeply_nested_metadata_refused_not_crashed() -> None:
    deep: dict[str, Any] = {}
    for _ in range(2000):
        deep = {"a": deep}
    assert refused({"role": "user", "content": "x", "created_at": ISO, "metadata": deep}) == \
        "nested too deeply to store"


def test_own_chat_id_and_false_deleted_accepted() -> None:
    m = norm({"chat_id": "c-1", "role": "user", "content": "x", "created_at": ISO,
              "deleted": False})
    assert m.chat_id == "c-1" and m.extra == {}


def test_invalid_chat_id_is_an_item_error() -> None:
    reason = refused({"role": "user", "content": "x", "created_at": ISO},
                     chat_id="test/chat#1")
    assert reason.startswith("invalid chat id 'test/chat#1'")


# ----------------------------------------------------------------------------- ids


def test_ids_kept_and_numbers_spelled_like_javascript() -> None:
    base = {"role": "user", "content": "x", "created_at": ISO}
    assert norm({**base, "id": "abc"}).id == "abc"
    assert norm({**base, "id": 1740823200123}).id == "1740823200123"
    assert norm({**base, "id": 1740823200123.0}).id == "1740823200123"
    assert norm({**base, "id": 1740823200123.5}).id == "1740823200123.5"
    assert norm({**base, "metadata": {"message_id": "meta-1"}}).id == "meta-1"
    assert norm({**base, "id": "own", "metadata": {"message_id": "meta-1"}}).id == "own"


@pytest.mark.parametrize("placeholder", ["null", "undefined", "", "  ", "NaN", True, {"a": 1}])
def test_placeholder_ids_kept_aside_and_a_real_id_derived(placeholder: Any) -> None:
    raw = {"role": "user", "content": "x", "created_at": ISO, "id": placeholder}
    m = norm(raw)
    assert m.id.startswith("m-")
    assert m.extra == {"id": placeholder}
    # Same as the id-less message otherwise.
    assert m.id == norm({"role": "user", "content": "x", "created_at": ISO}).id
    assert norm(m.to_wire()) == m


@pytest.mark.parametrize(("value", "reason"), [
    ("a\nb", "control characters"), ("x" * 257, "longer than 256"), ("\ud800", "surrogate"),
])
def test_invalid_message_ids_refused(value: str, reason: str) -> None:
    text = refused({"role": "user", "content": "x", "created_at": ISO, "id": value})
    assert text.startswith("invalid message id") and reason in text


def test_derived_ids_repeat_across_imports_and_keep_genuine_repeats() -> None:
    legacy = [
        {"sender": "bot", "text": "Delete the files?", "timestamp": "9:41:12 AM"},
        {"sender": "user", "text": "yes", "timestamp": "9:41:20 AM"},
        {"sender": "bot", "text": "Empty the trash too?", "timestamp": "9:41:22 AM"},
        {"sender": "user", "text": "yes", "timestamp": "9:42:05 AM"},
        # Same second, same text: a locale time has no milliseconds.
        {"sender": "user", "text": "yes", "timestamp": "9:42:05 AM"},
    ]
    ctx = TimeContext(date=DAY)
    first = [MessageNormalizer("c-1", ctx).normalize(r) for r in [*legacy]]
    one = MessageNormalizer("c-1", ctx)
    ids = [one.normalize(r).id for r in legacy]
    two = MessageNormalizer("c-1", ctx)
    assert [two.normalize(r).id for r in legacy] == ids
    assert len(set(ids)) == len(legacy)
    # Without ordinals, the two same-second "yes" would collapse; the normaliser keeps two.
    assert first[3].id == first[4].id
    assert ids[3] != ids[4]
    # Another chat, another --date or --tz: other ids.
    assert MessageNormalizer("c-2", ctx).normalize(legacy[1]).id != ids[1]
    assert MessageNormalizer("c-1", TimeContext(date=date(2025, 8, 5))).normalize(
        legacy[1]).id != ids[1]


# ---------------------------------------------------------------------- properties

_no_surrogates = st.characters(exclude_categories=["Cs"])
json_scalars = (st.none() | st.booleans() | st.integers(-2**53, 2**53)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(_no_surrogates, max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(_no_surrogates, max_size=6), children, max_size=3),
    max_leaves=6,
)
foreign_keys = st.text(_no_surrogates, min_size=1, max_size=10).filter(
    lambda k: k not in CONSUMED)

ROLE_SPELLINGS = {
    "user": ["user", "User"],
    "assistant": ["assistant", "bot", "BOT"],
    "system": ["system", "terminal", "agent_terminal"],
    "tool": ["tool"],
}
TYPES = ["message", "response", "llm_response", "terminal_output", "thought", "utility"]
# Instants that every epoch form can express: ms values from 1e11 (1973) on.
MS_FROM, MS_TO = 100_000_000_000, 4_102_444_800_000


@st.composite
def semantics(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "role": draw(st.sampled_from(sorted(ROLE_SPELLINGS))),
        "content": draw(st.text(_no_surrogates, max_size=30)),
        "ms": draw(st.integers(MS_FROM, MS_TO)),
        "type": draw(st.sampled_from(TYPES)),
        "metadata": draw(st.dictionaries(st.text(_no_surrogates, max_size=5), json_values,
                                          max_size=3)),
        "attachments": draw(st.lists(json_values, max_size=2)),
        "foreign": draw(st.dictionaries(foreign_keys, json_values, max_size=3)),
    }


def _time_forms(ms: int) -> list[Any]:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    iso_z = format_time(when)
    forms: list[Any] = [
        iso_z,
        iso_z.replace(".000Z", "Z") if iso_z.endswith(".000Z") else iso_z,
        when.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
        when.astimezone(timezone(timedelta(hours=-8))).isoformat(timespec="milliseconds"),
        ms, str(ms), ms / 1000,
    ]
    if ms % 1000 == 0:
        forms += [ms // 1000, str(ms // 1000)]
    return forms


@st.composite
def shaped(draw: st.DrawFn, sem: dict[str, Any]) -> dict[str, Any]:
    """One source shape of the message ``sem`` describes: aliases, time forms, defaults."""
    raw: dict[str, Any] = dict(sem["foreign"])
    role_keys = draw(st.lists(st.sampled_from(["role", "sender", "author"]), min_size=1,
                              max_size=3, unique=True))
    for key in role_keys:
        raw[key] = draw(st.sampled_from(ROLE_SPELLINGS[sem["role"]]))
    for key in draw(st.lists(st.sampled_from(["content", "text", "body"]), min_size=1,
                             max_size=3, unique=True)):
        raw[key] = sem["content"]
    type_value = sem["type"]
    type_spellings = ["default", "message", None] if type_value == "message" else [type_value]
    for key in draw(st.lists(st.sampled_from(["type", "messageType"]), max_size=2,
                             unique=True, min_size=0 if type_value == "message" else 1)):
        raw[key] = draw(st.sampled_from(type_spellings))
    meta_keys = draw(st.lists(st.sampled_from(["metadata", "rawData"]), max_size=2,
                              unique=True, min_size=0 if not sem["metadata"] else 1))
    for key in meta_keys:
        raw[key] = sem["metadata"] if sem["metadata"] else draw(st.sampled_from([None, {}]))
    if sem["attachments"] or draw(st.booleans()):
        raw["attachments"] = sem["attachments"]
    for key in draw(st.lists(st.sampled_from(["created_at", "timestamp", "createdAt", "time"]),
                             min_size=1, max_size=4, unique=True)):
        raw[key] = draw(st.sampled_from(_time_forms(sem["ms"])))
    order = draw(st.permutations(list(raw)))
    return {k: raw[k] for k in order}


@given(st.data())
def test_normalisation_is_idempotent(data: st.DataObject) -> None:
    raw = data.draw(semantics().flatmap(shaped))
    if data.draw(st.booleans()):
        raw["id"] = data.draw(st.text(min_size=1, max_size=20).filter(
            lambda s: message_id_problem(s) is None))
    m = norm(raw)
    wire = m.to_wire()
    again = norm(wire)
    assert again == m
    assert again.to_wire() == wire
    assert again.content_hash == m.content_hash
    # Also through JSON text, as JSONL stores it.
    assert norm(json.loads(json.dumps(wire))) == m


@given(st.data())
def test_time_only_messages_are_idempotent(data: st.DataObject) -> None:
    hour = data.draw(st.integers(1, 12))
    text = f"{hour}:{data.draw(st.integers(0, 59)):02d}:{data.draw(st.integers(0, 59)):02d} " \
        f"{data.draw(st.sampled_from(['AM', 'PM']))}"
    ctx = TimeContext(tz=data.draw(st.sampled_from([UTC, BERLIN])), date=DAY)
    m = norm({"sender": "user", "text": "x", "timestamp": text}, times=ctx)
    assert m.inexact
    assert norm(m.to_wire()) == m


@given(st.data())
def test_one_message_in_different_shapes_gets_one_content_hash(data: st.DataObject) -> None:
    sem = data.draw(semantics())
    first = data.draw(shaped(sem))
    second = data.draw(shaped(sem))
    a, b = norm(first), norm(second)
    assert a.content_hash == b.content_hash
    assert (a.role, a.content, a.created_at, a.type, a.metadata, a.attachments) == \
        (b.role, b.content, b.created_at, b.type, b.metadata, b.attachments)
    assert a.extra == b.extra == sem["foreign"]
    # Id-less in both shapes: the same derived id too.
    assert a.id == b.id


@given(st.lists(st.tuples(st.sampled_from(["user", "bot", "assistant"]),
                          st.sampled_from(["yes", "no", "ok"]),
                          st.sampled_from(["9:41:20 AM", "9:42:05 AM", 1772359205120])),
                min_size=1, max_size=25))
def test_derived_ids_are_stable_and_distinct(items: list[tuple[str, str, Any]]) -> None:
    raws = [{"sender": s, "text": t, "timestamp": ts} for s, t, ts in items]
    ctx = TimeContext(date=DAY)
    first = [m.id for m in map(MessageNormalizer("c-1", ctx).normalize, raws)]
    second = [m.id for m in map(MessageNormalizer("c-1", ctx).normalize, raws)]
    assert first == second
    assert len(set(first)) == len(raws)


@given(st.integers(1, 40), st.sampled_from(["9:41:20 AM", ISO]))
def test_n_identical_id_less_messages_get_n_ids(n: int, ts: str) -> None:
    normalizer = MessageNormalizer("c-1", TimeContext(date=DAY))
    ids = [normalizer.normalize({"sender": "user", "text": "yes", "timestamp": ts}).id
           for _ in range(n)]
    assert len(set(ids)) == n


def test_a_refused_item_does_not_shift_the_derived_ids_after_it() -> None:
    good = {"sender": "user", "text": "yes", "timestamp": ISO}
    # Same role, text and time, refused only when the Message is built.
    bad = {**good, "status": "\udcff"}
    with_bad = MessageNormalizer("c-1")
    with pytest.raises(InvalidItemError):
        with_bad.normalize(bad)
    assert with_bad.normalize(good).id == MessageNormalizer("c-1").normalize(good).id
