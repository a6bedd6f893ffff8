"""The steady-state phase: a fixed offered rate (``BENCH_RATE`` msg/s, inserts spread over time) for
``BENCH_STEADY_SECONDS`` after a warm-up, with a short interval and a batch that carries it; what a user feels
is how long after its due time a message reaches the service when the system is not overloaded.

Figures come from the database: due -> sent (``sent_at - created_at``; a row is due when it is inserted) and
claim -> sent (``sent_at - queued_at``) of the rows inserted inside the measured window, and the achieved rate
(those rows sent per second of the window); missing rows and duplicates (from the stand-in) void the run.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
import aiomysql

from bench import loaddata
from bench.config import Config
from bench.procs import Proc, Procs, free_port, wait_healthy
from bench.report import percentile
from common.store import MessageStore

INTERVAL = 0.05  # SEND_INTERVAL_SECONDS of the phase
INSERT_EVERY = 0.01  # seconds between two inserts of the offered load


async def _offer(store: MessageStore, rate: float, seconds: float) -> int:
    """Insert ``rate`` messages per second for ``seconds``, in small multi-row inserts on a fixed schedule."""
    loop = asyncio.get_running_loop()
    started, offered, n = loop.time(), 0, 0
    while (now := loop.time()) - started < seconds:
        due = int((now - started) * rate) - offered
        if due > 0:
            await store.create_many((f"+90557{(n + i) % 10**7:07d}", f"steady {n + i}") for i in range(due))
            offered += due
            n += due
        await asyncio.sleep(INSERT_EVERY)
    return offered


async def _window(pool: aiomysql.Pool, since: float, until: float) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT status, TIMESTAMPDIFF(MICROSECOND, created_at, sent_at),"
            " TIMESTAMPDIFF(MICROSECOND, queued_at, sent_at) FROM messages"
            " WHERE created_at >= FROM_UNIXTIME(%s) AND created_at < FROM_UNIXTIME(%s)",
            (since, until),
        )
        rows = await cur.fetchall()
    sent = [r for r in rows if r[0] == "sent"]
    due = sorted(int(r[1]) / 1000 for r in sent if r[1] is not None)
    claim = sorted(int(r[2]) / 1000 for r in sent if r[2] is not None)
    figures: dict[str, Any] = {"offered": len(rows), "sent": len(sent), "missing": len(rows) - len(sent)}
    for name, values in (("due", due), ("claim", claim)):
        for q in (50, 95, 99):
            figures[f"{name}_p{q}_ms"] = percentile(values, q)
        figures[f"{name}_max_ms"] = values[-1] if values else None
    return figures


async def run_steady(
    cfg: Config, pool: aiomysql.Pool, procs: Procs, env: dict[str, str], rate: float | None = None
) -> dict[str, Any]:
    """One steady run at ``rate`` (default ``BENCH_RATE``) with fresh services; stopped by pid at the end."""
    rate = rate or cfg.rate
    store = MessageStore(pool)
    await store.set_sending(False)
    async with pool.acquire() as conn, conn.cursor() as cur:
        # The previous phase's rows go by TRUNCATE, not DELETE: a DELETE of the drain's 100,000 rows leaves as
        # many delete-marked entries in every index for InnoDB's purge, and while it works through them the
        # claim's range scan steps over them: due -> sent p99 3.2 s instead of 0.13 s, measured. (No user
        # deletes like that: retention removes 1,000 rows a transaction.)
        await cur.execute("TRUNCATE TABLE messages")
        await cur.execute("TRUNCATE TABLE message_attempts")
    await store.recount()  # TRUNCATE bypasses the counts
    batch = max(1, math.ceil(rate * INTERVAL * 1.5))  # half again what a tick must carry: claims keep up
    standin = procs.standin(f"standin-steady-{rate:g}", {})
    webhook = f"http://127.0.0.1:{standin.port}"
    await wait_healthy(standin, webhook + "/_control/health", timeout=20)
    service_env = {**env, "WEBHOOK_URL": webhook + "/webhook", "CLAIM_LEASE_SECONDS": str(cfg.lease)}
    started: list[Proc] = [standin]
    health = []
    for i in range(1, cfg.consumers + 1):
        port = free_port()
        proc = procs.service(
            f"consumer-steady-{rate:g}-{i}", "consumer", {**service_env, "CONSUMER_METRICS_PORT": str(port)}
        )
        started.append(proc)
        health.append(wait_healthy(proc, f"http://127.0.0.1:{port}/healthz"))
    port = free_port()
    producer_env = {**service_env, "PRODUCER_METRICS_PORT": str(port), "SEND_INTERVAL_SECONDS": str(INTERVAL),
                    "SEND_BATCH_SIZE": str(batch)}  # fmt: skip
    started.append(procs.service(f"producer-steady-{rate:g}", "producer", producer_env))
    health.append(wait_healthy(started[-1], f"http://127.0.0.1:{port}/healthz"))
    try:
        await asyncio.gather(*health)
        await store.set_sending(True)
        await _offer(store, rate, cfg.warmup_steady)
        since = time.time()
        offered = await _offer(store, rate, cfg.steady_seconds)
        until = time.time()

        async def drained() -> bool:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(loaddata.UNFINISHED)
                return not (await cur.fetchone())[0]

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a poll of the database: nothing to wait on in this process
            if await drained():
                break
            await asyncio.sleep(0.2)
        figures = await _window(pool, since, until)
        async with aiohttp.ClientSession() as session, session.get(webhook + "/_control/stats") as resp:
            stats = await resp.json()
        figures.update(
            rate_offered=rate,
            rate_achieved=figures["sent"] / (until - since),
            inserted=offered,
            duplicates=sum(n - 1 for n in stats["duplicates"].values()),
            interval=INTERVAL,
            batch=batch,
        )
        return figures
    finally:
        await store.set_sending(False)
        procs.stop(started)


async def run_step_search(cfg: Config, pool: aiomysql.Pool, procs: Procs, env: dict[str, str]) -> dict[str, Any]:
    """The highest offered rate (steps of 500 msg/s from ``BENCH_RATE``) whose due -> sent p99 stays under
    250 ms with nothing missing; each step a short steady run."""
    best, steps = None, []
    rate = cfg.rate
    short = cfg.__class__(**{**cfg.__dict__, "steady_seconds": cfg.step_seconds, "warmup_steady": 2.0})
    for _ in range(cfg.steps):
        got = await run_steady(short, pool, procs, env, rate)
        ok = (got["due_p99_ms"] or 1e9) < 250 and not got["missing"] and not got["duplicates"]
        steps.append({"rate": rate, "due_p99_ms": got["due_p99_ms"], "ok": ok})
        if not ok:
            break
        best, rate = rate, rate + 500
    return {"max_rate_p99_250ms": best, "steps": steps}
