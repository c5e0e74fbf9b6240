"""Local training and evaluation shared by every task (classification with logits)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.base import DataError
from tasks.score_groups import logit_scores, score_metrics


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader with a seeded generator, so local training is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def proximal_term(model: nn.Module, global_params: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu/2) * ||w - w_global||^2 over the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return (mu / 2.0) * sum(
        ((p - g) ** 2).sum() for p, g in zip(trainable, global_params, strict=True)
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    proximal_mu: float = 0.0,
    step_on_empty: bool = False,
    anchor: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``epochs`` local epochs; return mean loss and examples seen.

    With ``proximal_mu`` > 0 the FedProx proximal term towards the weights the model had on
    entry (the global model) is added to every batch's loss. With ``step_on_empty`` (DP-SGD)
    an empty Poisson batch still makes an optimizer step: Opacus then adds noise only and its
    accountant counts the step, as the privacy analysis of Poisson-sampled DP-SGD assumes.
    """
    model.to(device).train()
    criterion = nn.CrossEntropyLoss()
    global_params = (
        [p.detach().to(device) for p in anchor] if anchor is not None
        else [p.detach().clone() for p in model.parameters() if p.requires_grad]
    )
    total_loss, total_examples = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            if len(y) == 0 and not step_on_empty:  # Poisson sampling can draw an empty batch
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y) if len(y) else model(x).sum() * 0.0
            objective = (
                loss + proximal_term(model, global_params, proximal_mu) if proximal_mu else loss
            )
            objective.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            total_examples += len(y)
    return {"train_loss": total_loss / max(total_examples, 1), "examples_seen": total_examples}


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Return (labels, class probabilities, summed cross-entropy, binary logit scores).

    The logit scores (``log p1/p0``, float64) are None for more than two classes.
    """
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    labels, probs, scores, loss = [], [], [], 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += criterion(logits, y).item()
        labels.append(y.cpu().numpy())
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        if logits.shape[1] == 2:
            scores.append(logit_scores(logits))
    return (np.concatenate(labels), np.concatenate(probs), loss,
            np.concatenate(scores) if scores else None)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, loss_sum: float, scores: np.ndarray | None = None
) -> dict[str, Any]:
    """Loss, accuracy, AUC (scikit-learn), sensitivity, specificity and score groups.

    Binary tasks: the AUC is exact on the logit scores (``scores``, default ``log p1/p0``
    from ``probs``); the score groups (``tasks.score_groups``) feed the pooled AUC without
    per-patient scores. AUC is NaN when the site's test set holds a single class.
    """
    n = len(labels)
    pred = probs.argmax(axis=1)
    metrics: dict[str, Any] = {
        "loss": loss_sum / n,
        "accuracy": float((pred == labels).mean()),
        "num-examples": n,
    }
    if probs.shape[1] == 2:
        if scores is None:
            scores = logit_of(probs)
        metrics["auc"] = binary_auc(labels, scores)
        pos, neg = labels == 1, labels == 0
        metrics["sensitivity"] = float((pred[pos] == 1).mean()) if pos.any() else math.nan
        metrics["specificity"] = float((pred[neg] == 0).mean()) if neg.any() else math.nan
        metrics.update(score_metrics(labels, scores))
    else:
        metrics["auc"] = (
            float(roc_auc_score(labels, probs, multi_class="ovr"))
            if len(np.unique(labels)) == probs.shape[1]
            else math.nan
        )
    return metrics


def roc_auc_score(*args: Any, **kwargs: Any) -> float:
    """scikit-learn's ``roc_auc_score``, imported on first use (it costs ~0.7 s of start-up,
    which a ClientApp process that only trains or answers the query round never needs)."""
    from sklearn.metrics import roc_auc_score as sklearn_roc_auc_score

    return float(sklearn_roc_auc_score(*args, **kwargs))


def binary_auc(labels: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from scikit-learn, NaN when only one class is present."""
    return float(roc_auc_score(labels, score)) if len(np.unique(labels)) == 2 else math.nan


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Metrics of ``model`` on one loader (see ``classification_metrics``)."""
    labels, probs, loss, scores = predict(model, loader, device)
    return classification_metrics(labels, probs, loss, scores)


def logit_of(probs: np.ndarray) -> np.ndarray:
    """Binary logit scores ``log p1/p0`` (float64) of class probabilities (N, 2)."""
    p = np.clip(probs.astype(np.float64), np.finfo(np.float64).tiny, 1.0)
    return np.log(p[:, 1]) - np.log(p[:, 0])


def evaluate_site(
    model: nn.Module, site: Any, device: torch.device,
    extra: Callable[[nn.Module, Any, torch.device], dict[str, Any]] | None = None,
    threshold_logit: float | None = None,
) -> dict[str, Any]:
    """A site's evaluation reply: test metrics (``classification_metrics``), the k-patient
    score groups of its validation split (prefix ``val-``; binary tasks with a validation
    split: the server picks the operating threshold from them) and the task's ``extra``
    metrics. With ``threshold_logit`` accuracy, sensitivity and specificity are those of
    ``log p1/p0 >= threshold_logit`` (fl_app.threshold) instead of argmax."""
    from fl_app.threshold import rates_at  # fl_app imports tasks, not the other way round
    from tasks.score_groups import score_metrics

    if len(site.test) == 0:  # e.g. more simulated sites than test examples
        raise DataError(f"site {site.name} has no test examples to evaluate on (a partition "
                        "into more sites than the test split can fill): use fewer sites")
    labels, probs, loss, scores = predict(model, make_loader(site.test, 256, False, 0), device)
    metrics = classification_metrics(labels, probs, loss, scores)
    binary = probs.shape[1] == 2
    if binary and threshold_logit is not None:
        metrics |= rates_at(labels, scores, threshold_logit)
        metrics["threshold-logit"] = float(threshold_logit)
    val = getattr(site, "val", None)
    if binary and val is not None:
        if len(val):
            val_labels, _, _, val_scores = predict(model, make_loader(val, 256, False, 0),
                                                   device)
        else:  # a site dealt no validation image sends empty groups: the same keys
            val_labels, val_scores = np.zeros(0, dtype=np.int64), np.zeros(0)
        metrics |= {f"val-{k}": v
                    for k, v in score_metrics(val_labels, val_scores).items()}
    if extra is not None:
        metrics |= extra(model, site, device)
    return metrics


def make_optimizer(model: nn.Module, task_cfg: Any) -> torch.optim.Optimizer:
    """The local optimizer of ``task.optimizer``: ``sgd`` (default) or ``adam``.

    SGD uses ``task.lr``, ``task.momentum``, ``task.weight_decay``; Adam uses ``task.lr`` and
    ``task.weight_decay`` (a fresh Adam each round: its moments are not shared or kept).
    """
    name = task_cfg.get("optimizer", "sgd")
    params = [p for p in model.parameters() if p.requires_grad]
    lr, weight_decay = task_cfg.lr, task_cfg.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=task_cfg.get("momentum", 0.0), weight_decay=weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"task.optimizer must be 'sgd' or 'adam', got '{name}'")
