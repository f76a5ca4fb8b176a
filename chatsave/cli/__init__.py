"""The command line: a thin Typer layer that parses, calls the core and renders."""

from __future__ import annotations

import signal
import sys


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM is handled like Ctrl-C: the funnel saves progress and exits 130.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``chatsave`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--version"]:
        # Fast path: no Typer, pydantic, httpx or rich for the version.
        from chatsave import __version__

        sys.stdout.write(f"chatsave {__version__}\n")
        return
    signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGXFSZ"):
        # A file size limit (ulimit -f) becomes a write error the store reports (exit 10),
        # not a silent kill in the middle of a transaction.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from chatsave.cli.app import run

    sys.exit(run(args))
