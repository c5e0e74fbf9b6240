"""SecAgg+ (Bell et al., CCS 2020) on Flower's Message API: the server learns only the sum.

One round, driven by ``SecAggPlus`` (server, a ``SecureAggregation`` wrapper) over the Grid,
answered by ``secaggplus_mod`` (each hospital's train handler); every message is a train
message carrying the ``secagg`` ConfigRecord with its ``stage``:

1. ``setup`` (key advertisement): each sampled hospital makes two fresh ECDH key pairs (one
   to agree pairwise masks, one to encrypt shares) and returns the public keys.
2. ``share-keys``: each hospital receives its neighbours' public keys, draws a random seed
   for its own ("self") mask, splits that seed and its mask private key into Shamir shares
   (threshold t) and returns one share pair per neighbour, encrypted for that neighbour
   (Fernet under an ECDH-derived key): the server relays what it cannot read.
3. ``collect`` (= the round's train message): each hospital decrypts its neighbours' shares,
   trains, and replies with y = w * q(update) and w, masked: plus the expansion of its self
   seed and, for every neighbour j, plus or minus the expansion of the key it agreed with j
   (pairwise masks cancel in the sum), everything modulo ``modulus_range``. Its metrics
   travel as usual; its model does not.
4. ``unmask``: the server tells each hospital which neighbours sent a masked vector
   (survivors) and which did not (dropped); it returns the self-seed share of each survivor
   and the mask-key share of each dropped one, never both for one hospital. With t shares
   the server removes the survivors' self masks and the dropped hospitals' pairwise masks:
   what is left is sum(w * q(update)) and sum(w), nothing per hospital.

Primitives (none home-made): ECDH on SECP384R1 and key (de)serialisation
(``flwr.supercore.primitives.asymmetric``), HKDF-SHA256 key derivation, Fernet encryption and
Shamir secret sharing (``flwr.common.secure_aggregation.crypto``), stochastic quantization
(``flwr.common.secure_aggregation.quantization``), the share framing of
``secaggplus_utils``. Masks are expanded from their 32-byte seeds with the ChaCha20 stream
cipher (``cryptography``): Flower's ``pseudo_rand_gen`` folds a seed into 32 bits for NumPy's
Mersenne Twister, which a server could search exhaustively.

Encoding: a hospital protects its update Δ = model - global (not its weights: updates are
small, so the quantization is fine). Each coordinate is clipped to ±clipping_range and
stochastically rounded to an integer q in [0, quantization_range]; the integer weight w
(``num-examples``, or 1 under central DP) multiplies q exactly, and w itself is appended, so
the unmasked sum gives sum(w q) and W = sum(w), hence the weighted average of the updates to
within 2 * clipping_range / quantization_range per coordinate. Sums are exact in uint64
arithmetic modulo 2**64, reduced modulo ``modulus_range`` (a power of two, so exactly), which
must exceed W * quantization_range; each coordinate travels in ceil(log2 M / 8) bytes.

Threat model: an honest-but-curious server (it follows the protocol and tries to learn from
what it sees) colluding with fewer than t hospitals learns only the sum of the hospitals that
sent a masked vector, and never a sum of fewer than t of them. A server that lies about who
dropped cannot obtain both shares of one hospital from an honest hospital (checked at each
hospital), but Bell et al.'s consistency round (signatures) is not implemented, so a
malicious server sending different survivor lists to different hospitals is out of scope.
"""

from __future__ import annotations

import base64
import math
import os
import random
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from omegaconf import DictConfig

from strategies.secure_aggregation import (
    ARRAYS,
    KEYS_FIELD,
    SECAGG_RECORD,
    WEIGHT_KEY_FIELD,
    SecureAggregation,
    SecureAggregationConfigError,
    SecureAggregationFailure,
    SecureAggregationOption,
    SecureSum,
    has_update,
    reply_weight,
    secagg_record_of,
    split_vector,
    weighted_update,
)

NAME = "secaggplus"
MASKED_RECORD = "secagg-masked"  # ArrayRecord {"masked": uint8 bytes of the masked vector}
STATE_KEY = "secaggplus"  # context.state ConfigRecord of a hospital (this round's secrets)
STAGE = "stage"
SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect", "unmask"
NEXT_STAGE = {SETUP: SHARE_KEYS, SHARE_KEYS: COLLECT, COLLECT: UNMASK}
MAX_MODULUS = 2**64


# ----- parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """``cfg.secagg`` of secaggplus, checked."""

    num_shares: int | None
    reconstruction_threshold: int | None
    clipping_range: float
    quantization_range: int
    modulus_range: int
    timeout: float | None

    @classmethod
    def of(cls, cfg: DictConfig) -> Params:
        """Read and validate ``cfg.secagg``; one clear line per bad value."""
        s = cfg.secagg

        def fail(key: str, want: str) -> SecureAggregationConfigError:
            return SecureAggregationConfigError(
                f"secagg.{key} must be {want}, got {s.get(key)!r}"
            )

        def integer(key: str, low: int, allow_none: bool = False) -> int | None:
            value = s.get(key)
            if value is None and allow_none:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise fail(key, f"an integer >= {low}" + (" or null" if allow_none else ""))
            return int(value)

        shares = integer("num_shares", 3, allow_none=True)
        threshold = integer("reconstruction_threshold", 2, allow_none=True)
        if shares is not None and threshold is not None and threshold > shares:
            raise fail("reconstruction_threshold", f"at most secagg.num_shares={shares}")
        clip = s.get("clipping_range")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (
            0 < clip < math.inf
        ):
            raise fail("clipping_range", "a positive number")
        quant = integer("quantization_range", 2)
        assert quant is not None
        if quant >= 2**31:
            raise fail("quantization_range", "below 2**31")
        modulus = integer("modulus_range", 2)
        assert modulus is not None
        if modulus & (modulus - 1) or modulus > MAX_MODULUS or modulus <= quant:
            raise fail("modulus_range", f"a power of two above quantization_range={quant}, "
                       "at most 2**64")
        timeout = s.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout <= 0):
            raise fail("timeout", "a positive number of seconds or null")
        return cls(shares, threshold, float(clip), quant, modulus,
                   None if timeout is None else float(timeout))


def check(cfg: DictConfig) -> None:
    """Validate ``cfg.secagg`` for secaggplus (raises SecureAggregationConfigError)."""
    Params.of(cfg)


def plan(num_nodes: int, params: Params) -> tuple[int, int]:
    """(shares per hospital incl. its own, threshold) for a round with ``num_nodes``."""
    shares = num_nodes if params.num_shares is None else min(params.num_shares, num_nodes)
    if shares < num_nodes and shares % 2 == 0:
        shares += 1  # a symmetric ring neighbourhood has an odd size
    threshold = params.reconstruction_threshold or shares // 2 + 1
    return shares, max(threshold, 2)


# ----- masks and encoding (shared by both halves) ----------------------------------------------


def expand_mask(seed: bytes, size: int, modulus: int) -> np.ndarray:
    """``size`` pseudo-random integers in [0, modulus) from a 32-byte seed (ChaCha20)."""
    if len(seed) != 32:
        raise ValueError("a mask seed has 32 bytes")
    cipher = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = cipher.update(bytes(8 * size))
    return np.frombuffer(stream, dtype=np.uint64) & np.uint64(modulus - 1)


def pairwise_seed(private_key: bytes, public_key: bytes) -> bytes:
    """The 32-byte seed two hospitals share (ECDH, then HKDF-SHA256)."""
    key = generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))
    return base64.urlsafe_b64decode(key)


def width(modulus: int) -> int:
    """Bytes per coordinate on the wire."""
    return max(1, math.ceil((modulus.bit_length() - 1) / 8))


def pack(vector: np.ndarray, modulus: int) -> np.ndarray:
    """uint64 values below ``modulus`` -> their low-order bytes (uint8, little-endian)."""
    raw = np.ascontiguousarray(vector.astype("<u8")).view(np.uint8).reshape(-1, 8)
    return np.ascontiguousarray(raw[:, : width(modulus)]).ravel()


def unpack(data: np.ndarray, modulus: int) -> np.ndarray:
    """Inverse of ``pack``."""
    w = width(modulus)
    if data.size % w:
        raise SecureAggregationFailure("a masked vector has a size that is no whole number "
                                       "of coordinates")
    full = np.zeros((data.size // w, 8), dtype=np.uint8)
    full[:, :w] = data.reshape(-1, w)
    return full.view("<u8").ravel().astype(np.uint64)


def _sign(own: int, other: int) -> int:
    return 1 if own > other else -1


# ----- server -----------------------------------------------------------------------------------


@dataclass
class _Round:
    """The server's view of one SecAgg+ round (no secret in it)."""

    server_round: int
    index: dict[int, int]  # node id -> participant index (1..n)
    shares: int
    threshold: int
    neighbours: dict[int, set[int]] = field(default_factory=dict)  # by index, incl. itself
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # index -> (pk1, pk2)
    active: set[int] = field(default_factory=set)  # indices still in the protocol

    def node(self, idx: int) -> int:
        """Node id of participant ``idx``."""
        return next(n for n, i in self.index.items() if i == idx)


class SecAggPlus(SecureAggregation):
    """Server side of SecAgg+: the stages around the train message (module docstring)."""

    name = NAME

    def __init__(self, strategy: Strategy, cfg: DictConfig) -> None:
        super().__init__(strategy, cfg)
        self.params = Params.of(cfg)
        self.timeout = self.params.timeout or self.round_timeout
        self.state: _Round | None = None
        self.rng = random.SystemRandom()

    def summary(self) -> None:
        """Log the protocol settings, then the wrapped strategy's summary."""
        p = self.params
        log(INFO, "\t├──> Secure aggregation: SecAgg+ (shares %s, threshold %s, clipping range "
            "%g, quantization 2**%.0f, modulus 2**%.0f)", p.num_shares or "all",
            p.reconstruction_threshold or "majority", p.clipping_range,
            math.log2(p.quantization_range), math.log2(p.modulus_range))
        self.strategy.summary()

    # --- helpers ----------------------------------------------------------------------------
    def _exchange(self, messages: list[Message], grid: Grid) -> dict[int, Message]:
        """Send, wait up to the stage timeout; node id -> valid reply (failures are logged by
        the FederationGuard)."""
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        out = {}
        for reply in replies:
            if not reply.has_error() and secagg_record_of(reply) is not None:
                out[reply.metadata.src_node_id] = reply
        return out

    def _check_neighbours(self, st: _Round, stage: str) -> None:
        for idx in sorted(st.active):
            alive = st.neighbours[idx] & st.active
            if len(alive) < st.threshold:
                raise SecureAggregationFailure(
                    f"after the {stage} stage only {len(st.active)} of {len(st.index)} "
                    f"hospitals remain and site index {idx} has {len(alive)} live "
                    f"share-holders, fewer than reconstruction_threshold={st.threshold}"
                )

    # --- stages before training -------------------------------------------------------------
    def setup_round(
        self, server_round: int, messages: list[Message], grid: Grid
    ) -> list[Message]:
        """Key advertisement and encrypted share exchange; return the train messages."""
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        if len(nodes) < 2:
            raise SecureAggregationFailure(
                f"{len(nodes)} hospital(s) sampled; a sum needs at least 2"
            )
        shares, threshold = plan(len(nodes), self.params)
        if threshold > shares:
            raise SecureAggregationFailure(
                f"secagg.reconstruction_threshold={threshold} exceeds the {shares} "
                f"share-holders of this round's {len(nodes)} hospitals"
            )
        order = list(range(1, len(nodes) + 1))
        self.rng.shuffle(order)  # who neighbours whom is drawn afresh every round
        st = _Round(server_round, dict(zip(nodes, order, strict=True)), shares, threshold)
        ring = sorted(st.index.values(), key=order.index)
        half = shares // 2
        for pos, idx in enumerate(ring):
            if shares >= len(nodes):
                st.neighbours[idx] = set(ring)
            else:
                st.neighbours[idx] = {ring[(pos + k) % len(ring)] for k in range(-half, half + 1)}
        self.state = st
        p = self.params
        # 1. key advertisement
        setup = [
            self.stage_message(node, server_round, stage=SETUP, index=st.index[node],
                               **{"num-nodes": len(nodes), "num-shares": shares,
                                  "threshold": threshold, "clipping-range": p.clipping_range,
                                  "quantization-range": p.quantization_range,
                                  "modulus-bits": p.modulus_range.bit_length() - 1})
            for node in nodes
        ]
        replies = self._exchange(setup, grid)
        for node, reply in replies.items():
            rec = reply.content[SECAGG_RECORD]
            st.public[st.index[node]] = (bytes(rec["pk1"]), bytes(rec["pk2"]))
        st.active = set(st.public)
        self._check_neighbours(st, SETUP)
        # 2. encrypted share exchange (the server relays ciphertexts it cannot read)
        share = []
        for idx in sorted(st.active):
            peers = sorted(st.neighbours[idx] & st.active)
            share.append(self.stage_message(
                st.node(idx), server_round, stage=SHARE_KEYS, peers=peers,
                pk1=[st.public[j][0] for j in peers], pk2=[st.public[j][1] for j in peers]))
        replies = self._exchange(share, grid)
        forward: dict[int, list[tuple[int, bytes]]] = {}
        for node, reply in replies.items():
            rec = reply.content[SECAGG_RECORD]
            for dst, ciphertext in zip(rec["dsts"], rec["ciphertexts"], strict=True):
                forward.setdefault(int(dst), []).append((st.index[node], bytes(ciphertext)))
        st.active = {st.index[node] for node in replies}
        self._check_neighbours(st, SHARE_KEYS)
        # 3. the train messages, each carrying the shares meant for its hospital
        out = []
        for msg in messages:
            idx = st.index[msg.metadata.dst_node_id]
            if idx not in st.active:
                continue
            # only shares from hospitals still in the protocol
            mine = [(src, c) for src, c in forward.get(idx, []) if src in st.active]
            out.append(self.with_record(msg, self.record(
                stage=COLLECT, index=idx, srcs=[s for s, _ in mine],
                ciphertexts=[c for _, c in mine],
            )))
        return out

    # --- stages after training --------------------------------------------------------------
    def secure_sum(self, server_round: int, replies: list[Message], grid: Grid) -> SecureSum:
        """Add the masked vectors, collect the shares, remove the masks."""
        st = self.state
        if st is None or st.server_round != server_round:
            raise SecureAggregationFailure("no SecAgg+ setup for this round")
        p = self.params
        masked: dict[int, np.ndarray] = {}
        keys: list[str] | None = None
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or MASKED_RECORD not in reply.content.array_records:
                continue
            rec = reply.content[SECAGG_RECORD]
            sent = [str(k) for k in rec[KEYS_FIELD]]
            if keys is None:
                keys = sent
            elif sent != keys:
                log(WARNING, "secaggplus: node %d sent other model keys; left out", node)
                continue
            masked[st.index[node]] = unpack(
                reply.content[MASKED_RECORD]["masked"].numpy(), p.modulus_range)
        survivors = set(masked) & st.active
        dropped = st.active - survivors
        if len(survivors) < st.threshold:
            raise SecureAggregationFailure(
                f"only {len(survivors)} of {len(st.index)} hospitals sent a masked update, "
                f"fewer than reconstruction_threshold={st.threshold}: the sum is not unmasked"
            )
        sizes = {v.size for v in masked.values()}
        if len(sizes) != 1:
            raise SecureAggregationFailure("masked vectors of different lengths")
        total = np.zeros(sizes.pop(), dtype=np.uint64)
        for idx in survivors:
            total += masked[idx]  # uint64 wraps modulo 2**64: exact modulo the modulus
        # 4. unmask: self-seed shares of survivors, mask-key shares of the dropped
        unmask = []
        for idx in sorted(survivors):
            near = st.neighbours[idx]
            unmask.append(self.stage_message(
                st.node(idx), server_round, stage=UNMASK,
                survivors=sorted(near & survivors), dropped=sorted(near & dropped)))
        answers = self._exchange(unmask, grid)
        seed_shares: dict[int, list[bytes]] = {i: [] for i in survivors}
        key_shares: dict[int, list[bytes]] = {i: [] for i in dropped}
        for reply in answers.values():
            rec = reply.content[SECAGG_RECORD]
            for owner, share in zip(rec["owners"], rec["shares"], strict=True):
                owner = int(owner)
                if owner in seed_shares:
                    seed_shares[owner].append(bytes(share))
                elif owner in key_shares:
                    key_shares[owner].append(bytes(share))
        size = total.size
        for idx, got in {**seed_shares, **key_shares}.items():
            if len(got) < st.threshold:
                raise SecureAggregationFailure(
                    f"only {len(got)} share(s) of site index {idx} returned at the unmask "
                    f"stage ({len(answers)} of {len(survivors)} hospitals answered), fewer "
                    f"than reconstruction_threshold={st.threshold}"
                )
        for got in seed_shares.values():
            total -= expand_mask(combine_shares(got), size, p.modulus_range)
        for idx, got in key_shares.items():
            secret = combine_shares(got)
            for j in sorted(st.neighbours[idx] & survivors):
                mask = expand_mask(pairwise_seed(secret, st.public[j][0]), size,
                                   p.modulus_range)
                # j added sign(j, idx) * mask for the dropped idx: take it out
                if _sign(j, idx) > 0:
                    total -= mask
                else:
                    total += mask
        total &= np.uint64(p.modulus_range - 1)
        weight = float(total[-1])
        if weight <= 0:
            raise SecureAggregationFailure("the summed weight is zero")
        # mean of the quantized updates -> dequantized mean update (Flower's mapping)
        step = 2 * p.clipping_range / p.quantization_range
        mean = total[:-1].astype(np.float64) / weight * step - p.clipping_range
        assert keys is not None and self.global_arrays is not None
        nodes = sorted(st.node(i) for i in survivors)
        self.state = None
        return SecureSum(nodes, split_vector(mean * weight, keys, self.global_arrays), weight)


def wrap(strategy: Strategy, cfg: DictConfig) -> Strategy:
    """The SecAgg+ server wrapper around ``strategy``."""
    return SecAggPlus(strategy, cfg)


# ----- hospital ---------------------------------------------------------------------------------


def _load(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(STATE_KEY)
    return dict(record) if record is not None else {}


def _save(context: Context, state: dict[str, Any]) -> None:
    context.state[STATE_KEY] = ConfigRecord(state)


def _reply(msg: Message, **fields: Any) -> Message:
    return Message(RecordDict({SECAGG_RECORD: ConfigRecord({STAGE: fields.pop(STAGE), **fields})}),
                   reply_to=msg)


def _setup(rec: ConfigRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state = {
        "round": int(rec["server-round"]) if "server-round" in rec else 0,
        STAGE: SETUP, "index": int(rec["index"]), "num-nodes": int(rec["num-nodes"]),
        "num-shares": int(rec["num-shares"]), "threshold": int(rec["threshold"]),
        "clipping-range": float(rec["clipping-range"]),
        "quantization-range": int(rec["quantization-range"]),
        "modulus-bits": int(rec["modulus-bits"]),
        "sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1),
        "sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2),
    }
    if not 2 <= state["threshold"] <= state["num-shares"] <= state["num-nodes"]:
        raise ValueError("SecAgg+: inconsistent threshold/shares/nodes from the server")
    return state, {"pk1": state["pk1"], "pk2": state["pk2"]}


def _share_keys(state: dict[str, Any], rec: ConfigRecord) -> dict[str, Any]:
    me = int(state["index"])
    peers = [int(p) for p in rec["peers"]]
    pk1s, pk2s = [bytes(k) for k in rec["pk1"]], [bytes(k) for k in rec["pk2"]]
    if me not in peers or len(peers) < int(state["threshold"]):
        raise ValueError(f"SecAgg+: {len(peers)} share-holders offered, fewer than the "
                         f"threshold {state['threshold']} (or this site is not among them)")
    if len(set(pk1s + pk2s)) != 2 * len(peers):
        raise ValueError("SecAgg+: some public keys are identical")
    mine = peers.index(me)
    if pk1s[mine] != state["pk1"] or pk2s[mine] != state["pk2"]:
        raise ValueError("SecAgg+: the server relayed wrong public keys for this site")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, int(state["threshold"]), len(peers))
    key_shares = create_shares(bytes(state["sk1"]), int(state["threshold"]), len(peers))
    dsts, ciphertexts = [], []
    for pos, peer in enumerate(peers):
        if peer == me:
            continue
        key = generate_shared_key(bytes_to_private_key(bytes(state["sk2"])),
                                  bytes_to_public_key(pk2s[pos]))
        plaintext = share_keys_plaintext_concat(me, peer, seed_shares[pos], key_shares[pos])
        dsts.append(peer)
        ciphertexts.append(encrypt(key, plaintext))
    state.update({
        STAGE: SHARE_KEYS, "seed": seed, "peers": peers, "peer-pk1": pk1s, "peer-pk2": pk2s,
        # shares this site holds, by owner (its own now, its neighbours' at the collect stage)
        "owners": [me], "seed-shares": [seed_shares[mine]], "key-shares": [key_shares[mine]],
    })
    return {"dsts": dsts, "ciphertexts": ciphertexts}


def _receive_shares(state: dict[str, Any], rec: ConfigRecord) -> list[int]:
    """Decrypt the neighbours' shares; return the neighbours this site masks against."""
    me = int(state["index"])
    peers = [int(p) for p in state["peers"]]
    pk2s = [bytes(k) for k in state["peer-pk2"]]
    srcs = [int(s) for s in rec["srcs"]]
    if len(srcs) + 1 < int(state["threshold"]):
        raise ValueError("SecAgg+: fewer neighbours than the threshold sent their shares")
    owners = [int(o) for o in state["owners"]]
    seeds, keys = [bytes(s) for s in state["seed-shares"]], [bytes(k) for k in state["key-shares"]]
    for src, ciphertext in zip(srcs, rec["ciphertexts"], strict=True):
        if src not in peers or src == me:
            raise ValueError(f"SecAgg+: shares from {src}, not a neighbour of this site")
        key = generate_shared_key(bytes_to_private_key(bytes(state["sk2"])),
                                  bytes_to_public_key(pk2s[peers.index(src)]))
        real_src, dst, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(key, bytes(ciphertext)))
        if real_src != src or dst != me:
            raise ValueError("SecAgg+: a relayed share was not meant for this site")
        owners.append(src)
        seeds.append(seed_share)
        keys.append(key_share)
    state.update({"owners": owners, "seed-shares": seeds, "key-shares": keys,
                  "masked-with": srcs})
    return srcs


def mask_update(state: dict[str, Any], keys_vector: np.ndarray, weight: float,
                neighbours: list[int]) -> np.ndarray:
    """The masked, packed vector of one site: mask(w * q(update), w) modulo the modulus."""
    modulus = 2 ** int(state["modulus-bits"])
    quant = int(state["quantization-range"])
    if weight < 0 or not float(weight).is_integer():
        raise ValueError(f"SecAgg+ sums integer weights; the reply's weight is {weight}")
    w = int(weight)
    if w * quant * int(state["num-nodes"]) >= modulus:
        raise ValueError(f"SecAgg+: weight {w} x quantization_range {quant} x "
                         f"{state['num-nodes']} hospitals does not fit modulus_range "
                         f"2**{state['modulus-bits']}; raise secagg.modulus_range")
    q = quantize([keys_vector], float(state["clipping-range"]), quant)[0].astype(np.uint64)
    vector = np.concatenate([q * np.uint64(w), np.array([w], dtype=np.uint64)])
    vector += expand_mask(bytes(state["seed"]), vector.size, modulus)
    me = int(state["index"])
    pk1s = [bytes(k) for k in state["peer-pk1"]]
    peers = [int(p) for p in state["peers"]]
    for j in neighbours:
        mask = expand_mask(pairwise_seed(bytes(state["sk1"]), pk1s[peers.index(j)]),
                           vector.size, modulus)
        if _sign(me, j) > 0:
            vector += mask
        else:
            vector -= mask
    return pack(vector & np.uint64(modulus - 1), modulus)


def _collect(state: dict[str, Any], msg: Message, rec: ConfigRecord, context: Context,
             call_next: ClientAppCallable) -> Message:
    neighbours = _receive_shares(state, rec)
    global_arrays = msg.content[ARRAYS]  # before inner mods may swap entries (FedBN)
    reply = call_next(msg, context)
    state[STAGE] = COLLECT
    if not has_update(reply):
        return reply  # no update (an error, or a site whose privacy budget is spent)
    weight = reply_weight(reply, str(rec[WEIGHT_KEY_FIELD]))
    keys, update = weighted_update(global_arrays, reply.content[ARRAYS], 1.0)
    packed = mask_update(state, update, weight, neighbours)
    content = RecordDict({name: r for name, r in reply.content.items() if name != ARRAYS})
    content[MASKED_RECORD] = ArrayRecord({"masked": Array(packed)})
    content[SECAGG_RECORD] = ConfigRecord({STAGE: COLLECT, KEYS_FIELD: keys})
    return Message(content, reply_to=msg)


def _unmask(state: dict[str, Any], rec: ConfigRecord) -> dict[str, Any]:
    me = int(state["index"])
    survivors, dropped = [int(i) for i in rec["survivors"]], [int(i) for i in rec["dropped"]]
    peers = set(int(p) for p in state["peers"])
    masked_with = set(int(s) for s in state.get("masked-with", [])) | {me}
    if set(survivors) & set(dropped) or me not in survivors:
        raise ValueError("SecAgg+: inconsistent survivor/dropped lists from the server")
    if not set(survivors) | set(dropped) <= peers:
        raise ValueError("SecAgg+: the server asked for shares of non-neighbours")
    if len(survivors) < int(state["threshold"]):
        raise ValueError(f"SecAgg+: {len(survivors)} survivors, fewer than the threshold "
                         f"{state['threshold']}: refusing to reveal shares")
    if set(dropped) & {me}:
        raise ValueError("SecAgg+: this site sent its update but is listed as dropped")
    owners = [int(o) for o in state["owners"]]
    out_owners, out_shares = [], []
    for idx in survivors:
        if idx in owners:
            out_owners.append(idx)
            out_shares.append(bytes(state["seed-shares"][owners.index(idx)]))
    for idx in dropped:
        if idx in owners and idx in masked_with:
            out_owners.append(idx)
            out_shares.append(bytes(state["key-shares"][owners.index(idx)]))
    return {"owners": out_owners, "shares": out_shares}


def secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Hospital side of SecAgg+ on the train handler (module docstring, stages 1-4).

    This round's secrets (private keys, self-mask seed, the neighbours' shares) stay in the
    ClientApp's ``context.state`` at the hospital and are replaced at the next setup.
    """
    rec = msg.content[SECAGG_RECORD]
    stage = str(rec[STAGE])
    state = _load(context)
    if stage == SETUP:
        state, out = _setup(rec)
        state["round"] = int(msg.content["config"].get("server-round", 0))
        _save(context, state)
        return _reply(msg, stage=SETUP, **out)
    server_round = int(msg.content["config"].get("server-round", 0))
    if not state or NEXT_STAGE.get(str(state.get(STAGE))) != stage or (
            int(state["round"]) != server_round):
        raise ValueError(f"SecAgg+: stage '{stage}' of round {server_round} does not follow "
                         f"'{state.get(STAGE)}' of round {state.get('round')}")
    if stage == SHARE_KEYS:
        out = _share_keys(state, rec)
        _save(context, state)
        return _reply(msg, stage=SHARE_KEYS, **out)
    if stage == COLLECT:
        reply = _collect(state, msg, rec, context, call_next)
        _save(context, state)
        return reply
    out = _unmask(state, rec)
    _save(context, {})  # the round is over: forget its secrets
    return _reply(msg, stage=UNMASK, **out)


OPTION = SecureAggregationOption(name=NAME, wrap=wrap, client_mod=secaggplus_mod, check=check)
