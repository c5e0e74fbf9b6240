"""Opacus grad_sample modes on the project's models: every mode clips the same gradients.

``grad_sample_mode: auto`` (the default) trains with Opacus hooks, the fastest correct mode
for our models (``python -m benchmarks.dp_step``: ghost clipping and functorch are slower for
the GroupNorm CNN, expanded weights slower still). These tests check correctness, never
speed: with zero noise, the clipped and averaged per-sample gradient of one real batch is the
same in every mode, and the privacy accounting does not depend on the mode.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.dp_step import clipped_gradient
from fl_app.config import compose_config
from strategies.accounting import add_steps, epsilon
from strategies.budget import Budget
from strategies.local_dp import LocalDPRound, choose_grad_sample_mode, prepare_model
from strategies.site_ledger import SiteLedger
from tasks import engine
from tasks.image_models import CompactCNN, densenet_small
from tasks.tabular import build_model as tabular_model

MODES = ("ew", "functorch", "ghost")


def xray_batch(shared_data: Path, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real PneumoniaMNIST films (1x28x28 in [0, 1]) and their labels."""
    data = np.load(shared_data / "chest_xray" / "pneumoniamnist.npz")
    x = torch.from_numpy(data["train_images"][:n].astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(data["train_labels"][:n, 0].astype(np.int64))


def heart_batch(shared_data: Path, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` standardised rows of a real heart-disease hospital (Cleveland) and labels."""
    from fl_app.centralized import load_sites

    cfg = compose_config(f"task=heart_disease task.data_dir={shared_data / 'heart_disease'}")
    site = load_sites(cfg)[0]
    rows = [site.train[i] for i in range(n)]
    return torch.stack([r[0] for r in rows]), torch.stack([torch.as_tensor(r[1]) for r in rows])


def image_models() -> dict[str, nn.Module]:
    """The chest X-ray task's CNN (its default widths) and the small MONAI DenseNet."""
    torch.manual_seed(0)
    return {"cnn": CompactCNN(1, 2, "group", (16, 32, 64)),
            "densenet_small": densenet_small(1, 2, "group")}


def test_chest_xray_cnn_clips_the_same_gradients_in_every_mode(shared_data):
    batch = xray_batch(shared_data)
    model = prepare_model(image_models()["cnn"])
    hooks = clipped_gradient(model, batch, "hooks")
    assert hooks.abs().sum() > 0  # a real gradient, not an all-zero vector
    for mode in MODES:
        torch.testing.assert_close(clipped_gradient(model, batch, mode), hooks,
                                   rtol=1e-4, atol=1e-6, msg=mode)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_tabular_models_clip_the_same_gradients_in_every_mode(shared_data, kind):
    from omegaconf import OmegaConf

    x, y = heart_batch(shared_data)
    torch.manual_seed(0)
    cfg = OmegaConf.create({"task": {"model": kind, "hidden_size": 32}})
    model = prepare_model(tabular_model(cfg, {"num_features": x.shape[1], "num_classes": 2}))
    hooks = clipped_gradient(model, (x, y), "hooks")
    for mode in MODES:
        torch.testing.assert_close(clipped_gradient(model, (x, y), mode), hooks,
                                   rtol=1e-4, atol=1e-6, msg=mode)


def test_auto_picks_hooks_for_the_project_models(shared_data):
    x, y = xray_batch(shared_data, 4)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    for name, model in image_models().items():
        assert choose_grad_sample_mode(prepare_model(model), loader, "auto") == "hooks", name


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_a_private_round_spends_the_accountants_epsilon_in_every_mode(shared_data, mode):
    # a mode changes how per-sample gradients are computed, never what the site reports
    x, y = xray_batch(shared_data, 32)
    cfg = compose_config(f"privacy=local_dp privacy.noise_multiplier=1.0 "
                         f"privacy.target_epsilon=null privacy.grad_sample_mode={mode} "
                         "task.local_epochs=1 num_rounds=1")
    loader = engine.make_loader(TensorDataset(x, y), 8, shuffle=True, seed=0)
    ledger = SiteLedger(Path(tempfile.mkdtemp(prefix="fedclinic-site-")), "site-0", "0" * 64, 1)
    dp = LocalDPRound(cfg, "site-0", ledger, loader, Budget(None, 1e-5))
    torch.manual_seed(0)
    model = CompactCNN(1, 2, "group", (8, 16))
    private, optimizer, dp_loader = dp.make_private(model, torch.optim.SGD(model.parameters(),
                                                                            lr=0.1))
    engine.train(private, dp_loader, epochs=1, optimizer=optimizer,
                 device=torch.device("cpu"), step_on_empty=True)
    spend = dp.finish(1)
    expected = epsilon(add_steps([], 1.0, dp.sample_rate, dp.steps), 1e-5, "rdp")
    assert spend["steps"] == dp.steps == 4
    assert spend["epsilon"] == pytest.approx(expected, rel=1e-9)
