"""Benchmark: how long a round takes in a real deployment (SuperLink + 4 hospital SuperNodes).

Builds the consortium of ``tests/deploy_harness.py`` on 127.0.0.1 (CA, TLS SuperLink with
SuperNode authentication, the four UCI heart-disease hospitals registered and started with
``scripts/deploy``), submits one heart-disease run with ``scripts/deploy/submit.py --stream``
and times, from the processes' own log lines (stamped as they appear):

- the seconds from submission to the start of round 1, and per round (from Flower's
  ``[ROUND r/N]`` line to the next one; the last round ends at ``Strategy execution
  finished``), the same for any version of the app;
- per message, at each SuperNode: from ``Receiving: <type> message`` to ``Sent successfully``
  (SuperExec's poll, the ``flwr-clientapp`` process start, the handler, the reply);
- the import time of the ClientApp module (``python -X importtime -c "import
  fl_app.client_app"`` and the wall time of that command).

``--app`` points the run at another checkout of the app (e.g. ``git archive <commit>``
unpacked), so "before" and "after" a change are measured the same way; each ``--label`` is
kept in ``DIR/deployment.json`` and ``DIR/deployment.md``.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.deployment --out outputs/bench_deploy
    git archive 4755dd6 | tar -x -C /tmp/before
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.deployment --out outputs/bench_deploy \\
        --app /tmp/before --label before
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.deployment --out outputs/bench_deploy \\
        --label evaluate-in-train --overrides evaluate_in_train=true

Not a test: the numbers depend on the machine and its load (both are recorded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_app.run_folder import atomic_write_text
from tests.conftest import data_root
from tests.deploy_harness import (
    HEART_FILES,
    REPO,
    Federation,
    ProcessRunner,
    deploy_env,
    run_folder,
)

ROUND_START = re.compile(r"\[ROUND (\d+)/(\d+)\]")
STRATEGY_END = "Strategy execution finished"
RECEIVING = re.compile(r"Receiving: (\w+) message")


@dataclass
class LogClock:
    """Stamps each new line of some log files with the time it appeared (polled every 50 ms)."""

    files: dict[str, Path]
    lines: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._offsets = dict.fromkeys(self.files, 0)
        self._partial = dict.fromkeys(self.files, "")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        now = time.monotonic()
        for name, path in self.files.items():
            try:
                with path.open("rb") as handle:
                    handle.seek(self._offsets[name])
                    chunk = handle.read()
            except OSError:
                continue
            self._offsets[name] += len(chunk)
            text = self._partial[name] + chunk.decode(errors="replace")
            *complete, self._partial[name] = text.split("\n")
            self.lines.extend((now, name, line) for line in complete)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop polling (after one last read)."""
        self._stop.set()
        self._thread.join(timeout=2)
        self._poll()

    def first(self, name: str, pattern: str) -> float | None:
        """Time of the first line of ``name`` containing ``pattern``."""
        return next((t for t, n, line in self.lines if n == name and pattern in line), None)


def import_time(app: Path, repeats: int = 3) -> dict[str, Any]:
    """Import time of ``fl_app.client_app`` from ``app``: wall and CPU seconds of
    ``python -c "import fl_app.client_app"`` (CPU time barely depends on the machine's load),
    and the -X importtime total."""
    env = {**os.environ, "PYTHONPATH": str(app)}
    walls, cpus = [], []
    for _ in range(repeats):
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", "import fl_app.client_app"], env=env,
                                cwd=app)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, f"import failed in {app}"
        walls.append(time.monotonic() - start)
        cpus.append(usage.ru_utime + usage.ru_stime)
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import fl_app.client_app"],
                          env=env, check=True, cwd=app, capture_output=True, text=True)
    cumulative_us: dict[str, int] = {}
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].strip()
            cumulative_us.setdefault(name, int(parts[1]))
    heavy = ("torch", "opacus", "monai", "sklearn", "scipy", "matplotlib", "hydra", "tenseal")
    return {
        "wall_s_median": round(statistics.median(walls), 3),
        "wall_s": [round(w, 3) for w in walls],
        "cpu_s_median": round(statistics.median(cpus), 3),
        "importtime_s": round(cumulative_us.get("fl_app.client_app", 0) / 1e6, 3),
        "heavy_modules_imported": sorted(m for m in heavy if m in cumulative_us),
    }


def message_times(clock: LogClock, sites: list[str]) -> dict[str, list[float]]:
    """Per message type: seconds from ``Receiving`` to ``Sent successfully`` at a SuperNode."""
    out: dict[str, list[float]] = defaultdict(list)
    for site in sites:
        pending: tuple[float, str] | None = None
        for t, name, line in clock.lines:
            if name != site:
                continue
            if (match := RECEIVING.search(line)) is not None:
                pending = (t, match.group(1))
            elif "Sent successfully" in line and pending is not None:
                out[pending[1]].append(round(t - pending[0], 2))
                pending = None
    return dict(out)


def _stat(pid: int) -> tuple[int, list[str]] | None:
    """(parent pid, the /proc/<pid>/stat fields after the command name), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[1]), fields


def tree_cpu_s(root: int) -> float:
    """CPU seconds used by ``root`` and all its descendants so far, the exited ones included
    (a reaped child's time is in its parent's cutime/cstime; a zombie still has its own)."""
    stats = {int(e.name): st for e in Path("/proc").iterdir()
             if e.name.isdigit() and (st := _stat(int(e.name))) is not None}
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            fields = stats[pid][1]
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
            todo += children[pid]
    return total / os.sysconf("SC_CLK_TCK")


def run_benchmark(app: Path, rounds: int, data: Path, root: Path, extra: str = ""
                  ) -> dict[str, Any]:
    """One federation, one run; the timings."""
    sites = list(HEART_FILES)
    runner = ProcessRunner(root / "logs", deploy_env())
    fed = Federation(root=root, data_dir=data / "heart_disease", runner=runner)
    try:
        fed.make_pki(sites, unregistered=[])
        fed.start_superlink()
        fed.register(sites)
        for site in sites:
            fed.start_supernode(site, site)
        fed.wait_connected(sites)
        output_dir = root / "runs"
        overrides = (f"task=heart_disease num_rounds={rounds} min_sites=4 "
                     f"output_dir={output_dir} {extra}").strip()
        clock = LogClock({**{s: runner.logs[s] for s in sites},
                          "run": runner.log_dir / "run.log"})
        cpu_before = {s: tree_cpu_s(runner.procs[s].pid) for s in sites}
        started = time.monotonic()
        proc = fed.submit("run", overrides, app=app)
        rc = proc.wait(timeout=600 + 120 * rounds)
        ended = time.monotonic()
        clock.stop()
        cpu = {s: round(tree_cpu_s(runner.procs[s].pid) - cpu_before[s], 2) for s in sites}
        zombies = fed.zombies("flwr-clientapp")
    finally:
        fed.teardown()  # the centre via superlink.py --stop, the rest by PID
    starts = {int(m.group(1)): t for t, n, line in clock.lines
              if n == "run" and (m := ROUND_START.search(line))}
    first_round = starts.get(1)
    folder = run_folder(output_dir)
    summary = json.loads((folder / "summary.json").read_text()) if folder else {}
    marks = [*[starts.get(r) for r in range(1, rounds + 1)], clock.first("run", STRATEGY_END)]
    per_round = [round(b - a, 2) if a is not None and b is not None else None
                 for a, b in itertools.pairwise(marks)]
    messages = message_times(clock, sites)
    return {
        "rc": rc,
        "status": summary.get("status"),
        "mean_site_accuracy": summary.get("mean_site_accuracy"),
        "rounds": rounds,
        "total_s": round(ended - started, 2),
        "submit_to_first_round_s": round(first_round - started, 2) if first_round else None,
        "per_round_s": per_round,
        "mean_round_s": round(statistics.mean(r for r in per_round if r is not None), 2)
        if any(r is not None for r in per_round) else None,
        "per_message_s": {k: {"n": len(v), "median": round(statistics.median(v), 2),
                              "max": max(v)} for k, v in messages.items()},
        "messages_per_site": {k: len(v) / len(sites) for k, v in messages.items()},
        "zombie_clientapps_after_run": zombies,
        # CPU seconds of each hospital's SuperNode, SuperExec and ClientApps during the run:
        # what a round costs whatever else the machine is doing
        "hospital_cpu_s": cpu,
        "hospital_cpu_s_per_message": round(sum(cpu.values()) / max(1, sum(
            len(v) for v in messages.values())), 2),
    }


def machine() -> dict[str, Any]:
    """What the numbers depend on: cores, load, Python."""
    return {"cpus": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform()}


def to_markdown(results: dict[str, Any]) -> str:
    """The JSON as a table per label."""
    lines = ["# Deployment benchmark: 4 hospitals, heart disease, real processes on 127.0.0.1",
             "", "Seconds; per message = `Receiving` to `Sent successfully` at a SuperNode.", ""]
    for label, r in results.items():
        d, imp = r["deployment"], r["import"]
        lines += [f"## {label}", "", f"- app: `{r['app']}`, extra overrides "
                  f"`{r.get('overrides') or '-'}` (measured {r['when']}, load before "
                  f"{r['machine_before']['load_avg_1_5_15']}, after "
                  f"{r['machine_after']['load_avg_1_5_15']}, {r['machine_before']['cpus']} CPUs)",
                  f"- import fl_app.client_app: {imp['wall_s_median']} s wall, "
                  f"{imp.get('cpu_s_median')} s CPU (medians of {len(imp['wall_s'])}), "
                  f"-X importtime {imp['importtime_s']} s; heavy modules: "
                  f"{', '.join(imp['heavy_modules_imported']) or 'none'}",
                  f"- CPU seconds of the hospitals' processes during the run: "
                  f"{d.get('hospital_cpu_s')}, {d.get('hospital_cpu_s_per_message')} per message",
                  f"- run: exit {d['rc']}, status {d['status']}, mean site accuracy "
                  f"{d['mean_site_accuracy']}, total {d['total_s']} s, submission to the start of "
                  f"round 1 {d.get('submit_to_first_round_s')} s",
                  f"- zombie flwr-clientapp processes after the run: "
                  f"{d['zombie_clientapps_after_run']}", "",
                  "| round | seconds |", "|---|---|"]
        lines += [f"| {i} | {s} |" for i, s in enumerate(d["per_round_s"], 1)]
        lines += [f"| mean | {d['mean_round_s']} |", "",
                  "| message | count | per site | median s | max s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {d.get('messages_per_site', {}).get(k)} | {v['median']} | "
                  f"{v['max']} |" for k, v in d["per_message_s"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON + markdown")
    parser.add_argument("--app", type=Path, default=REPO, help="app folder (default: this repo)")
    parser.add_argument("--label", default="after", help="name of this measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overrides", default="",
                        help="more overrides for the run, e.g. evaluate_in_train=true (the "
                             "app at --app must know the keys)")
    args = parser.parse_args(argv)
    data = data_root()
    if not (data / "heart_disease").is_dir():
        raise SystemExit(f"error: heart-disease data not found under {data}")
    app = args.app.resolve()
    before = machine()
    result: dict[str, Any] = {"app": str(app), "overrides": args.overrides,
                              "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine_before": before, "import": import_time(app)}
    with tempfile.TemporaryDirectory(prefix="fedclinic-bench-") as tmp:
        result["deployment"] = run_benchmark(app, args.rounds, data, Path(tmp), args.overrides)
    result["machine_after"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deployment.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.label] = result
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out / "deployment.md", to_markdown(results))
    print(to_markdown({args.label: result}))


if __name__ == "__main__":
    main()
