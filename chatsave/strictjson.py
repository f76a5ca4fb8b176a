"""Reading JSON chatsave did not write: one meaning per document, or an error.

Python's ``json`` (and pydantic's ``validate_json``) keep the last of two members with the
same name, so ``{"messages": [...], "messages": []}`` silently drops the first list. Every
JSON chatsave reads from outside (request bodies, imported files, a backend's answers)
goes through ``loads`` here, which refuses duplicate names, and ``NaN``/``Infinity``
(not JSON: they cannot be hashed or stored), with a ``ValueError`` naming the problem.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateNameError(ValueError):
    """A JSON object names the same member twice."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                shown = name if len(name) <= 60 else name[:57] + "..."
                raise DuplicateNameError(f"an object names the member {shown!r} twice")
            seen.add(name)
    return obj


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: str | bytes) -> Any:
    """``json.loads`` refusing duplicate member names and NaN/Infinity (ValueError);
    nesting too deep for the parser is a ValueError too."""
    try:
        return json.loads(data, object_pairs_hook=_object, parse_constant=_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
