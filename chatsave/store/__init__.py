"""The local store: SQLite file, migrations, process lock, and every query on it (docs/store.md)."""
