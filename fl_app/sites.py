"""Server side of the first round: find the sites, gather their facts and statistics."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fl_app.config_json import to_json
from fl_app.site_runtime import CONFIG_KEY
from tasks import Task
from tasks.federated_stats import combine_moments


class FederationError(RuntimeError):
    """The federation cannot run this experiment (missing sites, site errors, mismatches)."""


@dataclass
class SiteFacts:
    """What a site reported in the query round."""

    node_id: int
    name: str
    num_train: int
    num_test: int
    info: dict[str, Any]
    moments: dict[str, list[float]] | None
    simulated: bool = False  # a simulated SuperNode (partition-id), not a hospital's


def expected_num_sites(cfg: DictConfig, task: Task) -> int | None:
    """``min_sites`` if set, else every site the task defines; None = one per SuperNode."""
    if cfg.get("min_sites"):
        return cfg.min_sites
    if not task.natural_sites and cfg.partition.get("num_sites") is None:
        return None
    return len(task.site_names(cfg))


def wait_for_stable_nodes(grid: Grid, timeout_s: float, settle_s: float = 3.0) -> list[int]:
    """Wait for at least one SuperNode, then until the count holds for ``settle_s`` seconds."""
    nodes = wait_for_nodes(grid, 1, timeout_s)
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < settle_s:
        time.sleep(0.5)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, stable_since = now, time.monotonic()
    return nodes


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """Wait until ``expected`` SuperNodes are connected; FederationError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if len(nodes) != last:
            log(INFO, "Waiting for sites: %d of %d SuperNodes connected (in simulation, run "
                "with --federation-config \"num-supernodes=%d\")", len(nodes), expected, expected)
            last = len(nodes)
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {expected} SuperNodes connected after {timeout_s:.0f}s. "
                "In simulation run `flwr run . --federation-config "
                f"\"num-supernodes={expected}\"`; in deployment start every hospital's "
                "SuperNode or lower min_sites."
            )
        time.sleep(1.0)


def query_sites(grid: Grid, cfg: DictConfig, nodes: list[int], timeout_s: float) -> list[SiteFacts]:
    """Ask every node for its site facts; raise FederationError naming any site that failed.
    The names are as claimed; ``fl_app.site_identity.check_identities`` decides which stand."""
    record = RecordDict({"config": ConfigRecord({CONFIG_KEY: to_json(cfg)})})
    messages = [Message(record, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    problems: dict[str, list[int]] = {}  # reason -> nodes, so N identical errors read as one
    facts = []
    answered = {r.metadata.src_node_id for r in replies}
    for node in nodes:
        if node not in answered:
            problems.setdefault(f"no reply within {timeout_s:.0f}s", []).append(node)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems.setdefault(error_reason(reply.error.reason), []).append(node)
            continue
        if "error" in reply.content["site"]:
            problems.setdefault(str(reply.content["site"]["error"]), []).append(node)
            continue
        data = json.loads(str(reply.content["site"]["facts"]))
        facts.append(SiteFacts(node, data["name"], data["num_train"], data["num_test"],
                               data["info"], data["moments"], bool(data.get("simulated"))))
    if problems:
        lines = [f"{len(ids)} of {len(nodes)} SuperNodes (node {', '.join(map(str, ids))}): {why}"
                 for why, ids in problems.items()]
        raise FederationError("sites could not load their data:\n  " + "\n  ".join(lines))
    # Site names are claims until fl_app.site_identity checks them (duplicates included).
    return sorted(facts, key=lambda f: (f.name, f.node_id))


def global_statistics(facts: list[SiteFacts]) -> dict[str, list[float]] | None:
    """Combine the sites' feature moments (None when the task shares none)."""
    parts = [f.moments for f in facts if f.moments is not None]
    if not parts:
        return None
    if len(parts) != len(facts) or len({len(p["count"]) for p in parts}) != 1:
        raise FederationError("sites report different feature sets; check each site's data")
    return combine_moments(parts)


def model_info(facts: list[SiteFacts]) -> dict[str, Any]:
    """The model-shaping facts, which every site must agree on."""
    keys = ("num_features", "num_classes", "in_channels", "image_size")
    first = {k: v for k, v in facts[0].info.items() if k in keys}
    for other in facts[1:]:
        theirs = {k: v for k, v in other.info.items() if k in keys}
        if theirs != first:
            raise FederationError(
                f"site {other.name} reports {theirs} but {facts[0].name} reports {first}; "
                "every site must hold data of the same task and shape"
            )
    return facts[0].info


def error_reason(reason: str) -> str:
    """One line saying why a site failed.

    A ClientApp exception reaches the server as ``<class 'pkg.SomeError'>:<'message'>``
    (flwr.supernode.runtime.run_clientapp), where the message may span lines; return
    ``SomeError: <first line of the message>``. Other reasons (e.g. the SuperLink's "Node
    Unavailable") are returned as their exception-like line, else their last line.
    """
    text = str(reason).strip()
    match = _CLIENTAPP_ERROR.search(text)
    if match:
        message = match.group(2).split("Message: ", 1)[-1]
        first = next((line.strip() for line in message.splitlines() if line.strip()), "")
        return f"{match.group(1).rsplit('.', 1)[-1]}: {first}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line
    return lines[-1] if lines else text


_CLIENTAPP_ERROR = re.compile(r"<class '([\w.]+)'>:<'(.*)'>\s*$", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Failure)\b.*:")
