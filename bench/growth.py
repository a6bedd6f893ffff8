"""The growth phase (``BENCH_GROWTH=1``): what the queries behind ``/stats``, ``/metrics``, the sent list, the
claim and retention cost at 1,000,000 and at 10,000,000 rows (``BENCH_GROWTH_ROWS``), side by side.

Each size is loaded as that many rows, of which ``BENCH_GROWTH_PENDING`` (200,000) are ``pending`` and the rest
``sent`` (the shape of a deployment that has run for a while). The operations are measured in this process on
the store's own queries (no HTTP, no cache: the gateway's 2 s cache of ``/stats`` would hide them).

On a private MariaDB (``BENCH_GROWTH_SERVER=private``, the default) every size has its own database on a server
of its own, configured for the largest size (:data:`bench.config.GROWTH_MARIADB`), so the sizes are measured
interleaved: each operation runs at every size in turn, sample by sample, so a spell of other work on the machine
falls on every size alike instead of on whichever was measured at that moment.
On the shared server (``shared``) the sizes are loaded and measured one after the other in the run's database.

Before measuring, on the private server, the load's aftermath is let settle (its dirty pages written, its undo
purged); then each operation runs ``BENCH_GROWTH_WARMUP`` times untimed at each size. Retention batches remove
rows: each timed batch is followed by an untimed insert of as many sent rows at the tail, so the table keeps its
size, as it would with sending going on. The result keeps every sample's percentiles (p50, p90, p99, max) and the
p99 of each round (the spread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiomysql

from bench import loaddata
from bench.config import Config
from bench.report import GROWTH_OPERATIONS, percentile
from common.db import create_pool
from common.migrations import migrate
from common.settings import Settings
from common.store import MessageStore
from deploy.private_servers import PrivateMariaDB

RETENTION_BATCH = 1000
READ_OPERATIONS = tuple(op for op in GROWTH_OPERATIONS if op != "retention batch")
SETTLE_SECONDS = 300.0  # the longest wait for the load's dirty pages and undo
Say = Callable[[str], None]


@dataclasses.dataclass
class Size:
    """One table size under measurement: its pool and what its load took."""

    rows: int
    pool: aiomysql.Pool
    sent: int
    load_s: float = 0.0
    data_mb: float = 0.0
    index_mb: float = 0.0
    store: MessageStore = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.store = MessageStore(self.pool)

    def operations(self) -> dict[str, Callable[[], Awaitable[object]]]:
        store = self.store

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
            "stats": stats,
            "first page": lambda: store.sent_page(20),
            "deep page": lambda: store.sent_page(20, offset=self.sent // 2),
            "claim 2": claim,
        }

    async def retention_batch(self) -> float:
        """One timed retention batch (ms), then the removed rows' number put back as new sent rows (untimed)."""
        started = time.perf_counter()
        removed = sum(await self.store.remove_expired(1, RETENTION_BATCH))
        took = (time.perf_counter() - started) * 1000
        if removed != RETENTION_BATCH:
            raise RuntimeError(f"a retention batch at {self.rows:,} rows removed {removed} rows, not {RETENTION_BATCH}")
        await loaddata.append_sent(self.pool, removed)
        return took


async def run_growth(cfg: Config, pool: aiomysql.Pool | None, settings: Settings, say: Say) -> dict[str, Any]:
    """The phase on the server ``cfg.growth_server`` names: ``pool`` (the run's database on the configured
    server) for ``shared``; for ``private``, a server of its own (``settings`` give its account)."""
    out: dict[str, Any] = {"server": cfg.growth_server, "sizes": {}, "ops": {}, "buffer_pool": {}}
    if cfg.growth_server == "shared":
        assert pool is not None, "the shared server's pool of the run"
        out["mysql"] = await variables(pool)
        for rows in cfg.growth:
            size = await load(pool, rows, cfg.growth_pending, say)
            out["sizes"].update(sizes_of([size]))
            ops, pool_reads = await measure(cfg, [size], say)
            out["ops"].update(ops)
            out["buffer_pool"][str(rows)] = pool_reads
        return out
    async with private_server(cfg, settings, say) as server, pools(server, settings, cfg.growth) as by_rows:
        out["mysql"] = await variables(by_rows[0])
        out["options"] = cfg.growth_options()
        sizes = [await load(p, rows, cfg.growth_pending, say) for rows, p in zip(cfg.growth, by_rows, strict=True)]
        out["sizes"] = sizes_of(sizes)
        await settle(by_rows[0], say)
        out["ops"], pool_reads = await measure(cfg, sizes, say)
        out["buffer_pool"] = {str(rows): pool_reads for rows in cfg.growth}  # measured together
    return out


@asynccontextmanager
async def private_server(cfg: Config, settings: Settings, say: Say) -> AsyncIterator[PrivateMariaDB]:
    """A private MariaDB with the phase's configuration, killed by its pid and its directory removed on the way
    out, whatever ends the phase (an error, Ctrl-C)."""
    server = PrivateMariaDB(settings, cfg.growth_options())
    try:
        server.boot()  # in this thread: a cancellation cannot leave it starting on after the clean-up
        say(
            f"growth: private MariaDB pid {server.pid} on port {server.port}, data in {server.dir}, buffer pool"
            f" {cfg.growth_buffer_pool}"
        )
        yield server
    finally:
        pid = server.pid
        server.close()
        say(f"growth: private MariaDB pid {pid} stopped, {server.dir} removed")


@asynccontextmanager
async def pools(
    server: PrivateMariaDB, settings: Settings, sizes: tuple[int, ...]
) -> AsyncIterator[list[aiomysql.Pool]]:
    """One pool per size, each on its own database ``growth_<rows>`` of ``server``."""
    opened: list[aiomysql.Pool] = []
    try:
        for rows in sizes:
            db = dataclasses.replace(server.settings(settings), mysql_database=f"growth_{rows}")
            opened.append(await create_pool(db, maxsize=4))
        yield opened
    finally:
        for p in opened:
            p.close()
        for p in opened:
            await p.wait_closed()


async def load(pool: aiomysql.Pool, rows: int, pending: int, say: Say) -> Size:
    sent = rows - pending
    started = time.monotonic()
    say(f"growth: loading {rows:,} rows ({sent:,} sent, {pending:,} pending) ...")
    await migrate(pool)
    await loaddata.load_sent(pool, sent)
    await loaddata.append_pending(pool, pending)
    size = Size(rows, pool, sent, load_s=time.monotonic() - started)
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("ANALYZE TABLE messages")
        await cur.fetchall()
        await cur.execute(
            "SELECT data_length, index_length FROM information_schema.tables"
            " WHERE table_schema = DATABASE() AND table_name = 'messages'"
        )
        data, index = await cur.fetchone()
    size.data_mb, size.index_mb = int(data) / 2**20, int(index) / 2**20
    say(f"growth: loaded in {size.load_s:.0f}s: {size.data_mb:,.0f} MB of rows, {size.index_mb:,.0f} MB of indexes")
    return size


def sizes_of(sizes: list[Size]) -> dict[str, dict[str, float]]:
    return {
        str(s.rows): {"load_s": round(s.load_s, 1), "data_mb": round(s.data_mb), "index_mb": round(s.index_mb)}
        for s in sizes
    }


async def status(pool: aiomysql.Pool, *names: str) -> dict[str, int]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({', '.join(['%s'] * len(names))})", names)
        return {str(k): int(v) for k, v in await cur.fetchall()}


async def variables(pool: aiomysql.Pool) -> dict[str, str]:
    """The server's version and the settings that matter here, as it reports them."""
    names = ("version", "innodb_buffer_pool_size", "innodb_log_file_size", "innodb_flush_method",
             "innodb_io_capacity", "innodb_flush_log_at_trx_commit", "log_bin")  # fmt: skip
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({', '.join(['%s'] * len(names))})", names)
        return {str(k): str(v) for k, v in await cur.fetchall()}


async def settle(pool: aiomysql.Pool, say: Say) -> None:
    """On the private server, before measuring: wait until the load's undo is purged and its dirty pages are
    written (the flushing hurried by a global setting, for the time), so that background work does not fall
    into the measurement. (Not on the shared server: its state is every client's, and its settings not ours.)"""
    started = time.monotonic()
    gave_up = ""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT @@GLOBAL.innodb_max_dirty_pages_pct")
        ((pct,),) = await cur.fetchall()
        await cur.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        try:
            while True:
                now = await status(pool, "Innodb_buffer_pool_pages_dirty", "Innodb_history_list_length")
                dirty, history = now.get("Innodb_buffer_pool_pages_dirty", 0), now.get("Innodb_history_list_length", 0)
                if dirty < 1000 and history < 1000:
                    break
                if time.monotonic() > started + SETTLE_SECONDS:
                    gave_up = f" (gave up waiting: {dirty:,} dirty pages, history length {history:,})"
                    break
                await asyncio.sleep(1)
        finally:
            await cur.execute("SET GLOBAL innodb_max_dirty_pages_pct = %s", (pct,))
    say(f"growth: settled in {time.monotonic() - started:.0f}s{gave_up}")


async def _timed(work: Callable[[], Awaitable[object]], times: int) -> list[float]:
    took = []
    for _ in range(times):
        started = time.perf_counter()
        await work()
        took.append((time.perf_counter() - started) * 1000)
    return took


Measured = dict[str, dict[str, dict[str, Any]]]
COUNTERS = ("Innodb_buffer_pool_read_requests", "Innodb_buffer_pool_reads")
HANDLER = ("key", "next", "prev", "first", "last", "rnd", "rnd_next")  # Handler_read_*: rows the SQL layer asked for
ACCOUNTED = 20  # untimed runs of each operation whose work the server's counters are read around


async def measure(cfg: Config, sizes: list[Size], say: Say) -> tuple[Measured, dict[str, Any]]:
    """Every operation at every size: a warm-up, then rounds in which each read operation runs at every size in
    turn, sample by sample (the order swapped each time), so any spell of other work falls on every size alike;
    then the retention batches the same way. Also the work of one run of each operation at each size as the
    server counts it (pages requested, rows read) and its buffer pool's reads from disk during the timed runs:
    server-wide counters, which on the shared server include its other clients' work."""
    ops = {s.rows: s.operations() for s in sizes}
    samples: dict[tuple[int, str], list[float]] = {(s.rows, op): [] for s in sizes for op in GROWTH_OPERATIONS}
    rounds: dict[tuple[int, str], list[float]] = {key: [] for key in samples}
    pool = sizes[0].pool
    say(f"growth: warming up ({cfg.growth_warmup} runs of each operation per size)")
    for s in sizes:
        for work in ops[s.rows].values():
            await _timed(work, cfg.growth_warmup)
        for _ in range(cfg.growth_warmup // 10):
            await s.retention_batch()
    per_round = math.ceil(cfg.growth_samples / cfg.growth_rounds)
    say(f"growth: measuring {cfg.growth_rounds} rounds of {per_round} runs of each operation per size")
    before = await status(pool, *COUNTERS)
    for r in range(cfg.growth_rounds):
        for op in READ_OPERATIONS:
            took: dict[int, list[float]] = {s.rows: [] for s in sizes}
            for i in range(per_round):
                for s in sizes if (r + i) % 2 == 0 else sizes[::-1]:
                    took[s.rows] += await _timed(ops[s.rows][op], 1)
            for s in sizes:
                samples[s.rows, op] += took[s.rows]
                rounds[s.rows, op].append(percentile(sorted(took[s.rows]), 99) or 0.0)
    after = await status(pool, *COUNTERS)
    pool_reads = {
        "page_requests": after[COUNTERS[0]] - before[COUNTERS[0]],
        "disk_reads": after[COUNTERS[1]] - before[COUNTERS[1]],
    }
    accounted = {(s.rows, op): await work_of(pool, ops[s.rows][op]) for s in sizes for op in READ_OPERATIONS}
    say(f"growth: {cfg.growth_retention} retention batches of {RETENTION_BATCH:,} per size")
    per_round = math.ceil(cfg.growth_retention / cfg.growth_rounds)
    for r in range(cfg.growth_rounds):
        took = {s.rows: [] for s in sizes}
        for i in range(per_round):
            for s in sizes if (r + i) % 2 == 0 else sizes[::-1]:
                took[s.rows].append(await s.retention_batch())
        for s in sizes:
            samples[s.rows, "retention batch"] += took[s.rows]
            rounds[s.rows, "retention batch"].append(percentile(sorted(took[s.rows]), 99) or 0.0)
    out = {str(s.rows): {op: summarize(samples[s.rows, op], rounds[s.rows, op]) for op in GROWTH_OPERATIONS}
           for s in sizes}  # fmt: skip
    for s in sizes:
        for op in READ_OPERATIONS:
            out[str(s.rows)][op].update(accounted[s.rows, op])
    return out, pool_reads


async def work_of(pool: aiomysql.Pool, work: Callable[[], Awaitable[object]]) -> dict[str, Any]:
    """Pages requested from the buffer pool, pages read from disk and the handler's row reads by one run of
    ``work``, as the server counts them (the mean of :data:`ACCOUNTED` runs, after the purge of earlier changes
    caught up, for up to 10 s: the purge threads request pages as well)."""
    names = (*COUNTERS, *(f"Handler_read_{h}" for h in HANDLER))
    deadline = time.monotonic() + 10  # the purge of earlier changes (claims, retention) requests pages too
    while (await status(pool, "Innodb_history_list_length")).get("Innodb_history_list_length", 0) > 10:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    before = await status(pool, *names)
    await _timed(work, ACCOUNTED)
    after = await status(pool, *names)
    per = {name: (after.get(name, 0) - before.get(name, 0)) / ACCOUNTED for name in names}
    return {
        "pages": per[COUNTERS[0]],
        "disk_reads": per[COUNTERS[1]],
        "handler_reads": {h: per[f"Handler_read_{h}"] for h in HANDLER},
    }


def summarize(took: list[float], round_p99: list[float]) -> dict[str, Any]:
    took = sorted(took)
    out: dict[str, Any] = {"n": len(took)}
    for pct in (50, 90, 99):
        out[f"p{pct}_ms"] = round(percentile(took, pct) or 0.0, 3)
    out["max_ms"] = round(took[-1], 3) if took else 0.0
    out["round_p99_ms"] = [round(v, 3) for v in round_p99]
    return out
