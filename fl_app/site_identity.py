"""Bind each site name to the SuperNode that authenticated, using the registration registry.

A SuperNode's ``site-name`` comes from its own node_config, so on its own it is a claim. At
registration the coordinating centre records which node id (public key) belongs to which site
(``scripts/deploy/node_keys.py register`` writes ``registry.json``: site -> node_id,
fingerprint). The SuperLink authenticates every SuperNode by that key, so the node id of a
reply is trustworthy; the claimed name is checked against it here. With ``site_registry`` set
(a path; relative = the ServerApp's working directory, i.e. the SuperLink's ``--workdir``):

* a node that is not in the registry is refused (``unknown node``);
* a node registered as site A that claims site B is refused (``claims another site``);
* hence two nodes can never both be accepted for one site.

Refused nodes take no part in the run (no training, no metrics, no ledger lines); they are
logged and listed in summary.json under ``refused_nodes``. ``site_registry: null`` (simulation)
accepts the claimed names, but still refuses two nodes claiming one site.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from fl_app.config import ConfigError


class ClaimsSite(Protocol):
    """Anything carrying a reply's authenticated node id and the site name it claimed."""

    node_id: int
    name: str


@dataclass(frozen=True)
class RefusedNode:
    """A SuperNode whose claimed site was not accepted."""

    node_id: int
    claimed_site: str
    registered_site: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for summary.json."""
        return asdict(self)


def load_registry(path: str | Path) -> dict[int, str]:
    """``registry.json`` (site -> {"node_id": ...}) as node id -> site; ConfigError if unusable."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"site_registry {path} not found (relative paths resolve in the SuperLink's "
            f"working directory, {Path.cwd()}): copy the registry that `node_keys.py register` "
            "wrote there, or set site_registry=null"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"site_registry {path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"site_registry {path} must map site names to {{\"node_id\": ...}}")
    by_node: dict[int, str] = {}
    for site, entry in data.items():
        try:
            node_id = int(entry["node_id"])
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"site_registry {path}: entry '{site}' has no integer "
                              "node_id") from None
        if node_id in by_node:
            raise ConfigError(f"site_registry {path}: node {node_id} is registered for both "
                              f"'{by_node[node_id]}' and '{site}'")
        by_node[node_id] = str(site)
    return by_node


def check_identities(
    facts: list[ClaimsSite], registry: dict[int, str] | None
) -> tuple[list[ClaimsSite], list[RefusedNode]]:
    """Split the query round's answers into accepted ones and refused nodes (see module doc)."""
    refused: list[RefusedNode] = []
    candidates = []
    for fact in facts:
        registered = None if registry is None else registry.get(fact.node_id)
        if registry is not None and registered is None:
            refused.append(RefusedNode(fact.node_id, fact.name, None,
                                       "unknown node: not in the site registry"))
        elif registry is not None and registered != fact.name:
            refused.append(RefusedNode(
                fact.node_id, fact.name, registered,
                f"claims site '{fact.name}' but is registered as '{registered}'"))
        else:
            candidates.append(fact)
    # Without a registry nothing says which of two claimants is genuine: refuse both.
    names = [f.name for f in candidates]
    accepted = []
    for fact in candidates:
        if names.count(fact.name) > 1:
            refused.append(RefusedNode(fact.node_id, fact.name, None,
                                       f"another node also claims site '{fact.name}'"))
        else:
            accepted.append(fact)
    return accepted, sorted(refused, key=lambda r: r.node_id)
