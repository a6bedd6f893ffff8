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
            " TIMESTAMPDIFF(MICROSECOND, queued_at, sent_at), id FROM messages"
            " WHERE created_at >= FROM_UNIXTIME(%s) AND created_at < FROM_UNIXTIME(%s)",
            (since, until),
        )
        rows = await cur.fetchall()
    sent = [r for r in rows if r[0] == "sent"]
    due = sorted(int(r[1]) / 1000 for r in sent if r[1] is not None)
    claim = sorted(int(r[2]) / 1000 for r in sent if r[2] is not None)
    ids = [int(r[3]) for r in rows]
    figures: dict[str, Any] = {"offered": len(rows), "sent": len(sent), "missing": len(rows) - len(sent),
                               "ids": (min(ids), max(ids)) if ids else None}  # fmt: skip
    for name, values in (("due", due), ("claim", claim)):
        for q in (50, 95, 99):
            figures[f"{name}_p{q}_ms"] = percentile(values, q)
        figures[f"{name}_max_ms"] = values[-1] if values else None
    return figures


STEP = 500.0  # msg/s added by each step of the search
STEP_SETTLE = 1.0  # seconds each step is offered before its window opens
STEP_BAR_MS = 250.0  # a step passes while its due -> sent p99 stays under this, with nothing missing


def step_rates(rate: float, steps: int) -> list[float]:
    """The offered rate of each measured window: ``rate`` (the steady window), then ``steps`` steps of +500."""
    return [rate + STEP * i for i in range(steps + 1)]


def duplicates_within(duplicates: dict[str, int], ids: tuple[int, int] | None) -> int:
    """The extra deliveries (the stand-in's ``{Idempotency-Key: times}``, the key a message id) of the messages
    whose ids are in ``ids`` (a window's first and last): one window's duplicates, not the whole run's."""
    if ids is None:
        return 0
    return sum(n - 1 for key, n in duplicates.items() if key.isdigit() and ids[0] <= int(key) <= ids[1])


async def _unfinished(pool: aiomysql.Pool) -> int:
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(loaddata.UNFINISHED)
        return int((await cur.fetchone())[0])


def highest_passing(steps: list[dict[str, Any]]) -> tuple[float | None, bool]:
    """The highest rate of the unbroken run of passing windows from the first, and whether the search was
    capped: every window passed, so the true highest rate is that one or more."""
    best = None
    for step in steps:
        if not step["ok"]:
            return best, False
        best = step["rate"]
    return best, best is not None


async def run_steady(cfg: Config, pool: aiomysql.Pool, procs: Procs, env: dict[str, str]) -> dict[str, Any]:
    """The steady window at ``BENCH_RATE`` after a warm-up, then the step search on the same services, offered
    without a pause: ``BENCH_STEPS`` windows of ``BENCH_STEP_SECONDS``, each 500 msg/s more than the one before.
    The search ends early when a window leaves more than 250 ms of its rate unfinished. The services start once,
    with a batch of 1.5 x what a tick of the highest step must carry: at a steady rate a tick claims what is due
    whatever the cap, but the tick after a slow one takes all that the slow one left (up to the cap), so the
    steady window's tail is shorter than with a batch sized for its own rate (1.5 x, before 7e92fbb). They are
    stopped by pid at the end."""
    rates = step_rates(cfg.rate, cfg.steps)
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
    batch = max(1, math.ceil(max(rates) * INTERVAL * 1.5))  # half again what a tick must carry: claims keep up
    standin = procs.standin("standin-steady", {})
    webhook = f"http://127.0.0.1:{standin.port}"
    await wait_healthy(standin, webhook + "/_control/health", timeout=20)
    service_env = {**env, "WEBHOOK_URL": webhook + "/webhook", "CLAIM_LEASE_SECONDS": str(cfg.lease)}
    started: list[Proc] = [standin]
    health = []
    for i in range(1, cfg.consumers + 1):
        port = free_port()
        proc = procs.service(f"consumer-steady-{i}", "consumer", {**service_env, "CONSUMER_METRICS_PORT": str(port)})
        started.append(proc)
        health.append(wait_healthy(proc, f"http://127.0.0.1:{port}/healthz"))
    port = free_port()
    producer_env = {**service_env, "PRODUCER_METRICS_PORT": str(port), "SEND_INTERVAL_SECONDS": str(INTERVAL),
                    "SEND_BATCH_SIZE": str(batch)}  # fmt: skip
    started.append(procs.service("producer-steady", "producer", producer_env))
    health.append(wait_healthy(started[-1], f"http://127.0.0.1:{port}/healthz"))
    try:
        await asyncio.gather(*health)
        await store.set_sending(True)
        await _offer(store, cfg.rate, cfg.warmup_steady)
        windows = []
        for i, rate in enumerate(rates):
            if i:  # the new rate settles first: the producer's ticks and the consumers' prefetch catch up
                await _offer(store, rate, STEP_SETTLE)
            since = time.time()
            offered = await _offer(store, rate, cfg.steady_seconds if i == 0 else cfg.step_seconds)
            windows.append((rate, since, time.time(), offered))
            # More than STEP_BAR_MS of the offered rate still unfinished: this rate is not carried, and a
            # higher one would only pile more on. The search ends here (the window is judged by its p99).
            if i + 1 < len(rates) and await _unfinished(pool) > rate * STEP_BAR_MS / 1000:
                break
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a poll of the database: nothing to wait on in this process
            if not await _unfinished(pool):
                break
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session, session.get(webhook + "/_control/stats") as resp:
            stats = await resp.json()
        steps = []
        for rate, since, until, offered in windows:
            got = await _window(pool, since, until)
            got["duplicates"] = duplicates_within(stats["duplicates"], got.pop("ids"))
            ok = (got["due_p99_ms"] or 1e9) < STEP_BAR_MS and not got["missing"] and not got["duplicates"]
            steps.append({"rate": rate, "seconds": until - since, "due_p99_ms": got["due_p99_ms"],
                          "missing": got["missing"], "ok": ok, "offered": offered, "figures": got})  # fmt: skip
        first = steps[0]
        figures: dict[str, Any] = first.pop("figures")
        for step in steps[1:]:
            del step["figures"]
        best, capped = highest_passing(steps)
        figures.update(
            rate_offered=cfg.rate,
            rate_achieved=figures["sent"] / first["seconds"],
            inserted=first["offered"],
            duplicates_run=sum(n - 1 for n in stats["duplicates"].values()),  # warm-up and settles too
            steps_planned=len(rates),
            interval=INTERVAL,
            batch=batch,
            steps=steps,
            max_rate_p99_250ms=best,
            max_rate_capped=capped and len(steps) == len(rates),  # every step run, and passed
        )
        return figures
    finally:
        await store.set_sending(False)
        procs.stop(started)
