"""The AutoBot remotes read the local store only to match the backend's messages with their
local copies (the identity rule). A store that cannot be read does not fail the read of the
backend, but says so; any other error there is a bug and is raised, never swallowed."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsave.model import Message
from chatsave.remote.autobot.directory import AutobotDirRemote
from chatsave.store.store import Store
from tests.conftest import DATA

LEGACY = "5a1e0c2d-7b3f-4e8a-9c1d-2e3f4a5b6c7d"


@pytest.fixture
def chats(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "autobot", tmp_path / "chats"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store.db")
    yield s
    s.close()


def listed(remote: AutobotDirRemote) -> list[tuple[str, str | None, str]]:
    return [(m.id, m.content, m.content_hash) for m in remote.messages(LEGACY).messages]


def test_a_store_that_cannot_be_read_is_named_and_the_backend_still_read(
        chats: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    without_store = listed(AutobotDirRemote(chats, cache_off=True))
    assert without_store
    closed = Store.open(tmp_path / "closed.db")
    remote = AutobotDirRemote(chats, cache_off=True)
    remote.bind_store(closed)
    closed.close()  # every read of it now fails in sqlite3, as StoreError
    with caplog.at_level(logging.WARNING, logger="chatsave.remote"):
        assert listed(remote) == without_store
    [record] = [r for r in caplog.records if r.name == "chatsave.remote"]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert LEGACY in text and "local store" in text and str(tmp_path / "closed.db") in text


def test_a_damaged_row_in_the_store_is_named_and_the_backend_still_read(
        chats: Path, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    remote = AutobotDirRemote(chats, cache_off=True)
    remote.bind_store(store)
    first = remote.messages(LEGACY).messages[0]
    with store.transaction():
        store.upsert_chat(LEGACY, None)
        store.add_messages(LEGACY, [Message(**first.model_dump(include={
            "chat_id", "id", "role", "content", "created_at", "type", "metadata",
            "attachments"}))])
    store.conn.execute("UPDATE messages SET metadata = '{not json' WHERE chat_id = ?",
                       (LEGACY,))
    with caplog.at_level(logging.WARNING, logger="chatsave.remote"):
        assert listed(remote) == listed(AutobotDirRemote(chats, cache_off=True))
    [record] = [r for r in caplog.records if r.name == "chatsave.remote"]
    assert "cannot be read" in record.getMessage() and first.id in record.getMessage()


class BrokenStore:
    """A store with a bug in it: not a StoreError, so not an expected failure."""

    def mappings(self) -> list[Any]:
        return []

    def has_chat(self, chat_id: str) -> bool:
        raise RuntimeError("a bug in the store")


def test_an_unexpected_error_is_not_swallowed(chats: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    remote = AutobotDirRemote(chats, cache_off=True)
    remote.bind_store(BrokenStore())
    with pytest.raises(RuntimeError, match="a bug in the store"):
        remote.messages(LEGACY)
    with pytest.raises(RuntimeError, match="a bug in the store"):
        remote.held_only(LEGACY)
