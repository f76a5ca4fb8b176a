"""localStorage images in a real browser: headless Chromium takes every key back unchanged,
and ``--budget`` counts what Chromium counts (its quota is 10 MiB per origin: 5,242,880
UTF-16 code units of keys and values, measured, whatever the characters are).

Chromium and its driver come from Debian (``chromium``, ``chromium-driver``; .ci/run
installs them). The browser is driven through WebDriver (Selenium with Debian's
chromedriver, built with the browser it drives) on a page this test serves on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatsave.formats.localstorage import browser_bytes
from tests.conftest import Ran

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUOTA = 10 * 1024 * 1024  # bytes: Chromium's localStorage quota per origin (measured)
QUOTA_UNITS = QUOTA // 2
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.timeout(240)

# Sets every key in the image's order, stops at the first refusal, then reads back what
# the origin holds (every key) and counts its UTF-16 code units as the browser does.
LOAD = """
const pairs = arguments[0];
localStorage.clear();
let error = null, failedKey = null, message = null;
for (const [key, value] of pairs) {
  try { localStorage.setItem(key, value); }
  catch (e) { error = e.name; failedKey = key; message = String(e.message); break; }
}
const stored = {};
let units = 0;
for (let i = 0; i < localStorage.length; i++) {
  const key = localStorage.key(i);
  stored[key] = localStorage.getItem(key);
  units += key.length + stored[key].length;
}
return {error, failedKey, message, stored, units};
"""


# -------------------------------------------------------------------------- fixtures
class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><meta charset=utf-8><title>chatsave image</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    """A page on 127.0.0.1, served by this test: an origin of its own, localStorage empty."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line holds ``marker`` (this test's own profile directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def browser(page_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium on the page, with a fresh profile; only it is ended afterwards."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = str(tmp_path_factory.mktemp("chromium-profile"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [*ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    service = Service(CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(120)
        driver.get(page_url)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            for pid in _pids_using(profile):  # the browser, if quit left any of it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def load_image(driver: Any, values: dict[str, str]) -> dict[str, Any]:
    outcome: dict[str, Any] = driver.execute_script(LOAD, list(values.items()))
    return outcome


def utf16(text: str) -> bytes:
    return text.encode("utf-16-le", "surrogatepass")


def image_values(path: Path) -> dict[str, str]:
    values: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return values


# ----------------------------------------------------------------------------- tests
TEXTS = [
    "plain ascii", "é à ü ß (Latin-1)", "€ – “quotes” (not Latin-1)", "中文 日本語 한국어",
    "emoji 😀👍🏽 and 𝄞 (surrogate pairs)", 'json "quotes" \\ backslash / slash',
    "line\nbreak\ttab\r\n", "\u2028 line and \u2029 paragraph separators",
    "control \u0001\u001f and nul \u0000 inside", "zero width \u200b joiner \u200d",
]


def test_an_image_loads_byte_for_byte(cli: Callable[..., Ran], tmp_path: Path,
                                      browser: Any) -> None:
    lines = [{"chat_id": f"c-{i % 3}", "id": f"m-{i}", "role": "user" if i % 2 else "assistant",
              "content": text, "created_at": f"2026-03-01T10:00:{i:02d}.000Z",
              "metadata": {"note": text}} for i, text in enumerate(TEXTS)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    assert cli("import", str(source)).exit_code == 0
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"autobot-chat-store": json.dumps({
        "sessions": [{"id": None, "title": "Lost id ✓", "createdAt": "2026-03-02T08:00:00.000Z",
                      "isActive": True, "messages": [{"id": "x-1", "sender": "user",
                                                      "content": "where am I? 🧭",
                                                      "timestamp": "2026-03-02T08:00:01.000Z"}]}],
        "currentSessionId": None})}), encoding="utf-8")
    ran = cli("import", str(dump), "--rename-invalid", "--json")
    assert ran.exit_code == 0, ran.stderr
    [current] = [e["chat_id"] for e in ran.json_lines() if e["type"] == "derived"]
    image = tmp_path / "image.json"
    assert cli("export", "--format", "localstorage", "--output", str(image)).exit_code == 0
    values = image_values(image)

    outcome = load_image(browser, values)
    assert outcome["error"] is None, outcome["message"]
    assert sorted(outcome["stored"]) == sorted(values)
    for key, value in values.items():
        assert utf16(outcome["stored"][key]) == utf16(value), key
    assert 2 * outcome["units"] == browser_bytes(values)
    # The web client's store reads it: every message, and the user's current chat.
    state = browser.execute_script(
        "return JSON.parse(localStorage.getItem('autobot-chat-store'))")
    assert state["currentSessionId"] == current
    assert [s["id"] for s in state["sessions"] if s["isActive"]] == [current]
    contents = {m["content"] for s in state["sessions"] for m in s["messages"]}
    assert contents == {*TEXTS, "where am I? 🧭"}


def _image_of(cli: Callable[..., Ran], tmp_path: Path, name: str, fill: int,
              budget: str | None) -> tuple[Ran, Path]:
    """A store of one chat, never saved, whose one long message has ``fill`` filler
    units; its image, with ``--budget`` when given (the backend is an empty one)."""
    store, image = tmp_path / f"{name}.db", tmp_path / f"{name}.json"
    # "€" is one UTF-16 unit but not Latin-1, "😀" two units: the count is in UTF-16.
    message = {"chat_id": "big", "id": "m-1", "role": "user", "content": "😀" + "€" * fill,
               "created_at": "2026-03-01T10:00:00.000Z"}
    source = tmp_path / f"{name}.jsonl"
    source.write_text(json.dumps(message, ensure_ascii=False) + "\n", encoding="utf-8")
    assert cli("import", str(source), "--store", str(store)).exit_code == 0
    args = ["export", "--format", "localstorage", "--store", str(store), "--output",
            str(image), "--json"]
    if budget is not None:
        args += ["--budget", budget, "--remote", str(tmp_path / "backend.db")]
    return cli(*args), image


def test_the_budget_is_the_browsers_quota(cli: Callable[..., Ran], tmp_path: Path,
                                          browser: Any) -> None:
    # How big the image is around a message of a known length: the filler that makes it
    # exactly the quota follows (one filler unit is two bytes).
    probe, probe_image = _image_of(cli, tmp_path, "probe", 1000, None)
    assert probe.exit_code == 0, probe.stderr
    fill = 1000 + (QUOTA - browser_bytes(image_values(probe_image))) // 2

    at, at_image = _image_of(cli, tmp_path, "at", fill, "10MiB")
    assert at.exit_code == 0, at.stderr
    assert at.summary["budget"] == QUOTA
    assert at.summary["browser_bytes"] == QUOTA == browser_bytes(image_values(at_image))
    values = image_values(at_image)
    outcome = load_image(browser, values)
    assert outcome["error"] is None, outcome["message"]
    assert outcome["units"] == QUOTA_UNITS
    assert sorted(outcome["stored"]) == sorted(values)
    for key, value in values.items():
        assert utf16(outcome["stored"][key]) == utf16(value), key

    # One code unit more: chatsave refuses it under the same budget (the chat holds a
    # message the backend has not confirmed, so it goes in whole or not at all), and
    # the browser refuses the image with QuotaExceededError.
    over, over_image = _image_of(cli, tmp_path, "over", fill + 1, "10MiB")
    assert over.exit_code == 5, over.stdout
    assert not over_image.exists()
    assert "'big'" in over.summary["error"]["message"]
    assert "save it first" in over.summary["error"]["hint"]
    whole, whole_image = _image_of(cli, tmp_path, "whole", fill + 1, None)
    assert whole.exit_code == 0, whole.stderr
    values = image_values(whole_image)
    assert browser_bytes(values) == QUOTA + 2
    outcome = load_image(browser, values)
    assert outcome["error"] == "QuotaExceededError", outcome
    assert outcome["units"] < QUOTA_UNITS  # what was stored before the refusal
    load_image(browser, {})  # leave the origin empty
