"""The pipeline phase: ``BENCH_MESSAGES`` pending rows drained end to end by the real services.

Sending is switched off while the rows are bulk-loaded and the stand-in, the consumers and one producer start;
once every consumer consumes, idle RSS is read, sending is switched on, and the statuses are polled until no row
is left ``pending``/``queued``/``sending`` (or the timeout). Throughput and latency come from the database
(first claim to last ``sent``; ``sent_at - queued_at`` per row), duplicates from the stand-in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import aiomysql

from bench import loaddata
from bench.config import Config
from bench.procs import Proc, Procs, cpu_seconds, free_port, machine_jiffies, server_pids, wait_healthy
from bench.profile import Profiler
from bench.report import percentile
from common.store import MessageStore


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def _json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


def _cpu(procs: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) or 0.0 for name, pid in procs.items()}


async def run_pipeline(
    cfg: Config, pool: aiomysql.Pool, procs: Procs, env: dict[str, str], services: dict[str, Proc]
) -> dict[str, Any]:
    """Run the phase; ``services`` gets the started service processes (for RSS), the result the figures."""
    store = MessageStore(pool)
    await store.set_sending(False)
    started = time.monotonic()
    await loaddata.load_pending(pool, cfg.messages)
    _say(f"loaded {cfg.messages} pending messages in {time.monotonic() - started:.1f}s")

    standin = procs.standin("standin-pipeline", {})
    webhook = f"http://127.0.0.1:{standin.port}"
    await wait_healthy(standin, webhook + "/_control/health", timeout=20)
    consumer_env = {**env, "WEBHOOK_URL": webhook + "/webhook", "CLAIM_LEASE_SECONDS": str(cfg.lease)}
    if cfg.prefetch:
        consumer_env["CONSUMER_PREFETCH"] = str(cfg.prefetch)
    health: list[tuple[Proc, str]] = []
    for i in range(1, cfg.consumers + 1):
        port = free_port()
        proc = procs.service(f"consumer-{i}", "consumer", {**consumer_env, "CONSUMER_METRICS_PORT": str(port)})
        services[proc.name] = proc
        health.append((proc, f"http://127.0.0.1:{port}/healthz"))
    port = free_port()
    producer_env = {
        **consumer_env,
        "PRODUCER_METRICS_PORT": str(port),
        "SEND_INTERVAL_SECONDS": str(cfg.interval),
        "SEND_BATCH_SIZE": str(cfg.batch),
    }
    producer = procs.service("producer", "producer", producer_env)
    services[producer.name] = producer
    health.append((producer, f"http://127.0.0.1:{port}/healthz"))
    await asyncio.gather(*(wait_healthy(p, url) for p, url in health))
    await asyncio.sleep(2.0)  # let start-up garbage settle before the idle reading
    rss_idle = {name: p.rss_mb() for name, p in services.items()}
    rss_idle["standin"] = standin.rss_mb()

    watched = {name: p.pid for name, p in services.items() if name != "gateway"} | {"standin": standin.pid}
    for server, pids in server_pids().items():
        watched.update({f"{server}" + (f"-{i}" if i else ""): pid for i, pid in enumerate(pids)})
    profiler = None
    if cfg.profile:
        profiler = Profiler(procs.log_dir / "profile", {n: p.pid for n, p in services.items() if n != "gateway"})
        _say(profiler.start() or f"profiling {', '.join(profiler.pids)} with py-spy (the drain is slower for it)")
    cpu_before, jiffies_before = _cpu(watched), machine_jiffies()
    _say(f"draining with {cfg.consumers} consumer(s), batch {cfg.batch} every {cfg.interval}s ...")
    await store.set_sending(True)
    clock = time.monotonic()
    running = [p for name, p in services.items() if name != "gateway"] + [standin]
    status, died = await _wait_drained(cfg, pool, clock, running)
    wall = time.monotonic() - clock
    cpu_after, jiffies_after = _cpu(watched), machine_jiffies()
    cpu = {k: 100 * (cpu_after[k] - cpu_before[k]) / wall for k in watched} if wall > 0 else {}
    busy, total = (after - before for after, before in zip(jiffies_after, jiffies_before, strict=True))
    if total:  # the whole machine, in % of one core (2 cores: up to 200), and what others used
        cpu["machine"] = 100 * (os.cpu_count() or 1) * busy / total
        cpu["other processes"] = max(0.0, cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine"))
    rss_load = {name: p.rss_mb() for name, p in services.items()}
    rss_load["standin"] = standin.rss_mb()
    await store.set_sending(False)
    profile = await asyncio.to_thread(profiler.stop) if profiler is not None else {}
    if profile:
        _say(f"profiles in {profiler.out_dir if profiler else ''}")

    stats = await _json(webhook + "/_control/stats")
    window = await loaddata.drain_window(pool)
    lat = await loaddata.latencies_ms(pool)
    duplicates = sum(n - 1 for n in stats["duplicates"].values())
    claimed = cfg.messages - status["pending"]
    missing = status["queued"] + status["sending"]
    sent = status["sent"]
    throughput = sent / window["window_s"] if window["window_s"] > 0 else 0.0
    void = [f"{name} died during the run ({how})" for name, how in died.items()]
    if missing:
        void.append(f"{missing} claimed rows never finished")
    if status["pending"]:
        void.append(f"{status['pending']} rows still pending (timeout)")
    if duplicates:
        void.append(f"{duplicates} duplicate deliveries at the stand-in")
    if stats["distinct_keys"] < sent:
        void.append(f"stand-in saw {stats['distinct_keys']} messages but {sent} are sent")
    procs.stop(running)
    return {
        "messages": cfg.messages,
        "claimed": claimed,
        "sent": sent,
        "failed": status["failed"],
        "missing": missing,
        "unclaimed": status["pending"],
        "duplicates": duplicates,
        "standin_received": stats["received"],
        "standin_distinct": stats["distinct_keys"],
        "throughput_msgs_per_s": throughput,
        "window_s": window["window_s"],
        "claim_rate_per_s": claimed / window["claim_span_s"] if window["claim_span_s"] > 0 else None,
        "wall_s": wall,
        "latency_p50_ms": percentile(lat, 50),
        "latency_p99_ms": percentile(lat, 99),
        "latency_max_ms": lat[-1] if lat else None,
        "cpu_percent": cpu,
        "rss_idle": rss_idle,
        "rss_load": rss_load,
        "void": void,
        "profile": profile,
    }


async def _wait_drained(
    cfg: Config, pool: aiomysql.Pool, clock: float, running: list[Proc]
) -> tuple[dict[str, int], dict[str, str]]:
    """Poll every 0.25 s until nothing is unfinished, the timeout, ``cfg.stall`` seconds without progress, or
    a process of the run dies; then the counts by status and the processes that died (with how)."""
    last, last_change, last_say = (-1, -1), clock, clock
    while True:
        died = {p.name: _how(p.proc.returncode) for p in running if not p.alive()}
        if died:
            _say(f"giving up: {', '.join(f'{k} {v}' for k, v in died.items())} (logs: {running[0].log_path.parent})")
            return await loaddata.counts(pool), died
        unfinished, sent = await loaddata.progress(pool)
        now = time.monotonic()
        if (unfinished, sent) != last:
            last, last_change = (unfinished, sent), now
        if not unfinished:
            break
        if now - clock > cfg.timeout or now - last_change > cfg.stall:
            _say(f"giving up after {now - clock:.0f}s: {unfinished} rows unfinished")
            break
        if now - last_say >= 5:
            last_say = now
            _say(f"  {now - clock:5.1f}s  sent {sent:,}  unfinished {unfinished:,}  ({sent / (now - clock):,.0f}/s)")
        await asyncio.sleep(0.25)
    return await loaddata.counts(pool), {}


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
