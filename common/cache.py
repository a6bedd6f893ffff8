"""The Redis cache of sent messages: ``message:<messageId>`` -> the local id and the send time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import redis.asyncio as redis


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
