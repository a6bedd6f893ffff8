"""The API phase: ``GET /messages`` over ``BENCH_ROWS`` sent rows, closed-loop at ``BENCH_CLIENTS`` clients.

Scenarios: the first page (its ``X-Total-Count`` checked once), a deep cursor page (the ``Link: rel=next`` of the
offset page that ends half-way down the list) and the deep offset page ``offset=rows/2`` with one client. The
load client is ``wrk`` (lighter, it leaves the 2 cores to the gateway) when installed, else a closed loop of
aiohttp clients in this process.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomysql

from bench.config import Config
from bench.procs import cpu_seconds, machine_jiffies, server_pids
from bench.report import percentile

LUA = Path(__file__).resolve().parent / "report.lua"
INTAKE_LUA = Path(__file__).resolve().parent / "intake.lua"
INTAKE_BODY = {"recipient": "+905551111111", "content": "bench intake"}


def pick_client(cfg: Config) -> str:
    have_wrk = shutil.which("wrk") is not None
    if cfg.client == "wrk" and not have_wrk:
        raise RuntimeError("BENCH_CLIENT=wrk but wrk is not installed (Debian: apt-get install wrk)")
    return "wrk" if cfg.client in ("auto", "wrk") and have_wrk else "python"


async def prepare(base: str, rows: int) -> dict[str, Any]:
    """Check the first page's ``X-Total-Count``, find a cursor half-way down the list (the ``Link`` of the
    offset page before it), and check that the first, offset and cursor pages hold exactly the expected rows."""
    deep = rows // 2
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/messages?limit=20") as resp:
            first = await resp.json()
            total = resp.headers.get("X-Total-Count")
            if resp.status != 200 or len(first) != 20:
                raise RuntimeError(f"GET /messages?limit=20: HTTP {resp.status}, {len(first)} rows")
        async with session.get(f"{base}/messages?limit=20&offset={deep - 20}") as resp:
            link = resp.headers.get("Link", "")
            page = await resp.json()
        match = re.match(r"<([^>]+)>;\s*rel=\"?next\"?", link)
        if resp.status != 200 or not match:
            raise RuntimeError(f"offset page {deep - 20}: HTTP {resp.status}, no Link rel=next ({link!r})")
        cursor_path = match.group(1)
        async with session.get(base + cursor_path) as resp:
            after = await resp.json()
            if resp.status != 200 or len(after) != 20:
                raise RuntimeError(f"cursor page {cursor_path}: HTTP {resp.status}, {len(after)} rows")
        async with session.get(f"{base}/messages?limit=20&offset={deep}") as resp:
            at_offset = await resp.json()
    # The loaded ids are 1..rows in sent order: each page's ids are known exactly.
    ids = [[r["id"] for r in p] for p in (first, page, after, at_offset)]
    expected = [list(range(rows - start, rows - start - 20, -1)) for start in (0, deep - 20, deep, deep)]
    return {
        "total_count": int(total) if total and total.isdigit() else None,
        "total_count_ok": total == str(rows),
        "pages_ok": ids == expected,
        "first": "/messages?limit=20",
        "deep_cursor": cursor_path,
        "deep_offset": f"/messages?limit=20&offset={deep}",
    }


async def run_wrk(url: str, clients: int, duration: float, script: Path = LUA) -> dict[str, Any]:
    threads = min(2, clients)
    proc = await asyncio.create_subprocess_exec(
        *("wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(duration))}s", "--timeout", "10s"),
        *("-s", str(script), url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=duration + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"wrk did not finish: {url}") from None
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result for {url}:\n{out.decode()[-1000:]}")
    n, secs, p50, p99, peak, *errors = (float(x) for x in line.split()[1:])
    done = n > 0  # no completed request: no latency figures (not zeros)
    return {"requests": n, "rps": n / secs, "p50_ms": p50 / 1000 if done else None,
            "p99_ms": p99 / 1000 if done else None, "max_ms": peak / 1000 if done else None,
            "errors": sum(errors)}  # fmt: skip


async def run_python(url: str, clients: int, duration: float, script: Path = LUA) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal errors
            while (started := time.perf_counter()) < deadline:
                try:
                    post = script == INTAKE_LUA
                    request = session.post(url, json=INTAKE_BODY) if post else session.get(url)
                    async with request as resp:
                        await resp.read()
                        ok = resp.status == (201 if post else 200)
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors += 1

        begun = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - begun
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else None,
        "errors": errors,
    }


async def quiesce(pool: aiomysql.Pool, timeout: float = 120.0) -> float:
    """Wait until no query of the gateway runs on this database any more (a slow scenario leaves queries
    running after its clients stop, which would slow the next one); returns the seconds waited."""
    started = time.monotonic()
    async with pool.acquire() as conn, conn.cursor() as cur:
        while time.monotonic() - started < timeout:
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                " WHERE DB = DATABASE() AND COMMAND = 'Query' AND ID <> CONNECTION_ID()"
            )
            if not (await cur.fetchone())[0]:
                break
            await asyncio.sleep(0.2)
    return time.monotonic() - started


async def run_api(cfg: Config, base: str, pool: aiomysql.Pool, gateway_pid: int) -> dict[str, Any]:
    """The three scenarios against a gateway at ``base`` whose database holds ``cfg.rows`` sent rows."""
    client = pick_client(cfg)
    load = run_wrk if client == "wrk" else run_python
    info = await prepare(base, cfg.rows)
    out: dict[str, Any] = {"client": client, **info}
    info["create"] = "/messages"
    scenarios = (("first", cfg.clients, LUA), ("deep_cursor", cfg.clients, LUA), ("deep_offset", 1, LUA),
                 ("create", cfg.clients, INTAKE_LUA))  # fmt: skip
    for name, clients, script in scenarios:
        url = base + info[name]
        waited = await quiesce(pool)
        if waited > 1:
            print(f"bench:   waited {waited:.0f}s for the previous scenario's queries to end", file=sys.stderr)
        if cfg.warmup:
            await load(url, clients, cfg.warmup, script)
        watched = {"gateway": gateway_pid, **{k: v[0] for k, v in server_pids().items() if k == "mysql"}}
        before, jiffies = {k: cpu_seconds(p) or 0.0 for k, p in watched.items()}, machine_jiffies()
        clock = time.monotonic()
        out[name] = result = await load(url, clients, cfg.duration, script)
        wall = time.monotonic() - clock
        busy, total = (a - b for a, b in zip(machine_jiffies(), jiffies, strict=True))
        result["cpu_percent"] = {k: 100 * ((cpu_seconds(p) or 0.0) - before[k]) / wall for k, p in watched.items()}
        result["cpu_percent"]["machine"] = 100 * (os.cpu_count() or 1) * busy / max(total, 1)
        print(
            f"bench:   {name:<12} {clients:>2} client(s): {result['rps']:8.0f} req/s  p50 {_ms(result['p50_ms'])}"
            f"  p99 {_ms(result['p99_ms'])}  errors {result['errors']:.0f}",
            file=sys.stderr,
            flush=True,
        )
    return out


BATCH_SIZE = 1000


async def run_batch(base: str, pool: aiomysql.Pool, batches: int = 40, clients: int = 2) -> dict[str, Any]:
    """``POST /messages/batch`` of :data:`BATCH_SIZE` messages, ``batches`` times over ``clients`` concurrent
    clients: messages created per second (wall time) and the latency of one batch. Sending is switched off
    first, so no producer claims the created rows meanwhile; they are removed afterwards."""
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("UPDATE dispatch_state SET sending = FALSE WHERE id = 1")
    latencies: list[float] = []
    errors = 0
    queue = list(range(batches))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while queue:
            n = queue.pop()
            body = {
                "messages": [
                    {"recipient": f"+9055{n:04d}{i:05d}", "content": f"bulk {n}/{i}"} for i in range(BATCH_SIZE)
                ]
            }
            t = time.perf_counter()
            async with session.post(base + "/messages/batch", json=body) as resp:
                await resp.read()
                if resp.status != 201:
                    errors += 1
            latencies.append(time.perf_counter() - t)

    async with aiohttp.ClientSession() as session:
        await client_warmup(session, base)
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - started
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT COUNT(*) FROM messages WHERE content LIKE 'bulk %%'")
        (created,) = await cur.fetchone()
        await cur.execute("DELETE FROM messages WHERE content LIKE 'bulk %%'")
        await cur.execute("UPDATE dispatch_state SET sending = TRUE WHERE id = 1")
    ordered = sorted(latencies)
    p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
    result = {
        "batches": batches,
        "clients": clients,
        "created": int(created) - BATCH_SIZE,  # less the warm-up batch
        "msgs_per_s": (batches * BATCH_SIZE) / wall if wall else None,
        "p50_ms": None if p50 is None else p50 * 1000,
        "p99_ms": None if p99 is None else p99 * 1000,
        "errors": errors,
    }
    print(
        f"bench:   batch of {BATCH_SIZE}, {clients} clients: {result['msgs_per_s']:8.0f} messages/s"
        f"  p50 {_ms(result['p50_ms'])}  p99 {_ms(result['p99_ms'])}  errors {errors}",
        file=sys.stderr,
        flush=True,
    )
    return result


async def client_warmup(session: aiohttp.ClientSession, base: str) -> None:
    body = {"messages": [{"recipient": f"+90550000{i:05d}", "content": f"bulk w/{i}"} for i in range(BATCH_SIZE)]}
    async with session.post(base + "/messages/batch", json=body) as resp:
        await resp.read()
        resp.raise_for_status()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"
