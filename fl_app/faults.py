"""Fault injection for simulation: make chosen sites misbehave to see what the safeguards do.

The ``faults`` config maps a site name to one fault (``+faults.site-1=scale:100
+faults.site-3=nan``). Every fault acts on the site's *training* in the rounds it names:

- ``nan`` / ``inf``: the first value of every floating-point array of the update is NaN / +Inf;
- ``wrong_shape``: the update's first array is one element longer along its last axis;
- ``scale:<factor>``: the update (site model minus global model) is multiplied by factor;
- ``label_flip``: the site trains on flipped labels (class c becomes num_classes - 1 - c);
- ``crash:<round>``: the ClientApp raises when asked to train in that round;
- ``timeout:<round>``: in that round it sleeps ``round_timeout_s`` + 2 s before training, so
  its reply comes after the server stopped waiting.

Faults exist for simulation only. The server refuses a ``faults`` config when any site runs
in deployment (its SuperNode's node_config names data-path/site-name instead of the
simulation's partition-id), and ``fault_mod`` refuses again on the site itself, so a hospital
never corrupts its own update because an experiment config asked it to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from torch.utils.data import Dataset

from fl_app.config_json import from_json
from fl_app.site_runtime import CONFIG_KEY, site_ref
from tasks import get_task

REPLY_FAULTS = ("nan", "inf", "wrong_shape", "scale")
KINDS = (*REPLY_FAULTS, "label_flip", "crash", "timeout")
ARRAYS_KEY = "arrays"
# How long past round_timeout_s a ``timeout`` site sleeps (its reply must come too late).
TIMEOUT_MARGIN_S = 2.0


class FaultConfigError(ValueError):
    """A ``faults`` entry that cannot be used (unknown kind or site, or deployment)."""


class InjectedCrash(RuntimeError):
    """Raised by a site configured with ``crash:<round>`` in that round."""


@dataclass(frozen=True)
class Fault:
    """One site's fault: its kind and argument (scale factor or round)."""

    kind: str
    arg: float | None = None

    def __str__(self) -> str:
        if self.arg is None:
            return self.kind
        return f"{self.kind}:{int(self.arg) if self.kind in ('crash', 'timeout') else self.arg:g}"

    def acts_in(self, server_round: int) -> bool:
        """Whether the fault acts in ``server_round`` (crash/timeout act in one round)."""
        return self.kind not in ("crash", "timeout") or int(self.arg or 0) == server_round


def parse(site: str, spec: Any) -> Fault:
    """Read one ``faults`` value; FaultConfigError naming the site when it is not a fault.

    The schema types ``faults`` values as strings (Hydra would read a bare ``nan`` or
    ``inf`` as a float; ``str`` of those floats is the same word).
    """
    text = str(spec).strip()
    kind, _, arg = text.partition(":")
    usage = ("nan, inf, wrong_shape, scale:<factor>, label_flip, crash:<round> or "
             "timeout:<round>")
    if kind not in KINDS:
        raise FaultConfigError(f"faults.{site}='{text}' is not a fault; use {usage}")
    if kind in ("scale", "crash", "timeout"):
        try:
            value = float(arg)
        except ValueError:
            raise FaultConfigError(
                f"faults.{site}='{text}': {kind} needs a number after the colon, e.g. "
                f"{kind}:{100 if kind == 'scale' else 2}"
            ) from None
        if kind == "scale" and not math.isfinite(value):
            raise FaultConfigError(f"faults.{site}='{text}': the scale factor must be finite")
        if kind != "scale" and (not value.is_integer() or value < 1):
            raise FaultConfigError(f"faults.{site}='{text}': the round must be a whole number >= 1")
        return Fault(kind, value)
    if arg:
        raise FaultConfigError(f"faults.{site}='{text}': {kind} takes no argument; use {usage}")
    return Fault(kind)


def configured(cfg: Any) -> dict[str, Fault]:
    """The parsed ``faults`` of ``cfg`` (site -> Fault); {} when none."""
    entries = cfg.get("faults") if hasattr(cfg, "get") else None
    return {str(site): parse(str(site), spec) for site, spec in dict(entries or {}).items()}


def check(cfg: Any, sites: Mapping[str, bool]) -> dict[str, Fault]:
    """Server side: refuse faults for unknown sites or in deployment; return the faults.

    ``sites`` maps each site of the run to whether it runs in simulation.
    """
    faults = configured(cfg)
    if not faults:
        return faults
    unknown = sorted(set(faults) - set(sites))
    if unknown:
        raise FaultConfigError(
            f"faults name unknown site(s) {', '.join(unknown)}; the sites are "
            f"{', '.join(sorted(sites))}"
        )
    deployed = sorted(s for s, simulated in sites.items() if not simulated)
    if deployed:
        raise FaultConfigError(
            f"faults are for simulation only, and site(s) {', '.join(deployed)} run in "
            "deployment; remove the faults entries"
        )
    return faults


def in_simulation(node_config: Mapping[str, Any]) -> bool:
    """Whether a SuperNode is simulated: partition-id, no deployment data-path/site-name."""
    return "partition-id" in node_config and not (
        "data-path" in node_config or "site-name" in node_config
    )


def corrupt(fault: Fault, arrays: ArrayRecord, global_arrays: ArrayRecord) -> ArrayRecord:
    """The update ``arrays`` as a site with ``fault`` would send it (reply faults only)."""
    out: dict[str, Array] = {}
    first = True
    for key in arrays:
        values = arrays[key].numpy()
        floating = values.dtype.kind == "f"
        if fault.kind in ("nan", "inf") and floating and values.size:
            values = values.copy()
            values.flat[0] = np.nan if fault.kind == "nan" else np.inf
        elif fault.kind == "wrong_shape" and first:
            shape = (*values.shape[:-1], values.shape[-1] + 1) if values.ndim else (2,)
            values = np.resize(values, shape)
        elif fault.kind == "scale" and floating and key in global_arrays:
            start = global_arrays[key].numpy()
            values = (start + float(fault.arg or 0) * (values - start)).astype(values.dtype)
        out[key] = Array(np.ascontiguousarray(values))
        first = False
    return ArrayRecord(out)


class FlippedLabels(Dataset):
    """A dataset of (x, y) pairs with every label y replaced by ``num_classes - 1 - y``."""

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        self.dataset = dataset
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[index]
        flipped = self.num_classes - 1 - y
        return x, flipped.to(y.dtype) if isinstance(y, torch.Tensor) else flipped


def training_data(cfg: Any, site: str, dataset: Dataset, num_classes: int) -> Dataset:
    """The dataset ``site`` trains on: with flipped labels under ``label_flip``."""
    fault = configured(cfg).get(site)
    if fault is not None and fault.kind == "label_flip":
        return FlippedLabels(dataset, num_classes)
    return dataset


def _round_of(msg: Message) -> int:
    for record in msg.content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])
    return 0


def _config_json(msg: Message) -> str | None:
    for record in msg.content.config_records.values():
        if CONFIG_KEY in record:
            return str(record[CONFIG_KEY])
    return None


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train mod: inject this site's configured fault (simulation only), else pass through."""
    text = _config_json(msg)
    cfg = from_json(text) if text else None
    faults = configured(cfg) if cfg is not None else {}
    if not faults:
        return call_next(msg, context)
    if not in_simulation(context.node_config):
        raise FaultConfigError("faults are for simulation only; this SuperNode runs in "
                               "deployment and does not inject them")
    site = site_ref(cfg, get_task(cfg.task.name), context.node_config).name
    fault = faults.get(site)
    server_round = _round_of(msg)
    if fault is None or not fault.acts_in(server_round):
        return call_next(msg, context)
    if fault.kind == "crash":
        raise InjectedCrash(f"injected fault {fault} at {site}")
    if fault.kind == "timeout":
        time.sleep(cfg.round_timeout_s + TIMEOUT_MARGIN_S)
    reply = call_next(msg, context)
    if fault.kind in REPLY_FAULTS and not reply.has_error() and ARRAYS_KEY in reply.content:
        reply.content[ARRAYS_KEY] = corrupt(fault, reply.content[ARRAYS_KEY],
                                            msg.content[ARRAYS_KEY])
    return reply


def describe(faults: Mapping[str, Fault]) -> Iterable[str]:
    """One ``site=fault`` string per configured fault (for the run's log)."""
    return (f"{site}={fault}" for site, fault in sorted(faults.items()))
