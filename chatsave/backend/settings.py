"""Server settings: the limits and retention of one server (or embedded backend).

ServerSettings holds the request limits (body, batch, content, header, page and title
sizes), the idempotency and tombstone retention, housekeeping, the per-token rate and the
in-flight bound; each has a safe default and __post_init__ refuses values protocol v1 forbids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Limits and retention of one server (or embedded backend); all have safe defaults."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_messages: int = 1000
    max_content_bytes: int = 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_page: int = 1000
    max_title_chars: int = 1000
    #: finished idempotency records are kept at least this long (the protocol promises 24 h)
    idempotency_retention_s: int = 24 * 3600
    #: tombstones older than this are purged; None (the default) keeps them forever. A
    #: store that has not synced since a tombstone was purged cannot tell the deletion from
    #: a loss (a restore), and sends the message back (docs/reliability.md)
    tombstone_retention_s: float | None = None
    #: how often housekeeping runs (purges the two above); 0 disables it
    housekeeping_interval_s: float = 3600.0
    #: per-token request rate (token bucket, per server process); 0 disables it. A save of
    #: thousands of chats sends one request per chat batch: the default lets one client
    #: do that at full speed while a stampede of many clients is still bounded.
    rate_per_s: float = 500.0
    rate_burst: int = 1000
    #: requests in flight per process before 503 + Retry-After
    max_in_flight: int = 64
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_page < 1000:
            raise ValueError("max_page must be at least 1000 (protocol v1)")
        if self.idempotency_retention_s < 24 * 3600:
            raise ValueError("idempotency_retention_s must be at least 24 h (protocol v1)")
        if self.max_body_bytes < 1024 or self.max_batch_messages < 1:
            raise ValueError("max_body_bytes must be >= 1024 and max_batch_messages >= 1")
