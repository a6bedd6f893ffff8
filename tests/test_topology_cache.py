"""AMQP topology on a real RabbitMQ vhost, and the Redis cache."""

import asyncio
import datetime as dt

import orjson
import redis.asyncio as redis

from common import topology
from common.cache import MessageCache
from common.settings import Settings


async def test_confirmed_publish_reaches_the_queue_and_rejects_dead_letter(settings: Settings) -> None:
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn, prefetch=10)
        assert await topo.publish_ids([1, 2, 3], chunk=1) == []
        got = []
        for _ in range(3):
            msg = await topo.dispatch_queue.get(timeout=5)
            got.append(orjson.loads(msg.body)["id"])
            if got[-1] == 2:
                await msg.reject(requeue=False)
            else:
                await msg.ack()
        assert got == [1, 2, 3]
        dead = None
        for _ in range(50):
            dead = await topo.dead_letter_queue.get(fail=False)
            if dead:
                break
            await asyncio.sleep(0.05)
        assert dead is not None and orjson.loads(dead.body) == {"id": 2}
        await dead.ack()


async def test_cache_round_trip_and_ttl(redis_client: redis.Redis, settings: Settings) -> None:
    forever = MessageCache(redis_client, 0, settings.redis_prefix)
    expiring = MessageCache(redis_client, 120, settings.redis_prefix)
    at = dt.datetime(2026, 11, 29, 8, 0, 0, 123456)
    await forever.put_many([("uuid-1", 41, at)])
    await expiring.put_many([("uuid-2", 42, at)])
    assert await forever.get("uuid-1") == {"message_id": "41", "sent_at": "2026-11-29T08:00:00.123456Z"}
    assert await redis_client.ttl(f"{settings.redis_prefix}message:uuid-1") == -1
    assert 0 < await redis_client.ttl(f"{settings.redis_prefix}message:uuid-2") <= 120
    assert await forever.get("missing") is None
