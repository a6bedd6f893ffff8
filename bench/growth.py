"""The growth phase (``BENCH_GROWTH=1``): what the queries behind ``/stats``, ``/metrics``, the sent list, the
claim and retention cost at 1,000,000 and at 10,000,000 rows (``BENCH_GROWTH_ROWS``), side by side.

Each size is loaded as that many rows, of which 200,000 are ``pending`` and the rest ``sent`` (the shape of a
deployment that has run for a while), then each operation runs ``REPEAT`` times in a row (enough for the
p99 to be a percentile rather than the slowest sample), measured in this process on the store's own queries
(no HTTP, no cache: the gateway's 2 s cache of ``/stats`` would hide them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiomysql

from bench import loaddata
from bench.report import GROWTH_OPERATIONS, percentile
from common.store import MessageStore

PENDING = 200_000
REPEAT = 400  # the p99 is the 4th slowest sample
RETENTION_REPEAT = 40  # batches of 1,000 rows removed
WARMUP = 3
OPERATIONS = GROWTH_OPERATIONS


async def _timed(work: Callable[[], Awaitable[object]], times: int = REPEAT) -> dict[str, float]:
    for _ in range(WARMUP):  # the pages an operation reads into the buffer pool, once
        await work()
    took = []
    for _ in range(times):
        started = time.perf_counter()
        await work()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return {"p50_ms": percentile(took, 50) or 0.0, "p99_ms": percentile(took, 99) or 0.0}


async def measure(pool: aiomysql.Pool, sent: int) -> dict[str, dict[str, float]]:
    store = MessageStore(pool)

    async def stats() -> None:  # what one uncached /stats (and /metrics) snapshot reads
        await asyncio.gather(
            store.counts_by_status(),
            store.sent_since(60),
            store.claim_to_sent_seconds(1000),
            store.dispatch_state(),
            store.sent_total(),
        )

    async def claim() -> None:
        await store.release(await store.claim(2))

    return {
        "stats": await _timed(stats),
        "first page": await _timed(lambda: store.sent_page(20)),
        "deep page": await _timed(lambda: store.sent_page(20, offset=sent // 2)),
        "claim 2": await _timed(claim),
        "retention batch": await _timed(lambda: store.remove_expired(1, 1000), times=RETENTION_REPEAT),
    }


async def run_growth(pool: aiomysql.Pool, sizes: list[int], say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for total in sizes:
        sent = total - PENDING
        started = time.monotonic()
        say(f"growth: loading {total:,} rows ({sent:,} sent, {PENDING:,} pending) ...")
        await loaddata.load_sent(pool, sent)
        await loaddata.append_pending(pool, PENDING)
        say(f"growth: loaded in {time.monotonic() - started:.0f}s; measuring")
        out[str(total)] = await measure(pool, sent)
    return out
