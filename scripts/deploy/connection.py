#!/usr/bin/env python3
"""Write (or print) the Flower CLI connection entry for the consortium's SuperLink.

    python scripts/deploy/connection.py --name fedclinic \\
        --address superlink.consortium.example:9093 --ca certs/ca.crt [--default]
    python scripts/deploy/connection.py --name fedclinic --address ... --ca ... --print

This adds ``[superlink.<name>]`` with ``address`` and the ABSOLUTE path of the CA certificate
(``root-certificates``; Flower rejects a relative one) to ``$FLWR_HOME/config.toml`` (default
``~/.flwr/config.toml``), using Flower's own config writer, so ``flwr run . <name>``,
``flwr ls <name>`` and ``flwr supernode register ... <name>`` reach the SuperLink over TLS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DeployError, fail, require_file, split_address


def toml_snippet(name: str, address: str, ca_cert: Path) -> str:
    """The ``config.toml`` section for this connection, as text."""
    # json.dumps gives a valid TOML basic string (quotes and backslashes escaped)
    return (f"[superlink.{name}]\naddress = {json.dumps(address)}\n"
            f"root-certificates = {json.dumps(str(ca_cert))}\n")


def write_connection(
    name: str, address: str, ca_cert: Path, flwr_home: Path | None = None,
    make_default: bool = False,
) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``<flwr_home>/config.toml``; return the file path."""
    if flwr_home is not None:
        os.environ["FLWR_HOME"] = str(flwr_home.expanduser().resolve())
    # Imported late: Flower reads FLWR_HOME when it builds the path.
    from flwr.cli.flower_config import (
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    write_superlink_connection(
        SuperLinkConnection(name=name, address=address, root_certificates=str(ca_cert))
    )
    if make_default:
        set_default_superlink_connection(name)
    return get_flwr_home() / "config.toml"


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="fedclinic", help="connection name (default fedclinic)")
    parser.add_argument("--address", required=True, help="SuperLink host:port")
    parser.add_argument("--ca", type=Path, required=True, help="consortium ca.crt")
    parser.add_argument("--flwr-home", type=Path, default=None,
                        help="Flower config folder (default: $FLWR_HOME or ~/.flwr)")
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="only print the section; change no file")
    args = parser.parse_args(argv)
    try:
        split_address(args.address)
        ca = require_file(args.ca, "CA certificate")  # absolute, as Flower requires
        if args.print_only:
            print(toml_snippet(args.name, args.address, ca), end="")
            return
        path = write_connection(args.name, args.address, ca, args.flwr_home, args.default)
        print(f"wrote [superlink.{args.name}] to {path}:")
        print(toml_snippet(args.name, args.address, ca), end="")
    except (DeployError, ValueError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
