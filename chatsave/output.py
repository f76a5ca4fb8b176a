"""Everything written to the terminal: JSON lines on stdout, human text on stderr (rich).

stdout is data: with ``--json`` it holds JSON Lines and nothing else, written with
json.dumps (never through rich, which would wrap them). Human text, progress and
warnings go to stderr. A closed stdout (``chatsave export | head``) is remembered and
further output is dropped quietly.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import IO, Any

from rich.console import Console

from chatsave.errors import ChatsaveError
from chatsave.ops.progress import Progress, no_progress

SCHEMA_VERSION = 1


def _json_line(doc: dict[str, Any]) -> str:
    """One JSON line, UTF-8 as is; \\u escapes only when some text is not valid Unicode
    (a lone surrogate quoted from refused input would otherwise fail to be written)."""
    text = json.dumps(doc, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(doc, ensure_ascii=True, default=str)
    return text + "\n"


class StdoutClosed(Exception):
    """The reader of stdout went away (EPIPE)."""


class Output:
    """One command's output channels."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False,
                 stdout: IO[str] | None = None, stderr: IO[str] | None = None,
                 err_console: Console | None = None) -> None:
        """``err_console``: the rich console for stderr (default: one on ``stderr``, which
        decides by itself whether it is a terminal)."""
        self.json_mode = json_mode
        self.quiet = quiet
        self._stdout = stdout
        self._stderr_file = stderr
        self.stdout_closed = False
        self._err: Console | None = err_console
        self._out: Console | None = None
        self._display: Any = None  # the progress display on stderr, while one is shown

    @property
    def stdout(self) -> IO[str]:
        return self._stdout or sys.stdout

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = Console(file=self._stderr_file or sys.stderr, stderr=True,
                                highlight=False, soft_wrap=True)
        return self._err

    @property
    def out(self) -> Console:
        """rich console on stdout, for human reports (never used in --json mode)."""
        if self._out is None:
            self._out = Console(file=self.stdout, highlight=False, soft_wrap=True)
        return self._out

    @property
    def interactive(self) -> bool:
        return not self.quiet and self.err.is_terminal

    # ------------------------------------------------------------------ stdout
    def write(self, text: str) -> None:
        """Raw data to stdout (export). Raises StdoutClosed when the reader is gone."""
        if self.stdout_closed:
            raise StdoutClosed
        try:
            self.stdout.write(text)
        except BrokenPipeError:
            self._close_stdout()
            raise StdoutClosed from None

    def flush(self) -> None:
        if self.stdout_closed:
            return
        try:
            self.stdout.flush()
        except BrokenPipeError:
            self._close_stdout()

    def _close_stdout(self) -> None:
        self.stdout_closed = True
        # Point the real stdout at devnull so the interpreter's final flush is quiet.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stdout.fileno())
            os.close(devnull)

    def event(self, type_: str, **fields: Any) -> None:
        """One JSON event line (only in --json mode). Events carry ids and hashes, no bodies."""
        if not self.json_mode or self.stdout_closed:
            return
        with contextlib.suppress(StdoutClosed):
            self.write(_json_line({"type": type_, **fields}))

    def summary(self, fields: dict[str, Any]) -> None:
        if not self.json_mode or self.stdout_closed:
            return
        line = {"type": "summary", "schema_version": SCHEMA_VERSION, **fields}
        with contextlib.suppress(StdoutClosed):
            self.write(_json_line(line))
            self.flush()

    # ------------------------------------------------------------------ stderr
    def info(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, markup=False)

    def warn(self, text: str) -> None:
        self.err.print(f"warning: {text}", markup=False, style="yellow")

    def error(self, err: ChatsaveError) -> None:
        self.err.print(f"error: {err.message}", markup=False, style="bold red")
        if err.hint:
            self.err.print(f"hint: {err.hint}", markup=False)

    def report(self, renderable: Any) -> None:
        """A human report (status, diff table) on stdout; nothing in --json mode."""
        if self.json_mode or self.stdout_closed:
            return
        try:
            if isinstance(renderable, str):
                self.out.print(renderable, markup=False)
            else:
                self.out.print(renderable)
        except BrokenPipeError:
            self._close_stdout()

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None, unit: str = "message"
                 ) -> Iterator[Progress]:
        """A transient progress display on stderr: counts, rate and time left (a terminal
        only; nothing with --quiet or --json). Yields the operation's callback
        (chatsave.ops.progress.Progress): ``(n)`` advances, ``total=`` sets the total,
        ``stage=`` starts a new stage counted from 0, ``unit=`` names what is counted."""
        if self.json_mode or not self.interactive:
            yield no_progress
            return
        from rich.progress import Progress as Display

        # stdout is not redirected: it carries data (export -o -, diff --combined -).
        with Display(*_progress_columns(), console=self.err, transient=True,
                     redirect_stdout=False, redirect_stderr=False) as display:
            task = display.add_task(description, total=total, unit=unit)
            counted = unit
            self._display = display

            def report(advance: int = 0, /, *, total: int | None = None,
                       stage: str | None = None, unit: str | None = None) -> None:
                nonlocal task, counted
                counted = unit or counted
                if stage is not None:
                    # A new task, not a reset one: rich keeps a total once set.
                    display.remove_task(task)
                    task = display.add_task(stage, total=total, unit=counted)
                    return
                display.update(task, total=total, unit=counted, advance=advance or None)

            try:
                yield report
            finally:
                self._display = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Take a progress display off the terminal for a while (to ask a question)."""
        display = self._display
        if display is None:
            yield
            return
        display.stop()
        try:
            yield
        finally:
            display.start()


def _counted(value: float, unit: str) -> str:
    """A count in its unit: bytes as a size (kB, MB), the rest as a number."""
    if unit == "byte":
        from rich.filesize import decimal

        return decimal(int(value))
    return f"{int(value):,}"


def _progress_columns() -> list[Any]:
    """What a progress line shows: stage, bar, done of total, rate, time left (rich's
    progress module is imported only when one is drawn)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class CountColumn(MofNCompleteColumn):
        """Done of total, in the task's unit ("1,200/5,000 messages", "3.1 MB/9.8 MB")."""

        def render(self, task: Task) -> Text:
            unit = task.fields.get("unit", "message")
            if task.total is None and not task.completed:
                return Text("")  # nothing counted yet, and no total: the bar pulses
            total = "?" if task.total is None else _counted(task.total, unit)
            plural = "" if unit == "byte" else f" {unit}s"
            return Text(f"{_counted(task.completed, unit)}/{total}{plural}",
                        style="progress.download")

    class RateColumn(ProgressColumn):
        """Units per second ("850 messages/s", "2.4 MB/s")."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("", style="progress.data.speed")
            unit = task.fields.get("unit", "message")
            shown = _counted(speed, unit) + ("" if unit == "byte" else f" {unit}s")
            return Text(f"{shown}/s", style="progress.data.speed")

    return [TextColumn("{task.description}"), BarColumn(), CountColumn(), RateColumn(),
            TimeRemainingColumn()]
