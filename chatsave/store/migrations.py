"""The local store's numbered migrations; each runs with its bookkeeping row in one transaction.

A migration that has shipped is never edited: a change is a new migration at the end.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime

from chatsave.errors import StoreNewerError

Migration = Callable[[sqlite3.Connection], None]


def m0001_initial(conn: sqlite3.Connection) -> None:
    """Chats, messages, id mappings, runs (audit) and store metadata."""
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute(
        """CREATE TABLE chats (
            chat_id     TEXT PRIMARY KEY,
            title       TEXT,
            created_at  TEXT,
            updated_at  TEXT NOT NULL
        )"""
    )
    # ord is the local order (rowid): the order messages were first recorded in.
    # A message whose body was evicted by gc keeps its row (a stub): content,
    # metadata, attachments and extra become NULL, the hash, fingerprint and size stay.
    conn.execute(
        """CREATE TABLE messages (
            ord          INTEGER PRIMARY KEY,
            chat_id      TEXT NOT NULL REFERENCES chats(chat_id),
            id           TEXT NOT NULL,
            role         TEXT NOT NULL,
            content      TEXT,
            created_at   TEXT NOT NULL,
            type         TEXT NOT NULL,
            metadata     TEXT,
            attachments  TEXT,
            extra        TEXT,
            inexact      INTEGER NOT NULL DEFAULT 0,
            content_hash TEXT NOT NULL,
            fingerprint  TEXT NOT NULL,
            size         INTEGER NOT NULL,
            evicted      INTEGER NOT NULL DEFAULT 0,
            run_id       INTEGER,
            UNIQUE (chat_id, id)
        )"""
    )
    conn.execute("CREATE INDEX messages_chat_ord ON messages (chat_id, ord)")
    conn.execute(
        """CREATE TABLE id_mappings (
            kind        TEXT NOT NULL,
            original    TEXT NOT NULL,
            mapped      TEXT NOT NULL,
            source      TEXT,
            created_at  TEXT NOT NULL,
            run_id      INTEGER,
            PRIMARY KEY (kind, original),
            UNIQUE (kind, mapped)
        )"""
    )
    conn.execute(
        """CREATE TABLE runs (
            run_id       INTEGER PRIMARY KEY AUTOINCREMENT,
            command      TEXT NOT NULL,
            args         TEXT NOT NULL,
            started_at   TEXT NOT NULL,
            finished_at  TEXT,
            exit_code    INTEGER,
            summary      TEXT,
            pid          INTEGER NOT NULL,
            host         TEXT NOT NULL,
            version      TEXT NOT NULL
        )"""
    )


def m0002_sync(conn: sqlite3.Connection) -> None:
    """Per-backend state: backends, message states, outbox, tombstones, trash, chat sync state."""
    conn.execute(
        """CREATE TABLE backends (
            backend_id   TEXT PRIMARY KEY,
            url          TEXT NOT NULL,
            first_seen   TEXT NOT NULL,
            last_seen    TEXT NOT NULL,
            last_sync    TEXT
        )"""
    )
    # What one backend said about one message; a live message with no 'confirmed' row
    # carrying its current hash is pending for that backend.
    conn.execute(
        """CREATE TABLE remote_state (
            backend_id   TEXT NOT NULL,
            chat_id      TEXT NOT NULL,
            id           TEXT NOT NULL,
            state        TEXT NOT NULL
                         CHECK (state IN ('confirmed', 'conflict', 'rejected', 'deleted')),
            rev          INTEGER,
            content_hash TEXT,
            reason       TEXT,
            updated_at   TEXT NOT NULL,
            PRIMARY KEY (backend_id, chat_id, id)
        ) WITHOUT ROWID"""
    )
    # Every write request is recorded here, with its exact body and Idempotency-Key,
    # before it is first sent; a rerun re-sends the same body under the same key.
    conn.execute(
        """CREATE TABLE outbox (
            batch_id        INTEGER PRIMARY KEY AUTOINCREMENT,
            backend_id      TEXT NOT NULL,
            chat_id         TEXT NOT NULL,
            kind            TEXT NOT NULL CHECK (kind IN ('save', 'delete')),
            idempotency_key TEXT NOT NULL UNIQUE,
            body            BLOB NOT NULL,
            message_ids     TEXT NOT NULL,
            state           TEXT NOT NULL DEFAULT 'open'
                            CHECK (state IN ('open', 'done', 'abandoned')),
            attempts        INTEGER NOT NULL DEFAULT 0,
            last_error      TEXT,
            created_at      TEXT NOT NULL,
            updated_at      TEXT NOT NULL,
            run_id          INTEGER
        )"""
    )
    conn.execute("CREATE INDEX outbox_open ON outbox (backend_id, state, chat_id)")
    conn.execute(
        """CREATE TABLE tombstones (
            chat_id      TEXT NOT NULL,
            id           TEXT NOT NULL,
            content_hash TEXT,
            deleted_at   TEXT NOT NULL,
            reason       TEXT,
            run_id       INTEGER,
            PRIMARY KEY (chat_id, id)
        ) WITHOUT ROWID"""
    )
    conn.execute(
        """CREATE TABLE trash (
            trash_id     INTEGER PRIMARY KEY AUTOINCREMENT,
            chat_id      TEXT NOT NULL,
            id           TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            message      TEXT NOT NULL,
            deleted_at   TEXT NOT NULL,
            reason       TEXT,
            run_id       INTEGER
        )"""
    )
    conn.execute("CREATE INDEX trash_run ON trash (run_id)")
    conn.execute(
        """CREATE TABLE sync_state (
            backend_id   TEXT NOT NULL,
            chat_id      TEXT NOT NULL,
            version      INTEGER,
            digest       TEXT,
            synced_at    TEXT NOT NULL,
            PRIMARY KEY (backend_id, chat_id)
        ) WITHOUT ROWID"""
    )


def m0003_current_chat(conn: sqlite3.Connection) -> None:
    """The user's current chat in the browser (a dump's currentSessionId), for the export."""
    # One row per place that has a current chat; today only the browser ('browser').
    conn.execute(
        """CREATE TABLE current_chat (
            place        TEXT PRIMARY KEY,
            chat_id      TEXT NOT NULL,
            source       TEXT,
            recorded_at  TEXT NOT NULL,
            run_id       INTEGER
        ) WITHOUT ROWID"""
    )


def m0004_backend_checks(conn: sqlite3.Connection) -> None:
    """What a save last found a backend holding of what it confirmed, per chat."""
    # A chat other stores write to too: its backend digest differs from the digest of
    # what this store saw confirmed there, so the check reads its messages. Once they held
    # everything confirmed, the pair of digests is kept: while neither changes, they
    # still do, and the chat is not read again.
    conn.execute(
        """CREATE TABLE backend_checks (
            backend_id       TEXT NOT NULL,
            chat_id          TEXT NOT NULL,
            backend_digest   TEXT NOT NULL,
            confirmed_digest TEXT NOT NULL,
            checked_at       TEXT NOT NULL,
            PRIMARY KEY (backend_id, chat_id)
        ) WITHOUT ROWID"""
    )
    # The few confirmations carrying a note (sent again after they vanished): found
    # without reading every confirmation.
    conn.execute("CREATE INDEX remote_state_noted ON remote_state (backend_id, chat_id)"
                 " WHERE state = 'confirmed' AND reason IS NOT NULL")


def m0005_compact_hashes(conn: sqlite3.Connection) -> None:
    """Confirmations keyed by a backend's number, hashes and fingerprints as bytes.

    ``remote_state`` holds a row per message and backend: its backend id (36 characters)
    becomes ``backends.backend_key``, and its content hash 32 bytes instead of 64 hex
    digits, as do the messages' fingerprints (docs/store.md, "Size"). The columns keep
    their declared TEXT type: SQLite keeps a BLOB in them as it is.
    """
    from chatsave.store.base import hash_value

    conn.create_function("chatsave_hash_value", 1, hash_value, deterministic=True)
    conn.execute(
        """CREATE TABLE backends_v5 (
            backend_key  INTEGER PRIMARY KEY,
            backend_id   TEXT NOT NULL UNIQUE,
            url          TEXT NOT NULL,
            first_seen   TEXT NOT NULL,
            last_seen    TEXT NOT NULL,
            last_sync    TEXT
        )"""
    )
    conn.execute("INSERT INTO backends_v5 (backend_id, url, first_seen, last_seen, last_sync)"
                 " SELECT backend_id, url, first_seen, last_seen, last_sync FROM backends"
                 " ORDER BY first_seen, backend_id")
    # A confirmation of a backend with no row of its own (none is written that way) keeps
    # its backend, under an empty URL, rather than being dropped.
    conn.execute("INSERT OR IGNORE INTO backends_v5 (backend_id, url, first_seen, last_seen)"
                 " SELECT DISTINCT backend_id, '', MIN(updated_at), MAX(updated_at)"
                 " FROM remote_state GROUP BY backend_id")
    conn.execute("DROP TABLE backends")
    conn.execute("ALTER TABLE backends_v5 RENAME TO backends")
    conn.execute(
        """CREATE TABLE remote_state_v5 (
            backend_key  INTEGER NOT NULL,
            chat_id      TEXT NOT NULL,
            id           TEXT NOT NULL,
            state        TEXT NOT NULL
                         CHECK (state IN ('confirmed', 'conflict', 'rejected', 'deleted')),
            rev          INTEGER,
            content_hash TEXT,
            reason       TEXT,
            updated_at   TEXT NOT NULL,
            PRIMARY KEY (backend_key, chat_id, id)
        ) WITHOUT ROWID"""
    )
    conn.execute("INSERT INTO remote_state_v5 SELECT b.backend_key, r.chat_id, r.id, r.state,"
                 " r.rev, chatsave_hash_value(r.content_hash), r.reason, r.updated_at"
                 " FROM remote_state r JOIN backends b USING (backend_id)")
    conn.execute("DROP TABLE remote_state")
    conn.execute("ALTER TABLE remote_state_v5 RENAME TO remote_state")
    conn.execute("CREATE INDEX remote_state_noted ON remote_state (backend_key, chat_id)"
                 " WHERE state = 'confirmed' AND reason IS NOT NULL")
    conn.execute("UPDATE messages SET fingerprint = chatsave_hash_value(fingerprint)")


MIGRATIONS: tuple[tuple[int, str, Migration], ...] = (
    (1, "initial", m0001_initial),
    (2, "sync", m0002_sync),
    (3, "current_chat", m0003_current_chat),
    (4, "backend_checks", m0004_backend_checks),
    (5, "compact_hashes", m0005_compact_hashes),
)
LATEST = MIGRATIONS[-1][0]


def current_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, *, target: int = LATEST, path: str = "") -> int:
    """Bring the schema to ``target``; return the version found before. Refuse a newer store."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    found = current_version(conn)
    if found > LATEST:
        raise StoreNewerError(
            f"the store {path} has schema version {found}, newer than this chatsave "
            f"understands ({LATEST})",
            hint="upgrade chatsave (pip install -U chatsave), or use another --store",
        )
    for version, name, func in MIGRATIONS:
        if version <= found or version > target:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-check inside the transaction: another process may have migrated meanwhile.
            if current_version(conn) >= version:
                conn.execute("ROLLBACK")
                continue
            func(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, datetime.now(UTC).isoformat()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found
