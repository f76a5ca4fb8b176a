"""chatsave serve and serve token add through the front door: a real server, real clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import run_process
from tests.server_fixtures import free_port


def _start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatsave", "serve", "--port", str(port),
                             "--log-level", "warning", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


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
