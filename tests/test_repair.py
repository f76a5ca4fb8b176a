"""dedupe, gc, fetch, trash and the budgeted export: repair and reclaim without losing anything."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsave.errors import ExitCode, GuardError
from chatsave.model import Message
from chatsave.ops.dedupe import DedupeOptions, dedupe
from chatsave.ops.delete import delete
from chatsave.ops.diff import diff
from chatsave.ops.exporting import export_budgeted
from chatsave.ops.fetch import fetch
from chatsave.ops.gc import GcOptions, gc
from chatsave.ops.save import SaveOptions, save
from chatsave.ops.sync import SyncOptions, sync
from chatsave.ops.trash import restore
from chatsave.remote.base import Remote
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.store.store import Store
from tests.conftest import examples

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def m(chat: str, mid: str, text: str, seconds: float, role: str = "user") -> Message:
    return Message(chat_id=chat, id=mid, role=role, content=text,  # type: ignore[arg-type]
                   created_at=T0 + timedelta(seconds=seconds))


def push_raw(remote: Remote, chat: str, messages: list[Message], key: str) -> None:
    """What a non-idempotent client did: write these exact messages to the backend."""
    body = json.dumps({"messages": [x.to_wire() for x in messages]}).encode()
    answer = remote.save(chat, body, key)
    assert len(answer.saved) == len(messages)


def live(store: Store, chat: str) -> dict[str, str]:
    return dict(store.message_keys(chat))


def on_backend(remote: Remote, chat: str) -> dict[str, str]:
    out: dict[str, str] = {}
    after = None
    while True:
        page = remote.messages(chat, after=after)
        out.update({x.id: x.content_hash for x in page.messages if not x.deleted})
        if page.next is None:
            return out
        after = page.next


def storm() -> tuple[list[list[Message]], set[str], set[str]]:
    """100 messages sent three times with fresh ids after a timeout at message 50, plus a
    person's genuine repeats. Returns (attempts, survivor ids, genuine repeat ids)."""
    texts = [(f"storm message {i}", "user" if i % 2 == 0 else "assistant") for i in range(100)]
    first = [m("c", f"a1-{i}", t, i, r) for i, (t, r) in enumerate(texts[:50])]
    second = [m("c", f"a2-{i}", t, 60 + i * 0.1, r) for i, (t, r) in enumerate(texts)]
    third = [m("c", f"a3-{i}", t, 120 + i * 0.1, r) for i, (t, r) in enumerate(texts)]
    repeats = [m("c", "yes-1", "yes", 3600), m("c", "ok-1", "ok", 3601, "assistant"),
               m("c", "yes-2", "yes", 3900), m("c", "yes-3", "yes", 7200)]
    survivors = {x.id for x in first} | {f"a2-{i}" for i in range(50, 100)} | \
        {x.id for x in repeats}
    return [first, second, third, repeats], survivors, {x.id for x in repeats}


def test_retry_storm_is_repaired_everywhere(backend: Callable[[], Remote],
                                            stores: Callable[[str], Store]) -> None:
    remote = backend()
    attempts, survivors, repeats = storm()
    for n, batch in enumerate(attempts):
        push_raw(remote, "c", batch, f"storm-{n}")
    a, b = stores("a"), stores("b")
    for store in (a, b):
        assert sync(store, remote, None, SyncOptions()).exit_code == ExitCode.OK
    assert len(live(a, "c")) == 254
    found = diff(a, remote, ["c"])
    assert found.counters["duplicates_found"] == 150
    result = dedupe(a, remote, ["c"], DedupeOptions(max_delete="60%"))
    assert result.exit_code == ExitCode.OK, result.summary()
    assert result.counters["duplicates_found"] == 150
    assert result.counters["duplicates_removed"] == 150
    assert set(live(a, "c")) == survivors
    assert set(on_backend(remote, "c")) == survivors
    assert repeats <= set(live(a, "c"))  # a person's repeats are never removed
    assert diff(a, remote, ["c"]).exit_code == ExitCode.OK
    # B still holds every copy; its sync does not bring them back.
    assert len(live(b, "c")) == 254
    assert sync(b, remote, None, SyncOptions()).exit_code == ExitCode.OK
    assert set(live(b, "c")) == survivors
    assert set(on_backend(remote, "c")) == survivors
    # The run is undoable: its copies are in A's trash.
    assert a.conn.execute("SELECT COUNT(*) FROM trash WHERE run_id IS NULL").fetchone()[0] \
        == 150


def test_keep_last_and_unconfirmed_copies_stay(backend: Callable[[], Remote],
                                               stores: Callable[[str], Store]) -> None:
    remote = backend()
    a = stores("a")
    original = [m("c", "o1", "hello", 0), m("c", "o2", "hi there", 1, "assistant")]
    copies = [m("c", "c1", "hello", 30), m("c", "c2", "hi there", 31, "assistant")]
    with a.transaction():
        a.upsert_chat("c", None)
        a.add_messages("c", original + copies)
    # Nothing confirmed yet: the copies are found but not removed here.
    plan = dedupe(a, remote, ["c"], DedupeOptions(on="local"))
    assert plan.exit_code == ExitCode.PARTIAL
    assert plan.details["plan"]["kept_unconfirmed"] == 2
    assert len(live(a, "c")) == 4
    save(a, remote, None, SaveOptions())
    result = dedupe(a, remote, ["c"], DedupeOptions(keep="last"))
    assert result.exit_code == ExitCode.OK, result.summary()
    assert set(live(a, "c")) == {"c1", "c2"} == set(on_backend(remote, "c"))


def test_max_delete_refuses_and_changes_nothing(backend: Callable[[], Remote],
                                                stores: Callable[[str], Store]) -> None:
    remote = backend()
    attempts, _, _ = storm()
    for n, batch in enumerate(attempts):
        push_raw(remote, "c", batch, f"storm-{n}")
    a = stores("a")
    sync(a, remote, None, SyncOptions())
    before = (live(a, "c"), on_backend(remote, "c"))
    with pytest.raises(GuardError, match="more than --max-delete 10%"):
        dedupe(a, remote, ["c"], DedupeOptions(max_delete="10%"))
    with pytest.raises(GuardError):
        dedupe(a, remote, ["c"], DedupeOptions(max_delete="149"))
    # A dry run is not refused: it reports the plan and the refusal the real run meets.
    dry = dedupe(a, remote, ["c"], DedupeOptions(max_delete="149", dry_run=True))
    assert dry.exit_code == ExitCode.DIFFERENCES
    assert dry.counters["duplicates_found"] == 150
    assert dry.details["would_refuse"]["exit_code"] == ExitCode.GUARD
    assert dry.details["would_refuse"]["details"]["cap"] == 149
    assert (live(a, "c"), on_backend(remote, "c")) == before


# ---------------------------------------------------------------------------- gc and fetch
def _mixed_store(a: Store, b: Store, remote: Remote) -> dict[str, Message]:
    """Synced, pending, conflicting and rejected messages, with bodies worth evicting."""
    synced = [m("s", f"s{i}", f"synced {i} " + "x" * 2000, i) for i in range(20)]
    with a.transaction():
        a.upsert_chat("s", None)
        a.add_messages("s", synced)
    assert save(a, remote, None, SaveOptions()).exit_code == ExitCode.OK
    theirs = m("k", "k1", "their version " + "y" * 2000, 0)
    with b.transaction():
        b.upsert_chat("k", None)
        b.add_messages("k", [theirs])
    save(b, remote, None, SaveOptions())
    ours = m("k", "k1", "our version " + "z" * 2000, 0)
    pending = [m("p", f"p{i}", f"pending {i} " + "w" * 2000, i) for i in range(5)]
    with a.transaction():
        a.upsert_chat("k", None)
        a.add_messages("k", [ours])
        a.upsert_chat("p", None)
        a.add_messages("p", pending)
    assert sync(a, remote, ["k"], SyncOptions()).exit_code == ExitCode.CONFLICTS
    rejected = m("r", "r1", "rejected " + "v" * 2000, 0)
    with a.transaction():
        a.upsert_chat("r", None)
        a.add_messages("r", [rejected])
        a.conn.execute(
            "INSERT INTO remote_state SELECT backend_key, 'r', 'r1', 'rejected', NULL, ?,"
            " 'test', 'now' FROM backends WHERE backend_id = ?",
            (rejected.content_hash, remote.capabilities().backend_id))
    return {x.id: x for x in [*synced, ours, *pending, rejected]}


def test_gc_evicts_only_confirmed_bodies_and_fetch_brings_them_back(
        backend: Callable[[], Remote], stores: Callable[[str], Store]) -> None:
    remote = backend()
    a, b = stores("a"), stores("b")
    everything = _mixed_store(a, b, remote)
    before = {mid: msg.to_wire() for mid, msg in everything.items()}
    result = gc(a, remote, GcOptions(budget=20_000))
    evicted = {mid for mid, in a.conn.execute("SELECT id FROM messages WHERE evicted = 1")}
    assert evicted and evicted <= {f"s{i}" for i in range(20)}
    assert result.counters["evicted"] == len(evicted)
    assert result.details["bytes_after"] < result.details["bytes_before"]
    for mid in ("k1", "p0", "p4", "r1"):
        assert isinstance(a.get_message(mid[0], mid), Message)
    # diff still knows the stubs by hash: nothing differs for the synced chat.
    assert diff(a, remote, ["s"]).exit_code == ExitCode.OK
    fetched = fetch(a, remote, None)
    assert fetched.exit_code == ExitCode.OK and fetched.counters["written"] == len(evicted)
    for mid, wire in before.items():
        now = a.get_message(wire["chat_id"], mid)
        assert isinstance(now, Message) and now.to_wire() == wire


def test_gc_refuses_without_the_backend_and_when_it_looks_wiped(
        stores: Callable[[str], Store], tmp_path: Path) -> None:
    import shutil

    a = stores("a")
    with EmbeddedRemote(tmp_path / "b.db") as remote:
        remote.capabilities()
    shutil.copy(tmp_path / "b.db", tmp_path / "old.db")
    with EmbeddedRemote(tmp_path / "b.db") as remote:
        with a.transaction():
            a.upsert_chat("s", None)
            a.add_messages("s", [m("s", f"s{i}", "x" * 3000, i) for i in range(10)])
        assert sync(a, remote, None, SyncOptions()).exit_code == ExitCode.OK
    with pytest.raises(GuardError, match="budget of 0"):
        gc(a, None, GcOptions(budget=0))
    zero = gc(a, None, GcOptions(budget=0, dry_run=True))  # the dry run says so instead
    assert zero.exit_code == ExitCode.DIFFERENCES
    assert "budget of 0" in zero.details["would_refuse"]["message"]
    from chatsave.errors import UnavailableError, UsageError

    with pytest.raises(UsageError, match="needs the backend"):
        gc(a, None, GcOptions(budget=1000))
    dead = HttpRemote("http://127.0.0.1:9", policy=RetryPolicy(attempts=1))
    with dead, pytest.raises(UnavailableError):
        gc(a, dead, GcOptions(budget=1000))
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "b.db") + suffix).unlink(missing_ok=True)
    # Restored from a copy taken before the sync: same backend id, the chats are gone.
    shutil.copy(tmp_path / "old.db", tmp_path / "b.db")
    with EmbeddedRemote(tmp_path / "b.db") as wiped:
        with pytest.raises(GuardError, match="wiped"):
            gc(a, wiped, GcOptions(budget=1000))
        dry = gc(a, wiped, GcOptions(budget=1000, dry_run=True))
        assert dry.exit_code == ExitCode.DIFFERENCES
        assert "wiped" in dry.details["would_refuse"]["message"]
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "b.db") + suffix).unlink(missing_ok=True)
    # Replaced by another backend at the same address.
    with EmbeddedRemote(tmp_path / "b.db") as fresh:
        with pytest.raises(GuardError, match="now answers as backend"):
            gc(a, fresh, GcOptions(budget=1000))
        dry = gc(a, fresh, GcOptions(budget=1000, dry_run=True))
        assert dry.exit_code == ExitCode.DIFFERENCES
        assert dry.details["would_refuse"]["exit_code"] == ExitCode.GUARD
    assert a.conn.execute("SELECT COUNT(*) FROM messages WHERE evicted = 1").fetchone()[0] == 0


def test_gc_over_budget_with_nothing_safe_says_so(stores: Callable[[str], Store],
                                                  tmp_path: Path) -> None:
    a = stores("a")
    with a.transaction():
        a.upsert_chat("p", None)
        a.add_messages("p", [m("p", f"p{i}", "x" * 3000, i) for i in range(10)])
    with EmbeddedRemote(tmp_path / "b.db") as remote:
        result = gc(a, remote, GcOptions(budget=1000))
    assert result.exit_code == ExitCode.DIFFERENCES
    assert "nothing is safe to evict" in result.details["note"]
    assert a.conn.execute("SELECT COUNT(*) FROM messages WHERE evicted = 1").fetchone()[0] == 0


def test_trash_restore_gives_back_identical_content(backend: Callable[[], Remote],
                                                    stores: Callable[[str], Store]) -> None:
    remote = backend()
    a = stores("a")
    msgs = [m("c", f"m{i}", f"text {i}", i) for i in range(5)]
    with a.transaction():
        a.upsert_chat("c", "Title")
        a.add_messages("c", msgs)
    save(a, remote, None, SaveOptions())
    gone = delete(a, "c", ["m1", "m3"], run_id=7)
    assert gone.counters["deleted"] == 2
    save(a, remote, None, SaveOptions())
    assert set(on_backend(remote, "c")) == {"m0", "m2", "m4"}
    result = restore(a, remote, run_id=7)
    assert result.counters["written"] == 2
    assert result.counters["restored_on_backend"] == 2
    for msg in msgs:
        assert a.get_message("c", msg.id) == msg
    assert on_backend(remote, "c") == {x.id: x.content_hash for x in msgs}
    assert diff(a, remote, ["c"]).exit_code == ExitCode.OK


# --------------------------------------------------------------------- budgeted export
def test_localstorage_export_fits_and_keeps_every_unconfirmed_message(
        backend: Callable[[], Remote], stores: Callable[[str], Store], tmp_path: Path) -> None:
    from chatsave.formats import Source
    from chatsave.formats.localstorage import browser_bytes
    from chatsave.ops.importing import ImportOptions, import_source

    remote = backend()
    a = stores("a")
    for c in range(6):
        with a.transaction():
            a.upsert_chat(f"c{c}", None)
            a.add_messages(f"c{c}", [m(f"c{c}", f"c{c}-{i}", f"chat {c} message {i} "
                                       + "é" * 300, c * 100 + i) for i in range(10)])
    save(a, remote, None, SaveOptions())
    unconfirmed = [m("c0", f"new-{i}", f"not saved yet {i} " + "€" * 200, 5000 + i)
                   for i in range(5)]
    with a.transaction():
        a.add_messages("c0", unconfirmed)
    budget = 25_000
    out = tmp_path / "ls.json"
    with out.open("w") as fh:
        result = export_budgeted(a, [], fh, budget, remote.capabilities().backend_id)
    values = json.loads(out.read_text())
    assert browser_bytes(values) <= budget
    assert result.details["left_out_messages"] > 0
    other = Store.open(tmp_path / "other.db")
    try:
        source = Source.open(str(out))
        try:
            assert import_source(other, source, ImportOptions()).exit_code == ExitCode.OK
        finally:
            source.close()
        back = live(other, "c0")
        for msg in unconfirmed:
            assert back.get(msg.id) == msg.content_hash
    finally:
        other.close()
    with pytest.raises(GuardError), (tmp_path / "x.json").open("w") as fh:
        export_budgeted(a, [], fh, 2_000, remote.capabilities().backend_id)


# ----------------------------------------------------------- dry run plans == real runs
def _random_store(store: Store, remote: Remote, data: Any) -> None:
    texts = data.draw(st.lists(st.sampled_from(["a", "b", "c", "hello", "yes"]),
                               min_size=1, max_size=12), label="texts")
    msgs = [m("c", f"x{i}", t, i * data.draw(st.sampled_from([0, 1, 30, 900]), label="gap"),
              "user" if i % 2 else "assistant") for i, t in enumerate(texts)]
    # A copy of a random run, re-sent later with fresh ids.
    start = data.draw(st.integers(0, len(msgs) - 1), label="start")
    run = msgs[start:start + data.draw(st.integers(1, 4), label="run")]
    copies = [m("c", f"y{i}", x.content, 5000 + i, x.role) for i, x in enumerate(run)]
    push_raw(remote, "c", msgs[: len(msgs) // 2] + copies, "seed")
    with store.transaction():
        store.upsert_chat("c", None)
        store.add_messages("c", msgs + copies)
    if data.draw(st.booleans(), label="saved"):
        save(store, remote, None, SaveOptions())


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_dedupe_dry_run_plan_is_the_real_run(tmp_path_factory: pytest.TempPathFactory,
                                             data: Any) -> None:
    path = tmp_path_factory.mktemp("dd")
    with Store.open(path / "s.db") as store, EmbeddedRemote(path / "b.db") as remote:
        _random_store(store, remote, data)
        keep = data.draw(st.sampled_from(["first", "last"]), label="keep")
        on = data.draw(st.sampled_from(["local", "backend", "both"]), label="on")
        dry = dedupe(store, remote, ["c"], DedupeOptions(keep=keep, on=on, dry_run=True))
        real = dedupe(store, remote, ["c"], DedupeOptions(keep=keep, on=on))
        planned = [(r.id, r.original, r.removable_here, r.there) for r in dry.report[0].removals]
        applied = [(r.id, r.original, r.removable_here, r.there)
                   for r in real.report[0].removals]
        assert planned == applied
        removed_here = {r[0] for r in applied if r[2]}
        assert not removed_here & set(live(store, "c"))


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gc_dry_run_plan_is_the_real_run(tmp_path_factory: pytest.TempPathFactory,
                                         data: Any) -> None:
    path = tmp_path_factory.mktemp("gc")
    with Store.open(path / "s.db") as store, EmbeddedRemote(path / "b.db") as remote:
        n = data.draw(st.integers(1, 30), label="n")
        sizes = data.draw(st.lists(st.integers(10, 5000), min_size=n, max_size=n), label="sz")
        msgs = [m(f"c{i % 3}", f"m{i}", "x" * size, i * 60) for i, size in enumerate(sizes)]
        with store.transaction():
            for x in msgs:
                store.upsert_chat(x.chat_id, None)
                store.add_messages(x.chat_id, [x])
        saved = data.draw(st.integers(0, n), label="saved")
        for x in msgs[:saved]:
            push_raw(remote, x.chat_id, [x], f"k-{x.id}")
        save(store, remote, sorted({x.chat_id for x in msgs[:saved]}) or [], SaveOptions())
        options = {"budget": data.draw(st.integers(1, 200_000), label="budget"),
                   "keep_last": data.draw(st.none() | st.integers(0, 5), label="keep_last")}
        confirmed = {mid for mid, in store.conn.execute(
            "SELECT id FROM remote_state WHERE state = 'confirmed'")}
        dry = gc(store, remote, GcOptions(dry_run=True, **options))
        real = gc(store, remote, GcOptions(**options))
        assert dry.report[0].evict == real.report[0].evict
        assert dry.report[0].counts() == real.report[0].counts()
        evicted = {mid for mid, in store.conn.execute(
            "SELECT id FROM messages WHERE evicted = 1")}
        assert evicted <= confirmed


# ------------------------------------------------------------------------------- the CLI
def test_cli_safety_rails(cli: Any, tmp_path: Path) -> None:
    backend_path = str(tmp_path / "backend.db")
    source = tmp_path / "in.jsonl"
    msgs = [m("c", f"m{i}", f"text {i % 5}", i * 10) for i in range(10)]
    source.write_text("\n".join(json.dumps(x.to_wire()) for x in msgs) + "\n")
    assert cli("save", "--from", str(source), "--remote", backend_path).exit_code == 0
    no_yes = cli("dedupe", "c", "--remote", backend_path)
    assert no_yes.exit_code == 2 and "--yes" in no_yes.stderr
    dry = cli("dedupe", "c", "--remote", backend_path, "--dry-run", "--max-delete", "100%",
              "--json")
    assert dry.exit_code == 1 and dry.summary["duplicates_found"] == 5
    capped = cli("dedupe", "c", "--remote", backend_path, "--yes", "--json")
    assert capped.exit_code == 5 and capped.summary["error"]["code"] == "guard"
    done = cli("dedupe", "c", "--remote", backend_path, "--yes", "--max-delete", "5", "--json")
    assert done.exit_code == 0 and done.summary["duplicates_removed"] == 5
    runs = cli("status", "--json").summary["runs"]
    dedupe_run = next(r["run_id"] for r in runs if r["command"] == "dedupe" and
                      r["exit_code"] == 0)
    listed = cli("trash", "list", "--json")
    assert len([e for e in listed.json_lines() if e["type"] == "trash"]) == 5
    restored = cli("trash", "restore", "--run", str(dedupe_run), "--remote", backend_path,
                   "--json")
    assert restored.exit_code == 0 and restored.summary["written"] == 5
    assert cli("gc", "--budget", "0").exit_code == 5
    empty_no_yes = cli("trash", "empty", "--older-than", "0s")
    assert empty_no_yes.exit_code == 2
    gc_dry = cli("gc", "--budget", "1KB", "--remote", backend_path, "--dry-run", "--json")
    assert gc_dry.exit_code == 1 and gc_dry.summary["plan"]["bodies_evicted"] == 10
    assert cli("gc", "--budget", "1KB", "--remote", backend_path).exit_code in (0, 1)
    exported = cli("export")
    assert exported.exit_code == 1 and "evicted" in exported.stderr
    assert cli("fetch", "--all", "--remote", backend_path).exit_code == 0
    assert len(cli("export").stdout.splitlines()) == 10


def test_gc_evicts_nothing_a_backend_confirmed_only_by_identity(
        stores: Callable[[str], Store], tmp_path: Path) -> None:
    """A backend that confirms by id, role and text (AutoBot) cannot give bodies back
    byte-identical: gc keeps them all."""

    class IdentityBackend(EmbeddedRemote):
        def capabilities(self) -> Any:
            caps = super().capabilities()
            return caps.model_copy(update={"features": [*caps.features, "identity_hashes"]})

    a = stores("a")
    with IdentityBackend(tmp_path / "b.db") as remote:
        with a.transaction():
            a.upsert_chat("s", None)
            a.add_messages("s", [m("s", f"s{i}", "x" * 3000, i) for i in range(10)])
        assert save(a, remote, None, SaveOptions()).exit_code == ExitCode.OK
        result = gc(a, remote, GcOptions(budget=1000))
    assert result.exit_code == ExitCode.DIFFERENCES
    assert "not by their exact content" in result.details["note"]
    assert a.conn.execute("SELECT COUNT(*) FROM messages WHERE evicted = 1").fetchone()[0] == 0


def test_a_copy_is_removed_here_when_the_backend_holds_its_original(
        backend: Callable[[], Remote], stores: Callable[[str], Store]) -> None:
    remote = backend()
    a = stores("a")
    original = [m("c", "o1", "hello", 0), m("c", "o2", "hi there", 1, "assistant")]
    with a.transaction():
        a.upsert_chat("c", None)
        a.add_messages("c", original)
    save(a, remote, None, SaveOptions())
    copies = [m("c", "c1", "hello", 30), m("c", "c2", "hi there", 31, "assistant")]
    with a.transaction():
        a.add_messages("c", copies)  # never sent: only the originals are on the backend
    result = dedupe(a, remote, ["c"], DedupeOptions())
    assert result.exit_code == ExitCode.OK, result.summary()
    assert set(live(a, "c")) == {"o1", "o2"} == set(on_backend(remote, "c"))
