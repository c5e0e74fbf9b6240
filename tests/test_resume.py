"""Checkpoint and resume: the server process is killed (SIGKILL) after a completed round, and
`resume=<run folder>` finishes the run in the same folder: same final metrics as an
uninterrupted run with the same seed, and the privacy ledger's epsilon keeps composing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_app.audit import verify
from fl_app.checkpoint import STATE_FILE
from strategies.accounting import epsilon

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
# Float32 sums of the site models may come in another order after a restart.
TOLERANCE = 1e-6


def _python_m_fl_app(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Own session: the kill takes the whole process group (Ray's workers included).
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fl_app", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _committed_round(out: Path) -> int:
    states = list(out.glob(f"*/{STATE_FILE}"))
    if not states:
        return 0
    try:
        return int(torch.load(states[0], weights_only=True)["round"])
    except (OSError, RuntimeError, EOFError):  # being replaced right now
        return 0


def _run_folders(out: Path) -> list[Path]:
    """The run folders under ``out`` (simulated DP sites keep their ledgers in out/site_state)."""
    return [p for p in out.iterdir() if (p / "config.yaml").is_file()]


def _run_killed_after_round(args: list[str], out: Path, k: int, log: Path) -> Path:
    """Start a run, SIGKILL its process group once round k is committed; return its folder."""
    proc = _python_m_fl_app([*args, f"output_dir={out}"], log)
    deadline = time.monotonic() + 600
    while _committed_round(out) < k:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "round k never completed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (folder,) = _run_folders(out)
    assert not (folder / "summary.json").exists(), "the run ended before the kill"
    return folder


def _resume(folder: Path, log: Path) -> dict:
    proc = _python_m_fl_app([f"resume={folder}"], log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return json.loads((folder / "summary.json").read_text())


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path: Path) -> None:
    args = ["num_rounds=4", "seed=7", "strategy=fedadam"]  # FedAdam: server state to restore
    log = tmp_path / "log.txt"
    reference = _python_m_fl_app([*args, f"output_dir={tmp_path / 'ref'}"], log)
    assert reference.wait(timeout=600) == 0, log.read_text()[-3000:]
    (ref_folder,) = _run_folders(tmp_path / "ref")
    expected = json.loads((ref_folder / "summary.json").read_text())

    folder = _run_killed_after_round(args, tmp_path / "killed", 1, log)
    killed_at = _committed_round(tmp_path / "killed")
    assert 1 <= killed_at < 4
    summary = _resume(folder, log)

    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    rounds = [json.loads(x)["round"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    for key in ("accuracy", "auc", "loss"):
        assert summary["pooled"][key] == pytest.approx(expected["pooled"][key], abs=TOLERANCE)
    # the audit trail of the killed and resumed run verifies, the restart recorded in it
    report = verify(folder)
    assert report.intact, report.problem
    assert {"event": "resume", "after_round": killed_at}.items() <= next(
        e for e in report.entries if e["event"] == "resume").items()
    assert report.models_checked == 4
    final = torch.load(folder / "final_model.pt", weights_only=True)
    ref = torch.load(ref_folder / "final_model.pt", weights_only=True)
    for name, tensor in ref.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-5)


def test_epsilon_keeps_composing_across_a_restart(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    folder = _run_killed_after_round(["privacy=central_dp", "num_rounds=3"], tmp_path / "runs",
                                     1, log)
    _resume(folder, log)
    lines = [json.loads(x) for x in (folder / "privacy_ledger.jsonl").read_text().splitlines()]
    for site in {line["site"] for line in lines}:
        own = sorted((x for x in lines if x["site"] == site), key=lambda x: x["round"])
        assert [x["round"] for x in own] == [1, 2, 3]
        eps = [x["epsilon"] for x in own]
        assert eps[0] < eps[1] < eps[2], eps  # no reset at the restart
        # round 3's epsilon is the accountant's for the three releases recorded
        history = [(x["noise_multiplier"], x["sample_rate"], 1) for x in own]
        assert eps[2] == pytest.approx(epsilon(history, own[2]["delta"], "rdp"), rel=1e-6)
