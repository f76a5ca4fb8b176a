"""The data model: chat and message ids, Message and its wire shape, content hashing, digests."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from chatsave.errors import ExitCode, InvalidIdError
from chatsave.model import (
    CHAT_ID_MAX,
    MESSAGE_ID_MAX,
    Message,
    chat_digest,
    chat_id_problem,
    check_chat_id,
    check_message_id,
    content_hash,
    derived_message_id,
    format_time,
    message_id_problem,
    renamed_chat_id,
)

INVALID_CHAT_IDS = [
    "null", "undefined", "None", "NaN", "NULL", "Undefined", "none", "nan", "nAn",
    "", " ", "   ", "\t",
    "x" * (CHAT_ID_MAX + 1),
    "test/chat#1", "../x", "a?b=c", "nul\x00byte", ".", "..", "a b", "a\\b", "chat\n",
    "ünïcode", "a%2Fb", "back`tick",
]
VALID_CHAT_IDS = [
    "3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f",
    "chat-1740823200123-4c086981",
    "chat_1724200000000",
    "user@example.com:chat~1",
    "uuid-imported-123",
    "a",
    "x" * CHAT_ID_MAX,
    "nullable", "null_chat", "NaNa", "none.1", "...x",
]
CHAT_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@~-"

T0 = datetime(2026, 3, 1, 10, 0, 5, 120000, tzinfo=UTC)


def msg(**fields: Any) -> Message:
    base: dict[str, Any] = {"chat_id": "c-1", "id": "m-1", "role": "user", "content": "hi",
                            "created_at": T0}
    base.update(fields)
    return Message(**base)


# ------------------------------------------------------------------------------ chat ids


@pytest.mark.parametrize("bad", INVALID_CHAT_IDS, ids=repr)
def test_invalid_chat_id_refused_with_the_value_quoted(bad: str) -> None:
    assert chat_id_problem(bad) is not None
    with pytest.raises(InvalidIdError) as caught:
        check_chat_id(bad)
    err = caught.value
    assert err.exit_code == ExitCode.USAGE
    assert err.hint and "--rename-invalid" in err.hint
    shown = repr(bad) if len(repr(bad)) <= 80 else repr(bad)[:77]
    assert shown in err.message, err.message
    assert err.message.startswith("invalid chat id ")


@pytest.mark.parametrize(("bad", "reason"), [
    ("null", "placeholder"), ("NaN", "placeholder"), ("   ", "blank"), ("", "blank"),
    ("x" * 129, "longer than 128"), ("test/chat#1", "outside"), ("..", "path component"),
])
def test_invalid_chat_id_reason(bad: str, reason: str) -> None:
    problem = chat_id_problem(bad)
    assert problem is not None and reason in problem


def test_bad_characters_are_named_and_nul_is_escaped() -> None:
    problem = chat_id_problem("test/chat#1")
    assert problem is not None and "#/" in problem
    with pytest.raises(InvalidIdError) as caught:
        check_chat_id("nul\x00byte")
    # The NUL is shown escaped, never written raw to a terminal.
    assert "\x00" not in caught.value.message
    assert "'nul\\x00byte'" in caught.value.message


def test_long_invalid_value_is_quoted_bounded() -> None:
    with pytest.raises(InvalidIdError) as caught:
        check_chat_id("/" * 5000)
    assert "'////" in caught.value.message
    assert len(caught.value.message) < 300


@pytest.mark.parametrize("value", [None, 12, 1.5, ["a"], {"id": "a"}, True])
def test_non_string_chat_id_refused(value: Any) -> None:
    problem = chat_id_problem(value)
    assert problem is not None and "not a string" in problem
    with pytest.raises(InvalidIdError):
        check_chat_id(value)


@pytest.mark.parametrize("good", VALID_CHAT_IDS)
def test_valid_chat_id_accepted(good: str) -> None:
    assert chat_id_problem(good) is None
    assert check_chat_id(good) == good


def test_chat_id_length_bound() -> None:
    assert check_chat_id("a" * 128) == "a" * 128
    with pytest.raises(InvalidIdError, match="longer than 128"):
        check_chat_id("a" * 129)


@given(st.text(alphabet=CHAT_ID_ALPHABET, min_size=1, max_size=CHAT_ID_MAX))
def test_every_id_from_the_alphabet_is_valid_unless_a_placeholder(value: str) -> None:
    placeholder = value.lower() in {"null", "undefined", "none", "nan"} or value in (".", "..")
    assert (chat_id_problem(value) is None) is not placeholder


@given(st.text(min_size=1, max_size=40).filter(
    lambda s: any(ch not in CHAT_ID_ALPHABET for ch in s)))
def test_any_character_outside_the_alphabet_is_refused(value: str) -> None:
    assert chat_id_problem(value) is not None


def test_chat_id_validates_in_the_model() -> None:
    # The id validators raise chatsave's own error (exit 2, value quoted), not a
    # pydantic ValidationError: pydantic passes non-ValueError exceptions through.
    with pytest.raises(InvalidIdError, match="invalid chat id 'test/chat#1'"):
        msg(chat_id="test/chat#1")


# --------------------------------------------------------------------------- renaming


RENAMED = re.compile(r"(?P<stem>[A-Za-z0-9._:@~-]{1,100})~(?P<digest>[0-9a-f]{10})")


def readable_stem(text: str) -> str:
    """The rule for the readable part: each character outside the chat id alphabet becomes
    ``_``, leading and trailing ``.``/``_`` go, at most 100 characters, ``chat`` if empty."""
    replaced = "".join(ch if ch in CHAT_ID_ALPHABET else "_" for ch in text)
    return replaced.strip("._")[:100] or "chat"


def test_renamed_chat_ids_of_the_invalid_samples_are_valid_and_all_distinct() -> None:
    renamed = {bad: renamed_chat_id(bad) for bad in INVALID_CHAT_IDS}
    for bad, new in renamed.items():
        assert chat_id_problem(new) is None, (bad, new)
        parts = RENAMED.fullmatch(new)
        assert parts is not None, (bad, new)
        assert parts["stem"] == readable_stem(bad), (bad, new)
    assert len(set(renamed.values())) == len(INVALID_CHAT_IDS), renamed


@pytest.mark.parametrize(("original", "renamed"), [
    # Pinned: a store keeps these names, so a later chatsave must map the same way.
    ("test/chat#1", "test_chat_1~d8833f8646"),
    ("null", "null~74234e98af"),
    (None, "null~74234e98af"),  # JSON null is renamed from its text, "null"
    ("", "chat~e3b0c44298"),
    (" ", "chat~36a9e7f1c9"),
    ("..", "chat~5ec1f7e700"),
    ("a/b", "a_b~c14cddc033"),
    ("a#b", "a_b~8187fc8f7f"),
    ("ünïcode", "n_code~b8be8967e4"),
    ("nul\x00byte", "nul_byte~a9512ba690"),
    ("x" * 300, "x" * 100 + "~0d4e2ca9e9"),
], ids=repr)
def test_renamed_chat_id_known_values(original: Any, renamed: str) -> None:
    assert renamed_chat_id(original) == renamed


def test_renamed_chat_id_is_readable_and_distinct() -> None:
    assert renamed_chat_id("test/chat#1").startswith("test_chat_1~")
    assert renamed_chat_id("null").startswith("null~")
    # Same readable stem, different originals: the hash keeps them apart.
    assert renamed_chat_id("a/b") != renamed_chat_id("a#b")
    assert renamed_chat_id("") != renamed_chat_id(" ")


@given(st.one_of(st.text(max_size=300), st.none(), st.integers(), st.lists(st.integers())))
def test_renamed_chat_id_valid_for_any_input(original: Any) -> None:
    new = renamed_chat_id(original)
    assert chat_id_problem(new) is None, new
    text = original if isinstance(original, str) else json.dumps(original)
    parts = RENAMED.fullmatch(new)
    assert parts is not None, new
    assert parts["stem"] == readable_stem(text), (text, new)
    assert parts["digest"] == hashlib.sha256(
        text.encode("utf-8", "surrogatepass")).hexdigest()[:10], (text, new)


@given(st.text(max_size=50), st.text(max_size=50))
def test_renamed_chat_id_distinct_for_distinct_text(a: str, b: str) -> None:
    if a != b:
        assert renamed_chat_id(a) != renamed_chat_id(b)


# -------------------------------------------------------------------------- message ids


@pytest.mark.parametrize("good", [
    "a1b2c3d4-0000-4000-8000-000000000001", "1740823200123", "user-2026-03-01T10:00:05.120Z-0",
    "id with spaces", "ünïcode/#?", "x" * MESSAGE_ID_MAX, "null-1", "nullable",
])
def test_valid_message_id(good: str) -> None:
    assert message_id_problem(good) is None
    assert check_message_id(good) == good


@pytest.mark.parametrize(("bad", "reason"), [
    ("", "blank"), ("  ", "blank"), ("x" * (MESSAGE_ID_MAX + 1), "longer than 256"),
    ("a\x00b", "control"), ("a\nb", "control"), ("a\x7fb", "control"), ("a\x85b", "control"),
    ("\ud800x", "surrogate"), (5, "not a string"), (None, "not a string"),
    ("null", "placeholder"), ("undefined", "placeholder"), ("None", "placeholder"),
    ("NaN", "placeholder"),
])
def test_invalid_message_id(bad: Any, reason: str) -> None:
    problem = message_id_problem(bad)
    assert problem is not None and reason in problem
    with pytest.raises(InvalidIdError, match="invalid message id"):
        check_message_id(bad)


def test_message_id_validates_in_the_model() -> None:
    with pytest.raises(InvalidIdError, match="invalid message id"):
        msg(id="")
    with pytest.raises(InvalidIdError, match="invalid message id"):
        msg(id="a\tb")


def test_derived_message_id() -> None:
    args = ("c-1", "user", "yes", "2025-08-04T09:41:20.000Z")
    first = derived_message_id(*args, 0)
    assert first == derived_message_id(*args, 0)
    assert re.fullmatch(r"m-[0-9a-f]{32}", first)
    assert message_id_problem(first) is None
    assert derived_message_id(*args, 1) != first
    assert derived_message_id("c-2", *args[1:], 0) != first
    assert derived_message_id("c-1", "assistant", "yes", args[3], 0) != first
    assert derived_message_id("c-1", "user", "no", args[3], 0) != first
    assert derived_message_id("c-1", "user", "yes", "2025-08-04T09:42:05.000Z", 0) != first


# ----------------------------------------------------------------------------- Message


def test_to_wire_is_the_flat_shape_of_the_design() -> None:
    m = msg(type="response", metadata={"version": 12}, attachments=[{"name": "a.txt"}],
            extra={"status": "sent"})
    wire = m.to_wire()
    assert list(wire) == ["chat_id", "id", "role", "content", "created_at", "type", "metadata",
                          "attachments", "extra"]
    assert wire == {
        "chat_id": "c-1", "id": "m-1", "role": "user", "content": "hi",
        "created_at": "2026-03-01T10:00:05.120Z", "type": "response",
        "metadata": {"version": 12}, "attachments": [{"name": "a.txt"}],
        "extra": {"status": "sent"},
    }
    # Plain JSON, nothing that needs a custom encoder.
    assert json.loads(json.dumps(wire)) == wire


def test_to_wire_defaults_and_inexact_flag() -> None:
    wire = msg().to_wire()
    assert wire["type"] == "message"
    assert wire["metadata"] == {} and wire["attachments"] == [] and wire["extra"] == {}
    assert "inexact" not in wire
    assert msg(inexact=True).to_wire()["inexact"] is True


def test_message_rejects_unknown_fields_and_roles() -> None:
    with pytest.raises(ValidationError):
        msg(seq=3)
    with pytest.raises(ValidationError):
        msg(role="bot")
    with pytest.raises(ValidationError):
        msg(type="")
    with pytest.raises(ValidationError):
        msg(type="x" * 129)


def test_message_is_frozen() -> None:
    m = msg()
    with pytest.raises(ValidationError):
        m.content = "changed"  # type: ignore[misc]


def test_created_at_must_carry_a_zone() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        msg(created_at=datetime(2026, 3, 1, 10, 0, 0))


def test_created_at_is_utc_and_truncated_to_milliseconds() -> None:
    berlin_summer = timezone(timedelta(hours=2))
    m = msg(created_at=datetime(2026, 6, 1, 12, 0, 0, 987654, tzinfo=berlin_summer))
    assert m.created_at == datetime(2026, 6, 1, 10, 0, 0, 987000, tzinfo=UTC)
    assert m.created_at.utcoffset() == timedelta(0)
    assert m.to_wire()["created_at"] == "2026-06-01T10:00:00.987Z"


def test_created_at_out_of_range_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="out of range"):
        msg(created_at=datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))))


@pytest.mark.parametrize(("when", "text"), [
    (datetime(2026, 1, 1, 10, 0, tzinfo=UTC), "2026-01-01T10:00:00.000Z"),
    (datetime(2026, 1, 1, 10, 0, 0, 999999, tzinfo=UTC), "2026-01-01T10:00:00.999Z"),
    (datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC), "0999-12-31T23:59:59.000Z"),
    (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
    (datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
     "2025-12-31T23:30:00.000Z"),
])
def test_format_time(when: datetime, text: str) -> None:
    assert format_time(when) == text
    assert datetime.fromisoformat(text) == when.replace(
        microsecond=when.microsecond // 1000 * 1000)


# ------------------------------------------------------------------------ content hash


def _expected_hash(m: Message) -> str:
    doc = {"attachments": m.attachments, "content": m.content,
           "created_at": m.to_wire()["created_at"], "metadata": m.metadata, "role": m.role,
           "type": m.type}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_content_hash_is_sha256_of_canonical_json_of_the_semantic_fields() -> None:
    m = msg(type="response", metadata={"b": 1, "a": [1, "ü"]}, attachments=[{"n": 1}])
    assert m.content_hash == _expected_hash(m)
    assert re.fullmatch(r"[0-9a-f]{64}", m.content_hash)
    # The module function agrees with the property.
    assert m.content_hash == content_hash(m.role, m.content, "2026-03-01T10:00:05.120Z",
                                          m.type, m.metadata, m.attachments)


def test_content_hash_known_value() -> None:
    # Pinned: a change here changes every stored hash, and client and server must agree.
    m = msg()
    expected = hashlib.sha256(
        b'{"attachments":[],"content":"hi","created_at":"2026-03-01T10:00:05.120Z",'
        b'"metadata":{},"role":"user","type":"message"}').hexdigest()
    assert m.content_hash == expected


def test_content_hash_ignores_id_chat_extra_and_inexact() -> None:
    base = msg()
    assert msg(id="other").content_hash == base.content_hash
    assert msg(chat_id="c-2").content_hash == base.content_hash
    assert msg(extra={"status": "sent", "toolMarkers": []}).content_hash == base.content_hash
    assert msg(inexact=True).content_hash == base.content_hash


@pytest.mark.parametrize("change", [
    {"role": "assistant"}, {"content": "hi "}, {"content": "Hi"},
    {"created_at": T0 + timedelta(milliseconds=1)}, {"type": "response"},
    {"metadata": {"version": 1}}, {"attachments": [{"name": "a"}]},
])
def test_content_hash_covers_every_semantic_field(change: dict[str, Any]) -> None:
    assert msg(**change).content_hash != msg().content_hash


def test_content_hash_stable_across_key_order_and_zone() -> None:
    a = msg(metadata={"a": 1, "b": {"y": 2, "x": 1}})
    b = msg(metadata={"b": {"x": 1, "y": 2}, "a": 1},
            created_at=T0.astimezone(timezone(timedelta(hours=-5))))
    assert a.content_hash == b.content_hash
    # Sub-millisecond differences are not kept, so they do not change the hash.
    assert msg(created_at=T0 + timedelta(microseconds=999)).content_hash == msg().content_hash


_no_surrogates = st.characters(exclude_categories=["Cs"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(_no_surrogates, max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@given(content=st.text(_no_surrogates, max_size=50),
       metadata=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
       extra=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
       ms=st.integers(0, 2**41))
def test_content_hash_stable_through_the_wire(content: str, metadata: dict[str, Any],
                                              extra: dict[str, Any], ms: int) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    m = msg(content=content, metadata=metadata, extra=extra, created_at=when)
    again = Message(**json.loads(json.dumps(m.to_wire())))
    assert again == m
    assert again.content_hash == m.content_hash


# -------------------------------------------------------------------------- chat digest


def test_chat_digest_definition() -> None:
    pairs = [("m-2", "bb"), ("m-1", "aa")]
    expected = hashlib.sha256(b"m-1:aa\nm-2:bb").hexdigest()
    assert chat_digest(pairs) == expected
    assert chat_digest(reversed(pairs)) == expected
    assert chat_digest([]) == hashlib.sha256(b"").hexdigest()


def test_chat_digest_changes_with_any_id_or_hash() -> None:
    base = chat_digest([("m-1", "aa"), ("m-2", "bb")])
    assert chat_digest([("m-1", "aa"), ("m-2", "bc")]) != base
    assert chat_digest([("m-1", "aa"), ("m-3", "bb")]) != base
    assert chat_digest([("m-1", "aa")]) != base


@given(st.lists(st.tuples(st.text(_no_surrogates, min_size=1, max_size=8),
                          st.text(_no_surrogates, max_size=8)), max_size=8),
       st.randoms())
def test_chat_digest_is_order_free(pairs: list[tuple[str, str]], rnd: Any) -> None:
    shuffled = list(pairs)
    rnd.shuffle(shuffled)
    assert chat_digest(shuffled) == chat_digest(pairs)
