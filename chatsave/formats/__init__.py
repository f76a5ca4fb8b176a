"""Import and export adapters: JSONL, browser localStorage dumps, AutoBot backend chat files.

A reader turns a source into a stream of SourceChat groups, each with its raw (not yet
validated) chat id and its raw messages with their positions; the import operation
validates and normalises them. Readers stream: they hold one chat at a time.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatsave import strictjson
from chatsave.errors import InputError

FORMATS = ("jsonl", "localstorage", "autobot-file")


@dataclass(frozen=True)
class Bad:
    """An item that could not even be read (broken JSON line, wrong container shape)."""

    reason: str


@dataclass
class SourceChat:
    """One group of messages of one chat, as found in a source."""

    raw_id: Any
    position: str
    messages: Iterator[tuple[str, Any]] = field(default_factory=lambda: iter(()))
    title: str | None = None
    created_at: Any = None
    # True when this group holds all of the chat's messages in its container (one
    # localStorage key, one file): ordinals for derived ids restart per group.
    closed: bool = True
    # True when an unusable id here (null, "undefined", "") means the client lost the
    # chat's id, so nothing else names the chat by it (a browser session): import derives
    # an id from the chat's content. Otherwise (a chat_{id}_messages key, a file name) the
    # id is a name AutoBot uses: import renames it and a remote writes back to it.
    lost_id: bool = False
    # True when the source marks this chat as the user's current one (a browser store's
    # currentSessionId).
    current: bool = False


@dataclass
class SourceNote:
    """Something a reader passed over on purpose (an unrelated localStorage key, a temp file)."""

    position: str
    reason: str


def json_loads_strict(text: str | bytes) -> Any:
    """JSON from outside (chatsave.strictjson.loads): no duplicate names, no NaN."""
    return strictjson.loads(text)


@dataclass
class Source:
    """An input: a file, a directory (AutoBot chat files) or stdin (``-``)."""

    name: str
    path: Path | None
    stream: IO[bytes] | None = None

    @classmethod
    def open(cls, spec: str, stdin: IO[bytes] | None = None) -> Source:
        if spec == "-":
            raw = stdin if stdin is not None else sys.stdin.buffer
            buffered: IO[bytes] = raw if hasattr(raw, "peek") else \
                io.BufferedReader(raw)  # type: ignore[type-var]
            return cls("<stdin>", None, buffered)
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"no such file or directory: {spec}")
        if path.is_dir():
            return cls(str(path), path, None)
        try:
            return cls(str(path), path, path.open("rb"))
        except OSError as exc:
            raise InputError(f"cannot read {spec}: {exc.strerror}") from None

    def close(self) -> None:
        if self.stream is not None and self.path is not None:
            self.stream.close()

    def size(self) -> int | None:
        """The bytes of a file input; None for stdin and a directory (not known up front)."""
        if self.path is None or self.stream is None:
            return None
        try:
            return self.path.stat().st_size
        except OSError:
            return None

    def position(self) -> int:
        """How many bytes of a file input have been read so far."""
        assert self.stream is not None
        return self.stream.tell()

    def head(self, size: int = 65536) -> bytes:
        """The first bytes, without consuming them."""
        assert self.stream is not None
        peek = getattr(self.stream, "peek", None)
        if peek is not None:
            data: bytes = peek(size)
            return data[:size]
        pos = self.stream.tell()
        data = self.stream.read(size)
        self.stream.seek(pos)
        return data


_AUTOBOT_NAME = re.compile(r"(?:.+_chat|chat_.+)\.json")
_AUTOBOT_KEYS = {"chatId", "last_modified", "created_time"}
_LOCALSTORAGE_KEY = re.compile(r"chat_.+_messages|autobot-chat-store|chat_list")


def _name_hint(source: Source) -> str | None:
    if source.path is None:
        return None
    if source.path.suffix == ".jsonl":
        return "jsonl"
    if _AUTOBOT_NAME.fullmatch(source.path.name):
        return "autobot-file"
    return None


def _content_hint(head: bytes) -> str | None:
    """The format the first bytes show, or None when they do not say."""
    first_line = head.split(b"\n", 1)[0]
    try:
        first = json.loads(first_line)
    except ValueError:
        first = None
    if isinstance(first, dict):
        if "chat_id" in first:
            return "jsonl"
        if isinstance(first.get("messages"), list):
            return "autobot-file"
        if any(_LOCALSTORAGE_KEY.fullmatch(k) for k in first):
            return "localstorage"
        return None
    # A JSONL line longer than the head (a long message): compact, chat_id first, as
    # chatsave writes it.
    if re.match(rb'\{\s*"chat_id"\s*:', first_line):
        return "jsonl"
    # A multi-line JSON document: look at its first keys.
    keys = re.findall(rb'^\s*[{,]?\s*"([^"\\]{1,200})"\s*:', head, re.MULTILINE)
    names = {k.decode("utf-8", "replace") for k in keys}
    if names & _AUTOBOT_KEYS or ("messages" in names and "name" in names):
        return "autobot-file"
    if any(_LOCALSTORAGE_KEY.fullmatch(n) for n in names):
        return "localstorage"
    return None


def sniff(source: Source) -> str:
    """Tell the format of a source from its first bytes; its name decides what they leave open."""
    if source.path is not None and source.path.is_dir():
        return "autobot-file"
    head = source.head().lstrip(b"\xef\xbb\xbf \t\r\n")
    by_name = _name_hint(source)
    if not head:
        if by_name is not None:
            return by_name
        raise InputError(f"{source.name} is empty", hint="nothing to import")
    if not head.startswith(b"{"):
        if by_name is not None:
            return by_name
        raise InputError(
            f"cannot tell the format of {source.name}: it does not start with a JSON object",
            hint="pass --format jsonl|localstorage|autobot-file")
    return _content_hint(head) or by_name or "localstorage"


def read(source: Source, fmt: str) -> Iterator[SourceChat | SourceNote]:
    """The SourceChat groups (and notes on what was passed over) of ``source``."""
    if fmt == "jsonl":
        from chatsave.formats.jsonl import read_jsonl

        return read_jsonl(source)
    if fmt == "localstorage":
        from chatsave.formats.localstorage import read_localstorage

        return read_localstorage(source)
    if fmt == "autobot-file":
        from chatsave.formats.autobot import read_autobot

        return read_autobot(source)
    raise InputError(f"unknown format {fmt!r}", hint=f"formats: {', '.join(FORMATS)}")
