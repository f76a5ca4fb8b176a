"""``chatsave doctor``: name the AutoBot traps present in one chat (read-only)."""

from __future__ import annotations

from typing import Annotated

import typer

from chatsave.cli.runtime import Runtime, command
from chatsave.cli.save import say_refused
from chatsave.errors import ExitCode, UsageError
from chatsave.ops.result import RunResult


def doctor_cmd(
    rt: Runtime,
    chat_id: Annotated[str, typer.Argument(metavar="CHAT_ID", help="The chat to examine.")],
    repair: Annotated[bool, typer.Option(
        "--repair", help="autobot-dir only: rewrite the chat file with every time in one form, "
        "every message with a real id and every time-only stamp dated from the chat (no "
        "message left out), so AutoBot can load and order it; then examine it again.")
    ] = False,
) -> RunResult:
    """Name the AutoBot traps in one chat: what AutoBot's save and loader will do to it.

    Looks at the backend's copy (with an AutoBot --remote) and at the local copy as AutoBot would hold it: repeated user messages its loader collapses, replies less than 120 s apart it merges, timestamp kinds that do not mix, a chat it cannot load, the empty second "New Chat" session. Exit 0 when none is found, 1 when some are.

    Example: chatsave doctor 9b0c6c1e --remote autobot-dir:/srv/autobot/data/chats
    """  # noqa: E501
    from chatsave.remote.autobot.base import AutobotBase
    from chatsave.remote.autobot.doctor import examine

    store = rt.locked_store() if repair else rt.store()
    remote = rt.remote() if rt.settings.remote else None
    if remote is not None and not isinstance(remote, AutobotBase):
        raise UsageError(f"chatsave doctor examines AutoBot chats; {remote.url} is not an "
                         "AutoBot remote",
                         hint="--remote autobot+http://host:8001 or autobot-dir:PATH (or no "
                         "--remote to examine only the local copy)")
    result = RunResult("doctor")
    if repair:
        from chatsave.remote.autobot.directory import AutobotDirRemote
        from chatsave.remote.autobot.doctor import repair as repair_chat

        if not isinstance(remote, AutobotDirRemote):
            raise UsageError("--repair rewrites a chat file: it needs --remote autobot-dir:PATH "
                             "(on the AutoBot server)")
        run_id = rt.begin_run(store, {"chat": chat_id, "repair": True})
        done = repair_chat(store, remote, chat_id, run_id)
        rt.out.event("repaired", chat_id=chat_id, changed=done["changed"],
                     messages=done["messages"], kept=done["kept"],
                     dropped=sorted(done["dropped"]),
                     renamed=[{"position": p, "was": w, "id": n} for p, w, n in done["renamed"]],
                     dated=[{"id": i, "time": t, "from": f} for i, t, f in done["dated"]])
        result.details["repair"] = {k: v for k, v in done.items() if k != "dropped"}
        result.counters["written"] = done["messages"] if done["changed"] else 0
        rt.out.info(f"rewrote the file of chat {chat_id}: {done['messages']} message(s), one "
                    "time form" if done["changed"] else f"the file of chat {chat_id} needed "
                    "no rewrite")
        for pos, was, new in done["renamed"]:
            rt.out.info(f"message #{pos} had the id {was!r}: it is now {new} (recorded in the "
                        "store's id mappings)")
        for mid, when, source in done["dated"]:
            rt.out.info(f"message {mid} had a time without a date: it is now {when}, the date "
                        f"taken from {source} (flagged inexact)")
        for mid, why in sorted(done["dropped"].items()):
            rt.out.warn(f"AutoBot's loader will still drop {mid} when it loads the chat: {why} "
                        "(sync the chat here first to keep a copy)")
    report = examine(store, remote, chat_id)
    if report.refused is not None:
        rt.out.event("refused", **result.refuse(chat_id, report.refused))
    for f in report.findings:
        rt.out.event("trap", chat_id=chat_id, trap=f.trap, where=f.where, ids=f.ids,
                     detail=f.detail)
    result.counters["read"] = report.local_messages + (report.backend_messages or 0)
    result.counters["traps_found"] = len(report.findings)
    result.details.update(chat_id=chat_id, remote=report.remote,
                          local_messages=report.local_messages,
                          backend_messages=report.backend_messages,
                          traps=sorted({f.trap for f in report.findings}))
    if report.findings:
        result.flag(ExitCode.DIFFERENCES)
        lines = [f"{len(report.findings)} AutoBot trap(s) in chat {chat_id}:"]
        for f in report.findings:
            lines.append(f"  [{f.where}] {f.trap}: {f.detail}")
        rt.out.report("\n".join(lines))
    else:
        where = f"here and on {report.remote}" if report.backend_messages is not None \
            else "in the local copy"
        rt.out.info(f"no AutoBot trap found in chat {chat_id} ({where})")
    say_refused(rt, result, "was examined here only, not on the backend")
    return result


def register(app: typer.Typer) -> None:
    command(app, "doctor")(doctor_cmd)
