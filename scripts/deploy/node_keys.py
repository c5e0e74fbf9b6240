#!/usr/bin/env python3
"""SuperNode authentication keys: one EC P-384 key pair per hospital, registered at the SuperLink.

At the hospital (the private key never leaves it):
    python scripts/deploy/node_keys.py create --out keys/ --site cleveland
        -> keys/cleveland (private, OpenSSH format, mode 0600) and keys/cleveland.pub
At the coordinating centre (with the hospital's .pub, fingerprint confirmed out of band):
    python scripts/deploy/node_keys.py register keys/cleveland.pub --connection fedclinic
    python scripts/deploy/node_keys.py rotate keys/cleveland-2027.pub --site cleveland \
        --connection fedclinic          # new key registered, then the old one removed
    python scripts/deploy/node_keys.py unregister --site cleveland --connection fedclinic
    python scripts/deploy/node_keys.py list --connection fedclinic
    python scripts/deploy/node_keys.py fingerprint keys/cleveland.pub

``register``/``rotate``/``unregister`` call ``flwr supernode register|unregister`` and keep
the site registry (site -> node id, key fingerprint) in ONE file for every command:
``--registry``, else ``$FEDCLINIC_REGISTRY``, else ``registry.json`` in the Flower config
folder (``--flwr-home``, ``$FLWR_HOME`` or ``~/.flwr``). A site that has an active key is not
registered again (use ``rotate``); a key that was unregistered can never be registered again.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
REGISTRY_ENV = "FEDCLINIC_REGISTRY"
REMOVED_FOREVER = ("a key that was unregistered cannot be registered again (the SuperLink "
                   "remembers it); to readmit the site, create a new key pair (node_keys.py "
                   "create) and register the new public key")


def default_registry(flwr_home: Path | None = None) -> Path:
    """The one registry file: ``$FEDCLINIC_REGISTRY``, else ``registry.json`` in the Flower
    config folder (``flwr_home``, ``$FLWR_HOME`` or ``~/.flwr``)."""
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV]).expanduser()
    home = flwr_home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    return home.expanduser() / REGISTRY


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


def _json_reply(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command printed ({} if none)."""
    try:  # Flower may print a notice before the JSON object
        reply = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        return {}
    return reply if isinstance(reply, dict) else {}


def read_registry(path: Path) -> dict[str, dict[str, Any]]:
    """The registry (site -> {node_id, public_key, fingerprint}); {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text())
    except ValueError as err:
        raise DeployError(f"{path} is not a site registry (invalid JSON: {err})") from None
    if not isinstance(registry, dict):
        raise DeployError(f"{path} is not a site registry (expected a JSON object)")
    return registry


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the registry, so two commands never lose an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_registry(path: Path, registry: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # owner-only like every state file: who belongs to the consortium, and by which key
    write_private(tmp, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)  # atomic: a crash never leaves half a registry


def _register_key(public_key: Path, connection: str, site: str, flwr_home: Path | None) -> int:
    """``flwr supernode register``; the new node id, or DeployError saying why not."""
    done = _flwr(["supernode", "register", str(public_key), connection, "--name", site,
                  "--format", "json"], flwr_home)
    reply = _json_reply(done)
    if done.returncode != 0 or not reply.get("success"):
        detail = str(reply.get("error-message") or reply.get("error")
                     or (done.stdout + done.stderr).strip())
        if "already in use" in detail:
            raise DeployError(f"the SuperLink refuses {public_key}: {detail.strip()} This key is "
                              f"registered already, or was unregistered before: {REMOVED_FOREVER}.")
        raise DeployError(f"`flwr supernode register` failed for {public_key}: {detail}")
    return int(reply["node-id"])


def _unregister_node(node_id: int, connection: str, flwr_home: Path | None) -> None:
    done = _flwr(["supernode", "unregister", str(node_id), connection], flwr_home)
    if done.returncode != 0:
        raise DeployError(f"`flwr supernode unregister {node_id}` failed: "
                          f"{(done.stdout + done.stderr).strip()}")


def register(public_key: Path, connection: str, site: str | None, flwr_home: Path | None,
             registry_file: Path | None = None) -> int:
    """Register ``public_key`` for ``site``; return the node id.

    DeployError if the site already has an active key (see ``rotate``).
    """
    public_key = require_file(public_key, "SuperNode public key")
    site = site or public_key.name.removesuffix(".pub")
    path = registry_file or default_registry(flwr_home)
    with locked(path):
        return _register_locked(public_key, connection, site, flwr_home, path)


def _register_locked(public_key: Path, connection: str, site: str, flwr_home: Path | None,
                     path: Path) -> int:
    registry = read_registry(path)
    if site in registry:
        old = registry[site]
        raise DeployError(
            f"site '{site}' already has an active key (SuperNode {old['node_id']}, "
            f"{old.get('fingerprint')}) in {path}. To replace it run `node_keys.py rotate "
            f"{public_key} --site {site} --connection {connection}` (registers the new key, "
            "then removes the old one)"
        )
    node_id = _register_key(public_key, connection, site, flwr_home)
    registry[site] = {"node_id": node_id, "public_key": public_key.name,
                      "fingerprint": fingerprint(public_key)}
    _write_registry(path, registry)
    return node_id


def rotate(public_key: Path, connection: str, site: str, flwr_home: Path | None,
           registry_file: Path | None = None) -> tuple[int, int]:
    """Register ``public_key`` for ``site``, then unregister the site's old node by its id.

    Returns (old node id, new node id). The new key is registered first, so a failure leaves
    the site with its old key (nothing done) or with both (the error says which id to remove).
    """
    public_key = require_file(public_key, "SuperNode public key")
    path = registry_file or default_registry(flwr_home)
    with locked(path):
        return _rotate_locked(public_key, connection, site, flwr_home, path)


def _rotate_locked(public_key: Path, connection: str, site: str, flwr_home: Path | None,
                   path: Path) -> tuple[int, int]:
    registry = read_registry(path)
    if site not in registry:
        raise DeployError(f"site '{site}' is not in {path}; use `node_keys.py register` for a "
                          "new site")
    old_id = int(registry[site]["node_id"])
    if registry[site].get("fingerprint") == fingerprint(public_key):
        raise DeployError(f"{public_key} is the key site '{site}' already uses; rotation needs "
                          "a new key pair (node_keys.py create)")
    new_id = _register_key(public_key, connection, site, flwr_home)
    registry[site] = {"node_id": new_id, "public_key": public_key.name,
                      "fingerprint": fingerprint(public_key)}
    _write_registry(path, registry)  # the new key is the site's from now on
    try:
        _unregister_node(old_id, connection, flwr_home)
    except DeployError as err:
        raise DeployError(f"the new key is registered as SuperNode {new_id}, but removing the "
                          f"old SuperNode {old_id} failed; run `node_keys.py unregister --node-id "
                          f"{old_id} --connection {connection}`. {err}") from None
    return old_id, new_id


def unregister(
    connection: str, node_id: int | None, site: str | None, registry_file: Path | None,
    flwr_home: Path | None,
) -> int:
    """Unregister a SuperNode by node id or by site name (looked up in the registry)."""
    path = registry_file or default_registry(flwr_home)
    with locked(path):
        registry = read_registry(path)
        node_id = _unregister_locked(connection, node_id, site, flwr_home, path, registry)
    return node_id


def _unregister_locked(connection: str, node_id: int | None, site: str | None,
                       flwr_home: Path | None, path: Path,
                       registry: dict[str, dict[str, Any]]) -> int:
    if node_id is None:
        if site not in registry:
            raise DeployError(f"site '{site}' is not in {path}; pass --node-id "
                              "(see `node_keys.py list`)")
        node_id = int(registry[site]["node_id"])
    _unregister_node(node_id, connection, flwr_home)
    for name in [s for s, entry in registry.items() if int(entry.get("node_id", -1)) == node_id]:
        del registry[name]
    if path.is_file():
        _write_registry(path, registry)
    return node_id


def list_nodes(connection: str, registry_file: Path | None, flwr_home: Path | None
               ) -> list[dict[str, str]]:
    """One row per SuperNode the SuperLink or the registry knows: site, node id, fingerprint,
    status (online/offline/registered/unregistered as the SuperLink reports it)."""
    registry = read_registry(registry_file or default_registry(flwr_home))
    done = _flwr(["supernode", "ls", connection, "--format", "json"], flwr_home)
    reply = _json_reply(done)
    if done.returncode != 0 or not reply.get("success"):
        detail = reply.get("error-message") or (done.stdout + done.stderr).strip()
        raise DeployError(f"`flwr supernode ls {connection}` failed: {detail}")
    status = {int(n["node-id"]): str(n["status"]) for n in reply.get("nodes", [])}
    rows = [{"site": site, "node_id": str(entry["node_id"]),
             "fingerprint": str(entry.get("fingerprint", "?")),
             "status": status.pop(int(entry["node_id"]), "unknown to the SuperLink")}
            for site, entry in sorted(registry.items())]
    rows += [{"site": "(not in registry)", "node_id": str(node), "fingerprint": "?",
              "status": state} for node, state in sorted(status.items())]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: ``create``, ``register``, ``rotate``, ``unregister``, ``list``,
    ``fingerprint``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_new = sub.add_parser("create", help="create keys/<site> and keys/<site>.pub")
    p_new.add_argument("--out", type=Path, required=True)
    p_new.add_argument("--site", required=True)
    p_new.add_argument("--force", action="store_true", help="replace existing keys")
    helps = {"register": "register a new site's key at the SuperLink",
             "rotate": "register a site's new key, then remove its old one (one step)",
             "unregister": "remove a site's key at the SuperLink (for good)",
             "list": "sites, node ids, fingerprints and whether the SuperLink sees them online"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("--connection", required=True,
                       help="connection name in $FLWR_HOME/config.toml (see connection.py)")
        p.add_argument("--flwr-home", type=Path, default=None,
                       help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")
        p.add_argument("--registry", type=Path, default=None,
                       help=f"site registry (default: ${REGISTRY_ENV}, else {REGISTRY} in the "
                            "Flower config folder)")
        if name == "register":
            p.add_argument("public_key", type=Path)
            p.add_argument("--site", default=None, help="site name (default: key file name)")
            p.add_argument("--rotate", action="store_true",
                           help="the site has a key already: same as `rotate`")
        elif name == "rotate":
            p.add_argument("public_key", type=Path, help="the site's NEW public key")
            p.add_argument("--site", required=True)
        elif name == "unregister":
            p.add_argument("--site", default=None)
            p.add_argument("--node-id", type=int, default=None)
    p_fp = sub.add_parser("fingerprint", help="print a public key's SHA256 fingerprint")
    p_fp.add_argument("public_key", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            private, public = create_key_pair(args.out, args.site, args.force)
            print(f"private key: {private}  (stays at the hospital; mode 0600)")
            print(f"public key:  {public}  (send to the coordinating centre)")
            print(f"fingerprint: {fingerprint(public)}  (confirm it by phone)")
        elif args.command == "rotate" or (args.command == "register" and args.rotate):
            site = args.site or args.public_key.name.removesuffix(".pub")
            old_id, new_id = rotate(args.public_key, args.connection, site, args.flwr_home,
                                    args.registry)
            print(f"rotated site {site}: new key {fingerprint(args.public_key)} registered as "
                  f"SuperNode {new_id}; old SuperNode {old_id} unregistered (its key can never "
                  "be registered again). Restart the site's SuperNode with the new key.")
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
            print(f"unregistered SuperNode {node_id}: its SuperNode is refused from now on; "
                  f"{REMOVED_FOREVER}")
        elif args.command == "list":
            rows = list_nodes(args.connection, args.registry, args.flwr_home)
            widths = {k: max([len(k), *(len(r[k]) for r in rows)]) for k in
                      ("site", "node_id", "fingerprint", "status")}
            for row in [dict(zip(widths, widths, strict=True)), *rows]:
                print("  ".join(row[k].ljust(w) for k, w in widths.items()).rstrip())
        else:
            print(fingerprint(args.public_key))
    except DeployError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
