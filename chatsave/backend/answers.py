"""Answers of the service: what every endpoint returns and how it is rendered.

``Answer`` is the ``(status, answer, headers)`` triple every Service method returns;
ServiceError is a protocol error answer, ``envelope`` the one error shape, RenderedAnswer
an answer with its JSON text made once (``answer_json``), and ``ack``/``conflict`` the
per-message entries of save and delete answers.
"""

from __future__ import annotations

import json
from typing import Any

from chatsave.backend.storage.base import MessageRow

Answer = tuple[int, dict[str, Any], dict[str, str]]


class ServiceError(Exception):
    """A protocol error answer: status, code, message, details, headers."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def answer(self) -> Answer:
        return self.status, envelope(self.code, self.message, self.details), self.headers


class RenderedAnswer(dict[str, Any]):
    """An answer with its JSON text made once: the text stored for replays is the text the
    app sends (profiled: encoding a save's answer twice was a few percent of the server)."""

    __slots__ = ("text",)

    def __init__(self, answer: dict[str, Any], text: str) -> None:
        super().__init__(answer)
        self.text = text


def answer_json(answer: dict[str, Any]) -> str:
    """An answer's JSON text as the app sends it: compact UTF-8, or ASCII with escapes
    when it quotes text that is not valid Unicode (a lone surrogate the client sent)."""
    text = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(answer, allow_nan=False, separators=(",", ":"))
    return text


def envelope(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The one error shape: ``{"error": {"code", "message", "details"}}``."""
    return {"error": {"code": code, "message": message, "details": details}}


def ack(row: MessageRow) -> dict[str, Any]:
    return {"id": row.id, "rev": row.rev, "content_hash": row.content_hash}


def conflict(row: MessageRow, reason: str) -> dict[str, Any]:
    return {"id": row.id, "reason": reason, "rev": row.rev, "content_hash": row.content_hash}


def not_found(chat_id: str) -> ServiceError:
    """404: the user has no chat ``chat_id``."""
    return ServiceError(404, "not_found", f"no chat {chat_id!r}", {"chat_id": chat_id})
