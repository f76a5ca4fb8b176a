"""The ``autobot-dir:PATH`` remote: a directory of AutoBot chat files, for staff on the server.

Reads ``{id}_chat.json`` and the legacy ``chat_{id}.json`` (both, when both exist: the
messages of the two are joined), never ``.tmp_chat_*.json`` leftovers. A file that is not
valid JSON (a non-atomic write cut it short) or holds an encrypted string is reported and
never written over.

Writes only the file of the chat it is asked to change (the one the chat came from; a
new chat gets ``{id}_chat.json``), atomically (a temporary file in the same directory,
fsync, rename) with mode 0600, in AutoBot's shape (``chatId``, ``name``, ``messages``,
``last_modified``, ``created_time``; other keys of the file kept), every readable
message's time in one form: naive ISO 8601 with milliseconds in the server's local time
(``--tz``/``CHATSAVE_TZ``). Invalid ids such as ``null`` come back to their own file
through the store's id mappings. A file changed by someone else while chatsave wrote it
is not overwritten (the batch is retried later).

Unlike the HTTP API, a file can lose one message on purpose, and overwrite one only if it
is still the version chatsave saw: deletes and ``base_rev`` overwrites are done here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from chatsave.errors import UnavailableError, UsageError
from chatsave.formats import json_loads_strict
from chatsave.formats.autobot import id_from_filename
from chatsave.remote import autobot_rules as rules
from chatsave.remote.autobot_base import (
    FORM_BACKEND,
    FORM_ISO_MS,
    AutobotBase,
    AutobotGuard,
    ChatState,
    Item,
    Session,
    backend_uuid,
    in_time_order,
    read_items,
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
                 time_form: str = FORM_ISO_MS) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise UsageError(f"autobot-dir: {self.path} is not a directory",
                             hint="point it at AutoBot's chats directory (data/chats, or "
                             "AUTOBOT_CHATS_DIRECTORY)")
        if time_form not in (FORM_ISO_MS, FORM_BACKEND):
            raise UsageError(f"unknown time form {time_form!r}")
        self.url = f"autobot-dir:{self.path}"
        self.tz = tz or UTC
        self.time_form = time_form
        self.backend_id = backend_uuid(f"autobot-dir:{self.path.resolve()}")
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
        if not original or original in (".", "..") or any(c in original for c in "/\\\0"):
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
                count=sum(len(f.messages) for f in files),
                version=max(f.mtime_ns for f in files) // 1_000_000,
                size=sum(f.size for f in files),
                created=_text(doc.get("created_time") or doc.get("created_at")),
                updated=_text(doc.get("last_modified")), raw=doc))
        return out


    # --------------------------------------------------------------- reading
    def _read(self, chat_id: str, original: str) -> ChatState:
        files = self._files(original)
        if not files:
            return ChatState(chat_id=chat_id, original=original, exists=False, items=[],
                             visible=[], doc=None)
        bad = next((f for f in files if f.problem), None)
        items: list[Item] = []
        seen: set[str] = set()
        for f in files:
            for item in read_items(chat_id, f.messages, self.tz):
                if item.msg is not None:
                    if item.msg.id in seen:
                        continue
                    seen.add(item.msg.id)
                item.pos = len(items)
                items.append(item)
        doc = files[0].doc if isinstance(files[0].doc, dict) else {}
        state = ChatState(chat_id=chat_id, original=original, exists=True, items=items,
                          visible=[], version=max(f.mtime_ns for f in files) // 1_000_000,
                          name=_text(doc.get("name")), doc=files)
        if bad is not None:
            state.failed = f"{bad.problem}; chatsave will not write over it"
            return state
        # Every readable message the file holds, even one AutoBot's loader will drop on its
        # next load: reading it is how the local store gets a copy before that happens.
        state.visible = [i for i in items if i.msg is not None]
        return state

    def repair(self, chat_id: str) -> dict[str, Any]:
        """Rewrite one chat file with every readable message's time in one form and a stable
        id (nothing else changes; no message is left out), so that AutoBot can load it.

        Returns what AutoBot's loader will keep of it afterwards: ``kept`` and ``dropped``
        (id -> reason). Refused (AutobotGuard) for a file chatsave cannot read, or when
        messages it cannot read would still make AutoBot's loader fail.
        """
        original = self.ids.original(chat_id)
        with self._lock(chat_id):
            state = self._read(chat_id, original)
            if not state.exists:
                raise UsageError(f"no chat file for {chat_id!r} in {self.path}")
            self._guard(state)
            entries = []
            last = None
            for item in state.items:
                when = item.msg.created_at if item.msg is not None else last
                last = when or last
                entries.append((when, item.pos, self._restamp(item), item.id))
            payload = [raw for _, _, raw, _ in in_time_order(entries)]
            labels = [mid or f"#{n}" for n, (_, _, _, mid) in enumerate(in_time_order(entries))]
            outcome = rules.load_settled(rules.recs(payload, labels))
            if outcome.failed:
                raise AutobotGuard(
                    f"{self._where(original)}: messages chatsave cannot read would still make "
                    f"AutoBot's loader fail ({outcome.failed}); nothing written",
                    hint="fix those messages in the file by hand (chatsave doctor lists them)")
            changed = payload != [i.raw for i in state.items]
            if changed:
                self._write(state, payload, state.name)
                after = self._read(chat_id, original)
                lost = {i.id for i in state.items if i.id} - {i.id for i in after.items}
                if lost:  # pragma: no cover - the write keeps every message
                    raise UnavailableError(f"{self._where(original)}: {len(lost)} message(s) "
                                           "missing after the rewrite")
            by_key = dict(enumerate(labels))
            return {"changed": changed, "messages": len(payload), "kept": len(outcome.kept),
                    "dropped": {by_key[k]: why for k, (_, why) in outcome.dropped.items()}}

    # --------------------------------------------------------------- writing
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
    if not original or original in (".", "..") or any(c in original for c in "/\\\0"):
        raise UsageError(f"cannot make a chat file name from the chat id {original!r}")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
