"""Optional experiment tracking (``tracking=mlflow``): one MLflow run per fedclinic run.

What an MLflow run holds (conf/tracking/mlflow.yaml):
- params: the resolved config, flattened (``task.lr``, ``strategy.name``, ...);
- metrics, step = round: ``pooled/<metric>``, ``site/<site>/<metric>`` (test metrics per
  site) and ``train/<site>/<metric>`` (training metrics per site), as each round's
  metrics.jsonl line is written; at the end ``final/...`` from summary.json (the final model
  at the chosen threshold, ``mean_site_accuracy``, ``mean_site_auc``);
- tags: ``run_dir`` and ``status`` (completed | failed, as summary.json says);
- artifacts: the whole run folder, at the end, also when the run fails.

Server side only (the ServerApp and ``python -m fl_app.centralized``). The local store
(``tracking.tracking_uri: null``): ``<output_dir>/mlflow.db`` (SQLite) and
``<output_dir>/mlartifacts/``. MLflow is imported only when ``tracking.name`` is
``mlflow``: with the default ``tracking=none`` nothing here imports it. Tracking never changes
the run: an MLflow call that fails (e.g. a team server that cannot be reached) is logged once
as a warning and tracking stops for that run; the run folder stays the record.
"""

from __future__ import annotations

import json
import re
import time
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf

from fl_app.run_folder import RunFolder

# MLflow's local store under output_dir: runs, params and metrics in a SQLite database
# (MLflow's file store is in maintenance mode and refuses new runs by default), artifacts in
# a folder beside it
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# MLflow refuses longer param values (mlflow.utils.validation: 6000 characters)
MAX_PARAM_CHARS = 6000


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"task": {"lr": 0.05}}`` -> ``{"task.lr": "0.05"}``; lists and None as JSON."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = tree if isinstance(tree, str) else json.dumps(tree)
    return {prefix[:-1]: text[:MAX_PARAM_CHARS]}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries, under keys MLflow accepts (a site name may hold any character;
    MLflow allows letters, digits and ``_-. :/``)."""
    return {re.sub(r"[^\w\-. :/]", "_", k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def round_metrics(line: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl line under MLflow keys (pooled/, site/, train/)."""
    out = {f"pooled/{k}": v for k, v in (line.get("pooled") or {}).items()}
    for group, key in (("site", "per_site"), ("train", "train")):
        for site, metrics in (line.get(key) or {}).items():
            out.update({f"{group}/{site}/{k}": v for k, v in metrics.items()})
    return _numbers(out)


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's final numbers under ``final/`` keys."""
    out = {f"final/pooled/{k}": v for k, v in (summary.get("pooled") or {}).items()}
    for site, metrics in (summary.get("per_site") or {}).items():
        out.update({f"final/site/{site}/{k}": v for k, v in metrics.items()})
    for key in ("mean_site_accuracy", "mean_site_auc", "one_class_sites"):
        out[f"final/{key}"] = summary.get(key)
    return _numbers(out)


def local_store(output_dir: str | Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of MLflow's local store under ``output_dir``."""
    root = Path(output_dir).expanduser().resolve()
    return f"sqlite:///{root / LOCAL_DB}", (root / LOCAL_ARTIFACTS).as_uri()


class Tracker:
    """The tracking of one run. With ``tracking=none`` every method does nothing."""

    def __init__(self, cfg: DictConfig) -> None:
        """Remember the config; nothing is contacted before ``start``."""
        self.cfg = cfg
        tracking = cfg.get("tracking") or {}
        self.enabled = tracking.get("name", "none") == "mlflow"
        self.client: Any = None
        self.run_id: str | None = None
        self.step = 0

    def start(self, run: RunFolder) -> None:
        """Open the MLflow run for ``run`` (experiment created when missing), log params."""
        if not self.enabled:
            return
        self._call(self._start, run)

    def _start(self, run: RunFolder) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient  # only here: tracking=none never imports it

        tracking = self.cfg.tracking
        uri, artifacts = tracking.tracking_uri, None  # a server keeps its own artifact store
        if uri is None:
            Path(self.cfg.output_dir).expanduser().mkdir(parents=True, exist_ok=True)
            uri, artifacts = local_store(self.cfg.output_dir)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(tracking.experiment,
                                                       artifact_location=artifacts))
        self.run_id = self.client.create_run(
            experiment_id, run_name=tracking.run_name or run.path.name,
            tags={"run_dir": str(run.path), "task": str(self.cfg.task.name),
                  "strategy": str(self.cfg.strategy.name)},
        ).info.run_id
        params = flatten(OmegaConf.to_container(self.cfg, resolve=True))
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_round(self, line: dict[str, Any]) -> None:
        """Log one metrics.jsonl line (step = its round)."""
        if self.run_id is None:
            return
        self.step = int(line.get("round", self.step + 1))
        self._call(self._log, round_metrics(line), self.step)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def end(self, run: RunFolder | None) -> None:
        """Close the MLflow run: final metrics and ``status`` from summary.json, the run
        folder as artifacts, MLflow status FINISHED or FAILED. Call it also on failure."""
        if self.run_id is None:
            return
        self._call(self._end, run)
        self.run_id = None

    def _end(self, run: RunFolder | None) -> None:
        summary_file = run.path / "summary.json" if run is not None else None
        summary = (json.loads(summary_file.read_text())
                   if summary_file is not None and summary_file.is_file() else {})
        status = summary.get("status") or "failed"
        self._log(final_metrics(summary), self.step)
        self.client.set_tag(self.run_id, "status", status)
        if summary.get("reason"):
            self.client.set_tag(self.run_id, "reason", str(summary["reason"])[:5000])
        if run is not None and self.cfg.tracking.log_artifacts:
            self.client.log_artifacts(self.run_id, str(run.path))
        self.client.set_terminated(self.run_id,
                                   "FINISHED" if status == "completed" else "FAILED")

    def _call(self, fn: Any, *args: Any) -> None:
        """Run one MLflow step; on error warn once and stop tracking this run."""
        try:
            fn(*args)
        except Exception as err:  # tracking must never end or change the run
            log(WARNING, "fedclinic: MLflow tracking stopped for this run (%s: %s); the run "
                "folder has everything", type(err).__name__, err)
            self.run_id = None
