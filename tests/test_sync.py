"""diff, sync and delete: every category and every sync action, on the embedded and HTTP remotes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import ExitCode
from chatsave.model import Message
from chatsave.ops.delete import delete
from chatsave.ops.diff import diff
from chatsave.ops.save import SaveOptions, save
from chatsave.ops.sync import SyncOptions, in_shard, sync
from chatsave.remote.base import Remote
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.store.store import Store
from tests.conftest import Soak, table_dump

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)


def msg(chat_id: str, mid: str, content: str | None = None, minute: int = 0) -> Message:
    return Message(chat_id=chat_id, id=mid, role="user", content=content or f"text of {mid}",
                   created_at=T0 + timedelta(minutes=minute))


def add(store: Store, *messages: Message) -> None:
    with store.transaction():
        for m in messages:
            store.upsert_chat(m.chat_id, None)
            store.add_messages(m.chat_id, [m])


def live(store: Store, chat_id: str) -> dict[str, str]:
    return dict(store.message_keys(chat_id))


def on_backend(remote: Remote, chat_id: str) -> dict[str, str]:
    page = remote.messages(chat_id, limit=1000)
    return {m.id: m.content_hash for m in page.messages if not m.deleted}


def run_sync(store: Store, remote: Remote, chats: list[str] | None = None,
             **options: Any) -> Any:
    return sync(store, remote, chats, SyncOptions(**options))


@pytest.fixture
def scene(backend: Callable[[], Remote], stores: Callable[[str], Store]) -> dict[str, Any]:
    """Store A and the backend differing in every way, B being the other client.

    c: a1 in both; a2 only in A; r1 only on the backend; k1 in conflict; t1 deleted on the
    backend (live in A); t2 deleted in A (live on the backend).
    """
    remote = backend()
    a, b = stores("a"), stores("b")
    add(b, msg("c", "a1", minute=1), msg("c", "r1", minute=2), msg("c", "k1", "theirs", 3),
        msg("c", "t1", minute=4), msg("c", "t2", minute=5))
    assert save(b, remote, None, SaveOptions()).exit_code == ExitCode.OK
    add(a, msg("c", "a1", minute=1), msg("c", "a2", minute=6), msg("c", "k1", "ours", 3),
        msg("c", "t1", minute=4), msg("c", "t2", minute=5))
    with a.transaction():
        a.trash_messages("c", ["t2"], "test", None)
    delete(b, "c", ["t1"])
    assert save(b, remote, None, SaveOptions()).counters["deleted_remote"] == 1
    return {"remote": remote, "a": a, "b": b}


def test_diff_shows_every_category(scene: dict[str, Any], tmp_path: Path) -> None:
    a, remote = scene["a"], scene["remote"]
    before = table_dump(a.path)
    out = tmp_path / "combined.txt"
    events: list[dict[str, Any]] = []
    with out.open("w") as fh:
        result = diff(a, remote, ["c"], emit=lambda t, **f: events.append({"type": t, **f}),
                      combined=fh)
    assert result.exit_code == ExitCode.DIFFERENCES
    lines = sorted(out.read_text().splitlines())
    assert lines == sorted(["= c a1", "+ c a2", "- c r1", "* c k1", "x c t1", "x c t2"])
    items = {e["id"]: e for e in events if e["type"] == "item"}
    assert items["k1"]["local_hash"] != items["k1"]["remote_hash"]
    chat = next(e for e in events if e["type"] == "chat")
    assert chat["in_agreement"] is False and chat["conflict"] == 1
    assert "theirs" not in json.dumps(events) and "ours" not in json.dumps(events)
    # diff never writes the store.
    assert table_dump(a.path) == before


def test_sync_applies_every_action_and_leaves_conflicts(scene: dict[str, Any]) -> None:
    a, b, remote = scene["a"], scene["b"], scene["remote"]
    result = run_sync(a, remote, ["c"])
    assert result.exit_code == ExitCode.CONFLICTS
    plan = result.details["plan"]
    assert (plan["push"], plan["pull"], plan["delete_here"], plan["delete_on_backend"],
            plan["conflicts"]) == (1, 1, 1, 1, 1)
    assert set(live(a, "c")) == {"a1", "a2", "r1", "k1"}
    assert set(on_backend(remote, "c")) == {"a1", "a2", "r1", "k1"}
    assert live(a, "c")["k1"] != on_backend(remote, "c")["k1"]  # both versions kept
    # t1 went to A's trash (undoable), t2 is a tombstone on the backend.
    assert a.conn.execute("SELECT id FROM trash WHERE reason = 'deleted on the backend'"
                          ).fetchall() == [("t1",)]
    # Idempotent: again, only the conflict remains.
    again = run_sync(a, remote, ["c"])
    assert again.exit_code == ExitCode.CONFLICTS
    assert again.details["plan"]["push"] == 0 and again.details["plan"]["pull"] == 0
    # --prefer local wins over the version seen; B, unchanged, then takes it.
    resolved = run_sync(a, remote, ["c"], prefer="local")
    assert resolved.exit_code == ExitCode.OK, resolved.summary()
    assert on_backend(remote, "c") == live(a, "c")
    b_sync = run_sync(b, remote, ["c"])
    assert b_sync.exit_code == ExitCode.OK, b_sync.summary()
    assert live(b, "c") == live(a, "c") == on_backend(remote, "c")
    assert diff(a, remote, ["c"]).exit_code == ExitCode.OK
    assert diff(b, remote, None).exit_code == ExitCode.OK


def test_prefer_backend_takes_their_version(scene: dict[str, Any]) -> None:
    a, remote = scene["a"], scene["remote"]
    run_sync(a, remote, ["c"])
    result = run_sync(a, remote, ["c"], prefer="backend")
    assert result.exit_code == ExitCode.OK, result.summary()
    assert live(a, "c") == on_backend(remote, "c")
    k1 = a.get_message("c", "k1")
    assert isinstance(k1, Message) and k1.content == "theirs"
    trashed = a.conn.execute("SELECT message FROM trash WHERE id = 'k1'").fetchone()
    assert json.loads(trashed[0])["content"] == "ours"  # the replaced version is kept


def test_push_only_and_pull_only(scene: dict[str, Any]) -> None:
    a, remote = scene["a"], scene["remote"]
    pushed = run_sync(a, remote, ["c"], pull=False)
    assert "r1" not in live(a, "c") and "a2" in on_backend(remote, "c")
    assert "t1" in live(a, "c")  # deletions on the backend are not pulled either
    assert pushed.exit_code == ExitCode.CONFLICTS
    pulled = run_sync(a, remote, ["c"], push=False)
    assert "r1" in live(a, "c") and "t1" not in live(a, "c")
    assert pulled.details["plan"]["push"] == 0


def test_deleted_messages_never_come_back(scene: dict[str, Any], tmp_path: Path) -> None:
    a, b, remote = scene["a"], scene["b"], scene["remote"]
    run_sync(a, remote, ["c"], prefer="local")
    run_sync(b, remote, ["c"])
    # Re-importing an old copy that still holds the deleted messages changes nothing.
    from chatsave.formats import Source
    from chatsave.ops.importing import ImportOptions, import_source

    old = tmp_path / "old.jsonl"
    old.write_text("\n".join(json.dumps(msg("c", mid, minute=m).to_wire())
                             for mid, m in (("t1", 4), ("t2", 5))) + "\n")
    for store in (a, b):
        source = Source.open(str(old))
        try:
            imported = import_source(store, source, ImportOptions())
        finally:
            source.close()
        assert imported.counters["written"] == 0
        assert imported.counters["skipped_deleted"] == 2
        assert run_sync(store, remote, ["c"]).exit_code == ExitCode.OK
        assert not {"t1", "t2"} & set(live(store, "c"))
    assert not {"t1", "t2"} & set(on_backend(remote, "c"))


def test_restored_here_is_restored_on_the_backend(backend: Callable[[], Remote],
                                                  stores: Callable[[str], Store]) -> None:
    remote = backend()
    a = stores("a")
    add(a, msg("c", "m1"), msg("c", "m2"))
    run_sync(a, remote, ["c"])
    delete(a, "c", ["m1"])
    run_sync(a, remote, ["c"])
    assert set(on_backend(remote, "c")) == {"m2"}
    # Restore by hand, as `trash restore` does: the message is live again here and the
    # store remembers that the backend deleted it.
    row = a.conn.execute("SELECT message FROM trash WHERE id = 'm1'").fetchone()
    with a.transaction():
        a.conn.execute("DELETE FROM tombstones WHERE id = 'm1'")
        a.add_messages("c", [Message.model_validate(json.loads(row[0]))])
    result = run_sync(a, remote, ["c"])
    assert result.exit_code == ExitCode.OK, result.summary()
    assert set(on_backend(remote, "c")) == {"m1", "m2"}


def test_backend_changed_underneath_is_guarded(stores: Callable[[str], Store],
                                               tmp_path: Path) -> None:
    a = stores("a")
    path = tmp_path / "backend.db"
    with EmbeddedRemote(path) as remote:
        add(a, msg("c", "m1"), msg("d", "m2"))
        assert run_sync(a, remote, None).exit_code == ExitCode.OK
    # The backend file is replaced by another one at the same address.
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with EmbeddedRemote(path) as fresh:
        add(a, msg("c", "m3"))
        # A dry run is not refused: it says what guard the real run meets.
        dry = run_sync(a, fresh, None, dry_run=True)
        assert dry.exit_code == ExitCode.DIFFERENCES
        assert "synced with backend" in dry.details["would_refuse"]["message"]
        assert dry.details["would_refuse"]["exit_code"] == ExitCode.GUARD
        result = run_sync(a, fresh, None)
        assert result.exit_code == ExitCode.GUARD
        assert "synced with backend" in result.details["guard"][0]
        # What is only here is still pushed; nothing deleted here.
        assert set(on_backend(fresh, "c")) == {"m1", "m3"}
        assert set(live(a, "c")) == {"m1", "m3"}
        assert run_sync(a, fresh, None).exit_code == ExitCode.OK


def test_backend_restored_from_an_old_copy_is_guarded(stores: Callable[[str], Store],
                                                      tmp_path: Path) -> None:
    a, b = stores("a"), stores("b")
    path = tmp_path / "backend.db"
    with EmbeddedRemote(path) as remote:
        add(a, msg("old", "m0"))
        run_sync(a, remote, None)
    shutil.copy(path, tmp_path / "copy.db")
    with EmbeddedRemote(path) as remote:
        add(a, msg("c", "m1"), msg("c", "m2"))
        assert run_sync(a, remote, None).exit_code == ExitCode.OK
        run_sync(b, remote, None)
        delete(b, "c", ["m1"])
        run_sync(b, remote, None)
        run_sync(a, remote, None)
        assert set(live(a, "c")) == {"m2"}
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copy(tmp_path / "copy.db", path)
    with EmbeddedRemote(path) as remote:
        dry = run_sync(a, remote, None, dry_run=True)
        assert dry.exit_code == ExitCode.DIFFERENCES
        assert "looks wiped" in dry.details["would_refuse"]["message"]
        result = run_sync(a, remote, None)
        assert result.exit_code == ExitCode.GUARD
        assert "looks wiped" in result.details["guard"][0]
        assert set(live(a, "c")) == {"m2"}  # its deletion had arrived before; nothing lost
        assert set(on_backend(remote, "c")) == {"m2"}  # re-pushed what was only here


def test_dry_run_plan_changes_nothing(scene: dict[str, Any]) -> None:
    a, remote = scene["a"], scene["remote"]
    before = table_dump(a.path)
    backend_before = on_backend(remote, "c")
    plan = run_sync(a, remote, ["c"], dry_run=True)
    assert plan.exit_code == ExitCode.CONFLICTS
    after = table_dump(a.path)
    after.pop("backends"), before.pop("backends")
    assert after == before
    assert on_backend(remote, "c") == backend_before
    applied = run_sync(a, remote, ["c"])
    assert applied.details["plan"] == plan.details["plan"]


def test_shards_split_without_overlap() -> None:
    ids = [f"chat-{i}" for i in range(300)]
    for n in (1, 2, 3, 7):
        slices = [{c for c in ids if in_shard(c, (i, n))} for i in range(1, n + 1)]
        assert set().union(*slices) == set(ids)
        assert sum(len(s) for s in slices) == len(ids)


def test_sync_all_includes_chats_only_on_the_backend(backend: Callable[[], Remote],
                                                     stores: Callable[[str], Store]) -> None:
    remote = backend()
    a, b = stores("a"), stores("b")
    add(a, *(msg(f"chat{i}", f"m{i}") for i in range(5)))
    run_sync(a, remote, None)
    result = run_sync(b, remote, None, shard=(1, 1))
    assert result.exit_code == ExitCode.OK
    assert sorted(b.chat_ids()) == [f"chat{i}" for i in range(5)]
    assert diff(b, remote, None).exit_code == ExitCode.OK


# ----------------------------------------------------------------------- the CLI
def test_cli_diff_sync_delete(cli: Any, tmp_path: Path) -> None:
    backend_path = tmp_path / "backend.db"
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(msg("c", f"m{i}", minute=i).to_wire())
                                for i in range(3)) + "\n")
    assert cli("import", str(source)).exit_code == 0
    combined = tmp_path / "combined.txt"
    ran = cli("diff", "--all", "--remote", str(backend_path), "--combined", str(combined),
              "--json")
    assert ran.exit_code == 1 and ran.summary["pending_push"] == 3
    assert combined.read_text().count("+ c ") == 3
    assert cli("sync", "--all", "--remote", str(backend_path)).exit_code == 0
    assert cli("diff", "c", "--remote", str(backend_path)).exit_code == 0
    # Delete needs --yes without a terminal; --dry-run shows what would go.
    refused = cli("delete", "c", "m1", "--remote", str(backend_path))
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    dry = cli("delete", "c", "--dry-run", "--json")
    assert dry.exit_code == 1 and dry.summary["would_delete"] == 3
    done = cli("delete", "c", "m1", "--yes", "--remote", str(backend_path), "--json")
    assert done.exit_code == 0, done.stderr
    assert done.summary["deleted"] == 1 and done.summary["deleted_remote"] == 1
    status = cli("status", "--json").summary
    assert status["in_trash"] == 1 and status["messages"] == 2
    missing = cli("delete", "c", "m1", "--yes")
    assert missing.exit_code == 2 and "already deleted" in missing.stderr
    assert cli("diff", "--all", "--remote", str(backend_path)).exit_code == 0
    prefer_all = cli("sync", "--all", "--prefer", "local", "--remote", str(backend_path))
    assert prefer_all.exit_code == 2


@pytest.mark.slow
def test_no_change_diff_over_10000_chats_costs_few_requests(tmp_path: Path, stores: Any,
                                                            make_app: Any,
                                                            start_server: Any,
                                                            soak: Soak) -> None:
    from tests.faults import Faults

    path = tmp_path / "server.db"
    server = start_server(make_app(path, faults=Faults()))
    a = stores("a")
    chats = soak.size(10_000, 2_500)  # the sample still spans several pages of 1,000
    messages = [msg(f"chat{i:05d}", "m1") for i in range(chats)]
    with EmbeddedRemote(path) as seeder:
        for m in messages:
            body = json.dumps({"messages": [m.to_wire()]}).encode()
            seeder.save(m.chat_id, body, f"seed-{m.chat_id}")
    with a.transaction():
        for m in messages:
            a.upsert_chat(m.chat_id, None)
            a.add_messages(m.chat_id, [m])
    server.faults.clear()
    with HttpRemote(server.url, policy=FAST) as remote:
        diffed = diff(a, remote, None)
        assert diffed.exit_code == ExitCode.OK
        assert diffed.details["chats"] == chats
        diff_requests = len(server.faults.log)
        server.faults.clear()
        synced = sync(a, remote, None, SyncOptions())
        sync_requests = len(server.faults.log)
    assert synced.exit_code == ExitCode.OK
    assert diff_requests <= 15, diff_requests
    assert sync_requests <= 15, sync_requests
