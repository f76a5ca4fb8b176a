"""``diff --html FILE``: one self-contained page of a diff run, for a support ticket.

No network and no external asset (styles inline, no script): the file opens anywhere and
shows the same thing offline. Every value from a store or a backend is HTML-escaped.
The page's figures carry ``data-`` attributes (``data-chat``, ``data-symbol``) so a test
(and a person's tooling) reads them as diff's JSON has them.
"""

from __future__ import annotations

from html import escape

from chatsave import __version__
from chatsave.ops.compare import SYMBOL_NAMES
from chatsave.ops.report import ChatReport, Report, ReportRow, Side

#: the symbols in the order the page shows them, with what each means
SYMBOLS = [
    ("=", "the same on both sides"),
    ("+", "only here: still to be saved"),
    ("-", "only on the backend: sync brings it here"),
    ("*", "conflict: the same id, different content"),
    ("x", "deleted on one side, live on the other"),
    ("D", "a retry copy of another message"),
]

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
.meta { color: #555; margin-bottom: 1em; }
table { border-collapse: collapse; margin: .5em 0 1.2em; }
th, td { border: 1px solid #d0d0d5; padding: .25em .55em; text-align: left;
         vertical-align: top; }
th { background: #f2f2f5; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.sym { font-family: ui-monospace, monospace; font-weight: bold; text-align: center; }
.s-plus { background: #e6f4ea; } .s-minus { background: #e8f0fe; }
.s-star { background: #fde7e9; } .s-x { background: #f1f1f1; } .s-D { background: #fff4e0; }
.ok { color: #1e7e34; } .bad { color: #b3261e; }
code, .hash { font-family: ui-monospace, monospace; font-size: .92em; }
.side { min-width: 18em; } .absent { color: #999; font-style: italic; }
.copy td:first-child { border-left: 4px solid #f0a500; }
.text { white-space: pre-wrap; margin-top: .2em; }
details { margin: .6em 0; } summary { cursor: pointer; font-weight: bold; }
"""

_CLASS = {"+": "s-plus", "-": "s-minus", "*": "s-star", "x": "s-x", "D": "s-D", "=": ""}


def render(report: Report, *, store: str) -> str:
    """The page (a complete HTML document)."""
    shown = [s for s, _ in SYMBOLS]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No fetch of any kind: the page is a file attached to a ticket.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">",
        "<title>chatsave diff report</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>chatsave diff report</h1>",
        f'<p class="meta">{len(report.chats)} chat(s) compared, '
        f"{len(report.differing)} differ; here: <code>{escape(store)}</code>, backend: "
        f"<code>{escape(report.remote)}</code>; {escape(report.generated_at)}, chatsave "
        f"{escape(__version__)}; exit code <span id=\"exit-code\">{report.exit_code}</span>."
        + ("" if report.show_text else " Message text is not shown (diff --html "
           "--show-text shows it).") + "</p>",
        _legend(), "<h2>Chats</h2>", _chat_table(report, shown),
    ]
    for chat in report.differing:
        parts.append(_chat_section(chat, report.show_text))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _legend() -> str:
    items = "".join(f'<tr><td class="sym {_CLASS[s]}">{escape(s)}</td><td>{escape(what)}'
                    "</td></tr>" for s, what in SYMBOLS)
    return f"<table class=\"legend\"><tr><th>symbol</th><th>meaning</th></tr>{items}</table>"


def _chat_table(report: Report, shown: list[str]) -> str:
    head = "".join(f'<th class="sym">{escape(s)}</th>' for s in shown)
    rows = []
    for chat in [*report.differing, *(c for c in report.chats if c.in_agreement)]:
        cells = "".join(
            f'<td class="n" data-chat="{escape(chat.chat_id)}" data-symbol="{escape(s)}">'
            f"{chat.counts.get(s, 0)}</td>" for s in shown)
        standing = '<span class="ok">in agreement</span>' if chat.in_agreement else \
            f'<span class="bad">{escape(chat.error) if chat.error else "differs"}</span>'
        link = f'<a href="#chat-{escape(chat.chat_id)}">' if not chat.in_agreement else ""
        rows.append(f"<tr><td>{link}<code>{escape(chat.chat_id)}</code>"
                    f"{'</a>' if link else ''}</td><td>{standing}</td>{cells}</tr>")
    total = "".join(f'<td class="n" data-chat="" data-symbol="{escape(s)}">'
                    f"{report.totals.get(s, 0)}</td>" for s in shown)
    return (f"<table id=\"chats\"><tr><th>chat</th><th>standing</th>{head}</tr>"
            + "".join(rows) + f"<tr><th>all</th><th></th>{total}</tr></table>")


def _chat_section(chat: ChatReport, show_text: bool) -> str:
    counts = ", ".join(f"{n} {SYMBOL_NAMES[s].replace('_', ' ')}"
                       for s, n in chat.counts.items() if s != "=" and n)
    lines = [f'<details open id="chat-{escape(chat.chat_id)}"><summary>chat '
             f"<code>{escape(chat.chat_id)}</code>: {escape(counts or 'differs')}</summary>"]
    if chat.error:
        lines.append(f'<p class="bad">{escape(chat.error)}</p>')
    if chat.rows:
        lines.append('<table class="messages"><tr><th class="sym"></th><th>message</th>'
                     "<th>here</th><th>backend</th></tr>")
        lines += [_message_row(row, show_text) for row in chat.rows]
        lines.append("</table>")
    if chat.more:
        lines.append(f"<p>{chat.more} more differing message(s) not shown: "
                     f"<code>chatsave diff {escape(chat.chat_id)} --combined FILE</code> "
                     "lists every one.</p>")
    lines.append("</details>")
    return "\n".join(lines)


def _message_row(row: ReportRow, show_text: bool) -> str:
    note = f'<br><span class="meta">copy of <code>{escape(row.copy_of)}</code></span>' \
        if row.copy_of else ""
    css = ' class="copy"' if row.copy_of else ""
    return (f"<tr{css}><td class=\"sym {_CLASS.get(row.symbol, '')}\">{escape(row.symbol)}</td>"
            f"<td><code>{escape(row.id)}</code>{note}</td>"
            f"<td class=\"side\">{_side(row.here, show_text)}</td>"
            f"<td class=\"side\">{_side(row.there, show_text)}</td></tr>")


def _side(side: Side | None, show_text: bool) -> str:
    if side is None:
        return '<span class="absent">not held</span>'
    bits = []
    if side.deleted:
        bits.append('<span class="bad">deleted</span>')
    if side.created_at:
        bits.append(escape(side.created_at))
    if side.role:
        bits.append(escape(side.role))
    if side.rev is not None:
        bits.append(f"rev {side.rev}")
    if side.content_hash:
        bits.append(f'<span class="hash" title="{escape(side.content_hash)}">'
                    f"{escape(side.content_hash[:16])}</span>")
    text = f'<div class="text">{escape(side.text)}</div>' if show_text and side.text else ""
    return " &middot; ".join(bits) + text
