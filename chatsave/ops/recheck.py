"""Before a save: does the backend still hold what it confirmed to this store?

Design and limits: docs/reliability.md, "A backend that forgets what it confirmed".

A confirmation is only as good as the backend's memory of it, and backends forget:

- AutoBot rewrites its chat files behind chatsave's back (its Redis session cache writes
  the cached copy over a file at its next message), so a message it showed after
  chatsave's write can be gone at the next run. Every run reads the chats this store has
  confirmed messages in; a confirmed message no longer shown live is lost.
- A chatsave-protocol backend (a server or an embedded one) restored from an old copy
  keeps its backend_id and has lost what it confirmed since the copy was taken. Chat
  digests first, in bulk (one request per ``max_page`` chats): a chat whose backend digest
  equals the digest of the (id, hash) pairs confirmed there holds every one of them, and
  costs nothing more. A chat other stores write to as well differs: its messages are read
  (tombstones included), and once they hold everything confirmed the pair of digests is
  kept (``BackendView.note_checked``), so that the chat is not read again while neither
  changes. Only an id absent altogether is lost: a tombstone or another hash is another
  store's deletion or edit, which sync settles.

A lost message is made pending again, so the same run sends it once more
(``resent_lost``). One that vanishes again after that resend is not sent a third time: it
is rejected with the reason (exit 4), kept here, and ``save --retry-rejected`` sends it
once the cause is dealt with. On a chatsave backend the note of that resend is cleared as
soon as a check finds the message there, so that a restore months later is again resent
once; AutoBot's is kept, since its cache writes over a file at its next message, which may
come after a run that found the message, and clearing the note there would resend it
every other run, never listed. One whose body gc evicted here cannot be sent: both copies
are gone, and it is listed the same way.

A chatsave backend that holds none of the chats this store saw messages confirmed in has
been wiped (or restored from a copy older than all of them): the save is refused (exit 5)
before anything is sent, as sync's empty-backend guard refuses.

The check runs before planning, not after the sends: what it finds lost is planned with
the rest, so one send pass carries it; the guard refuses before a single write reaches a
wiped backend; and a backend that loses what it confirms is caught at the next run, which
lists what vanished again instead of sending it a third time. A check after the sends
would need a second send pass in the same run, and would come after the writes the guard
exists to stop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatsave.errors import (
    BadAnswerError,
    ChatRefusedError,
    GuardError,
    RefusedError,
    RemoteError,
)
from chatsave.protocol import Capabilities, DigestsAnswer
from chatsave.remote.base import Remote
from chatsave.store.backend import BackendView
from chatsave.store.remote_copy import HeldIds
from chatsave.store.store import Store, Stub

# The reason kept on a confirmation that followed such a resend: the second time it
# vanishes, it is listed instead of sent again.
RESENT = "sent again after it vanished from the backend"
EVICTED = ("vanished from the backend, and gc had evicted its body here: no copy is left "
           "to send (the id and hash are kept)")


@dataclass(frozen=True)
class BackendKind:
    """How one kind of backend comes to lose what it confirmed, and what is said then."""

    # The reason a message that vanished again after its resend is listed with.
    vanished_again: str
    # Whether a tombstone there still holds the id (a chatsave backend keeps deletions).
    tombstones_hold: bool


AUTOBOT = BackendKind(
    vanished_again=("vanished from the backend again after chatsave sent it back once: "
                    "something there writes over what chatsave saves (AutoBot's Redis "
                    "session cache, while AutoBot runs with it: stop AutoBot or flush its "
                    "chat:session:* keys, then save --retry-rejected)"),
    tombstones_hold=False)
CHATSAVE = BackendKind(
    vanished_again=("vanished from the backend again after chatsave sent it back once: "
                    "the backend loses what it confirms (restored from an old copy again, "
                    "or storage that does not keep its writes): check the backend, then "
                    "save --retry-rejected"),
    tombstones_hold=True)

Emit = Callable[..., None]


@dataclass
class Recheck:
    """What the check found and did."""

    # (chat, id) made pending again, for this run to send once more.
    resent: list[tuple[str, str]] = field(default_factory=list)
    # Requests it sent (digests and message pages).
    requests: int = 0
    # The backend looks wiped: nothing may be sent.
    guard: GuardError | None = None
    # A read that failed: the check of those chats waits for the next run.
    error: RemoteError | None = None


def recheck(store: Store, remote: Remote, view: BackendView, caps: Capabilities,
            chat_ids: list[str], emit: Emit) -> Recheck:
    """Check that the backend still holds what it confirmed in ``chat_ids``; make pending
    again what it lost (or list it), or set ``guard`` when it looks wiped."""
    kind = AUTOBOT if "autobot" in caps.features else CHATSAVE
    checker = _Checker(store, remote, view, caps, kind, emit)
    if kind is AUTOBOT:
        for chat_id in view.confirmed_chats(set(chat_ids)):
            try:
                checker.read(chat_id)
            except RemoteError:
                continue  # the save of this chat meets the same error and reports it
            checker.resend(chat_id, checker.lost(chat_id))
    else:
        checker.check(chat_ids)
    return checker.result


def mark_resent(store: Store, view: BackendView, resent: list[tuple[str, str]]) -> None:
    """Remember, on the confirmations the resend earned, that they followed a vanishing."""
    if resent:
        with store.transaction():
            view.note_confirmed(resent, RESENT)


class _Checker:
    def __init__(self, store: Store, remote: Remote, view: BackendView, caps: Capabilities,
                 kind: BackendKind, emit: Emit) -> None:
        self.store = store
        self.remote = remote
        self.view = view
        self.caps = caps
        self.kind = kind
        self.emit = emit
        self.result = Recheck()
        # The ids the backend holds in the chat read last (a temporary table).
        self.held = HeldIds(view)

    # ------------------------------------------------------- chatsave backends
    def check(self, chat_ids: list[str]) -> None:
        """Digests first; messages only of the chats whose digests do not vouch for them."""
        confirmed = self.view.confirmed_digests(set(chat_ids))
        if not confirmed:
            return
        try:
            held = self.digests(sorted(confirmed))
            if all(held[c] is None for c in confirmed) and not self.holds_others(chat_ids):
                shown = ", ".join(repr(c) for c in sorted(confirmed)[:5])
                more = " ..." if len(confirmed) > 5 else ""
                self.result.guard = GuardError(
                    f"the backend {self.remote.url} no longer has any of the "
                    f"{len(confirmed)} chat(s) this store saved to it ({shown}{more}): it "
                    "looks wiped, or restored from a copy older than all of them; nothing "
                    "was sent",
                    hint="check that --remote is the backend this store saved to and that "
                    "its storage is the right one; chatsave diff --all shows what it lacks")
                return
        except (RefusedError, ChatRefusedError):
            raise
        except RemoteError as exc:
            self.result.error = exc
            return
        checks = self.view.checks()
        noted = self.view.noted_chats()
        vouched: list[str] = []
        for chat_id, digest in confirmed.items():
            there = held[chat_id]
            if there is not None and (there == digest or
                                      checks.get(chat_id) == (there, digest)):
                vouched.append(chat_id)
                continue
            try:
                self.read(chat_id, there is None)
            except ChatRefusedError:
                continue  # left out of the run by the save, which says why
            except RefusedError:
                raise
            except RemoteError as exc:
                self.result.error = exc
                continue
            lost = self.lost(chat_id)
            if not lost and there is not None:
                self.view.note_checked(chat_id, there, digest)
            if chat_id in noted:
                self.clear_notes(chat_id)
            self.resend(chat_id, lost)
        held_again = [c for c in vouched if c in noted]
        if held_again:
            with self.store.transaction():
                self.view.clear_notes(held_again, RESENT)

    def _asked(self, chat_ids: list[str]) -> Iterator[tuple[list[str], DigestsAnswer]]:
        """Each chunk of ``chat_ids`` (``max_page`` chats) with the backend's digest answer,
        asked as it is reached (one request each)."""
        step = max(1, self.caps.max_page)
        for i in range(0, len(chat_ids), step):
            chunk = chat_ids[i:i + step]
            answer = self.remote.digests(chunk)
            self.result.requests += 1
            yield chunk, answer

    def digests(self, chat_ids: list[str]) -> dict[str, str | None]:
        """The backend's digest of each chat (None: it does not have it), in bulk."""
        held: dict[str, str | None] = {}
        for chunk, answer in self._asked(chat_ids):
            for chat_id in chunk:
                if chat_id not in answer.digests:
                    raise BadAnswerError(f"{self.remote.url}: the digest answer left out "
                                         f"chat {chat_id!r}")
                held[chat_id] = answer.digests[chat_id]
        return held

    def holds_others(self, chat_ids: list[str]) -> bool:
        """Whether the backend has any other chat this store saw messages confirmed in
        (a save of a few chats lost by a restore is no wiped backend); stops at the first."""
        others = sorted(self.view.confirmed_chats() - set(chat_ids))
        return any(answer.digests.get(c) is not None
                   for chunk, answer in self._asked(others) for c in chunk)

    def clear_notes(self, chat_id: str) -> None:
        """Clear the resend notes of a chat's confirmations the backend holds again."""
        self.held.clear_notes(chat_id, RESENT)

    # ------------------------------------------------------------ every kind
    def read(self, chat_id: str, absent: bool = False) -> None:
        """Load the ids the backend holds in a chat (and whether each is live) into the
        temp table, page by page (nothing to read of a chat it does not have)."""
        self.held.clear(chat_id)
        after: Any = None
        while not absent:
            page = self.remote.messages(chat_id, after=after, limit=self.caps.max_page,
                                        include_deleted=self.kind.tombstones_hold)
            self.result.requests += 1
            self.held.add(chat_id, [(m.id, not m.deleted) for m in page.messages])
            if page.next is None or not page.messages:
                return
            after = page.next

    def lost(self, chat_id: str) -> dict[str, str | None]:
        """id -> note of each confirmed message of a chat the backend no longer holds."""
        return self.held.lost(chat_id, live_only=not self.kind.tombstones_hold)

    def resend(self, chat_id: str, lost: dict[str, str | None]) -> None:
        """Make pending again what a chat lost; list what cannot or must not be sent."""
        if not lost:
            return
        again: list[tuple[str, str]] = []
        with self.store.transaction():
            for mid, note in lost.items():
                local = self.store.get_message(chat_id, mid)
                if local is None:
                    continue  # deleted here meanwhile: nothing to send
                if isinstance(local, Stub) or note == RESENT:
                    why = EVICTED if isinstance(local, Stub) else self.kind.vanished_again
                    self.view.set_states(chat_id, [(mid, "rejected", None, local.content_hash,
                                                    why)])
                    self.emit("rejected", chat_id=chat_id, id=mid, reason=why)
                    continue
                again.append((chat_id, mid))
            self.view.forget(chat_id, [mid for _, mid in again])
        for _, mid in again:
            self.emit("missing_on_backend", chat_id=chat_id, id=mid)
        self.result.resent.extend(again)
