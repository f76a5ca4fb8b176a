"""Sync's decision per message, as a pure function (``decide``) over named types.

What sync does with one message is a function of three things: what the comparison says
of it (``Standing``), what this store remembers the backend said of it (``Remembered``),
and the run's modes (``Modes``). ``chatsave.ops.sync`` gathers the inputs and applies the
``Action``; tests/test_sync_decide.py is the table, one row per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from chatsave.ops.compare import SYMBOL_NAMES

# ------------------------------------------------------------------ the decision
# Per message, what sync does is a pure function of three things: what the comparison
# says of it (Standing), what this store remembers the backend said of it (Remembered),
# and the run's modes (Modes). ``decide`` is that function; ``_Sync.plan_chat`` gathers
# its inputs and applies the Action it returns to the chat's plan.
# tests/test_sync_decide.py is its table.


class State(StrEnum):
    """What this store remembers a backend said of a message (``BackendView.states``)."""

    CONFIRMED = "confirmed"  # it holds the version of this hash (at this rev, if known)
    CONFLICT = "conflict"  # it holds another version than this store: not resolved yet
    REJECTED = "rejected"  # it refused this version: not sent again as it is
    DELETED = "deleted"  # it deleted the message (at this rev)


class Remembered(NamedTuple):
    """What this store remembers of a message for a backend: the state, the backend's rev
    and a hash."""

    state: State
    rev: int | None
    hash: str | None

    @classmethod
    def of(cls, entry: tuple[str, int | None, str | None]) -> Remembered:
        """From a ``BackendView.states`` value."""
        return cls(State(entry[0]), entry[1], entry[2])


class Base(StrEnum):
    """Where a message stands. The first five are the comparer's categories (Row.base);
    the last two are messages the comparer lists no row for."""

    SAME = SYMBOL_NAMES["="]  # live on both sides, same hash
    ONLY_LOCAL = SYMBOL_NAMES["+"]  # live here, the backend has no such id
    ONLY_BACKEND = SYMBOL_NAMES["-"]  # live on the backend, never held here
    CONFLICT = SYMBOL_NAMES["*"]  # live on both sides, different hashes
    TOMBSTONE = SYMBOL_NAMES["x"]  # deleted on one side, live on the other (remote_deleted)
    NEITHER = "neither"  # live on neither side, remembered here (deleted here or gone)
    HELD_ONLY = "held_only"  # stored by the backend but not shown (Remote.held_only)

    @classmethod
    def of(cls, symbol: str) -> Base:
        """From a comparer symbol (Row.base)."""
        return cls(SYMBOL_NAMES[symbol])


class Standing(NamedTuple):
    """What is known of one message on both sides, from the comparer's row and the store."""

    base: Base
    local_hash: str | None = None  # live here: its hash
    remote_hash: str | None = None  # the backend's version (live, or the one it deleted)
    remote_rev: int | None = None  # its revision there (None: not fetched, or none)
    remote_deleted: bool = False  # TOMBSTONE: deleted on the backend (else deleted here)
    trashed_hash: str | None = None  # deleted here: the hash its tombstone remembers
    evicted: bool = False  # live here as a stub (gc evicted its body); read with prefer local


class Prefer(StrEnum):
    LOCAL = "local"
    BACKEND = "backend"


class Modes(NamedTuple):
    """The run's flags the decision reads."""

    push: bool = True
    pull: bool = True
    prefer: str | None = None  # Prefer, or None (kept a plain string as SyncOptions has it)
    guarded: bool = False  # the backend looks wiped or replaced: no deletions, no overwrites


class Effect(StrEnum):
    """What a message's decision does to the chat's plan (ChatPlan field in brackets)."""

    NOTHING = "nothing"
    CONFIRM = "confirm"  # remember the backend holds ``hash`` at ``rev`` [confirm]
    PUSH = "push"  # sent as save sends it [push]
    CONFIRM_AND_PUSH = "confirm_and_push"  # an edit here: the version confirmed is
    # remembered at ``rev`` (``hash``, the backend's) and the edit sent against it
    REPUSH = "repush"  # confirmed (or deleted) there, gone there now: forgotten, sent
    # again; a ``missing_on_backend`` event [repush]
    REPORT_MISSING = "report_missing"  # the same without push: the event only
    PULL = "pull"  # the backend's message taken here [pull]
    KEEP = "keep"  # held only there: a copy kept here [keep]
    KEEP_AND_PUSH = "keep_and_push"  # the same, and sent on (the answer says why) [keep, push]
    TAKE_BACKEND = "take_backend"  # the backend's version ``hash`` at ``rev`` replaces
    # this store's (the old one to the trash) [take_backend]
    DELETE_HERE = "delete_here"  # deleted here (to the trash), as on the backend [delete_local]
    DELETE_ON_BACKEND = "delete_on_backend"  # deleted there against ``rev`` [delete_remote]
    DELETE_CONTESTED = "delete_contested"  # deleted there although it holds another
    # version (--prefer local) [delete_contested]
    RESTORE_ON_BACKEND = "restore_on_backend"  # written there again against the
    # tombstone's ``rev`` [restore_remote]
    OVERWRITE_ON_BACKEND = "overwrite_on_backend"  # this version written over the
    # backend's at ``rev`` (--prefer local) [overwrite_remote]
    CONFLICT = "conflict"  # both kept, reported [conflicts]
    GUARDED = "guarded"  # a deletion or overwrite the guard holds back [guarded]
    SETTLE = "settle"  # a remembered conflict with nothing left to resolve: forgotten [settled]
    DELETED_BOTH = "deleted_both"  # deleted on both sides: remembered so [deleted_both]


@dataclass(frozen=True)
class Action:
    """A message's decision: the effect and what it records."""

    effect: Effect
    rev: int | None = None
    hash: str | None = None  # the hash recorded; a conflict's: this store's version
    remote_hash: str | None = None  # a conflict's: the backend's version
    reason: str | None = None  # a conflict's


# The reason of a conflict --prefer local leaves: a stub here has no body to write.
STUB_REASON = ("its body was evicted here (gc) and the backend no longer holds this "
               "version: --prefer local cannot write it, --prefer backend resolves it")
NOTHING = Action(Effect.NOTHING)
GUARDED = Action(Effect.GUARDED)


def decide(row: Standing, remembered: Remembered | None, modes: Modes) -> Action:
    """What sync does with one message (pure: the same inputs, the same action)."""
    match row.base:
        case Base.SAME:
            return _same(row, remembered)
        case Base.ONLY_LOCAL:
            return _only_local(row, remembered, modes)
        case Base.ONLY_BACKEND:
            return Action(Effect.PULL) if modes.pull else NOTHING
        case Base.TOMBSTONE if row.remote_deleted:
            return _deleted_there(row, remembered, modes)
        case Base.TOMBSTONE:
            return _deleted_here(row, remembered, modes)
        case Base.CONFLICT:
            return _conflict(row, remembered, modes)
        case Base.NEITHER:
            return _neither(row, remembered, modes)
        case Base.HELD_ONLY:
            return _held_only(row, remembered, modes)
    return NOTHING  # pragma: no cover - every Base is matched above


def _confirmed(remembered: Remembered | None, hash_: str | None) -> bool:
    return remembered is not None and remembered.state == State.CONFIRMED \
        and remembered.hash == hash_


def _same(row: Standing, st: Remembered | None) -> Action:
    # Equal digests (no fetch) vouch for every message too; the revision is then unknown
    # until the chat is next fetched.
    if _confirmed(st, row.local_hash):
        return NOTHING
    return Action(Effect.CONFIRM, row.remote_rev, str(row.local_hash))


def _only_local(row: Standing, st: Remembered | None, modes: Modes) -> Action:
    if st is not None and st.state in (State.CONFIRMED, State.DELETED):
        # The backend had it (or deleted it) and no longer lists it at all.
        return Action(Effect.REPUSH if modes.push else Effect.REPORT_MISSING,
                      hash=row.local_hash)
    if st is not None and st.state == State.REJECTED:
        return NOTHING
    return Action(Effect.PUSH) if modes.push else NOTHING


def _deleted_there(row: Standing, st: Remembered | None, modes: Modes) -> Action:
    """Live here, deleted on the backend."""
    rev = int(row.remote_rev or 0)
    if st is not None and st.state == State.DELETED:
        # Deleted there, as remembered, and live here again (restored from the trash).
        if modes.guarded:
            return GUARDED
        return Action(Effect.RESTORE_ON_BACKEND, rev) if modes.push else NOTHING
    if modes.guarded:
        return GUARDED
    if row.remote_hash == row.local_hash or _confirmed(st, row.local_hash):
        # The version deleted there is this one, or the backend moved on from this one
        # (which it had confirmed): the deletion is taken.
        return Action(Effect.DELETE_HERE, rev, str(row.remote_hash)) if modes.pull \
            else NOTHING
    # A version the backend never had, and another one deleted there (two clients): the
    # deletion did not see this version. A conflict, both kept, until --prefer: local
    # restores it there (against the tombstone's revision), backend deletes it here (to the
    # trash).
    if modes.prefer == Prefer.LOCAL and modes.push and not row.evicted:
        return Action(Effect.RESTORE_ON_BACKEND, rev)
    if modes.prefer == Prefer.BACKEND and modes.pull:
        return Action(Effect.DELETE_HERE, rev, str(row.remote_hash))
    return Action(Effect.CONFLICT, rev, row.local_hash, row.remote_hash,
                  _why(row, modes, "changed here, deleted on the backend"))


def _deleted_here(row: Standing, st: Remembered | None, modes: Modes) -> Action:
    """Deleted here, live on the backend."""
    rev = int(row.remote_rev or 0)
    if st is not None and st.state == State.DELETED and st.rev is not None \
            and rev > int(st.rev):
        # Deleted there at the revision this store agreed on, then written there again (a
        # trash restore, or another client's version restored with --prefer local): the
        # backend changed after the deletion, take it.
        if modes.guarded:
            return GUARDED
        return Action(Effect.TAKE_BACKEND, rev, str(row.remote_hash)) if modes.pull \
            else NOTHING
    if row.trashed_hash != row.remote_hash:
        if modes.guarded and modes.prefer:
            return GUARDED
        if modes.prefer == Prefer.LOCAL and modes.push:
            # The deletion wins, over the version seen there only.
            return Action(Effect.DELETE_CONTESTED, rev, str(row.remote_hash))
        if modes.prefer == Prefer.BACKEND and modes.pull:
            # The backend's version comes back here (the deleted one stays in the trash).
            return Action(Effect.TAKE_BACKEND, rev, str(row.remote_hash))
        return Action(Effect.CONFLICT, rev, row.trashed_hash, row.remote_hash,
                      "deleted here, changed on the backend")
    if modes.guarded:
        return GUARDED
    return Action(Effect.DELETE_ON_BACKEND, rev, str(row.remote_hash)) if modes.push \
        else NOTHING


def _conflict(row: Standing, st: Remembered | None, modes: Modes) -> Action:
    """Live on both sides, different versions."""
    rev = int(row.remote_rev or 0)
    newer_there = st is not None and _confirmed(st, row.local_hash) and rev > int(st.rev or 0)
    # Edited here (import --update, a trash restore of a replaced version) while the
    # backend still holds the version it confirmed to this store.
    edited_here = _confirmed(st, row.remote_hash)
    if modes.guarded and (newer_there or modes.prefer):
        return GUARDED
    if newer_there and modes.pull:
        return Action(Effect.TAKE_BACKEND, rev, str(row.remote_hash))
    if modes.prefer == Prefer.LOCAL and modes.push and not row.evicted:
        return Action(Effect.OVERWRITE_ON_BACKEND, rev)
    if modes.prefer == Prefer.BACKEND and modes.pull:
        return Action(Effect.TAKE_BACKEND, rev, str(row.remote_hash))
    if edited_here:
        # The version confirmed is remembered at the revision read now, and the edit is
        # pushed as save pushes it: against that revision.
        return Action(Effect.CONFIRM_AND_PUSH if modes.push else Effect.CONFIRM, rev,
                      str(row.remote_hash))
    return Action(Effect.CONFLICT, rev, row.local_hash, row.remote_hash,
                  _why(row, modes, "different_content"))


def _neither(row: Standing, st: Remembered | None, modes: Modes) -> Action:
    """Live on neither side; only what is remembered of it is left to tidy."""
    if st is None or modes.guarded:
        return NOTHING
    if st.state == State.CONFLICT and row.trashed_hash is not None:
        # A conflict remembered for a message deleted here, which the backend no longer
        # holds live (it was deleted there too): nothing is left to resolve.
        return Action(Effect.SETTLE)
    if st.state == State.CONFIRMED and st.rev is None and row.trashed_hash == st.hash:
        # Deleted here, confirmed at a revision never learnt (no delete can be sent against
        # it), and no longer live on the backend: the deletion is done.
        return Action(Effect.DELETED_BOTH, hash=str(st.hash))
    return NOTHING


def _held_only(row: Standing, st: Remembered | None, modes: Modes) -> Action:
    """Stored on the backend but not shown by it: unknown here, a copy is kept here as a
    local message, never confirmed (sent on, the answer says why the backend drops it)."""
    if not modes.pull or modes.guarded or st is not None or row.local_hash is not None \
            or row.trashed_hash is not None:
        return NOTHING
    return Action(Effect.KEEP_AND_PUSH if modes.push else Effect.KEEP)


def _why(row: Standing, modes: Modes, reason: str) -> str:
    """A conflict's reason; with --prefer local on a stub, why it stays a conflict."""
    return STUB_REASON if modes.prefer == Prefer.LOCAL and row.evicted else reason
