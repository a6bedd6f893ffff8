"""Helpers for end-to-end tests: real service processes and the stand-in, on ``deploy.devsupport``."""

from __future__ import annotations

import asyncio
import contextlib
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
