"""``chatsave serve`` as people start it: a busy port, an install without the server extra,
a public address without tokens. Real ``chatsave serve`` processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_process
from tests.server_fixtures import free_port

# Makes the modules named in BLOCKED_MODULES impossible to import, as if not installed.
BLOCKER = '''\
import importlib.abc, os, sys

BLOCKED = set(filter(None, os.environ.get("BLOCKED_MODULES", "").split(",")))


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that this test process listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_one_error(ran: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Exit ``code``, nothing on stdout, one ``error:`` line (and its hint) on stderr."""
    assert ran.returncode == code, (ran.returncode, ran.stderr)
    assert ran.stdout == ""
    errors = _errors(ran.stderr)
    assert len(errors) == 1, ran.stderr
    other = [line for line in ran.stderr.splitlines()
             if not line.startswith(("error:", "hint:"))]
    assert other == [], ran.stderr
    return errors[0]


# -- 13: a port already in use --------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_busy_port_is_one_error_line_and_exit_2(proc_env: dict[str, str], tmp_path: Path,
                                               workers: int) -> None:
    db = tmp_path / "server.db"
    with busy_port() as port:
        # Several tries: the old code also died with a segmentation fault now and then.
        for _ in range(3):
            ran = run_process("serve", "--port", str(port), "--workers", str(workers),
                              "--db", str(db), env=proc_env)
            error = _assert_one_error(ran)
            assert error.startswith(f"error: 127.0.0.1:{port} is already in use"), error
            if sys.platform == "linux":  # the holder is found through /proc
                assert error.endswith(f"by pid {os.getpid()} ({_comm(os.getpid())})"), error
            assert "--port" in ran.stderr, "the hint says how to choose another port"
            assert "chatsave server on" not in ran.stderr
    assert not db.exists(), "refused before the database was created"


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _start(env: dict[str, str], port: int, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "chatsave", "serve", "--port", str(port),
                             "--log-level", "warning", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.communicate()[1]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=30)
    raise AssertionError("server did not start")


def test_port_held_by_another_chatsave_server(proc_env: dict[str, str],
                                              tmp_path: Path) -> None:
    port = free_port()
    first = _start(proc_env, port, "--workers", "2", "--db", str(tmp_path / "first.db"))
    try:
        second = run_process("serve", "--port", str(port), "--db", str(tmp_path / "second.db"),
                             env=proc_env)
        error = _assert_one_error(second)
        assert error.startswith(f"error: 127.0.0.1:{port} is already in use"), error
        if sys.platform == "linux":
            assert error.endswith(f"by another chatsave server (pid {first.pid})"), error
        assert not (tmp_path / "second.db").exists()
        # The first server, its workers on the socket chatsave bound, still answers.
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=10).status_code == 200
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            _out, err = first.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate(timeout=30)
            raise
    assert first.returncode == 0, err
    assert f"chatsave server on http://127.0.0.1:{port} over " in err
    assert "Traceback" not in err


# -- 14: installed without the server extra --------------------------------------------------


Without = Callable[..., dict[str, str]]


@pytest.fixture
def without(proc_env: dict[str, str], tmp_path: Path) -> Without:
    """``without("uvicorn", "fastapi")`` -> an environment where those cannot be imported."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER)

    def env(*modules: str) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(shim), proc_env.get("PYTHONPATH")]))
        return {**proc_env, "PYTHONPATH": path, "BLOCKED_MODULES": ",".join(modules)}

    return env


def _cannot_import(env: dict[str, str], module: str) -> bool:
    ran = subprocess.run([sys.executable, "-c", f"import {module}"], env=env,
                         capture_output=True, text=True, timeout=60)
    return ran.returncode != 0 and "ModuleNotFoundError" in ran.stderr


def test_serve_without_the_server_extra_names_it(without: Without, tmp_path: Path) -> None:
    env = without("uvicorn", "fastapi", "starlette")
    assert _cannot_import(env, "uvicorn") and _cannot_import(env, "fastapi"), "the shim works"
    ran = run_process("serve", "--port", str(free_port()), "--db", str(tmp_path / "s.db"),
                      env=env)
    error = _assert_one_error(ran)
    assert "chatsave[server]" in error and "internal error" not in error, error
    assert "hint: pip install 'chatsave[server]'" in ran.stderr
    assert not (tmp_path / "s.db").exists()

    pg = run_process("serve", "--port", str(free_port()),
                     "--db", "postgresql://chats@127.0.0.1:9/chats", env=env)
    _assert_one_error(pg)
    assert "hint: pip install 'chatsave[server,postgres]'" in pg.stderr

    # Minting a token needs no extra.
    minted = run_process("serve", "token", "add", "alice", "--tokens",
                         str(tmp_path / "tokens.json"), env=env)
    assert minted.returncode == 0, minted.stderr


def test_postgres_db_without_the_postgres_extra_names_it(without: Without) -> None:
    env = without("psycopg", "psycopg_pool")
    assert _cannot_import(env, "psycopg"), "the shim works"
    ran = run_process("serve", "--port", str(free_port()),
                      "--db", "postgresql://chats@127.0.0.1:9/chats", env=env)
    error = _assert_one_error(ran)
    assert "chatsave[postgres]" in error and "chatsave[server" not in error, error
    assert "hint: pip install 'chatsave[postgres]'" in ran.stderr


# -- 16: a public address without tokens -----------------------------------------------------


def test_public_address_without_tokens_is_refused_first(proc_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    db = tmp_path / "server.db"
    with busy_port() as port:
        # The control: binding 0.0.0.0 on this port fails, so a refusal that came after
        # binding would say "in use" instead.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                probe.bind(("0.0.0.0", port))
        ran = run_process("serve", "--host", "0.0.0.0", "--port", str(port),
                          "--db", str(db), env=proc_env)
    error = _assert_one_error(ran)
    assert error == "error: refusing to listen on 0.0.0.0 without authentication"
    assert "chatsave server on" not in ran.stderr and "in use" not in ran.stderr
    assert not db.exists()
