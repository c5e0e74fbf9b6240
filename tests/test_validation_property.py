"""Property test of the reply validation: random arrays, dtypes, shapes and counts.

For any reply, ``check_reply`` returns (never raises), never accepts an update that is invalid
by an independent, plain-numpy statement of the rules, and accepts every update that is valid.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.validation import Reference, check_reply

DTYPES = ["float16", "float32", "float64", "int32", "int64", "uint8", "bool", "complex64"]
MODEL_DTYPES = ["float16", "float32", "float64", "int64"]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def arrays_of(draw: st.DrawFn, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values of any kind, NaN and +/-Inf included for floating types."""
    return draw(hnp.arrays(np.dtype(dtype), shape))


@st.composite
def reference_models(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.sampled_from(["w", "b", "bn.running_mean", "n"]), min_size=1,
                          max_size=4, unique=True))
    out = {}
    for name in names:
        dtype, shape = draw(st.sampled_from(MODEL_DTYPES)), draw(shapes)
        values = draw(hnp.arrays(np.dtype(dtype), shape, elements={"allow_nan": False,
                                                                   "allow_infinity": False}
                                 if dtype.startswith("float") else None))
        out[name] = values
    return out


def payload(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@st.composite
def replies(draw: st.DrawFn, reference: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """A reply's arrays: each either the reference's own dtype/shape or a random one, maybe
    with metadata that lies about the payload; keys sometimes dropped or added."""
    keys = list(reference)
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from([*reference, "extra"]), unique=True, max_size=5))
    sent, truth = {}, {}
    for key in keys:
        ref = reference.get(key, np.zeros(1, np.float32))
        same = draw(st.booleans())
        dtype = str(ref.dtype) if same else draw(st.sampled_from(DTYPES))
        shape = tuple(ref.shape) if same and draw(st.booleans()) else draw(shapes)
        values = draw(arrays_of(dtype, shape))
        if draw(st.integers(0, 9)) == 0:  # declared metadata copied from the reference
            declared_dtype, declared_shape = str(ref.dtype), tuple(ref.shape)
        else:
            declared_dtype, declared_shape = str(values.dtype), tuple(values.shape)
        sent[key] = Array(dtype=declared_dtype, shape=declared_shape, stype="numpy.ndarray",
                          data=payload(values))
        truth[key] = (declared_dtype, declared_shape, values)
    return sent, truth


counts = st.one_of(
    st.integers(-3, 120), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(0, 5), max_size=2),  # a MetricRecord also holds lists
    st.integers(-3, 120).map(float),
)


def expected_valid(reference: dict[str, np.ndarray], truth: dict, count: object,
                   max_examples: int | None, bound: float | None) -> tuple[bool, float]:
    """The rules, stated independently of the implementation."""
    if set(truth) != set(reference):
        return False, math.nan
    if not isinstance(count, (int, float)):
        return False, math.nan
    if isinstance(count, float) and not (math.isfinite(count) and count == int(count)):
        return False, math.nan
    if count < 1 or (max_examples is not None and count > max_examples):
        return False, math.nan
    diffs = []
    for key, ref in reference.items():
        declared_dtype, declared_shape, values = truth[key]
        if (declared_dtype, declared_shape) != (str(ref.dtype), ref.shape):
            return False, math.nan
        if (values.dtype, values.shape) != (ref.dtype, ref.shape):
            return False, math.nan
        if values.dtype.kind in "fc":
            if not np.isfinite(values).all():
                return False, math.nan
            diffs.append((values.astype(np.float64) - ref.astype(np.float64)).ravel())
    with np.errstate(over="ignore"):
        norm = float(np.linalg.norm(np.concatenate(diffs))) if diffs else 0.0
    return (bound is None or norm <= bound), norm


@st.composite
def near_valid(draw: st.DrawFn, reference: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The reference plus a finite perturbation, then maybe one defect (NaN, Inf, a key
    dropped, dtype or shape changed, metadata that lies about the payload)."""
    truth = {}
    for key, ref in reference.items():
        noise = draw(hnp.arrays(np.float64, ref.shape, elements=st.floats(-10, 10)))
        values = (ref.astype(np.float64) + noise).astype(ref.dtype) \
            if ref.dtype.kind == "f" else ref.copy()
        truth[key] = [str(ref.dtype), tuple(ref.shape), values]
    defect = draw(st.sampled_from(["none", "none", "nan", "inf", "drop", "dtype", "shape",
                                   "lie"]))
    key = draw(st.sampled_from(sorted(truth)))
    values = truth[key][2]
    if defect in ("nan", "inf") and values.dtype.kind == "f" and values.size:
        values = values.copy()
        values.flat[draw(st.integers(0, values.size - 1))] = np.nan if defect == "nan" else -np.inf
    elif defect == "drop":
        del truth[key]
    elif defect == "dtype":
        with np.errstate(invalid="ignore", over="ignore"):  # e.g. float -> int overflow
            values = values.astype(draw(st.sampled_from(DTYPES)))
    elif defect in ("shape", "lie"):
        values = np.resize(values, draw(shapes))
    if key in truth:
        truth[key][2] = values
        if defect != "lie":  # honest metadata describes the payload
            truth[key][:2] = [str(values.dtype), tuple(values.shape)]
    sent = {k: Array(dtype=d, shape=sh, stype="numpy.ndarray", data=payload(v))
            for k, (d, sh, v) in truth.items()}
    return sent, {k: tuple(v) for k, v in truth.items()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_validation_never_crashes_and_never_accepts_an_invalid_update(data: st.DataObject) -> None:
    reference = data.draw(reference_models())
    sent, truth = data.draw(st.one_of(replies(reference), near_valid(reference),
                                      near_valid(reference)))
    count = data.draw(st.one_of(counts, st.integers(1, 50), st.integers(1, 50)))
    max_examples = data.draw(st.one_of(st.none(), st.integers(1, 100), st.just(100)))
    bound = data.draw(st.one_of(st.none(), st.none(), st.floats(1e-3, 1e6)))
    content = RecordDict({
        "arrays": ArrayRecord(sent),
        "metrics": MetricRecord({"num-examples": count}),
        "site": ConfigRecord({"name": "site-0"}),
    })
    valid, norm = expected_valid(reference, truth, count, max_examples, bound)
    if bound is not None and math.isfinite(norm):
        assume(abs(norm - bound) > 1e-9 * max(1.0, bound))  # float summation order at the edge
    event("valid" if valid else "invalid")  # --hypothesis-show-statistics: both occur
    why, got_norm = check_reply(content, Reference(reference), max_examples=max_examples,
                                max_update_norm=bound)
    assert why is None or not why.startswith("malformed reply"), why  # no internal error
    if valid:
        assert why is None, f"valid update rejected: {why}"
        assert got_norm == np.float64(norm) or math.isclose(got_norm, norm, rel_tol=1e-9)
    else:
        assert why is not None, "invalid update accepted"


def test_replies_with_missing_or_extra_records_are_rejected() -> None:
    reference = Reference({"w": np.zeros(2, np.float32)})
    good = ArrayRecord({"w": Array(np.ones(2, np.float32))})
    metrics = MetricRecord({"num-examples": 5})
    assert check_reply(RecordDict({"metrics": metrics}), reference)[0] is not None
    two = RecordDict({"arrays": good, "other": good, "metrics": metrics})
    assert check_reply(two, reference)[0] is not None
    no_metrics = RecordDict({"arrays": good})
    assert check_reply(no_metrics, reference)[0] is not None
    assert check_reply(RecordDict({"arrays": good, "metrics": metrics}), reference)[0] is None
