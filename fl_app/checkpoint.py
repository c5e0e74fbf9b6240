"""Checkpoint and resume: what a killed run needs to go on from its last completed round.

After every round the server writes, through the run folder (atomically):

- ``checkpoints/round_<k>.pt``: the global model released after round k (a torch state_dict);
- ``checkpoints/state.pt``: the commit point, written last: the round number, the strategy
  chain's state (FedAdam moments, adaptive clipping norm, and whatever a wrapper returns from
  its ``checkpoint_state()``, e.g. the privacy accountants), the RNG states (Python, NumPy,
  torch) and the SHA-256 of the round's model.

``resume=<run folder>`` reads ``state.pt`` back (``torch.load(weights_only=True)``: tensors,
numbers, strings and containers only, never pickled code), reloads the model of that round
and continues with round k+1 in the same folder. Rounds keep their numbers (``RoundOffset``),
so per-round seeds, ledgers and accountants go on exactly where they stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.run_folder import RunFolder
from strategies.wrapper import StrategyWrapper

STATE_FILE = "checkpoints/state.pt"
# Attributes of Flower's own strategies that change from round to round (FedOpt family's
# moments; the adaptive-clipping norm of the DP wrappers). Our wrappers say it themselves.
FLOWER_STATE_ATTRS = ("m_t", "v_t", "clipping_norm")


def model_file(server_round: int) -> str:
    """Run-folder path of the global model released after ``server_round``."""
    return f"checkpoints/round_{server_round}.pt"


def model_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's arrays: names, dtypes, shapes and bytes, in name order.

    Independent of how torch lays out a file, so the audit can check a checkpoint by content.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
        digest.update(header.encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def chain(strategy: Strategy) -> list[Any]:
    """The strategy and everything it wraps, outermost first."""
    nodes, node = [], strategy
    while node is not None and all(node is not n for n in nodes):
        nodes.append(node)
        node = vars(node).get("strategy")  # not getattr: StrategyWrapper delegates lookups
    return nodes


def _to_saveable(value: Any) -> Any:
    """numpy -> torch tensors, recursively (torch.load(weights_only=True) reads them back)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_saveable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_saveable(v) for v in value)
    return value


def _from_saveable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _from_saveable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_saveable(v) for v in value]
    return value


def strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """The round-to-round state of every strategy in the chain (one dict each)."""
    states = []
    for node in chain(strategy):
        own = getattr(type(node), "checkpoint_state", None)
        state = dict(own(node)) if callable(own) else {}
        for attr in FLOWER_STATE_ATTRS:
            if attr in vars(node):
                state[attr] = _to_saveable(vars(node)[attr])
        states.append({"class": type(node).__name__, "state": state})
    return states


def restore_strategy(strategy: Strategy, states: list[dict[str, Any]]) -> None:
    """Put ``strategy_state`` back into a freshly built chain of the same shape."""
    nodes = chain(strategy)
    names = [type(n).__name__ for n in nodes]
    if names != [s["class"] for s in states]:
        raise ValueError(f"the checkpoint's strategy chain {[s['class'] for s in states]} "
                         f"differs from this run's {names}")
    for node, saved in zip(nodes, states, strict=True):
        state = dict(saved["state"])
        for attr in FLOWER_STATE_ATTRS:
            if attr in state:
                setattr(node, attr, _from_saveable(state.pop(attr)))
        restore = getattr(type(node), "restore_state", None)
        if callable(restore):
            restore(node, state)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


@dataclass
class Checkpoint:
    """What ``state.pt`` holds."""

    server_round: int
    model_sha256: str
    strategy: list[dict[str, Any]]
    rng: dict[str, Any]
    audit_sha256: str | None = None  # the audit trail's newest line (fl_app/audit.py)

    def to_dict(self) -> dict[str, Any]:
        """The saveable form."""
        return {"round": self.server_round, "model_sha256": self.model_sha256,
                "strategy": self.strategy, "rng": self.rng, "audit_sha256": self.audit_sha256}


def load_checkpoint(run_dir: Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Read ``state.pt`` and the model of its round; check the model against its hash."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: no completed round to resume from")
    data = torch.load(path, weights_only=True)
    ckpt = Checkpoint(int(data["round"]), str(data["model_sha256"]), data["strategy"],
                      data["rng"])
    model = torch.load(run_dir / model_file(ckpt.server_round), weights_only=True)
    if model_sha256(model) != ckpt.model_sha256:
        raise ValueError(f"{model_file(ckpt.server_round)} does not match the SHA-256 in "
                         f"{STATE_FILE}: the checkpoint was altered")
    return ckpt, model


class RoundOffset(StrategyWrapper):
    """Outermost wrapper of a resumed run: Flower counts rounds from 1 again, the strategies
    below see the run's real round numbers (``offset`` + Flower's)."""

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__(strategy)
        self.offset = offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the real round number."""
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate with the real round number."""
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the real round number."""
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config,
                                                grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate with the real round number."""
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def offset_fn(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """``evaluate_fn`` called with real round numbers (round 0 stays "before training")."""
        return lambda rnd, arrays: evaluate_fn(rnd + self.offset if rnd else 0, arrays)


def save_round_model(run: RunFolder, server_round: int,
                     state_dict: dict[str, torch.Tensor]) -> str:
    """Write the model released after ``server_round``; return its SHA-256."""
    run.save_model(model_file(server_round), state_dict)
    return model_sha256(state_dict)


def commit_round(run: RunFolder, server_round: int, sha256: str, strategy: Strategy,
                 audit_sha256: str | None = None) -> None:
    """Write ``state.pt`` (last, atomically): from now on a resume starts after this round."""
    ckpt = Checkpoint(server_round, sha256, strategy_state(strategy), rng_state(),
                      audit_sha256)
    run.save_model(STATE_FILE, ckpt.to_dict())


@dataclass
class ResumePoint:
    """Where a resumed run picks up."""

    done: int  # rounds completed before the restart
    arrays: ArrayRecord  # the global model after round ``done``
    history: list[dict[str, Any]]  # metrics.jsonl lines of those rounds
    rng: dict[str, Any]  # restore right before the next round


def resume_point(run: RunFolder, strategy: Strategy, metrics_file: str,
                 per_round_files: Iterable[str]) -> ResumePoint:
    """Load the last committed round of ``run`` into ``strategy``; drop the lines of later,
    uncommitted rounds from the per-round files (they are redone)."""
    ckpt, model = load_checkpoint(run.path)
    restore_strategy(strategy, ckpt.strategy)
    for name in per_round_files:
        run.keep_rounds(name, ckpt.server_round)
    history = run.keep_rounds(metrics_file, ckpt.server_round)
    log(INFO, "fedclinic: resuming %s after round %d", run.path, ckpt.server_round)
    return ResumePoint(ckpt.server_round, ArrayRecord(model), history, ckpt.rng)
