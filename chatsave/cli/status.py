"""``chatsave status``: what the store holds and where each message stands, per backend."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from chatsave.cli.runtime import Runtime, command
from chatsave.errors import ExitCode, UsageError
from chatsave.model import check_chat_id
from chatsave.ops.result import RunResult
from chatsave.units import format_size


def status_cmd(
    rt: Runtime,
    chat_id: Annotated[str | None, typer.Argument(
        metavar="CHAT_ID", help="One chat (default: the whole store).")] = None,
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Ask the backend now instead of reporting the last known state.")
    ] = False,
) -> RunResult:
    """Show what the local store holds and what is pending, per backend.

    Example: chatsave status --json
    """
    if chat_id is not None:
        check_chat_id(chat_id)
    # No store yet is a state to report (exit 0), unless a chat is asked about (exit 2).
    store = rt.store(missing="refuse" if chat_id is not None else "blank")
    if chat_id is not None and not store.has_chat(chat_id):
        raise UsageError(f"chat {chat_id!r} is not in the local store",
                         hint="chatsave status lists the store's chats")
    counts = store.counts(chat_id)
    backends = store.backend_states(chat_id)
    info: dict[str, Any] = {
        "store": str(store.path),
        "exists": store.exists,
        "store_bytes": store.file_size(),
        "store_schema_version": store.schema_version,
        **counts,
        "backends": backends,
        "runs": store.runs(5),
    }
    if chat_id is not None:
        row = store.chats([chat_id])[0]
        info["chat_id"], info["title"] = chat_id, row.title
    result = RunResult("status")
    result.details.update(info)
    if backends:
        # Pending work against the most recently used backend.
        result.counters["pending_push"] = backends[0]["pending_push"]
        result.counters["conflicts"] = backends[0]["conflicts"]
        result.counters["rejected"] = backends[0]["rejected"]
    if refresh:
        from chatsave.ops.diff import diff

        live = diff(store, rt.remote(create=False), [chat_id] if chat_id else None)
        for key in ("pending_push", "pending_pull", "conflicts", "tombstones",
                    "duplicates_found"):
            result.counters[key] = live.counters.get(key, 0)
        info["refreshed"] = {"remote": live.details["remote"],
                             "backend_id": live.details["backend_id"],
                             "differing_chats": live.details["differing_chats"],
                             **{k: result.counters[k] for k in (
                                 "pending_push", "pending_pull", "conflicts", "tombstones",
                                 "duplicates_found")}}
        result.codes.extend(c for c in live.codes if c != ExitCode.DIFFERENCES)
    rt.out.event("status", **info)
    rt.out.report(_render(info))
    return result


def _render(info: dict[str, Any]) -> str:
    lines = []
    if "chat_id" in info:
        lines.append(f"chat      {info['chat_id']}  {info['title'] or ''}".rstrip())
    if not info["exists"]:
        lines.append(f"store     no store at {info['store']} yet (a command that writes "
                     "creates it: import, save, sync, fetch)")
    else:
        lines += _render_store(info)
    if "refreshed" in info:
        r = info["refreshed"]
        lines.append(f"now       {r['remote']}: {r['differing_chats']} chat(s) differ; to push "
                     f"{r['pending_push']}, to pull {r['pending_pull']}, conflicts "
                     f"{r['conflicts']}, deleted on one side {r['tombstones']}, duplicates "
                     f"{r['duplicates_found']}")
    return "\n".join(lines)


def _render_store(info: dict[str, Any]) -> list[str]:
    lines = [
        f"store     {info['store']} ({format_size(info['store_bytes'])}, "
        f"schema {info['store_schema_version']})",
        f"chats     {info['chats']}",
        f"messages  {info['messages']}"
        + (f" ({info['evicted']} evicted)" if info["evicted"] else "")
        + (f" ({info['inexact_times']} with reconstructed times)" if info["inexact_times"]
           else ""),
        f"trash     {info['in_trash']}",
    ]
    if not info["backends"]:
        lines.append("backends  none yet: nothing has been saved to a backend "
                     f"({info['messages']} message(s) only here)")
    for b in info["backends"]:
        lines.append(f"backend   {b['url']} ({b['backend_id']})")
        lines.append(f"          pending push {b['pending_push']}, deletes to send "
                     f"{b['pending_deletes']}, conflicts {b['conflicts']}, rejected "
                     f"{b['rejected']}, last sync {b['last_sync'] or 'never'}")
    if info["runs"]:
        lines.append("last runs")
        for r in info["runs"]:
            state = "running or killed" if r["exit_code"] is None else f"exit {r['exit_code']}"
            lines.append(f"  #{r['run_id']:<5} {r['command']:<8} {r['started_at'][:19]}  {state}")
    return lines


def register(app: typer.Typer) -> None:
    command(app, "status")(status_cmd)
