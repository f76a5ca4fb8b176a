"""What sync will do for one chat: the plan its messages' decisions make (ops/sync.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatsave.ops.sync_decide import Action, Effect
from chatsave.protocol import RemoteMessage


@dataclass
class ChatPlan:
    """What sync will do for one chat."""

    chat_id: str
    title: str | None = None
    remote_version: int = 0
    confirm: list[tuple[str, int | None, str]] = field(default_factory=list)
    repush: list[str] = field(default_factory=list)
    push: int = 0
    pull: list[str] = field(default_factory=list)
    take_backend: list[tuple[str, int, str]] = field(default_factory=list)
    delete_local: list[tuple[str, int, str]] = field(default_factory=list)
    delete_remote: list[tuple[str, int, str]] = field(default_factory=list)
    # Deleted here, another version on the backend: deleted there too (--prefer local).
    delete_contested: list[tuple[str, int, str]] = field(default_factory=list)
    # Conflicts remembered for messages deleted here that the backend no longer holds live.
    settled: list[str] = field(default_factory=list)
    deleted_both: list[tuple[str, str]] = field(default_factory=list)
    restore_remote: list[tuple[str, int]] = field(default_factory=list)
    overwrite_remote: list[tuple[str, int]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    # Stored on the backend but not shown by it (Remote.held_only), unknown here: kept here
    # as local messages, never confirmed (a save then says why the backend drops them).
    keep: list[RemoteMessage] = field(default_factory=list)
    guarded: int = 0

    def actions(self) -> dict[str, int]:
        return {"push": self.push + len(self.repush), "pull": len(self.pull) + len(self.keep),
                "take_backend": len(self.take_backend),
                "delete_here": len(self.delete_local),
                "delete_on_backend": len(self.delete_remote) + len(self.delete_contested),
                "restore_on_backend": len(self.restore_remote),
                "overwrite_on_backend": len(self.overwrite_remote),
                "conflicts": len(self.conflicts), "guarded": self.guarded}

    @property
    def records(self) -> bool:
        """Whether applying the plan writes anything here (messages or remembered states)."""
        return bool(self.confirm or self.pull or self.take_backend or self.delete_local
                    or self.deleted_both or self.delete_remote or self.overwrite_remote
                    or self.delete_contested or self.conflicts or self.repush or self.settled
                    or self.keep)

    @property
    def changes_here(self) -> bool:
        """Whether applying the plan changes this store's messages (not only the backend)."""
        return bool(self.pull or self.take_backend or self.delete_local or self.keep)

    @property
    def changes(self) -> bool:
        counts = self.actions()
        return any(v for k, v in counts.items() if k not in ("conflicts", "guarded"))

    def add(self, mid: str, action: Action, held: RemoteMessage | None = None) -> None:
        """Put one message's decision (chatsave.ops.sync_decide) into the plan; ``held``:
        the message the backend stores but does not show (``Remote.held_only``)."""
        effect, rev, chash = action.effect, int(action.rev or 0), str(action.hash)
        match effect:
            case Effect.CONFIRM | Effect.CONFIRM_AND_PUSH:
                self.confirm.append((mid, action.rev, chash))
            case Effect.REPUSH:
                self.repush.append(mid)
            case Effect.PULL:
                self.pull.append(mid)
            case Effect.KEEP | Effect.KEEP_AND_PUSH:
                assert held is not None
                self.keep.append(held)
            case Effect.TAKE_BACKEND:
                self.take_backend.append((mid, rev, chash))
            case Effect.DELETE_HERE:
                self.delete_local.append((mid, rev, chash))
            case Effect.DELETE_ON_BACKEND:
                self.delete_remote.append((mid, rev, chash))
            case Effect.DELETE_CONTESTED:
                self.delete_contested.append((mid, rev, chash))
            case Effect.RESTORE_ON_BACKEND:
                self.restore_remote.append((mid, rev))
            case Effect.OVERWRITE_ON_BACKEND:
                self.overwrite_remote.append((mid, rev))
            case Effect.CONFLICT:
                self.conflicts.append({"id": mid, "reason": action.reason,
                                       "content_hash": action.hash,
                                       "remote_hash": action.remote_hash, "rev": rev})
            case Effect.GUARDED:
                self.guarded += 1
            case Effect.SETTLE:
                self.settled.append(mid)
            case Effect.DELETED_BOTH:
                self.deleted_both.append((mid, chash))
        if effect in (Effect.PUSH, Effect.CONFIRM_AND_PUSH, Effect.KEEP_AND_PUSH):
            self.push += 1
