"""``--metrics-file PATH``: each command's last run, for node_exporter's textfile collector.

One file, shared by every command that names it (save from one cron line, sync from
another): each run replaces its own command's lines and keeps the others', under a lock, and
the file is replaced atomically (written beside it, then renamed), so a collector never reads
half of it. What it holds, per ``command`` label (docs/operations.md, "Cron metrics"):

- ``chatsave_command_exit_code``: the last run's exit code;
- ``chatsave_command_last_run_timestamp_seconds``: when it finished;
- ``chatsave_command_last_success_timestamp_seconds``: when a run last finished without
  error (exit 0 or 1), kept across failed runs, so "has not saved for two days" is one
  alert rule;
- ``chatsave_command_duration_seconds``: how long it took;
- ``chatsave_command_summary{field=...}``: the summary's counts (written, unchanged,
  conflicts, rejected, pending_push, duplicates_removed, bytes_freed, ...).

The exposition format is prometheus-client's, both ways (its parser reads the old file).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatsave.errors import UsageError

log = logging.getLogger("chatsave")

PREFIX = "chatsave_command_"
HELP = {
    "exit_code": "Exit code of the command's last run.",
    "last_run_timestamp_seconds": "When the command's last run finished (Unix time).",
    "last_success_timestamp_seconds": "When a run of the command last finished without "
                                      "error, exit 0 or 1 (Unix time).",
    "duration_seconds": "How long the command's last run took.",
    "summary": "The counts of the last run's summary, by field.",
}
#: exit codes of a run that finished without error (1: differences or pending work found)
SUCCESS = (0, 1)

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (metric suffix, sorted labels)


def check_path(path: Path) -> None:
    """Refuse, before the command does anything, a metrics file that cannot be written."""
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"--metrics-file {path} is a directory",
                         hint="name a file, like /var/lib/node_exporter/chatsave.prom")
    if not parent.is_dir():
        raise UsageError(f"--metrics-file {path}: no directory {parent}",
                         hint="create it, or name a file in an existing directory")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--metrics-file {path}: cannot write in {parent}")


def record_run(path: Path, command: str, exit_code: int, summary: dict[str, Any],
               finished: float, duration: float) -> None:
    """Put this run of ``command`` in the file at ``path``, keeping every other command's
    lines (and this command's last success when this run failed)."""
    with _locked(path):
        samples = _read(path)
        mine = (("command", command),)
        success_key: Sample = ("last_success_timestamp_seconds", mine)
        last_success = samples.get(success_key)
        samples = {k: v for k, v in samples.items() if dict(k[1]).get("command") != command}
        samples[("exit_code", mine)] = float(exit_code)
        samples[("last_run_timestamp_seconds", mine)] = finished
        samples[("duration_seconds", mine)] = duration
        if exit_code in SUCCESS:
            samples[success_key] = finished
        elif last_success is not None:
            samples[success_key] = last_success
        for name, value in summary.items():
            if isinstance(value, int) and not isinstance(value, bool) and name != "exit_code":
                samples[("summary", tuple(sorted((("command", command), ("field", name)))))] \
                    = float(value)
        _write(path, samples)


def _read(path: Path) -> dict[Sample, float]:
    """The file's chatsave_command_* samples; an unreadable or foreign file starts over."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("metrics file %s unreadable (%s): written afresh", path, exc)
        return {}
    out: dict[Sample, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                suffix = sample.name.removeprefix(PREFIX)
                if sample.name.startswith(PREFIX) and suffix in HELP:
                    out[(suffix, tuple(sorted(sample.labels.items())))] = sample.value
    except ValueError as exc:
        log.warning("metrics file %s is not Prometheus text (%s): written afresh", path, exc)
        return {}
    return out


def _write(path: Path, samples: dict[Sample, float]) -> None:
    from prometheus_client import CollectorRegistry, write_to_textfile
    from prometheus_client.core import GaugeMetricFamily

    class Runs:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            for suffix, text in HELP.items():
                labels = ["command", "field"] if suffix == "summary" else ["command"]
                family = GaugeMetricFamily(PREFIX + suffix, text, labels=labels)
                for (name, pairs), value in sorted(samples.items()):
                    if name == suffix:
                        family.add_metric([dict(pairs).get(k, "") for k in labels], value)
                yield family

    registry = CollectorRegistry()
    registry.register(Runs())
    write_to_textfile(str(path), registry)  # a temporary file beside it, then a rename


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Commands writing the same file one after another (a hidden lock file beside it:
    the textfile collector reads only ``*.prom``)."""
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
