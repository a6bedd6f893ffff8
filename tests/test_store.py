"""The message store on the real database: claims, the compare-and-set, stale claims, outcomes, lists."""

import asyncio
import datetime as dt

import aiomysql
import orjson

from common.db import create_pool
from common.models import Action, Outcome, decide, utcnow
from common.settings import Settings
from common.store import MessageStore
from tests.conftest import sql


async def seed(store: MessageStore, n: int) -> list[int]:
    await store.create_many([(f"+90555{i:07d}", f"message {i}") for i in range(n)])
    rows = await sql_ids(store)
    return rows


async def sql_ids(store: MessageStore) -> list[int]:
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT id FROM messages ORDER BY id")
        return [r[0] for r in await cur.fetchall()]


async def test_concurrent_claimers_take_disjoint_rows_oldest_first(settings: Settings, store: MessageStore) -> None:
    ids = await seed(store, 1000)
    pools = [await create_pool(settings, maxsize=1) for _ in range(8)]
    claimed: list[list[int]] = [[] for _ in pools]

    async def claimer(i: int) -> None:
        s = MessageStore(pools[i])
        while batch := await s.claim(25):
            assert batch == sorted(batch), "each claim is oldest first"
            claimed[i].extend(batch)

    try:
        await asyncio.gather(*(claimer(i) for i in range(len(pools))))
    finally:
        for p in pools:
            p.close()
            await p.wait_closed()
    everything = [m for c in claimed for m in c]
    assert len(everything) == len(set(everything)) == 1000
    assert sorted(everything) == ids
    assert sum(1 for c in claimed if c) > 1, "the claim spread over several claimers"
    assert (await store.counts_by_status())["queued"] == 1000


async def test_claim_skips_rows_not_yet_due(store: MessageStore, settings: Settings) -> None:
    ids = await seed(store, 3)
    await sql(
        settings, "UPDATE messages SET next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR WHERE id = %s", (ids[0],)
    )
    assert await store.claim(10) == ids[1:]


async def test_exactly_one_concurrent_compare_and_set_wins(settings: Settings, store: MessageStore) -> None:
    (mid,) = await seed(store, 1)
    assert await store.claim(1) == [mid]
    pools = [await create_pool(settings, maxsize=1) for _ in range(10)]
    try:
        results = await asyncio.gather(
            *(MessageStore(p).begin_sending([(mid, token)]) for token, p in enumerate(pools, start=1))
        )
    finally:
        for p in pools:
            p.close()
            await p.wait_closed()
    actions = [decide(r[mid].status, False, False, r[mid].token == token) for token, r in enumerate(results, start=1)]
    assert actions.count(Action.SEND) == 1 and actions.count(Action.DROP) == 9
    assert (await store.get(mid))["status"] == "sending"
    # The winner running its compare-and-set again (its answer was lost) still finds the row its own.
    winner = actions.index(Action.SEND) + 1
    assert (await store.begin_sending([(mid, winner)]))[mid].token == winner


async def test_stale_claims_found_after_the_lease_not_before(store: MessageStore, settings: Settings) -> None:
    ids = await seed(store, 2)
    await store.claim(2)
    assert await store.reclaim_stale(lease_seconds=60, limit=10) == []
    await sql(
        settings, "UPDATE messages SET queued_at = UTC_TIMESTAMP(6) - INTERVAL 61 SECOND WHERE id = %s", (ids[1],)
    )
    assert await store.reclaim_stale(lease_seconds=60, limit=10) == [ids[1]]
    assert await store.reclaim_stale(lease_seconds=60, limit=10) == [], "the lease was renewed"


async def test_outcomes_move_rows_record_attempts_and_count_sent(store: MessageStore) -> None:
    a, b, c = await seed(store, 3)
    await store.claim(3)
    await store.begin_sending([(i, 1) for i in [a, b, c]])
    t0 = utcnow()
    t1 = t0 + dt.timedelta(milliseconds=30)
    await store.record_outcomes(
        [
            Outcome(a, "sent", 1, t0, t1, 202, remote_message_id="rid-a"),
            Outcome(b, "retry", 1, t0, t1, 503, error="HTTP 503", next_attempt_at=t1 + dt.timedelta(seconds=5)),
            Outcome(c, "failed", 1, t0, t1, 400, error="HTTP 400"),
        ]
    )
    row_a, row_b, row_c = [await store.get(i) for i in (a, b, c)]
    assert (row_a["status"], row_a["remote_message_id"], row_a["attempts"]) == ("sent", "rid-a", 1)
    assert row_a["attempt_log"][0]["duration_ms"] == 30
    assert (row_b["status"], row_b["last_error"], row_b["attempts"]) == ("pending", "HTTP 503", 1)
    assert (row_c["status"], row_c["last_error"]) == ("failed", "HTTP 400")
    assert await store.sent_total() == 1
    # A second outcome for a row that is no longer sending (a duplicate) moves nothing.
    await store.record_outcomes(
        [
            Outcome(a, "sent", 2, t0, t1, 202, remote_message_id="x"),
            Outcome(c, "retry", 2, t0, t1, 500, error="x", next_attempt_at=t1),
        ]
    )
    assert await store.sent_total() == 1
    assert ((await store.get(a))["remote_message_id"], (await store.get(c))["status"]) == ("rid-a", "failed")


async def test_sent_pages_by_offset_and_cursor_agree_and_sent_at_never_goes_back(store: MessageStore) -> None:
    ids = await seed(store, 30)
    await store.claim(30)
    await store.begin_sending([(i, 1) for i in ids])
    stamps = []
    for group in (ids[:10], ids[10:11], ids[11:]):  # three group commits
        now = utcnow()
        stamps.append(
            await store.record_outcomes(
                [Outcome(m, "sent", 1, now, now, 202, remote_message_id=f"r{m}") for m in group]
            )
        )
    assert stamps == sorted(stamps) and len(set(stamps)) == 3, "each commit's sent_at is later than the last"
    full = await store.sent_page(100)
    rows = orjson.loads(full.json)
    assert full.total == 30 and [r["id"] for r in rows] == ids[::-1], "newest sent_at first, then highest id"
    assert rows[0]["sent_at"].endswith("Z") and rows[0]["remote_message_id"] == f"r{ids[-1]}"
    walked: list[int] = []
    page = await store.sent_page(7)
    while page.count:
        walked += [r["id"] for r in orjson.loads(page.json)]
        key = page.last_key.split(":")
        page = await store.sent_page(7, after=(int(key[0]), int(key[1])))
    assert walked == ids[::-1]
    assert [r["id"] for r in orjson.loads((await store.sent_page(7, 14)).json)] == ids[::-1][14:21]
    assert (await store.sent_page(7, 30)).json == "[]"


async def test_dispatch_switch_persists(store: MessageStore) -> None:
    assert await store.is_sending() is True
    await store.set_sending(False)
    assert await store.is_sending() is False
    await store.set_sending(True)
    assert await store.is_sending() is True


async def test_retry_failed(store: MessageStore, pool: aiomysql.Pool) -> None:
    (mid,) = await seed(store, 1)
    await store.claim(1)
    await store.begin_sending([(i, 1) for i in [mid]])
    now = utcnow()
    await store.record_outcomes([Outcome(mid, "failed", 1, now, now, 400, error="HTTP 400")])
    row = await store.retry_failed(mid)
    assert (row["status"], row["attempts"]) == ("pending", 0)
