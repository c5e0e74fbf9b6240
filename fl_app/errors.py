"""Errors shared by the server and the sites, importable without Hydra (a site's ClientApp
process imports only what every message needs)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used, with a message meant for the person who wrote it."""
