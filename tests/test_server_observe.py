"""What the server tells its operator: Prometheus metrics (in process, and from a real
``chatsave serve --workers 2 --metrics-address``), JSON log lines, request ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage import Storage, open_storage
from chatsave.backend.storage.sqlite import SqliteStorage
from chatsave.errors import UnavailableError
from chatsave.remote.http import HttpRemote
from chatsave.remote.retry import RetryPolicy
from chatsave.server.app import AppHooks, ChatsaveApp, create_app
from chatsave.server.observe import ServerMetrics
from tests.server_fixtures import (
    TEST_SETTINGS,
    AsgiClient,
    LiveServer,
    PgCluster,
    free_port,
    wait_until,
)

SAVE = "/api/v1/chats/{}/save"
SAVE_ROUTE = "/api/v1/chats/{chat_id}/save"


def body(*ids: str, content: str = "hello") -> bytes:
    return json.dumps({"messages": [
        {"id": i, "role": "user", "content": content, "created_at": "2026-01-01T00:00:00Z"}
        for i in ids]}).encode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus-client's own
    parser: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered(tmp_path: Path, tokens_file: Callable[..., Any]) -> Iterator[
        tuple[AsgiClient, ServerMetrics, dict[str, str]]]:
    path, tokens = tokens_file("alice")
    storage = SqliteStorage(tmp_path / "server.db")
    metrics = ServerMetrics()
    app = create_app(storage, settings=ServerSettings(
        rate_per_s=1, rate_burst=8, housekeeping_interval_s=0, max_body_bytes=4096),
        tokens=path, metrics=metrics)
    client = AsgiClient(app, tokens["alice"])
    yield client, metrics, tokens
    client.close()
    storage.close()


def test_metrics_count_requests_messages_replays_and_refusals(
        metered: tuple[AsgiClient, ServerMetrics, dict[str, str]]) -> None:
    client, metrics, tokens = metered
    key = {"Idempotency-Key": "k1"}
    assert client.post(SAVE.format("secret-chat"), content=body("m1", "m2", "m3"),
                       headers=key).status_code == 200
    assert client.post(SAVE.format("secret-chat"), content=body("m1", "m2", "m3"),
                       headers=key).headers["idempotent-replayed"] == "true"
    answer = client.post(SAVE.format("secret-chat"), content=body("m1", "m4", content="other"),
                         headers={"Idempotency-Key": "k2"}).json()
    assert len(answer["conflicts"]) == 1 and len(answer["saved"]) == 1
    assert client.post(SAVE.format("secret-chat"), content=b"x" * 5000,
                       headers={"Idempotency-Key": "k3"}).status_code == 413
    assert client.get("/no/such/route").status_code == 404
    statuses = [client.get("/api/v1/chats").status_code for _ in range(12)]
    assert 429 in statuses, statuses

    text = generate_latest(metrics.registry).decode()
    found = samples(text)
    assert value(found, "chatsave_messages_total", outcome="saved") == 4, "m1-m3, then m4"
    assert value(found, "chatsave_messages_total", outcome="conflicts") == 1
    assert value(found, "chatsave_messages_total", outcome="rejected") == 0
    assert value(found, "chatsave_idempotent_replays_total") == 1
    assert value(found, "chatsave_requests_total", method="POST", route=SAVE_ROUTE,
                 status="200") == 3
    assert value(found, "chatsave_requests_total", method="POST", route=SAVE_ROUTE,
                 status="413") == 1, "a refusal before routing still names its route"
    assert value(found, "chatsave_requests_total", method="GET", route="unmatched",
                 status="404") == 1
    assert value(found, "chatsave_errors_total", code="body_too_large") == 1
    assert value(found, "chatsave_errors_total", code="rate_limited") == statuses.count(429)
    assert value(found, "chatsave_request_duration_seconds_count", method="POST",
                 route=SAVE_ROUTE) == 4
    for secret in ("secret-chat", "m1", "m4", "hello", tokens["alice"], "alice"):
        assert f'"{secret}"' not in text, f"{secret!r} in a label"


def test_request_id_goes_back_and_a_client_one_is_kept_only_if_plain(
        make_app: Callable[..., ChatsaveApp], asgi_client: Callable[..., AsgiClient]) -> None:
    client = asgi_client(make_app())
    made = client.get("/api/v1/health").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/api/v1/health").headers["x-request-id"]
    assert client.get("/api/v1/health", headers={"X-Request-Id": "lb-7.a_b"}) \
        .headers["x-request-id"] == "lb-7.a_b"
    odd = client.get("/api/v1/health", headers={"X-Request-Id": "a b\"}"}).headers
    assert odd["x-request-id"] != "a b\"}" and len(odd["x-request-id"]) == 32


class _Broken:
    """A storage whose page reads fail with an error the server does not expect."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_messages(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk on fire")


def test_a_server_error_names_the_request_id_the_client_prints(
        tmp_path: Path, start_server: Callable[[Any], LiveServer],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="chatsave.server")
    storage = SqliteStorage(tmp_path / "server.db")
    try:
        app = create_app(storage, settings=TEST_SETTINGS,
                         hooks=AppHooks(storage=lambda s: _Broken(s)))  # type: ignore[arg-type,return-value]
        server = start_server(app)
        remote = HttpRemote(server.url, policy=RetryPolicy(attempts=1))
        try:
            remote.save("c1", body("m1"), "k1")
            with pytest.raises(UnavailableError) as err:
                remote.messages("c1")
        finally:
            remote.close()
        shown = str(err.value)
        assert "internal" in shown and "request id " in shown, shown
        rid = shown.rsplit("request id ", 1)[1].split()[0].rstrip(")")
        # The server logs a request once its answer is sent: wait for the lines.
        wait_until(lambda: sum(rid in r.getMessage() for r in caplog.records) >= 2, 10,
                   "the server to log the request")
    finally:
        storage.close()
    error = next(r for r in caplog.records if rid in r.getMessage() and r.exc_info)
    assert "disk on fire" in str(error.exc_info[1]), "the cause is in the server's log"
    assert "disk on fire" not in shown, "the server's internals stay in its log"


def test_serve_workers_metrics_and_json_log(tmp_path: Path) -> None:
    """A real ``chatsave serve --workers 2 --metrics-address ... --log-format json``: one
    scrape adds up both workers' saves; every log line is a JSON object with the request's
    fields and without bodies; SIGTERM stops it with exit 0."""
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "CHATSAVE_HOME": str(tmp_path / "home")}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatsave", "serve", "--port", str(port), "--db",
             str(tmp_path / "server.db"), "--workers", "2", "--rate-limit", "0",
             "--metrics-address", f"127.0.0.1:{metrics_port}", "--log-format", "json"],
            stdout=log, stderr=log, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        wait_until(ready, 60, "the server to start")
        assert proc.poll() is None, log_path.read_text()
        saved = 0
        with httpx.Client(base_url=url, timeout=10) as client:
            for n in range(20):  # fresh connections: both workers take some
                ids = [f"m{n}-{i}" for i in range(n % 3 + 1)]
                r = client.post(SAVE.format(f"c{n}"), content=body(*ids, content="BODYTEXT"),
                                headers={"Idempotency-Key": f"k{n}", "Connection": "close"})
                assert r.status_code == 200, r.text
                saved += len(ids)
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert scrape.status_code == 200
        found = samples(scrape.text)
        assert value(found, "chatsave_messages_total", outcome="saved") == saved
        assert value(found, "chatsave_requests_total", method="POST", route=SAVE_ROUTE,
                     status="200") == 20
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 404, \
            "the main port has no /metrics"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, log_path.read_text()
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    requests = [r for r in records if r.get("message") == "request"]
    saves = [r for r in requests if r["route"] == SAVE_ROUTE]
    assert len(saves) == 20 and {r["status"] for r in saves} == {200}
    assert all({"time", "level", "method", "duration_ms", "user", "request_id"} <= set(r)
               for r in saves)
    assert sum(r["messages"]["saved"] for r in saves) == saved
    assert "BODYTEXT" not in log_path.read_text()
    said = [r["message"] for r in records]
    assert any(m.startswith("chatsave server on ") for m in said), said
    assert any("Started parent process" in m for m in said), "uvicorn's own lines too"


def test_serve_refuses_a_bad_metrics_address(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "chatsave", "serve", "--port", str(free_port()), "--db",
         str(tmp_path / "s.db"), "--metrics-address", "here:port"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "CHATSAVE_HOME": str(tmp_path / "home")})
    assert ran.returncode == 2, ran.stderr
    assert "--metrics-address 'here:port' is not HOST:PORT" in ran.stderr
    assert not (tmp_path / "s.db").exists()


@pytest.mark.postgres
def test_health_follows_postgresql_away_and_back(
        pg_cluster: PgCluster, asgi_client: Callable[..., AsgiClient]) -> None:
    """The readiness check: 503 with Retry-After within seconds of PostgreSQL going away,
    200 again once it is back, with no restart of the server (its own cluster: this one
    is stopped)."""
    cluster = PgCluster(pg_cluster.bindir)
    cluster.start()
    storage = None
    try:
        storage = open_storage(cluster.create_database())
        client = asgi_client(create_app(storage, settings=TEST_SETTINGS))
        assert client.get("/api/v1/health").status_code == 200
        cluster.halt()
        started = time.monotonic()
        down = client.get("/api/v1/health")
        assert down.status_code == 503 and "retry-after" in down.headers
        assert down.json()["error"]["code"] == "storage_unavailable"
        assert time.monotonic() - started < 10, "a health check answers within seconds"
        cluster.resume()
        wait_until(lambda: client.get("/api/v1/health").status_code == 200, 60,
                   "health to recover once PostgreSQL is back")
        saved = client.post(SAVE.format("c1"), content=body("m1"),
                            headers={"Idempotency-Key": "after"})
        assert saved.status_code == 200, saved.text
    finally:
        if storage is not None:
            storage.close()  # its pool stops reconnecting before the cluster goes
        cluster.stop()
