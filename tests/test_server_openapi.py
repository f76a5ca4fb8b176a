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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from chatsave.remote.protocol import PROTOCOL_VERSION
from chatsave.server.app import create_app, openapi_snapshot
from chatsave.server.service import ServerSettings
from chatsave.server.storage.sqlite import SqliteStorage
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
        "/api/v1/chats/{chat_id}/delete", "/api/v1/chats/{chat_id}/messages",
        "/api/v1/chats/{chat_id}/save", "/api/v1/digests", "/api/v1/health"]
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

CONFIG: dict[str, Any] = {
    "generation": {"max-examples": 12, "mode": "all", "no-shrink": True,
                   "deterministic": True},
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        # Valid-looking requests may legitimately answer these (see each operation's
        # responses): an unknown chat is 404, a reused key 409/422, an oversize batch 413.
        "positive_data_acceptance": {
            "expected-statuses": ["2XX", 400, 404, 409, 413, 422]},
        # Item-level problems are answered per item (200 with "rejected"), by design.
        "negative_data_rejection": {"enabled": False},
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
                                  max_batch_messages=20, max_body_bytes=256 * 1024)
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


@schema.parametrize()
def test_schemathesis(case: Any) -> None:
    case.call_and_validate()
