"""Processes of a run: the services and the stand-in, started by the bench and stopped by their pids only.

Also the ``/proc`` readings of the report: resident memory (``VmRSS``) and CPU seconds of a pid, and the pids
of the local servers (MariaDB/MySQL, RabbitMQ, Redis) to show where the CPU went.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from deploy.devsupport import ROOT, Process, Sandbox, free_port, proc_stat, stop_all, wait_http

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVERS = {"mariadbd": "mysql", "mysqld": "mysql", "beam.smp": "rabbitmq", "redis-server": "redis"}
__all__ = ["ROOT", "Proc", "Procs", "free_port", "prune_runs", "service_env", "wait_healthy"]


def prune_runs(results: Path, pattern: str, keep: int = 10) -> None:
    """Remove all but the newest ``keep`` run folders matching ``pattern`` (e.g. ``ms_bench_*``) in ``results``."""
    runs = sorted((d for d in results.glob(pattern) if d.is_dir()), key=lambda d: d.stat().st_mtime)
    for old in runs[: max(0, len(runs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def service_env(sandbox: Sandbox) -> dict[str, str]:
    """The environment of every service process of a run (metrics listeners off unless overridden)."""
    quiet = {"LOG_LEVEL": "WARNING", "LOG_FORMAT": "text", "API_TOKEN": ""}
    return {**sandbox.env(), **quiet, "PRODUCER_METRICS_PORT": "0", "CONSUMER_METRICS_PORT": "0"}


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
        fields = proc_stat(pid)
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime, fields 14 and 15 of proc(5)


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


class Proc(Process):
    """One process of the run, its output in ``<log_dir>/<name>.log``."""

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid) if self.alive() else None


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Proc] = []

    def service(self, name: str, module: str, env: dict[str, str]) -> Proc:
        return self._start(Proc.module(name, module, env, self.log_dir))

    def standin(self, name: str, env: dict[str, str]) -> Proc:
        return self._start(Proc.standin(name, env, self.log_dir))

    def command(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Any command line (a service under a tool, e.g. ``valgrind ... python -m consumer``)."""
        return self._start(Proc(name, argv, env, self.log_dir))

    def _start(self, proc: Proc) -> Proc:
        self.started.append(proc)
        return proc

    def stop(self, procs: list[Proc], timeout: float = 15.0) -> None:
        """SIGTERM each (by pid), wait up to ``timeout`` for all, then SIGKILL the rest."""
        stop_all(procs, timeout)

    def stop_all(self) -> None:
        self.stop([p for p in self.started if p.alive()])


async def wait_healthy(proc: Proc, url: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log's tail) if the process exits."""
    u = urlsplit(url)
    if not await wait_http(u.hostname or "127.0.0.1", u.port or 80, u.path or "/", proc.alive, timeout):
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.proc.returncode}:\n{proc.tail()}")
        raise RuntimeError(f"{proc.name} not healthy at {url} after {timeout:.0f}s:\n{proc.tail()}")
