"""The ``tracing`` phase: what the tracing hooks cost a message while tracing is off, timed in this process.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` unset, a message meets these hooks (common/tracing.py): in the consumer,
``tracing.enabled()`` for its AMQP message and again for its delivery, then two ``tracing.span`` blocks
(compare-and-set, outcome commit; each builds its attributes dict and gets the shared no-op) and two
``contextvars`` captures of the group commits (:class:`common.batching.Batcher`, there so that a flush's spans
join its first caller's trace); the producer's checks are once per tick, not per message. The loop below makes
exactly those calls, and the same loop without them is subtracted; the best of several runs is reported (the
least disturbed by other work on the machine). No server is needed.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

from common import tracing

ITERATIONS = 200_000
RUNS = 7


def _hooks(n: int) -> int:
    started = time.perf_counter_ns()
    for i in range(n):
        if tracing.enabled():  # the consumer's _handle (one per AMQP message, counted per message)
            raise RuntimeError("tracing is on")
        if tracing.enabled():  # Deliveries.process
            raise RuntimeError("tracing is on")
        with tracing.span("compare-and-set", attributes={"message.id": i}):
            contextvars.copy_context()  # Batcher.submit of the compare-and-set
        with tracing.span("outcome commit", attributes={"message.id": i, "outcome": "sent"}):
            contextvars.copy_context()  # Batcher.submit of the outcome commit
    return time.perf_counter_ns() - started


def _bare(n: int) -> int:
    started = time.perf_counter_ns()
    for _ in range(n):
        pass
    return time.perf_counter_ns() - started


def tracing_off_cost(iterations: int = ITERATIONS, runs: int = RUNS) -> dict[str, Any]:
    """µs per message of the hooks with tracing off (best of ``runs`` loops of ``iterations`` messages)."""
    if tracing.enabled():
        raise RuntimeError("the tracing phase measures tracing off: unset OTEL_EXPORTER_OTLP_ENDPOINT")
    best = min(_hooks(iterations) - _bare(iterations) for _ in range(runs))
    return {"us_per_message": round(best / iterations / 1000, 3), "iterations": iterations, "runs": runs}
