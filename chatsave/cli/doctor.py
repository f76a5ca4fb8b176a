"""``chatsave doctor``: name the AutoBot traps present in one chat (read-only)."""

from __future__ import annotations

from typing import Annotated

import typer

from chatsave.cli.runtime import Runtime, command
from chatsave.errors import ExitCode, UsageError
from chatsave.ops.result import RunResult


def doctor_cmd(
    rt: Runtime,
    chat_id: Annotated[str, typer.Argument(metavar="CHAT_ID", help="The chat to examine.")],
) -> RunResult:
    """Name the AutoBot traps in one chat: what AutoBot's save and loader will do to it.

    Looks at the backend's copy (with an AutoBot --remote) and at the local copy as AutoBot would hold it: repeated user messages its loader collapses, replies less than 120 s apart it merges, timestamp kinds that do not mix, a chat it cannot load, the empty second "New Chat" session. Exit 0 when none is found, 1 when some are.

    Example: chatsave doctor 9b0c6c1e --remote autobot-dir:/srv/autobot/data/chats
    """  # noqa: E501
    from chatsave.remote.autobot_base import AutobotBase
    from chatsave.remote.autobot_doctor import examine

    store = rt.store()
    remote = rt.remote() if rt.settings.remote else None
    if remote is not None and not isinstance(remote, AutobotBase):
        raise UsageError(f"chatsave doctor examines AutoBot chats; {remote.url} is not an "
                         "AutoBot remote",
                         hint="--remote autobot+http://host:8001 or autobot-dir:PATH (or no "
                         "--remote to examine only the local copy)")
    report = examine(store, remote, chat_id)
    result = RunResult("doctor")
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
        where = f"here and on {report.remote}" if report.remote else "in the local copy"
        rt.out.info(f"no AutoBot trap found in chat {chat_id} ({where})")
    return result


def register(app: typer.Typer) -> None:
    command(app, "doctor")(doctor_cmd)
