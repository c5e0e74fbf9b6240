"""FederationGuard against Flower's real LinkState, Grid, sampler and FedAvg (no processes).

Nodes are registered, activated and deactivated in Flower's in-memory LinkState exactly as
the SuperLink does when SuperNodes connect and leave; the strategy is the one
``strategies.build`` makes. The end-to-end version with real processes is
tests/test_deployment.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

import strategies
from fl_app.config import ConfigError, compose_config
from fl_app.federation_guard import FederationGuard, SiteFailure

SITES = ["cleveland", "hungary", "va"]


class Link:
    """Flower's in-memory LinkState with a run and one node per site."""

    def __init__(self, sites: list[str]) -> None:
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                                   ObjectStoreFactory())
        self.state = cast(InMemoryLinkState, factory.state())
        # Register the run as flwr.simulation.run_simulation does
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        self.state.run_ids[run.run_id] = RunRecord(run=run)
        self.state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id,
                                                          run_id=run.run_id)
        self.grid = InMemoryGrid(state_factory=factory)
        self.grid.set_run(run)
        # Messages take their run id from the process's task identity (set per app process)
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.nodes = {name: self.connect() for name in sites}

    def connect(self) -> int:
        """A SuperNode registers and comes online."""
        node_id = self.state.create_node("owner", "owner", os.urandom(32), 30.0)
        assert self.state.activate_node(node_id, 30.0)
        return node_id

    def leave(self, site: str) -> None:
        """A SuperNode shuts down (deactivates)."""
        assert self.state.deactivate_node(self.nodes[site])

    def guard(self, min_sites: int, policy: str, wait_s: float = 1.0) -> FederationGuard:
        """A guard over the current nodes."""
        return FederationGuard(self.grid, {n: s for s, n in self.nodes.items()}, min_sites,
                               wait_s, policy)


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread; its result, its exception, or a failure if it hangs."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds:.0f}s (would hang the server)")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _strategy(min_sites: int) -> Any:
    cfg = compose_config(f"task=heart_disease min_sites={min_sites}")
    return strategies.build(cfg, len(SITES))


def test_flowers_sampler_alone_waits_forever_for_a_missing_node() -> None:
    """The pitfall the guard exists for: sample_nodes blocks while too few nodes are online."""
    link = Link(SITES)
    link.leave("va")
    thread = threading.Thread(target=sample_nodes, args=(link.grid, 3, 3), daemon=True)
    thread.start()
    thread.join(2.5)
    assert thread.is_alive()
    link.state.activate_node(link.nodes["va"], 30.0)  # release the sampler's loop
    thread.join(5)
    assert not thread.is_alive()


def test_continue_samples_the_remaining_sites() -> None:
    """min_sites=2 of 3: after one hospital leaves, a round goes on with the other two."""
    link = Link(SITES)
    guard = link.guard(min_sites=2, policy="continue")
    link.leave("va")
    strategy = _strategy(2)
    messages = list(_within(30, lambda: strategy.configure_train(
        1, ArrayRecord(), ConfigRecord(), guard)))
    assert {m.metadata.dst_node_id for m in messages} == {
        link.nodes["cleveland"], link.nodes["hungary"]}


def test_below_min_sites_ends_with_a_clear_error_instead_of_hanging() -> None:
    """min_sites=3 of 3, one leaves: after wait_s the round ends with SiteFailure."""
    link = Link(SITES)
    guard = link.guard(min_sites=3, policy="continue", wait_s=1.0)
    link.leave("hungary")
    strategy = _strategy(3)
    start = time.monotonic()
    # _within fails the test if the guard hangs; the run ends only after waiting wait_s
    with pytest.raises(SiteFailure, match=r"only 2 of the run's 3 sites .*missing: hungary"):
        _within(30, lambda: strategy.configure_train(1, ArrayRecord(), ConfigRecord(), guard))
    assert time.monotonic() - start >= 1.0


def test_a_site_that_comes_back_in_time_lets_the_round_go_on() -> None:
    """A hospital that restarts its SuperNode (same registered key, same node id) within
    wait_s is simply waited for."""
    link = Link(SITES)
    guard = link.guard(min_sites=3, policy="continue", wait_s=5.0)
    link.leave("va")
    strategy = _strategy(3)
    threading.Timer(1.0, lambda: link.state.activate_node(link.nodes["va"], 30.0)).start()
    messages = list(_within(30, lambda: strategy.configure_train(
        1, ArrayRecord(), ConfigRecord(), guard)))
    assert len(messages) == 3


def test_stop_policy_ends_at_the_first_disconnect() -> None:
    link = Link(SITES)
    guard = link.guard(min_sites=2, policy="stop")
    link.leave("cleveland")
    with pytest.raises(SiteFailure, match=r"site cleveland .*disconnected; on_site_failure=stop"):
        guard.get_node_ids()


def test_a_supernode_that_joins_after_the_query_round_is_not_sampled() -> None:
    link = Link(SITES)
    guard = link.guard(min_sites=3, policy="continue")
    late = link.connect()
    assert late not in guard.get_node_ids()
    assert sorted(guard.get_node_ids()) == sorted(link.nodes.values())


def _train_message(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 4})}),
                   dst_node_id=node, message_type="train")


def test_a_message_to_a_departed_node_is_recorded_by_site_name() -> None:
    """The SuperLink answers for an offline node ("Node Unavailable"); the guard attributes
    that reply to the right site, and a round in which no site delivered ends the run."""
    link = Link(SITES)
    guard = link.guard(min_sites=1, policy="continue")
    link.leave("va")
    with pytest.raises(SiteFailure, match=r"round 4 train: only 0 of 1 sites .*failed: va"):
        _within(10, lambda: guard.send_and_receive([_train_message(link.nodes["va"])],
                                                   timeout=5))
    record = guard.failure_log()
    assert [(r["site"], r["round"], r["stage"]) for r in record] == [("va", 4, "train")]
    assert "Node Unavailable" in record[0]["reason"]


def test_stop_policy_ends_on_a_failed_reply() -> None:
    link = Link(SITES)
    guard = link.guard(min_sites=1, policy="stop")
    link.leave("hungary")
    with pytest.raises(SiteFailure, match="site hungary returned no train result in round 4"):
        _within(10, lambda: guard.send_and_receive(
            [_train_message(link.nodes["hungary"])], timeout=5))


def test_unknown_policy_is_a_config_error() -> None:
    link = Link(SITES)
    with pytest.raises(ConfigError, match="on_site_failure must be one of continue, stop"):
        link.guard(min_sites=2, policy="retry")
