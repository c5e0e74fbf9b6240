"""An in-process federation: a Flower Grid whose nodes are ClientApp handlers called directly.

``LocalGrid`` delivers every message through Flower's protobuf serialisation (what a real
SuperLink does) to the destination node's handler (e.g. ``fl_app.client_app.app``, or a test
handler wrapped in mods), each node with its own ``Context`` (its ``context.state`` persists
across messages, as in a SuperNode; ``node_config`` as in simulation). It counts the bytes
each node receives and sends and the seconds each node spends per message, and a node can be
"killed" after a number of messages: from then on it never answers (the server sees no reply,
as with a hospital whose SuperNode died). Nodes are answered one after another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message, Context], Message]


def set_server_identity(run_id: int = 1) -> None:
    """Stamp this process as a ServerApp task, as Flower's runtime does (messages need it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1


def with_mods(mods: list[Mod], handler: Handler) -> Handler:
    """``handler`` wrapped in ``mods`` (the first is outermost), as a ClientApp does."""
    call: ClientAppCallable = handler
    for mod in reversed(mods):
        call = _bind(mod, call)
    return call


def _bind(mod: Mod, call_next: ClientAppCallable) -> ClientAppCallable:
    return lambda msg, ctx: mod(msg, ctx, call_next)


def wire(msg: Message) -> tuple[Message, int]:
    """The message as the other side receives it (serialised, parsed back) and its size."""
    proto = message_to_proto(msg)
    return message_from_proto(proto), proto.ByteSize()


@dataclass
class Exchange:
    """One message and its reply: who, which stage, bytes each way, node seconds."""

    node: int
    kind: str  # message type, plus the secure-aggregation stage when there is one
    sent: int  # bytes server -> node
    received: int  # bytes node -> server (0 when no reply)
    node_s: float
    call: int  # index of the send_and_receive call it belongs to


@dataclass
class Call:
    """One ``send_and_receive``: what it carried and when it ended."""

    kind: str
    ended: float  # time.perf_counter() at its end
    slowest_node_s: float  # the longest a single node took to answer
    node_s: float  # all nodes' seconds together (they are answered one after another)


class LocalGrid(Grid):
    """Nodes 1..n, each answered in-process by ``handler``."""

    def __init__(self, num_nodes: int, handler: Handler) -> None:
        self.nodes = list(range(1, num_nodes + 1))
        self.handler = handler
        self.contexts = {
            n: Context(run_id=1, node_id=n,
                       node_config={"partition-id": n - 1, "num-partitions": num_nodes},
                       state=RecordDict(), run_config={})
            for n in self.nodes
        }
        self.received: dict[int, int] = dict.fromkeys(self.nodes, 0)
        self.dies_after: dict[int, int] = {}  # node -> messages it still answers
        self.seen_by_server: list[Message] = []  # copies of every reply the server got
        self.exchanges: list[Exchange] = []
        self.calls: list[Call] = []
        self._pending: dict[str, Message] = {}  # message id -> reply (push/pull)

    # --- Grid -------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        """Not used in-process."""

    @property
    def run(self) -> Any:
        """Not used in-process."""
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Not used: strategies build their messages themselves."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply waits for ``pull_messages``."""
        messages = list(messages)
        replies = self.send_and_receive(messages)
        for reply in replies:
            self._pending[reply.metadata.reply_to_message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that arrived for ``message_ids`` (a dead node's never arrive)."""
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def get_node_ids(self) -> list[int]:
        """The nodes still alive."""
        return [n for n in self.nodes if not self._dead(n)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver each message to its node; dead nodes do not answer."""
        replies, node_seconds, slowest, kind = [], 0.0, 0.0, ""
        for msg in messages:
            node = msg.metadata.dst_node_id
            kind = _kind(msg)
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            if self._dead(node):
                continue
            self.received[node] += 1
            delivered, sent = wire(msg)
            t0 = time.perf_counter()
            reply = self.handler(delivered, self.contexts[node])
            spent = time.perf_counter() - t0
            node_seconds, slowest = node_seconds + spent, max(slowest, spent)
            back, size = wire(reply)
            self.exchanges.append(Exchange(node, kind, sent, size, spent, len(self.calls)))
            replies.append(back)
            self.seen_by_server.append(wire(reply)[0])  # a copy: the server may edit replies
        self.calls.append(Call(kind, time.perf_counter(), slowest, node_seconds))
        return replies

    # --- nodes ------------------------------------------------------------------------------
    def kill(self, node: int, after_messages: int) -> None:
        """Node ``node`` stops answering once it has answered ``after_messages`` in total."""
        self.dies_after[node] = after_messages

    def _dead(self, node: int) -> bool:
        return node in self.dies_after and self.received[node] >= self.dies_after[node]


def _kind(msg: Message) -> str:
    kind = str(msg.metadata.message_type)
    record = msg.content.config_records.get("secagg") if msg.has_content() else None
    if record is not None and "stage" in record:
        kind += f":{record['stage']}"
    return kind
