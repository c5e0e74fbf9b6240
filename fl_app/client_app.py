"""fedclinic ClientApp: runs inside each hospital's SuperNode (or a simulated one).

Three handlers: ``query`` (site facts and feature statistics for federated preprocessing),
``train`` (local training from the global model) and ``evaluate`` (metrics on the local test
split). Only model weights and metrics leave the site.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.metrics import SITE_RECORD
from fl_app.site_runtime import SiteSession
from tasks import DataError, engine

app = ClientApp()


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
    }
    return Message(RecordDict({"site": ConfigRecord({"facts": json.dumps(facts)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's training split; reply with weights and metrics."""
    session = SiteSession(msg, context.node_config)
    site, cfg = session.site(), session.cfg
    model = _model(session, msg)
    server_round = int(msg.content["config"].get("server-round", 0))
    loader = engine.make_loader(
        site.train, int(cfg.task.batch_size), shuffle=True, seed=int(cfg.seed) + server_round
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=float(cfg.task.lr), momentum=float(cfg.task.momentum),
        weight_decay=float(cfg.task.weight_decay),
    )
    result = engine.train(
        model, loader, epochs=int(cfg.task.local_epochs), optimizer=optimizer,
        device=session.device, proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord({"train_loss": result["train_loss"], "num-examples": site.num_train})
    content = RecordDict({
        "arrays": ArrayRecord(model.cpu().state_dict()),
        "metrics": metrics,
        SITE_RECORD: _site_record(session),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's test split."""
    session = SiteSession(msg, context.node_config)
    site = session.site()
    model = _model(session, msg)
    loader = engine.make_loader(site.test, 256, shuffle=False, seed=0)
    metrics = engine.evaluate(model, loader, session.device)
    content = RecordDict({"metrics": MetricRecord(metrics), SITE_RECORD: _site_record(session)})
    return Message(content, reply_to=msg)
