#!/usr/bin/env python3
"""chatsave benchmark (issue 8): chatsave against the storage floor and the naive client.

Run from the repository root:

    .venv/bin/python tests/benchmarks/run.py [--quick] [--reps N] [--json results.json]

Self-contained: it generates a seeded workload (JSONL files), starts its own ``chatsave
serve`` processes on 127.0.0.1 (each over a fresh SQLite file in its own temporary
directory), drives the real ``chatsave`` CLI in subprocesses with ``CHATSAVE_HOME`` pointed
at temporary directories (the user's own store and config are never touched), stops every
process it started by pid, and removes its temporary directories.

Cases (every repetition runs them all, in a rotated order, so that machine noise spreads
evenly over them):

1. floor       100,000 messages written straight into a SQLite file in this process (WAL,
               synchronous=FULL, one transaction per chat, executemany, INSERT OR IGNORE
               on the primary key); only the writes are timed (messages are pre-parsed);
2. naive       one HTTP request per message, sequentially (protocol v1 save of one message
               with its own Idempotency-Key, httpx with keep-alive), 5,000 messages, to a
               fresh ``chatsave serve``; a 429 is waited out (Retry-After) and retried;
3. save        ``chatsave save --all`` of the 100,000 messages from a store where they were
               imported (untimed), to a fresh server database;
4. resave      a second fresh store holding the same messages saves them to that, now
               populated, server;
5. diff/sync   no-change ``chatsave diff --all`` and ``chatsave sync --all`` over 1,000
               chats (the 100,000-message set) and 10,000 chats (3 messages each), stores
               already in agreement with their server;
6. big chat    one chat of 100,000 messages: ``save --all`` to a fresh server, then
               ``diff --all`` after one local-only message was imported (untimed), so that
               the digests differ and diff must walk the whole chat on both sides;
7. version     ``chatsave --version`` start-up time (one run after every case).

How things are measured:

- every chatsave process runs under a tiny launcher (``python -I -S``, a few MB; see
  LAUNCHER below) that spawns it, waits for it and reports:
- wall time: ``time.perf_counter`` in the launcher, from spawning chatsave to its exit;
- peak RSS: ``ru_maxrss`` of ``os.wait4(chatsave_pid)`` in the launcher: the peak resident
  set of exactly that process, in KiB on Linux. (Not measured from this benchmark process:
  a child's maxrss starts at its parent's high-water mark, inherited through fork/exec,
  and this process holds the workload);
- CPU per message (save, re-save): the client's user + system time from the launcher's
  ``wait4`` rusage, the server's from ``/proc/PID/stat`` before and after the command
  (one worker: the process started serves), each divided by the messages saved;
- store size: the store's files after ``save --all`` against the JSONL they were imported
  from (the workload carries AutoBot-like metadata on most replies);
- HTTP requests: counted on the server side, exactly, from the server's access log
  (``--log-level info``: one line per request, status included). Before and after each
  measured command the benchmark sends a marker request (``GET /_benchmark/mark-UUID``,
  404) and counts the lines between the two markers. 429 answers (rate limit) are counted
  separately and reported.

Exit status: 0 when every measurement ran as expected (goals missed or not); 1 when a
command failed or answered unexpectedly (the table and the JSON list the problems).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JSON = REPO / "tests" / "benchmarks" / "results-latest.json"
SCHEMA_VERSION = 1
MB = 1024 * 1024


# -- sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    chats: int            # main set: chats x per_chat messages (floor, save, resave, diff 1k)
    per_chat: int
    naive: int            # messages sent one request each (the first ones of the main set)
    wide_chats: int       # the many-chats set for no-change diff/sync
    wide_per_chat: int
    big: int              # messages of the one big chat
    reps: int
    content_chars: int = 150
    #: time --version and status after every case (else once per repetition)
    startup_after_each: bool = True
    #: one untimed diff and sync over HTTP on the fixtures before the repetitions
    warm_fixtures: bool = True

    @property
    def main_messages(self) -> int:
        return self.chats * self.per_chat


FULL = Sizes(chats=1000, per_chat=100, naive=5000, wide_chats=10_000, wide_per_chat=3,
             big=100_000, reps=3)
QUICK = Sizes(chats=100, per_chat=50, naive=300, wide_chats=1000, wide_per_chat=2,
              big=5_000, reps=2)
TINY = Sizes(chats=20, per_chat=10, naive=40, wide_chats=60, wide_per_chat=2, big=500,
             reps=1, startup_after_each=False, warm_fixtures=False)


#: ``python -c`` running the chatsave CLI with every compared chat read whole (the path
#: before buckets, and the one a server without them gets): the big chat's baseline
WHOLE_CHAT = ("import sys; import chatsave.ops.compare as c; c.BUCKETS_FROM = 10 ** 9; "
              "from chatsave.cli import main; main(sys.argv[1:])")


# -- the workload ---------------------------------------------------------------------------

_WORD_TEXT = (
    "the a an and or but so chat save saved message messages server client store backend "
    "sync diff batch retry quick brown fox jumps over lazy dog hello world please thanks "
    "could you explain why how what when where which answer question again later today "
    "tomorrow yesterday data file line error fixed works broken network timeout request "
    "reply page memory disk fast slow small large simple exactly maybe sure yes no okay"
)
WORDS = tuple(_WORD_TEXT.split())
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _iso(ms: int) -> str:
    t = EPOCH + dt.timedelta(milliseconds=ms)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _content(rnd: random.Random, chars: int) -> str:
    target = chars + rnd.randint(-10, 10)
    words: list[str] = []
    size = -1
    while size < target:
        w = rnd.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    text = " ".join(words)[:target].rstrip()
    return text[0].upper() + text[1:] + "."


def _metadata(rnd: random.Random, role: str) -> dict[str, Any]:
    """What AutoBot puts on messages (docs/autobot.md; the shapes of
    tests/data/autobot-support): most replies carry a few keys, some terminal output one,
    user messages none."""
    if role == "user":
        return {}
    draw = rnd.random()
    if draw < 0.6:
        return {"version": rnd.randint(1, 40), "model": rnd.choice(["gpt-4", "gpt-4o"]),
                "tokens": rnd.randint(8, 900), "duration": round(rnd.uniform(0.2, 9.0), 2)}
    if draw < 0.75:
        return {"terminal_session_id": f"t-{rnd.randint(1, 99)}"}
    return {}


def _messages(rnd: random.Random, chat_id: str, count: int, start_ms: int,
              step_ms: int, chars: int) -> Iterator[dict[str, Any]]:
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        yield {
            "chat_id": chat_id,
            "id": str(uuid.UUID(int=rnd.getrandbits(128), version=4)),
            "role": role,
            "content": _content(rnd, chars),
            "created_at": _iso(start_ms + i * step_ms + rnd.randrange(step_ms // 2)),
            "type": "message",
            "metadata": _metadata(rnd, role),
        }


def _dump(msg: dict[str, Any]) -> str:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Workload:
    main: Path
    wide: Path
    big: Path
    big_extra: Path
    floor_chats: list[list[tuple[str, ...]]]   # per chat: rows for the floor
    naive_lines: list[str]                      # wire JSON of the naive subset
    main_bytes_avg: float
    big_chat_id: str


def generate(directory: Path, sizes: Sizes, seed: int) -> Workload:
    """Write the seeded JSONL files once; keep the floor rows and naive lines in memory."""
    rnd = random.Random(seed)
    floor_chats: list[list[tuple[str, ...]]] = []
    naive_lines: list[str] = []
    total_bytes = 0
    main = directory / "main.jsonl"
    with main.open("w", encoding="utf-8") as out:
        for c in range(sizes.chats):
            rows: list[tuple[str, ...]] = []
            chat_id = f"chat-{c:05d}"
            for msg in _messages(rnd, chat_id, sizes.per_chat, c * 60_000, 7_000,
                                 sizes.content_chars):
                line = _dump(msg)
                total_bytes += len(line.encode("utf-8"))
                out.write(line + "\n")
                rows.append((msg["chat_id"], msg["id"], msg["role"], msg["content"],
                             msg["created_at"], msg["type"],
                             json.dumps(msg["metadata"], sort_keys=True)))
                if len(naive_lines) < sizes.naive:
                    naive_lines.append(line)
            floor_chats.append(rows)
    wide = directory / "wide.jsonl"
    with wide.open("w", encoding="utf-8") as out:
        for c in range(sizes.wide_chats):
            for msg in _messages(rnd, f"wide-{c:05d}", sizes.wide_per_chat, c * 60_000,
                                 7_000, sizes.content_chars):
                out.write(_dump(msg) + "\n")
    big = directory / "big.jsonl"
    big_chat_id = "big-00000"
    with big.open("w", encoding="utf-8") as out:
        for msg in _messages(rnd, big_chat_id, sizes.big, 0, 1_000, sizes.content_chars):
            out.write(_dump(msg) + "\n")
    big_extra = directory / "big-extra.jsonl"
    extra = next(_messages(rnd, big_chat_id, 1, sizes.big * 1_000 + 60_000, 1_000,
                           sizes.content_chars))
    extra["id"] = "local-only-extra-message"
    big_extra.write_text(_dump(extra) + "\n", encoding="utf-8")
    return Workload(main, wide, big, big_extra, floor_chats, naive_lines,
                    total_bytes / max(1, sizes.main_messages), big_chat_id)


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    """The environment of every child: no CHATSAVE_* from the caller, our own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSAVE_")}
    env["CHATSAVE_HOME"] = str(home)
    env.pop("NO_COLOR", None)
    return env


@dataclass
class Ran:
    """One child process: wall time, exit code, peak RSS, parsed summary."""

    args: list[str]
    seconds: float
    exit_code: int
    maxrss_kib: int
    summary: dict[str, Any] | None
    stderr_tail: str
    cpu_s: float = 0.0

    @property
    def rss_mb(self) -> float:
        return self.maxrss_kib * 1024 / MB


#: The launcher every measured chatsave process runs under (``python -I -S -c``: a few MB).
#: Why not spawn chatsave directly and read ``os.wait4``'s ``ru_maxrss``: on Linux a
#: process's maxrss starts at the high-water mark of the address space it had before exec,
#: i.e. the parent's (fork copies it; vfork shares it), so every child of this benchmark
#: process (which holds the workload, ~100+ MB) would report at least the benchmark's own
#: peak. Under this small launcher the pre-exec part is the launcher's few MB, below any
#: chatsave process, so ``ru_maxrss`` from ``wait4`` is chatsave's own peak. The launcher
#: also times the child (spawn to exit, its own start-up excluded), enforces the timeout
#: (SIGKILL by pid), and forwards SIGTERM/SIGINT to the child.
LAUNCHER = r"""
import json, os, select, signal, sys, time
result, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
started = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
def forward(signum, frame):
    os.kill(pid, signum)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
timed_out = False
try:
    fd = os.pidfd_open(pid)
except (AttributeError, OSError):
    fd = -1
if fd >= 0:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        try:
            ready = poller.poll(max(0.0, timeout - (time.perf_counter() - started)) * 1000)
        except InterruptedError:
            continue
        if not ready and time.perf_counter() - started >= timeout:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            continue
        if ready:
            break
ended = time.perf_counter()
_, status, usage = os.wait4(pid, 0)
if fd < 0:
    ended = time.perf_counter()
code = os.waitstatus_to_exitcode(status)
with open(result, "w") as f:
    json.dump({"seconds": ended - started, "exit_code": code, "maxrss_kib": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime, "timed_out": timed_out}, f)
sys.exit(code if 0 <= code < 256 else 125)
"""


def run_child(argv: list[str], env: dict[str, str], out: Path, err: Path, timeout: float,
              running: list[subprocess.Popen[bytes]]) -> tuple[float, int, int, float]:
    """Run argv under the launcher; return (wall seconds, exit code, peak RSS KiB, CPU
    seconds: user + system of the chatsave process, from wait4's rusage).

    The launcher is listed in ``running`` while it runs, so that an interrupted benchmark
    stops it (by pid; it forwards the signal to chatsave)."""
    result = out.with_suffix(".rusage.json")
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), str(timeout), *argv]
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                env=env)
    running.append(proc)
    try:
        proc.wait(timeout + 60)
    except subprocess.TimeoutExpired:  # the launcher itself hangs: should never happen
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.returncode is not None:
            with contextlib.suppress(ValueError):  # already removed by an interruption
                running.remove(proc)
    try:
        facts = json.loads(result.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"the launcher of {argv} reported nothing "
                           f"(exit {proc.returncode})") from exc
    finally:
        result.unlink(missing_ok=True)
    code = int(facts["exit_code"])
    if facts["timed_out"]:
        code = -int(signal.SIGKILL)
    return float(facts["seconds"]), code, int(facts["maxrss_kib"]), float(facts["cpu_s"])


ACCESS = re.compile(r"chatsave\.server\.access: (?P<method>[A-Z]+) (?P<path>\S+) "
                    r"(?P<status>\d{3}) ")


class Server:
    """One ``chatsave serve`` process over its own SQLite file in its own directory."""

    def __init__(self, bench: Bench, directory: Path, db: Path | None = None) -> None:
        self.bench = bench
        self.dir = directory
        self.db = db or directory / "server.db"
        self.log = directory / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_cpu_s = 0.0  # CPU the server spent during the last measured command
        self.url = ""

    def start(self) -> Server:
        self.dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            argv = [self.bench.chatsave, "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--db", str(self.db), "--log-level", "info"]
            if self.bench.args.server_rate_limit is not None:
                argv += ["--rate-limit", f"{self.bench.args.server_rate_limit:g}"]
            shown = {str(port): "PORT", str(self.db): "DB"}
            self.bench.server_argv = [shown.get(a, a) for a in argv]
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT,
                                             env=clean_env(self.dir / "home"))
            self.bench.processes.append(self.proc)
            if self._wait_ready(30.0):
                return self
            self.stop()
            if attempt == 2:
                break
        raise RuntimeError(f"chatsave serve did not start; its log ends:\n{self._tail()}")

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far (/proc/PID/stat;
        one worker: the serving process is the one started)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2.0).status_code == 200:
                    return True
            time.sleep(0.05)
        return False

    def _tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ValueError):
            self.bench.processes.remove(proc)

    # request counting -----------------------------------------------------------------

    def mark(self) -> int:
        """Send a marker request; return the index of its access-log line once written."""
        path = f"/_benchmark/mark-{uuid.uuid4().hex}"
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(self.url + path, timeout=10.0)
        needle = f" {path} "
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for i, line in enumerate(self._access_lines()):
                if needle in line:
                    return i
            time.sleep(0.01)
        raise RuntimeError(f"marker request {path} never reached the access log of {self.url}")

    def _access_lines(self) -> list[str]:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return [line for line in text.splitlines() if ACCESS.search(line)]

    def requests_between(self, begin: int, end: int) -> Counter[int]:
        """Requests (by status) logged strictly between two marker lines."""
        counts: Counter[int] = Counter()
        for line in self._access_lines()[begin + 1:end]:
            m = ACCESS.search(line)
            if m:
                counts[int(m.group("status"))] += 1
        return counts


# -- the benchmark --------------------------------------------------------------------------


def store_bytes(home: Path) -> int:
    """Bytes of a CHATSAVE_HOME's store files (the database, its WAL and shared memory)."""
    return sum(p.stat().st_size for p in home.glob("store.db*") if p.is_file())



@dataclass
class Case:
    name: str
    label: str
    unit: str                      # the headline metric's unit
    metric: str                    # key of the headline metric in a sample
    higher_is_better: bool
    samples: list[dict[str, Any]] = field(default_factory=list)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.sizes: Sizes = args.sizes
        self.chatsave = args.chatsave
        self.processes: list[subprocess.Popen[bytes]] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.server_argv: list[str] = []
        self.setup_info: dict[str, Any] = {}
        self.stopping = False
        self._n = itertools.count(1)  # thread-safe enough: setup runs two threads
        self.root = Path(tempfile.mkdtemp(prefix="chatsave-bench-", dir=args.tmpdir))
        s = self.sizes
        self.cases: dict[str, Case] = {c.name: c for c in [
            Case("floor", f"floor: SQLite direct, {s.main_messages:,} msgs", "msg/s",
                 "msgs_per_s", True),
            Case("naive", f"naive: 1 request/msg, {s.naive:,} msgs", "msg/s",
                 "msgs_per_s", True),
            Case("save", f"chatsave save --all, {s.main_messages:,} msgs", "msg/s",
                 "msgs_per_s", True),
            Case("resave", f"re-save (all already there), {s.main_messages:,} msgs",
                 "msg/s", "msgs_per_s", True),
            Case("diff_main", f"no-change diff --all, {s.chats:,} chats", "s", "seconds",
                 False),
            Case("sync_main", f"no-change sync --all, {s.chats:,} chats", "s", "seconds",
                 False),
            Case("diff_wide", f"no-change diff --all, {s.wide_chats:,} chats", "s",
                 "seconds", False),
            Case("sync_wide", f"no-change sync --all, {s.wide_chats:,} chats", "s",
                 "seconds", False),
            Case("big_save", f"big chat save --all, 1 chat x {s.big:,}", "msg/s",
                 "msgs_per_s", True),
            Case("big_diff", f"big chat diff --all (+1 local msg), 1 x {s.big:,}", "s",
                 "seconds", False),
            Case("big_diff_whole", f"  same, the whole chat read (before buckets), 1 x "
                 f"{s.big:,}", "s", "seconds", False),
            Case("version", "chatsave --version", "s", "seconds", False),
            Case("startup_cmd", "info: chatsave status --json (empty store)", "s",
                 "seconds", False),
        ]}

    # helpers ------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if not self.args.silent:
            print(f"{time.perf_counter() - self.t0:6.1f}s {text}", file=sys.stderr, flush=True)

    def cli(self, args: list[str], home: Path, *, expect: tuple[int, ...] = (0,),
            timeout: float = 600.0, what: str = "", whole: bool = False) -> Ran:
        """Run chatsave; ``whole``: with every chat compared read whole, as before buckets
        (``WHOLE_CHAT``), for a baseline in the same run."""
        if self.stopping:
            raise RuntimeError("the benchmark is stopping")
        n = next(self._n)
        out = self.root / f"cli-{n:04d}.out"
        err = self.root / f"cli-{n:04d}.err"
        argv = [str(Path(self.chatsave).with_name("python")), "-c", WHOLE_CHAT, *args] \
            if whole else [self.chatsave, *args]
        seconds, code, rss, cpu = run_child(argv, clean_env(home), out, err, timeout,
                                            self.processes)
        summary = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            lines = out.read_text(encoding="utf-8").splitlines()
            last = json.loads(lines[-1]) if lines else None
            if isinstance(last, dict) and last.get("type") == "summary":
                summary = last
        tail = "\n".join(err.read_text(errors="replace").splitlines()[-8:])
        ran = Ran(argv, seconds, code, rss, summary, tail, cpu)
        if code not in expect:
            self.problem(f"{what or ' '.join(args)}: exit code {code}, expected "
                         f"{' or '.join(map(str, expect))}; stderr ends: {tail!r}")
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return ran

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.log(f"  PROBLEM: {text}")

    def check_summary(self, ran: Ran, what: str, **expected: int) -> None:
        if ran.summary is None:
            self.problem(f"{what}: no JSON summary on stdout")
            return
        for key, want in expected.items():
            got = ran.summary.get(key)
            if got != want:
                self.problem(f"{what}: summary {key}={got!r}, expected {want}")

    def copy_home(self, template: Path, name: str) -> Path:
        target = self.root / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(template, target)
        return target

    def measured(self, server: Server, args: list[str], home: Path, *,
                 expect: tuple[int, ...] = (0,), what: str, whole: bool = False
                 ) -> tuple[Ran, Counter[int]]:
        """Run one chatsave command against ``server``; count its requests there."""
        begin = server.mark()
        cpu_before = server.cpu_s()
        ran = self.cli([*args, "--remote", server.url, "--json", "--quiet"], home,
                       expect=expect, what=what, whole=whole)
        server.last_cpu_s = server.cpu_s() - cpu_before
        end = server.mark()
        return ran, server.requests_between(begin, end)

    def sample(self, case: str, rep: int, ran: Ran | None = None,
               counts: Counter[int] | None = None, messages: int | None = None,
               **extra: Any) -> dict[str, Any]:
        s: dict[str, Any] = {"rep": rep}
        if ran is not None:
            s.update(seconds=ran.seconds, exit_code=ran.exit_code,
                     peak_rss_mb=round(ran.rss_mb, 1))
            if ran.summary is not None and "requests" in ran.summary:
                s["client_reported_requests"] = ran.summary["requests"]
        if counts is not None:
            s["requests"] = sum(counts.values())
            s["status_counts"] = {str(k): v for k, v in sorted(counts.items())}
            s["throttled_429"] = counts.get(429, 0)
            s["unavailable_503"] = counts.get(503, 0)
        if messages is not None:
            s["messages"] = messages
        s.update(extra)
        if messages is not None and s.get("seconds"):
            s["msgs_per_s"] = messages / s["seconds"]
        self.cases[case].samples.append(s)
        self._report(case, s)
        return s

    def _report(self, case: str, s: dict[str, Any]) -> None:
        bits = [f"{s['seconds']:.3f} s"]
        if "msgs_per_s" in s:
            bits.append(f"{s['msgs_per_s']:,.0f} msg/s")
        if "peak_rss_mb" in s:
            bits.append(f"RSS {s['peak_rss_mb']:.0f} MB")
        if "requests" in s:
            bits.append(f"{s['requests']} requests")
        if s.get("throttled_429"):
            bits.append(f"{s['throttled_429']} x 429")
        self.log(f"  [rep {s['rep'] + 1}] {case}: " + ", ".join(bits))

    # setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        s = self.sizes
        t0 = time.perf_counter()
        data = self.root / "data"
        data.mkdir()
        self.log(f"generating the workload (seed {self.args.seed}) in {data}")
        self.work = generate(data, s, self.args.seed)
        self.setup_info["message_json_bytes_avg"] = round(self.work.main_bytes_avg, 1)
        self.startup_home = self.root / "startup-home"
        self.cli(["--version"], self.startup_home, what="warm-up --version")
        self.cli(["status", "--json", "--quiet"], self.startup_home, what="warm-up status")

        # Template stores (copied for every repetition) and the no-change fixtures: a store
        # and a server database in agreement, made with the embedded remote (the server's
        # own storage code on the same file: the same backend_id, no rate limit on setup);
        # one untimed diff and sync over HTTP follow. Two independent chains run in
        # parallel: all of this is untimed, and mostly waits on fsync.
        self.log("importing the workload and preparing the fixtures (untimed)")
        self.tpl_main = self.root / "tpl-main"
        self.tpl_big = self.root / "tpl-big"
        self.fx: dict[str, tuple[Server, Path]] = {}
        for name in ("main", "wide"):
            server = Server(self, self.root / f"fx-{name}-server")
            server.dir.mkdir(parents=True)
            self.fx[name] = (server, self.root / f"fx-{name}-home")

        def imported(home: Path, path: Path, n: int) -> None:
            ran = self.cli(["import", str(path), "--json", "--quiet"], home,
                           what=f"import {path.name}")
            self.check_summary(ran, f"import {path.name}", written=n)
            self.setup_info[f"import_{path.stem}_s"] = round(ran.seconds, 3)

        def embedded_save(name: str, n: int) -> None:
            server, home = self.fx[name]
            ran = self.cli(["save", "--all", "--remote", str(server.db), "--json", "--quiet"],
                           home, what=f"fixture {name}: embedded save")
            self.check_summary(ran, f"fixture {name}: embedded save", written=n)
            self.setup_info[f"fixture_{name}_embedded_save_s"] = round(ran.seconds, 3)

        def chain_wide() -> None:
            imported(self.fx["wide"][1], self.work.wide, s.wide_chats * s.wide_per_chat)
            embedded_save("wide", s.wide_chats * s.wide_per_chat)

        def chain_main() -> None:
            imported(self.tpl_main, self.work.main, s.main_messages)
            self.copy_home(self.tpl_main, self.fx["main"][1].name)
            embedded_save("main", s.main_messages)
            imported(self.tpl_big, self.work.big, s.big)

        with ThreadPoolExecutor(2) as pool:
            try:
                for future in [pool.submit(chain_wide), pool.submit(chain_main)]:
                    future.result()
            except BaseException:
                self.stopping = True  # the chains start nothing more,
                self.stop_children()  # and what runs now is stopped
                raise
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Server.start, [server for server, _ in self.fx.values()]))
        for name, (server, home) in self.fx.items():
            for command in ("diff", "sync") if s.warm_fixtures else ():
                ran, counts = self.measured(server, [command, "--all"], home,
                                            what=f"fixture {name}: first {command}")
                self.setup_info[f"fixture_{name}_first_{command}"] = {
                    "seconds": round(ran.seconds, 3), "requests": sum(counts.values()),
                    "exit_code": ran.exit_code}
        self.setup_info["setup_s"] = round(time.perf_counter() - t0, 1)

    # the cases ----------------------------------------------------------------------------

    def unit_floor(self, rep: int) -> None:
        path = self.root / f"floor-{rep}.db"
        rows_total = sum(len(rows) for rows in self.work.floor_chats)
        started = time.perf_counter()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE messages (chat_id TEXT NOT NULL, id TEXT NOT NULL, "
                     "role TEXT NOT NULL, content TEXT NOT NULL, created_at TEXT NOT NULL, "
                     "type TEXT NOT NULL, metadata TEXT NOT NULL, PRIMARY KEY (chat_id, id))")
        sql = "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)"
        for rows in self.work.floor_chats:
            conn.execute("BEGIN")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        conn.close()
        seconds = time.perf_counter() - started
        check = sqlite3.connect(path)
        (count,) = check.execute("SELECT count(*) FROM messages").fetchone()
        check.close()
        if count != rows_total:
            self.problem(f"floor: {count} rows written, expected {rows_total}")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        self.sample("floor", rep, messages=rows_total, seconds=seconds)

    def unit_naive(self, rep: int) -> None:
        server = Server(self, self.root / f"naive-{rep}").start()
        try:
            begin = server.mark()
            waited = 0.0
            throttled = 0
            started = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                for line in self.work.naive_lines:
                    chat_id = line[len('{"chat_id":"'):line.index('"', 12)]
                    body = ('{"messages":[' + line + ']}').encode("utf-8")
                    headers = {"Idempotency-Key": uuid.uuid4().hex,
                               "Content-Type": "application/json"}
                    while True:
                        r = client.post(f"/api/v1/chats/{chat_id}/save", content=body,
                                        headers=headers)
                        if r.status_code != 429:
                            break
                        throttled += 1
                        pause = float(r.headers.get("Retry-After", "1"))
                        waited += pause
                        time.sleep(pause)
                    if r.status_code != 200 or len(r.json().get("saved", [])) != 1:
                        raise RuntimeError(f"naive save answered {r.status_code}: "
                                           f"{r.text[:300]}")
            seconds = time.perf_counter() - started
            counts = server.requests_between(begin, server.mark())
        finally:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
        self.sample("naive", rep, counts=counts, messages=len(self.work.naive_lines),
                    seconds=seconds, retry_after_wait_s=round(waited, 3))

    def unit_save(self, rep: int) -> None:
        n = self.sizes.main_messages
        server = Server(self, self.root / f"save-{rep}-server").start()
        homes = [self.copy_home(self.tpl_main, f"save-{rep}-home"),
                 self.copy_home(self.tpl_main, f"resave-{rep}-home")]
        try:
            ran, counts = self.measured(server, ["save", "--all"], homes[0], what="save")
            self.check_summary(ran, "save", written=n, unchanged=0)
            self.sample("save", rep, ran, counts, messages=n,
                        client_cpu_us_per_msg=ran.cpu_s / n * 1e6,
                        server_cpu_us_per_msg=server.last_cpu_s / n * 1e6,
                        store_vs_jsonl=store_bytes(homes[0]) / self.work.main.stat().st_size)
            ran, counts = self.measured(server, ["save", "--all"], homes[1], what="re-save")
            self.check_summary(ran, "re-save", written=0, unchanged=n)
            self.sample("resave", rep, ran, counts, messages=n,
                        client_cpu_us_per_msg=ran.cpu_s / n * 1e6,
                        server_cpu_us_per_msg=server.last_cpu_s / n * 1e6)
        finally:
            server.stop()
            for d in (server.dir, *homes):
                shutil.rmtree(d, ignore_errors=True)

    def _nochange(self, name: str, rep: int) -> None:
        server, home = self.fx[name]
        commands = ["diff", "sync"] if rep % 2 == 0 else ["sync", "diff"]
        for command in commands:
            ran, counts = self.measured(server, [command, "--all"], home,
                                        what=f"no-change {command} ({name})")
            self.check_summary(ran, f"no-change {command} ({name})", written=0,
                               pending_push=0, pending_pull=0)
            self.sample(f"{command}_{name}", rep, ran, counts)

    def unit_nochange_main(self, rep: int) -> None:
        self._nochange("main", rep)

    def unit_nochange_wide(self, rep: int) -> None:
        self._nochange("wide", rep)

    def unit_big(self, rep: int) -> None:
        n = self.sizes.big
        server = Server(self, self.root / f"big-{rep}-server").start()
        home = self.copy_home(self.tpl_big, f"big-{rep}-home")
        try:
            ran, counts = self.measured(server, ["save", "--all"], home, what="big save")
            self.check_summary(ran, "big save", written=n, unchanged=0)
            self.sample("big_save", rep, ran, counts, messages=n)
            self.cli(["import", str(self.work.big_extra), "--json", "--quiet"], home,
                     what="import the local-only message")
            # Both ways, in turn first: the bucketed read and the whole chat's.
            for whole in (rep % 2 == 0, rep % 2 == 1):
                what = "big diff, whole chat read" if whole else "big diff"
                ran, counts = self.measured(server, ["diff", "--all"], home, expect=(1,),
                                            what=what, whole=whole)
                self.check_summary(ran, what, pending_push=1, pending_pull=0)
                self.sample("big_diff_whole" if whole else "big_diff", rep, ran, counts,
                            messages=n + 1)
        finally:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)

    def startup(self, rep: int) -> None:
        ran = self.cli(["--version"], self.startup_home, what="--version")
        self.sample("version", rep, ran)
        ran = self.cli(["status", "--json", "--quiet"], self.startup_home, what="status")
        self.sample("startup_cmd", rep, ran)

    # the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.setup()
        units: list[tuple[str, Callable[[int], None]]] = [
            ("floor", self.unit_floor), ("naive", self.unit_naive),
            ("save + re-save", self.unit_save), ("no-change main", self.unit_nochange_main),
            ("no-change wide", self.unit_nochange_wide), ("big chat", self.unit_big),
        ]
        reps = self.args.reps
        for rep in range(reps):
            k = rep % len(units)
            order = units[k:] + units[:k]
            self.log(f"repetition {rep + 1}/{reps}: " + ", ".join(n for n, _ in order))
            for i, (name, unit) in enumerate(order):
                try:
                    unit(rep)
                except (RuntimeError, OSError, httpx.HTTPError, sqlite3.Error) as exc:
                    self.problem(f"{name} (rep {rep + 1}) failed: {exc}")
                if self.sizes.startup_after_each or i == len(order) - 1:
                    self.startup(rep)
        return self.results(time.perf_counter() - started)

    def cleanup(self) -> None:
        self.stop_children()
        if self.args.keep:
            self.log(f"kept the temporary directory {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def stop_children(self) -> None:
        """Stop every process this benchmark started and that still runs, by pid."""
        for proc in list(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            with contextlib.suppress(ValueError):
                self.processes.remove(proc)

    def stop_fixtures(self) -> None:
        for server, _ in getattr(self, "fx", {}).values():
            server.stop()

    # results ------------------------------------------------------------------------------

    def summary_of(self, case: Case) -> dict[str, Any]:
        out: dict[str, Any] = {}
        keys = ("seconds", "msgs_per_s", "peak_rss_mb", "requests", "throttled_429",
                "client_cpu_us_per_msg", "server_cpu_us_per_msg", "store_vs_jsonl")
        for key in keys:
            st = _stats([float(s[key]) for s in case.samples if key in s])
            if st is not None:
                out[key] = st
        return out

    def results(self, elapsed: float) -> dict[str, Any]:
        cases = {name: {"label": c.label, "unit": c.unit, "metric": c.metric,
                        "samples": c.samples, "summary": self.summary_of(c)}
                 for name, c in self.cases.items()}

        def med(case: str, key: str) -> float:
            st = cases[case]["summary"].get(key)
            return float(st["median"]) if st else math.nan

        def peak(case: str, key: str) -> float:
            st = cases[case]["summary"].get(key)
            return float(st["max"]) if st else math.nan

        version = med("version", "seconds")
        ratios = {
            "save_vs_floor": med("save", "msgs_per_s") / med("floor", "msgs_per_s"),
            "save_vs_naive": med("save", "msgs_per_s") / med("naive", "msgs_per_s"),
            "resave_vs_save": med("resave", "msgs_per_s") / med("save", "msgs_per_s"),
            "big_diff_speedup": med("big_diff_whole", "seconds") / med("big_diff", "seconds"),
        }
        for case in ("diff_main", "sync_main", "diff_wide", "sync_wide"):
            ratios[f"{case}_vs_version"] = med(case, "seconds") / version
            ratios[f"{case}_vs_status_startup"] = (med(case, "seconds")
                                                   / med("startup_cmd", "seconds"))
        goals = []

        def goal(name: str, value: float, op: str, target: float, unit: str) -> None:
            met = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
            if math.isnan(value):
                met = False
            if met:
                how = ""
            elif op == ">=":
                how = f"by {target / value:.2f}x" if value > 0 else ""
            else:
                how = f"by {value / target:.2f}x" if target > 0 else ""
            goals.append({"goal": name, "value": value, "op": op, "target": target,
                          "unit": unit, "met": bool(met), "detail": how})

        s = self.sizes
        goal("save / floor (msg/s)", ratios["save_vs_floor"], ">=", 0.3, "x")
        goal("save / naive (msg/s)", ratios["save_vs_naive"], ">=", 50.0, "x")
        goal("re-save / save (msg/s)", ratios["resave_vs_save"], ">=", 1.0, "x")
        goal("save: server CPU per message (median)", med("save", "server_cpu_us_per_msg"),
             "<=", 20.0, "us")
        goal("save: client CPU per message (median)", med("save", "client_cpu_us_per_msg"),
             "<=", 20.0, "us")
        goal("store after save / its JSONL (median)", med("save", "store_vs_jsonl"), "<=",
             2.0, "x")
        for case, chats in (("diff_wide", s.wide_chats), ("sync_wide", s.wide_chats),
                            ("diff_main", s.chats), ("sync_main", s.chats)):
            command = case.split("_")[0]
            goal(f"no-change {command} {chats:,} chats: requests (max)",
                 peak(case, "requests"), "<=", 15, "")
            goal(f"no-change {command} {chats:,} chats: time / --version",
                 ratios[f"{case}_vs_version"], "<", 5.0, "x")
        goal(f"save {s.main_messages:,} msgs: peak RSS (max)", peak("save", "peak_rss_mb"),
             "<", 150.0, "MB")
        goal(f"big chat save {s.big:,}: peak RSS (max)", peak("big_save", "peak_rss_mb"),
             "<", 150.0, "MB")
        goal(f"big chat diff {s.big:,}: whole-chat read / this (median)",
             ratios["big_diff_speedup"], ">=", 3.0, "x")
        goal(f"big chat diff {s.big:,}: peak RSS (max)", peak("big_diff", "peak_rss_mb"),
             "<", 150.0, "MB")
        goal("chatsave --version start-up (median)", version, "<", 0.3, "s")

        throttled = {name: int(sum(x.get("throttled_429", 0) for x in c["samples"]))
                     for name, c in cases.items()}
        throttled = {k: v for k, v in throttled.items() if v}
        if throttled:
            self.notes.append(
                "the server answered 429 (rate limited) during: "
                + ", ".join(f"{k} ({v}x)" for k, v in throttled.items())
                + "; those numbers include the Retry-After waits. Rerun with "
                "--server-rate-limit 0 to see them unthrottled.")
        for case in ("diff_main", "sync_main", "diff_wide", "sync_wide", "big_diff"):
            for x in cases[case]["samples"]:
                reported = x.get("client_reported_requests")
                if reported is not None and reported != x.get("requests"):
                    self.notes.append(f"{case} rep {x['rep'] + 1}: the client reported "
                                      f"{reported} requests, the server logged "
                                      f"{x.get('requests')}")
        return {
            "schema_version": SCHEMA_VERSION,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": self.args.mode,
            "machine": machine_info(),
            "chatsave": chatsave_info(self.chatsave),
            "sizes": {**self.sizes.__dict__, "main_messages": s.main_messages},
            "reps": self.args.reps,
            "seed": self.args.seed,
            "server_command": self.server_argv,
            "server_rate_limit": self.args.server_rate_limit,
            "method": {
                "wall_time": "time.perf_counter in a tiny launcher process, from spawning "
                             "chatsave to its exit",
                "peak_rss": "ru_maxrss from os.wait4(pid) of the chatsave process, in a "
                            "tiny launcher (python -I -S) that spawned it",
                "requests": "server access log lines between two marker requests",
                "floor": "writes only (messages pre-parsed in memory), connect to close",
                "naive": "httpx.Client keep-alive, one POST /api/v1/chats/{id}/save per "
                         "message, Idempotency-Key each, sequential; 429 waited out",
                "big_diff": "after one local-only message was imported: digests differ, "
                            "the chat is read by buckets, only the one that differs "
                            "(expected exit code 1)",
                "big_diff_whole": "the same diff with every chat read whole, as before "
                                  "buckets and as against a server without them (the CLI "
                                  "run with chatsave.ops.compare.BUCKETS_FROM = 10 ** 9)",
                "order": "each repetition runs every case, rotated; --version and status "
                         "after every case",
            },
            "setup": self.setup_info,
            "cases": cases,
            "ratios": ratios,
            "goals": goals,
            "notes": self.notes,
            "problems": self.problems,
            "elapsed_s": round(elapsed, 1),
        }


# -- environment facts ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpus": os.cpu_count(),
                            "sqlite": sqlite3.sqlite_version}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_mb"] = int(line.split()[1]) // 1024
    with contextlib.suppress(OSError):
        info["loadavg_at_end"] = list(os.getloadavg())
    return info


def chatsave_info(chatsave: str) -> dict[str, Any]:
    info: dict[str, Any] = {"executable": chatsave}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["version"] = subprocess.run([chatsave, "--version"], capture_output=True,
                                         text=True, timeout=30).stdout.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True,
                                        text=True, timeout=30).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "chatsave"],
                               capture_output=True, text=True, timeout=30).stdout
        info["chatsave_tree_dirty"] = bool(dirty.strip())
    return info


# -- printing -------------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "msg/s":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:,.1f}"


def render(results: dict[str, Any]) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"chatsave benchmark  {results['date']}  mode={results['mode']}  "
                 f"reps={results['reps']}  {m.get('cpus')} CPUs {m.get('cpu', '')}  "
                 f"{results['chatsave'].get('version', '')} "
                 f"{results['chatsave'].get('commit', '')[:10]}"
                 + (" (chatsave/ modified)" if results["chatsave"].get("chatsave_tree_dirty")
                    else ""))
    lines.append(f"message JSON: {results['setup'].get('message_json_bytes_avg')} bytes "
                 f"on average; setup {results['setup'].get('setup_s')} s; total "
                 f"{results['elapsed_s']} s")
    lines.append("")
    head = (f"{'case':<50} {'unit':>5} {'median':>10} {'min':>10} {'max':>10} "
            f"{'RSS MB':>7} {'reqs':>6} {'429s':>5}")
    lines.append(head)
    lines.append("-" * len(head))
    for c in results["cases"].values():
        summ = c["summary"]
        main = summ.get(c["metric"])
        if main is None:
            lines.append(f"{c['label']:<50} {c['unit']:>5} {'n/a':>10}")
            continue
        rss = summ.get("peak_rss_mb")
        reqs = summ.get("requests")
        req_text = ""
        if reqs:
            lo, hi = int(reqs["min"]), int(reqs["max"])
            req_text = str(hi) if lo == hi else f"{lo}-{hi}"
        rss_text = f"{rss['max']:.0f}" if rss else ""
        throttled = sum(s.get("throttled_429", 0) for s in c["samples"])
        thr_text = str(throttled) if "requests" in summ else ""
        lines.append(
            f"{c['label']:<50} {c['unit']:>5} {_fmt(main['median'], c['unit']):>10} "
            f"{_fmt(main['min'], c['unit']):>10} {_fmt(main['max'], c['unit']):>10} "
            f"{rss_text:>7} {req_text:>6} {thr_text:>5}")
    lines.append("(median, min, max over the repetitions; RSS: the largest peak; for msg/s "
                 "higher is better, for s lower)")
    lines.append("")
    head = f"{'goal':<52} {'value':>10} {'target':>10}  result"
    lines.append(head)
    lines.append("-" * len(head))
    for g in results["goals"]:
        value = "n/a" if math.isnan(g["value"]) else (
            f"{g['value']:.0f}" if g["unit"] == "" else
            f"{g['value']:.3g}{g['unit']}" if g["unit"] != "MB" else f"{g['value']:.0f} MB")
        target = f"{g['op']} {g['target']:g}{'' if g['unit'] in ('', 'MB') else g['unit']}"
        if g["unit"] == "MB":
            target += " MB"
        status = "met" if g["met"] else f"MISSED {g['detail']}".rstrip()
        lines.append(f"{g['goal']:<52} {value:>10} {target:>10}  {status}")
    r = results["ratios"]
    lines.append("")
    lines.append("info: no-change time / `chatsave status` start-up (a command that loads the "
                 "CLI app): " + ", ".join(
                     f"{c} {r[f'{c}_vs_status_startup']:.2f}x"
                     for c in ("diff_main", "sync_main", "diff_wide", "sync_wide")))
    for note in results["notes"]:
        lines.append(f"note: {note}")
    for problem in results["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="chatsave benchmark (issue 8): chatsave vs the storage floor and the "
                    "naive client; prints a table and writes JSON.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run with smaller sizes (under a minute)")
    parser.add_argument("--tiny", action="store_true",
                        help="with --quick: tiny sizes, one repetition (the pytest smoke test)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions (default 3; --quick 2; --tiny 1)")
    parser.add_argument("--json", dest="json_path", type=Path, default=DEFAULT_JSON,
                        metavar="FILE", help=f"write the results here (default {DEFAULT_JSON})")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--chatsave", default=None,
                        help="the chatsave executable (default: the one beside this Python)")
    parser.add_argument("--server-rate-limit", type=float, default=None, metavar="R",
                        help="pass --rate-limit R to chatsave serve (0 turns the limit off); "
                             "default: the server's own default")
    parser.add_argument("--tmpdir", default=None,
                        help="where the temporary directories go (default: the system's)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (debugging)")
    parser.add_argument("--silent", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.tiny:
        args.quick = True
    args.mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    args.sizes = TINY if args.tiny else QUICK if args.quick else FULL
    args.reps = args.reps or args.sizes.reps
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.chatsave is None:
        beside = Path(sys.executable).with_name("chatsave")
        args.chatsave = str(beside) if beside.exists() else shutil.which("chatsave")
        if args.chatsave is None:
            parser.error("no chatsave executable found; pass --chatsave PATH")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = bench.run()
    except KeyboardInterrupt:
        print("interrupted; stopping what was started", file=sys.stderr)
        return 130
    finally:
        bench.stop_fixtures()
        bench.cleanup()
        signal.signal(signal.SIGTERM, previous)
    text = render(results)
    print(text)
    args.json_path.parent.mkdir(parents=True, exist_ok=True)
    args.json_path.write_text(json.dumps(_finite(results), indent=2, default=_json_default,
                                            allow_nan=False) + "\n",
                              encoding="utf-8")
    print(f"\nresults written to {args.json_path}")
    return 1 if results["problems"] else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _finite(value: Any) -> Any:
    """NaN (a case that produced no number) becomes null: the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
