"""Processes of a run: the services and the stand-in, started by the bench and stopped by their pids only.

Also the ``/proc`` readings of the report: resident memory (``VmRSS``) and CPU seconds of a pid, and the pids
of the local servers (MariaDB/MySQL, RabbitMQ, Redis) to show where the CPU went.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVERS = {"mariadbd": "mysql", "mysqld": "mysql", "beam.smp": "rabbitmq", "redis-server": "redis"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_jiffies() -> tuple[int, int]:
    """``(busy, total)`` CPU jiffies of the whole machine so far (all cores), from ``/proc/stat``."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def server_pids() -> dict[str, list[int]]:
    """Pids of the local MySQL, RabbitMQ and Redis servers (by process name), for CPU accounting."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in SERVERS:
            found.setdefault(SERVERS[comm], []).append(int(entry))
    return found


class Proc:
    """One process of the run, its output in ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.port: int | None = None
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the bench reaches the bench only; it stops these itself
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid) if self.alive() else None


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Proc] = []

    def service(self, name: str, module: str, env: dict[str, str]) -> Proc:
        return self._start(Proc(name, [sys.executable, "-m", module], env, self.log_dir))

    def standin(self, name: str, env: dict[str, str]) -> Proc:
        port = free_port()
        script = str(ROOT / "deploy" / "standin.py")
        proc = self._start(Proc(name, [sys.executable, script, "--port", str(port)], env, self.log_dir))
        proc.port = port
        return proc

    def _start(self, proc: Proc) -> Proc:
        self.started.append(proc)
        return proc

    def stop(self, procs: list[Proc], timeout: float = 15.0) -> None:
        """SIGTERM each (by pid), wait up to ``timeout`` for all, then SIGKILL the rest."""
        for p in procs:
            if p.alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.proc.wait(5)

    def stop_all(self) -> None:
        self.stop([p for p in self.started if p.alive()])


async def wait_healthy(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if the process exits."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.proc.returncode}:\n{proc.tail()}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} not healthy at {url} after {timeout:.0f}s:\n{proc.tail()}")
            await asyncio.sleep(0.1)
