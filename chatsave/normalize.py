"""Normalisation of foreign message shapes (web clients, AutoBot files, our own JSONL) into Message.

One function serves ``import``, ``save --from`` and the server's web-shaped save alias, so a
message gets the same id and content hash whichever way it arrives. It never guesses: two
fields that disagree (``role`` vs ``sender``, ``content`` vs ``text``) are refused, and every
field it does not understand is kept verbatim in ``extra``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from pydantic import ValidationError

from chatsave.errors import InvalidIdError, InvalidItemError
from chatsave.model import (
    RESERVED_IDS,
    Message,
    canonical_json,
    derived_message_id,
    format_time,
    message_id_problem,
    to_millis,
)

# Field aliases, in order of preference. All present ones must agree.
ROLE_KEYS = ("role", "sender", "author")
CONTENT_KEYS = ("content", "text", "body")
TYPE_KEYS = ("type", "messageType")
TIME_KEYS = ("created_at", "timestamp", "createdAt", "time")
METADATA_KEYS = ("metadata", "rawData")
CONSUMED = frozenset(
    ROLE_KEYS + CONTENT_KEYS + TYPE_KEYS + TIME_KEYS + METADATA_KEYS
    + ("id", "chat_id", "attachments", "extra", "inexact", "deleted")
)

SENDER_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "bot": "assistant",
    "system": "system",
    "agent_terminal": "system",
    "terminal": "system",
    "tool": "tool",
}
TYPE_ALIASES = {"default": "message", "": "message"}

_TIME_ONLY = re.compile(
    r"(?P<h>\d{1,2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:[.,](?P<f>\d{1,6}))?)?"
    r"\s*(?P<ampm>[AaPp]\.?\s*[Mm]\.?)?"
)
_EPOCH_TEXT = re.compile(r"-?\d{9,16}(?:\.\d+)?")
# Epoch values at or above this are milliseconds (1e11 s is the year 5138).
_MILLIS_FROM = 1e11


@dataclass(frozen=True)
class TimeContext:
    """How to read times that do not say everything: ``--tz`` and ``--date``."""

    tz: tzinfo = UTC
    date: date | None = None


def parse_time(value: Any, ctx: TimeContext = TimeContext()) -> tuple[datetime, bool]:
    """Read a timestamp in any of the accepted forms; return (UTC datetime, inexact).

    Accepted: ISO 8601 with ``Z`` or an offset; naive ``YYYY-MM-DD HH:MM:SS`` or naive
    ISO with fractions (read in ``ctx.tz``); epoch seconds or milliseconds (numbers or
    digit strings); a time-only locale string (``9:41:03 AM``, ``12:00:00``), completed
    with ``ctx.date`` and flagged inexact. Raises ValueError with the reason otherwise.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float (JSON allows any length)
            raise ValueError(f"timestamp out of range: {_short(value)}") from None
        return _from_epoch(number), False
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {type(value).__name__}")
    text = value.strip()
    if _EPOCH_TEXT.fullmatch(text):
        return _from_epoch(float(text)), False
    match = _TIME_ONLY.fullmatch(text)
    if match:
        return _from_time_only(match, text, ctx), True
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unrecognised timestamp {_short(value)}") from None
    if parsed.tzinfo is None:
        # A naive time in an hour the clocks repeat (or skip) names no one instant: the
        # first reading is taken, and the message flagged inexact rather than guessed.
        return to_millis(parsed.replace(tzinfo=ctx.tz)), \
            wall_time_problem(parsed, ctx.tz) is not None
    return to_millis(parsed), False


def wall_time_problem(wall: datetime, tz: tzinfo) -> str | None:
    """Whether a naive wall time is ambiguous or missing in ``tz`` (None: it is exact)."""
    first = wall.replace(tzinfo=tz, fold=0)
    second = wall.replace(tzinfo=tz, fold=1)
    if first.utcoffset() == second.utcoffset():
        return None
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != wall:
        return "does not exist there (the clocks jumped forward)"
    return "happens twice there (the clocks went back)"


def _from_epoch(number: float) -> datetime:
    if not math.isfinite(number):
        raise ValueError(f"not a timestamp: {number!r}")
    seconds = number / 1000.0 if abs(number) >= _MILLIS_FROM else number
    try:
        base = datetime(1970, 1, 1, tzinfo=UTC)
        # Integer milliseconds avoid float rounding drift for exact ms values.
        return base + timedelta(milliseconds=round(seconds * 1000))
    except OverflowError:
        raise ValueError(f"timestamp out of range: {number!r}") from None


def _from_time_only(match: re.Match[str], text: str, ctx: TimeContext) -> datetime:
    if ctx.date is None:
        raise ValueError(f"time-only timestamp {text!r} needs --date DAY")
    hour, minute = int(match["h"]), int(match["m"])
    second = int(match["s"] or 0)
    micro = int((match["f"] or "0").ljust(6, "0"))
    ampm = (match["ampm"] or "").replace(".", "").replace(" ", "").lower()
    if ampm:
        if not 1 <= hour <= 12:
            raise ValueError(f"unrecognised timestamp {text!r}")
        hour = hour % 12 + (12 if ampm == "pm" else 0)
    try:
        local = datetime.combine(ctx.date, time(hour, minute, second, micro), tzinfo=ctx.tz)
    except ValueError:
        raise ValueError(f"unrecognised timestamp {text!r}") from None
    return to_millis(local)


def _present(raw: Mapping[str, Any], keys: tuple[str, ...]) -> list[tuple[str, Any]]:
    return [(k, raw[k]) for k in keys if raw.get(k) is not None]


def _agree(found: list[tuple[str, Any]], what: str,
           quote: bool = True) -> tuple[str, Any] | None:
    """The one value that all present alias fields agree on; refuse if they differ.

    ``quote``: the values are labels (a role, a type, a time) and are quoted in the
    refusal; a message's text, metadata or attachments never are, only their sizes (an
    error ends up in logs and tickets, a message is someone's conversation)."""
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        if other[1] != first[1]:
            shown = ", ".join(f"{k}={_short(v)}" if quote else f"{k}: {_size(v)}"
                              for k, v in found)
            raise InvalidItemError(f"conflicting {what} fields ({shown})")
    return first


def _size(value: Any) -> str:
    """What a value is, without what it says."""
    if isinstance(value, str):
        return f"{len(value)} character(s)"
    if isinstance(value, list | dict):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _id_text(value: Any) -> str | None:
    """A message id as text; numbers (old Date.now()-based ids) become their JS spelling."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    return None


@dataclass
class MessageNormalizer:
    """Normalises the messages of one chat, in source order.

    It keeps the ordinal of identical id-less messages, so derived ids are stable for the
    same source and distinct for genuine repeats.
    """

    chat_id: str
    times: TimeContext = field(default_factory=TimeContext)
    _ordinals: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def normalize(self, raw: Any) -> Message:
        """Return the Message for ``raw``; raise InvalidItemError naming the reason."""
        if not isinstance(raw, Mapping):
            raise InvalidItemError(f"not a JSON object ({type(raw).__name__})")
        if raw.get("deleted") not in (None, False):
            raise InvalidItemError("a deleted message (tombstone), not a message")
        own_chat = raw.get("chat_id")
        if own_chat is not None and own_chat != self.chat_id:
            raise InvalidItemError(
                f"says it belongs to chat {_short(own_chat)}, found in chat {self.chat_id!r}")

        role = self._role(raw)
        content = self._content(raw)
        type_ = self._type(raw)
        created_at, inexact = self._time(raw)
        if raw.get("inexact") is True:
            inexact = True
        metadata = self._object(raw, METADATA_KEYS, "metadata", dict) or {}
        attachments = raw.get("attachments")
        if attachments is None:
            attachments = []
        elif not isinstance(attachments, list):
            raise InvalidItemError(f"attachments is not a list ({type(attachments).__name__})")
        extra = self._extra(raw)

        created_text = format_time(created_at)
        msg_id = self._message_id(raw, metadata, extra)
        ordinal_key = None
        try:
            if msg_id is None:
                ordinal_key = (role, content, created_text)
                msg_id = derived_message_id(self.chat_id, role, content, created_text,
                                            self._ordinals[ordinal_key])
            message = Message(
                chat_id=self.chat_id, id=msg_id, role=role, content=content,  # type: ignore[arg-type]
                created_at=created_at, type=type_, metadata=metadata,
                attachments=attachments, extra=extra, inexact=inexact,
            )
            # Everything must survive being written as UTF-8 JSON (no lone surrogates, NaN).
            _ = message.content_hash
            canonical_json(extra).encode("utf-8")
        except (ValidationError, ValueError, UnicodeEncodeError, InvalidIdError,
                RecursionError) as exc:
            raise InvalidItemError(_validation_reason(exc)) from None
        if ordinal_key is not None:
            # Counted only once accepted: a refused item never shifts the ids of the
            # messages after it (a later import without it gives the same ids).
            self._ordinals[ordinal_key] += 1
        return message

    def _role(self, raw: Mapping[str, Any]) -> str:
        mapped = []
        present = _present(raw, ROLE_KEYS)
        for key, value in present:
            role = SENDER_ROLES.get(value.lower()) if isinstance(value, str) else None
            if role is None:
                raise InvalidItemError(f"unknown role {key}={_short(value)}")
            mapped.append(role)
        if not mapped:
            raise InvalidItemError("no role (role, sender or author)")
        if len(set(mapped)) > 1:
            # Name the values as the source spells them (sender='bot', not 'assistant').
            shown = ", ".join(f"{k}={_short(v)}" for k, v in present)
            raise InvalidItemError(f"conflicting role fields ({shown})")
        return mapped[0]

    def _content(self, raw: Mapping[str, Any]) -> str:
        found = _agree(_present(raw, CONTENT_KEYS), "content", quote=False)
        if found is None:
            raise InvalidItemError("no content (content, text or body)")
        if not isinstance(found[1], str):
            raise InvalidItemError(f"{found[0]} is not text ({type(found[1]).__name__})")
        return found[1]

    def _type(self, raw: Mapping[str, Any]) -> str:
        values = []
        for key, value in _present(raw, TYPE_KEYS):
            if not isinstance(value, str):
                raise InvalidItemError(f"{key} is not text ({type(value).__name__})")
            values.append((key, TYPE_ALIASES.get(value, value)))
        found = _agree(values, "type")
        return "message" if found is None else str(found[1])

    def _time(self, raw: Mapping[str, Any]) -> tuple[datetime, bool]:
        parsed = []
        for key, value in _present(raw, TIME_KEYS):
            try:
                parsed.append((key, parse_time(value, self.times)))
            except ValueError as exc:
                raise InvalidItemError(f"{key}: {exc}") from None
        found = _agree(parsed, "time")
        if found is None:
            raise InvalidItemError("no timestamp (created_at, timestamp, createdAt or time)")
        when, inexact = found[1]
        return when, inexact

    def _object(self, raw: Mapping[str, Any], keys: tuple[str, ...], what: str,
                kind: type) -> Any:
        found = _agree(_present(raw, keys), what, quote=False)
        if found is None:
            return None
        if not isinstance(found[1], kind):
            raise InvalidItemError(f"{found[0]} is not an object ({type(found[1]).__name__})")
        return found[1]

    def _extra(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        base = raw.get("extra")
        if base is None:
            extra: dict[str, Any] = {}
        elif isinstance(base, dict):
            extra = dict(base)
        else:
            raise InvalidItemError(f"extra is not an object ({type(base).__name__})")
        for key, value in raw.items():
            if key in CONSUMED:
                continue
            if key in extra and extra[key] != value:
                raise InvalidItemError(f"field {key!r} differs from extra.{key}")
            extra[key] = value
        return extra

    def _message_id(self, raw: Mapping[str, Any], metadata: Mapping[str, Any],
                    extra: dict[str, Any]) -> str | None:
        candidates = [raw.get("id"), metadata.get("message_id")]
        raw_data = raw.get("rawData")
        if isinstance(raw_data, Mapping):
            candidates.append(raw_data.get("message_id"))
        for value in candidates:
            if value is None:
                continue
            text = _id_text(value)
            if text is None or text.strip() == "" or text.lower() in RESERVED_IDS:
                # A placeholder where an id should be: keep it verbatim, derive a real id.
                if value is raw.get("id"):
                    extra.setdefault("id", value)
                continue
            problem = message_id_problem(text)
            if problem is not None:
                raise InvalidItemError(f"invalid message id {_short(value)}: {problem}")
            return text
        return None


def _validation_reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    if isinstance(exc, UnicodeEncodeError):
        return "contains text that is not valid Unicode (an unpaired surrogate)"
    if isinstance(exc, InvalidIdError):
        return exc.message
    if isinstance(exc, RecursionError):
        return "nested too deeply to store"
    return str(exc)


def normalize_message(raw: Any, chat_id: str, times: TimeContext = TimeContext()) -> Message:
    """Normalise one message on its own (no ordinal tracking: first of its kind)."""
    return MessageNormalizer(chat_id, times).normalize(raw)
