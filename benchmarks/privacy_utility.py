"""Privacy against utility: accuracy and AUC at epsilon 0.5, 1, 2, 4, 8 and infinity.

    python -m benchmarks.privacy_utility --out DIR            # default size: minutes
    python -m benchmarks.privacy_utility --out DIR --full     # more seeds and rounds
    python -m benchmarks.privacy_utility --out DIR --tiny     # seconds: the CI smoke test

For each task (heart disease on the four real hospitals; chest X-ray, PneumoniaMNIST 28x28 on
5 simulated hospitals, IID) and each epsilon, two federated runs (real experiment, in-process
federation: ``benchmarks.common.run_federated``) at delta 1e-5:

- **local DP** (``privacy=local_dp``: DP-SGD at every hospital, Opacus):
  ``privacy.target_epsilon=<eps>``, the noise calibrated by the product for the whole run;
- **central DP** (``privacy=central_dp``: server-side clipping, Gaussian noise on the
  average): central DP has no target-epsilon key, so ``privacy.noise_multiplier`` is
  calibrated here with the product's own accountant (``strategies.accounting.calibrate_noise``,
  RDP, sample rate 1, one release per round) so that ``num_rounds`` releases stay <= eps;
- epsilon = infinity: the same run without privacy (``privacy=none``), shared by both.

Each row also holds the epsilon the run's own privacy ledger reports (summary.json
``privacy``: the largest per-site epsilon for local DP, the central mechanism's for central
DP). Writes ``privacy_utility.json``, ``privacy_utility.md`` and ``privacy_utility.png``.
Exits 1 when any run failed (its row says why).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from benchmarks.common import (
    benchmark_parser,
    chosen_names,
    data_dir,
    earlier_results,
    fmt,
    limit_threads,
    machine,
    markdown_table,
    run_federated,
    size_of,
    write_results,
)
from benchmarks.quality import FLAMBY, row_of, seeds_of

NAME = "privacy_utility"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
DELTA = 1e-5
MECHANISMS = ("local_dp", "central_dp")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"epsilons": (1.0, math.inf),
             "heart_disease": {"seeds": (0,), "rounds": 2},
             "chest_xray": {"seeds": (0,), "rounds": 1,
                            "sites": 3, "extra": "task.cnn_widths=[8,16]"}},
    "default": {"epsilons": EPSILONS,
                # local DP's accounting costs ~1-2 s per site and round on this machine
                # (Opacus RDP in Python), so the default is one seed of 10 rounds
                "heart_disease": {"seeds": (0,), "rounds": 10},
                "chest_xray": {"seeds": (0,), "rounds": 2, "sites": 5, "extra": ""}},
    "full": {"epsilons": EPSILONS,
             "heart_disease": {"seeds": (0, 1, 2, 3, 4), "rounds": 20},
             "chest_xray": {"seeds": (0, 1, 2), "rounds": 5, "sites": 5, "extra": ""}},
}
TASKS = ("heart_disease", "chest_xray")

KEYS = {
    "heart_disease": {
        "accuracy": lambda s: s.get("mean_site_accuracy"),
        "auc": lambda s: s.get("mean_site_auc"),
        "epsilon_spent": lambda s: spent(s),
    },
    "chest_xray": {
        "accuracy": lambda s: s.get("pooled", {}).get("accuracy"),
        "auc": lambda s: s.get("pooled", {}).get("auc"),
        "epsilon_spent": lambda s: spent(s),
    },
}
METRIC_NAMES = {"heart_disease": ("mean per-hospital accuracy", "mean per-hospital AUC"),
                "chest_xray": ("pooled accuracy", "pooled AUC")}


def spent(summary: dict[str, Any]) -> float | None:
    """The epsilon the run's ledger reports: largest per-site (local DP) or central."""
    privacy = summary.get("privacy") or {}
    if not isinstance(privacy, dict) or privacy.get("mechanism", "none") == "none":
        return None
    if privacy.get("central"):
        return float(privacy["central"]["epsilon"])
    values = [float(v["epsilon"]) for v in (privacy.get("per_site") or {}).values()]
    return max(values) if values else None


def central_noise(epsilon: float, rounds: int) -> float:
    """The central-DP noise multiplier whose ``rounds`` releases stay <= ``epsilon``."""
    from strategies.accounting import calibrate_noise

    return calibrate_noise(epsilon, DELTA, 1.0, rounds, "rdp")


def base_overrides(task: str, setup: dict[str, Any]) -> str:
    """The task's experiment without privacy."""
    if task == "heart_disease":
        return (f"task=heart_disease partition=natural task.data_dir={data_dir(task)} "
                f"task.model=logreg strategy=fedavg num_rounds={setup['rounds']}")
    return (f"task=chest_xray task.data_dir={data_dir(task)} task.dataset=pneumoniamnist "
            f"partition=iid partition.num_sites={setup['sites']} strategy=fedavg "
            f"num_rounds={setup['rounds']} {setup['extra']}")


def privacy_overrides(mechanism: str, epsilon: float, rounds: int) -> str:
    """The privacy overrides of one (mechanism, epsilon) point."""
    if math.isinf(epsilon):
        return "privacy=none"
    if mechanism == "local_dp":
        return (f"privacy=local_dp privacy.target_epsilon={epsilon} "
                f"privacy.target_delta={DELTA} privacy.ledger_scope=run")
    return (f"privacy=central_dp privacy.noise_multiplier={central_noise(epsilon, rounds):.6g} "
            f"privacy.target_delta={DELTA} privacy.ledger_scope=run")


def measure_task(task: str, size: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every (mechanism, epsilon) point of one task; epsilon = inf run once, shared."""
    setup = size[task]
    base = base_overrides(task, setup)
    rows: list[dict[str, Any]] = []
    plain: dict[str, Any] | None = None
    for mechanism in MECHANISMS:
        for epsilon in size["epsilons"]:
            if math.isinf(epsilon) and plain is not None:
                rows.append({**plain, "mechanism": mechanism})
                continue
            try:
                extra = privacy_overrides(mechanism, epsilon, setup["rounds"])
            except ValueError as err:  # the accountant cannot reach epsilon
                rows.append({"method": mechanism, "mechanism": mechanism, "epsilon": epsilon,
                             "kind": "federated", "status": "failed", "errors": [str(err)]})
                continue
            folder = (out / "runs" / task /
                      ("none" if math.isinf(epsilon) else f"{mechanism}_eps{epsilon:g}"))
            summaries, errors = seeds_of(
                lambda seed, x=extra, f=folder: run_federated(f"{base} {x} seed={seed}",
                                                              f / f"seed{seed}"),
                setup["seeds"])
            row = row_of(mechanism, "federated", summaries, errors, KEYS[task])
            # JSON has no infinity: "inf" (float("inf") reads it back)
            row.update({"mechanism": mechanism, "overrides": extra,
                        "epsilon": epsilon if math.isfinite(epsilon) else "inf"})
            rows.append(row)
            if math.isinf(epsilon):
                plain = row
    return {"setup": {"overrides": base, "seeds": list(setup["seeds"]), "delta": DELTA,
                      "epsilons": [e if math.isfinite(e) else "inf" for e in size["epsilons"]]},
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """One table per task: a row per epsilon, a column pair per mechanism."""
    parts = ["# Privacy against utility (python -m benchmarks.privacy_utility)\n\n"
             "Mean ± sd over seeds; `eps spent` = what the run's privacy ledger reports "
             f"(delta {DELTA:g}). ![plot](privacy_utility.png)\n"]
    for task in TASKS:
        section = result.get(task)
        if not section:
            continue
        m = section["machine"]
        acc, auc = METRIC_NAMES[task]
        parts.append(f"\n## {task} ({section['size']}, measured {m['date']}, load "
                     f"{m['load_average']} on {m['cpus']} CPUs, torch threads "
                     f"{m['torch_threads']})\n\n`{section['setup']['overrides']}`, seeds "
                     f"{section['setup']['seeds']}.")
        if task == "heart_disease":
            parts.append(f" FLamby: DP (eps=1) {FLAMBY['local_dp_eps1']}, FedAvg "
                         f"{FLAMBY['fedavg']} (accuracy).")
        parts.append("\n\n")
        table = []
        for epsilon in section["setup"]["epsilons"]:
            eps = float(epsilon)
            cells = [epsilon if math.isfinite(eps) else "∞ (no DP)"]
            for mechanism in MECHANISMS:
                row = _row(section, mechanism, eps)
                if row is None:
                    cells += ["", "", ""]
                elif row.get("status") == "failed":
                    cells += ["failed: " + "; ".join(row.get("errors", [])).replace("|", "/"),
                              "", ""]
                else:
                    cells += [fmt(row.get("accuracy")), fmt(row.get("auc")),
                              fmt(row.get("epsilon_spent"), 2)]
            table.append(cells)
        parts.append(markdown_table(
            ["epsilon", f"local DP {acc}", f"local DP {auc}", "local eps spent",
             f"central DP {acc}", f"central DP {auc}", "central eps spent"], table))
    return "".join(parts)


def _row(section: dict[str, Any], mechanism: str, epsilon: float) -> dict[str, Any] | None:
    for row in section["rows"]:
        if row["mechanism"] == mechanism and float(row["epsilon"]) == epsilon:
            return row
    return None


def plot(result: dict[str, Any]) -> bytes:
    """PNG: AUC and accuracy against epsilon (log scale; no DP drawn as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if result.get(t)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 4 * len(tasks)), squeeze=False)
    for (ax_acc, ax_auc), task in zip(axes, tasks, strict=True):
        section = result[task]
        for ax, key, label in ((ax_acc, "accuracy", METRIC_NAMES[task][0]),
                               (ax_auc, "auc", METRIC_NAMES[task][1])):
            plain = None
            for mechanism, marker in zip(MECHANISMS, ("o", "s"), strict=True):
                points = [(float(r["epsilon"]), r[key]) for r in section["rows"]
                          if r["mechanism"] == mechanism and r.get(key)
                          and r[key].get("mean") is not None]
                finite = sorted(p for p in points if math.isfinite(p[0]))
                plain = next((p[1] for p in points if math.isinf(p[0])), plain)
                if finite:
                    ax.errorbar([p[0] for p in finite], [p[1]["mean"] for p in finite],
                                yerr=[p[1]["sd"] or 0.0 for p in finite], marker=marker,
                                capsize=3, label=mechanism.replace("_", " "))
            if plain is not None:
                ax.axhline(plain["mean"], color="black", linestyle="--", linewidth=1,
                           label="no DP")
            ax.set_xscale("log", base=2)
            ticks = [float(e) for e in section["setup"]["epsilons"] if math.isfinite(float(e))]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.set_xlabel("epsilon (delta 1e-5)")
            ax.set_title(f"{task}: {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Run the chosen tasks, merge them into ``--out``'s results, write JSON, md and PNG."""
    from fl_app.run_folder import atomic_write_bytes

    parser = benchmark_parser(__doc__, "more seeds and rounds (long)", "seconds: the CI smoke test")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated tasks to run (default: all of {TASKS})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    chosen = chosen_names(parser, args.tasks, TASKS, "task")
    label = size_of(args)
    limit_threads(args.threads)
    result = earlier_results(args.out, NAME)
    result["benchmark"] = NAME
    for task in chosen:
        before = machine()
        section = measure_task(task, SIZES[label], args.out)
        section.update({"size": label, "machine": before,
                        "load_average_after": machine()["load_average"]})
        result[task] = section
        write_results(args.out, NAME, result, markdown(result))
        atomic_write_bytes(args.out / f"{NAME}.png", plot(result))
    print(markdown(result), end="")
    failed = [r for t in chosen for r in result[t]["rows"] if r.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
