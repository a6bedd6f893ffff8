"""Standard Webhooks signatures (https://www.standardwebhooks.com): what Svix, Convoy, Outpost and Hook0 send.

Each request carries ``webhook-id`` (the message's, the same on every retry), ``webhook-timestamp`` (Unix
seconds) and ``webhook-signature``: one ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` per secret,
separated by spaces, so a receiver that knows either secret of a rotation accepts the request. The body
signed is exactly the bytes sent. The tests verify these with the reference ``standardwebhooks`` package.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


class Signer:
    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def headers(self, webhook_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        timestamp = str(int(time.time() if now is None else now))
        signed = b"%s.%s.%s" % (webhook_id.encode(), timestamp.encode(), body)
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in self.keys
        )
        return {"webhook-id": webhook_id, "webhook-timestamp": timestamp, "webhook-signature": signatures}


def webhook_id(message_id: int) -> str:
    """The ``webhook-id`` of a message: stable across its retries (a receiver de-duplicates on it)."""
    return f"msg_{message_id}"
