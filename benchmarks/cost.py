"""What federation, privacy and secure aggregation cost, each as a ratio measured in one run.

    python -m benchmarks.cost --out DIR            # chest X-ray 5 sites x 5 rounds, minutes
    python -m benchmarks.cost --out DIR --full     # the same, each side twice (in mirrored order)
    python -m benchmarks.cost --out DIR --tiny     # breast cancer, seconds: the CI smoke test

Three ratios (goals from issue 11), written to ``cost.json`` and ``cost.md``:

1. **FL simulation / centralized training**, same data, model and epochs (goal <= 1.3). Each
   side runs as its own command, as a user runs it, with its whole process tree measured
   (``benchmarks.proctree``: wall seconds, CPU seconds, peak memory):
   ``python -m fl_app ...`` (Flower's simulation engine on Ray: one simulated SuperNode per
   site), ``python -m fl_app.centralized ...`` (the centralized twin) and, to separate Ray's
   share, the same experiment on the in-process federation of ``benchmarks.common`` (no Ray).
   The sides take turns (full: federated, centralized, in-process, in-process, centralized,
   federated) so the machine's load falls on all alike; each side runs with torch on one
   thread, as Ray gives each ClientApp actor (``OMP_NUM_THREADS=1``). The wall-time ratio
   depends on how loaded the shared machine is; the CPU-seconds ratio much less. The
   federated run's phases come from its log, stamped as the lines appear: start-up (Python
   imports, config), Ray start with the ClientApp actors' cold start and the query round
   (the first log line after them comes after the query), the train and evaluate exchanges
   of each round, the final evaluation at the operating threshold, results and shutdown.
2. **DP-SGD step / non-private step** per Opacus ``grad_sample_mode`` (goal <= 2.0), from
   ``benchmarks.dp_step`` (steps interleaved, correctness of each mode checked).
3. **Secure aggregation round / plain round** and bytes per hospital per round (goal <= 1.5),
   from ``benchmarks.secure_aggregation``: ``--tiny`` and ``--full`` run it (its own JSON and
   markdown go to ``DIR/secure_aggregation``); the default size reads its committed full-size
   results (``benchmarks/results/secure_aggregation.json``) instead of repeating a run of
   several minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import dp_step
from benchmarks import secure_aggregation as secagg
from benchmarks.common import (
    benchmark_parser,
    data_dir,
    machine,
    markdown_table,
    size_of,
    write_results,
)
from benchmarks.proctree import Measured, run_measured

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"fl_vs_centralized": 1.3, "dp_step": 2.0, "secagg_round": 1.5}
SETUPS = {
    # (experiment overrides, order of the sides)
    "tiny": ("task=breast_cancer partition.num_sites=2 num_rounds=1", "FCI"),
    "default": ("experiment=chest_xray_5sites num_rounds=5", "FCI"),
    "full": ("experiment=chest_xray_5sites num_rounds=5", "FCIICF"),
}
SIDES = {"F": "federated (Ray simulation)", "C": "centralized",
         "I": "federated (in-process, no Ray)"}
STARTUP = "Ray start, ClientApps' cold start (imports, data), query round"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def side_command(side: str, overrides: str, out: Path) -> list[str]:
    """The command that runs one side of the comparison."""
    args = [*overrides.split(), f"output_dir={out}"]
    if side == "F":
        return [sys.executable, "-m", "fl_app", *args, f"hydra.run.dir={out}"]
    if side == "C":
        return [sys.executable, "-m", "fl_app.centralized", *args]
    return [sys.executable, "-m", "benchmarks.cost", "--in-process", overrides,
            "--out", str(out)]


def phases(run: Measured, side: str) -> dict[str, float]:
    """Seconds per phase of one side, from its stamped log (see the module doc)."""
    if side == "C":
        started = run.first("fedclinic centralized:")
        epochs = run.all("[epoch block")
        if started is None or not epochs:
            return {}
        return {"start-up + data loading": started,
                "training + per-epoch evaluation": epochs[-1] - started,
                "results + exit": run.wall_s - epochs[-1]}
    experiment = run.first("fedclinic: task=")
    sites = run.first("  site ", after=experiment or 0.0)
    rounds = run.first("[ROUND 1/")
    end = run.first("fedclinic: run folder:")
    if None in (experiment, sites, rounds, end):
        return {}
    out: dict[str, float] = {}
    simulation = run.first("DEPRECATED FEATURE") if side == "F" else None
    if simulation is not None:  # run_simulation was called: imports and config are done
        out["start-up (imports, config)"] = simulation
        out[STARTUP] = experiment - simulation
    else:  # in-process: the experiment's first line follows its query round
        out["start-up (imports, config)"] = 0.0
        out[STARTUP] = experiment
    out["setup before round 1"] = rounds - sites
    train = _exchanges(run, "configure_train", "aggregate_train")
    evaluate = _exchanges(run, "configure_evaluate", "aggregate_evaluate")
    last = run.first("Strategy execution finished") or end
    out["train exchanges"] = train
    out["evaluate exchanges"] = evaluate
    out["between exchanges (aggregation, logging)"] = last - rounds - train - evaluate
    out["final evaluation at the threshold, results"] = end - last
    out["shutdown"] = run.wall_s - end
    return out


def _exchanges(run: Measured, begin: str, finish: str) -> float:
    starts, ends = run.all(begin), run.all(finish)
    return sum(e - s for s, e in zip(starts, ends, strict=False))


def fl_vs_centralized(size: str, out: Path) -> dict[str, Any]:
    """Run the sides in turn; their times, memory and the federated phases."""
    overrides, order = SETUPS[size]
    if "chest_xray" in overrides:
        overrides += f" task.data_dir={data_dir('chest_xray')}"
    runs: list[dict[str, Any]] = []
    for i, side in enumerate(order):
        folder = out / "runs" / f"{i}_{side}"
        loads = machine()["load_average"]
        run = run_measured(side_command(side, overrides, folder), folder / "log.txt",
                           env=ONE_THREAD)
        if run.returncode != 0:
            raise SystemExit(f"benchmark: side '{SIDES[side]}' failed (exit {run.returncode});"
                             f" see {folder / 'log.txt'}")
        runs.append({"side": side, "label": SIDES[side], "load_average_before": loads,
                     **run.summary(), "phases": phases(run, side)})
        print(f"cost: {SIDES[side]}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU",
              flush=True)
    means: dict[str, dict[str, Any]] = {}
    for side in dict.fromkeys(order):
        mine = [r for r in runs if r["side"] == side]
        means[side] = {
            "label": SIDES[side],
            "wall_s": statistics.fmean(r["wall_s"] for r in mine),
            "cpu_s": statistics.fmean(r["cpu_s"] for r in mine),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in mine),
            "phases": {k: statistics.fmean(r["phases"].get(k, 0.0) for r in mine)
                       for k in dict.fromkeys(k for r in mine for k in r["phases"])},
        }
    central = means["C"]
    ratios = {side: {"wall": m["wall_s"] / central["wall_s"], "cpu": m["cpu_s"] / central["cpu_s"]}
              for side, m in means.items() if side != "C"}
    return {"overrides": overrides, "order": order, "runs": runs, "sides": means,
            "ratios": ratios, "goal": GOALS["fl_vs_centralized"]}


def secagg_rows(size: str, out: Path) -> dict[str, Any]:
    """Run the secure-aggregation benchmark; its rounds and bytes as ratios to plain."""
    folder = out / "secure_aggregation"
    committed = RESULTS / "secure_aggregation.json"
    if size == "default" and committed.is_file():
        folder = committed.parent
    else:
        secagg.main(["--out", str(folder), *(["--tiny"] if size == "tiny" else [])])
    result = json.loads((folder / "secure_aggregation.json").read_text())
    rows = result["results"]
    plain = {r["hospitals"]: r for r in rows if r["option"] == "none" and r["status"] == "ok"}
    for r in rows:
        base = plain.get(r["hospitals"])
        if r["status"] == "ok" and base:
            r["round_ratio"] = r["round_s"] / base["round_s"]
            r["upload_ratio"] = r["upload_bytes"] / base["upload_bytes"]
    return {"setup": result["setup"], "rows": rows, "goal": GOALS["secagg_round"],
            "source": str(folder / "secure_aggregation.json")}


def markdown(result: dict[str, Any]) -> str:
    """The three tables and the federated run's phases."""
    m = result["machine"]
    text = [f"# Cost ratios (python -m benchmarks.cost{result['flag']})", "",
            f"Measured {m['date']} on {m['cpus']} CPU cores, load average "
            f"{m['load_average']} at the start and {result['load_average_after']} at the end "
            "(1, 5, 15 min; a shared machine).", ""]
    if "fl_vs_centralized" in result:
        text += _fl_markdown(result["fl_vs_centralized"])
        text += _when(result["fl_vs_centralized"])
    if "dp_step" in result:
        text += ["", f"## DP-SGD step / non-private step (goal <= {GOALS['dp_step']})", "",
                 dp_step.table(result["dp_step"]["rows"])]
        text += _when(result["dp_step"])
    if "secure_aggregation" in result:
        text += _secagg_markdown(result["secure_aggregation"])
        text += _when(result["secure_aggregation"])
    return "\n".join(text)


def _when(part: dict[str, Any]) -> list[str]:
    measured = part.get("measured")
    if not measured:
        return []
    return [f"Measured {measured['date']}, load average {measured['load_average']} at its "
            "start.", ""]


def _fl_markdown(fl: dict[str, Any]) -> list[str]:
    text = [f"## FL simulation / centralized (goal <= {fl['goal']})", "",
            f"`{fl['overrides']}`; sides in the order {fl['order']} "
            "(F federated on Ray, C centralized, I federated in-process), torch on 1 thread.",
            ""]
    central = fl["sides"]["C"]
    text.append(markdown_table(
        ["side", "wall (s)", "x centralized", "CPU (s)", "x centralized", "peak memory (GiB)"],
        [[s["label"], f"{s['wall_s']:.1f}",
          f"{s['wall_s'] / central['wall_s']:.2f}", f"{s['cpu_s']:.1f}",
          f"{s['cpu_s'] / central['cpu_s']:.2f}", f"{s['peak_rss_bytes'] / 2**30:.2f}"]
         for s in fl["sides"].values()]))
    text += ["", "Where the time goes (seconds, wall):", ""]
    names = list(dict.fromkeys(k for s in fl["sides"].values() for k in s["phases"]))
    text.append(markdown_table(["phase", *[s["label"] for s in fl["sides"].values()]],
                               [[n, *[f"{s['phases'][n]:.1f}" if n in s["phases"] else ""
                                      for s in fl["sides"].values()]] for n in names]))
    return text


def _secagg_markdown(sa: dict[str, Any]) -> list[str]:
    text = ["", f"## Secure aggregation round / plain round (goal <= {sa['goal']})", "",
             f"From benchmarks.secure_aggregation, setup {sa['setup']}.", ""]
    text.append(markdown_table(
        ["option", "hospitals", "round (s)", "x plain", "upload / hospital / round (MB)",
         "x plain", "download / hospital / round (MB)"],
        [[r["option"], r["hospitals"], f"{r['round_s']:.3f}", f"{r['round_ratio']:.2f}",
          f"{r['upload_bytes'] / 1e6:.3f}", f"{r['upload_ratio']:.2f}",
          f"{r['download_bytes'] / 1e6:.3f}"] if "round_ratio" in r
         else [r["option"], r["hospitals"], r["status"], "", "", "", ""]
         for r in sa["rows"]]))
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements; write ``cost.json`` and ``cost.md`` in ``--out``."""
    parser = benchmark_parser(__doc__, "5 rounds, each side twice", "breast cancer, seconds")
    parser.add_argument("--parts", default="fl,dp,secagg",
                        help="comma-separated parts to run (default: all)")
    # internal: one side of the comparison, the experiment on the in-process federation
    parser.add_argument("--in-process", metavar="OVERRIDES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process is not None:
        from benchmarks.common import run_federated

        run_federated(args.in_process, args.out)
        return 0
    size = size_of(args)
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"machine": machine(), "size": size,
                              "flag": {"full": " --full", "tiny": " --tiny"}.get(size, "")}
    steps = {"fl": ("fl_vs_centralized", lambda: fl_vs_centralized(size, args.out)),
             "dp": ("dp_step", lambda: dp_step.run(size == "tiny", size == "full")),
             "secagg": ("secure_aggregation", lambda: secagg_rows(size, args.out))}
    dp_step.limit_threads(1)
    for part in ("fl", "dp", "secagg"):
        if part in parts:
            key, measure = steps[part]
            started = machine()
            result[key] = {**measure(), "measured": {"date": started["date"],
                                                     "load_average": started["load_average"]}}
            # written after each part: a later part's failure keeps the earlier numbers
            result["load_average_after"] = machine()["load_average"]
            write_results(args.out, "cost", result, markdown(result))
    text = markdown(result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
