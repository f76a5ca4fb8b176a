"""What a new user, a cron job and a support engineer meet in their first hour, through the
CLI: a dry run is never refused, an unknown chat is never a success, conflicts are named."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.errors import ExitCode, UsageError
from chatsave.ops.dedupe import delete_cap
from chatsave.remote.base import Remote
from tests.conftest import Ran, table_dump

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def wire(chat: str, mid: str, text: str, seconds: float, role: str = "user") -> dict[str, Any]:
    when = (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
    return {"chat_id": chat, "id": mid, "role": role, "content": text,
            "created_at": when.replace("+00:00", "Z")}


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def events(ran: Ran, type_: str) -> list[dict[str, Any]]:
    return [e for e in ran.json_lines() if e["type"] == type_]


def retried(tmp_path: Path, copies: int) -> Path:
    """Nine messages of chat c, the last ``copies`` of them retry copies of the first ones
    (same text, the same run re-sent in order after the originals)."""
    originals = 9 - copies
    rows = [wire("c", f"m{i}", f"text {i}", i * 10) for i in range(originals)]
    rows += [wire("c", f"m{originals + i}", f"text {i}", 100 + i * 10) for i in range(copies)]
    return jsonl(tmp_path / "retried.jsonl", rows)


# ------------------------------------------------------- 2. a dry run is never refused
def test_max_delete_rounds_up() -> None:
    assert delete_cap("10%", 9) == 1
    assert delete_cap("10%", 30) == 3  # exactly, not 3.0000000000000004 rounded up to 4
    assert delete_cap("12.5%", 8) == 1
    assert delete_cap("0%", 9) == 0
    assert delete_cap("100%", 9) == 9
    assert delete_cap("4", 9) == 4
    assert delete_cap(None, 9) is None
    for bad in ("abc%", "nan%", "150%", "-1", "1/2%", "inf%"):
        with pytest.raises(UsageError, match="--max-delete"):
            delete_cap(bad, 9)


def test_dedupe_dry_run_without_a_terminal_shows_the_plan_and_the_cap(
        cli: Callable[..., Ran], tmp_path: Path) -> None:
    backend = str(tmp_path / "backend.db")
    assert cli("save", "--from", str(retried(tmp_path, 4)), "--remote", backend).exit_code == 0
    # The README's support flow, step 4, as written: --all --dry-run, no terminal.
    dry = cli("dedupe", "--all", "--dry-run", "--remote", backend, "--json")
    assert dry.exit_code == ExitCode.DIFFERENCES, dry.stdout
    summary = dry.summary
    assert summary["duplicates_found"] == 4 and summary["would_remove"] == 4
    assert summary["read"] == 9 and summary["plan"]["copies"] == 4
    assert summary["would_refuse"]["exit_code"] == ExitCode.GUARD
    assert summary["would_refuse"]["details"] == {"would_remove": 4, "cap": 1, "scope": 9}
    assert "error" not in summary
    assert len(events(dry, "duplicate")) == 4
    human = cli("dedupe", "--all", "--dry-run", "--remote", backend)
    assert human.exit_code == ExitCode.DIFFERENCES
    assert "the real run would be refused" in human.stderr
    assert "--max-delete 4" in human.stderr  # how to allow it
    assert "needs --yes" in human.stderr
    assert "'m5' (a copy of 'm0')" in human.stderr  # the plan, by id
    # The real run is refused by the cap, changing nothing, and says so with the counts.
    before = table_dump(tmp_path / "home" / "store.db")
    real = cli("dedupe", "--all", "--yes", "--remote", backend, "--json")
    assert real.exit_code == ExitCode.GUARD
    assert real.summary["error"]["details"]["would_remove"] == 4
    after = table_dump(tmp_path / "home" / "store.db")
    assert after["messages"] == before["messages"] and after["trash"] == before["trash"]
    allowed = cli("dedupe", "--all", "--yes", "--max-delete", "4", "--remote", backend,
                  "--json")
    assert allowed.exit_code == 0 and allowed.summary["duplicates_removed"] == 4
    # Nothing left to remove: the dry run exits 0.
    assert cli("dedupe", "--all", "--dry-run", "--remote", backend).exit_code == 0


def test_a_percentage_cap_rounds_up(cli: Callable[..., Ran], tmp_path: Path) -> None:
    backend = str(tmp_path / "backend.db")
    assert cli("save", "--from", str(retried(tmp_path, 2)), "--remote", backend).exit_code == 0
    # 2 copies in 9 messages; a run refused at 10% (1 of 9), allowed at 20% (2 of 9: 1.8
    # rounded up), where rounding down would allow only 1.
    assert cli("dedupe", "c", "--yes", "--remote", backend).exit_code == ExitCode.GUARD
    ran = cli("dedupe", "c", "--yes", "--max-delete", "20%", "--remote", backend, "--json")
    assert ran.exit_code == 0, ran.stdout
    assert ran.summary["duplicates_removed"] == 2


def _sync_then_replace(cli: Callable[..., Ran], tmp_path: Path) -> str:
    """A store synced with a backend that is then replaced by a fresh one at its path."""
    path = tmp_path / "backend.db"
    rows = [wire("c", f"m{i}", f"text {i} " + "x" * 3000, i) for i in range(10)]
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", rows))).exit_code == 0
    assert cli("sync", "--all", "--remote", str(path)).exit_code == 0
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return str(path)


def test_gc_and_sync_dry_runs_say_what_guard_the_real_run_meets(cli: Callable[..., Ran],
                                                               tmp_path: Path) -> None:
    backend = _sync_then_replace(cli, tmp_path)
    sync_dry = cli("sync", "--all", "--dry-run", "--remote", backend, "--json")
    assert sync_dry.exit_code == ExitCode.DIFFERENCES, sync_dry.stdout
    assert sync_dry.summary["would_refuse"]["exit_code"] == ExitCode.GUARD
    assert "synced with backend" in sync_dry.summary["would_refuse"]["message"]
    assert sync_dry.summary["pending_push"] == 10
    gc_dry = cli("gc", "--budget", "1KB", "--dry-run", "--remote", backend, "--json")
    assert gc_dry.exit_code == ExitCode.DIFFERENCES, gc_dry.stdout
    assert gc_dry.summary["would_refuse"]["exit_code"] == ExitCode.GUARD
    human = cli("gc", "--budget", "1KB", "--dry-run", "--remote", backend)
    assert "the real run would be refused (exit 5)" in human.stderr
    assert "chatsave sync --all" in human.stderr  # how to get past it
    zero = cli("gc", "--budget", "0", "--dry-run", "--remote", backend, "--json")
    assert zero.exit_code == ExitCode.DIFFERENCES
    assert "budget of 0" in zero.summary["would_refuse"]["message"]
    # The real runs meet the guards; nothing was evicted by any of it.
    assert cli("gc", "--budget", "1KB", "--remote", backend).exit_code == ExitCode.GUARD
    assert cli("gc", "--budget", "0", "--remote", backend).exit_code == ExitCode.GUARD
    assert cli("status", "--json").summary["evicted"] == 0
    assert cli("sync", "--all", "--remote", backend).exit_code == ExitCode.GUARD
    assert cli("sync", "--all", "--remote", backend).exit_code == 0


def test_delete_and_trash_empty_dry_runs_say_the_real_run_needs_yes(
        cli: Callable[..., Ran], tmp_path: Path) -> None:
    rows = [wire("c", f"m{i}", f"text {i}", i) for i in range(3)]
    assert cli("import", str(jsonl(tmp_path / "in.jsonl", rows))).exit_code == 0
    dry = cli("delete", "c", "m1", "--dry-run")
    assert dry.exit_code == ExitCode.DIFFERENCES and "needs --yes" in dry.stderr
    assert cli("delete", "c", "m1").exit_code == ExitCode.USAGE  # no terminal, no --yes
    assert cli("delete", "c", "m1", "--yes").exit_code == 0
    empty = cli("trash", "empty", "--older-than", "0s", "--dry-run", "--json")
    assert empty.exit_code == ExitCode.DIFFERENCES and empty.summary["would_delete"] == 1
    assert "needs --yes" in cli("trash", "empty", "--older-than", "0s", "--dry-run").stderr
    assert cli("delete", "c", "m2", "--dry-run", "--yes").stderr.count("needs --yes") == 0


# -------------------------------------------------------- 3. unknown chats are exit 2
REMOTE = "{remote}"  # replaced by the backend's --remote
UNKNOWN_CHAT = {
    "sync": ("sync", "nosuch", "--remote", REMOTE),
    "diff": ("diff", "nosuch", "--remote", REMOTE),
    "dedupe": ("dedupe", "nosuch", "--dry-run", "--remote", REMOTE),
    "dedupe-yes": ("dedupe", "nosuch", "--yes", "--remote", REMOTE),
    "fetch": ("fetch", "nosuch", "--remote", REMOTE),
    "save": ("save", "nosuch", "--remote", REMOTE),
    "export": ("export", "nosuch", "--output", "{tmp}/out.jsonl"),
    "delete": ("delete", "nosuch", "--yes", "--remote", REMOTE),
    "doctor": ("doctor", "nosuch"),  # examines the local copy (AutoBot remotes only)
    "status": ("status", "nosuch"),
    "status-refresh": ("status", "nosuch", "--refresh", "--remote", REMOTE),
    "sync-some": ("sync", "c", "nosuch", "--remote", REMOTE),
    "diff-some": ("diff", "c", "nosuch", "other", "--remote", REMOTE),
}


@pytest.mark.parametrize("command", list(UNKNOWN_CHAT))
def test_a_chat_neither_side_has_is_a_usage_error(cli: Callable[..., Ran], tmp_path: Path,
                                                  command: str) -> None:
    backend = str(tmp_path / "backend.db")
    rows = [wire("c", "m1", "hello", 0)]
    assert cli("save", "--from", str(jsonl(tmp_path / "in.jsonl", rows)),
               "--remote", backend).exit_code == 0
    before = table_dump(tmp_path / "home" / "store.db")
    args = [a.format(remote=backend, tmp=tmp_path) for a in UNKNOWN_CHAT[command]]
    ran = cli(*args, "--json")
    assert ran.exit_code == ExitCode.USAGE, (ran.stdout, ran.stderr)
    assert ran.summary["exit_code"] == ExitCode.USAGE
    assert "'nosuch'" in ran.stderr
    after = table_dump(tmp_path / "home" / "store.db")
    for table in ("runs", "backends"):  # the run's own record, the backend asked
        after.pop(table, None), before.pop(table, None)
    assert after == before


def test_a_chat_only_on_the_backend_is_fine_where_the_command_can_act(
        cli: Callable[..., Ran], backend: Callable[[], Remote], tmp_path: Path) -> None:
    url = backend().url
    rows = [wire("far", "f1", "hello", 0), wire("far", "f2", "hello", 0),
            wire("far", "f3", "bye", 1)]
    other = ("--store", str(tmp_path / "other.db"))
    assert cli("save", "--from", str(jsonl(tmp_path / "in.jsonl", rows)), *other,
               "--remote", url).exit_code == 0
    here = [wire("near", "n1", "hi", 0)]
    assert cli("import", str(jsonl(tmp_path / "here.jsonl", here))).exit_code == 0
    diffed = cli("diff", "far", "--remote", url, "--json")
    assert diffed.exit_code == ExitCode.DIFFERENCES
    assert (diffed.summary["pending_pull"], diffed.summary["duplicates_found"]) == (2, 1)
    dry = cli("dedupe", "far", "--dry-run", "--on", "backend", "--remote", url, "--json")
    assert dry.exit_code == ExitCode.DIFFERENCES and dry.summary["duplicates_found"] == 1
    pulled = cli("sync", "far", "--remote", url, "--json")
    assert pulled.exit_code == 0 and pulled.summary["pulled"] == 3
    after = cli("diff", "far", "--remote", url, "--json").summary
    assert (after["pending_pull"], after["unchanged"], after["duplicates_found"]) == (0, 2, 1)


# ------------------------------------------------------------- 10. conflicts, named
@pytest.fixture
def conflicted(cli: Callable[..., Ran], backend: Callable[[], Remote],
               tmp_path: Path) -> str:
    """Chat trip: m1 the same on both sides, m2 in conflict (ours here, theirs there), m3
    only here; chat work: k1 in conflict. Returns the backend's --remote."""
    url = backend().url
    theirs = [wire("trip", "m1", "hello", 0), wire("trip", "m2", "theirs", 60),
              wire("work", "k1", "their plan", 0)]
    assert cli("save", "--from", str(jsonl(tmp_path / "b.jsonl", theirs)),
               "--store", str(tmp_path / "b.db"), "--remote", url).exit_code == 0
    ours = [wire("trip", "m1", "hello", 0), wire("trip", "m2", "ours", 60),
            wire("work", "k1", "our plan", 0)]
    assert cli("import", str(jsonl(tmp_path / "a.jsonl", ours))).exit_code == 0
    synced = cli("sync", "--all", "--remote", url)
    assert synced.exit_code == ExitCode.CONFLICTS
    assert cli("import", str(jsonl(tmp_path / "a2.jsonl", [wire("trip", "m3", "new", 120)]))
               ).exit_code == 0
    return url


def test_sync_and_diff_name_the_chats_and_messages_in_conflict(
        cli: Callable[..., Ran], conflicted: str) -> None:
    synced = cli("sync", "--all", "--push-only", "--remote", conflicted)
    assert synced.exit_code == ExitCode.CONFLICTS
    assert "chat 'trip': 'm2'" in synced.stderr and "chat 'work': 'k1'" in synced.stderr
    assert "chatsave diff trip m2" in synced.stderr
    assert "CHAT " not in synced.stderr  # no placeholder left to fill in
    dry = cli("sync", "trip", "--dry-run", "--remote", conflicted)
    assert dry.exit_code == ExitCode.CONFLICTS and "chat 'trip': 'm2'" in dry.stderr
    diffed = cli("diff", "trip", "--remote", conflicted)
    assert diffed.exit_code == ExitCode.DIFFERENCES
    assert "* conflict: 'm2'" in diffed.stdout
    assert "chatsave diff trip m2" in diffed.stderr
    assert "ours" not in diffed.stdout + diffed.stderr
    # Two chats are still two chats.
    both = cli("diff", "trip", "work", "--remote", conflicted, "--json")
    assert both.exit_code == ExitCode.DIFFERENCES and both.summary["chats"] == 2


def test_diff_chat_message_shows_both_versions_text_only_when_asked(
        cli: Callable[..., Ran], conflicted: str, tmp_path: Path) -> None:
    ran = cli("diff", "trip", "m2", "--remote", conflicted)
    assert ran.exit_code == ExitCode.DIFFERENCES, ran.stderr
    out = ran.stdout
    assert "conflict" in out and "here" in out and conflicted in out
    for field in ("role", "type", "time", "content_hash", "rev", "state"):
        assert field in out
    assert "2026-03-01T10:01:00.000Z" in out
    assert "ours" not in out + ran.stderr and "theirs" not in out + ran.stderr
    assert "--show-text" in ran.stderr
    # Both hashes, side by side.
    quiet = cli("diff", "trip", "m2", "--remote", conflicted, "--json")
    (event,) = events(quiet, "message")
    assert event["symbol"] == "*" and event["here"]["content_hash"] != \
        event["backend"]["content_hash"]
    assert event["here"]["content_hash"][:16] in out
    assert event["backend"]["content_hash"][:16] in out
    assert event["backend"]["rev"] >= 1 and event["here"]["agreed"]["state"] == "conflict"
    assert "ours" not in quiet.stdout and "theirs" not in quiet.stdout
    assert quiet.summary["conflicts"] == 1 and quiet.summary["exit_code"] == 1
    # --show-text lets the text out: on stdout, or in the one message event.
    shown = cli("diff", "trip", "m2", "--remote", conflicted, "--show-text")
    assert shown.exit_code == ExitCode.DIFFERENCES
    assert "ours" in shown.stdout and "theirs" in shown.stdout
    texts = cli("diff", "trip", "m2", "--remote", conflicted, "--show-text", "--json")
    holding = [e for e in texts.json_lines() if "ours" in json.dumps(e)]
    assert [e["type"] for e in holding] == ["message"]
    assert holding[0]["here"]["content"] == "ours"
    assert holding[0]["backend"]["content"] == "theirs"
    assert "ours" not in json.dumps(texts.summary)
    runs = table_dump(tmp_path / "home" / "store.db")["runs"]
    assert "ours" not in repr(runs) and "theirs" not in repr(runs)
    # Exit codes: the same on both sides 0, only here 1, neither side 2.
    same = cli("diff", "trip", "m1", "--remote", conflicted, "--json")
    assert same.exit_code == 0 and events(same, "message")[0]["symbol"] == "="
    only_here = cli("diff", "trip", "m3", "--remote", conflicted, "--json")
    assert only_here.exit_code == ExitCode.DIFFERENCES
    assert events(only_here, "message")[0]["backend"] is None
    missing = cli("diff", "trip", "m9", "--remote", conflicted)
    assert missing.exit_code == ExitCode.USAGE and "'m9'" in missing.stderr
    nochat = cli("diff", "nosuch", "m1", "--remote", conflicted, "--show-text")
    assert nochat.exit_code == ExitCode.USAGE and "'nosuch'" in nochat.stderr
    # --show-text belongs to one message.
    assert cli("diff", "trip", "--show-text", "--remote", conflicted).exit_code == 2


def test_diff_message_of_a_deleted_message(cli: Callable[..., Ran], conflicted: str) -> None:
    deleted = cli("delete", "trip", "m1", "--yes", "--remote", conflicted)
    assert deleted.exit_code == ExitCode.CONFLICTS  # m2 is still in conflict: named
    assert "chat 'trip': 'm2'" in deleted.stderr
    ran = cli("diff", "trip", "m1", "--remote", conflicted, "--json")
    (event,) = events(ran, "message")
    assert event["here"]["state"] == "deleted" and event["backend"]["state"] == "deleted"
    assert ran.exit_code == 0  # deleted on both sides: nothing live to disagree about
    assert cli("diff", "trip", "m1", "--remote", conflicted, "--show-text").exit_code == 0
