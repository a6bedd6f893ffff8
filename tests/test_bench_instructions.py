"""``make bench-instructions`` (bench/instructions.py): its settings, its reading of callgrind's files, and one
small real run of a consumer under callgrind."""

import asyncio
import os
import shutil
from pathlib import Path

import aiomysql
import pytest

from bench.instructions import InstrError, callgrind_total, config, per_message, run
from bench.procs import prune_runs
from common.db import connect_kwargs
from common.settings import Settings


def test_the_settings_default_to_a_consumer_and_name_what_is_wrong() -> None:
    assert config({}) == ("consumer", 300, 1500)
    assert config({"BENCH_INSTR_PROCESS": "producer", "BENCH_INSTR_SMALL": "50", "BENCH_INSTR_LARGE": "80"}) == (
        "producer",
        50,
        80,
    )
    with pytest.raises(InstrError, match="BENCH_INSTR_PROCESS must be one of consumer, producer, not 'gateway'"):
        config({"BENCH_INSTR_PROCESS": "gateway"})
    with pytest.raises(InstrError, match="BENCH_INSTR_SMALL must be a positive whole number of messages, not '-3'"):
        config({"BENCH_INSTR_SMALL": "-3"})
    with pytest.raises(InstrError, match=r"BENCH_INSTR_LARGE \(300\) must be more than BENCH_INSTR_SMALL \(300\)"):
        config({"BENCH_INSTR_LARGE": "300"})


def test_a_callgrind_total_is_read_and_a_message_costs_the_difference(tmp_path: Path) -> None:
    done = tmp_path / "done.callgrind"
    done.write_bytes(b"# callgrind format\nevents: Ir\nfl=x\nfn=y\n1 5\nsummary: 2483558653\ntotals: 2483558653\n")
    assert callgrind_total(done) == 2_483_558_653
    cut = tmp_path / "cut.callgrind"
    cut.write_bytes(b"# callgrind format\nevents: Ir\nfl=x\n")
    with pytest.raises(ValueError, match="not a finished callgrind file"):
        callgrind_total(cut)
    # what every run spends whatever its size (start-up, shutdown) cancels out
    assert per_message({1500: 1_000_000 + 1500 * 900, 300: 1_000_000 + 300 * 900}) == 900


async def _databases(settings: Settings) -> set[str]:
    conn = await aiomysql.connect(**connect_kwargs(settings, with_db=False))
    try:
        async with conn.cursor() as cur:
            await cur.execute("SHOW DATABASES LIKE 'ms\\_instr\\_%'")
            return {name for (name,) in await cur.fetchall()}
    finally:
        conn.close()


# In `make chaos`, the long suite: two start-ups of a consumer under valgrind take 90 s on an idle machine and
# went past pytest's 120 s bound beside the rest of `make test` (a clean-clone `.ci/run`, 2026-12-03).
@pytest.mark.chaos
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
async def test_a_small_real_run_counts_a_consumers_instructions_and_leaves_nothing_behind(
    base_settings: Settings, tmp_path: Path
) -> None:
    before = await _databases(base_settings)
    result = await run(base_settings, "consumer", 10, 30, tmp_path)
    # a message costs hundreds of thousands of instructions (about 930,000 in a full group commit; more in
    # the small groups of a run this short), never nothing
    assert 200_000 < result["instructions_per_message"] < 5_000_000, result
    files = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.glob("*.callgrind")))
    assert files == ["consumer-10.callgrind", "consumer-30.callgrind"]
    assert await _databases(base_settings) <= before, "its databases are removed"


def test_only_the_newest_runs_are_kept(tmp_path: Path) -> None:
    for i in range(12):
        run_dir = tmp_path / f"ms_instr_{i:02d}"
        run_dir.mkdir()
        os.utime(run_dir, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "ms_bench_00").mkdir()  # another kind of run: not this pattern's to remove
    prune_runs(tmp_path, "ms_instr_*", keep=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ms_bench_00"] + [f"ms_instr_{i:02d}" for i in range(2, 12)]
