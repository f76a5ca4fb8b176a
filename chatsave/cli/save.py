"""``chatsave save``: push what is pending to the backend, resumably and exactly once."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from chatsave.cli.importexport import ImportFormat, OnInvalid, parse_day, parse_tz
from chatsave.cli.runtime import Runtime, command
from chatsave.errors import UsageError
from chatsave.model import check_chat_id
from chatsave.ops.result import RunResult


def chats_or_all(chat_ids: list[str] | None, all_: bool, what: str) -> list[str] | None:
    """The named chats, None for --all; refuse neither/both."""
    if chat_ids and all_:
        raise UsageError(f"{what}: name chats or pass --all, not both")
    if not chat_ids and not all_:
        raise UsageError(f"{what}: which chats? Name them, or pass --all")
    for chat_id in chat_ids or []:
        check_chat_id(chat_id)  # refused before anything, the backend included, is asked
    return None if all_ else chat_ids


def save_cmd(
    rt: Runtime,
    chat_ids: Annotated[list[str] | None, typer.Argument(
        metavar="CHAT_ID", help="Chats to save.", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every chat in the local store.")] = False,
    from_: Annotated[Path | None, typer.Option(
        "--from", metavar="FILE", help="Record these messages first (as import does), then "
        "save them; - reads stdin.")] = None,
    format: Annotated[ImportFormat, typer.Option(
        "--format", help="Format of --from.")] = ImportFormat.auto,
    day: Annotated[str | None, typer.Option(
        "--date", metavar="DAY", help="Day for time-only timestamps in --from.")] = None,
    tz: Annotated[str | None, typer.Option(
        "--tz", metavar="ZONE", help="Time zone of naive timestamps in --from.")] = None,
    on_invalid: Annotated[OnInvalid, typer.Option(
        "--on-invalid", help="Invalid items in --from: fail (exit 2) or skip.")
    ] = OnInvalid.fail,
    retry_rejected: Annotated[bool, typer.Option(
        "--retry-rejected", help="Send again messages the backend rejected before.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the batches that would be sent; send nothing.")] = False,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", min=1, max=64, help="Requests in flight at once.")] = 4,
    max_rps: Annotated[float | None, typer.Option(
        "--max-rps", min=0.01, help="At most this many requests per second.")] = None,
    jitter_start: Annotated[float, typer.Option(
        "--jitter-start", min=0, metavar="SECONDS",
        help="Wait a random 0..SECONDS first, so a cron wave spreads out.")] = 0.0,
    max_duration: Annotated[float | None, typer.Option(
        "--max-duration", min=0, metavar="SECONDS",
        help="Stop starting requests after this long; the rest stays pending.")] = None,
) -> RunResult:
    """Save pending messages to the backend; rerun to resume.

    Example: chatsave save --all --remote https://chats.example.com --json
    """
    from chatsave.ops.save import SaveOptions, save
    from chatsave.remote.retry import RateLimiter

    if from_ is None:
        chosen = chats_or_all(chat_ids, all_, "save")
    elif chat_ids and all_:
        raise UsageError("save: name chats or pass --all, not both")
    else:
        chosen = chat_ids or None
    # The remote first: one refused (exit 2) leaves no new, empty store behind. A dry run
    # creates neither a store nor an embedded backend.
    remote = rt.remote(limiter=RateLimiter(max_rps), max_connections=concurrency,
                       create=not dry_run,
                       on_retry=lambda what, n, why, delay: rt.out.info(
                           f"retrying {what} in {delay:.1f}s (attempt {n} failed: {why})"))
    store = rt.store() if dry_run else rt.locked_store()
    # A dry run records what --from holds only for as long as it takes to plan its
    # sending: then all of it is rolled back.
    with store.rolled_back() if dry_run and from_ is not None else nullcontext():
        imported: RunResult | None = None
        if from_ is not None:
            imported = _record(rt, store, str(from_), format, day, tz, on_invalid)
            if imported.error is not None:
                return imported
            if chosen is None and not all_:
                chosen = imported.chat_ids
        args = {"chats": chosen if chosen is not None else "all",
                "from": str(from_) if from_ else None, "dry_run": dry_run,
                "retry_rejected": retry_rejected, "remote": remote.url}
        run_id = None if dry_run else rt.begin_run(store, args)
        options = SaveOptions(retry_rejected=retry_rejected, dry_run=dry_run,
                              concurrency=concurrency, max_duration=max_duration,
                              jitter_start=jitter_start)
        with rt.out.progress("saving") as advance:
            result = save(store, remote, chosen, options, emit=rt.out.event, run_id=run_id,
                          progress=advance)
    if imported is not None:
        counts = imported.summary()
        result.details["import"] = {
            ("would_write" if dry_run and k == "written" else k): counts[k]
            for k in ("read", "written", "unchanged", "rejected")}
        result.codes.extend(imported.codes)
    _say(rt, result)
    return result


def _record(rt: Runtime, store: Any, spec: str, format: ImportFormat, day: str | None,
            tz: str | None, on_invalid: OnInvalid) -> RunResult:
    from chatsave.formats import Source
    from chatsave.normalize import TimeContext
    from chatsave.ops.importing import ImportOptions, import_source

    times = TimeContext(tz=parse_tz(tz or rt.settings.tz), date=parse_day(day))
    options = ImportOptions(format=format.value, times=times, on_invalid=on_invalid.value)
    source = Source.open(spec)
    try:
        with rt.out.progress("importing") as advance:
            result = import_source(store, source, options, emit=rt.out.event,
                                   run_args={"file": spec, "via": "save --from"},
                                   progress=advance)
    finally:
        source.close()
    for line in result.details.get("rejections", []):
        rt.out.err.print(f"  {line}", markup=False)
    if result.details.get("empty"):
        rt.out.warn(f"{spec} held no chats: nothing was recorded from it")
    return result


def _say(rt: Runtime, result: RunResult) -> None:
    out, c, d = rt.out, result.counters, result.details
    if "plan" in d:
        out.info(f"would send {c['would_send']} message(s) in {d['batches']} request(s) to "
                 f"{d['remote']}")
        say_refused(rt, result, "would not be saved")
        return
    out.info(f"saved {c['written']} message(s) to {d['remote']}; {c['unchanged']} were "
             f"already there ({d['chats']} chat(s), {d['write_requests']} request(s), "
             f"{c['retried']} retried)")
    if c.get("resent_lost"):
        out.warn(f"{c['resent_lost']} message(s) the backend had confirmed were gone from "
                 "it (restored from an old copy, or written over); they were sent again")
    if d.get("check_error"):
        out.warn(f"could not check that the backend still holds what it confirmed: "
                 f"{d['check_error']}; the next save checks again")
    if c["conflicts"]:
        out.warn(f"{c['conflicts']} conflict(s): the backend holds other content under the "
                 "same id; both versions are kept (chatsave diff shows them, "
                 "chatsave sync --prefer local|backend CHAT resolves)")
    say_rejected(rt, result)
    if c.get("unacknowledged"):
        out.warn(f"{c['unacknowledged']} message(s) were not confirmed by the backend's "
                 "answer; they stay pending")
    pending = c["pending_push"] - say_refused(rt, result, "was not saved")
    if pending:
        why = d.get("stopped") or d.get("last_error") or ""
        out.warn(f"{pending} message(s) still pending{': ' + why if why else ''}; "
                 "rerun chatsave save to resume")


def say_rejected(rt: Runtime, result: RunResult) -> None:
    """Name the messages the backend rejected (the first few, then a count) with their
    reasons, and say which of them a retry may let through (``--retry-rejected``)."""
    total = result.counters["rejected"]
    if not total:
        return
    out = rt.out
    shown = result.details.get("rejections", [])
    out.warn(f"{total} message(s) rejected by the backend are kept locally:")
    for entry in shown:
        out.err.print(f"  chat {entry['chat_id']!r} message {entry['id']!r}: "
                      f"{entry['reason'] or 'no reason given'}", markup=False)
    if total > len(shown):
        out.err.print(f"  ... and {total - len(shown)} more", markup=False)
    kinds = result.details.get("rejected_kinds", {})
    dropped = kinds.get("dropped", 0)
    if dropped:
        out.err.print(f"hint: {dropped} of them the backend did not keep as it stands; once "
                      "the reason is dealt with, chatsave save --retry-rejected sends them "
                      "again", markup=False)
    if total - dropped:
        out.err.print(f"hint: {total - dropped} of them the backend cannot take as they are "
                      "(over its limits, or refused by its validation): sending them again "
                      "would meet the same refusal; they stay here, and chatsave export "
                      "writes them out", markup=False)


def say_refused(rt: Runtime, result: RunResult, what: str) -> int:
    """List the chats the backend cannot take (left out of the run, exit 9): "chat X
    ``what``: why"; return how many messages wait in them here."""
    waiting = 0
    for entry in result.details.get("refused", []):
        count = entry.get("pending_push", 0)
        waiting += count
        stay = f" ({count} message(s) stay here, pending)" if count else ""
        rt.out.warn(f"chat {entry['chat_id']!r} {what}{stay}: {entry['reason']}")
        if entry.get("hint"):
            rt.out.err.print(f"  hint: {entry['hint']}", markup=False)
    return waiting


def register(app: typer.Typer) -> None:
    command(app, "save")(save_cmd)
