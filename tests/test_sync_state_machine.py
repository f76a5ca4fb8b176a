"""Stateful property test of sync: several local stores, one real server over HTTP, faults.

A hypothesis ``RuleBasedStateMachine`` drives two or three local stores (each its own
SQLite file) against ONE chatsave server (the real app under uvicorn on 127.0.0.1, in a
thread of this process, so its fault hook is scripted per rule). Rules: add messages
(``Store.add_messages`` in a transaction, or a JSONL import), create a conflicting version
of a message (same id, other content), delete messages or whole chats, save, sync (both
ways, push only, pull only; every chat or a few named ones), sync under a fault (lost
acknowledgements, a batch committed in part, resets, a backend outage on everything, on
reads or on writes, a KeyboardInterrupt from a progress callback partway through), and
resolve conflicts with ``prefer``.

After every step: no store claims a revision the server never had (``confirmed`` at rev
R with hash H means the server holds H at R, or has moved past R), no duplicate ids, no
message the server (or a store) deleted comes back unless a ``prefer`` run put it there,
nothing a store ever held vanishes except into its trash, and every store passes
``PRAGMA integrity_check``. At the end, after a fault-free sync of every store in
round-robin until nothing changes (conflicts still left are resolved with ``prefer`` by
the first store that has them, then taken from the backend by the others): every store
and the server hold the same live messages, and the model says which: nothing accepted
lost, nothing deleted resurrected, a contested id holds the version its resolver chose.

One server per test function; each example gets a fresh server storage (a fresh
backend id) behind it, and fresh stores. Sizes scale with HYPOTHESIS_PROFILE ("ci" by
default; "dev" runs longer).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from chatsave.errors import ChatsaveError, ExitCode
from chatsave.formats import Source
from chatsave.model import Message
from chatsave.ops.delete import delete, plan_delete
from chatsave.ops.importing import ImportOptions, import_source
from chatsave.ops.result import RunResult
from chatsave.ops.save import SaveOptions, save
from chatsave.ops.sync import SyncOptions, sync
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.server.app import create_app
from chatsave.server.faults import Fault, Faults
from chatsave.server.service import ServerSettings
from chatsave.server.storage.sqlite import SqliteStorage
from chatsave.server.tokens import LOCAL_USER
from chatsave.store.backend import BackendView
from chatsave.store.store import Store
from tests.server_fixtures import LiveServer

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
CHATS = ("c0", "c1", "c2")
MIDS = tuple(f"m{i}" for i in range(6))
WRITES = r"/(save|delete)$"
READS = r"/(chats|digests|messages)$"
# Small batches: a sync sends several requests, so faults and interruptions land between
# batches of one chat too.
SETTINGS = ServerSettings(max_batch_messages=2, rate_per_s=0, housekeeping_interval_s=0)

Key = tuple[str, str]  # (chat id, message id)
ServerRow = tuple[int, str, bool]  # (rev, content hash, deleted)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# About 75 s on 2 cores by default ("ci"); "dev" runs about ten times as long.
if PROFILE == "dev":
    EXAMPLES, STEPS, TIMEOUT = 1000, 60, 3600
else:
    EXAMPLES, STEPS, TIMEOUT = 300, 40, 600


# ------------------------------------------------------------------------------ helpers
def message(chat_id: str, mid: str, version: int = 0) -> Message:
    """The message ``mid`` of ``chat_id``: its content follows from the id (and version)."""
    n = int(mid[1:])
    text = f"{chat_id}/{mid}" + (f" version {version}" if version else "")
    return Message(chat_id=chat_id, id=mid, role="user" if n % 2 else "assistant",
                   content=text, created_at=T0 + timedelta(minutes=n))


def live(store: Store, chat_id: str | None = None) -> dict[Key, str]:
    """(chat, id) -> content hash of the store's live messages."""
    sql = "SELECT chat_id, id, content_hash FROM messages"
    args: tuple[str, ...] = ()
    if chat_id is not None:
        sql += " WHERE chat_id = ?"
        args = (chat_id,)
    return {(c, i): h for c, i, h in store.conn.execute(sql, args)}


def tombstones(store: Store) -> dict[Key, str]:
    return {(c, i): h for c, i, h in
            store.conn.execute("SELECT chat_id, id, content_hash FROM tombstones")}


def trashed(store: Store) -> set[tuple[str, str, str]]:
    return {(c, i, h) for c, i, h in
            store.conn.execute("SELECT chat_id, id, content_hash FROM trash")}


def server_chats(service: Any) -> list[str]:
    out: list[str] = []
    after = None
    while True:
        status, answer, _ = service.list_chats(LOCAL_USER, after, None)
        assert status == 200, answer
        out += [c["chat_id"] for c in answer["chats"]]
        if answer["next"] is None:
            return out
        after = answer["next"]


def server_rows(service: Any) -> dict[Key, ServerRow]:
    """Every message the server holds, tombstones included (read in-process, no faults)."""
    rows: dict[Key, ServerRow] = {}
    for chat_id in server_chats(service):
        after = None
        while True:
            status, answer, _ = service.messages(LOCAL_USER, chat_id, after, None, True)
            assert status == 200, answer
            for m in answer["messages"]:
                key = (chat_id, m["id"])
                assert key not in rows, f"the server lists {key} twice"
                rows[key] = (int(m["rev"]), m["content_hash"], bool(m.get("deleted")))
            if answer["next"] is None:
                break
            after = answer["next"]
    return rows


def server_live(rows: dict[Key, ServerRow], chat_id: str | None = None) -> dict[Key, str]:
    return {k: h for k, (_, h, d) in rows.items()
            if not d and (chat_id is None or k[0] == chat_id)}


# One TLS context for every remote (they speak plain http here): building one per remote
# (loading the CA bundle) costs more than a whole sync on 127.0.0.1.
_TLS = ssl.create_default_context()


def open_remote(url: str) -> HttpRemote:
    return HttpRemote(url, policy=FAST, request_timeout=5,
                      transport=httpx.HTTPTransport(verify=_TLS))


def run_op(url: str, op: Callable[[HttpRemote], RunResult]) -> tuple[int, RunResult | None]:
    """Run one operation over a fresh HttpRemote; its exit code (raised errors included)."""
    remote = open_remote(url)
    try:
        result = op(remote)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED), None
    except ChatsaveError as exc:
        return int(exc.exit_code), None
    finally:
        remote.close()
    return int(result.exit_code), result


def run_sync(url: str, store: Store, chats: list[str] | None = None, *, mode: str = "both",
             prefer: str | None = None, emit: Any = None,
             progress: Any = None) -> tuple[int, RunResult | None]:
    options = SyncOptions(push=mode != "pull", pull=mode != "push", prefer=prefer,
                          concurrency=1)
    extra: dict[str, Any] = {}
    if emit is not None:
        extra["emit"] = emit
    if progress is not None:
        extra["progress"] = progress
    return run_op(url, lambda remote: sync(store, remote, chats, options, **extra))


class Interrupter:
    """emit/progress callbacks that raise KeyboardInterrupt on their ``at``-th call."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.fired = False

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            raise KeyboardInterrupt

    def emit(self, type_: str, **fields: Any) -> None:
        self.tick()

    def progress(self, n: int) -> None:
        self.tick()


class Switch:
    """An ASGI app that forwards to ``current``: one uvicorn, a fresh app per example."""

    def __init__(self) -> None:
        self.current: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.current(scope, receive, send)


# ------------------------------------------------------------------------ the machine
STORE = st.integers(min_value=0, max_value=2)
CHAT = st.sampled_from(CHATS)
MID = st.sampled_from(MIDS)
MODE = st.sampled_from(["both", "both", "push", "pull"])
SCOPE = st.one_of(st.none(), st.lists(CHAT, min_size=1, max_size=2, unique=True))
FAULT = st.sampled_from(["lost_ack_once", "lost_ack_all", "partial", "partial_reset",
                         "outage_all", "outage_writes", "outage_reads", "resets", "interrupt"])


class SyncMachine(RuleBasedStateMachine):
    # Set by the test function: the live server, its switch and a scratch directory.
    server: LiveServer
    switch: Switch
    scratch: Path

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(dir=self.scratch))
        self.faults = Faults()
        self.storage = SqliteStorage(self.dir / "server.db")
        self.app = create_app(self.storage, settings=SETTINGS, faults=self.faults)
        self.switch.current = self.app
        self.service = self.app.state.service
        self.url = self.server.url
        self.stores: list[Store] = []
        # The model.
        self.versions: dict[Key, dict[str, int]] = {}  # hash -> version, per id
        self.deleted: set[Key] = set()  # deleted in some store at some point
        self.held: list[dict[Key, set[str]]] = []  # per store: every version it held
        self.store_tombs: list[set[Key]] = []  # per store: ids it has seen deleted
        self.server_tombs: set[Key] = set()  # ids the server has shown as tombstones
        self.history: dict[tuple[str, str, int], tuple[str, bool]] = {}  # server revs seen
        self.overwritten: set[Key] = set()  # ids a prefer="local" run may have written
        self.final_prefer = "local"
        self.busy = False  # a rule or invariant is running (teardown: it failed)

    @property
    def n(self) -> int:
        return len(self.stores)

    # ----------------------------------------------------------------- setup
    @initialize(count=st.integers(min_value=2, max_value=3),
                final_prefer=st.sampled_from(["local", "backend"]))
    def open_stores(self, count: int, final_prefer: str) -> None:
        for i in range(count):
            self.stores.append(Store.open(self.dir / f"store-{i}.db"))
            self.held.append({})
            self.store_tombs.append(set())
        self.final_prefer = final_prefer

    def teardown(self) -> None:
        try:
            if not self.busy and self.stores:
                self.final_check()
        finally:
            self.faults.clear()
            for store in self.stores:
                store.close()
            self.storage.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ----------------------------------------------------------------- model
    def _accept(self, s: int, msg: Message) -> None:
        known = self.versions.setdefault((msg.chat_id, msg.id), {})
        version = int(msg.content.rsplit(" version ", 1)[1]) if " version " in msg.content \
            else 0
        known.setdefault(msg.content_hash, version)
        self.held[s].setdefault((msg.chat_id, msg.id), set()).add(msg.content_hash)

    def contested(self, key: Key) -> bool:
        return len(self.versions.get(key, {})) > 1

    def _expected_outcome(self, store: Store, msg: Message) -> str:
        key = (msg.chat_id, msg.id)
        if key in tombstones(store):
            return "deleted"
        here = live(store, msg.chat_id).get(key)
        if here is None:
            return "added"
        return "unchanged" if here == msg.content_hash else "conflict"

    # ----------------------------------------------------------------- rules
    @rule(s=STORE, chat=CHAT, mids=st.sets(MID, min_size=1, max_size=4),
          via=st.sampled_from(["transaction", "jsonl", "jsonl-strict"]))
    def add_messages(self, s: int, chat: str, mids: set[str], via: str) -> None:
        """New local messages (their content follows from the id): accepted, or refused."""
        self.busy = True
        s %= self.n
        store = self.stores[s]
        msgs = [message(chat, mid) for mid in sorted(mids)]
        expected = {m.id: self._expected_outcome(store, m) for m in msgs}
        before = live(store)
        if via == "transaction":
            with store.transaction():
                store.upsert_chat(chat, None)
                outcomes = store.add_messages(chat, msgs)
            assert [o for o, _ in outcomes] == [expected[m.id] for m in msgs]
        else:
            path = self.dir / "import.jsonl"
            path.write_text("".join(json.dumps(m.to_wire()) + "\n" for m in msgs),
                            encoding="utf-8")
            source = Source.open(str(path))
            strict = via == "jsonl-strict"
            try:
                result = import_source(store, source, ImportOptions(
                    format="jsonl", on_invalid="fail" if strict else "skip"))
            finally:
                source.close()
            refused = sum(1 for o in expected.values() if o == "conflict")
            if strict and refused:
                assert result.exit_code == ExitCode.USAGE
                assert live(store) == before, "a refused import changed the store"
                return self._done()
            assert result.counters["written"] == sum(o == "added" for o in expected.values())
            assert result.counters["skipped_deleted"] == sum(
                o == "deleted" for o in expected.values())
            assert result.exit_code == (ExitCode.DIFFERENCES if refused else ExitCode.OK)
        after = live(store)
        for m in msgs:
            key = (chat, m.id)
            if expected[m.id] in ("added", "unchanged"):
                assert after[key] == m.content_hash
                self._accept(s, m)
            elif expected[m.id] == "deleted":
                assert key not in after, f"{key} came back: deleted here earlier"
            else:
                assert after[key] == before[key]
        self._done()

    @rule(s=STORE, chat=CHAT, mid=MID)
    def add_conflicting_version(self, s: int, chat: str, mid: str) -> None:
        """Same id, other content, in a store that does not hold the id (a conflict)."""
        self.busy = True
        s %= self.n
        store = self.stores[s]
        key = (chat, mid)
        if key in live(store) or key in tombstones(store):
            return self._done()
        version = max(self.versions.get(key, {}).values(), default=0) + 1
        msg = message(chat, mid, version)
        with store.transaction():
            store.upsert_chat(chat, None)
            assert store.add_messages(chat, [msg]) == [("added", None)]
        self._accept(s, msg)
        self._done()

    @rule(s=STORE, chat=CHAT, mids=st.one_of(st.none(), st.sets(MID, min_size=1, max_size=3)))
    def delete_messages(self, s: int, chat: str, mids: set[str] | None) -> None:
        """Delete some messages of a chat here, or the whole chat (mids None)."""
        self.busy = True
        s %= self.n
        store = self.stores[s]
        if not store.has_chat(chat):
            return self._done()
        present = {k[1] for k in live(store, chat)}
        wanted = None if mids is None else sorted(mids & present)
        if wanted == []:
            return self._done()
        ids = plan_delete(store, chat, wanted)
        assert set(ids) == (present if wanted is None else set(wanted))
        result = delete(store, chat, ids)
        assert result.exit_code == ExitCode.OK
        assert result.counters["deleted"] == len(ids)
        gone = live(store, chat)
        for mid in ids:
            assert (chat, mid) not in gone
            self.deleted.add((chat, mid))
            self.store_tombs[s].add((chat, mid))
        self._done()

    @rule(s=STORE, scope=SCOPE)
    def save_pending(self, s: int, scope: list[str] | None) -> None:
        self.busy = True
        s %= self.n
        store = self.stores[s]
        chats = None if scope is None else [c for c in scope if store.has_chat(c)]
        if chats == []:
            return self._done()
        code, _ = run_op(self.url, lambda r: save(store, r, chats, SaveOptions(concurrency=1)))
        assert code in (ExitCode.OK, ExitCode.CONFLICTS), code
        if code == ExitCode.OK:
            self._check_honest(s, chats, "save")
        self._done()

    @rule(s=STORE, mode=MODE, scope=SCOPE)
    def sync_plain(self, s: int, mode: str, scope: list[str] | None) -> None:
        self.busy = True
        s %= self.n
        code, _ = run_sync(self.url, self.stores[s], scope, mode=mode)
        allowed = {ExitCode.OK, ExitCode.CONFLICTS}
        if mode == "pull":
            allowed.add(ExitCode.PARTIAL)  # what is only here waits for a push
        assert code in allowed, (code, mode)
        if code == ExitCode.OK:
            self._check_honest(s, scope, mode)
        self._done()

    @rule(s=STORE, mode=MODE, scope=SCOPE, fault=FAULT, count=st.integers(1, 6))
    def sync_with_fault(self, s: int, mode: str, scope: list[str] | None, fault: str,
                        count: int) -> None:
        """A sync that a fault interrupts, or that must survive one."""
        self.busy = True
        s %= self.n
        store = self.stores[s]
        before = (live(store), self._remote_state(s))
        interrupter = None
        if fault == "lost_ack_once":  # retried under the same key: replayed
            self.faults.script(Fault.lost_ack(), path=WRITES)
        elif fault == "lost_ack_all":  # committed, never acknowledged, attempts exhausted
            self.faults.script(*[Fault.lost_ack()] * 3, path=WRITES)
        elif fault == "partial":  # part of a batch committed outside the key, then 500
            self.faults.script(Fault.partial(count - 1), path=WRITES)
        elif fault == "partial_reset":
            self.faults.script(*[Fault.partial(count - 1, then="reset")] * 3, path=WRITES)
        elif fault == "outage_all":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100)
        elif fault == "outage_writes":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
        elif fault == "outage_reads":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=READS)
        elif fault == "resets":
            self.faults.script(*[Fault.reset()] * count)
        else:
            interrupter = Interrupter(count % 3 + 1)
        try:
            if interrupter is not None:
                code, _ = run_sync(self.url, store, scope, mode=mode, emit=interrupter.emit,
                                   progress=interrupter.progress)
            else:
                code, _ = run_sync(self.url, store, scope, mode=mode)
        finally:
            self.faults.clear()
        allowed = {ExitCode.OK, ExitCode.CONFLICTS, ExitCode.PARTIAL, ExitCode.UNAVAILABLE}
        if fault in ("outage_all", "outage_reads"):
            allowed = {ExitCode.UNAVAILABLE}
        elif fault == "interrupt":
            allowed = {ExitCode.OK, ExitCode.CONFLICTS, ExitCode.PARTIAL,
                       ExitCode.INTERRUPTED} if interrupter and interrupter.fired else \
                {ExitCode.OK, ExitCode.CONFLICTS, ExitCode.PARTIAL}
            if interrupter and interrupter.fired:
                assert code == ExitCode.INTERRUPTED
        elif fault in ("lost_ack_once", "partial") or (fault == "resets" and count < 3):
            # Recovered by the retries: as if nothing happened.
            allowed = {ExitCode.OK, ExitCode.CONFLICTS}
            if mode == "pull":
                allowed.add(ExitCode.PARTIAL)
        assert code in allowed, (code, fault, count, mode)
        if fault == "outage_all":
            assert (live(store), self._remote_state(s)) == before, \
                "a run that could not reach the backend changed the store"
        if code == ExitCode.OK:
            self._check_honest(s, scope, mode)
        self._done()

    @rule(s=STORE, chat=CHAT, prefer=st.sampled_from(["local", "backend"]))
    def resolve(self, s: int, chat: str, prefer: str) -> None:
        """sync CHAT --prefer local|backend: this store's or the backend's version wins."""
        self.busy = True
        s %= self.n
        self._resolve(s, chat, prefer)
        self._done()

    def _resolve(self, s: int, chat: str, prefer: str) -> int:
        store = self.stores[s]
        rows = server_rows(self.service)
        here = live(store, chat)
        states = self._remote_state(s)
        contested = {k: h for k, h in here.items()
                     if k in rows and not rows[k][2] and rows[k][1] != h}
        # Deleted here, another version live on the backend.
        undead = {k for k, h in tombstones(store).items()
                  if k[0] == chat and k in rows and not rows[k][2] and rows[k][1] != h}
        if prefer == "local":
            self.overwritten |= set(contested)
        code, _ = run_sync(self.url, store, [chat], prefer=prefer)
        assert code in (ExitCode.OK, ExitCode.CONFLICTS), code
        after_rows = server_rows(self.service)
        after = live(store, chat)
        for key in undead:
            if prefer == "local":
                assert after_rows[key][2], (key, "--prefer local did not delete it there")
                assert key not in after
            else:
                assert after.get(key) == rows[key][1], (key, "the backend's version")
        for key, mine in contested.items():
            theirs = rows[key][1]
            st_ = states.get(key)
            newer_there = (st_ is not None and st_[0] == "confirmed" and st_[2] == mine
                           and rows[key][0] > int(st_[1] or 0))
            if newer_there or prefer == "backend":
                assert after.get(key) == theirs, (key, prefer, "the backend's version")
            else:
                assert after_rows[key][1] == mine and not after_rows[key][2], \
                    (key, "--prefer local did not write this store's version")
                assert after.get(key) == mine
        if code == ExitCode.OK:
            self._check_honest(s, [chat], "both")
        return code

    def _done(self) -> None:
        self.busy = False

    # -------------------------------------------------------------- checks
    def _remote_state(self, s: int) -> dict[Key, tuple[str, int | None, str | None]]:
        rows = self.stores[s].conn.execute(
            "SELECT r.chat_id, r.id, r.state, r.rev, r.content_hash FROM remote_state r"
            " JOIN backends b ON b.backend_id = r.backend_id")
        return {(c, i): (state, rev, h) for c, i, state, rev, h in rows}

    def _check_honest(self, s: int, scope: list[str] | None, mode: str) -> None:
        """Exit 0: everything asked about is confirmed (and, both ways, in agreement)."""
        store = self.stores[s]
        rows = server_rows(self.service)
        chats = sorted(set(store.chat_ids()) | {c for c, _ in rows}) if scope is None \
            else scope
        states = self._remote_state(s)
        for chat in chats:
            for key, chash in live(store, chat).items():
                if mode != "pull":
                    assert states.get(key, ("",))[0] == "confirmed" and \
                        states[key][2] == chash, (key, "exit 0 with a message not confirmed",
                                                  states.get(key))
            view = BackendView(store, self._backend_id(store))
            if mode != "pull":
                assert not view.pending_deletes(chat), (chat, "exit 0, deletions not sent")
            for key, tomb in tombstones(store).items():
                if key[0] != chat or key not in rows or rows[key][2]:
                    continue
                if mode in ("push", "both"):  # save reads nothing: it sends what it knows
                    raise AssertionError(f"exit 0, but {key} deleted here is live on the "
                                         f"backend ({rows[key][1][:12]} vs {tomb[:12]})")
            if mode == "both":
                assert live(store, chat) == server_live(rows, chat), \
                    (chat, "exit 0 but not in agreement")
        if mode != "pull":
            # An unanswered batch is pending work unless all it carries is confirmed anyway
            # (equal digests vouch for messages whose acknowledgement was lost).
            view = BackendView(store, self._backend_id(store))
            for ref in view.open_batches(set(chats)):
                batch = view.load(ref)
                for mid, chash in batch.items:
                    known = states.get((batch.chat_id, mid))
                    done = known is not None and (
                        known[0] == "deleted" if batch.kind == "delete"
                        else known[0] == "confirmed" and known[2] == chash)
                    assert done, f"exit 0 with an unanswered {batch.kind} of {mid}"

    @invariant()
    def consistent(self) -> None:
        """After every step: no overclaim, no duplicates, no resurrection, nothing vanished."""
        if not self.stores:
            return
        self.busy = True
        rows = server_rows(self.service)
        for (chat, mid), (rev, chash, deleted) in rows.items():
            seen = self.history.setdefault((chat, mid, rev), (chash, deleted))
            assert seen == (chash, deleted), \
                f"the server changed {chat}/{mid} at rev {rev} without a new revision"
            key = (chat, mid)
            if deleted:
                self.server_tombs.add(key)
            elif key in self.server_tombs and key not in self.overwritten:
                raise AssertionError(f"{key} was deleted on the server and came back")
            if not deleted:
                assert chash in self.versions.get(key, {}), \
                    f"the server holds {key} with content no store ever had"
        for s, store in enumerate(self.stores):
            assert store.integrity_check() == "ok"
            here = live(store)
            tombs = tombstones(store)
            assert not set(here) & set(tombs), \
                f"store {s}: live and deleted at once: {set(here) & set(tombs)}"
            dupes = store.conn.execute(
                "SELECT chat_id, id FROM messages GROUP BY chat_id, id HAVING COUNT(*) > 1"
            ).fetchall()
            assert not dupes, f"store {s}: duplicate ids {dupes}"
            for key in tombs:
                self.store_tombs[s].add(key)
            for key in here:
                if key in self.store_tombs[s] and key not in self.overwritten \
                        and not self.contested(key):
                    raise AssertionError(f"store {s}: {key} was deleted here and came back")
            # Nothing this store ever held vanishes except into its trash.
            for key, chash in here.items():
                self.held[s].setdefault(key, set()).add(chash)
                assert chash in self.versions.get(key, {}), \
                    f"store {s} holds {key} with content no one ever wrote"
            in_trash = trashed(store)
            for key, hashes in self.held[s].items():
                for chash in hashes:
                    assert here.get(key) == chash or (*key, chash) in in_trash, \
                        f"store {s} lost {key} ({chash[:12]}): neither live nor in its trash"
            # No overclaim: confirmed at rev R with hash H means the server held H at R.
            for key, (claim, rev_, hash_) in self._remote_state(s).items():
                if claim not in ("confirmed", "deleted"):
                    continue
                if rev_ is None:
                    # Confirmed by equal digests, or deleted as missing there: the server
                    # held that version at some revision (or never had the id at all).
                    if claim == "confirmed":
                        assert any(k[:2] == key and v == (hash_, False)
                                   for k, v in self.history.items()), \
                            f"store {s}: {key} confirmed as {str(hash_)[:12]}, never on the server"
                    continue
                assert key in rows, f"store {s}: {key} {claim} but unknown to the server"
                srev = rows[key][0]
                assert srev >= rev_, \
                    f"store {s}: {key} {claim} at rev {rev_}, the server is at {srev}"
                was = self.history.get((key[0], key[1], rev_))
                if claim == "confirmed":
                    assert was is None or (was == (hash_, False)), \
                        f"store {s}: {key} confirmed at rev {rev_} with {str(hash_)[:12]}, the " \
                        f"server had {was}"
                else:
                    assert was is None or was[1], \
                        f"store {s}: {key} deleted at rev {rev_}, the server had {was}"
        self.busy = False

    # --------------------------------------------------------------- the end
    def _snapshot(self) -> Any:
        return (tuple(sorted(server_rows(self.service).items())),
                tuple(tuple(sorted(live(s).items())) for s in self.stores),
                tuple(tuple(sorted(tombstones(s).items())) for s in self.stores))

    def _quiesce(self) -> list[int]:
        """Fault-free syncs of every store, round-robin, until a round changes nothing."""
        codes: list[int] = []
        previous = self._snapshot()
        for _round in range(8):
            codes = []
            for s in range(self.n):
                for _twice in range(2):
                    code, _ = run_sync(self.url, self.stores[s])
                    assert code in (ExitCode.OK, ExitCode.CONFLICTS), (s, code)
                codes.append(code)
            current = self._snapshot()
            if current == previous:
                return codes
            previous = current
        raise AssertionError("sync did not converge in 8 fault-free rounds")

    def final_check(self) -> None:
        self.faults.clear()
        codes = self._quiesce()
        winners: dict[Key, str | None] = {}
        if any(code == ExitCode.CONFLICTS for code in codes):
            # Resolve what is left: the first store with a conflict in a chat chooses,
            # the others take the backend's (now the chosen) version.
            for chat in CHATS:
                resolved = False
                for s in range(self.n):
                    rows = server_rows(self.service)
                    if not self._differs(s, chat, rows):
                        continue
                    prefer = "backend" if resolved else self.final_prefer
                    before = {k for k in live(self.stores[s], chat)} | \
                        {k for k in tombstones(self.stores[s]) if k[0] == chat}
                    self._resolve(s, chat, prefer)
                    if not resolved:
                        after = server_rows(self.service)
                        for key in before:
                            if key in after:
                                winners[key] = None if after[key][2] else after[key][1]
                    resolved = True
            codes = self._quiesce()
        assert all(code == ExitCode.OK for code in codes), codes
        rows = server_rows(self.service)
        final = server_live(rows)
        for s, store in enumerate(self.stores):
            assert live(store) == final, f"store {s} does not hold what the server holds"
            counts = BackendView(store, self._backend_id(store)).chat_counts()
            for chat, c in counts.items():
                assert c["pending_push"] == 0 and c["conflicts"] == 0, (s, chat, c)
        for key, versions in self.versions.items():
            if not self.contested(key):
                (chash,) = versions
                if key in self.deleted:
                    assert key not in final, f"{key} was deleted, and came back"
                else:
                    assert final.get(key) == chash, f"{key} was accepted, and is lost"
                continue
            if key in winners:
                assert final.get(key) == winners[key], \
                    f"{key}: the resolution chose {winners[key]}, the end holds {final.get(key)}"
            if key in final:
                assert final[key] in versions
            else:
                assert key in self.deleted, f"{key} (in conflict, never deleted) is lost"
        assert set(final) <= set(self.versions), "the server holds messages no one wrote"

    def _differs(self, s: int, chat: str, rows: dict[Key, ServerRow]) -> bool:
        store = self.stores[s]
        if live(store, chat) != server_live(rows, chat):
            return True
        return any(k[0] == chat and k in rows and not rows[k][2]
                   for k in tombstones(store))

    @staticmethod
    def _backend_id(store: Store) -> str:
        return str(store.conn.execute("SELECT backend_id FROM backends").fetchone()[0])


@pytest.fixture
def switched_server(start_server: Callable[[Any], LiveServer]
                    ) -> Iterator[tuple[LiveServer, Switch]]:
    switch = Switch()
    server = start_server(switch)
    yield server, switch


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where examples keep their stores: in memory when possible (fsyncs cost the most)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="chatsave-sm-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.timeout(TIMEOUT)
def test_sync_state_machine(switched_server: tuple[LiveServer, Switch], scratch: Path) -> None:
    server, switch = switched_server
    SyncMachine.server = server
    SyncMachine.switch = switch
    SyncMachine.scratch = scratch
    run_state_machine_as_test(SyncMachine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


# ------------------------------------------------------- regressions found by the machine
@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    a, b = Store.open(tmp_path / "a.db"), Store.open(tmp_path / "b.db")
    yield a, b
    a.close()
    b.close()


def put(store: Store, *messages: Message) -> None:
    with store.transaction():
        for m in messages:
            store.upsert_chat(m.chat_id, None)
            assert store.add_messages(m.chat_id, [m]) == [("added", None)]


def conflict_rows(store: Store) -> list[tuple[str, str]]:
    return store.conn.execute(
        "SELECT chat_id, id FROM remote_state WHERE state = 'conflict'").fetchall()


def deleted_here_changed_there(a: Store, b: Store, url: str) -> None:
    """b saves version 1 of c0/m0; a holds version 0 (a conflict), then deletes it."""
    put(b, message("c0", "m0", 1))
    assert run_sync(url, b)[0] == ExitCode.OK
    put(a, message("c0", "m0"), message("c0", "m1"))
    assert run_sync(url, a)[0] == ExitCode.CONFLICTS
    delete(a, "c0", ["m0"])


def test_deleted_here_changed_there_is_a_conflict_not_done(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a store that deleted its version of a message the backend holds
    in another version reported exit 0 (sync and save), though the conflict was left."""
    a, b = two_stores
    deleted_here_changed_there(a, b, live_server.url)
    code, result = run_sync(live_server.url, a)
    assert code == ExitCode.CONFLICTS
    assert result is not None and result.counters["conflicts"] == 1
    code, _ = run_op(live_server.url, lambda r: save(a, r, None, SaveOptions()))
    assert code == ExitCode.CONFLICTS
    rows = server_rows(live_server.service)
    assert rows[("c0", "m0")][1:] == (message("c0", "m0", 1).content_hash, False)


@pytest.mark.parametrize("prefer", ["local", "backend"])
def test_prefer_resolves_deleted_here_changed_there(
        two_stores: tuple[Store, Store], live_server: LiveServer, prefer: str) -> None:
    """Found by the machine: --prefer left "deleted here, changed on the backend" alone, so
    such a conflict could never be resolved and the stores never converged."""
    a, b = two_stores
    url = live_server.url
    deleted_here_changed_there(a, b, url)
    assert run_sync(url, a, ["c0"], prefer=prefer)[0] == ExitCode.OK
    assert run_sync(url, b)[0] == ExitCode.OK
    assert run_sync(url, a)[0] == ExitCode.OK
    kept = message("c0", "m0", 1)
    expected = {("c0", "m1"): message("c0", "m1").content_hash}
    if prefer == "backend":
        expected[("c0", "m0")] = kept.content_hash  # the backend's version, back here
    assert server_live(server_rows(live_server.service)) == expected
    assert live(a) == live(b) == expected
    assert conflict_rows(a) == conflict_rows(b) == []
    # Nothing was lost: a's own version of m0 is in its trash either way.
    assert ("c0", "m0", message("c0", "m0").content_hash) in trashed(a)


def test_conflict_on_a_deleted_message_settles_when_the_backend_deletes_it(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: once the backend's version was deleted too, the conflict
    remembered for the message deleted here stayed forever (exit 6 on every run)."""
    a, b = two_stores
    url = live_server.url
    deleted_here_changed_there(a, b, url)
    delete(b, "c0", ["m0"])
    assert run_sync(url, b)[0] == ExitCode.OK
    assert run_sync(url, a)[0] == ExitCode.OK
    assert conflict_rows(a) == []
    assert run_op(url, lambda r: save(a, r, None, SaveOptions()))[0] == ExitCode.OK


@pytest.mark.parametrize("command", ["sync", "save"])
def test_a_deletion_the_backend_never_acknowledged_is_not_done(
        two_stores: tuple[Store, Store], live_server: LiveServer, command: str) -> None:
    """Found by the machine: when the only work left was a deletion and its request failed
    (lost acknowledgements, 503s), sync and save exited 0 with the delete batch still open."""
    a, _ = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"))
    assert run_sync(url, a)[0] == ExitCode.OK
    delete(a, "c0", ["m0"])

    def again() -> tuple[int, RunResult | None]:
        if command == "sync":
            return run_sync(url, a)
        return run_op(url, lambda r: save(a, r, None, SaveOptions()))

    live_server.faults.script(*[Fault.lost_ack()] * 3, path=WRITES)
    code, result = again()
    assert code == ExitCode.UNAVAILABLE
    assert result is not None and result.counters["pending_push"] == 1
    # The backend did delete it (the acknowledgement was lost), and says so on a rerun.
    assert server_rows(live_server.service)[("c0", "m0")][2]
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 3, path=WRITES)
    assert again()[0] == ExitCode.UNAVAILABLE
    live_server.faults.clear()
    assert again()[0] == ExitCode.OK
    assert BackendView(a, SyncMachine._backend_id(a)).pending_deletes("c0") == []
    assert again()[0] == ExitCode.OK


@pytest.mark.parametrize("command", ["sync", "save"])
def test_an_unanswered_save_never_brings_back_what_was_deleted_since(
        two_stores: tuple[Store, Store], live_server: LiveServer, command: str) -> None:
    """Found by the machine: a save batch left open by an outage was re-sent as recorded
    after some of its messages had been deleted here, so the backend got them live (and
    the run then exited 3, the deletions of what it had just written still pending)."""
    a, b = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"))
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 3, path=WRITES)
    assert run_sync(url, a)[0] == ExitCode.UNAVAILABLE
    live_server.faults.clear()
    delete(a, "c0", ["m0"])
    if command == "sync":
        code, _ = run_sync(url, a)
    else:
        code, _ = run_op(url, lambda r: save(a, r, None, SaveOptions()))
    assert code == ExitCode.OK
    rows = server_rows(live_server.service)
    assert ("c0", "m0") not in rows, "the deleted message reached the backend"
    assert server_live(rows) == live(a) == {("c0", "m1"): message("c0", "m1").content_hash}
    assert run_sync(url, b)[0] == ExitCode.OK
    assert live(b) == live(a)
