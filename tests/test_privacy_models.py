"""DP-SGD on image models (real chest X-rays): GroupNorm, in-place ReLU and residual adds.

Opacus breaks on in-place activations and in-place residual adds (``out += identity``) and
cannot train BatchNorm; the site must still send weights under the server's own keys.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fl_app.config import compose_config
from strategies.budget import Budget, PrivacyConfigError
from strategies.local_dp import (
    LocalDPRound,
    choose_grad_sample_mode,
    plain_state_dict,
    prepare_model,
)
from strategies.site_ledger import SiteLedger
from tasks import engine


def xray_images(shared_data: Path, n: int) -> TensorDataset:
    """``n`` real PneumoniaMNIST training films (1x28x28, scaled to [0, 1]) and labels."""
    data = np.load(shared_data / "chest_xray" / "pneumoniamnist.npz")
    x = torch.from_numpy(data["train_images"][:n].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(data["train_labels"][:n, 0].astype(np.int64))
    return TensorDataset(x, y)


class InPlaceResidualNet(nn.Module):
    """GroupNorm CNN with in-place ReLU and an in-place residual add, as torchvision writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.norm1(self.stem(x)))
        out = self.norm2(self.conv(identity))
        out += identity
        out = self.relu(out)
        return self.head(out.mean(dim=(2, 3)))


def dp_round(model: nn.Module, dataset: TensorDataset, epochs: int = 1) -> tuple[LocalDPRound,
                                                                              nn.Module]:
    """One private local round of ``model`` on ``dataset`` (batch 8)."""
    cfg = compose_config(f"privacy=local_dp privacy.noise_multiplier=1.0 "
                         f"privacy.target_epsilon=null task.local_epochs={epochs} num_rounds=1")
    loader = engine.make_loader(dataset, 8, shuffle=True, seed=0)
    ledger = SiteLedger(Path(tempfile.mkdtemp(prefix="fedclinic-site-")), "site-0", "0" * 64, 1)
    dp = LocalDPRound(cfg, "site-0", ledger, loader, Budget(None, 1e-5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, dp_loader = dp.make_private(model, optimizer)
    engine.train(private, dp_loader, epochs=epochs, optimizer=optimizer,
                 device=torch.device("cpu"), step_on_empty=True)
    return dp, private


def check_sent_weights(dp: LocalDPRound, private: nn.Module, before: dict) -> None:
    spend = dp.finish(1)
    sent = plain_state_dict(private)
    assert list(sent) == list(before)  # the server's keys, in its order: no "_module."
    assert spend["steps"] == dp.steps and spend["epsilon"] > 0
    assert all(torch.isfinite(v).all() for v in sent.values())
    assert any(not torch.equal(sent[k], before[k]) for k in before)  # it did train


def test_in_place_residual_add_falls_back_to_expanded_weights(shared_data):
    data = xray_images(shared_data, 32)
    model = InPlaceResidualNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = engine.make_loader(data, 8, shuffle=True, seed=0)
    assert choose_grad_sample_mode(prepare_model(InPlaceResidualNet()), loader, "auto") == "ew"
    dp, private = dp_round(model, data)
    assert model.relu.inplace is False  # switched off for Opacus; same weights and keys
    check_sent_weights(dp, private, before)


@pytest.mark.parametrize("name", ["cnn", "densenet_small"])
def test_project_image_models_train_privately(shared_data, name):
    image_models = pytest.importorskip("tasks.image_models")
    torch.manual_seed(0)
    # (ResNet-18 works the same way but takes ~10 s here: 11M per-sample gradients)
    if name == "cnn":
        model = image_models.CompactCNN(1, 2, "group", (8, 16))
    else:
        model = image_models.densenet_small(1, 2, "group")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = xray_images(shared_data, 16)
    dp, private = dp_round(model, data)
    check_sent_weights(dp, private, before)


def test_batchnorm_model_is_refused_with_the_fix_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(PrivacyConfigError, match=r"BatchNorm.*task\.norm=group"):
        prepare_model(model)
