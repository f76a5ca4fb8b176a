"""chatsave serve and serve token add through the front door: a real server, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import run_process
from tests.server_fixtures import free_port

SERVE_ATTEMPTS = 5


def _started(proc: subprocess.Popen[str], url: str) -> bool:
    """True once ``url`` answers its health check; False if the server ended first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.communicate()
    raise AssertionError(f"server did not start on {url}")


def _start(env: dict[str, str], *args: str,
           ports: Iterator[int] | None = None) -> tuple[subprocess.Popen[str], str]:
    """``chatsave serve`` on a free port; a port taken between ``free_port()`` and the
    server's bind (exit 2, "already in use") is retried on another, a few times."""
    candidates = ports if ports is not None else iter(free_port, 0)
    taken: list[int] = []
    for _ in range(SERVE_ATTEMPTS):
        port = next(candidates, None) or free_port()
        proc = subprocess.Popen([sys.executable, "-m", "chatsave", "serve", "--port",
                                 str(port), "--log-level", "warning", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        if _started(proc, url):
            return proc, url
        _, err = proc.communicate()
        if proc.returncode == 2 and f"127.0.0.1:{port} is already in use" in err:
            taken.append(port)
            continue
        raise AssertionError(f"serve ended with {proc.returncode}: {err}")
    raise AssertionError(f"{SERVE_ATTEMPTS} ports were taken before the server bound: {taken}")


def test_a_port_taken_meanwhile_is_retried_on_another(proc_env: dict[str, str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc, url = _start(proc_env, ports=iter([taken]))
        try:
            assert url != f"http://127.0.0.1:{taken}"
            assert httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


def test_serve_with_a_minted_token(proc_env: dict[str, str], tmp_path: Path) -> None:
    minted = run_process("serve", "token", "add", "alice", "--json", env=proc_env)
    assert minted.returncode == 0, minted.stderr
    event = json.loads(minted.stdout.splitlines()[0])
    token, tokens_file = event["token"], event["tokens_file"]
    assert token not in Path(tokens_file).read_text()
    assert Path(tokens_file).stat().st_mode & 0o077 == 0
    proc, url = _start(proc_env)
    try:
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps({"chat_id": "c", "id": "m1", "role": "user",
                                      "content": "hi",
                                      "created_at": "2026-01-01T00:00:00.000Z"}) + "\n")
        refused = run_process("save", "--from", str(source), "--remote", url, env=proc_env)
        assert refused.returncode == 9, refused.stderr
        assert "refused the credentials" in refused.stderr
        ok = run_process("save", "--all", "--remote", url,
                         env={**proc_env, "CHATSAVE_TOKEN": token})
        assert ok.returncode == 0, ok.stderr
        assert token not in ok.stdout + ok.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and token not in out + err


def test_serve_refuses_a_public_address_without_tokens(proc_env: dict[str, str]) -> None:
    ran = run_process("serve", "--host", "0.0.0.0", "--port", str(free_port()), env=proc_env)
    assert ran.returncode == 2
    assert "without authentication" in ran.stderr


def test_token_file_readable_by_others_is_refused(proc_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("secret-token-value\n")
    os.chmod(token_file, 0o644)
    ran = run_process("save", "--all", "--remote", "http://127.0.0.1:9",
                      "--token-file", str(token_file), env=proc_env)
    assert ran.returncode == 2 and "chmod 600" in ran.stderr
    assert "secret-token-value" not in ran.stdout + ran.stderr


def test_the_database_can_come_from_the_environment(proc_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """CHATSAVE_SERVE_DB names the storage (the deployment's environment file), so a
    PostgreSQL password stays off the command line; --db still wins over it."""
    chosen = tmp_path / "from-env.db"
    proc, url = _start({**proc_env, "CHATSAVE_SERVE_DB": str(chosen)})
    try:
        assert httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"over {chosen}" in err and chosen.exists()
    flagged = tmp_path / "from-flag.db"
    proc, url = _start({**proc_env, "CHATSAVE_SERVE_DB": str(chosen)}, "--db", str(flagged))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert f"over {flagged}" in err and flagged.exists()
