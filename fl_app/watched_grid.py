"""A Grid that remembers which sites failed to answer, and why, in the latest exchange."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


def error_reason(reason: str) -> str:
    """The exception line of a ClientApp error (not the traceback above it)."""
    lines = [line for line in str(reason).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else str(reason)
    return last.split("Message: ", 1)[-1].rstrip("'>")


class WatchedGrid(Grid):
    """Delegates to a real Grid and remembers the failures of the latest exchange per type.

    ``failures[message_type]`` maps node id -> reason for the latest ``send_and_receive`` of
    that type (train, evaluate, query): replies that carried an error, and messages that got
    no reply before the timeout (a SuperNode that disconnected).
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.failures: dict[str, dict[int, str]] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Send, wait for replies, and record the nodes that failed or stayed silent."""
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        # Map replies to nodes through the message they answer: the SuperLink's own "node
        # unavailable" reply (a SuperNode that died) comes from the SuperLink, not the node.
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        by_node = {dst_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r
                   for r in replies}
        failures = {
            node: "no reply before the round timeout (disconnected?)"
            for node in dst_of.values() if node not in by_node
        }
        for node, reply in by_node.items():
            if reply.has_error():
                failures[node] = error_reason(reply.error.reason)
        for kind in {m.metadata.message_type for m in messages}:
            self.failures[kind] = failures
        return replies

    # Plain delegation for the rest of the Grid interface.
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)
