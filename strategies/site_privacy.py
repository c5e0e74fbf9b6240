"""What privacy asks of one training call at a site: the ClientApp's single entry point.

``SitePrivacy`` is built at the start of each train call. It refuses the round when the
request breaks the hospital's own limits (node_config: mechanisms, delta, epsilon cap) or when
the site's budget would be exceeded, computed from its persistent ledger
(``strategies.site_ledger``), never from a value the server sends. It turns
model/optimizer/loader into Opacus's private ones for local DP, appends every release to the
ledger and adds the privacy report to the reply. With ``privacy=none`` and no limit broken
every method is a no-op, so the train handler has one code path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from strategies.budget import (
    PRIVACY_RECORD,
    STATUS_EXHAUSTED,
    STATUS_REFUSED,
    STATUS_TRAINED,
    UNIFORM_WEIGHT_KEY,
    SiteLimits,
    mechanism,
    site_budget,
    spend_record,
)
from strategies.central_dp import accounted_noise_multiplier
from strategies.site_ledger import (
    SiteLedger,
    data_fingerprint,
    ledger_scope,
    site_state_dir,
)

if TYPE_CHECKING:
    from strategies.accounting import AccountantState

# Opacus (strategies.local_dp, strategies.accounting) is imported only when a site trains
# with differential privacy.


class PrivacyRefused(RuntimeError):
    """The hospital refuses the server's privacy setting (its node_config limits)."""


def weight_metrics(cfg: DictConfig) -> dict[str, int]:
    """Extra MetricRecord entries of every train/evaluate reply (central DP's equal weight).

    The server overwrites the train replies' value with its own (``PrivacyGuard``); sites
    still send it because Flower's FedAvg checks that every reply has its weight key.
    """
    return {UNIFORM_WEIGHT_KEY: 1} if mechanism(cfg) == "central_dp" else {}


def _round(config: ConfigRecord) -> int:
    return int(config.get("server-round", 0))


class SitePrivacy:
    """Privacy for one train call of one site (see the module docstring)."""

    def __init__(self, cfg: DictConfig, site: str, context: Context, loader: DataLoader,
                 device: torch.device | None = None, fingerprint: str | None = None) -> None:
        self.cfg, self.site, self.context = cfg, site, context
        self.mechanism = mechanism(cfg)
        node_config = dict(context.node_config)
        self.limits = SiteLimits.from_node_config(node_config, len(loader.dataset))  # type: ignore[arg-type]
        self.fingerprint = fingerprint or data_fingerprint(cfg, site, None)
        self._ledger: SiteLedger | None = None
        self.budget = (site_budget(cfg, site, node_config)
                       if self.mechanism != "none" else None)
        self.local = None
        if self.mechanism == "local_dp" and self.budget is not None:
            from strategies.local_dp import LocalDPRound

            self.local = LocalDPRound(cfg, site, self.ledger, loader, self.budget, device=device)
        self._central_epsilon: float | None = None

    @property
    def ledger(self) -> SiteLedger:
        """This site's persistent ledger (opened on first use: privacy=none never needs it)."""
        if self._ledger is None:
            node_config = dict(self.context.node_config)
            self._ledger = SiteLedger(site_state_dir(self.cfg, node_config, self.site), self.site,
                                      self.fingerprint, int(self.context.run_id),
                                      ledger_scope(self.cfg, node_config))
        return self._ledger

    @property
    def step_on_empty(self) -> bool:
        """DP-SGD takes a (noise-only) step on an empty Poisson batch; see tasks.engine."""
        return self.local is not None

    def _delta(self) -> float | None:
        if self.mechanism == "none":
            return None
        p = self.cfg.privacy
        return max(p.target_delta, self.budget.delta if self.budget else 0.0)

    def refusal(self, config: ConfigRecord) -> dict[str, Any] | None:
        """The report of a site that does not train this round, else None.

        ``refused``: the request breaks the hospital's limits (raised as ``PrivacyRefused``
        for privacy=none, which has no privacy report). ``budget_exhausted``: this round
        would bring the site's epsilon (from its own ledger) above its budget.
        """
        server_round = _round(config)
        why = self.limits.refusal(self.mechanism, self._delta())
        if why is not None:
            self.ledger.append(round=server_round, mechanism=self.mechanism,
                               status=STATUS_REFUSED, steps=0, reason=why)
            if self.mechanism == "none":
                raise PrivacyRefused(why)
            return {"status": STATUS_REFUSED, "mechanism": self.mechanism, "reason": why,
                    "epsilon": self.ledger.epsilon(self.cfg.privacy.target_delta,
                                                   self.cfg.privacy.accountant)}
        if self.local is not None:
            return self.local.refusal(server_round) if self.local.refused() else None
        if self.budget is not None and self.mechanism == "central_dp":
            eps_next = self._central_state().epsilon_after(
                accounted_noise_multiplier(self.cfg), 1.0, 1, delta=self.budget.delta)
            self._central_epsilon = eps_next
            if self.budget.exceeded_by(eps_next):
                reason = (f"the central release of this round would bring epsilon to "
                          f"{eps_next:.4f} > budget {self.budget.epsilon}")
                spend = {"status": STATUS_EXHAUSTED, "mechanism": "central_dp",
                         "epsilon": self._central_state().epsilon(), "reason": reason}
                self.ledger.append(round=server_round, mechanism="central_dp", steps=0,
                                   status=STATUS_EXHAUSTED, reason=reason,
                                   epsilon=spend["epsilon"])
                return spend
        return None

    def _central_state(self) -> AccountantState:
        from strategies.accounting import AccountantState

        p = self.cfg.privacy
        return AccountantState(p.accountant, p.target_delta,
                               history=self.ledger.history())

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

    def records(self, config: ConfigRecord) -> dict[str, ConfigRecord]:
        """Record the release in the ledger; the privacy report for the reply ({} if none).

        Called after training and before the reply leaves the site: a crash in between
        over-counts (safe side), never under-counts.
        """
        if self.local is not None:
            return {PRIVACY_RECORD: spend_record(self.local.finish(_round(config)))}
        if self.mechanism == "central_dp":
            p = self.cfg.privacy
            # the site cannot see whether it was sampled secretly: it claims no amplification
            z, delta, name = accounted_noise_multiplier(self.cfg), p.target_delta, p.accountant
            state = self._central_state()
            eps = state.epsilon_after(z, 1.0, 1)
            self.ledger.append(round=_round(config), mechanism="central_dp", status=STATUS_TRAINED,
                               noise_multiplier=z, sample_rate=1.0, steps=1,
                               clipping_norm=p.clipping_norm, epsilon=eps, delta=delta,
                               accountant=name)
            return {PRIVACY_RECORD: spend_record({
                "status": STATUS_TRAINED, "mechanism": "central_dp", "epsilon": eps,
                "delta": delta, "accountant": name,
            })}
        return {}
