"""Import: read a source, validate and normalise every item, record it in the local store.

The whole import is one store transaction: it is committed only when the import
succeeds (with ``--on-invalid skip``, when the valid items are recorded), so a refused
file, a dry run, a crash or a full disk leave the store exactly as it was.

A message id that already holds other content is refused, unless ``update`` takes the new
version as an edit made here: the old version goes to the trash (``trash restore`` puts it
back), an open save that carried it is abandoned, and save or sync send the new version
against the revision the backend confirmed (``base_rev``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from chatsave.errors import ExitCode, InputError, InvalidItemError
from chatsave.formats import Bad, Source, SourceChat, SourceNote, read, sniff
from chatsave.model import (
    RESERVED_IDS,
    Message,
    canonical_json,
    canonical_numbers,
    chat_id_problem,
    format_time,
    message_id_problem,
    renamed_chat_id,
)
from chatsave.normalize import MessageNormalizer, TimeContext, parse_time
from chatsave.ops.progress import Progress, no_progress
from chatsave.ops.result import RunResult
from chatsave.store.store import Store

Emit = Callable[..., None]
SHOWN_REJECTIONS = 200
_BATCH = 500


@dataclass
class ImportOptions:
    format: str = "auto"
    times: TimeContext = field(default_factory=TimeContext)
    on_invalid: Literal["fail", "skip"] = "fail"
    rename_invalid: bool = False
    dry_run: bool = False
    # Take a changed message as an edit (the old version to the trash) instead of refusing.
    update: bool = False


@dataclass
class Rejection:
    position: str
    chat_id: Any
    reason: str
    message_id: str | None = None

    def describe(self) -> str:
        return f"{self.position}: {self.reason}"


# Derived chat ids are uuid5 in this namespace (itself uuid5(NAMESPACE_URL,
# "chatsave:derived-chat-id")): a UUID is a chat id to chatsave and to AutoBot alike.
_DERIVED_NAMESPACE = uuid.UUID("9d3ad6fd-97ab-5251-acc8-c2249ea53d2d")
# How many of a chat's first messages stand in for its creation time when it has none.
_BASIS_MESSAGES = 3
DERIVED = "derived"  # the id mapping kind of derived chat ids (Store.record_mapping)


@dataclass(frozen=True)
class Derived:
    """An id made for a chat found without one."""

    chat_id: str
    basis: str  # what it was derived from: the mapping's original
    origin: str  # where the chat was found and with what id: the mapping's source


@dataclass(frozen=True)
class _Resolved:
    chat_id: str | None
    problem: str | None = None  # why no chat id could be used
    original: str | None = None  # the invalid id it was renamed from
    derived: Derived | None = None


def _no_id(raw: Any) -> bool:
    """Whether ``raw`` stands for no id at all: null, not a string, blank, a placeholder."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return False
    if not isinstance(raw, str):
        return True
    return raw.strip() == "" or raw.lower() in RESERVED_IDS


def _mark(raw: Any) -> str:
    """A message's part of a derivation basis: its id, or a hash of its sender, text and
    time (never the text itself: the basis is kept in the id mappings)."""
    if isinstance(raw, dict):
        message_id = raw.get("id")
        if message_id_problem(message_id) is None:
            return f"id {message_id}"
        raw = [raw.get("sender", raw.get("role")), raw.get("content", raw.get("text")),
               raw.get("timestamp")]
    if isinstance(raw, Bad):
        return "unreadable"
    try:
        text = canonical_json(canonical_numbers(raw))
    except (ValueError, TypeError, RecursionError):
        return "unreadable"
    return "sha256 " + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def derivation_basis(created_at: Any, title: str | None, first: list[Any]) -> dict[str, Any]:
    """What a derived chat id is made from: stable content of the chat, never its position.

    The web client sets a session's ``createdAt`` once and never changes it, so it alone
    names the session, however its title, messages or place in the list change later.
    Without it, the title and the first messages (by id, else sender, text and time).
    """
    if (isinstance(created_at, str) and created_at.strip()) or (
            isinstance(created_at, int | float) and not isinstance(created_at, bool)):
        return {"createdAt": canonical_numbers(created_at)}
    return {"title": title, "first": [_mark(m) for m in first[:_BASIS_MESSAGES]]}


def derived_chat_id(basis: str) -> str:
    """The chat id derived from a basis text: a UUID (valid for chatsave and AutoBot)."""
    return str(uuid.uuid5(_DERIVED_NAMESPACE, basis))


class _Rollback(Exception):
    """Leave the transaction without committing (dry run, refused input)."""


def _no_emit(type_: str, **fields: Any) -> None:
    return None


class _Importer:
    def __init__(self, store: Store, options: ImportOptions, emit: Emit,
                 rejects: IO[str] | None, run_id: int | None,
                 progress: Progress = no_progress) -> None:
        self.store = store
        self.progress = progress
        self._source: Source | None = None
        self._counted = 0  # bytes of a file input (else messages) reported as done
        self.options = options
        self.emit = emit
        self.rejects = rejects
        self.run_id = run_id
        self.result = RunResult("import")
        self.shown: list[Rejection] = []
        self.rejected_total = 0
        self.renamed: dict[str, str] = {}
        self.derived: dict[str, str] = {}  # where a chat without an id was -> its new id
        self._bases: dict[str, int] = {}
        self.notes: list[SourceNote] = []
        self.chats_touched: set[str] = set()
        self._normalizers: dict[str, MessageNormalizer] = {}
        self.changed = 0  # rejections of a changed message (what --update would take)

    # -------------------------------------------------------------- problems
    def reject(self, rejection: Rejection, raw: Any = None) -> None:
        self.rejected_total += 1
        if len(self.shown) < SHOWN_REJECTIONS:
            self.shown.append(rejection)
        chat = rejection.chat_id if isinstance(rejection.chat_id, str) else \
            repr(rejection.chat_id)
        self.emit("rejected", position=rejection.position, chat_id=chat,
                  id=rejection.message_id, reason=rejection.reason)
        if self.rejects is not None:
            line = {"position": rejection.position, "chat_id": rejection.chat_id,
                    "id": rejection.message_id, "reason": rejection.reason,
                    "item": None if isinstance(raw, Bad) else raw}
            # ASCII escapes: a rejected item may hold text that is not valid Unicode.
            self.rejects.write(json.dumps(line, ensure_ascii=True, default=repr) + "\n")

    # --------------------------------------------------------------- chat ids
    def resolve_chat(self, chat: SourceChat, first: list[Any]) -> _Resolved:
        """The chat id to record the group under, or why there is none.

        ``first`` holds the group's first raw messages (a derivation's basis)."""
        raw = chat.raw_id
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        problem = chat_id_problem(raw)
        if problem is None:
            return _Resolved(raw)
        shown = repr(raw) if raw is not None else "(missing)"
        if not self.options.rename_invalid:
            return _Resolved(None, f"invalid chat id {shown}: {problem}")
        if raw is None or (chat.lost_id and _no_id(raw)):
            derived = self._derive(chat, raw, first)
            return _Resolved(derived.chat_id, derived=derived)
        # The id names the chat elsewhere (a key, a file): renamed, and remembered so that
        # a remote writes back to it. Its text alone, so the same id always maps the same.
        original = raw if isinstance(raw, str) else json.dumps(raw)
        mapped = self.store.mapped_id(original) or renamed_chat_id(original)
        return _Resolved(mapped, original=original)

    def _derive(self, chat: SourceChat, raw: Any, first: list[Any]) -> Derived:
        basis = derivation_basis(chat.created_at, chat.title, first)
        # Two chats of one source with the same basis stay two: the second gets "n": 1.
        key = canonical_json(basis)
        seen = self._bases.get(key, 0)
        self._bases[key] = seen + 1
        if seen:
            basis["n"] = seen
        text = canonical_json(basis)
        return Derived(derived_chat_id(text), text, f"{json.dumps(raw)} at {chat.position}")

    def _ensure_chat(self, chat: SourceChat, chat_id: str, resolved: _Resolved) -> None:
        """Record the chat (and its id mapping) once it is known to hold something."""
        original, derived = resolved.original, resolved.derived
        if original is not None and self.store.mapped_id(original) is None:
            self.store.record_mapping(original, chat_id, chat.position, self.run_id)
        if original is not None and original not in self.renamed:
            self.renamed[original] = chat_id
            self.emit("renamed", original=original, chat_id=chat_id,
                      reason=chat_id_problem(chat.raw_id if not isinstance(chat.raw_id, int)
                                             else str(chat.raw_id)))
        if derived is not None and derived.origin not in self.derived:
            self.store.record_mapping(derived.basis, chat_id, derived.origin, self.run_id,
                                      kind=DERIVED)
            self.derived[derived.origin] = chat_id
            self.emit("derived", chat_id=chat_id, source=derived.origin)
        self.store.upsert_chat(chat_id, chat.title, self._chat_time(chat.created_at))
        if chat.current:
            self.store.set_current_chat(chat_id, chat.position, self.run_id)
        self.chats_touched.add(chat_id)

    # ------------------------------------------------------------------- run
    def run(self, source: Source) -> None:
        fmt = self.options.format
        if fmt == "auto":
            fmt = sniff(source)
        self.result.details["format"] = fmt
        # A file is counted in bytes (its size is known: a real time left); stdin and a
        # directory in messages read, their total unknown.
        size = source.size()
        self._source = source if size else None
        self.progress(stage="importing", total=size or None,
                      unit="byte" if size else "message")
        for item in read(source, fmt):
            if isinstance(item, SourceNote):
                self.notes.append(item)
                self.emit("skipped", position=item.position, reason=item.reason)
                continue
            self.import_chat(item)
            self._tick()
        self.result.details["chats"] = len(self.chats_touched)
        self.result.chat_ids = sorted(self.chats_touched)

    def _tick(self) -> None:
        """Report what was read since the last report (bytes of a file, else messages)."""
        done = (self._source.position() if self._source is not None
                else self.result.counters["read"])
        if done > self._counted:
            self.progress(done - self._counted)
            self._counted = done

    def _chat_time(self, value: Any) -> str | None:
        if value is None:
            return None
        try:
            return format_time(parse_time(value, self.options.times)[0])
        except ValueError:
            return None

    def import_chat(self, chat: SourceChat) -> None:
        first = _peek(chat, _BASIS_MESSAGES)
        resolved = self.resolve_chat(chat, [raw for _, raw in first])
        chat_id, problem = resolved.chat_id, resolved.problem
        counts = {"added": 0, "unchanged": 0, "updated": 0, "rejected": 0, "deleted": 0}
        if not first:
            # A chat without messages (a chat_list entry, an empty session).
            if chat_id is None:
                self.reject(Rejection(chat.position, chat.raw_id, problem or "invalid chat"))
                self.result.counters["rejected_chats"] += 1
            else:
                self._ensure_chat(chat, chat_id, resolved)
                self.emit("chat", chat_id=chat_id, position=chat.position, **counts)
            return
        normalizer: MessageNormalizer | None = None
        if chat_id is not None:
            normalizer = self._normalizers.get(chat_id)
            if normalizer is None:
                normalizer = MessageNormalizer(chat_id, self.options.times)
                if not chat.closed:
                    self._normalizers[chat_id] = normalizer
        recorded = False
        batch: list[tuple[str, Message]] = []
        for position, raw in chat.messages:
            self.result.counters["read"] += 1
            if isinstance(raw, Bad):
                self._reject_msg(counts, Rejection(position, chat.raw_id, raw.reason), raw)
                continue
            if chat_id is None or normalizer is None:
                self._reject_msg(counts, Rejection(position, chat.raw_id, str(problem)), raw)
                continue
            try:
                batch.append((position, normalizer.normalize(raw)))
            except InvalidItemError as exc:
                self._reject_msg(counts, Rejection(position, chat_id, exc.message,
                                                   _raw_id(raw)), raw)
                continue
            if not recorded:
                self._ensure_chat(chat, chat_id, resolved)
                recorded = True
            if len(batch) >= _BATCH:
                self.flush(chat_id, batch, counts)
                batch = []
        if chat_id is not None and recorded:
            self.flush(chat_id, batch, counts)
            self.emit("chat", chat_id=chat_id, position=chat.position, **counts)

    def _reject_msg(self, counts: dict[str, int], rejection: Rejection, raw: Any) -> None:
        counts["rejected"] += 1
        self.result.counters["rejected"] += 1
        self.reject(rejection, raw)

    def flush(self, chat_id: str, batch: list[tuple[str, Message]],
              counts: dict[str, int]) -> None:
        if not batch:
            return
        self._tick()
        outcomes = self.store.add_messages(chat_id, [m for _, m in batch], self.run_id)
        for (position, msg), (outcome, existing) in zip(batch, outcomes, strict=True):
            if outcome == "added":
                counts["added"] += 1
                self.result.counters["written"] += 1
            elif outcome == "unchanged":
                counts["unchanged"] += 1
                self.result.counters["unchanged"] += 1
            elif outcome == "deleted":
                counts["deleted"] += 1
                self.result.counters["skipped_deleted"] += 1
            elif self.options.update:
                self.store.edit_message(msg, self.run_id)
                counts["updated"] += 1
                self.result.counters["updated"] += 1
                self.emit("updated", chat_id=chat_id, id=msg.id, position=position,
                          content_hash=msg.content_hash, replaced_hash=existing)
            else:
                counts["rejected"] += 1
                self.result.counters["rejected"] += 1
                self.changed += 1
                self.reject(Rejection(
                    position, chat_id,
                    f"message id {msg.id!r} already holds different content in chat "
                    f"{chat_id!r} (stored {str(existing)[:12]}, new {msg.content_hash[:12]})",
                    msg.id), msg.to_wire())
        if outcomes:
            self.store.touch_chat(chat_id)


def _raw_id(raw: Any) -> str | None:
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def _peek(chat: SourceChat, count: int) -> list[tuple[str, Any]]:
    """The group's first ``count`` items (fewer when it has fewer), without losing them."""
    first: list[tuple[str, Any]] = []
    for item in chat.messages:
        first.append(item)
        if len(first) >= count:
            break
    rest = chat.messages

    def chained() -> Iterator[tuple[str, Any]]:
        yield from first
        yield from rest

    chat.messages = chained()
    return first


def import_source(store: Store, source: Source, options: ImportOptions, *,
                  emit: Emit = _no_emit, rejects: IO[str] | None = None,
                  run_args: dict[str, Any] | None = None,
                  progress: Progress = no_progress) -> RunResult:
    """Import ``source`` into ``store``; see ImportOptions. Returns the run's result.

    Invalid items are listed with their position and reason. With ``on_invalid="fail"``
    (the default) any invalid item refuses the whole import: nothing is recorded, exit 2.
    """
    importer: _Importer | None = None
    try:
        with store.transaction():
            run_id = store.start_run("import", run_args or {})
            importer = _Importer(store, options, emit, rejects, run_id, progress)
            importer.run(source)
            result = importer.result
            refused = importer.rejected_total and options.on_invalid == "fail"
            if refused or options.dry_run:
                raise _Rollback
            _finish(importer, options, rolled_back=False)
            store.finish_run(run_id, int(result.exit_code), result.summary())
    except _Rollback:
        assert importer is not None
        _finish(importer, options, rolled_back=True)
    assert importer is not None
    return importer.result


def _finish(importer: _Importer, options: ImportOptions, *, rolled_back: bool) -> None:
    result = importer.result
    if rolled_back:
        # Nothing was recorded: say what would have been.
        result.counters["would_write"] = result.counters.pop("written", 0)
    result.details["rejections"] = [r.describe() for r in importer.shown]
    result.details["rejections_total"] = importer.rejected_total
    result.details["renamed"] = dict(importer.renamed)
    result.details["derived"] = dict(importer.derived)
    result.details["skipped"] = [f"{n.position}: {n.reason}" for n in importer.notes]
    result.details["dry_run"] = options.dry_run
    if importer.changed:
        result.details["changed"] = importer.changed
    if importer.rejected_total:
        if options.on_invalid == "fail":
            result.fail(InputError(
                f"{importer.rejected_total} invalid item(s) in the input; nothing was imported",
                hint=_refusal_hint(importer),
            ))
            return
        result.flag(ExitCode.DIFFERENCES)
    if not importer.chats_touched and not importer.rejected_total \
            and not result.counters["read"]:
        # Nothing at all to import is not success: a wrong file, an empty export, a
        # directory without chat files.
        result.details["empty"] = True
        importer.emit("warning", message="the input held no chats; nothing was imported")
        result.flag(ExitCode.DIFFERENCES)
    if options.dry_run and (result.counters["would_write"] or result.counters["updated"]):
        result.flag(ExitCode.DIFFERENCES)


def _refusal_hint(importer: _Importer) -> str:
    """What to do about refused input; a changed message is an edit --update can take."""
    update = ("chatsave import --update takes the new versions of changed messages as "
              "edits (the old ones go to the trash; save or sync then send them)")
    if importer.changed == importer.rejected_total:
        return update
    hint = ("fix them, or import the valid items with --on-invalid skip (--rejects FILE "
            "keeps the others); --rename-invalid maps bad chat ids")
    return f"{hint}; {update}" if importer.changed else hint
