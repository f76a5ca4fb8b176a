"""Server-side storage engines: SQLite (default) and PostgreSQL."""
