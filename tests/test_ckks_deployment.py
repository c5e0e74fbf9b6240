"""secagg=ckks in the real deployment: SuperLink (TLS, SuperNode authentication) + SuperNodes.

Set up only with scripts/deploy (tests/deploy_harness.py, all on 127.0.0.1): the key ceremony
(``ckks_keys.py create``) runs outside the SuperLink's folders; each hospital's SuperNode gets
its copy of the secret context through ``supernode.py --ckks-secret-context`` and insists on
verified sums (``--ckks-verify-sum``); the run pins the consortium key's SHA-256. The server
fetches the public context from the hospitals, adds nothing it could read, and the run
completes with every hospital in every round's sum.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy_harness import Federation, ProcessRunner, deploy_env, run_folder

pytestmark = pytest.mark.e2e

HOSPITALS = ["cleveland", "hungary", "va"]
RUN_TIMEOUT_S = 600


@pytest.fixture
def federation(tmp_path: Path, shared_data: Path) -> Iterator[Federation]:
    """The centre (proxy + SuperLink) on 127.0.0.1; everything stopped afterwards."""
    runner = ProcessRunner(tmp_path / "logs", deploy_env())
    fed = Federation(root=tmp_path, data_dir=shared_data / "heart_disease", runner=runner)
    try:
        fed.make_pki(HOSPITALS, unregistered=[])
        fed.start_superlink()
        fed.register(HOSPITALS)
        yield fed
    finally:
        leftovers, bound = fed.teardown()
        assert not leftovers, f"processes left running: {leftovers}"
        assert not bound, f"ports still bound after teardown: {bound}"


def test_ckks_run_with_tls_node_auth_and_a_key_ceremony(federation: Federation,
                                                        tmp_path: Path) -> None:
    fed = federation
    ceremony = tmp_path / "key-custodian"  # not a folder of the SuperLink
    made = fed.script("ckks_keys", "create", "--out", ceremony)
    sha = made.split("public context SHA-256: ")[1].split()[0]
    for site in HOSPITALS:  # each hospital keeps its own copy, mode 0600
        own = tmp_path / f"hospital-{site}" / "ckks-secret-context.bin"
        own.parent.mkdir()
        shutil.copy2(ceremony / "ckks-secret-context.bin", own)
        fed.start_supernode(site, site, extra=["--ckks-secret-context", str(own),
                                               "--ckks-verify-sum"])
    fed.wait_connected(HOSPITALS)

    output_dir = tmp_path / "runs"
    proc = fed.submit("run-ckks", (
        f"task=heart_disease num_rounds=1 min_sites=3 secagg=ckks secagg.verify_sum=true "
        f"secagg.public_context_sha256={sha} output_dir={output_dir}"
    ))
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ckks run did not finish:\n{fed.runner.log('run-ckks')[-4000:]}")
    log = fed.runner.log("run-ckks")
    assert rc == 0, log[-4000:]
    folder = run_folder(output_dir)
    assert folder is not None, log[-4000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["secure_aggregation"] == "ckks"
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    assert all(line["aggregated_sites"] == sorted(HOSPITALS) for line in lines), lines
    assert summary["mean_site_accuracy"] >= 0.7, summary
    assert f"3 hospital(s) hold CKKS key {sha[:16]}" in log, log[-4000:]
    assert "verified and added by the decrypting hospitals" in log
    # the server side holds no secret context: nothing under the SuperLink's folders is one
    secret = (ceremony / "ckks-secret-context.bin").read_bytes()
    for path in [*fed.workdir.rglob("*"), *fed.state_dir.rglob("*")]:
        assert not (path.is_file() and path.read_bytes() == secret), path
