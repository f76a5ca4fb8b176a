"""``chatsave dedupe``, ``gc``, ``fetch`` and ``trash``: repair and reclaim, carefully."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from chatsave.cli.runtime import HelpGroup, Runtime, command, require_tty_or
from chatsave.cli.save import chats_or_all, say_refused
from chatsave.cli.sync import FEW, named, say_needs_yes, say_would_refuse
from chatsave.errors import UsageError
from chatsave.ops.result import RunResult
from chatsave.units import format_size, parse_duration, parse_size

trash_app = typer.Typer(name="trash", no_args_is_help=True, cls=HelpGroup,
                        help="What delete, dedupe and sync removed here: list, restore, empty."
                        "\n\nExample: chatsave trash restore --run 42 --dry-run",
                        context_settings={"help_option_names": ["-h", "--help"]})


def dedupe_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="CHAT_ID", help="Chats to repair.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every chat.")] = False,
    on: Annotated[str, typer.Option(
        "--on", metavar="local|backend|both", help="Where to remove copies.")] = "both",
    keep: Annotated[str, typer.Option(
        "--keep", metavar="first|last", help="Which of the copies survives (by time, then "
        "server order).")] = "first",
    window: Annotated[str, typer.Option(
        "--window", metavar="DURATION", help="How far apart a re-sent run may be.")] = "10m",
    fuzzy: Annotated[bool, typer.Option(
        "--fuzzy", help="Also report near-duplicates and single repeats (never removed).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    max_delete: Annotated[str | None, typer.Option(
        "--max-delete", metavar="N|P%",
        help="Refuse to remove more (default 10% without a terminal; a percentage of the "
        "messages looked at, rounded up).")] = None,
) -> RunResult:
    """Remove retry duplicates: to the trash here, tombstones on the backend.

    Example: chatsave dedupe CHAT_ID --remote https://chats.example.com --dry-run
    """
    from chatsave.ops.dedupe import DedupeOptions, dedupe

    chosen = chats_or_all(chat_ids, all_, "dedupe")
    interactive = sys.stdin.isatty()
    if max_delete is None and not interactive:
        max_delete = "10%"
    if not dry_run:
        require_tty_or(yes, "dedupe", rt.out)
    options = DedupeOptions(on=on, keep=keep, window=parse_duration(window, "--window"),
                            fuzzy=fuzzy, dry_run=dry_run, max_delete=max_delete)
    store = rt.store() if dry_run else rt.locked_store()
    remote = rt.remote(create=not dry_run)
    run_id = None if dry_run else rt.begin_run(store, {"chats": chosen or "all", "on": on,
                                                      "keep": keep})

    def confirm(plan: Any) -> bool:
        counts = plan.counts()
        rt.out.info(f"plan: {counts['copies']} copies; remove {counts['here']} here, "
                    f"{counts['on_backend']} on the backend")
        if yes:
            return True
        with rt.out.paused():
            return typer.confirm("Remove them (they go to the trash)?", err=True)

    with rt.out.progress("examining", unit="chat") as advance:
        result = dedupe(store, remote, chosen, options, emit=rt.out.event, run_id=run_id,
                        confirm=confirm, progress=advance)
    plan = result.details["plan"]
    verb = "would remove" if dry_run else "removed"
    rt.out.info(f"{result.counters['duplicates_found']} retry copies found; {verb} "
                f"{plan['here']} here and {plan['on_backend']} on the backend"
                + (f" (run {run_id}: chatsave trash restore --run {run_id} undoes it)"
                   if run_id and not dry_run and result.counters['duplicates_found'] else ""))
    _name_copies(rt, result)
    if dry_run:
        say_would_refuse(rt, result)
        if result.counters["duplicates_found"]:
            say_needs_yes(rt, yes)
    if plan["kept_unconfirmed"]:
        rt.out.warn(f"{plan['kept_unconfirmed']} copies are kept here: the backend has not "
                    "confirmed them yet (chatsave save, then dedupe again)")
    if result.details["fuzzy"]:
        rt.out.info(f"{result.details['fuzzy']} near-duplicates or repeats reported (kept)")
    say_refused(rt, result, "was left out (nothing of it removed)")
    return result


def _name_copies(rt: Runtime, result: RunResult) -> None:
    """The copies, by chat (the first few, then a count), each with the message it copies."""
    by_chat: dict[str, list[str]] = {}
    for removal in result.report[0].removals if result.report else []:
        by_chat.setdefault(removal.chat_id, []).append(
            f"{removal.id!r} (a copy of {removal.original!r})")
    chats = list(by_chat)
    for chat_id in chats[:FEW]:
        copies = by_chat[chat_id]
        shown = ", ".join(copies[:FEW]) + (f" and {len(copies) - FEW} more"
                                           if len(copies) > FEW else "")
        rt.out.info(f"  chat {chat_id!r}: {shown}")
    if len(chats) > FEW:
        rt.out.info(f"  and {sum(len(by_chat[c]) for c in chats[FEW:])} more in "
                    f"{len(chats) - FEW} more chat(s) (--json lists every one)")


def gc_cmd(
    rt: Runtime,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="SIZE", help="Bring the store under this size (config key "
        "'budget'; default 1GB).")] = None,
    keep_within: Annotated[str | None, typer.Option(
        "--keep-within", metavar="DURATION", help="Keep bodies newer than this.")] = None,
    keep_last: Annotated[int | None, typer.Option(
        "--keep-last", metavar="N", help="Keep the last N bodies of every chat.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
) -> RunResult:
    """Reclaim space: finished records first, then bodies the backend confirmed.

    Example: chatsave gc --budget 50MB --keep-within 30d --remote https://chats.example.com
    """
    from chatsave.ops.gc import DEFAULT_BUDGET, GcOptions, gc

    size = parse_size(budget or rt.settings.budget or str(DEFAULT_BUDGET), "--budget")
    options = GcOptions(budget=size, keep_within=parse_duration(keep_within, "--keep-within")
                        if keep_within else None, keep_last=keep_last, dry_run=dry_run)
    store = rt.store() if dry_run else rt.locked_store()
    remote = rt.remote(create=not dry_run) if rt.settings.remote else None
    run_id = None if dry_run else rt.begin_run(store, {"budget": size})
    with rt.out.progress("checking", unit="chat") as advance:
        result = gc(store, remote, options, emit=rt.out.event, run_id=run_id,
                    progress=advance)
    d = result.details
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d["plan"].items())
    if dry_run:
        rt.out.info(f"store {format_size(d['bytes_before'])}, budget {format_size(size)}; "
                    f"would remove {counts} (about {format_size(d['estimate_freed'])})")
    else:
        rt.out.info(f"store {format_size(d['bytes_before'])} -> {format_size(d['bytes_after'])}"
                    f" ({format_size(result.counters['bytes_freed'])} freed; {counts})")
    if "note" in d:
        rt.out.warn(d["note"])
    say_would_refuse(rt, result)
    say_refused(rt, result, "was left out (none of its bodies evicted)")
    return result


def fetch_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="CHAT_ID", help="Chats to fetch.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every chat.")] = False,
) -> RunResult:
    """Bring message bodies evicted by gc back from the backend.

    Example: chatsave fetch --all --remote https://chats.example.com
    """
    from chatsave.ops.fetch import fetch

    chosen = chats_or_all(chat_ids, all_, "fetch")
    store = rt.locked_store()
    remote = rt.remote()
    with rt.out.progress("fetching") as advance:
        result = fetch(store, remote, chosen, emit=rt.out.event, progress=advance)
    rt.out.info(f"fetched {result.counters['written']} body(ies) in {result.details['chats']} "
                "chat(s)")
    if result.counters["missing"]:
        rt.out.warn(f"{result.counters['missing']} evicted body(ies) are no longer on the "
                    "backend; their stubs keep id and hash (chatsave status)")
    say_refused(rt, result, "was not fetched (its evicted bodies stay stubs)")
    return result


def trash_list_cmd(
    rt: Runtime,
    chat: Annotated[str | None, typer.Option("--chat", metavar="CHAT_ID",
                                             help="Only this chat.")] = None,
) -> RunResult:
    """List what is in the trash (ids and hashes, newest last).

    Example: chatsave trash list --chat 9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d
    """
    from chatsave.model import check_chat_id
    from chatsave.ops.trash import list_trash

    if chat is not None:
        check_chat_id(chat)
    rows = list_trash(rt.store(), chat)
    for row in rows:
        rt.out.event("trash", **row)
    lines = [f"{r['trash_id']:>6}  run {r['run_id'] or '-':>5}  {r['deleted_at'][:19]}  "
             f"{r['chat_id']}  {r['id']}  ({r['reason']})" for r in rows]
    rt.out.report("\n".join(lines) if lines else "the trash is empty")
    result = RunResult("trash list")
    result.counters["read"] = len(rows)
    return result


def trash_restore_cmd(
    rt: Runtime,
    message_ids: Annotated[list[str] | None, typer.Argument(
        metavar="MESSAGE_ID", help="Messages to restore.", show_default=False)] = None,
    run: Annotated[int | None, typer.Option(
        "--run", metavar="RUN_ID", help="Restore everything that run removed.")] = None,
    chat: Annotated[str | None, typer.Option(
        "--chat", metavar="CHAT_ID", help="The chat, when an id is in several.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be restored; change nothing.")] = False,
) -> RunResult:
    """Restore messages from the trash, here and (with a remote) on the backend.

    Example: chatsave trash restore --run 42 --remote https://chats.example.com
    """
    from chatsave.ops.trash import restore

    if dry_run:
        result = restore(rt.store(), None, run_id=run, ids=message_ids, chat_id=chat,
                         emit=rt.out.event, dry_run=True)
        planned = result.report
        if not planned:
            rt.out.info("nothing would be restored")
        else:
            by_chat: dict[str, list[str]] = {}
            for chat_id, message_id in planned:
                by_chat.setdefault(chat_id, []).append(message_id)
            rt.out.info(f"would restore {len(planned)} message(s)"
                        + ("" if rt.settings.remote else "; the backend would follow at the "
                           "next sync"))
            for chat_id in list(by_chat)[:FEW]:
                rt.out.info(f"  chat {chat_id!r}: {named(by_chat[chat_id])}")
            if len(by_chat) > FEW:
                rt.out.info(f"  and {len(by_chat) - FEW} more chat(s) (--json lists every one)")
        if result.counters["skipped"]:
            rt.out.warn(f"{result.counters['skipped']} would be left in the trash (--json "
                        "says why)")
        return result
    store = rt.locked_store()
    remote = rt.remote() if rt.settings.remote else None
    run_id = rt.begin_run(store, {"run": run, "ids": len(message_ids or [])})
    result = restore(store, remote, run_id=run, ids=message_ids, chat_id=chat,
                     emit=rt.out.event, this_run=run_id)
    rt.out.info(f"restored {result.counters['written']} message(s)"
                + (f"; {result.counters['restored_on_backend']} on the backend" if remote
                   else "; the backend follows at the next sync"))
    return result


def trash_empty_cmd(
    rt: Runtime,
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="DURATION", help="Only entries older than this.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count only.")] = False,
) -> RunResult:
    """Empty the trash of entries older than DURATION, for good.

    Example: chatsave trash empty --older-than 30d --yes
    """
    from chatsave.ops.trash import empty

    age = parse_duration(older_than, "--older-than")
    store = rt.store() if dry_run else rt.locked_store()
    if not dry_run:
        require_tty_or(yes, "emptying the trash", rt.out)
        if not yes and not typer.confirm("Delete these trash entries for good?", err=True):
            raise UsageError("not confirmed; nothing deleted")
    result = empty(store, age, dry_run=dry_run)
    rt.out.info(f"{'would delete' if dry_run else 'deleted'} "
                f"{result.counters.get('would_delete', result.counters.get('deleted'))} "
                "trash entries")
    if dry_run and result.counters.get("would_delete"):
        say_needs_yes(rt, yes)
    return result


command(trash_app, "list")(trash_list_cmd)
command(trash_app, "restore")(trash_restore_cmd)
command(trash_app, "empty")(trash_empty_cmd)


def register(app: typer.Typer) -> None:
    command(app, "dedupe")(dedupe_cmd)
    command(app, "gc")(gc_cmd)
    command(app, "fetch")(fetch_cmd)
    app.add_typer(trash_app)
