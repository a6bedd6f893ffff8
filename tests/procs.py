"""Helpers for end-to-end tests: real service processes and the stand-in, on ``deploy.devsupport``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from common import topology
from common.settings import Settings
from consumer.service import Consumer
from deploy.devsupport import ROOT, Process, free_port, wait_for

ARTIFACTS = ROOT / "test-artifacts"
Service = Process  # one service as a real process, its output in a log file

__all__ = ["ARTIFACTS", "ROOT", "Cluster", "Service", "StandIn", "consumer_in_process", "free_port", "wait_for"]


@contextlib.asynccontextmanager
async def consumer_in_process(settings: Settings) -> AsyncIterator[topology.Topology]:
    """A consumer running in this test's process with ``settings`` (so a test can reach into it), consuming
    before this yields, and a channel of the same topology to publish ids to it; stopped and waited for after."""
    stop = asyncio.Event()
    consumer = Consumer(settings)
    task = asyncio.get_running_loop().create_task(consumer.run(stop))

    async def consuming() -> bool:
        if task.done():
            task.result()  # a consumer that failed to start raises here, not as a timeout
        return consumer.ready

    await wait_for(consuming, 20, "the consumer to consume")
    conn = await topology.connect(settings.amqp_url.reveal())
    try:
        yield await topology.open_channel(conn, queue_type=settings.amqp_queue_type)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await conn.close()


class Cluster:
    """Starts services against one isolated environment and stops them all at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.counter = 0

    def start(self, module: str, **overrides: str) -> Service:
        self.counter += 1
        env = {
            **self.env,
            "PRODUCER_METRICS_PORT": str(free_port()),
            "CONSUMER_METRICS_PORT": str(free_port()),
            **overrides,
        }
        svc = Process.module(f"{module}-{self.counter}", module, env, self.log_dir)
        self.services.append(svc)
        return svc

    def stop_all(self) -> None:
        for svc in self.services:
            svc.close()


class StandIn:
    """The local webhook stand-in as a process, with its control API."""

    def __init__(self, log_dir: Path, **env: str) -> None:
        self.service = Process.standin("standin", env, log_dir)
        self.port = int(self.service.port or 0)
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> StandIn:
        async def up() -> bool:
            try:
                await self.get("/_control/health")
                return True
            except (aiohttp.ClientError, OSError):
                return False

        await wait_for(up, 15, "the stand-in to answer")
        return self

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            r.raise_for_status()
            return await r.json()

    async def behave(self, **behaviour: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(self.url + "/_control/behaviour", json=behaviour) as r:
            r.raise_for_status()

    async def received(self) -> list[dict[str, Any]]:
        return list(await self.get("/_control/received"))

    async def keys(self) -> list[str]:
        return list(await self.get("/_control/received?keys=1"))

    def close(self) -> None:
        self.service.close()


# --- make bench, as a user runs it ----------------------------------------------------------------------------

# Python's own Ctrl-C handler, as in a terminal (a process started in the background may inherit SIGINT ignored).
BENCH = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); runpy.run_module('bench', run_name='__main__')"  # noqa: E501


def start_bench(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m bench`` with ``env`` added, its progress (stderr) into ``log``, its table on a pipe."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", BENCH], cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=err, start_new_session=True,
        )  # fmt: skip


def run_bench(env: dict[str, str], log: Path, timeout: float) -> tuple[str, dict[str, Any], str]:
    """A whole bench run that must end well (exit 0, no phase's error): its table, its JSON line, its log."""
    bench = start_bench(env, log)
    try:
        out, _ = bench.communicate(timeout=timeout)
    finally:
        if bench.poll() is None:  # cut short: SIGTERM, which the bench cleans up on, then its whole group
            bench.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                bench.wait(30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bench.pid, signal.SIGKILL)
    err = log.read_text(errors="replace")
    assert bench.returncode == 0, err[-3000:]
    table = out.decode()
    result: dict[str, Any] = json.loads(table.strip().splitlines()[-1])
    assert result["errors"] == {}, result["errors"]
    return table, result, err
