"""Formatting helpers of the run report (fl_app/report.py): numbers, markdown tables, what
kind of run and data a report describes, and where its plots live."""

from __future__ import annotations

import math
from typing import Any

from fl_app import report_words as words
from tasks import get_task

METRICS_PLOT = "plots/metrics.png"
SITES_PLOT = "plots/sites.png"
EPSILON_PLOT = "plots/privacy_epsilon.png"
BYTES_PLOT = "plots/communication.png"


def num(value: Any, digits: int = 3) -> str:
    """A metric for a table: n/a for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; numbers formatted with :func:`num`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(num(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def title(cfg: dict[str, Any]) -> str:
    """``task / strategy[ / privacy]`` of a run config."""
    task = str(cfg.get("task", {}).get("name", "?")).replace("_", " ")
    strategy = str(cfg.get("strategy", {}).get("name", "?"))
    privacy = str(cfg.get("privacy", {}).get("name", "none"))
    return f"{task} / {strategy}" + (f" / {privacy}" if privacy != "none" else "")


def natural(task: str) -> bool:
    """Whether the task's sites are real hospitals (not a split of one data set)."""
    try:
        return bool(get_task(task).natural_sites)
    except (KeyError, ValueError, ImportError):
        return False


def unit(facts: dict[str, Any]) -> str:
    """What one test example of the run is: ``images`` or ``patients``."""
    return words.unit(str(facts["cfg"].get("task", {}).get("name")))


def centralized(facts: dict[str, Any]) -> bool:
    """Whether the run is the centralized baseline (fl_app.centralized)."""
    return facts["cfg"].get("strategy", {}).get("name") == "centralized"


def cell(text: Any) -> str:
    """One table cell: no line breaks or pipes, at most 200 characters."""
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= 200 else flat[:197] + "..."
