"""``BENCH_PROFILE=1``: where the drain's time goes, sampled from the running services.

py-spy (a sampling profiler from outside the process: nothing in the services changes, and ``--nonblocking``
never pauses them) records each consumer and the producer for the whole drain. Each profile is written as
collapsed stacks (``<name>.folded``: one line per stack, the format flamegraph.pl, inferno and speedscope.app
open as a flame graph) and as a ranking of the functions by the share of samples they appear in
(``<name>.top.txt``: inclusive, then self), all under ``bench/results/<run>/profile/``.

Sampling costs CPU on the machine being measured, so a profiled drain is slower than an unprofiled one: its
throughput is not a figure to compare with other runs, only its shares are.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 100  # samples per second per process
TOP = 25


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


class Profiler:
    """py-spy attached to each of ``pids`` (``{name: pid}``) from :meth:`start` to :meth:`stop`."""

    def __init__(self, out_dir: Path, pids: dict[str, int]) -> None:
        self.out_dir = out_dir
        self.pids = pids
        self.recorders: dict[str, subprocess.Popen[bytes]] = {}
        self.tool = _py_spy()

    def start(self) -> str | None:
        """Attach; None when py-spy is not installed (the reason, to print, otherwise)."""
        if self.tool is None:
            return "py-spy is not installed (pip install py-spy): no profile taken"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            argv = [self.tool, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking", "--format", "raw"]
            argv += ["--output", str(self.out_dir / f"{name}.folded")]
            log = (self.out_dir / f"{name}.py-spy.log").open("wb")
            self.recorders[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        return None

    def stop(self, timeout: float = 20.0) -> dict[str, list[tuple[str, float, float]]]:
        """Stop every recorder (SIGINT: py-spy writes its file and exits; by pid) and rank each profile."""
        for recorder in self.recorders.values():
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)
        tops: dict[str, list[tuple[str, float, float]]] = {}
        for name, recorder in self.recorders.items():
            try:
                recorder.wait(timeout)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(5)
            folded = self.out_dir / f"{name}.folded"
            if folded.exists():
                tops[name] = top_functions(folded.read_text().splitlines())
                (self.out_dir / f"{name}.top.txt").write_text(render(name, tops[name]))
        return tops


def top_functions(lines: list[str], top: int = TOP) -> list[tuple[str, float, float]]:
    """``(function, inclusive %, self %)`` of the ``top`` functions by inclusive share, from collapsed stacks
    (``frame;frame;... count``). A function that recurses counts once per stack."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isascii() or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        for function in {_short(frame) for frame in frames}:
            inclusive[function] += n
        own[_short(frames[-1])] += n
    if not total:
        return []
    return [(f, 100 * n / total, 100 * own[f] / total) for f, n in inclusive.most_common(top)]


def _short(frame: str) -> str:
    """``function (path/to/module.py:123)`` -> ``function (module.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(path).name})" if path else name


def render(name: str, rows: list[tuple[str, float, float]]) -> str:
    lines = [f"{name}: functions by share of samples (inclusive, self)", ""]
    lines += [f"{inc:6.1f}%  {own:6.1f}%  {func}" for func, inc, own in rows]
    return "\n".join(lines) + "\n"
