"""The Redis cache of sent messages: ``message:<messageId>`` -> the local id and the send time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, timeout_seconds: float) -> redis.Redis:
    """A Redis client as every service uses it, each wait bounded by ``timeout_seconds``. A pooled
    connection Redis closed (it restarted) fails once when next used: that command is sent again at once on
    a fresh connection, so a restart is not taken for an outage. A timeout is not sent again (a hung server
    would cost twice the wait)."""
    return redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


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


# Every entry of a group commit in one command: HSET (and EXPIRE when there is a TTL) per key, run by Redis. A
# pipeline of the same commands costs the consumer 3-4 times the CPU (a command object, its packing and its
# reply per key, measured at 20 and 50 entries a call); Redis does the same work either way.
PUT_MANY = """
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
    redis.call('HSET', key, 'message_id', ARGV[2 * i], 'sent_at', ARGV[2 * i + 1])
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
return #KEYS
"""


class MessageCache:
    def __init__(self, client: redis.Redis, ttl_seconds: int = 0, prefix: str = "") -> None:
        self.client = client
        self.ttl = ttl_seconds
        self.prefix = prefix
        self._put_many = client.register_script(PUT_MANY)  # EVALSHA, loaded again if Redis lost its scripts

    def key(self, remote_message_id: str) -> str:
        return f"{self.prefix}message:{remote_message_id}"

    async def put_many(self, entries: Sequence[tuple[str, int, dt.datetime]]) -> None:
        """Store ``(remote_message_id, local id, sent_at)`` entries in one round trip (one script call,
        :data:`PUT_MANY`). ``sent_at`` is naive UTC; it is written as ISO 8601 with a ``Z``."""
        if not entries:
            return
        args: list[str | int] = [self.ttl]
        for _, message_id, sent_at in entries:
            args += [message_id, iso_utc(sent_at)]
        await self._put_many(keys=[self.key(remote_id) for remote_id, _, _ in entries], args=args)

    async def get(self, remote_message_id: str) -> dict[str, str] | None:
        raw = await self.client.hgetall(self.key(remote_message_id))
        if not raw:
            return None
        return {
            k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v for k, v in raw.items()
        }


def iso_utc(value: dt.datetime) -> str:
    """``value`` (naive UTC, or aware: its tzinfo is dropped) as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; a naive one
    is not copied (``replace`` costs 1.6 us, and the consumer writes one per sent message)."""
    naive = value if value.tzinfo is None else value.replace(tzinfo=None)
    return naive.isoformat(timespec="microseconds") + "Z"
