"""``python -m bench``: run the phases, clean up, print the table and the JSON line (the very last line).

Exit code 0 when every phase ran, the pipeline run is not void and the API served the right rows (bars
failed or not), 1 otherwise, 2 for a bad ``BENCH_*`` setting. Progress goes to stderr; service logs and
the JSON line to ``bench/results/<run>/`` (git-ignored; the last 10 runs are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from bench import loaddata
from bench.api import pick_client, run_api, run_batch
from bench.config import PHASES, Config, ConfigError
from bench.growth import run_growth
from bench.httplimit import http_limit
from bench.pipeline import run_pipeline
from bench.procs import ROOT, Proc, Procs, free_port, prune_runs, service_env, wait_healthy
from bench.report import summary, table
from bench.steady import run_steady
from bench.tracingoff import tracing_off_cost
from common.db import create_pool
from common.errors import SettingsError
from common.migrations import migrate
from common.settings import Settings
from deploy.devsupport import ManagementAPI, Sandbox

STARTED = time.monotonic()


def say(text: str) -> None:
    """A progress line, with the seconds since the bench started (the phases' share of the run time)."""
    print(f"bench: [{time.monotonic() - STARTED:3.0f}s] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(r: dict[str, Any], name: str, task: asyncio.Task[Any]) -> Iterator[None]:
    """One phase's block: its error goes to ``r["errors"][name]`` (the run goes on with the next phase) and its
    seconds are added to ``r["phase_seconds"][name]`` (the limit phase runs twice)."""
    t = time.monotonic()
    try:
        yield
    except Exception as exc:
        r["errors"][name] = _error(exc, task)
    finally:
        spent = r["phase_seconds"]
        spent[name] = spent.get(name, 0.0) + time.monotonic() - t


def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except OSError:
        mem_kb = 0
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
    }


async def start_gateway(procs: Procs, env: dict[str, str]) -> tuple[Proc, str]:
    port = free_port()
    gateway = procs.service("gateway", "gateway", {**env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port)})
    base = f"http://127.0.0.1:{port}"
    await wait_healthy(gateway, base + "/healthz")
    return gateway, base


async def server_versions(pool: Any, sandbox: Sandbox) -> dict[str, str]:
    out: dict[str, str] = {}
    async with pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT VERSION()")
        out["mysql"] = str((await cur.fetchone())[0])
    if isinstance(sandbox.rabbit, ManagementAPI):
        with contextlib.suppress(Exception):
            out["rabbitmq"] = await asyncio.to_thread(sandbox.rabbit.version)
    return out


async def run(cfg: Config, base: Settings) -> dict[str, Any]:
    r: dict[str, Any] = {"config": cfg.describe(), "errors": {}, "rss_idle": {}, "rss_load": {}, "phase_seconds": {}}
    # SIGTERM ends the run like Ctrl-C does: cancelled, so every clean-up below runs (a private server killed).
    this = asyncio.current_task()
    assert this is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    sandbox = Sandbox(base, f"ms_bench_{secrets.token_hex(4)}")  # its own database, vhost and Redis prefix
    pool = None
    r["run"] = sandbox.name
    procs = Procs(ROOT / "bench" / "results" / sandbox.name)
    services: dict[str, Proc] = {}
    started = time.monotonic()
    r["loadavg_start"] = os.getloadavg()[0]
    if cfg.runs("tracing"):  # in this process, before anything else runs on the machine
        with phase(r, "tracing", this):
            r["tracing"] = tracing_off_cost()
            say(f"tracing hooks, tracing off: {r['tracing']['us_per_message']:.2f} µs per message")
    # The shared servers are left alone when only the growth phase runs, on a private server (and the tracing
    # phase, which runs in this process).
    servers = [p for p in PHASES if p != "tracing"]
    shared = any(cfg.runs(p) for p in servers) or (cfg.runs("growth") and cfg.growth_server == "shared")
    try:
        if shared:
            await asyncio.to_thread(sandbox.create)
            pool = await create_pool(sandbox.settings, maxsize=4)
            await migrate(pool)
            r["versions"] = await server_versions(pool, sandbox)
        say(f"isolated run {sandbox.name}; logs in bench/results/{sandbox.name}/")
        if cfg.runs("limit"):
            with phase(r, "limit", this):
                say(f"raw HTTP limit: {cfg.http_n} POSTs at concurrency {cfg.http_conc} ...")
                r["limit"] = await http_limit(procs, cfg.http_n, cfg.http_conc)
                say(f"raw HTTP limit: {r['limit']['rate']:.0f}/s")
        env = service_env(sandbox)
        base_url = None
        if cfg.runs("api"):
            try:
                services["gateway"], base_url = await start_gateway(procs, env)
            except Exception as exc:
                r["errors"]["api"] = f"gateway did not start: {_error(exc, this)}"
        if cfg.runs("pipeline"):
            with phase(r, "pipeline", this):
                r["pipeline"] = pipe = await run_pipeline(cfg, pool, procs, env, services)
                r["rss_idle"].update(pipe["rss_idle"])
                r["rss_load"].update(pipe["rss_load"])
            if cfg.runs("limit") and "limit" in r:  # the same ceiling again: the ratio divides by their mean
                with phase(r, "limit", this):
                    r["limit_after"] = await http_limit(procs, cfg.http_n, cfg.http_conc)
                    say(f"raw HTTP limit after the drain: {r['limit_after']['rate']:.0f}/s")
        if cfg.runs("steady"):
            with phase(r, "steady", this):
                say(
                    f"steady state: {cfg.rate:g} msg/s offered for {cfg.steady_seconds:g}s, then {cfg.steps} steps"
                    f" of +500 msg/s for {cfg.step_seconds:g}s each ..."
                )
                r["steady"] = st = await run_steady(cfg, pool, procs, env)
                steps = ", ".join(f"{s['rate']:g}: {s['due_p99_ms']} ms" for s in st["steps"])
                say(f"steady state: due -> sent p99 {steps}")
        if cfg.runs("api") and base_url is not None:
            with phase(r, "api", this):
                gateway = services["gateway"]
                r["rss_idle"].setdefault("gateway", gateway.rss_mb())
                say(f"API: bulk-loading {cfg.rows:,} sent rows ...")
                t = time.monotonic()
                await loaddata.load_sent(pool, cfg.rows)
                loaded = time.monotonic() - t
                say(f"API: loaded in {loaded:.1f}s; load client {pick_client(cfg)}")
                r["api"] = await run_api(cfg, base_url, pool, gateway.pid)
                r["api"]["load_seconds"] = loaded
                say("API: POST /messages/batch of 1,000 ...")
                r["api"]["batch"] = await run_batch(base_url, pool)
                r["rss_load"]["gateway"] = max(r["rss_load"].get("gateway") or 0, gateway.rss_mb() or 0)
        if cfg.runs("growth"):
            with phase(r, "growth", this):
                r["growth"] = await run_growth(cfg, pool, sandbox.settings, say)
    except Exception as exc:  # the sandbox could not be set up: report it like a phase error
        r["errors"]["setup"] = _error(exc, this)
    finally:
        procs.stop_all()
        if pool is not None:
            pool.close()
            await pool.wait_closed()
        problems = await asyncio.to_thread(sandbox.remove) if shared else []
        if problems:
            r["errors"]["cleanup"] = "; ".join(problems)
        r["seconds"] = time.monotonic() - started
    return r


def _keep(run: str, line: str, keep: int = 10) -> None:
    """Save the JSON line beside the run's logs and as ``latest.json``; prune all but the last ``keep`` runs."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "latest.json").write_text(line + "\n")
    if (results / run).is_dir():
        (results / run / "result.json").write_text(line + "\n")
    prune_runs(results, "ms_bench_*", keep)


def _error(exc: BaseException, task: asyncio.Task[Any]) -> str:
    """``exc`` as one line for the report (its traceback to stderr); an interruption instead when the run is
    being cancelled (Ctrl-C, SIGTERM) and a clean-up in a library replaced the cancellation with its own error,
    e.g. a statement on the connection the cancellation closed."""
    if task.cancelling():
        raise asyncio.CancelledError from exc
    say("".join(traceback.format_exception(exc)).rstrip())
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def main() -> int:
    try:
        cfg = Config.from_env()
        base = Settings.from_env()
    except (ConfigError, SettingsError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        r = asyncio.run(run(cfg, base))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM: cleaned up, nothing to report
        print("bench: interrupted; everything it started is stopped and removed", file=sys.stderr)
        return 130
    s = summary(r)
    m = machine()
    versions = r.get("versions", {})
    print()
    print(
        f"machine: {m['nproc']} cores, {m['cpu']}, {m['mem_gib']} GiB; MySQL {versions.get('mysql', '?')};"
        f" RabbitMQ {versions.get('rabbitmq', '?')}; Python {m['python']};"
        f" load average at start {r['loadavg_start']:.2f} (other work on the machine skews every figure)"
    )
    settings = {k: v for k, v in r["config"].items() if k != "skip"}
    settings["client"] = s["client"] or "-"
    print("settings: " + " ".join(f"{k}={'service default' if v is None else v}" for k, v in settings.items()))
    phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phase_seconds"].items())
    print(f"run time: {r['seconds']:.0f} s ({phases}; the rest starting and cleaning up)\n")
    print(table(r, s))
    extra = {"machine": m, "versions": versions, "loadavg_start": round(r["loadavg_start"], 2), "run": r["run"]}
    if r.get("growth"):
        extra["growth"] = r["growth"]
    line = json.dumps({**s, **extra}, separators=(",", ":"))
    _keep(r["run"], line)
    print(line)
    return 1 if s["void"] or r["errors"] or s["pages_ok"] is False else 0


if __name__ == "__main__":
    raise SystemExit(main())
