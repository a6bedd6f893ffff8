"""Delivery control (issue 16), black-box on the real services and the stand-in: signed requests verified by the
reference ``standardwebhooks`` package, one rate limit shared by every consumer, a pause for a ``Retry-After``
seen by any consumer, and a circuit breaker shared through Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from common import topology
from common.cache import connect
from common.errors import SettingsError
from common.settings import Secret, Settings
from common.store import MessageStore
from consumer.control import GRACE, MAX_SLOT_WAIT, SETTLE_SECONDS, Control, Slots, Ticket
from consumer.service import REDIS_TIMEOUT_SECONDS
from consumer.signing import Signer
from tests.chaos_helpers import assert_accounting, counts, insert, logged, outage, ready, start, wait_finished
from tests.conftest import sql
from tests.private_servers import PrivateServer
from tests.procs import ARTIFACTS, Cluster, Service, StandIn, consumer_in_process, free_port, wait_for
from tests.test_rate_and_failover import most_in_any_window


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


async def test_every_request_is_signed_for_each_secret_of_a_rotation(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """Two secrets (a rotation): each request verifies with either one; webhook-id is the same on a retry;
    a tampered body or an old timestamp is rejected by the reference verifier."""
    old, new = _secret(), _secret()
    ids = await insert(store, 6)
    await standin.behave(script=[{"status": 500}])  # the first request fails: one message is sent twice
    start(cluster, "consumer", WEBHOOK_SIGNING_SECRETS=f"{old} {new}")
    start(cluster, "producer", SEND_BATCH_SIZE=10, SEND_INTERVAL_SECONDS=0.5)
    await wait_finished(settings, 60)
    acc = await assert_accounting(settings, standin)
    assert acc.sent == set(ids)
    received = await standin.received()
    assert len(received) == len(ids) + 1
    for secret in (old, new):
        verifier = Verifier(secret)
        for r in received:
            assert verifier.verify(r["raw"], r["signing"]) == r["body"]
    ids_by_key: dict[str, set[str]] = {}
    for r in received:
        ids_by_key.setdefault(r["key"], set()).add(r["signing"]["webhook-id"])
        assert len(r["signing"]["webhook-signature"].split(" ")) == 2
    assert all(len(v) == 1 for v in ids_by_key.values()), "webhook-id changed between attempts"
    assert len({next(iter(v)) for v in ids_by_key.values()}) == len(ids), "two messages share a webhook-id"

    one = received[0]
    tampered = one["raw"].replace(one["body"]["content"], one["body"]["content"] + "!")
    with pytest.raises(WebhookVerificationError):
        Verifier(new).verify(tampered, one["signing"])
    stale = Signer(Settings.from_env({"WEBHOOK_SIGNING_SECRETS": new}, dotenv=None).signing_keys)
    headers = stale.headers(one["signing"]["webhook-id"], one["raw"].encode(), now=time.time() - 600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Verifier(new).verify(one["raw"], headers)
    assert Verifier(new).verify(one["raw"], stale.headers(one["signing"]["webhook-id"], one["raw"].encode()))


async def test_unsigned_by_default(store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn) -> None:
    await insert(store, 2)
    start(cluster, "consumer")
    start(cluster, "producer", SEND_BATCH_SIZE=10)
    await wait_finished(settings, 60)
    assert all("signing" not in r for r in await standin.received())


@pytest.mark.parametrize(
    "value",
    [
        "plain-s3cr3t",
        "whsec_not*base64",
        "whsec_" + base64.b64encode(b"short").decode(),
        "whsec_" + base64.b64encode(bytes(range(24))).decode() + " oops",
    ],
)
def test_a_malformed_signing_secret_stops_the_start_naming_the_variable_not_the_value(value: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"WEBHOOK_SIGNING_SECRETS": value}, dotenv=None)
    text = str(err.value)
    assert text.startswith("WEBHOOK_SIGNING_SECRETS=*** is invalid") and value not in text


# --- one rate limit for all consumers, one pause for a Retry-After ----------------------------------------


async def _attempts(settings: Settings) -> dict[int, int]:
    return {int(i): int(n) for i, n in await sql(settings, "SELECT id, attempts FROM messages")}


async def test_four_consumers_share_one_rate_limit(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """50/s in total over 4 consumers: 1,000 messages arrive with no 1-second window above 55, in about 20 s."""
    ids = await insert(store, 1000)
    consumers = [start(cluster, "consumer", WEBHOOK_RATE_LIMIT_PER_SECOND=50) for _ in range(4)]
    await wait_for(lambda: ready(*consumers), 30, "four consumers consuming")
    start(cluster, "producer", SEND_BATCH_SIZE=1000, SEND_INTERVAL_SECONDS=0.5)
    await wait_finished(settings, 60)
    acc = await assert_accounting(settings, standin)
    assert acc.sent == set(ids)
    arrivals = sorted(float(r["at"]) for r in await standin.received())
    drain = arrivals[-1] - arrivals[0]
    waits = [await control_waits(c) for c in consumers]
    late, given_back = sum(w.get("late", 0) for w in waits), sum(w.get("given-back", 0) for w in waits)
    print(
        f"1,000 at 50/s over 4 consumers: drain {drain:.1f}s, busiest second {most_in_any_window(arrivals, 1)},"
        f" late for their slot {late}, given back {given_back}"
    )
    # The bound, limit + 10 %: a delivery whose compare-and-set ran past its slot takes a new one
    # instead of going out beside the next slot's request, so the spacing holds whatever the database does.
    assert most_in_any_window(arrivals, 1.0) <= 55
    assert 18 <= drain <= 24, f"the drain took {drain:.1f}s instead of about 20s"


async def control_waits(svc: Service) -> dict[str, int]:
    """This consumer's ``consumer_delivery_control_waits_total`` by reason (its /metrics)."""
    port = svc.env["CONSUMER_METRICS_PORT"]  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'^consumer_delivery_control_waits_total\{reason="([^"]+)"\} (\S+)$', text, re.M)
    return {reason: int(float(n)) for reason, n in found}


async def test_a_retry_after_pauses_every_consumer(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """A 429 with Retry-After: 3 seen by one consumer stops all four for 3 s; only the message that got the
    429 spends an attempt, the others wait."""
    ids = await insert(store, 120)
    await standin.behave(script=[*([{}] * 20), {"status": 429, "retry_after": 3}])
    consumers = [start(cluster, "consumer", WEBHOOK_RATE_LIMIT_PER_SECOND=20) for _ in range(4)]
    await wait_for(lambda: ready(*consumers), 30, "four consumers consuming")
    start(cluster, "producer", SEND_BATCH_SIZE=200, SEND_INTERVAL_SECONDS=0.5)
    await wait_finished(settings, 60)
    acc = await assert_accounting(settings, standin)
    assert acc.sent == set(ids)
    received = sorted(await standin.received(), key=lambda r: float(r["at"]))
    limited = next(r for r in received if r["status"] == 429)
    after = [float(r["at"]) - float(limited["at"]) for r in received if float(r["at"]) > float(limited["at"])]
    # requests already on their way when the 429 came back (within LEAD of their rate slot, their row taken
    # for sending) still arrive right after it; then nothing until the pause is over
    early = [d for d in after if d < 2.9]
    assert all(d < 0.4 for d in early) and len(early) <= 8, f"requests during the pause: {early}"
    assert min(d for d in after if d >= 0.4) >= 2.9
    paused = [c for c in consumers if logged(c, "every delivery pauses 3.0s")]
    assert len(paused) == 1, "one log line for the pause"
    attempts = await _attempts(settings)
    assert attempts[int(limited["key"])] == 2
    assert all(n == 1 for i, n in attempts.items() if i != int(limited["key"])), "waiting spent attempts"


# --- the circuit breaker -----------------------------------------------------------------------------------

BREAKER = {
    "WEBHOOK_BREAKER_FAILURE_RATIO": 0.5,
    "WEBHOOK_BREAKER_MIN_REQUESTS": 5,
    "WEBHOOK_BREAKER_WINDOW_SECONDS": 10,
    "WEBHOOK_BREAKER_COOLDOWN_SECONDS": 1.5,
    "WEBHOOK_RATE_LIMIT_PER_SECOND": 20,
    "MAX_ATTEMPTS": 100,
}


async def test_the_breaker_opens_waits_probes_and_closes(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """A stand-in that fails everything opens the breaker within the window; while it is open only the probes
    go out (one per cooldown), no message is failed; when the stand-in recovers a probe closes it and every
    message ends sent, accepted once."""
    ids = await insert(store, 40)
    await standin.behave(fail_rate=1.0, fail_status=500)
    consumers = [start(cluster, "consumer", **BREAKER) for _ in range(2)]
    port = free_port()
    start(cluster, "gateway", GATEWAY_PORT=port, **BREAKER)
    await wait_for(lambda: ready(*consumers), 30, "two consumers consuming")
    assert (await _stats_breaker(port))["state"] == "closed"
    start(cluster, "producer", SEND_BATCH_SIZE=100, SEND_INTERVAL_SECONDS=0.5)
    await wait_for(lambda: _any_logged(consumers, "circuit breaker opened"), 20, "the breaker to open")
    shown = await _stats_breaker(port)
    assert shown["state"] in ("open", "half-open") and shown["failing_since"], shown
    await wait_for(lambda: _any_logged(consumers, "circuit breaker reopened"), 20, "a failed probe")
    before = len(await standin.received())
    opened_at = time.monotonic()
    await wait_for(lambda: _count_logged(consumers, "circuit breaker reopened", 3), 20, "three failed probes")
    during = len(await standin.received()) - before
    elapsed = time.monotonic() - opened_at
    assert during <= elapsed / 1.5 + 2, f"{during} requests in {elapsed:.1f}s with the breaker open"
    assert (await counts(settings)).get("failed", 0) == 0
    assert all(n < 20 for n in (await _attempts(settings)).values()), "attempts spent while open"
    await standin.behave(fail_rate=0.0)
    await wait_for(lambda: _any_logged(consumers, "circuit breaker closed"), 20, "a probe to close the breaker")
    await wait_finished(settings, 60)
    acc = await assert_accounting(settings, standin)
    assert acc.sent == set(ids)
    assert await _stats_breaker(port) == {"state": "closed", "failing_since": None, "until": None}
    transitions = [line for c in consumers for line in c.log().splitlines() if "circuit breaker" in line]
    assert sum("breaker opened" in t for t in transitions) == 1, "one log line per change"


async def _any_logged(services: list[Service], text: str) -> bool:
    return any(logged(s, text) for s in services)


async def _count_logged(services: list[Service], text: str, n: int) -> bool:
    return sum(s.log().count(text) for s in services) >= n


async def _stats_breaker(port: int) -> dict[str, Any]:
    async def answered() -> dict[str, Any] | None:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/stats") as resp:
                return dict((await resp.json())["breaker"]) if resp.status == 200 else None
        except aiohttp.ClientError:
            return None

    await wait_for(answered, 20, "the gateway's /stats")
    found = await answered()
    assert found is not None
    return found


# --- the fallback provider ----------------------------------------------------------------------------------


async def test_with_a_fallback_the_outage_goes_through_the_fallback_once(
    request: pytest.FixtureRequest,
    store: MessageStore,
    settings: Settings,
    cluster: Cluster,
    standin: StandIn,
    redis_client: Any,
) -> None:
    """The primary fails everything; once its breaker is open every delivery goes to the fallback (a second
    stand-in), each message is accepted exactly once by one provider, the attempt log names the provider of
    each attempt and the cached messageId is the one of the provider that accepted it."""
    fallback = await StandIn(ARTIFACTS / f"{request.node.name}-fallback").start()
    try:
        ids = await insert(store, 60)
        await standin.behave(fail_rate=1.0, fail_status=503)
        env = {**BREAKER, "WEBHOOK_FALLBACK_URL": f"{fallback.url}/webhook", "WEBHOOK_FALLBACK_AUTH_KEY": "fb-key"}
        consumers = [start(cluster, "consumer", **env) for _ in range(2)]
        await wait_for(lambda: ready(*consumers), 30, "two consumers consuming")
        start(cluster, "producer", SEND_BATCH_SIZE=100, SEND_INTERVAL_SECONDS=0.5)
        await wait_finished(settings, 60)
        primary_got, fallback_got = await standin.received(), await fallback.received()
    finally:
        fallback.close()
    rows = await sql(settings, "SELECT id, status, remote_message_id FROM messages")
    assert {int(r[0]) for r in rows if r[1] == "sent"} == set(ids), "every message sent"
    accepted = {r["messageId"]: int(r["key"]) for r in fallback_got if r["status"] == 202}
    assert not [r for r in primary_got if r["status"] == 202], "the primary accepted nothing"
    assert sorted(accepted.values()) == sorted(ids), "each message accepted once, by the fallback"
    assert all(r["auth"] == "fb-key" for r in fallback_got)
    assert all(accepted.get(str(remote)) == int(i) for i, _, remote in rows), "remote id from the fallback"
    attempts = await sql(settings, "SELECT message_id, provider, http_status, outcome FROM message_attempts")
    assert {(p, s) for _, p, s, o in attempts} <= {("primary", 503), ("fallback", 202)}
    assert sum(p == "fallback" for _, p, _, _ in attempts) == len(ids)
    assert sum(p == "primary" for _, p, _, _ in attempts) == len(primary_got), "each attempt went to one provider"
    for remote, message_id in accepted.items():
        assert int(await redis_client.hget(f"{settings.redis_prefix}message:{remote}", "message_id")) == message_id


async def test_a_limit_above_a_thousand_per_second_keeps_its_spacing(settings: Settings, redis_client: Any) -> None:
    """The slots are spaced in microseconds: at 5,000/s, 30 requests asked for in one burst (a pipeline: the
    server runs them back to back) get slots 0.2 ms apart, ~6 ms in all (a spacing in whole ms would be 0).
    Each delay is measured from the server's clock at its call, so the server's ``TIME`` is read between the
    calls, and a burst in which the server stalled between two calls for longer than a slot (a busy machine)
    is run again on fresh keys: the claim is about the spacing, not about the machine."""
    for attempt in range(20):
        limited = Settings.from_env(
            {"REDIS_PREFIX": f"{settings.redis_prefix}{attempt}:", "WEBHOOK_RATE_LIMIT_PER_SECOND": "5000"},
            dotenv=None,
        )
        control = Control(limited, redis_client, "test")
        await control.admit()  # the script loaded
        async with redis_client.pipeline(transaction=False) as pipe:
            pipe.time()
            for _ in range(30):
                await control.admit_script(keys=control.keys, args=control.admit_args(), client=pipe)
                pipe.time()
            out = await pipe.execute()
        clock = [seconds * 1_000_000 + micros for seconds, micros in out[0::2]]
        answers = out[1::2]
        if max(b - a for a, b in itertools.pairwise(clock)) < 150:  # µs: no stall as long as a slot's spacing
            break
    else:
        pytest.fail("the Redis server stalled within every one of 20 bursts")
    delays = [int(a[1]) for a in answers]
    assert delays == sorted(delays) and 4 <= delays[-1] <= 7, delays


# --- a delivery past its rate slot, and a Redis outage -------------------------------------------------------


def test_the_local_share_spaces_its_slots_like_the_shared_limit() -> None:
    """While Redis is down each consumer's share is the same GCRA (pure logic): slots 1/rate apart, none
    reserved beyond the horizon, and how long until one is free."""
    slots = Slots(10, time.monotonic())
    taken = [at for at in (slots.take(1.0) for _ in range(11)) if at is not None]
    assert len(taken) == 11
    gaps = [b - a for a, b in itertools.pairwise(taken)]
    assert all(abs(g - 0.1) < 1e-9 for g in gaps), gaps
    assert slots.take(1.0) is None and slots.tat == pytest.approx(taken[-1] + 0.1)
    assert 0.05 < slots.free_in(1.0) <= 0.1


async def test_a_delivery_past_its_slot_takes_the_next_free_one_within_its_bound(
    settings: Settings, redis_client: Any
) -> None:
    """The late lane. With every slot of the horizon taken, a delivery still queued is told to wait, but one whose
    row is already sending and missed its slot takes the next free slot at once (not behind the waiters) and goes
    then; when none is free within MAX_SLOT_WAIT it is answered at once, nothing reserved, so its row goes back;
    a delivery on time takes no second slot."""
    control = Control(dataclasses.replace(settings, webhook_rate_limit_per_second=10), redis_client, "test")
    rate_key = control.keys[2]
    for _ in range(11):  # the horizon (one second at 10/s) full
        await control.admit_script(keys=control.keys, args=control.admit_args())
    assert (await control.admit_script(keys=control.keys, args=control.admit_args()))[0] == b"rate"

    before = int(await redis_client.get(rate_key))
    began = time.monotonic()
    assert await control.depart(Ticket(at=began - 1.0))  # a second late: the next free slot, ~1.1 s away
    waited = time.monotonic() - began
    assert 0.8 <= waited <= MAX_SLOT_WAIT, waited
    assert int(await redis_client.get(rate_key)) == before + 100_000  # one slot (µs) more, no other

    for _ in range(20):  # slots taken up to ~2.1 s ahead, beyond the bound (as after a stalled database)
        await control.admit_script(keys=control.keys, args=control.admit_args(late_ms=10_000))
    before = int(await redis_client.get(rate_key))
    began = time.monotonic()
    assert not await control.depart(Ticket(at=began - 1.0))
    assert time.monotonic() - began < 0.5, "a row waited for a slot it could not get"
    assert int(await redis_client.get(rate_key)) == before, "a slot was reserved for a row given back"

    began = time.monotonic()
    assert await control.depart(Ticket(at=began + 0.2))  # on time: waits for its own slot, takes no other
    assert 0.2 <= time.monotonic() - began < 0.2 + GRACE + 0.1
    assert int(await redis_client.get(rate_key)) == before


@pytest.fixture
async def limited(settings: Settings, standin: StandIn) -> AsyncIterator[tuple[Settings, topology.Topology]]:
    """A consumer in this process limited to 2 requests/s, and a channel to publish ids to it."""
    s = dataclasses.replace(
        settings,
        webhook_url=Secret(f"{standin.url}/webhook"),
        webhook_rate_limit_per_second=2,
        consumer_metrics_port=0,
    )
    async with consumer_in_process(s) as channel:
        yield s, channel


async def _value(v: Any) -> Any:
    return v


@contextlib.asynccontextmanager
async def _row_locked(store: MessageStore, message_id: int) -> AsyncIterator[None]:
    """Hold the row's lock (as a slow transaction would): the compare-and-set waits for it."""
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("START TRANSACTION")
        await cur.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", (message_id,))
        try:
            yield
        finally:
            await conn.rollback()


def _late_count() -> float:
    """Deliveries of this process found past their rate slot (its ``consumer_delivery_control_waits_total``)."""
    return REGISTRY.get_sample_value("consumer_delivery_control_waits_total", {"reason": "late"}) or 0.0


async def _status(settings: Settings, message_id: int, status: str) -> bool:
    return bool(await sql(settings, "SELECT 1 FROM messages WHERE id = %s AND status = %s", (message_id, status)))


@pytest.mark.parametrize("slots_free", [True, False], ids=["re-reserved", "given-back"])
async def test_a_compare_and_set_that_outlasts_its_slot(
    slots_free: bool,
    limited: tuple[Settings, topology.Topology],
    store: MessageStore,
    settings: Settings,
    standin: StandIn,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A compare-and-set held up (a row lock here) past the delivery's slot: the request does not go late, beside
    the next slot's; it goes at a slot reserved after the compare-and-set (its arrival one spacing before the
    limiter's next free slot), or, when the other deliveries took every slot within MAX_SLOT_WAIT, the row goes
    back to pending unsent: no attempt spent, nothing recorded, nothing at the service."""
    caplog.set_level(logging.INFO, logger="consumer.delivery")
    s, channel = limited
    control = Control(s, redis_client, "test")
    [message_id] = await insert(store, 1)
    assert await store.claim(1) == [message_id]
    late_before = _late_count()
    async with _row_locked(store, message_id):
        assert await channel.publish_ids([message_id]) == []
        # The delivery reserved its slot (now: the limiter was idle), then went on to its compare-and-set, which
        # cannot finish while the lock is held.
        await wait_for(lambda: redis_client.exists(control.keys[2]), 20, "the delivery to take its rate slot")
        await asyncio.sleep(0.3)  # the slot now 0.3 s past, more than the grace (a duration made to pass)
        if not slots_free:  # slots taken up to 2.5 s ahead, as when many compare-and-sets finish at once
            for _ in range(5):
                await control.admit_script(keys=control.keys, args=control.admit_args(late_ms=10_000))
    if slots_free:
        await wait_for(lambda: _status(settings, message_id, "sent"), 20, "the message to be sent")
        [arrival] = [float(r["at"]) for r in await standin.received()]
        next_free = int(await redis_client.get(control.keys[2])) / 1_000_000  # Redis TIME: the same wall clock
        assert abs(next_free - 0.5 - arrival) < 0.1, f"sent {next_free - arrival:.3f}s before the next free slot"
        assert _late_count() >= late_before + 1
        assert (await sql(settings, "SELECT attempts FROM messages WHERE id = %s", (message_id,)))[0][0] == 1
    else:
        await wait_for(lambda: _value("back to pending, no attempt spent" in caplog.text), 20, "the row given back")
        assert await _status(settings, message_id, "pending")
        row = await sql(
            settings, "SELECT attempts, delivery_token, lease_expires_at FROM messages WHERE id = %s", (message_id,)
        )
        assert row == [(0, None, None)]
        assert await sql(settings, "SELECT 1 FROM message_attempts WHERE message_id = %s", (message_id,)) == []
        assert await standin.received() == []


@pytest.mark.private("redis")
async def test_one_line_when_redis_goes_and_one_when_it_is_back(
    settings: Settings, private_redis: PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restart: one warning when the limiter loses it and one line when it is back, nothing in
    between and nothing after, although every pooled connection the restart closed fails once when next used
    and the first calls after the restart race the last failing ones."""
    caplog.set_level(logging.INFO, logger="consumer.control")
    client = connect(settings.redis_url.reveal(), REDIS_TIMEOUT_SECONDS)
    control = Control(dataclasses.replace(settings, webhook_rate_limit_per_second=50), client, "test")

    async def burst(n: int) -> None:
        await asyncio.gather(*(control.admit() for _ in range(n)))

    async def answered() -> bool:
        await burst(1)
        return control.redis != "down"

    try:
        await burst(10)  # ten pooled connections
        async with outage(private_redis) as server:
            await burst(3)
            assert control.redis == "down"
            await server.start()
        await wait_for(answered, 20, "a call answered again")
        assert control.redis == "settling" and "Redis answers again" not in caplog.text
        # Back once it has answered for SETTLE_SECONDS with no call failing, even with no call coming meanwhile.
        await wait_for(lambda: _value(control.redis == "up"), SETTLE_SECONDS + 5, "Redis counted as back")
        for _ in range(5):
            await burst(10)  # the pooled connections the restart closed, each used again
    finally:
        await client.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "consumer.control"]
    assert sum("Redis unreachable" in line for line in lines) == 1, lines
    assert sum("Redis answers again" in line for line in lines) == 1, lines
    assert control.redis == "up"
