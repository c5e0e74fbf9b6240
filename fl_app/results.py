"""The end of a run, federated or centralized: final model, summary.json and the plot."""

from __future__ import annotations

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
    ``mean_site_accuracy`` and ``run_dir`` (the keys every run folder has), and ``threshold``
    / ``threshold_logit``: the operating threshold (``task.threshold``, fl_app.threshold) that
    a binary task's accuracy, sensitivity and specificity use and ``fl_app.evaluate`` applies.
    """
    run.save_model("final_model.pt", state_dict)
    last = history[-1] if history else {"pooled": {}, "per_site": {}}
    accuracies = [m["accuracy"] for m in last["per_site"].values()]
    summary = {
        **header,
        "rounds_completed": len(history),
        "pooled": last["pooled"],
        "per_site": last["per_site"],
        "mean_site_accuracy": float(np.mean(accuracies)) if accuracies else None,
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
