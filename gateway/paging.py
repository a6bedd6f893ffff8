"""Paging of the sent list: offset pages, and cursor pages that stay stable while messages are sent.

A cursor is the url-safe base64 of the last row's ``(sent_at, id)``: the next page is the rows strictly
after it in ``sent_at DESC, id DESC`` order, which messages sent meanwhile (newer) never shift.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from urllib.parse import urlencode

from marshmallow import Schema, fields, validate

from common.store import SentPage
from gateway.httputil import invalid

MAX_LIMIT = 1000
MAX_OFFSET = 2**63 - 1
MAX_CURSOR_ID = 2**63 - 1
# DATETIME's largest value, 9999-12-31 23:59:59.999999, in microseconds since the epoch.
MAX_MICROS = 253402300799999999
_CURSOR = re.compile(r"^[A-Za-z0-9_-]{4,64}$")
MASK_DESCRIPTION = "Hide every digit of the recipients but the last four (`+••••••••4567`), on the server."
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
    mask = fields.Boolean(load_default=False, metadata={"description": MASK_DESCRIPTION})
    status = fields.String(
        metadata={
            "description": "Only messages in these statuses, separated by commas (pending, queued, sending, sent,"
            " failed, cancelled), newest created first.",
            "example": "pending,failed",
        }
    )
    recipient = fields.String(
        metadata={"description": "Only messages to this E.164 number.", "example": "+905551111111"}
    )


def encode_cursor(key: str) -> str:
    """A cursor from a row's ``"<sent_at in microseconds since the epoch>:<id>"`` key."""
    return base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def decode_cursor(raw: str) -> tuple[int, int]:
    """The ``(sent_at micros, id)`` of a cursor; anything malformed is a 422 naming ``after``."""
    try:
        if not _CURSOR.fullmatch(raw):
            raise ValueError
        micros, _, message_id = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode().partition(":")
        if not (micros.isdigit() and message_id.isdigit() and 0 < int(message_id) <= MAX_CURSOR_ID):
            raise ValueError
        if int(micros) > MAX_MICROS:
            raise ValueError
        return int(micros), int(message_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise invalid("after", "is not a valid cursor; use the one of a Link: rel=next header") from None


def next_link(limit: int, last_key: str) -> str:
    """The ``Link`` header value of the page that follows the one ending with the row of ``last_key``."""
    return f'</messages?limit={limit}&after={encode_cursor(last_key)}>; rel="next"'


def filtered_link(limit: int, last_key: str, status: str | None, recipient: str | None) -> str:
    """The ``Link`` header of the next page of a filtered list (the filters kept, url-encoded)."""
    query = {
        "limit": str(limit),
        **({"status": status} if status else {}),
        **({"recipient": recipient} if recipient else {}),
    }
    query["after"] = encode_cursor(last_key)
    return f'</messages?{urlencode(query)}>; rel="next"'


class PageCache:
    """Recently served pages of the sent list, each valid for one version of the sent list.

    Every change to the set of sent messages changes its version (the numbering high-water mark and the
    number of sent rows) in the same commit, so a page is served again only after checking the version (two
    primary-key reads) is unchanged: never stale, and far cheaper than rebuilding the page. Small pages
    only, a bounded number of them."""

    MAX_ENTRIES = 256
    MAX_LIMIT = 100

    def __init__(self) -> None:
        self._pages: OrderedDict[tuple[int, int, str | None], SentPage] = OrderedDict()

    def get(self, key: tuple[int, int, str | None], version: tuple[int, int]) -> SentPage | None:
        page = self._pages.get(key)
        if page is None or page.version != version:
            return None
        self._pages.move_to_end(key)
        return page

    def put(self, key: tuple[int, int, str | None], page: SentPage) -> None:
        if key[0] > self.MAX_LIMIT:
            return
        self._pages[key] = page
        self._pages.move_to_end(key)
        while len(self._pages) > self.MAX_ENTRIES:
            self._pages.popitem(last=False)
