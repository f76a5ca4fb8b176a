"""Stateful property test of sync: several local stores, one real server over HTTP, faults.

A hypothesis ``RuleBasedStateMachine`` drives two or three local stores (each its own
SQLite file) against ONE chatsave server (the real app under uvicorn on 127.0.0.1, in a
thread of this process, so its fault hook is scripted per rule). Rules: add messages
(``Store.add_messages`` in a transaction, or a JSONL import), create a conflicting version
of a message (same id, other content), delete messages or whole chats, save, sync (both
ways, push only, pull only; every chat or a few named ones), sync under a fault (lost
acknowledgements, a batch committed in part, resets, a backend outage on everything, on
reads or on writes, a KeyboardInterrupt from a progress callback partway through), and
resolve conflicts with ``prefer``. Repair rules: retry copies of a run of messages (fresh
ids; the same time, or a run re-sent within the window) and genuine repeats, in a store or
written straight to the server as a non-idempotent client does; dedupe (on local, backend
or both; keep first or last); gc to a tiny budget (keep_last); fetch; and trash restore of
a delete or dedupe run, with the remote (some under outages and lost acknowledgements).
Damage rules: the backend put back from an old copy of its storage, and a store file cut
short (to 0 bytes, mid-page, or to whole pages): ``Store.open`` and a chatsave command
in-process refuse it (exit 10), leave it byte for byte and make no -wal or -shm beside it;
then the store is put back from a copy and the run goes on.

After every step: no store claims a revision the server never had (``confirmed`` at rev
R with hash H means the server holds H at R, or has moved past R), no duplicate ids, no
message the server (or a store) deleted comes back unless a ``prefer`` run or a trash
restore put it there, nothing a store ever held vanishes except into its trash, every
store passes ``PRAGMA integrity_check``, and every body a store holds is byte for byte
one that was written. dedupe removes only retry copies (never a genuine repeat), each
with a live survivor, and here only what the backend holds (the copy or its original, by
hash); gc evicts only bodies the backend holds by hash and this store saw confirmed
(never the last keep_last of a chat); fetch brings back byte-identical bodies; restore
brings back what the run removed, here and on the backend. At the end, after a
fault-free sync of every store in round-robin until nothing changes (conflicts still left
are resolved with ``prefer`` by the first store that has them, then taken from the backend
by the others): every store
and the server hold the same live messages, and the model says which: nothing accepted
lost, nothing deleted resurrected (removed copies included), a contested id holds the
version its resolver chose; stores may hold stubs (compared by id and hash), and fetched
back, every body is the one written.

One server per test function; each example gets a fresh server storage (a fresh
backend id) behind it, and fresh stores. The machine is a soak (marked ``slow``): a plain
run draws a bounded sample of examples, ``-m slow`` the full count; HYPOTHESIS_PROFILE=dev
runs longer still, either way (see SIZES).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from typer.testing import CliRunner

from chatsave.backend import LOCAL_USER
from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage.sqlite import SqliteStorage
from chatsave.cli.app import app as cli_app
from chatsave.errors import ChatsaveError, ExitCode, StoreError
from chatsave.formats import Source
from chatsave.model import Message
from chatsave.ops.dedupe import DedupeOptions, DedupePlan, dedupe
from chatsave.ops.delete import delete, plan_delete
from chatsave.ops.fetch import fetch
from chatsave.ops.gc import GcOptions, gc, used_bytes
from chatsave.ops.importing import ImportOptions, import_source
from chatsave.ops.result import RunResult
from chatsave.ops.save import SaveOptions, save
from chatsave.ops.sync import SyncOptions, sync
from chatsave.ops.trash import restore
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.server.app import create_app
from chatsave.store.backend import BackendView
from chatsave.store.base import hash_sql
from chatsave.store.store import Store, Stub
from tests.conftest import Soak
from tests.faults import Fault, Faults
from tests.server_fixtures import LiveServer, Switch

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
# Retry copies (chatsave/duplicates.py). The chat's own messages m0..m5 sit at T0 + n
# minutes; a run re-sent with fresh times lands at RESENT_AT + one second per copy, so
# every re-sent copy stays within the 10-minute window of any run it copies; a person's
# genuine repeat lands a day (or more) later, one day apart, so it never copies anything.
RESENT_AT = T0 + timedelta(minutes=6)
RESENT_SLOTS = 200
REPEAT_AT = T0 + timedelta(days=1)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# (examples, steps per example). "ci" (derandomized: every run draws the same examples)
# under -m slow: the full soak, about 3 minutes on 2 cores; a plain run: a bounded sample
# of as many steps per example, about 20 s. "dev" (random) explores longer and deeper
# than the full soak, with or without -m slow.
SIZES = {"full": (300, 40), "sample": (40, 40), "dev": (1000, 60)}
TIMEOUT = 3600 if PROFILE == "dev" else 600


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


def evicted(store: Store) -> dict[Key, str]:
    """(chat, id) -> content hash of the stubs: messages whose body gc evicted."""
    return {(c, i): h for c, i, h in store.conn.execute(
        "SELECT chat_id, id, content_hash FROM messages WHERE evicted = 1")}


def run_trash(store: Store, run_id: int) -> dict[Key, tuple[str, bool]]:
    """What ``trash restore --run`` looks at: the newest entry per message of that run,
    (content hash, whether its body was evicted)."""
    out: dict[Key, tuple[str, bool]] = {}
    for c, i, h, body in store.conn.execute(
            "SELECT chat_id, id, content_hash, message FROM trash WHERE run_id = ?"
            " ORDER BY trash_id", (run_id,)):
        out[(c, i)] = (h, bool(json.loads(body).get("evicted")))
    return out


def open_batch_ids(store: Store) -> set[int]:
    return {r[0] for r in store.conn.execute("SELECT batch_id FROM outbox WHERE state = 'open'")}


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
        self.unit: str | None = None

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            raise KeyboardInterrupt

    def emit(self, type_: str, **fields: Any) -> None:
        self.tick()

    def progress(self, n: int = 0, /, *, total: int | None = None, stage: str | None = None,
                 unit: str | None = None) -> None:
        # Messages sent, as answers come: the points a Ctrl-C falls on mid-send (a stage
        # starting or a chat compared is no such point).
        if stage is not None:
            self.unit = unit
        elif n and self.unit == "message":
            self.tick()


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
        self.app = create_app(self.storage, settings=SETTINGS, hooks=self.faults.hooks())
        self.switch.current = self.app
        self.service = self.app.state.service
        self.url = self.server.url
        self.stores: list[Store] = []
        # The model.
        self.versions: dict[Key, dict[str, int]] = {}  # hash -> version, per id
        self.deleted: set[Key] = set()  # deleted in some store at some point
        self.held: list[dict[Key, set[str]]] = []  # per store: every version it held
        # Ids seen deleted, per store and on the server, with the restore epoch they were
        # seen in: a trash restore starts a new epoch (here at once; on the backend, and so
        # for the other stores, when the backend holds it), and only a tombstone of the
        # current epoch coming back live is a resurrection.
        self.store_tombs: list[dict[Key, int]] = []
        self.server_tombs: dict[Key, int] = {}
        self.epoch: dict[Key, int] = {}  # restores that put an id back on the backend
        self.local_epoch: list[dict[Key, int]] = []  # per store: restores here
        # Restores made here that the backend has not taken yet (an outage): id -> {store:
        # hash}. The next save or sync sends them; they count as restores there only when
        # the backend holds them, since a deletion it confirmed before that is older.
        self.unsent_restores: dict[Key, dict[int, str]] = {}
        self.history: dict[tuple[str, str, int], tuple[str, bool]] = {}  # server revs seen
        self.overwritten: set[Key] = set()  # ids a prefer="local" run may have written
        self.final_prefer = "local"
        self.busy = False  # a rule or invariant is running (teardown: it failed)
        self.bodies: dict[tuple[str, str, str], Message] = {}  # (chat, id, hash) -> message
        self.family: dict[Key, Key] = {}  # a retry copy -> the message it copies
        self.slots: dict[str, int] = {}  # chat -> re-sent copies placed so far
        self.serial = 0  # fresh message ids and idempotency keys
        self.repeats = 0  # genuine repeats placed so far (one day apart)
        self.runs: list[list[tuple[int, str]]] = []  # per store: (run id, command) to undo
        # The backend's storage as copied by snapshot_backend: the file, the server rows
        # and revisions seen then, and the ids deleted anywhere by then.
        self.snapshot: tuple[Path, dict[Key, ServerRow], dict[Any, Any], set[Key]] | None = None
        # Per store: what it said of messages a restore took from the backend (claims the
        # restored backend no longer backs), exempt from the overclaim check while unchanged.
        self.stale: list[dict[Key, tuple[str, int | None, str | None]]] = []

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
            self.store_tombs.append({})
            self.local_epoch.append({})
            self.runs.append([])
            self.stale.append({})
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
        self.bodies.setdefault((msg.chat_id, msg.id, msg.content_hash), msg)

    def _know(self, msg: Message) -> None:
        """A message written straight to the server (no store held it)."""
        self.versions.setdefault((msg.chat_id, msg.id), {}).setdefault(msg.content_hash, 0)
        self.bodies.setdefault((msg.chat_id, msg.id, msg.content_hash), msg)

    def root(self, key: Key) -> Key:
        """The message a retry copy (or a copy of a copy) copies; itself for any other."""
        while key in self.family:
            key = self.family[key]
        return key

    def _epoch(self, s: int | None, key: Key) -> int:
        return self.epoch.get(key, 0) + (0 if s is None else self.local_epoch[s].get(key, 0))

    def _pick(self, s: int, candidates: list[int]) -> int:
        """The ``s``-th of the stores where a rule can do something."""
        return candidates[s % len(candidates)]

    def _with_stubs(self) -> list[int]:
        return [i for i, store in enumerate(self.stores) if store.conn.execute(
            "SELECT 1 FROM messages WHERE evicted = 1 LIMIT 1").fetchone()]

    def _with_confirmed_bodies(self) -> list[int]:
        return [i for i, store in enumerate(self.stores) if store.conn.execute(
            "SELECT 1 FROM messages m JOIN remote_state r ON r.chat_id = m.chat_id"
            " AND r.id = m.id AND r.state = 'confirmed' AND r.content_hash = m.content_hash"
            " WHERE m.evicted = 0 LIMIT 1").fetchone()]

    def body_of(self, chat_id: str, mid: str, chash: str) -> Message:
        body = self.bodies.get((chat_id, mid, chash))
        assert body is not None, f"{chat_id}/{mid} ({chash[:12]}): a body no one ever wrote"
        return body

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
        run_id = store.start_run("delete", {"chat_id": chat, "ids": len(ids)})
        result = delete(store, chat, ids, run_id=run_id)
        assert result.exit_code == ExitCode.OK
        assert result.counters["deleted"] == len(ids)
        self.runs[s].append((run_id, "delete"))
        gone = live(store, chat)
        for mid in ids:
            assert (chat, mid) not in gone
            self.deleted.add((chat, mid))
            self.store_tombs[s].setdefault((chat, mid), self._epoch(s, (chat, mid)))
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
        # Whatever the backend lost (a restore), what this store holds as confirmed there
        # is there again after a save (or rejected, no longer confirmed).
        rows = server_rows(self.service)
        for key, (claim, _, _) in self._remote_state(s).items():
            if claim == "confirmed" and (chats is None or key[0] in chats):
                assert key in rows, f"store {s}: {key} confirmed after a save, not on the backend"
        self._done()

    def _known(self, s: int, scope: list[str] | None) -> list[str] | None:
        """The chats of ``scope`` this store or the backend has. Naming a chat neither has
        is a usage error (exit 2) that changes nothing; the rule goes on with the rest."""
        if scope is None:
            return None
        store = self.stores[s]
        there = set(server_chats(self.service))
        known = [c for c in scope if store.has_chat(c) or c in there]
        if len(known) < len(scope):
            before = (live(store), self._remote_state(s), server_rows(self.service))
            code, _ = run_sync(self.url, store, scope)
            assert code == ExitCode.USAGE, code
            assert (live(store), self._remote_state(s), server_rows(self.service)) == before
        return known

    @rule(s=STORE, mode=MODE, scope=SCOPE)
    def sync_plain(self, s: int, mode: str, scope: list[str] | None) -> None:
        self.busy = True
        s %= self.n
        scope = self._known(s, scope)
        if scope == []:
            return self._done()
        code, _ = run_sync(self.url, self.stores[s], scope, mode=mode)
        allowed = {ExitCode.OK, ExitCode.CONFLICTS}
        if mode != "both":
            # Pull only: what is only here waits for a push. Push only: a message live here
            # that the backend deleted waits for a pull (pushing it would resurrect it).
            allowed.add(ExitCode.PARTIAL)
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
        scope = self._known(s, scope)
        if scope == []:
            return self._done()
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
            if mode != "both":
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
        if not self._known(s, [chat]):
            return int(ExitCode.USAGE)
        store = self.stores[s]
        rows = server_rows(self.service)
        here = live(store, chat)
        states = self._remote_state(s)
        contested = {k: h for k, h in here.items()
                     if k in rows and not rows[k][2] and rows[k][1] != h}
        # Deleted here, another version live on the backend.
        undead = {k for k, h in tombstones(store).items()
                  if k[0] == chat and k in rows and not rows[k][2] and rows[k][1] != h}
        # Live here, another version deleted on the backend (a version the deletion never
        # saw, and the backend never confirmed here): a conflict.
        unseen = {k: h for k, h in here.items()
                  if k in rows and rows[k][2] and rows[k][1] != h
                  and states.get(k, ("",))[0] != "deleted"
                  and not (states.get(k, ("",))[0] == "confirmed" and states[k][2] == h)}
        # Stubs (gc evicted the body) in conflict: the backend holds another version, so
        # this store has nothing to write with; --prefer local leaves them in conflict.
        stubs = set(evicted(store))
        if prefer == "local":
            self.overwritten |= (set(contested) | set(unseen)) - stubs
        code, _ = run_sync(self.url, store, [chat], prefer=prefer)
        assert code in (ExitCode.OK, ExitCode.CONFLICTS), code
        after_rows = server_rows(self.service)
        self._track_restores(after_rows)
        after = live(store, chat)
        for key in undead:
            st_ = states.get(key)
            if st_ is not None and st_[0] == "deleted" and st_[1] is not None \
                    and rows[key][0] > st_[1]:
                # Deleted here and there at a revision this store agreed on, then written
                # there again: no conflict, the backend's newer write is taken.
                assert after.get(key) == rows[key][1], (key, "the backend's newer write")
            elif prefer == "local":
                assert after_rows[key][2], (key, "--prefer local did not delete it there")
                assert key not in after
            else:
                assert after.get(key) == rows[key][1], (key, "the backend's version")
        for key, mine in unseen.items():
            if prefer == "local" and key in stubs:
                assert code == ExitCode.CONFLICTS and after_rows[key] == rows[key], key
            elif prefer == "local":
                assert after_rows[key][1:] == (mine, False), \
                    (key, "--prefer local did not restore this store's version there")
                assert after.get(key) == mine
            else:
                assert key not in after, (key, "--prefer backend kept it here")
                self.deleted.add(key)  # the resolution chose the deletion
        for key, mine in contested.items():
            theirs = rows[key][1]
            st_ = states.get(key)
            newer_there = (st_ is not None and st_[0] == "confirmed" and st_[2] == mine
                           and rows[key][0] > int(st_[1] or 0))
            if newer_there or prefer == "backend":
                assert after.get(key) == theirs, (key, prefer, "the backend's version")
            elif key in stubs:
                assert code == ExitCode.CONFLICTS and after_rows[key] == rows[key], key
                assert after.get(key) == mine
            else:
                assert after_rows[key][1] == mine and not after_rows[key][2], \
                    (key, "--prefer local did not write this store's version")
                assert after.get(key) == mine
        if code == ExitCode.OK:
            self._check_honest(s, [chat], "both")
        return code

    # ------------------------------------------------- duplicates, gc, fetch, trash
    @rule(s=STORE, chat=CHAT, where=st.sampled_from(["store", "store", "server"]),
          start=st.integers(0, 7), length=st.integers(1, 3),
          timing=st.sampled_from(["same", "resent", "resent", "repeat"]), meta=st.booleans())
    def add_retry_copies(self, s: int, chat: str, where: str, start: int, length: int,
                         timing: str, meta: bool) -> None:
        """Retry copies of a run of live messages (fresh ids; same role, type and text; the
        same time, or a run of two or more re-sent later within the window), or a person's
        genuine repeat of one (a day later: never a copy). In a store, or written straight
        to the server in raw saves, as a non-idempotent client does."""
        self.busy = True
        s %= self.n
        held = server_live(server_rows(self.service), chat) if where == "server" else {}
        if where == "store" or not held:
            where = "store"
            with_chat = [i for i, x in enumerate(self.stores) if live(x, chat)]
            if not with_chat:
                return self._done()
            s = self._pick(s, with_chat)
            held = live(self.stores[s], chat)
        store = self.stores[s]
        originals = sorted((self.body_of(c, i, h) for (c, i), h in held.items()),
                           key=lambda m: (m.created_at, m.id))
        if not originals:
            return self._done()
        run = originals[start % len(originals):][:length]
        if timing == "repeat":
            run = run[:1]
        elif timing == "resent" and (len(run) < 2 or any(m.created_at >= REPEAT_AT for m in run)
                                     or self.slots.get(chat, 0) + len(run) > RESENT_SLOTS):
            timing = "same"
        copies = []
        for m in run:
            self.serial += 1
            if timing == "same":
                when = m.created_at
            elif timing == "resent":
                when = RESENT_AT + timedelta(seconds=self.slots.get(chat, 0))
                self.slots[chat] = self.slots.get(chat, 0) + 1
            else:
                when = REPEAT_AT + timedelta(days=self.repeats)
                self.repeats += 1
            copy = Message(chat_id=chat, id=f"{'g' if timing == 'repeat' else 'r'}{self.serial}",
                           role=m.role, content=m.content, created_at=when, type=m.type,
                           metadata={"attempt": self.serial} if meta else m.metadata,
                           attachments=m.attachments,
                           extra={"client": "retrying ü", "n": self.serial})
            copies.append(copy)
            if timing != "repeat":
                self.family[(chat, copy.id)] = (chat, m.id)
        if where == "store":
            with store.transaction():
                store.upsert_chat(chat, None)
                assert store.add_messages(chat, copies) == [("added", None)] * len(copies)
            for copy in copies:
                self._accept(s, copy)
        else:
            remote = open_remote(self.url)
            try:
                for i in range(0, len(copies), SETTINGS.max_batch_messages):
                    part = copies[i:i + SETTINGS.max_batch_messages]
                    self.serial += 1
                    body = json.dumps({"messages": [c.to_wire() for c in part]}).encode()
                    answer = remote.save(chat, body, f"raw-{self.serial}")
                    assert sorted(a.id for a in answer.saved) == sorted(c.id for c in part)
                    for copy in part:
                        self._know(copy)
            finally:
                remote.close()
        self._done()

    @precondition(lambda self: bool(self.family) or self.repeats > 0)
    @rule(s=STORE, scope=SCOPE, on=st.sampled_from(["both", "both", "local", "backend"]),
          keep=st.sampled_from(["first", "last"]),
          fault=st.sampled_from(["none", "none", "none", "outage_writes", "lost_ack_all"]))
    def dedupe_copies(self, s: int, scope: list[str] | None, on: str, keep: str,
                      fault: str) -> None:
        """dedupe: only retry copies go (never a genuine repeat), each with a survivor; here
        only what the backend holds (the copy or its original, by hash); to the trash here,
        tombstones there; removed copies are deleted for good (the model never wants them
        back) until a trash restore of the run."""
        self.busy = True
        s %= self.n
        store = self.stores[s]
        before_rows = server_rows(self.service)
        if scope is not None:
            scope = [c for c in scope if store.has_chat(c) or server_live(before_rows, c)]
            if not scope:
                return self._done()
        before_here, before_live = live(store), server_live(before_rows)
        stubs_before = evicted(store)
        run_id = store.start_run("dedupe", {"on": on, "keep": keep})
        if fault == "outage_writes":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
        elif fault == "lost_ack_all":  # deleted there, never acknowledged
            self.faults.script(*[Fault.lost_ack()] * 100, path=WRITES)
        try:
            code, result = run_op(self.url, lambda r: dedupe(
                store, r, scope, DedupeOptions(on=on, keep=keep, max_delete=None),
                run_id=run_id))
        finally:
            self.faults.clear()
        assert result is not None, code
        plan = result.report[0]
        assert isinstance(plan, DedupePlan)
        counts = plan.counts()
        # Copies found and none to remove: exit 1; kept here, unconfirmed: 3.
        expected_code = ExitCode.PARTIAL if counts["kept_unconfirmed"] else \
            ExitCode.DIFFERENCES if plan.removals and not counts["here"] + counts["on_backend"] \
            else ExitCode.OK
        if fault == "none" or not counts["on_backend"]:
            assert code == expected_code, (code, expected_code, counts)
        else:
            assert code in (expected_code, ExitCode.PARTIAL, ExitCode.UNAVAILABLE), code
        after_here, after_rows = live(store), server_rows(self.service)
        after_live = server_live(after_rows)
        removed_here: set[Key] = set()
        removed_there: set[Key] = set()
        for r in plan.removals:
            key, orig = (r.chat_id, r.id), (r.chat_id, r.original)
            assert key != orig and self.root(key) == self.root(orig), \
                f"dedupe removed {key} as a copy of {orig}: it is not one"
            here = key in before_here
            assert r.here == here
            assert r.content_hash == (before_here[key] if here else before_live[key])
            there = before_live.get(key) == r.content_hash
            assert r.there == (there and on != "local"), (key, r)
            orig_hash = before_here.get(orig, before_live.get(orig))
            held = there or (orig in before_live and before_live[orig] == orig_hash)
            expected = here and held and on != "backend" and (key not in stubs_before or there)
            assert r.removable_here == expected, (key, r, "removable here?")
            if r.removable_here:
                removed_here.add(key)
                assert key not in after_here, f"{key}: planned for removal here, still here"
            if r.there and after_rows[key][2]:
                removed_there.add(key)
            if r.there and fault == "none":
                assert after_rows[key][2], f"{key}: planned for removal there, still live"
            assert orig in after_here or orig in after_live, f"{key}: its survivor {orig} is gone"
        # Nothing else changed, here or there.
        assert after_here == {k: h for k, h in before_here.items() if k not in removed_here}
        assert after_live == {k: h for k, h in before_live.items() if k not in removed_there}
        if removed_here:
            trash = run_trash(store, run_id)
            for key in removed_here:
                assert trash.get(key) == (before_here[key], False), \
                    f"{key}: not in the trash with its body under the dedupe run"
            self.runs[s].append((run_id, "dedupe"))
        for key in removed_here | removed_there:
            self.deleted.add(key)
        kept = any(r.here and not r.removable_here for r in plan.removals)
        event(f"dedupe {on} {keep}: copies {bool(plan.removals)} here {bool(removed_here)}"
              f" there {bool(removed_there)} kept {kept}")
        self._done()

    @precondition(lambda self: bool(self._with_confirmed_bodies()))
    @rule(s=STORE, budget=st.sampled_from(["tiny", "tiny", "half"]),
          keep_last=st.sampled_from([None, 0, 1, 3]),
          fault=st.sampled_from(["none", "none", "none", "outage_reads"]))
    def gc_bodies(self, s: int, budget: str, keep_last: int | None, fault: str) -> None:
        """gc: only bodies the current backend holds by hash go (never pending, conflicting
        or rejected ones), the newest keep_last of every chat stay, stubs keep id and hash;
        no eviction at all while the backend cannot be asked."""
        self.busy = True
        s = self._pick(s, self._with_confirmed_bodies())
        store = self.stores[s]
        before_here, states, rows = live(store), self._remote_state(s), server_rows(self.service)
        stubs_before, open_before = evicted(store), open_batch_ids(store)
        kept: set[Key] = set()
        if keep_last:
            for chat in store.chat_ids():
                kept |= {(chat, r[0]) for r in store.conn.execute(
                    "SELECT id FROM messages WHERE chat_id = ? ORDER BY created_at DESC,"
                    " ord DESC LIMIT ?", (chat, keep_last))}
        size = 1 if budget == "tiny" else max(1, used_bytes(store) // 2)
        if fault == "outage_reads":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=READS)
        try:
            code, _ = run_op(self.url, lambda r: gc(store, r, GcOptions(
                budget=size, keep_last=keep_last, keep_within=None)))
        finally:
            self.faults.clear()
        allowed = {ExitCode.OK, ExitCode.DIFFERENCES}
        if fault != "none":
            allowed.add(ExitCode.UNAVAILABLE)
        assert code in allowed, (code, fault)
        assert live(store) == before_here, "gc changed which messages (ids, hashes) are live"
        stubs = evicted(store)
        assert stubs_before.items() <= stubs.items(), "gc brought a body back"
        assert open_before <= open_batch_ids(store), "gc dropped an unanswered batch"
        if code == ExitCode.UNAVAILABLE:
            assert stubs == stubs_before, "gc evicted while the backend could not be asked"
        event(f"gc code {code} evicted {min(len(stubs) - len(stubs_before), 3)}")
        for key, chash in stubs.items():
            if key in stubs_before:
                continue
            assert chash == before_here[key] and chash in self.versions[key]
            assert states.get(key, ("",))[0] == "confirmed" and states[key][2] == chash, \
                f"gc evicted {key}, which the backend never confirmed ({states.get(key)})"
            assert key in rows and rows[key][1:] == (chash, False), \
                f"gc evicted {key}, which the backend does not hold ({rows.get(key)})"
            assert key not in kept, f"gc evicted {key}, one of the last {keep_last} of its chat"
        self._done()

    @precondition(lambda self: bool(self._with_stubs()))
    @rule(s=STORE, scope=SCOPE, fault=st.sampled_from(["none", "none", "none", "outage_reads"]))
    def fetch_bodies(self, s: int, scope: list[str] | None, fault: str) -> None:
        """fetch: every evicted body the backend still holds comes back byte-identical;
        the others are reported missing (exit 4), their stubs kept; nothing changes while
        the backend cannot be read."""
        self.busy = True
        s = self._pick(s, self._with_stubs())
        store = self.stores[s]
        chats = None if scope is None else [c for c in scope if store.has_chat(c)]
        if chats == []:
            return self._done()
        before_here, rows = live(store), server_live(server_rows(self.service))
        stubs = {k: h for k, h in evicted(store).items() if chats is None or k[0] in chats}
        if fault == "outage_reads":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=READS)
        try:
            code, result = run_op(self.url, lambda r: fetch(store, r, chats))
        finally:
            self.faults.clear()
        if fault != "none" and stubs:
            assert code == ExitCode.UNAVAILABLE, code
            assert stubs.items() <= evicted(store).items() and live(store) == before_here
            return self._done()
        assert result is not None, code
        assert live(store) == before_here, "fetch changed which messages are live"
        still = evicted(store)
        missing = 0
        for key, chash in stubs.items():
            if key in still:
                missing += 1
                assert rows.get(key) != chash, f"{key}: the backend holds it, not fetched"
                continue
            assert rows.get(key) == chash, f"{key}: fetched, but the backend lacks it"
            got = store.get_message(*key)
            assert isinstance(got, Message)
            assert got.to_wire() == self.body_of(*key, chash).to_wire(), \
                f"{key}: the fetched body differs from the one written"
        assert result.counters["missing"] == missing
        assert result.counters["written"] == len(stubs) - missing
        assert code == (ExitCode.REJECTED if missing else ExitCode.OK), (code, missing)
        event(f"fetch stubs {min(len(stubs), 3)} missing {missing}")
        self._done()

    @precondition(lambda self: any(self.runs))
    @rule(s=STORE, pick=st.integers(0, 20),
          fault=st.sampled_from(["none", "none", "none", "outage_writes"]))
    def restore_run(self, s: int, pick: int, fault: str) -> None:
        """trash restore --run of a delete or dedupe run, with the remote: what the run
        removed here is live again here (byte-identical) and, where the backend holds the
        deletion this store made, there too (while it cannot take writes: once the next
        save or sync sends it); nothing duplicated."""
        self.busy = True
        s = self._pick(s, [i for i, runs in enumerate(self.runs) if runs])
        store = self.stores[s]
        run_id, command = self.runs[s][pick % len(self.runs[s])]
        entries = run_trash(store, run_id)
        before_here, before_rows = live(store), server_rows(self.service)
        states = self._remote_state(s)
        chats = sorted({c for c, _ in entries})
        waiting = [c for c, n in BackendView(store, self._backend_id(store)).chat_counts(
            chats).items() if n["pending_push"]] if chats and store.conn.execute(
            "SELECT 1 FROM backends").fetchone() else []
        events: list[tuple[str, dict[str, Any]]] = []
        if fault == "outage_writes":
            self.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
        try:
            code, result = run_op(self.url, lambda r: restore(
                store, r, run_id=run_id, emit=lambda type_, **f: events.append((type_, f))))
        finally:
            self.faults.clear()
        if not entries:
            assert code == ExitCode.USAGE, code
            return self._done()
        assert result is not None, code
        restored = {(f["chat_id"], f["id"]): f["content_hash"] for t, f in events
                    if t == "restored"}
        skipped = {(f["chat_id"], f["id"]) for t, f in events if t == "skipped"}
        after_here, after_rows = live(store), server_rows(self.service)
        for key, (chash, was_evicted) in entries.items():
            if was_evicted:
                assert command == "delete", f"{key}: dedupe put a stub in the trash"
                assert key in skipped
            elif before_here.get(key) == chash:
                assert key not in restored and key not in skipped
            elif key in before_here:
                assert key in skipped, f"{key}: restored over another live version"
            else:
                assert restored.get(key) == chash, f"{key}: not restored"
                got = store.get_message(*key)
                assert isinstance(got, Message)
                assert got.to_wire() == self.body_of(*key, chash).to_wire()
        assert set(restored) | skipped <= set(entries)
        assert after_here == {**before_here, **restored}, "restore changed other messages"
        if fault == "none":
            allowed = {ExitCode.OK, ExitCode.DIFFERENCES, ExitCode.CONFLICTS}
            if waiting:
                # Its chats held pushes still waiting (an earlier restore the backend did
                # not take): they are not this run's to send, and keep the chat partial.
                allowed.add(ExitCode.PARTIAL)
            assert code in allowed, (code, waiting)
            assert (code != ExitCode.OK) == bool(skipped) or code in (ExitCode.CONFLICTS,
                                                                      ExitCode.PARTIAL)
        else:  # restored here; the backend follows at the next save or sync
            assert code in (ExitCode.OK, ExitCode.DIFFERENCES, ExitCode.CONFLICTS,
                            ExitCode.PARTIAL, ExitCode.UNAVAILABLE), code
        event(f"restore {command} {fault} code {code} restored {bool(restored)}"
              f" skipped {bool(skipped)}")
        for key, chash in restored.items():
            self.local_epoch[s][key] = self.local_epoch[s].get(key, 0) + 1
            self.store_tombs[s].pop(key, None)
            row, st_ = before_rows.get(key), states.get(key)
            # The backend must follow when it holds what this store knows of it: the
            # deletion this store made there, the version still live, or nothing at all.
            must = row is None or row[1:] == (chash, False) or (
                st_ is not None and st_[0] == "deleted" and st_[1] == row[0] and row[2])
            if after_rows.get(key, (0, "", True))[1:] == (chash, False):
                self._restored_there(key, after_rows, {s})
            elif must and fault != "none":
                # Restored here only: the next save or sync sends it. Until the backend
                # holds it, a deletion of it confirmed there (pulled by another store, or
                # sent by one) is older than this restore, not newer (see _track_restores).
                self.unsent_restores.setdefault(key, {})[s] = chash
            else:
                assert not must, f"{key}: restored here, not on the backend ({row}, {st_})"
                event("restore: not on backend")
        self._done()

    def _restored_there(self, key: Key, rows: dict[Key, ServerRow], by: set[int]) -> None:
        """A restore by the stores ``by`` is on the backend now (``rows``): a new epoch of
        the id, there and in every store. Other stores' tombstones of it: one whose deletion
        the backend confirmed at an older revision is stale (the restore is newer: that
        store takes it back); any other is a deletion of their own, still to be sent, and
        it deletes the message again."""
        self.epoch[key] = self.epoch.get(key, 0) + 1
        rev = rows[key][0]
        seen_deleted = [self._remote_state(o).get(key) for o, other in enumerate(self.stores)
                        if o not in by and key in tombstones(other)]
        if all(st2 is not None and st2[0] == "deleted" and st2[1] is not None
               and st2[1] < rev for st2 in seen_deleted):
            self.deleted.discard(key)

    def _track_restores(self, rows: dict[Key, ServerRow]) -> None:
        """Restores made here while the backend could not take them: the one the backend
        now holds (sent by a save, a sync, or another restore) has happened there (see
        _restored_there); one whose store no longer holds that version is abandoned (its
        message deleted again, or replaced, before it was sent)."""
        for key, pending in list(self.unsent_restores.items()):
            row = rows.get(key)
            if row is not None and not row[2] and row[1] in pending.values():
                self._restored_there(key, rows, {s for s, h in pending.items() if h == row[1]})
                pending = {s: h for s, h in pending.items() if h != row[1]}
            pending = {s: h for s, h in pending.items()
                       if live(self.stores[s]).get(key) == h}
            if pending:
                self.unsent_restores[key] = pending
            else:
                del self.unsent_restores[key]

    @rule()
    def snapshot_backend(self) -> None:
        """Copy the backend's storage as it is now (its backend_id with it)."""
        self.busy = True
        copy = self.dir / "snapshot.db"
        copy.unlink(missing_ok=True)
        source = sqlite3.connect(self.dir / "server.db")
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        self.snapshot = (copy, server_rows(self.service), dict(self.history), set(self.deleted))
        self._done()

    def _restorable(self) -> bool:
        """A restore that only loses live messages added since the copy, each of which some
        store still holds with its body: nothing deleted or changed since, no lost
        message deleted anywhere (a deletion the restore took from the backend is not
        sent again, see docs), no chat gone (a guard's business), nothing that only the
        backend held (the restore itself would lose it, not chatsave)."""
        if self.snapshot is None:
            return False
        _, then, _, deleted = self.snapshot
        now = server_rows(self.service)
        if self.deleted != deleted or any(now.get(k) != row for k, row in then.items()):
            return False
        if {c for c, _ in now} - {c for c, _ in then}:
            return False
        lost = set(now) - set(then)
        if any(now[k][2] or k in self.deleted for k in lost):
            return False
        held = set().union(*(live(store) for store in self.stores))
        if not lost <= held:
            return False
        return not any(k in lost for store in self.stores for k in evicted(store))

    @precondition(lambda self: self._restorable())
    @rule()
    def restore_backend(self) -> None:
        """Put the old copy back (same backend_id): what was saved since is lost there."""
        self.busy = True
        assert self.snapshot is not None
        copy, then, history, _ = self.snapshot
        lost = set(server_rows(self.service)) - set(then)
        self.storage.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{self.dir / 'server.db'}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, self.dir / "server.db")
        self.storage = SqliteStorage(self.dir / "server.db")
        self.app = create_app(self.storage, settings=SETTINGS, hooks=self.faults.hooks())
        self.switch.current = self.app
        self.service = self.app.state.service
        assert server_rows(self.service) == then
        # The revisions given since the copy are given again, to whatever comes next.
        self.history = {k: v for k, v in self.history.items() if k in history}
        for s in range(self.n):
            for key, claim in self._remote_state(s).items():
                if key not in then:
                    self.stale[s][key] = claim
        event(f"restore: lost {min(len(lost), 3)}")
        self._done()

    @rule(s=STORE, cut=st.sampled_from(["empty", "part-page", "whole-pages"]),
          command=st.sampled_from(["open", "status", "sync"]))
    def truncate_store(self, s: int, cut: str, command: str) -> None:
        """A store file cut short (to 0 bytes, to a size that is not a whole number of pages,
        or to half its pages): opening it (Store.open, or a chatsave command in-process) is
        refused with exit 10, and the file is left byte for byte, with no -wal or -shm made
        beside it. Then the copy is put back and the run goes on with the store intact."""
        self.busy = True
        s %= self.n
        store = self.stores[s]
        path = store.path
        before = (live(store), tombstones(store), trashed(store), self._remote_state(s))
        store.close()  # the last connection: its WAL is checkpointed into the file
        sidecars = [Path(f"{path}{x}") for x in ("-wal", "-shm", "-journal")]
        aside = self.dir / "aside"
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        kept = []
        for f in (path, *sidecars):
            if f.exists():
                shutil.copy2(f, aside / f.name)
                kept.append(f.name)
        for f in sidecars:  # the truncated file alone, as a user would find it
            f.unlink(missing_ok=True)
        data = path.read_bytes()
        page = int.from_bytes(data[16:18], "big")
        page = 65536 if page == 1 else page
        if cut == "empty":
            size = 0
        elif cut == "part-page":
            size = len(data) // 2 // page * page + page // 2
        else:
            size = max(1, len(data) // page // 2) * page
        assert size < len(data), (cut, size, len(data))
        with open(path, "r+b") as fh:
            fh.truncate(size)
        cut_bytes, cut_mtime = path.read_bytes(), path.stat().st_mtime_ns
        if command == "open":
            for create in (True, False):
                try:
                    Store.open(path, create=create).close()
                except StoreError as exc:
                    assert exc.exit_code == ExitCode.STORE, (cut, exc.exit_code, exc.message)
                else:
                    raise AssertionError(f"a store truncated ({cut}, {size} bytes) was opened")
        else:
            argv = ["status"] if command == "status" else ["sync", "--all", "--remote", self.url]
            env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CHATSAVE_")}
            env["CHATSAVE_HOME"] = str(self.dir / "home")
            ran = CliRunner().invoke(cli_app, [*argv, "--store", str(path), "--json"], env=env,
                                     catch_exceptions=False)
            assert ran.exit_code == ExitCode.STORE, (cut, argv, ran.exit_code, ran.stderr)
            summary = json.loads(ran.stdout.splitlines()[-1])
            assert summary["type"] == "summary" and summary["exit_code"] == ExitCode.STORE
        assert path.read_bytes() == cut_bytes and path.stat().st_mtime_ns == cut_mtime, \
            f"the refused store ({cut}) was written to"
        made = [f.name for f in sidecars if f.exists()]
        assert not made, f"refusing the truncated store ({cut}) made {made} beside it"
        # Put the copy back (and what lay beside it), and reopen as the machine holds it.
        for name in kept:
            os.replace(aside / name, path.parent / name)
        self.stores[s] = Store.open(path)
        assert (live(self.stores[s]), tombstones(self.stores[s]), trashed(self.stores[s]),
                self._remote_state(s)) == before, "the store put back is not the one copied"
        event(f"truncate: {cut} {command}")
        self._done()

    def _done(self) -> None:
        self.busy = False

    # -------------------------------------------------------------- checks
    def _remote_state(self, s: int) -> dict[Key, tuple[str, int | None, str | None]]:
        return self._remote_state_of(self.stores[s])

    @staticmethod
    def _remote_state_of(store: Store) -> dict[Key, tuple[str, int | None, str | None]]:
        rows = store.conn.execute(
            f"SELECT r.chat_id, r.id, r.state, r.rev, {hash_sql('r.content_hash')}"
            " FROM remote_state r JOIN backends b ON b.backend_key = r.backend_key")
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
                known = states.get(key)
                if mode == "push" and known is not None and known[0] == "deleted" and \
                        known[1] is not None and rows[key][0] > known[1]:
                    continue  # restored there after this store saw it deleted: a pull
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
        self._track_restores(rows)
        for (chat, mid), (rev, chash, deleted) in rows.items():
            seen = self.history.setdefault((chat, mid, rev), (chash, deleted))
            assert seen == (chash, deleted), \
                f"the server changed {chat}/{mid} at rev {rev} without a new revision"
            key = (chat, mid)
            if deleted:
                self.server_tombs.setdefault(key, self._epoch(None, key))
            elif key in self.server_tombs:
                if self.server_tombs[key] == self._epoch(None, key) and \
                        key not in self.overwritten:
                    raise AssertionError(f"{key} was deleted on the server and came back")
                del self.server_tombs[key]  # restored from a trash (or overwritten)
            if not deleted:
                assert chash in self.versions.get(key, {}), \
                    f"the server holds {key} with content no store ever had"
        for s, store in enumerate(self.stores):
            assert store.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            here = live(store)
            tombs = tombstones(store)
            assert not set(here) & set(tombs), \
                f"store {s}: live and deleted at once: {set(here) & set(tombs)}"
            dupes = store.conn.execute(
                "SELECT chat_id, id FROM messages GROUP BY chat_id, id HAVING COUNT(*) > 1"
            ).fetchall()
            assert not dupes, f"store {s}: duplicate ids {dupes}"
            for key in tombs:
                self.store_tombs[s].setdefault(key, self._epoch(s, key))
            for key in here:
                if key not in self.store_tombs[s]:
                    continue
                if self.store_tombs[s][key] == self._epoch(s, key) and \
                        key not in self.overwritten and not self.contested(key):
                    raise AssertionError(f"store {s}: {key} was deleted here and came back")
                del self.store_tombs[s][key]  # restored from a trash (or overwritten)
            # Every body (stubs: every hash) is one that was written, byte for byte.
            for row in store.conn.execute(f"SELECT {Store.columns()} FROM messages"):
                item = Store.row_to_message(row)
                body = self.body_of(row[0], row[1], row[10])
                if not isinstance(item, Stub):
                    assert item.to_wire() == body.to_wire(), \
                        f"store {s}: the body of {row[0]}/{row[1]} differs from the one written"
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
                if self.stale[s].get(key) == (claim, rev_, hash_):
                    continue  # said before a restore took it from the backend
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
                    self._track_restores(server_rows(self.service))
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
        # Versions deleted in some store when the conflicts were resolved: a store that
        # deleted the very version a resolution chose still deletes it on the backend.
        doomed = {(k, h) for store in self.stores for k, h in tombstones(store).items()}
        if any(code == ExitCode.CONFLICTS for code in codes):
            # Resolve what is left: the first store with a conflict in a chat chooses,
            # the others take the backend's (now the chosen) version; a second pass
            # reaches the stores the choice put in conflict (a deletion of theirs that
            # the chosen version overrode).
            for chat in CHATS:
                resolved = False
                for s in list(range(self.n)) * 2:
                    rows = server_rows(self.service)
                    if not self._differs(s, chat, rows):
                        continue
                    # A stub in conflict has no body to write: only the backend's wins.
                    stub_conflict = any(
                        k[0] == chat and (k not in rows or rows[k][1:] != (h, False))
                        for k, h in evicted(self.stores[s]).items())
                    prefer = "backend" if resolved or stub_conflict else self.final_prefer
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
            if key in winners and (final.get(key) is not None or (key, winners[key]) not in doomed):
                assert final.get(key) == winners[key], \
                    f"{key}: the resolution chose {winners[key]}, the end holds {final.get(key)}"
            if key in final:
                assert final[key] in versions
            else:
                assert key in self.deleted, \
                    f"{key} (in conflict, never deleted) is lost"
        assert set(final) <= set(self.versions), "the server holds messages no one wrote"
        stubs = sum(len(evicted(x)) for x in self.stores)
        event(f"final: stubs {min(3, stubs)}"
              f" copies live {min(3, sum(1 for k in final if k in self.family))}")
        # Stubs are live by hash; fetched back, every body is the one written.
        for s, store in enumerate(self.stores):
            code, result = run_op(self.url, self._fetch_all(store))
            assert code == ExitCode.OK, (s, code, result and result.counters)
            assert not evicted(store)
            for row in store.conn.execute(f"SELECT {Store.columns()} FROM messages"):
                item = Store.row_to_message(row)
                assert isinstance(item, Message)
                assert item.to_wire() == self.body_of(row[0], row[1], row[10]).to_wire()

    @staticmethod
    def _fetch_all(store: Store) -> Callable[[HttpRemote], RunResult]:
        return lambda remote: fetch(store, remote, None)

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


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_sync_state_machine(switched_server: tuple[LiveServer, Switch], scratch: Path,
                            soak: Soak) -> None:
    server, switch = switched_server
    SyncMachine.server = server
    SyncMachine.switch = switch
    SyncMachine.scratch = scratch
    examples, steps = SIZES["dev" if PROFILE == "dev" else "full" if soak.full else "sample"]
    run_state_machine_as_test(SyncMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
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


def test_a_deletion_made_on_both_sides_is_settled_by_sync(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine (after "chats with nothing to send skip the outbox planning"):
    a message deleted here, its deletion not yet sent, and meanwhile deleted on the backend
    by another store, has no row in the comparison; sync planned nothing for the chat, so
    the unsent deletion stayed pending for ever (exit 3 on every run)."""
    a, b = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"))
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_sync(url, b)[0] == ExitCode.OK
    delete(a, "c0", ["m0"])
    delete(b, "c0", ["m0"])
    assert run_sync(url, b)[0] == ExitCode.OK
    for _ in range(2):
        code, result = run_sync(url, a)
        assert code == ExitCode.OK, result and result.counters
    assert BackendView(a, SyncMachine._backend_id(a)).pending_deletes("c0") == []
    assert live(a) == live(b) == server_live(server_rows(live_server.service))


def retry_copy(msg: Message, mid: str, later: timedelta = timedelta()) -> Message:
    """``msg`` re-sent under a fresh id (``later``: with a fresh time)."""
    return Message(chat_id=msg.chat_id, id=mid, role=msg.role, content=msg.content,
                   created_at=msg.created_at + later, type=msg.type,
                   extra={"client": "retrying"})


@pytest.mark.parametrize("evicted_first", [False, True])
def test_dedupe_on_the_backend_is_not_undone_by_the_next_sync(
        two_stores: tuple[Store, Store], live_server: LiveServer, evicted_first: bool) -> None:
    """Found by the machine: after ``dedupe --on backend`` the store remembered the copies
    as deleted there by itself while it still held them, which sync reads as "restored here
    from the trash": the next sync restored every removed copy on the backend. (Forgetting
    them instead made them pending: save re-sent them, or exited 3 for evicted ones.)"""
    a, b = two_stores
    url = live_server.url
    m0, m1 = message("c0", "m0"), message("c0", "m1")
    r0, r1 = retry_copy(m0, "r0", timedelta(minutes=6)), retry_copy(m1, "r1", timedelta(minutes=6))
    put(a, m0, m1, r0, r1)
    assert run_sync(url, a)[0] == ExitCode.OK
    if evicted_first:
        assert run_op(url, lambda r: gc(a, r, GcOptions(budget=1)))[0] == ExitCode.DIFFERENCES
        assert len(evicted(a)) == 4
    code, result = run_op(url, lambda r: dedupe(a, r, None, DedupeOptions(on="backend")))
    assert code == ExitCode.PARTIAL, code  # the copies are kept here, as asked
    assert result is not None and result.counters["duplicates_removed"] == 2
    code, result = run_op(url, lambda r: save(a, r, None, SaveOptions()))
    assert code == ExitCode.OK, result and result.counters  # nothing pending, nothing sent
    assert run_sync(url, a)[0] == ExitCode.OK
    expected = {("c0", "m0"): m0.content_hash, ("c0", "m1"): m1.content_hash}
    rows = server_rows(live_server.service)
    assert rows[("c0", "r0")][2] and rows[("c0", "r1")][2], "a removed copy came back"
    assert server_live(rows) == live(a) == expected  # the store followed the backend
    assert run_sync(url, b)[0] == ExitCode.OK
    assert live(b) == expected


def test_dedupe_of_an_evicted_copy_can_be_undone(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a copy whose body gc had evicted went to the trash as a stub
    and was deleted on the backend, so ``trash restore --run`` of the dedupe run could not
    bring it back (skipped: its body was nowhere any more)."""
    a, b = two_stores
    url = live_server.url
    m0 = message("c0", "m0")
    r0 = retry_copy(m0, "r0")  # same time: the same content hash under another id
    put(a, m0, r0)
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_op(url, lambda r: gc(a, r, GcOptions(budget=1)))[0] == ExitCode.DIFFERENCES
    assert set(evicted(a)) == {("c0", "m0"), ("c0", "r0")}
    run_id = a.start_run("dedupe", {})
    code, _ = run_op(url, lambda r: dedupe(a, r, None, DedupeOptions(), run_id=run_id))
    assert code == ExitCode.OK
    assert ("c0", "r0") not in live(a) and server_rows(live_server.service)[("c0", "r0")][2]
    assert run_trash(a, run_id) == {("c0", "r0"): (r0.content_hash, False)}
    code, result = run_op(url, lambda r: restore(a, r, run_id=run_id))
    assert code == ExitCode.OK, result and result.counters
    got = a.get_message("c0", "r0")
    assert isinstance(got, Message) and got.to_wire() == r0.to_wire()
    rows = server_rows(live_server.service)
    assert rows[("c0", "r0")][1:] == (r0.content_hash, False)
    assert run_sync(url, b)[0] == ExitCode.OK
    assert live(b) == live(a) == server_live(rows)


def test_gc_is_not_stopped_by_a_chat_synced_while_empty(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a chat whose only messages were deleted before they were ever
    saved is synced as empty and unknown to the backend; gc took it for a wiped backend and
    refused to evict anything (exit 5)."""
    a, _ = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c1", "m0"))
    delete(a, "c0", ["m0"])
    assert run_sync(url, a)[0] == ExitCode.OK
    code, _ = run_op(url, lambda r: gc(a, r, GcOptions(budget=1)))
    assert code == ExitCode.DIFFERENCES  # still over a budget of one byte
    assert evicted(a) == {("c1", "m0"): message("c1", "m0").content_hash}


@pytest.mark.parametrize("prefer", [None, "local"])
def test_a_restore_is_not_undone_by_a_store_that_saw_the_deletion(
        two_stores: tuple[Store, Store], live_server: LiveServer, prefer: str | None) -> None:
    """Found by the machine: a deletes m0 and syncs, b syncs (m0 deleted there too), a
    restores its delete run (m0 live on the backend again, a newer revision); b's next sync
    sees "deleted here, live on the backend" and deletes it on the backend again, though the
    backend changed after the deletion b agreed on. The restore is undone everywhere.
    For b this is no conflict but a newer change: `sync --prefer local` takes it too."""
    a, b = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"))
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_sync(url, b)[0] == ExitCode.OK
    run_id = a.start_run("delete", {})
    delete(a, "c0", ["m0"], run_id=run_id)
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_sync(url, b)[0] == ExitCode.OK
    assert ("c0", "m0") in tombstones(b)
    code, _ = run_op(url, lambda r: restore(a, r, run_id=run_id))
    assert code == ExitCode.OK
    expected = {("c0", "m0"): message("c0", "m0").content_hash,
                ("c0", "m1"): message("c0", "m1").content_hash}
    assert server_live(server_rows(live_server.service)) == expected
    assert run_sync(url, b, ["c0"] if prefer else None, prefer=prefer)[0] == ExitCode.OK
    assert run_sync(url, a)[0] == ExitCode.OK
    assert server_live(server_rows(live_server.service)) == expected, "the restore was undone"
    assert live(a) == live(b) == expected


def test_a_deletion_confirmed_without_a_revision_does_not_crash_save(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a save whose acknowledgement was lost, then a pull-only sync
    (equal digests confirm the message, its revision unknown), then a deletion here: save
    (and sync, which plans the same deletions) crashed with a TypeError instead of sending
    the deletion or saying what is pending."""
    a, _ = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"))
    live_server.faults.script(*[Fault.lost_ack()] * 3, path=WRITES)
    assert run_sync(url, a)[0] == ExitCode.UNAVAILABLE
    live_server.faults.clear()
    assert run_sync(url, a, mode="pull")[0] in (ExitCode.OK, ExitCode.PARTIAL)
    assert SyncMachine._remote_state_of(a)[("c0", "m0")][:2] == ("confirmed", None)
    delete(a, "c0", ["m0"])
    code, _ = run_op(url, lambda r: save(a, r, None, SaveOptions()))
    assert code in (ExitCode.OK, ExitCode.PARTIAL)
    assert run_sync(url, a)[0] == ExitCode.OK
    assert server_live(server_rows(live_server.service)) == live(a)


def test_dedupe_of_copies_not_held_here_is_not_undone_by_importing_them(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: dedupe removed on the backend copies this store did not hold;
    remembered as deleted there by this store, the copies imported here later (a user's old
    dump) read to sync as "restored here from the trash": they were restored on the backend."""
    a, b = two_stores
    url = live_server.url
    m0 = message("c0", "m0")
    r0 = retry_copy(m0, "r0")
    put(a, m0, r0)
    assert run_sync(url, a)[0] == ExitCode.OK
    code, result = run_op(url, lambda r: dedupe(b, r, None, DedupeOptions()))
    assert code == ExitCode.OK and result is not None
    assert result.counters["duplicates_removed"] == 1
    removed = next(k for k, v in server_rows(live_server.service).items() if v[2])
    kept = ("c0", "m0") if removed == ("c0", "r0") else ("c0", "r0")
    put(b, m0, r0)  # the old dump, copies and all
    assert run_sync(url, b)[0] == ExitCode.OK
    assert run_sync(url, a)[0] == ExitCode.OK
    rows = server_rows(live_server.service)
    assert rows[removed][2], "the removed copy came back"
    assert server_live(rows) == live(a) == live(b) == {kept: m0.content_hash}


def failed_restore(a: Store, server: LiveServer) -> None:
    """a deletes m0, the backend deletes it, then a restores it while writes fail."""
    put(a, message("c0", "m0"), message("c0", "m1"))
    assert run_sync(server.url, a)[0] == ExitCode.OK
    run_id = a.start_run("delete", {})
    delete(a, "c0", ["m0"], run_id=run_id)
    assert run_sync(server.url, a)[0] == ExitCode.OK
    server.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
    try:
        code, result = run_op(server.url, lambda r: restore(a, r, run_id=run_id))
    finally:
        server.faults.clear()
    assert code == ExitCode.UNAVAILABLE, result and result.counters
    assert result is not None and result.counters["pending_push"] == 1
    assert ("c0", "m0") in live(a) and server_rows(server.service)[("c0", "m0")][2]


def test_a_restore_the_backend_did_not_take_is_not_done(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: trash restore whose write to the backend failed exited 0
    ("done and confirmed"), though the backend still held the message deleted."""
    a, _ = two_stores
    failed_restore(a, live_server)
    # A sync puts it back on the backend.
    assert run_sync(live_server.url, a)[0] in (ExitCode.OK, ExitCode.CONFLICTS)
    assert run_sync(live_server.url, a)[0] == ExitCode.OK
    assert server_live(server_rows(live_server.service)) == live(a)


def test_a_restore_left_to_sync_is_pending_while_the_backend_cannot_take_it(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: after a restore the backend did not take, a sync that could not
    write either exited 0, the message still deleted on the backend."""
    a, _ = two_stores
    failed_restore(a, live_server)
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
    code, result = run_sync(live_server.url, a)
    live_server.faults.clear()
    assert server_rows(live_server.service)[("c0", "m0")][2]
    assert code == ExitCode.UNAVAILABLE, result and result.counters


def test_a_restore_resent_after_an_outage_is_no_conflict(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: the sync after a failed restore re-sent the open batch (the
    restore is done) and sent a second restore with the same base_rev, which the backend
    answered as a conflict (identical content on both sides): exit 6."""
    a, _ = two_stores
    failed_restore(a, live_server)
    code, result = run_sync(live_server.url, a)
    assert code == ExitCode.OK, result and result.counters
    assert server_live(server_rows(live_server.service)) == live(a)


def test_a_push_only_sync_leaves_a_deletion_there_for_a_pull(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: b deletes a chat and saves; a, which never saw the chat, holds
    the same message. A push-only sync must not push it back (that resurrects it) and
    cannot take the deletion (that is a pull): the message waits, so the run is partial
    (exit 3), never done. The next full sync takes the deletion."""
    a, b = two_stores
    url = live_server.url
    put(b, message("c2", "m4"))
    assert run_op(url, lambda r: save(b, r, None, SaveOptions()))[0] == ExitCode.OK
    delete(b, "c2", plan_delete(b, "c2", None))
    assert run_op(url, lambda r: save(b, r, None, SaveOptions()))[0] == ExitCode.OK
    put(a, message("c0", "m0"), message("c2", "m4"))
    code, result = run_sync(url, a, mode="push")
    assert code == ExitCode.PARTIAL, (code, result and result.counters)
    assert result is not None and result.counters["pending_push"] == 1
    assert server_rows(live_server.service)[("c2", "m4")][2], "pushed back: resurrected"
    assert ("c2", "m4") in live(a)
    assert run_sync(url, a)[0] == ExitCode.OK
    assert server_live(server_rows(live_server.service)) == live(a) == {
        ("c0", "m0"): message("c0", "m0").content_hash}
    assert ("c2", "m4", message("c2", "m4").content_hash) in trashed(a)


def test_a_replayed_batch_does_not_hide_a_newer_version_there(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: b writes m0, its acknowledgements lost (the batch stays open);
    a overwrites m0 with --prefer local; b's next sync replays its batch (the stored answer
    confirms b's version at the old revision) and exited 0 holding the old version, while
    the backend holds a's."""
    a, b = two_stores
    url = live_server.url
    put(a, message("c0", "m0", 1))
    put(b, message("c0", "m0", 2))
    live_server.faults.script(*[Fault.lost_ack()] * 3, path=WRITES)
    assert run_sync(url, b, mode="push")[0] == ExitCode.UNAVAILABLE
    live_server.faults.clear()
    assert run_sync(url, a, ["c0"], prefer="local")[0] == ExitCode.OK
    assert server_live(server_rows(live_server.service)) == {
        ("c0", "m0"): message("c0", "m0", 1).content_hash}
    # The open batch is re-sent before the comparison: b's version is confirmed at the
    # revision a's overwrite saw, so the backend's version is newer, and taken.
    code, result = run_sync(url, b)
    assert code == ExitCode.OK, (code, result and result.counters)
    assert live(b) == server_live(server_rows(live_server.service)) == {
        ("c0", "m0"): message("c0", "m0", 1).content_hash}


@pytest.mark.parametrize("prefer", [None, "local", "backend"])
def test_a_version_the_deletion_never_saw_is_a_conflict_not_deleted(
        two_stores: tuple[Store, Store], live_server: LiveServer, prefer: str | None) -> None:
    """Found by the machine: a saves m0 and deletes it (the backend holds a tombstone of
    a's version); b, which never synced, holds another version of m0. b's sync deleted b's
    version (to the trash) as if the backend's deletion covered it, and then nothing
    anywhere held it live. It is a conflict (changed here, deleted there) until --prefer:
    local restores b's version on the backend, backend deletes it here."""
    a, b = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"))
    assert run_sync(url, a)[0] == ExitCode.OK
    delete(a, "c0", ["m0"])
    assert run_sync(url, a)[0] == ExitCode.OK
    mine = message("c0", "m0", 1)
    put(b, mine)
    code, result = run_sync(url, b)
    assert code == ExitCode.CONFLICTS, (code, result and result.counters)
    assert live(b) == {("c0", "m0"): mine.content_hash, ("c0", "m1"): message(
        "c0", "m1").content_hash}, "b's version was deleted"
    if prefer is None:
        return
    assert run_sync(url, b, ["c0"], prefer=prefer)[0] == ExitCode.OK
    for store in (b, a):
        assert run_sync(url, store)[0] == ExitCode.OK
    expected = {("c0", "m1"): message("c0", "m1").content_hash}
    if prefer == "local":
        expected[("c0", "m0")] = mine.content_hash
    assert server_live(server_rows(live_server.service)) == live(a) == live(b) == expected


def test_a_restore_sends_the_chats_earlier_restores_too(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a restore the backend did not take left its message waiting;
    a later restore of another run in the same chat sent its own message only and exited
    3 with no pending count in its summary. The chat's waiting restores now go with it."""
    a, _ = two_stores
    url = live_server.url
    put(a, message("c0", "m0"), message("c0", "m1"), message("c0", "m2"))
    assert run_sync(url, a)[0] == ExitCode.OK
    runs = []
    for mid in ("m0", "m1"):
        run_id = a.start_run("delete", {})
        delete(a, "c0", [mid], run_id=run_id)
        assert run_sync(url, a)[0] == ExitCode.OK
        runs.append(run_id)
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
    try:
        code, result = run_op(url, lambda r: restore(a, r, run_id=runs[1]))
    finally:
        live_server.faults.clear()
    assert code == ExitCode.UNAVAILABLE
    assert result is not None and result.counters["pending_push"] == 1
    code, result = run_op(url, lambda r: restore(a, r, run_id=runs[0]))
    assert code == ExitCode.OK, (code, result and result.counters)
    expected = {(c, m): message(c, m).content_hash
                for c, m in (("c0", "m0"), ("c0", "m1"), ("c0", "m2"))}
    assert server_live(server_rows(live_server.service)) == live(a) == expected
    assert run_sync(url, a)[0] == ExitCode.OK


def test_save_sends_a_restore_the_backend_did_not_take(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a restore the backend did not take is pending; save left it
    (only sync sent it) and exited 3 on every run. save sends it against the revision of
    the deletion this store saw, as it sends everything else pending."""
    a, _ = two_stores
    failed_restore(a, live_server)
    code, result = run_op(live_server.url, lambda r: save(a, r, None, SaveOptions()))
    assert code == ExitCode.OK, (code, result and result.counters)
    assert server_live(server_rows(live_server.service)) == live(a)
    assert run_sync(live_server.url, a)[0] == ExitCode.OK


def test_a_save_left_open_does_not_undo_a_restore(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a save whose acknowledgements were lost stayed open in the
    outbox; dedupe then removed one of its messages (here and there), and trash restore
    brought it back while writes failed. The old save, valid again (the message is held
    again), was re-sent first: its answer (the message saved at the revision before the
    deletion) hid the restore, and the next sync moved the message back to the trash.
    A deletion here abandons the open saves that carry the message."""
    a, b = two_stores
    url = live_server.url
    m0 = message("c0", "m0")
    put(a, m0, retry_copy(m0, "r0"))
    live_server.faults.script(*[Fault.lost_ack()] * 3, path=WRITES)
    assert run_sync(url, a, mode="push")[0] == ExitCode.UNAVAILABLE
    live_server.faults.clear()
    assert run_sync(url, a, mode="pull")[0] in (ExitCode.OK, ExitCode.PARTIAL)
    run_id = a.start_run("dedupe", {})
    code, _ = run_op(url, lambda r: dedupe(a, r, None, DedupeOptions(), run_id=run_id))
    assert code == ExitCode.OK
    removed = next(k for k, v in server_rows(live_server.service).items() if v[2])
    assert removed not in live(a)
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
    try:
        code, _ = run_op(url, lambda r: restore(a, r, run_id=run_id))
    finally:
        live_server.faults.clear()
    assert code == ExitCode.UNAVAILABLE
    assert removed in live(a)
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_sync(url, b)[0] == ExitCode.OK
    expected = {("c0", "m0"): m0.content_hash, ("c0", "r0"): m0.content_hash}
    assert server_live(server_rows(live_server.service)) == live(a) == live(b) == expected


def test_prefer_local_on_a_stub_in_conflict_says_why_it_cannot(
        two_stores: tuple[Store, Store], live_server: LiveServer) -> None:
    """Found by the machine: a stub (gc evicted its body) in conflict with another version
    on the backend: --prefer local had nothing to write with, skipped it silently and
    exited 6. It stays a conflict, and the conflict says why and what resolves it."""
    a, b = two_stores
    url = live_server.url
    mine, theirs = message("c0", "m0", 1), message("c0", "m0", 2)
    put(a, mine, message("c0", "m1"))
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_op(url, lambda r: gc(a, r, GcOptions(budget=1)))[0] == ExitCode.DIFFERENCES
    assert ("c0", "m0") in evicted(a)
    put(b, theirs)
    assert run_sync(url, b, ["c0"], prefer="local")[0] == ExitCode.OK
    # As the machine reached it: a remembers the message in conflict with b's version.
    rev = server_rows(live_server.service)[("c0", "m0")][0]
    view = BackendView(a, SyncMachine._backend_id(a))
    with a.transaction():
        view.set_states("c0", [("m0", "conflict", rev, theirs.content_hash, "test")])
    events: list[tuple[str, dict[str, Any]]] = []
    code, _ = run_sync(url, a, ["c0"], prefer="local",
                       emit=lambda type_, **f: events.append((type_, f)))
    assert code == ExitCode.CONFLICTS
    reasons = [f["reason"] for t, f in events if t == "conflict"]
    assert reasons and "--prefer backend" in reasons[0] and "evicted" in reasons[0]
    assert server_rows(live_server.service)[("c0", "m0")][1:] == (theirs.content_hash, False)
    assert run_sync(url, a, ["c0"], prefer="backend")[0] == ExitCode.OK
    assert live(a) == server_live(server_rows(live_server.service))


@pytest.mark.parametrize("other", ["pulled", "own_sent", "own_unsent"])
def test_a_restore_sent_later_by_save_against_another_stores_deletion(
        two_stores: tuple[Store, Store], live_server: LiveServer, other: str) -> None:
    """The machine's known wrong model case (the product was right): a deletes m0 and syncs,
    then restores the run while the backend cannot take writes (restored here only); a
    plain save sends the restore later. Meanwhile b gets the deletion: pulled by a sync,
    or its own deletion, sent before the restore reaches the backend or not. A deletion
    the backend confirmed is older than the restore, which b takes back (the model, which
    dated the restore from when it was made here, called it a resurrection); b's deletion
    still unsent when the restore arrives is newer, and deletes m0 again."""
    a, b = two_stores
    url = live_server.url
    m0, m1 = message("c0", "m0"), message("c0", "m1")
    put(a, m0, m1)
    assert run_sync(url, a)[0] == ExitCode.OK
    assert run_sync(url, b)[0] == ExitCode.OK
    run_id = a.start_run("delete", {})
    delete(a, "c0", ["m0"], run_id=run_id)
    assert run_sync(url, a)[0] == ExitCode.OK
    deleted_at = server_rows(live_server.service)[("c0", "m0")]
    assert deleted_at[2]
    live_server.faults.script(*[Fault.error(503, retry_after=None)] * 100, path=WRITES)
    try:
        code, result = run_op(url, lambda r: restore(a, r, run_id=run_id))
    finally:
        live_server.faults.clear()
    assert code == ExitCode.UNAVAILABLE, result and result.counters
    assert ("c0", "m0") in live(a) and server_rows(live_server.service)[("c0", "m0")] == deleted_at
    if other == "pulled":
        assert run_sync(url, b)[0] == ExitCode.OK  # takes a's deletion
    else:
        delete(b, "c0", ["m0"])
        if other == "own_sent":  # the backend has it deleted already: confirmed as is
            assert run_sync(url, b)[0] == ExitCode.OK
    assert ("c0", "m0") in tombstones(b)
    state = SyncMachine._remote_state_of(b)[("c0", "m0")]
    assert (state[:2] == ("deleted", deleted_at[0])) == (other != "own_unsent"), state
    code, result = run_op(url, lambda r: save(a, r, None, SaveOptions()))
    assert code == ExitCode.OK, result and result.counters
    rows = server_rows(live_server.service)
    assert rows[("c0", "m0")] == (deleted_at[0] + 1, m0.content_hash, False), "not restored"
    assert run_sync(url, b)[0] == ExitCode.OK
    assert run_sync(url, a)[0] == ExitCode.OK
    expected = {("c0", "m1"): m1.content_hash}
    if other != "own_unsent":
        expected[("c0", "m0")] = m0.content_hash  # the restore is newer: taken back
    assert server_live(server_rows(live_server.service)) == live(a) == live(b) == expected
    if other == "own_unsent":  # deleted again by b, and by a following the backend
        assert server_rows(live_server.service)[("c0", "m0")][2]
        assert ("c0", "m0", m0.content_hash) in trashed(a)
