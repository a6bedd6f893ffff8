"""The message store on the real database: claims, the compare-and-set, stale claims, outcomes, lists."""

import asyncio
import datetime as dt

import aiomysql
import orjson
import pytest

from common.db import create_pool
from common.errors import ConflictError, LeaseLost
from common.migrations import migrate
from common.models import Outcome, utcnow
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
    won = [r[mid].won_by(token) for token, r in enumerate(results, start=1)]
    assert won.count(True) == 1
    assert (await store.get(mid))["status"] == "sending"
    # The winner running its compare-and-set again (its answer was lost) still finds the row its own.
    winner = won.index(True) + 1
    assert (await store.begin_sending([(mid, winner)]))[mid].token == winner


async def test_stale_claims_found_after_the_lease_not_before(store: MessageStore, settings: Settings) -> None:
    ids = await seed(store, 2)
    await store.claim(2)
    assert await store.reclaim_stale(lease_seconds=60, limit=10, queue_empty=True) == []
    await sql(
        settings, "UPDATE messages SET queued_at = UTC_TIMESTAMP(6) - INTERVAL 61 SECOND WHERE id = %s", (ids[1],)
    )
    assert await store.reclaim_stale(lease_seconds=60, limit=10, queue_empty=False) == [ids[1]]
    assert await store.reclaim_stale(lease_seconds=60, limit=10, queue_empty=True) == [], "the lease was renewed"


async def test_only_claims_never_confirmed_are_republished_while_the_queue_has_work(
    store: MessageStore, settings: Settings
) -> None:
    """A confirmed claim that waits behind a backlog is not published again (a slow consumer causes no extra
    copies); once the queue holds nothing ready, a confirmed claim past the lease was lost with its message.
    A row set to queued by hand without a claim time is stale at once."""
    confirmed, unconfirmed, by_hand = await seed(store, 3)
    await store.claim(2)
    await store.mark_published([confirmed])
    await sql(settings, "UPDATE messages SET status = 'queued', queued_at = NULL WHERE id = %s", (by_hand,))
    await sql(
        settings,
        "UPDATE messages SET queued_at = queued_at - INTERVAL 61 SECOND, published_at ="
        " published_at - INTERVAL 61 SECOND WHERE id IN (%s, %s)",
        (confirmed, unconfirmed),
    )
    assert sorted(await store.reclaim_stale(60, 10, queue_empty=False)) == sorted([unconfirmed, by_hand])
    assert await store.reclaim_stale(60, 10, queue_empty=True) == [confirmed]


async def test_outcomes_move_rows_record_attempts_and_count_sent(store: MessageStore) -> None:
    a, b, c = await seed(store, 3)
    await store.claim(3)
    await store.begin_sending([(i, 1) for i in [a, b, c]])
    t0 = utcnow()
    t1 = t0 + dt.timedelta(milliseconds=30)
    await store.record_outcomes(
        [
            Outcome(a, "sent", 1, 1, t0, t1, 202, remote_message_id="rid-a"),
            Outcome(b, "retry", 1, 1, t0, t1, 503, error="HTTP 503", next_attempt_at=t1 + dt.timedelta(seconds=5)),
            Outcome(c, "failed", 1, 1, t0, t1, 400, error="HTTP 400"),
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
            Outcome(a, "sent", 2, 1, t0, t1, 202, remote_message_id="x"),
            Outcome(c, "retry", 2, 1, t0, t1, 500, error="x", next_attempt_at=t1),
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
        recorded = await store.record_outcomes(
            [Outcome(m, "sent", 1, 1, now, now, 202, remote_message_id=f"r{m}") for m in group]
        )
        (stamp,) = set(recorded.sent_at.values())  # one sent_at per commit
        stamps.append(stamp)
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
    await store.record_outcomes([Outcome(mid, "failed", 1, 1, now, now, 400, error="HTTP 400")])
    row = await store.retry_failed(mid)
    assert (row["status"], row["attempts"]) == ("pending", 0)


async def test_a_late_outcome_cannot_overwrite_what_the_sweep_decided(store: MessageStore, settings: Settings) -> None:
    """Fencing: the sweep settles a row whose lease ran out (its delivery is taken for lost); the delivery's own
    outcome arriving afterwards changes nothing and is reported as fenced."""
    (mid,) = await seed(store, 1)
    await store.claim(1)
    await store.begin_sending([(mid, 42)], lease_seconds=0.001)
    await asyncio.sleep(0.01)  # the lease is a millisecond: let it lapse
    (swept,) = await store.sweep_sending(max_attempts=5, limit=10)
    assert (swept.id, swept.kind) == (mid, "failed") and swept.error.startswith("outcome unknown")
    now = utcnow()
    recorded = await store.record_outcomes([Outcome(mid, "sent", 1, 42, now, now, 202, remote_message_id="late")])
    assert [o.id for o in recorded.fenced] == [mid] and not recorded.sent_at
    row = await store.get(mid)
    assert (row["status"], row["remote_message_id"], row["attempts"]) == ("failed", None, 1)
    assert [a["outcome"] for a in row["attempt_log"]] == ["failed"], "one attempt recorded, the sweep's"
    assert await store.sent_total() == 0


async def test_the_sweep_leaves_live_leases_alone_and_resends_under_at_least_once(
    store: MessageStore, settings: Settings
) -> None:
    live, lapsed, last_try, by_hand = await seed(store, 4)
    await store.claim(4)
    await store.begin_sending([(live, 1)], lease_seconds=60, at_least_once=True)
    await store.begin_sending([(lapsed, 1), (last_try, 1)], lease_seconds=0.001, at_least_once=True)
    await sql(settings, "UPDATE messages SET attempts = 4 WHERE id = %s", (last_try,))
    await sql(settings, "UPDATE messages SET status = 'sending', lease_expires_at = NULL WHERE id = %s", (by_hand,))
    await asyncio.sleep(0.01)
    swept = {s.id: s for s in await store.sweep_sending(max_attempts=5, limit=10)}
    assert set(swept) == {lapsed, last_try, by_hand}
    assert swept[by_hand].kind == "failed", "no guarantee recorded: at-most-once"
    assert swept[lapsed].kind == "retry" and "sent again with the same Idempotency-Key" in swept[lapsed].error
    assert swept[last_try].kind == "failed" and swept[last_try].error.startswith("gave up after 5 attempts")
    rows = {
        r[0]: r[1:] for r in await sql(settings, "SELECT id, status, next_attempt_at <= UTC_TIMESTAMP(6) FROM messages")
    }
    assert rows[live] == ("sending", None) and rows[lapsed] == ("pending", 1) and rows[last_try][0] == "failed"
    assert await store.claim(10) == [lapsed], "due again at once, in the normal batches"


async def test_retrying_a_message_whose_outcome_is_unknown_needs_force(store: MessageStore) -> None:
    (mid,) = await seed(store, 1)
    await store.claim(1)
    await store.begin_sending([(mid, 1)], lease_seconds=0.001)
    await asyncio.sleep(0.01)
    await store.sweep_sending(max_attempts=5, limit=10)
    with pytest.raises(ConflictError, match="force=true"):
        await store.retry_failed(mid)
    assert (await store.retry_failed(mid, force=True))["status"] == "pending"


async def _counts_match(store: MessageStore, settings: Settings) -> dict[str, int]:
    kept = await store.counts_by_status()
    table = {str(st): int(n) for st, n in await sql(settings, "SELECT status, COUNT(*) FROM messages GROUP BY status")}
    assert {k: v for k, v in kept.items() if v} == table
    return kept


async def test_counts_follow_every_transition_and_hand_inserts(store: MessageStore, settings: Settings) -> None:
    """The counts by status are kept in the transactions that move rows (and by the insert trigger for rows
    inserted by hand), so they equal a full GROUP BY after each step."""
    ids = await seed(store, 6)
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES ('+905551111111', 'by hand')")
    assert (await _counts_match(store, settings))["pending"] == 7
    claimed = await store.claim(5)
    await store.release(claimed[:1])
    won = await store.begin_sending([(i, 1) for i in claimed[1:]], lease_seconds=0.001)
    assert all(d.won_by(1) for d in won.values())
    await _counts_match(store, settings)
    now = utcnow()
    a, b, c, _ = claimed[1:]
    await store.record_outcomes(
        [
            Outcome(a, "sent", 1, 1, now, now, 202),
            Outcome(b, "retry", 1, 1, now, now, 503, error="HTTP 503", next_attempt_at=now),
            Outcome(c, "failed", 1, 1, now, now, 400, error="HTTP 400"),
        ]
    )
    await asyncio.sleep(0.01)
    await store.sweep_sending(max_attempts=5, limit=10)  # d's lease lapsed
    await store.retry_failed(c)
    await store.set_sending(False)
    again = await store.claim(2)
    await store.begin_sending([(i, 2) for i in again])  # stopped: back to pending
    kept = await _counts_match(store, settings)
    assert kept["sent"] == 1 and kept["failed"] == 1 and kept["sending"] == 0, (kept, ids)


async def test_a_row_given_back_is_pending_again_unsent_and_only_by_its_delivery(
    store: MessageStore, settings: Settings
) -> None:
    """A delivery that won its row but found no rate slot in time gives it back: ``pending`` and due, no attempt
    spent or recorded, token and lease cleared, counts kept; another delivery's token (or a row no longer
    ``sending``) changes nothing; the next claim takes it again."""
    (mid,) = await seed(store, 1)
    await store.claim(1)
    await store.begin_sending([(mid, 7)], lease_seconds=60)
    assert not await store.give_back(mid, 8), "another delivery's token gave the row back"
    assert await store.give_back(mid, 7)
    assert not await store.give_back(mid, 7), "given back twice"
    row = (await sql(settings, "SELECT status, attempts, delivery_token, lease_expires_at FROM messages"))[0]
    assert row == ("pending", 0, None, None)
    assert (await store.get(mid))["attempt_log"] == []
    await _counts_match(store, settings)
    assert await store.claim(1) == [mid]


async def test_recount_repairs_counts_after_changes_by_hand(store: MessageStore, settings: Settings) -> None:
    ids = await seed(store, 4)
    await sql(settings, "UPDATE messages SET status = 'failed' WHERE id = %s", (ids[0],))
    await sql(settings, "DELETE FROM messages WHERE id = %s", (ids[1],))
    assert (await store.counts_by_status())["pending"] == 4, "hand updates are not seen..."
    assert (await store.recount())["failed"] == 1
    await _counts_match(store, settings)


async def test_retention_removes_exactly_the_expired_rows_and_keeps_pages_right(
    store: MessageStore, settings: Settings
) -> None:
    ids = await seed(store, 8)
    await store.claim(8)
    await store.begin_sending([(i, 1) for i in ids])
    now = utcnow()
    old = now - dt.timedelta(days=3)
    await store.record_outcomes([Outcome(i, "sent", 1, 1, now, now, 202) for i in ids[:5]])
    await store.record_outcomes([Outcome(i, "failed", 1, 1, now, now, 400, error="x") for i in ids[5:7]])
    await sql(settings, "UPDATE messages SET sent_at = %s WHERE id IN (%s, %s)", (old, ids[0], ids[1]))
    await sql(settings, "UPDATE messages SET failed_at = %s WHERE id = %s", (old, ids[5]))
    before = orjson.loads((await store.sent_page(2, offset=1)).json)
    assert await store.remove_expired(days=1, limit=1) == (1, 1, 0)
    assert await store.remove_expired(days=1, limit=10) == (1, 0, 0)
    assert await store.remove_expired(days=1, limit=10) == (0, 0, 0)
    left = {int(i) for (i,) in await sql(settings, "SELECT id FROM messages")}
    assert left == set(ids) - {ids[0], ids[1], ids[5]}
    assert await sql(
        settings, "SELECT COUNT(*) FROM message_attempts WHERE message_id IN (%s, %s, %s)", (ids[0], ids[1], ids[5])
    ) == [(0,)]
    page = await store.sent_page(2, offset=1)
    assert page.total == 3 and orjson.loads(page.json) == before, "offsets from the newest do not move"
    await _counts_match(store, settings)


async def test_a_stale_fence_claims_nothing(store: MessageStore) -> None:
    """A leader that lost its lease (another producer took it over with a new epoch) cannot claim, sweep or
    remove anything with its old fence."""
    await seed(store, 2)
    mine = await store.lead("producer-a", lease_seconds=0.2)
    assert mine is not None
    await asyncio.sleep(0.3)  # the lease lapses
    theirs = await store.lead("producer-b", lease_seconds=60)
    assert theirs is not None and theirs.epoch > mine.epoch
    for attempt in (
        store.claim(2, mine, budget=True),
        store.sweep_sending(5, 10, mine),
        store.reclaim_stale(1, 10, True, mine),
        store.remove_expired(1, 10, mine),
    ):
        with pytest.raises(LeaseLost):
            await attempt
    assert len(await store.claim(2, theirs, budget=True)) == 2


async def test_migration_5_counts_exactly_even_when_it_runs_again(settings: Settings, store: MessageStore) -> None:
    """Killed after its trigger but before it was recorded, migration 5 runs again: rows inserted meanwhile
    (counted by the trigger) must not be counted twice."""
    await seed(store, 3)
    await sql(settings, "DELETE FROM schema_migrations WHERE version = 5")
    await migrate(store.pool)
    await _counts_match(store, settings)
