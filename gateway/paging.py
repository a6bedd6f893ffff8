"""Paging of the sent list: offset pages, and cursor pages that stay stable while messages are sent.

A cursor is the url-safe base64 of the last row's ``(sent_at, id)``: the next page is the rows strictly
after it in ``sent_at DESC, id DESC`` order, which messages sent meanwhile (newer) never shift.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from typing import Any

from marshmallow import Schema, fields, validate

from gateway.httputil import invalid

MAX_LIMIT = 1000
MAX_OFFSET = 2**63 - 1
MAX_CURSOR_ID = 2**63 - 1
_EPOCH = dt.datetime(1970, 1, 1)
_CURSOR = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
NEXT_EXAMPLE = '</messages?limit=20&after=MTcxNDU2NDkyMDI1MDAwMDo0Mg>; rel="next"'


class ListQuerySchema(Schema):
    limit = fields.Integer(
        load_default=20, validate=validate.Range(1, MAX_LIMIT), metadata={"description": "Page size."}
    )
    offset = fields.Integer(
        load_default=0,
        validate=validate.Range(0, MAX_OFFSET),
        metadata={"description": "Rows to skip (not together with `after`).", "format": "int64"},
    )
    after = fields.String(
        metadata={
            "description": "Opaque cursor from the `Link: rel=next` header: the page after that row.",
            "pattern": _CURSOR.pattern,
        }
    )


def encode_cursor(sent_at: dt.datetime, message_id: int) -> str:
    micros = (sent_at - _EPOCH) // dt.timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}:{message_id}".encode()).rstrip(b"=").decode()


def decode_cursor(raw: str) -> tuple[dt.datetime, int]:
    """The ``(sent_at, id)`` of a cursor; anything malformed is a 422 naming ``after``."""
    try:
        if not _CURSOR.fullmatch(raw):
            raise ValueError
        micros, _, message_id = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode().partition(":")
        if not (micros.isdigit() and message_id.isdigit() and 0 < int(message_id) <= MAX_CURSOR_ID):
            raise ValueError
        return _EPOCH + dt.timedelta(microseconds=int(micros)), int(message_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise invalid("after", "is not a valid cursor; use the one of a Link: rel=next header") from None


def next_link(limit: int, last: dict[str, Any]) -> str:
    """The ``Link`` header value of the page that follows the one ending with row ``last``."""
    return f'</messages?limit={limit}&after={encode_cursor(last["sent_at"], last["id"])}>; rel="next"'
