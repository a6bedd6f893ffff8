"""The benchmark's steady phase: the measured window and then the step search, on one set of services. A tiny real
run shows every window in the table and the JSON line and leaves nothing behind; the search's answer is checked
against generated outcomes. What it measures at 1,000 msg/s is for ``make bench``, not for a test."""

from __future__ import annotations

import re

import pymysql
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.config import Config, ConfigError
from bench.report import steady_rows
from bench.steady import duplicates_within, highest_passing, step_rates
from common.db import connect_kwargs
from common.settings import Settings
from tests.procs import ARTIFACTS, run_bench

TINY = {
    "BENCH_SKIP": "tracing,limit,pipeline,api",
    "BENCH_RATE": "100",
    "BENCH_STEADY_SECONDS": "2",
    "BENCH_STEPS": "2",
    "BENCH_STEP_SECONDS": "1",
}


@pytest.mark.timeout(240)  # past run_bench's own bound, so that it, not pytest, ends a run that hangs
def test_a_tiny_steady_run_reports_every_window_and_leaves_nothing(base_settings: Settings) -> None:
    table, result, _ = run_bench(TINY, ARTIFACTS / "bench-steady" / "tiny.err", timeout=150)
    assert [s["rate"] for s in result["steady_steps"]] == [100, 600, 1100]
    assert all(s["due_p99_ms"] is not None for s in result["steady_steps"]), "every window has its rows"
    assert result["steady_rate"] is not None and result["latency_due_p99_ms"] is not None
    assert set(result["phase_seconds"]) == {"steady"}
    assert re.search(r"^steady +step windows, due -> sent p99 \(msg/s: ms\) +100: \d+", table, re.M), table
    assert re.search(r"^steady +highest rate with due -> sent p99 < 250 ms +", table, re.M), table
    assert re.search(r"^run time: \d+ s \(steady \d+;", table, re.M), table
    conn = pymysql.connect(**connect_kwargs(base_settings, with_db=False))  # type: ignore[arg-type]
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE %s", (result["run"],))
            assert not cur.fetchall(), f"the run's database {result['run']} was left behind"
    finally:
        conn.close()


@pytest.mark.timeout(240)
def test_a_rate_the_machine_cannot_carry_ends_the_search_after_its_window() -> None:
    """10,000 msg/s is more than two consumers send here (2,500-3,000): the window leaves a backlog, so the
    steps above it are never offered; the run still ends well and says why the search stopped."""
    overload = {**TINY, "BENCH_RATE": "10000", "BENCH_STEADY_SECONDS": "1"}
    table, result, _ = run_bench(overload, ARTIFACTS / "bench-steady" / "overload.err", timeout=150)
    assert [(s["rate"], s["ok"]) for s in result["steady_steps"]] == [(10000, False)]
    assert result["max_rate_p99_250ms"] is None and not result["max_rate_capped"]
    assert "then a backlog ended the search" in table, table


def test_the_steps_climb_by_500_from_the_steady_rate() -> None:
    assert step_rates(1000, 3) == [1000, 1500, 2000, 2500]
    assert step_rates(1000, 0) == [1000]  # BENCH_STEPS=0: the steady window alone


steps = st.lists(st.booleans(), max_size=8).map(
    lambda oks: [{"rate": 1000 + 500 * i, "ok": ok} for i, ok in enumerate(oks)]
)


@given(steps)
def test_the_highest_rate_is_the_last_of_the_passing_windows_from_the_first(windows: list[dict[str, object]]) -> None:
    best, capped = highest_passing(windows)
    leading = []
    for w in windows:
        if not w["ok"]:
            break
        leading.append(w)
    assert best == (leading[-1]["rate"] if leading else None)
    # ">=": every window passed, so the search stopped at its last step, not at the machine's limit
    assert capped == (bool(windows) and len(leading) == len(windows))


def test_a_search_that_never_failed_says_the_rate_is_at_least_its_last_step() -> None:
    figures = {"interval": 0.05, "batch": 188, "rate_offered": 1000, "rate_achieved": 1000, "missing": 0,
               "duplicates": 0, "max_rate_p99_250ms": 2500, "max_rate_capped": True,
               **{f"{k}_{q}": 1.0 for k in ("claim", "due") for q in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
               "steps": [{"rate": 1000, "due_p99_ms": 90.0, "ok": True}, {"rate": 2500, "due_p99_ms": 240.0, "ok": True}]}  # fmt: skip  # noqa: E501
    rows = {metric: value for _, metric, value, _, _ in steady_rows(figures)}
    assert rows["highest rate with due -> sent p99 < 250 ms"] == ">= 2,500 msg/s"
    assert rows["step windows, due -> sent p99 (msg/s: ms)"] == "1,000: 90, 2,500: 240"
    figures.update(max_rate_p99_250ms=1000, max_rate_capped=False)
    figures["steps"][1].update(due_p99_ms=400.0, ok=False)  # type: ignore[index]
    rows = {metric: value for _, metric, value, _, _ in steady_rows(figures)}
    assert rows["highest rate with due -> sent p99 < 250 ms"] == "1,000 msg/s"
    assert rows["step windows, due -> sent p99 (msg/s: ms)"] == "1,000: 90, 2,500: 400 x"


def test_a_window_counts_only_the_duplicates_of_its_own_messages() -> None:
    seen = {"7": 2, "12": 3, "40": 2, "not-an-id": 5}  # the stand-in's Idempotency-Keys seen more than once
    assert duplicates_within(seen, (10, 39)) == 2  # message 12, twice too many
    assert duplicates_within(seen, (1, 100)) == 4
    assert duplicates_within(seen, None) == 0  # a window without rows


def test_a_search_ended_by_a_backlog_says_so_and_never_reads_at_least() -> None:
    figures = {"interval": 0.05, "batch": 188, "rate_offered": 1000, "rate_achieved": 1000, "missing": 0,
               "duplicates": 0, "duplicates_run": 1, "max_rate_p99_250ms": 1000, "max_rate_capped": False,
               "steps_planned": 4,
               **{f"{k}_{q}": 1.0 for k in ("claim", "due") for q in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
               "steps": [{"rate": 1000, "due_p99_ms": 90.0, "ok": True}, {"rate": 1500, "due_p99_ms": 900.0, "ok": False}]}  # fmt: skip  # noqa: E501
    rows = {metric: (value, verdict) for _, metric, value, _, verdict in steady_rows(figures)}
    assert rows["step windows, due -> sent p99 (msg/s: ms)"][0] == (
        "1,000: 90, 1,500: 900 x; then a backlog ended the search"
    )
    assert rows["highest rate with due -> sent p99 < 250 ms"][0] == "1,000 msg/s"
    # a duplicate anywhere in the run (here in a later window) fails the steady bar's "0 duplicates"
    assert rows["missing; duplicates"] == ("0; 0 (the whole run: 1)", "FAIL")


@pytest.mark.parametrize("value", ["0.5", "soon"])
def test_a_step_window_must_be_a_second_or_more(value: str) -> None:
    with pytest.raises(ConfigError, match="BENCH_STEP_SECONDS"):
        Config.from_env({"BENCH_STEP_SECONDS": value})
    assert Config.from_env({}).step_seconds == 6.0
