"""save against a backend restored from an old copy: what it lost is sent again, once.

The backend keeps its backend_id (it lives in its storage) and loses what it confirmed
after the copy was taken. Each test saves through the CLI, puts the old copy back
(embedded: the file; over HTTP: the server's SQLite file or PostgreSQL database, behind
one uvicorn whose app is restarted over the restored storage), and saves again. Also
here: the requests save reports are the requests it sent (a proxy answering 413).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.backend import LOCAL_USER
from chatsave.backend.storage import Storage, open_storage
from chatsave.errors import ExitCode
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.server.app import create_app
from tests.conftest import Ran, run_process
from tests.faults import Fault, Faults, read_body, replaying
from tests.server_fixtures import TEST_SETTINGS, LiveServer, PgCluster, Switch

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def lines(chat_id: str, ids: range, prefix: str = "m") -> str:
    """JSONL of messages ``prefix0``.. of a chat (content follows from the id)."""
    return "".join(json.dumps({
        "chat_id": chat_id, "id": f"{prefix}{i}", "role": "user" if i % 2 else "assistant",
        "content": f"{prefix}{i} of {chat_id}",
        "created_at": (T0 + timedelta(minutes=i)).isoformat()}) + "\n" for i in ids)


class Backend:
    """A chatsave backend whose storage can be copied and put back (same backend_id)."""

    def __init__(self, kind: str, tmp: Path, *, pg: PgCluster | None = None,
                 start_server: Callable[[Any], LiveServer] | None = None) -> None:
        self.kind = kind
        self.tmp = tmp
        self.pg = pg
        self.storage: Storage | None = None
        self.counting = Switch()
        if kind == "embedded":
            self.location = str(tmp / "backend.db")
            EmbeddedRemote(self.location).close()  # created empty, as its first user would
            self.remote = self.location
            return
        self.location = pg.create_database() if pg is not None else str(tmp / "server.db")
        self._open()
        assert start_server is not None
        self.remote = start_server(self.counting).url

    def _open(self) -> None:
        self.storage = open_storage(self.location)
        self.counting.current = create_app(self.storage, settings=TEST_SETTINGS)

    def _close(self) -> None:
        if self.storage is not None:
            self.storage.close()
            self.storage = None

    def _pg_admin(self, *statements: str) -> None:
        import psycopg

        assert self.pg is not None
        with psycopg.connect(self.pg.url(), autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql)  # type: ignore[arg-type]

    def snapshot(self) -> None:
        """Copy the backend's storage as it is now (the server is stopped meanwhile)."""
        self._close()
        if self.pg is not None:
            name = self.location.rsplit("/", 1)[1]
            self._pg_admin("DROP DATABASE IF EXISTS snap", f"CREATE DATABASE snap TEMPLATE {name}")
        else:
            for suffix in ("", "-wal"):
                kept = self.tmp / f"snapshot.db{suffix}"
                kept.unlink(missing_ok=True)
                if Path(self.location + suffix).exists():
                    shutil.copyfile(self.location + suffix, kept)
        if self.kind != "embedded":
            self._open()

    def restore(self) -> None:
        """Put the copy back: stop, restore the storage, start again."""
        self._close()
        if self.pg is not None:
            name = self.location.rsplit("/", 1)[1]
            self._pg_admin(f"DROP DATABASE {name} WITH (FORCE)",
                           f"CREATE DATABASE {name} TEMPLATE snap")
        else:
            for suffix in ("-wal", "-shm"):
                Path(self.location + suffix).unlink(missing_ok=True)
            for suffix in ("", "-wal"):
                kept = self.tmp / f"snapshot.db{suffix}"
                if kept.exists():
                    shutil.copyfile(kept, self.location + suffix)
        if self.kind != "embedded":
            self._open()

    def held(self, chat_id: str) -> set[str]:
        """The ids of the live messages the backend holds in a chat (read in-process)."""
        if self.kind == "embedded":
            with contextlib.closing(EmbeddedRemote(self.location)) as remote:
                service = remote.service
                return self._read(service, chat_id)
        return self._read(self.counting.current.state.service, chat_id)

    @staticmethod
    def _read(service: Any, chat_id: str) -> set[str]:
        out: set[str] = set()
        after = None
        while True:
            status, answer, _ = service.messages(LOCAL_USER, chat_id, after, None, False)
            if status == 404:
                return out
            assert status == 200, answer
            out.update(m["id"] for m in answer["messages"])
            if answer["next"] is None:
                return out
            after = answer["next"]

    def close(self) -> None:
        self._close()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self._pg_admin("DROP DATABASE IF EXISTS snap")


@pytest.fixture(params=["embedded", "http-sqlite",
                        pytest.param("http-postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    pg = request.getfixturevalue("pg_cluster") if kind == "http-postgres" else None
    starter = request.getfixturevalue("start_server") if kind != "embedded" else None
    made = Backend(kind, tmp_path, pg=pg, start_server=starter)
    yield made
    made.close()


@pytest.fixture
def http_backend(tmp_path: Path, start_server: Callable[[Any], LiveServer]
                 ) -> Iterator[Backend]:
    made = Backend("http-sqlite", tmp_path, start_server=start_server)
    yield made
    made.close()


def save_from(cli: Callable[..., Ran], tmp: Path, backend: Backend, text: str,
              *extra: str) -> Ran:
    path = tmp / "in.jsonl"
    path.write_text(text, encoding="utf-8")
    return cli("save", "--from", str(path), "--remote", backend.remote, "--json", *extra)


def events(ran: Ran, kind: str) -> list[dict[str, Any]]:
    return [e for e in ran.json_lines() if e["type"] == kind]


# ------------------------------------------------------------------------------ restore
def test_what_a_restored_backend_lost_is_sent_again_once(
        cli: Callable[..., Ran], tmp_path: Path, backend: Backend) -> None:
    first = save_from(cli, tmp_path, backend, lines("c1", range(5)) + lines("c2", range(3)))
    assert first.exit_code == ExitCode.OK, first.stdout + first.stderr
    backend.snapshot()
    later = save_from(cli, tmp_path, backend, lines("c1", range(5, 10)) + lines("c3", range(2)))
    assert later.exit_code == ExitCode.OK
    backend.restore()
    assert backend.held("c1") == {f"m{i}" for i in range(5)} and backend.held("c3") == set()

    again = cli("save", "--all", "--remote", backend.remote, "--json")
    assert again.exit_code == ExitCode.OK, again.stdout + again.stderr
    assert again.summary["resent_lost"] == 7 and again.summary["written"] == 7
    assert "warning: 7 message(s) the backend had confirmed were gone" in again.stderr
    assert {(e["chat_id"], e["id"]) for e in events(again, "missing_on_backend")} == \
        {("c1", f"m{i}") for i in range(5, 10)} | {("c3", "m0"), ("c3", "m1")}
    assert backend.held("c1") == {f"m{i}" for i in range(10)}
    assert backend.held("c2") == {"m0", "m1", "m2"} and backend.held("c3") == {"m0", "m1"}

    quiet = cli("save", "--all", "--remote", backend.remote, "--json")
    assert quiet.exit_code == ExitCode.OK
    assert quiet.summary["resent_lost"] == 0 and quiet.summary["write_requests"] == 0


def test_a_lost_message_gc_evicted_here_is_listed(
        cli: Callable[..., Ran], tmp_path: Path, backend: Backend) -> None:
    assert save_from(cli, tmp_path, backend, lines("c1", range(3))).exit_code == ExitCode.OK
    backend.snapshot()
    assert save_from(cli, tmp_path, backend, lines("c1", range(3, 5))).exit_code == ExitCode.OK
    gc = cli("gc", "--budget", "1B", "--keep-last", "0", "--remote", backend.remote, "--json")
    assert gc.summary["evicted"] == 5, gc.stdout + gc.stderr  # exit 1: still over 1 byte
    backend.restore()

    ran = cli("save", "--all", "--remote", backend.remote, "--json")
    assert ran.exit_code == ExitCode.REJECTED, ran.stdout + ran.stderr
    assert {e["id"] for e in events(ran, "rejected")} == {"m3", "m4"}
    assert all("gc had evicted its body" in e["reason"] for e in events(ran, "rejected"))
    assert {r["id"] for r in ran.summary["rejections"]} == {"m3", "m4"}
    assert "message 'm3'" in ran.stderr and "message 'm4'" in ran.stderr
    assert backend.held("c1") == {"m0", "m1", "m2"}


def test_a_wiped_backend_is_refused_and_nothing_is_sent(
        cli: Callable[..., Ran], tmp_path: Path, backend: Backend) -> None:
    backend.snapshot()  # empty, with its backend_id
    first = save_from(cli, tmp_path, backend, lines("c1", range(3)) + lines("c2", range(2)))
    assert first.exit_code == ExitCode.OK
    backend.restore()
    mark = len(backend.counting.log)

    ran = save_from(cli, tmp_path, backend, lines("c1", range(3, 4)))
    assert ran.exit_code == ExitCode.GUARD, ran.stdout + ran.stderr
    assert "looks wiped" in ran.summary["error"]["message"]
    assert "error: " in ran.stderr and "looks wiped" in ran.stderr
    assert ran.summary["write_requests"] == 0 and ran.summary["pending_push"] == 1
    assert backend.held("c1") == set() and backend.held("c2") == set()
    assert backend.counting.since(mark, "POST", "/save") == 0
    assert cli("save", "--all", "--remote", backend.remote).exit_code == ExitCode.GUARD


def test_a_backend_that_loses_the_resend_too_is_listed_then_forgiven_once_held(
        cli: Callable[..., Ran], tmp_path: Path, backend: Backend) -> None:
    assert save_from(cli, tmp_path, backend, lines("c1", range(2))).exit_code == ExitCode.OK
    backend.snapshot()
    assert save_from(cli, tmp_path, backend, lines("c1", range(2, 3))).exit_code == ExitCode.OK
    backend.restore()
    resent = cli("save", "--all", "--remote", backend.remote, "--json")
    assert resent.exit_code == ExitCode.OK and resent.summary["resent_lost"] == 1
    backend.restore()  # it loses the resend too

    listed = cli("save", "--all", "--remote", backend.remote, "--json")
    assert listed.exit_code == ExitCode.REJECTED, listed.stdout + listed.stderr
    [entry] = listed.summary["rejections"]
    assert entry["id"] == "m2" and entry["kind"] == "dropped"
    assert "vanished from the backend again" in entry["reason"]
    assert "AutoBot" not in entry["reason"] and "restored from an old copy" in entry["reason"]
    assert backend.held("c1") == {"m0", "m1"}

    retried = cli("save", "--all", "--retry-rejected", "--remote", backend.remote, "--json")
    assert retried.exit_code == ExitCode.OK and backend.held("c1") == {"m0", "m1", "m2"}
    # Lost again much later, after runs that found it there: sent again once, not listed.
    backend.restore()
    resent = cli("save", "--all", "--remote", backend.remote, "--json")
    assert resent.exit_code == ExitCode.OK and resent.summary["resent_lost"] == 1
    held = cli("save", "--all", "--remote", backend.remote, "--json")
    assert held.exit_code == ExitCode.OK and held.summary["resent_lost"] == 0
    backend.restore()
    again = cli("save", "--all", "--remote", backend.remote, "--json")
    assert again.exit_code == ExitCode.OK, again.stdout + again.stderr
    assert again.summary["resent_lost"] == 1 and backend.held("c1") == {"m0", "m1", "m2"}


# ---------------------------------------------------------------- other stores' writes
def test_a_chat_other_stores_write_to_is_read_once_then_trusted(
        cli: Callable[..., Ran], tmp_path: Path, http_backend: Backend) -> None:
    backend = http_backend
    other = str(tmp_path / "other.db")
    assert save_from(cli, tmp_path, backend, lines("c1", range(5)) + lines("c2", range(2))
                     ).exit_code == ExitCode.OK
    backend.snapshot()
    theirs = save_from(cli, tmp_path, backend, lines("c1", range(3), prefix="b"),
                       "--store", other)
    assert theirs.exit_code == ExitCode.OK

    def save_counted() -> tuple[Ran, int]:
        mark = len(backend.counting.log)
        ran = cli("save", "--all", "--remote", backend.remote, "--json")
        return ran, len(backend.counting.log) - mark

    first, requests = save_counted()
    assert first.exit_code == ExitCode.OK, first.stdout + first.stderr
    assert first.summary["resent_lost"] == 0 and first.summary["written"] == 0
    # capabilities, one digest request for every chat, one page of c1
    assert requests == 3 and first.summary["check_requests"] == 2
    second, requests = save_counted()
    assert second.exit_code == ExitCode.OK and requests == 2
    assert second.summary["check_requests"] == 1

    # A restore now: the pair of digests no longer vouches for c1, which is read again.
    mine = save_from(cli, tmp_path, backend, lines("c1", range(5, 6)))
    assert mine.exit_code == ExitCode.OK
    backend.restore()
    third, _ = save_counted()
    assert third.exit_code == ExitCode.OK and third.summary["resent_lost"] == 1
    assert backend.held("c1") == {f"m{i}" for i in range(6)}


def test_cron_running_only_save_ends_with_everything_back(
        proc_env: dict[str, str], tmp_path: Path, http_backend: Backend) -> None:
    backend = http_backend
    dump = tmp_path / "in.jsonl"

    def cron(*args: str) -> Any:
        ran = run_process("save", *args, "--remote", backend.remote, "--json", env=proc_env)
        return ran.returncode, json.loads(ran.stdout.splitlines()[-1]), ran.stderr

    dump.write_text(lines("c1", range(4)) + lines("c2", range(4)), encoding="utf-8")
    assert cron("--from", str(dump))[0] == 0
    backend.snapshot()
    dump.write_text(lines("c1", range(4, 8)) + lines("c2", range(4, 6)), encoding="utf-8")
    assert cron("--from", str(dump))[0] == 0
    backend.restore()
    code, summary, stderr = cron("--all")
    assert code == 0 and summary["resent_lost"] == 6, stderr
    assert "had confirmed were gone" in stderr
    code, summary, _ = cron("--all")
    assert code == 0 and summary["resent_lost"] == 0
    assert backend.held("c1") == {f"m{i}" for i in range(8)}
    assert backend.held("c2") == {f"m{i}" for i in range(6)}


# ------------------------------------------------------------ requests really sent
class Proxy:
    """A proxy in front of the app that answers 413 (plain text) to a body over ``limit``
    bytes, as nginx does, and counts what it is sent."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.posts = 0
        self.refused = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if scope["method"] == "POST" and scope["path"].endswith("/save"):
            self.posts += 1
            if len(body) > self.limit:
                self.refused += 1
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"text/html")]})
                await send({"type": "http.response.body",
                            "body": b"<html>413 Request Entity Too Large</html>"})
                return
        await self.app(scope, replaying(body), send)


def test_save_reports_every_request_it_sent_splits_and_retries_included(
        cli: Callable[..., Ran], tmp_path: Path, make_app: Callable[..., Any],
        start_server: Callable[[Any], LiveServer], no_saves: None) -> None:
    faults = Faults()
    app = make_app(faults=faults)
    faults.script(Fault.error(503, retry_after=0), path=r"/save$")  # one retry
    proxy = Proxy(app, limit=4000)
    server = start_server(proxy)
    text = "".join(json.dumps({
        "chat_id": f"c{c}", "id": f"m{i}", "role": "user", "content": "x" * 300,
        "created_at": (T0 + timedelta(seconds=i)).isoformat()}) + "\n"
        for c in range(3) for i in range(40))
    path = tmp_path / "in.jsonl"
    path.write_text(text, encoding="utf-8")

    ran = cli("save", "--from", str(path), "--remote", server.url, "--json")
    assert ran.exit_code == ExitCode.OK, ran.stdout + ran.stderr
    summary = ran.summary
    assert summary["written"] == 120 and proxy.refused > 0
    assert summary["batches"] < proxy.posts
    assert f"(3 chat(s), {proxy.posts} request(s), 1 retried)" in ran.stderr, ran.stderr
    assert summary["write_requests"] == proxy.posts
    held = {(c, m["id"]) for c in ("c0", "c1", "c2")
            for m in app.state.service.messages(LOCAL_USER, c, None, None, False)[1]["messages"]}
    assert len(held) == 120


# ------------------------------------------------------------- deletions stay deletions
def test_a_deletion_made_elsewhere_long_ago_is_not_taken_for_a_loss(
        cli: Callable[..., Ran], tmp_path: Path) -> None:
    """An absent id is what a restore leaves, and also what a purged tombstone would: a
    backend keeps its tombstones by default, so a store that only saves, and never learned
    of another store's deletion, does not send the deleted message back years later."""
    location = str(tmp_path / "backend.db")
    other = ("--store", str(tmp_path / "other.db"))
    path = tmp_path / "in.jsonl"
    path.write_text(lines("c1", range(3)), encoding="utf-8")
    assert cli("save", "--from", str(path), "--remote", location).exit_code == ExitCode.OK
    assert cli("sync", "--all", "--remote", location, *other).exit_code == ExitCode.OK
    assert cli("delete", "c1", "m1", "--yes", "--remote", location, *other).exit_code == 0
    with contextlib.closing(EmbeddedRemote(location)) as remote:
        purged = remote.service.housekeeping(now=time.time() + 3 * 365 * 86400)
        assert purged["tombstones"] == 0, "tombstones are kept"

    ran = cli("save", "--all", "--remote", location, "--json")
    assert ran.exit_code == ExitCode.OK, ran.stdout + ran.stderr
    assert ran.summary["resent_lost"] == 0
    with contextlib.closing(EmbeddedRemote(location)) as remote:
        live = {m.id for m in remote.messages("c1").messages}
    assert live == {"m0", "m2"}
