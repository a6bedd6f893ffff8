"""The marshmallow schemas of the ``/messages`` resource (what the spec documents) and their examples.

Creating a message validates with the rules of :mod:`common.models`, the same ones the database enforces.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates

from common.errors import ValidationError as RuleError
from common.models import (
    CONTENT_MAX,
    RECIPIENT_PATTERN,
    Priority,
    Status,
    utcnow,
    validate_content,
    validate_recipient,
)

STATUSES = [s.value for s in Status]
PRIORITIES = [p.value for p in Priority]
MAX_BATCH = 1000
MAX_AHEAD = dt.timedelta(days=365)
# RFC 3339 date-time: a zone (Z or an offset) is required; ASCII digits only.
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
EXAMPLE = {
    "id": 42,
    "recipient": "+905551111111",
    "content": "Insider - Project",
    "status": "sent",
    "remote_message_id": "67f2f8a8-ea58-4ed0-a6f9-ff217df4d849",
    "attempts": 1,
    "created_at": "2024-05-01T12:00:00.000000Z",
    "sent_at": "2024-05-01T12:02:00.250000Z",
}
DETAIL_EXAMPLE = {
    **EXAMPLE,
    "last_error": None,
    "next_attempt_at": None,
    "queued_at": "2024-05-01T12:02:00.000000Z",
    "updated_at": "2024-05-01T12:02:00.250000Z",
    "send_at": "2024-05-01T12:00:00.000000Z",
    "priority": "normal",
    "cancelled_at": None,
    "attempt_log": [
        {
            "attempt": 1,
            "started_at": "2024-05-01T12:02:00.010000Z",
            "finished_at": "2024-05-01T12:02:00.250000Z",
            "outcome": "sent",
            "http_status": 202,
            "error": None,
            "duration_ms": 240,
            "provider": "primary",
        }
    ],
}


class MessageSchema(Schema):
    id = fields.Integer(required=True, metadata={"example": 42})
    recipient = fields.String(required=True, metadata={"example": "+905551111111"})
    content = fields.String(required=True, metadata={"example": "Insider - Project"})
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    remote_message_id = fields.String(
        required=True, allow_none=True, metadata={"description": "The webhook's messageId."}
    )
    attempts = fields.Integer(required=True)
    created_at = fields.DateTime(required=True, metadata={"description": "ISO 8601, UTC (trailing Z)."})
    sent_at = fields.DateTime(
        required=True, allow_none=True, metadata={"description": "ISO 8601, UTC; null until sent."}
    )


class AttemptSchema(Schema):
    attempt = fields.Integer(required=True)
    started_at = fields.DateTime(required=True)
    finished_at = fields.DateTime(required=True)
    outcome = fields.String(required=True, validate=validate.OneOf(["sent", "retry", "failed"]))
    http_status = fields.Integer(required=True, allow_none=True)
    error = fields.String(required=True, allow_none=True)
    duration_ms = fields.Integer(required=True)
    provider = fields.String(
        required=True,
        allow_none=True,
        validate=validate.OneOf(["primary", "fallback"]),
        metadata={"description": "Which notification service took the attempt (null: made before it was recorded)."},
    )


class MessageDetailSchema(MessageSchema):
    last_error = fields.String(required=True, allow_none=True)
    next_attempt_at = fields.DateTime(required=True, allow_none=True)
    queued_at = fields.DateTime(required=True, allow_none=True)
    updated_at = fields.DateTime(required=True)
    send_at = fields.DateTime(required=True, metadata={"description": "Not sent before this time (UTC)."})
    priority = fields.String(required=True, validate=validate.OneOf(PRIORITIES))
    cancelled_at = fields.DateTime(required=True, allow_none=True)
    attempt_log = fields.List(fields.Nested(AttemptSchema), required=True, metadata={"description": "Oldest first."})


class FilteredMessageSchema(MessageSchema):
    send_at = fields.DateTime(required=True)
    priority = fields.String(required=True, validate=validate.OneOf(PRIORITIES))


class MessageCreateSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    recipient = fields.String(
        required=True,
        metadata={
            "example": "+905551111111",
            "pattern": RECIPIENT_PATTERN,
            "description": "E.164: + and 8-15 digits.",
        },
    )
    content = fields.String(
        required=True, metadata={"example": "Insider - Project", "minLength": 1, "maxLength": CONTENT_MAX}
    )

    send_at = fields.String(
        load_default=None,
        metadata={
            "example": "2030-05-01T12:00:00Z",
            "format": "date-time",
            "description": "RFC 3339 with a zone (`Z` or `+03:00`), at most one year ahead: not sent before then."
            " A past time means as soon as possible. Default: now.",
        },
    )
    priority = fields.String(
        load_default="normal",
        validate=validate.OneOf(PRIORITIES),
        metadata={"description": "`high` messages are claimed before `normal` ones in each tick."},
    )

    @validates("send_at")
    def _send_at(self, value: str | None, **_: Any) -> None:
        parse_send_at(value)

    @validates("recipient")
    def _recipient(self, value: str, **_: Any) -> None:
        _apply(validate_recipient, value)

    @validates("content")
    def _content(self, value: str, **_: Any) -> None:
        _apply(validate_content, value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("must be valid Unicode text (no lone surrogates)") from None


def parse_send_at(value: str | None) -> dt.datetime | None:
    """A ``send_at`` as naive UTC (None: now); raises marshmallow's ValidationError naming the rule broken."""
    if value is None:
        return None
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValidationError("must be an RFC 3339 date-time with a zone, e.g. 2030-05-01T12:00:00Z")
    try:
        at = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError("is not a valid date-time (no such day or time)") from None
    try:
        utc = at.astimezone(dt.UTC).replace(tzinfo=None)
    except OverflowError:
        raise ValidationError("is out of range") from None
    if utc > utcnow() + MAX_AHEAD:
        raise ValidationError("must not be more than one year ahead")
    return utc


class MessageBatchSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    messages = fields.List(
        fields.Nested(MessageCreateSchema),
        required=True,
        validate=validate.Length(1, MAX_BATCH),
        metadata={"description": f"1 to {MAX_BATCH} messages, each like the body of `POST /messages`."},
    )


class BatchItemSchema(MessageDetailSchema):
    class Meta:
        exclude = ("attempt_log",)


class BatchCreatedSchema(Schema):
    messages = fields.List(fields.Nested(BatchItemSchema), required=True, metadata={"description": "In order."})


def _apply(rule: Any, value: str) -> None:
    try:
        rule(value)
    except RuleError as exc:
        raise ValidationError(exc.message) from None
