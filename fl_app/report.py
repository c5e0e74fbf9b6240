"""The run report: ``report.md`` and its plots, for a clinical collaborator who will not read
code.

    python -m fl_app.report <run folder>     # (re)build the report of an existing run folder

Every run (federated, centralized) writes it at its end, and ``fl_app.evaluate`` rebuilds it
to add its external validation. It is made only from the files of the run folder
(config.yaml, sites.json, metrics.jsonl, summary.json, privacy_ledger.jsonl, external/*.json),
so it can be rebuilt at any time, and holds nothing a site did not already release: metrics,
class counts and privacy spend, never anything per patient. Optional summary.json sections
(``contribution``, ``personalized``, ``membership_inference``) and metrics.jsonl
``bytes_up`` / ``bytes_down`` are shown when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from omegaconf import OmegaConf

from fl_app import report_format as fmt
from fl_app import report_results as results
from fl_app import report_safety as safety
from fl_app.plots import plot_bytes, plot_epsilon, plot_rounds, plot_sites
from fl_app.run_folder import RunFolder

REPORT_FILE = "report.md"


def write_report(run_dir: Path | str) -> Path:
    """(Re)build ``report.md`` and the plots it shows from the files of ``run_dir``."""
    run = RunFolder.open(Path(run_dir))
    facts = _load(run.path)
    _plots(run.path, facts)
    parts = [section(facts) for section in SECTIONS]
    return run.write_text(REPORT_FILE, "\n\n".join(p.strip() for p in parts if p) + "\n")


def report_quietly(run_dir: Path | str) -> Path | None:
    """``write_report``, logging instead of raising: a report problem never fails a run."""
    try:
        return write_report(run_dir)
    except Exception as err:  # the run's own results are already written
        log(WARNING, "fedclinic: could not write %s in %s: %s: %s (rebuild it with "
            "python -m fl_app.report %s)", REPORT_FILE, run_dir, type(err).__name__, err,
            run_dir)
        return None


def _load(path: Path) -> dict[str, Any]:
    """Everything the report reads, as plain Python values (missing files: empty)."""
    cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
    return {
        "path": path,
        "cfg": cfg,
        "summary": _json(path / "summary.json") or {},
        "sites": (_json(path / "sites.json") or {}).get("sites", []),
        "history": _jsonl(path / "metrics.jsonl"),
        "ledger": _jsonl(path / "privacy_ledger.jsonl"),
        "external": {p.stem: _json(p) for p in sorted((path / "external").glob("*.json"))},
    }


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plots(path: Path, facts: dict[str, Any]) -> None:
    """Draw the plots the sections reference (each only when its data exists)."""
    cfg, summary, history = facts["cfg"], facts["summary"], facts["history"]
    title = fmt.title(cfg)
    if history:  # results.py drew it at the end of the run; redrawn as this report shows it
        plot_rounds(history, path / fmt.METRICS_PLOT, title)
    if summary.get("per_site"):
        plot_sites(summary["per_site"], path / fmt.SITES_PLOT,
                   f"{title}: final model at each hospital (test {fmt.unit(facts)})")
    if facts["ledger"]:
        budget = (cfg.get("privacy", {}).get("budget") or {}).get("epsilon")
        plot_epsilon(facts["ledger"], path / fmt.EPSILON_PLOT,
                     "Privacy spent per hospital (x: round not trained)", budget)
    if any(h.get("bytes_up") is not None or h.get("bytes_down") is not None for h in history):
        plot_bytes(history, path / fmt.BYTES_PLOT, "Bytes on the wire per hospital and round")


# the report, top to bottom; a section with nothing to say returns ""
SECTIONS = (results.header, results.config, results.glance, results.notice, results.per_site,
            results.confusion, results.curves, results.personalized,
            results.contribution, safety.privacy, safety.security, safety.communication,
            safety.external, safety.glossary)


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_app.report RUN``: rebuild the report; 2 with one line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m fl_app.report",
                                     description="(Re)build report.md of a run folder.")
    parser.add_argument("run", type=Path, help="run folder (holds config.yaml)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run)
    except (FileNotFoundError, ValueError) as err:  # not a run folder / unreadable JSON
        print(f"fedclinic report: error: {err}", file=sys.stderr)
        return 2
    print(f"fedclinic: report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
