"""``diff --html``: the divergence report, opened in headless Chromium (Debian's chromium,
driven by Selenium as in tests/test_browser.py). The page loads without console errors,
shows the counts ``diff --json`` prints, keeps message text out without ``--show-text``,
and groups a retry copy with its original."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chatsave.model import Message
from chatsave.ops.compare import SYMBOL_NAMES
from chatsave.ops.delete import delete
from chatsave.ops.save import SaveOptions, save
from chatsave.remote.embedded import EmbeddedRemote
from chatsave.store.store import Store
from tests.conftest import ROOT, Ran
from tests.test_browser import ARGS, CHROMEDRIVER, CHROMIUM, _pids_using
from tests.test_sync import add

pytestmark = pytest.mark.timeout(240)
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
SCREENSHOT = ROOT / "docs" / "diff-report.png"


def msg(chat_id: str, mid: str, content: str | None = None, minute: int = 0) -> Message:
    return Message(chat_id=chat_id, id=mid, role="user", content=content or f"PRIVATE {mid}",
                   created_at=T0 + timedelta(minutes=minute))


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    """Store a.db and an embedded backend that differ in every way in chat "trip" (b.db is
    the other client), and agree on chat "notes"."""
    remote = EmbeddedRemote(tmp_path / "backend.db")
    a, b = Store.open(tmp_path / "a.db"), Store.open(tmp_path / "b.db")
    try:
        add(b, msg("trip", "a1", minute=1), msg("trip", "r1", minute=2),
            msg("trip", "k1", "PRIVATE theirs", 3), msg("trip", "t1", minute=4),
            msg("trip", "t2", minute=5), msg("notes", "n1"), msg("notes", "n2", minute=1))
        assert save(b, remote, None, SaveOptions()).exit_code == 0
        add(a, msg("trip", "a1", minute=1), msg("trip", "a2", minute=6),
            msg("trip", "k1", "PRIVATE ours", 3), msg("trip", "t1", minute=4),
            msg("trip", "t2", minute=5), msg("trip", "a2-retry", "PRIVATE a2", 6),
            msg("notes", "n1"), msg("notes", "n2", minute=1))
        with a.transaction():
            a.trash_messages("trip", ["t2"], "test", None)
        delete(b, "trip", ["t1"])
        assert save(b, remote, None, SaveOptions()).counters["deleted_remote"] == 1
    finally:
        a.close()
        b.close()
        remote.close()
    return tmp_path


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium with its console log kept; only it is ended afterwards."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = str(tmp_path_factory.mktemp("chromium-profile"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [*ARGS, f"--user-data-dir={profile}", "--window-size=1100,1000"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            for pid in _pids_using(profile):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def report(cli: Callable[..., Ran], scene: Path, *extra: str) -> tuple[Path, list[dict[str, Any]]]:
    page = scene / f"report{len(extra)}.html"
    ran = cli("diff", "--all", "--store", str(scene / "a.db"), "--remote",
              str(scene / "backend.db"), "--html", str(page), "--json", *extra)
    assert ran.exit_code == 1, ran.stderr
    return page, [json.loads(line) for line in ran.stdout.splitlines()]


def shown_counts(driver: Any) -> dict[tuple[str, str], int]:
    cells = driver.find_elements("css selector", "td[data-symbol]")
    return {(c.get_attribute("data-chat"), c.get_attribute("data-symbol")): int(c.text)
            for c in cells}


def test_the_report_shows_diffs_counts_without_text(
        cli: Callable[..., Ran], scene: Path, chromium: Any, tmp_path: Path) -> None:
    page, events = report(cli, scene)
    chromium.get(page.as_uri())
    errors = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    shown = shown_counts(chromium)
    names = {name: symbol for symbol, name in SYMBOL_NAMES.items()}
    chats = [e for e in events if e["type"] == "chat"]
    assert {c["chat_id"] for c in chats} == {"trip", "notes"}
    totals: dict[str, int] = {}
    for chat in chats:
        for name, symbol in names.items():
            if symbol == "!":
                continue
            assert shown[(chat["chat_id"], symbol)] == chat.get(name, 0), (chat, symbol)
            totals[symbol] = totals.get(symbol, 0) + chat.get(name, 0)
    assert {s: n for (c, s), n in shown.items() if c == ""} == totals
    assert totals == {"=": 3, "+": 1, "-": 1, "*": 1, "x": 2, "D": 1}
    text = page.read_text()
    assert "PRIVATE" not in text and "PRIVATE" not in chromium.page_source
    # Conflicts show both versions' hashes (the ones diff --json names).
    conflict = next(e for e in events if e["type"] == "item" and e["symbol"] == "*")
    assert conflict["local_hash"] in text and conflict["remote_hash"] in text
    # Self-contained: nothing fetched from anywhere.
    assert "src=" not in text and "http://" not in text and "https://" not in text
    assert "Content-Security-Policy" in text
    # The retry copy right after the message it copies, marked as its copy.
    rows = chromium.find_elements("css selector", "table.messages tr")
    ids = [r.find_elements("css selector", "td code")[0].text for r in rows[1:]]
    assert ids.index("a2-retry") == ids.index("a2") + 1
    assert "copy of a2" in rows[ids.index("a2-retry") + 1].text
    shot = tmp_path / "report.png"
    assert chromium.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":  # the README's picture, made again
        shutil.copyfile(shot, SCREENSHOT)
    assert SCREENSHOT.read_bytes()[:4] == b"\x89PNG", "the README's picture of the report"


def test_show_text_puts_the_text_in(cli: Callable[..., Ran], scene: Path,
                                    chromium: Any) -> None:
    page, _ = report(cli, scene, "--show-text")
    chromium.get(page.as_uri())
    assert not [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    body = chromium.find_element("tag name", "body").text
    assert "PRIVATE ours" in body and "PRIVATE theirs" in body


def test_show_text_elsewhere_is_still_one_message_only(cli: Callable[..., Ran],
                                                       scene: Path) -> None:
    where = ["--store", str(scene / "a.db"), "--remote", str(scene / "backend.db")]
    ran = cli("diff", "trip", "a1", "--show-text", *where)
    assert ran.exit_code == 0 and "PRIVATE a1" in ran.stdout, "one message, its text"
    ran = cli("diff", "--all", "--show-text", *where)
    assert ran.exit_code == 2 and "--show-text" in ran.stderr
    ran = cli("diff", "trip", "a1", "--html", str(scene / "r.html"), *where)
    assert ran.exit_code == 2 and "'a1'" in ran.stderr, "with --html, the names are chats"
    assert not (scene / "r.html").exists()
