"""fedclinic ClientApp: runs inside each hospital's SuperNode (or a simulated one).

Three handlers: ``query`` (site facts and feature statistics for federated preprocessing),
``train`` (local training from the global model) and ``evaluate`` (metrics on the local test
split; after training also the audits of fl_app/site_audits.py). Only model weights and
metrics leave the site.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app import faults, personalize, site_audits
from fl_app.metrics import SITE_RECORD
from fl_app.site_runtime import CONFIG_KEY, SiteSession
from strategies.central_dp import make_clipping_mod
from strategies.compression import compression_mod
from strategies.evaluate_in_train import EVALUATE_KEY, EVALUATION_RECORD
from strategies.fedbn import fedbn_mod
from strategies.secure_aggregation import secure_aggregation_mod
from strategies.site_ledger import data_fingerprint
from strategies.site_privacy import SitePrivacy, weight_metrics
from tasks import DataError, engine

app = ClientApp()
# central DP with client-side clipping: Flower's fixed/adaptive clipping mod, on train only
central_dp_clipping_mod = make_clipping_mod(CONFIG_KEY)
# Train mods, outermost first: secure aggregation protects (masks/encrypts) the update that
# the inner mods produced: FedBN (fedbn=true) has taken the site-local normalisation layers
# out of it and central DP has clipped it. FedBN also wraps evaluate (its layers stay local).
# fault_mod (simulation only) inside secure aggregation: a faulty site's update is what it
# masks and sends, as a real bad site's would be. Compression (refused with secure
# aggregation) encodes what every inner mod produced: the update after FedBN took its layers
# out and after central-DP clipping (it re-clips what it encodes), a faulty update as it is.
TRAIN_MODS = [secure_aggregation_mod, compression_mod, faults.fault_mod, fedbn_mod,
              central_dp_clipping_mod]
EVALUATE_MODS = [fedbn_mod]


def _site_record(session: SiteSession) -> ConfigRecord:
    return ConfigRecord({"name": session.ref.name})


def _model(session: SiteSession, msg: Message) -> torch.nn.Module:
    model = session.task.build_model(session.cfg, session.site().info)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the site's name, sizes, model facts and per-feature moments of its train split.

    A site whose data cannot be used answers with the reason instead of a traceback, so the
    server can stop the run with one clear line per site.
    """
    try:
        session = SiteSession(msg, context.node_config)
        site = session.raw_site()
    except (DataError, ValueError, KeyError) as err:
        problem = ConfigRecord({"error": f"{type(err).__name__}: {err}"})
        return Message(RecordDict({"site": problem}), reply_to=msg)
    facts = {
        "name": site.name,
        "num_train": site.num_train,
        "num_test": site.num_test,
        "info": {k: v for k, v in site.info.items() if isinstance(v, (int, float, str, list))},
        "moments": session.task.local_statistics(site),
        # the server refuses fault injection unless every site is simulated (fl_app/faults.py)
        "simulated": faults.in_simulation(context.node_config),
    }
    return Message(RecordDict({"site": ConfigRecord({"facts": json.dumps(facts)})}), reply_to=msg)


def _evaluation(session: SiteSession, model: torch.nn.Module,
                threshold_logit: float | None = None) -> dict[str, Any]:
    """What an evaluate reply holds for ``model`` (tasks.engine.evaluate_site)."""
    metrics = engine.evaluate_site(model, session.site(), session.device,
                                   session.task.extra_metrics, threshold_logit)
    return metrics | weight_metrics(session.cfg)


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's training split; reply with weights and metrics.

    Under differential privacy the site trains only while its budget lasts (else it answers
    "budget_exhausted"), trains with DP-SGD for local DP, and reports its privacy spend.
    When the server asks (``evaluate-received``, strategies/evaluate_in_train.py), the site
    first evaluates the model it received, as an evaluate message would, and adds the metrics
    to the reply: one ClientApp process instead of two.
    """
    session = SiteSession(msg, context.node_config)
    site, cfg = session.site(), session.cfg
    model = _model(session, msg)
    evaluation = ({EVALUATION_RECORD: ConfigRecord(_evaluation(session, model))}
                  if EVALUATE_KEY in msg.content["config"] else {})
    server_round = int(msg.content["config"].get("server-round", 0))
    train_data = faults.training_data(cfg, session.ref.name, site.train, site.num_classes)
    loader = engine.make_loader(
        train_data, cfg.task.batch_size, shuffle=True, seed=cfg.seed + server_round
    )
    fingerprint = data_fingerprint(cfg, session.ref.name, session.ref.data_path)
    privacy = SitePrivacy(cfg, session.ref.name, context, loader, session.device, fingerprint)
    # a request outside the hospital's own limits is refused here (PrivacyRefused for
    # privacy=none reaches the server as this site's error, with the reason)
    if (refusal := privacy.refusal(msg.content["config"])) is not None:
        content = privacy.refusal_reply(msg, refusal,
                                        {SITE_RECORD: _site_record(session), **evaluation})
        return Message(content, reply_to=msg)
    # Ditto: the site's personal model trains first, towards the global model it received
    personal = (personalize.ditto_round(session, context, model, train_data, server_round)
                if personalize.method(cfg) == "ditto" else {})
    optimizer = engine.make_optimizer(model, cfg.task)
    model, optimizer, loader = privacy.private(model, optimizer, loader)
    result = engine.train(
        model, loader, epochs=cfg.task.local_epochs, optimizer=optimizer,
        device=session.device, proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        step_on_empty=privacy.step_on_empty,
    )
    metrics = MetricRecord({"train_loss": result["train_loss"], "num-examples": site.num_train,
                            **privacy.metrics(), **personal})
    content = RecordDict({
        "arrays": ArrayRecord(privacy.state_dict(model)),
        "metrics": metrics,
        SITE_RECORD: _site_record(session),
        **privacy.records(msg.content["config"]),
        **evaluation,
    })
    return Message(content, reply_to=msg)


@app.evaluate(mods=EVALUATE_MODS)
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's test split (and send the k-patient score
    groups of its validation split, from which the server picks the operating threshold);
    with ``threshold-logit`` in the config, at that threshold instead of argmax; with
    ``personalize`` in the config, the site's personal model instead (fl_app/personalize.py:
    fine-tuned now, or Ditto's), which never leaves the site.

    After training the server may instead ask for the coalition models' validation metrics
    (contribution scores) or the membership-inference audit (fl_app/site_audits.py)."""
    session = SiteSession(msg, context.node_config)
    config = msg.content["config"]
    model = _model(session, msg)
    # the audits after training (fl_app/site_audits.py): only aggregate numbers go back
    if site_audits.COALITIONS_KEY in config:
        content = site_audits.coalition_metrics(msg, model, session.site(), session.device)
    elif site_audits.MEMBERSHIP_KEY in config:
        content = site_audits.membership_metrics(model, session.site(), session.device)
    else:
        threshold = config.get("threshold-logit")  # set after the last round
        if personalize.PERSONALIZE_KEY in config:  # after the last round: the personal model
            train_data = faults.training_data(session.cfg, session.ref.name,
                                              session.site().train, session.site().num_classes)
            model = personalize.personal_model(session, context, model, train_data,
                                               int(config.get("server-round", 0)))
            personalize.save_personal(session, context, model)
        metrics = _evaluation(session, model, None if threshold is None else float(threshold))
        content = RecordDict({"metrics": MetricRecord(metrics)})
    content[SITE_RECORD] = _site_record(session)
    return Message(content, reply_to=msg)
