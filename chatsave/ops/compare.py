"""Comparing the local store with a backend: cheap when nothing changed, exact when something did.

Chat digests first (the chat list carries them, page by page; ``POST /digests`` covers
chats the list did not), and messages only for chats whose digests differ, fetched page by
page into a temporary table of the store's connection (never the store itself:
chatsave.store.remote_copy), so memory stays constant however large a chat is. SQL then
puts every message in one category (the symbols diff prints).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from chatsave.duplicates import DEFAULT_WINDOW, DupItem, find_copies
from chatsave.errors import BadAnswerError
from chatsave.model import STORED_TIME, bucket_digests, fingerprint, format_time
from chatsave.protocol import Capabilities, MessagePage, RemoteMessage
from chatsave.remote.base import Remote
from chatsave.store.remote_copy import CopiedMessage, RemoteCopy
from chatsave.store.store import Store

SAME, LOCAL, REMOTE, CONFLICT, TOMBSTONE, DUPLICATE, ERROR = "=", "+", "-", "*", "x", "D", "!"
SYMBOL_NAMES = {SAME: "same", LOCAL: "only_local", REMOTE: "only_backend", CONFLICT: "conflict",
                TOMBSTONE: "tombstone", DUPLICATE: "duplicate", ERROR: "error"}
#: a chat held here is read by buckets from more than this many pages of messages
BUCKETS_FROM = 2
#: at most this many of the 256 buckets are read; with more, the whole chat (about as much)
MAX_BUCKETS = 64


@dataclass(frozen=True)
class RemoteChat:
    version: int
    digest: str | None  # None: the backend does not have this chat
    title: str | None = None


@dataclass
class Row:
    """One message's standing: its symbol and what each side holds."""

    symbol: str
    id: str
    local_hash: str | None = None
    remote_hash: str | None = None
    remote_rev: int | None = None
    remote_deleted: bool = False
    local_deleted: bool = False
    base: str = ""  # the category under a D (a copy is still only-local, in sync, ...)
    copy_of: str | None = None  # a retry copy (a D): the id of the message it copies

    def __post_init__(self) -> None:
        if not self.base:
            self.base = self.symbol


@dataclass
class ChatCompare:
    chat_id: str
    local: bool
    local_digest: str | None
    remote: RemoteChat | None
    fetched: bool = False
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    # The first few message ids under each symbol but "=", to name them in a report.
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def in_agreement(self) -> bool:
        if self.error is not None:
            return False
        differing = sum(n for s, n in self.counts.items() if s not in (SAME,))
        return differing == 0


def _iso_time(value: str | None) -> datetime | None:
    """A backend's created_at, if it is a time with a zone (else the row has no time)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


class Comparer:
    """Compares chats of ``store`` with ``remote`` (one backend)."""

    def __init__(self, store: Store, remote: Remote, caps: Capabilities, *,
                 keep_bodies: bool = False, window: timedelta = DEFAULT_WINDOW,
                 by_buckets: bool = False,
                 also_read: Callable[[str], set[str]] | None = None) -> None:
        self.store = store
        self.remote = remote
        self.caps = caps
        self.keep_bodies = keep_bodies
        # Read a large chat by buckets where the backend can (diff, sync; docs/protocol.md),
        # with ``also_read(chat_id)``'s buckets besides those that differ.
        self.by_buckets = by_buckets
        self.also_read = also_read
        self.window = window
        self.requests = 0
        # The backend's messages of the chats fetched (read by diff, sync, dedupe, gc, fetch).
        self.copy = RemoteCopy(store)
        bind = getattr(remote, "bind_store", None)  # remotes that map ids (AutoBot)
        if bind is not None:
            bind(store)

    # ------------------------------------------------------------ chat level
    def remote_chats(self, chat_ids: list[str] | None) -> dict[str, RemoteChat]:
        """Version and digest of the chosen chats (None: every chat the backend lists)."""
        found: dict[str, RemoteChat] = {}
        if chat_ids is None:
            after: str | None = None
            while True:
                page = self.remote.list_chats(after=after, limit=self.caps.max_page)
                self.requests += 1
                for info in page.chats:
                    found[info.chat_id] = RemoteChat(info.version, info.digest, info.title)
                if page.next is None or not page.chats:
                    return found
                after = page.next
        step = max(1, self.caps.max_page)
        for i in range(0, len(chat_ids), step):
            chunk = chat_ids[i:i + step]
            answer = self.remote.digests(chunk)
            self.requests += 1
            for chat_id in chunk:
                if chat_id not in answer.digests:
                    raise BadAnswerError(f"{self.remote.url}: the digest answer left out chat "
                                         f"{chat_id!r}")
                digest = answer.digests[chat_id]
                found[chat_id] = RemoteChat(answer.versions.get(chat_id) or 0, digest)
        return found

    def local_digests(self, chat_ids: list[str] | None) -> dict[str, str]:
        """Digest of every local chat (or the chosen ones) over its live messages."""
        return self.store.chat_digests(chat_ids)

    # ---------------------------------------------------------- message level
    def fetch(self, chat_id: str) -> int:
        """Load the backend's messages of a chat (tombstones included) into the temp table."""
        self.copy.clear(chat_id)
        total = 0
        for page in self._pages(chat_id):
            rows = [self._row(chat_id, m) for m in page.messages]
            self.copy.add(rows)
            total += len(rows)
        return total

    def fetch_buckets(self, chat_id: str) -> list[str] | None:
        """Load into the temp table only the buckets of a chat that differ from the
        backend's (docs/protocol.md, "Buckets"), and every tombstone; return them. None,
        and nothing loaded: read the whole chat instead. That is so for a chat of a couple
        of pages or less, a backend without buckets, most buckets differing, a chat that
        changed on the backend while it was read, and whenever a search for retry copies
        could find one (a chat holding repeats here, or a message read sharing its
        fingerprint with another): only the whole chat shows those as diff does."""
        # The cheap tests first: most chats that differ are small.
        if ("buckets" not in self.caps.features
                or self.store.message_count(chat_id) <= BUCKETS_FROM * self.caps.max_page
                or self.store.has_repeats(chat_id)):
            return None
        theirs = self.remote.buckets(chat_id)
        if theirs is None:
            return None
        self.requests += 1
        with self.store.errors():
            ours = bucket_digests(self.store.bucket_lines(chat_id))
        differing = {b for b in ours.keys() | theirs.buckets.keys()
                     if ours.get(b) != theirs.buckets.get(b)}
        if not differing:
            return None
        if self.also_read is not None:
            differing |= self.also_read(chat_id)
        differ = sorted(differing)
        if len(differ) > MAX_BUCKETS:
            return None
        self.copy.clear(chat_id)
        after: int | None = None
        while True:
            page = self.remote.bucket_messages(chat_id, differ, after=after,
                                               limit=self.caps.max_page)
            self.requests += 1
            if page.version != theirs.version:  # changed meanwhile: read it whole
                self.copy.clear(chat_id)
                return None
            self.copy.add([self._row(chat_id, m) for m in page.messages])
            if page.next is None or not page.messages:
                break
            after = page.next
        if self.copy.shares_fingerprints(chat_id):
            self.copy.clear(chat_id)
            return None
        return differ

    def _pages(self, chat_id: str) -> Iterator[MessagePage]:
        """The backend's pages of a chat, in order. With a remote that reads in the
        background, the next page is asked for while the caller works on this one (one
        request ahead, never more): the backend's time and ours overlap instead of
        adding up. Its errors surface where the page is taken, as they would without."""
        def page_after(after: int | None) -> MessagePage:
            return self.remote.messages(chat_id, after=after, limit=self.caps.max_page,
                                        include_deleted=True)

        if not self.remote.reads_in_background:
            after: int | None = None
            while True:
                page = page_after(after)
                self.requests += 1
                yield page
                if page.next is None or not page.messages:
                    return
                after = page.next
        ahead = ThreadPoolExecutor(1, thread_name_prefix="chatsave-page")
        pending: Future[MessagePage] | None = ahead.submit(page_after, None)
        try:
            while pending is not None:
                page = pending.result()
                self.requests += 1
                last = page.next is None or not page.messages
                pending = None if last else ahead.submit(page_after, page.next)
                yield page
        finally:
            # Stopped early (an error, the caller done): a request not started is dropped;
            # one under way is not waited for (it ends by its own deadline, unread).
            ahead.shutdown(wait=pending is None or pending.done(), cancel_futures=True)

    def _row(self, chat_id: str, m: RemoteMessage) -> CopiedMessage:
        fprint = created = body = None
        when = None if m.deleted else _iso_time(m.created_at)
        if when is not None and m.role is not None and m.content is not None:
            fprint = fingerprint(m.role, m.type or "message", m.content)
            # A time the backend keeps as chatsave writes times (and that parsed: a real
            # day) is taken as it is; formatting it again was a tenth of a big chat's diff.
            created = (m.created_at if STORED_TIME.fullmatch(m.created_at or "")
                       else format_time(when))
            if self.keep_bodies:
                body = json.dumps(m.model_dump(exclude={"seq", "rev", "content_hash",
                                                        "deleted"}), ensure_ascii=False)
        return CopiedMessage(chat_id, m.id, m.seq, m.rev, m.content_hash, int(m.deleted),
                             fprint, created, body)

    def rows(self, chat_id: str, fetched: bool, buckets: list[str] | None = None
             ) -> Iterator[Row]:
        """Every message of a chat with its symbol (duplicates marked D); ``buckets``: only
        those were read (``fetch_buckets``)."""
        # Read by buckets only where this store holds no repeats (``fetch_buckets``).
        copies = self.duplicates(chat_id, fetched, here=buckets is None)
        if not fetched:
            for mid, chash in self.store.message_keys(chat_id):
                yield Row(DUPLICATE if mid in copies else SAME, mid, chash, chash, base=SAME,
                          copy_of=copies.get(mid))
            return
        # Streamed, not fetched whole: memory does not grow with the chat.
        local = self.copy.standing(chat_id, buckets)
        for mid, lhash, rhash, rev, rdeleted in local:
            if rhash is None:
                symbol = LOCAL
            elif rdeleted:
                symbol = TOMBSTONE
            elif rhash == lhash:
                symbol = SAME
            else:
                symbol = CONFLICT
            shown = DUPLICATE if mid in copies and symbol in (SAME, LOCAL) else symbol
            yield Row(shown, mid, lhash, rhash, rev, bool(rdeleted), base=symbol,
                      copy_of=copies.get(mid) if shown == DUPLICATE else None)
        remote_only = self.copy.only_there(chat_id)
        for mid, rhash, rev, tombstoned in remote_only:
            symbol = TOMBSTONE if tombstoned else REMOTE
            shown = DUPLICATE if mid in copies and symbol == REMOTE else symbol
            yield Row(shown, mid, None, rhash, rev, False, bool(tombstoned), base=symbol,
                      copy_of=copies.get(mid) if shown == DUPLICATE else None)

    def duplicates(self, chat_id: str, fetched: bool, *, here: bool = True
                   ) -> dict[str, str]:
        """Retry copies on either side (the definition dedupe removes): copy id -> the id
        of the message it copies. ``here=False``: this store's side is known to hold no
        repeated fingerprint, so none is looked for there."""
        copies: dict[str, str] = {}
        if here and self.store.has_repeats(chat_id):
            with self.store.errors():
                cur = self.store.fingerprints(chat_id)
                items = (DupItem(i, f, datetime.fromisoformat(c), o) for i, f, c, o in cur)
                copies.update(find_copies(items, self.window))
        if fetched:
            with self.store.errors():
                # Rows without a usable body (a backend answering nonsense) have no
                # fingerprint and take no part.
                if self.copy.has_repeats(chat_id):
                    cur = self.copy.fingerprints(chat_id)
                    items = (DupItem(i, f, datetime.fromisoformat(c), o) for i, f, c, o in cur)
                    copies.update(find_copies(items, self.window))
        return copies

    def compare(self, chat_id: str, local_digest: str | None,
                remote: RemoteChat | None) -> tuple[ChatCompare, Iterator[Row]]:
        """The chat's standing, and its rows (fetching the backend's messages if needed)."""
        state = ChatCompare(chat_id, local_digest is not None, local_digest, remote)
        has_remote = remote is not None and remote.digest is not None
        if has_remote and local_digest is not None and remote.digest == local_digest:  # type: ignore[union-attr]
            return state, self.rows(chat_id, fetched=False)
        if has_remote:
            read = self.fetch_buckets(chat_id) if self.by_buckets else None
            if read is None:
                self.fetch(chat_id)
            state.fetched = True
            return state, self.rows(chat_id, fetched=True, buckets=read)
        # Only local: every message is +, no request needed.
        self.copy.clear(chat_id)
        state.fetched = True
        return state, self.rows(chat_id, fetched=True)

    def remote_body(self, chat_id: str, message_id: str) -> dict[str, Any] | None:
        """A fetched message's wire body (kept only with keep_bodies)."""
        body = self.copy.body(chat_id, message_id)
        return None if body is None else dict(json.loads(body))
