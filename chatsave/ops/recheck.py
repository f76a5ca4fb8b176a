"""Before a save to an AutoBot backend: does it still show what it confirmed to this store?

AutoBot rewrites its chat files behind chatsave's back (its Redis session cache writes the
cached copy over a file at its next message), so a message it showed after chatsave's
write can be gone at the next run. A confirmation there is only as good as the next read:
every run reads the chats this store has confirmed messages in, and a confirmed message
that vanished is made pending again, so the same run sends it once more (``resent_lost``).
One that vanishes again after that resend is not sent a third time: it is rejected with
the reason (exit 4), kept here, and ``save --retry-rejected`` sends it once the cause is
dealt with. One whose body gc evicted here cannot be sent: both copies are gone, and it is
listed the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatsave.errors import RemoteError
from chatsave.remote.base import Remote
from chatsave.store.backend import BackendView
from chatsave.store.store import Store, Stub

# The reason kept on a confirmation that followed such a resend: the second time it
# vanishes, it is listed instead of sent again.
RESENT = "sent again after it vanished from the backend"
VANISHED_AGAIN = ("vanished from the backend again after chatsave sent it back once: "
                  "something there writes over what chatsave saves (AutoBot's Redis session "
                  "cache, while AutoBot runs with it: stop AutoBot or flush its "
                  "chat:session:* keys, then save --retry-rejected)")
EVICTED = ("vanished from the backend, and gc had evicted its body here: no copy is left "
           "to send (the id and hash are kept)")


def recheck(store: Store, remote: Remote, view: BackendView, chat_ids: list[str],
            emit: Callable[..., None]) -> list[tuple[str, str]]:
    """Make pending again what vanished; return the (chat, id) pairs sent again."""
    resent: list[tuple[str, str]] = []
    for chat_id in chat_ids:
        confirmed = view.confirmed_reasons(chat_id)
        if not confirmed:
            continue
        try:
            shown = _shown_ids(remote, chat_id)
        except RemoteError:
            continue  # the save of this chat meets the same error and reports it
        gone = [mid for mid in confirmed if mid not in shown]
        if not gone:
            continue
        again: list[tuple[str, str]] = []
        with store.transaction():
            for mid in gone:
                local = store.get_message(chat_id, mid)
                if local is None:
                    continue  # deleted here meanwhile: nothing to send
                if isinstance(local, Stub) or confirmed[mid] == RESENT:
                    why = EVICTED if isinstance(local, Stub) else VANISHED_AGAIN
                    view.set_states(chat_id, [(mid, "rejected", None, local.content_hash,
                                               why)])
                    emit("rejected", chat_id=chat_id, id=mid, reason=why)
                    continue
                again.append((chat_id, mid))
            view.forget(chat_id, [mid for _, mid in again])
        for _, mid in again:
            emit("missing_on_backend", chat_id=chat_id, id=mid)
        resent.extend(again)
    return resent


def mark_resent(store: Store, view: BackendView, resent: list[tuple[str, str]]) -> None:
    """Remember, on the confirmations the resend earned, that they followed a vanishing."""
    if resent:
        with store.transaction():
            view.note_confirmed(resent, RESENT)


def _shown_ids(remote: Remote, chat_id: str) -> set[str]:
    shown: set[str] = set()
    after: Any = None
    while True:
        page = remote.messages(chat_id, after=after)
        shown.update(m.id for m in page.messages if not m.deleted)
        if page.next is None:
            return shown
        after = page.next
