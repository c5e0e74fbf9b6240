"""What privacy asks of one training call at a site: the ClientApp's single entry point.

``SitePrivacy`` is built at the start of each train call. It refuses the round when the
site's budget would be exceeded, turns model/optimizer/loader into Opacus's private ones for
local DP, and adds the privacy report (and central DP's equal weight) to the reply. With
``privacy=none`` every method is a no-op, so the train handler has one code path.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from strategies.budget import (
    CENTRAL_EPSILON_NEXT_KEY,
    PRIVACY_RECORD,
    STATUS_EXHAUSTED,
    STATUS_TRAINED,
    UNIFORM_WEIGHT_KEY,
    mechanism,
    site_budget,
    spend_record,
)

# Opacus (strategies.local_dp) is imported only when a site trains with local DP.


def weight_metrics(cfg: DictConfig) -> dict[str, int]:
    """Extra MetricRecord entries of every train/evaluate reply (central DP's equal weight)."""
    return {UNIFORM_WEIGHT_KEY: 1} if mechanism(cfg) == "central_dp" else {}


class SitePrivacy:
    """Privacy for one train call of one site (see the module docstring)."""

    def __init__(self, cfg: DictConfig, site: str, context: Context, loader: DataLoader,
                 device: torch.device | None = None) -> None:
        self.cfg, self.site = cfg, site
        self.mechanism = mechanism(cfg)
        self.budget = (site_budget(cfg, site, dict(context.node_config))
                       if self.mechanism != "none" else None)
        self.local = None
        if self.mechanism == "local_dp" and self.budget is not None:
            from strategies.local_dp import LocalDPRound

            self.local = LocalDPRound(cfg, site, context, loader, self.budget, device=device)
        self._central_epsilon: float | None = None

    @property
    def step_on_empty(self) -> bool:
        """DP-SGD takes a (noise-only) step on an empty Poisson batch; see tasks.engine."""
        return self.local is not None

    def refusal(self, config: ConfigRecord) -> dict[str, Any] | None:
        """The "budget exhausted" report when this round would exceed the budget, else None."""
        if self.local is not None:
            return self.local.refusal() if self.local.refused() else None
        if self.budget is not None and CENTRAL_EPSILON_NEXT_KEY in config:
            self._central_epsilon = float(config[CENTRAL_EPSILON_NEXT_KEY])
            if self.budget.exceeded_by(self._central_epsilon):
                return {
                    "status": STATUS_EXHAUSTED, "mechanism": "central_dp",
                    "epsilon_next": self._central_epsilon,
                    "reason": f"the central release of this round would bring epsilon to "
                              f"{self._central_epsilon:.4f} > budget {self.budget.epsilon}",
                }
        return None

    def refusal_reply(self, msg: Message, refusal: dict[str, Any],
                      extra: dict[str, ConfigRecord]) -> RecordDict:
        """Reply content of a site that does not train: the global model back (no update)."""
        metrics = MetricRecord({"train_loss": 0.0, "num-examples": 0, **weight_metrics(self.cfg)})
        arrays = next(iter(msg.content.array_records.values()))
        return RecordDict({"arrays": arrays, "metrics": metrics, **extra,
                           PRIVACY_RECORD: spend_record(refusal)})

    def private(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
                ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Opacus's private model, optimizer and Poisson loader (local DP), else unchanged."""
        if self.local is None:
            return model, optimizer, loader
        return self.local.make_private(model, optimizer)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Weights to send, under the server's keys (never Opacus's ``_module.`` prefix)."""
        if self.local is None:  # no Opacus wrapper, so no prefix to strip
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}
        from strategies.local_dp import plain_state_dict

        return plain_state_dict(model)

    def metrics(self) -> dict[str, int]:
        """Extra train-reply metrics (same keys at every site)."""
        return weight_metrics(self.cfg)

    def records(self) -> dict[str, ConfigRecord]:
        """The privacy report to add to the train reply ({} without privacy)."""
        if self.local is not None:
            return {PRIVACY_RECORD: spend_record(self.local.finish())}
        if self.mechanism == "central_dp":
            return {PRIVACY_RECORD: spend_record({
                "status": STATUS_TRAINED, "mechanism": "central_dp",
                "epsilon_next": self._central_epsilon,
            })}
        return {}

