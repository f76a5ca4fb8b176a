"""The benchmark script (tests/benchmarks/run.py) still runs end to end: a tiny run.

It starts real ``chatsave serve`` processes and drives the real CLI, with tiny sizes and
one repetition, and checks that the JSON it writes has every case with numbers, every
ratio and every goal, so the script cannot rot while chatsave changes under it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "benchmarks" / "run.py"

CASES = {
    "floor": "msgs_per_s", "naive": "msgs_per_s", "save": "msgs_per_s",
    "resave": "msgs_per_s", "diff_main": "seconds", "sync_main": "seconds",
    "diff_wide": "seconds", "sync_wide": "seconds", "big_save": "msgs_per_s",
    "big_diff": "seconds", "big_diff_whole": "seconds", "version": "seconds",
    "startup_cmd": "seconds",
}
WITH_RSS = {"save", "resave", "diff_main", "sync_main", "diff_wide", "sync_wide", "big_save",
            "big_diff", "big_diff_whole", "version", "startup_cmd"}
WITH_REQUESTS = {"naive", "save", "resave", "diff_main", "sync_main", "diff_wide",
                 "sync_wide", "big_save", "big_diff", "big_diff_whole"}
RATIOS = {"save_vs_floor", "save_vs_naive", "resave_vs_save", "diff_main_vs_version",
          "sync_main_vs_version", "diff_wide_vs_version", "sync_wide_vs_version",
          "big_diff_speedup"}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


@pytest.mark.timeout(120)
def test_benchmark_tiny_run_reports_every_case(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    ran = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--tiny", "--json", str(out),
         "--tmpdir", str(tmp_path), "--silent"],
        capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert results["mode"] == "tiny"
    for name, metric in CASES.items():
        case = results["cases"][name]
        assert case["samples"], name
        for sample in case["samples"]:
            assert _number(sample["seconds"]) and sample["seconds"] > 0, (name, sample)
            assert _number(sample[metric]), (name, sample)
            if name in WITH_RSS:
                assert _number(sample["peak_rss_mb"]) and sample["peak_rss_mb"] > 1, name
            if name in WITH_REQUESTS:
                assert isinstance(sample["requests"], int) and sample["requests"] >= 1, name
                assert isinstance(sample["throttled_429"], int), name
        for stat in ("median", "min", "max"):
            assert _number(case["summary"][metric][stat]), (name, stat)
    assert set(results["ratios"]) >= RATIOS
    assert all(_number(results["ratios"][r]) for r in RATIOS)
    assert len(results["goals"]) == 19
    save = results["cases"]["save"]["samples"][0]
    for key in ("client_cpu_us_per_msg", "server_cpu_us_per_msg", "store_vs_jsonl"):
        assert _number(save[key]) and save[key] > 0, (key, save)
    for goal in results["goals"]:
        assert isinstance(goal["met"], bool) and _number(goal["value"]), goal
    # the request count is exact: the naive client makes one request per message
    naive = results["cases"]["naive"]["samples"][0]
    assert naive["requests"] == results["sizes"]["naive"] + naive["throttled_429"]
    # the peak RSS is the child's own, not inherited from the benchmark process
    assert results["cases"]["version"]["samples"][0]["peak_rss_mb"] < 30
    assert "median" in ran.stdout and "goal" in ran.stdout
    # nothing is left behind in the temporary directory but the results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_the_workload_carries_autobot_metadata_on_a_share_of_messages() -> None:
    """The save benchmark's messages are not all ``metadata: {}``: most replies carry the
    keys AutoBot writes (docs/autobot.md), user messages none (issue 16's workload)."""
    import random

    from tests.benchmarks.run import _messages

    msgs = list(_messages(random.Random(7), "chat-1", 2_000, 0, 7_000, 150))
    with_meta = [m for m in msgs if m["metadata"]]
    assert 0.3 < len(with_meta) / len(msgs) < 0.45  # half are replies, 3 in 4 of those
    assert {m["role"] for m in with_meta} == {"assistant"}
    keys = {k for m in with_meta for k in m["metadata"]}
    assert keys == {"version", "model", "tokens", "duration", "terminal_session_id"}
