"""Issue 17 on the real services: scheduled sends, cancel, priority, bulk create, idempotent create, filters."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from typing import Any

import aiomysql
import orjson
import pymysql
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from common.db import connect_kwargs, create_pool
from common.migrations import migrate
from common.models import utcnow
from common.queries import filtered_sql
from common.settings import Settings
from common.store import CLAIM_SQL, MessageStore, NewMessage
from gateway.app import create_app
from gateway.intake import Intake
from tests.conftest import sql
from tests.procs import Cluster, StandIn, wait_for

Client = TestClient[Any, Any]


@pytest.fixture
async def client(settings: Settings, store: MessageStore, aiohttp_client: Any) -> Client:
    return await aiohttp_client(create_app(settings))


def rfc3339(at: dt.datetime) -> str:
    return at.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")


def parsed(text: str) -> dt.datetime:
    """A time of the API (ISO 8601, trailing Z) as naive UTC."""
    assert text.endswith("Z"), text
    return dt.datetime.fromisoformat(text.removesuffix("Z"))


async def status_of(settings: Settings, message_id: int) -> str:
    ((status,),) = await sql(settings, "SELECT status FROM messages WHERE id = %s", (message_id,))
    return str(status)


async def explain(settings: Settings, statement: str, args: tuple[object, ...] = ()) -> list[dict[str, Any]]:
    """The plan rows of ``statement`` as dicts (MySQL 8 and MariaDB name the columns alike)."""
    conn = await aiomysql.connect(**connect_kwargs(settings))  # type: ignore[arg-type]
    try:
        async with conn.cursor(aiomysql.DictCursor) as cur:
            await cur.execute("EXPLAIN " + statement, args)
            return [{k.lower(): v for k, v in r.items()} for r in await cur.fetchall()]
    finally:
        conn.close()


async def fill(store: MessageStore, n: int, **kw: Any) -> list[int]:
    return (await store.create_messages([NewMessage(f"+9055510{i:05d}", f"m{i}", **kw) for i in range(n)])).ids


# --- the claim: due, by priority, an index range scan ------------------------------------------------


async def test_the_claim_is_a_range_scan_of_the_due_index_without_a_sort(
    store: MessageStore, settings: Settings
) -> None:
    await fill(store, 300)
    await fill(store, 300, send_at=utcnow() + dt.timedelta(hours=1))
    await fill(store, 50, priority="high")
    await sql(settings, "ANALYZE TABLE messages")
    plan = await explain(settings, CLAIM_SQL.replace(" FOR UPDATE SKIP LOCKED", ""), (10,))
    assert len(plan) == 1, plan
    (row,) = plan
    assert row["key"] == "ix_messages_claimable" and row["type"] == "range", plan
    assert "filesort" not in str(row["extra"]).lower(), plan
    assert "FOR UPDATE SKIP LOCKED" in CLAIM_SQL


async def test_scheduled_rows_are_not_claimed_before_their_send_at(store: MessageStore, settings: Settings) -> None:
    later = await fill(store, 2, send_at=utcnow() + dt.timedelta(seconds=2))
    now = await fill(store, 2)
    past = await fill(store, 1, send_at=utcnow() - dt.timedelta(days=3))  # a past time: as soon as possible
    assert await store.claim(10) == now + past
    assert await store.claim(10) == []
    await wait_for(lambda: _claimed(store, later), 10, "the scheduled rows to become due")
    # A hand-inserted row is due at once (send_at's default is now).
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES ('+905551111111', 'by hand')")
    assert len(await store.claim(10)) == 1


async def _claimed(store: MessageStore, ids: list[int]) -> bool:
    got = await store.claim(10)
    assert got in ([], ids), got
    return got == ids


async def test_high_priority_is_claimed_first_oldest_first_within_each(store: MessageStore) -> None:
    normal = await fill(store, 100)
    high = await fill(store, 10, priority="high")
    assert await store.claim(4) == high[:4]
    assert await store.claim(8) == high[4:] + normal[:2]
    assert await store.claim(200) == normal[2:]


# --- scheduled send, priority: end to end ------------------------------------------------------------


async def test_a_message_scheduled_3s_ahead_is_sent_at_the_first_tick_after(
    client: Client, settings: Settings, store: MessageStore, cluster: Cluster, standin: StandIn
) -> None:
    cluster.start("producer", SEND_INTERVAL_SECONDS="0.5", SEND_BATCH_SIZE="2")
    cluster.start("consumer")
    await wait_for(lambda: _leader_ticks(store), 20, "the producer to tick")
    send_at = utcnow().replace(microsecond=0) + dt.timedelta(seconds=4)
    resp = await client.post(
        "/messages", json={"recipient": "+905551111111", "content": "later", "send_at": rfc3339(send_at)}
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert parsed(body["send_at"]) == send_at and body["status"] == "pending"
    now = await client.post("/messages", json={"recipient": "+905551111112", "content": "now"})
    now_id = (await now.json())["id"]

    async def arrived(key: str) -> dict[str, Any] | None:
        return next((r for r in await standin.received() if r["key"] == key), None)

    await wait_for(lambda: arrived(str(now_id)), 15, "the unscheduled message to go out")
    assert await arrived(str(body["id"])) is None, "not before its send_at"
    got = await wait_for(lambda: arrived(str(body["id"])), 20, "the scheduled message to go out")
    due = send_at.replace(tzinfo=dt.UTC).timestamp()
    assert got["at"] >= due, "never before send_at"
    assert got["at"] < due + 0.5 + 1.5, "at the first tick after send_at (interval 0.5 s, plus the delivery)"


async def _leader_ticks(store: MessageStore) -> bool:
    return (await store.dispatch_state())["last_tick_at"] is not None


async def test_ten_high_messages_after_a_hundred_normal_go_out_in_the_first_ticks(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    await store.set_sending(False)
    normal = await fill(store, 100)
    high = await fill(store, 10, priority="high")
    cluster.start("producer", SEND_INTERVAL_SECONDS="0.3", SEND_BATCH_SIZE="5")
    cluster.start("consumer")
    await store.set_sending(True)

    async def twenty() -> bool:
        return len(await standin.keys()) >= 20

    await wait_for(twenty, 30, "twenty messages to go out")
    keys = [int(k) for k in await standin.keys()]
    assert set(keys[:10]) == set(high), "the two first ticks send the ten high ones"
    assert set(keys[10:20]) == set(normal[:10]), "then the oldest normal ones"


# --- cancel -------------------------------------------------------------------------------------------


async def test_cancel_moves_an_unclaimed_message_to_cancelled(client: Client, store: MessageStore) -> None:
    due, scheduled = await fill(store, 1), await fill(store, 1, send_at=utcnow() + dt.timedelta(days=1))
    for mid in due + scheduled:
        resp = await client.post(f"/messages/{mid}/cancel")
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["status"] == "cancelled" and body["cancelled_at"].endswith("Z")
        again = await client.post(f"/messages/{mid}/cancel")
        assert again.status == 200 and (await again.json())["status"] == "cancelled"
    assert await store.claim(10) == []
    counts = await store.counts_by_status()
    assert counts["cancelled"] == 2 and counts["pending"] == 0
    masked = await (await client.post(f"/messages/{due[0]}/cancel?mask=true")).json()
    assert masked["recipient"] == "+••••••••0000", "what the dashboard asks for"
    assert (await client.post(f"/messages/{due[0]}/cancel?mask=yes")).status == 422
    stats = await (await client.get("/stats")).json()
    assert stats["counts"]["cancelled"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert 'messages_by_status{status="cancelled"} 2.0' in metrics


async def test_cancel_is_409_once_claimed_and_404_when_unknown(client: Client, store: MessageStore) -> None:
    (mid,) = await fill(store, 1)
    assert await store.claim(1) == [mid]
    resp = await client.post(f"/messages/{mid}/cancel")
    assert resp.status == 409
    body = await resp.json()
    assert body["error"]["code"] == "conflict" and "is queued" in body["error"]["message"]
    missing = await client.post("/messages/999999/cancel")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
    bad = await client.post("/messages/abc/cancel")
    assert bad.status == 422 and (await bad.json())["error"]["details"]["field"] == "id"


async def test_a_cancel_racing_a_claim_never_lets_a_cancelled_row_be_claimed(
    settings: Settings, store: MessageStore
) -> None:
    """Many rounds of a claim and a cancel started together on their own connections: in each, exactly one
    wins; a cancelled row is never claimed and no consumer can take it (the queued->sending compare-and-set)."""
    claimer = MessageStore(await create_pool(settings, maxsize=1))
    canceller = MessageStore(await create_pool(settings, maxsize=1))
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(150):
            (mid,) = await fill(store, 1)
            claimed, cancelled = await asyncio.gather(claimer.claim(5), canceller.cancel(mid), return_exceptions=True)
            assert not isinstance(claimed, BaseException), claimed
            status = await status_of(settings, mid)
            if isinstance(cancelled, BaseException):
                assert "is queued" in str(cancelled), cancelled
                assert claimed == [mid] and status == "queued"
                outcomes["claimed"] += 1
                won = await store.begin_sending([(mid, 1)])
                assert won[mid].won_by(1)
                await sql(settings, "UPDATE messages SET status = 'failed' WHERE id = %s", (mid,))
            else:
                assert claimed == [] and status == "cancelled", (claimed, status)
                won = await store.begin_sending([(mid, 1)])
                assert mid not in won or not won[mid].won_by(1), "a cancelled row cannot become sending"
                outcomes["cancelled"] += 1
    finally:
        for s in (claimer, canceller):
            s.pool.close()
            await s.pool.wait_closed()
    assert sum(outcomes.values()) == 150
    await store.recount()


async def test_cancelled_messages_never_reach_the_webhook_end_to_end(
    client: Client, settings: Settings, store: MessageStore, cluster: Cluster, standin: StandIn
) -> None:
    """Messages created and cancelled while the producer claims every 50 ms: whatever the cancel answered,
    a message it cancelled never arrives, and every other one does."""
    cluster.start("producer", SEND_INTERVAL_SECONDS="0.05", SEND_BATCH_SIZE="3")
    cluster.start("consumer")
    cancelled: set[int] = set()
    for i in range(60):
        (mid,) = await fill(store, 1)
        await asyncio.sleep(0.01 * (i % 6))  # cancels land before, during and after the ticks' claims
        resp = await client.post(f"/messages/{mid}/cancel")
        assert resp.status in (200, 409), await resp.text()
        if resp.status == 200:
            cancelled.add(mid)

    async def settled() -> bool:
        got = await sql(settings, "SELECT COUNT(*) FROM messages WHERE status NOT IN ('sent', 'cancelled')")
        return got[0][0] == 0

    await wait_for(settled, 30, "every message to end sent or cancelled")
    arrived = {int(k) for k in await standin.keys()}
    assert cancelled and not arrived & cancelled, "a cancelled message reached the webhook"
    assert len(arrived) + len(cancelled) == 60


async def test_retention_removes_old_cancelled_rows(store: MessageStore, settings: Settings) -> None:
    old, recent = await fill(store, 1), await fill(store, 1)
    for mid in old + recent:
        await store.cancel(mid)
    await sql(settings, "UPDATE messages SET cancelled_at = cancelled_at - INTERVAL 10 DAY WHERE id = %s", (old[0],))
    assert await store.remove_expired(7, 100) == (0, 0, 1)
    assert [r[0] for r in await sql(settings, "SELECT id FROM messages")] == recent
    assert (await store.counts_by_status())["cancelled"] == 1


# --- POST /messages: send_at and priority -------------------------------------------------------------


@pytest.mark.parametrize(
    ("send_at", "reason"),
    [
        ("2030-05-01T12:00:00", "with a zone"),
        ("2030-05-01 12:00:00Z", "RFC 3339"),
        ("tomorrow", "RFC 3339"),
        ("2030-02-30T12:00:00Z", "no such day"),
        (12, "Not a valid string"),
        ("9999-12-31T23:59:59Z", "one year ahead"),
    ],
)
async def test_bad_send_at_is_a_422_naming_it(client: Client, send_at: Any, reason: str) -> None:
    resp = await client.post("/messages", json={"recipient": "+905551111111", "content": "x", "send_at": send_at})
    assert resp.status == 422, await resp.text()
    error = (await resp.json())["error"]
    assert error["details"]["field"] == "send_at" and reason in error["message"], error


async def test_send_at_with_an_offset_and_priority_are_stored(client: Client) -> None:
    at = (utcnow() + dt.timedelta(days=2)).replace(microsecond=0)
    local = at.replace(tzinfo=dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=3))).isoformat()
    resp = await client.post(
        "/messages", json={"recipient": "+905551111111", "content": "x", "send_at": local, "priority": "high"}
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert parsed(body["send_at"]) == at and body["priority"] == "high"
    bad = await client.post("/messages", json={"recipient": "+905551111111", "content": "x", "priority": "urgent"})
    assert bad.status == 422 and (await bad.json())["error"]["details"]["field"] == "priority"


# --- POST /messages: the group commit ------------------------------------------------------------------


async def test_concurrent_creates_each_get_their_own_message_as_the_database_holds_it(
    client: Client, store: MessageStore
) -> None:
    """50 creates at once share inserts and commits: each answer is 201 with its own id, and says exactly what
    GET /messages/{id} says of that message (the answer is built from the values inserted, not read back)."""
    bodies = [{"recipient": f"+9055530{i:05d}", "content": f"group {i}"} for i in range(50)]
    bodies[3]["priority"] = "high"
    bodies[4]["send_at"] = rfc3339(utcnow() + dt.timedelta(hours=1))
    bodies[5]["send_at"] = "2020-01-01T00:00:00Z"  # past: as soon as possible, i.e. its created_at
    answers = await asyncio.gather(*(client.post("/messages", json=b) for b in bodies))
    created = []
    for resp in answers:
        assert resp.status == 201, await resp.text()
        created.append(await resp.json())
        assert resp.headers["Location"] == f"/messages/{created[-1]['id']}"
    assert len({c["id"] for c in created}) == 50
    for body, made in zip(bodies, created, strict=True):
        assert (made["recipient"], made["content"], made["status"]) == (body["recipient"], body["content"], "pending")
        resp = await client.get(f"/messages/{made['id']}")
        assert await resp.json() == made
    assert created[3]["priority"] == "high"
    assert parsed(created[4]["send_at"]) == parsed(bodies[4]["send_at"])
    assert created[5]["send_at"] == created[5]["created_at"]
    assert (await store.counts_by_status())["pending"] == 50


async def test_a_message_the_database_refuses_fails_alone_not_its_group(
    store: MessageStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A group whose insert fails (a recipient past the API's validation that the CHECK refuses) is inserted
    again one message at a time: the good ones are created, only the bad one's request fails."""
    intake = Intake(store)
    good = [NewMessage(f"+9055540{i:05d}", f"fine {i}") for i in range(5)]
    results = await asyncio.gather(
        *(intake.create(m) for m in [*good[:2], NewMessage("+90 bad", "refused"), *good[2:]]),
        return_exceptions=True,
    )
    await intake.close()
    assert isinstance(results[2], pymysql.err.OperationalError), results[2]
    made = [r for i, r in enumerate(results) if i != 2]
    assert all(isinstance(r, tuple) for r in made), made
    rows = await store.created_json(sorted(r[0] for r in made if isinstance(r, tuple)))
    assert sorted(m["recipient"] for m in orjson.loads(rows)) == [m.recipient for m in good]
    assert (await store.counts_by_status())["pending"] == 5
    assert "a group of 6 creates failed" in caplog.text  # they did share one insert first


@hsettings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(waves=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=6))
async def test_creates_arriving_in_waves_each_get_their_own_row(store: MessageStore, waves: list[int]) -> None:
    """Creates arriving in waves (a wave while the groups before it are still in flight): two groups insert at
    once, and each create still answers the id of the row holding its own message, every id once, and the
    count of pending messages grows by exactly the number created."""
    before = (await store.counts_by_status())["pending"]
    intake = Intake(store)
    messages = [[NewMessage(f"+90555{w:02d}{i:05d}", f"wave {w} #{i}") for i in range(n)] for w, n in enumerate(waves)]
    pending = []
    for wave in messages:
        pending += [asyncio.ensure_future(intake.create(m)) for m in wave]
        await asyncio.sleep(0)  # the flush of what came so far starts: the next wave finds a group in flight
    results = await asyncio.gather(*pending)
    await intake.close()
    ids = [message_id for message_id, _ in results]
    assert len(set(ids)) == len(ids)
    rows = {r["id"]: r for r in orjson.loads(await store.created_json(sorted(ids)))}
    for (message_id, _), m in zip(results, [m for wave in messages for m in wave], strict=True):
        assert (rows[message_id]["recipient"], rows[message_id]["content"]) == (m.recipient, m.content)
    assert (await store.counts_by_status())["pending"] == before + len(ids)


# --- POST /messages/batch -----------------------------------------------------------------------------


async def test_a_batch_of_1000_is_created_in_order_in_under_a_second(
    client: Client, settings: Settings, store: MessageStore
) -> None:
    items = [{"recipient": f"+9055520{i:05d}", "content": f"bulk {i}"} for i in range(1000)]
    items[7]["priority"] = "high"
    started = time.perf_counter()
    resp = await client.post("/messages/batch", json={"messages": items})
    took = time.perf_counter() - started
    assert resp.status == 201, await resp.text()
    created = (await resp.json())["messages"]
    assert [m["recipient"] for m in created] == [i["recipient"] for i in items]
    assert created[7]["priority"] == "high" and {m["status"] for m in created} == {"pending"}
    ids = [m["id"] for m in created]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    rows = await sql(settings, "SELECT id, recipient FROM messages ORDER BY id")
    assert [(r[0], r[1]) for r in rows] == [(m["id"], m["recipient"]) for m in created]
    assert took < 1.0, f"{took:.3f} s"
    # The batch counts its rows in one statement; rows inserted by hand are still counted by the trigger.
    await sql(settings, "INSERT INTO messages (recipient, content) VALUES ('+905551111111', 'by hand')")
    assert (await store.counts_by_status())["pending"] == 1001
    assert await store.recount() == {**dict.fromkeys(await store.counts_by_status(), 0), "pending": 1001}


async def test_a_failed_batch_insert_leaves_its_connection_counting(settings: Settings) -> None:
    """A batch the database refuses (a recipient its CHECK rejects, past the API's validation) creates nothing,
    and the pooled connection it used counts the next hand-style insert again."""
    pool = await create_pool(settings, maxsize=1)
    try:
        await migrate(pool)
        store = MessageStore(pool)
        with pytest.raises(pymysql.err.OperationalError):
            await store.create_messages([NewMessage("+905551111111", "ok"), NewMessage("+90 bad", "no")])
        await store.create("+905551111112", "counted")
        assert (await store.counts_by_status())["pending"] == 1
        assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(1,)]
    finally:
        pool.close()
        await pool.wait_closed()


async def test_a_batch_with_three_bad_items_lists_them_and_creates_nothing(client: Client, settings: Settings) -> None:
    items: list[Any] = [{"recipient": f"+9055520{i:05d}", "content": f"bulk {i}"} for i in range(10)]
    items[2] = {"recipient": "12345", "content": "bad phone"}
    items[5] = {"recipient": "+905551111111", "content": ""}
    items[9] = "not an object"
    resp = await client.post("/messages/batch", json={"messages": items})
    assert resp.status == 422, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "validation_error" and "nothing created" in error["message"]
    listing = error["details"]["errors"]
    assert [(e["index"], e["field"]) for e in listing] == [(2, "recipient"), (5, "content"), (9, "item")]
    assert all(e["reason"] for e in listing)
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(0,)]


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "messages"), ({"messages": []}, "messages"), ({"messages": "x"}, "messages")],
)
async def test_a_batch_without_messages_is_a_422(client: Client, body: Any, field: str) -> None:
    resp = await client.post("/messages/batch", json=body)
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["error"]["details"]["field"] == field


async def test_a_batch_of_1001_is_a_422(client: Client) -> None:
    items = [{"recipient": "+905551111111", "content": "x"}] * 1001
    resp = await client.post("/messages/batch", json={"messages": items})
    assert resp.status == 422 and "1000" in (await resp.json())["error"]["message"]


# --- Idempotency-Key ----------------------------------------------------------------------------------


async def test_the_same_key_replays_the_first_result_and_another_body_is_a_422(
    client: Client, settings: Settings
) -> None:
    body = {"recipient": "+905551111111", "content": "once"}
    first = await client.post("/messages", json=body, headers={"Idempotency-Key": "order-1"})
    assert first.status == 201, await first.text()
    again = await client.post("/messages", json=body, headers={"Idempotency-Key": "order-1"})
    assert again.status == 200 and (await again.json())["id"] == (await first.json())["id"]
    other = await client.post("/messages", json={**body, "content": "twice"}, headers={"Idempotency-Key": "order-1"})
    assert other.status == 422
    error = (await other.json())["error"]
    assert error["code"] == "idempotency_conflict" and error["details"]["field"] == "Idempotency-Key"
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(1,)]
    # The batch endpoint: the same rules, its own fingerprint (another path is another request).
    batch = {"messages": [body, body]}
    b1 = await client.post("/messages/batch", json=batch, headers={"Idempotency-Key": "batch-1"})
    b2 = await client.post("/messages/batch", json=batch, headers={"Idempotency-Key": "batch-1"})
    assert (b1.status, b2.status) == (201, 200)
    assert [m["id"] for m in (await b1.json())["messages"]] == [m["id"] for m in (await b2.json())["messages"]]
    cross = await client.post("/messages/batch", json=batch, headers={"Idempotency-Key": "order-1"})
    assert cross.status == 422
    # After 24 h the key is free again.
    await sql(settings, "UPDATE idempotency_keys SET created_at = created_at - INTERVAL 25 HOUR")
    late = await client.post("/messages", json={**body, "content": "twice"}, headers={"Idempotency-Key": "order-1"})
    assert late.status == 201
    bad = await client.post("/messages", json=body, headers={"Idempotency-Key": "x" * 256})
    assert bad.status == 422 and (await bad.json())["error"]["details"]["field"] == "Idempotency-Key"


async def test_one_key_from_ten_concurrent_clients_creates_exactly_one_message(
    settings: Settings, store: MessageStore, aiohttp_client: Any
) -> None:
    """Ten clients spread over three gateways (replicas share only MySQL) post the same key at once."""
    gateways = [await aiohttp_client(create_app(settings)) for _ in range(3)]
    body = {"messages": [{"recipient": "+905551111111", "content": "exactly once"}]}

    async def post(i: int) -> tuple[int, list[int]]:
        resp = await gateways[i % 3].post("/messages/batch", json=body, headers={"Idempotency-Key": "same"})
        return resp.status, [m["id"] for m in (await resp.json())["messages"]]

    results = await asyncio.gather(*(post(i) for i in range(10)))
    assert sorted(s for s, _ in results) == [200] * 9 + [201]
    assert len({tuple(ids) for _, ids in results}) == 1
    assert await sql(settings, "SELECT COUNT(*) FROM messages") == [(1,)]


# --- filters ------------------------------------------------------------------------------------------


async def test_filters_by_status_and_recipient_newest_first_with_cursors(client: Client, store: MessageStore) -> None:
    ids = await fill(store, 12)
    other = (await store.create_messages([NewMessage("+905559999999", f"o{i}") for i in range(3)])).ids
    await store.cancel(ids[0])
    await store.cancel(other[0])
    assert await store.claim(2) == ids[1:3]
    resp = await client.get("/messages?status=pending,cancelled&limit=5")
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Total-Count"] == str(15 - 2)
    got = [m["id"] for m in await resp.json()]
    expected = sorted(set(ids + other) - set(ids[1:3]), reverse=True)
    assert got == expected[:5]
    walked = list(got)
    link = resp.headers.get("Link")
    while link:
        url = link[1 : link.index(">")]
        page = await client.get(url)
        walked += [m["id"] for m in await page.json()]
        link = page.headers.get("Link")
    assert walked == expected, "the cursor walks every match once, newest first"
    mine = await client.get("/messages?recipient=%2B905559999999")
    assert [m["id"] for m in await mine.json()] == other[::-1] and mine.headers["X-Total-Count"] == "3"
    first = (await mine.json())[0]
    assert set(first) >= {"send_at", "priority", "status"}
    both = await client.get("/messages?recipient=%2B905559999999&status=cancelled")
    assert [m["id"] for m in await both.json()] == [other[0]]
    queued = await client.get("/messages?status=queued")
    assert {m["id"] for m in await queued.json()} == set(ids[1:3])
    seed = await client.get("/messages")
    assert await seed.json() == [] and seed.headers["X-Total-Count"] == "0", "no filter: the seed's sent list"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=sent,nope", "status"),
        ("status=", "status"),
        ("recipient=12", "recipient"),
        ("status=sent&offset=5", "offset"),
        ("status=sent&after=%%%", "after"),
        ("status=sent&limit=0", "limit"),
    ],
)
async def test_bad_filters_are_422_naming_the_parameter(client: Client, query: str, field: str) -> None:
    resp = await client.get(f"/messages?{query}")
    assert resp.status == 422, await resp.text()
    assert (await resp.json())["error"]["details"]["field"] == field


async def test_each_filter_is_served_by_an_index(store: MessageStore, settings: Settings) -> None:
    """The plans of the page queries: each status's part is a range (or ref) of its index, never a table scan,
    and the page's rows are read back by primary key."""
    await fill(store, 300)
    await store.create_messages([NewMessage("+905551000001", f"r{i}") for i in range(20)])
    await sql(settings, "ANALYZE TABLE messages")
    cursor = (int(time.time() * 1e6), 2**40)
    cases = [
        (["pending", "failed"], None, None, "ix_messages_listed"),
        (["sent"], "+905551000001", None, "ix_messages_recipient_created"),
        (["pending"], None, cursor, "ix_messages_listed"),
        (["queued", "sending", "cancelled"], None, cursor, "ix_messages_listed"),
        (["pending", "queued"], "+905551000001", cursor, "ix_messages_recipient_created"),
    ]
    for statuses, recipient, after, index in cases:
        statement, args = filtered_sql(statuses, recipient, 20, after)
        plan = await explain(settings, statement, tuple(args))
        parts = [r for r in plan if r["table"] == "messages"]
        assert len(parts) == len(statuses) + 1, plan
        for r in parts:
            if r["key"] == "PRIMARY":  # the join back from the page's ids
                assert r["type"] == "eq_ref", plan
            else:
                assert r["key"] == index and r["type"] in ("range", "ref"), plan
