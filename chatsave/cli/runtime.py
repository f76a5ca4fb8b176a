"""The machinery every command shares: common flags, settings, the store, and the one error funnel.

A command is a function ``f(rt: Runtime, **its_options) -> RunResult`` registered with
``@command(app, "name")``; the decorator adds the common flags (``--json --quiet --store
--remote --token-file --lock-wait --traceback``) to its signature, builds the Runtime,
runs it inside the funnel and exits with the result's code.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shlex
import sqlite3
import stat
import sys
import time
import traceback as tb
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from chatsave.config import Settings, resolve
from chatsave.errors import (
    ChatsaveError,
    Interrupted,
    StoreError,
    StoreMissingError,
    UsageError,
)
from chatsave.metrics_file import check_path as check_metrics_file
from chatsave.ops.result import RunResult
from chatsave.output import Output, StdoutClosed
from chatsave.store.checks import error_text
from chatsave.store.store import Store

# An unexpected exception is a bug in chatsave: reported without a traceback, with
# its own exit code (BSD's EX_SOFTWARE) so that it is never mistaken for an outcome.
INTERNAL_ERROR = 70
PANEL = "Common options"


def _opt(*decls: str, help: str, metavar: str | None = None, **checks: Any) -> Any:
    return typer.Option(*decls, help=help, metavar=metavar, rich_help_panel=PANEL,
                        show_default=False, **checks)


COMMON: list[inspect.Parameter] = [
    inspect.Parameter("json_", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=Annotated[bool, _opt(
                          "--json", help="JSON Lines on stdout: events, then one summary.")]),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=Annotated[bool, _opt(
                          "--quiet", "-q", help="No progress or informational text.")]),
    inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, _opt(
                          "--store", help="Local store file (env CHATSAVE_STORE).",
                          # An unreadable store is the store's problem (exit 10), as it
                          # is when the path comes from the environment.
                          readable=False)]),
    inspect.Parameter("remote", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[str | None, _opt(
                          "--remote", help="Backend: http(s)://host, a path with a / or a "
                          "file: URL (embedded: ./backend.db), autobot+http(s)://, "
                          "autobot-dir:PATH (env CHATSAVE_REMOTE).")]),
    inspect.Parameter("token_file", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, _opt(
                          "--token-file", help="File holding the bearer token "
                          "(env CHATSAVE_TOKEN_FILE).")]),
    inspect.Parameter("lock_wait", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[float | None, _opt(
                          "--lock-wait", help="Seconds to wait for a store locked by "
                          "another chatsave (default 0: exit 7 at once).")]),
    inspect.Parameter("autobot_cache", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[str | None, _opt(
                          "--autobot-cache", metavar="on|off", help="autobot-dir: 'off' says "
                          "AutoBot is stopped, runs without its Redis session cache, or had "
                          "it flushed; chat files are written only then "
                          "(env CHATSAVE_AUTOBOT_CACHE).")]),
    inspect.Parameter("metrics_file", inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[Path | None, _opt(
                          "--metrics-file", metavar="PATH", help="Record this run (exit code, "
                          "when, how long, its counts) in PATH for node_exporter's textfile "
                          "collector; commands share one file (env CHATSAVE_METRICS_FILE).",
                          dir_okay=True, readable=False)]),
    inspect.Parameter("traceback", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=Annotated[bool, _opt(
                          "--traceback", help="Show the traceback of an error "
                          "(env CHATSAVE_DEBUG=1).")]),
    inspect.Parameter("allow_insecure", inspect.Parameter.KEYWORD_ONLY, default=False,
                      annotation=Annotated[bool, _opt(
                          "--allow-insecure", help="Send the token over plain http:// to a "
                          "host that is not loopback (trusted networks only).")]),
]
COMMON_NAMES = [p.name for p in COMMON]


def _plain_flags(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows none (Typer would write ``<bool>``)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class ChatsaveCommand(TyperCommand):
    """A command whose help shows flags without a value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class HelpGroup(TyperGroup):
    """A command group whose help shows flags without a value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


# What Runtime.store() does when there is no store: see its docstring.
MissingStore = typing.Literal["say", "blank", "refuse"]


class Runtime:
    """One command invocation: its flags, output channels, settings and store."""

    def __init__(self, command: str, *, json_: bool = False, quiet: bool = False,
                 store: Path | None = None, remote: str | None = None,
                 token_file: Path | None = None, lock_wait: float | None = None,
                 autobot_cache: str | None = None, traceback: bool = False,
                 allow_insecure: bool = False, metrics_file: Path | None = None) -> None:
        self.command = command
        self.out = Output(json_mode=json_, quiet=quiet)
        self.flags = {"store": store, "remote": remote, "token_file": token_file,
                      "lock_wait": lock_wait, "autobot_cache": autobot_cache,
                      "metrics_file": metrics_file}
        self.traceback = traceback or os.environ.get("CHATSAVE_DEBUG") == "1"
        self.allow_insecure = allow_insecure
        # Tokens in use: scrubbed from every error, hint and traceback the funnel shows.
        self.secrets: list[str] = []
        self.started = time.monotonic()
        self._settings: Settings | None = None
        self._stack = contextlib.ExitStack()
        self._run: tuple[Store, int] | None = None
        self._store: Store | None = None
        self._summary: dict[str, Any] = {}
        self._metrics_file: Path | None = None  # set once --metrics-file is checked

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = resolve(self.flags)
        return self._settings

    # ------------------------------------------------------------------ store
    def store(self, *, missing: MissingStore = "say") -> Store:
        """The local store for reading; closed when the command ends.

        A store that does not exist is never created here. By ``missing``: "say", an empty
        stand-in held in memory, and a warning "no store at PATH yet"; "blank", the same
        without the warning (the command reports it); "refuse", StoreMissingError (exit 2).
        """
        if self._store is None:
            try:
                self._store = self._open_store(create=False)
            except StoreMissingError as exc:
                if missing == "refuse":
                    raise
                if missing == "say":
                    self.out.warn(f"{exc.message}: read as empty, and not created (a "
                                  "command that writes creates it)")
                self._store = self._keep(Store.blank(self.settings.store))
        return self._store

    def locked_store(self) -> Store:
        """The local store, held with the process lock for a mutating command (which may
        create it)."""
        if self._store is None or not self._store.exists:
            self._store = self._open_store(create=True)
        store = self._store
        wait = self.settings.lock_wait
        if wait > 0 and self.out.interactive:
            self.out.info(f"waiting up to {wait:g}s for the store lock ...")
        store.lock.acquire(self.command, wait)
        self._stack.callback(store.lock.release)
        if store.lock.stale is not None:
            self.out.warn(f"took over a stale lock left by {store.lock.stale.describe()}, "
                          "which is no longer running")
        return store

    def _open_store(self, *, create: bool) -> Store:
        store = self._keep(Store.open(self.settings.store, create=create))
        if store.created:
            self.out.info(f"created a new store at {store.path}")
        if store.open_to_others:
            # Said, not fixed: the owner may share it on purpose.
            modes = ", ".join(f"{p.name} {stat.filemode(m)}" for p, m in store.open_to_others)
            names = " ".join(shlex.quote(str(p)) for p, _ in store.open_to_others)
            self.out.warn(f"other users can read the store {store.path} ({modes}); it holds "
                          f"conversations: chmod 600 {names}")
        return store

    def _keep(self, store: Store) -> Store:
        self._stack.callback(store.close)
        return store

    def begin_run(self, store: Store, args: dict[str, Any]) -> int:
        """Record this command in the store's audit log; finished by the funnel."""
        run_id = store.start_run(self.command, args)
        self._run = (store, run_id)
        return run_id

    def remote(self, *, create: bool = True, **http_options: Any) -> Any:
        """The remote named by --remote / CHATSAVE_REMOTE / config; closed at the end.

        ``create=False`` (dry runs, read-only commands): an embedded backend that does not
        exist is not created; an empty one stands in for it, with a warning."""
        from chatsave.remote import check_remote, open_remote, resolve_token
        from chatsave.remote.embedded import EmbeddedRemote

        given = self.settings.remote
        if not given:
            raise UsageError(f"chatsave {self.command} needs a backend and none is set",
                             hint="pass --remote URL|PATH (--remote ./backend.db gives a local "
                             "embedded backend), or set CHATSAVE_REMOTE or 'remote' in the "
                             "config file")
        spelling = check_remote(given, self._recorded_backends(given))
        if spelling.warning:
            self.out.warn(spelling.warning)
        spec = spelling.spec
        if spec.lower().startswith(("http://", "https://", "autobot+http://",
                                    "autobot+https://")):
            from chatsave.remote.retry import RetryPolicy

            http_options.setdefault("request_timeout", self.settings.request_timeout)
            http_options.setdefault("policy", RetryPolicy(attempts=self.settings.retry_attempts))
            http_options.setdefault("allow_insecure", self.allow_insecure)
        elif spec.startswith("autobot-dir:"):
            http_options = {"autobot_cache": self.settings.autobot_cache}
        else:
            http_options = {}
        token = resolve_token(self.settings.token_file, remote=spec)
        if token:
            self.secrets.append(token)
        remote = open_remote(spec, token=token, create=create, **http_options)
        self._stack.callback(remote.close)
        if isinstance(remote, EmbeddedRemote) and remote.created:
            self.out.info(f"created a new embedded backend at {remote.path.absolute()}")
        elif isinstance(remote, EmbeddedRemote) and remote.absent:
            self.out.warn(f"no embedded backend at {remote.path.absolute()} yet: read as "
                          "empty, and not created (a command that writes creates it)")
        return remote

    def _recorded_backends(self, spec: str) -> list[str]:
        """The backend URLs the store has used, when ``spec`` needs them (a bare name)."""
        from chatsave.remote import is_bare_name
        from chatsave.store.backend import recorded_urls

        if not is_bare_name(spec):
            return []
        return recorded_urls(self.store(missing="blank"))

    # ---------------------------------------------------------------- funnel
    def run(self, body: Callable[[], RunResult | None]) -> int:
        """Run a command body; report its result or error once; return the exit code."""
        error: BaseException | None = None
        result: RunResult | None = None
        try:
            if self.settings.metrics_file is not None:
                check_metrics_file(self.settings.metrics_file)
                self._metrics_file = self.settings.metrics_file
            result = body()
            code = self._report(result) if result is not None else 0
        except ChatsaveError as exc:
            error, code = exc, self._report_error(self._scrubbed(exc))
        except KeyboardInterrupt as exc:
            error = exc
            code = self._report_error(Interrupted(
                "interrupted; everything confirmed so far is saved",
                hint="rerun the same command to resume"))
        except StdoutClosed:
            code = 0
        except sqlite3.Error as exc:
            # One the store did not translate itself: still a store error, still without
            # the row text sqlite3 may quote.
            error = exc
            code = self._report_error(
                self._store.translate(exc) if self._store is not None
                else StoreError(f"local store: {error_text(exc)}"))
        except Exception as exc:
            error = exc
            internal = ChatsaveError(
                self.scrub(f"internal error ({type(exc).__name__}: {exc})"),
                hint="this is a bug in chatsave; rerun with --traceback and report it")
            internal.exit_code = INTERNAL_ERROR  # type: ignore[assignment]
            internal.code = "internal"
            code = self._report_error(internal)
        if error is not None and self.traceback:
            sys.stderr.write(self.scrub("".join(tb.format_exception(error))))
        self._finish_run(code, result, error)
        with contextlib.suppress(Exception):
            self._stack.close()
        self._record_metrics(code, result)
        return code

    def _record_metrics(self, code: int, result: RunResult | None) -> None:
        """This run in the --metrics-file, once everything else is done. A run that ended
        in an error has no counts of its own (not zeros). A file that cannot be written is
        a warning: the run's own outcome stands."""
        path = self._metrics_file
        if path is None:
            return
        from chatsave.metrics_file import record_run

        try:
            record_run(path, self.command, code, self._summary if result is not None else {},
                       time.time(), self.elapsed())
        except OSError as exc:
            self.out.warn(f"could not write the metrics file {path}: {exc.strerror or exc}")

    def scrub(self, text: str) -> str:
        """``text`` without the tokens this command uses."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _scrubbed(self, exc: ChatsaveError) -> ChatsaveError:
        exc.message = self.scrub(exc.message)
        exc.hint = self.scrub(exc.hint) if exc.hint else exc.hint
        return exc

    def _finish_run(self, code: int, result: RunResult | None,
                    error: BaseException | None) -> None:
        """Close this command's audit row (while the store and its lock are still held)."""
        if self._run is None:
            return
        store, run_id = self._run
        summary: dict[str, Any] = (result.summary() if result is not None
                                   else {"command": self.command})
        summary["exit_code"] = code
        if isinstance(error, ChatsaveError):
            summary["error"] = error.to_json()
        with contextlib.suppress(ChatsaveError):
            store.finish_run(run_id, code, summary)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def _report(self, result: RunResult) -> int:
        if result.error is not None:
            self.out.error(self._scrubbed(result.error))
        summary = result.summary()
        summary["elapsed_s"] = self.elapsed()
        self._summary = summary
        self.out.summary(summary)
        return int(result.exit_code)

    def _report_error(self, exc: ChatsaveError) -> int:
        self.out.error(exc)
        code = int(exc.exit_code)
        result = RunResult(self.command)
        result.error = exc
        summary = result.summary()
        summary["exit_code"] = code
        summary["ok"] = False
        summary["elapsed_s"] = self.elapsed()
        self._summary = summary
        self.out.summary(summary)
        return code


def command(app: typer.Typer, name: str, **typer_kwargs: Any
            ) -> Callable[[Callable[..., RunResult | None]], Callable[..., RunResult | None]]:
    """Register ``func(rt, **options)`` as a command with the common flags added."""

    def decorate(func: Callable[..., RunResult | None]) -> Callable[..., RunResult | None]:
        hints = typing.get_type_hints(func, include_extras=True)
        sig = inspect.signature(func)
        params = [p.replace(annotation=hints[p.name])
                  for p in sig.parameters.values() if p.name != "rt"]
        params += COMMON

        def wrapper(**kwargs: Any) -> None:
            common = {n: kwargs.pop(n) for n in COMMON_NAMES}
            rt = Runtime(name, **common)
            code = rt.run(lambda: func(rt, **kwargs))
            raise typer.Exit(code)

        wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=params, return_annotation=inspect.Signature.empty)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.__doc__ = func.__doc__
        wrapper.__name__ = func.__name__
        wrapper.__qualname__ = func.__qualname__
        wrapper.__module__ = func.__module__
        typer_kwargs.setdefault("cls", ChatsaveCommand)
        app.command(name, **typer_kwargs)(wrapper)
        return func

    return decorate


def require_tty_or(flag: bool, what: str, out: Output) -> None:
    """Refuse to prompt without a terminal: destructive commands need ``--yes`` then."""
    if not flag and not sys.stdin.isatty():
        raise UsageError(f"{what} needs confirmation and there is no terminal to ask on",
                         hint="pass --yes (after checking the plan with --dry-run)")


@contextlib.contextmanager
def open_output_file(path: Path | None, out: Output) -> Iterator[Any]:
    """Write to ``path`` atomically (temp file, then rename), or to stdout when None or
    ``-`` (as ``-`` is stdin where a file is read). With --json, stdout carries the JSON
    Lines only: ``-`` is then a usage error, refused before anything is written."""
    if path is not None and str(path) == "-":
        if out.json_mode:
            raise UsageError("'-' (standard output) cannot take this output with --json: "
                             "standard output carries the JSON Lines",
                             hint="name a file instead of -, or drop --json")
        path = None
    if path is None:
        yield out
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
