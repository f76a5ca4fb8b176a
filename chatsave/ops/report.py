"""What ``diff --html`` shows: the comparison ``diff`` makes, kept for a page a person reads.

``ReportBuilder`` rides along one ``diff`` run (``DiffOptions.on_row``), so the counts of the
page are the run's own, the ones ``diff --json`` prints. Per chat it keeps the counts by
symbol; per differing chat, the messages that differ with what each side holds (time, role,
hash, revision, deleted), retry copies with the message they copy, conflicts with both
hashes. Message text is kept only with ``show_text`` (support staff handle other people's
chats). At most ``max_rows`` messages a chat are kept; the rest are counted
(``diff --combined`` lists every one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chatsave.model import Message
from chatsave.ops.compare import SAME, ChatCompare, Row
from chatsave.store.store import Store

if TYPE_CHECKING:
    from chatsave.ops.compare import Comparer
    from chatsave.ops.result import RunResult

#: messages kept per chat for the page
MAX_ROWS = 2000


@dataclass
class Side:
    """One side's version of a message."""

    created_at: str | None
    role: str | None
    content_hash: str | None
    rev: int | None = None
    deleted: bool = False
    text: str | None = None  # only with show_text


@dataclass
class ReportRow:
    symbol: str
    id: str
    here: Side | None
    there: Side | None
    copy_of: str | None = None  # a retry copy: the message it copies

    @property
    def when(self) -> str:
        for side in (self.here, self.there):
            if side is not None and side.created_at:
                return side.created_at
        return ""


@dataclass
class ChatReport:
    chat_id: str
    counts: dict[str, int]
    in_agreement: bool
    error: str | None = None
    rows: list[ReportRow] = field(default_factory=list)
    more: int = 0  # differing messages not kept (past max_rows)


@dataclass
class Report:
    remote: str
    generated_at: str
    show_text: bool
    chats: list[ChatReport]
    totals: dict[str, int]
    exit_code: int = 0

    @property
    def differing(self) -> list[ChatReport]:
        return [c for c in self.chats if not c.in_agreement]


class ReportBuilder:
    """Collects what the page shows while ``diff`` compares (see the module docstring)."""

    def __init__(self, store: Store, *, show_text: bool = False,
                 max_rows: int = MAX_ROWS) -> None:
        self.store = store
        self.show_text = show_text
        self.max_rows = max_rows
        self._rows: dict[str, list[ReportRow]] = {}
        self._more: dict[str, int] = {}

    def row(self, comparer: Comparer, state: ChatCompare, row: Row) -> None:
        """One message of the run, as diff classified it."""
        if row.symbol == SAME:
            return
        kept = self._rows.setdefault(state.chat_id, [])
        if len(kept) >= self.max_rows:
            self._more[state.chat_id] = self._more.get(state.chat_id, 0) + 1
            return
        here = self._here(state.chat_id, row) if row.local_hash is not None else \
            Side(None, None, None, deleted=True) if row.local_deleted else None
        there = self._there(comparer, state.chat_id, row) \
            if row.remote_hash is not None else None
        kept.append(ReportRow(row.symbol, row.id, here, there, row.copy_of))

    def _here(self, chat_id: str, row: Row) -> Side:
        found = self.store.get_message(chat_id, row.id)
        if isinstance(found, Message):
            return Side(found.created_at_text, found.role, row.local_hash,
                        text=found.content if self.show_text else None)
        if found is not None:  # a stub: gc evicted its body; its time is still known
            return Side(found.created_at, None, row.local_hash)
        return Side(None, None, row.local_hash, deleted=row.local_deleted)

    def _there(self, comparer: Comparer, chat_id: str, row: Row) -> Side:
        body: dict[str, Any] = {} if row.remote_deleted else \
            comparer.remote_body(chat_id, row.id) or {}
        text = body.get("content") if self.show_text else None
        return Side(body.get("created_at"), body.get("role"), row.remote_hash, row.remote_rev,
                    row.remote_deleted, text if isinstance(text, str) else None)

    def report(self, result: RunResult, states: list[ChatCompare]) -> Report:
        chats = []
        totals: dict[str, int] = {}
        for state in states:
            for symbol, count in state.counts.items():
                totals[symbol] = totals.get(symbol, 0) + count
            rows = self._rows.get(state.chat_id, [])
            chats.append(ChatReport(state.chat_id, dict(state.counts), state.in_agreement,
                                    state.error, _in_time_order(rows),
                                    self._more.get(state.chat_id, 0)))
        return Report(str(result.details.get("remote", "")),
                      datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                      self.show_text, chats, totals, int(result.exit_code))


def _in_time_order(rows: list[ReportRow]) -> list[ReportRow]:
    """By time, each retry copy right after the message it copies (when that is shown)."""
    by_id = {r.id: r for r in rows}

    def key(r: ReportRow) -> tuple[str, str, int, str, str]:
        original = by_id.get(r.copy_of) if r.copy_of else None
        anchor = original or r
        return (anchor.when, anchor.id, 0 if anchor is r else 1, r.when, r.id)

    return sorted(rows, key=key)

