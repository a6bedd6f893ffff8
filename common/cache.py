"""The Redis cache of sent messages: ``message:<messageId>`` -> the local id and the send time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import redis.asyncio as redis


def breaker_key(prefix: str) -> str:
    """The Redis hash of the webhook's circuit breaker (``state``, ``since`` and ``until`` in epoch ms):
    written by the consumers (:mod:`consumer.control`), read by the gateway's ``/stats``."""
    return f"{prefix}webhook:breaker"


async def read_breaker(client: redis.Redis, prefix: str) -> dict[str, str | None]:
    """The breaker as ``/stats`` shows it: ``state`` (closed when never opened), ``failing_since`` (when it
    first opened in this outage) and ``until`` (when the next probe may go), ISO 8601 UTC."""
    raw = await client.hgetall(breaker_key(prefix))  # type: ignore[misc]
    data = {
        k.decode() if isinstance(k, bytes) else str(k): v.decode() if isinstance(v, bytes) else str(v)
        for k, v in raw.items()
    }

    def when(field: str) -> str | None:
        value = data.get(field)
        if not value or not value.isascii() or not value.isdigit():
            return None
        return iso_utc(dt.datetime.fromtimestamp(int(value) / 1000, dt.UTC).replace(tzinfo=None))

    state = data.get("state") or "closed"
    closed = state == "closed"
    return {
        "state": state,
        "failing_since": None if closed else when("since"),
        "until": None if closed else when("until"),
    }


class MessageCache:
    def __init__(self, client: redis.Redis, ttl_seconds: int = 0, prefix: str = "") -> None:
        self.client = client
        self.ttl = ttl_seconds
        self.prefix = prefix

    def key(self, remote_message_id: str) -> str:
        return f"{self.prefix}message:{remote_message_id}"

    async def put_many(self, entries: Sequence[tuple[str, int, dt.datetime]]) -> None:
        """Store ``(remote_message_id, local id, sent_at)`` entries in one round trip (a pipeline).
        ``sent_at`` is naive UTC; it is written as ISO 8601 with a ``Z``."""
        if not entries:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for remote_id, message_id, sent_at in entries:
                key = self.key(remote_id)
                pipe.hset(key, mapping={"message_id": message_id, "sent_at": iso_utc(sent_at)})
                if self.ttl:
                    pipe.expire(key, self.ttl)
            await pipe.execute()

    async def get(self, remote_message_id: str) -> dict[str, str] | None:
        raw = await self.client.hgetall(self.key(remote_message_id))
        if not raw:
            return None
        return {
            k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in raw.items()
        }


def iso_utc(value: dt.datetime) -> str:
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
