"""In-process hospitals for secure-aggregation tests: a Grid that runs each site's mods.

``LocalGrid`` delivers every message through Flower's protobuf serialisation (what a real
SuperLink does) to the destination site's train mods and handler, each site with its own
``Context`` (its ``context.state`` persists across messages, as in a SuperNode). A site can be
"killed" after a given number of messages: from then on it never answers (the server sees
no reply, as with a hospital whose SuperNode died).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid

Handler = Callable[[Message, Context], Message]


def _wire(msg: Message) -> Message:
    """The message as the other side receives it (serialised and parsed back)."""
    return message_from_proto(message_to_proto(msg))


class LocalGrid(Grid):
    """Sites 1..n answered in-process through ``mods`` around ``handler``."""

    def __init__(self, num_sites: int, handler: Handler, mods: list[Mod]) -> None:
        self.nodes = list(range(1, num_sites + 1))
        self.handler = handler
        self.mods = mods
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1},
                       state=RecordDict(), run_config={})
            for n in self.nodes
        }
        self.received: dict[int, int] = dict.fromkeys(self.nodes, 0)
        self.dies_after: dict[int, int] = {}  # node -> messages it still answers
        self.seen_by_server: list[Message] = []  # every reply the server got

    # --- Grid -------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        """The sites still alive."""
        return [n for n in self.nodes if not self._dead(n)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver each message to its site; dead sites do not answer."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self._dead(node):
                continue
            self.received[node] += 1
            reply = self._call(_wire(msg), self.contexts[node])
            replies.append(_wire(reply))
        self.seen_by_server += [_wire(r) for r in replies]  # copies: the server may edit
        return replies

    # --- sites ------------------------------------------------------------------------------
    def kill(self, node: int, after_messages: int) -> None:
        """Site ``node`` stops answering once it has answered ``after_messages`` in total."""
        self.dies_after[node] = after_messages

    def _dead(self, node: int) -> bool:
        return node in self.dies_after and self.received[node] >= self.dies_after[node]

    def _call(self, msg: Message, context: Context) -> Message:
        call: ClientAppCallable = self.handler
        for mod in reversed(self.mods):
            call = _wrap(mod, call)
        return call(msg, context)


def _wrap(mod: Mod, call_next: ClientAppCallable) -> ClientAppCallable:
    return lambda msg, ctx: mod(msg, ctx, call_next)


def site_update(node: int, server_round: int, size: int) -> np.ndarray:
    """A site's deterministic update in a round (what it adds to the global model)."""
    rng = np.random.default_rng(1000 * server_round + node)
    return (rng.normal(0, 0.05, size) + 0.01 * node).astype(np.float32)


def site_examples(node: int) -> int:
    """A site's number of training examples (different per site)."""
    return 40 + 37 * node


def fake_train(msg: Message, context: Context) -> Message:
    """A site's train handler: global + its update, with its metrics and site record."""
    node = context.node_id
    server_round = int(msg.content["config"]["server-round"])
    arrays = msg.content["arrays"]
    out = {}
    for position, key in enumerate(arrays):  # key i moves by (1 + i) x the site's update
        value = arrays[key].numpy()
        upd = site_update(node, server_round, value.size)
        out[key] = Array((value + upd.reshape(value.shape) * (1 + position)).astype(value.dtype))
    content = RecordDict({
        "arrays": ArrayRecord(out),
        "metrics": MetricRecord({"train_loss": 0.1 * node, "num-examples": site_examples(node),
                                 "dp-weight": 1}),
        "site": ConfigRecord({"name": f"site-{node}"}),
    })
    return Message(content, reply_to=msg)
