"""Typed models and the pure rules of the message lifecycle (validation, the redelivery decision)."""

from __future__ import annotations

import datetime as dt
import enum
import re
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


class Action(enum.Enum):
    """What a consumer does with one delivery, decided under the row lock."""

    SEND = "send"  # it won the queued -> sending compare-and-set (or resends under at-least-once)
    DROP = "drop"  # a duplicate: someone else has it or it is already finished
    WAIT = "wait"  # redelivered while its first delivery may still be in flight: look again later
    FAIL_UNKNOWN = "fail_unknown"  # its consumer died mid-request: the outcome is unknown (at-most-once)


OUTCOME_UNKNOWN = "outcome unknown: the consumer stopped while the request was in flight; not resent (at-most-once)"


def decide(
    status: str | None,
    redelivered: bool,
    at_least_once: bool,
    won: bool = False,
    sending_for: float = 0.0,
    lease: float = 0.0,
) -> Action:
    """The never-twice rule: only the delivery that won the ``queued -> sending`` compare-and-set sends.

    A ``sending`` row seen again on a broker redelivery may belong to a consumer that died mid-request,
    or to one that only lost its channel and is still waiting for the answer. Within ``lease`` seconds of
    the row going ``sending`` (longer than any request may take) the redelivery waits; after it, the
    first delivery is known to be over with no outcome recorded: failed (at-most-once) or resent
    (at-least-once). Anything else is a duplicate and is dropped."""
    if won:
        return Action.SEND
    if status == Status.SENDING and redelivered:
        if sending_for < lease:
            return Action.WAIT
        return Action.SEND if at_least_once else Action.FAIL_UNKNOWN
    return Action.DROP


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
    sending_for: float = 0.0  # seconds since the row last changed (for a sending row: since it went sending)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one delivery attempt, written by :meth:`MessageStore.record_outcomes`."""

    id: int
    kind: str  # 'sent' | 'retry' | 'failed'
    attempt: int
    started_at: dt.datetime
    finished_at: dt.datetime
    http_status: int | None = None
    error: str | None = None
    remote_message_id: str | None = None
    next_attempt_at: dt.datetime | None = None

    @property
    def duration_ms(self) -> int:
        return max(0, round((self.finished_at - self.started_at).total_seconds() * 1000))


def utcnow() -> dt.datetime:
    """Naive UTC now, as stored in DATETIME(6) columns."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
