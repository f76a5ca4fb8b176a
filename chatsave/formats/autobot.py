"""AutoBot backend chat files: ``{id}_chat.json`` or legacy ``chat_{id}.json``, one or a directory.

A file is ``{"chatId", "name", "messages": [...], "last_modified", "created_time"}``; orphan
terminal sessions write ``{"id", "name", "messages": [], "created_at", "metadata"}``
(docs/autobot.md, "Shapes that really occur"). Times in these files are the server's
local naive time (``--tz``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from chatsave.formats import Bad, Source, SourceChat, SourceNote, json_loads_strict
from chatsave.strictjson import DuplicateNameError

_NEW = re.compile(r"(?P<id>.+)_chat\.json")
_LEGACY = re.compile(r"chat_(?P<id>.+)\.json")
_TEMP = re.compile(r"\.tmp_chat_.*\.json")


def id_from_filename(name: str) -> str | None:
    """The chat id a file name stands for (``{id}_chat.json`` first, then ``chat_{id}.json``)."""
    match = _NEW.fullmatch(name) or _LEGACY.fullmatch(name)
    return match["id"] if match else None


def read_autobot(source: Source) -> Iterator[SourceChat | SourceNote]:
    if source.path is not None and source.path.is_dir():
        for path in sorted(source.path.iterdir()):
            if _TEMP.fullmatch(path.name):
                yield SourceNote(path.name, "leftover temporary file of an interrupted write")
                continue
            if not path.is_file() or id_from_filename(path.name) is None:
                yield SourceNote(path.name, "not an AutoBot chat file name")
                continue
            yield from _read_file(path.name, path.read_bytes(), id_from_filename(path.name))
        return
    assert source.stream is not None
    name = source.path.name if source.path is not None else "<stdin>"
    yield from _read_file(name, source.stream.read(),
                          id_from_filename(name) if source.path is not None else None)


def _read_file(name: str, data: bytes, name_id: str | None) -> Iterator[SourceChat]:
    where = f"file {name}"
    try:
        doc: Any = json_loads_strict(data)
    except DuplicateNameError as exc:
        yield SourceChat(name_id, where, iter([(where, Bad(f"not valid JSON: {exc}"))]))
        return
    except (ValueError, UnicodeDecodeError) as exc:
        yield SourceChat(name_id, where, iter([(where, Bad(
            f"not valid JSON (truncated by a non-atomic write?): {exc}"))]))
        return
    if isinstance(doc, str):
        yield SourceChat(name_id, where, iter([(where, Bad(
            "the file holds a string, not a chat (encrypted? security.enable_encryption)"))]))
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        yield SourceChat(name_id, where, iter([(where, Bad(
            "not an AutoBot chat file (no 'messages' array)"))]))
        return
    raw_id = doc.get("chatId") or doc.get("id") or doc.get("session_id") or name_id
    title = doc.get("name") if isinstance(doc.get("name"), str) else None
    messages = doc["messages"]
    yield SourceChat(
        raw_id, where,
        ((f"{where} messages[{i}]", m) for i, m in enumerate(messages)),
        title=title, created_at=doc.get("created_time") or doc.get("created_at"),
    )
