"""Hospitals with known updates for secure-aggregation tests (run on benchmarks.local_grid).

``fake_train`` is a site's train handler whose update is a known function of (site, round),
so a test can compute the exact FedAvg aggregate the secure one must equal.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import Mod

from benchmarks.local_grid import LocalGrid, with_mods


def site_grid(num_sites: int, mods: list[Mod]) -> LocalGrid:
    """``num_sites`` hospitals answering with ``fake_train`` under ``mods``."""
    return LocalGrid(num_sites, with_mods(mods, fake_train))


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
