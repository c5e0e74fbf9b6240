"""Centralized baseline: the same task, model and epochs, trained on all sites' data pooled.

    python -m fl_app.centralized task=chest_xray task.data_dir=/abs/path num_rounds=10 \
        partition.num_sites=5
    python -m fl_app.centralized compare_with=<federated run folder> <the run's overrides>

Takes the same overrides as a federated run and writes the same run folder (``config.yaml``,
``metrics.jsonl``, ``summary.json`` with ``pooled`` / ``per_site`` / ``mean_site_accuracy``,
``final_model.pt``, ``plots/metrics.png``), so every federated result has a centralized twin:
- data: every site of the config is loaded exactly as in the federated run (same partition,
  same per-site test shares, federated statistics combined as the server would); the training
  splits are pooled into one data set;
- training: ``num_rounds`` x ``task.local_epochs`` epochs over the pooled data (each "round"
  is ``local_epochs`` epochs, the same number of passes over every example a site makes), one
  optimizer (``task.optimizer``) for the whole run, no differential privacy;
- evaluation: after each round, the model on each site's test share (``per_site``) and pooled
  over all of them (``pooled``), with the same metric code as the federated run.
The run folder is named ``<timestamp>_<task>_centralized``; ``config.yaml`` records
``strategy.name: centralized``.

The sites must be the federated run's: tasks without natural sites need
``partition.num_sites``, or ``compare_with=<federated run folder>`` (the baseline's own
option, not a config key), which takes the sites named in that run's ``sites.json`` (and its
``partition.num_sites``) and refuses to run unless every site's train and test sizes come out
equal to the federated run's, so both runs are scored on the same pooled test set.
"""

from __future__ import annotations

import json
import sys
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import ConcatDataset

from fl_app.config import ConfigError, compose_config
from fl_app.metrics import choose_site_threshold, pooled_metrics, public_site_metrics
from fl_app.report import report_quietly
from fl_app.results import write_results
from fl_app.run_folder import RunFolder
from fl_app.threshold import rule_of
from fl_app.tracking import Tracker
from tasks import SiteData, SiteRef, Task, engine, get_task
from tasks.base import pick_device
from tasks.federated_stats import combine_moments

CENTRALIZED = "centralized"
COMPARE_WITH = "compare_with="


def federated_sites(run_dir: Path) -> tuple[list[dict[str, Any]], int | None]:
    """The sites of a federated run folder (``sites.json``: name, num_train, num_test) and the
    run's ``partition.num_sites``; ConfigError when the folder has no sites.json."""
    path = Path(run_dir) / "sites.json"
    if not path.is_file():
        raise ConfigError(f"compare_with={run_dir}: no sites.json there; give the folder of "
                          "a federated run that reached its first round")
    sites = json.loads(path.read_text())["sites"]
    config = Path(run_dir) / "config.yaml"
    num_sites = (OmegaConf.load(config).get("partition", {}).get("num_sites")
                 if config.is_file() else None)
    return sites, num_sites


def centralized_config(cfg: DictConfig, like: Path | None = None) -> DictConfig:
    """The config as the baseline runs it: strategy ``centralized``, the federated run's
    site count (``partition.num_sites``, else the run folder ``like``'s)."""
    if cfg.privacy.name != "none":
        raise ConfigError("the centralized baseline trains without differential privacy; "
                          "drop the privacy=... override")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        cfg.strategy = {"name": CENTRALIZED}
        if "num_sites" in cfg.partition and cfg.partition.num_sites is None \
                and not get_task(cfg.task.name).natural_sites:
            # null means "one site per SuperNode" in a federated run: the baseline cannot
            # know how many there were unless told
            if like is None:
                raise ConfigError(
                    "partition.num_sites is null: set it to the federated run's number of "
                    "sites, or give compare_with=<federated run folder>")
            sites, num_sites = federated_sites(like)
            cfg.partition.num_sites = num_sites if num_sites is not None else len(sites)
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_sites(cfg: DictConfig, names: list[str] | None = None) -> list[SiteData]:
    """Every site of the config (or the ``names`` of them), prepared as in the federated run
    (federated statistics of those sites too)."""
    task = get_task(cfg.task.name)
    known = task.site_names(cfg)
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ConfigError(f"sites {', '.join(unknown)} are not sites of this config "
                          f"({', '.join(known)})")
    sites = [task.load_site(cfg, SiteRef(name=name, index=i))
             for i, name in enumerate(known) if names is None or name in names]
    moments = [task.local_statistics(site) for site in sites]
    stats = combine_moments(moments) if all(m is not None for m in moments) else None
    return [task.apply_statistics(site, stats) for site in sites]


def check_same_sites(sites: list[SiteData], federated: list[dict[str, Any]]) -> None:
    """ConfigError unless ``sites`` are the federated run's, with equal train/test sizes."""
    mine = {s.name: (s.num_train, s.num_test) for s in sites}
    theirs = {s["name"]: (s["num_train"], s["num_test"]) for s in federated}
    if mine != theirs:
        differ = [f"{name}: train/test {mine.get(name)} here, {theirs.get(name)} there"
                  for name in sorted(set(mine) | set(theirs)) if mine.get(name) != theirs.get(name)]
        raise ConfigError("the baseline's sites differ from the federated run's (give the "
                          "run's task/partition/seed overrides): " + "; ".join(differ))


def run_centralized(cfg: DictConfig, compare_with: Path | None = None) -> RunFolder:
    """Train the baseline for the resolved ``cfg``; return its run folder.

    ``compare_with``: a federated run folder whose sites (``sites.json``) the baseline must
    reproduce exactly (same names, same train/test sizes), else ConfigError before training.
    """
    from fl_app.experiment import seed_everything

    cfg = centralized_config(cfg, compare_with)
    rule_of(cfg)  # a bad task.threshold fails now, not after the first epoch block
    seed_everything(cfg.seed)
    task = get_task(cfg.task.name)
    federated = federated_sites(compare_with)[0] if compare_with is not None else None
    sites = load_sites(cfg, [s["name"] for s in federated] if federated else None)
    if federated is not None:
        check_same_sites(sites, federated)
    device = pick_device(cfg.device)
    model = task.build_model(cfg, sites[0].info)
    run = RunFolder.create(cfg)
    run.write_json("sites.json", {"sites": [
        {"name": s.name, "num_train": s.num_train, "num_test": s.num_test} for s in sites
    ], "model_info": {k: v for k, v in sites[0].info.items()
                      if isinstance(v, (int, float, str, list))},
        "compared_with": str(compare_with) if compare_with is not None else None})
    log(INFO, "fedclinic centralized: task=%s, %d sites pooled (%d training examples); "
        "run folder %s", cfg.task.name, len(sites), sum(s.num_train for s in sites), run.path)
    tracker = Tracker(cfg)  # tracking=mlflow only
    tracker.start(run)
    try:
        _train(cfg, task, model, sites, device, run, tracker)
    finally:  # also when training fails: the MLflow run is closed as failed
        tracker.end(run)
    return run


def _train(cfg: DictConfig, task: Task, model: torch.nn.Module, sites: list[SiteData],
           device: torch.device, run: RunFolder, tracker: Tracker) -> None:
    """The epoch blocks, their metrics.jsonl lines, the final threshold and the results."""
    pooled_train = ConcatDataset([s.train for s in sites])
    optimizer = engine.make_optimizer(model, cfg.task)
    history: list[dict[str, Any]] = []
    for round_ in range(1, cfg.num_rounds + 1):
        loader = engine.make_loader(pooled_train, cfg.task.batch_size, shuffle=True,
                                    seed=cfg.seed + round_)
        result = engine.train(model, loader, epochs=cfg.task.local_epochs,
                              optimizer=optimizer, device=device)
        line, raw = evaluate_sites(model, sites, device, round_, result["train_loss"], task)
        history.append(line)
        run.append_jsonl("metrics.jsonl", line)
        tracker.log_round(line)
        run.save_model("checkpoints/latest.pt", _cpu_state(model))
        log(INFO, "[epoch block %d/%d] pooled: accuracy %.4f  auc %.4f  train_loss %.4f",
            round_, cfg.num_rounds, line["pooled"]["accuracy"],
            line["pooled"].get("auc", float("nan")), result["train_loss"])
    threshold = choose_site_threshold(raw, cfg.task.get("threshold", "0.5")) if history else None
    if threshold is not None:  # as a federated run: the final model at the chosen threshold
        history[-1], _ = evaluate_sites(model, sites, device, cfg.num_rounds,
                                        history[-1]["train"][CENTRALIZED]["train_loss"], task,
                                        threshold)
    finish(run, cfg, model, history)


def evaluate_sites(model: torch.nn.Module, sites: list[SiteData], device: torch.device,
                   round_: int, train_loss: float, task: Task | None = None,
                   threshold_logit: float | None = None
                   ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """One metrics.jsonl line (the model on each site's test split and pooled over them,
    evaluated as the sites of a federated run do: ``engine.evaluate_site`` with the task's
    extra metrics, at ``threshold_logit`` if given) and each site's full reply."""
    extra = task.extra_metrics if task is not None else None
    per_site = {s.name: engine.evaluate_site(model, s, device, extra, threshold_logit)
                for s in sites}
    line = {
        "round": round_,
        "pooled": pooled_metrics(per_site),
        "per_site": {name: public_site_metrics(m) for name, m in per_site.items()},
        "train": {CENTRALIZED: {"train_loss": train_loss}},
        "missing_sites": [],
    }
    return line, per_site


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def finish(run: RunFolder, cfg: DictConfig, model: torch.nn.Module,
           history: list[dict[str, Any]]) -> None:
    """Write final_model.pt, summary.json (same keys as a federated run), the plot and the
    run report (report.md)."""
    summary = write_results(
        run,
        history,
        _cpu_state(model),
        {
            "task": cfg.task.name,
            "strategy": CENTRALIZED,
            "privacy": cfg.privacy.name,
            "epochs": len(history) * cfg.task.local_epochs,
            "status": "completed",
            "threshold_rule": cfg.task.get("threshold"),
        },
        f"{cfg.task.name} / centralized baseline (pooled training data)",
    )
    report_quietly(run.path)
    log(INFO, "fedclinic centralized: pooled AUC %s, run folder: %s",
        summary["pooled"].get("auc"), run.path)


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.centralized [compare_with=<run folder>] <overrides>``: run the
    baseline, print the run folder."""
    from fl_app.server_app import USER_ERRORS

    args = sys.argv[1:] if argv is None else argv
    like = [a[len(COMPARE_WITH):] for a in args if a.startswith(COMPARE_WITH)]
    overrides = [a for a in args if not a.startswith(COMPARE_WITH)]
    try:
        if len(like) > 1:
            raise ConfigError("give compare_with=<federated run folder> once")
        run = run_centralized(compose_config(overrides), Path(like[0]) if like else None)
    except USER_ERRORS as err:
        print(f"fedclinic: {err}", file=sys.stderr)
        return 1
    print(f"fedclinic: run folder: {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
