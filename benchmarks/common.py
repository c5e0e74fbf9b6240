"""What the benchmarks share: run one experiment in-process, summarise seeds, write results.

- :func:`run_federated` runs the real experiment (``fl_app.experiment.run_experiment``, the
  real ClientApp, every message serialised as on the wire) on an in-process federation
  (``benchmarks.local_grid.LocalGrid``: one node per site, no SuperLink, no Ray) and returns
  its ``summary.json``; :func:`run_centralized` does the same for the centralized twin
  (``fl_app.centralized``).
- :func:`mean_sd` / :func:`fmt` summarise one number over seeds ("0.812 ± 0.010").
- :func:`limit_threads` sets torch's threads; :func:`machine` records the machine and its
  load (numbers depend on both); :func:`write_results` writes ``<name>.json`` and
  ``<name>.md`` atomically.
- :func:`data_dir`: the real data folder of a task (``$FEDCLINIC_DATA_ROOT`` or
  ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fl_app.run_folder import atomic_write_text, json_safe
from tests.conftest import data_root

# the task -> folder under the data root
DATA_FOLDERS = {"heart_disease": "heart_disease", "chest_xray": "chest_xray",
                "mammography": "mammography"}


def benchmark_parser(doc: str, full: str, tiny: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: ``--out DIR`` and one of ``--full`` / ``--tiny``
    (help texts say what each size means for this benchmark); the default size is neither."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help=full)
    size.add_argument("--tiny", action="store_true", help=tiny)
    return parser


def size_of(args: argparse.Namespace) -> str:
    """The size a :func:`benchmark_parser` command line asked for: full, tiny or default."""
    return "full" if args.full else "tiny" if args.tiny else "default"


def chosen_names(parser: argparse.ArgumentParser, text: str, known: Iterable[str],
                 what: str) -> list[str]:
    """The comma-separated ``text`` as a list; a parser error naming any unknown one."""
    known = list(known)
    chosen = [name for name in text.split(",") if name]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def earlier_results(out: Path, name: str) -> dict[str, Any]:
    """``<out>/<name>.json`` as written before (sections are merged into it), else {}."""
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def data_dir(task: str) -> Path:
    """The real data folder of ``task``; a clear error when it is absent."""
    path = data_root() / DATA_FOLDERS[task]
    if not path.is_dir():
        raise SystemExit(f"benchmark: no {task} data at {path} (set FEDCLINIC_DATA_ROOT)")
    return path


def run_federated(overrides: str, out: Path) -> dict[str, Any]:
    """Run one federated experiment in-process; return its summary.json (plus ``wall_s``).

    ``overrides`` are the experiment's Hydra overrides; its run folder goes under ``out``
    (``output_dir``), so simulated sites' privacy ledgers do not carry over between runs.
    """
    from benchmarks.local_grid import LocalGrid, set_server_identity
    from fl_app.client_app import app as client_app
    from fl_app.config import compose_config
    from fl_app.experiment import run_experiment
    from fl_app.simulation import simulated_sites

    cfg = compose_config(f"{overrides} output_dir={out}")
    set_server_identity()
    grid = LocalGrid(simulated_sites(cfg), client_app)
    started = time.perf_counter()
    run = run_experiment(grid, cfg)
    return _summary(run.path, time.perf_counter() - started)


def run_centralized(overrides: str, out: Path) -> dict[str, Any]:
    """Run the centralized twin of ``overrides`` (same data, model, epochs); its summary."""
    from fl_app.centralized import run_centralized as centralized
    from fl_app.config import compose_config

    started = time.perf_counter()
    run = centralized(compose_config(f"{overrides} output_dir={out}"))
    return _summary(run.path, time.perf_counter() - started)


def _summary(folder: Path, wall_s: float) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    summary["wall_s"] = wall_s
    return summary


def mean_sd(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (None/NaN values left out, counted)."""
    given = list(values)
    kept = [float(v) for v in given if v is not None and not math.isnan(float(v))]
    return {
        "mean": statistics.fmean(kept) if kept else None,
        "sd": statistics.stdev(kept) if len(kept) > 1 else (0.0 if kept else None),
        "n": len(kept),
        "missing": len(given) - len(kept),
        "values": kept,
    }


def fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± sd`` of a :func:`mean_sd` result ("–" when there is no value)."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat["n"] < 2:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def limit_threads(threads: int) -> None:
    """Run torch on ``threads`` intra-op threads (record it: :func:`machine`).

    On this shared 2-core machine (load 10+) two torch threads on a small model spend most of
    their time waiting for each other: heart disease FedAvg took 122 s with 2 threads and 15 s
    with 1 (same numbers). The benchmarks measure quality, so they default to 1.
    """
    import torch

    torch.set_num_threads(threads)


def machine() -> dict[str, Any]:
    """The machine and its load now (record it with every measurement)."""
    import torch

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_results(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """Write ``out/<name>.json`` (NaN -> null) and ``out/<name>.md`` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(json_safe(result), indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown)


def markdown_table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """A markdown table from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
