"""fedclinic strategies: one factory, ``build(cfg, ...)``, from config to a Flower strategy.

``build`` is imported on first use: the ClientApp imports client-side helpers from this
package (clipping mod, FedBN mod, site privacy) and must not pay for the server-side factory
and its imports (Opacus accountants) in every ``flwr-clientapp`` process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strategies.factory import build

__all__ = ["build"]


def __getattr__(name: str) -> Any:
    if name == "build":
        from strategies.factory import build

        return build
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
