"""Import: read a source, validate and normalise every item, record it in the local store.

The whole import is one store transaction: it is committed only when the import
succeeds (with ``--on-invalid skip``, when the valid items are recorded), so a refused
file, a dry run, a crash or a full disk leave the store exactly as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from chatsave.errors import ExitCode, InputError, InvalidItemError
from chatsave.formats import Bad, Source, SourceChat, SourceNote, read, sniff
from chatsave.model import Message, chat_id_problem, format_time, renamed_chat_id
from chatsave.normalize import MessageNormalizer, TimeContext, parse_time
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


@dataclass
class Rejection:
    position: str
    chat_id: Any
    reason: str
    message_id: str | None = None

    def describe(self) -> str:
        return f"{self.position}: {self.reason}"


class _Rollback(Exception):
    """Leave the transaction without committing (dry run, refused input)."""


def _no_emit(type_: str, **fields: Any) -> None:
    return None


class _Importer:
    def __init__(self, store: Store, options: ImportOptions, emit: Emit,
                 rejects: IO[str] | None, run_id: int | None) -> None:
        self.store = store
        self.options = options
        self.emit = emit
        self.rejects = rejects
        self.run_id = run_id
        self.result = RunResult("import")
        self.shown: list[Rejection] = []
        self.rejected_total = 0
        self.renamed: dict[str, str] = {}
        self.notes: list[SourceNote] = []
        self.chats_touched: set[str] = set()
        self._normalizers: dict[str, MessageNormalizer] = {}

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
    def resolve_chat(self, chat: SourceChat) -> tuple[str | None, str | None, str | None]:
        """(chat id, None, original if renamed) or (None, reason it cannot be used, None)."""
        raw = chat.raw_id
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        problem = chat_id_problem(raw)
        if problem is None:
            return raw, None, None
        shown = repr(raw) if raw is not None else "(missing)"
        if not self.options.rename_invalid:
            return None, f"invalid chat id {shown}: {problem}", None
        original = raw if isinstance(raw, str) else \
            f"{json.dumps(raw)} at {chat.position}"
        mapped = self.store.mapped_id(original) or renamed_chat_id(original)
        return mapped, None, original

    def _ensure_chat(self, chat: SourceChat, chat_id: str, original: str | None) -> None:
        """Record the chat (and its id mapping) once it is known to hold something."""
        if original is not None and self.store.mapped_id(original) is None:
            self.store.record_mapping(original, chat_id, chat.position, self.run_id)
        if original is not None and original not in self.renamed:
            self.renamed[original] = chat_id
            self.emit("renamed", original=original, chat_id=chat_id,
                      reason=chat_id_problem(chat.raw_id if not isinstance(chat.raw_id, int)
                                             else str(chat.raw_id)))
        self.store.upsert_chat(chat_id, chat.title, self._chat_time(chat.created_at))
        self.chats_touched.add(chat_id)

    # ------------------------------------------------------------------- run
    def run(self, source: Source) -> None:
        fmt = self.options.format
        if fmt == "auto":
            fmt = sniff(source)
        self.result.details["format"] = fmt
        for item in read(source, fmt):
            if isinstance(item, SourceNote):
                self.notes.append(item)
                self.emit("skipped", position=item.position, reason=item.reason)
                continue
            self.import_chat(item)
        self.result.details["chats"] = len(self.chats_touched)
        self.result.chat_ids = sorted(self.chats_touched)

    def _chat_time(self, value: Any) -> str | None:
        if value is None:
            return None
        try:
            return format_time(parse_time(value, self.options.times)[0])
        except ValueError:
            return None

    def import_chat(self, chat: SourceChat) -> None:
        chat_id, problem, original = self.resolve_chat(chat)
        counts = {"added": 0, "unchanged": 0, "rejected": 0, "deleted": 0}
        if not _peek_any(chat):
            # A chat without messages (a chat_list entry, an empty session).
            if chat_id is None:
                self.reject(Rejection(chat.position, chat.raw_id, problem or "invalid chat"))
                self.result.counters["rejected_chats"] += 1
            else:
                self._ensure_chat(chat, chat_id, original)
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
                self._ensure_chat(chat, chat_id, original)
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
            else:
                counts["rejected"] += 1
                self.result.counters["rejected"] += 1
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


def _peek_any(chat: SourceChat) -> bool:
    """Whether the group has any message (without losing the first one)."""
    first = next(chat.messages, None)
    if first is None:
        return False
    rest = chat.messages

    def chained() -> Iterator[tuple[str, Any]]:
        yield first
        yield from rest

    chat.messages = chained()
    return True


def import_source(store: Store, source: Source, options: ImportOptions, *,
                  emit: Emit = _no_emit, rejects: IO[str] | None = None,
                  run_args: dict[str, Any] | None = None) -> RunResult:
    """Import ``source`` into ``store``; see ImportOptions. Returns the run's result.

    Invalid items are listed with their position and reason. With ``on_invalid="fail"``
    (the default) any invalid item refuses the whole import: nothing is recorded, exit 2.
    """
    importer: _Importer | None = None
    try:
        with store.transaction():
            run_id = store.start_run("import", run_args or {})
            importer = _Importer(store, options, emit, rejects, run_id)
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
    result.details["skipped"] = [f"{n.position}: {n.reason}" for n in importer.notes]
    result.details["dry_run"] = options.dry_run
    if importer.rejected_total:
        if options.on_invalid == "fail":
            result.fail(InputError(
                f"{importer.rejected_total} invalid item(s) in the input; nothing was imported",
                hint="fix them, or import the valid items with --on-invalid skip "
                "(--rejects FILE keeps the others); --rename-invalid maps bad chat ids",
            ))
            return
        result.flag(ExitCode.DIFFERENCES)
    if options.dry_run and result.counters["would_write"]:
        result.flag(ExitCode.DIFFERENCES)
