"""What the server tells its operator about each request (docs/operations.md).

``AccessLogMiddleware`` (chatsave.server.middleware) builds one ``RequestRecord`` per
request and hands it to the observers: the access log, as text or one JSON object a line,
and, when ``serve --metrics-address`` asks for them, the Prometheus metrics of
``ServerMetrics``. Neither ever holds a body, a message or chat id, or a token: a record
names the route's template (``/api/v1/chats/{chat_id}/save``); only the text log
shows the path itself, as it always did.

Each request gets an id, sent back in ``X-Request-Id`` and logged; a client's own
``X-Request-Id`` (letters, digits, ``._-``, at most 64) is kept instead, so one id follows a
request through a proxy. chatsave's client prints it with a server error, so support can
find the line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chatsave.errors import MissingExtraError, UsageError
from chatsave.server.listen import DEFAULT_HOST, listen_error

access_log = logging.getLogger("chatsave.server.access")

REQUEST_ID_HEADER = "x-request-id"
#: LogRecord attribute carrying a request's fields to JsonFormatter
FIELDS = "chatsave_fields"
#: scope["state"] key under which the app leaves what a write did (message counts, replay)
OUTCOME_KEY = "chatsave_outcome"
#: what a write's answer counts, as the ``outcome`` label of chatsave_messages_total
OUTCOMES = ("saved", "unchanged", "conflicts", "rejected", "deleted", "missing")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CODE = re.compile(rb'"code"\s*:\s*"([a-z_]{1,40})"')
#: request durations worth telling apart, in seconds
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id if it is a plain token, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def error_code(body_start: bytes) -> str | None:
    """The ``error.code`` of an error envelope, from the first bytes of its body."""
    found = _CODE.search(body_start)
    return found.group(1).decode("ascii") if found else None


@dataclass
class RequestRecord:
    """One request as the operator sees it."""

    method: str
    route: str  # the route's template; "unmatched" for a path no route serves
    path: str  # the path itself (chat ids in it): the text log only, never a metric
    status: int
    duration_s: float
    user: str
    request_id: str
    error: str | None = None  # the error envelope's code
    outcome: dict[str, int] = field(default_factory=dict)  # message counts of a write
    replayed: bool = False  # an idempotent replay of an earlier answer

    def log_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "route": self.route, "status": self.status,
            "duration_ms": round(self.duration_s * 1000, 1), "user": self.user,
            "request_id": self.request_id}
        if self.error:
            out["error"] = self.error
        if self.outcome:
            out["messages"] = self.outcome
        if self.replayed:
            out["replayed"] = True
        return out


def log_text(record: RequestRecord) -> None:
    access_log.info("%s %s %d %.1fms user=%s id=%s", record.method, record.path,
                    record.status, record.duration_s * 1000, record.user, record.request_id)


def log_json(record: RequestRecord) -> None:
    access_log.info("request", extra={FIELDS: record.log_fields()})



class JsonFormatter(logging.Formatter):
    """Every log line one JSON object: time, level, logger, message, and a request's
    fields (``serve --log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        out.update(getattr(record, FIELDS, None) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class ServerMetrics:
    """The server's Prometheus metrics, on ``registry`` (a private one by default).

    With several worker processes, prometheus-client's multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``, set by ``serve`` before the workers start) keeps each
    worker's values in files that one scrape adds up (chatsave.server.run).
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "chatsave_requests", "Requests answered, by route template and status.",
            ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram(
            "chatsave_request_duration_seconds", "Time to answer a request.",
            ["method", "route"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.messages = Counter(
            "chatsave_messages", "Messages in the answers to writes, by what became of "
            "them (saved, unchanged, conflicts, rejected; deleted, missing).",
            ["outcome"], registry=self.registry)
        self.replays = Counter(
            "chatsave_idempotent_replays", "Writes answered by replaying the answer stored "
            "under their Idempotency-Key.", registry=self.registry)
        self.errors = Counter(
            "chatsave_errors", "Error answers by their envelope's code (rate_limited, "
            "overloaded, body_too_large, idempotency_key_in_use, storage_unavailable, "
            "internal, ...).", ["code"], registry=self.registry)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.messages.labels(outcome)

    def __call__(self, record: RequestRecord) -> None:
        status = str(record.status)
        self.requests.labels(record.method, record.route, status).inc()
        self.duration.labels(record.method, record.route).observe(record.duration_s)
        for outcome, count in record.outcome.items():
            if count and outcome in OUTCOMES:
                self.messages.labels(outcome).inc(count)
        if record.replayed:
            self.replays.inc()
        if record.error is not None:
            self.errors.labels(record.error).inc()


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or a bare ``PORT`` (on 127.0.0.1) of --metrics-address."""
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, raw
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535 or not host:
        raise UsageError(f"--metrics-address {text!r} is not HOST:PORT",
                         hint="like 127.0.0.1:9464 (or just 9464, on 127.0.0.1)")
    return host, int(port_text)


class MetricsServer:
    """The /metrics endpoint on its own address, in a thread of the serving process; with
    several workers it adds up their values (prometheus-client's multiprocess mode, in a
    private directory removed at the end)."""

    def __init__(self, address: str, workers: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ModuleNotFoundError as exc:
            raise MissingExtraError("chatsave serve --metrics-address", ["server"],
                                    exc.name or "prometheus_client") from exc
        self.host, port = parse_metrics_address(address)
        self.directory: str | None = None
        self.registry = CollectorRegistry()
        self.metrics: Any = None
        if workers > 1:
            import tempfile

            from prometheus_client import multiprocess

            self.directory = tempfile.mkdtemp(prefix="chatsave-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
            multiprocess.MultiProcessCollector(self.registry, path=self.directory)
        else:
            from chatsave.server.observe import ServerMetrics

            self.metrics = ServerMetrics(self.registry)
        try:
            self.httpd, self.thread = start_http_server(port, addr=self.host,
                                                        registry=self.registry)
        except OSError as exc:
            self.close()
            raise listen_error(self.host, port, exc) from exc
        self.port = self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if getattr(self, "httpd", None) is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.directory is not None:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
