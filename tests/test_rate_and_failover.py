"""The rate promise and the failover promise, black-box: whatever the backlog, at most ``SEND_BATCH_SIZE`` rows
wait in the queue, so requests never come in a burst; stop means stop, also for what was already queued; a
frozen leader is replaced within its lease and can never claim again when it wakes up."""

from __future__ import annotations

import os
import signal

from common.settings import Settings
from common.store import MessageStore
from tests.chaos_helpers import (
    alive,
    assert_accounting,
    assert_rate,
    claiming_ticks,
    counts,
    insert,
    leader_pid,
    logged,
    ready,
    start,
    ticks_seen,
    wait_finished,
)
from tests.procs import Cluster, StandIn, wait_for

BATCH, INTERVAL = 2, 0.5


def most_in_any_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` within any half-open window of ``window`` seconds."""
    ordered, best, first = sorted(times), 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


async def _arrivals(standin: StandIn) -> list[float]:
    return [float(r["at"]) for r in await standin.received()]


async def test_a_backlog_never_goes_out_in_a_burst(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """With no consumer for ten ticks, the producer keeps at most one batch waiting in the queue (not ten);
    when a consumer comes back, no window of one interval sees more than two batches (the batch that waited
    and the next tick's), instead of the whole backlog at once."""
    await insert(store, 24)
    producer = start(cluster, "producer", SEND_BATCH_SIZE=BATCH, SEND_INTERVAL_SECONDS=INTERVAL)
    await ticks_seen(store, 10)  # ten ticks without a consumer
    assert (await counts(settings)).get("queued", 0) <= BATCH, "claims piled up while no consumer ran"
    start(cluster, "consumer")
    await wait_finished(settings, 60)
    await assert_accounting(settings, standin)
    assert most_in_any_window(await _arrivals(standin), INTERVAL) <= 2 * BATCH
    assert_rate([producer], BATCH, INTERVAL)


async def test_stop_means_stop_for_claims_already_in_the_queue(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """Claims made before the stop, waiting in the queue while the consumer is away, are not sent when it comes
    back: they go back to pending and wait (not failed); after start they go out, each once."""
    ids = await insert(store, 6)
    producer = start(cluster, "producer", SEND_BATCH_SIZE=BATCH, SEND_INTERVAL_SECONDS=INTERVAL)
    await wait_for(lambda: _queued(settings, BATCH), 20, "a batch claimed and waiting in the queue")
    await store.set_sending(False)  # what `GET /process_message?command=stop` does
    consumer = start(cluster, "consumer")
    await wait_for(lambda: ready(consumer), 20, "the consumer to consume")
    await wait_for(lambda: _no_queued(settings), 20, "the waiting claims to go back to pending")
    assert await standin.keys() == [], "nothing may go out after stop"
    assert (await counts(settings)) == {"pending": len(ids)}
    await store.set_sending(True)
    await wait_finished(settings, 60)
    acc = await assert_accounting(settings, standin)
    assert acc.sent == set(ids) and all(n == 1 for n in acc.arrivals.values())
    alive(producer, consumer)


async def test_stale_claims_are_republished_at_the_rate_of_one_batch(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """Thirty rows set to ``queued`` by hand, with no claim time (never published): stale at once, and published
    again at most one batch at a time, never all thirty in one go."""
    ids = await insert(store, 30)
    await store.set_sending(False)
    placeholders = ", ".join(["%s"] * len(ids))
    async with store.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"UPDATE messages SET status = 'queued', queued_at = NULL WHERE id IN ({placeholders})", ids)
    await store.recount()  # rows changed by hand: what `message-sender recount` does
    await store.set_sending(True)
    start(cluster, "producer", SEND_BATCH_SIZE=BATCH, SEND_INTERVAL_SECONDS=INTERVAL, CLAIM_LEASE_SECONDS=1)
    start(cluster, "consumer")
    await wait_finished(settings, 90)
    await assert_accounting(settings, standin)
    assert most_in_any_window(await _arrivals(standin), INTERVAL) <= 2 * BATCH


async def test_a_frozen_leader_is_replaced_and_cannot_claim_when_it_wakes(
    store: MessageStore, settings: Settings, cluster: Cluster, standin: StandIn
) -> None:
    """``kill -STOP`` the leading producer: its lease lapses, the standby takes over within the lease (2 s) and
    sending goes on. ``kill -CONT``: the woken producer finds its lease taken (its epoch is stale) and claims
    nothing; across both, still one batch per interval."""
    await insert(store, 40)
    env = {"SEND_BATCH_SIZE": BATCH, "SEND_INTERVAL_SECONDS": INTERVAL, "LEADER_LEASE_SECONDS": 2}
    producers = [start(cluster, "producer", **env) for _ in range(2)]
    start(cluster, "consumer")
    first = await wait_for(lambda: leader_pid(settings), 20, "a leader")
    frozen = next(p for p in producers if p.pid == first)
    await wait_for(lambda: _claiming_ticks(frozen, 2), 20, "the leader to claim")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        other = await wait_for(lambda: _leader_other_than(settings, first), 10, "the standby to take over")
        assert other != first
        standby = next(p for p in producers if p.pid == other)
        await wait_for(lambda: _claiming_ticks(standby, 2), 20, "the new leader to claim")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    await wait_for(lambda: _logged_async(frozen, "is no longer the leader"), 20, "the woken producer to stand down")
    await wait_finished(settings, 90)
    await assert_accounting(settings, standin)
    assert_rate(producers, BATCH, INTERVAL)
    alive(*producers)


async def _claiming_ticks(svc: object, n: int) -> bool:
    return len(claiming_ticks(svc)) >= n  # type: ignore[arg-type]


async def _queued(settings: Settings, n: int) -> bool:
    return (await counts(settings)).get("queued", 0) >= n


async def _no_queued(settings: Settings) -> bool:
    return not (await counts(settings)).get("queued", 0)


async def _leader_other_than(settings: Settings, pid: int) -> int | None:
    now = await leader_pid(settings)
    return now if now is not None and now != pid else None


async def _logged_async(svc: object, text: str) -> bool:
    return logged(svc, text)  # type: ignore[arg-type]
