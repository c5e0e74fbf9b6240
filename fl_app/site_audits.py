"""What a hospital computes for the audits after training, and the keys that ask for them.

Both run in the ClientApp's evaluate handler and reply only aggregate numbers:

- contribution scores (strategies/contribution.py): the evaluate message carries coalition
  models (ArrayRecords named in ``COALITIONS_KEY``); the hospital evaluates each on its OWN
  validation split and replies one MetricRecord per coalition (loss, accuracy, num-examples
  and the k-patient score groups the pooled AUC needs; tasks/score_groups.py);
- the membership-inference audit (``audit.membership``): a loss-threshold attack (Yeom et al.
  2018) on the final global model. Members = the hospital's training patients, non-members =
  its held-out validation patients (same population; the test split where there is no
  validation split); the attack scores each patient by minus its loss and the reply is only
  the attack's ROC AUC over members vs non-members, taken within each class (0.5 = the loss
  does not tell them apart) and the two counts.

Kept light: a ClientApp process imports this for every message (scikit-learn is imported
only when an AUC is computed, tasks.engine.roc_auc_score).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import Dataset

from tasks import DataError, engine

COALITIONS_KEY = "contribution-coalitions"  # evaluate config: JSON list of the record names
COALITION_PREFIX = "coalition-"  # ArrayRecord (request) / MetricRecord (reply) names
MEMBERSHIP_KEY = "membership-audit"  # evaluate config: run the membership-inference attack
MEMBERSHIP_RECORD = "membership"  # reply: MetricRecord with the attack's AUC and counts


def coalition_metrics(msg: Message, model: nn.Module, site: Any,
                      device: torch.device) -> RecordDict:
    """Evaluate every coalition model of ``msg`` on the site's validation split."""
    val = getattr(site, "val", None)
    if val is None or len(val) == 0:
        raise DataError(f"site {site.name} has no validation split to score the coalition "
                        "models on (tabular tasks: set task.val_fraction > 0)")
    loader = engine.make_loader(val, 256, shuffle=False, seed=0)
    out = RecordDict()
    for name in json.loads(str(msg.content["config"][COALITIONS_KEY])):
        model.load_state_dict(msg.content[name].to_torch_state_dict())
        labels, probs, loss, scores = engine.predict(model, loader, device)
        metrics = engine.classification_metrics(labels, probs, loss, scores)
        out[name] = MetricRecord({k: v for k, v in metrics.items()
                                  if isinstance(v, (int, float, list))})
    return out


def _without_augmentation(dataset: Dataset) -> Dataset:
    """The training set as the model saw it, minus random training-time augmentation
    (imaging tasks' ``transform``), so a member's loss is not blurred by it."""
    if getattr(dataset, "transform", None) is None:
        return dataset
    plain = copy.copy(dataset)
    plain.transform = None  # type: ignore[attr-defined]
    return plain


@torch.no_grad()
def example_losses(model: nn.Module, dataset: Dataset, device: torch.device
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy of ``model`` on every example of ``dataset`` (float64), and the labels."""
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="none")
    losses, labels = [], []
    for x, y in engine.make_loader(dataset, 256, shuffle=False, seed=0):
        losses.append(criterion(model(x.to(device)), y.to(device)).double().cpu().numpy())
        labels.append(y.numpy())
    if not losses:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(losses), np.concatenate(labels)


def membership_attack_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray,
                          member_labels: np.ndarray | None = None,
                          nonmember_labels: np.ndarray | None = None) -> float:
    """ROC AUC of the loss-threshold attack: score = minus the loss, positive = member.

    With labels, the AUC is taken within each class and averaged (weighted by the class's
    member x non-member pairs): a model's loss differs between classes, so members and
    non-members with different class mixes would otherwise be told apart by their labels,
    not by membership."""
    if member_labels is None or nonmember_labels is None:
        labels = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
        return engine.binary_auc(labels, -np.r_[member_losses, nonmember_losses])
    total, pairs = 0.0, 0
    for c in np.intersect1d(member_labels, nonmember_labels):
        m, n = member_losses[member_labels == c], nonmember_losses[nonmember_labels == c]
        total += membership_attack_auc(m, n) * len(m) * len(n)
        pairs += len(m) * len(n)
    return total / pairs if pairs else math.nan


def membership_metrics(model: nn.Module, site: Any, device: torch.device) -> RecordDict:
    """The attack on the final model: members (the training split) vs non-members (the
    validation split where the site has one: drawn from the same patients' population as
    the training split; else the test split)."""
    val = getattr(site, "val", None)
    held_out = val if val is not None and len(val) else site.test
    members, member_labels = example_losses(model, _without_augmentation(site.train), device)
    others, other_labels = example_losses(model, held_out, device)
    if len(members) == 0 or len(others) == 0:
        raise DataError(f"site {site.name} needs training and held-out patients for the "
                        "membership-inference audit")
    return RecordDict({MEMBERSHIP_RECORD: MetricRecord({
        "auc": membership_attack_auc(members, others, member_labels, other_labels),
        "members": len(members),
        "non-members": len(others),
        "non-members-from-val": int(held_out is val),
    })})
