"""Update compression (strategies/compression.py): encoding, error feedback, clipping, the
refusals, and real chest X-ray runs whose bytes come from the messages themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fl_app.config import ConfigError, compose_config, to_json
from strategies.compression import (
    RECORD,
    RESIDUAL_KEY,
    compression_mod,
    decode_record,
    encode_record,
    parse,
)
from strategies.secure_aggregation import SecureAggregationConfigError, check_secure_aggregation
from tasks import get_task


def _model_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    cfg = compose_config("task=chest_xray")
    model = get_task("chest_xray").build_model(cfg, {"image_size": 28, "in_channels": 1,
                                                     "num_classes": 2})
    return ArrayRecord(model.state_dict())


def _moved(base: ArrayRecord, scale: float, seed: int = 1) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({
        k: Array((a.numpy() + rng.normal(0, scale, a.shape)).astype(a.numpy().dtype))
        if a.numpy().dtype.kind == "f" else a for k, a in base.items()
    })


def _update_norm(record: ArrayRecord, base: ArrayRecord) -> float:
    return float(np.sqrt(sum(np.sum((record[k].numpy().astype(np.float64)
                                     - base[k].numpy()) ** 2) for k in base)))


@pytest.mark.parametrize(("spec", "tolerance"),
                         [("fp16", 1e-4), ("int8", 5e-4), ("topk:0.1", None)])
def test_decoded_update_keeps_keys_dtypes_and_is_close(spec: str, tolerance: float | None
                                                       ) -> None:
    base = _model_arrays()
    local = _moved(base, 0.01)
    encoded, meta, residual = encode_record(local, parse(spec), base)
    decoded = decode_record(encoded, meta, base)
    assert list(decoded.keys()) == list(local.keys())
    for key in local:
        assert decoded[key].numpy().dtype == local[key].numpy().dtype
        assert decoded[key].numpy().shape == local[key].numpy().shape
    error = max(float(np.max(np.abs(decoded[k].numpy() - local[k].numpy())))
                for k in local)
    if tolerance is not None:
        assert error <= tolerance
    else:  # top-k: 10% of each array's entries moved, the rest is the residual
        for key, value in residual.items():
            moved = decoded[key].numpy() != base[key].numpy()
            assert moved.sum() == int(np.ceil(0.1 * moved.size))
            exact = local[key].numpy().astype(np.float64) - base[key].numpy()
            sent = decoded[key].numpy().astype(np.float64) - base[key].numpy()
            np.testing.assert_allclose(sent + value, exact, atol=1e-6)


def test_topk_error_feedback_sends_everything_eventually() -> None:
    """Sum of what was sent over rounds + what is still held = sum of the true updates."""
    base = _model_arrays()
    scheme = parse("topk:0.05")
    residual: dict[str, np.ndarray] | None = None
    sent_total: dict[str, np.ndarray] = {}
    true_total: dict[str, np.ndarray] = {}
    for r in range(6):
        local = _moved(base, 0.01, seed=10 + r)
        encoded, meta, new = encode_record(local, scheme, base, residual)
        residual = dict(residual or {}) | new
        decoded = decode_record(encoded, meta, base)
        for key in meta:
            sent_total[key] = sent_total.get(key, 0) + (decoded[key].numpy().astype(np.float64)
                                                        - base[key].numpy())
            true_total[key] = true_total.get(key, 0) + (local[key].numpy().astype(np.float64)
                                                        - base[key].numpy())
    for key in sent_total:
        np.testing.assert_allclose(sent_total[key] + residual[key], true_total[key], atol=1e-5)


def test_non_finite_and_wrong_shape_arrays_travel_as_they_are() -> None:
    """Update validation must see a faulty site's update exactly as it was sent."""
    base = _model_arrays()
    local = _moved(base, 0.01)
    keys = [k for k in local if local[k].numpy().dtype.kind == "f"]
    bad = {k: local[k].numpy().copy() for k in keys[:2]}
    bad[keys[0]].reshape(-1)[0] = np.nan
    bad[keys[1]] = np.concatenate([bad[keys[1]].reshape(-1), [0.0]]).astype(np.float32)
    faulty = ArrayRecord({k: Array(bad[k]) if k in bad else a for k, a in local.items()})
    encoded, meta, _ = encode_record(faulty, parse("int8"), base)
    assert keys[0] not in meta and keys[1] not in meta
    decoded = decode_record(encoded, meta, base)
    assert np.isnan(decoded[keys[0]].numpy()).any()
    assert decoded[keys[1]].numpy().shape == bad[keys[1]].shape


@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.1"])
def test_compression_after_client_clipping_keeps_the_clipping_bound(spec: str) -> None:
    base = _model_arrays()
    local = _moved(base, 0.05)
    residual = {k: np.full(a.numpy().shape, 0.01) for k, a in base.items()
                if a.numpy().dtype.kind == "f"}
    encoded, meta, _ = encode_record(local, parse(spec), base, residual, clipping_norm=1.0)
    assert _update_norm(decode_record(encoded, meta, base), base) <= 1.0 + 1e-5


def test_site_mod_keeps_the_residual_in_context_state(task_identity: None) -> None:
    """compression_mod on a train handler that moves the model: the reply is encoded, the
    top-k residual waits in context.state for the next round."""
    base = _model_arrays()
    cfg = compose_config("task=chest_xray compression=topk:0.1")
    content = RecordDict({"arrays": base, "config": ConfigRecord({"cfg": to_json(cfg)}),
                          RECORD: ConfigRecord({"scheme": "topk:0.1", "meta": "{}"})})
    msg = Message(content, dst_node_id=3, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})

    def handler(message: Message, _context: Context) -> Message:
        moved = _moved(message.content["arrays"], 0.01)
        return Message(RecordDict({"arrays": moved}), reply_to=message)

    reply = compression_mod(msg, context, handler)
    meta = json.loads(str(reply.content[RECORD]["meta"]))
    assert meta and all(m["enc"] == "topk" for m in meta.values())
    assert RESIDUAL_KEY in context.state
    first = {k: a.numpy().copy() for k, a in context.state[RESIDUAL_KEY].items()}
    assert all(np.any(v != 0) for v in first.values())
    compression_mod(msg, context, handler)  # round 2 adds round 1's residual
    assert any(not np.array_equal(first[k], a.numpy())
               for k, a in context.state[RESIDUAL_KEY].items())


@pytest.mark.parametrize("value", ["gzip", "topk:0", "topk:1.5", "topk:x", "int4"])
def test_bad_compression_value_is_one_clear_line(value: str) -> None:
    with pytest.raises(ConfigError, match="compression must be none, fp16, int8 or topk"):
        parse(value)


@pytest.mark.parametrize("secagg", ["secaggplus", "ckks"])
def test_compression_of_masked_vectors_is_refused(secagg: str) -> None:
    cfg = compose_config(f"task=chest_xray secagg={secagg} compression=int8")
    with pytest.raises(SecureAggregationConfigError,
                       match=f"secagg={secagg} cannot be combined with compression=int8"):
        check_secure_aggregation(cfg)


# --- real runs: chest X-ray 28 px, 3 simulated hospitals ----------------------------------

ROUNDS = 3


def _chest_run(shared_data: Path, folder: Path, compression: str) -> dict:
    from fl_app.simulation import simulate

    cfg = compose_config(
        f"task=chest_xray task.data_dir={shared_data / 'chest_xray'} partition=iid "
        f"partition.num_sites=3 num_rounds={ROUNDS} compression={compression} "
        f"output_dir={folder}")
    run = simulate(cfg, num_cpus=2).path
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert len(lines) == ROUNDS and all(not line["rejected"] for line in lines)
    return {"lines": lines, "summary": summary}


def _mean_bytes(run: dict, key: str) -> float:
    return float(np.mean([n for line in run["lines"] for n in line[key].values()]))


@pytest.fixture(scope="module")
def uncompressed(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The float32 reference run, shared by the compressed runs."""
    return _chest_run(shared_data, tmp_path_factory.mktemp("fp32"), "none")


@pytest.mark.e2e
def test_uncompressed_run_measures_float32_bytes(uncompressed: dict) -> None:
    params = sum(a.numpy().nbytes for a in _model_arrays().values())
    for line in uncompressed["lines"]:
        assert sorted(line["bytes_up"]) == ["site-0", "site-1", "site-2"]
        # the model's float32 bytes plus the records around them (config, metrics)
        assert all(params < n < params * 1.2 for n in line["bytes_up"].values())
        assert all(params < n for n in line["bytes_down"].values())
    assert uncompressed["summary"]["compression"]["scheme"] == "none"


@pytest.mark.e2e
@pytest.mark.parametrize(("spec", "max_ratio"), [("int8", 0.25), ("topk:0.1", 0.15)])
def test_compressed_run_carries_fewer_bytes_at_the_same_auc(
    shared_data: Path, tmp_path: Path, uncompressed: dict, spec: str, max_ratio: float
) -> None:
    run = _chest_run(shared_data, tmp_path, spec)
    ratio = _mean_bytes(run, "bytes_up") / _mean_bytes(uncompressed, "bytes_up")
    down = _mean_bytes(run, "bytes_down") / _mean_bytes(uncompressed, "bytes_down")
    auc, reference = run["summary"]["pooled"]["auc"], uncompressed["summary"]["pooled"]["auc"]
    print(f"compression={spec}: bytes_up ratio {ratio:.3f}, bytes_down ratio {down:.3f}, "
          f"pooled AUC {auc:.4f} vs {reference:.4f} uncompressed after {ROUNDS} rounds")
    assert ratio <= max_ratio
    assert abs(auc - reference) <= 0.01
    assert run["summary"]["compression"]["scheme"] == spec
    if spec == "int8":  # the global model travels as int8 too (train messages)
        assert down <= 0.5
    else:  # top-k does not apply downwards
        assert down == pytest.approx(1.0, abs=0.02)
