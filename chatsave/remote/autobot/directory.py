"""The ``autobot-dir:PATH`` remote: a directory of AutoBot chat files, for staff on the server.

Reads a chat as AutoBot does: ``{id}_chat.json`` alone once it exists, else the legacy
``chat_{id}.json`` (AutoBot's migration leaves the legacy file behind and never reads it
again: its messages are *held*, not shown), never ``.tmp_chat_*.json`` leftovers. A file
that is not valid JSON (a non-atomic write cut it short) or holds an encrypted string is
reported and never written over.

Writes only the file AutoBot reads for the chat it is asked to change (a new chat gets
``{id}_chat.json``), atomically (a temporary file in the same directory, fsync, rename)
with mode 0600, in AutoBot's shape (``chatId``, ``name``, ``messages``,
``last_modified``, ``created_time``; other keys of the file kept): AutoBot's messages
exactly as they were, new ones in AutoBot's time form (server local time,
``--tz``/``CHATSAVE_TZ``). Invalid ids such as ``null`` come back to their own file
through the store's id mappings. A file changed by someone else while chatsave wrote it
is not overwritten (the batch is retried later). Nothing is written until the user says
AutoBot's session cache cannot write over it (``--autobot-cache off``).

Unlike the HTTP API, a file can lose one message on purpose, and overwrite one only if it
is still the version chatsave saw: deletes and ``base_rev`` overwrites are done here. A
chat no file holds yet, whose id cannot make a file name, is refused alone, before
anything is written (``refusal``: the run goes on with the other chats, exit 9).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any

from chatsave.errors import ChatRefusedError, InvalidItemError, UnavailableError, UsageError
from chatsave.formats import json_loads_strict
from chatsave.formats.autobot import id_from_filename
from chatsave.normalize import TIME_KEYS, MessageNormalizer, TimeContext, parse_time
from chatsave.protocol import DeleteAnswer, SaveAnswer
from chatsave.remote.autobot import planner, rules
from chatsave.remote.autobot.base import AutobotBase
from chatsave.remote.autobot.shapes import (
    CHAT_FILE_SUFFIX,
    FILE_NAME_MAX,
    AutobotGuard,
    ChatState,
    Held,
    Item,
    Session,
    backend_uuid,
    file_name_possible,
    read_items,
    server_time,
)

_TEMP_PREFIX = ".tmp_chat_"
FILE_MODE = 0o600


@dataclass
class ChatFile:
    """One chat file as found: its parsed document, or why it cannot be read."""

    path: Path
    legacy: bool
    mtime_ns: int
    size: int
    doc: Any = None
    problem: str | None = None

    @property
    def messages(self) -> list[Any]:
        if isinstance(self.doc, dict) and isinstance(self.doc.get("messages"), list):
            return list(self.doc["messages"])
        return []


class AutobotDirRemote(AutobotBase):
    """A directory of AutoBot chat files (the backend's ``data/chats``)."""

    server_name = "autobot-dir"
    supports_overwrite = True
    supports_message_delete = True
    writes_merge = False

    def __init__(self, path: str | os.PathLike[str], *, tz: tzinfo | None = None,
                 cache_off: bool = False) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise UsageError(f"autobot-dir: {self.path} is not a directory",
                             hint="point it at AutoBot's chats directory (data/chats, or "
                             "AUTOBOT_CHATS_DIRECTORY)")
        self.url = f"autobot-dir:{self.path}"
        self.tz = tz or UTC
        self.backend_id = backend_uuid(f"autobot-dir:{self.path.resolve()}")
        self.cache_off = cache_off
        self._cache: dict[Path, ChatFile] = {}

    def __repr__(self) -> str:
        return f"AutobotDirRemote({str(self.path)!r})"

    # ----------------------------------------------------------------- files
    def _load_file(self, path: Path, legacy: bool) -> ChatFile | None:
        try:
            info = path.stat()
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        except OSError as exc:
            raise UnavailableError(f"cannot read {path}: {exc.strerror}") from None
        cached = self._cache.get(path)
        if cached is not None and (cached.mtime_ns, cached.size) == \
                (info.st_mtime_ns, info.st_size):
            return cached
        found = ChatFile(path, legacy, info.st_mtime_ns, info.st_size)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UnavailableError(f"cannot read {path}: {exc.strerror}") from None
        try:
            found.doc = json_loads_strict(data)
        except (ValueError, UnicodeDecodeError):
            found.problem = (f"the file {path.name} is not valid JSON (cut short by a "
                             "non-atomic write?)")
        else:
            if isinstance(found.doc, str):
                found.problem = (f"the file {path.name} holds a string, not a chat (encrypted: "
                                 "security.enable_encryption?)")
            elif not isinstance(found.doc, dict) or \
                    not isinstance(found.doc.get("messages"), list):
                found.problem = f"the file {path.name} is not an AutoBot chat (no 'messages')"
        self._cache[path] = found
        return found

    def _scan(self) -> dict[str, list[ChatFile]]:
        """Every chat file, grouped by the chat id it holds (as import reads it)."""
        groups: dict[str, list[ChatFile]] = {}
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            raise UnavailableError(f"cannot list {self.path}: {exc.strerror}") from None
        for name in names:
            if name.startswith(_TEMP_PREFIX):
                continue
            name_id = id_from_filename(name)
            if name_id is None or not (self.path / name).is_file():
                continue
            legacy = not name.endswith("_chat.json")
            found = self._load_file(self.path / name, legacy)
            if found is None:
                continue
            groups.setdefault(self._chat_key(found, name_id), []).append(found)
        for files in groups.values():
            files.sort(key=lambda f: f.legacy)  # {id}_chat.json first
        return groups

    @staticmethod
    def _chat_key(found: ChatFile, name_id: str) -> str:
        doc = found.doc if isinstance(found.doc, dict) else {}
        raw = doc.get("chatId") or doc.get("id") or doc.get("session_id") or name_id
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        return raw if isinstance(raw, str) else name_id

    def _files(self, original: str) -> list[ChatFile]:
        if not file_name_possible(original):
            return self._scan().get(original, [])  # not a file name here: never a path
        direct = [f for f in (self._load_file(self.path / f"{original}_chat.json", False),
                              self._load_file(self.path / f"chat_{original}.json", True))
                  if f is not None and self._chat_key(f, original) == original]
        if direct:
            return direct
        return self._scan().get(original, [])

    # --------------------------------------------------------------- listing
    def _listing(self, fresh: bool = False) -> list[Session]:
        out = []
        for original, files in self._scan().items():
            first = files[0]
            doc = first.doc if isinstance(first.doc, dict) else {}
            name = doc.get("name")
            out.append(Session(
                original=original, name=name if isinstance(name, str) else None,
                count=len(first.messages), version=first.mtime_ns // 1_000_000,
                size=first.size,
                created=_text(doc.get("created_time") or doc.get("created_at")),
                updated=_text(doc.get("last_modified")), raw=doc))
        return out

    # ------------------------------------------- chats no file can be made for
    def refusal(self, chat_id: str) -> ChatRefusedError | None:
        """Why no file can hold this chat (None: one can): a chat no file holds yet, whose
        id cannot make the name ``{id}_chat.json`` (empty, ``.`` or ``..``, a slash, a
        backslash or NUL, more than 255 bytes). Known before anything is written, from the id (and,
        for such an id only, from whether a file already holds the chat: it is then read
        and written in that file); the operations leave a refused chat out of the run and
        go on with the others."""
        original = self.ids.original(chat_id)
        if file_name_possible(original) or self._files(original):
            return None
        shown = repr(original) if original == chat_id else f"{original!r} (here {chat_id!r})"
        if not original:
            why = "its id is empty"
        elif original in (".", ".."):
            why = f"its id is {original!r}, a path component"
        elif any(c in original for c in "/\\\0"):
            found = ", ".join(repr(c) for c in "/\\\0" if c in original)
            why = f"its id contains {found}, which a file name cannot hold"
        else:
            size = len((original + CHAT_FILE_SUFFIX).encode("utf-8", "surrogatepass"))
            why = (f"the file name <id>{CHAT_FILE_SUFFIX} would be {size} bytes long, more "
                   f"than the {FILE_NAME_MAX} a file name can have")
        return ChatRefusedError(
            f"{self.url} chat {shown}: no file holds this chat and none can be made for it: "
            f"{why}",
            hint=f"AutoBot keeps a chat in the file <id>{CHAT_FILE_SUFFIX}, so it cannot keep "
            "one under this id either; nothing was written, its messages stay here "
            "(chatsave export writes them out)",
            details={"chat_id": chat_id, "original": original})

    # --------------------------------------------------------------- reading
    def _read(self, chat_id: str, original: str) -> ChatState:
        """The chat as AutoBot reads it: ``{id}_chat.json`` alone when it exists (AutoBot
        then never reads the legacy ``chat_{id}.json``, which its migration leaves behind),
        else the legacy file. Messages only in a stale legacy file are held, not shown."""
        files = self._files(original)
        if not files:
            return ChatState(chat_id=chat_id, original=original, exists=False, items=[],
                             visible=[], doc=None)
        read, stale = files[0], files[1:]
        items = read_items(chat_id, read.messages, self.tz)
        doc = read.doc if isinstance(read.doc, dict) else {}
        state = ChatState(chat_id=chat_id, original=original, exists=True, items=items,
                          visible=[], version=read.mtime_ns // 1_000_000,
                          name=_text(doc.get("name")), doc=files)
        if read.problem:
            state.failed = f"{read.problem}; chatsave will not write over it"
            return state
        held = {i.msg.id for i in items if i.msg is not None}
        for old in stale:
            for item in read_items(chat_id, old.messages, self.tz):
                if item.msg is not None and item.msg.id not in held:
                    held.add(item.msg.id)
                    state.held[item.msg.id] = Held(item, (
                        f"only in {old.path.name}, a stale legacy file AutoBot no longer "
                        f"reads (it reads {read.path.name})"))
        return state

    def repair(self, chat_id: str) -> dict[str, Any]:
        """Rewrite one chat file so that AutoBot can load it and order it: every message's
        time in chatsave's one form (AutoBot's own, server local time), every message with
        a real id (a derived one where it had none or ``null``), and a locale time-only
        stamp (``9:05 AM``) completed with the date of the nearest dated message (else the
        session's creation), flagged ``inexact``. Nothing else changes; no message is left
        out. Only ``chatsave doctor --repair`` rewrites a file this way.

        Returns ``changed``, ``messages``, what AutoBot's loader keeps afterwards (``kept``,
        ``dropped``: id -> reason), ``renamed`` ([position, old id, new id]) and ``dated``
        ([id, new time, where the date came from]). Refused (AutobotGuard) for a file
        chatsave cannot read, or when messages it cannot read would still make AutoBot's
        loader fail.
        """
        original = self.ids.original(chat_id)
        self._check_cache(chat_id)
        with self._lock(chat_id):
            state = self._state(chat_id, original)
            if not state.exists:
                raise UsageError(f"no chat file for {chat_id!r} in {self.path}")
            self._guard(state)
            found: dict[str, list[list[Any]]] = {"renamed": [], "dated": []}
            items = [self._dated(state, item, found["dated"]) for item in state.items]
            entries = planner.stored_entries(
                items, lambda item: self._repaired(item, found["renamed"]))
            # What AutoBot's loader shows of the rewritten file (no merge: a file write).
            outcome, recs = planner.simulate(self._predict, state, entries)
            payload = [rec.raw for rec in recs]
            if outcome.failed:
                raise AutobotGuard(
                    f"{self._where(original)}: messages chatsave cannot read would still make "
                    f"AutoBot's loader fail ({outcome.failed}); nothing written",
                    hint="fix those messages in the file by hand (chatsave doctor lists them)")
            changed = payload != [i.raw for i in state.items]
            if changed:
                self._write(state, payload, state.name)
                after = self._state(chat_id, original)
                lost = {i.id for i in items if i.id} - {i.id for i in after.items}
                if lost:  # pragma: no cover - the write keeps every message
                    raise UnavailableError(f"{self._where(original)}: {len(lost)} message(s) "
                                           "missing after the rewrite")
            by_key = {rec.key: rec.label for rec in recs}
            return {"changed": changed, "messages": len(payload), "kept": len(outcome.kept),
                    "dropped": {by_key[k]: why for k, (_, why) in outcome.dropped.items()},
                    **found}

    def _dated(self, state: ChatState, item: Item, dated: list[list[Any]]) -> Item:
        """``item`` read again with a date for a time-only stamp, when it has one."""
        stamp = item.raw.get("timestamp")
        if item.msg is not None or rules.timestamp_kind(stamp) != rules.KIND_TIME_ONLY:
            return item
        day, source = self._nearest_day(state, item.pos)
        if day is None:
            return item
        try:
            msg = MessageNormalizer(state.chat_id, TimeContext(tz=self.tz, date=day)
                                    ).normalize(item.raw)
        except InvalidItemError:
            return item
        dated.append([msg.id, server_time(msg.created_at, self.tz), source])
        return Item(item.raw, item.pos, msg)

    def _nearest_day(self, state: ChatState, pos: int) -> tuple[date | None, str]:
        dated = [(abs(i.pos - pos), i) for i in state.items if i.msg is not None]
        if dated:
            _, near = min(dated, key=lambda d: d[0])
            assert near.msg is not None
            return (near.msg.created_at.astimezone(self.tz).date(),
                    f"the date of the nearest dated message ({near.msg.id})")
        files: list[ChatFile] = state.doc or []
        doc = files[0].doc if files and isinstance(files[0].doc, dict) else {}
        for key in ("created_time", "created_at"):
            try:
                when, _ = parse_time(doc.get(key), TimeContext(tz=self.tz))
            except ValueError:
                continue
            return when.astimezone(self.tz).date(), f"the session's {key}"
        return None, ""

    def _repaired(self, item: Item, renamed: list[list[Any]]) -> dict[str, Any]:
        """A stored message in chatsave's one time form with a real id."""
        if item.msg is None:
            return item.raw
        out = dict(item.raw)
        when = server_time(item.msg.created_at, self.tz)
        for key in TIME_KEYS:
            if key in out or key == "timestamp":
                out[key] = when
        current = out.get("id")
        if not (isinstance(current, str | int) and str(current) == item.msg.id):
            out["id"] = item.msg.id
            renamed.append([item.pos, current, item.msg.id])
        if item.msg.inexact:
            out["inexact"] = True
        return out

    # --------------------------------------------------------------- writing
    def save(self, chat_id: str, body: bytes, idempotency_key: str) -> SaveAnswer:
        self._check_cache(chat_id)
        return super().save(chat_id, body, idempotency_key)

    def delete(self, chat_id: str, body: bytes, idempotency_key: str) -> DeleteAnswer:
        self._check_cache(chat_id)
        return super().delete(chat_id, body, idempotency_key)

    def _check_cache(self, chat_id: str) -> None:
        """Write a chat file only when AutoBot's session cache cannot write over it.

        AutoBot caches every session it loads in Redis (``chat:session:{id}``; on unless
        AUTOBOT_REDIS_ENABLED=false) and its next message to a chat writes the cached
        session over the file: a message chatsave had just written and confirmed would be
        gone. Only the user knows whether AutoBot is stopped, runs without the cache, or had
        it flushed; until they say so, nothing is written (the messages stay pending here).
        """
        if self.cache_off:
            return
        raise UsageError(
            f"{self.url}: not writing the file of chat {chat_id!r}: while AutoBot runs with "
            "its Redis session cache (on by default), its next message to the chat writes "
            "the cached copy over the file and what chatsave wrote is lost",
            hint="stop AutoBot, run it with AUTOBOT_REDIS_ENABLED=false, or flush its "
            "chat:session:* keys, then say so with --autobot-cache off (or "
            "CHATSAVE_AUTOBOT_CACHE=off, or autobot_cache = \"off\" in the config file)")

    def _write(self, state: ChatState, payload: list[dict[str, Any]], name: str | None
               ) -> None:
        files: list[ChatFile] = state.doc or []
        now = datetime.now(self.tz).strftime("%Y-%m-%d %H:%M:%S")
        if files:
            target = files[0]
            doc = dict(target.doc) if isinstance(target.doc, dict) else {}
            path = target.path
        else:
            _check_file_id(state.original)
            target = None
            path = self.path / f"{state.original}_chat.json"
            doc = {"chatId": state.original,
                   "name": name or f"Chat {state.original[:8]}", "created_time": now}
        doc["messages"] = payload
        doc["last_modified"] = now
        if not isinstance(doc.get("name"), str):
            doc["name"] = name or f"Chat {state.original[:8]}"
        data = (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
        self._atomic_write(path, data, target)

    def _atomic_write(self, path: Path, data: bytes, seen: ChatFile | None) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".json", dir=self.path)
        tmp = Path(tmp_name)
        try:
            try:
                os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            self._unchanged_since(path, seen)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise UnavailableError(f"cannot write {path}: {exc.strerror}",
                                   hint="check free space and permissions; nothing was "
                                   "half-written") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._cache.pop(path, None)

    @staticmethod
    def _unchanged_since(path: Path, seen: ChatFile | None) -> None:
        """Refuse to replace a file someone else changed since chatsave read it."""
        try:
            info = path.stat()
        except FileNotFoundError:
            if seen is None:
                return
            raise UnavailableError(f"{path} disappeared while chatsave was writing it; "
                                   "nothing was written", hint="rerun") from None
        if seen is None or (info.st_mtime_ns, info.st_size) != (seen.mtime_ns, seen.size):
            raise UnavailableError(f"{path} changed while chatsave was writing it (AutoBot "
                                   "wrote it?); nothing was written", hint="rerun: the "
                                   "batch is sent again")

    def _drop_chat(self, state: ChatState) -> None:  # pragma: no cover - deletes per message
        raise AssertionError("the directory remote deletes messages one by one")


def _check_file_id(original: str) -> None:
    """The last line of defence under ``refusal``: never a path made from such an id."""
    if not original or original in (".", "..") or any(c in original for c in "/\\\0"):
        raise UsageError(f"cannot make a chat file name from the chat id {original!r}")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
