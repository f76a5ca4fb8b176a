"""Pure helpers that check and describe request bodies, shared by the service's endpoints.

The shape of save and alias-save bodies (``save_shape``, ``alias_shape``), the nesting
depth of a message (``depth``, bounded by MAX_ITEM_DEPTH), the request fingerprint of
idempotent writes (``fingerprint``), lone-surrogate detection, short quoting of client
values and the reason/details of a pydantic ValidationError. None touches storage.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import ValidationError

from chatsave.backend.answers import ServiceError
from chatsave.protocol import SaveRequest

#: nesting allowed inside one message (metadata, attachments, extra): answers that list it
#: must stay well under the depth clients accept (HttpRemote refuses answers deeper than 64)
MAX_ITEM_DEPTH = 32


def quote(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def save_shape(doc: Any) -> tuple[list[Any], Any]:
    """(messages, title) of a SaveRequest. Items are checked one by one later (an item that
    is not even an object is rejected alone), so this is looser than SaveRequest."""
    if not isinstance(doc, dict):
        raise ServiceError(422, "invalid_request",
                           f"the request body must be a JSON object, not {type(doc).__name__}")
    unknown = sorted(set(doc) - set(SaveRequest.model_fields))
    if unknown:
        raise ServiceError(422, "invalid_request", f"unknown field(s): {', '.join(unknown)}",
                           {"fields": unknown[:20]})
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise ServiceError(422, "invalid_request", "messages must be a list")
    return messages, doc.get("title")


def saves_shape(doc: Any, max_chats: int) -> list[tuple[str, list[Any], Any]]:
    """(chat id, messages, title) of each chat of a SavesRequest, as ``save_shape`` reads
    one chat's; a chat named twice, or no chat, is refused (docs/protocol.md, "Saves")."""
    if not isinstance(doc, dict):
        raise ServiceError(422, "invalid_request",
                           f"the request body must be a JSON object, not {type(doc).__name__}")
    unknown = sorted(set(doc) - {"chats"})
    if unknown:
        raise ServiceError(422, "invalid_request", f"unknown field(s): {', '.join(unknown)}",
                           {"fields": unknown[:20]})
    chats = doc.get("chats")
    if not isinstance(chats, list) or not chats:
        raise ServiceError(422, "invalid_request", "chats must be a list of at least one chat")
    if len(chats) > max_chats:
        raise ServiceError(413, "batch_too_large",
                           f"{len(chats)} chats in one request; the limit is {max_chats}; "
                           "split the batch", {"limit": max_chats})
    out: list[tuple[str, list[Any], Any]] = []
    seen: set[str] = set()
    for part in chats:
        chat_id = part.get("chat_id") if isinstance(part, dict) else None
        if not isinstance(chat_id, str):
            raise ServiceError(422, "invalid_request",
                               "each entry of chats must be an object with a chat_id string")
        if chat_id in seen:
            raise ServiceError(422, "invalid_request", f"chat {quote(chat_id)} named twice",
                               {"chat_id": chat_id if len(chat_id) <= 512 else None})
        seen.add(chat_id)
        messages, title = save_shape({k: v for k, v in part.items() if k != "chat_id"})
        out.append((chat_id, messages, title))
    return out


def alias_shape(doc: Any) -> tuple[list[Any], Any]:
    """(messages, title) of a web client's save body; ServiceError if it is neither shape."""
    if isinstance(doc, dict):
        # The top-level fields keep their types whichever shape carries the messages: a
        # body is refused for what it holds, not read past.
        top_title, top_messages = doc.get("title"), doc.get("messages")
        if top_title is not None and not isinstance(top_title, str):
            raise ServiceError(422, "invalid_request", "title must be a string")
        if top_messages is not None and not (
                isinstance(top_messages, list)
                and all(isinstance(m, dict) for m in top_messages)):
            raise ServiceError(422, "invalid_request", "messages must be a list of objects")
        inner = doc.get("data")
        if isinstance(inner, dict) and "messages" in inner:
            messages, title = inner.get("messages"), inner.get("name", inner.get("title"))
        elif "messages" in doc:
            messages, title = doc.get("messages"), doc.get("title", doc.get("name"))
        else:
            messages, title = None, None
        if isinstance(messages, list):
            return messages, title
    raise ServiceError(422, "invalid_request",
                       'expected {"messages": [...]} or {"data": {"messages": [...], '
                       '"name": ...}}')


def depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    if isinstance(value, dict):
        nested = False
        for v in value.values():
            if v and isinstance(v, (dict, list)):  # a tuple: no UnionType built per call
                nested = True
                for w in v.values() if isinstance(v, dict) else v:
                    if isinstance(w, (dict, list)):
                        break
                else:
                    continue
                break  # a container two levels down: counted below
        else:
            # The common messages: flat, their containers empty (1), or with metadata or
            # attachments holding plain values only (2, as the count below gives).
            return 2 if nested else 1
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_ITEM_DEPTH:
                return deepest
            stack.extend((v, depth) for v in item)
    return deepest


def fingerprint(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256(f"{method}\n{path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def validation_reason(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = str(first.get("msg"))
    return f"{where}: {msg}" if where else msg


def errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Validation errors without the offending input (it may be huge or private)."""
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")),
             "type": str(e.get("type"))} for e in exc.errors(include_url=False)[:20]]
