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
from collections.abc import Callable, Iterator
from typing import IO, Any

from rich.console import Console

from chatsave.errors import ChatsaveError

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
                 stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self._stdout = stdout
        self._stderr_file = stderr
        self.stdout_closed = False
        self._err: Console | None = None
        self._out: Console | None = None

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
    def progress(self, description: str, total: int | None = None
                 ) -> Iterator[Callable[[int], None]]:
        """A transient progress bar on stderr (TTY only, off with --quiet)."""
        if not self.interactive:
            yield lambda n: None
            return
        from rich.progress import Progress

        with Progress(console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
