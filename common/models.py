"""Typed models and the pure rules of the message lifecycle (validation, the redelivery decision)."""

from __future__ import annotations

import datetime as dt
import enum
import re
import time
from dataclasses import dataclass

from common.errors import ValidationError

# The whole string, matched with ``fullmatch``: ``$`` would also accept a trailing newline. The documented
# (JSON Schema / ECMA 262) form of the same rule is RECIPIENT_PATTERN, where ``$`` means the very end.
RECIPIENT_RE = re.compile(r"\+[0-9]{8,15}")
RECIPIENT_PATTERN = r"^\+[0-9]{8,15}$"
CONTENT_MAX = 160


class Status(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Priority(enum.StrEnum):
    HIGH = "high"
    NORMAL = "normal"


# Every "outcome unknown" reason starts with this: the request may have reached the service, nobody knows.
OUTCOME_UNKNOWN = "outcome unknown"


def outcome_unknown(what: str, resent: bool) -> str:
    """The ``last_error`` of a delivery whose request may have reached the service but whose answer was lost
    (a timeout or reset after the request was written, a consumer that died mid-request)."""
    then = "sent again with the same Idempotency-Key (at-least-once)" if resent else "not resent (at-most-once)"
    return f"{OUTCOME_UNKNOWN}: {what}; {then}"


def is_outcome_unknown(last_error: str | None) -> bool:
    """Whether a message may have reached the service although it ended ``failed`` (also when the unknown
    outcome was the last of several attempts: "gave up after N attempts; last: outcome unknown: ...")."""
    return bool(last_error) and OUTCOME_UNKNOWN in str(last_error)


def validate_recipient(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("recipient", "must be a string")
    if not RECIPIENT_RE.fullmatch(value):
        raise ValidationError("recipient", "must be an E.164 phone number: '+' followed by 8 to 15 digits")
    return value


def mask_recipient(value: str) -> str:
    """A recipient as a page without the token shows it: every digit but the last four hidden,
    ``+905551234567`` -> ``+••••••••4567`` (done on the server: the full number never reaches the page)."""
    digits = sum(c.isdigit() for c in value)
    out, seen = [], 0
    for c in value:
        if c.isdigit():
            seen += 1
            out.append(c if seen > digits - 4 else "•")
        else:
            out.append(c)
    return "".join(out)


def validate_content(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("content", "must be a string")
    if not value.strip():
        raise ValidationError("content", "must not be empty")
    if len(value) > CONTENT_MAX:
        raise ValidationError("content", f"must be at most {CONTENT_MAX} characters (got {len(value)})")
    return value


@dataclass(frozen=True, slots=True)
class Delivery:
    """A row locked for delivery: what the consumer needs to send it."""

    id: int
    recipient: str
    content: str
    status: str
    attempts: int
    token: int | None = None  # the delivery token of the compare-and-set that moved it to sending

    def won_by(self, token: int) -> bool:
        """Only the delivery whose compare-and-set moved the row to ``sending`` may send it: a duplicate AMQP
        delivery, a re-published claim or a redelivery of a row that is already ``sending`` or finished is dropped
        (a row left ``sending`` by a consumer that died is settled by the sending lease's sweep)."""
        return self.status == Status.SENDING and self.token == token


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt, written by :meth:`MessageStore.record_outcomes`."""

    id: int
    kind: str  # 'sent' | 'retry' | 'failed'
    attempt: int
    token: int  # the delivery token: the commit applies only while the row still carries it (fencing)
    started_at: dt.datetime
    finished_at: dt.datetime
    http_status: int | None = None
    error: str | None = None
    remote_message_id: str | None = None
    next_attempt_at: dt.datetime | None = None
    retry_after: float | None = None  # seconds the service asked for (Retry-After), for the shared pause
    provider: str = "primary"  # which notification service took the attempt: primary | fallback

    @property
    def duration_ms(self) -> int:
        return max(0, round((self.finished_at - self.started_at).total_seconds() * 1000))


_EPOCH = dt.datetime(1970, 1, 1)


def utcnow() -> dt.datetime:
    """Naive UTC now, as stored in DATETIME(6) columns: the Unix epoch plus the system clock's whole
    microseconds. The same value as ``datetime.now(UTC).replace(tzinfo=None)`` at 1.1 instead of 2.5 us a
    call (``replace`` alone is 1.6 us); a delivery reads the clock twice (py-spy: 1.7% of a consumer's samples)."""
    return _EPOCH + dt.timedelta(0, 0, time.time_ns() // 1000)
