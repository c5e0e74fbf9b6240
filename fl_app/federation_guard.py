"""Keep a run going (or end it cleanly) when hospitals drop out.

Flower's strategies sample nodes with ``sample_nodes``, which waits *forever* while fewer than
``min_available_nodes`` SuperNodes are connected, and count a failed reply only in the log.
``FederationGuard`` wraps the run's Grid so that, per ``on_site_failure``:

* ``continue``: rounds go on with the sites still connected, as long as at least ``min_sites``
  of them are; a site that fails or disconnects is logged by name and recorded. If fewer than
  ``min_sites`` stay connected for ``wait_for_nodes_s`` seconds, the run ends with SiteFailure.
* ``stop``: the first site that fails or disconnects ends the run with SiteFailure.

It also limits every round to the SuperNodes that answered the query round (a SuperNode that
connects later has no place in this run's statistics and model facts).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_app.errors import ConfigError
from fl_app.sites import FederationError, error_reason

POLICIES = ("continue", "stop")
# Flower's deployment Grid looks for replies every 3 s; a round with a train and an evaluate
# stage waited ~3 s for nothing twice. Asking the SuperLink twice a second costs nothing.
REPLY_POLL_S = 0.5


class SiteFailure(FederationError):
    """Too few sites remain (or one failed under ``on_site_failure=stop``)."""


@dataclass
class FailureRecord:
    """One site that did not deliver a result."""

    round: int
    stage: str
    site: str
    node_id: int
    reason: str


class FederationGuard(Grid):
    """A Grid restricted to the run's sites that never waits forever for missing ones."""

    def __init__(
        self, grid: Grid, sites: dict[int, str], min_sites: int, wait_s: float, policy: str
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(
                f"on_site_failure must be one of {', '.join(POLICIES)}, got '{policy}'"
            )
        self._grid = grid
        self.sites = dict(sites)
        self.min_sites = max(1, min(int(min_sites), len(sites)))
        self.wait_s = float(wait_s)
        self.policy = policy
        self.failures: list[FailureRecord] = []
        # per exchange: round, stage, sites asked and sites that answered (the audit trail)
        self.exchanges: list[dict[str, Any]] = []
        self._lost: set[int] = set()
        self._short_since: float | None = None

    # --- plain delegation -------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        """Delegate to the wrapped Grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped Grid's run."""
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Delegate to the wrapped Grid."""
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate to the wrapped Grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the wrapped Grid."""
        return self._grid.pull_messages(message_ids)

    # --- guarded ----------------------------------------------------------------------------
    def get_node_ids(self) -> list[int]:
        """The run's sites that are connected now.

        Raises SiteFailure when a site is gone under ``stop``, or when fewer than ``min_sites``
        have been connected for longer than ``wait_s`` (Flower's sampler would wait forever).
        """
        online = sorted(n for n in self._grid.get_node_ids() if n in self.sites)
        lost = set(self.sites) - set(online)
        for node in sorted(lost - self._lost):
            if self.policy == "stop":
                raise SiteFailure(
                    f"site {self.sites[node]} (node {node}) disconnected; "
                    "on_site_failure=stop ends the run (set on_site_failure=continue to go on "
                    "with the remaining sites)"
                )
            log(WARNING, "fedclinic: site %s (node %d) disconnected; %d of %d sites connected "
                "(min_sites=%d)", self.sites[node], node, len(online), len(self.sites),
                self.min_sites)
        self._lost = lost
        if len(online) >= self.min_sites:
            self._short_since = None
            return online
        if self._short_since is None:
            self._short_since = time.monotonic()
            log(WARNING, "fedclinic: only %d of %d sites connected, min_sites=%d: waiting up to "
                "%.0fs for %s to reconnect", len(online), len(self.sites), self.min_sites,
                self.wait_s, ", ".join(self.sites[n] for n in sorted(lost)))
        elif time.monotonic() - self._short_since > self.wait_s:
            raise SiteFailure(
                f"only {len(online)} of the run's {len(self.sites)} sites stayed connected "
                f"(missing: {', '.join(self.sites[n] for n in sorted(lost))}) for "
                f"{self.wait_s:.0f}s; min_sites={self.min_sites} are needed to go on"
            )
        return online

    def get_nodes(self) -> Iterable[Any]:
        """Node infos of the run's connected sites."""
        keep = set(self.get_node_ids())
        return [n for n in self._grid.get_nodes() if n.node_id in keep]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send, wait, then account for every site that returned no valid result."""
        messages = list(messages)
        replies = _send_and_receive(self._grid, messages, timeout)
        if messages:
            self._account(messages, replies, timeout)
        return replies

    def _account(self, messages: list[Message], replies: list[Message],
                 timeout: float | None) -> None:
        # The SuperLink's "node unavailable" reply comes from the SuperLink itself, so map
        # replies to sites through the id of the message they answer.
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        by_node = {dst_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r
                   for r in replies}
        stage = str(messages[0].metadata.message_type)
        config = messages[0].content.config_records.get("config")
        server_round = int(config.get("server-round", 0)) if config is not None else 0
        new: list[FailureRecord] = []
        for node in (m.metadata.dst_node_id for m in messages):
            reply = by_node.get(node)
            if reply is not None and not reply.has_error():
                continue
            reason = (error_reason(reply.error.reason) if reply is not None
                      else f"no reply within {timeout or 0:.0f}s")
            new.append(FailureRecord(server_round, stage, self.sites.get(node, str(node)),
                                     node, reason))
        self.failures += new
        failed = {f.node_id for f in new}
        asked = [m.metadata.dst_node_id for m in messages]
        self.exchanges.append({
            "round": server_round, "stage": stage,
            "asked": sorted(self.sites.get(n, str(n)) for n in asked),
            "answered": sorted(self.sites.get(n, str(n)) for n in asked if n not in failed),
        })
        for f in new:
            log(WARNING, "fedclinic: round %d %s: no result from site %s: %s",
                f.round, f.stage, f.site, f.reason)
        if not new:
            return
        if self.policy == "stop":
            first = new[0]
            raise SiteFailure(
                f"site {first.site} returned no {first.stage} result in round {first.round} "
                f"({first.reason}); on_site_failure=stop ends the run (set "
                "on_site_failure=continue to go on with the remaining sites)"
            )
        delivered = len(messages) - len(new)
        needed = min(len(messages), self.min_sites)
        if delivered < needed:
            raise SiteFailure(
                f"round {server_round} {stage}: only {delivered} of {len(messages)} sites "
                f"returned a result (failed: {', '.join(f.site for f in new)}); "
                f"min_sites={self.min_sites}"
            )

    def failure_log(self) -> list[dict[str, Any]]:
        """The recorded failures as plain dicts (for summary.json)."""
        return [asdict(f) for f in self.failures]


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float | None,
                      poll_s: float = REPLY_POLL_S) -> list[Message]:
    """Flower's ``Grid.send_and_receive`` (push, then pull until every reply is in or
    ``timeout`` passes), looking for replies every ``poll_s`` seconds instead of every 3."""
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        new = list(grid.pull_messages(waiting))
        replies += new
        waiting -= {m.metadata.reply_to_message_id for m in new}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_s)
    return replies
