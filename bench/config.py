"""The benchmark's knobs, all from the environment (``BENCH_*``), and the bars of spec section 8.

==================  =========  ===============================================================
variable            default    meaning
==================  =========  ===============================================================
BENCH_MESSAGES      100000     pending messages drained by the pipeline phase
BENCH_ROWS          1000000    sent rows behind ``GET /messages`` in the API phase
BENCH_CONSUMERS     2          consumer processes
BENCH_BATCH         500        producer ``SEND_BATCH_SIZE``
BENCH_INTERVAL      0.05       producer ``SEND_INTERVAL_SECONDS``
BENCH_PREFETCH      (service)  consumer ``CONSUMER_PREFETCH`` (unset: the service default)
BENCH_LEASE         600        ``CLAIM_LEASE_SECONDS`` (large: no stale re-publish during the run)
BENCH_TIMEOUT       600        give the pipeline up after this many seconds (or 60 s without progress)
BENCH_HTTP_N        20000      POSTs of the raw HTTP-limit phase (concurrency ``BENCH_HTTP_CONC``, 64)
BENCH_CLIENTS       10         concurrent clients of the API phase (deep offset: always 1)
BENCH_DURATION      10         seconds measured per API scenario (after ``BENCH_WARMUP``, 2)
BENCH_CLIENT        auto       API load client: ``wrk`` (when installed), ``python``, or ``auto``
BENCH_SKIP          (none)     comma-separated phases to skip: ``tracing``, ``limit``, ``pipeline``, ``steady``, ``api``
BENCH_RATE          1000       offered msg/s of the steady-state phase (``steady``: 30 s after a 5 s warm-up)
BENCH_STEADY_SECONDS 30        its measured window; then a step search (+500 msg/s, ``BENCH_STEPS`` steps of 8 s)
BENCH_GROWTH        0          1: also the growth phase (the queries' cost at ``BENCH_GROWTH_ROWS``)
BENCH_GROWTH_ROWS   1000000,10000000  the table sizes of the growth phase (each >= 300000)
BENCH_PROFILE       0          1: py-spy samples each consumer and the producer during the drain (bench/profile.py)
==================  =========  ===============================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

PHASES = ("tracing", "limit", "pipeline", "steady", "api")

# Spec section 8 (and the steady-state bars of the performance issue).
BAR_STEADY_CLAIM_P99_MS = 100.0
BAR_CREATE_RPS = 2000.0
BAR_STEADY_DUE_P99_MS = 50.0 + 150.0  # the interval of the phase (0.05 s) + 150 ms
BAR_THROUGHPUT = 2000.0
BAR_RATIO = 0.25
# The tracing hooks with tracing off, as a share of a drained message's CPU: within the drain's noise.
BAR_TRACING_OFF_SHARE = 0.01
BAR_LIST_RPS = 2000.0
BAR_LIST_P99_MS = 15.0
BAR_OFFSET_P99_MS = 100.0
BAR_IDLE_RSS_MB = 80.0
BAR_BATCH_MSGS_PER_S = 20000.0  # issue 17: POST /messages/batch of 1,000, messages created per second


class ConfigError(ValueError):
    pass


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


def _float(env: Mapping[str, str], name: str, default: str, lo: float) -> float:
    raw = _get(env, name, default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not value >= lo:
        raise ConfigError(f"{name}={raw!r} must be >= {lo:g}")
    return value


def _int(env: Mapping[str, str], name: str, default: str, lo: int) -> int:
    value = _float(env, name, default, lo)
    if value != int(value):
        raise ConfigError(f"{name}={value:g} must be a whole number")
    return int(value)


@dataclass(frozen=True)
class Config:
    messages: int = 100_000
    rows: int = 1_000_000
    consumers: int = 2
    batch: int = 500
    interval: float = 0.05
    prefetch: int | None = None
    lease: float = 600.0
    timeout: float = 600.0
    stall: float = 60.0
    http_n: int = 20_000
    http_conc: int = 64
    clients: int = 10
    duration: float = 10.0
    warmup: float = 2.0
    client: str = "auto"
    skip: frozenset[str] = field(default_factory=frozenset)
    growth: tuple[int, ...] = ()
    rate: float = 1000.0
    steady_seconds: float = 30.0
    warmup_steady: float = 5.0
    step_seconds: float = 8.0
    steps: int = 3
    profile: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        skip = frozenset(p.strip().lower() for p in _get(env, "BENCH_SKIP", "").split(",") if p.strip())
        unknown = skip - set(PHASES)
        if unknown:
            raise ConfigError(f"BENCH_SKIP names unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
        client = _get(env, "BENCH_CLIENT", "auto").lower()
        if client not in ("auto", "wrk", "python"):
            raise ConfigError(f"BENCH_CLIENT={client!r} must be auto, wrk or python")
        prefetch = _get(env, "BENCH_PREFETCH", "")
        return cls(
            messages=_int(env, "BENCH_MESSAGES", "100000", 1),
            rows=_int(env, "BENCH_ROWS", "1000000", 40),
            consumers=_int(env, "BENCH_CONSUMERS", "2", 1),
            batch=_int(env, "BENCH_BATCH", "500", 1),
            interval=_float(env, "BENCH_INTERVAL", "0.05", 0.001),
            prefetch=_int(env, "BENCH_PREFETCH", prefetch, 1) if prefetch else None,
            lease=_float(env, "BENCH_LEASE", "600", 1),
            timeout=_float(env, "BENCH_TIMEOUT", "600", 1),
            http_n=_int(env, "BENCH_HTTP_N", "20000", 100),
            http_conc=_int(env, "BENCH_HTTP_CONC", "64", 1),
            clients=_int(env, "BENCH_CLIENTS", "10", 1),
            duration=_float(env, "BENCH_DURATION", "10", 0.5),
            warmup=_float(env, "BENCH_WARMUP", "2", 0),
            client=client,
            skip=skip,
            growth=_growth(env),
            rate=_float(env, "BENCH_RATE", "1000", 1),
            steady_seconds=_float(env, "BENCH_STEADY_SECONDS", "30", 1),
            steps=_int(env, "BENCH_STEPS", "3", 0),
            profile=_get(env, "BENCH_PROFILE", "0") in ("1", "true", "yes"),
        )

    def runs(self, phase: str) -> bool:
        if phase == "growth":
            return bool(self.growth)
        return phase not in self.skip

    def describe(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "rows": self.rows,
            "consumers": self.consumers,
            "batch": self.batch,
            "interval": self.interval,
            "prefetch": self.prefetch,
            "lease": self.lease,
            "clients": self.clients,
            "duration": self.duration,
            "skip": sorted(self.skip),
        }


def _growth(env: Mapping[str, str]) -> tuple[int, ...]:
    if _get(env, "BENCH_GROWTH", "0") not in ("1", "true", "yes"):
        return ()
    raw = _get(env, "BENCH_GROWTH_ROWS", "1000000,10000000")
    try:
        sizes = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"BENCH_GROWTH_ROWS={raw!r} must be comma-separated whole numbers") from None
    if any(n < 300_000 for n in sizes):
        raise ConfigError(f"BENCH_GROWTH_ROWS={raw!r}: each size must be >= 300000 (200,000 of them are pending)")
    return tuple(sorted(sizes))
