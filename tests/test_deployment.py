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
- ``submit.py`` exits 0 for a completed run and non-zero for a failed one, whose reason is
  its last line (no traceback); no finished ``flwr-clientapp`` is left as a zombie;
- a hospital removed while its SuperNode runs is told so (exit status 5) and stays out; a
  site's key is rotated by one command (new key admitted, old key refused);
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
    CONNECTION,
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
    assert rc == 5, log  # docs/deployment.md: key not registered, a restart will not help
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
    assert log.rstrip().endswith("completed"), log[-500:]
    # SuperExec starts one flwr-clientapp per message; every finished one has been reaped
    wait_for("finished flwr-clientapp processes reaped",
             lambda: not fed.zombies("flwr-clientapp"), 10, 0.2)
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
    # the run did not complete: submit.py says so with the reason as its last line
    assert rc == 1, log
    last = log.rstrip().splitlines()[-1]
    assert last.startswith("error: run ") and " failed: " in last and DROPOUT in last, last
    assert "Traceback" not in log and "Exit Code: 201" not in log, log
    assert fed.runner.procs["superlink"].poll() is None, "the SuperLink must keep running"
    assert fed.runner.procs[HOSPITALS[0]].poll() is None, "other hospitals keep running"


def _last_line(text: str) -> str:
    return text.rstrip().splitlines()[-1]


def test_submit_exits_non_zero_for_a_run_that_fails(federation: Federation,
                                                     tmp_path: Path) -> None:
    """Too few hospitals for min_sites: the run fails; submit.py exits 1 and its last line is
    the reason, without Flower's traceback."""
    proc = federation.submit("run-too-few", f"task=heart_disease min_sites=9 "
                             f"wait_for_nodes_s=2 output_dir={tmp_path / 'runs'}")
    rc = _wait_exit(proc, 150)
    log = federation.runner.log("run-too-few")
    assert rc == 1, log
    last = _last_line(log)
    assert last.startswith("error: run ") and "failed: only" in last and "of 9 SuperNodes" in last
    assert "Traceback" not in log and "Exit Code: 201" not in log, log


def test_a_hospital_removed_while_running_is_told_why_and_stays_out(
    federation: Federation,
) -> None:
    """Removing a hospital (docs/deployment.md): unregister its key while its SuperNode runs.
    The SuperNode ends with exit status 5 and says why; the key cannot be registered again;
    a restart with it is refused."""
    fed = federation
    fed.script("node_keys", "create", "--out", fed.keys, "--site", "leaver")
    fed.register(["leaver"])
    proc = fed.start_supernode("leaver", "leaver", data_path=fed.data_dir / "processed.va.data")
    fed.wait_connected(["leaver"])
    out = fed.script("node_keys", "unregister", "--site", "leaver", "--connection", CONNECTION)
    assert f"unregistered SuperNode {fed.node_ids['leaver']}" in out
    assert "cannot be registered again" in out
    assert "leaver" not in json.loads(fed.registry.read_text())
    rc = _wait_exit(proc, 90)
    log = fed.runner.log("leaver")
    assert rc == 5, log
    assert "its key was unregistered" in _last_line(log), log

    again = fed.run_script("node_keys", "register", fed.keys / "leaver.pub",
                           "--connection", CONNECTION)
    assert again.returncode == 2 and "cannot be registered again" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    restart = fed.start_supernode("leaver-restart", "leaver",
                                  data_path=fed.data_dir / "processed.va.data",
                                  extra=["--max-retries", "1"])
    rc = _wait_exit(restart, 90)
    log = fed.runner.log("leaver-restart")
    assert rc == 5 and "SuperNode ID:" not in log, log
    assert "key is not registered at the SuperLink" in log, log


def test_key_rotation_by_one_command(federation: Federation) -> None:
    """`node_keys.py rotate`: the site's new key is registered, its old node removed by id;
    registering the site again without rotating is refused; `list` shows the new node."""
    fed = federation
    fed.script("node_keys", "create", "--out", fed.keys, "--site", "rotor")
    fed.register(["rotor"])
    old_id = fed.node_ids["rotor"]
    fed.script("node_keys", "create", "--out", fed.keys, "--site", "rotor-2027")
    refused = fed.run_script("node_keys", "register", fed.keys / "rotor-2027.pub",
                             "--site", "rotor", "--connection", CONNECTION)
    assert refused.returncode == 2 and "already has an active key" in refused.stderr
    assert "node_keys.py rotate" in refused.stderr

    out = fed.script("node_keys", "rotate", fed.keys / "rotor-2027.pub", "--site", "rotor",
                     "--connection", CONNECTION)
    entry = json.loads(fed.registry.read_text())["rotor"]
    new_id = int(entry["node_id"])
    assert new_id != old_id and f"old SuperNode {old_id} unregistered" in out, out
    assert entry["fingerprint"] == _last_line(fed.script("node_keys", "fingerprint",
                                                         fed.keys / "rotor-2027.pub"))

    new = fed.start_supernode("rotor-new", "rotor", key=fed.keys / "rotor-2027",
                              data_path=fed.data_dir / "processed.va.data")
    old = fed.start_supernode("rotor-old", "rotor", key=fed.keys / "rotor",
                              data_path=fed.data_dir / "processed.va.data",
                              extra=["--max-retries", "1"])
    fed.wait_connected(["rotor-new"])
    listing = fed.script("node_keys", "list", "--connection", CONNECTION)
    row = next(line.split() for line in listing.splitlines() if line.startswith("rotor "))
    assert row == ["rotor", str(new_id), entry["fingerprint"], "online"], listing
    rc = _wait_exit(old, 90)
    log = fed.runner.log("rotor-old")
    assert rc == 5 and "SuperNode ID:" not in log, log
    fed.runner.signal_group("rotor-new", signal.SIGTERM)  # stopped on request: status 0
    assert _wait_exit(new, 60) == 0, fed.runner.log("rotor-new")


def test_secure_aggregation_across_real_supernodes(federation: Federation, tmp_path: Path) -> None:
    """secagg=secaggplus over TLS + SuperNode authentication: key advertisement, share
    exchange, masked training and unmasking travel as real messages between the SuperLink
    and the hospitals' SuperNodes; the server ends with the aggregate of all three."""
    fed = federation
    output_dir = tmp_path / "runs"
    overrides = (f"task=heart_disease num_rounds=2 min_sites=3 secagg=secaggplus "
                 f"output_dir={output_dir}")
    proc = fed.submit("run-secagg", overrides)
    rc = _wait_exit(proc, RUN_TIMEOUT_S)
    log = fed.runner.log("run-secagg")
    folder = run_folder(output_dir)
    assert rc == 0 and folder is not None, log
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["secure_aggregation"] == "secaggplus"
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["aggregated_sites"] == sorted(HOSPITALS), line
    assert "secure aggregation (secaggplus): round 2 sum of 3 site(s) unmasked" in log, log
    assert summary["mean_site_accuracy"] >= 0.7, summary
