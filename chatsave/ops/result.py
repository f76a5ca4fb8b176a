"""The result of a run: its counters, its exit code and what the summary line reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chatsave.errors import ChatRefusedError, ChatsaveError, ExitCode, most_severe

# The counters every summary carries (zero when a command has nothing to count).
COUNTERS = (
    "read",
    "written",
    "unchanged",
    "retried",
    "conflicts",
    "rejected",
    "duplicates_found",
    "duplicates_removed",
    "bytes_freed",
    "pending_push",
    "pending_pull",
)


@dataclass
class RunResult:
    """What a command did; ``exit_code`` follows the exit code table (docs/architecture.md)."""

    command: str
    counters: Counter[str] = field(default_factory=Counter)
    codes: list[ExitCode] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    # A failure found while running (reported with the counters, not raised).
    error: ChatsaveError | None = None
    # The chats the run touched, and per-chat results for a report (kept out of the
    # summary: they can be long).
    chat_ids: list[str] = field(default_factory=list)
    report: list[Any] = field(default_factory=list)

    def fail(self, error: ChatsaveError) -> None:
        self.error = error
        self.flag(error.exit_code)

    def flag(self, code: ExitCode) -> None:
        """Record an outcome; the most severe one recorded becomes the exit code."""
        self.codes.append(code)

    def refuse(self, chat_id: str, error: ChatRefusedError) -> dict[str, Any]:
        """Record a chat the backend cannot take, left out of the run while the others go
        on: listed under ``refused`` (the entry, returned for the ``refused`` event, has
        ``chat_id``, ``reason`` and ``hint``), its exit code (9) folded in."""
        entry = {"chat_id": chat_id, "reason": error.message, "hint": error.hint}
        self.details.setdefault("refused", []).append(entry)
        self.flag(error.exit_code)
        return entry

    @property
    def exit_code(self) -> ExitCode:
        return most_severe(*self.codes)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"command": self.command}
        for name in COUNTERS:
            out[name] = self.counters.get(name, 0)
        for name, value in sorted(self.counters.items()):
            out.setdefault(name, value)
        out.update(self.details)
        if self.error is not None:
            out["error"] = self.error.to_json()
        out["exit_code"] = int(self.exit_code)
        out["ok"] = self.exit_code == ExitCode.OK
        return out
