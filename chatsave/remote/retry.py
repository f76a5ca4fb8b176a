"""When to retry: full-jitter exponential backoff, Retry-After, a rate limit, a breaker."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

# Statuses worth another attempt (the request may succeed later); all others are final.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: final 4xx statuses of a write that are about the endpoint, the credentials, the way
#: there (a proxy's 407, 421, 426, 431) or the size (split and send again), not the
#: backend's verdict on the batch
NOT_THE_BATCH = frozenset({401, 403, 404, 405, 407, 413, 421, 426, 431})


#: a chatsave server's codes for a write whose Idempotency-Key header it cannot take: about
#: how this client writes (every batch would meet it), so a refusal of the run, not a batch's
KEY_REFUSALS = frozenset({"idempotency_key_missing", "idempotency_key_invalid"})


def rejects_batch(status: int, code: str | None = None) -> bool:
    """Whether a final answer to a save or delete says the backend can never take that
    batch (400, 410, 422, ...): its messages are recorded as rejected (exit 4), never
    retried as if the backend were down. ``code``: the error envelope's code, if any."""
    return (400 <= status < 500 and status not in RETRYABLE_STATUS
            and status not in NOT_THE_BATCH and code not in KEY_REFUSALS)


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff (AWS architecture blog), capped, bounded in attempts."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    # Never wait longer than this for one Retry-After (a server asking for an hour
    # ends the attempt; the run reports pending work instead of hanging).
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None,
              rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

        A Retry-After is a floor, and the jitter goes on top of it: clients told the same
        Retry-After (a 9:00 cron wave) must not all come back in the same instant."""
        draw = (rng or random).uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))
        if retry_after is not None:
            return retry_after + draw
        return draw


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass
class RateLimiter:
    """At most ``rate`` request starts per second across threads (None: unlimited)."""

    rate: float | None = None
    _next: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + 1.0 / self.rate
        if start > now:
            time.sleep(start - now)


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures, so a run stops hammering a dead backend."""

    threshold: int = 5
    failures: int = 0

    @property
    def open(self) -> bool:
        return self.failures >= self.threshold

    def success(self) -> None:
        self.failures = 0

    def failure(self) -> None:
        self.failures += 1
