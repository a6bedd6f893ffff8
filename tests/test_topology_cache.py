"""AMQP topology on a real RabbitMQ vhost, and the Redis cache."""

import asyncio
import datetime as dt

import orjson
import pytest
import redis.asyncio as redis

from common import topology
from common.cache import MessageCache
from common.errors import SettingsError
from common.settings import Settings
from deploy.devsupport import Sandbox
from tests.procs import Cluster, wait_for


async def test_confirmed_publish_reaches_the_queue_and_rejects_dead_letter(settings: Settings) -> None:
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn, prefetch=10, queue_type=settings.amqp_queue_type)
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


def queue_types(sandbox: Sandbox) -> dict[str, str]:
    """The type of each queue of the run's vhost, as RabbitMQ shows it (its management API, or rabbitmqctl)."""
    return sandbox.rabbit.queue_types(sandbox.vhost)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_both_queues_are_of_the_configured_type_and_carry_messages(
    settings: Settings, sandbox: Sandbox, queue_type: str
) -> None:
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn, queue_type=queue_type)
        assert await topo.publish_ids([7, 8]) == []
        assert await topo.dispatch_ready() == 1  # one chunk, redeclared with the same type on the way
        msg = await topo.dispatch_queue.get(timeout=5)
        assert orjson.loads(msg.body) == {"ids": [7, 8]}
        await msg.reject(requeue=False)  # dead-lettered, also from a quorum queue
        await wait_for(lambda: _dead_lettered(topo), 10, "the rejected message in the dead-letter queue")
    assert queue_types(sandbox) == {topology.DISPATCH_QUEUE: queue_type, topology.DEAD_LETTER_QUEUE: queue_type}


async def _dead_lettered(topo: topology.Topology) -> bool:
    msg = await topo.dead_letter_queue.get(fail=False)
    return msg is not None and orjson.loads(msg.body) == {"ids": [7, 8]}


async def test_another_queue_type_than_the_existing_queues_fails_naming_the_setting(
    settings: Settings, sandbox: Sandbox
) -> None:
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        await topology.open_channel(conn, queue_type="classic")
        with pytest.raises(SettingsError, match=r"AMQP_QUEUE_TYPE=quorum does not match the queue message_sender\."):
            await topology.open_channel(conn, queue_type="quorum")
    assert set(queue_types(sandbox).values()) == {"classic"}, "nothing was changed"


async def test_a_service_with_a_mismatched_queue_type_stops_with_one_line(settings: Settings, cluster: Cluster) -> None:
    other = "classic" if settings.amqp_queue_type == "quorum" else "quorum"
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        await topology.open_channel(conn, queue_type=settings.amqp_queue_type)
    producer = cluster.start("producer", AMQP_QUEUE_TYPE=other)

    async def stopped() -> bool:
        return producer.proc.poll() is not None

    await wait_for(stopped, 30, "the producer to stop")
    assert producer.proc.returncode == 2
    assert f"producer: AMQP_QUEUE_TYPE={other} does not match the queue" in producer.log()
    assert "Traceback" not in producer.log()


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
