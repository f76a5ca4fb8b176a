"""``--metrics-file``: what cron's runs leave for node_exporter's textfile collector."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from chatsave.errors import ExitCode
from chatsave.metrics_file import record_run
from tests.conftest import run_process

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parsed(path: Path) -> Samples:
    """The file as Prometheus reads it (prometheus-client's own parser)."""
    out: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(found: Samples, name: str, **labels: str) -> float | None:
    return found.get(("chatsave_command_" + name, tuple(sorted(labels.items()))))


def write_chats(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({
        "chat_id": "c1", "id": f"m{i}", "role": "user", "content": f"message {i}",
        "created_at": f"2026-03-01T09:{i:02d}:00Z"}) + "\n" for i in range(count)))
    return path


def test_save_records_its_runs_and_keeps_the_last_success(
        tmp_path: Path, proc_env: dict[str, str]) -> None:
    prom = tmp_path / "chatsave.prom"
    env = {**proc_env, "CHATSAVE_METRICS_FILE": str(prom), "CHATSAVE_RETRY_ATTEMPTS": "1"}
    imported = run_process("import", str(write_chats(tmp_path / "in.jsonl", 12)), env=env)
    assert imported.returncode == 0, imported.stderr
    before = time.time()
    saved = run_process("save", "--all", "--remote", str(tmp_path / "backend.db"), "--json",
                        "--metrics-file", str(prom), env=env)
    assert saved.returncode == 0, saved.stderr
    summary = json.loads(saved.stdout.splitlines()[-1])
    assert all(json.loads(line)["type"] for line in saved.stdout.splitlines()), \
        "with --json, stdout is still JSON Lines only"
    first = parsed(prom)
    assert get(first, "exit_code", command="save") == 0
    assert get(first, "summary", command="save", field="written") == summary["written"] == 12
    assert get(first, "summary", command="save", field="pending_push") == 0
    ran_at = get(first, "last_run_timestamp_seconds", command="save")
    assert ran_at is not None and before <= ran_at <= time.time()
    assert get(first, "last_success_timestamp_seconds", command="save") == ran_at
    assert get(first, "summary", command="import", field="written") == 12, \
        "the import's lines are kept beside the save's"

    failed = run_process("save", "--all", "--remote", "http://127.0.0.1:9", env=env)
    assert failed.returncode == ExitCode.UNAVAILABLE, failed.stderr
    second = parsed(prom)
    assert get(second, "exit_code", command="save") == ExitCode.UNAVAILABLE
    assert get(second, "last_run_timestamp_seconds", command="save") > ran_at  # type: ignore[operator]
    assert get(second, "last_success_timestamp_seconds", command="save") == ran_at, \
        "the last success is kept across a failed run"
    assert get(second, "summary", command="save", field="written") is None, \
        "a run that ended in an error has no counts (not zeros)"
    assert get(second, "exit_code", command="import") == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("chatsave.prom.")], \
        "no temporary file left"


def test_a_metrics_file_that_cannot_be_written_is_refused_before_anything(
        tmp_path: Path, proc_env: dict[str, str]) -> None:
    ran = run_process("import", str(write_chats(tmp_path / "in.jsonl", 2)), "--metrics-file",
                      str(tmp_path / "missing" / "x.prom"), env=proc_env)
    assert ran.returncode == ExitCode.USAGE
    assert "error: --metrics-file" in ran.stderr and "no directory" in ran.stderr
    assert not (Path(proc_env["CHATSAVE_HOME"]) / "store.db").exists(), "nothing changed"


def test_a_foreign_file_is_written_afresh(tmp_path: Path, proc_env: dict[str, str]) -> None:
    prom = tmp_path / "chatsave.prom"
    prom.write_text("this is { not prometheus\n")
    ran = run_process("status", "--metrics-file", str(prom), env=proc_env)
    assert ran.returncode == 0, ran.stderr
    assert get(parsed(prom), "exit_code", command="status") == 0


def test_writers_never_lose_each_other_and_readers_never_see_half(tmp_path: Path) -> None:
    """Eight commands recording 25 runs each, at once, while a reader parses the file in a
    loop: every read parses whole, and at the end every command's last run is there."""
    prom = tmp_path / "chatsave.prom"
    commands = [f"cmd{n}" for n in range(8)]
    done = threading.Event()
    reads: list[int] = []
    problems: list[str] = []

    def reader() -> None:
        while not done.is_set():
            if prom.exists():
                try:
                    found = parsed(prom)
                except Exception as exc:
                    problems.append(repr(exc))
                    continue
                reads.append(len(found))

    def writer(command: str) -> Callable[[], None]:
        def run() -> None:
            for n in range(25):
                # exit n % 3: runs 2, 5, ... failed (exit 2); the last one, 24, succeeded
                record_run(prom, command, n % 3, {"written": n, "note": "x"}, float(n), 0.5)
        return run

    watcher = threading.Thread(target=reader)
    watcher.start()
    threads = [threading.Thread(target=writer(c)) for c in commands]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    watcher.join(10)
    assert not problems, problems[:3]
    assert reads, "the reader read the file"
    found = parsed(prom)
    for command in commands:
        assert get(found, "exit_code", command=command) == 24 % 3
        assert get(found, "summary", command=command, field="written") == 24
        assert get(found, "last_success_timestamp_seconds", command=command) == 24.0
        assert get(found, "summary", command=command, field="note") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".chatsave.prom.lock",
                                                          "chatsave.prom"]
    assert os.stat(prom).st_size > 0
