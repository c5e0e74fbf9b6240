"""The end of a run, federated or centralized: final model, summary.json and the plot."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fl_app.plots import plot_rounds
from fl_app.run_folder import RunFolder


def write_results(
    run: RunFolder,
    history: list[dict[str, Any]],
    state_dict: dict[str, torch.Tensor],
    header: dict[str, Any],
    plot_title: str,
) -> dict[str, Any]:
    """Write final_model.pt, summary.json and plots/metrics.png; return the summary.

    summary.json = ``header`` + the last round's ``pooled`` and ``per_site`` metrics,
    ``mean_site_accuracy`` / ``mean_site_auc`` / ``one_class_sites`` / ``worst_site`` (see
    :func:`site_summary`) and ``run_dir`` (the keys every run folder has), and ``threshold``
    / ``threshold_logit``: the operating threshold (``task.threshold``, fl_app.threshold) that
    a binary task's accuracy, sensitivity and specificity use and ``fl_app.evaluate`` applies.
    """
    run.save_model("final_model.pt", state_dict)
    last = history[-1] if history else {"pooled": {}, "per_site": {}}
    summary = {
        **header,
        "rounds_completed": len(history),
        **site_summary(last["pooled"], last["per_site"]),
        # the operating threshold (probability, and log p1/p0) that accuracy, sensitivity and
        # specificity use; null = argmax (0.5)
        "threshold": last["pooled"].get("threshold"),
        "threshold_logit": last["pooled"].get("threshold_logit"),
        "run_dir": str(run.path),
    }
    run.write_json("summary.json", summary)
    if history:
        plot_rounds(history, run.path / "plots" / "metrics.png", plot_title)
    return summary


def site_summary(pooled: dict[str, Any], per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The per-site part of a summary, for any model evaluated at every site.

    - ``pooled``, ``per_site``: as given;
    - ``mean_site_accuracy``: mean of the sites' accuracies;
    - ``mean_site_auc``: mean of the sites' AUCs over the sites whose test set holds both
      classes (a one-class test set has no AUC); ``one_class_sites``: how many were skipped;
    - ``worst_site``: fairness across hospitals, per metric (accuracy, auc): the site with the
      lowest value, that value, and its gap to the mean over sites (mean - worst).

    Personalised models (summary.json ``personalized``) are summarised the same way.
    """
    accuracies = {s: float(m["accuracy"]) for s, m in per_site.items() if "accuracy" in m}
    aucs = {s: float(m["auc"]) for s, m in per_site.items()
            if "auc" in m and not math.isnan(float(m["auc"]))}
    one_class = sum(1 for m in per_site.values() if "auc" in m and math.isnan(float(m["auc"])))
    return {
        "pooled": pooled,
        "per_site": per_site,
        "mean_site_accuracy": _mean(accuracies),
        "mean_site_auc": _mean(aucs),
        "one_class_sites": one_class,
        "worst_site": {name: _worst(values) for name, values in
                       (("accuracy", accuracies), ("auc", aucs)) if values},
    }


def _mean(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def _worst(values: dict[str, float]) -> dict[str, Any]:
    site = min(values, key=values.__getitem__)
    return {"site": site, "value": values[site],
            "gap_to_mean": float(np.mean(list(values.values()))) - values[site]}
