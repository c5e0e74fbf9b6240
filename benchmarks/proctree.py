"""Run a command and measure its whole process tree: wall time, CPU seconds, peak memory.

A Flower simulation is many processes (the driver, Ray's GCS, raylet and helpers, one worker
per ClientApp actor), so ``ps`` of the driver alone says little. :func:`run_measured` starts
the command with its output in a log file and samples the tree (psutil) in a thread:

- ``peak_rss_bytes``: the highest SUM of resident memory over every live process of the tree
  at one sample (every 0.2 s); ``peak_processes``: how many there were then;
- ``cpu_s``: user + system CPU seconds of every process that was seen (each process's last
  sample; a process's final fraction of a sample interval can be missed), a measure of work
  that a loaded machine changes far less than wall time;
- each new output line is stamped as it appears (``benchmarks.deployment.LogClock``), so a
  benchmark can time the phases of a run from its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.deployment import LogClock

SAMPLE_S = 0.2


@dataclass
class TreeSampler:
    """Samples the process tree under ``pid`` until :meth:`stop`."""

    pid: int
    peak_rss_bytes: int = 0
    peak_processes: int = 0
    cpu_by_pid: dict[tuple[int, float], float] = field(default_factory=dict)
    samples: int = 0
    peak_breakdown: list[tuple[str, int]] = field(default_factory=list)  # (process, rss)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss, seen = 0, []
        for proc in procs:
            try:
                with proc.oneshot():
                    mem = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    key = (proc.pid, proc.create_time())  # pids can be reused
                    label = _label(proc.cmdline())
            except psutil.Error:
                continue
            rss += mem
            seen.append((label, mem))
            self.cpu_by_pid[key] = cpu.user + cpu.system
        self.samples += 1
        if rss > self.peak_rss_bytes:
            self.peak_rss_bytes, self.peak_processes = rss, len(seen)
            self.peak_breakdown = sorted(seen, key=lambda x: -x[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(SAMPLE_S)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) of every process seen."""
        return sum(self.cpu_by_pid.values())


def _label(cmdline: list[str]) -> str:
    """A short name of a process: Ray's title (``ray::ClientAppActor``), the Python module or
    script it runs, or its program."""
    if not cmdline:
        return "?"
    first = Path(cmdline[0]).name
    if first.startswith("ray::") or not first.startswith("python"):
        return first.split(".")[0] if first.startswith("ray::") else first
    for i, arg in enumerate(cmdline[1:], 1):
        if arg == "-m" and i + 1 < len(cmdline):
            return f"python -m {cmdline[i + 1]}"
        if arg.endswith(".py"):
            return f"python {Path(arg).name}"
    return first


@dataclass
class Measured:
    """What :func:`run_measured` saw: exit status, times, memory and the stamped log."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_processes: int
    lines: list[tuple[float, str]]  # (seconds since start, line)
    peak_breakdown: list[tuple[str, int]] = field(default_factory=list)

    def first(self, pattern: str, after: float = -1.0) -> float | None:
        """Seconds since start of the first line containing ``pattern`` (at or after ``after``)."""
        return next((t for t, line in self.lines if t >= after and pattern in line), None)

    def all(self, pattern: str) -> list[float]:
        """Seconds since start of every line containing ``pattern``."""
        return [t for t, line in self.lines if pattern in line]

    def summary(self) -> dict[str, Any]:
        """The numbers (no log lines), for the results JSON."""
        return {"returncode": self.returncode, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "peak_rss_bytes": self.peak_rss_bytes, "peak_processes": self.peak_processes,
                "peak_breakdown": [{"process": name, "rss_bytes": rss}
                                   for name, rss in self.peak_breakdown]}


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 3600) -> Measured:
    """Run ``cmd`` (output to ``log``), sampling its process tree; see the module doc.

    A command still running after ``timeout_s`` is killed with its whole tree (returncode
    -9); the tree's processes are always ended before returning (Ray can leave some).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
        clock = LogClock({"run": log})
        sampler = TreeSampler(proc.pid)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = -9
        wall = time.monotonic() - start
        sampler.stop()
        clock.stop()
        _end_tree(proc)
    lines = [(t - start, line) for t, _, line in clock.lines]
    return Measured(returncode, wall, sampler.cpu_s, sampler.peak_rss_bytes,
                    sampler.peak_processes, lines, sampler.peak_breakdown)


def _end_tree(proc: subprocess.Popen[bytes]) -> None:
    # the command ran in its own session (process group = its pid): end what is left of that
    # group (Ray daemons a failed run leaves behind), and nothing else
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()
