"""The output: an aligned table (metric, value, bar, verdict), the CPU breakdown, and the JSON summary line."""

from __future__ import annotations

import math
from typing import Any

from bench.config import (
    BAR_BATCH_MSGS_PER_S,
    BAR_CREATE_RPS,
    BAR_GROWTH_RATIO,
    BAR_GROWTH_STATS_P99_MS,
    BAR_IDLE_RSS_MB,
    BAR_LIST_P99_MS,
    BAR_LIST_RPS,
    BAR_OFFSET_P99_MS,
    BAR_RATIO,
    BAR_STEADY_CLAIM_P99_MS,
    BAR_STEADY_DUE_P99_MS,
    BAR_THROUGHPUT,
    BAR_TRACING_OFF_SHARE,
)

Row = tuple[str, str, str, str, str]


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _verdict(ok: bool | None, void: bool = False) -> str:
    if ok is None:
        return "-"
    if void:
        return "VOID"
    return "PASS" if ok else "FAIL"


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: the keys of the issue first, then the context."""
    pipe, api, limit = r.get("pipeline") or {}, r.get("api") or {}, r.get("limit") or {}
    steady = r.get("steady") or {}
    services = set(r.get("rss_idle", {})) - {"standin"}
    idle = [v for k, v in r.get("rss_idle", {}).items() if k in services and v is not None]
    load = [v for k, v in r.get("rss_load", {}).items() if k in services and v is not None]
    before, after = limit.get("rate"), (r.get("limit_after") or {}).get("rate")
    rate = (before + after) / 2 if before and after else before  # a noisy sample moves the mean less
    thr = pipe.get("throughput_msgs_per_s")
    page = {k: api.get(k) or {} for k in ("first", "deep_cursor", "deep_offset")}
    return {
        "throughput_msgs_per_s": _round(thr),
        "http_limit_per_s": _round(rate),
        "http_limit_before": _round(before),
        "http_limit_after": _round(after),
        "ratio": _round(thr / rate if thr is not None and rate else None, 3),
        "tracing_off_us_per_message": (r.get("tracing") or {}).get("us_per_message"),
        "cpu_us_per_message": _round(cpu_us_per_message(pipe), 1),
        "messages": pipe.get("messages"),
        "sent": pipe.get("sent"),
        "failed": pipe.get("failed"),
        "missing": pipe.get("missing"),
        "duplicates": pipe.get("duplicates"),
        "latency_p50_ms": _round(pipe.get("latency_p50_ms"), 1),
        "latency_p99_ms": _round(pipe.get("latency_p99_ms"), 1),
        "list_rps_first": _round(page["first"].get("rps")),
        "list_p99_ms_first": _round(page["first"].get("p99_ms"), 2),
        "list_rps_deep_cursor": _round(page["deep_cursor"].get("rps")),
        "list_p99_ms_deep_cursor": _round(page["deep_cursor"].get("p99_ms"), 2),
        "list_p99_ms_deep_offset": _round(page["deep_offset"].get("p99_ms"), 2),
        "batch_msgs_per_s": _round((api.get("batch") or {}).get("msgs_per_s")),
        "rss_idle_mb_max": _round(max(idle), 1) if idle else None,
        "rss_load_mb_max": _round(max(load), 1) if load else None,
        "void": bool(pipe.get("void")),
        "void_reasons": pipe.get("void") or [],
        "unclaimed": pipe.get("unclaimed"),
        "claim_rate_per_s": _round(pipe.get("claim_rate_per_s")),
        "list_rps_deep_offset": _round(page["deep_offset"].get("rps")),
        "total_count_ok": api.get("total_count_ok"),
        "pages_ok": api.get("pages_ok"),
        "client": api.get("client"),
        "rows": r["config"]["rows"] if "api" in r else None,
        **{k: v for k, v in r["config"].items() if k not in ("messages", "rows")},
        "rss_idle_mb": {k: _round(v, 1) for k, v in r.get("rss_idle", {}).items()},
        "rss_load_mb": {k: _round(v, 1) for k, v in r.get("rss_load", {}).items()},
        "cpu_percent": {k: _round(v) for k, v in pipe.get("cpu_percent", {}).items()},
        "create_rps": _round((api.get("create") or {}).get("rps")),
        "create_p99_ms": _round((api.get("create") or {}).get("p99_ms"), 2),
        "latency_steady_p99_ms": _round(steady.get("claim_p99_ms"), 1),
        "latency_due_p99_ms": _round(steady.get("due_p99_ms"), 1),
        "steady_rate": _round(steady.get("rate_achieved")),
        "max_rate_p99_250ms": steady.get("max_rate_p99_250ms"),
        "errors": r.get("errors", {}),
        "bench_seconds": _round(r.get("seconds")),
        "phase_seconds": {k: _round(v, 1) for k, v in r.get("phase_seconds", {}).items()},
        "steady_steps": [
            {"rate": s["rate"], "due_p99_ms": _round(s["due_p99_ms"], 1), "ok": s["ok"]}
            for s in steady.get("steps", [])
        ],
        "max_rate_capped": steady.get("max_rate_capped"),
    }


def cpu_us_per_message(pipe: dict[str, Any]) -> float | None:
    """CPU per message of the drain: the machine's CPU % of one core, less what other processes used (the
    services, the stand-in and the servers remain), over the throughput."""
    cpu, thr = pipe.get("cpu_percent") or {}, pipe.get("throughput_msgs_per_s")
    used = (cpu.get("machine") or 0.0) - (cpu.get("other processes") or 0.0)
    return used / 100 / thr * 1e6 if used > 0 and thr else None


def _round(value: float | None, digits: int = 0) -> float | int | None:
    if value is None:
        return None
    return round(value) if digits == 0 else round(value, digits)


def thr_of(pipe: dict[str, Any]) -> float:
    return float(pipe.get("throughput_msgs_per_s") or 0.0)


GROWTH_OPERATIONS = ("stats", "first page", "deep page", "claim 2", "retention batch")


def table(r: dict[str, Any], s: dict[str, Any]) -> str:
    rows: list[Row] = [("phase", "metric", "value", "bar", "verdict")]
    pipe, api, limit = r.get("pipeline"), r.get("api"), r.get("limit")
    void = bool(s["void"])
    if r.get("tracing"):
        cost, cpu = r["tracing"]["us_per_message"], s["cpu_us_per_message"]
        shown = f"{cost:.2f} µs" + (f" = {cost / cpu:.2%} of the drain's {_n(cpu)} µs CPU per message" if cpu else "")
        ok = cost / cpu < BAR_TRACING_OFF_SHARE if cpu else None
        rows.append(("tracing", "hooks per message, tracing off (in-process)", shown,
                     f"< {BAR_TRACING_OFF_SHARE:.0%} of CPU/msg", _verdict(ok)))  # fmt: skip
    if limit:
        after = (r.get("limit_after") or {}).get("rate")
        shown = f"{_n(limit['rate'])}/s" + (f" before, {_n(after)}/s after the drain" if after else "")
        rows.append(("limit", "raw HTTP POST, aiohttp -> stand-in", shown, "", ""))
    if pipe:
        thr, ratio = s["throughput_msgs_per_s"], s["ratio"]
        rows += [
            ("pipeline", "throughput, first claim -> last sent", f"{_n(thr)} msg/s", f">= {BAR_THROUGHPUT:,.0f}",
             _verdict(thr >= BAR_THROUGHPUT, void)),
            ("pipeline", "ratio to raw HTTP POST (mean of before and after)", _n(ratio, 3), f">= {BAR_RATIO}",
             _verdict(None if ratio is None else ratio >= BAR_RATIO, void)),
            ("pipeline", "claimed = sent + failed + missing",
             f"{pipe['claimed']:,} = {pipe['sent']:,} + {pipe['failed']:,} + {pipe['missing']:,}",
             "missing 0", _verdict(pipe["missing"] == 0 and pipe["unclaimed"] == 0)),
            ("pipeline", "duplicates at the stand-in", f"{pipe['duplicates']:,}", "0",
             _verdict(pipe["duplicates"] == 0)),
            ("pipeline", "latency claim -> sent p50 / p99",
             f"{_n(pipe['latency_p50_ms'], 1)} / {_n(pipe['latency_p99_ms'], 1)} ms", "", ""),
            ("pipeline", "claim rate (producer) / wall time",
             f"{_n(pipe['claim_rate_per_s'])}/s / {pipe['wall_s']:.1f} s", "", ""),
        ]  # fmt: skip
    if api:
        n = r["config"]["clients"]
        for key, label in (("first", "first page"), ("deep_cursor", "deep cursor page")):
            res = api[key]
            ok = res["errors"] == 0 and res["p99_ms"] is not None
            rows.append(("api", f"{label}, {n} clients, req/s", _n(res["rps"]), f">= {BAR_LIST_RPS:,.0f}",
                         _verdict(ok and res["rps"] >= BAR_LIST_RPS)))  # fmt: skip
            rows.append(("api", f"{label} p50 / p99", f"{_n(res['p50_ms'], 2)} / {_n(res['p99_ms'], 2)} ms",
                         f"p99 < {BAR_LIST_P99_MS:g}", _verdict(ok and res["p99_ms"] < BAR_LIST_P99_MS)))  # fmt: skip
            if res["errors"]:
                rows.append(("api", f"{label} errors/timeouts", _n(res["errors"]), "0", "FAIL"))
        off = api["deep_offset"]
        ok = off["errors"] == 0 and off["p99_ms"] is not None
        rows.append(("api", "offset=rows/2, 1 client, p50 / p99", f"{_n(off['p50_ms'], 1)} / {_n(off['p99_ms'], 1)} ms",
                     f"p99 < {BAR_OFFSET_P99_MS:g}", _verdict(ok and off["p99_ms"] < BAR_OFFSET_P99_MS)))  # fmt: skip
        rows.append(("api", "page contents (first, offset, cursor)", "as loaded" if api["pages_ok"] else "WRONG ROWS",
                     "exact", _verdict(bool(api["pages_ok"]))))  # fmt: skip
        rows.append(("api", "X-Total-Count of the first page", f"{api['total_count']}", f"= {r['config']['rows']:,}",
                     _verdict(bool(api["total_count_ok"]))))  # fmt: skip
        if api.get("create"):
            res = api["create"]
            ok = res["errors"] == 0 and res["p99_ms"] is not None
            rows.append(
                (
                    "api",
                    f"POST /messages, {n} clients, req/s; p50 / p99",
                    f"{_n(res['rps'])}; {_n(res['p50_ms'], 2)} / {_n(res['p99_ms'], 2)} ms",
                    f">= {BAR_CREATE_RPS:,.0f}, p99 < {BAR_LIST_P99_MS:g}",
                    _verdict(ok and res["rps"] >= BAR_CREATE_RPS and res["p99_ms"] < BAR_LIST_P99_MS),
                )
            )
    batch = (api or {}).get("batch")
    if batch:
        rate = batch["msgs_per_s"]
        ok = batch["errors"] == 0 and batch["created"] == batch["batches"] * 1000 and rate is not None
        rows.append(("api", f"POST /messages/batch of 1,000, {batch['clients']} clients", f"{_n(rate)} msg/s",
                     f">= {BAR_BATCH_MSGS_PER_S:,.0f}", _verdict(ok and rate >= BAR_BATCH_MSGS_PER_S)))  # fmt: skip
        rows.append(("api", "one batch p50 / p99", f"{_n(batch['p50_ms'], 1)} / {_n(batch['p99_ms'], 1)} ms", "", ""))
    idle, load = r.get("rss_idle", {}), r.get("rss_load", {})
    for name in sorted(set(idle) | set(load)):
        bar = "" if name == "standin" else f"idle < {BAR_IDLE_RSS_MB:g}"
        ok = None if name == "standin" or idle.get(name) is None else idle[name] < BAR_IDLE_RSS_MB
        rows.append(("memory", f"{name} RSS idle / load", f"{_n(idle.get(name), 1)} / {_n(load.get(name), 1)} MB",
                     bar, _verdict(ok)))  # fmt: skip
    rows += steady_rows(r.get("steady") or {})
    rows += growth_rows(r.get("growth") or {})
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if pipe and pipe["claim_rate_per_s"] and thr_of(pipe) and pipe["claim_rate_per_s"] > 1.1 * thr_of(pipe):
        lines.append(
            "note: the producer claimed faster than the consumers delivered, so claim -> sent latency is mostly"
            " queue wait; a BENCH_BATCH/BENCH_INTERVAL near the throughput shows the latency without a backlog"
        )
    if void:
        lines.append(f"PIPELINE RUN VOID: {'; '.join(s['void_reasons'])}")
    if pipe and pipe.get("cpu_percent"):
        cpu = dict(pipe["cpu_percent"])
        whole = cpu.pop("machine", None)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
        lines.append(f"CPU during the drain, % of one core (machine total {_n(whole)}): {parts}")
        thr = pipe.get("throughput_msgs_per_s")
        if whole and thr:  # CPU time per message: steadier than the rate when the machine's speed moves
            per = {k: 1e4 * v / thr for k, v in cpu.items()}
            parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
            lines.append(f"CPU per message, µs (machine {1e4 * whole / thr:.0f}): {parts}")
    for name, top in sorted((pipe or {}).get("profile", {}).items()):
        leaders = [f"{own:.1f}% {func}" for func, _, own in sorted(top, key=lambda t: -t[2])[:6]]
        lines.append(f"profile {name}, most self time: " + "; ".join(leaders))
    for key in ("first", "deep_cursor", "deep_offset"):
        cpu = ((api or {}).get(key) or {}).get("cpu_percent")
        if cpu:
            lines.append(f"CPU during {key}, % of one core: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    lines += growth_lines(r.get("growth") or {})
    for phase, error in r.get("errors", {}).items():
        lines.append(f"ERROR in {phase}: {error}")
    return "\n".join(lines)


def _rows_label(rows: str) -> str:
    return f"{int(rows) / 1e6:g}M"


def growth_rows(growth: dict[str, Any]) -> list[Row]:
    """Table rows: each operation's p99 at every size, the ratio of the largest to the smallest, the bar."""
    ops = growth.get("ops") or {}
    sizes = sorted(ops, key=int)
    if not sizes:
        return []
    small, large = sizes[0], sizes[-1]
    rows = []
    for op in GROWTH_OPERATIONS:
        values = " / ".join(f"{ops[n][op]['p99_ms']:.2f}" for n in sizes)
        ratio = ops[large][op]["p99_ms"] / max(ops[small][op]["p99_ms"], 0.001)
        ok = ratio <= BAR_GROWTH_RATIO and (op != "stats" or ops[large][op]["p99_ms"] < BAR_GROWTH_STATS_P99_MS)
        bar = f"<= {BAR_GROWTH_RATIO:g}x" + (f", < {BAR_GROWTH_STATS_P99_MS:g} ms" if op == "stats" else "")
        label = f"{op} p99 ms at {' / '.join(_rows_label(n) for n in sizes)} rows"
        rows.append(("growth", label, f"{values} ({ratio:.2f}x)", bar, _verdict(ok)))
    return rows


def growth_lines(growth: dict[str, Any]) -> list[str]:
    """The growth phase in detail: the server, each size's load, and every operation's spread at every size."""
    ops = growth.get("ops") or {}
    if not ops:
        return []
    sizes = sorted(ops, key=int)
    v = growth.get("mysql") or {}
    mb = 2**20
    server = (
        f"growth on {'a private' if growth['server'] == 'private' else 'the shared'} MariaDB {v.get('version', '?')}"
        f" (buffer pool {int(v.get('innodb_buffer_pool_size', 0)) // mb:,} MB, redo log"
        f" {int(v.get('innodb_log_file_size', 0)) // mb:,} MB, flush {v.get('innodb_flush_method', '?')}, io capacity"
        f" {v.get('innodb_io_capacity', '?')}, binlog {v.get('log_bin', '?')}),"
        + (" sizes interleaved" if growth["server"] == "private" else " one size after the other")
    )
    lines = [server]
    reads = growth.get("buffer_pool") or {}
    together = growth["server"] == "private"  # the sizes were read in turn: one count for all of them
    for n in sizes:
        size = (growth.get("sizes") or {}).get(n, {})
        line = (
            f"  {_rows_label(n)} rows: loaded in {size.get('load_s', 0):.0f} s, {size.get('data_mb', 0):,.0f} MB of"
            f" rows + {size.get('index_mb', 0):,.0f} MB of indexes"
        )
        if not together and n in reads:
            line += "; " + _pool_reads(reads[n], "its timed reads (server-wide)")
        lines.append(line)
    if together and reads:
        lines.append("  " + _pool_reads(next(iter(reads.values())), "the timed reads of every size"))
    header = (
        "operation",
        "rows",
        "n",
        "p50",
        "p90",
        "p99",
        "max",
        "p99 of each round",
        "pages/run",
        "handler reads/run",
    )
    table: list[tuple[str, ...]] = [header]
    for op in GROWTH_OPERATIONS:
        for n in sizes:
            o = ops[n][op]
            spread = o.get("round_p99_ms") or [0.0]
            work = (f"{o['pages']:,.0f}", f"{sum(o['handler_reads'].values()):,.0f}") if "pages" in o else ("", "")
            table.append((op if n == sizes[0] else "", _rows_label(n), f"{o['n']:,}",
                          *(f"{o[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
                          f"{min(spread):.2f}-{max(spread):.2f} ({len(spread)})", *work))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = (c.ljust(w) if i in (0, 1, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  " + "  ".join(cells).rstrip())
    lines.append(
        "  (ms; p99 of each round: the lowest and highest of the rounds' p99s; pages requested from the buffer pool"
        " and Handler_read_* rows: the server's counters over 20 more runs, per run)"
    )
    return lines


def _pool_reads(reads: dict[str, int], during: str) -> str:
    requests, disk = reads.get("page_requests", 0), reads.get("disk_reads", 0)
    hits = 100 * (1 - disk / requests) if requests else 0.0
    return f"buffer pool during {during}: {disk:,} pages read from disk of {requests:,} requested ({hits:.3f}% hits)"


def steady_rows(st: dict[str, Any]) -> list[Row]:
    if not st:
        return []
    clean = not st["missing"] and not st["duplicates"] and not st.get("duplicates_run")
    dupes = f"{st['duplicates']}" + (f" (the whole run: {st['duplicates_run']})" if st.get("duplicates_run") else "")
    ended = len(st["steps"]) < st.get("steps_planned", 0)
    return [
        ("steady", f"offered / achieved, {st['interval']:g} s x {st['batch']}",
         f"{_n(st['rate_offered'])} / {_n(st['rate_achieved'])} msg/s", "", ""),
        ("steady", "claim -> sent p50 / p95 / p99 / max",
         " / ".join(_n(st[f"claim_{k}"], 1) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")) + " ms",
         f"p99 < {BAR_STEADY_CLAIM_P99_MS:g} ms", _verdict((st["claim_p99_ms"] or 1e9) < BAR_STEADY_CLAIM_P99_MS)),
        ("steady", "due -> sent p50 / p95 / p99 / max",
         " / ".join(_n(st[f"due_{k}"], 1) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")) + " ms",
         f"p99 < {BAR_STEADY_DUE_P99_MS:g} ms", _verdict((st["due_p99_ms"] or 1e9) < BAR_STEADY_DUE_P99_MS)),
        ("steady", "missing; duplicates", f"{st['missing']}; {dupes}", "0 / 0", _verdict(clean)),
        ("steady", "step windows, due -> sent p99 (msg/s: ms)",
         ", ".join(f"{_n(s['rate'])}: {_n(s['due_p99_ms'], 0)}" + ("" if s["ok"] else " x") for s in st["steps"])
         + ("; then a backlog ended the search" if ended else ""),
         "", ""),
        ("steady", "highest rate with due -> sent p99 < 250 ms", _max_rate(st), "", ""),
    ]  # fmt: skip


def _max_rate(st: dict[str, Any]) -> str:
    """The step search's answer; ">=" when every step passed (the search stopped at its last step)."""
    best = st.get("max_rate_p99_250ms")
    if best is None:
        return "-"
    return (">= " if st.get("max_rate_capped") else "") + f"{_n(best)} msg/s"
