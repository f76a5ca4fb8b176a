"""``chatsave import`` and ``chatsave export``."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, date, tzinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from chatsave.cli.runtime import Runtime, command, open_output_file
from chatsave.errors import UsageError
from chatsave.ops.result import RunResult

# Notes on the input shown in the human output (all of them in --json).
SHOWN_NOTES = 20


class ImportFormat(StrEnum):
    auto = "auto"
    jsonl = "jsonl"
    localstorage = "localstorage"
    autobot_file = "autobot-file"


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    localstorage = "localstorage"


class OnInvalid(StrEnum):
    fail = "fail"
    skip = "skip"


def parse_tz(value: str | None) -> tzinfo:
    """An IANA zone name (``Europe/Berlin``), ``UTC``, or None for UTC."""
    if not value or value.upper() in ("UTC", "Z"):
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {value!r}",
                         hint="use an IANA name such as Europe/Berlin or America/New_York"
                         ) from None


def parse_day(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--date wants a day like 2025-08-04, got {value!r}") from None


def import_cmd(
    rt: Runtime,
    file: Annotated[str, typer.Argument(metavar="FILE|-",
                                        help="Dump, JSONL file, AutoBot chat file or "
                                        "directory; - reads stdin.")],
    format: Annotated[ImportFormat, typer.Option(
        "--format", help="Input format; auto tells them apart.")] = ImportFormat.auto,
    day: Annotated[str | None, typer.Option(
        "--date", metavar="DAY",
        help="Day (YYYY-MM-DD) for time-only timestamps like '9:41:03 AM'.")] = None,
    tz: Annotated[str | None, typer.Option(
        "--tz", metavar="ZONE",
        help="Time zone of naive timestamps (IANA name) (default: UTC).")] = None,
    on_invalid: Annotated[OnInvalid, typer.Option(
        "--on-invalid",
        help="fail: refuse the whole input (exit 2); skip: import the valid items "
        "(exit 1).")] = OnInvalid.fail,
    rejects: Annotated[Path | None, typer.Option(
        "--rejects", metavar="FILE",
        help="Write the rejected items here (JSONL; - is stdout).")] = None,
    rename_invalid: Annotated[bool, typer.Option(
        "--rename-invalid", help="Map invalid chat ids (null, test/chat#1) to valid ones "
        "and record the mapping.")] = False,
    update: Annotated[bool, typer.Option(
        "--update", help="Take a changed message (same id, other content) as an edit: the "
        "old version goes to the trash (trash restore brings it back); save or sync send "
        "the new one.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate and count only; change nothing.")] = False,
) -> RunResult:
    """Import messages into the local store.

    Example: chatsave import localstorage-dump.json --date 2025-08-04 --tz Europe/Berlin
    """
    from chatsave.formats import Source
    from chatsave.normalize import TimeContext
    from chatsave.ops.importing import ImportOptions, import_source

    times = TimeContext(tz=parse_tz(tz or rt.settings.tz), date=parse_day(day))
    options = ImportOptions(format=format.value, times=times, on_invalid=on_invalid.value,
                            rename_invalid=rename_invalid, dry_run=dry_run, update=update)
    run_args = {"file": file, "format": format.value, "date": day,
                "tz": tz or rt.settings.tz or "UTC", "on_invalid": on_invalid.value,
                "rename_invalid": rename_invalid, "update": update, "dry_run": dry_run}
    store = rt.store() if dry_run else rt.locked_store()
    source = Source.open(file)
    try:
        with open_output_file(rejects, rt.out) if rejects else nullcontext() as rejects_fh, \
                rt.out.progress("importing") as advance:
            result = import_source(store, source, options, emit=rt.out.event,
                                   rejects=rejects_fh, run_args=run_args, progress=advance)
    finally:
        source.close()
    _say_import(rt, result, dry_run)
    return result


def _say_import(rt: Runtime, result: RunResult, dry_run: bool) -> None:
    out, c, d = rt.out, result.counters, result.details
    for original, mapped in d.get("renamed", {}).items():
        out.info(f"renamed invalid chat id {original!r} -> {mapped!r}")
    for origin, chat_id in d.get("derived", {}).items():
        out.info(f"chat without an id ({origin}) -> {chat_id!r}, derived from its content")
    skipped = d.get("skipped", [])
    if skipped:
        out.info(f"{len(skipped)} note(s) on the input (keys and files passed over):")
        for line in skipped[:SHOWN_NOTES]:
            out.info(f"  {line}")
        if len(skipped) > SHOWN_NOTES:
            out.info(f"  ... and {len(skipped) - SHOWN_NOTES} more (--json lists them all)")
    rejections = d.get("rejections", [])
    if rejections:
        out.err.print(f"{d['rejections_total']} invalid item(s):", markup=False)
        for line in rejections:
            out.err.print(f"  {line}", markup=False)
        if d["rejections_total"] > len(rejections):
            out.err.print(f"  ... and {d['rejections_total'] - len(rejections)} more "
                          "(--rejects FILE or --json lists them all)", markup=False)
    new = c["would_write"] if "would_write" in c else c["written"]
    verb = "would import" if dry_run else "imported"
    if result.error is not None:
        return
    if d.get("empty"):
        out.warn("the input held no chats: nothing was imported"
                 + (" (see the notes above)" if skipped else ""))
    elif new == 0 and not c["updated"] and not dry_run:
        out.info(f"nothing new: {c['unchanged']} message(s) already in the store"
                 f" ({d.get('chats', 0)} chat(s))")
    else:
        out.info(f"{verb} {new} new message(s) in {d.get('chats', 0)} chat(s); "
                 f"{c['unchanged']} already present; {c['rejected']} rejected")
    if c["updated"] and dry_run:
        out.info(f"would take {c['updated']} changed message(s) as edits (the versions they "
                 "replace would go to the trash)")
    elif c["updated"]:
        out.info(f"took {c['updated']} changed message(s) as edits: the versions they "
                 "replace are in the trash (chatsave trash restore brings one back); "
                 "chatsave save or sync sends the edits")
    elif d.get("changed"):
        out.err.print("hint: chatsave import --update takes the new versions of changed "
                      "messages as edits", markup=False)
    if c.get("skipped_deleted"):
        out.warn(f"{c['skipped_deleted']} message(s) were deleted here earlier and were not "
                 "imported again (chatsave trash list / trash restore)")


def export_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="CHAT_ID", help="Chats to export (default: all).", show_default=False)
    ] = None,
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="jsonl (native) or localstorage (a browser dump).")
    ] = ExportFormat.jsonl,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE",
        help="Write here instead of stdout (- is stdout).")] = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="SIZE", help="localstorage: fit this many bytes as a browser "
        "counts them; a chat with messages the backend has not confirmed goes in whole, or "
        "nothing is written (needs --remote).")
    ] = None,
) -> RunResult:
    """Export chats from the local store.

    Example: chatsave export --format localstorage --output restore.json
    """
    from chatsave.ops.exporting import export_chats

    if rt.out.json_mode and output is None:
        raise UsageError("export --json needs --output FILE (stdout carries the JSON events)")
    store = rt.store()
    if budget is not None:
        if format != ExportFormat.localstorage:
            raise UsageError("--budget applies to --format localstorage")
        from chatsave.ops.exporting import export_budgeted
        from chatsave.units import format_size, parse_size

        size = parse_size(budget, "--budget")
        with open_output_file(output, rt.out) as fh:
            backend_id = rt.remote(create=False).capabilities().backend_id
            result = export_budgeted(store, chat_ids or [], fh, size, backend_id,
                                     emit=rt.out.event)
        d = result.details
        rt.out.info(f"localStorage image: {format_size(d['browser_bytes'])} of "
                    f"{format_size(size)}; {d['chats']} chat(s) in, {d['left_out_messages']} "
                    f"message(s) left out ({d['left_out_chats']} whole chats), all of them "
                    "confirmed by the backend")
        return result
    with open_output_file(output, rt.out) as fh:
        to_stdout = fh is rt.out
        result = export_chats(store, chat_ids or [], format.value, fh)
    rt.out.flush()
    evicted = result.details.get("evicted")
    if evicted:
        rt.out.warn(f"{sum(evicted.values())} message(s) are evicted locally and were left "
                    "out; chatsave fetch brings them back")
    if not to_stdout:
        rt.out.info(f"exported {result.counters['written']} message(s) in "
                    f"{result.details['chats']} chat(s) to {output}")
    return result


def register(app: typer.Typer) -> None:
    command(app, "import")(import_cmd)
    command(app, "export")(export_cmd)
