"""chatsave's model of AutoBot (autobot.rules) agrees with the fake written from docs/autobot.md.

The remotes use the model to decide what not to send; the fake is an independent
implementation of the same facts. Random chats go through both.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from chatsave.remote.autobot import rules
from tests import autobot_fake as fake

SENDERS = ["user", "assistant", "system", "bot"]
TYPES = ["default", "llm_response", "response", "terminal_output", "terminal_command",
         "thought"]
TEXTS = ["yes", "ok", "a longer answer", "x" * 250, "x" * 250 + "tail", "ls"]


@st.composite
def stamps(draw: Any) -> str:
    second = draw(st.integers(0, 900))
    kind = draw(st.sampled_from(["naive", "naive", "naive", "aware", "iso"]))
    minute, sec = divmod(second, 60)
    if kind == "naive":
        return f"2026-03-01 10:{minute:02d}:{sec:02d}"
    if kind == "iso":
        return f"2026-03-01T10:{minute:02d}:{sec:02d}.500"
    return f"2026-03-01T10:{minute:02d}:{sec:02d}.000Z"


@st.composite
def message(draw: Any) -> dict[str, Any]:
    out = {"sender": draw(st.sampled_from(SENDERS)), "text": draw(st.sampled_from(TEXTS)),
           "messageType": draw(st.sampled_from(TYPES)), "timestamp": draw(stamps())}
    if draw(st.booleans()):
        out["id"] = f"m{draw(st.integers(0, 30))}"
    return out


chats = st.lists(message(), max_size=12)


def fake_load(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    try:
        return fake.dedupe_on_load(copy.deepcopy(messages))
    except Exception:
        return None


def fake_merge(existing: list[dict[str, Any]], new: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    try:
        return fake.merge_messages(copy.deepcopy(existing), copy.deepcopy(new))
    except Exception:
        return copy.deepcopy(new)


@given(chats)
def test_the_loader_model_agrees_with_the_fake(messages: list[dict[str, Any]]) -> None:
    outcome = rules.load(rules.recs(messages))
    expected = fake_load(messages)
    if expected is None:
        assert outcome.failed
        return
    assert not outcome.failed
    assert [r.raw for r in outcome.kept] == expected
    assert len(outcome.kept) + len(outcome.dropped) == len(messages)


@given(chats, chats)
def test_the_save_model_agrees_with_the_fake(existing: list[dict[str, Any]],
                                             new: list[dict[str, Any]]) -> None:
    old = rules.recs(existing)
    for rec in old:
        rec.key = -1 - rec.key
    outcome = rules.merge(old, rules.recs(new))
    assert [r.raw for r in outcome.kept] == fake_merge(existing, new)
    # Every existing message is replaced by a new one, kept, or said to be dropped (why).
    new_ids = {rules.raw_id(n) for n in new if rules.raw_id(n)}
    new_sigs = {rules.signature(n) for n in new}
    for rec in old:
        replaced = rules.raw_id(rec.raw) in new_ids or rules.signature(rec.raw) in new_sigs
        assert replaced or rec.key in outcome.kept_keys() or rec.key in outcome.dropped

def test_timestamp_kinds() -> None:
    assert rules.timestamp_kind("2026-03-01 10:00:00") == rules.KIND_NAIVE
    assert rules.timestamp_kind("2026-03-01T10:00:00.123") == rules.KIND_NAIVE_ISO
    assert rules.timestamp_kind("2026-03-01T10:00:00.123Z") == rules.KIND_AWARE
    assert rules.timestamp_kind("2026-03-01T10:00:00+01:00") == rules.KIND_AWARE
    assert rules.timestamp_kind("9:41:03 AM") == rules.KIND_TIME_ONLY
    assert rules.timestamp_kind(1740823200123) == rules.KIND_OTHER
    assert rules.autobot_time("2026-03-01 10:00:00.123") is None  # not AutoBot's form


def test_longest_increasing() -> None:
    assert rules.longest_increasing([3, 1, 2, 0, 4]) == [1, 2, 4]
    assert rules.longest_increasing([]) == []
