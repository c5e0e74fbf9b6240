"""Local (sample-level) differential privacy at a site: DP-SGD with Opacus.

Each hospital trains with per-sample gradient clipping, Gaussian noise and Poisson sampling
(Opacus ``PrivacyEngine``). The noise multiplier is either given or calibrated once, at the
site's first round, for the WHOLE planned run (``num_rounds`` x ``local_epochs`` epochs). The
accountant's history lives in the site's persistent ledger (``strategies.site_ledger``), so
the epsilon a site reports covers every round it trained in, across SuperNode restarts and
(ledger scope ``data``) earlier runs on the same data.
"""

from __future__ import annotations

import copy
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig
from opacus import GradSampleModule, PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, default_collate

from strategies.accounting import AccountantState, calibrate_noise
from strategies.budget import STATUS_EXHAUSTED, STATUS_TRAINED, Budget, PrivacyConfigError
from strategies.site_ledger import SiteLedger

OPACUS_PREFIX = "_module."
# Opacus warnings that say nothing about this run's guarantee (see the field guide, sec. 4)
_QUIET = (
    "Secure RNG turned off",
    "Optimal order is the largest alpha",
    "Full backward hook is firing",
    "Using a non-full backward hook",
)
# Opacus's hooks make torch warn on each backward of a model whose input needs no gradient;
# harmless (per-sample gradients come from the module outputs), and repeated by every site.
warnings.filterwarnings("ignore", message=".*Full backward hook is firing when gradients.*")
# grad_sample_mode chosen by ``auto`` per model class (the probe costs one small backward pass)
_MODE_CACHE: dict[str, str] = {}


@contextmanager
def quiet_opacus() -> Iterator[None]:
    """Silence Opacus's known-harmless warnings (and only those)."""
    with warnings.catch_warnings():
        for text in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{text}.*")
        yield


def prepare_model(model: nn.Module) -> nn.Module:
    """Make ``model`` trainable by Opacus without changing its weights or state_dict keys.

    In-place activations are switched off (Opacus's backward hooks need their inputs). A
    model Opacus cannot handle (e.g. BatchNorm, which mixes samples in a batch) is refused
    with the validator's reasons: replacing layers here would change the model the server
    aggregates, so the task must build a DP-ready model (GroupNorm: ``task.norm=group``).
    """
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = "; ".join(sorted({str(e) for e in errors}))
        raise PrivacyConfigError(
            f"privacy=local_dp cannot train {type(model).__name__}: {reasons}. Use a model "
            "without BatchNorm (for the imaging tasks: task.norm=group)"
        )
    return model


def choose_grad_sample_mode(model: nn.Module, loader: DataLoader, requested: str) -> str:
    """``requested``, or for ``auto``: Opacus hooks, unless the model breaks them.

    Hooks fail on in-place residual adds (``out += identity``) with "a view ... is being
    modified inplace"; expanded weights (``ew``) compute the same per-sample gradients
    without hooks, so ``auto`` probes hooks once per model class and falls back to ``ew``.
    """
    if requested != "auto":
        return requested
    key = f"{type(model).__module__}.{type(model).__qualname__}"
    if key not in _MODE_CACHE:
        _MODE_CACHE[key] = _probe_hooks(model, loader)
    return _MODE_CACHE[key]


def _probe_hooks(model: nn.Module, loader: DataLoader) -> str:
    dataset = loader.dataset
    batch = default_collate([dataset[i] for i in range(min(2, len(dataset)))])  # type: ignore[arg-type]
    x, y = batch[0], batch[1]
    probe = GradSampleModule(copy.deepcopy(model).cpu())
    try:
        with quiet_opacus():
            nn.functional.cross_entropy(probe(x), y).backward()
    except RuntimeError as err:
        if "inplace" not in str(err) and "view" not in str(err):
            raise
        return "ew"
    finally:
        probe._close()
    return "hooks"


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the keys the server knows (Opacus's ``_module.`` removed)."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        while key.startswith(OPACUS_PREFIX):
            key = key[len(OPACUS_PREFIX):]
        out[key] = value.detach().cpu()
    return out


def _secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    # DP noise and Poisson sampling must not be reproducible from anything public (the run's
    # seed is in config.yaml): seed a generator from the OS's entropy instead.
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class LocalDPRound:
    """One site's DP-SGD for one round: plan, budget check, private training, spend.

    Built from the site's ordinary (non-private) train loader and its persistent ledger
    (``strategies.site_ledger``); ``refused`` says whether this round would break the site's
    budget; ``make_private`` wraps model, optimizer and loader with Opacus; ``finish`` appends
    the round's steps to the ledger and returns the spend the site reports.
    """

    def __init__(self, cfg: DictConfig, site: str, ledger: SiteLedger, loader: DataLoader,
                 budget: Budget, device: torch.device | None = None) -> None:
        p = cfg.privacy
        self.cfg, self.site, self.ledger, self.budget = cfg, site, ledger, budget
        self.secure = bool(p.get("secure_mode", False))
        # secure_mode: Opacus's own CSPRNG (torchcsprng) for both noise and sampling
        self.sampler_generator = None if self.secure else _secret_generator()
        self.noise_generator = None if self.secure else _secret_generator(device or "cpu")
        # Poisson sampling: each example joins each batch with probability 1/len(loader).
        # Opacus accounts with sample_rate = 1/len(dp_loader), which is >= the sampler's
        # probability (int() rounding can drop one step per epoch), i.e. on the safe side.
        self.base_loader = loader
        self.loader = DPDataLoader.from_data_loader(loader, generator=self.sampler_generator)
        self.sample_rate = 1.0 / len(self.loader)
        self.steps = cfg.task.local_epochs * len(self.loader)
        self.max_grad_norm = float(p.max_grad_norm)
        # everything this site released so far (this and earlier runs, restarts included)
        self.state = AccountantState(accountant=str(p.accountant), delta=float(p.target_delta),
                                     history=ledger.history())
        self.state.rounds = sum(1 for x in ledger.in_scope() if x["status"] == STATUS_TRAINED)
        self.state.noise_multiplier = (ledger.run_noise_multiplier("local_dp")
                                       or self._noise_multiplier())
        self.noise_multiplier = float(self.state.noise_multiplier)
        self.engine: PrivacyEngine | None = None

    def _noise_multiplier(self) -> float:
        p = self.cfg.privacy
        if p.get("noise_multiplier") is not None:
            return float(p.noise_multiplier)
        # calibrated once for the whole planned run: every round this site can train
        planned = self.cfg.num_rounds * self.steps
        with quiet_opacus():
            return calibrate_noise(float(p.target_epsilon), float(p.target_delta),
                                   self.sample_rate, planned, str(p.accountant))

    @property
    def projected_epsilon(self) -> float:
        """Epsilon (at the budget's delta) the site would have spent after this round."""
        with quiet_opacus():
            return self.state.epsilon_after(self.noise_multiplier, self.sample_rate, self.steps,
                                            delta=self.budget.delta)

    def refused(self) -> bool:
        """Whether training this round would exceed the site's budget."""
        return self.budget.epsilon is not None and self.budget.exceeded_by(self.projected_epsilon)

    def make_private(self, model: nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Opacus-wrapped model, optimizer and Poisson loader for this round."""
        model = prepare_model(model)
        mode = choose_grad_sample_mode(model, self.loader, self.cfg.privacy.grad_sample_mode)
        with quiet_opacus():
            self.engine = PrivacyEngine(accountant=self.cfg.privacy.accountant,
                                        secure_mode=self.secure)
        # the site's history so far: Opacus's optimizer hook appends this round's steps
        self.engine.accountant.history = list(self.state.history)
        with quiet_opacus():
            private = self.engine.make_private(
                module=model, optimizer=optimizer,
                data_loader=self.base_loader if self.secure else self.loader,
                noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                poisson_sampling=self.secure,  # else self.loader already samples (our generator)
                noise_generator=self.noise_generator, grad_sample_mode=mode,
            )
        return private[0], private[1], private[-1]

    def finish(self, server_round: int) -> dict[str, Any]:
        """Adopt the accountant's history, append it to the ledger, return the round's spend."""
        if self.engine is None:
            raise RuntimeError("finish() before make_private()")
        steps = self.state.record(list(self.engine.accountant.history))
        if steps != self.steps:
            raise RuntimeError(
                f"DP-SGD took {steps} steps instead of the planned {self.steps}: every Poisson "
                "batch (empty ones too) must be a step for the accounting to hold"
            )
        spend = self.spend(STATUS_TRAINED, steps)
        self._log(server_round, spend)
        return spend

    def refusal(self, server_round: int) -> dict[str, Any]:
        """The spend a site reports when it refuses to train (budget exhausted)."""
        spend = self.spend(STATUS_EXHAUSTED, 0)
        spend["reason"] = (
            f"training round {self.state.rounds + 1} would bring epsilon to "
            f"{self.projected_epsilon:.4f} > budget {self.budget.epsilon} "
            f"(delta {self.budget.delta:g})"
        )
        self._log(server_round, spend)
        return spend

    def spend(self, status: str, steps: int) -> dict[str, Any]:
        """The ledger fields of this site for this round (epsilon: all rounds so far)."""
        with quiet_opacus():
            eps = self.state.epsilon()
        return {
            "status": status, "mechanism": "local_dp",
            "noise_multiplier": self.noise_multiplier, "clipping_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate, "steps": steps, "epsilon": eps,
            "delta": self.state.delta, "accountant": self.state.accountant,
            "rounds_trained": self.state.rounds,
            "budget_epsilon": self.budget.epsilon,
            # the whole history behind epsilon, so the server can recompute it
            "history": [list(step) for step in self.state.history],
        }

    def _log(self, server_round: int, spend: dict[str, Any]) -> None:
        own = ("status", "mechanism", "noise_multiplier", "clipping_norm", "sample_rate",
               "steps", "epsilon", "delta", "accountant", "reason")
        self.ledger.append(round=server_round, **{k: spend[k] for k in own if k in spend})
