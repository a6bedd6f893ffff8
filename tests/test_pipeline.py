"""End to end: producer and consumer as real processes, the stand-in as the notification service."""

from __future__ import annotations

import collections
import datetime as dt
import itertools
from typing import Any

import aio_pika
import aiomysql
import pytest
import redis.asyncio as redis

from common import topology
from common.models import OUTCOME_UNKNOWN
from common.settings import Settings
from common.store import MessageStore
from tests.chaos_helpers import ticks_seen
from tests.conftest import sql
from tests.procs import Cluster, StandIn, wait_for


async def insert(settings: Settings, n: int) -> list[int]:
    for i in range(n):
        await sql(settings, "INSERT INTO messages (recipient, content) VALUES (%s, %s)", (f"+9055500{i:05d}", f"m{i}"))
    return [int(r[0]) for r in await sql(settings, "SELECT id FROM messages ORDER BY id")]


async def rows(settings: Settings) -> list[dict[str, Any]]:
    names = ["id", "status", "remote_message_id", "queued_at", "last_error", "attempts", "next_attempt_at"]
    got = await sql(settings, f"SELECT {', '.join(names)} FROM messages ORDER BY id")
    return [dict(zip(names, r, strict=True)) for r in got]


async def all_finished(settings: Settings) -> bool:
    return all(r["status"] in ("sent", "failed") for r in await rows(settings))


async def attempts(settings: Settings, message_id: int) -> list[tuple[Any, ...]]:
    return await sql(
        settings,
        "SELECT outcome, http_status, error, started_at, finished_at FROM message_attempts"
        " WHERE message_id = %s ORDER BY id",
        (message_id,),
    )


async def test_hand_inserted_rows_go_out_oldest_first_a_batch_per_tick_exactly_once(
    pool: aiomysql.Pool, settings: Settings, cluster: Cluster, standin: StandIn, redis_client: redis.Redis
) -> None:
    ids = await insert(settings, 9)
    cluster.start("producer", SEND_BATCH_SIZE="2")
    cluster.start("consumer")
    await wait_for(lambda: all_finished(settings), 40, "every row to be sent")

    final = await rows(settings)
    assert {r["status"] for r in final} == {"sent"}
    keys = await standin.keys()
    assert collections.Counter(keys) == collections.Counter(str(i) for i in ids), "each message arrived once"
    by_tick = collections.defaultdict(list)
    for r in final:
        by_tick[r["queued_at"]].append(r["id"])
    assert max(len(v) for v in by_tick.values()) <= 2, "at most SEND_BATCH_SIZE per tick"
    assert [i for t in sorted(by_tick) for i in sorted(by_tick[t])] == ids, "oldest first"
    remote = {r["key"]: r["messageId"] for r in await standin.received()}
    for r in final:
        assert r["remote_message_id"] == remote[str(r["id"])]
        cached = await redis_client.hgetall(f"{settings.redis_prefix}message:{r['remote_message_id']}")
        assert cached[b"message_id"] == str(r["id"]).encode()
        assert cached[b"sent_at"].endswith(b"Z")


async def test_stop_holds_everything_across_restarts_and_start_resumes(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    await store.set_sending(False)
    await insert(settings, 4)
    producer, consumer = cluster.start("producer"), cluster.start("consumer")
    await ticks_seen(store, 3)
    assert producer.terminate() == 0 and consumer.terminate() == 0
    cluster.start("producer")
    cluster.start("consumer")
    await ticks_seen(store, 3)
    assert await standin.keys() == []
    assert {r["status"] for r in await rows(settings)} == {"pending"}
    await store.set_sending(True)
    await wait_for(lambda: all_finished(settings), 30, "sending to resume")
    assert len(await standin.keys()) == 4


async def test_two_producers_keep_one_batch_per_tick_and_fail_over(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    ids = await insert(settings, 16)
    first = cluster.start("producer", SEND_BATCH_SIZE="2", SEND_INTERVAL_SECONDS="1")
    await wait_for(lambda: _leader_is(store, first.pid), 20, "the first producer to lead")
    second = cluster.start("producer", SEND_BATCH_SIZE="2", SEND_INTERVAL_SECONDS="1")
    cluster.start("consumer")
    await wait_for(lambda: _sent_count(settings, 4), 30, "a few sends under the first leader")
    first.kill9()
    await wait_for(lambda: _leader_is(store, second.pid), 20, "the second producer to take over")
    await wait_for(lambda: all_finished(settings), 40, "every row to be sent")
    final = await rows(settings)
    assert collections.Counter(await standin.keys()) == collections.Counter(str(i) for i in ids)
    ticks = sorted({r["queued_at"] for r in final})
    per_tick = collections.Counter(r["queued_at"] for r in final)
    assert max(per_tick.values()) <= 2
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ticks)]
    assert min(gaps) >= 0.5, f"two claims closer than half an interval: {gaps}"


async def _leader_is(store: MessageStore, pid: int) -> bool:
    leader = (await store.dispatch_state())["leader"]
    return bool(leader) and leader.endswith(f":{pid}")


async def _sent_count(settings: Settings, n: int) -> bool:
    return sum(r["status"] == "sent" for r in await rows(settings)) >= n


async def test_the_same_id_published_twice_is_sent_once(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    (mid,) = await insert(settings, 1)
    assert await store.claim(1) == [mid]
    consumer = cluster.start("consumer")
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn, queue_type=settings.amqp_queue_type)
        assert await topo.publish_ids([mid, mid]) == []
        assert await topo.publish_ids([mid]) == []
    await wait_for(lambda: all_finished(settings), 20, "the message to be sent")
    await wait_for(lambda: _async(consumer.log().count("duplicate delivery dropped") == 2), 20, "both duplicates")
    assert await standin.keys() == [str(mid)]


async def _async(value: Any) -> Any:
    return value


@pytest.mark.parametrize("guarantee", ["at-most-once", "at-least-once"])
async def test_consumer_killed_mid_request(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn, guarantee: str
) -> None:
    ids = await insert(settings, 3)
    await standin.behave(script=[{"delay_ms": 60_000}])
    cluster.start("producer", SEND_BATCH_SIZE="3")
    # The request hangs far longer than the 3 s timeout: it is in flight when the consumer is killed (or,
    # should the kill come late, timed out after it was written: the same unknown outcome).
    consumer = cluster.start("consumer", DELIVERY_GUARANTEE=guarantee, WEBHOOK_TIMEOUT_SECONDS="3")

    async def hung() -> int | None:
        keys = await standin.keys()
        sending = [r["id"] for r in await rows(settings) if r["status"] == "sending"]
        sent = [r for r in await rows(settings) if r["status"] == "sent"]
        return sending[0] if len(keys) == 3 and len(sending) == 1 and len(sent) == 2 else None

    victim = await wait_for(hung, 30, "one delivery hanging at the stand-in")
    consumer.kill9()
    cluster.start("consumer", DELIVERY_GUARANTEE=guarantee)
    # Its redelivery finds the row sending and drops it; the producer's sweep settles it when the lease
    # (3 s + 5 s) runs out.
    await wait_for(lambda: all_finished(settings), 30, "the sending lease's sweep to settle the row")
    final = {r["id"]: r for r in await rows(settings)}
    counts = collections.Counter(await standin.keys())
    assert all(final[i]["status"] == "sent" for i in ids if i != victim)
    assert all(counts[str(i)] == 1 for i in ids if i != victim)
    if guarantee == "at-most-once":
        assert final[victim]["status"] == "failed"
        assert final[victim]["last_error"].startswith(OUTCOME_UNKNOWN)
        assert "not resent (at-most-once)" in final[victim]["last_error"]
        assert counts[str(victim)] == 1, "never sent twice"
    else:
        assert final[victim]["status"] == "sent"
        assert counts[str(victim)] == 2, "resent once, with the same Idempotency-Key"


SCENARIOS = {
    "500 then 202": ([{"status": 500}, {"status": 202}], {}, "sent", [("retry", 500), ("sent", 202)]),
    "400 fails at once": ([{"status": 400}], {}, "failed", [("failed", 400)]),
    # A timeout after the request was written is an unknown outcome: at-most-once never sends it again.
    "timeout: outcome unknown (at-most-once)": (
        [{"hang": True}],
        {"WEBHOOK_TIMEOUT_SECONDS": "0.5"},
        "failed",
        [("failed", None)],
    ),
    "timeout then 202 (at-least-once)": (
        [{"hang": True}],
        {"WEBHOOK_TIMEOUT_SECONDS": "0.5", "DELIVERY_GUARANTEE": "at-least-once"},
        "sent",
        [("retry", None), ("sent", 202)],
    ),
    "202 in two pieces 200 ms apart keeps its messageId": (
        [{"chunks": [[0, '{"message": "Accepted", '], [200, '"messageId": "{messageId}"}']]}],
        {},
        "sent",
        [("sent", 202)],
    ),
    "Retry-After: \u00b2 on a 202 (non-ASCII digit) is ignored": (
        [{"headers": {"Retry-After": "\u00b2"}}],
        {},
        "sent",
        [("sent", 202)],
    ),
    "Retry-After: \u00b2 on a 503 is ignored, the backoff applies": (
        [{"status": 503, "headers": {"Retry-After": "\u00b2"}}, {}],
        {},
        "sent",
        [("retry", 503), ("sent", 202)],
    ),
    "304 is not a redirect": ([{"status": 304}], {}, "failed", [("failed", 304)]),
    "202 without messageId": ([{"body": {"message": "Accepted"}}], {}, "sent", [("sent", 202)]),
    "garbage 200 body": ([{"status": 200, "body": "<html>"}], {}, "sent", [("sent", 200)]),
    "redirect is not followed": ([{"status": 302}], {}, "failed", [("failed", 302)]),
    "always 503 gives up": (
        [{"status": 503}] * 3,
        {"MAX_ATTEMPTS": "3"},
        "failed",
        [("retry", 503), ("retry", 503), ("failed", 503)],
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_webhook_answers(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn, scenario: str
) -> None:
    script, overrides, final_status, expected = SCENARIOS[scenario]
    await standin.behave(script=script)
    (mid,) = await insert(settings, 1)
    cluster.start("producer")
    consumer = cluster.start("consumer", **overrides)
    await wait_for(lambda: all_finished(settings), 30, "the message to finish")
    (row,) = await rows(settings)
    assert row["status"] == final_status
    assert [(a[0], a[1]) for a in await attempts(settings, mid)] == expected
    assert len(await standin.keys()) == len(expected)
    if "pieces" in scenario:  # the whole body was read, not what had arrived of it
        (received,) = await standin.received()
        assert row["remote_message_id"] == received["messageId"]
    if scenario in ("202 without messageId", "garbage 200 body"):
        assert row["remote_message_id"] is None
        assert "without a usable messageId" in consumer.log()
    if final_status == "failed":
        assert row["last_error"]
        conn = await topology.connect(settings.amqp_url.reveal())
        async with conn:
            topo = await topology.open_channel(conn, queue_type=settings.amqp_queue_type)
            copy = await wait_for(lambda: topo.dead_letter_queue.get(fail=False), 10, "the dead-letter copy")
            assert b'"id":%d' % mid in copy.body
            await copy.ack()


async def test_429_retry_after_is_honoured(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    await standin.behave(script=[{"status": 429, "retry_after": 2}])
    (mid,) = await insert(settings, 1)
    cluster.start("producer")
    cluster.start("consumer")
    await wait_for(lambda: all_finished(settings), 30, "the message to be sent")
    first, second = await attempts(settings, mid)
    assert (first[0], first[1], second[0]) == ("retry", 429, "sent")
    waited: dt.timedelta = second[3] - first[4]
    assert waited.total_seconds() >= 2.0, "the second attempt came before Retry-After"


async def test_poison_messages_are_dead_lettered_and_the_consumer_goes_on(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    (mid,) = await insert(settings, 1)
    assert await store.claim(1) == [mid]
    cluster.start("consumer")
    conn = await topology.connect(settings.amqp_url.reveal())
    async with conn:
        topo = await topology.open_channel(conn, queue_type=settings.amqp_queue_type)
        for body in (b"not json", b'{"id": "seven"}', b"[1, 2]", b'{"id": 999999}'):
            await topo.dispatch.publish(aio_pika.Message(body), routing_key=topology.DISPATCH_ROUTING_KEY)
        # A good chunk with one unknown id: the known one is sent, the unknown one dead-lettered.
        await topo.dispatch.publish(
            aio_pika.Message(b'{"ids": [%d, 888888]}' % mid), routing_key=topology.DISPATCH_ROUTING_KEY
        )
        await wait_for(lambda: all_finished(settings), 20, "the good message to be sent")
        dead = []

        async def five_dead() -> bool:
            got = await topo.dead_letter_queue.get(fail=False)
            if got is not None:
                dead.append(got.body)
                await got.ack()
            return len(dead) == 5

        await wait_for(five_dead, 20, "five dead-lettered messages")
    assert sorted(dead) == sorted([b"not json", b'{"id": "seven"}', b"[1, 2]", b'{"id": 999999}', b'{"ids":[888888]}'])
    assert await standin.keys() == [str(mid)]
