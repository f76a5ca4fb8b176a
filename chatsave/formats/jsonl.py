"""JSONL, chatsave's native format: one flat message object per line (docs/protocol.md)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from chatsave.formats import Bad, Source, SourceChat, json_loads_strict
from chatsave.model import Message


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(stream, start=1):
        text = raw.strip()
        if number == 1:
            text = text.lstrip(b"\xef\xbb\xbf")
        if not text:
            continue
        try:
            yield number, json_loads_strict(text)
        except (ValueError, UnicodeDecodeError) as exc:
            yield number, Bad(f"not valid JSON: {exc}")


def read_jsonl(source: Source) -> Iterator[SourceChat]:
    """Group consecutive lines of the same chat; a chat seen again later starts a new group."""
    assert source.stream is not None
    pending: list[tuple[str, Any]] = []
    current: Any = None
    started = False
    for number, item in _lines(source.stream):
        position = f"line {number}"
        if isinstance(item, Bad):
            chat = current if started else None
        elif not isinstance(item, dict):
            item = Bad(f"not a JSON object ({type(item).__name__})")
            chat = current if started else None
        elif item.get("chat_id") is None:
            item = Bad("no chat_id")
            chat = current if started else None
        else:
            chat = item["chat_id"]
            # The group carries the chat id (which import may map to a valid one with
            # --rename-invalid): the message itself must not contradict the mapped id.
            item = {k: v for k, v in item.items() if k != "chat_id"}
        if started and chat != current and pending:
            yield SourceChat(current, f"chat {current!r}", iter(pending), closed=False)
            pending = []
        current, started = chat, True
        pending.append((position, item))
        # Bound memory: hand out long runs of one chat in pieces.
        if len(pending) >= 1000:
            yield SourceChat(current, f"chat {current!r}", iter(pending), closed=False)
            pending = []
    if pending:
        yield SourceChat(current, f"chat {current!r}", iter(pending), closed=False)


def write_jsonl(messages: Iterable[Message], out: Any) -> int:
    """Write messages as JSONL lines through ``out.write``; return how many."""
    count = 0
    for msg in messages:
        out.write(json.dumps(msg.to_wire(), ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
    return count
