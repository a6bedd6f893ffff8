"""``make bench-instructions``: the instructions one service process spends per drained message, counted by
callgrind, so that an A/B of a change reads the same on a fast, a slow or a busy host.

The drain's rate and its CPU seconds move with the host (by ±20% within minutes on the development VM); an
instruction count does not. The process measured (``BENCH_INSTR_PROCESS``: ``consumer``, the default, or
``producer``) runs under ``valgrind --tool=callgrind`` while the other one, the stand-in and the servers run as
usual, and drains ``BENCH_INSTR_SMALL`` (300) and then ``BENCH_INSTR_LARGE`` (1,500) pending messages, each run
from a fresh start in the run's own database, vhost and Redis prefix. What the process spends whatever the
count (imports, connecting, shutting down) is the same in both runs, so the difference of the two totals over
the difference of the counts is what a message costs. Two counts of the same code differ by about 0.02%.

Under valgrind the process is some 50 times slower, so its group commits are as full as in a drain at the
machine's limit: the count is the cost per message of a busy consumer. The callgrind files stay under
``bench/results/ms_instr_<time>/`` (the last 10 runs kept) for ``callgrind_annotate``; the last line printed is
a JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import loaddata
from bench.procs import ROOT, Proc, Procs, free_port, prune_runs, service_env, wait_healthy
from common.db import create_pool
from common.errors import SettingsError
from common.migrations import migrate
from common.settings import Settings
from common.store import MessageStore
from deploy.devsupport import Sandbox

PROCESSES = ("consumer", "producer")
STARTUP_SECONDS = 300.0  # a process under valgrind takes 10-20 s to answer its health check
DRAIN_SECONDS = 900.0
STOP_SECONDS = 120.0  # callgrind writes its file at exit: never SIGKILL before that
_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


class InstrError(Exception):
    """A bad ``BENCH_INSTR_*`` setting or a missing valgrind (exit status 2)."""


def _say(text: str) -> None:
    print(f"bench-instructions: {text}", file=sys.stderr, flush=True)


def config(env: dict[str, str] | os._Environ[str] = os.environ) -> tuple[str, int, int]:
    """``(process, small, large)`` from ``BENCH_INSTR_PROCESS``, ``BENCH_INSTR_SMALL``, ``BENCH_INSTR_LARGE``."""
    process = env.get("BENCH_INSTR_PROCESS", "consumer")
    if process not in PROCESSES:
        raise InstrError(f"BENCH_INSTR_PROCESS must be one of {', '.join(PROCESSES)}, not {process!r}")
    counts = []
    for name, default in (("BENCH_INSTR_SMALL", 300), ("BENCH_INSTR_LARGE", 1500)):
        raw = env.get(name, str(default))
        if not raw.isdigit() or int(raw) < 1:
            raise InstrError(f"{name} must be a positive whole number of messages, not {raw!r}")
        counts.append(int(raw))
    small, large = counts
    if large <= small:
        raise InstrError(f"BENCH_INSTR_LARGE ({large}) must be more than BENCH_INSTR_SMALL ({small})")
    return process, small, large


def callgrind_total(path: Path) -> int:
    """The instructions a callgrind file counts in all (its ``summary:`` or ``totals:`` line)."""
    found = _TOTAL.search(path.read_bytes())
    if found is None:
        raise ValueError(f"{path} has no summary or totals line: not a finished callgrind file")
    return int(found.group(1))


def per_message(totals: dict[int, int]) -> float:
    """Instructions per message from the totals of two runs ``{messages: instructions}``: the difference of the
    totals over the difference of the counts, so that what a run costs whatever its size cancels out."""
    (small, at_small), (large, at_large) = sorted(totals.items())
    return (at_large - at_small) / (large - small)


async def _one_run(base: Settings, process: str, messages: int, out_dir: Path) -> int:
    """Drain ``messages`` with ``process`` under callgrind in a sandbox of its own; its instruction total."""
    sandbox = Sandbox(base, f"ms_instr_{secrets.token_hex(4)}")
    await asyncio.to_thread(sandbox.create)
    procs = Procs(out_dir)
    pool = await create_pool(sandbox.settings, maxsize=2)
    out = out_dir / f"{process}-{messages}.callgrind"
    try:
        await migrate(pool)
        store = MessageStore(pool)
        await store.set_sending(False)
        await loaddata.load_pending(pool, messages)
        standin = procs.standin(f"standin-{messages}", {})
        webhook = f"http://127.0.0.1:{standin.port}"
        await wait_healthy(standin, webhook + "/_control/health", timeout=20)
        env = {
            **service_env(sandbox),
            "WEBHOOK_URL": webhook + "/webhook",
            "SEND_INTERVAL_SECONDS": "0.05",
            "SEND_BATCH_SIZE": "200",
        }
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        started: list[tuple[Proc, str]] = []
        for name in ("consumer", "producer"):
            port = free_port()
            argv = [*(valgrind if name == process else []), sys.executable, "-m", name]
            metrics_port = {f"{name.upper()}_METRICS_PORT": str(port)}
            proc = procs.command(f"{name}-{messages}", argv, {**env, **metrics_port})
            started.append((proc, f"http://127.0.0.1:{port}/healthz"))
        await asyncio.gather(*(wait_healthy(p, url, timeout=STARTUP_SECONDS) for p, url in started))
        clock = time.monotonic()
        await store.set_sending(True)
        while (await loaddata.progress(pool))[0]:
            if time.monotonic() - clock > DRAIN_SECONDS:
                raise RuntimeError(f"{messages} messages not drained in {DRAIN_SECONDS:.0f}s")
            await asyncio.sleep(0.5)
        _say(f"{messages} messages drained in {time.monotonic() - clock:.1f}s with the {process} under callgrind")
        await asyncio.to_thread(procs.stop, [p for p, _ in started] + [standin], STOP_SECONDS)
        return callgrind_total(out)
    finally:
        await asyncio.to_thread(procs.stop_all)
        pool.close()
        await pool.wait_closed()
        problems = await asyncio.to_thread(sandbox.remove)
        if problems:
            _say(f"clean-up: {'; '.join(problems)}")


async def run(base: Settings, process: str, small: int, large: int, out_dir: Path | None = None) -> dict[str, Any]:
    """Both runs, one after the other; the callgrind files and logs in ``out_dir`` (by default a new folder
    under ``bench/results/``)."""
    results = ROOT / "bench" / "results"
    out_dir = out_dir or results / f"ms_instr_{time.strftime('%Y%m%d-%H%M%S')}"
    totals = {n: await _one_run(base, process, n, out_dir) for n in (small, large)}
    await asyncio.to_thread(prune_runs, results, "ms_instr_*")  # as make bench keeps its last 10 runs
    return {
        "process": process,
        "instructions_per_message": round(per_message(totals)),
        "totals": {str(n): t for n, t in totals.items()},
        "files": str(out_dir),
    }


async def _run_until_sigterm(base: Settings, process: str, small: int, large: int) -> dict[str, Any]:
    """:func:`run`, ended by SIGTERM as by Ctrl-C: cancelled, so its processes and sandbox are removed."""
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    return await run(base, process, small, large)


def main() -> int:
    try:
        process, small, large = config()
        base = Settings.from_env()
        if shutil.which("valgrind") is None:
            raise InstrError("valgrind is not installed (Debian: apt-get install valgrind)")
    except (InstrError, SettingsError) as exc:
        _say(str(exc))
        return 2
    try:
        result = asyncio.run(_run_until_sigterm(base, process, small, large))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _say("interrupted; everything it started is stopped and removed")
        return 130
    print(f"{process}: {result['instructions_per_message']:,} instructions a message ({large:,} vs {small:,} drained)")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
