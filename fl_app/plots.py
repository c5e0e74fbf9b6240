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
LABELS = {"accuracy": "accuracy", "auc": "AUC", "loss": "loss (lower is better)"}


def plot_rounds(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per metric: a line per site and a thick line for the pooled value.

    Accuracy and AUC share a scale from at most 0.5 (chance for AUC) to 1, so that small
    round-to-round wobbles do not look like large swings; the legend sits on the right."""
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5 * len(PLOTTED) + 1.5, 4))
    sites = sorted({s for line in history for s in line.get("per_site", {})})
    for ax, key in zip(axes, PLOTTED, strict=True):
        lowest = 1.0
        for site in sites:
            rounds = [h for h in history if site in h.get("per_site", {})]
            xs = [h["round"] for h in rounds]
            ys = [_value(h["per_site"][site].get(key)) for h in rounds]
            ax.plot(xs, ys, marker=".", linewidth=1, label=site)
            lowest = min([lowest, *(y for y in ys if y == y)])
        xs = [h["round"] for h in history]
        ax.plot(xs, [_value(h.get("pooled", {}).get(key)) for h in history],
                color="black", linewidth=2.5, label="pooled")
        if key != "loss":
            ax.set_ylim(min(0.5, lowest - 0.02), 1.0)
        ax.set_title(LABELS[key])
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / (5 * len(PLOTTED) + 1.5), 1))
    return _save(fig, path, layout=False)


def _value(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_epsilon(ledger: list[dict[str, Any]], path: Path, title: str,
                 budget: float | None = None) -> Path:
    """Privacy spent: each site's epsilon (so far, at its delta) after every round of the
    privacy ledger; rounds a site did not train are marked x; the budget, if any, dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for site in sorted({line["site"] for line in ledger}):
        lines = sorted((x for x in ledger if x["site"] == site), key=lambda x: x["round"])
        xs, ys = [x["round"] for x in lines], [_value(x.get("epsilon")) for x in lines]
        (drawn,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=site)
        idle = [x for x in lines if x.get("status") != "trained"]
        if idle:
            ax.plot([x["round"] for x in idle], [_value(x.get("epsilon")) for x in idle],
                    linestyle="none", marker="x", markersize=9, color=drawn.get_color())
    if budget is not None:
        ax.axhline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent so far (lower = more private)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_sites(per_site: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """The final model at each site: accuracy and AUC bars, the mean over sites dashed."""
    sites = sorted(per_site)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(sites) + 2), sharey=True)
    values = {key: [_value(per_site[s].get(key)) for s in sites] for key in ("accuracy", "auc")}
    known = [v for vs in values.values() for v in vs if v == v]  # NaN: no value (one class)
    # from 0.5 (chance for AUC) or lower, so that the gaps between hospitals stay visible
    low = min([0.5, *(v - 0.05 for v in known)])
    for ax, key in zip(axes, ("accuracy", "auc"), strict=True):
        row = values[key]
        ax.barh(sites, [v - low for v in row], left=low, color="steelblue")
        present = [v for v in row if v == v]
        if present:
            mean = sum(present) / len(present)
            ax.axvline(mean, color="black", linestyle="--", linewidth=1,
                       label=f"mean {mean:.3f}")
            ax.legend(fontsize=8, loc="lower right")
        for y, v in enumerate(row):
            ax.text(low + 0.01 * (1 - low), y, "n/a (one class)" if v != v else f"{v:.3f}",
                    va="center", color="white" if v == v else "black", fontsize=9)
        ax.set_xlim(low, 1)
        ax.set_title(LABELS.get(key, key))
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # first site on top
    fig.suptitle(title)
    return _save(fig, path)


def plot_bytes(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bytes each site sent (up) and received (down) per round, in kB or MB, from
    metrics.jsonl."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    largest = max((max(v.values()) if isinstance(v, dict) and v else v or 0)
                  for h in history for v in (h.get("bytes_up"), h.get("bytes_down")))
    scale, unit = byte_unit(largest)
    for ax, key in zip(axes, ("bytes_up", "bytes_down"), strict=True):
        per_round = [(h["round"], h.get(key)) for h in history if h.get(key) is not None]
        sites = sorted({s for _, v in per_round if isinstance(v, dict) for s in v})
        for site in sites:
            points = [(r, v[site]) for r, v in per_round if isinstance(v, dict) and site in v]
            ax.plot([r for r, _ in points], [b / scale for _, b in points], marker=".",
                    label=site)
        totals = [(r, v) for r, v in per_round if isinstance(v, (int, float))]
        if totals:
            ax.plot([r for r, _ in totals], [b / scale for _, b in totals], marker=".",
                    color="black", label="all sites")
        ax.set_title("sent by each site (up)" if key == "bytes_up" else
                     "received by each site (down)")
        ax.set_xlabel("round")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if sites or totals:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


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


def byte_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) that shows ``largest`` bytes as a readable number: kB or MB."""
    return (1e6, "MB") if largest >= 1e6 else (1e3, "kB")


def _save(fig: Any, path: Path, layout: bool = True) -> Path:
    """Lay out ``fig`` (unless the caller did), write it as a PNG atomically to ``path`` and
    close it."""
    if layout:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
