"""Quality against published baselines: heart disease, chest X-ray, mammography.

    python -m benchmarks.quality --out DIR            # default size: minutes on 2 cores
    python -m benchmarks.quality --out DIR --full     # every seed and round
    python -m benchmarks.quality --out DIR --tiny     # seconds: the CI smoke test
    python -m benchmarks.quality --out DIR --sections heart_disease   # one section; the
                                                      # others already in DIR are kept

Every federated number comes from the real experiment (``fl_app.experiment.run_experiment``,
the real ClientApp, messages serialised as on the wire) on an in-process federation
(``benchmarks.common.run_federated``: no SuperLink, no Ray); every centralized number from
``fl_app.centralized`` with the same overrides (same data, model and epochs, pooled).

- **heart_disease**: the four real hospitals (UCI: Cleveland, Hungary, Switzerland, VA),
  ``task.protocol`` (default ``flamby``), logistic regression, 20 rounds x 5 local epochs.
  Rows: FedAvg, FedProx, FedAdam, each robust aggregator (Krum, Multi-Krum and Bulyan with
  ``num_malicious_nodes=0``: four hospitals are too few for f=1), q-FedAvg where it exists,
  local-only (each hospital trains alone for the same epochs and is tested on its own test
  set) and centralized (pooled). Per row: mean per-hospital test accuracy and AUC, mean ± sd
  over seeds, beside FLamby's numbers (Fed-Heart-Disease, mean per-client accuracy) and the
  goal FedAvg >= 0.79.
- **chest_xray**: PneumoniaMNIST 28x28 (official split, whole official test split pooled),
  the product's GroupNorm CNN, 5 simulated hospitals IID and Dirichlet(0.5) vs centralized:
  pooled test AUC beside MedMNIST v2 (ResNet-18 28x28, AUC 0.944); goal federated >= 99% of
  centralized.
- **mammography**: mini-MIAS patch view (``experiment=mammography_patches``: patch AUC and
  film-level AUC of the patch model slid over whole test films), federated (3 hospitals) vs
  centralized; ``--full`` adds the whole-film view (``experiment=mammography_mias``).

Writes ``quality.json`` and ``quality.md`` in ``--out`` (each section records its machine,
load and date). Exits 1 when any run failed (its row says why).
"""

from __future__ import annotations

from collections.abc import Callable
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
    mean_sd,
    run_centralized,
    run_federated,
    size_of,
    write_results,
)

NAME = "quality"
CONF = Path(__file__).resolve().parents[1] / "conf"

# Published anchors (the numbers we are compared with)
FLAMBY = {  # FLamby Fed-Heart-Disease (du Terrail et al. 2022), mean per-client accuracy
    "centralized": 0.735, "fedavg": 0.685, "fedadam": 0.726, "local_dp_eps1": 0.699,
}
MEDMNIST_PNEUMONIA_AUC = 0.944  # MedMNIST v2 (Yang et al. 2023), ResNet-18 (28), test AUC
GOALS = {"heart_disease_fedavg_accuracy": 0.79, "chest_xray_fed_over_central_auc": 0.99}

# heart disease: (row label, strategy, extra overrides)
HEART_STRATEGIES = (
    ("fedavg", "fedavg", ""),
    ("fedprox", "fedprox", ""),
    ("fedadam", "fedadam", ""),
    ("median", "median", ""),
    ("trimmed_mean", "trimmed_mean", ""),
    ("krum (f=0)", "krum", "strategy.num_malicious_nodes=0"),
    ("multikrum (f=0, m=2)", "multikrum", "strategy.num_malicious_nodes=0"),
    ("bulyan (f=0)", "bulyan", "strategy.num_malicious_nodes=0"),
    ("qfedavg", "qfedavg", ""),
)

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "heart_seeds": (0,), "heart_rounds": 2, "heart_strategies": ("fedavg", "median"),
        "chest_seeds": (0,), "chest_rounds": 1, "chest_partitions": ("iid",),
        "mammo_seeds": (0,), "mammo_rounds": 1, "mammo_views": ("patch",),
        "imaging_extra": "task.cnn_widths=[8,16] task.local_epochs=1",
        # patch extraction and MONAI augmentation dominate a tiny mammography run
        "mammo_extra": "task.augment.enabled=false task.patch.normals_per_film=2 "
                       "task.patch.lesion_copies=2 task.patch.eval_normals_per_film=2 "
                       "task.patch.stride=64",
    },
    "default": {
        "heart_seeds": (0, 1, 2, 3, 4), "heart_rounds": 20, "heart_strategies": None,
        "chest_seeds": (0,), "chest_rounds": 5, "chest_partitions": ("iid", "dirichlet"),
        "mammo_seeds": (0,), "mammo_rounds": 5, "mammo_views": ("patch",),
        "imaging_extra": "",
    },
    "full": {
        "heart_seeds": (0, 1, 2, 3, 4), "heart_rounds": 20, "heart_strategies": None,
        "chest_seeds": (0, 1, 2), "chest_rounds": 20, "chest_partitions": ("iid", "dirichlet"),
        "mammo_seeds": (0, 1, 2), "mammo_rounds": 5, "mammo_views": ("patch", "film"),
        "imaging_extra": "",
    },
}
SECTIONS = ("heart_disease", "chest_xray", "mammography")


def strategy_built(name: str) -> bool:
    """Whether ``strategy=<name>`` exists on this checkout."""
    return (CONF / "strategy" / f"{name}.yaml").is_file()


def seeds_of(runner: Callable[[int], dict[str, Any]], seeds: tuple[int, ...]
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """Run ``runner(seed)`` for every seed; the summaries and the errors (one line each)."""
    summaries, errors = [], []
    for seed in seeds:
        try:
            summaries.append(runner(seed))
        except Exception as err:  # one failed run is a row, not a crash
            errors.append(f"seed {seed}: {type(err).__name__}: {str(err).splitlines()[0]}")
    return summaries, errors


def row_of(label: str, kind: str, summaries: list[dict[str, Any]], errors: list[str],
           keys: dict[str, Callable[[dict[str, Any]], Any]]) -> dict[str, Any]:
    """One result row: mean ± sd over the seeds of each metric in ``keys``."""
    row: dict[str, Any] = {"method": label, "kind": kind, "seeds": len(summaries)}
    for key, get in keys.items():
        row[key] = mean_sd(get(s) for s in summaries)
    row["wall_s"] = mean_sd(s["wall_s"] for s in summaries)
    row["status"] = "ok" if not errors else ("failed" if not summaries else "partly failed")
    if errors:
        row["errors"] = errors
    return row


HEART_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "accuracy": lambda s: s.get("mean_site_accuracy"),
    "auc": lambda s: s.get("mean_site_auc"),
    "pooled_auc": lambda s: s.get("pooled", {}).get("auc"),
    "worst_site_accuracy": lambda s: s.get("worst_site", {}).get("accuracy", {}).get("value"),
}


# --------------------------------------------------------------------------- heart disease
def heart_disease(size: dict[str, Any], out: Path, protocol: str,
                  only: list[str] | None = None) -> dict[str, Any]:
    """The heart-disease section: every strategy, local-only and centralized, over seeds.

    ``only``: just these strategies (no local-only or centralized rows), to add rows to a
    section measured before (see :func:`merge_rows`)."""
    base = (f"task=heart_disease partition=natural task.data_dir={data_dir('heart_disease')} "
            f"task.protocol={protocol} task.model=logreg num_rounds={size['heart_rounds']}")
    wanted = only or size["heart_strategies"]
    rows = []
    for label, strategy, extra in HEART_STRATEGIES:
        if wanted is not None and strategy not in wanted:
            continue
        if not strategy_built(strategy):
            rows.append({"method": label, "kind": "federated", "status": "not built yet"})
            continue
        folder = out / "runs" / "heart_disease" / strategy
        summaries, errors = seeds_of(
            lambda seed, s=strategy, e=extra, f=folder: run_federated(
                f"{base} strategy={s} {e} seed={seed}", f / f"seed{seed}"),
            size["heart_seeds"])
        rows.append(row_of(label, "federated", summaries, errors, HEART_KEYS))
    if only:
        return {"setup": {"overrides": base, "seeds": list(size["heart_seeds"])}, "rows": rows}
    summaries, errors = seeds_of(
        lambda seed: local_only(f"{base} seed={seed}"), size["heart_seeds"])
    rows.append(row_of("local only", "local", summaries, errors, HEART_KEYS))
    folder = out / "runs" / "heart_disease" / "centralized"
    summaries, errors = seeds_of(
        lambda seed: run_centralized(f"{base} seed={seed}", folder / f"seed{seed}"),
        size["heart_seeds"])
    rows.append(row_of("centralized (pooled)", "centralized", summaries, errors, HEART_KEYS))
    anchors = {"fedavg": FLAMBY["fedavg"], "fedadam": FLAMBY["fedadam"],
               "centralized (pooled)": FLAMBY["centralized"]}
    for row in rows:
        row["flamby_accuracy"] = anchors.get(row["method"])
    return {"setup": {"overrides": base, "seeds": list(size["heart_seeds"]),
                      "local_epochs": "task default (5)"},
            "rows": rows}


def local_only(overrides: str) -> dict[str, Any]:
    """Each site trains alone (same model, optimizer and epochs as the centralized twin:
    ``num_rounds`` x ``task.local_epochs``, its own standardisation statistics) and is tested
    on its own test set; a summary in summary.json's per-site form (no pooled model)."""
    import time

    from fl_app.centralized import centralized_config
    from fl_app.config import compose_config
    from fl_app.experiment import seed_everything
    from fl_app.metrics import public_site_metrics
    from fl_app.results import site_summary
    from tasks import SiteRef, engine, get_task
    from tasks.base import pick_device
    from tasks.federated_stats import combine_moments

    started = time.perf_counter()
    cfg = centralized_config(compose_config(overrides))
    task = get_task(cfg.task.name)
    device = pick_device(cfg.device)
    per_site = {}
    for index, name in enumerate(task.site_names(cfg)):
        seed_everything(cfg.seed)
        site = task.load_site(cfg, SiteRef(name=name, index=index))
        moments = task.local_statistics(site)
        site = task.apply_statistics(site, combine_moments([moments]) if moments else None)
        model = task.build_model(cfg, site.info)
        optimizer = engine.make_optimizer(model, cfg.task)
        for round_ in range(1, cfg.num_rounds + 1):
            loader = engine.make_loader(site.train, cfg.task.batch_size, shuffle=True,
                                        seed=cfg.seed + round_)
            engine.train(model, loader, epochs=cfg.task.local_epochs, optimizer=optimizer,
                         device=device)
        reply = engine.evaluate_site(model, site, device, task.extra_metrics)
        per_site[name] = public_site_metrics(reply)
    return {**site_summary({}, per_site), "wall_s": time.perf_counter() - started}


# --------------------------------------------------------------------------- imaging
IMAGING_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "pooled_auc": lambda s: s.get("pooled", {}).get("auc"),
    "mean_site_auc": lambda s: s.get("mean_site_auc"),
    "pooled_accuracy": lambda s: s.get("pooled", {}).get("accuracy"),
}
PATCH_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    **IMAGING_KEYS,
    "film_auc": lambda s: s.get("pooled", {}).get("film_auc"),
}


def chest_xray(size: dict[str, Any], out: Path) -> dict[str, Any]:
    """Federated (IID, Dirichlet 0.5; 5 hospitals) vs centralized pooled AUC."""
    base = (f"task=chest_xray task.data_dir={data_dir('chest_xray')} "
            f"task.dataset=pneumoniamnist partition.num_sites=5 "
            f"num_rounds={size['chest_rounds']} {size['imaging_extra']}")
    partitions = {"iid": "partition=iid", "dirichlet": "partition=dirichlet partition.alpha=0.5"}
    rows = []
    for name in size["chest_partitions"]:
        folder = out / "runs" / "chest_xray" / name
        summaries, errors = seeds_of(
            lambda seed, n=name, f=folder: run_federated(
                f"{base} {partitions[n]} strategy=fedavg seed={seed}", f / f"seed{seed}"),
            size["chest_seeds"])
        rows.append(row_of(f"federated fedavg, {name.replace('dirichlet', 'Dirichlet 0.5')}",
                           "federated", summaries, errors, IMAGING_KEYS))
    # the pooled training data is the whole official train split whatever the partition
    folder = out / "runs" / "chest_xray" / "centralized"
    summaries, errors = seeds_of(
        lambda seed: run_centralized(f"{base} partition=iid seed={seed}", folder / f"seed{seed}"),
        size["chest_seeds"])
    rows.append(row_of("centralized (pooled)", "centralized", summaries, errors, IMAGING_KEYS))
    _ratios(rows, "pooled_auc")
    return {"setup": {"overrides": base, "seeds": list(size["chest_seeds"]),
                      "anchor": "MedMNIST v2 PneumoniaMNIST ResNet-18 (28) test AUC 0.944"},
            "rows": rows}


def mammography(size: dict[str, Any], out: Path) -> dict[str, Any]:
    """Patch view (patch and film-level AUC) and, at --full, whole films: fed vs central."""
    views = {"patch": ("experiment=mammography_patches", PATCH_KEYS),
             "film": ("experiment=mammography_mias", IMAGING_KEYS)}
    rows = []
    for view in size["mammo_views"]:
        preset, keys = views[view]
        base = (f"{preset} task.data_dir={data_dir('mammography')} "
                f"num_rounds={size['mammo_rounds'] if view == 'patch' else 15} "
                f"{size['imaging_extra'] if view == 'patch' else ''} {size.get('mammo_extra', '')}")
        folder = out / "runs" / "mammography" / view
        view_rows = []
        summaries, errors = seeds_of(
            lambda seed, b=base, f=folder: run_federated(f"{b} seed={seed}",
                                                         f / "federated" / f"seed{seed}"),
            size["mammo_seeds"])
        view_rows.append(row_of(f"{view}: federated fedavg, 3 hospitals", "federated",
                                summaries, errors, keys))
        summaries, errors = seeds_of(
            lambda seed, b=base, f=folder: run_centralized(f"{b} seed={seed}",
                                                           f / "centralized" / f"seed{seed}"),
            size["mammo_seeds"])
        view_rows.append(row_of(f"{view}: centralized (pooled)", "centralized", summaries,
                                errors, keys))
        _ratios(view_rows, "film_auc" if view == "patch" else "pooled_auc")
        rows += view_rows
    return {"setup": {"seeds": list(size["mammo_seeds"]), "views": list(size["mammo_views"])},
            "rows": rows}


def merge_rows(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` section with ``new``'s rows put in place of (or beside) the rows of the same
    method, each new row stamped with its own machine record (``measured``)."""
    if old.get("setup", {}).get("overrides") != new["setup"]["overrides"]:
        raise SystemExit("benchmark: --strategies adds rows to a section measured with the same "
                         "overrides and size; run the whole section instead")
    order = [label for label, _, _ in HEART_STRATEGIES]
    rows = {r["method"]: r for r in old["rows"]}
    for row in new["rows"]:
        rows[row["method"]] = {**row, "measured": new["machine"]}
    ranked = sorted(rows.values(), key=lambda r: order.index(r["method"])
                    if r["method"] in order else len(order))
    return {**old, "rows": ranked}


def _ratios(rows: list[dict[str, Any]], key: str) -> None:
    """Each federated row's ``key`` mean over the centralized row's (``of_centralized``)."""
    central = next((r for r in rows if r["kind"] == "centralized"), None)
    base = central.get(key, {}).get("mean") if central else None
    for row in rows:
        value = row.get(key, {}).get("mean") if row["kind"] == "federated" else None
        row["of_centralized"] = value / base if value is not None and base else None


# --------------------------------------------------------------------------- output
def markdown(result: dict[str, Any]) -> str:
    """The markdown tables of every section present in ``result``."""
    parts = ["# Quality against published baselines (python -m benchmarks.quality)\n"]
    heart = result.get("heart_disease")
    if heart:
        m = heart["machine"]
        parts.append(
            f"\n## Heart disease: four real hospitals ({heart['size']}, measured {m['date']}, "
            f"load {m['load_average']} on {m['cpus']} CPUs, torch threads {m['torch_threads']})"
            f"\n\n`{heart['setup']['overrides']}`, seeds {heart['setup']['seeds']}; mean "
            "per-hospital test accuracy and AUC (mean ± sd over seeds). Goal: FedAvg >= "
            f"{GOALS['heart_disease_fedavg_accuracy']} mean per-hospital accuracy.\n\n")
        parts.append(markdown_table(
            ["method", "mean per-hospital accuracy", "mean per-hospital AUC", "pooled AUC",
             "worst hospital accuracy", "FLamby accuracy", "s / run", "status"],
            ([r["method"], fmt(r.get("accuracy")), fmt(r.get("auc")), fmt(r.get("pooled_auc")),
              fmt(r.get("worst_site_accuracy")), r.get("flamby_accuracy") or "",
              fmt(r.get("wall_s"), 1), _status(r)] for r in heart["rows"])))
        later = [f"{r['method']}: measured {r['measured']['date']}, load "
                 f"{r['measured']['load_average']}" for r in heart["rows"] if r.get("measured")]
        if later:
            parts.append("\nAdded later: " + "; ".join(later) + ".\n")
    for key, title, cols in (
        ("chest_xray", "Chest X-ray (PneumoniaMNIST 28x28)",
         ("pooled_auc", "mean_site_auc", "pooled_accuracy")),
        ("mammography", "Mammography (mini-MIAS)",
         ("pooled_auc", "film_auc", "mean_site_auc", "pooled_accuracy")),
    ):
        section = result.get(key)
        if not section:
            continue
        m = section["machine"]
        parts.append(f"\n## {title} ({section['size']}, measured {m['date']}, load "
                     f"{m['load_average']} on {m['cpus']} CPUs, torch threads "
                     f"{m['torch_threads']})\n\n")
        if key == "chest_xray":
            parts.append(f"`{section['setup']['overrides']}`, seeds {section['setup']['seeds']}"
                         f". Anchor: {section['setup']['anchor']}; goal: federated >= "
                         f"{GOALS['chest_xray_fed_over_central_auc']:.0%} of centralized.\n\n")
        else:
            parts.append("Patch view: `experiment=mammography_patches` (film AUC: the patch "
                         "model slid over each whole test film). x centralized: film AUC "
                         "(patch view), pooled AUC (film view).\n\n")
        parts.append(markdown_table(
            ["setting", *cols, "x centralized", "s / run", "status"],
            ([r["method"], *(fmt(r.get(c)) for c in cols),
              f"{r['of_centralized']:.3f}" if r.get("of_centralized") else "",
              fmt(r.get("wall_s"), 1), _status(r)] for r in section["rows"])))
    return "".join(parts)


def _status(row: dict[str, Any]) -> str:
    if row.get("errors"):
        return f"{row['status']}: {'; '.join(row['errors'])}".replace("|", "/")
    return row["status"]


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, merge them into ``--out``'s results, write JSON + markdown."""
    parser = benchmark_parser(__doc__, "every seed and round (long)", "seconds: the CI smoke test")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {SECTIONS})")
    parser.add_argument("--protocol", default="flamby",
                        help="heart disease task.protocol (FLamby is compared on flamby only)")
    parser.add_argument("--strategies", default="",
                        help="heart disease: only these strategies, merged into the section "
                             "already in --out (e.g. one that landed after the measurement)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    chosen = chosen_names(parser, args.sections, SECTIONS, "section")
    label = size_of(args)
    size = SIZES[label]
    limit_threads(args.threads)
    result = earlier_results(args.out, NAME)
    result.update({"benchmark": NAME, "anchors": {"flamby_heart_disease": FLAMBY,
                   "medmnist_pneumonia_auc": MEDMNIST_PNEUMONIA_AUC}, "goals": GOALS})
    only = [x for x in args.strategies.split(",") if x] or None
    if only and "heart_disease" in chosen and "heart_disease" not in result:
        parser.error("--strategies adds rows to the heart_disease section in --out; there is "
                     "none yet")
    runners = {"heart_disease": lambda: heart_disease(size, args.out, args.protocol, only),
               "chest_xray": lambda: chest_xray(size, args.out),
               "mammography": lambda: mammography(size, args.out)}
    for name in chosen:
        before = machine()
        section = runners[name]()
        section.update({"size": label, "machine": before,
                        "load_average_after": machine()["load_average"]})
        if name == "heart_disease" and only:
            section = merge_rows(result[name], section)
        result[name] = section
        write_results(args.out, NAME, result, markdown(result))  # each section as it ends
    print(markdown(result), end="")
    failed = [r for name in chosen for r in result[name]["rows"]
              if r["status"] not in ("ok", "not built yet")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
