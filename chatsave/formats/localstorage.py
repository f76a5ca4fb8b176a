"""Browser localStorage dumps (a JSON object of key -> string value): read and write.

Recognised keys: ``chat_{chatId}_messages`` (a JSON array of legacy
messages), ``autobot-chat-store`` (a persisted Pinia store with ``sessions``) and
``chat_list`` (``[{"chatId", "name"}]``). Every other key is passed over and reported
by name only: values such as ``autobot_auth`` hold secrets and are never shown.

A member named twice is never read last-wins: a key the dump holds twice, or a value with
an object that names a member twice, is an invalid item at that key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import ijson

from chatsave.formats import Bad, Source, SourceChat, SourceNote, json_loads_strict
from chatsave.model import Message, format_time
from chatsave.normalize import CONSUMED

STORE_KEY = "autobot-chat-store"
LIST_KEY = "chat_list"
_PREFIX, _SUFFIX = "chat_", "_messages"


def chat_key(chat_id: str) -> str:
    return f"{_PREFIX}{chat_id}{_SUFFIX}"


def _parse_value(value: Any) -> Any:
    """A localStorage value is a string holding JSON; tolerate dumps that stored it parsed."""
    if isinstance(value, str):
        return json_loads_strict(value)
    return value


def _noting_duplicates(found: list[str]) -> type[dict[str, Any]]:
    """A dict type for ijson's objects that notes in ``found`` each member set twice
    (ijson itself keeps the last one)."""

    class Noting(dict[str, Any]):
        def __setitem__(self, name: str, value: Any) -> None:
            if name in self:
                found.append(name)
            super().__setitem__(name, value)

    return Noting


def _items(elements: Any, where: str) -> Iterator[tuple[str, Any]]:
    for index, element in enumerate(elements):
        yield f"{where}[{index}]", element


def read_localstorage(source: Source) -> Iterator[SourceChat | SourceNote]:
    assert source.stream is not None
    head = source.head(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head and not head.startswith(b"{"):
        # ijson's kvitems yields nothing for an array or a string: say so, never "0 read".
        yield SourceChat(None, "the dump", iter([("the dump", Bad(
            "not a valid localStorage dump: not a JSON object of key -> value"))]))
        return
    if source.head(3) == b"\xef\xbb\xbf":
        source.stream.read(3)  # a BOM (an editor's save): sniff allows it, ijson does not
    duplicates: list[str] = []
    seen: set[str] = set()
    try:
        pairs = ijson.kvitems(source.stream, "", use_float=True,
                              map_type=_noting_duplicates(duplicates))
        for key, value in pairs:
            problem = None
            if key in seen:
                problem = "the dump holds this key twice; its second value is not read"
            elif duplicates:
                name = duplicates[0] if len(duplicates[0]) <= 60 else duplicates[0][:57] + "..."
                problem = f"value is not valid JSON: an object names the member {name!r} twice"
            seen.add(key)
            duplicates.clear()
            yield from _read_key(key, value, problem)
    except ijson.JSONError as exc:
        yield SourceChat(None, "the dump", iter([("the dump", Bad(
            f"not a valid localStorage dump (JSON object of key -> value): {exc}"))]))


def _read_key(key: str, value: Any,
              problem: str | None = None) -> Iterator[SourceChat | SourceNote]:
    """What the value of ``key`` holds; ``problem``: why it cannot be read as it stands."""
    where = f"key {key!r}"
    is_chat_key = key.startswith(_PREFIX) and key.endswith(_SUFFIX) and \
        len(key) >= len(_PREFIX) + len(_SUFFIX)
    if not (is_chat_key or key in (STORE_KEY, LIST_KEY)):
        yield SourceNote(where, "not a chat key")
        return
    # key.slice(5, -9): the id is everything between the prefix and the suffix,
    # underscores included. The store and the list hold no one chat id.
    chat_id = key[len(_PREFIX):-len(_SUFFIX)] if is_chat_key else None
    if problem is not None:
        yield SourceChat(chat_id, where, iter([(where, Bad(problem))]))
        return
    try:
        parsed = _parse_value(value)
    except ValueError as exc:
        yield SourceChat(chat_id, where, iter([(where, Bad(f"value is not valid JSON: {exc}"))]))
        return
    if is_chat_key:
        if not isinstance(parsed, list):
            yield SourceChat(chat_id, where, iter([(where, Bad("value is not a JSON array"))]))
            return
        yield SourceChat(chat_id, where, _items(parsed, where))
    elif key == STORE_KEY:
        yield from _read_store(parsed, where)
    else:
        yield from _read_chat_list(parsed, where)


def _current_index(state: dict[str, Any], sessions: list[Any]) -> int | None:
    """Which session is the user's current one: the one ``currentSessionId`` names, else
    (the current session's id was lost too) the one marked ``isActive``."""
    current = state.get("currentSessionId")
    if isinstance(current, str | int) and not isinstance(current, bool):
        for index, session in enumerate(sessions):
            if isinstance(session, dict) and session.get("id") == current:
                return index
    for index, session in enumerate(sessions):
        if isinstance(session, dict) and session.get("isActive") is True:
            return index
    return None


def _read_store(state: Any, where: str) -> Iterator[SourceChat | SourceNote]:
    sessions = state.get("sessions") if isinstance(state, dict) else None
    if isinstance(state, dict) and sessions is None:
        # The state a browser store resets to ({}): no sessions, so no messages to read.
        yield SourceNote(where, "the store holds no 'sessions' (an empty or reset store)")
        return
    if not isinstance(sessions, list):
        yield SourceChat(None, where, iter([(where, Bad("no 'sessions' array in the store"))]))
        return
    assert isinstance(state, dict)
    current = _current_index(state, sessions)
    for index, session in enumerate(sessions):
        at = f"{where} sessions[{index}]"
        if not isinstance(session, dict):
            yield SourceChat(None, at, iter([(at, Bad("session is not a JSON object"))]))
            continue
        messages = session.get("messages")
        raw_id = session.get("id")
        if messages is None:
            # The browser's store throws on this and resets to {}.
            yield SourceNote(at, "session has no 'messages' array (the browser store would "
                                 "reset on it); recorded as an empty chat")
            messages = []
        if not isinstance(messages, list):
            yield SourceChat(raw_id, at, iter([(at, Bad("'messages' is not an array"))]),
                             lost_id=True)
            continue
        title = session.get("title")
        # A session's id is the web client's own (crypto.randomUUID()): one that is null,
        # missing or a placeholder was lost, and no key or backend file is named by it.
        yield SourceChat(raw_id, at, _items(messages, f"{at}.messages"),
                         title=title if isinstance(title, str) else None,
                         created_at=session.get("createdAt"), lost_id=True,
                         current=index == current)


def _read_chat_list(entries: Any, where: str) -> Iterator[SourceChat | SourceNote]:
    if not isinstance(entries, list):
        yield SourceChat(None, where, iter([(where, Bad("value is not a JSON array"))]))
        return
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            yield SourceChat(None, at, iter([(at, Bad("entry is not a JSON object"))]))
            continue
        chat_id = entry.get("chatId")
        if not isinstance(chat_id, str | int) or isinstance(chat_id, bool):
            # A listing entry holds a name only: without an id there is nothing to import.
            yield SourceNote(at, "chat_list entry without a chat id (it holds no messages)")
            continue
        name = entry.get("name")
        yield SourceChat(chat_id, at, iter(()), title=name if isinstance(name, str) else None)


def browser_message(msg: Message) -> dict[str, Any]:
    """A message in the web client's ChatMessage shape; foreign fields come back verbatim."""
    out: dict[str, Any] = {}
    if set(msg.extra) & CONSUMED:
        # A foreign field under a name the reader consumes (a placeholder "id": "null"
        # kept aside, say) would be overwritten or misread: keep such extras nested.
        out["extra"] = msg.extra
    else:
        out.update(msg.extra)
    out.update({
        "id": msg.id,
        "content": msg.content,
        "sender": msg.role,
        "timestamp": msg.created_at_text,
        "type": msg.type,
        "metadata": msg.metadata,
    })
    if msg.attachments:
        out["attachments"] = msg.attachments
    if msg.inexact:
        out["inexact"] = True
    return out


def session_json(chat_id: str, title: str | None, created_at: str | None,
                 messages: Iterable[Message], *, active: bool = False) -> tuple[str, int]:
    """One browser session (compact JSON) with every message, and how many messages.

    ``active`` marks the user's current session (the one ``currentSessionId`` names).
    """
    items = [browser_message(m) for m in messages]
    times = [m["timestamp"] for m in items]
    session = {
        "id": chat_id,
        "title": title or f"Chat {chat_id[:8]}",
        "messages": items,
        "createdAt": created_at or (min(times) if times else format_time_now()),
        "updatedAt": max(times) if times else (created_at or format_time_now()),
        "isActive": active,
    }
    return json.dumps(session, ensure_ascii=False, separators=(",", ":")), len(items)


def list_entry_json(chat_id: str, title: str | None) -> str:
    return json.dumps({"chatId": chat_id, "name": title or f"Chat {chat_id[:8]}"},
                      ensure_ascii=False, separators=(",", ":"))


def dump_values(sessions: list[str], listing: list[str],
                current: str | None = None) -> dict[str, str]:
    """The dump's values from session and chat_list entries (compact JSON text);
    ``current`` is the session the web client opens (``currentSessionId``)."""
    return {
        STORE_KEY: '{"sessions":[' + ",".join(sessions) + '],"currentSessionId":'
                   + json.dumps(current, ensure_ascii=False) + "}",
        LIST_KEY: "[" + ",".join(listing) + "]",
    }


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def browser_bytes(values: dict[str, str]) -> int:
    """What a browser counts against its quota: 2 bytes per UTF-16 unit of keys and values."""
    return sum(2 * (utf16_units(k) + utf16_units(v)) for k, v in values.items())


def write_dump(values: dict[str, str], out: Any) -> None:
    out.write(json.dumps(values, ensure_ascii=False, indent=1) + "\n")


def write_localstorage(chats: Iterable[tuple[str, str | None, str | None, Iterable[Message]]],
                       out: Any, current: str | None = None) -> dict[str, int]:
    """Write a localStorage dump: ``autobot-chat-store`` (every session has ``messages``)
    and ``chat_list``. ``chats`` yields (chat_id, title, created_at, messages); the session
    ``current`` names is the user's current one (``currentSessionId``, ``isActive``)."""
    sessions, listing, total = [], [], 0
    for chat_id, title, created_at, messages in chats:
        text, count = session_json(chat_id, title, created_at, messages,
                                   active=chat_id == current)
        sessions.append(text)
        listing.append(list_entry_json(chat_id, title))
        total += count
    write_dump(dump_values(sessions, listing, current), out)
    return {"chats": len(sessions), "messages": total}


def format_time_now() -> str:
    from datetime import UTC, datetime

    return format_time(datetime.now(UTC))
