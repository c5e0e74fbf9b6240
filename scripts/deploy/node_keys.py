#!/usr/bin/env python3
"""SuperNode authentication keys: one EC P-384 key pair per hospital, registered at the SuperLink.

At the hospital (the private key never leaves it):
    python scripts/deploy/node_keys.py create --out keys/ --site cleveland
        -> keys/cleveland (private, OpenSSH format, mode 0600) and keys/cleveland.pub
At the coordinating centre (with the hospital's .pub, fingerprint confirmed out of band):
    python scripts/deploy/node_keys.py register keys/cleveland.pub --connection fedclinic
    python scripts/deploy/node_keys.py unregister --site cleveland --connection fedclinic
    python scripts/deploy/node_keys.py fingerprint keys/cleveland.pub

``register``/``unregister`` call ``flwr supernode register|unregister`` and keep a small
``registry.json`` (site -> node id, fingerprint; default: next to the public key, or
``--registry``) so that a hospital can be removed by name.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DeployError,
    fail,
    flower_env,
    flower_executable,
    refuse_overwrite,
    require_file,
    write_private,
    write_public,
)

REGISTRY = "registry.json"


def create_key_pair(out: Path, site: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``out/<site>`` (private, OpenSSH) and ``out/<site>.pub``; return both paths."""
    if not site or "/" in site or site.startswith("."):
        raise DeployError(f"--site '{site}' must be a plain name such as 'cleveland'")
    private, public = out / site, out / f"{site}.pub"
    refuse_overwrite([private, public], force)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(private, key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ))
    openssh = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_public(public, openssh + f" fedclinic-{site}\n".encode())
    return private, public


def fingerprint(public_key: Path) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key file (compare it by phone)."""
    text = require_file(public_key, "public key").read_text().split()
    if len(text) < 2:
        raise DeployError(f"{public_key} is not an OpenSSH public key")
    digest = hashlib.sha256(base64.b64decode(text[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _flwr(args: list[str], flwr_home: Path | None) -> subprocess.CompletedProcess[str]:
    env = flower_env()
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return subprocess.run(
        [flower_executable("flwr"), *args], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )


def _registry(path: Path) -> tuple[Path, dict[str, dict[str, object]]]:
    return path, (json.loads(path.read_text()) if path.is_file() else {})


def register(public_key: Path, connection: str, site: str | None, flwr_home: Path | None,
             registry_file: Path | None = None) -> int:
    """Register ``public_key`` with the SuperLink of ``connection``; return the node id."""
    public_key = require_file(public_key, "SuperNode public key")
    site = site or public_key.name.removesuffix(".pub")
    done = _flwr(["supernode", "register", str(public_key), connection, "--name", site,
                  "--format", "json"], flwr_home)
    try:
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        reply = {}
    if done.returncode != 0 or not reply.get("success"):
        detail = reply.get("error") or (done.stdout + done.stderr).strip()
        raise DeployError(f"`flwr supernode register` failed for {public_key}: {detail}")
    node_id = int(reply["node-id"])
    path, registry = _registry(registry_file or public_key.parent / REGISTRY)
    registry[site] = {"node_id": node_id, "public_key": public_key.name,
                      "fingerprint": fingerprint(public_key)}
    path.write_text(json.dumps(registry, indent=2) + "\n")
    return node_id


def unregister(
    connection: str, node_id: int | None, site: str | None, registry_file: Path,
    flwr_home: Path | None,
) -> int:
    """Unregister a SuperNode by node id or by site name (looked up in registry.json)."""
    path, registry = _registry(registry_file)
    if node_id is None:
        if site not in registry:
            raise DeployError(f"site '{site}' is not in {path}; pass --node-id "
                              "(see `flwr supernode ls <connection>`)")
        node_id = int(registry[site]["node_id"])  # type: ignore[call-overload]
    done = _flwr(["supernode", "unregister", str(node_id), connection], flwr_home)
    if done.returncode != 0:
        raise DeployError(f"`flwr supernode unregister {node_id}` failed: "
                          f"{(done.stdout + done.stderr).strip()}")
    for name in [s for s, entry in registry.items() if entry.get("node_id") == node_id]:
        del registry[name]
    if path.is_file():
        path.write_text(json.dumps(registry, indent=2) + "\n")
    return node_id


def main(argv: list[str] | None = None) -> None:
    """Command line: ``create``, ``register``, ``unregister``, ``fingerprint``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_new = sub.add_parser("create", help="create keys/<site> and keys/<site>.pub")
    p_new.add_argument("--out", type=Path, required=True)
    p_new.add_argument("--site", required=True)
    p_new.add_argument("--force", action="store_true", help="replace existing keys (rotation)")
    for name in ("register", "unregister"):
        p = sub.add_parser(name, help=f"{name} a SuperNode at the SuperLink")
        p.add_argument("--connection", required=True,
                       help="connection name in $FLWR_HOME/config.toml (see connection.py)")
        p.add_argument("--flwr-home", type=Path, default=None,
                       help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")
        p.add_argument("--site", default=None, help="site name (default: key file name)")
        if name == "register":
            p.add_argument("public_key", type=Path)
            p.add_argument("--registry", type=Path, default=None,
                           help="registry file (default: registry.json beside the key)")
        else:
            p.add_argument("--node-id", type=int, default=None)
            p.add_argument("--registry", type=Path, default=Path("keys") / REGISTRY,
                           help="registry file (default: keys/registry.json)")
    p_fp = sub.add_parser("fingerprint", help="print a public key's SHA256 fingerprint")
    p_fp.add_argument("public_key", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            private, public = create_key_pair(args.out, args.site, args.force)
            print(f"private key: {private}  (stays at the hospital; mode 0600)")
            print(f"public key:  {public}  (send to the coordinating centre)")
            print(f"fingerprint: {fingerprint(public)}  (confirm it by phone)")
        elif args.command == "register":
            node_id = register(args.public_key, args.connection, args.site, args.flwr_home,
                               args.registry)
            print(f"registered {args.public_key} ({fingerprint(args.public_key)}) as SuperNode "
                  f"{node_id}")
        elif args.command == "unregister":
            if args.node_id is None and args.site is None:
                raise DeployError("give --site or --node-id")
            node_id = unregister(args.connection, args.node_id, args.site, args.registry,
                                 args.flwr_home)
            print(f"unregistered SuperNode {node_id}")
        else:
            print(fingerprint(args.public_key))
    except DeployError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
