"""``chatsave diff``, ``chatsave sync`` and ``chatsave delete``."""

from __future__ import annotations

import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from chatsave.cli.runtime import Runtime, command, open_output_file, require_tty_or
from chatsave.cli.save import chats_or_all, say_refused, say_rejected
from chatsave.errors import UsageError
from chatsave.ops.result import RunResult

COLUMNS = ("=", "+", "-", "*", "x", "D")
LEGEND = ("= same, + only here, - only on the backend, * conflict, x deleted on one side, "
          "D duplicate, ! error")
# The order in which a report names a chat's messages (what needs a person first).
NAMED = {"*": "conflict", "x": "deleted on one side", "+": "only here",
         "-": "only on the backend", "D": "duplicate"}
MEANING = {"=": "the same on both sides", "*": "a conflict: same id, other content",
           "+": "only here", "-": "only on the backend",
           "x": "deleted on one side, live on the other", "!": "the backend cannot be asked"}
FEW = 5  # how many a report names before it counts the rest
# The fields of one message, side by side (diff CHAT_ID MESSAGE_ID).
ROWS = ("state", "role", "type", "time", "content_hash", "rev", "agreed", "metadata",
        "attachments")
# Control characters but newline and tab: escaped in text shown to a person (a message
# holding terminal escape sequences must not drive the terminal).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def named(items: list[str], total: int | None = None, few: int = FEW) -> str:
    """The first few items quoted (control and bidi characters escaped), then a count."""
    total = len(items) if total is None else total
    shown = ", ".join(repr(i) for i in items[:few])
    rest = total - min(len(items), few)
    return shown + (f" and {rest} more" if rest > 0 else "")


def shown_arg(value: str) -> str:
    """An id as a command-line argument in a hint: bare when it is plain, else quoted with
    every unusual character escaped."""
    return value if re.fullmatch(r"[A-Za-z0-9._:@~/-]+", value) else repr(value)


def say_would_refuse(rt: Runtime, result: RunResult) -> None:
    """A dry run's word on the refusal its real run would meet, and how to allow it."""
    refusal = result.details.get("would_refuse")
    if refusal:
        rt.out.warn(f"the real run would be refused (exit {refusal['exit_code']}): "
                    f"{refusal['message']}")
        if refusal.get("hint"):
            rt.out.err.print(f"  hint: {refusal['hint']}", markup=False)


def say_needs_yes(rt: Runtime, yes: bool) -> None:
    """A dry run without a terminal: the real run will need --yes."""
    if not yes and not sys.stdin.isatty():
        rt.out.info("the real run needs --yes: there is no terminal to confirm on")


def diff_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="CHAT_ID", help="Chats to compare; or CHAT_ID MESSAGE_ID for one "
        "message.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every chat known here or on the backend.")] = False,
    combined: Annotated[Path | None, typer.Option(
        "--combined", metavar="FILE",
        help="Write one line per message: SYMBOL CHAT_ID MESSAGE_ID.")] = None,
    html: Annotated[Path | None, typer.Option(
        "--html", metavar="FILE",
        help="Write one self-contained HTML page of the comparison (counts per chat, the "
        "differing messages side by side in time order), for a ticket; message text only "
        "with --show-text.")] = None,
    show_text: Annotated[bool, typer.Option(
        "--show-text", help="With CHAT_ID MESSAGE_ID, or --html: show the text of the "
        "messages too (the one flag that lets message text out).")] = False,
) -> RunResult:
    """Show how the local store and the backend differ (read-only).

    chatsave diff CHAT_ID MESSAGE_ID shows both versions of one message side by side
    (role, type, time, hash, revision, state); --show-text adds their text.

    Example: chatsave diff --all --remote https://chats.example.com --combined diff.txt
    """
    from chatsave.ops.diff import DiffOptions, diff, diff_message, message_target

    if show_text and html is None and (all_ or len(chat_ids or []) != 2):
        raise UsageError("--show-text shows the text of one message, or of the messages "
                         "in an --html report",
                         hint="chatsave diff CHAT_ID MESSAGE_ID --show-text")
    if html is not None and combined is not None and str(html) == str(combined) == "-":
        raise UsageError("--html - and --combined - cannot both go to standard output")
    store = rt.store()
    remote = rt.remote(create=False)
    target = message_target(store, remote, chat_ids, show_text) \
        if chat_ids and not all_ and html is None else None
    if target is not None:
        if combined is not None:
            raise UsageError("--combined lists the messages of chats, not one message")
        result = diff_message(store, remote, *target, show_text=show_text,
                              emit=rt.out.event)
        _render_message(rt, result, show_text)
        say_refused(rt, result, "could not be asked about the message")
        return result
    chosen = chats_or_all(chat_ids, all_, "diff")
    builder = None
    if html is not None:
        from chatsave.ops.report import ReportBuilder

        builder = ReportBuilder(store, show_text=show_text)
    options = DiffOptions(on_row=builder.row if builder else None,
                          keep_bodies=builder is not None)
    with open_output_file(combined, rt.out) if combined else nullcontext() as fh, \
            rt.out.progress("comparing", unit="chat") as advance:
        result = diff(store, remote, chosen, options, emit=rt.out.event, combined=fh,
                      progress=advance)
    if builder is not None and html is not None:
        from chatsave.cli.html_report import render

        page = render(builder.report(result, result.report), store=str(store.path))
        with open_output_file(html, rt.out) as out:
            out.write(page)
        if str(html) != "-":
            rt.out.info(f"wrote the report to {html}")
    # With --combined -, stdout carries the combined lines: the report goes to stderr.
    _render_diff(rt, result, on_stderr=fh is rt.out or str(html) == "-")
    say_refused(rt, result, "was not compared")
    return result


def _message_rows(side: dict[str, Any] | None, here: bool, show_text: bool) -> list[str]:
    """One column of the side-by-side view: a side's fields, in the order of ROWS."""
    if side is None:
        return ["not held", *["-"] * (len(ROWS) - 1)]
    state = side["state"]
    if here and state == "evicted":
        state = "evicted (chatsave fetch brings its body back)"
    elif state == "deleted":
        state = "deleted (in the trash)" if here else "deleted (a tombstone)"
    agreed = side.get("agreed")
    if here:
        rev = f"{agreed['rev']} (agreed)" if agreed and agreed["rev"] is not None else "-"
        if agreed is None:
            sync = "never confirmed by this backend"
        elif agreed["state"] == "confirmed" and agreed["content_hash"] != side["content_hash"]:
            sync = "changed here since confirmed"
        else:
            sync = agreed["state"] + (f": {agreed['reason']}" if agreed["reason"] else "")
    else:
        rev, sync = str(side.get("rev", "-")), "-"
    if show_text:
        metadata = json.dumps(side["metadata"], ensure_ascii=False) \
            if "metadata" in side else "-"
        attachments = str(len(side["attachments"])) if side.get("attachments") is not None \
            else "-"
    else:
        keys = side.get("metadata_keys")
        metadata = f"{keys} key(s)" if keys is not None else "-"
        attachments = str(side["attachments"]) if side.get("attachments") is not None else "-"
    chash = side.get("content_hash") or "-"
    return [state, side.get("role") or "-", side.get("type") or "-",
            side.get("created_at") or "-", chash[:16] + ("..." if len(chash) > 16 else ""),
            rev, sync, metadata, attachments]


def _render_message(rt: Runtime, result: RunResult, show_text: bool) -> None:
    """Both versions of one message side by side (their text below, with --show-text)."""
    if rt.out.json_mode:
        return
    d = result.details
    view = result.report[0]
    columns = [("here", _message_rows(view["here"], True, show_text)),
               (d["remote"], _message_rows(view["backend"], False, show_text))]
    width = max(len(r) for r in ROWS) + 2
    left = max(len(columns[0][0]), *(len(v) for v in columns[0][1])) + 2
    lines = [f"message {d['message_id']!r} of chat {d['chat_id']!r}: {d['symbol']} "
             f"{MEANING.get(d['symbol'], d['category'])}",
             f"{'':<{width}}{columns[0][0]:<{left}}{columns[1][0]}"]
    for i, name in enumerate(ROWS):
        lines.append(f"{name:<{width}}{columns[0][1][i]:<{left}}{columns[1][1][i]}")
    if show_text:
        for label, side in (("here", view["here"]), (d["remote"], view["backend"])):
            text = side.get("content") if side is not None else None
            lines.append(f"--- text {label}:" if text is not None else
                         f"--- text {label}: none" + (" (evicted here)" if side is not None
                                                       and side["state"] == "evicted" else ""))
            if text is not None:
                lines.append(_CONTROL.sub(lambda m: repr(m[0])[1:-1], str(text)))
    rt.out.report("\n".join(lines))
    if not show_text:
        rt.out.info("their text is not shown: add --show-text to see it")


def _render_diff(rt: Runtime, result: RunResult, *, on_stderr: bool = False) -> None:
    """Per differing chat, how many messages fall under each symbol, and the first few of
    them by id; then how to see both versions of one. On stdout, unless ``on_stderr``."""
    def report(renderable: Any) -> None:
        if on_stderr:
            rt.out.err.print(renderable, markup=False)
        else:
            rt.out.report(renderable)

    states = [s for s in result.report if not s.in_agreement]
    d = result.details
    if rt.out.json_mode:
        return
    if not states:
        rt.out.info(f"in agreement: {d['chats']} chat(s) here and on {d['remote']}")
        return
    lines: list[str] = []
    if (rt.out.err if on_stderr else rt.out.out).is_terminal:
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
        report(table)
    else:
        lines.append(f"{len(states)} of {d['chats']} chat(s) differ ({LEGEND})")
    for s in states:
        counts = " ".join(f"{c}{s.counts[c]}" for c in COLUMNS if s.counts.get(c))
        lines.append(f"{s.chat_id}\t{counts}" + (f"\t! {s.error}" if s.error else ""))
        lines += [f"  {sym} {label}: {named(s.examples[sym], s.counts.get(sym, 0))}"
                  for sym, label in NAMED.items() if s.examples.get(sym)]
    report("\n".join(lines))
    example = next(((s.chat_id, s.examples[sym][0]) for sym in ("*", "x") for s in states
                    if s.examples.get(sym)), None)
    if example is not None:
        rt.out.info(f"chatsave diff {example[0]} {shown_arg(example[1])} shows both "
                    "versions of a message side by side (--show-text: with their text)")


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
        metavar="CHAT_ID", help="Chats to sync.", show_default=False)] = None,
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
    # The remote first: one refused (exit 2) leaves no new, empty store behind.
    remote = rt.remote(max_connections=concurrency, create=not dry_run)
    store = rt.store() if dry_run else rt.locked_store()
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
        if dry_run:
            out.warn(f"safety guard: {reason}; the real run would push what is only here, "
                     "make no deletions or overwrites, and exit 5")
        else:
            out.warn(f"safety guard: {reason}; no deletions or overwrites were made "
                     "(what is only here was still pushed)")
    plan = d["plan"]
    shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in plan.items() if v)
    if dry_run:
        out.info(f"plan for {d['chats']} chat(s): {shown or 'nothing to do'}")
        _say_conflicts(rt, result.report, c["conflicts"], "would be left")
        say_refused(rt, result, "would not be synced")
        return
    out.info(f"synced {d['chats']} chat(s) with {d['remote']}: {shown or 'nothing to do'}")
    _say_conflicts(rt, result.report, c["conflicts"], "left")
    say_rejected(rt, result)
    pending = c["pending_push"] - say_refused(rt, result, "was not synced")
    if pending:
        out.warn(f"{pending} message(s) still to push; rerun to resume")


def _say_conflicts(rt: Runtime, conflicts: list[tuple[str, str]], total: int,
                   verb: str) -> None:
    """Name the chats and messages in conflict (the first few, then a count), and how to
    see both versions of one and how to resolve them."""
    if not total:
        return
    by_chat: dict[str, list[str]] = {}
    for chat_id, message_id in conflicts:
        by_chat.setdefault(chat_id, []).append(message_id)
    chats = list(by_chat)
    where = "; ".join(f"chat {chat_id!r}: {named(by_chat[chat_id])}" for chat_id in chats[:FEW])
    if len(chats) > FEW:
        rest = sum(len(by_chat[c]) for c in chats[FEW:])
        where += f"; and {rest} more in {len(chats) - FEW} more chat(s)"
    rt.out.warn(f"{total} conflict(s) {verb}, both versions kept"
                + (f" ({where})" if where else ""))
    chat_id, message_id = conflicts[0] if conflicts else ("CHAT_ID", "MESSAGE_ID")
    rt.out.err.print(f"  hint: chatsave diff {chat_id} {shown_arg(message_id)} shows both "
                     f"versions side by side; chatsave sync {chat_id} --prefer local|backend "
                     "resolves the chat's conflicts", markup=False)


def delete_cmd(
    rt: Runtime,
    chat_id: Annotated[str, typer.Argument(metavar="CHAT_ID", help="The chat.")],
    message_ids: Annotated[list[str] | None, typer.Argument(
        metavar="MESSAGE_ID", help="Messages to delete (default: the whole chat).",
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
        if ids:
            say_needs_yes(rt, yes)
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
        if pushed.counters["conflicts"]:
            from chatsave.ops.sync import conflicts_left

            _say_conflicts(rt, conflicts_left(store, pushed.details["backend_id"], {chat_id}),
                           pushed.counters["conflicts"], "left in the chat")
        say_refused(rt, result, "was not told of the deletion")
    else:
        rt.out.info("no remote set: the backend learns of it at the next save or sync")
    return result


def register(app: typer.Typer) -> None:
    command(app, "diff")(diff_cmd)
    command(app, "sync")(sync_cmd)
    command(app, "delete")(delete_cmd)
