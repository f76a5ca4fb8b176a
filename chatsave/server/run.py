"""Running the server: ``serve`` (uvicorn, one or more workers) and ``add_token``.

The CLI's ``chatsave serve`` and ``chatsave serve token add`` call these. ``python -m
chatsave.server.run`` runs the same ``serve`` with plain flags (used by the tests to start
real server processes).

``serve`` binds the listening sockets itself (chatsave.server.listen) and hands them to
uvicorn (one worker or several), so that an address it cannot listen on is one
``ListenError`` (exit 2, naming the process that holds the port when it can be found) before
any app, storage or worker starts, never uvicorn's own log line and exit status. The
metrics endpoint and the access log are chatsave.server.observe.

Accepted sockets get TCP_NODELAY explicitly (``NoDelayHttpToolsProtocol``): uvicorn's
multi-worker mode hands workers a listening socket whose accepted connections asyncio does
not mark no-delay, and with Nagle's algorithm on every small request then waits ~40 ms for a
delayed ACK.

A request uvicorn cannot parse (a bad Content-Length, Content-Length beside
Transfer-Encoding, a bad chunk, a NUL in the path, ...) never reaches the app: uvicorn answers
it itself, in text/plain. The same protocol classes answer it in the error envelope instead,
with the releases of uvicorn (and h11) that adaptation was written for; with others uvicorn's
own answer stands, and ``serve`` says so when it starts (``unparsable_note``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatsave.backend.answers import envelope
from chatsave.backend.settings import ServerSettings
from chatsave.errors import ChatsaveError, MissingExtraError, UsageError
from chatsave.netaddr import is_loopback
from chatsave.server.listen import DEFAULT_HOST, listen_sockets, url_of
from chatsave.server.observe import MetricsServer, parse_metrics_address
from chatsave.server.tokens import add_token as _add_token

if TYPE_CHECKING:
    from chatsave.server.app import AppHooks

log = logging.getLogger("chatsave.server")

CONFIG_ENV = "CHATSAVE_SERVE_CONFIG"
DEFAULT_PORT = 8787


def set_nodelay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport's socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # not a TCP socket after all
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


import h11  # noqa: E402
import uvicorn  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

#: the release series whose ``send_400_response`` (uvicorn's answer to a request it cannot
#: parse, an internal method) the protocol classes here override; h11's for the h11
#: protocol only. pyproject.toml pins both series.
ADAPTED_UVICORN = "0.55"
ADAPTED_H11 = "0.16"


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


_UNPARSABLE_ADAPTED = _series(uvicorn.__version__) == ADAPTED_UVICORN
_UNPARSABLE = json.dumps(envelope(
    "malformed_http", "the request is not valid HTTP/1.1 (request line, headers, "
    "Content-Length or chunked framing); nothing was done")).encode()


def _json_head(body: bytes) -> bytes:
    """The header lines after the status line (and the server's own headers) of a JSON
    error answer that closes the connection."""
    return (b"content-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY on every accepted connection, answering a
    request it cannot parse in the error envelope (with the uvicorn and h11 it was written
    for; else as uvicorn does)."""

    adapted = _UNPARSABLE_ADAPTED and _series(h11.__version__) == ADAPTED_H11

    def connection_made(self, transport: Any) -> None:
        set_nodelay(transport)
        super().connection_made(transport)

    def send_400_response(self, msg: str) -> None:
        if not self.adapted:
            super().send_400_response(msg)
            return
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(_UNPARSABLE)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=_UNPARSABLE), h11.EndOfMessage()):
            output = self.conn.send(event)
            if output:
                self.transport.write(output)
        self.transport.close()


#: cap on a request's header section at the protocol level (before ASGI sees it) when the
#: server config does not set one; the app's own, smaller header limit answers below it.
HEAD_CAP_DEFAULT = 64 * 1024
_HEAD_REFUSAL = json.dumps(envelope("headers_too_large",
                                    "request header section too large")).encode()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class NoDelayHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with TCP_NODELAY on every accepted connection, and a
        cap on the header section: httptools would otherwise buffer headers of any size
        before the app (and its 431) could see them. The cap is the config's
        ``h11_max_incomplete_event_size`` (the h11 protocol's own limit), 64 KiB if unset.
        A request it cannot parse is answered in the error envelope (with the uvicorn it
        was written for; else as uvicorn does)."""

        adapted = _UNPARSABLE_ADAPTED
        _head_bytes = 0
        _in_head = True

        def connection_made(self, transport: Any) -> None:
            set_nodelay(transport)
            super().connection_made(transport)

        def on_message_begin(self) -> None:
            self._in_head, self._head_bytes = True, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            cap = self.config.h11_max_incomplete_event_size or HEAD_CAP_DEFAULT
            if self._head_bytes > cap:
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                     + _json_head(_HEAD_REFUSAL) + _HEAD_REFUSAL)
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            if not self.adapted:
                super().send_400_response(msg)
                return
            own = b"".join(name + b": " + value + b"\r\n"
                           for name, value in self.server_state.default_headers)
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\n" + own
                                 + _json_head(_UNPARSABLE) + _UNPARSABLE)
            self.transport.close()

    HTTP_PROTOCOL = "chatsave.server.run:NoDelayHttpToolsProtocol"
    _PROTOCOL_CLASS: type[NoDelayH11Protocol | NoDelayHttpToolsProtocol] = \
        NoDelayHttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without the [standard] extra
    HTTP_PROTOCOL = "chatsave.server.run:NoDelayH11Protocol"
    _PROTOCOL_CLASS = NoDelayH11Protocol


def unparsable_note() -> str | None:
    """What ``serve`` warns when the protocol it runs answers a request uvicorn cannot parse
    as uvicorn does (text/plain), not in the error envelope: the installed uvicorn (or h11)
    is not the release that adaptation was written for. None when it is."""
    if _PROTOCOL_CLASS.adapted:
        return None
    return (f"uvicorn {uvicorn.__version__} (h11 {h11.__version__}) is not the release the "
            f"server's protocol adaptation was written for (uvicorn {ADAPTED_UVICORN}, h11 "
            f"{ADAPTED_H11}): a request that is not valid HTTP/1.1 is answered by uvicorn "
            "itself, in text/plain, not in the JSON error envelope")


def add_token(tokens_file: str | os.PathLike[str], user: str) -> str:
    """Mint a token for ``user`` in ``tokens_file`` (hash only, mode 0600); return it once."""
    return _add_token(tokens_file, user)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """One handler on stderr for the server's loggers (request lines, warnings); with
    ``log_format="json"`` every line is one JSON object (chatsave.server.observe)."""
    from chatsave.server.observe import JsonFormatter

    logger = logging.getLogger("chatsave.server")
    logger.setLevel(level.upper())
    formatter = JsonFormatter() if log_format == "json" else \
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = next((h for h in logger.handlers if getattr(h, "_chatsave", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._chatsave = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(formatter)
    if log_format == "json":  # uvicorn's own lines (start, stop, errors) as JSON too
        uv = logging.getLogger("uvicorn")
        uv.handlers = [handler]
        uv.propagate = False


def _config(db: str, tokens_file: str | None, settings: ServerSettings) -> dict[str, Any]:
    return {"db": db, "tokens": tokens_file, "settings": dataclasses.asdict(settings)}


def app_from_config(config: dict[str, Any], hooks: AppHooks | None = None,
                    metrics: Any = None) -> Any:
    """Build the app a serve configuration describes (in a worker process too; there, with
    ``config["metrics"]``, its own ServerMetrics in prometheus-client's multiprocess mode)."""
    from chatsave.server.app import create_app

    if metrics is None and config.get("metrics"):
        from chatsave.server.observe import ServerMetrics

        metrics = ServerMetrics()
    return create_app(config["db"], settings=ServerSettings(**config["settings"]),
                      tokens=config.get("tokens"), hooks=hooks, metrics=metrics,
                      log_format=config.get("log_format", "text"))


def app_from_env() -> Any:
    """uvicorn factory for worker processes: the configuration comes in CHATSAVE_SERVE_CONFIG."""
    config = json.loads(os.environ[CONFIG_ENV])
    configure_logging(config.get("log_level", "info"), config.get("log_format", "text"))
    return app_from_config(config)


def _open_storage_once(db: str) -> None:
    """Create and migrate the database once, before workers start."""
    from chatsave.backend.storage import is_postgres_url, open_storage

    if is_postgres_url(db):
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("a postgresql:// --db", ["postgres"],
                                    exc.name or "psycopg") from exc
    open_storage(db).close()


def _run_workers(config: Any, sockets: list[socket.socket]) -> None:
    """uvicorn's multi-process supervisor over ``sockets`` (what ``uvicorn.run`` does after
    binding its own socket)."""
    from uvicorn.supervisors import Multiprocess

    options: dict[str, Any] = {"sockets": sockets}
    if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn releases
        options["target"] = uvicorn.Server(config).run
    Multiprocess(config, **options).run()


class _Terminated(Exception):
    """SIGTERM, raised again by uvicorn once it has shut down gracefully."""


@contextlib.contextmanager
def _sigterm_is_a_clean_stop() -> Iterator[None]:
    """uvicorn finishes the requests in flight on SIGTERM, then raises the signal again;
    with the default handler the process would die of it (status -15). A graceful stop is
    a success: serve returns, and the process exits 0 (as the multi-worker supervisor
    does). Only in the main thread, where signal handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except _Terminated:
        log.info("stopped on SIGTERM")
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          db: str | os.PathLike[str] = "chatsave-server.db",
          tokens_file: str | os.PathLike[str] | None = None, workers: int = 1, *,
          settings: ServerSettings | None = None, log_level: str = "info",
          hooks: AppHooks | None = None, on_ready: Callable[[str], None] | None = None,
          metrics_address: str | None = None, log_format: str = "text") -> None:
    """Run the server until SIGINT/SIGTERM.

    ``db`` is a SQLite path or a ``postgresql://`` URL. Without ``tokens_file`` there is no
    authentication (single user "local") and only a loopback ``host`` is accepted. Every
    check (arguments, tokens, the address, the database) comes before anything is served;
    ``on_ready`` is then called with the server's URL, just before uvicorn takes over.
    ``hooks`` (chatsave.server.app.AppHooks) wrap the app and its storage; they are Python
    objects, so they need ``workers=1``. ``metrics_address`` (``HOST:PORT``) serves
    Prometheus metrics at ``/metrics`` there, one scrape for every worker; ``log_format``
    "json" logs one JSON object a line (docs/operations.md).
    """
    from chatsave.backend.storage import is_postgres_url
    from chatsave.server.tokens import TokenStore

    settings = settings or ServerSettings()
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if hooks is not None and workers != 1:
        raise UsageError("app hooks need a single worker process")
    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format must be text or json, not {log_format!r}")
    if metrics_address is not None:
        parse_metrics_address(metrics_address)  # a clear error before anything starts
    if tokens_file is None and not is_loopback(host):
        raise UsageError(
            f"refusing to listen on {host} without authentication",
            hint="add --tokens FILE (mint one with: chatsave serve token add USER --tokens "
                 "FILE), or listen on 127.0.0.1")
    if tokens_file is not None:
        TokenStore(tokens_file)  # fail now, with a clear message, if it is unusable
    db_text = str(db) if is_postgres_url(str(db)) else str(Path(db).resolve())
    sockets = listen_sockets(host, port)
    metrics_server: MetricsServer | None = None
    try:
        _open_storage_once(db_text)
        configure_logging(log_level, log_format)
        note = unparsable_note()
        if note is not None:
            log.warning("%s", note)
        config = _config(db_text, None if tokens_file is None
                         else str(Path(tokens_file).resolve()), settings)
        config["log_level"] = log_level
        config["log_format"] = log_format
        if metrics_address is not None:
            metrics_server = MetricsServer(metrics_address, workers)
            config["metrics"] = workers > 1  # each worker then makes its own
            log.info("Prometheus metrics on %s", metrics_server.url)
        common: dict[str, Any] = dict(
            host=host, port=sockets[0].getsockname()[1], http=HTTP_PROTOCOL,
            access_log=False, log_level=log_level, server_header=False, proxy_headers=False,
            timeout_graceful_shutdown=10,
            **({"log_config": None} if log_format == "json" else {}),
            h11_max_incomplete_event_size=max(64 * 1024, 2 * settings.max_header_bytes))
        if workers == 1:
            app = app_from_config(config, hooks,
                                  metrics_server.metrics if metrics_server else None)
            server = uvicorn.Server(uvicorn.Config(app, **common))
            if on_ready is not None:
                on_ready(url_of(sockets[0]))
            with _sigterm_is_a_clean_stop():
                server.run(sockets=sockets)
        else:
            os.environ[CONFIG_ENV] = json.dumps(config)
            uv_config = uvicorn.Config("chatsave.server.run:app_from_env", factory=True,
                                       workers=workers, **common)
            if on_ready is not None:
                on_ready(url_of(sockets[0]))
            _run_workers(uv_config, sockets)
    finally:
        if metrics_server is not None:
            metrics_server.close()
        for sock in sockets:
            sock.close()


def main(argv: list[str] | None = None, *, hooks: AppHooks | None = None) -> int:
    """``python -m chatsave.server.run``: serve with plain flags (tests, debugging); a
    launcher may pass ``hooks`` (see ``serve``)."""
    parser = argparse.ArgumentParser(prog="python -m chatsave.server.run")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--db", required=True)
    parser.add_argument("--tokens")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--settings", default="{}", help="ServerSettings fields as JSON")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--metrics-address")
    args = parser.parse_args(argv)
    try:
        settings = ServerSettings(**json.loads(args.settings))
        serve(args.host, args.port, args.db, args.tokens, args.workers, settings=settings,
              log_level=args.log_level, hooks=hooks, metrics_address=args.metrics_address,
              log_format=args.log_format)
    except ChatsaveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return int(exc.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
