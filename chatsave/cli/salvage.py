"""``chatsave salvage``: recover what SQLite can still read of a damaged store."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from chatsave.cli.runtime import Runtime, command
from chatsave.errors import UsageError
from chatsave.ops.result import RunResult

# Unreadable and invalid messages named in the human output (all of them in --json).
SHOWN = 20


def salvage_cmd(
    rt: Runtime,
    damaged: Annotated[Path, typer.Argument(
        metavar="DAMAGED_FILE", help="The damaged store, moved aside (it is only read, "
        "from a copy).")],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Read and count only; change nothing.")] = False,
) -> RunResult:
    """Recover the messages, chats and trash still readable in a damaged store.

    They go into the store given by --store (or the default store), a whole or new one: every message SQLite can still read and that passes import's checks, as pending (save or sync pushes it; the backend keeps one copy per id). What the backend confirmed comes back with sync too. Exit 0 when every row was salvaged, 1 when some could not be read or were invalid (listed), 6 when a message held other content here (the salvaged version is in the trash), 10 when nothing of the file can be read.

    Example: chatsave salvage ~/.local/share/chatsave/store.db.damaged
    """  # noqa: E501
    from chatsave.ops.salvage import salvage

    target = Path(rt.settings.store).expanduser()
    if target.exists() and damaged.exists() and os.path.samefile(target, damaged):
        raise UsageError(f"{damaged} is the store salvage would write to",
                         hint=f"move it aside first (mv {shlex.quote(str(damaged))} "
                         f"{shlex.quote(str(damaged) + '.damaged')}) and salvage that file "
                         "into a new store")
    store = rt.store(missing="blank") if dry_run else rt.locked_store()
    result = salvage(store, damaged, dry_run=dry_run, emit=rt.out.event,
                     run_args={"damaged": str(damaged), "dry_run": dry_run})
    _say(rt, result, dry_run)
    return result


def _say(rt: Runtime, result: RunResult, dry_run: bool) -> None:
    out, c, d = rt.out, result.counters, result.details
    for what in ("unreadable_messages", "invalid_messages"):
        listed = d.get(what, [])
        for item in listed[:SHOWN]:
            why = f": {item['reason']}" if "reason" in item else ""
            out.info(f"{what.split('_')[0]}: chat {item['chat_id']!r} message "
                     f"{item['id']!r}{why}")
        if len(listed) > SHOWN:
            out.info(f"  ... and {len(listed) - SHOWN} more (--json lists them all)")
    for table in d.get("unreadable_tables", []):
        out.warn(f"the {table} table of {d['source']} cannot be read at all")
    verb = "would salvage" if dry_run else "salvaged"
    out.info(f"{verb} {c['salvaged']} message(s) in {d.get('chats', 0)} chat(s) from "
             f"{d['source']}; {c['unchanged']} already here; {c['unreadable']} unreadable; "
             f"{c['invalid']} invalid; {c['evicted']} evicted (the backend holds them); "
             f"{c.get('trash_salvaged', 0)} trash entries")
    if c["conflicts"]:
        out.warn(f"{c['conflicts']} message(s) are held here with other content: the "
                 "salvaged versions are in the trash (chatsave trash list)")
    if not dry_run:
        out.info("next: chatsave sync --all pushes the salvaged messages and brings back "
                 "what the backend confirmed")


def register(app: typer.Typer) -> None:
    command(app, "salvage")(salvage_cmd)
