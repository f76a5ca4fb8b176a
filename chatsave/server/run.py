"""Running the server: ``serve`` (uvicorn, one or more workers) and ``add_token``.

The CLI's ``chatsave serve`` and ``chatsave serve token add`` call these. ``python -m
chatsave.server.run`` runs the same ``serve`` with plain flags (used by the tests to start
real server processes).

Accepted sockets get TCP_NODELAY explicitly (``NoDelayHttpToolsProtocol``): uvicorn's
multi-worker mode hands workers a listening socket whose accepted connections asyncio does
not mark no-delay, and with Nagle's algorithm on every small request then waits ~40 ms for a
delayed ACK.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from chatsave.errors import ChatsaveError, UsageError
from chatsave.server.service import ServerSettings
from chatsave.server.tokens import add_token as _add_token

log = logging.getLogger("chatsave.server")

CONFIG_ENV = "CHATSAVE_SERVE_CONFIG"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


def set_nodelay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport's socket."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # not a TCP socket after all
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY on every accepted connection."""

    def connection_made(self, transport: Any) -> None:
        set_nodelay(transport)
        super().connection_made(transport)


#: cap on a request's header section at the protocol level (before ASGI sees it) when the
#: server config does not set one; the app's own, smaller header limit answers below it.
HEAD_CAP_DEFAULT = 64 * 1024
_HEAD_REFUSAL = json.dumps({"error": {
    "code": "headers_too_large", "message": "request header section too large",
    "details": None}}).encode()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class NoDelayHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with TCP_NODELAY on every accepted connection, and a
        cap on the header section: httptools would otherwise buffer headers of any size
        before the app (and its 431) could see them. The cap is the config's
        ``h11_max_incomplete_event_size`` (the h11 protocol's own limit), 64 KiB if unset."""

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
                self.transport.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                    b"content-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(_HEAD_REFUSAL)).encode() + b"\r\n\r\n"
                    + _HEAD_REFUSAL)
                self.transport.close()

    HTTP_PROTOCOL = "chatsave.server.run:NoDelayHttpToolsProtocol"
except ImportError:  # pragma: no cover - uvicorn without the [standard] extra
    HTTP_PROTOCOL = "chatsave.server.run:NoDelayH11Protocol"


def add_token(tokens_file: str | os.PathLike[str], user: str) -> str:
    """Mint a token for ``user`` in ``tokens_file`` (hash only, mode 0600); return it once."""
    return _add_token(tokens_file, user)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure_logging(level: str = "info") -> None:
    """One handler on stderr for the server's loggers (request lines, warnings)."""
    logger = logging.getLogger("chatsave.server")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_chatsave", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._chatsave = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def _config(db: str, tokens_file: str | None, settings: ServerSettings,
            test_faults: bool) -> dict[str, Any]:
    return {"db": db, "tokens": tokens_file, "settings": dataclasses.asdict(settings),
            "faults": test_faults}


def app_from_config(config: dict[str, Any]) -> Any:
    """Build the app a serve configuration describes (in a worker process too)."""
    from chatsave.server.app import create_app
    from chatsave.server.faults import Faults

    faults = Faults(http_control=True) if config.get("faults") else None
    return create_app(config["db"], settings=ServerSettings(**config["settings"]),
                      tokens=config.get("tokens"), faults=faults)


def app_from_env() -> Any:
    """uvicorn factory for worker processes: the configuration comes in CHATSAVE_SERVE_CONFIG."""
    config = json.loads(os.environ[CONFIG_ENV])
    configure_logging(config.get("log_level", "info"))
    return app_from_config(config)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          db: str | os.PathLike[str] = "chatsave-server.db",
          tokens_file: str | os.PathLike[str] | None = None, workers: int = 1, *,
          settings: ServerSettings | None = None, log_level: str = "info",
          test_faults: bool = False) -> None:
    """Run the server until SIGINT/SIGTERM.

    ``db`` is a SQLite path or a ``postgresql://`` URL. Without ``tokens_file`` there is no
    authentication (single user "local") and only a loopback ``host`` is accepted.
    ``test_faults`` enables the fault hook and its ``/_faults/*`` control endpoints: tests
    only, never in production.
    """
    import uvicorn

    from chatsave.server.storage import is_postgres_url, open_storage
    from chatsave.server.tokens import TokenStore

    settings = settings or ServerSettings()
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if tokens_file is None and not is_loopback(host):
        raise UsageError(
            f"refusing to listen on {host} without authentication",
            hint="add --tokens FILE (mint one with: chatsave serve token add USER --tokens "
                 "FILE), or listen on 127.0.0.1")
    if tokens_file is not None:
        TokenStore(tokens_file)  # fail now, with a clear message, if it is unusable
    db_text = str(db) if is_postgres_url(str(db)) else str(Path(db).resolve())
    open_storage(db_text).close()  # create and migrate once, before workers start
    configure_logging(log_level)
    config = _config(db_text, None if tokens_file is None else str(Path(tokens_file).resolve()),
                     settings, test_faults)
    config["log_level"] = log_level
    common: dict[str, Any] = dict(
        host=host, port=port, http=HTTP_PROTOCOL, access_log=False, log_level=log_level,
        server_header=False, proxy_headers=False, timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=max(64 * 1024, 2 * settings.max_header_bytes))
    if workers == 1:
        app = app_from_config(config)
        uvicorn.Server(uvicorn.Config(app, **common)).run()
    else:
        os.environ[CONFIG_ENV] = json.dumps(config)
        uvicorn.run("chatsave.server.run:app_from_env", factory=True, workers=workers, **common)


def main(argv: list[str] | None = None) -> int:
    """``python -m chatsave.server.run``: serve with plain flags (tests, debugging)."""
    parser = argparse.ArgumentParser(prog="python -m chatsave.server.run")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--db", required=True)
    parser.add_argument("--tokens")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--settings", default="{}", help="ServerSettings fields as JSON")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--test-faults", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = ServerSettings(**json.loads(args.settings))
        serve(args.host, args.port, args.db, args.tokens, args.workers, settings=settings,
              log_level=args.log_level, test_faults=args.test_faults)
    except ChatsaveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return int(exc.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
