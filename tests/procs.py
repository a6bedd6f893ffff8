"""Helpers for end-to-end tests: real service processes, the stand-in, and waiting on conditions."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    check: Callable[[], Awaitable[T]], timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


class Service:
    """One service as a real process (``python -m <module>`` or a script), its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.log_file = self.log_path.open("wb")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, env=full_env, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def close(self) -> None:
        self.kill9()
        self.log_file.close()


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
        svc = Service(f"{module}-{self.counter}", [sys.executable, "-m", module], env, self.log_dir)
        svc.env = env  # type: ignore[attr-defined]
        self.services.append(svc)
        return svc

    def stop_all(self) -> None:
        for svc in self.services:
            svc.close()


class StandIn:
    """The local webhook stand-in as a process, with its control API."""

    def __init__(self, log_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = Service(
            "standin", [sys.executable, str(ROOT / "deploy" / "standin.py"), "--port", str(self.port)], env, log_dir
        )

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
