"""Update compression (``compression=none|fp16|int8|topk:<fraction>``) and the bytes each
site's train messages actually carry.

What travels (train messages only; evaluate messages carry the exact global model, so every
site evaluates the model the server releases):

- site -> server: the site's update ``u = (its model - the model it received)``, per
  floating-point array:
  - ``fp16``: ``u`` in float16;
  - ``int8``: ``u`` linearly quantised to int8 with one float32 scale per array
    (``max|u|/127``), the int8 bytes then DEFLATE-compressed (zlib, lossless);
  - ``topk:f``: the ``ceil(f*n)`` entries of ``u + r`` largest in magnitude (float16 values,
    positions as a bitmask or as uint16/uint32 indices, whichever is smaller), with error
    feedback: the residual ``r`` (what was not sent) is kept at the site across rounds in
    ``context.state`` and added to the next round's update (Stich et al., 2018).
  An array that is not floating point, not the received array's shape, or not finite is sent
  as it is, so update validation (strategies/validation.py) still sees exactly what a faulty
  site sent.
- server -> site: ``fp16`` and ``int8`` (weights, one scale per array, DEFLATE) compress the
  global model of train messages too; ``topk`` does not apply downwards (a sparse model is
  not a model) and sends float32. A train message that also asks the site to evaluate the
  model it receives (``evaluate_in_train``) is sent exact.

Server side, ``Compression`` is the outermost wrapper of the chain (strategies.factory): its
``configure_train`` encodes the downlink, its ``aggregate_train`` decodes each reply to
``global + u`` in the global model's dtypes before anything else sees it, so FedBN, the
privacy guard, update validation, the DP wrappers and the aggregator all work on decoded
float32 models. The server decodes against its own exact global model (the site's update
was computed against the compressed copy it received), so the downlink rounding never
accumulates in the global model.

Order with differential privacy: compression is post-processing and comes after every DP
step. Local DP (DP-SGD) noises the update inside training; with central DP and client-side
clipping the site's clipping mod runs inside ``compression_mod``, and the compressed update is
re-clipped (its per-array scales shrunk) when rounding or error feedback pushed its norm over
the clipping norm, so the bound the central noise is calibrated to still holds. Refused with
secure aggregation (strategies/secure_aggregation.py REFUSALS): masked SecAgg+ vectors and
CKKS ciphertexts are not compressible without breaking the protocol.

Bytes: ``bytes_down`` / ``bytes_up`` per site and round are the protobuf-serialised size of
the train message's / reply's content (``RecordDict``: arrays, config incl. the experiment
config, metrics), measured on the server as it sends and receives them, in every run without
secure aggregation (compression=none included: the float32 reference). metrics.jsonl:
``"bytes_up": {site: bytes}``, ``"bytes_down": {site: bytes}``.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.errors import ConfigError
from strategies.wrapper import StrategyWrapper, find

ARRAYS_KEY = "arrays"
RECORD = "compression"  # ConfigRecord in train messages and replies: {"scheme", "meta"}
RESIDUAL_KEY = "compression-residual"  # context.state ArrayRecord: top-k error feedback
EVALUATE_KEY = "evaluate-received"  # strategies.evaluate_in_train (kept exact)
CLIPPING_NORM_KEY = "clipping_norm"  # Flower's client-side clipping norm (train config)
NONE = "none"


@dataclass(frozen=True)
class Scheme:
    """A parsed ``compression`` value."""

    name: str  # none | fp16 | int8 | topk
    fraction: float = 1.0  # topk only

    @property
    def text(self) -> str:
        """The config value this scheme was parsed from."""
        return f"topk:{self.fraction:g}" if self.name == "topk" else self.name

    @property
    def downlink(self) -> str:
        """How the global model travels to the sites: fp16, int8 or none (float32)."""
        return self.name if self.name in ("fp16", "int8") else NONE


def parse(value: object) -> Scheme:
    """``none``, ``fp16``, ``int8`` or ``topk:<fraction>`` (0 < fraction < 1)."""
    text = str(value if value is not None else NONE).strip()
    if text in (NONE, "fp16", "int8"):
        return Scheme(text)
    if text.startswith("topk:"):
        try:
            fraction = float(text.split(":", 1)[1])
        except ValueError:
            fraction = math.nan
        if 0.0 < fraction < 1.0:
            return Scheme("topk", fraction)
    raise ConfigError(f"compression must be none, fp16, int8 or topk:<fraction> with "
                      f"0 < fraction < 1 (e.g. topk:0.1), got '{text}'")


def scheme_of(cfg: Any) -> Scheme:
    """The compression scheme of an experiment config (``none`` when absent)."""
    return parse(cfg.get("compression", NONE))


# --- encoding (numpy, both sides) ------------------------------------------------------


def _deflate(data: np.ndarray) -> np.ndarray:
    return np.frombuffer(zlib.compress(data.tobytes(), 6), dtype=np.uint8)


def _inflate(data: np.ndarray, dtype: type, size: int) -> np.ndarray:
    return np.frombuffer(zlib.decompress(data.tobytes()), dtype=dtype, count=size)


def _int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(values.astype(np.float64) / scale), -127, 127).astype(np.int8)
    return _deflate(q), scale


def _positions(mask: np.ndarray) -> tuple[np.ndarray, str]:
    """The kept positions as a bitmask or as indices, whichever is smaller."""
    n, k = mask.size, int(mask.sum())
    index_dtype = np.uint16 if n <= np.iinfo(np.uint16).max + 1 else np.uint32
    if k * np.dtype(index_dtype).itemsize < (n + 7) // 8:
        return np.flatnonzero(mask).astype(index_dtype), np.dtype(index_dtype).name
    return np.packbits(mask), "mask"


def _mask_of(positions: np.ndarray, how: str, n: int) -> np.ndarray:
    if how == "mask":
        return np.unpackbits(positions, count=n).astype(bool)
    mask = np.zeros(n, dtype=bool)
    mask[positions.astype(np.int64)] = True
    return mask


def encode_array(values: np.ndarray, scheme: Scheme) -> tuple[dict[str, np.ndarray], dict]:
    """Encode one float array: the arrays to send (key suffix -> array) and the metadata to
    decode them (``enc``, ``dtype``, ``shape``, ``scale``)."""
    meta: dict[str, Any] = {"enc": scheme.name, "dtype": values.dtype.name,
                            "shape": list(values.shape), "scale": 1.0}
    flat = values.reshape(-1)
    if scheme.name == "fp16":
        return {"": flat.astype(np.float16)}, meta
    if scheme.name == "int8":
        data, meta["scale"] = _int8(flat)
        return {"": data}, meta
    if scheme.name == "topk":
        k = max(1, math.ceil(scheme.fraction * flat.size))
        keep = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        mask = np.zeros(flat.size, dtype=bool)
        mask[keep] = True
        positions, meta["index"] = _positions(mask)
        return {"": flat[mask].astype(np.float16), "#pos": positions}, meta
    raise ValueError(f"cannot encode with scheme '{scheme.name}'")


def decode_array(parts: dict[str, np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """The array ``encode_array`` encoded (float64 before the cast to ``meta['dtype']`` by the
    caller), of ``meta['shape']``."""
    shape, scale = tuple(meta["shape"]), float(meta["scale"])
    size = int(np.prod(shape)) if shape else 1
    enc = meta["enc"]
    if enc == "fp16":
        flat = parts[""].astype(np.float64)
    elif enc == "int8":
        flat = _inflate(parts[""], np.int8, size).astype(np.float64)
    elif enc == "topk":
        flat = np.zeros(size, dtype=np.float64)
        flat[_mask_of(parts["#pos"], meta["index"], size)] = parts[""].astype(np.float64)
    else:
        raise ValueError(f"unknown encoding '{enc}'")
    return (flat * scale).reshape(shape)


def _encodable(value: np.ndarray, base: np.ndarray | None) -> bool:
    return (base is not None and value.shape == base.shape and value.dtype == base.dtype
            and np.issubdtype(value.dtype, np.floating) and bool(np.all(np.isfinite(value))))


def encode_record(record: ArrayRecord, scheme: Scheme, base: ArrayRecord | None = None,
                  residual: dict[str, np.ndarray] | None = None,
                  clipping_norm: float | None = None,
                  ) -> tuple[ArrayRecord, dict[str, Any], dict[str, np.ndarray]]:
    """Encode ``record`` (minus ``base`` when given: an update) with ``scheme``.

    Returns the ArrayRecord to send, its metadata (key -> encode_array's meta; keys sent as
    they are have none) and the new top-k residual (``residual`` is added to the update
    first; the new one is what the decoded message lacks). With ``clipping_norm`` the scales
    are shrunk until the decoded update's L2 norm is at most that norm."""
    parts_of: dict[str, dict[str, np.ndarray]] = {}
    targets: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for key, array in record.items():
        value = array.numpy()
        reference = None if base is None or key not in base else base[key].numpy()
        if not _encodable(value, reference if base is not None else value):
            continue
        target = value.astype(np.float64) - (reference if reference is not None else 0.0)
        if scheme.name == "topk" and residual is not None and key in residual \
                and residual[key].shape == target.shape:
            target = target + residual[key]
        parts_of[key], meta[key] = encode_array(target, scheme)
        meta[key]["dtype"] = value.dtype.name  # decoded back to the array's own dtype
        targets[key] = target
    decoded = {k: decode_array(parts_of[k], meta[k]) for k in meta}
    norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in decoded.values()))
    if clipping_norm is not None and norm > clipping_norm > 0:
        factor = clipping_norm / norm * (1 - 1e-6)  # compression after clipping keeps the bound
        for key, info in meta.items():
            info["scale"] = float(info["scale"]) * factor
            decoded[key] = decoded[key] * factor
    new_residual = {k: targets[k] - decoded[k] for k in meta} if scheme.name == "topk" else {}
    out: dict[str, Array] = {}
    for key, array in record.items():
        if key not in meta:
            out[key] = array
            continue
        for suffix, data in parts_of[key].items():
            out[key + suffix] = Array(np.ascontiguousarray(data))
    return ArrayRecord(out), meta, new_residual


def decode_record(record: ArrayRecord, meta: dict[str, Any],
                  base: ArrayRecord | None = None) -> ArrayRecord:
    """The ArrayRecord ``encode_record`` encoded (``base + update`` when given a base), in the
    original keys, order and dtypes."""
    out: dict[str, Array] = {}
    for key in record:
        if "#" in key:
            continue
        if key not in meta:
            out[key] = record[key]
            continue
        info = meta[key]
        parts = {s: record[key + s].numpy() for s in ("", "#pos") if key + s in record}
        value = decode_array(parts, info)
        if base is not None:
            value = base[key].numpy().astype(np.float64) + value
        out[key] = Array(value.astype(np.dtype(info["dtype"])))
    return ArrayRecord(out)


# --- site side -------------------------------------------------------------------------


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod on the train handler: decode the received global model, encode the reply's
    update (see the module docstring). Transparent for messages without compression."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD not in msg.content:
        return call_next(msg, context)
    record = msg.content[RECORD]
    scheme = parse(record["scheme"])
    down = json.loads(str(record.get("meta", "{}")))
    if down:  # the global model came compressed: the site trains from its decoded copy
        msg.content[ARRAYS_KEY] = decode_record(msg.content[ARRAYS_KEY], down)
    received: ArrayRecord = msg.content[ARRAYS_KEY]
    clipping_norm = msg.content["config"].get(CLIPPING_NORM_KEY)
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS_KEY not in reply.content.array_records:
        return reply
    stored = context.state.get(RESIDUAL_KEY)
    residual = {k: a.numpy() for k, a in stored.items()} \
        if isinstance(stored, ArrayRecord) else None
    encoded, meta, new_residual = encode_record(
        reply.content[ARRAYS_KEY], scheme, received, residual,
        None if clipping_norm is None else float(clipping_norm))
    if scheme.name == "topk":  # error feedback: what was not sent waits for the next round
        kept = dict(residual or {}) | new_residual
        context.state[RESIDUAL_KEY] = ArrayRecord({k: Array(v) for k, v in kept.items()})
    reply.content[ARRAYS_KEY] = encoded
    reply.content[RECORD] = ConfigRecord({"scheme": scheme.text, "meta": json.dumps(meta)})
    return reply


# --- server side -----------------------------------------------------------------------


def content_bytes(msg: Message) -> int:
    """Protobuf-serialised size of a message's content (what the wire carries of it)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(msg.content).ByteSize())


class Compression(StrategyWrapper):
    """Encodes the downlink, decodes each reply against the round's global model, and
    counts the bytes of every train message and reply (see the module docstring)."""

    def __init__(self, strategy: Strategy, scheme: Scheme,
                 node_sites: dict[int, str] | None = None) -> None:
        super().__init__(strategy)
        self.scheme = scheme
        self.node_sites = dict(node_sites or {})
        self._global: ArrayRecord | None = None
        self.bytes_down: dict[int, dict[str, int]] = {}
        self.bytes_up: dict[int, dict[str, int]] = {}

    def _site(self, node_id: int) -> str:
        return self.node_sites.get(node_id, f"node-{node_id}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; then compress the global model in each message (fp16/int8) and mark the
        message for the sites' ``compression_mod``; count the bytes sent."""
        self._global = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        done: set[int] = set()  # Flower's strategies give every message the same content
        for msg in messages:
            content = msg.content
            if self.scheme.name != NONE and id(content) not in done:
                done.add(id(content))
                meta: dict[str, Any] = {}
                if self.scheme.downlink != NONE and EVALUATE_KEY not in content["config"]:
                    content[ARRAYS_KEY], meta, _ = encode_record(
                        content[ARRAYS_KEY], Scheme(self.scheme.downlink))
                content[RECORD] = ConfigRecord({"scheme": self.scheme.text,
                                                "meta": json.dumps(meta)})
            self.bytes_down.setdefault(server_round, {})[self._site(msg.metadata.dst_node_id)] \
                = content_bytes(msg)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count each reply's bytes, decode it to ``global + update``, then delegate."""
        replies = list(replies)
        for reply in replies:
            if not reply.has_content():
                continue
            self.bytes_up.setdefault(server_round, {})[self._site(reply.metadata.src_node_id)] \
                = content_bytes(reply)
            if RECORD in reply.content and ARRAYS_KEY in reply.content.array_records:
                record = reply.content.pop(RECORD)
                meta = json.loads(str(record["meta"]))
                reply.content[ARRAYS_KEY] = decode_record(reply.content[ARRAYS_KEY], meta,
                                                          self._global)
        return self.strategy.aggregate_train(server_round, replies)


def with_compression(strategy: Strategy, cfg: Any,
                     node_sites: dict[int, str] | None = None) -> Strategy:
    """``strategy`` wrapped by ``Compression`` (unless secure aggregation rewrites the train
    messages: then compression is refused, strategies/secure_aggregation.py, and bytes are
    not counted)."""
    scheme = scheme_of(cfg)
    secagg = cfg.get("secagg")
    if secagg is not None and str(secagg.get("name", NONE)) != NONE:
        return strategy
    return Compression(strategy, scheme, node_sites)


def round_bytes(strategy: Strategy, server_round: int) -> dict[str, dict[str, int]]:
    """metrics.jsonl ``bytes_up`` / ``bytes_down`` of a round (site -> bytes); empty when
    not measured (secure aggregation)."""
    wrapper = find(strategy, Compression)
    if wrapper is None:
        return {}
    return {"bytes_up": dict(sorted(wrapper.bytes_up.get(server_round, {}).items())),
            "bytes_down": dict(sorted(wrapper.bytes_down.get(server_round, {}).items()))}


def summary(cfg: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json ``compression``: the scheme and the mean bytes per site and round of the
    train replies (``bytes_up_mean``) and messages (``bytes_down_mean``), null when not
    measured."""
    out: dict[str, Any] = {"scheme": scheme_of(cfg).text}
    for key in ("bytes_up", "bytes_down"):
        values = [n for line in history for n in line.get(key, {}).values()]
        out[f"{key}_mean"] = float(np.mean(values)) if values else None
    return out
