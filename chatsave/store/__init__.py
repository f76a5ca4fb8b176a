"""The local store: SQLite file, migrations, process lock."""
