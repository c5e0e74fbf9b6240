"""secagg=ckks: homomorphic aggregation equals FedAvg/FedAdam; the server cannot decrypt.

The hospitals are simulated by ``benchmarks.local_grid.LocalGrid``: every message goes through
Flower's protobuf serialisation to the site's real ``secure_aggregation_mod`` (which hands
secagg=ckks messages to ``ckks_client_mod``); each site's update is known
(``tests/secagg_sim.py``), so the CKKS aggregate can be compared with plain FedAvg's. The
strategies are built by the real factory (``strategies.build``), wrappers and all.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Error

import strategies
from benchmarks.local_grid import LocalGrid, with_mods
from fl_app.config import compose_config
from strategies import ckks
from strategies.secure_aggregation import (
    SecureAggregationConfigError,
    SecureAggregationFailure,
    check_secure_aggregation,
    secure_aggregation_mod,
)
from tests.secagg_sim import fake_train, site_examples, site_update

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py

# stated precision (conf/secagg/ckks.yaml, docs/privacy.md): the CKKS aggregate differs from
# FedAvg's by at most 1e-6 per parameter (measured ~1e-9 in float64; float32 rounding ~1e-7)
CKKS_ATOL = 1e-6
SITES = 4

_in_hospital = threading.local()


def _model() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({  # 5,500 values: two ciphertexts of 4,096 slots
        "layer.weight": Array(rng.normal(0, 0.3, (50, 100)).astype(np.float32)),
        "layer.bias": Array(rng.normal(0, 0.3, 500).astype(np.float32)),
    })


def hospital(msg: Message, context: Context) -> Message:
    """A hospital's ClientApp path: the secure-aggregation mod around ``fake_train``; an
    exception becomes an error reply, as in Flower's ClientApp runtime."""
    _in_hospital.active = True
    try:
        return with_mods([secure_aggregation_mod], fake_train)(msg, context)
    except Exception as err:
        return Message(Error(code=2, reason=f"{type(err).__name__}:{err}"), reply_to=msg)
    finally:
        _in_hospital.active = False


def grid(sites: int = SITES) -> LocalGrid:
    return LocalGrid(sites, hospital)


def secure(key_dir: Path, overrides: str = "", sites: int = SITES) -> ckks.CkksAggregation:
    cfg = compose_config(f"secagg=ckks secagg.simulation_key_dir={key_dir} {overrides}")
    strategy = strategies.build(cfg, sites)
    assert isinstance(strategy, ckks.CkksAggregation)
    return strategy


def _round(strategy: Any, local: LocalGrid, server_round: int, arrays: ArrayRecord) -> Any:
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), local))
    return strategy.aggregate_train(server_round, local.send_and_receive(messages))


def _rounds(strategy: Any, local: LocalGrid, rounds: int = 3) -> ArrayRecord:
    arrays = _model()
    for server_round in range(1, rounds + 1):
        arrays, _ = _round(strategy, local, server_round, arrays)
        assert arrays is not None
    return arrays


def _max_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    assert list(a.keys()) == list(b.keys())
    return max(float(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy()).max()) for k in a)


@pytest.fixture
def server_never_holds_a_secret(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every TenSEAL context made outside a hospital's handler must be public."""
    made: list[bool] = []
    original = ts.context_from

    def spy(data: bytes, *args: Any, **kwargs: Any) -> ts.Context:
        context = original(data, *args, **kwargs)
        if not getattr(_in_hospital, "active", False):
            made.append(context.is_private())
            assert not context.is_private(), "server-side code made a SECRET context"
        return context

    monkeypatch.setattr(ts, "context_from", spy)
    return made


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_ckks_aggregate_equals_plain_aggregate_over_rounds(
    strategy: str, tmp_path: Path, server_never_holds_a_secret: list[bool]
) -> None:
    encrypted = secure(tmp_path, f"strategy={strategy}")
    plain = strategies.build(compose_config(f"strategy={strategy}"), SITES)
    local, plain_grid = grid(), grid()
    arrays = _model()
    for server_round in (1, 2, 3):
        got, metrics = _round(encrypted, local, server_round, arrays)
        want, want_metrics = _round(plain, plain_grid, server_round, arrays)
        assert _max_diff(got, want) <= CKKS_ATOL, (server_round, _max_diff(got, want))
        assert _max_diff(got, arrays) > 1000 * CKKS_ATOL  # the model did move
        assert dict(metrics) == pytest.approx(dict(want_metrics))  # metrics stay per site
        assert encrypted.aggregated_nodes == [1, 2, 3, 4]
        arrays = got
    # the server only ever held a public context, and never a plaintext update
    assert server_never_holds_a_secret and not any(server_never_holds_a_secret)
    assert encrypted.context is not None and not encrypted.context.is_private()
    uploads = [r for r in local.seen_by_server if ckks.ENCRYPTED_RECORD in r.content]
    assert len(uploads) == 3 * SITES
    assert not any("arrays" in r.content for r in uploads)
    decrypts = [e for e in local.exchanges if e.kind == "train:decrypt"]
    assert len(decrypts) == 3 * 2 and encrypted.last_decryptors == [1, 2]


def test_server_cannot_decrypt(tmp_path: Path) -> None:
    strategy = secure(tmp_path)
    _round(strategy, grid(), 1, _model())
    vector = ts.ckks_vector(strategy.context, [1.0, 2.0, 3.0])  # encryption: yes
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()  # decryption: TenSEAL refuses without the secret key
    secret = (tmp_path / ckks.SECRET_FILE).read_bytes()  # made by the simulated hospitals
    with pytest.raises(ckks.CkksKeyError, match="SECRET key"):
        ckks.load_public_context(secret)  # the only way server code makes a context


def test_a_lost_hospital_is_simply_not_in_the_sum(tmp_path: Path) -> None:
    strategy, local = secure(tmp_path, sites=5), grid(5)
    local.kill(3, after_messages=1)  # sent its public context, never its update
    got, _ = _round(strategy, local, 1, _model())
    assert strategy.aggregated_nodes == [1, 2, 4, 5]
    reference = grid(5)
    reference.kill(3, after_messages=0)
    want, _ = _round(strategies.build(compose_config(""), 4), reference, 1, _model())
    assert _max_diff(got, want) <= CKKS_ATOL


def test_decryptors_that_disagree_fail_the_round(tmp_path: Path) -> None:
    def tamper(msg: Message, context: Context) -> Message:
        reply = hospital(msg, context)
        if context.node_id == 2 and reply.has_content() and ckks.PLAIN_RECORD in reply.content:
            plain = reply.content[ckks.PLAIN_RECORD]["sum"].numpy().copy()
            plain[1] += 1e-3
            reply.content[ckks.PLAIN_RECORD] = ArrayRecord({"sum": Array(plain)})
        return reply

    strategy = secure(tmp_path, "on_site_failure=stop")
    with pytest.raises(SecureAggregationFailure, match="different sums"):
        _round(strategy, LocalGrid(SITES, tamper), 1, _model())


def test_hospitals_with_different_keys_or_another_pinned_key_are_refused(tmp_path: Path) -> None:
    local = grid()
    ckks.write_key_files(tmp_path / "other")
    local.contexts[4].node_config[ckks.NODE_CONFIG_KEY] = str(tmp_path / "other" / ckks.SECRET_FILE)
    with pytest.raises(SecureAggregationConfigError, match="different CKKS keys"):
        _round(secure(tmp_path), local, 1, _model())
    pinned = secure(tmp_path, f"secagg.public_context_sha256={'0' * 64}")
    with pytest.raises(SecureAggregationConfigError, match="pinned"):
        _round(pinned, grid(), 1, _model())


def test_key_files_modes_and_kinds(tmp_path: Path) -> None:
    secret, public = ckks.write_key_files(tmp_path / "keys")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert ckks.load_secret_context(secret).is_private()
    assert not ckks.load_public_context(public.read_bytes()).is_private()
    os.chmod(public, 0o600)
    with pytest.raises(ckks.CkksKeyError, match="PUBLIC context"):
        ckks.load_secret_context(public)
    os.chmod(secret, 0o644)
    with pytest.raises(ckks.CkksKeyError, match="chmod 600"):
        ckks.load_secret_context(secret)
    with pytest.raises(ckks.CkksKeyError, match="no CKKS key"):  # deployment, no node config
        ckks.site_secret_context({"data-path": "/data", "site-name": "a"}, None)


def test_chunked_precision_of_the_encrypted_sum(tmp_path: Path) -> None:
    """5 hospitals x 9,999 weighted values (3 chunks each): the decrypted sum's error."""
    secret = ckks.load_secret_context(ckks.write_key_files(tmp_path)[0])
    public = ckks.load_public_context(ckks.public_bytes(secret))
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.05, 9_999) for _ in range(5)]
    weights = [120.0, 300.0, 45.0, 510.0, 1.0]
    vectors = [np.concatenate([[w], w * u]) for w, u in zip(weights, updates, strict=True)]
    assert ckks.num_chunks(vectors[0].size) == 3
    total = ckks.add_encrypted(public, [ckks.encrypt(public, v) for v in vectors])
    plain = ckks.decrypt(secret, total, vectors[0].size)
    exact = sum(w * u for w, u in zip(weights, updates, strict=True))
    assert abs(plain[0] - sum(weights)) < 1e-6
    mean_error = float(np.abs(plain[1:] / plain[0] - exact / sum(weights)).max())
    assert mean_error < 1e-9  # of the averaged update; the stated bound is 1e-6


def test_config_checks_and_refusals() -> None:
    for bad, match in (("secagg.decryptors=0", "decryptors"),
                       ("secagg.public_context_sha256=abc", "64 lower-case hex")):
        with pytest.raises(SecureAggregationConfigError, match=match):
            check_secure_aggregation(compose_config(f"secagg=ckks {bad}"))
    with pytest.raises(SecureAggregationConfigError, match=r"privacy\.clipping"):
        check_secure_aggregation(compose_config("secagg=ckks privacy=central_dp"))
    assert check_secure_aggregation(compose_config("secagg=ckks privacy=central_dp_client")) \
        == "ckks"


def test_verified_sum_equals_plain_aggregate(tmp_path: Path) -> None:
    """verify_sum: the decrypting hospitals check every tag and add the ciphertexts."""
    local = grid()
    for context in local.contexts.values():
        context.node_config[ckks.NODE_VERIFY_KEY] = "true"
    got = _rounds(secure(tmp_path, "secagg.verify_sum=true"), local, rounds=2)
    want = _rounds(strategies.build(compose_config(""), SITES), grid(), rounds=2)
    assert _max_diff(got, want) <= CKKS_ATOL
    requests = [e for e in local.exchanges if e.kind == "train:decrypt"]
    assert len(requests) == 2 * 2
    upload = max(e.received for e in local.exchanges if e.kind == "train:train")
    assert all(e.sent > 3 * upload for e in requests)  # every hospital's ciphertexts


def _ask_to_decrypt(strategy: ckks.CkksAggregation, local: LocalGrid, node: int,
                    content: RecordDict, **fields: Any) -> Message:
    msg = strategy.stage_message(node, 1, **{ckks.STAGE_FIELD: ckks.STAGE_DECRYPT,
                                             ckks.KEY_DIR_FIELD: strategy.key_dir, **fields})
    for name, record in content.items():
        msg.content[name] = record
    return local.send_and_receive([msg])[0]


def test_a_server_that_lies_about_the_sum(tmp_path: Path) -> None:
    """Threat model: the server sends ONE hospital's ciphertext as "the sum".

    Without verification the decrypting hospital cannot tell and returns that hospital's
    update (the honest-but-curious assumption matters). A hospital with
    ckks-verify-sum=true refuses it, and refuses re-labelled or replayed parts.
    """
    local = grid()
    local.contexts[4].node_config[ckks.NODE_VERIFY_KEY] = "true"  # not a decryptor: fine
    strategy = secure(tmp_path)
    _round(strategy, local, 1, _model())
    uploads = {r.metadata.src_node_id: r for r in local.seen_by_server
               if ckks.ENCRYPTED_RECORD in r.content}
    victim = uploads[3]
    size = ckks.packed_size(5500)
    chunks = ckks.record_chunks(victim.content[ckks.ENCRYPTED_RECORD])
    lie = RecordDict({ckks.ENCRYPTED_RECORD: ckks.chunks_record(chunks, size)})
    fields = {ckks.SIZE_FIELD: size, ckks.ROUND_FIELD: 1, ckks.SITES_FIELD: ["site-3", "site-4"]}

    leaked = _ask_to_decrypt(strategy, local, 2, lie, **fields)  # hospital 2 does not verify
    plain = leaked.content[ckks.PLAIN_RECORD]["sum"].numpy()
    assert plain[0] == pytest.approx(site_examples(3), abs=1e-6)  # site 3's own weight ...
    update = plain[1:5001] / site_examples(3)
    assert np.abs(update - site_update(3, 1, 5000)).max() < 1e-6  # ... and its update

    refused = _ask_to_decrypt(strategy, local, 4, lie, **fields)  # hospital 4 verifies
    assert refused.has_error() and "verified itself" in refused.error.reason
    tag = str(victim.content["secagg"][ckks.TAG_FIELD])
    part = ckks.chunks_record(chunks, size)
    one = RecordDict({f"{ckks.PART_PREFIX}0": part})
    two = RecordDict({f"{ckks.PART_PREFIX}0": part, f"{ckks.PART_PREFIX}1": part})
    for content, sites, why in (
        (one, ["site-3"], "sum of 1 hospital"),
        (two, ["site-3", "site-3"], "sum of 1 hospital"),
        (two, ["site-3", "site-4"], "not authentic"),  # site 3's ciphertext relabelled
    ):
        reply = _ask_to_decrypt(strategy, local, 4, content, **{
            **fields, ckks.SITES_FIELD: sites, ckks.TAGS_FIELD: [tag] * len(sites)})
        assert reply.has_error() and why in reply.error.reason, (sites, reply)
    # genuine parts of round 1, presented as round 2's: refused too
    other = uploads[4]
    replay = RecordDict({f"{ckks.PART_PREFIX}0": part, f"{ckks.PART_PREFIX}1": ckks.chunks_record(
        ckks.record_chunks(other.content[ckks.ENCRYPTED_RECORD]), size)})
    reply = _ask_to_decrypt(strategy, local, 4, replay, **{
        **fields, ckks.ROUND_FIELD: 2,
        ckks.TAGS_FIELD: [tag, str(other.content["secagg"][ckks.TAG_FIELD])]})
    assert reply.has_error() and "not authentic" in reply.error.reason


def test_key_ceremony_script_and_supernode_node_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """scripts/deploy/ckks_keys.py makes the pair; supernode.py passes the secret's path."""
    deploy = str(Path(__file__).resolve().parents[1] / "scripts" / "deploy")
    sys.path.insert(0, deploy)
    try:
        import ckks_keys
        import supernode
    finally:
        sys.path.remove(deploy)
    ckks_keys.main(["create", "--out", str(tmp_path)])
    sha = capsys.readouterr().out.split("public context SHA-256: ")[1].split()[0]
    secret, public = tmp_path / ckks.SECRET_FILE, tmp_path / ckks.PUBLIC_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sha == ckks.fingerprint(public.read_bytes())
    assert sha == ckks.fingerprint(ckks.public_bytes(ckks.load_secret_context(secret)))
    ckks_keys.main(["show", str(secret)])
    shown = capsys.readouterr().out
    assert "SECRET context" in shown and sha in shown
    with pytest.raises(SystemExit) as exited:  # never silently replaces the consortium key
        ckks_keys.main(["create", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "--force" in capsys.readouterr().err

    config = supernode.node_config(tmp_path, "cleveland", None, secret, True)
    assert f'ckks-secret-context="{secret.resolve()}"' in config
    assert 'ckks-verify-sum="true"' in config
