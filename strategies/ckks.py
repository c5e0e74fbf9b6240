"""Secure aggregation with homomorphic encryption: CKKS (TenSEAL), ``secagg=ckks``.

The hospitals share ONE CKKS secret key, made in a key ceremony outside the coordinating
centre (``scripts/deploy/ckks_keys.py``); each SuperNode reads it from the node-config path
``ckks-secret-context``. The server only ever holds the PUBLIC context (no secret key), which
can encrypt and add ciphertexts but cannot decrypt them.

One training round (the stages are messages of the shared secure-aggregation framework,
``strategies.secure_aggregation``; the hospital side is ``ckks_client_mod``):
1. (first round only) stage ``public-context``: the server asks every hospital for its public
   context, checks that all hospitals sent the same one (SHA-256) and, if
   ``secagg.public_context_sha256`` is set, that it is the consortium's pinned one.
2. Each hospital trains; its reply's plaintext model is replaced by the encryption of
   ``[w, w * (local - global)]`` (w = its weight, the metric the inner strategy weights by,
   e.g. ``num-examples``), flattened and cut into chunks of ``SLOTS`` = 4096 values, one
   CKKS ciphertext each. Metrics stay in plaintext (per site by design; arrays are secret).
3. The server adds the ciphertexts chunk by chunk with the public context and, in stage
   ``decrypt``, sends the encrypted SUM to ``secagg.decryptors`` hospitals among those in
   the sum; their plaintexts must agree bit for bit (CKKS decryption is deterministic).
4. The plaintext sum (weight sum W, weighted update sum S) goes to the shared
   ``replies_from_sum``: global + S / W is exactly FedAvg's weighted average, so FedAvg,
   FedAdam and central-DP noise work unchanged.

A hospital that fails or drops out before replying is simply not in the sum. Threat model,
precision and costs: conf/secagg/ckks.yaml and docs/privacy.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Iterable
from functools import lru_cache
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

from fl_app.run_folder import atomic_write_bytes
from strategies.secure_aggregation import (
    ARRAYS,
    KEYS_FIELD,
    OPTION_KEY,
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

# CKKS parameters of the consortium key (fixed at the key ceremony; the context carries them).
# N = 8192 gives 4096 slots per ciphertext and 128-bit security for the 200-bit modulus of the
# 60-40-40-60 chain. Only additions are computed (no rescaling), so a ciphertext keeps its
# 140-bit modulus and values far beyond any weighted update decode (checked up to 1e15); scale
# 2^40 keeps the absolute error near 1e-8 per value (measured: docs/privacy.md).
POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
GLOBAL_SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2  # values per ciphertext = the chunk size

NODE_CONFIG_KEY = "ckks-secret-context"  # SuperNode --node-config: path of the secret context
SECRET_FILE, PUBLIC_FILE = "ckks-secret-context.bin", "ckks-public-context.bin"
DEFAULT_SIMULATION_DIR = Path("~/.cache/fedclinic/ckks-simulation")

ENCRYPTED_RECORD = "ckks"  # ArrayRecord of ciphertext chunks (train reply, decrypt request)
PLAIN_RECORD = "ckks-plain"  # ArrayRecord {"sum": float64 vector} (decrypt reply)
STYPE = "tenseal.ckks_vector"
# fields of the secagg ConfigRecord (strategies.secure_aggregation.SECAGG_RECORD)
STAGE_FIELD, STAGE_PUBLIC, STAGE_DECRYPT, STAGE_TRAIN = (
    "stage", "public-context", "decrypt", "train")
KEY_DIR_FIELD = "simulation-key-dir"
SHA_FIELD = "key-sha256"
PUBLIC_FIELD = "public-context"
SIZE_FIELD = "size"
SITE_FIELD, TAG_FIELD, ROUND_FIELD = "site", "tag", "round"  # a train reply's authentication
SITES_FIELD, TAGS_FIELD = "sites", "tags"  # a verified decrypt request: who is in the sum
PART_PREFIX = "ckks-part-"  # ArrayRecords of a verified decrypt request, one per hospital
# A hospital never decrypts a "sum" of fewer hospitals than this (a sum of one IS that
# hospital's update). The server cannot lower it; a SuperNode can raise it in its node
# config (node config key ckks-min-contributors).
MIN_CONTRIBUTORS = 2
NODE_MIN_CONTRIBUTORS_KEY = "ckks-min-contributors"
# node config: "true" = this hospital decrypts only sums it verified itself (verify_sum)
NODE_VERIFY_KEY = "ckks-verify-sum"
MAC_INFO = b"fedclinic secagg=ckks update authentication v1"


class CkksKeyError(ValueError):
    """A CKKS key file is missing, unreadable, too widely readable or of the wrong kind."""


# ----- keys ------------------------------------------------------------------------------------


def new_secret_context() -> ts.Context:
    """A fresh consortium CKKS context with its secret key (no Galois/relin keys: only
    additions are ever computed, so they would only make the public context bigger)."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE,
                         coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
    context.global_scale = 2.0**GLOBAL_SCALE_BITS
    return context


def public_bytes(context: ts.Context) -> bytes:
    """The context serialised WITHOUT its secret key (what the server may hold)."""
    return context.serialize(save_public_key=True, save_secret_key=False,
                             save_galois_keys=False, save_relin_keys=False)


def fingerprint(public: bytes) -> str:
    """SHA-256 (hex) of a serialised public context: the consortium key's identity."""
    return hashlib.sha256(public).hexdigest()


def consortium_mac_key(secret: ts.Context) -> bytes:
    """A 32-byte key only the hospitals can compute (HKDF-SHA256 of the secret context).

    Authenticates each hospital's ciphertext to the decrypting hospitals: the server,
    without the secret key, can neither forge a tag nor move one to another ciphertext.
    """
    material = secret.serialize(save_secret_key=True, save_galois_keys=False,
                                save_relin_keys=False)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_INFO).derive(material)


def update_tag(mac_key: bytes, site: str, run_id: int, server_round: int,
               chunks: list[bytes]) -> str:
    """HMAC-SHA256 binding a ciphertext to the hospital, the run and the round (hex)."""
    digest = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    message = json.dumps([site, int(run_id), int(server_round), digest]).encode()
    return hmac.new(mac_key, message, hashlib.sha256).hexdigest()


def write_key_files(folder: Path, context: ts.Context | None = None) -> tuple[Path, Path]:
    """Make (or take) a consortium key and write it to ``folder``.

    Returns (secret context file, mode 0600: for the hospitals only; public context file,
    0644: no secret key, may go to the coordinating centre).
    """
    context = context or new_secret_context()
    folder.mkdir(parents=True, exist_ok=True)
    secret, public = folder / SECRET_FILE, folder / PUBLIC_FILE
    # atomic_write_bytes creates its temporary file with mode 0600 (tempfile.mkstemp), so
    # the secret is never readable by others, not even for a moment
    atomic_write_bytes(secret, context.serialize(save_secret_key=True, save_galois_keys=False,
                                                 save_relin_keys=False))
    atomic_write_bytes(public, public_bytes(context))
    os.chmod(public, 0o644)
    return secret, public


def load_secret_context(path: Path) -> ts.Context:
    """The hospital's secret context from ``path``; CkksKeyError if it is unusable.

    Refuses a file that group or others may read (like ssh does for private keys).
    """
    path = Path(path).expanduser()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as err:
        raise CkksKeyError(f"cannot read the CKKS secret context {path}: "
                           f"{err.strerror or err}") from None
    if mode & 0o077:
        raise CkksKeyError(f"CKKS secret context {path} is readable by others (mode "
                           f"{mode:04o}); run `chmod 600 {path}`")
    try:
        context = ts.context_from(data)
    except Exception:  # TenSEAL raises a bare ValueError/RuntimeError from its C++ parser
        raise CkksKeyError(f"{path} is not a TenSEAL context file") from None
    if not context.is_private():
        raise CkksKeyError(f"{path} holds a PUBLIC context (no secret key): a hospital needs "
                           f"the consortium's secret context ({SECRET_FILE})")
    return context


def load_public_context(data: bytes) -> ts.Context:
    """A public context from bytes; CkksKeyError if the bytes carry a secret key.

    The only way server code makes a context, so the server never holds a secret key even
    when a hospital sends one by mistake.
    """
    try:
        context = ts.context_from(data)
    except Exception:
        raise CkksKeyError("not a serialised TenSEAL context") from None
    if context.is_private():
        raise CkksKeyError("a CKKS context with a SECRET key was offered to the server; it "
                           "must only ever receive the public context")
    return context


def simulation_key_file(folder: Path | None) -> Path:
    """The simulated consortium's secret context in ``folder`` (made once, under a lock).

    Simulation only: the simulated hospitals (ClientApps) share one site-side folder; the
    server never reads it (it fetches the public context from the hospitals).
    """
    folder = Path(folder or DEFAULT_SIMULATION_DIR).expanduser()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = folder / SECRET_FILE
    with open(folder / ".lock", "a") as lock:  # ClientApps start concurrently
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not secret.exists():
            write_key_files(folder)
    return secret


@lru_cache(maxsize=4)
def _cached_secret(path: str, mtime_ns: int) -> ts.Context:
    return load_secret_context(Path(path))


def site_secret_context(node_config: dict[str, Any], key_dir: str | None) -> ts.Context:
    """This hospital's secret context: node-config ``ckks-secret-context`` (deployment), or
    the simulated consortium key in ``key_dir`` (simulation: node_config has partition-id)."""
    if NODE_CONFIG_KEY in node_config:
        path = Path(str(node_config[NODE_CONFIG_KEY])).expanduser()
    elif "partition-id" in node_config:
        path = simulation_key_file(Path(key_dir) if key_dir else None)
    else:
        raise CkksKeyError(
            f"secagg=ckks but this SuperNode has no CKKS key: start it with --node-config "
            f"'{NODE_CONFIG_KEY}=\"/path/{SECRET_FILE}\"' (made by scripts/deploy/ckks_keys.py)"
        )
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as err:
        raise CkksKeyError(f"cannot read the CKKS secret context {path}: "
                           f"{err.strerror or err}") from None
    return _cached_secret(str(path), mtime)


# ----- packing and encryption --------------------------------------------------------------------


def packed_size(num_values: int) -> int:
    """Values in a packed vector: the weight (slot 0), then the weighted update."""
    return 1 + num_values


def num_chunks(size: int) -> int:
    """Ciphertexts needed for ``size`` values (SLOTS each)."""
    return -(-size // SLOTS)


def encrypt(context: ts.Context, vector: np.ndarray) -> list[bytes]:
    """Serialised ciphertexts of ``vector`` in chunks of SLOTS values."""
    return [ts.ckks_vector(context, vector[i:i + SLOTS].tolist()).serialize()
            for i in range(0, vector.size, SLOTS)]


def decrypt(context: ts.Context, chunks: Iterable[bytes], size: int) -> np.ndarray:
    """The first ``size`` plaintext values of the ciphertext chunks (needs the secret key)."""
    parts = [np.asarray(ts.ckks_vector_from(context, c).decrypt(), dtype=np.float64)
             for c in chunks]
    vector = np.concatenate(parts) if parts else np.empty(0)
    return vector[:size]


def add_encrypted(context: ts.Context, per_site: list[list[bytes]]) -> list[bytes]:
    """Chunk-wise sum of several sites' ciphertexts (the public context suffices)."""
    total = []
    for i in range(len(per_site[0])):
        acc = ts.ckks_vector_from(context, per_site[0][i])
        for chunks in per_site[1:]:
            acc += ts.ckks_vector_from(context, chunks[i])
        total.append(acc.serialize())
    return total


def chunks_record(chunks: list[bytes], size: int) -> ArrayRecord:
    """Ciphertext chunks as an ArrayRecord (opaque bytes; shape = plaintext values held)."""
    return ArrayRecord({
        f"{i:06d}": Array(dtype="ckks", shape=(min(SLOTS, size - i * SLOTS),), stype=STYPE,
                          data=c)
        for i, c in enumerate(chunks)
    })


def record_chunks(record: ArrayRecord) -> list[bytes]:
    """The ciphertext bytes of a ``chunks_record`` in order."""
    return [record[k].data for k in sorted(record.keys())]


# ----- hospital side ---------------------------------------------------------------------------


def ckks_client_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The hospital's half of ``secagg=ckks`` (called by ``secure_aggregation_mod``).

    Three stages, named in the message's ``secagg`` record: ``public-context`` (reply the
    public context, never the secret), ``decrypt`` (decrypt the encrypted sum, or verify and
    add the hospitals' authenticated ciphertexts first; reply the plaintext) and ``train``
    (train through the inner mods, then replace the plaintext model in the reply by the
    encryption of ``[w, w * (local - global)]`` and its authentication tag).
    """
    record = secagg_record_of(msg)
    assert record is not None
    key_dir = str(record.get(KEY_DIR_FIELD, "")) or None
    secret = site_secret_context(context.node_config, key_dir)
    stage = str(record.get(STAGE_FIELD, STAGE_TRAIN))
    if stage == STAGE_PUBLIC:
        public = public_bytes(secret)
        reply = ConfigRecord({OPTION_KEY: "ckks", PUBLIC_FIELD: public,
                              SHA_FIELD: fingerprint(public)})
        return Message(RecordDict({SECAGG_RECORD: reply}), reply_to=msg)
    if stage == STAGE_DECRYPT:
        return _decrypt_reply(msg, context, record, secret)
    return _encrypted_train_reply(msg, context, call_next, record, secret)


def _encrypted_train_reply(msg: Message, context: Context, call_next: ClientAppCallable,
                           record: ConfigRecord, secret: ts.Context) -> Message:
    own = fingerprint(public_bytes(secret))
    expected = str(record.get(SHA_FIELD, ""))
    if expected and expected != own:
        raise CkksKeyError(f"the server aggregates under CKKS key {expected[:16]}..., this "
                           f"hospital holds key {own[:16]}...: not the consortium's key")
    # the global model as sent, before inner mods (FedBN) replace entries in the message
    global_arrays = ArrayRecord(dict(msg.content[ARRAYS].items()))
    # the inner mods see the message as without secure aggregation (Flower's clipping mods
    # require exactly one ConfigRecord)
    del msg.content[SECAGG_RECORD]
    reply = call_next(msg, context)
    if not has_update(reply):
        return reply  # an error, or a site whose privacy budget is spent: not in the sum
    weight = reply_weight(reply, str(record[WEIGHT_KEY_FIELD]))
    keys, update = weighted_update(global_arrays, reply.content[ARRAYS], weight)
    vector = np.concatenate([[weight], update])
    chunks = encrypt(secret, vector)
    site = _site_name(reply, context)
    server_round = int(msg.content["config"].get("server-round", 0))  # type: ignore[arg-type]
    content = RecordDict({name: r for name, r in reply.content.items() if name != ARRAYS})
    content[ENCRYPTED_RECORD] = chunks_record(chunks, vector.size)
    content[SECAGG_RECORD] = ConfigRecord({
        OPTION_KEY: "ckks", KEYS_FIELD: keys, SHA_FIELD: own, SITE_FIELD: site,
        ROUND_FIELD: server_round,
        TAG_FIELD: update_tag(consortium_mac_key(secret), site, msg.metadata.run_id,
                              server_round, chunks),
    })
    reply.content = content
    return reply


def _site_name(reply: Message, context: Context) -> str:
    site = reply.content.config_records.get("site")
    return str(site["name"]) if site is not None and "name" in site else str(context.node_id)


class DecryptionRefused(ValueError):
    """A hospital will not decrypt what the server sent (too few hospitals, bad tag)."""


def _decrypt_reply(msg: Message, context: Context, record: ConfigRecord,
                   secret: ts.Context) -> Message:
    """Decrypt the sum, after the checks that do not depend on trusting the server."""
    floor = max(MIN_CONTRIBUTORS, int(context.node_config.get(NODE_MIN_CONTRIBUTORS_KEY,
                                                              MIN_CONTRIBUTORS)))
    sites = [str(s) for s in record.get(SITES_FIELD, [])]  # type: ignore[union-attr]
    if len(set(sites)) < floor:
        raise DecryptionRefused(f"refusing to decrypt a sum of {len(set(sites))} hospital(s): "
                                f"at least {floor} are needed (a sum of one is an update)")
    parts = [name for name in msg.content.array_records if name.startswith(PART_PREFIX)]
    if parts:
        total = _verified_sum(msg, record, secret, sites)
    elif str(context.node_config.get(NODE_VERIFY_KEY, "false")).lower() == "true":
        raise DecryptionRefused("this hospital decrypts only sums it verified itself "
                                f"({NODE_VERIFY_KEY}=true); run with secagg.verify_sum=true")
    else:  # honest-but-curious server: decrypt the sum it computed
        total = record_chunks(msg.content[ENCRYPTED_RECORD])
    plain = decrypt(secret, total, int(record[SIZE_FIELD]))  # type: ignore[arg-type]
    return Message(RecordDict({PLAIN_RECORD: ArrayRecord({"sum": Array(plain)})}),
                   reply_to=msg)


def _verified_sum(msg: Message, record: ConfigRecord, secret: ts.Context,
                  sites: list[str]) -> list[bytes]:
    """Check every hospital's tag (same run, the stated round), then add the ciphertexts."""
    tags = [str(t) for t in record[TAGS_FIELD]]  # type: ignore[union-attr]
    server_round = int(record[ROUND_FIELD])  # type: ignore[arg-type]
    if len(tags) != len(sites):
        raise DecryptionRefused("decrypt request: one tag per hospital expected")
    mac_key = consortium_mac_key(secret)
    per_site = []
    for i, (site, tag) in enumerate(zip(sites, tags, strict=True)):
        chunks = record_chunks(msg.content[f"{PART_PREFIX}{i}"])
        want = update_tag(mac_key, site, msg.metadata.run_id, server_round, chunks)
        if not hmac.compare_digest(want, tag):
            raise DecryptionRefused(f"the encrypted update said to be {site}'s in round "
                                    f"{server_round} is not authentic; not decrypting")
        per_site.append(chunks)
    return add_encrypted(secret, per_site)


# ----- server side -----------------------------------------------------------------------------


class CkksAggregation(SecureAggregation):
    """Server half of ``secagg=ckks``: adds ciphertexts, has hospitals decrypt the sum.

    Holds only a public context (``load_public_context`` refuses a secret one), so it can
    neither decrypt a hospital's update nor the sum on its own.
    """

    name = "ckks"

    def __init__(self, strategy: Strategy, cfg: DictConfig) -> None:
        super().__init__(strategy, cfg)
        secagg = cfg.secagg
        self.decryptors: int = secagg.decryptors
        self.key_dir: str = secagg.simulation_key_dir or ""
        self.pinned_sha256: str = secagg.public_context_sha256 or ""
        self.verify_sum: bool = secagg.verify_sum
        self.context: ts.Context | None = None
        self.key_sha256 = ""
        self.last_decryptors: list[int] = []

    def _stage(self, grid: Grid, nodes: list[int], server_round: int, stage: str,
               content: RecordDict | None = None, **fields: Any) -> list[Message]:
        messages = []
        for node in nodes:
            msg = self.stage_message(node, server_round, **{STAGE_FIELD: stage,
                                                            KEY_DIR_FIELD: self.key_dir, **fields})
            for name, record in (content or {}).items():
                msg.content[name] = record
            messages.append(msg)
        return [r for r in grid.send_and_receive(messages, timeout=self.round_timeout)
                if not r.has_error()]  # failures: recorded and judged by the FederationGuard

    def fetch_public_context(self, grid: Grid, server_round: int) -> None:
        """Ask every hospital for its public context; all must hold the same key."""
        by_node: dict[int, str] = {}
        keys: dict[str, bytes] = {}
        for reply in self._stage(grid, sorted(grid.get_node_ids()), server_round, STAGE_PUBLIC):
            public = bytes(reply.content[SECAGG_RECORD][PUBLIC_FIELD])  # type: ignore[arg-type]
            sha = fingerprint(public)
            keys[sha], by_node[reply.metadata.src_node_id] = public, sha
        if not keys:
            raise SecureAggregationFailure("no hospital answered with its CKKS public context")
        if len(keys) > 1:
            detail = ", ".join(f"node {n}: {s[:16]}..." for n, s in sorted(by_node.items()))
            raise SecureAggregationConfigError(
                f"secagg=ckks: the hospitals hold different CKKS keys ({detail}); every "
                "hospital's SuperNode must load the consortium's one secret context")
        sha, public = next(iter(keys.items()))
        if self.pinned_sha256 and sha != self.pinned_sha256:
            raise SecureAggregationConfigError(
                f"secagg=ckks: the hospitals' CKKS key {sha} is not the pinned "
                f"secagg.public_context_sha256 {self.pinned_sha256}")
        self.context, self.key_sha256 = load_public_context(public), sha
        log(INFO, "secagg=ckks: %d hospital(s) hold CKKS key %s (public context, %d bytes)",
            len(by_node), sha[:16], len(public))

    def setup_round(self, server_round: int, messages: list[Message], grid: Grid
                    ) -> list[Message]:
        """Fetch the public context once; mark each train message for encryption."""
        if self.context is None:
            self.fetch_public_context(grid, server_round)
        for msg in messages:
            msg.content[SECAGG_RECORD] = self.record(**{
                STAGE_FIELD: STAGE_TRAIN, KEY_DIR_FIELD: self.key_dir, SHA_FIELD: self.key_sha256,
            })
        return messages

    def secure_sum(self, server_round: int, replies: list[Message], grid: Grid) -> SecureSum:
        """Add the encrypted updates; have ``decryptors`` hospitals in the sum decrypt it."""
        assert self.context is not None and self.global_arrays is not None
        encrypted = [r for r in replies
                     if not r.has_error() and ENCRYPTED_RECORD in r.content.array_records]
        if not encrypted:
            raise SecureAggregationFailure("no hospital sent an encrypted update")
        keys = self._common_keys(encrypted)
        size = packed_size(sum(int(np.prod(self.global_arrays[k].numpy().shape)) for k in keys))
        per_site = [record_chunks(r.content[ENCRYPTED_RECORD]) for r in encrypted]
        if any(len(c) != num_chunks(size) for c in per_site):
            raise SecureAggregationFailure(f"expected {num_chunks(size)} ciphertexts per "
                                           "hospital for this model")
        order = sorted(range(len(encrypted)), key=lambda i: encrypted[i].metadata.src_node_id)
        encrypted, per_site = [encrypted[i] for i in order], [per_site[i] for i in order]
        nodes = [r.metadata.src_node_id for r in encrypted]
        auth = [r.content[SECAGG_RECORD] for r in encrypted]
        fields: dict[str, Any] = {SIZE_FIELD: size, ROUND_FIELD: server_round,
                                  SITES_FIELD: [str(a[SITE_FIELD]) for a in auth]}
        if self.verify_sum:  # the decrypting hospitals check and add the parts themselves
            fields[TAGS_FIELD] = [str(a[TAG_FIELD]) for a in auth]
            content = RecordDict({f"{PART_PREFIX}{i}": chunks_record(c, size)
                                  for i, c in enumerate(per_site)})
        else:  # honest-but-curious: the server adds, the hospitals decrypt its sum
            content = RecordDict({
                ENCRYPTED_RECORD: chunks_record(add_encrypted(self.context, per_site), size)
            })
        plain = self._decrypt(server_round, content, fields, nodes[: self.decryptors], grid)
        log(INFO, "secagg=ckks: round %d: %d encrypted update(s) of %d ciphertexts %s, "
            "decrypted by %d hospital(s)", server_round, len(encrypted), num_chunks(size),
            "verified and added by the decrypting hospitals" if self.verify_sum
            else "added", len(self.last_decryptors))
        return SecureSum(nodes, split_vector(plain[1:], keys, self.global_arrays),
                         float(plain[0]))

    def _common_keys(self, replies: list[Message]) -> list[str]:
        keys = {tuple(r.content[SECAGG_RECORD][KEYS_FIELD]) for r in replies}  # type: ignore[arg-type]
        if len(keys) != 1:
            raise SecureAggregationFailure("hospitals encrypted different model entries; the "
                                           "ciphertexts cannot be added")
        shas = {str(r.content[SECAGG_RECORD][SHA_FIELD]) for r in replies}
        if shas != {self.key_sha256}:
            raise SecureAggregationFailure(f"an update was encrypted under another CKKS key "
                                           f"than the consortium's {self.key_sha256[:16]}...")
        out = list(keys.pop())
        if missing := [k for k in out if k not in self.global_arrays]:  # type: ignore[operator]
            raise SecureAggregationFailure(f"encrypted entries the global model lacks: {missing}")
        return out

    def _decrypt(self, server_round: int, content: RecordDict, fields: dict[str, Any],
                 nodes: list[int], grid: Grid) -> np.ndarray:
        # the decrypting hospitals see the sum (what the server learns too), nothing else
        self.last_decryptors = nodes
        answers = self._stage(grid, nodes, server_round, STAGE_DECRYPT, content, **fields)
        plains = [r.content[PLAIN_RECORD]["sum"].numpy() for r in answers]
        if not plains:
            raise SecureAggregationFailure(f"none of the decrypting hospitals (nodes {nodes}) "
                                           "returned the sum")
        if any(p.shape != plains[0].shape or not np.array_equal(p, plains[0])
               for p in plains[1:]):
            raise SecureAggregationFailure("the decrypting hospitals returned different sums; "
                                           "the aggregate is not trusted")
        return plains[0]


def check_ckks(cfg: DictConfig) -> None:
    """One-line errors for bad ``secagg`` parameters of the ckks option (types: the schema)."""
    secagg = cfg.secagg
    if secagg.decryptors < 1:
        raise SecureAggregationConfigError(
            f"secagg.decryptors must be at least 1, got {secagg.decryptors}")
    pin = secagg.public_context_sha256
    if pin is not None and not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise SecureAggregationConfigError(
            "secagg.public_context_sha256 must be the 64 lower-case hex digits printed by "
            f"`scripts/deploy/ckks_keys.py create`, got '{pin}'")


OPTION = SecureAggregationOption(
    name="ckks", wrap=CkksAggregation, client_mod=ckks_client_mod, check=check_ckks,
)
