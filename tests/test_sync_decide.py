"""Sync's per-message decision as a table (chatsave.ops.sync.decide).

One row per case the decision tells apart: where the message is here and on the backend,
what this store remembers the backend said of it, and the run's modes; then the action.

Cells, as written in the table:

- here: ``live A`` (hash A), ``stub A`` (live, its body evicted by gc), ``deleted A``
  (in the trash, its tombstone remembering hash A), ``absent``;
- backend: ``live B@7`` (hash B at revision 7; ``@?``: revision unknown, the chat's
  digests agreed so nothing was fetched), ``deleted B@7`` (a tombstone of version B at
  revision 7), ``held B`` (stored there but not shown: Remote.held_only), ``absent``;
- remembered (remote_state): ``nothing``, or ``STATE HASH@REV``;
- modes: ``push+pull``, ``push only`` or ``pull only``, then ``prefer local``,
  ``prefer backend``, ``guarded`` (the backend looks wiped or replaced);
- action: ``EFFECT [HASH] [vs REMOTE_HASH][@REV][: conflict reason]``.

The expected actions were read off the code before ``decide`` existed (plan_chat's
131-line loop) and checked against it through an adapter; the state machine test
(test_sync_state_machine.py) stays the second line of defence.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest

from chatsave.ops.sync_decide import (
    STUB_REASON,
    Action,
    Base,
    Effect,
    Modes,
    Remembered,
    Standing,
    State,
    decide,
)


class Case(NamedTuple):
    here: str
    backend: str
    remembered: str
    modes: str
    action: str


BOTH, PUSH_ONLY, PULL_ONLY = "push+pull", "push only", "pull only"
DIFFERENT = "different_content"
CHANGED_HERE = "changed here, deleted on the backend"
DELETED_HERE = "deleted here, changed on the backend"

TABLE = [
    # ---- live on both sides, the same version (the comparer's "=")
    Case("live A", "live A@7", "nothing", BOTH, "confirm A@7"),
    Case("live A", "live A@?", "nothing", BOTH, "confirm A@?"),
    Case("live A", "live A@7", "confirmed A@7", BOTH, "nothing"),
    Case("live A", "live A@7", "confirmed A@5", BOTH, "nothing"),
    Case("live A", "live A@7", "confirmed B@5", BOTH, "confirm A@7"),
    Case("live A", "live A@7", "conflict B@7", BOTH, "confirm A@7"),
    Case("live A", "live A@7", "rejected A", BOTH, "confirm A@7"),
    Case("live A", "live A@7", "deleted A@5", BOTH, "confirm A@7"),
    Case("live A", "live A@7", "nothing", PUSH_ONLY, "confirm A@7"),
    Case("live A", "live A@7", "nothing", PULL_ONLY, "confirm A@7"),
    Case("live A", "live A@7", "nothing", "push+pull, guarded", "confirm A@7"),
    # ---- live here only ("+")
    Case("live A", "absent", "nothing", BOTH, "push"),
    Case("live A", "absent", "nothing", PUSH_ONLY, "push"),
    Case("live A", "absent", "nothing", PULL_ONLY, "nothing"),
    Case("live A", "absent", "nothing", "push+pull, guarded", "push"),
    Case("live A", "absent", "conflict B@7", BOTH, "push"),
    Case("live A", "absent", "rejected A", BOTH, "nothing"),
    Case("live A", "absent", "confirmed A@7", BOTH, "repush A"),
    Case("live A", "absent", "confirmed B@?", BOTH, "repush A"),
    Case("live A", "absent", "confirmed A@7", "push+pull, guarded", "repush A"),
    Case("live A", "absent", "confirmed A@7", PULL_ONLY, "report_missing A"),
    Case("live A", "absent", "deleted A@5", BOTH, "repush A"),
    # ---- on the backend only ("-")
    Case("absent", "live B@7", "nothing", BOTH, "pull"),
    Case("absent", "live B@7", "nothing", PULL_ONLY, "pull"),
    Case("absent", "live B@7", "nothing", PUSH_ONLY, "nothing"),
    Case("absent", "live B@7", "nothing", "push+pull, guarded", "pull"),
    Case("absent", "live B@7", "confirmed B@7", BOTH, "pull"),
    # ---- live here, deleted on the backend ("x")
    # the version deleted there is this one, or one the backend moved on to from this one
    Case("live A", "deleted A@7", "nothing", BOTH, "delete_here A@7"),
    Case("live A", "deleted A@7", "nothing", PULL_ONLY, "delete_here A@7"),
    Case("live A", "deleted A@7", "nothing", PUSH_ONLY, "nothing"),
    Case("live A", "deleted A@7", "nothing", "push+pull, guarded", "guarded"),
    Case("live A", "deleted A@7", "confirmed A@5", BOTH, "delete_here A@7"),
    Case("live A", "deleted B@7", "confirmed A@5", BOTH, "delete_here B@7"),
    Case("live A", "deleted B@7", "confirmed A@5", "push+pull, prefer local",
         "delete_here B@7"),
    # the deletion did not see this version: a conflict until --prefer
    Case("live A", "deleted B@7", "nothing", BOTH, f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("live A", "deleted B@7", "confirmed B@5", BOTH, f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("live A", "deleted B@7", "rejected A", BOTH, f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("live A", "deleted B@7", "conflict B@7", BOTH, f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("live A", "deleted B@7", "nothing", "push+pull, prefer local", "restore_on_backend@7"),
    Case("live A", "deleted B@7", "nothing", "push only, prefer local", "restore_on_backend@7"),
    Case("live A", "deleted B@7", "nothing", "pull only, prefer local",
         f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("stub A", "deleted B@7", "nothing", "push+pull, prefer local",
         "conflict A vs B@7: stub"),
    Case("stub A", "deleted B@7", "nothing", BOTH, f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("stub A", "deleted B@7", "nothing", "push+pull, prefer backend", "delete_here B@7"),
    Case("live A", "deleted B@7", "nothing", "push+pull, prefer backend", "delete_here B@7"),
    Case("live A", "deleted B@7", "nothing", "push only, prefer backend",
         f"conflict A vs B@7: {CHANGED_HERE}"),
    Case("live A", "deleted B@7", "nothing", "push+pull, guarded", "guarded"),
    Case("live A", "deleted B@7", "nothing", "push+pull, prefer local, guarded", "guarded"),
    # deleted there as remembered, live here again (a trash restore here): restored there
    Case("live A", "deleted A@7", "deleted A@7", BOTH, "restore_on_backend@7"),
    Case("live A", "deleted A@7", "deleted A@7", PUSH_ONLY, "restore_on_backend@7"),
    Case("live A", "deleted A@7", "deleted A@7", PULL_ONLY, "nothing"),
    Case("live A", "deleted A@7", "deleted A@7", "push+pull, guarded", "guarded"),
    Case("live A", "deleted B@7", "deleted B@7", "push+pull, prefer backend",
         "restore_on_backend@7"),
    # ---- deleted here, live on the backend ("x")
    # the backend holds the version deleted here: the deletion is sent
    Case("deleted A", "live A@7", "nothing", BOTH, "delete_on_backend A@7"),
    Case("deleted A", "live A@7", "confirmed A@7", BOTH, "delete_on_backend A@7"),
    Case("deleted A", "live A@7", "nothing", PUSH_ONLY, "delete_on_backend A@7"),
    Case("deleted A", "live A@7", "nothing", PULL_ONLY, "nothing"),
    Case("deleted A", "live A@7", "nothing", "push+pull, guarded", "guarded"),
    Case("deleted A", "live A@7", "nothing", "push+pull, prefer local, guarded", "guarded"),
    Case("deleted A", "live A@7", "deleted A@7", BOTH, "delete_on_backend A@7"),
    Case("deleted A", "live A@7", "deleted A@?", BOTH, "delete_on_backend A@7"),
    # written there again after the deletion this store agreed on: taken
    Case("deleted A", "live B@7", "deleted A@5", BOTH, "take_backend B@7"),
    Case("deleted A", "live A@7", "deleted A@5", BOTH, "take_backend A@7"),
    Case("deleted A", "live B@7", "deleted A@5", PULL_ONLY, "take_backend B@7"),
    Case("deleted A", "live B@7", "deleted A@5", PUSH_ONLY, "nothing"),
    Case("deleted A", "live B@7", "deleted A@5", "push+pull, prefer local", "take_backend B@7"),
    Case("deleted A", "live B@7", "deleted A@5", "push+pull, guarded", "guarded"),
    # another version there than the one deleted here: a conflict until --prefer
    Case("deleted A", "live B@7", "nothing", BOTH, f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "deleted A@?", BOTH, f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "deleted A@7", BOTH, f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "confirmed A@5", BOTH, f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "nothing", "push+pull, guarded",
         f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "nothing", "push+pull, prefer local", "delete_contested B@7"),
    Case("deleted A", "live B@7", "nothing", "pull only, prefer local",
         f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "nothing", "push+pull, prefer backend", "take_backend B@7"),
    Case("deleted A", "live B@7", "nothing", "push only, prefer backend",
         f"conflict A vs B@7: {DELETED_HERE}"),
    Case("deleted A", "live B@7", "nothing", "push+pull, prefer local, guarded", "guarded"),
    Case("deleted A", "live B@7", "nothing", "push+pull, prefer backend, guarded", "guarded"),
    # ---- live on both sides, different versions ("*")
    Case("live A", "live B@7", "nothing", BOTH, f"conflict A vs B@7: {DIFFERENT}"),
    Case("live A", "live B@7", "rejected A", BOTH, f"conflict A vs B@7: {DIFFERENT}"),
    Case("live A", "live B@7", "conflict B@7", BOTH, f"conflict A vs B@7: {DIFFERENT}"),
    Case("live A", "live B@7", "deleted A@5", BOTH, f"conflict A vs B@7: {DIFFERENT}"),
    Case("live A", "live B@7", "nothing", "push+pull, guarded", f"conflict A vs B@7: {DIFFERENT}"),
    # the backend moved on from the version it confirmed, which this store kept: taken
    Case("live A", "live B@7", "confirmed A@5", BOTH, "take_backend B@7"),
    Case("live A", "live B@7", "confirmed A@?", BOTH, "take_backend B@7"),
    Case("live A", "live B@7", "confirmed A@5", PULL_ONLY, "take_backend B@7"),
    Case("live A", "live B@7", "confirmed A@5", "push+pull, prefer local", "take_backend B@7"),
    Case("live A", "live B@7", "confirmed A@5", "push+pull, guarded", "guarded"),
    Case("live A", "live B@7", "confirmed A@5", PUSH_ONLY, f"conflict A vs B@7: {DIFFERENT}"),
    Case("live A", "live B@7", "confirmed A@7", BOTH, f"conflict A vs B@7: {DIFFERENT}"),
    # edited here, the backend still holds the version it confirmed: the edit is sent
    Case("live A", "live B@7", "confirmed B@7", BOTH, "confirm_and_push B@7"),
    Case("live A", "live B@7", "confirmed B@5", BOTH, "confirm_and_push B@7"),
    Case("live A", "live B@7", "confirmed B@7", PULL_ONLY, "confirm B@7"),
    Case("live A", "live B@7", "confirmed B@7", "push+pull, guarded", "confirm_and_push B@7"),
    Case("live A", "live B@7", "confirmed B@7", "push+pull, prefer local",
         "overwrite_on_backend@7"),
    Case("live A", "live B@7", "confirmed B@7", "push+pull, prefer backend", "take_backend B@7"),
    # --prefer
    Case("live A", "live B@7", "nothing", "push+pull, prefer local", "overwrite_on_backend@7"),
    Case("live A", "live B@7", "nothing", "push only, prefer local", "overwrite_on_backend@7"),
    Case("live A", "live B@7", "nothing", "pull only, prefer local",
         f"conflict A vs B@7: {DIFFERENT}"),
    Case("stub A", "live B@7", "nothing", "push+pull, prefer local", "conflict A vs B@7: stub"),
    Case("stub A", "live B@7", "confirmed B@7", "push+pull, prefer local",
         "confirm_and_push B@7"),
    Case("stub A", "live B@7", "nothing", BOTH, f"conflict A vs B@7: {DIFFERENT}"),
    Case("stub A", "live B@7", "nothing", "push+pull, prefer backend", "take_backend B@7"),
    Case("live A", "live B@7", "nothing", "push+pull, prefer backend", "take_backend B@7"),
    Case("live A", "live B@7", "nothing", "push only, prefer backend",
         f"conflict A vs B@7: {DIFFERENT}"),
    Case("live A", "live B@7", "nothing", "push+pull, prefer local, guarded", "guarded"),
    Case("live A", "live B@7", "nothing", "push+pull, prefer backend, guarded", "guarded"),
    # ---- live on neither side (no comparer row): only what is remembered is tidied
    Case("deleted A", "deleted A@7", "nothing", BOTH, "nothing"),
    Case("deleted A", "deleted A@7", "conflict B@7", BOTH, "settle"),
    Case("deleted A", "absent", "conflict B@7", BOTH, "settle"),
    Case("deleted A", "deleted A@7", "conflict B@7", "push+pull, guarded", "nothing"),
    Case("absent", "deleted A@7", "conflict B@7", BOTH, "nothing"),
    Case("deleted A", "absent", "confirmed A@?", BOTH, "deleted_both A"),
    Case("deleted A", "deleted A@7", "confirmed A@?", PUSH_ONLY, "deleted_both A"),
    Case("deleted A", "deleted A@7", "confirmed A@?", PULL_ONLY, "deleted_both A"),
    Case("deleted A", "absent", "confirmed A@?", "push+pull, guarded", "nothing"),
    Case("deleted A", "absent", "confirmed A@7", BOTH, "nothing"),
    Case("deleted A", "absent", "confirmed B@?", BOTH, "nothing"),
    Case("absent", "absent", "confirmed A@?", BOTH, "nothing"),
    Case("deleted A", "deleted A@7", "deleted A@7", BOTH, "nothing"),
    Case("deleted A", "absent", "rejected A", BOTH, "nothing"),
    # ---- stored on the backend but not shown (no comparer row)
    Case("absent", "held B", "nothing", BOTH, "keep_and_push"),
    Case("absent", "held B", "nothing", PULL_ONLY, "keep"),
    Case("absent", "held B", "nothing", PUSH_ONLY, "nothing"),
    Case("absent", "held B", "nothing", "push+pull, guarded", "nothing"),
    Case("absent", "held B", "rejected B", BOTH, "nothing"),
    Case("absent", "held B", "confirmed B@7", BOTH, "nothing"),
    Case("deleted A", "held B", "nothing", BOTH, "nothing"),
    # (live here, the comparer lists it as a row first: a row decides it, not this)
    Case("live A", "held B", "nothing", BOTH, "nothing"),
]


# ------------------------------------------------------------------ reading the cells
_HERE = re.compile(r"(?P<kind>live|stub|deleted) (?P<hash>\w+)|absent")
_BACKEND = re.compile(r"(?P<kind>live|deleted|held) (?P<hash>\w+)(?:@(?P<rev>\d+|\?))?|absent")
_REMEMBERED = re.compile(r"(?P<state>\w+) (?P<hash>\w+)(?:@(?P<rev>\d+|\?))?|nothing")
_ACTION = re.compile(r"(?P<effect>\w+)(?: (?P<hash>\w+))?(?: vs (?P<remote>\w+))?"
                     r"(?:@(?P<rev>\d+|\?))?(?:: (?P<reason>.+))?")


def _rev(text: str | None) -> int | None:
    return None if text in (None, "?") else int(text)


def standing(here: str, backend: str) -> Standing:
    """What the comparer (and the store) says of the message: its row, or none."""
    h = _HERE.fullmatch(here)
    b = _BACKEND.fullmatch(backend)
    assert h and b, (here, backend)
    live_here = h["kind"] in ("live", "stub")
    local = h["hash"] if live_here else None
    trashed = h["hash"] if h["kind"] == "deleted" else None
    evicted = h["kind"] == "stub"
    remote, rev = b["hash"], _rev(b["rev"])
    if b["kind"] == "held":
        return Standing(Base.HELD_ONLY, local, remote, rev, trashed_hash=trashed)
    if b["kind"] == "live":
        if live_here:
            base = Base.SAME if local == remote else Base.CONFLICT
            return Standing(base, local, remote, rev, evicted=evicted)
        if trashed is not None:
            return Standing(Base.TOMBSTONE, None, remote, rev, trashed_hash=trashed)
        return Standing(Base.ONLY_BACKEND, None, remote, rev)
    if live_here and b["kind"] == "deleted":
        return Standing(Base.TOMBSTONE, local, remote, rev, remote_deleted=True,
                        evicted=evicted)
    if live_here:
        return Standing(Base.ONLY_LOCAL, local, evicted=evicted)
    return Standing(Base.NEITHER, trashed_hash=trashed)


def remembered(cell: str) -> Remembered | None:
    m = _REMEMBERED.fullmatch(cell)
    assert m, cell
    if cell == "nothing":
        return None
    return Remembered(State(m["state"]), _rev(m["rev"]), m["hash"])


def modes(cell: str) -> Modes:
    words = cell.split(", ")
    flow = {BOTH: (True, True), PUSH_ONLY: (True, False), PULL_ONLY: (False, True)}[words[0]]
    prefer = [w.removeprefix("prefer ") for w in words[1:] if w.startswith("prefer ")]
    assert set(words[1:]) <= {"prefer local", "prefer backend", "guarded"}, cell
    return Modes(*flow, prefer=prefer[0] if prefer else None, guarded="guarded" in words)


def action(cell: str) -> Action:
    m = _ACTION.fullmatch(cell)
    assert m, cell
    reason = STUB_REASON if m["reason"] == "stub" else m["reason"]
    return Action(Effect(m["effect"]), _rev(m["rev"]), m["hash"], m["remote"], reason)


def _id(case: Case) -> str:
    return (f"here {case.here}, backend {case.backend}, remembered {case.remembered}, "
            f"{case.modes} => {case.action}")


# ------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("case", TABLE, ids=[_id(c) for c in TABLE])
def test_decide(case: Case) -> None:
    got = decide(standing(case.here, case.backend), remembered(case.remembered),
                 modes(case.modes))
    assert got == action(case.action)


def test_the_table_has_no_duplicate_case() -> None:
    keys = [(c.here, c.backend, c.remembered, c.modes) for c in TABLE]
    assert len(keys) == len(set(keys))


def test_every_effect_appears_in_the_table() -> None:
    assert {action(c.action).effect for c in TABLE} == set(Effect)


def test_every_remembered_state_appears_in_the_table() -> None:
    states = {r.state for c in TABLE if (r := remembered(c.remembered)) is not None}
    assert states == set(State)
