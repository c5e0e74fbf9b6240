"""scripts/deploy without a running federation: certificates, keys, connection entry, checks.

Each script runs as a subprocess, as an operator would run it; the results are verified with
the ``cryptography`` package and with Flower's own loaders (the ones flower-supernode and the
flwr CLI use), and the ClientApp's data-path check runs on the real shared data.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "scripts" / "deploy"


def _run(script: str, *args: object, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DEPLOY / f"{script}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a SuperLink certificate for link.example.org / 10.1.2.3."""
    out = tmp_path_factory.mktemp("certs")
    assert _run("pki", "ca", "--out", out).returncode == 0
    done = _run("pki", "server", "--ca-dir", out, "--out", out,
                "--host", "link.example.org", "--ip", "10.1.2.3")
    assert done.returncode == 0, done.stderr
    return out


def test_server_certificate_is_signed_by_the_ca_and_names_host_and_ip(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # plus loopback: the proxy and the centre's own tools reach the SuperLink on 127.0.0.1
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"),
                                                       ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert server.public_key().curve.name == "secp384r1"
    for secret in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / secret).stat().st_mode) == 0o600


def test_check_rejects_a_name_the_certificate_does_not_cover(certs: Path) -> None:
    ok = _run("pki", "check", "--certs", certs, "--host", "link.example.org", "--ip", "10.1.2.3")
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = _run("pki", "check", "--certs", certs, "--host", "other.example.org")
    assert bad.returncode == 2
    assert "does not cover other.example.org" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_check_rejects_a_certificate_from_another_ca(certs: Path, tmp_path: Path) -> None:
    assert _run("pki", "ca", "--out", tmp_path, "--name", "other").returncode == 0
    (tmp_path / "server.pem").write_bytes((certs / "server.pem").read_bytes())
    (tmp_path / "server.key").write_bytes((certs / "server.key").read_bytes())
    bad = _run("pki", "check", "--certs", tmp_path)
    assert bad.returncode == 2 and "is not signed by" in bad.stderr


def test_existing_ca_is_not_overwritten_without_force(certs: Path) -> None:
    before = (certs / "ca.key").read_bytes()
    again = _run("pki", "ca", "--out", certs)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (certs / "ca.key").read_bytes() == before


def test_node_key_is_ec_p384_openssh_and_loads_like_flower_does(tmp_path: Path) -> None:
    done = _run("node_keys", "create", "--out", tmp_path, "--site", "cleveland")
    assert done.returncode == 0, done.stderr
    private = tmp_path / "cleveland"
    # exactly how flower-supernode reads --auth-supernode-private-key
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # exactly how `flwr supernode register` reads the public key
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(tmp_path / "cleveland.pub")
    fingerprint = _run("node_keys", "fingerprint", tmp_path / "cleveland.pub").stdout.strip()
    assert fingerprint.startswith("SHA256:") and fingerprint in done.stdout


def test_connection_entry_is_read_back_by_the_flwr_cli(certs: Path, tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    done = _run("connection", "--name", "consortium", "--address", "link.example.org:9092",
                "--ca", certs / "ca.crt", "--flwr-home", home)
    assert done.returncode == 0, done.stderr
    probe = subprocess.run(
        [sys.executable, "-c",
         "from flwr.cli.flower_config import read_superlink_connection as r; "
         "c = r('consortium'); print(c.address, c.root_certificates, c.insecure)"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "FLWR_HOME": str(home)},
    )
    assert probe.stdout.split() == ["link.example.org:9092", str((certs / "ca.crt").resolve()),
                                    "False"]
    printed = _run("connection", "--name", "consortium", "--address", "link.example.org:9092",
                   "--ca", certs / "ca.crt", "--print")
    assert printed.stdout.startswith("[superlink.consortium]\n")


def test_submit_requires_an_absolute_output_dir() -> None:
    for overrides, expected in (("task=heart_disease", "set output_dir=/absolute/path"),
                                ("task=heart_disease output_dir=runs", "must be absolute")):
        done = _run("submit", "--overrides", overrides, "--connection", "nowhere")
        assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_supernode_launcher_reports_missing_files_and_unreachable_superlink(
    certs: Path, tmp_path: Path
) -> None:
    missing = _run("supernode", "--superlink", "127.0.0.1:9", "--ca", tmp_path / "nope.crt",
                   "--data-path", tmp_path, "--site-name", "x")
    assert missing.returncode == 2 and "CA certificate (--ca) not found" in missing.stderr
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = _run("supernode", "--superlink", f"127.0.0.1:{port}", "--ca", certs / "ca.crt",
                       "--data-path", tmp_path, "--site-name", "x",
                       "--max-retries", "2", "--max-wait-time", "3")
    assert unreachable.returncode == 3, unreachable.stderr
    assert "unreachable after 2 tries" in unreachable.stderr
    assert f"firewall allows outgoing TCP to 127.0.0.1:{port}" in unreachable.stderr


def test_heart_disease_site_refuses_image_data(shared_data: Path) -> None:
    """The ClientApp's check on node_config data-path: the wrong task's data is refused
    before anything loads, naming what the path holds."""
    from fl_app.config import compose_config
    from fl_app.site_runtime import site_ref
    from tasks import DataError, get_task

    cfg = compose_config("task=heart_disease")
    task = get_task("heart_disease")
    ok = site_ref(cfg, task, {"data-path": str(shared_data / "heart_disease" /
                                              "processed.va.data"), "site-name": "va"})
    assert ok.name == "va"
    for path, says in ((shared_data / "chest_xray" / "pneumoniamnist.npz", "is an array file"),
                       (shared_data / "chest_xray" / "samples", "3 .jpeg"),
                       (shared_data / "README.md", "expects 14")):
        with pytest.raises(DataError, match="does not hold heart_disease data") as err:
            site_ref(cfg, task, {"data-path": str(path), "site-name": "va"})
        assert says in str(err.value)
    with pytest.raises(DataError, match="does not exist on this SuperNode"):
        site_ref(cfg, task, {"data-path": "/nonexistent/x.data", "site-name": "va"})


def test_image_check_refuses_tabular_data(shared_data: Path) -> None:
    from tasks import DataError
    from tasks.data_checks import check_image_source

    check_image_source(shared_data / "chest_xray" / "pneumoniamnist.npz", "a")
    check_image_source(shared_data / "chest_xray" / "samples", "a")
    check_image_source(shared_data / "dicom", "a")
    with pytest.raises(DataError, match="is a text file"):
        check_image_source(shared_data / "heart_disease" / "processed.va.data", "a")
    with pytest.raises(DataError, match=r"holds no image files \(4 .data\)"):
        check_image_source(shared_data / "heart_disease", "a")


def test_supernode_device_setting_is_checked() -> None:
    """node_config ``device``: cpu works; an unknown device or CUDA on a machine without it
    is a clear error, not a torch traceback mid-training."""
    import torch

    from fl_app.config import compose_config
    from fl_app.site_runtime import device_for
    from tasks import DataError

    cfg = compose_config("")
    assert device_for(cfg, {"device": "cpu"}) == torch.device("cpu")
    with pytest.raises(DataError, match="'tpu' is not a torch device"):
        device_for(cfg, {"device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available on this SuperNode"):
            device_for(cfg, {"device": "cuda"})
    else:
        assert device_for(cfg, {"device": "cuda"}).type == "cuda"


def _deploy_module(name: str) -> Any:
    """A scripts/deploy module, imported as the scripts import each other."""
    sys.path.insert(0, str(DEPLOY))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DEPLOY))


# Flower 1.42's own log lines (seen from flower-supernode on 127.0.0.1)
CONNECTED = "\x1b[92mINFO \x1b[0m:      SuperNode ID: 16377421460915346247"
GRACEFUL = "\x1b[92mINFO \x1b[0m:      SuperNode terminated gracefully."
GAVE_UP = "\x1b[93mWARNING \x1b[0m:   Giving up reconnection after 4.48 seconds and 4 tries."
REFUSED = "\x1b[91mERROR \x1b[0m:     [Errno 111] Connection refused"
NOT_REGISTERED = "\x1b[91mERROR \x1b[0m:     [code: 2004] Failed to activate SuperNode."


@pytest.mark.parametrize(("lines", "rc", "stop", "status", "says"), [
    ([CONNECTED, GRACEFUL], 0, True, 0, None),  # stopped on request: quiet, status 0
    ([CONNECTED, GRACEFUL], -15, True, 0, None),  # ... also when the signal ended it
    ([CONNECTED, GRACEFUL], 0, False, 5, "its key was unregistered"),  # removed while running
    ([NOT_REGISTERED], 1, False, 5, "key is not registered at the SuperLink"),
    ([CONNECTED, GAVE_UP, REFUSED, GRACEFUL], 0, False, 6, "lost the connection"),
    ([CONNECTED], 1, False, 1, "failed (exit code 1)"),
])
def test_supernode_exit_status_says_why(lines: list[str], rc: int, stop: bool, status: int,
                                        says: str | None) -> None:
    """supernode.py's exit status and last line for each way a SuperNode ends (the real
    processes are in tests/test_deployment.py)."""
    supernode = _deploy_module("supernode")
    seen = supernode.Observed(stop_requested=stop)
    for line in lines:
        seen.see(line)
    hints = {**{p: h for p, _, h in supernode.HINTS}, supernode.REMOVED: supernode.REMOVED_HINT,
             supernode.LOST: supernode.LOST_HINT}
    got_status, reason = supernode.outcome(rc, seen, hints)
    assert got_status == status
    assert (reason is None) if says is None else (says in reason), reason
    if status == 5:
        assert "cannot be registered again" in reason


def test_submit_stream_drops_flowers_traceback_but_keeps_our_reason() -> None:
    """What a failed run's streamed log looks like (Flower 1.42 flwr-serverapp), and what
    submit.py shows of it."""
    submit = _deploy_module("submit")
    log = [
        "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n",
        "\x1b[91mERROR \x1b[0m:     fedclinic: only 3 of 9 SuperNodes connected after 3s.\n",
        "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n",
        "Traceback (most recent call last):\n",
        '  File "/x/server_app.py", line 40, in main\n',
        "    raise RunAborted(str(err)) from None\n",
        "fl_app.server_app.RunAborted: only 3 of 9 SuperNodes connected after 3s.\n",
        "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n",
        "An unhandled exception occurred in the ServerApp.\n",
        "\n",
        "For more information, visit: <https://flower.ai/docs/framework/ref-exit-codes/201.html>\n",
        "\x1b[92mINFO \x1b[0m:      Run finished\n",
    ]
    shown = list(submit.readable(log))
    assert shown == [log[0], log[1], log[-1]]
    status = _deploy_module("run_status").RunStatus(
        7, "finished:failed", "ServerApp failed with exception: only 3 of 9 SuperNodes "
        "connected after 3s.\nmore")
    assert submit.failure_reason(status) == "only 3 of 9 SuperNodes connected after 3s."


def test_client_app_imports_only_what_every_message_needs() -> None:
    """A flwr-clientapp process starts per message: importing the ClientApp must not pull in
    Opacus (local DP only), MONAI (imaging only), scikit-learn, plotting, Hydra or MLflow."""
    heavy = ("opacus", "monai", "sklearn", "scipy", "matplotlib", "hydra", "tenseal", "mlflow")
    done = subprocess.run(
        [sys.executable, "-c", "import sys, fl_app.client_app; "
         f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"],
        capture_output=True, text=True, timeout=120, check=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stdout.split() == []


def test_superexec_reaps_finished_clientapp_processes(tmp_path: Path) -> None:
    """superexec.py's reaper: an exited child called flwr-clientapp is reaped, others not."""
    superexec = _deploy_module("superexec")
    clientapp, other = tmp_path / "flwr-clientapp", tmp_path / "other-child"
    for link in (clientapp, other):
        link.symlink_to(shutil.which("true"))
    procs = [subprocess.Popen([str(clientapp)]), subprocess.Popen([str(other)])]
    deadline = time.monotonic() + 30
    while len(superexec.exited_clientapps(os.getpid())) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert superexec.exited_clientapps(os.getpid()) == [procs[0].pid]
    assert superexec.reap_once() == [procs[0].pid]
    assert superexec.exited_clientapps(os.getpid()) == []
    assert procs[1].wait(timeout=10) == 0  # not taken from its owner


def test_front_door_config_is_valid_caddy_and_admits_only_the_fleet_api(
        certs: Path, tmp_path: Path) -> None:
    """superlink.py --dry-run writes the Caddyfile, the SuperExec secret and state.db, all
    owner-only; the real Caddy binary accepts the Caddyfile."""
    state = tmp_path / "state"
    done = _run("superlink", "--certs", certs, "--state-dir", state, "--port", "19092",
                "--link-port", "19091", "--dry-run", env={"FLWR_TELEMETRY_ENABLED": "1"})
    assert done.returncode == 0, done.stderr
    link, superexec, proxy = done.stdout.strip().splitlines()[-3:]
    secret = state / "superexec.secret"
    assert "--host 127.0.0.1 --port 19091" in link and "--enable-supernode-auth" in link
    assert f"--superexec-auth-secret-file {secret}" in link and "--isolation process" in link
    assert f"--superexec-auth-secret-file {secret}" in superexec
    assert "--runtime-api-address 127.0.0.1:19091" in superexec
    for path in (secret, state / "state.db", state / "Caddyfile"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert len(secret.read_bytes()) == 64
    config = (state / "Caddyfile").read_text()
    assert r"path_regexp fleet ^/v1/fleet/[a-z][a-z-]*$" in config
    assert "reverse_proxy 127.0.0.1:19091" in config and "admin off" in config
    caddy = proxy.split()[0]
    checked = subprocess.run([caddy, "validate", "--adapter", "caddyfile", "--config",
                              str(state / "Caddyfile")], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == 0 and "Valid configuration" in checked.stdout + checked.stderr
    again = _run("superlink", "--certs", certs, "--state-dir", state, "--dry-run")
    assert again.returncode == 0 and len(secret.read_bytes()) == 64  # the secret is kept
    clash = _run("superlink", "--certs", certs, "--state-dir", state, "--port", "9091",
                 "--link-port", "9091", "--dry-run")
    assert clash.returncode == 2 and "must differ" in clash.stderr


def test_flower_processes_get_telemetry_and_update_check_off() -> None:
    """Whatever the operator's environment says, the scripts switch Flower's egress off."""
    env = _deploy_module("_common").flower_env({"FLWR_TELEMETRY_ENABLED": "1"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_supernode_least_privilege_is_enforced_on_request(certs: Path, tmp_path: Path) -> None:
    """--least-privilege refuses root or write access to the data, before connecting."""
    data = tmp_path / "site.data"
    data.write_text("1,2,3\n")
    done = _run("supernode", "--superlink", "127.0.0.1:9", "--ca", certs / "ca.crt",
                "--data-path", data, "--site-name", "x", "--least-privilege",
                "--state-dir", tmp_path / "state")
    assert done.returncode == 2, done.stderr
    why = "runs as root" if os.geteuid() == 0 else f"can write {data}"
    assert f"--least-privilege: this SuperNode {why}" in done.stderr
    assert not (tmp_path / "state").exists()  # nothing written before the checks pass


def test_submit_prints_the_hash_of_the_fab_flower_builds(tmp_path: Path) -> None:
    """The FAB hash submit.py prints is the SHA-256 of the bundle `flwr build` writes for the
    same app folder (what hospitals compare with summary.json's app.fab_hash)."""
    import hashlib

    built = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app",
                            str(REPO)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False,
                           env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert built.returncode == 0, built.stdout + built.stderr
    fab = next(tmp_path.glob("*.fab"))
    submit = _deploy_module("submit")
    assert submit.fab_sha256(REPO) == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert submit.tunnel_command("admin@centre", 9093, 9091) == [
        "ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=30",
        "-L", "127.0.0.1:9093:127.0.0.1:9091", "admin@centre"]
