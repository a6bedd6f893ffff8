"""The marshmallow schemas of the ``/messages`` resource (what the spec documents) and their examples.

Creating a message validates with the rules of :mod:`common.models`, the same ones the database enforces.
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates

from common.errors import ValidationError as RuleError
from common.models import CONTENT_MAX, RECIPIENT_PATTERN, Status, validate_content, validate_recipient

STATUSES = [s.value for s in Status]
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
    attempt_log = fields.List(fields.Nested(AttemptSchema), required=True, metadata={"description": "Oldest first."})


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


def _apply(rule: Any, value: str) -> None:
    try:
        rule(value)
    except RuleError as exc:
        raise ValidationError(exc.message) from None
