"""A Flower strategy that wraps another and delegates every call to it.

Subclasses (FedBN, the privacy guard) override only the calls they change, as Flower's own
DifferentialPrivacy* wrappers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

S = TypeVar("S", bound=Strategy)


class StrategyWrapper(Strategy):
    """Delegates configure/aggregate/summary to ``self.strategy``."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        # attributes of the wrapped strategy (e.g. a DP wrapper's settings) stay reachable
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate (every site evaluates the global model)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def unwrap(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy``, then each strategy it wraps, outermost first.

    Follows ``.strategy``, which our wrappers and Flower's DP wrappers both use for the
    strategy they wrap.
    """
    current: Strategy | None = strategy
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        inner = vars(current).get("strategy")  # not __getattr__: it would delegate inwards
        current = inner if isinstance(inner, Strategy) else None


def find(strategy: Strategy, cls: type[S]) -> S | None:
    """The outermost strategy of type ``cls`` in the chain of ``strategy`` (None if absent)."""
    return next((s for s in unwrap(strategy) if isinstance(s, cls)), None)


def innermost(strategy: Strategy) -> Strategy:
    """The aggregating strategy at the bottom of the chain (e.g. FedAvg under DP wrappers)."""
    *_, last = unwrap(strategy)
    return last
