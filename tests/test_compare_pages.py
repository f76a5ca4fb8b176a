"""Reading a backend's chat page by page (chatsave.ops.compare.Comparer): one request ahead
for a remote that reads in the background (a chatsave server over HTTP), strictly one at
a time for the others (the embedded and AutoBot remotes, which may share the caller's
store), the same pages either way, and an error where the page that failed is taken.

The remote here is scripted: what is asserted is when each page is asked for, which a
real server cannot show. tests/test_sync.py and the benchmark's big chat read real
servers through the same code."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import UnavailableError
from chatsave.ops.compare import Comparer
from chatsave.protocol import Capabilities, MessagePage, RemoteMessage
from chatsave.remote.base import Remote
from chatsave.store.store import Store

CAPS = Capabilities(protocol=1, server="scripted", backend_id="b-1", max_batch_messages=100,
                    max_body_bytes=1 << 20, max_page=2, idempotency_retention_s=60)
PAGES = 4


def message(seq: int) -> RemoteMessage:
    return RemoteMessage(chat_id="c", id=f"m{seq}", seq=seq, rev=1, content_hash=f"h{seq}",
                         role="user", content=f"text {seq}",
                         created_at=f"2024-01-02T03:04:{seq:02d}.000Z", type="message")


class Paged(Remote):
    """A chat of PAGES pages of two messages; records every page asked for, and can fail
    one page."""

    url = "scripted://"

    def __init__(self, background: bool, fail_at: int | None = None) -> None:
        self.reads_in_background = background
        self.fail_at = fail_at
        self.asked: list[int | None] = []
        self.asked_for = {n: threading.Event() for n in range(PAGES + 1)}

    def messages(self, chat_id: str, after: int | None = None, limit: int | None = None,
                 include_deleted: bool = False) -> MessagePage:
        number = (after or 0) // 2  # 0 for the first page
        self.asked.append(after)
        self.asked_for[number].set()
        if number == self.fail_at:
            raise UnavailableError(f"page {number} failed")
        seqs = [number * 2 + 1, number * 2 + 2]
        last = number == PAGES - 1
        return MessagePage(chat_id=chat_id, version=1, messages=[message(s) for s in seqs],
                           next=None if last else seqs[-1])

    def capabilities(self) -> Capabilities:
        return CAPS

    def list_chats(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def digests(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def save(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store.db") as opened:
        yield opened


def test_a_remote_reading_in_the_background_is_asked_for_the_next_page_meanwhile(
        store: Store) -> None:
    remote = Paged(background=True)
    comparer = Comparer(store, remote, CAPS)
    seen = []
    for number, page in enumerate(comparer._pages("c")):
        seen.append([m.seq for m in page.messages])
        if number < PAGES - 1:
            # The caller still holds this page, and the next one is already asked for.
            assert remote.asked_for[number + 1].wait(10), remote.asked
    assert seen == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert remote.asked == [None, 2, 4, 6]  # never more than one ahead, never past the end
    assert comparer.requests == PAGES
    assert comparer.fetch("c") == 2 * PAGES
    assert [r[0] for r in comparer.copy.only_there("c")] == [f"m{s}" for s in range(1, 9)]


def test_other_remotes_are_asked_one_page_at_a_time(store: Store) -> None:
    remote = Paged(background=False)
    comparer = Comparer(store, remote, CAPS)
    for number, _page in enumerate(comparer._pages("c")):
        assert remote.asked_for[number].is_set()
        assert not remote.asked_for[number + 1].wait(0.2), remote.asked
    assert remote.asked == [None, 2, 4, 6]
    assert comparer.requests == PAGES


@pytest.mark.parametrize("background", [True, False])
def test_a_page_that_fails_raises_where_it_is_taken(store: Store, background: bool) -> None:
    remote = Paged(background=background, fail_at=2)
    comparer = Comparer(store, remote, CAPS)
    taken = []
    with pytest.raises(UnavailableError, match="page 2 failed"):
        for page in comparer._pages("c"):
            taken.append(page.messages[0].seq)
    assert taken == [1, 3]
    assert remote.asked == [None, 2, 4]
    assert not any(t.name.startswith("chatsave-page") for t in threading.enumerate())


def test_a_caller_that_stops_early_leaves_no_thread(store: Store) -> None:
    remote = Paged(background=True)
    pages = Comparer(store, remote, CAPS)._pages("c")
    assert next(pages).messages[0].seq == 1
    pages.close()  # what a caller's error does to the generator
    for thread in threading.enumerate():
        if thread.name.startswith("chatsave-page"):
            thread.join(10)
            assert not thread.is_alive()
    assert len(remote.asked) <= 2


@pytest.mark.parametrize("created_at, kept", [
    ("2024-01-02T03:04:05.678Z", "2024-01-02T03:04:05.678Z"),   # as chatsave writes it
    ("2024-01-02T04:04:05.678+01:00", "2024-01-02T03:04:05.678Z"),
    ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05.000Z"),
    ("2024-01-02T03:04:05.678901Z", "2024-01-02T03:04:05.678Z"),
    ("2024-02-30T03:04:05.678Z", None),   # the stored form, not a real day
    ("2024-01-02T03:04:05.678", None),    # no zone
    ("yesterday", None),
])
def test_a_backend_time_is_kept_in_the_stored_form(store: Store, created_at: str,
                                                   kept: str | None) -> None:
    """A time already in the form chatsave stores is taken as it is; any other is read
    and written in that form; one that is not a time with a zone leaves the row without a
    time (and without a fingerprint: it takes no part in the search for duplicates)."""
    row = Comparer(store, Paged(False), CAPS)._row(
        "c", message(1).model_copy(update={"created_at": created_at}))
    assert row.created_at == kept
    assert (row.fingerprint is None) is (kept is None)
