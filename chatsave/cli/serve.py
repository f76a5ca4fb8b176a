"""``chatsave serve``: the reference backend; ``chatsave serve token add``: mint an API token."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from chatsave.cli.runtime import HelpGroup, Runtime, command
from chatsave.config import data_dir
from chatsave.errors import MissingExtraError
from chatsave.ops.result import RunResult

serve_app = typer.Typer(name="serve", no_args_is_help=False, cls=HelpGroup,
                        context_settings={"help_option_names": ["-h", "--help"]})
token_app = typer.Typer(name="token", no_args_is_help=True, cls=HelpGroup,
                        help="Manage the server's API tokens.\n\n"
                        "Example: chatsave serve token add alice --tokens tokens.json",
                        context_settings={"help_option_names": ["-h", "--help"]})


def default_tokens() -> Path:
    return data_dir() / "tokens.json"


def _server(db: str | None) -> Callable[..., None]:
    """``chatsave.server.run.serve``, or a usage error naming the extra(s) to install."""
    try:
        from chatsave.server.run import serve
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing.split(".")[0] == "chatsave":
            raise  # chatsave's own module: a bug, not an installation choice
        from chatsave.backend.storage import is_postgres_url

        extras = ["server", "postgres"] if db and is_postgres_url(db) else ["server"]
        raise MissingExtraError("chatsave serve", extras, missing) from exc
    return serve


@serve_app.callback(invoke_without_command=True)
def serve_cmd(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8787,
    db: Annotated[str | None, typer.Option(
        "--db", metavar="PATH|postgresql://...", envvar="CHATSAVE_SERVE_DB",
        show_envvar=False,
        help="Storage: a SQLite file (default: server.db in the data directory) or a "
        "PostgreSQL URL (env CHATSAVE_SERVE_DB: a password then stays off the command "
        "line).")] = None,
    tokens: Annotated[Path | None, typer.Option(
        "--tokens", metavar="FILE", help="Tokens file: require a bearer token per user "
        "(default: tokens.json in the data directory, if it exists).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, max=64, help="Worker processes.")] = 1,
    log_level: Annotated[str, typer.Option(
        "--log-level", help="debug, info, warning or error.")] = "info",
    rate_limit: Annotated[float | None, typer.Option(
        "--rate-limit", metavar="R", min=0,
        help="Requests per second per token and server process (0: no limit) "
        "(default: 500, in bursts of 1000).")] = None,
    metrics_address: Annotated[str | None, typer.Option(
        "--metrics-address", metavar="HOST:PORT",
        help="Serve Prometheus metrics at /metrics on this separate address (a bare PORT "
        "listens on 127.0.0.1); one scrape covers every worker.")] = None,
    log_format: Annotated[str, typer.Option(
        "--log-format", metavar="text|json",
        help="Log lines as text, or one JSON object per line (method, route, status, "
        "duration, user, request id; never bodies or tokens).")] = "text",
    traceback: Annotated[bool, typer.Option(
        "--traceback", help="Show the traceback of an error.")] = False,
) -> None:
    """Run the reference backend server (protocol v1).

    Without tokens it serves one user without authentication, on a loopback address only.
    Any number of servers can share one PostgreSQL database.

    Example: chatsave serve --port 8787 --db postgresql://chats@db/chats --tokens tokens.json
    """
    if ctx.invoked_subcommand is not None:
        return
    rt = Runtime("serve", traceback=traceback)

    def body() -> None:
        serve = _server(db)
        chosen = tokens
        if chosen is None and default_tokens().exists():
            chosen = default_tokens()
            rt.out.info(f"using the tokens in {chosen}")
        storage = db or str(data_dir() / "server.db")
        from chatsave.backend.settings import ServerSettings

        settings = ServerSettings() if rate_limit is None else ServerSettings(
            rate_per_s=rate_limit, rate_burst=max(1, int(rate_limit * 2)))

        def say(text: str) -> None:
            if log_format == "json":  # every line a JSON object, for a log collector
                import logging

                logging.getLogger("chatsave.server").info("%s", text)
            else:
                rt.out.info(text)

        def ready(url: str) -> None:
            say(f"chatsave server on {url} over {storage.split('@')[-1]}")

        # On SIGINT uvicorn shuts down cleanly and raises it again; on SIGTERM serve returns.
        with contextlib.suppress(KeyboardInterrupt):
            serve(host=host, port=port, db=storage, tokens_file=chosen, workers=workers,
                  log_level=log_level, settings=settings, on_ready=ready,
                  metrics_address=metrics_address, log_format=log_format)
        say("chatsave server stopped")

    raise typer.Exit(rt.run(body))


def token_add_cmd(
    rt: Runtime,
    user: Annotated[str, typer.Argument(metavar="USER", help="Who the token is for.")],
    tokens: Annotated[Path | None, typer.Option(
        "--tokens", metavar="FILE", help="Tokens file (default: tokens.json in the data "
        "directory).")] = None,
) -> RunResult:
    """Mint a token for USER: printed once, only its hash is stored.

    Example: chatsave serve token add alice --tokens /etc/chatsave/tokens.json
    """
    from chatsave.server.tokens import add_token

    path = tokens or default_tokens()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = add_token(path, user)
    result = RunResult("serve token add")
    result.details.update(user=user, tokens_file=str(path))
    if rt.out.json_mode:
        rt.out.event("token", user=user, token=token, tokens_file=str(path))
    else:
        rt.out.write(token + "\n")
        rt.out.info(f"token for {user!r} added to {path}; it is shown only this once")
    return result


command(token_app, "add")(token_add_cmd)
serve_app.add_typer(token_app)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app)
