"""Keep the run log readable: the experiment config is printed once, briefly, by fedclinic.

Flower's ``Strategy.start`` logs the train and evaluate ConfigRecords in full. Ours carry the
whole resolved config and the federated feature statistics as JSON (~3 kB each), so every
run log printed them twice. While ``brief_config_records()`` is active, those two log lines
name the keys instead; the full config is ``config.yaml`` and the statistics ``sites.json``
in the run folder, and fedclinic's own ``fedclinic: task=... strategy=...`` line sums it up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.common.logger import FLOWER_LOGGER

from fl_app.site_runtime import CONFIG_KEY, STATS_KEY

# What Flower's log_strategy_start_info prints (flwr/serverapp/strategy/strategy_utils.py)
CONFIG_RECORD_LINE = "ConfigRecord ("
BRIEF = (f"{{'{CONFIG_KEY}': <the experiment config: config.yaml in the run folder>, "
         f"'{STATS_KEY}': <feature statistics: sites.json in the run folder>}}")


class BriefConfigRecords(logging.Filter):
    """Shorten the ConfigRecord lines of Flower's strategy summary that hold our config."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's argument in place; never drop a record."""
        if (isinstance(record.msg, str) and CONFIG_RECORD_LINE in record.msg
                and isinstance(record.args, tuple) and len(record.args) == 1
                and f"'{CONFIG_KEY}': " in str(record.args[0])):
            record.args = (BRIEF,)
        return True


@contextmanager
def brief_config_records() -> Iterator[None]:
    """Shorten Flower's ConfigRecord log lines while the block runs (see module docstring)."""
    brief = BriefConfigRecords()
    FLOWER_LOGGER.addFilter(brief)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(brief)
