"""Evaluate the global model inside the next round's train message: one message per round.

Flower's ``Strategy.start`` sends two messages per site and round: train (on the model after
round r-1), then evaluate (on the model after round r). In deployment every message starts a
fresh ``flwr-clientapp`` process, so the evaluate message costs as much as training a small
model. With ``evaluate_in_train`` the train message of round r+1 asks the site to evaluate
the model it receives (the global model after round r) on its test split before training,
and to reply with those metrics next to its update. The per-round metrics keep their meaning
("the global model after round r, on each site's test split"); they arrive one round later.
The last round's model is evaluated with an ordinary evaluate message (Flower's last
evaluate stage, or ``evaluate_now`` when a run ends early).

Used only where it changes nothing else: every site trains and evaluates each round
(``fraction_train`` = ``fraction_evaluate`` = 1) and no secure aggregation rewrites the train
reply. The wrapper is outermost, so every inner wrapper sees the usual train replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapper import StrategyWrapper

EVALUATE_KEY = "evaluate-received"  # train ConfigRecord: evaluate the received model first
EVALUATION_RECORD = "evaluation"  # train reply: ConfigRecord with that evaluation's metrics

OnEvaluation = Callable[[int, list[RecordDict]], Any]


def enabled(cfg: Any) -> bool:
    """True when ``evaluate_in_train`` is set and every site trains and evaluates each round
    without secure aggregation (see the module docstring)."""
    if not cfg.get("evaluate_in_train", False):
        return False
    strategy = cfg.strategy
    full = (strategy.get("fraction_train", 1.0) >= 1.0
            and strategy.get("fraction_evaluate", 1.0) >= 1.0)
    secagg = cfg.get("secagg")
    return full and (secagg is None or str(secagg.get("name", "none")) == "none")


def evaluation_replies(replies: list[Message]) -> list[RecordDict]:
    """Take the evaluation record out of each train reply (so inner strategies see the usual
    reply); return it as an evaluate-style reply: its metrics plus the reply's ConfigRecords
    (the site's name)."""
    out = []
    for reply in replies:
        if reply.has_error() or EVALUATION_RECORD not in reply.content:
            continue
        record = reply.content.pop(EVALUATION_RECORD)
        out.append(RecordDict({**reply.content.config_records,
                               "metrics": MetricRecord(dict(record))}))
    return out


class EvaluateInTrain(StrategyWrapper):
    """Asks for the evaluation of the received model in each train message after the first;
    hands those evaluations to ``on_evaluation(round_of_the_model, replies)``; sends evaluate
    messages only in the last round."""

    def __init__(self, strategy: Strategy, num_rounds: int, on_evaluation: OnEvaluation) -> None:
        super().__init__(strategy)
        self.num_rounds = num_rounds
        self.on_evaluation = on_evaluation

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Round r > 1: the sites evaluate the received model (after round r-1) first."""
        if server_round > 1:
            config = ConfigRecord({**config, EVALUATE_KEY: server_round - 1})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand on the evaluations of the previous round's model, then aggregate as usual."""
        replies = list(replies)
        evaluated = evaluation_replies(replies)
        if server_round > 1:
            self.on_evaluation(server_round - 1, evaluated)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Only the last round's model is evaluated by an evaluate message."""
        if server_round < self.num_rounds:
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate before the last round."""
        if server_round < self.num_rounds:
            return None
        return self.strategy.aggregate_evaluate(server_round, replies)

    def evaluate_now(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                     grid: Grid, timeout: float) -> MetricRecord | None:
        """Evaluate ``arrays`` (the model after ``server_round``) with evaluate messages now:
        for a run that ends before its last round."""
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        return self.strategy.aggregate_evaluate(server_round, replies)
