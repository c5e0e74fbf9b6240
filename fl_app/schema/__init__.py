"""The typed schema of the experiment config (Hydra structured configs).

Each yaml option under ``conf/<group>/`` names its schema first in its defaults list
(``defaults: [<option>_schema, _self_]``); the schema is a dataclass in
``fl_app/schema/<group>.py`` listed in that module's ``SCHEMAS``. ``conf/config.yaml`` names
``config_schema`` (:class:`fl_app.schema.top.Config`). OmegaConf then rejects wrong types,
unknown keys and missing values while Hydra composes; the yaml files keep the values.

Add a key: a field ``name: type = MISSING`` in the option's dataclass, and its value (with a
comment) in the yaml. Add a group option: a dataclass in ``fl_app/schema/<group>.py``, an
entry in its ``SCHEMAS``, and ``defaults: [<option>_schema, _self_]`` in the new yaml.
"""

from __future__ import annotations

from types import ModuleType

from hydra.core.config_store import ConfigStore

from fl_app.schema import (
    contribution,
    partition,
    personalize,
    privacy,
    secagg,
    strategy,
    task,
    top,
    tracking,
)

# One module per config group: its SCHEMAS maps "<option>_schema" -> dataclass.
GROUPS: dict[str, ModuleType] = {
    "task": task,
    "strategy": strategy,
    "privacy": privacy,
    "secagg": secagg,
    "partition": partition,
    "tracking": tracking,
    "personalize": personalize,
    "contribution": contribution,
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: a second store replaces)."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=top.Config)
    for group, module in GROUPS.items():
        for name, node in module.SCHEMAS.items():
            store.store(group=group, name=name, node=node)
