"""The benchmark's growth phase on its private MariaDB, at a tiny size: it completes with every sample it was asked
for, and leaves nothing behind (the server's process ended, its directory removed), also when interrupted with
Ctrl-C half-way. What it measures at 10 M rows is for ``make bench``, not for a test."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pymysql
import pytest

from bench import loaddata
from bench.config import Config, ConfigError
from common.db import connect_kwargs, create_pool
from common.migrations import migrate
from common.queries import MessageQueries
from common.settings import Settings
from common.store import MessageStore
from deploy.devsupport import proc_stat
from tests.procs import ARTIFACTS, run_bench, start_bench

TINY = {
    "BENCH_GROWTH": "1",
    "BENCH_SKIP": "tracing,limit,pipeline,steady,api",
    "BENCH_GROWTH_SERVER": "private",
    "BENCH_GROWTH_ROWS": "2500,5000",
    "BENCH_GROWTH_PENDING": "1000",
    "BENCH_GROWTH_SAMPLES": "20",
    "BENCH_GROWTH_ROUNDS": "2",
    "BENCH_GROWTH_RETENTION": "4",
    "BENCH_GROWTH_WARMUP": "10",
    "BENCH_GROWTH_BUFFER_POOL": "64M",
}


def private_server(log: Path, timeout: float = 60.0) -> tuple[int, Path]:
    """The pid and directory of the private MariaDB the bench says it started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"private MariaDB pid (\d+) on port \d+, data in (\S+),", log.read_text(errors="replace"))
        if found:
            return int(found[1]), Path(found[2])
        time.sleep(0.1)
    raise AssertionError(f"the bench never said it started its MariaDB:\n{log.read_text(errors='replace')[-3000:]}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return proc_stat(pid)[0] == "Z"  # not reaped yet: ended


def test_the_growth_phase_on_a_private_server_completes_and_removes_it() -> None:
    log = ARTIFACTS / "bench-growth" / "tiny.err"
    table, result, err = run_bench(TINY, log, timeout=90)
    pid, directory = private_server(log)
    assert gone(pid) and not directory.exists(), f"left behind: pid {pid}, {directory}\n{err[-2000:]}"
    growth = result["growth"]
    assert growth["server"] == "private"
    assert growth["mysql"]["innodb_buffer_pool_size"] == str(64 * 2**20)  # the configured server, not the shared
    for rows in ("2500", "5000"):
        ops = growth["ops"][rows]
        assert {op: ops[op]["n"] for op in ops} == {
            "stats": 20, "first page": 20, "deep page": 20, "claim 2": 20, "retention batch": 4,
        }  # fmt: skip
        assert all(len(ops[op]["round_p99_ms"]) == 2 for op in ops)
        assert all(ops[op]["pages"] > 0 for op in ops if op != "retention batch")  # the server's counters read
        assert growth["sizes"][rows]["load_s"] > 0
    for op in ("stats", "first page", "deep page", "claim 2", "retention batch"):
        assert re.search(rf"^growth +{op} p99 ms at 0\.0025M / 0\.005M rows ", table, re.M), table
    assert "p99 of each round" in table and "pages/run" in table


def test_the_growth_phase_still_runs_on_the_shared_server_in_the_runs_own_database(base_settings: Settings) -> None:
    log = ARTIFACTS / "bench-growth" / "shared.err"
    _, result, err = run_bench({**TINY, "BENCH_GROWTH_SERVER": "shared", "BENCH_GROWTH_ROWS": "2500"}, log, timeout=90)
    assert "private MariaDB" not in err
    growth = result["growth"]
    assert growth["server"] == "shared" and growth["ops"]["2500"]["claim 2"]["n"] == 20
    conn = pymysql.connect(**connect_kwargs(base_settings, with_db=False))  # type: ignore[arg-type]
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = %s", (result["run"],))
            assert cur.fetchone() == (0,), f"the run's database {result['run']} was left on the shared server"
            cur.execute("SELECT @@innodb_buffer_pool_size")
            assert growth["mysql"]["innodb_buffer_pool_size"] == str(cur.fetchone()[0])  # that server's
    finally:
        conn.close()


def test_ctrl_c_in_the_growth_phase_ends_its_private_server() -> None:
    log = ARTIFACTS / "bench-growth" / "interrupted.err"
    # While it loads the larger size (where a 10 M-row run spends minutes), with statements in flight.
    bench = start_bench({**TINY, "BENCH_GROWTH_ROWS": "2500,400000"}, log)
    try:
        pid, directory = private_server(log)
        deadline = time.monotonic() + 60
        while "loading 400,000 rows" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
        bench.send_signal(signal.SIGINT)
        bench.communicate(timeout=60)
    finally:
        bench.kill()
    err = log.read_text(errors="replace")
    assert "loading 400,000 rows" in err and "loaded in" not in err.split("loading 400,000 rows")[1], err[-3000:]
    assert bench.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert gone(pid), f"the private MariaDB (pid {pid}) still runs after Ctrl-C"
    assert not directory.exists(), f"{directory} is still there after Ctrl-C"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BENCH_GROWTH_SERVER": "elsewhere"}, "must be private or shared"),
        ({"BENCH_GROWTH_ROWS": "1500"}, "each size must be >= 2000"),
        ({"BENCH_GROWTH_BUFFER_POOL": "lots"}, "must be a size such as 4G"),
    ],
)
def test_growth_settings_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env({"BENCH_GROWTH": "1", "BENCH_GROWTH_PENDING": "1000", **env})


async def test_the_bench_loads_count_their_rows_and_a_failed_one_leaves_nothing(settings: Settings) -> None:
    """The bench's bulk loads switch the insert trigger's count off for their own transaction and count the rows
    themselves: the counts by status match the rows after each load. A load that fails half-way is rolled back
    whole (the table it emptied stays empty, with its counts right), and its connection (the pool's only one here)
    has the trigger count the next rows it inserts again."""
    p = await create_pool(settings, maxsize=1)
    await migrate(p)
    kept = MessageQueries(p)

    async def stored() -> dict[str, int]:
        return {k: n for k, n in (await kept.counts_by_status()).items() if k != "cancelled"}

    try:
        await loaddata.load_sent(p, 30)
        await loaddata.append_pending(p, 20)
        await loaddata.append_sent(p, 5)
        assert await loaddata.counts(p) == {"pending": 20, "queued": 0, "sending": 0, "sent": 35, "failed": 0}
        assert await stored() == await loaddata.counts(p), "the counts by status follow the rows"
        with pytest.raises(pymysql.err.OperationalError, match="no_such_column"):
            await loaddata._bulk(
                p, 10, "INSERT INTO messages (recipient, content) SELECT 'x', no_such_column FROM {seq}"
            )
        assert await loaddata.counts(p) == dict.fromkeys(("pending", "queued", "sending", "sent", "failed"), 0)
        assert await stored() == await loaddata.counts(p)
        await MessageStore(p).create("+905551112233", "counted by the trigger")  # the failed load's connection
        assert (await stored())["pending"] == 1
    finally:
        p.close()
        await p.wait_closed()
