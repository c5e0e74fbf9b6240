"""End to end: a real consortium, set up only with scripts/deploy.

The coordinating centre (Caddy front door on the public port, Fleet API only; the SuperLink
with TLS, SuperNode authentication and SQLite state on the centre's loopback), real hospital
SuperNodes each serving one hospital's file of the UCI heart-disease data, an outsider and the
researcher: each on its own machine, i.e. its own Linux network namespace (tests/deploy_harness
``Hosts``), or all on 127.0.0.1 where namespaces cannot be made (the tests that only mean
something between machines then skip, saying why). Shown here:
- the public port admits only the Fleet API: an outsider's ``flwr run``, a plain HTTPS POST to
  ``/v1/control/start-run``, ``flwr supernode register``/``unregister`` and ``/v1/runtime/``
  are refused there and no run starts; the SuperLink itself is unreachable from other machines;
- the SuperLink's state files and secret are owner-only, and no Flower process runs with
  telemetry on;
- a registered hospital started with another hospital's site-name is refused (log and
  summary.json ``refused_nodes``) while the other hospitals' run completes;
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
- runs are submitted through the centre's own route and record the app's FAB hash that
  submit.py printed;
- afterwards (``superlink.py --stop``, then by PID) no proxy, SuperLink or SuperNode process is
  left running and no port is left bound.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy_harness import (
    CONNECTION,
    OUTSIDER,
    PUBLIC_CONNECTION,
    PYTHON,
    REPO,
    Federation,
    Hosts,
    ProcessRunner,
    deploy_env,
    free_port,
    process_cwd,
    run_folder,
    wait_for,
)

pytestmark = pytest.mark.e2e

HOSPITALS = ["cleveland", "hungary", "va"]  # connected throughout
DROPOUT = "switzerland"  # joins, then dies mid-run
UNREGISTERED = "intruder"  # has a key pair, never registered
RUN_TIMEOUT_S = 600  # an upper bound only: runs take 1-2 min idle, 4-5 min at load 30+
IMPOSTOR_CLAIMS = "hungary"  # Switzerland's registered key, started with Hungary's site-name
REGISTRY = "site_registry=registry.json"  # relative: the SuperLink's --workdir


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Federation]:
    """The centre + the three hospitals' SuperNodes, each on its own host where namespaces
    can be made; everything stopped and the namespaces deleted afterwards."""
    root = tmp_path_factory.mktemp("deployment")
    # every process started here gets its own FLWR_HOME; telemetry and the update check are
    # the scripts' business (test_state_is_private_and_telemetry_is_off checks they do it)
    env = deploy_env()
    for name in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        env.pop(name, None)
    runner = ProcessRunner(root / "logs", env)
    reason = (Hosts.unavailable_reason() if os.environ.get("FEDCLINIC_DEPLOY_NETNS", "1") != "0"
              else "FEDCLINIC_DEPLOY_NETNS=0")
    fed = Federation(root=root, data_dir=shared_data / "heart_disease", runner=runner,
                     hosts=None if reason else Hosts())
    fed.loopback_reason = reason  # type: ignore[attr-defined]
    try:
        fed.make_pki([*HOSPITALS, DROPOUT], unregistered=[UNREGISTERED])
        fed.start_superlink()
        fed.register([*HOSPITALS, DROPOUT])
        for site in HOSPITALS:
            fed.start_supernode(site, site)
        fed.wait_connected(HOSPITALS)
        yield fed
    finally:
        leftovers, bound = fed.teardown()
        assert not leftovers, f"processes left running: {leftovers}"
        assert not bound, f"ports still bound after teardown: {bound}"


def _between_hosts(fed: Federation) -> None:
    """Skip a check that only means something between separate machines."""
    reason = getattr(fed, "loopback_reason", None)
    if reason:
        pytest.skip(f"all on 127.0.0.1 ({reason}): reachability between hosts is not shown")


@pytest.fixture
def dropout_hospital(federation: Federation) -> Iterator[Callable[..., str]]:
    """Start the Switzerland SuperNode under a given process name; if a test ends before it
    killed it, stop it gracefully (it deactivates, so the next test can use the same key)."""
    started: list[str] = []

    def start(name: str, extra: list[str] | None = None) -> str:
        federation.start_supernode(name, DROPOUT, extra=extra)
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
    raw = fed.runner.start("no-ca", fed.on("hungary", [
        str(Path(sys.executable).parent / "flower-supernode"), "--superlink", fed.address,
        "--auth-supernode-private-key", str(fed.keys / "hungary"),
        "--node-config", f'data-path="{fed.data_dir / "processed.hungarian.data"}" '
                         'site-name="hungary"',
        "--port", str(free_port(fed.ports)), "--max-retries", "1", "--max-wait-time", "8",
    ]), env={"FLWR_HOME": str(fed.root / "flwr-home-no-ca")})
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
                 f"{REGISTRY} output_dir={output_dir}")
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
    # submitted through the centre's own route; the app version is on record for hospitals
    printed = re.search(r"FAB sha256 ([0-9a-f]{64})", log)
    assert printed and summary["app"]["fab_hash"] == printed.group(1), (summary["app"], log)
    assert summary["app"]["fab_id"].endswith("/fedclinic") and summary["refused_nodes"] == []
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
                 f"{REGISTRY} output_dir={output_dir}")
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
    and the hospitals' SuperNodes (each one a fresh ClientApp process: one round, 6 of
    them per hospital); the server ends with the aggregate of all three."""
    fed = federation
    output_dir = tmp_path / "runs"
    overrides = (f"task=heart_disease num_rounds=1 min_sites=3 secagg=secaggplus "
                 f"{REGISTRY} output_dir={output_dir}")
    proc = fed.submit("run-secagg", overrides)
    rc = _wait_exit(proc, 2 * RUN_TIMEOUT_S)
    log = fed.runner.log("run-secagg")
    folder = run_folder(output_dir)
    assert rc == 0 and folder is not None, log
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["secure_aggregation"] == "secaggplus"
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["aggregated_sites"] == sorted(HOSPITALS), lines
    assert "secure aggregation (secaggplus): round 1 sum of 3 site(s) unmasked" in log, log
    assert summary["mean_site_accuracy"] >= 0.65, summary


def _runs_at_the_centre(fed: Federation) -> list[dict[str, object]]:
    """The SuperLink's runs, listed through the centre's own route."""
    done = fed.run([str(Path(PYTHON).parent / "flwr"), "ls", CONNECTION, "--format", "json"])
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])["runs"]


# Plain HTTPS requests from the outsider's machine, verified with the consortium CA (public).
_RAW_REQUESTS = """
import http.client, json, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {}
for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"),
                     ("POST", "/v1/runtime/pull-messages"), ("GET", "/v1/runtime/"),
                     ("POST", "/v1/fleet/../control/start-run"), ("GET", "/v1/fleet/get-run"),
                     ("POST", "/v1/fleet/pull-messages")]:
    conn = http.client.HTTPSConnection(host, port, timeout=20,
                                       context=ssl.create_default_context(cafile=ca))
    conn.request(method, path, body=b"" if method == "POST" else None,
                 headers={"Content-Type": "application/protobuf"})
    reply = conn.getresponse()
    out[f"{method} {path}"] = [reply.status, reply.read().decode(errors="replace")[:200]]
    conn.close()
print(json.dumps(out))
"""


def test_public_port_admits_only_the_fleet_api(federation: Federation) -> None:
    """From an outsider's machine holding only ca.crt: Control and Runtime API requests to the
    public port are refused (flwr run, a raw start-run POST, supernode register/unregister),
    no run starts and no registration changes; the Fleet API is served (401 without a
    SuperNode signature)."""
    fed = federation
    runs_before = _runs_at_the_centre(fed)
    flwr = str(Path(PYTHON).parent / "flwr")
    attempt = fed.run([flwr, "run", str(REPO), PUBLIC_CONNECTION, "--run-config",
                       'overrides="task=heart_disease num_rounds=1 output_dir=/tmp/x"'],
                      host=OUTSIDER, timeout=120)
    out = attempt.stdout + attempt.stderr
    assert attempt.returncode != 0 and "403 Forbidden" in out and "start-run" in out, out
    assert "Successfully started run" not in out
    register = fed.run([flwr, "supernode", "register", str(fed.keys / f"{UNREGISTERED}.pub"),
                        PUBLIC_CONNECTION], host=OUTSIDER)
    unregister = fed.run([flwr, "supernode", "unregister", str(fed.node_ids[HOSPITALS[0]]),
                          PUBLIC_CONNECTION], host=OUTSIDER)
    for done, path in ((register, "register-node"), (unregister, "unregister-node")):
        text = done.stdout + done.stderr
        assert done.returncode != 0 and "403 Forbidden" in text and path in text, text
    raw = fed.run([PYTHON, "-c", _RAW_REQUESTS, fed.public_host, str(fed.public_port),
                   str(fed.certs / "ca.crt")], host=OUTSIDER)
    assert raw.returncode == 0, raw.stderr
    status = {k: v[0] for k, v in json.loads(raw.stdout).items()}
    refused = {k: s for k, s in status.items() if k != "POST /v1/fleet/pull-messages"}
    assert set(refused.values()) == {403}, status
    assert "Fleet API (SuperNodes) only" in json.loads(raw.stdout)["POST /v1/control/start-run"][1]
    assert status["POST /v1/fleet/pull-messages"] == 401, status  # reached the SuperLink
    # nothing changed at the centre: no new run, the hospital still registered and online
    ids = [r["run-id"] for r in _runs_at_the_centre(fed)]
    assert ids == [r["run-id"] for r in runs_before], "a run started through the public port"
    nodes = fed.run([flwr, "supernode", "ls", CONNECTION, "--format", "json"])
    assert str(fed.node_ids[HOSPITALS[0]]) in nodes.stdout, nodes.stdout + nodes.stderr
    assert fed.runner.procs[HOSPITALS[0]].poll() is None


def test_the_superlink_itself_is_unreachable_from_other_hosts(federation: Federation) -> None:
    """The SuperLink (Control and Runtime API) listens on the centre's loopback only: from
    the outsider's or a hospital's machine its port does not answer; the front door does."""
    fed = federation
    _between_hosts(fed)
    probe = ("import socket, sys\n"
             "for port in sys.argv[2:]:\n"
             "    try:\n"
             "        socket.create_connection((sys.argv[1], int(port)), timeout=5).close()\n"
             "        print(port, 'open')\n"
             "    except OSError as err:\n"
             "        print(port, type(err).__name__)\n")
    for host in (OUTSIDER, HOSPITALS[0]):
        done = fed.run([PYTHON, "-c", probe, fed.public_host, str(fed.link_port),
                        str(fed.public_port)], host=host)
        lines = dict(line.split() for line in done.stdout.splitlines())
        assert lines == {str(fed.link_port): "ConnectionRefusedError",
                         str(fed.public_port): "open"}, (host, done.stdout, done.stderr)
    # ... while on the centre's own host the Control API answers (the route runs take)
    assert _runs_at_the_centre(fed) is not None


def test_state_is_private_and_telemetry_is_off(federation: Federation) -> None:
    """state.db (run messages: model updates, metrics), the SuperExec secrets, the generated
    Caddyfile and the PID file are owner-only; every Flower process runs with telemetry off
    and the SuperExec shared secret, though the environment the scripts got set neither."""
    fed = federation
    state = fed.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [state / n for n in ("state.db", "superexec.secret", "Caddyfile", "superlink.pids")]
    files += [p for p in state.glob("state.db-*")]
    files += [fed.root / f"supernode-state-{site}" / "superexec.secret" for site in HOSPITALS]
    files.append(fed.registry)  # the site registry node_keys.py keeps
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path}: {oct(path.stat().st_mode)}"
    assert "FLWR_TELEMETRY_ENABLED" not in fed.runner.env
    flower = ("flower-superlink", "flower-supernode", "flower-superexec", "superexec.py",
              "flwr-serverapp", "flwr-clientapp")
    seen: dict[str, int] = {}
    for pid in fed.runner.tagged_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        program = next((p for p in flower if any(p.encode() in part for part in cmdline)), None)
        if program is None:
            continue
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"FLWR_TELEMETRY_ENABLED=0" in environ, (pid, cmdline)
        assert b"FLWR_DISABLE_UPDATE_CHECK=1" in environ, (pid, cmdline)
        if program != "flwr-clientapp" and program != "flwr-serverapp":
            assert b"--superexec-auth-secret-file" in cmdline, (pid, cmdline)
        seen[program] = seen.get(program, 0) + 1
    assert seen.get("flower-superlink") == 1 and seen.get("flower-supernode", 0) >= 3, seen
    # the centre's SuperExec, and each hospital's (run through superexec.py)
    assert seen.get("flower-superexec") == 1 and seen.get("superexec.py", 0) >= 3, seen


def test_a_hospital_claiming_another_site_is_refused_and_the_run_completes(
    federation: Federation, tmp_path: Path
) -> None:
    """Switzerland's registered SuperNode started with site-name=hungary: the ServerApp checks
    the claim against the registry (site_registry), refuses that node (log + summary.json
    refused_nodes) and the three genuine hospitals complete the run."""
    fed = federation
    impostor = "impostor"
    fed.start_supernode(impostor, IMPOSTOR_CLAIMS, key=fed.keys / DROPOUT,
                        data_path=fed.data_dir / "processed.switzerland.data", host=DROPOUT)
    try:
        fed.wait_connected([impostor])
        output_dir = tmp_path / "runs"
        proc = fed.submit("run-impostor", f"task=heart_disease num_rounds=1 min_sites=3 "
                                          f"{REGISTRY} output_dir={output_dir}")
        rc = _wait_exit(proc, RUN_TIMEOUT_S)
        log = fed.runner.log("run-impostor")
        assert rc == 0, log
        folder = run_folder(output_dir)
        assert folder is not None, log
        summary = json.loads((folder / "summary.json").read_text())
        node = fed.node_ids[DROPOUT]
        assert summary["status"] == "completed" and summary["rounds_completed"] == 1, summary
        assert summary["refused_nodes"] == [{
            "node_id": node, "claimed_site": IMPOSTOR_CLAIMS, "registered_site": DROPOUT,
            "reason": f"claims site '{IMPOSTOR_CLAIMS}' but is registered as '{DROPOUT}'"}]
        assert f"refused node {node} (claims site '{IMPOSTOR_CLAIMS}')" in log, log
        assert set(summary["per_site"]) == set(HOSPITALS), summary["per_site"]
        assert summary["sites"] == sorted(HOSPITALS)
        sites = json.loads((folder / "sites.json").read_text())["sites"]
        assert sorted(s["name"] for s in sites) == sorted(HOSPITALS)
        assert summary["mean_site_accuracy"] >= 0.6, summary
    finally:
        fed.runner.signal_group(impostor, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            fed.runner.procs[impostor].wait(timeout=30)


def _privacy_run(fed: Federation, name: str, output_dir: Path) -> list[dict]:
    overrides = ("task=heart_disease privacy=local_dp privacy.noise_multiplier=3.0 "
                 f"privacy.target_epsilon=null num_rounds=2 min_sites=4 output_dir={output_dir}")
    proc, folder = _run_until_sites_known(fed, name, overrides, output_dir)
    rc = _wait_exit(proc, RUN_TIMEOUT_S)
    assert rc == 0, fed.runner.log(name)
    return [json.loads(x) for x in (folder / "privacy_ledger.jsonl").read_text().splitlines()]


def test_privacy_ledger_survives_a_supernode_restart_and_the_cap_binds(
    federation: Federation, dropout_hospital: Callable[..., str], tmp_path: Path
) -> None:
    """Switzerland caps its epsilon at 5.0 (supernode.py --max-epsilon). Run 1: two DP rounds.
    Its SuperNode process is then stopped and started again (same --state-dir). Run 2:
    round 1 composes on top of run 1 (epsilon after 3 rounds), round 2 would exceed 5.0 and
    is refused by the site."""
    from opacus.accountants import RDPAccountant

    fed = federation
    state = tmp_path / "switzerland-state"
    extra = ["--state-dir", str(state), "--max-epsilon", "5.0"]
    first = dropout_hospital(f"{DROPOUT}-dp", extra)
    lines1 = [x for x in _privacy_run(fed, "run-dp-1", tmp_path / "runs1") if x["site"] == DROPOUT]
    assert [x["status"] for x in lines1] == ["trained", "trained"], lines1
    sigma, q, steps = (lines1[0][k] for k in ("noise_multiplier", "sample_rate", "steps"))

    def eps(rounds: int) -> float:
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps * rounds)]
        return acc.get_epsilon(delta=1e-5)

    assert lines1[1]["epsilon"] == pytest.approx(eps(2), abs=1e-6)
    assert eps(3) <= 5.0 < eps(4)
    fed.runner.signal_group(first, signal.SIGTERM)  # the SuperNode process restarts
    _wait_exit(fed.runner.procs[first], 60)
    dropout_hospital(f"{DROPOUT}-dp-restarted", extra)
    lines2 = [x for x in _privacy_run(fed, "run-dp-2", tmp_path / "runs2") if x["site"] == DROPOUT]
    assert lines2[0]["status"] == "trained" and lines2[0]["epsilon"] == pytest.approx(
        eps(3), abs=1e-6), lines2
    assert lines2[1]["status"] == "budget_exhausted", lines2
    assert f"{eps(4):.4f} > budget 5.0" in lines2[1]["reason"]
    own = [json.loads(x) for x in next(state.glob("privacy_ledger/*.jsonl")).read_text()
           .splitlines()]
    assert [x["status"] for x in own] == ["trained"] * 3 + ["budget_exhausted"]
    assert len({x["run"] for x in own}) == 2 and {x["scope"] for x in own} == {"data"}
