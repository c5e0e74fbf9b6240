"""End to end: a real consortium on 127.0.0.1, set up only with scripts/deploy.

One SuperLink (TLS with the consortium CA, SuperNode authentication, SQLite state) and
real hospital SuperNodes, each serving one hospital's file of the UCI heart-disease data.
Shown here:
- an unregistered SuperNode is refused; a SuperNode without the CA certificate (or with
  another CA) cannot connect, and says why;
- fedclinic runs through ``flwr run`` with three hospitals while a fourth is killed (SIGKILL,
  like a crashed machine) right after the first round began: the run completes with the
  remaining three (``on_site_failure=continue``), with per-site metrics and a sensible
  accuracy;
- with ``on_site_failure=stop`` a hospital that shuts down mid-run ends the run with a clear
  message and a summary.json, and the SuperLink keeps serving;
- afterwards no process started here is left running and no port is left bound.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy_harness import (
    Federation,
    ProcessRunner,
    deploy_env,
    free_port,
    port_is_free,
    process_cwd,
    run_folder,
    wait_for,
)

pytestmark = pytest.mark.e2e

HOSPITALS = ["cleveland", "hungary", "va"]  # connected throughout
DROPOUT = "switzerland"  # joins, then dies mid-run
UNREGISTERED = "intruder"  # has a key pair, never registered
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Federation]:
    """SuperLink + the three hospitals' SuperNodes; everything stopped by PID afterwards."""
    root = tmp_path_factory.mktemp("deployment")
    runner = ProcessRunner(root / "logs", deploy_env())
    fed = Federation(root=root, data_dir=shared_data / "heart_disease", runner=runner)
    try:
        fed.make_pki([*HOSPITALS, DROPOUT], unregistered=[UNREGISTERED])
        fed.start_superlink()
        fed.register([*HOSPITALS, DROPOUT])
        for site in HOSPITALS:
            fed.start_supernode(site, site)
        fed.wait_connected(HOSPITALS)
        yield fed
    finally:
        runner.stop_all()
        leftovers = runner.describe(runner.tagged_pids())
        bound = sorted(p for p in fed.ports if not port_is_free(p))
        assert not leftovers, f"processes left running: {leftovers}"
        assert not bound, f"ports still bound after teardown: {bound}"


@pytest.fixture
def dropout_hospital(federation: Federation) -> Iterator[Callable[[str], str]]:
    """Start the Switzerland SuperNode under a given process name; if a test ends before it
    killed it, stop it gracefully (it deactivates, so the next test can use the same key)."""
    started: list[str] = []

    def start(name: str) -> str:
        federation.start_supernode(name, DROPOUT)
        started.append(name)
        federation.wait_connected([name])
        return name

    yield start
    for name in started:
        proc = federation.runner.procs[name]
        if proc.poll() is None:
            federation.runner.signal_group(name, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {proc.args!r} still running after {timeout:.0f}s")


def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    """A SuperNode whose key the coordinating centre never registered is turned away."""
    proc = federation.start_supernode(
        "unregistered", UNREGISTERED, data_path=federation.data_dir / "processed.va.data",
        extra=["--max-retries", "1"],
    )
    rc = _wait_exit(proc, 90)
    log = federation.runner.log("unregistered")
    assert rc != 0, log
    assert "[code: 2004] Failed to activate SuperNode" in log, log
    assert "key is not registered at the SuperLink" in log, log  # our hint for the IT team
    assert "SuperNode ID:" not in log


def test_supernode_without_the_ca_certificate_cannot_connect(federation: Federation) -> None:
    """Without the consortium CA the SuperLink's certificate is not trusted: no connection."""
    fed = federation
    # Flower's own SuperNode with no --root-certificates falls back to the system CAs.
    raw = fed.runner.start("no-ca", [
        str(Path(sys.executable).parent / "flower-supernode"), "--superlink", fed.address,
        "--auth-supernode-private-key", str(fed.keys / "hungary"),
        "--node-config", f'data-path="{fed.data_dir / "processed.hungarian.data"}" '
                         'site-name="hungary"',
        "--port", str(free_port(fed.ports)), "--max-retries", "1", "--max-wait-time", "8",
    ], env={"FLWR_HOME": str(fed.root / "flwr-home-no-ca")})
    # Our launcher with another consortium's CA: stops before starting Flower, and says why.
    fed.script("pki", "ca", "--out", fed.root / "other-ca", "--name", "some other CA")
    wrong = fed.start_supernode("wrong-ca", "hungary", ca=fed.root / "other-ca" / "ca.crt")
    rc_raw, rc_wrong = _wait_exit(raw, 90), _wait_exit(wrong, 60)
    raw_log, wrong_log = fed.runner.log("no-ca"), fed.runner.log("wrong-ca")
    assert rc_raw != 0 and "CERTIFICATE_VERIFY_FAILED" in raw_log, raw_log
    assert "SuperNode ID:" not in raw_log
    assert rc_wrong == 4, wrong_log
    assert "presented a certificate that" in wrong_log and "does not accept" in wrong_log
    assert "SuperNode ID:" not in wrong_log


def _run_until_sites_known(fed: Federation, name: str, overrides: str,
                           output_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Submit a run; return once its query round is done (sites.json written)."""
    proc = fed.submit(name, overrides)

    def sites_known() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flwr run ended early:\n{fed.runner.log(name)}")
        folder = run_folder(output_dir)
        return folder is not None and (folder / "sites.json").is_file()

    wait_for("the run's query round", sites_known, 150)
    folder = run_folder(output_dir)
    assert folder is not None
    return proc, folder


def test_three_hospitals_complete_a_run_while_a_fourth_is_killed(
    federation: Federation, dropout_hospital: Callable[[str], str], tmp_path: Path
) -> None:
    """flwr run with min_sites=3, on_site_failure=continue; the fourth hospital is SIGKILLed
    right after the query round, before it can send a model update."""
    fed = federation
    dropout = dropout_hospital(DROPOUT)
    output_dir = tmp_path / "runs"
    overrides = (f"task=heart_disease num_rounds=2 min_sites=3 on_site_failure=continue "
                 f"output_dir={output_dir}")
    started = time.monotonic()
    proc, folder = _run_until_sites_known(fed, "run-continue", overrides, output_dir)
    sites = {s["name"] for s in json.loads((folder / "sites.json").read_text())["sites"]}
    assert sites == {*HOSPITALS, DROPOUT}
    # The ServerApp runs in flwr-serverapp, started by the SuperLink: it works in the
    # SuperLink's working directory (docs/deployment.md relies on this).
    assert process_cwd(fed.runner, "flwr-serverapp") == fed.workdir.resolve()
    fed.runner.signal_group(dropout, signal.SIGKILL)  # the machine dies, ClientApp and all

    rc = _wait_exit(proc, RUN_TIMEOUT_S)
    log = fed.runner.log("run-continue")
    elapsed = time.monotonic() - started
    assert rc == 0, log
    summary = json.loads((folder / "summary.json").read_text())
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed", summary
    assert summary["rounds_completed"] == 2 and len(lines) == 2
    assert set(summary["per_site"]) == set(HOSPITALS), summary["per_site"]
    for line in lines:  # every round: metrics of the three hospitals, the dead one missing
        assert set(line["per_site"]) == set(HOSPITALS), line
        assert line["missing_sites"] == [DROPOUT], line
        assert all(m["num-examples"] > 0 for m in line["per_site"].values())
    assert summary["mean_site_accuracy"] >= 0.7, summary
    assert all(m["accuracy"] >= 0.6 for m in summary["per_site"].values()), summary["per_site"]
    failed = {(f["site"], f["round"], f["stage"]) for f in summary["site_failures"]}
    assert (DROPOUT, 1, "train") in failed, summary["site_failures"]
    assert f"no result from site {DROPOUT}" in log, log
    assert fed.runner.procs["superlink"].poll() is None, "the SuperLink must keep running"
    print(f"\nrun with a killed hospital: {elapsed:.0f}s, mean site accuracy "
          f"{summary['mean_site_accuracy']:.3f}")


def test_on_site_failure_stop_ends_the_run_with_a_clear_message(
    federation: Federation, dropout_hospital: Callable[[str], str], tmp_path: Path
) -> None:
    """on_site_failure=stop: a hospital shutting its SuperNode down (SIGTERM) ends the run;
    summary.json says why; the SuperLink keeps serving."""
    fed = federation
    name = dropout_hospital(f"{DROPOUT}-2")  # same key: the same registered node, restarted
    output_dir = tmp_path / "runs"
    overrides = (f"task=heart_disease num_rounds=2 min_sites=3 on_site_failure=stop "
                 f"output_dir={output_dir}")
    proc, folder = _run_until_sites_known(fed, "run-stop", overrides, output_dir)
    fed.runner.signal_group(name, signal.SIGTERM)

    rc = _wait_exit(proc, 150)
    log = fed.runner.log("run-stop")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert DROPOUT in summary["reason"] and "on_site_failure=stop" in summary["reason"]
    assert "fedclinic: stopping after" in log and DROPOUT in log, log
    assert rc == 0  # flwr run --stream itself ended normally; the run's end is in the log
    assert fed.runner.procs["superlink"].poll() is None, "the SuperLink must keep running"
    assert fed.runner.procs[HOSPITALS[0]].poll() is None, "other hospitals keep running"


def test_a_removed_hospital_is_refused(federation: Federation) -> None:
    """Removing a hospital (docs/deployment.md): unregister its key; its SuperNode can then
    no longer join."""
    fed = federation
    fed.script("node_keys", "create", "--out", fed.keys, "--site", "leaver")
    fed.register(["leaver"])
    out = fed.script("node_keys", "unregister", "--site", "leaver", "--connection", "fedclinic",
                     "--registry", fed.keys / "registry.json")
    assert f"unregistered SuperNode {fed.node_ids['leaver']}" in out
    assert "leaver" not in json.loads((fed.keys / "registry.json").read_text())
    proc = fed.start_supernode("leaver", "leaver",
                               data_path=fed.data_dir / "processed.va.data",
                               extra=["--max-retries", "1"])
    rc = _wait_exit(proc, 90)
    log = fed.runner.log("leaver")
    assert rc != 0 and "SuperNode ID:" not in log, log
    assert "key is not registered at the SuperLink" in log, log
