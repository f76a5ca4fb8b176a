"""The README is tested as written: every command block in it runs here, unedited.

Each fenced block of README.md is named by the heading it sits under and its place there
(``("Run the tests", 1)``) and must be one this file knows (``BLOCKS``), so a new block
cannot go untested. How each kind is checked:

- ``sh`` blocks run with ``bash -euo pipefail`` in a temporary directory, without a
  terminal (stdin is /dev/null), with their own ``CHATSAVE_HOME`` and ``HOME`` there and a
  bounded timeout. They run line by line: a line runs as written, then its exit code is
  checked against the one the README notes in its comment (``# exit 1``), 0 where it notes
  none; a failing line ends the block (``set -e``) and is named with its README line.
  Placeholders are environment variables this file sets (``$SERVER_URL``, ``$PORT``,
  ``$AUTOBOT_URL``, ``$CHAT_ID``; ``-u`` makes an unset one an error) and files it puts in
  the working directory (``dump.json`` from tests/data); the text itself is never edited.
- The first block (a fresh virtual environment, ``pip install -e .``) runs once in a fresh
  copy of the repository (``git ls-files``: tracked and new files, as the working tree
  holds them), with the running virtual environment taken off ``PATH``.
- The walk-through's server block runs in the background (``chatsave serve`` on
  127.0.0.1, a free port this file picks), and is stopped by its process group, the one
  this file started.
- The ``crontab`` line is checked as cron reads it (five schedule fields, no bare ``%``)
  and its command runs with ``/bin/sh -c`` in cron's environment (a temporary ``HOME``,
  a short ``PATH`` in front of which this virtual environment's ``bin`` stands for the
  full path the README asks for).
- Blocks that run the whole test suite (``.ci/run``), one test file under another
  Hypothesis profile, or the benchmark are not run (minutes each; they are this suite or
  measure the machine): what they name must exist.
- The Commands synopsis is reference text, not commands.

- The deployment blocks (the systemd unit, its environment file, the nginx proxy) are
  not run (they need a machine's systemd and nginx): they are read as systemd and
  chatsave read them, and checked against each other (see test_deployment_blocks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

import chatsave
from chatsave.remote.embedded import EmbeddedRemote
from tests.autobot_fake import FakeAutobot
from tests.conftest import DATA, ROOT, run_process
from tests.server_fixtures import free_port, wait_until
from tests.test_damaged_store import CONFIRMED, ONLY_HERE, damage, local_ids, write_jsonl

README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # this virtual environment's bin: chatsave is there
SUPPORT = DATA / "autobot-support"

# Every fenced block of the README: (heading, place under it) -> how it is checked.
TRY_IT = ("Try it (fresh machine, no server to set up)", 0)
CI_RUN = ("Run the tests", 0)
DEV_PROFILE = ("Run the tests", 1)
SYNOPSIS = ("Commands", 0)
ON_THE_SERVER = ("Two machines and a server", 0)
FIRST_LAPTOP = ("Two machines and a server", 1)
SECOND_LAPTOP = ("Two machines and a server", 2)
CRONTAB = ("Running from cron", 0)
ALERT_RULES = ("Running from cron", 1)
SUPPORT_FLOW = ("Repairing a user's chats (support flow)", 0)
BENCHMARK = ("Performance", 0)
DAMAGED_STORE = ("When the store is damaged", 0)
DEPLOY_UNIT = ("Deploying it", 0)
DEPLOY_ENV = ("Deploying it", 1)
DEPLOY_PROXY = ("Deploying it", 2)
BLOCKS: dict[tuple[str, int], tuple[str, str]] = {
    TRY_IT: ("sh", "test_try_it_in_a_fresh_copy"),
    CI_RUN: ("sh", "test_blocks_not_run_name_what_exists"),
    DEV_PROFILE: ("sh", "test_blocks_not_run_name_what_exists"),
    SYNOPSIS: ("", "reference text, not run"),
    ON_THE_SERVER: ("sh", "test_two_machines_and_a_server"),
    FIRST_LAPTOP: ("sh", "test_two_machines_and_a_server"),
    SECOND_LAPTOP: ("sh", "test_two_machines_and_a_server"),
    CRONTAB: ("crontab", "test_crontab_line"),
    ALERT_RULES: ("yaml", "test_crontab_line"),
    SUPPORT_FLOW: ("sh", "test_support_flow_as_written"),
    BENCHMARK: ("sh", "test_blocks_not_run_name_what_exists"),
    DAMAGED_STORE: ("sh", "test_damaged_store_recovery_as_written"),
    DEPLOY_UNIT: ("ini", "test_deployment_blocks"),
    DEPLOY_ENV: ("dotenv", "test_deployment_blocks"),
    DEPLOY_PROXY: ("nginx", "test_deployment_blocks"),
}
TIMEOUT = 120  # seconds for one block (the fresh install has its own)


# ------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    heading: str
    place: int  # its place among the blocks under that heading, from 0
    lang: str
    line: int  # README line number of its first line of text
    text: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.heading, self.place)


@dataclass(frozen=True)
class Command:
    """One command of a block: a line, or lines a trailing backslash joins."""

    line: int
    text: str
    expect: int  # the exit code its comment notes (``# ... exit N``), else 0


FENCE = re.compile(r"^```\s*([\w-]*)\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
EXIT_NOTE = re.compile(r"(?:^|\s)#[^\n]*?\bexit (\d+)\b")


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block, named by the nearest heading above it."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    heading, count = "", 0
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            title = HEADING.match(lines[i])
            if title:
                heading, count = title.group(1), 0
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README line {i + 1}: a fence that is never closed"
        blocks.append(Block(heading, count, fence.group(1), i + 2,
                            "\n".join(lines[i + 1:end]) + "\n"))
        count += 1
        i = end + 1
    return blocks


def block(key: tuple[str, int]) -> Block:
    found = [b for b in readme_blocks() if b.key == key]
    assert len(found) == 1, f"README has no block {key}"
    return found[0]


def commands(blk: Block) -> list[Command]:
    """The block's commands in order; comment lines and blank lines are prose."""
    out: list[Command] = []
    lines = blk.text.splitlines()
    i = 0
    while i < len(lines):
        start = i
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            i += 1
            continue
        while lines[i].endswith("\\") and i + 1 < len(lines):
            i += 1
        text = "\n".join(lines[start:i + 1])
        note = EXIT_NOTE.search(text)
        out.append(Command(blk.line + start, text, int(note.group(1)) if note else 0))
        i += 1
    return out


# A failing line ends the block (-e) and the EXIT trap names it; a line noted with another
# exit code runs under +e and is checked. A line is also checked after it ran, since -e
# does not stop on a failure before the last && of a list.
PRELUDE = """\
set -euo pipefail
__readme_line=0
trap '__rc=$?; if [ "$__rc" -ne 0 ] && [ "$__rc" -ne 99 ]; then
  echo "README line $__readme_line: exit $__rc, the README says exit 0" >&2; fi' EXIT
__readme_check() {
  if [ "$3" -ne "$2" ]; then
    echo "README line $1: exit $3, the README says exit $2" >&2
    exit 99
  fi
}
"""


def script(blk: Block) -> str:
    """The block as a bash script: each command as written, then the check of its exit."""
    parts = [PRELUDE]
    for cmd in commands(blk):
        if cmd.expect == 0:
            parts.append(f"__readme_line={cmd.line}\n{cmd.text}\n"
                         f"__readme_check {cmd.line} 0 $?\n")
        else:
            parts.append(f"__readme_line={cmd.line}\nset +e\n{cmd.text}\n"
                         f"__readme_check {cmd.line} {cmd.expect} $?\nset -e\n")
    return "".join(parts)


# ------------------------------------------------------------------------------- running


def block_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without chatsave's settings, with this virtual environment's bin
    first on PATH, CHATSAVE_HOME and HOME in ``home``, and the placeholders given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHATSAVE_", "PYTEST_", "HYPOTHESIS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CHATSAVE_HOME"] = str(home / "chatsave")
    env["HOME"] = str(home)
    env.update(extra)
    return env


def _script_file(blk: Block, cwd: Path) -> Path:
    path = cwd.parent / f".readme-line-{blk.line}.sh"
    path.write_text(script(blk), encoding="utf-8")
    return path


def _stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group this test started (its pid), SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def run_block(blk: Block, cwd: Path, env: dict[str, str],
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a block to its end; fail with its output when a line's exit is not the noted one."""
    proc = subprocess.Popen(["bash", str(_script_file(blk, cwd))], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"README block {blk.key} ran over {timeout} s\n{err[-3000:]}")
    ran = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert ran.returncode == 0, f"README block {blk.key}:\n{err[-3000:]}"
    return ran


@contextlib.contextmanager
def background_block(blk: Block, cwd: Path, env: dict[str, str]
                     ) -> Iterator[subprocess.Popen[bytes]]:
    """Start a block whose last command runs until stopped; stop its process group after."""
    log = cwd.parent / f".readme-line-{blk.line}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(_script_file(blk, cwd))], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        yield proc
    finally:
        _stop_group(proc)
        proc.wait(10)


def log_of(blk: Block, cwd: Path) -> str:
    return (cwd.parent / f".readme-line-{blk.line}.log").read_text(errors="replace")


# --------------------------------------------------------------------------------- tests


def test_every_readme_block_is_known() -> None:
    """A block this file does not know fails here, until it gets its check."""
    found = {b.key: b for b in readme_blocks()}
    unknown = [f"{key} at README line {b.line}" for key, b in found.items() if key not in BLOCKS]
    assert not unknown, f"README blocks no test runs (add each to BLOCKS): {unknown}"
    assert not BLOCKS.keys() - found.keys(), "blocks BLOCKS names that the README lacks"
    assert {key: b.lang for key, b in found.items()} == {
        key: lang for key, (lang, _how) in BLOCKS.items()}


def test_readme_parsing_reads_commands_and_exit_notes() -> None:
    text = ("## A\n\n```sh\n# prose\nchatsave one \\\n    --two   # 1. exit 4: noted\n"
            "chatsave diff --all    # 2. no note\n\n```\n\n```\nsynopsis\n```\n## B\n"
            "```crontab\n* * * * * x\n```\n")
    a, synopsis, b = readme_blocks(text)
    assert (a.key, a.lang, a.line) == (("A", 0), "sh", 4)
    assert (synopsis.key, synopsis.lang) == (("A", 1), "")
    assert (b.key, b.lang, b.text) == (("B", 0), "crontab", "* * * * * x\n")
    assert commands(a) == [
        Command(5, "chatsave one \\\n    --two   # 1. exit 4: noted", 4),
        Command(7, "chatsave diff --all    # 2. no note", 0)]


@pytest.mark.parametrize(("line", "ok"), [
    ("true", True), ("false", False), ("false && true", False),  # -e alone lets this by
    ("(exit 4)  # exit 4", True), ("true  # exit 1", False), ("(exit 3)  # exit 4", False),
    ('echo "$UNSET_PLACEHOLDER"', False)])
def test_a_line_must_exit_as_noted(tmp_path: Path, line: str, ok: bool) -> None:
    """Each line of a block must exit as its note says; the block stops at one that does not."""
    blk = Block("T", 0, "sh", 1, f"{line}\ntouch reached\n")
    (tmp_path / "w").mkdir()
    ran = subprocess.run(["bash", str(_script_file(blk, tmp_path / "w"))], cwd=tmp_path / "w",
                         env={"PATH": os.environ["PATH"]}, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=30)
    assert (ran.returncode == 0) is ok, ran.stderr
    assert (tmp_path / "w" / "reached").exists() is ok
    if not ok:
        assert "README line 1: exit" in ran.stderr


def _fresh_copy(dest: Path) -> None:
    """The repository as the working tree holds it: tracked and new files, not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True, timeout=60).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name, follow_symlinks=False)


def test_try_it_in_a_fresh_copy(tmp_path: Path) -> None:
    """The first block, in a fresh copy: a new virtual environment, pip install -e . (which
    reuses pip's cache: HOME stays), the sample dump, a save, status. About 30 s."""
    copy = tmp_path / "chatsave"
    copy.mkdir()
    _fresh_copy(copy)
    env = block_env(tmp_path / "home")
    env["HOME"] = os.environ.get("HOME", env["HOME"])
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if p and Path(p).resolve() != BIN.resolve())
    run_block(block(TRY_IT), copy, env, timeout=240)
    assert (copy / ".venv" / "bin" / "chatsave").exists()
    assert (copy / ".demo" / "store.db").exists() and (copy / ".demo" / "backend.db").exists()
    status = run_process("status", "--json", env={**env, "CHATSAVE_HOME": str(copy / ".demo")})
    info = next(e for e in map(json.loads, status.stdout.splitlines()) if e["type"] == "status")
    assert (info["chats"], info["messages"]) == (8, 21), status.stdout
    assert info["backends"][0]["pending_push"] == 0


def test_blocks_not_run_name_what_exists() -> None:
    """.ci/run (the whole suite: this file is part of it), the state machine under the dev
    profile and the benchmark take minutes; they are not run here. What they name must
    exist: each path (the virtual environment .ci/run makes aside) and the profile."""
    from hypothesis import settings

    for key in (CI_RUN, DEV_PROFILE, BENCHMARK):
        cmds = commands(block(key))
        assert cmds, key
        for cmd in cmds:
            assert cmd.expect == 0
            for word in shlex.split(cmd.text, comments=True):
                name, eq, value = word.partition("=")
                if eq and name == "HYPOTHESIS_PROFILE":
                    settings.get_profile(value)  # raises for a profile never registered
                elif "/" in word and not word.startswith(".venv/"):
                    assert (ROOT / word).exists(), (key, word)
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_two_machines_and_a_server(tmp_path: Path) -> None:
    """The walk-through: a real chatsave serve with a tokens file on 127.0.0.1, then the
    two laptops' blocks, each with its own store, in its own directory."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    places = {name: tmp_path / name / "work" for name in ("server", "laptop1", "laptop2")}
    for place in places.values():
        place.mkdir(parents=True)
    env = {name: block_env(place.parent, SERVER_URL=url, PORT=str(port))
           for name, place in places.items()}
    serve = block(ON_THE_SERVER)

    def up() -> bool:
        if server.poll() is not None:
            return True
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    with background_block(serve, places["server"], env["server"]) as server:
        wait_until(up, 30, "the README's chatsave serve to answer")
        assert server.poll() is None, log_of(serve, places["server"])
        token = places["server"] / "alice.token"
        assert token.stat().st_mode & 0o777 == 0o600
        assert (places["server"] / "tokens.json").stat().st_mode & 0o777 == 0o600
        for laptop in ("laptop1", "laptop2"):  # "Copy alice.token to both laptops"
            shutil.copy2(token, places[laptop] / "alice.token")

        run_block(block(FIRST_LAPTOP), places["laptop1"], env["laptop1"])
        second = run_block(block(SECOND_LAPTOP), places["laptop2"], env["laptop2"])

        assert server.poll() is None, log_of(serve, places["server"])
    exported = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    assert [(m["chat_id"], m["id"], m["content"]) for m in exported] == [
        ("trip", "m1", "Book the 9:40 train")]
    for laptop in ("laptop1", "laptop2"):
        assert not (places[laptop] / "alice.token").exists()  # login ... && rm alice.token
        stored = list((places[laptop].parent / "chatsave" / "credentials").iterdir())
        assert len(stored) == 1 and stored[0].stat().st_mode & 0o777 == 0o600
    log = log_of(serve, places["server"])
    assert "Traceback" not in log and "user=alice" in log
    assert token.read_text().strip() not in log


# The wait --jitter-start asks for, stood in for: each time.sleep of the chatsave process
# is written to a file and returns at once (a line's real wait would be up to 300 s).
SITECUSTOMIZE = '''\
import os
import time


def _sleep(seconds, _log=os.environ["README_TEST_SLEEPS"]):
    with open(_log, "a") as log:
        log.write(f"{seconds}\\n")


time.sleep = _sleep
'''
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def crontab_entries(blk: Block) -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    """(environment lines, [(the five schedule fields, the command as sh gets it)])."""
    env: dict[str, str] = {}
    jobs: list[tuple[list[str], str]] = []
    for line in blk.text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assignment = re.match(r"^\s*([A-Za-z_]\w*)\s*=\s*(.*)$", line)
        if assignment:
            env[assignment.group(1)] = assignment.group(2).strip().strip("\"'")
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6, f"not a crontab line: {line!r}"
        assert all(CRON_FIELD.match(f) for f in fields[:5]), fields[:5]
        # cron turns a bare % into a newline (the rest is stdin); \% is a %
        assert re.search(r"(?<!\\)%", fields[5]) is None, "a bare % in a crontab command"
        jobs.append((fields[:5], fields[5].replace("\\%", "%")))
    return env, jobs


@dataclass
class CronRun:
    """The crontab command run once, in its own HOME."""

    ran: subprocess.CompletedProcess[str]
    home: Path
    waits: list[float]  # the time.sleep calls of chatsave, in seconds

    @property
    def summary(self) -> dict[str, Any]:
        lines = (self.home / "chatsave.jsonl").read_text().splitlines()
        last: dict[str, Any] = json.loads(lines[-1])
        assert last["type"] == "summary" and last["command"] == "save", lines
        return last

    @property
    def log(self) -> str:
        return (self.home / "chatsave.log").read_text()


def run_cron(command: str, cron_env: dict[str, str], home: Path, site: Path,
             remote: str | None, pending: bool) -> CronRun:
    """Run ``command`` as cron would for a user whose config file names ``remote`` (none:
    no config file) and whose store holds one pending message (``pending``)."""
    (home / ".config" / "chatsave").mkdir(parents=True)
    if remote is not None:
        (home / ".config" / "chatsave" / "config.toml").write_text(
            f"remote = {json.dumps(remote)}\n")
    sleeps = home / "sleeps"
    env = {"HOME": str(home), "LOGNAME": "cron", "SHELL": "/bin/sh",
           "PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", **cron_env,
           "PYTHONPATH": str(site), "README_TEST_SLEEPS": str(sleeps)}
    if pending:
        line = json.dumps({"chat_id": "trip", "id": "m1", "role": "user", "content": "hi",
                           "created_at": "2026-03-01T09:00:00Z"})
        ran = run_process("import", "-", env={**env, "README_TEST_SLEEPS": os.devnull},
                          input=line + "\n")
        assert ran.returncode == 0, ran.stderr
    ran = subprocess.run(["/bin/sh", "-c", command], cwd=home, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=TIMEOUT)
    waits = [float(x) for x in sleeps.read_text().split()] if sleeps.exists() else []
    return CronRun(ran, home, waits)


def prometheus_samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A metrics file as Prometheus reads it (prometheus-client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text())
            for s in family.samples}


def assert_alert_rules_use(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
                           ) -> None:
    """The README's alert rules are a Prometheus rules file whose expressions name series
    the metrics file holds (metric and labels), and whose exit-code rule stays quiet on
    exactly the codes the crontab line leaves to the next run."""
    import yaml

    doc = yaml.safe_load(block(ALERT_RULES).text)
    rules = [r for group in doc["groups"] for r in group["rules"]]
    assert {r["alert"] for r in rules} == {"ChatsaveNotSaved", "ChatsaveNeedsAPerson"}
    for rule in rules:
        for name, labels in re.findall(r"(chatsave_\w+)\{([^}]*)\}", rule["expr"]):
            wanted = tuple(sorted(tuple(p.split("=")) for p in labels.replace('"', "")
                                  .split(",")))
            assert (name, wanted) in metrics, (name, wanted)
    quiet = {int(code) for code in re.findall(r"!= (\d+)", rules[1]["expr"])}
    crontab_quiet = re.search(r"case \$\? in ([\d|]+)\)", block(CRONTAB).text)
    assert crontab_quiet is not None
    assert quiet | {0, 1} == {int(c) for c in crontab_quiet.group(1).split("|")} | {0}


def test_crontab_line(tmp_path: Path) -> None:
    """The crontab line's command, as cron runs it (/bin/sh, HOME, a short PATH), with the
    remote in ~/.config/chatsave/config.toml as the README says (no CHATSAVE_HOME, as under
    cron), in three situations: saved (silent, exit 0 logged); the backend unreachable
    (exit 8: silent, the next run resumes); no remote (exit 2: one line, which cron mails)."""
    cron_env, jobs = crontab_entries(block(CRONTAB))
    assert len(jobs) == 1
    _schedule, command = jobs[0]
    assert "--jitter-start" in command
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)

    # saved: nothing for cron to mail; the summary and the human text in the logs
    saved = run_cron(command, cron_env, tmp_path / "saved", site,
                     remote=str(tmp_path / "backend.db"), pending=True)
    assert (saved.ran.returncode, saved.ran.stdout, saved.ran.stderr) == (0, "", "")
    assert saved.summary["exit_code"] == 0 and saved.summary["written"] == 1
    assert "saved 1 message" in saved.log
    assert saved.waits and 0 <= saved.waits[0] <= 300  # the jitter, first of all
    metrics = prometheus_samples(saved.home / "chatsave.prom")
    assert metrics[("chatsave_command_exit_code", (("command", "save"),))] == 0
    assert metrics[("chatsave_command_summary", (("command", "save"), ("field", "written")))] == 1
    assert_alert_rules_use(metrics)

    # the backend unreachable: rerun later, which the next cron run does; silent
    down = run_cron(command, cron_env, tmp_path / "down", site,
                    remote=f"http://127.0.0.1:{free_port()}", pending=True)
    assert (down.ran.returncode, down.ran.stdout, down.ran.stderr) == (0, "", "")
    assert down.summary["exit_code"] == 8
    assert "error:" in down.log
    down_metrics = prometheus_samples(down.home / "chatsave.prom")
    assert down_metrics[("chatsave_command_exit_code", (("command", "save"),))] == 8
    assert ("chatsave_command_last_success_timestamp_seconds", (("command", "save"),)) \
        not in down_metrics, "never succeeded there: the alert on the last success fires"

    # a person must look (no remote configured): one line on stdout, which cron mails
    lost = run_cron(command, cron_env, tmp_path / "no-remote", site, remote=None,
                    pending=False)
    assert (lost.ran.returncode, lost.ran.stderr) == (0, "")
    assert lost.ran.stdout == "chatsave save: exit 2, see ~/chatsave.log\n"
    assert lost.summary["exit_code"] == 2
    assert "hint:" in lost.log


def test_support_flow_as_written(tmp_path: Path, start_server: Any) -> None:
    """The support flow block against the fake AutoBot (its server in Berlin time), with the
    user's dump.json from tests/data/autobot-support and $CHAT_ID the chat with copies."""
    chats = Path(shutil.copytree(SUPPORT / "chats", tmp_path / "chats"))
    fake = FakeAutobot(chats, tz=ZoneInfo("Europe/Berlin")).serve(start_server)
    work = tmp_path / "support" / "work"
    work.mkdir(parents=True)
    shutil.copy2(SUPPORT / "dump.json", work / "dump.json")
    s, t = "9b0c6c1e-5f5e-4a8e-9d55-2f6f0a3f1c7d", "c2d3e4f5-6a7b-4c8d-9e0f-1a2b3c4d5e6f"

    run_block(block(SUPPORT_FLOW), work,
              block_env(work.parent, AUTOBOT_URL=fake.url, CHAT_ID=s))

    def mid(n: int) -> str:
        return f"a1b2c3d4-0000-4000-8000-{n:012d}"

    assert [m["id"] for m in fake.stored(s)] == [mid(n) for n in (1, 2, 3, 4, 7)]
    assert [m["id"] for m in fake.stored(t)] == [mid(8), mid(9)]
    image = json.loads((work / "restore.json").read_text())
    state = json.loads(image["autobot-chat-store"])
    kept = {m["id"] for session in state["sessions"] for m in session["messages"]}
    assert kept == {mid(n) for n in (1, 2, 3, 4, 7, 8, 9)}  # 5 MB holds all, no copy
    page = (work / "report.html").read_text()  # step 2's page for the ticket
    assert page.startswith("<!DOCTYPE html>") and f'data-chat="{s}"' in page
    texts = [m["content"] for c in state["sessions"] for m in c["messages"]
             if isinstance(m.get("content"), str) and len(m["content"]) > 12]
    assert texts and not any(t in page for t in texts), "no message text in the page"


def test_damaged_store_recovery_as_written(tmp_path: Path) -> None:
    """The recovery block on a store with a damaged page of messages: 60 messages the
    backend confirmed, 6 only in the store. Everything ends in the new store and on the
    backend: the confirmed ones through sync, the others through salvage and save."""
    work = tmp_path / "work"
    work.mkdir()
    env = block_env(tmp_path)

    def chatsave(*args: str) -> None:
        done = subprocess.run([str(BIN / "chatsave"), *args, "--store", "store.db"], cwd=work,
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.stderr)

    chatsave("import", str(write_jsonl(tmp_path / "a.jsonl", CONFIRMED)))
    chatsave("save", "--all", "--remote", "./backend.db")
    chatsave("import", str(write_jsonl(tmp_path / "b.jsonl", ONLY_HERE)))
    damage(work / "store.db", "page")

    run_block(block(DAMAGED_STORE), work, env)

    everything = {(m["chat_id"], m["id"]) for m in CONFIRMED + ONLY_HERE}
    assert local_ids(work / "store.db") == everything
    with EmbeddedRemote(work / "backend.db") as backend:
        held = {(c, m.id) for c in {k[0] for k in everything}
                for m in backend.messages(c, limit=1000).messages}
    assert held == everything


def test_changelog_names_this_version() -> None:
    """pyproject.toml, chatsave.__version__ and the CHANGELOG's latest entry agree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == chatsave.__version__
    entries = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert entries and entries[0] == chatsave.__version__


def test_deployment_blocks() -> None:
    """The unit, its environment file and the proxy agree with each other and with
    chatsave: the unit parses as an INI file with systemd's sections; its ExecStart is a
    ``chatsave serve`` line chatsave's own parser accepts (the flags exist, the values
    fit), on a loopback address, with a metrics address that parses; the environment
    file sets the variable ``--db`` reads, to a PostgreSQL URL; the proxy forwards to the
    unit's address, passes a request id, and lets bodies above the server's limit through;
    the unit gives the server's graceful stop the time it takes."""
    import configparser

    from typer.main import get_command

    from chatsave.backend.settings import ServerSettings
    from chatsave.backend.storage import is_postgres_url
    from chatsave.cli.app import app
    from chatsave.netaddr import is_loopback
    from chatsave.server.run import parse_metrics_address

    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(block(DEPLOY_UNIT).text)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/") and argv[0].endswith("/bin/chatsave"), argv[0]
    assert argv[1] == "serve"
    serve = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    params = serve.make_context("serve", argv[2:]).params
    assert is_loopback(params["host"]), "behind the proxy, on loopback"
    assert is_loopback(parse_metrics_address(params["metrics_address"])[0])
    assert params["log_format"] == "json" and params["workers"] > 1
    text = README.read_text(encoding="utf-8")
    assert f"--tokens {params['tokens']}`" in text, "the prose mints the unit's tokens file"
    assert f"(`{service['EnvironmentFile']}`" in text, "the prose names the unit's env file"
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 10

    env = dict(line.split("=", 1) for line in block(DEPLOY_ENV).text.splitlines()
               if line.strip())
    db = next(p for p in serve.params if p.name == "db")
    assert list(env) == [db.envvar, "PGPASSWORD"] and is_postgres_url(env[db.envvar])
    assert "@" in env[db.envvar] and ":" not in env[db.envvar].split("//")[1].split("@")[0], \
        "no password in the URL: libpq reads PGPASSWORD"
    assert "--db" not in argv, "the password stays off the command line"

    proxy = block(DEPLOY_PROXY).text
    assert f"proxy_pass http://{params['host']}:{params['port']};" in proxy
    limit = re.search(r"client_max_body_size (\d+)m;", proxy)
    assert limit is not None and int(limit.group(1)) * 2**20 > ServerSettings().max_body_bytes
    assert "proxy_set_header X-Request-Id $request_id;" in proxy
