"""The audit trail's verifier: an intact run folder verifies; editing, deleting, reordering or
appending a line of audit.jsonl, a swapped model checkpoint or an edited config is caught,
naming the first bad line. (A real run's trail is verified in tests/test_resume.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import FedAvg

from fl_app.audit import AUDIT_FILE, AuditTrail, line_sha256, verify
from fl_app.checkpoint import commit_round, model_file, save_round_model
from fl_app.config import compose_config
from fl_app.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder written by the same code a run uses: 3 rounds, checkpoints, trail."""
    run = RunFolder.create(compose_config(f"output_dir={tmp_path}"))
    audit = AuditTrail(run)
    audit.start()
    torch.manual_seed(0)
    for k in range(1, ROUNDS + 1):
        model = {"0.weight": torch.randn(1, 30), "0.bias": torch.randn(1)}
        sha = save_round_model(run, k, model)
        exchanges = [{"round": k, "stage": "train", "asked": ["a", "b"], "answered": ["a"]}]
        head = audit.round(k, {"rejected": {"b": "NaN in update"}}, exchanges, "FedAvg",
                           {"mechanism": "none"}, [], sha)
        commit_round(run, k, sha, FedAvg(), head)
    head = audit.append("end", status="completed", reason=None)
    run.write_json("summary.json", {"status": "completed", "audit_sha256": head})
    return run.path


def _lines(run_dir: Path) -> list[str]:
    return (run_dir / AUDIT_FILE).read_text().splitlines()


def _write(run_dir: Path, lines: list[str]) -> None:
    (run_dir / AUDIT_FILE).write_text("\n".join(lines) + "\n")


def _edit_line(number: int) -> Callable[[Path], None]:
    def edit(run_dir: Path) -> None:
        lines = _lines(run_dir)
        lines[number - 1] = lines[number - 1].replace('"NaN in update"', '"ok"').replace(
            '"completed"', '"failed"')
        _write(run_dir, lines)
    return edit


def _delete_line(number: int) -> Callable[[Path], None]:
    def delete(run_dir: Path) -> None:
        lines = _lines(run_dir)
        del lines[number - 1]
        _write(run_dir, lines)
    return delete


def _swap_lines(run_dir: Path) -> None:
    lines = _lines(run_dir)
    lines[1], lines[2] = lines[2], lines[1]
    _write(run_dir, lines)


def _append_forged(run_dir: Path) -> None:
    # chained correctly, as a forger who knows the format would: only the head recorded
    # outside the file (summary.json) gives it away
    lines = _lines(run_dir)
    forged = {"event": "round", "round": 4, "seq": len(lines), "prev_sha256":
              line_sha256(lines[-1])}
    _write(run_dir, [*lines, json.dumps(forged)])


def _append_junk(run_dir: Path) -> None:
    _write(run_dir, [*_lines(run_dir), '{"note": "added later"}'])


def _swap_model(run_dir: Path) -> None:
    torch.save({"0.weight": torch.zeros(1, 30), "0.bias": torch.zeros(1)},
               run_dir / model_file(2))


def _edit_config(run_dir: Path) -> None:
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("num_rounds: 10", "num_rounds: 11"))


def test_an_intact_run_folder_verifies_and_the_cli_exits_0(run_dir: Path) -> None:
    report = verify(run_dir)
    assert report.intact, report.problem
    assert [e["event"] for e in report.entries] == ["start", "round", "round", "round", "end"]
    assert report.models_checked == ROUNDS
    proc = subprocess.run([sys.executable, "-m", "fl_app.audit", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "rejected: b: NaN in update" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("fedclinic: audit trail intact")


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (_edit_line(2), "line 2: edited"),
        (_edit_line(5), "line 5: edited"),  # the last line: caught by summary.json's head
        (_delete_line(3), "line 3: entry #4 found where #3 belongs"),
        (_delete_line(5), "line 4: edited, or lines after it deleted"),
        (_swap_lines, "line 2: entry #3 found where #2 belongs"),
        (_append_forged, "line 6: appended out of band"),
        (_append_junk, "line 6: not an audit entry"),
        (_swap_model, "line 3: checkpoints/round_2.pt does not match"),
        (_edit_config, "line 1: config.yaml does not match"),
    ],
    ids=["edit", "edit-last", "delete", "delete-last", "reorder", "append-forged",
         "append-junk", "model-swapped", "config-edited"],
)
def test_tampering_is_caught_at_the_first_bad_line(
    run_dir: Path, tamper: Callable[[Path], None], problem: str
) -> None:
    tamper(run_dir)
    report = verify(run_dir)
    assert report.problem is not None and report.problem.startswith(problem), report.problem


def test_the_cli_exits_1_naming_the_bad_line(run_dir: Path) -> None:
    _edit_line(2)(run_dir)
    proc = subprocess.run([sys.executable, "-m", "fl_app.audit", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "fedclinic: audit trail NOT intact: line 2: edited")
