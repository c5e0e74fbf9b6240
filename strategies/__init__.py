"""fedclinic strategies: one factory, ``build(cfg, ...)``, from config to a Flower strategy."""

from strategies.factory import build

__all__ = ["build"]
