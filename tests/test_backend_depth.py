"""depth(): the nesting limit every batch item is checked against, fast paths included."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chatsave.backend.validation import MAX_ITEM_DEPTH, depth
from tests.conftest import examples


def counted(value: Any) -> int:
    """depth() as it was before its fast paths grew: a flat dict (its containers empty) is
    1, anything else is counted container by container."""
    if isinstance(value, dict) and not any(
            v and isinstance(v, (dict, list)) for v in value.values()):
        return 1
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            level += 1
            deepest = max(deepest, level)
            stack.extend((v, level) for v in item)
    return deepest


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                 max_size=3),
    max_leaves=12)


@settings(max_examples=examples(300))
@given(JSON)
def test_depth_is_what_counting_gives(value: Any) -> None:
    assert min(depth(value), MAX_ITEM_DEPTH + 1) == min(counted(value), MAX_ITEM_DEPTH + 1)


def test_the_message_shapes_the_fast_paths_take() -> None:
    flat = {"id": "m1", "role": "user", "content": "hi", "metadata": {}, "attachments": []}
    assert depth(flat) == 1
    assert depth({**flat, "metadata": {"model": "gpt-4", "tokens": 12}}) == 2
    assert depth({**flat, "attachments": [{"name": "a.txt"}]}) == 3
    assert depth({**flat, "metadata": {"x": {}}}) == 3
    assert depth({**flat, "metadata": {"k": 1}, "attachments": []}) == 2
