"""The ``autobot+http://`` remote against the fake AutoBot: diff, save, sync and delete stay honest.

Never a message lost, and every message AutoBot itself dropped, merged or moved reported
(exit 4) and kept here; what AutoBot cannot do refused (exit 9); a failed load never
mistaken for an empty chat (exit 5).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatsave.errors import ExitCode, UsageError
from chatsave.model import Message
from chatsave.ops.diff import diff
from chatsave.ops.save import SaveOptions, save
from chatsave.ops.sync import SyncOptions, sync
from chatsave.remote import open_remote
from chatsave.remote.autobot.http import AutobotRemote
from chatsave.remote.autobot.shapes import AutobotGuard, AutobotUnsupported, FailedLoadError
from chatsave.remote.retry import RetryPolicy
from chatsave.store.store import Store
from tests.autobot_fake import FakeAutobot
from tests.conftest import Ran, examples

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
def fake(tmp_path: Path, start_server: Callable[[Any], Any]) -> FakeAutobot:
    return FakeAutobot(tmp_path / "chats").serve(start_server)


@pytest.fixture
def connect(fake: FakeAutobot) -> Iterator[Callable[[], AutobotRemote]]:
    """New remotes onto the fake (a run that fails closes its remote, as the CLI's does)."""
    opened: list[AutobotRemote] = []

    def factory() -> AutobotRemote:
        opened.append(AutobotRemote(fake.remote, policy=FAST))
        return opened[-1]

    yield factory
    for r in opened:
        r.close()


@pytest.fixture
def remote(connect: Callable[[], AutobotRemote]) -> AutobotRemote:
    return connect()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store.db")
    yield s
    s.close()


def naive(minute: float) -> str:
    return (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%d %H:%M:%S")


def stored_user(mid: str, text: str, minute: float) -> dict[str, Any]:
    return {"id": mid, "sender": "user", "text": text, "messageType": "default",
            "metadata": None, "timestamp": naive(minute)}


def stored_reply(mid: str, text: str, minute: float, type_: str = "llm_response",
                 sender: str = "assistant") -> dict[str, Any]:
    return {"id": mid, "sender": sender, "text": text, "messageType": type_,
            "metadata": None, "timestamp": naive(minute)}


def msg(chat: str, mid: str, text: str, minute: float, role: str = "user",
        type_: str = "message", metadata: dict[str, Any] | None = None) -> Message:
    return Message(chat_id=chat, id=mid, role=role, content=text, type=type_,  # type: ignore[arg-type]
                   metadata=metadata or {}, created_at=T0 + timedelta(minutes=minute))


def add(store: Store, *messages: Message, title: str | None = None) -> None:
    with store.transaction():
        for m in messages:
            store.upsert_chat(m.chat_id, title)
            store.add_messages(m.chat_id, [m])


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **fields: Any) -> None:
        self.items.append((type_, fields))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f for t, f in self.items if t == type_]

    def symbols(self) -> dict[str, str]:
        return {f["id"]: f["symbol"] for f in self.of("item")}


def symbols(store: Store, remote: AutobotRemote, chat: str) -> dict[str, str]:
    events = Events()
    diff(store, remote, [chat], emit=events)
    every = {mid: "=" for mid, _ in store.message_keys(chat)}
    every.update(events.symbols())
    return every


# ------------------------------------------------------------------------ reading


@pytest.mark.parametrize("shape", ["envelope", "bare", "chats"])
def test_lists_every_list_shape_and_maps_invalid_ids(fake: FakeAutobot, remote: AutobotRemote,
                                                    shape: str) -> None:
    fake.list_shape = shape
    fake.put("c1", [stored_user("u1", "hi", 0)], name="Demo")
    fake.put("null", [stored_user("u2", "did this get saved?", 0)])
    caps = remote.capabilities()
    assert caps.server == "autobot" and "delete_messages" not in caps.features
    chats = {c.chat_id: c for c in remote.list_chats().chats}
    assert set(chats) == {"c1", remote.ids.local("null")}
    assert remote.ids.local("null").startswith("null~")
    assert chats["c1"].message_count == 1 and chats["c1"].version > 0
    page = remote.messages(remote.ids.local("null"))
    assert [m.content for m in page.messages] == ["did this get saved?"]


def test_reads_every_message_through_the_export(fake: FakeAutobot, remote: AutobotRemote,
                                                store: Store) -> None:
    fake.put("big", [stored_user(f"u{i}", f"message {i}", i) for i in range(250)])
    add(store, *[msg("big", f"u{i}", f"message {i}", i) for i in range(250)])
    assert set(symbols(store, remote, "big").values()) == {"="}
    assert not any(p == "/api/chat/sessions/big" for _, p in fake.log)  # never the capped page


def test_identity_same_id_role_and_text_is_the_same_message(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    fake.put("c1", [stored_user("u1", "list files", 0),
                    stored_reply("a1", "file1 file2", 0.1),
                    stored_reply("a2", "old text", 5)])
    add(store,
        # milliseconds the backend's own form cannot hold, and the web client's time
        Message(chat_id="c1", id="u1", role="user", content="list files",
                created_at=T0 + timedelta(milliseconds=120)),
        # the web client's type alias and metadata
        msg("c1", "a1", "file1 file2", 0.1, "assistant", "response", {"version": 14}),
        msg("c1", "a2", "new text", 5, "assistant", "llm_response"))
    assert symbols(store, remote, "c1") == {"u1": "=", "a1": "=", "a2": "*"}


def test_an_empty_answer_for_a_listed_chat_is_a_failed_load(
        fake: FakeAutobot, remote: AutobotRemote, store: Store,
        connect: Callable[[], AutobotRemote]) -> None:
    fake.put("c1", [stored_user("u1", "q", 0), stored_reply("a1", "answer", 0.1),
                    {**stored_reply("a2", "more", 0.5, "response"),
                     "timestamp": "2026-03-01T10:00:30.000Z"}])
    add(store, msg("c1", "u1", "q", 0), msg("c1", "n1", "new here", 9))
    with pytest.raises(FailedLoadError) as caught:
        remote.messages("c1")
    assert caught.value.exit_code == ExitCode.GUARD
    assert "3 message(s)" in caught.value.message
    result = diff(store, remote, ["c1"])
    assert result.exit_code == ExitCode.GUARD and result.report[0].error
    with pytest.raises(AutobotGuard):
        save(store, remote, ["c1"], SaveOptions())
    assert len(fake.stored("c1")) == 3  # never saved on top of it
    # The batch was closed (rejected, kept here): the next run is not blocked by it.
    again = save(store, connect(), ["c1"], SaveOptions())
    assert again.exit_code == ExitCode.REJECTED and again.counters["rejected"] == 2
    assert len(fake.stored("c1")) == 3


# ------------------------------------------------------------------------- saving


def test_save_sends_the_full_list_as_stored_and_confirms_by_reading_back(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    """What chatsave did not change goes back byte for byte; what it adds carries AutoBot's
    own time form (plus milliseconds), so AutoBot's text sort keeps true time order, also
    after AutoBot appends its own next message."""
    a1 = {"id": "a1", "content": "file1 file2", "sender": "assistant", "type": "response",
          "timestamp": "2026-03-01 10:00:07", "status": "sent"}
    fake.put("c1", [stored_user("u1", "list files", 0), a1], name="Demo")
    before = fake.stored("c1")
    add(store, msg("c1", "u1", "list files", 0), msg("c1", "u2", "thanks", 3),
        msg("c1", "a2", "you are welcome", 3.2, "assistant", "llm_response"),
        msg("c1", "u3", "and the time?", 4).model_copy(
            update={"created_at": T0 + timedelta(minutes=4, milliseconds=250)}), title="Demo")
    result = save(store, remote, ["c1"], SaveOptions())
    assert result.exit_code == ExitCode.OK, result.summary()
    assert result.counters["written"] == 3 and result.counters["unchanged"] == 1
    stored = fake.stored("c1")
    assert stored[:2] == before  # AutoBot's own messages, exactly as they were
    assert [m["id"] for m in stored] == ["u1", "a1", "u2", "a2", "u3"]
    assert [m["timestamp"] for m in stored[2:]] == [naive(3), naive(3.2),
                                                   "2026-03-01 10:04:00.250"]
    assert json.loads(fake.new_path("c1").read_text())["name"] == "Demo"
    assert symbols(store, remote, "c1") == {"u1": "=", "u2": "=", "a2": "=", "u3": "=",
                                            "a1": "-"}
    # AutoBot appends its next message in its own form; its text sort is still time order.
    fake.clock = lambda: T0 + timedelta(minutes=4, seconds=1)
    http = httpx.Client(base_url=fake.url)
    http.post("/api/chats/c1/message", json={"message": "what time is it?"}).raise_for_status()
    http.close()
    shown = fake.load_session("c1")
    assert [m.get("id") for m in shown][:5] == ["u1", "a1", "u2", "a2", "u3"]
    assert [m["timestamp"] for m in shown] == sorted(m["timestamp"] for m in shown)
    assert [m["text"] for m in shown[5:]] == ["what time is it?", "You said: what time is it?"]


def test_save_never_trusts_the_200(fake: FakeAutobot, remote: AutobotRemote,
                                   store: Store) -> None:
    add(store, msg("c1", "u1", "hello", 0), msg("c1", "a1", "hi", 0.1, "assistant"))
    fake.fail_writes = True
    events = Events()
    result = save(store, remote, ["c1"], SaveOptions(), emit=events)
    assert result.exit_code == ExitCode.REJECTED
    assert {e["id"] for e in events.of("rejected")} == {"u1", "a1"}
    assert all("read back" in e["reason"] for e in events.of("rejected"))
    assert store.counts("c1")["messages"] == 2  # kept here
    fake.fail_writes = False
    again = save(store, remote, ["c1"], SaveOptions(retry_rejected=True))
    assert again.exit_code == ExitCode.OK and again.counters["written"] == 2
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "a1"]


def test_what_autobot_would_drop_is_not_sent_and_reported(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    fake.put("c1", [stored_user("u1", "yes", 0), stored_reply("a1", "done, all of it", 0.2),
                    stored_user("u2", "what next?", 10)])
    add(store,
        msg("c1", "u3", "yes", 20),  # a person's repeat: AutoBot's loader keeps the first
        msg("c1", "a2", "a much longer answer than the one before", 0.5, "assistant",
            "llm_response"),  # would make AutoBot drop a1 (within 120 s, longer)
        msg("c1", "a3", "short", 10.5, "assistant", "response"),
        msg("c1", "u4", "fine", 30))
    events = Events()
    result = save(store, remote, ["c1"], SaveOptions(), emit=events)
    assert result.exit_code == ExitCode.REJECTED
    reasons = {e["id"]: e["reason"] for e in events.of("rejected")}
    assert set(reasons) == {"u3", "a2"}
    assert "first user message" in reasons["u3"] and "(u1)" in reasons["u3"]
    assert "drop a1" in reasons["a2"]
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "a1", "u2", "a3", "u4"]
    assert store.counts("c1")["messages"] == 4  # everything kept here
    assert symbols(store, remote, "c1")["u3"] == "+"


def test_a_chat_any_save_would_damage_is_refused(fake: FakeAutobot, remote: AutobotRemote,
                                                 store: Store) -> None:
    # The backend persisted a command and its output 4 s apart: AutoBot's /save merge
    # collapses them to the longest, whoever saves.
    fake.put("c1", [stored_user("u1", "list files", 0),
                    stored_reply("t1", "ls", 0.05, "terminal_command", "system"),
                    stored_reply("t2", "file1\nfile2", 0.1, "terminal_output", "system")])
    add(store, msg("c1", "u2", "thanks", 5))
    with pytest.raises(AutobotGuard) as caught:
        save(store, remote, ["c1"], SaveOptions())
    assert caught.value.exit_code == ExitCode.GUARD and "t1" in caught.value.message
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "t1", "t2"]


def test_save_retries_a_failing_backend_without_duplicates(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    add(store, msg("c1", "u1", "hello", 0), msg("c1", "a1", "hi there", 0.1, "assistant"))
    fake.faults.append(("POST", "/save", 500))
    fake.faults.append(("GET", "/export", 503))
    result = save(store, remote, ["c1"], SaveOptions())
    assert result.exit_code == ExitCode.OK and result.counters["retried"] == 2
    again = save(store, remote, ["c1"], SaveOptions())
    assert again.exit_code == ExitCode.OK and again.counters["written"] == 0
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "a1"]


def test_a_message_autobot_would_show_out_of_order_is_not_written(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    # A chat already mixing time forms (the web client's ISO time sorts after AutoBot's
    # own form of the same day): left as it is, and a message that would land on the wrong
    # side of another is not written, with the reason.
    fake.put("c1", [{"sender": "terminal", "text": "boot", "messageType": "default",
                     "timestamp": "2026-03-01T10:00:00.000Z"}])
    before = fake.new_path("c1").read_bytes()
    add(store, msg("c1", "u1", "after the boot", 30))
    events = Events()
    result = save(store, remote, ["c1"], SaveOptions(), emit=events)
    assert result.exit_code == ExitCode.REJECTED
    [rejected] = events.of("rejected")
    assert rejected["id"] == "u1" and "out of order" in rejected["reason"]
    assert "doctor --repair" in rejected["reason"]
    assert fake.new_path("c1").read_bytes() == before
    assert store.counts("c1")["messages"] == 1  # kept here


# ------------------------------------------------------------------ sync, delete


def test_sync_pulls_pushes_and_then_agrees(fake: FakeAutobot, remote: AutobotRemote,
                                           store: Store) -> None:
    fake.put("c1", [stored_user("u1", "from the browser", 0),
                    {"sender": "bot", "text": "Hello! How can I assist you today?",
                     "messageType": "response", "rawData": None,
                     "timestamp": naive(-1)}])
    add(store, msg("c1", "u2", "from the dump", 5))
    first = sync(store, remote, None, SyncOptions())
    assert first.exit_code == ExitCode.OK, first.summary()
    assert first.counters["pulled"] == 2 and first.counters["written"] == 1
    assert store.counts("c1")["messages"] == 3
    again = sync(store, remote, None, SyncOptions())
    assert again.exit_code == ExitCode.OK and again.counters["written"] == 0
    assert symbols(store, remote, "c1") == {m: "=" for m, _ in store.message_keys("c1")}
    # The greeting kept its place and shape; the backend holds 3 messages once each.
    assert len(fake.stored("c1")) == 3 and fake.stored("c1")[0]["sender"] == "bot"


def test_overwriting_and_deleting_single_messages_are_refused(
        fake: FakeAutobot, store: Store, connect: Callable[[], AutobotRemote]) -> None:
    fake.put("c1", [stored_user("u1", "q", 0), stored_reply("a1", "backend text", 0.2)])
    add(store, msg("c1", "u1", "q", 0), msg("c1", "a1", "local text", 0.2, "assistant"))
    with pytest.raises(AutobotUnsupported) as caught:
        sync(store, connect(), ["c1"], SyncOptions(prefer="local"))
    assert caught.value.exit_code == ExitCode.REFUSED and "autobot-dir" in str(caught.value.hint)
    from chatsave.ops.delete import delete

    delete(store, "c1", ["u1"])
    with pytest.raises(AutobotUnsupported) as refused:
        save(store, connect(), ["c1"], SaveOptions())
    assert "single" in refused.value.message
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "a1"]
    # Closed, not blocking: the next save goes through.
    assert save(store, connect(), ["c1"], SaveOptions()).exit_code == ExitCode.REJECTED


def test_deleting_a_whole_chat_uses_the_sessions_endpoint(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    fake.put("c1", [stored_user("u1", "q", 0), stored_reply("a1", "answer", 0.2)])
    sync(store, remote, ["c1"], SyncOptions())
    from chatsave.ops.delete import delete

    delete(store, "c1", ["u1", "a1"])
    result = save(store, remote, ["c1"], SaveOptions())
    assert result.exit_code == ExitCode.OK and result.counters["deleted_remote"] == 2
    assert fake.read_doc("c1") is None
    assert ("DELETE", "/api/chat/sessions/c1") in fake.log
    assert ("DELETE", "/api/chats/c1") not in fake.log


def test_writes_go_back_to_the_original_invalid_id(fake: FakeAutobot, remote: AutobotRemote,
                                                   store: Store) -> None:
    fake.put("null", [stored_user("u1", "did this get saved?", 0)])
    mapped = remote.ids.local("null")
    add(store, msg(mapped, "u2", "and this?", 1))
    sync(store, remote, [mapped], SyncOptions())
    assert [m["id"] for m in fake.stored("null")] == ["u1", "u2"]
    assert sorted(p.name for p in fake.dir.iterdir()) == ["null_chat.json"]


# ---------------------------------------------------------------- the front door


def test_cli_diff_save_and_the_token(cli: Callable[..., Ran], tmp_path: Path,
                                     start_server: Callable[[Any], Any], home: Path) -> None:
    fake = FakeAutobot(tmp_path / "secured", token="jwt-secret").serve(start_server)
    fake.put("c1", [stored_user("u1", "hello", 0)])
    dump = tmp_path / "c1.jsonl"
    dump.write_text(json.dumps(msg("c1", "u2", "again", 1).to_wire()) + "\n")
    assert cli("import", str(dump)).exit_code == 0
    refused = cli("diff", "c1", "--remote", fake.remote, "--json")
    assert refused.exit_code == ExitCode.REFUSED
    assert "token" in refused.summary["error"]["hint"].lower()
    token = tmp_path / "token"
    token.write_text("jwt-secret\n")
    token.chmod(0o600)
    ran = cli("diff", "c1", "--remote", fake.remote, "--token-file", str(token), "--json")
    assert ran.exit_code == ExitCode.DIFFERENCES
    assert ran.summary["pending_push"] == 1 and ran.summary["pending_pull"] == 1
    saved = cli("save", "c1", "--remote", fake.remote, "--token-file", str(token), "--json")
    assert saved.exit_code == 0, saved.stdout + saved.stderr
    assert [m["id"] for m in fake.stored("c1")] == ["u1", "u2"]
    for each in (refused, ran, saved):
        assert "jwt-secret" not in each.stdout + each.stderr
    assert not any(b"jwt-secret" in p.read_bytes() for p in home.rglob("*") if p.is_file())


def test_open_remote_kinds(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATSAVE_TZ", "Europe/Berlin")
    with open_remote("autobot+http://127.0.0.1:9") as r:
        assert isinstance(r, AutobotRemote) and str(r.tz) == "Europe/Berlin"
    with pytest.raises(UsageError):
        open_remote("autobot+http://127.0.0.1:9/?tz=UTC")
    with pytest.raises(UsageError):
        open_remote(f"autobot-dir:{tmp_path / 'missing'}")
    with pytest.raises(UsageError):
        open_remote("autobot+ftp://host")


# ------------------------------------------------------------------ the property

_TEXTS = ["yes", "ok", "a longer answer here", "ls", "file1\nfile2"]
_TYPES = ["default", "llm_response", "response", "terminal_output"]


@st.composite
def _stored(draw: Any, n: int) -> dict[str, Any]:
    second = draw(st.integers(0, 600))
    out: dict[str, Any] = {"sender": draw(st.sampled_from(["user", "assistant", "system"])),
                           "text": draw(st.sampled_from(_TEXTS)),
                           "messageType": draw(st.sampled_from(_TYPES)),
                           "timestamp": naive(second / 60)}
    if draw(st.integers(0, 4)) == 0:
        out["timestamp"] = (T0 + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if draw(st.booleans()):
        out["id"] = f"b{n}"
    return out


@st.composite
def _local(draw: Any, n: int) -> dict[str, Any]:
    return {"id": draw(st.sampled_from([f"b{n}", f"l{n}"])),
            "role": draw(st.sampled_from(["user", "assistant", "system"])),
            "text": draw(st.sampled_from(_TEXTS)), "type": draw(st.sampled_from(_TYPES)),
            "second": draw(st.integers(0, 600))}


def _shown(chat: str, raws: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    from chatsave.remote.autobot.shapes import read_items

    return {(i.msg.id, i.msg.role, i.msg.content) for i in read_items(chat, raws, UTC)
            if i.msg is not None}


@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_save_never_loses_a_message_and_reports_every_one_it_could_not_save(
        fake: FakeAutobot, connect: Callable[[], AutobotRemote], tmp_path: Path,
        data: st.DataObject) -> None:
    import uuid

    chat = f"p{uuid.uuid4().hex[:10]}"
    backend = [data.draw(_stored(n)) for n in range(data.draw(st.integers(0, 6)))]
    wanted = {d["id"]: d for d in (data.draw(_local(n))
                                   for n in range(data.draw(st.integers(1, 6))))}
    fake.put(chat, backend)
    # AutoBot's dedupe on load is not idempotent (a sort can make two replies adjacent that
    # were not): any read, the web client's too, may drop more. Start from a settled chat.
    settled = fake.load_session(chat)
    for _ in range(len(backend) + 1):
        again = fake.load_session(chat)
        if again == settled:
            break
        settled = again
    before = _shown(chat, settled)
    file_before = fake.new_path(chat).read_bytes()
    local = [Message(chat_id=chat, id=d["id"], role=d["role"], content=d["text"],
                     type=d["type"], created_at=T0 + timedelta(seconds=d["second"]))
             for d in wanted.values()]
    with Store.open(tmp_path / f"{chat}.db") as store:
        add(store, *local)
        refused = None
        try:
            save(store, connect(), [chat], SaveOptions())
        except (AutobotGuard, AutobotUnsupported) as exc:
            refused = exc
        after = _shown(chat, fake.load_session(chat))
        if refused is not None:
            assert fake.new_path(chat).read_bytes() == file_before
        assert before <= after, "the save made AutoBot lose a message it held"
        states = {s: store.conn.execute(
            "SELECT id, state FROM remote_state WHERE chat_id = ?", (chat,)).fetchall()
            for s in (0,)}[0]
        state = dict(states)
        for m in local:
            assert store.get_message(chat, m.id) is not None  # always kept here
            if state.get(m.id) == "confirmed":
                assert (m.id, m.role, m.content) in after
            elif refused is None:
                assert state.get(m.id) in ("rejected", "conflict"), (m.id, state)


def test_a_message_chatsave_cannot_read_is_kept_and_never_replaced(
        fake: FakeAutobot, remote: AutobotRemote, store: Store) -> None:
    # The shape POST /api/chat leaves behind: the session id as sender, a dict as text.
    weird = {"id": "x1", "sender": "3f2b9c1e-8a4d-4c2b-9f1e-2d7a6b5c4e3f",
             "text": {"content": "hi", "role": "user"}, "messageType": "default",
             "timestamp": naive(0)}
    fake.put("c1", [weird, stored_user("u1", "hello", 1)])
    assert [m.id for m in remote.messages("c1").messages] == ["u1"]
    add(store, msg("c1", "x1", "my version", 0), msg("c1", "u2", "more", 2))
    events = Events()
    result = save(store, remote, ["c1"], SaveOptions(), emit=events)
    assert result.exit_code == ExitCode.CONFLICTS
    assert [e["id"] for e in events.of("conflict")] == ["x1"]
    stored = fake.stored("c1")
    assert weird in stored and [m.get("id") for m in stored] == ["x1", "u1", "u2"]


def test_a_chat_is_never_pushed_past_autobots_message_cap(
        tmp_path: Path, start_server: Callable[[Any], Any], store: Store) -> None:
    small = FakeAutobot(tmp_path / "small", max_messages=5).serve(start_server)
    small.put("c1", [stored_user(f"u{i}", f"message {i}", i) for i in range(4)])
    add(store, *[msg("c1", f"n{i}", f"new {i}", 10 + i) for i in range(3)])
    with AutobotRemote(small.remote, policy=FAST) as remote:
        remote.max_messages = 5
        events = Events()
        result = save(store, remote, ["c1"], SaveOptions(), emit=events)
    assert result.exit_code == ExitCode.REJECTED and result.counters["written"] == 1
    assert {e["id"] for e in events.of("rejected")} == {"n1", "n2"}
    assert all("at most 5" in e["reason"] for e in events.of("rejected"))
    assert [m["id"] for m in small.stored("c1")] == ["u0", "u1", "u2", "u3", "n0"]
