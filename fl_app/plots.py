"""PNG plots of a run's metrics over rounds (per site and pooled)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fl_app.run_folder import atomic_write_bytes

PLOTTED = ("accuracy", "auc", "loss")


def plot_rounds(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per metric: a line per site and a thick line for the pooled value."""
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED), 4))
    for ax, key in zip(axes, PLOTTED, strict=True):
        sites = sorted({s for line in history for s in line.get("per_site", {})})
        for site in sites:
            rounds = [h for h in history if site in h.get("per_site", {})]
            xs = [h["round"] for h in rounds]
            ys = [_value(h["per_site"][site].get(key)) for h in rounds]
            ax.plot(xs, ys, marker=".", linewidth=1, label=site)
        xs = [h["round"] for h in history]
        ax.plot(xs, [_value(h.get("pooled", {}).get(key)) for h in history],
                color="black", linewidth=2.5, label="pooled")
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_reliability(bins: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Reliability diagram: observed fraction of positives against the mean predicted
    probability per bin (the diagonal is perfect calibration), bin counts below."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    used = [b for b in bins if b["count"] > 0]
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    top.plot([b["mean_score"] for b in used], [b["fraction_positive"] for b in used],
             marker="o", color="black", label="model")
    top.set_ylabel("fraction positive")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    top.set_title(title)
    widths = [b["high"] - b["low"] for b in bins]
    bottom.bar([b["low"] for b in bins], [b["count"] for b in bins], width=widths,
               align="edge", color="grey", edgecolor="black")
    bottom.set_xlabel("predicted probability of the positive class")
    bottom.set_ylabel("images")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it as a PNG atomically to ``path`` and close it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
