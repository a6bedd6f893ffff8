"""Pure delivery rules: what an answer of the notification service means, and when to try again."""

from __future__ import annotations

import datetime as dt
import email.utils
import random

MAX_BACKOFF_SECONDS = 3600.0
RETRYABLE_STATUSES = frozenset({408, 429})


def is_retryable_status(status: int) -> bool:
    """408, 429 and every 5xx are worth another try; other 4xx (and unfollowed 3xx) are final."""
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def backoff_seconds(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Exponential backoff from ``base`` for the given (1-based) attempt, with jitter in [50%, 100%]
    so that a burst of failures does not come back as one burst; capped at one hour."""
    ceiling = min(MAX_BACKOFF_SECONDS, base * (2 ** max(0, attempt - 1)))
    jitter: float = (rng or random).random()
    return float(ceiling * (0.5 + 0.5 * jitter))


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: ASCII delta-seconds or an HTTP date; None for anything
    else (absent, empty, ``²``, a negative number, garbage): a header is the other side's input, never trusted."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True; int("²") raises
        return MAX_BACKOFF_SECONDS if len(value) > 6 else min(float(int(value)), MAX_BACKOFF_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is not None:
            when = when.astimezone(dt.UTC).replace(tzinfo=None)
        return min(max(0.0, (when - now).total_seconds()), MAX_BACKOFF_SECONDS)
    except (TypeError, ValueError, IndexError, OverflowError, AttributeError):
        return None


def next_attempt_delay(attempt: int, base: float, retry_after: float | None) -> float:
    """The wait before the next attempt: the backoff, or longer if the service asked for it."""
    delay = backoff_seconds(attempt, base)
    return max(delay, retry_after) if retry_after is not None else delay
