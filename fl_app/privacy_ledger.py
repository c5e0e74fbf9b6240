"""The privacy ledger of a run: ``privacy_ledger.jsonl`` and the summary's privacy section.

One line per site per round, written at the end of every round (and when a run stops early
because budgets ran out), with exactly the keys of ``strategies.budget.LEDGER_KEYS`` plus
``status`` (and ``reason`` where a site stopped). A privacy officer reads it to see what
each site has spent, round by round, and why a site stopped training.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fl_app.run_folder import RunFolder
from strategies.privacy import PrivacyGuard

LEDGER_FILE = "privacy_ledger.jsonl"


def find_guard(strategy: Strategy) -> PrivacyGuard | None:
    """The PrivacyGuard inside ``strategy`` (wrappers expose their inner ``strategy``)."""
    seen: set[int] = set()
    node: Any = strategy
    while node is not None and id(node) not in seen:
        if isinstance(node, PrivacyGuard):
            return node
        seen.add(id(node))
        node = getattr(node, "strategy", None)
    return None


class PrivacyLedger:
    """Writes the guard's ledger lines into the run folder; reports the final spend."""

    def __init__(self, run: RunFolder, cfg: DictConfig, strategy: Strategy) -> None:
        self.run = run
        self.cfg = cfg
        self.guard = find_guard(strategy)
        self.last_lines: list[dict[str, Any]] = []  # the lines of the latest flush

    def flush(self) -> int:
        """Append the lines gathered since the last flush; return how many."""
        if self.guard is None:
            return 0
        lines = self.guard.pop_ledger()
        self.last_lines = lines
        if lines:
            self.run.append_jsonl(LEDGER_FILE, *lines)
        return len(lines)

    def summary(self) -> dict[str, Any]:
        """The summary.json ``privacy`` section: final (epsilon, delta) per site and central."""
        if self.guard is None:
            return {"name": self.cfg.privacy.name, "mechanism": "none"}
        return self.guard.privacy_summary()

    def log_final(self, section: dict[str, Any]) -> None:
        """Print the final privacy spend (end-of-run log)."""
        if section.get("mechanism", "none") == "none":
            log(INFO, "fedclinic: privacy: none (model updates carry no formal DP guarantee)")
            return
        log(INFO, "fedclinic: privacy %s (%s accountant): final spend per site",
            section["mechanism"], section["accountant"])
        for site, spend in sorted(section["per_site"].items()):
            log(INFO, "    %-12s epsilon %.4f  delta %g  rounds trained %d  %s", site,
                spend["epsilon"], spend["delta"], spend["rounds_trained"], spend["status"])
        central = section.get("central")
        if central:
            log(INFO, "    central mechanism: epsilon %.4f  delta %g  (%d releases, noise "
                "multiplier %s)", central["epsilon"], central["delta"], central["releases"],
                central["noise_multiplier"])
        if section.get("stopped_early"):
            log(INFO, "    run stopped early: %s", section["stopped_early"])
