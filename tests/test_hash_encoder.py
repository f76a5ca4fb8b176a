"""The canonical JSON behind every content hash is exactly the public json.dumps call that
defines it (docs/protocol.md), although model.py builds CPython's private C encoder once
for speed: on random values and messages, with the C encoder and without it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatsave import model
from chatsave.model import Message, canonical_json, canonical_numbers, content_hash
from tests.conftest import examples


def definition(value: Any) -> str:
    """The public call the hash is defined by."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def outcome(encode: Callable[[Any], str], value: Any) -> tuple[str, str | bytes]:
    """The UTF-8 bytes, or the kind of error (NaN, a cycle, a key order, an int too long)."""
    try:
        return "bytes", encode(value).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError, RecursionError) as exc:
        return "error", type(exc).__name__


@contextmanager
def without_c_encoder() -> Iterator[None]:
    """model.py as on an interpreter without json's C encoder: all pure Python."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json.encoder, "c_make_encoder", None)
        fast = model._fast_canonical_encoder()
        assert fast is None
        mp.setattr(model, "_CANONICAL_C", fast)
        yield


# Any character, lone surrogates included (Python strings hold them; JSON text may too).
anything = st.characters(codec=None, exclude_categories=())
keys = st.text(anything, max_size=6)
leaves = (st.none() | st.booleans()
          | st.integers()
          | st.integers(min_value=-(10 ** 300), max_value=10 ** 300)
          | st.floats()  # NaN and infinities too: refused by both
          | st.floats(allow_nan=False, allow_infinity=False, width=64)
          | st.sampled_from([0.0, -0.0, 1.0, 2.0 ** 53, 2.0 ** 53 + 2, 1e-7, 5e-324,
                             1.7976931348623157e308, 0.1, 1e16, 123456789.125])
          | st.text(anything, max_size=12))
values = st.recursive(
    leaves,
    lambda children: (st.lists(children, max_size=4)
                      | st.lists(children, max_size=3).map(tuple)
                      | st.dictionaries(keys, children, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=examples(200))
@given(value=values)
@example(value={"b": 1, "a": [1, "ü", "\ud800"], "é": {"z": None, "y": 10 ** 40}})
@example(value=float("nan"))
@example(value={"n": 10 ** 5000})  # past Python's int-to-text limit: ValueError both ways
def test_canonical_json_is_the_public_json_dumps(value: Any) -> None:
    expected = outcome(definition, value)
    assert outcome(canonical_json, value) == expected
    with without_c_encoder():
        assert outcome(canonical_json, value) == expected


def test_non_string_keys_are_handled_as_json_dumps_handles_them() -> None:
    for value in ({2: "a", 2.5: "b", True: "c", None: "d"}, {1: "a", "b": 2}, {(1,): 2}):
        expected = outcome(definition, value)
        assert outcome(canonical_json, value) == expected, value
        with without_c_encoder():
            assert outcome(canonical_json, value) == expected, value


def test_a_cycle_and_a_deep_nest_fail_as_json_dumps_fails() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    for value in (cycle, {"a": cycle}, deep):
        expected = outcome(definition, value)
        assert expected[0] == "error"
        assert outcome(canonical_json, value) == expected
        with without_c_encoder():
            assert outcome(canonical_json, value) == expected


def test_another_signature_of_the_private_encoder_falls_back_to_the_public_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def changed(*args: Any) -> Any:
        raise TypeError(f"c_make_encoder() takes 10 arguments ({len(args)} given)")

    monkeypatch.setattr(json.encoder, "c_make_encoder", changed)
    assert model._fast_canonical_encoder() is None


def test_the_fast_path_is_the_one_in_use_on_cpython() -> None:
    # What the speed is kept for: if CPython drops or changes it, this says so (the hash
    # stays right either way, on the public encoder).
    assert model._CANONICAL_C is not None


# ------------------------------------------------------------------ whole messages
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(anything, max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children,
                                                                      max_size=3),
    max_leaves=12,
)


def hash_by_definition(m: Message) -> str:
    doc = {"attachments": canonical_numbers(m.attachments), "content": m.content,
           "created_at": m.to_wire()["created_at"], "metadata": canonical_numbers(m.metadata),
           "role": m.role, "type": m.type}
    return hashlib.sha256(definition(doc).encode("utf-8")).hexdigest()


def hash_outcome(compute: Callable[[], str]) -> tuple[str, str]:
    try:
        return "hash", compute()
    except (ValueError, TypeError) as exc:  # a lone surrogate is not UTF-8: both refuse
        return "error", type(exc).__name__


@settings(max_examples=examples(200))
@given(role=st.sampled_from(["user", "assistant", "system", "tool"]),
       content=st.text(anything, max_size=80),
       type_=st.sampled_from(["message", "response", "tool_call", "ü-type"]),
       metadata=st.dictionaries(keys, json_values, max_size=4),
       attachments=st.lists(json_values, max_size=3),
       ms=st.integers(-(2 ** 45), 2 ** 47))
def test_content_hash_of_random_messages_is_sha256_of_the_public_json_dumps(
        role: str, content: str, type_: str, metadata: dict[str, Any],
        attachments: list[Any], ms: int) -> None:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    m = Message(chat_id="c-1", id="m-1", role=role, content=content,  # type: ignore[arg-type]
                created_at=when, type=type_, metadata=metadata, attachments=attachments)
    expected = hash_outcome(lambda: hash_by_definition(m))
    assert hash_outcome(lambda: content_hash(m.role, m.content, m.created_at_text, m.type,
                                             m.metadata, m.attachments)) == expected
    with without_c_encoder():
        assert hash_outcome(lambda: content_hash(m.role, m.content, m.created_at_text,
                                                 m.type, m.metadata,
                                                 m.attachments)) == expected


# ------------------------------------------------------------- texts built from pieces
def body_by_definition(role: Any, content: Any, created_at: Any, type_: Any, metadata: Any,
                       attachments: Any, extra: Any, inexact: bool) -> str:
    body = {"role": role, "content": content, "created_at": created_at, "type": type_,
            "metadata": metadata, "attachments": attachments, "extra": extra}
    if inexact:
        body["inexact"] = True
    return definition(body)


def texts_outcome(compute: Callable[[], tuple[str, str]]) -> tuple[str, Any]:
    try:
        body, chash = compute()
        return "texts", (body.encode("utf-8", "surrogatepass"), chash)
    except (ValueError, TypeError, RecursionError) as exc:
        return "error", type(exc).__name__


fields = st.text(anything, max_size=20) | values


@settings(max_examples=examples(300))
@given(role=st.sampled_from(["user", "tool"]) | fields,
       content=st.text(anything, max_size=40) | fields,
       created_at=st.just("2024-01-02T03:04:05.678Z") | fields,
       type_=st.just("message") | fields, metadata=values, attachments=values,
       extra=values, inexact=st.booleans())
@example(role="user", content="a", created_at="t", type_="message",
         metadata={"v": 1.0, "w": [2.0, {"x": 3.5}]}, attachments=[1.0], extra={"e": 1.0},
         inexact=True)
@example(role="user", content="", created_at="t", type_="m", metadata=None, attachments=0.0,
         extra=None, inexact=False)  # a falsy number is hashed as it is
@example(role="user", content="\ud800", created_at="t", type_="m", metadata={},
         attachments=[], extra={}, inexact=False)
def test_message_texts_are_the_body_and_the_hash_by_definition(
        role: Any, content: Any, created_at: Any, type_: Any, metadata: Any,
        attachments: Any, extra: Any, inexact: bool) -> None:
    """model.message_texts joins the fields' texts instead of encoding two documents; both
    texts must still be exactly the definitions (the body the backend stores; the hash of
    docs/protocol.md), for any values, strings or not, integral floats rewritten in the
    hash only."""
    def expected() -> tuple[str, str]:
        hashed = definition({
            "attachments": canonical_numbers(attachments) if attachments else attachments,
            "content": content, "created_at": created_at,
            "metadata": canonical_numbers(metadata) if metadata else metadata,
            "role": role, "type": type_})
        return (body_by_definition(role, content, created_at, type_, metadata, attachments,
                                   extra, inexact),
                hashlib.sha256(hashed.encode("utf-8")).hexdigest())

    def built() -> tuple[str, str]:
        return model.message_texts(role, content, created_at, type_, metadata, attachments,
                                   extra, inexact)

    want = texts_outcome(expected)
    assert texts_outcome(built) == want
    if want[0] == "texts":
        assert content_hash(role, content, created_at, type_, metadata, attachments) \
            == want[1][1]
    with without_c_encoder():
        assert texts_outcome(built) == want
