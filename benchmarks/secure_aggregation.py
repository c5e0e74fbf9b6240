"""Per-round time and bytes per hospital: plain FedAvg vs SecAgg+ vs CKKS.

    python -m benchmarks.secure_aggregation --out DIR           # 5 and 10 hospitals, ~1M params
    python -m benchmarks.secure_aggregation --out DIR --tiny    # seconds: a smoke test

Each configuration runs the real experiment (``fl_app.experiment.run_experiment``: breast
cancer, the real ClientApp with its mods, real training, real cryptography) on an in-process
federation (``benchmarks.local_grid.LocalGrid``: every message serialised as on the wire).
The model is the breast-cancer MLP with ``task.hidden_size=30303`` (1,000,001 parameters).

Every option runs with ``evaluate_in_train=false`` (train and evaluate messages, as secure
aggregation needs), so rounds compare like for like. Per round (mean over the rounds after
the first, which includes start-up work):
- ``round_s``: the round's wall time with the hospitals' work done in parallel, i.e. the
  measured server time plus, for each message exchange, the slowest hospital (in-process the
  hospitals answer one after another; that sequential wall time is ``round_s_sequential``).
  Network latency is not included: SecAgg+ adds three message exchanges per round (in
  deployment each also starts a ClientApp process at every hospital, a few seconds each).
- ``upload_bytes`` / ``download_bytes``: serialised message bytes one hospital sends to / gets
  from the server per round (all stages, training and evaluation included).
Writes ``secure_aggregation.json`` and ``secure_aggregation.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.local_grid import LocalGrid, set_server_identity
from fl_app.client_app import app as client_app
from fl_app.config import compose_config
from fl_app.experiment import run_experiment
from strategies.secure_aggregation import SecureAggregationConfigError, option

# (row label, secagg option, extra overrides); SecAgg+ proper (each hospital shares its keys
# with 5 of the 10, itself included) only where there are more hospitals than that
OPTIONS = (
    ("none", "none", ""),
    ("secaggplus", "secaggplus", ""),
    ("secaggplus, num_shares=5", "secaggplus", "secagg.num_shares=5"),
    ("ckks", "ckks", ""),
)
FULL = {"hospitals": (5, 10), "rounds": 3, "model": "task.model=mlp task.hidden_size=30303"}
TINY = {"hospitals": (3,), "rounds": 2, "model": "task.model=logreg"}


def built(name: str) -> bool:
    """Whether the option exists on this checkout (its yaml and its module)."""
    if name == "none":
        return True
    if not (Path(__file__).resolve().parents[1] / "conf" / "secagg" / f"{name}.yaml").is_file():
        return False
    try:
        option(name)
    except SecureAggregationConfigError:
        return False
    return True


def measure(label: str, name: str, extra: str, hospitals: int, rounds: int, model: str,
            out: Path) -> dict[str, Any]:
    """Run one configuration; return its per-round numbers."""
    row: dict[str, Any] = {"option": label, "hospitals": hospitals}
    if not built(name):
        return {**row, "status": "not built yet"}
    cfg = compose_config(
        f"secagg={name} {extra} partition.num_sites={hospitals} num_rounds={rounds} {model} "
        f"task.local_epochs=1 min_sites={hospitals} evaluate_in_train=false "
        f"output_dir={out / 'runs'}"
    )
    set_server_identity()
    grid = LocalGrid(hospitals, client_app)
    started = time.perf_counter()
    run_experiment(grid, cfg)
    row["total_s"] = time.perf_counter() - started
    # rounds end with their evaluation exchange
    ends = [i for i, c in enumerate(grid.calls) if c.kind == "evaluate"]
    per_round = []
    for r in range(1, len(ends)):  # round 1 (index 0) includes start-up work
        first, last = ends[r - 1] + 1, ends[r]
        calls = grid.calls[first:last + 1]
        wall = calls[-1].ended - grid.calls[first - 1].ended
        parallel = wall - sum(c.node_s for c in calls) + sum(c.slowest_node_s for c in calls)
        ex = [e for e in grid.exchanges if first <= e.call <= last]
        per_round.append({
            "round_s": parallel, "round_s_sequential": wall,
            "upload_bytes": sum(e.received for e in ex) / hospitals,
            "download_bytes": sum(e.sent for e in ex) / hospitals,
            "messages": len(ex) / hospitals,
        })
    for key in per_round[0]:
        row[key] = statistics.fmean(x[key] for x in per_round)
    row["status"] = "ok"
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table (ratios against plain FedAvg with the same number of hospitals)."""
    plain = {r["hospitals"]: r for r in rows if r["option"] == "none" and r["status"] == "ok"}
    lines = [
        "| option | hospitals | round (s) | x plain | upload / hospital (MB) | x plain | "
        "download / hospital (MB) | messages / hospital |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['option']} | {r['hospitals']} | {r['status']} | | | | | |")
            continue
        base = plain.get(r["hospitals"])
        ratio_t = f"{r['round_s'] / base['round_s']:.2f}" if base else "n/a"
        ratio_b = f"{r['upload_bytes'] / base['upload_bytes']:.2f}" if base else "n/a"
        lines.append(
            f"| {r['option']} | {r['hospitals']} | {r['round_s']:.3f} | {ratio_t} | "
            f"{r['upload_bytes'] / 1e6:.3f} | {ratio_b} | {r['download_bytes'] / 1e6:.3f} | "
            f"{r['messages']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--tiny", action="store_true", help="3 hospitals, logistic regression")
    parser.add_argument("--options", default=",".join(sorted({o[1] for o in OPTIONS})),
                        help="comma-separated secagg options to run (default: all)")
    args = parser.parse_args(argv)
    chosen = set(args.options.split(","))
    setup = TINY if args.tiny else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(label, name, extra, n, int(setup["rounds"]), str(setup["model"]), args.out)
            for n in setup["hospitals"] for label, name, extra in OPTIONS
            if name in chosen and ("num_shares=5" not in extra or n > 5)]
    result = {"setup": {k: list(v) if isinstance(v, tuple) else v for k, v in setup.items()},
              "results": rows}
    (args.out / "secure_aggregation.json").write_text(json.dumps(result, indent=2))
    text = table(rows)
    (args.out / "secure_aggregation.md").write_text(
        "# Secure aggregation: per-round cost (python -m benchmarks.secure_aggregation)\n\n"
        + text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
