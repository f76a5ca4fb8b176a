"""The two ways a save batch's message becomes an Item agree.

``plain_item`` takes the messages chatsave's own clients send (every field of its type, the
time as chatsave writes it) without building a pydantic Message; ``prepare_item`` takes
everything, decides with the Message model and words each rejection. Whatever the plain
path accepts, the model path must accept with the same stored body, hash and base_rev;
and the common messages must take the plain path, or the saving is silently lost.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatsave import strictjson
from chatsave.backend.checks import plain_item, prepare_item, prepare_items
from chatsave.backend.settings import ServerSettings
from chatsave.model import MESSAGE_ID_MAX, TYPE_MAX, Message, format_time
from tests.conftest import examples

CHAT = "chat-1"
SETTINGS = ServerSettings(max_content_bytes=64)

anything = st.characters(codec=None, exclude_categories=())
text = st.text(anything, max_size=12)
leaves = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | text
          | st.floats(allow_nan=False, allow_infinity=False)
          | st.sampled_from([1.0, -0.0, 2.0 ** 53, 1e16, 0.5]))
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(anything, max_size=4), inner, max_size=3), max_leaves=10)
# Times in the stored form, real or not (2023-02-30, 24:00, year 0), and other forms.
canonical_times = st.from_regex(
    r"[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-6][0-9]:[0-6][0-9]\.[0-9]{3}Z",
    fullmatch=True)
real_times = st.integers(-(2 ** 45), 2 ** 47).map(
    lambda ms: format_time(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)))
other_times = st.sampled_from([
    "2024-01-02T03:04:05Z", "2024-01-02T03:04:05.678+01:00", "2024-01-02T03:04:05.6789Z",
    "2024-01-02 03:04:05.678Z", "2024-01-02T03:04:05.678", "0000-01-01T00:00:00.000Z",
    "2024-02-30T00:00:00.000Z", "2023-02-29T00:00:00.000Z", "2024-01-02T24:00:00.000Z",
    "2024-01-02T23:59:60.000Z", "\uff12024-01-02T03:04:05.678Z", "1700000000", ""])
FIELDS: dict[str, Any] = {
    "chat_id": st.sampled_from([CHAT, "chat-2", None, 1]),
    "id": st.sampled_from(["m-1", "null", "NaN", " ", "a\x00b", "\ud800", "x" * MESSAGE_ID_MAX,
                           "x" * (MESSAGE_ID_MAX + 1), 7, None]) | text,
    "role": st.sampled_from(["user", "assistant", "system", "tool", "User", "", None, 1]),
    "content": st.text(anything, max_size=70) | st.sampled_from([None, 5, ["a"]])
    | st.just("é" * 33),  # 66 bytes: over the limit in UTF-8, not in characters
    "created_at": canonical_times | real_times | other_times | st.sampled_from([None, 0]),
    "type": st.sampled_from(["message", "", "t" * TYPE_MAX, "t" * (TYPE_MAX + 1), None, 3])
    | text,
    "metadata": json_values, "attachments": json_values, "extra": json_values,
    "inexact": st.sampled_from([True, False, None, 0, 1, "true"]),
    "content_hash": st.sampled_from([None, 5, "0" * 64]) | text,
    "base_rev": st.sampled_from([None, 0, 3, -1, True, 2.0, "1", 2 ** 70]),
    "unknown": json_values,
}
COMMON = {"chat_id": CHAT, "id": "m-1", "role": "assistant", "content": "Hello there.",
          "created_at": "2024-01-02T03:04:05.678Z", "type": "message",
          "metadata": {"model": "gpt-4", "tokens": 12, "duration": 1.5, "version": 3},
          "attachments": [], "extra": {}}


@st.composite
def raw_items(draw: st.DrawFn) -> Any:
    """A message near the common one: some fields left out, some replaced by any value,
    sometimes its own content hash claimed (right or wrong), sometimes not an object."""
    if draw(st.integers(0, 30)) == 0:
        return draw(json_values)
    raw = {k: v for k, v in COMMON.items() if draw(st.integers(0, 6)) > 0}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4)):
        raw[name] = draw(FIELDS[name])
    if draw(st.booleans()):
        try:
            fields = {k: v for k, v in raw.items() if k not in ("content_hash", "base_rev")}
            fields.setdefault("chat_id", CHAT)
            raw["content_hash"] = Message.model_validate(fields).content_hash
        except Exception:  # not a valid message: no hash of its own
            pass
    # Through JSON text and back, as a request body arrives (tuples, NaN: not in JSON)
    return strictjson.loads(json.dumps(raw))


def same(fast: Any, full: Any) -> tuple[Any, ...]:
    return (fast.id, fast.reject, fast.body, fast.content_hash, fast.base_rev) == \
        (full.id, full.reject, full.body, full.content_hash, full.base_rev)


@settings(max_examples=examples(400))
@given(raw=raw_items())
@example(raw=COMMON)
@example(raw={**COMMON, "metadata": {"v": 1.0}, "attachments": [{"n": 2.0}], "inexact": True})
@example(raw={**COMMON, "created_at": "2024-02-30T00:00:00.000Z"})
@example(raw={**COMMON, "content": "é" * 33})
@example(raw={**COMMON, "extra": {"\ud800": 1}})
def test_what_the_plain_path_accepts_the_model_accepts_the_same(raw: Any) -> None:
    full = prepare_item(CHAT, raw, SETTINGS)
    fast = plain_item(CHAT, raw, SETTINGS.max_content_bytes)
    if fast is not None:
        assert full.reject is None, full.reject
        assert same(fast, full)
    [item] = prepare_items(CHAT, [raw], SETTINGS)
    assert same(item, full)


def client_wire(message: Message, base_rev: int | None = None) -> dict[str, Any]:
    """What chatsave's client sends for a message (store/pending.py's pieces, parsed)."""
    wire = {**message.to_wire(), "content_hash": message.content_hash}
    if base_rev is not None:
        wire["base_rev"] = base_rev
    return strictjson.loads(json.dumps(wire, ensure_ascii=False))


# What a store holds: valid Unicode (a message with a lone surrogate has no hash to send).
unicode_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1.0, 2.0 ** 53]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=10)


@settings(max_examples=examples(100))
@given(content=st.text(max_size=60), metadata=unicode_values, attachments=unicode_values,
       ms=st.integers(-(2 ** 45), 2 ** 47), inexact=st.booleans(),
       base_rev=st.none() | st.integers(0, 2 ** 40))
def test_the_messages_chatsave_sends_take_the_plain_path(
        content: str, metadata: Any, attachments: Any, ms: int, inexact: bool,
        base_rev: int | None) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    message = Message(chat_id=CHAT, id="m-1", role="tool", content=content, created_at=when,
                      metadata=metadata if isinstance(metadata, dict) else {"v": metadata},
                      attachments=attachments if isinstance(attachments, list) else [],
                      inexact=inexact)
    raw = client_wire(message, base_rev)
    fast = plain_item(CHAT, raw, ServerSettings().max_content_bytes)
    assert fast is not None
    assert same(fast, prepare_item(CHAT, raw, ServerSettings()))
    assert fast.content_hash == message.content_hash


def test_a_batch_mixes_both_paths_in_order() -> None:
    good = client_wire(Message.model_validate({**COMMON, "id": "a"}))
    shaped = {**COMMON, "id": "b", "created_at": "2024-01-02T04:04:05.678+01:00"}
    bad = {**COMMON, "id": "c", "role": "robot"}
    items = prepare_items(CHAT, [good, shaped, bad, 7], ServerSettings())
    assert [it.id for it in items] == ["a", "b", "c", None]
    assert plain_item(CHAT, shaped, 10) is None  # another time form: the model's path
    assert items[1].reject is None and items[1].body is not None
    assert '"created_at":"2024-01-02T03:04:05.678Z"' in items[1].body
    assert items[2].reject is not None and "role" in items[2].reject
    assert items[3].reject == "not a JSON object (int)"
