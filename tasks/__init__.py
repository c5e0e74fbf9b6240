"""Medical tasks. Each module exposes a ``TASK``; ``get_task(name)`` finds it."""

from __future__ import annotations

import importlib

from tasks.base import DataError, SiteData, SiteRef, Task

__all__ = ["TASK_MODULES", "DataError", "SiteData", "SiteRef", "Task", "get_task"]

# task name -> module holding TASK
TASK_MODULES = {
    "breast_cancer": "tasks.breast_cancer",
    "chest_xray": "tasks.chest_xray",
    "heart_disease": "tasks.heart_disease",
    "mammography": "tasks.mammography",
}


def get_task(name: str) -> Task:
    """Return the task called ``name`` (as in ``conf/task/<name>.yaml``)."""
    if name not in TASK_MODULES:
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASK_MODULES))}")
    return importlib.import_module(TASK_MODULES[name]).TASK
