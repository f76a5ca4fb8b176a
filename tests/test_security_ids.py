"""Hostile ids: path, query, fragment, NUL, unicode tricks and 1,000 characters.

An id never reaches a URL, a file name or an SQL string unescaped:

- invalid chat ids are refused by every command and by import (quoted with controls and
  bidi marks escaped), and nothing is sent or stored;
- message ids may hold almost anything: they travel in JSON bodies only (never in a URL),
  are stored through SQL parameters, and come back exactly (import -> save -> server ->
  sync into another store -> export), for a fixed list of tricky ids and generated ones;
- files written from ids (``export --output``, the ``autobot-dir:`` remote, which writes a
  chat back to the file named by its original id) stay inside their directory.

The static proof that SQL is parameterised is test_security_sql.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsave.model import CHAT_ID_MAX, MESSAGE_ID_MAX, RESERVED_IDS
from chatsave.remote.http import HttpRemote
from tests.conftest import Ran, examples, table_dump
from tests.faults import Faults

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
CAPS = {"protocol": 1, "server": "chatsave/0.1", "backend_id": "b-mock",
        "max_batch_messages": 1000, "max_body_bytes": 8 << 20, "max_page": 1000,
        "idempotency_retention_s": 86400, "features": []}
BIDI = "\u202e"
HOSTILE_CHAT_IDS = {
    "dotdot": "..",
    "dot": ".",
    "path": "../../etc/passwd",
    "abs": "/etc/passwd",
    "slash": "a/b",
    "backslash": "a\\b",
    "query": "c1?limit=1&after=x",
    "fragment": "c1#frag",
    "percent": "%2e%2e%2f",
    "nul": "c1\x00evil",
    "newline": "c1\nX-Injected: 1",
    "rtl": f"c1{BIDI}gnp.exe",
    "homoglyph": "сhat",  # Cyrillic с
    "combining": "chate\u0301",
    "fullwidth-slash": "ａ／ｂ",
    "space": "c 1",
    "long": "c" * 1000,
    "quote": "c1'--",
    "null": "null",
    "empty": "",
}
TRICKY_MESSAGE_IDS = [
    "../../etc/passwd", "/abs/path", "a/b", "back\\slash", "?x=1&y=2", "#frag", "%2e%2e%2f",
    f"{BIDI}gnp.exe", "сhat", "e\u0301", "ａ／ｂ", "x'); DROP TABLE messages;--",
    '"quoted"', "emoji 😀", "line\u2028sep", "  spaced  ", "m" * MESSAGE_ID_MAX,
    "<script>alert(1)</script>", "${HOME}", "`id`", "NULL-ish", "0", "-1", ".", "..",
]
TRICKY_CHAT_IDS = ["a:b@c~d", "...", "-leading", "x" * CHAT_ID_MAX, "UPPER.lower_9",
                   "~", "@", "9"]
INVALID_MESSAGE_IDS = {"nul": "m\x00", "newline": "m\n1", "escape": "m\x1b[2J",
                       "long": "m" * 1000, "surrogate": "m\ud800", "tab": "m\t1",
                       "del": "m\x7f"}
# Placeholders a broken client writes where it had no id: import derives a stable id.
PLACEHOLDER_MESSAGE_IDS = {"blank": "  ", "undefined": "undefined", "null": "null",
                           "none": "None", "nan": "NaN"}


def wire(chat_id: str, mid: str, i: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"{chat_id}\0{mid}".encode("utf-8", "surrogatepass")).hexdigest()
    # Everything but the ids is a function of the ids: an id seen again is the same message.
    return {"chat_id": chat_id, "id": mid, "role": ("user", "assistant")[int(digest[6], 16) % 2],
            "content": f"message {digest[:12]}",
            "created_at": (T0 + timedelta(seconds=int(digest[:6], 16) % 86400)
                           ).isoformat().replace("+00:00", "Z")}


def jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items),
                    encoding="utf-8", errors="surrogatepass")
    return path


def shown_safely(text: str) -> bool:
    """No raw control characters (but newlines) or bidi overrides reach the terminal."""
    return all(ch == "\n" or (ch.isprintable() and ch != BIDI) for ch in text)


class Network:
    """Every HttpRemote gets a MockTransport that records requests (no sockets)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/capabilities"):
            return httpx.Response(200, json=CAPS)
        return httpx.Response(503, json={"error": {"code": "x", "message": "no"}})

    @property
    def beyond_capabilities(self) -> list[str]:
        return [str(r.url) for r in self.requests if not r.url.path.endswith("/capabilities")]


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    net = Network()
    original = HttpRemote.__init__

    def init(self: HttpRemote, url: str, **kwargs: Any) -> None:
        kwargs["transport"] = httpx.MockTransport(net)
        original(self, url, **kwargs)

    monkeypatch.setattr(HttpRemote, "__init__", init)
    monkeypatch.setattr("chatsave.remote.http.time.sleep", lambda s: None)
    return net


# --------------------------------------------------------------- invalid chat ids
COMMANDS_TAKING_A_CHAT: dict[str, Callable[[str], tuple[str, ...]]] = {
    "export": lambda c: ("export", c),
    "save": lambda c: ("save", c),
    "sync": lambda c: ("sync", c),
    "diff": lambda c: ("diff", c),
    "delete": lambda c: ("delete", c, "--yes"),
    "delete-message": lambda c: ("delete", c, "m1", "--yes"),
    "status": lambda c: ("status", c),
    "fetch": lambda c: ("fetch", c),
    "dedupe": lambda c: ("dedupe", c, "--yes"),
    "trash-list": lambda c: ("trash", "list", "--chat", c),
}


@pytest.mark.parametrize("name", list(HOSTILE_CHAT_IDS))
@pytest.mark.parametrize("command", list(COMMANDS_TAKING_A_CHAT))
def test_invalid_chat_ids_are_refused_by_every_command(cli: Any, home: Path, tmp_path: Path,
                                                       network: Network, command: str,
                                                       name: str) -> None:
    assert cli("import", str(jsonl(tmp_path / "ok.jsonl", [wire("c1", "m1", 1)]))
               ).exit_code == 0
    before = table_dump(home / "store.db")
    chat_id = HOSTILE_CHAT_IDS[name]
    ran = cli(*COMMANDS_TAKING_A_CHAT[command](chat_id), "--remote", "http://127.0.0.1:9",
              "--json")
    # trash list --chat only filters what it shows (through an SQL parameter): an
    # invalid id finds nothing there rather than being refused.
    assert ran.exit_code == 2 or (command == "trash-list" and ran.exit_code == 0), \
        (ran.exit_code, ran.stderr)
    assert ran.summary["exit_code"] == ran.exit_code
    assert "Traceback" not in ran.stderr
    assert shown_safely(ran.stderr), ran.stderr
    # Refused before anything about the chat is asked (capabilities may come first).
    assert network.beyond_capabilities == []
    after = table_dump(home / "store.db")
    # sync and dedupe record the backend they asked for capabilities (not the chat).
    for table in ("runs", "backends"):
        after.pop(table, None), before.pop(table, None)
    assert after == before


@pytest.mark.parametrize("name", list(HOSTILE_CHAT_IDS))
def test_invalid_chat_ids_in_input_are_refused_quoted_or_renamed(cli: Any, home: Path,
                                                                 tmp_path: Path,
                                                                 name: str) -> None:
    chat_id = HOSTILE_CHAT_IDS[name]
    source = jsonl(tmp_path / "in.jsonl", [wire(chat_id, "m1", 1), wire(chat_id, "m2", 2)])
    ran = cli("import", str(source), "--json")
    assert ran.exit_code == 2, ran.stderr
    assert "chat id" in ran.stderr and shown_safely(ran.stderr)
    assert cli("status", "--json").summary["messages"] == 0
    renamed = cli("import", str(source), "--rename-invalid", "--json")
    assert renamed.exit_code == 0, renamed.stderr
    mapped = {e["chat_id"] for e in renamed.json_lines() if e["type"] == "renamed"}
    assert len(mapped) == 1
    (new_id,) = mapped
    from chatsave.model import chat_id_problem

    assert chat_id_problem(new_id) is None and len(new_id) <= CHAT_ID_MAX
    assert shown_safely(renamed.stderr)
    out = tmp_path / "out" / "export.jsonl"
    out.parent.mkdir()
    assert cli("export", "--output", str(out), "--json").exit_code == 0
    assert [p.name for p in out.parent.iterdir()] == ["export.jsonl"]
    assert {json.loads(line)["chat_id"] for line in out.read_text().splitlines()} == {new_id}


@pytest.mark.parametrize("name", list(INVALID_MESSAGE_IDS))
def test_invalid_message_ids_are_refused_and_quoted(cli: Any, home: Path, tmp_path: Path,
                                                    name: str) -> None:
    source = jsonl(tmp_path / "in.jsonl", [wire("c1", INVALID_MESSAGE_IDS[name], 1),
                                           wire("c1", "fine", 2)])
    ran = cli("import", str(source), "--json")
    assert ran.exit_code == 2, ran.stderr
    assert shown_safely(ran.stderr), ran.stderr
    assert cli("status", "--json").summary["messages"] == 0
    skipped = cli("import", str(source), "--on-invalid", "skip", "--json")
    assert skipped.exit_code == 1
    assert cli("status", "--json").summary["messages"] == 1


@pytest.mark.parametrize("name", list(PLACEHOLDER_MESSAGE_IDS))
def test_placeholder_message_ids_get_a_derived_id(cli: Any, home: Path, tmp_path: Path,
                                                  name: str) -> None:
    source = jsonl(tmp_path / "in.jsonl", [wire("c1", PLACEHOLDER_MESSAGE_IDS[name], 1)])
    assert cli("import", str(source)).exit_code == 0
    out = tmp_path / "out.jsonl"
    assert cli("export", "--output", str(out)).exit_code == 0
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["id"] not in PLACEHOLDER_MESSAGE_IDS.values()
    assert cli("import", str(source), "--json").summary["written"] == 0, "stable id"


# ------------------------------------------------------- valid ids, round trip exactly
def _home(root: Path, name: str) -> dict[str, str]:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return {"CHATSAVE_HOME": str(path)}


def _invoke(env: dict[str, str], *args: str) -> Ran:
    from typer.testing import CliRunner

    from chatsave.cli.app import app

    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def _round_trip(root: Path, url: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """import -> save -> server -> sync (pull) into another store -> export; the export."""
    chats = sorted({x["chat_id"] for x in items})
    first, second = _home(root, "first"), _home(root, "second")
    source = jsonl(root / "in.jsonl", items)
    ran = _invoke(first, "import", str(source), "--json")
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    # "--" ends the options: a valid chat id may start with "-".
    ran = _invoke(first, "save", "--remote", url, "--json", "--", *chats)
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    assert ran.summary["pending_push"] == 0
    ran = _invoke(second, "sync", "--pull-only", "--remote", url, "--json", "--", *chats)
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    out = root / "out.jsonl"
    ran = _invoke(second, "export", "--output", str(out), "--json", "--", *chats)
    assert ran.exit_code == 0, ran.stdout + ran.stderr
    # Not splitlines(): it also splits at U+2028, which JSON (and an id) may hold raw.
    back = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    # chatsave reads back what it wrote: the export imports into a third store unchanged.
    third = _home(root, "third")
    ran = _invoke(third, "import", str(out), "--json")
    assert ran.exit_code == 0 and ran.summary["written"] == len(back), ran.stdout + ran.stderr
    again = root / "again.jsonl"
    assert _invoke(third, "export", "--output", str(again)).exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    return back


def _key(x: dict[str, Any]) -> tuple[str, ...]:
    when = datetime.fromisoformat(x["created_at"].replace("Z", "+00:00"))
    return (x["chat_id"], x["id"], x["role"], x["content"], when.isoformat())


@pytest.fixture
def server(make_app: Callable[..., Any], start_server: Callable[[Any], Any]) -> Any:
    return start_server(make_app(faults=Faults()))


def test_tricky_ids_round_trip_exactly_and_stay_out_of_urls(tmp_path: Path, home: Path,
                                                             server: Any) -> None:
    items = [wire(chat, mid, i) for chat in TRICKY_CHAT_IDS
             for i, mid in enumerate(TRICKY_MESSAGE_IDS)]
    back = _round_trip(tmp_path, server.url, items)
    assert sorted(map(_key, back)) == sorted(map(_key, items))
    # Message ids travelled in bodies only; chat ids only percent-encoded in paths.
    paths = [r.path for r in server.faults.log]
    assert paths
    for mid in TRICKY_MESSAGE_IDS:
        if len(mid) > 2 and not mid.isdigit():
            assert not any(mid in p for p in paths), (mid, paths[:5])
    for path in paths:
        assert path.startswith("/api/v1/")
        assert path.count("/") <= 5, path  # /api/v1/chats/{id}/{what}
    # The store holds exactly those ids (SQL parameters, no escaping games).
    import sqlite3

    conn = sqlite3.connect(tmp_path / "second" / "store.db")
    try:
        stored = {(c, i) for c, i in conn.execute("SELECT chat_id, id FROM messages")}
    finally:
        conn.close()
    assert stored == {(x["chat_id"], x["id"]) for x in items}


chat_ids = st.text(alphabet="ABCxyz09._:@~-", min_size=1, max_size=CHAT_ID_MAX).filter(
    lambda c: c not in (".", "..") and c.lower() not in RESERVED_IDS)
message_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
    max_size=MESSAGE_ID_MAX).filter(lambda m: m.strip() != "" and m.lower() not in RESERVED_IDS)


@settings(max_examples=examples(30), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chats=st.lists(chat_ids, min_size=1, max_size=3, unique=True),
       mids=st.lists(message_ids, min_size=1, max_size=6, unique=True))
def test_generated_valid_ids_round_trip_exactly(home: Path, server: Any, chats: list[str],
                                                mids: list[str]) -> None:
    """Any valid ids: what comes back equals what went in. The server is shared between
    examples, so a chat may already hold messages of an earlier one: what is compared is
    the whole chat against everything ever saved to it (content is a function of the ids,
    so an id seen again is the same message)."""
    items = [wire(c, m, i) for c in chats for i, m in enumerate(mids)]
    for x in items:
        server_model.setdefault(x["chat_id"], {})[x["id"]] = _key(x)
    with tempfile.TemporaryDirectory(dir=home) as root:
        back = _round_trip(Path(root), server.url, items)
    expected = sorted(k for c in chats for k in server_model[c].values())
    assert sorted(map(_key, back)) == expected


server_model: dict[str, dict[str, tuple[str, ...]]] = {}


@pytest.fixture(autouse=True)
def _fresh_model() -> None:
    server_model.clear()


# ------------------------------------------------------------- files written from ids
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


AUTOBOT_ORIGINALS = {
    "dotdot": "..", "dot": ".", "parent": "../outside", "deep": "../../x", "abs": "/tmp/x",
    "slash": "a/b", "backslash": "a\\b", "nul": "a\x00b", "rtl": f"x{BIDI}gnp",
    "fullwidth-slash": "ａ／ｂ", "long": "c" * 1000, "query": "a?b#c", "percent": "%2e%2e%2f",
    "tilde": "~", "newline": "a\nb",
}


@pytest.mark.parametrize("name", list(AUTOBOT_ORIGINALS))
def test_autobot_dir_writes_only_inside_its_directory(cli: Any, home: Path, tmp_path: Path,
                                                      name: str) -> None:
    """A chat imported under a hostile id is written back to the file named by that id:
    never outside the directory, even when a file out there has a matching chatId."""
    original = AUTOBOT_ORIGINALS[name]
    chats = tmp_path / "area" / "chats"
    chats.mkdir(parents=True)
    # Bait outside the directory for every path an id could point at.
    bait = {"chatId": original, "name": "outside", "messages": []}
    for place in (tmp_path / "area" / "outside_chat.json", tmp_path / "x_chat.json",
                  tmp_path / "area" / "chat_..json"):
        place.write_text(json.dumps(bait))
    before = _tree(tmp_path / "area") | {"../x_chat.json": (tmp_path / "x_chat.json"
                                                            ).read_bytes()}
    source = jsonl(tmp_path / "in.jsonl", [wire(original, "m1", 1), wire(original, "m2", 2)])
    ran = cli("import", str(source), "--rename-invalid", "--json")
    assert ran.exit_code in (0, 2), ran.stderr
    saved = cli("save", "--all", "--remote", f"autobot-dir:{chats}", "--json")
    assert saved.exit_code != 70 and "Traceback" not in saved.stderr, saved.stderr
    assert shown_safely(saved.stderr), saved.stderr
    after = _tree(tmp_path / "area") | {"../x_chat.json": (tmp_path / "x_chat.json"
                                                           ).read_bytes()}
    changed = {k for k in after if before.get(k) != after[k]}
    assert all(k.startswith("chats/") and k.count("/") == 1 for k in changed), changed
    for path in chats.iterdir():
        assert path.resolve().parent == chats.resolve()
    assert not any(n.startswith(".tmp") for n in os.listdir(chats)), "no temp files left"
