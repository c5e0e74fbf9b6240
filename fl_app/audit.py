"""The audit trail of a run: ``audit.jsonl``, hash-chained, and its verifier.

    python -m fl_app.audit outputs/<run folder>      # exit 0 intact, 1 tampered (names the line)

Every entry carries ``seq`` (its 0-based position) and ``prev_sha256``, the SHA-256 of the
previous line's exact text (64 zeros for the first), so editing, deleting or reordering a
line breaks the chain at that line. The newest entry's SHA-256 is also recorded outside the
file (``checkpoints/state.pt`` after every round, ``summary.json`` at the end), so a change
to the last line, or a line appended out of band, shows too.

Entries (``event``): ``start`` (config hash, code version), ``round`` (sites asked and
answered per stage, rejected updates and why, aggregation, DP parameters and epsilon so far,
SHA-256 of the released global model), ``resume`` (a restart after round k: round entries
above it for later rounds are superseded), ``end`` (status and reason).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fl_app.checkpoint import STATE_FILE, model_file, model_sha256
from fl_app.run_folder import RunFolder

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
CODE_DIRS = ("fl_app", "strategies", "tasks")


def line_sha256(line: str) -> str:
    """SHA-256 of one audit line's text (what the next entry's ``prev_sha256`` holds)."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def code_version() -> dict[str, Any]:
    """The package version, the SHA-256 of the server's source files, the git commit."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    try:
        version = metadata.version("fedclinic")
    except metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None  # e.g. a Flower app bundle: no git there
    return {"package": version, "source_sha256": digest.hexdigest(), "git_commit": commit}


class AuditTrail:
    """Appends the run's audit entries through its RunFolder (the one writer)."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def append(self, event: str, **fields: Any) -> str:
        """Add one entry; return the SHA-256 of its line (the chain's new head)."""
        return self.run.append_chained(AUDIT_FILE, {"event": event, **fields})

    def start(self) -> str:
        """The first entry: SHA-256 of the run's config.yaml and the code version."""
        config = (self.run.path / "config.yaml").read_bytes()
        return self.append("start", config_sha256=hashlib.sha256(config).hexdigest(),
                           code=code_version())

    def round(self, server_round: int, line: dict[str, Any], exchanges: list[dict[str, Any]],
              aggregation: str, dp: dict[str, Any], ledger_lines: list[dict[str, Any]],
              model_sha: str) -> str:
        """One round: who was asked and answered, what was rejected, how it was aggregated,
        the DP parameters and each site's epsilon so far, the released model's SHA-256."""
        return self.append(
            "round", round=server_round,
            exchanges=[e for e in exchanges if e["round"] == server_round],
            rejected=line.get("rejected") or {}, skipped=line.get("skipped"),
            aggregation=aggregation, dp=dp,
            epsilon={x["site"]: x.get("epsilon") for x in ledger_lines
                     if x.get("round") == server_round},
            model_sha256=model_sha,
        )

    def head(self) -> str | None:
        """SHA-256 of the newest line (None before the first entry)."""
        return self.run.chain_head(AUDIT_FILE)


# ----- verification ---------------------------------------------------------------------


@dataclass
class Report:
    """What the verifier found."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None  # "line N: ..." for the first bad line
    models_checked: int = 0

    @property
    def intact(self) -> bool:
        """True when nothing was found wrong."""
        return self.problem is None


def _recorded_head(run_dir: Path) -> tuple[str | None, str]:
    """The chain head recorded outside audit.jsonl, and where it was found."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        head = json.loads(summary.read_text()).get("audit_sha256")
        if head:
            return str(head), "summary.json"
    state = run_dir / STATE_FILE
    if state.is_file():
        head = torch.load(state, weights_only=True).get("audit_sha256")
        if head:
            return str(head), STATE_FILE
    return None, ""


def verify(run_dir: Path) -> Report:
    """Check the chain, the recorded head, the config hash and the model checkpoints."""
    report = Report()
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        report.problem = f"{path} does not exist"
        return report
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            seq, recorded_prev = int(entry["seq"]), str(entry["prev_sha256"])
        except (ValueError, KeyError, TypeError):
            report.problem = f"line {number}: not an audit entry (edited or corrupted)"
            return report
        if seq != number - 1:
            report.problem = (f"line {number}: entry #{seq + 1} found where #{number} belongs "
                              "(a line was deleted, inserted or moved)")
            return report
        if recorded_prev != prev and number == 1:
            report.problem = "line 1: edited (its prev_sha256 is not the chain's start)"
            return report
        if recorded_prev != prev:
            # the line before this one no longer hashes to what this entry recorded
            report.problem = (f"line {number - 1}: edited (its SHA-256 no longer matches "
                              f"the prev_sha256 recorded by line {number})")
            return report
        report.entries.append(entry)
        prev = line_sha256(line)
    head, where = _recorded_head(run_dir)
    if head is not None and head != prev:
        heads = [line_sha256(line) for line in lines]
        if head in heads:
            n = heads.index(head) + 2
            report.problem = (f"line {n}: appended out of band (the run's last entry, per "
                              f"{where}, is line {n - 1})")
        else:
            report.problem = (f"line {len(lines)}: edited, or lines after it deleted (it does "
                              f"not match the last entry's SHA-256 recorded in {where})")
        return report
    report.problem = _check_contents(run_dir, report)
    return report


def _check_contents(run_dir: Path, report: Report) -> str | None:
    """Config hash of the start entry; model hash of each round's latest entry."""
    entries = report.entries
    if not entries or entries[0].get("event") != "start":
        return "line 1: the first entry is not the run's start"
    config = run_dir / "config.yaml"
    if hashlib.sha256(config.read_bytes()).hexdigest() != entries[0].get("config_sha256"):
        return "line 1: config.yaml does not match the config hash recorded at the start"
    latest: dict[int, int] = {}
    for i, entry in enumerate(entries):
        if entry.get("event") == "round":
            latest[int(entry["round"])] = i
    for server_round, i in sorted(latest.items()):
        file = run_dir / model_file(server_round)
        if not file.is_file():
            return f"line {i + 1}: {model_file(server_round)} is missing"
        if model_sha256(torch.load(file, weights_only=True)) != entries[i]["model_sha256"]:
            return (f"line {i + 1}: {model_file(server_round)} does not match the model "
                    "SHA-256 recorded for that round")
        report.models_checked += 1
    return None


def _describe(entry: dict[str, Any]) -> str:
    try:
        return _describe_entry(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return json.dumps(entry, sort_keys=True)


def _describe_entry(entry: dict[str, Any]) -> str:
    event = entry.get("event")
    if event == "start":
        code = entry.get("code", {})
        return (f"start: config {entry['config_sha256'][:12]}, code "
                f"{code.get('git_commit') or code.get('package')} "
                f"(source {str(code.get('source_sha256'))[:12]})")
    if event == "round":
        stages = "; ".join(f"{s['stage']} {len(s['answered'])}/{len(s['asked'])} answered"
                           for s in entry.get("exchanges", []))
        rejected = entry.get("rejected") or {}
        why = ", ".join(f"{s}: {r}" for s, r in sorted(rejected.items())) or "none"
        if entry.get("skipped"):
            why += f"; round skipped: {entry['skipped']}"
        eps = entry.get("epsilon") or {}
        eps_text = (", ".join(f"{s} {e:.3f}" for s, e in sorted(eps.items()) if e is not None)
                    or "n/a")
        return (f"round {entry['round']}: {stages}; rejected: {why}; aggregation "
                f"{entry['aggregation']}; DP {entry['dp'].get('mechanism')} epsilon {eps_text}; "
                f"model {entry['model_sha256'][:12]}")
    if event == "resume":
        return f"resume after round {entry['after_round']}"
    if event == "end":
        reason = f" ({entry['reason']})" if entry.get("reason") else ""
        return f"end: {entry['status']}{reason}"
    return str(event)


def main(argv: list[str] | None = None) -> None:
    """``python -m fl_app.audit <run folder>``: print a summary; exit 0 intact, 1 not."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m fl_app.audit <run folder>")
    run_dir = Path(args[0])
    report = verify(run_dir)
    print(f"audit trail of {run_dir}")
    for number, entry in enumerate(report.entries, start=1):
        print(f"  {number:3d}  {_describe(entry)}")
    if report.intact:
        print(f"fedclinic: audit trail intact: {len(report.entries)} entries chained, "
              f"config hash and {report.models_checked} model checkpoint(s) verified")
        return
    print(f"fedclinic: audit trail NOT intact: {report.problem}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
