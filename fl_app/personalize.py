"""Personalisation (``personalize=none|finetune|ditto``): a model per hospital, tuned to its
own patients, that never leaves the hospital. Only its test metrics travel.

- ``finetune``: after the last round each hospital trains a copy of the final global model
  for ``personalize.epochs`` epochs on its own training split (all its parameters, or only
  the bias terms: ``personalize.params``).
- ``ditto`` (Li et al., ICML 2021): every round each hospital also trains its personal model
  ``v`` on its training split with ``loss(v) + lam/2 ||v - w||^2``, ``w`` the global model it
  just received, before training ``w`` as usual. ``v`` lives in ``context.state``: the
  SuperNode keeps the ClientApp's context for the whole run and hands it to every
  (per-message) ClientApp process, and simulation keeps it per node; a restarted SuperNode
  starts ``v`` again from the global model (the round count in the train metrics,
  ``ditto-rounds``, shows it).

After the last round (and the operating-threshold evaluation, when there is one) the server
sends every site one more evaluate message carrying ``personalize`` in its config: the site
evaluates its personal model (fine-tuned now, or Ditto's) on its test split, at the same
operating threshold as the global model, and answers with the usual evaluate metrics. The
site keeps the personal model in its state folder (``save_personal``).
summary.json ``personalized`` = :func:`fl_app.results.site_summary` of those replies (the
shape of the top level: ``pooled``, ``per_site``, ``mean_site_accuracy``, ...) plus
``method``, ``settings``, ``missing_sites`` and ``gain`` (personal minus global, per site and
for the mean over sites).

Refused with differential privacy: the personal model trains without DP noise, so metrics
computed from it would leave the hospital outside the privacy guarantee.
"""

from __future__ import annotations

import io
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from fl_app.errors import ConfigError
from fl_app.metrics import metrics_of, pooled_metrics, public_site_metrics, site_name
from fl_app.run_folder import atomic_write_bytes
from tasks import engine

NONE = "none"
METHODS = (NONE, "finetune", "ditto")
PARAMS = ("all", "bias")  # personalize.params of finetune: which parameters a site tunes
PERSONALIZE_KEY = "personalize"  # evaluate ConfigRecord: evaluate the site's personal model
STATE_KEY = "ditto-personal"  # context.state ArrayRecord: the site's Ditto model
ROUNDS_KEY = "ditto-rounds"  # train metrics (and context.state): rounds v has been trained


class PersonalizationError(RuntimeError):
    """A site cannot produce its personal model (e.g. Ditto's state was lost)."""


def method(cfg: Any) -> str:
    """``none``, ``finetune`` or ``ditto`` (``none`` when the config has no such group)."""
    node = cfg.get("personalize", None)
    return NONE if node is None else str(node.get("name", NONE))


def check(cfg: DictConfig) -> None:
    """Refuse what personalisation cannot do, with one line."""
    name = method(cfg)
    if name not in METHODS:
        raise ConfigError(f"personalize must be one of {', '.join(METHODS)}, got '{name}'")
    if name == NONE:
        return
    privacy = str(cfg.privacy.get("mechanism", None) or cfg.privacy.name)
    if privacy != "none":
        raise ConfigError(
            f"personalize={name} cannot be combined with privacy={cfg.privacy.name}: the "
            "personal model trains without DP noise, so its metrics would leave the hospital "
            "outside the privacy guarantee; use privacy=none or personalize=none")
    p = cfg.personalize
    if name == "ditto" and not float(p.lam) >= 0:
        raise ConfigError(f"personalize.lam must be >= 0, got {p.lam}")
    epochs = p.get("epochs", None)
    if (name == "finetune" or epochs is not None) and int(epochs) < 1:
        raise ConfigError(f"personalize.epochs must be >= 1, got {epochs}")
    if name == "finetune" and p.params not in PARAMS:
        raise ConfigError(f"personalize.params must be one of {', '.join(PARAMS)}, "
                          f"got '{p.params}'")
    if p.get("lr", None) is not None and not float(p.lr) > 0:
        raise ConfigError(f"personalize.lr must be > 0, got {p.lr}")


# --- site side -------------------------------------------------------------------------


def _optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """The task's optimizer, at ``personalize.lr`` when set."""
    lr = cfg.personalize.get("lr", None)
    task_cfg = cfg.task if lr is None else OmegaConf.merge(cfg.task, {"lr": float(lr)})
    return engine.make_optimizer(model, task_cfg)


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def ditto_round(session: Any, context: Context, global_model: nn.Module, train_data: Dataset,
                server_round: int) -> dict[str, float]:
    """Ditto's personal step at one site (call it before ``global_model`` trains): ``v`` from
    ``context.state`` (the received global model in the site's first round) trained with the
    proximal term towards ``global_model``; ``v`` goes back into ``context.state``. Returns the
    train metrics to add to the reply (``ditto-train-loss``, ``ditto-rounds``)."""
    cfg = session.cfg
    personal = session.task.build_model(cfg, session.site().info)
    stored = context.state.get(STATE_KEY)
    start = stored.to_torch_state_dict() if isinstance(stored, ArrayRecord) else \
        global_model.state_dict()
    personal.load_state_dict(start)
    loader = engine.make_loader(train_data, cfg.task.batch_size, shuffle=True,
                                seed=cfg.seed + server_round)
    anchor = [p for p in global_model.parameters() if p.requires_grad]
    result = engine.train(
        personal, loader, epochs=int(cfg.personalize.get("epochs") or cfg.task.local_epochs),
        optimizer=_optimizer(personal, cfg), device=session.device,
        proximal_mu=float(cfg.personalize.lam), anchor=anchor,
    )
    previous = context.state.get(ROUNDS_KEY) if isinstance(stored, ArrayRecord) else None
    rounds = int(previous["n"]) + 1 if previous is not None else 1
    context.state[STATE_KEY] = ArrayRecord(_state_dict(personal))
    context.state[ROUNDS_KEY] = ConfigRecord({"n": rounds})
    return {"ditto-train-loss": result["train_loss"], ROUNDS_KEY: rounds}


def save_personal(session: Any, context: Context, model: nn.Module) -> Path | None:
    """Keep the personal model at the hospital: ``personal_models/<site>-run<id>-<method>.pt``
    in its state folder (node_config ``state-dir``; in simulation ``<output_dir>/site_state/
    <site>``), written atomically. Without a state folder it is not kept (logged)."""
    from strategies.budget import PrivacyConfigError
    from strategies.site_ledger import site_state_dir

    try:
        folder = site_state_dir(session.cfg, context.node_config, session.ref.name)
    except PrivacyConfigError:
        log(WARNING, "fedclinic: site %s has no state-dir in its node_config: its personal "
            "model was evaluated but is not kept", session.ref.name)
        return None
    path = folder / "personal_models" / \
        f"{session.ref.name}-run{context.run_id}-{method(session.cfg)}.pt"
    buffer = io.BytesIO()
    torch.save(_state_dict(model), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    log(INFO, "fedclinic: site %s keeps its personal model in %s", session.ref.name, path)
    return path


def personal_model(session: Any, context: Context, global_model: nn.Module,
                   train_data: Dataset, server_round: int) -> nn.Module:
    """The site's personal model: ``global_model`` fine-tuned now (``finetune``) or its Ditto
    model from ``context.state`` (``ditto``)."""
    cfg = session.cfg
    name = method(cfg)
    if name == "ditto":
        stored = context.state.get(STATE_KEY)
        if not isinstance(stored, ArrayRecord):
            raise PersonalizationError(
                "this site holds no Ditto personal model: it did not train in this run, or "
                "its SuperNode restarted since")
        model = session.task.build_model(cfg, session.site().info)
        model.load_state_dict(stored.to_torch_state_dict())
        return model
    if name == "finetune":
        if cfg.personalize.params == "bias":  # BitFit: only the bias terms move
            for key, param in global_model.named_parameters():
                param.requires_grad_(key.endswith("bias"))
            if not any(p.requires_grad for p in global_model.parameters()):
                raise PersonalizationError("personalize.params=bias: the model has no bias "
                                           "parameters; use personalize.params=all")
        loader = engine.make_loader(train_data, cfg.task.batch_size, shuffle=True,
                                    seed=cfg.seed + server_round)
        engine.train(global_model, loader, epochs=int(cfg.personalize.epochs),
                     optimizer=_optimizer(global_model, cfg), device=session.device)
        return global_model
    raise PersonalizationError(f"personalize={name}: no personal model to evaluate")


# --- server side -----------------------------------------------------------------------


def evaluate_personal(grid: Any, cfg: DictConfig, record: ConfigRecord, arrays: ArrayRecord,
                      rounds: int, threshold_logit: float | None,
                      global_per_site: dict[str, dict[str, Any]], timeout: float
                      ) -> dict[str, Any]:
    """Ask every site to evaluate its personal model; return summary.json ``personalized``.

    A site that cannot answer is listed in ``missing_sites`` (and logged); the others count.
    """
    from fl_app.results import site_summary  # plots: server side only

    name = method(cfg)
    fields: dict[str, Any] = {**dict(record), PERSONALIZE_KEY: name, "server-round": rounds}
    if threshold_logit is not None:  # the same operating threshold as the global model's
        fields["threshold-logit"] = threshold_logit
    config = ConfigRecord(fields)
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                        message_type=MessageType.EVALUATE) for node in nodes]
    per_site: dict[str, dict[str, Any]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log(ERROR, "fedclinic: personalize=%s: a site could not evaluate its personal "
                "model: %s", name, reply.error.reason.strip().splitlines()[-1])
            continue
        per_site[site_name(reply.content)] = metrics_of(reply.content)
    public = {s: public_site_metrics(m) for s, m in sorted(per_site.items())}
    summary = site_summary(pooled_metrics(per_site), public)
    summary["method"] = name
    summary["settings"] = OmegaConf.to_container(cfg.personalize, resolve=True)
    summary["missing_sites"] = sorted(set(global_per_site) - set(public))
    summary["gain"] = _gain(global_per_site, public, summary["mean_site_accuracy"])
    for site, g in summary["gain"]["per_site"].items():
        log(INFO, "fedclinic: personalize=%s %-12s accuracy global %.4f -> personal %.4f "
            "(%+.4f)", name, site, g["global_accuracy"], g["personal_accuracy"],
            g["accuracy_gain"])
    log(INFO, "fedclinic: personalize=%s: mean per-site accuracy %.4f (global model %.4f)",
        name, summary["mean_site_accuracy"] or float("nan"),
        summary["gain"]["global_mean_site_accuracy"] or float("nan"))
    return summary


def _gain(global_per_site: dict[str, dict[str, Any]], personal: dict[str, dict[str, Any]],
          personal_mean: float | None) -> dict[str, Any]:
    """Personal minus global, per site (accuracy; AUC where both are defined) and for the
    mean site accuracy over the sites that answered."""
    from fl_app.results import site_summary

    both = {s: global_per_site[s] for s in personal if s in global_per_site}
    global_mean = site_summary({}, both)["mean_site_accuracy"]
    per_site = {}
    for site, mine in personal.items():
        if site not in both:
            continue
        entry = {"global_accuracy": float(both[site]["accuracy"]),
                 "personal_accuracy": float(mine["accuracy"])}
        entry["accuracy_gain"] = entry["personal_accuracy"] - entry["global_accuracy"]
        g_auc, p_auc = both[site].get("auc"), mine.get("auc")
        if g_auc is not None and p_auc is not None and g_auc == g_auc and p_auc == p_auc:
            entry |= {"global_auc": float(g_auc), "personal_auc": float(p_auc),
                      "auc_gain": float(p_auc) - float(g_auc)}
        per_site[site] = entry
    return {
        "global_mean_site_accuracy": global_mean,
        "mean_site_accuracy": None if global_mean is None or personal_mean is None
        else personal_mean - global_mean,
        "per_site": per_site,
    }
