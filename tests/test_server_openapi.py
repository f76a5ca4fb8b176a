"""The OpenAPI schema is the contract: a committed snapshot, and schemathesis over the app.

Regenerate the snapshot after a deliberate change with
``CHATSAVE_UPDATE_OPENAPI=1 pytest tests/test_server_openapi.py`` (or
``python -m chatsave.server.app > tests/data/openapi-v1.json``). A change that is not
backwards compatible needs PROTOCOL_VERSION bumped, which names a new snapshot file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs  # schemathesis 4 validates with it
import pytest
import schemathesis
from schemathesis.checks import negative_data_rejection
from schemathesis.config import SchemathesisConfig

from chatsave.backend.settings import ServerSettings
from chatsave.backend.storage.sqlite import SqliteStorage
from chatsave.protocol import PROTOCOL_VERSION
from chatsave.server.app import create_app, openapi_snapshot
from chatsave.server.tokens import add_token

SNAPSHOT = Path(__file__).parent / "data" / f"openapi-v{PROTOCOL_VERSION}.json"


def test_openapi_snapshot_matches() -> None:
    current = openapi_snapshot()
    if os.environ.get("CHATSAVE_UPDATE_OPENAPI") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(current, encoding="utf-8")
    assert SNAPSHOT.exists(), (
        f"no OpenAPI snapshot for protocol {PROTOCOL_VERSION} ({SNAPSHOT.name}); generate it "
        "with CHATSAVE_UPDATE_OPENAPI=1")
    committed = SNAPSHOT.read_text(encoding="utf-8")
    assert json.loads(committed)["info"]["x-protocol-version"] == PROTOCOL_VERSION
    assert current == committed, (
        "the OpenAPI schema (the protocol contract) changed but PROTOCOL_VERSION did not: "
        "bump it for an incompatible change, or regenerate the snapshot with "
        "CHATSAVE_UPDATE_OPENAPI=1 for a compatible addition")


def test_snapshot_describes_every_route() -> None:
    schema = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert sorted(schema["paths"]) == [
        "/api/chats/{chat_id}/save", "/api/v1/capabilities", "/api/v1/chats",
        "/api/v1/chats/{chat_id}/buckets", "/api/v1/chats/{chat_id}/delete",
        "/api/v1/chats/{chat_id}/messages",
        "/api/v1/chats/{chat_id}/save", "/api/v1/digests", "/api/v1/health",
        "/api/v1/saves"]
    save = schema["paths"]["/api/v1/chats/{chat_id}/save"]["post"]
    assert save["requestBody"]["content"]["application/json"]["schema"]["$ref"] == \
        "#/components/schemas/SaveRequest"
    assert {p["name"] for p in save["parameters"]} == {"chat_id", "Idempotency-Key"}
    for item in schema["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"]["$ref"] == \
                        "#/components/schemas/ErrorEnvelope"
    assert "HTTPValidationError" not in schema["components"]["schemas"]


# -- schemathesis ------------------------------------------------------------------------------

# Per operation and phase (12 before); the coverage phase adds its own cases. 40 keeps
# the schemathesis tests around 10-15 s on 2 cores.
MAX_EXAMPLES = 40
#: the app's max_batch_messages
MAX_BATCH = 20

CONFIG: dict[str, Any] = {
    # "all": valid requests and schema-violating ones; negative_data_rejection checks that
    # the app refuses every schema-violating request (save items aside: item_level_rejection).
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "no-shrink": True,
                   "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        # Valid-looking requests may legitimately answer these (see each operation's
        # responses): an unknown chat is 404, a reused key 409/422, an oversize batch 413.
        "positive_data_acceptance": {
            "expected-statuses": ["2XX", 400, 404, 409, 413, 422]},
    },
    "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
}


class _SchemaApp:
    """The app schemathesis drives (built at import: ``parametrize`` needs the schema then)."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="chatsave-schemathesis-")
        tokens = Path(self.tmp.name) / "tokens.json"
        token = add_token(tokens, "alice")
        self.storage = SqliteStorage(Path(self.tmp.name) / "schemathesis.db")
        settings = ServerSettings(rate_per_s=0, housekeeping_interval_s=0,
                                  max_batch_messages=MAX_BATCH, max_body_bytes=256 * 1024)
        self.app = create_app(self.storage, settings=settings, tokens=tokens)
        config = SchemathesisConfig.from_dict(
            {**CONFIG, "auth": {"openapi": {"bearerAuth": {"bearer": token}}}})
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", self.app, config=config)

    def close(self) -> None:
        self.storage.close()
        self.tmp.cleanup()


TARGET = _SchemaApp()
schema = TARGET.schema


@pytest.fixture(scope="module", autouse=True)
def _close_target() -> Iterator[None]:
    yield
    TARGET.close()


_COMPONENTS = json.loads(SNAPSHOT.read_text(encoding="utf-8"))["components"]


def _validator(schema: dict[str, Any]) -> Any:
    return jsonschema_rs.Draft202012Validator({**schema, "components": _COMPONENTS})


# The saves whose items the schema says are validated one by one, and what an item is.
ITEM_SCHEMAS = {
    "/api/v1/chats/{chat_id}/save": _validator({"$ref": "#/components/schemas/SaveMessage"}),
    "/api/v1/saves": _validator({"$ref": "#/components/schemas/SaveMessage"}),
    "/api/chats/{chat_id}/save": _validator({"type": "object"}),
}
ALIAS = "/api/chats/{chat_id}/save"
SAVES = "/api/v1/saves"
_ALIAS_TOP = _validator({"$ref": "#/components/schemas/AliasSaveRequest"})


def _items(path: str, body: Any) -> list[Any] | None:
    """The items of a save body (the alias save's web shape keeps them under ``data``)."""
    if not isinstance(body, dict):
        return None
    if path == SAVES:  # every chat's items, in order
        parts = body.get("chats")
        if not isinstance(parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("messages"), list) for p in parts):
            return None
        return [item for p in parts for item in p["messages"]]
    data = body.get("data")
    if path == ALIAS and isinstance(data, dict) and "messages" in data:
        body = data
    items = body.get("messages")
    return items if isinstance(items, list) else None


def item_level_rejection(ctx: Any, response: Any, case: Any) -> bool | None:
    """negative_data_rejection, but for save items, which the schema says are validated one
    by one: a batch whose only schema violations are in some items is answered 200, each such
    item is in the answer's ``rejected``, and every item is answered exactly once."""
    validator = ITEM_SCHEMAS.get(case.path)
    items = _items(case.path, case.body)
    if response.status_code == 413 and items is not None and len(items) > MAX_BATCH:
        return True  # the limits are checked before the items (docs/protocol.md, "Limits")
    if (validator is None or items is None or response.status_code != 200
            or case.meta is None or not case.meta.generation.mode.is_negative):
        return negative_data_rejection(ctx, response, case)
    invalid = [item for item in items if not validator.is_valid(item)]
    if not invalid:  # the violation is elsewhere: the request had to be refused as a whole
        return negative_data_rejection(ctx, response, case)
    answer = response.json()
    parts = answer["chats"] if case.path == SAVES else [answer]
    answered = sum(len(p[k]) for p in parts for k in ("saved", "unchanged", "conflicts",
                                                       "rejected"))
    assert answered == len(items), f"{len(items)} items, {answered} answered: {answer}"
    rejected = sum(len(p["rejected"]) for p in parts)
    assert rejected >= len(invalid), (
        f"{len(invalid)} schema-violating items, {rejected} rejected: {answer}")
    return True


@schema.parametrize()
def test_schemathesis(case: Any) -> None:
    case.call_and_validate(excluded_checks=[negative_data_rejection],
                           additional_checks=[item_level_rejection])


@pytest.mark.parametrize("extra", [{"title": {"a": 1}}, {"title": 5}, {"messages": 5},
                                   {"messages": [1]}], ids=repr)
def test_alias_save_refuses_top_level_fields_that_violate_the_schema(
        make_app: Callable[..., Any], asgi_client: Callable[..., Any],
        extra: dict[str, Any]) -> None:
    message = {"id": "m1", "role": "user", "content": "hi",
               "created_at": "2026-01-01T00:00:00.000Z"}
    body = {"data": {"messages": [message]}, **extra}
    assert not _ALIAS_TOP.is_valid(body)
    answer = asgi_client(make_app()).post("/api/chats/c1/save", json=body)
    assert answer.status_code == 422, answer.text
