"""Server test fixtures (a pytest plugin): PostgreSQL cluster, apps, live servers, clients.

Fixtures:

- ``pg_cluster`` (session): a PostgreSQL cluster on 127.0.0.1 (initdb/pg_ctl from
  ``pg_config --bindir``, run as the ``postgres`` user when we are root); stopped at the
  end. Missing binaries fail the tests unless CHATSAVE_SKIP_POSTGRES=1.
- ``pg_url``: a fresh, empty database in that cluster (a ``postgresql://`` URL).
- ``server_settings``: ServerSettings for tests (rate limit and housekeeping off).
- ``make_app``: ``make_app(storage=None, *, settings=None, tokens=None, faults=None)`` ->
  app over a fresh SQLite file (or the storage/location given); storages closed after.
- ``asgi_client``: ``asgi_client(app, token=None)`` -> ``AsgiClient`` (sync httpx over
  httpx.ASGITransport, no sockets).
- ``start_server``: ``start_server(app)`` -> ``LiveServer`` (real uvicorn on 127.0.0.1 in a
  thread of this process, so a Faults object is shared); stopped after.
- ``live_server``: a LiveServer over SQLite with a ``Faults`` attached (``.url``,
  ``.faults``, ``.service``, ``.storage``).
- ``spawn_server``: ``spawn_server(db, *, tokens=None, workers=1, settings=None,
  faults=False)`` -> ``ServeProcess`` (``python -m chatsave.server.run`` in a subprocess;
  ``.url``, ``.pid``, ``.kill()``, ``.stop()``); every process stopped by pid after.
- ``tokens_file``: ``tokens_file(*users)`` -> (path, {user: token}).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
import uvicorn

from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage import Storage, open_storage
from chatsave.backend.storage.sqlite import SqliteStorage
from chatsave.server.app import ChatsaveApp, create_app
from chatsave.server.run import HTTP_PROTOCOL
from chatsave.server.tokens import add_token
from tests.faults import Faults

REPO = Path(__file__).resolve().parent.parent
TEST_SETTINGS = ServerSettings(rate_per_s=0, housekeeping_interval_s=0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- PostgreSQL -----------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    except (OSError, subprocess.SubprocessError):
        pass
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PgCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, fsync off)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="chatsave-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = 0
        self._as_root = os.geteuid() == 0
        self._count = 0
        self._lock = threading.Lock()
        if self._as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise RuntimeError("running as root and there is no 'postgres' user to run "
                                   "initdb/pg_ctl as") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", "postgres", "--", *cmd] if self._as_root else cmd

    def start(self) -> None:
        subprocess.run(self._cmd("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                                 "-E", "UTF8", "--no-locale", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        last = ""
        for _attempt in range(5):
            self.port = free_port()
            proc = self._pg_ctl_start()
            if proc.returncode == 0:
                return
            last = proc.stdout + proc.stderr
        raise RuntimeError(f"PostgreSQL did not start: {last}")

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=300")
        return subprocess.run(
            self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
                      "-o", options, "-w", "-t", "60", "start"),
            capture_output=True, text=True, timeout=90)

    def halt(self) -> None:
        """Stop the server (its connections closed under the clients), keeping its data for
        ``resume``; a clean stop: with synchronous_commit off, a crash would lose commits."""
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"),
                       check=True, capture_output=True, timeout=60)

    def resume(self) -> None:
        """Start a halted server again, on the same port."""
        proc = self._pg_ctl_start()
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        import psycopg

        with self._lock:
            self._count += 1
            name = f"t{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "-m", "immediate",
                                         "-w", "stop"), capture_output=True, timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = _pg_bindir()
    if bindir is None:
        if os.environ.get("CHATSAVE_SKIP_POSTGRES") == "1":
            pytest.skip("PostgreSQL binaries not found and CHATSAVE_SKIP_POSTGRES=1")
        pytest.fail("PostgreSQL binaries not found (pg_config --bindir); install PostgreSQL "
                    "or set CHATSAVE_SKIP_POSTGRES=1 to skip these tests explicitly")
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    url = pg_cluster.create_database()
    yield url
    with contextlib.suppress(Exception):
        pg_cluster.drop_database(url)


# -- apps and clients -------------------------------------------------------------------------


@pytest.fixture
def server_settings() -> ServerSettings:
    return TEST_SETTINGS


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., ChatsaveApp]]:
    storages: list[Storage] = []

    def factory(storage: Storage | str | Path | None = None, *,
                settings: ServerSettings | None = None, tokens: Any = None,
                faults: Faults | None = None) -> ChatsaveApp:
        if storage is None:
            storage = SqliteStorage(tmp_path / f"server-{len(storages)}.db")
        elif not isinstance(storage, Storage):
            storage = open_storage(storage)
        storages.append(storage)
        app = create_app(storage, settings=settings or TEST_SETTINGS, tokens=tokens,
                         hooks=faults.hooks() if faults is not None else None)
        app.state.faults = faults
        return app

    yield factory
    for storage in storages:
        storage.close()


class AsgiClient:
    """Synchronous httpx over httpx.ASGITransport (the app runs in a portal's event loop)."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                        base_url="http://testserver", headers=headers)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(partial(self.client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        try:
            self.portal.call(self.client.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)


@pytest.fixture
def asgi_client() -> Iterator[Callable[..., AsgiClient]]:
    clients: list[AsgiClient] = []

    def factory(app: Any, token: str | None = None) -> AsgiClient:
        client = AsgiClient(app, token)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of the test process."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, http=HTTP_PROTOCOL, loop="asyncio", log_config=None,
                                access_log=False, lifespan="on", timeout_graceful_shutdown=2,
                                timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def faults(self) -> Faults:
        return self.app.state.faults  # type: ignore[no-any-return]

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def storage(self) -> Storage:
        return self.app.state.storage  # type: ignore[no-any-return]

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 15,
                   "uvicorn to start")
        assert self.server.started, "uvicorn did not start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn thread did not stop"


class Switch:
    """An ASGI app that forwards to ``current``: one uvicorn while the app behind it is
    replaced (a fresh app per example, a backend restarted over restored storage); it
    logs every request as (method, path)."""

    def __init__(self) -> None:
        self.current: Any = None
        self.log: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.log.append((scope["method"], scope["path"]))
        await self.current(scope, receive, send)

    def since(self, mark: int, method: str | None = None, tail: str = "") -> int:
        """Requests logged after the first ``mark`` (of ``method``, to paths ending ``tail``)."""
        return sum(1 for m, p in self.log[mark:]
                   if (method is None or m == method) and p.endswith(tail))


@pytest.fixture
def start_server() -> Iterator[Callable[[Any], LiveServer]]:
    servers: list[LiveServer] = []

    def factory(app: Any) -> LiveServer:
        server = LiveServer(app)
        servers.append(server)
        return server.start()

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def no_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers of this test answer as a chatsave server before the ``saves`` feature did:
    without it in their capabilities, so clients send each chat's batches alone (the
    behaviour under test where a test is about one chat's requests)."""
    from chatsave.backend import service

    monkeypatch.setattr(service, "FEATURES", [f for f in service.FEATURES if f != "saves"])


@pytest.fixture
def live_server(make_app: Callable[..., ChatsaveApp],
                start_server: Callable[[Any], LiveServer]) -> LiveServer:
    return start_server(make_app(faults=Faults()))


@pytest.fixture
def tokens_file(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, str]]]:
    def factory(*users: str) -> tuple[Path, dict[str, str]]:
        path = tmp_path / "tokens.json"
        return path, {user: add_token(path, user) for user in users}

    return factory


# -- server processes ---------------------------------------------------------------------------


class ServeProcess:
    """``python -m chatsave.server.run`` in a subprocess on 127.0.0.1 (``python -m
    tests.fault_server``, the same server with the fault hooks, if ``faults``)."""

    def __init__(self, db: str, log_path: Path, *, tokens: Path | None = None, workers: int = 1,
                 settings: dict[str, Any] | None = None, faults: bool = False) -> None:
        self.db = db
        self.log_path = log_path
        self.args = dict(tokens=tokens, workers=workers, settings=settings or {}, faults=faults)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> ServeProcess:
        settings = {"rate_per_s": 0, "housekeeping_interval_s": 0, **self.args["settings"]}
        for _attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            launcher = "tests.fault_server" if self.args["faults"] else "chatsave.server.run"
            cmd = [sys.executable, "-m", launcher, "--host", "127.0.0.1",
                   "--port", str(self.port), "--db", self.db, "--workers",
                   str(self.args["workers"]), "--settings", json.dumps(settings),
                   "--log-level", "warning"]
            if self.args["tokens"] is not None:
                cmd += ["--tokens", str(self.args["tokens"])]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO,
                                             start_new_session=True)
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise AssertionError(f"server process did not start; log:\n{self.log_path.read_text()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                r = httpx.get(f"{self.url}/api/v1/health", timeout=1.0)
                if r.status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def kill(self) -> None:
        """SIGKILL the server (and its workers: they share its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    procs: list[ServeProcess] = []

    def factory(db: str | Path, **kwargs: Any) -> ServeProcess:
        proc = ServeProcess(str(db), tmp_path / f"serve-{len(procs)}.log", **kwargs)
        procs.append(proc)
        return proc.start()

    yield factory
    for proc in procs:
        proc.stop()
