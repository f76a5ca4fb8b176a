"""Shared fixtures: an isolated chatsave home, the CLI driven through its front door, stores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# CI is derandomized: each run draws the same examples, so a red CI is a change's doing,
# reproducible, never a new draw. Exploring is the "dev" profile's job (random, ten times
# the examples): run it before changing sync, dedupe or gc (README, "Tests").
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=600, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(PROFILE)


def examples(ci: int) -> int:
    """``max_examples`` for a property test that sets its own: ``ci`` in CI, ten times as
    many under the "dev" profile, as the profiles themselves differ."""
    return ci * 10 if PROFILE == "dev" else ci

pytest_plugins: list[str] = ["tests.server_fixtures"]


# Soak tests (marked ``slow``) run in every run, at a reduced size; ``-m slow`` (the
# README's ``.ci/run -m slow``) runs them at full size. A soak test takes the ``soak``
# fixture and sizes itself with ``soak.size(full, sample)``; its assertions stay the same.
def full_soak_requested(config: pytest.Config) -> bool:
    """Whether ``-m`` asks for the slow tests (``-m slow``, ``-m "slow or postgres"``), not
    only lets them through (no ``-m``, ``-m "not slow"``, ``-m "not postgres"``)."""
    markexpr = (config.getoption("markexpr", None) or "").strip()
    return bool(re.search(r"(?<!not )\bslow\b", markexpr))


@dataclass(frozen=True)
class Soak:
    """How big a soak test runs: ``full`` under ``-m slow``, a bounded sample otherwise."""

    full: bool

    def size(self, full: int, sample: int) -> int:
        return full if self.full else sample


@pytest.fixture(scope="session")
def soak(pytestconfig: pytest.Config) -> Soak:
    return Soak(full_soak_requested(pytestconfig))


def pytest_report_header(config: pytest.Config) -> str:
    size = "full size (-m slow)" if full_soak_requested(config) else "a bounded sample"
    return (f"hypothesis profile: {os.environ.get('HYPOTHESIS_PROFILE', 'ci')}; "
            f"slow soak tests: {size}")


DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@dataclass
class Ran:
    """The outcome of one CLI run: exit code, stdout and stderr kept apart."""

    exit_code: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        """stdout parsed as JSON Lines (every line must parse)."""
        return [json.loads(line) for line in self.stdout.splitlines()]

    @property
    def summary(self) -> dict[str, Any]:
        lines = self.json_lines()
        assert lines and lines[-1]["type"] == "summary", self.stdout
        assert sum(1 for x in lines if x["type"] == "summary") == 1
        return lines[-1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated CHATSAVE_HOME: the store and config file live here."""
    for name in list(os.environ):
        if name.startswith("CHATSAVE_"):
            monkeypatch.delenv(name)
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("CHATSAVE_HOME", str(path))
    return path


@pytest.fixture
def cli(home: Path) -> Callable[..., Ran]:
    """Run chatsave in-process through its front door (Typer's CliRunner)."""
    from typer.testing import CliRunner

    from chatsave.cli.app import app

    runner = CliRunner()

    def run(*args: str, input: str | bytes | None = None) -> Ran:
        result = runner.invoke(app, list(args), input=input, catch_exceptions=False)
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run


def run_process(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
                **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run chatsave as a real subprocess (for exit codes, locks, kill -9, limits)."""
    return subprocess.run([sys.executable, "-m", "chatsave", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def proc_env(home: Path) -> dict[str, str]:
    """Environment for chatsave subprocesses using the isolated home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSAVE_")}
    env["CHATSAVE_HOME"] = str(home)
    return env


@pytest.fixture
def store_path(home: Path) -> Path:
    return home / "store.db"


@pytest.fixture
def store(store_path: Path) -> Iterator[Any]:
    from chatsave.store.store import Store

    with Store.open(store_path) as opened:
        yield opened


def table_dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every user table (for 'nothing changed' assertions)."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {n: sorted(conn.execute(f"SELECT * FROM {n}").fetchall(), key=repr)
                for n in names}
    finally:
        conn.close()


@pytest.fixture(params=["embedded", "http"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A factory of remotes onto one fresh backend: embedded, or the real server over HTTP
    (every protocol behaviour is tested on both transports)."""
    from chatsave.remote.embedded import EmbeddedRemote
    from chatsave.remote.http import HttpRemote
    from chatsave.remote.retry import RetryPolicy

    opened: list[Any] = []
    if request.param == "embedded":
        def factory() -> Any:
            opened.append(EmbeddedRemote(tmp_path / "backend.db"))
            return opened[-1]
    else:
        server = request.getfixturevalue("live_server")

        def factory() -> Any:
            opened.append(HttpRemote(server.url,
                                     policy=RetryPolicy(attempts=3, base=0.01, cap=0.05)))
            return opened[-1]
    yield factory
    for remote in opened:
        remote.close()


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A factory of local stores, closed after the test."""
    from chatsave.store.store import Store

    opened: list[Any] = []

    def factory(name: str) -> Any:
        opened.append(Store.open(tmp_path / f"{name}.db"))
        return opened[-1]

    yield factory
    for store in opened:
        store.close()

