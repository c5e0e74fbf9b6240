#!/usr/bin/env python3
"""CKKS key ceremony for ``secagg=ckks``: the consortium's one homomorphic key pair.

Run by the hospitals (or a key custodian they trust), NEVER on the coordinating centre's
server, which must only ever see the public context:

    python scripts/deploy/ckks_keys.py create --out ckks/
        -> ckks/ckks-secret-context.bin  (mode 0600: the secret key; a copy to each hospital,
                                          by a channel the server does not see)
           ckks/ckks-public-context.bin  (no secret key; may be published)
        and prints the public context's SHA-256 (pin it in conf/secagg/ckks.yaml:
        secagg.public_context_sha256, so the server refuses any other key)
    python scripts/deploy/ckks_keys.py show ckks/ckks-secret-context.bin
        -> kind (secret/public), the SHA-256 every hospital must see, the CKKS parameters

Each hospital starts its SuperNode with the secret context's path in its node config
(``supernode.py --ckks-secret-context PATH``, i.e. ``--node-config
'ckks-secret-context="PATH"'``). The server fetches the public context from the hospitals in
the first round and checks that all of them (and the pin, if set) have the same SHA-256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: strategies/
from _common import DeployError, fail

from strategies.ckks import (
    COEFF_MOD_BIT_SIZES,
    GLOBAL_SCALE_BITS,
    POLY_MODULUS_DEGREE,
    SECRET_FILE,
    SLOTS,
    CkksKeyError,
    fingerprint,
    load_public_context,
    load_secret_context,
    public_bytes,
    write_key_files,
)

PARAMETERS = (f"CKKS, poly_modulus_degree {POLY_MODULUS_DEGREE} ({SLOTS} values per "
              f"ciphertext), coeff_mod_bit_sizes {list(COEFF_MOD_BIT_SIZES)}, "
              f"scale 2^{GLOBAL_SCALE_BITS}")


def create(out: Path, force: bool) -> str:
    """Write a new consortium key pair to ``out``; return the public context's SHA-256."""
    secret = out / SECRET_FILE
    if secret.exists() and not force:
        raise DeployError(f"{secret} exists: a new key would lock out every hospital that "
                          "holds the old one (use --force to replace it on purpose)")
    secret, public = write_key_files(out)
    sha = fingerprint(public.read_bytes())
    print(f"secret context: {secret} (mode 0600; copy to each hospital, never to the server)")
    print(f"public context: {public} (no secret key)")
    print(f"public context SHA-256: {sha}")
    print(PARAMETERS)
    return sha


def show(path: Path) -> str:
    """Print what ``path`` holds; return the SHA-256 of its public part."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DeployError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        context = load_public_context(data)
        kind = "PUBLIC context (no secret key): for the server"
    except CkksKeyError:
        context = load_secret_context(path)  # checks the mode as a SuperNode would
        kind = "SECRET context: for the hospitals only"
    sha = fingerprint(public_bytes(context))
    print(f"{path}: {kind}")
    print(f"public context SHA-256: {sha}")
    return sha


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("create", help="make the consortium key pair")
    make.add_argument("--out", type=Path, required=True, help="folder for the two files")
    make.add_argument("--force", action="store_true", help="replace an existing key")
    look = sub.add_parser("show", help="kind and SHA-256 of a context file")
    look.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            create(args.out, args.force)
        else:
            show(args.path)
    except (DeployError, CkksKeyError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
