"""``chatsave diff``, ``chatsave sync`` and ``chatsave delete``."""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from chatsave.cli.runtime import Runtime, command, open_output_file, require_tty_or
from chatsave.cli.save import chats_or_all, say_refused
from chatsave.errors import UsageError
from chatsave.ops.result import RunResult

COLUMNS = ("=", "+", "-", "*", "x", "D")
LEGEND = ("= same, + only here, - only on the backend, * conflict, x deleted on one side, "
          "D duplicate, ! error")


def diff_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="[CHAT_ID]...", help="Chats to compare.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every chat known here or on the backend.")] = False,
    combined: Annotated[Path | None, typer.Option(
        "--combined", metavar="FILE",
        help="Write one line per message: SYMBOL CHAT_ID MESSAGE_ID.")] = None,
) -> RunResult:
    """Show how the local store and the backend differ (read-only).

    Example: chatsave diff --all --remote https://chats.example.com --combined diff.txt
    """
    from chatsave.ops.diff import diff

    chosen = chats_or_all(chat_ids, all_, "diff")
    store = rt.store()
    remote = rt.remote()
    with open_output_file(combined, rt.out) if combined else nullcontext() as fh:
        result = diff(store, remote, chosen, emit=rt.out.event, combined=fh)
    _render_diff(rt, result)
    say_refused(rt, result, "was not compared")
    return result


def _render_diff(rt: Runtime, result: RunResult) -> None:
    states = [s for s in result.report if not s.in_agreement]
    d = result.details
    if rt.out.json_mode:
        return
    if not states:
        rt.out.info(f"in agreement: {d['chats']} chat(s) here and on {d['remote']}")
        return
    if rt.out.out.is_terminal:
        from rich.table import Table

        table = Table(title=f"{len(states)} of {d['chats']} chat(s) differ", caption=LEGEND)
        table.add_column("chat")
        for col in COLUMNS:
            table.add_column(col, justify="right")
        table.add_column("note")
        for s in states:
            note = s.error or ("only here" if s.remote is None or s.remote.digest is None
                               else "only on the backend" if not s.local else "")
            table.add_row(s.chat_id, *(str(s.counts.get(c, 0) or "") for c in COLUMNS), note)
        rt.out.report(table)
        return
    lines = [f"{len(states)} of {d['chats']} chat(s) differ ({LEGEND})"]
    for s in states:
        counts = " ".join(f"{c}{s.counts[c]}" for c in COLUMNS if s.counts.get(c))
        lines.append(f"{s.chat_id}\t{counts}" + (f"\t! {s.error}" if s.error else ""))
    rt.out.report("\n".join(lines))


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", value)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard wants I/N with 1 <= I <= N, got {value!r}")
    return int(match[1]), int(match[2])


def sync_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="[CHAT_ID]...", help="Chats to sync.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every chat known here or on the backend.")] = False,
    push_only: Annotated[bool, typer.Option("--push-only", help="Only send.")] = False,
    pull_only: Annotated[bool, typer.Option("--pull-only", help="Only receive.")] = False,
    prefer: Annotated[str | None, typer.Option(
        "--prefer", metavar="local|backend",
        help="Resolve conflicts of the named chats: keep this side's version.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan; change nothing.")] = False,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="I/N", help="Only chats whose sha256(chat_id) falls in slice I "
        "of N (N cron hosts split the work).")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", min=1, max=64, help="Requests in flight at once.")] = 4,
    max_duration: Annotated[float | None, typer.Option(
        "--max-duration", min=0, metavar="SECONDS",
        help="Stop starting requests after this long; the rest stays pending.")] = None,
) -> RunResult:
    """Make the local store and the backend agree, both ways.

    Example: chatsave sync --all --remote https://chats.example.com --json
    """
    from chatsave.ops.sync import SyncOptions, sync

    chosen = chats_or_all(chat_ids, all_, "sync")
    if push_only and pull_only:
        raise UsageError("--push-only and --pull-only exclude each other")
    if prefer not in (None, "local", "backend"):
        raise UsageError(f"--prefer takes local or backend, not {prefer!r}")
    if prefer and chosen is None:
        raise UsageError("--prefer resolves conflicts of named chats only",
                         hint="name the chats: chatsave sync CHAT_ID --prefer local")
    options = SyncOptions(push=not pull_only, pull=not push_only, prefer=prefer,
                          dry_run=dry_run, concurrency=concurrency, max_duration=max_duration,
                          shard=_shard(shard))
    store = rt.store() if dry_run else rt.locked_store()
    remote = rt.remote(max_connections=concurrency)
    run_id = None if dry_run else rt.begin_run(store, {
        "chats": chosen or "all", "prefer": prefer, "push_only": push_only,
        "pull_only": pull_only, "shard": shard, "remote": remote.url})
    with rt.out.progress("syncing") as advance:
        result = sync(store, remote, chosen, options, emit=rt.out.event, run_id=run_id,
                      progress=advance)
    _say_sync(rt, result, dry_run)
    return result


def _say_sync(rt: Runtime, result: RunResult, dry_run: bool) -> None:
    out, c, d = rt.out, result.counters, result.details
    for reason in d.get("guard", []):
        out.warn(f"safety guard: {reason}; no deletions or overwrites were made "
                 "(what is only here was still pushed)")
    plan = d["plan"]
    shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in plan.items() if v)
    if dry_run:
        out.info(f"plan for {d['chats']} chat(s): {shown or 'nothing to do'}")
        say_refused(rt, result, "would not be synced")
        return
    out.info(f"synced {d['chats']} chat(s) with {d['remote']}: {shown or 'nothing to do'}")
    if c["conflicts"]:
        out.warn(f"{c['conflicts']} conflict(s) left, both versions kept: chatsave diff CHAT "
                 "shows them; chatsave sync CHAT --prefer local|backend resolves")
    pending = c["pending_push"] - say_refused(rt, result, "was not synced")
    if pending:
        out.warn(f"{pending} message(s) still to push; rerun to resume")


def delete_cmd(
    rt: Runtime,
    chat_id: Annotated[str, typer.Argument(metavar="CHAT_ID", help="The chat.")],
    message_ids: Annotated[list[str] | None, typer.Argument(
        metavar="[MESSAGE_ID]...", help="Messages to delete (default: the whole chat).",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be deleted.")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="Do not ask (needed without a terminal).")] = False,
) -> RunResult:
    """Delete messages (or a whole chat): to the trash here, a tombstone on the backend.

    Example: chatsave delete 9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d a1b2c3 --yes
    """
    from chatsave.ops.delete import delete, plan_delete

    store = rt.store() if dry_run else rt.locked_store()
    ids = plan_delete(store, chat_id, message_ids)
    what = f"{len(ids)} message(s) of chat {chat_id!r}" + ("" if message_ids else
                                                          " (the whole chat)")
    if dry_run or not ids:
        result = delete(store, chat_id, ids, dry_run=True)
        rt.out.info(f"would delete {what}" if ids else "nothing to delete")
        return result
    require_tty_or(yes, f"deleting {what}", rt.out)
    if not yes and not typer.confirm(f"Delete {what}? They go to the trash "
                                     "(chatsave trash restore brings them back)", err=True):
        raise UsageError("not confirmed; nothing deleted")
    run_id = rt.begin_run(store, {"chat_id": chat_id, "ids": len(ids)})
    result = delete(store, chat_id, ids, run_id=run_id)
    rt.out.info(f"deleted {what}; they are in the trash")
    if rt.settings.remote:
        from chatsave.ops.save import SaveOptions, save

        pushed = save(store, rt.remote(), [chat_id], SaveOptions(), emit=rt.out.event,
                      run_id=run_id)
        result.codes.extend(pushed.codes)
        result.counters["deleted_remote"] = pushed.counters.get("deleted_remote", 0)
        result.details["remote"] = rt.settings.remote
        if "refused" in pushed.details:
            result.details["refused"] = pushed.details["refused"]
        rt.out.info(f"{result.counters['deleted_remote']} tombstone(s) sent to the backend")
        say_refused(rt, result, "was not told of the deletion")
    else:
        rt.out.info("no remote set: the backend learns of it at the next save or sync")
    return result


def register(app: typer.Typer) -> None:
    command(app, "diff")(diff_cmd)
    command(app, "sync")(sync_cmd)
    command(app, "delete")(delete_cmd)
