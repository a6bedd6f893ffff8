"""The machine's raw HTTP ceiling, measured the way ``limits.py`` does: one plain aiohttp client process
(this one), concurrency 64, POSTs of a small JSON body to a fresh stand-in process (the project's own,
``deploy/standin.py``, so it is the same target as the pipeline's), after 200 warm-up requests."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bench.procs import Procs, wait_healthy

BODY = {"to": "+905551111111", "content": "x" * 100}


async def http_limit(procs: Procs, n: int, concurrency: int) -> dict[str, float | int]:
    standin = procs.standin("standin-limit", {})
    base = f"http://127.0.0.1:{standin.port}"
    try:
        await wait_healthy(standin, base + "/_control/health", timeout=20)
        errors = 0
        async with aiohttp.ClientSession() as session:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                nonlocal errors
                async with (
                    sem,
                    session.post(base + "/webhook", json=BODY, headers={"Idempotency-Key": str(i)}) as resp,
                ):
                    await resp.json()
                    if resp.status != 202:
                        errors += 1

            await asyncio.gather(*(one(-i) for i in range(1, 201)))
            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            elapsed = time.perf_counter() - started
            async with session.get(base + "/_control/stats") as resp:
                received = int((await resp.json())["received"])
        return {"rate": n / elapsed, "n": n, "errors": errors, "received": received - 200}
    finally:
        procs.stop([standin])
