"""A hospital's own privacy ledger: every release of its data, on its own disk, for good.

The ClientApp's ``context.state`` lives in the SuperNode's memory, so a restarted SuperNode
(or a new ``flwr run``) would start its epsilon from zero. This ledger is a JSON-lines file
in the hospital's state folder (node_config ``state-dir``, created by
``scripts/deploy/supernode.py``; in simulation a per-site folder under
``privacy.site_state_dir``, default ``<output_dir>/site_state``), one file per site and data
set (a fingerprint of the data's content), one line per training request:

- read before every round: the history of what was released, ``(noise multiplier, sample
  rate, steps)`` triples, from which epsilon is recomputed with an Opacus accountant;
- appended after every release, before the update leaves the site (a crash in between
  over-counts, never under-counts), atomically (temp file + rename, under a file lock).

Scope (node_config ``privacy-ledger-scope``; in simulation ``privacy.ledger_scope``):
``data`` (default) composes every run on the same data; ``run`` counts only the current
Flower run. Every line says which scope it was written under.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fl_app.run_folder import atomic_write_text
from strategies.budget import STATUS_TRAINED, PrivacyConfigError

STATE_DIR_KEY = "state-dir"  # node_config: the hospital's state folder
SCOPE_KEY = "privacy-ledger-scope"  # node_config: data (default) | run
SCOPES = ("data", "run")
LEDGER_DIR = "privacy_ledger"


class LedgerCorrupt(RuntimeError):
    """The ledger file cannot be read: the site refuses to train rather than guess."""


def ledger_scope(cfg: DictConfig, node_config: dict[str, Any]) -> str:
    """``data`` or ``run``: the hospital's node_config decides; the experiment config only in
    simulation (a real hospital's budget cannot be reset by the server's config)."""
    if SCOPE_KEY in node_config:
        scope = str(node_config[SCOPE_KEY])
    elif "data-path" in node_config:
        scope = "data"
    else:
        scope = cfg.privacy.get("ledger_scope", None) or "data"
    if scope not in SCOPES:
        raise PrivacyConfigError(
            f"privacy ledger scope must be one of {', '.join(SCOPES)}, got '{scope}'"
        )
    return scope


def site_state_dir(cfg: DictConfig, node_config: dict[str, Any], site: str) -> Path:
    """The folder holding this site's privacy ledger (created if missing)."""
    if STATE_DIR_KEY in node_config:
        folder = Path(str(node_config[STATE_DIR_KEY])).expanduser()
    elif "data-path" in node_config:
        raise PrivacyConfigError(
            "this SuperNode has no state-dir in its node_config, so it cannot keep its privacy "
            "ledger across restarts; start it with scripts/deploy/supernode.py --state-dir DIR "
            "(or --node-config '... state-dir=\"/var/lib/fedclinic\"')"
        )
    else:  # simulation: one folder per simulated hospital
        root = cfg.privacy.get("site_state_dir", None) or Path(cfg.output_dir) / "site_state"
        folder = Path(str(root)).expanduser() / _safe(site)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "site"


def data_fingerprint(cfg: DictConfig, site: str, data_path: Path | None) -> str:
    """SHA-256 naming this site's data set.

    Deployment (``data_path``): the content of the file, or of every file under the folder
    (relative names and bytes), so the same patients keep the same ledger whatever the run.
    Simulation: the task, site, data folder, partition and seed that define the partition.
    """
    if data_path is not None:
        return _content_hash(*_listing(Path(data_path).expanduser().resolve()))
    identity = {
        "task": cfg.task.name, "site": site,
        "data_dir": str(cfg.task.get("data_dir", "") or ""),
        "partition": OmegaConf.to_container(cfg.partition, resolve=True)
        if "partition" in cfg else None,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _listing(path: Path) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = tuple((str(p.relative_to(path) if p != path else p.name), p.stat().st_size,
                   p.stat().st_mtime_ns) for p in files)
    return str(path), stats


@lru_cache(maxsize=16)
def _content_hash(root: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    # cached per (path, names, sizes, mtimes): re-hashed only when the files change
    path = Path(root)
    digest = hashlib.sha256()
    for name, _size, _mtime in stats:
        digest.update(name.encode() + b"\0")
        digest.update((path if path.is_file() else path / name).read_bytes())
    return digest.hexdigest()


class SiteLedger:
    """The privacy ledger of one site and data set (see the module docstring)."""

    def __init__(self, folder: Path, site: str, fingerprint: str, run_id: int,
                 scope: str = "data") -> None:
        self.site, self.fingerprint, self.run_id, self.scope = site, fingerprint, run_id, scope
        self.path = folder / LEDGER_DIR / f"{_safe(site)}-{fingerprint[:16]}.jsonl"

    def lines(self) -> list[dict[str, Any]]:
        """Every line, oldest first."""
        if not self.path.exists():
            return []
        out = []
        for number, text in enumerate(self.path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:
                raise LedgerCorrupt(f"{self.path} line {number} is not JSON; this site will "
                                    "not train until its privacy officer repairs it") from None
        return out

    def in_scope(self) -> list[dict[str, Any]]:
        """The lines that count for this run's epsilon (all of them under scope ``data``)."""
        lines = self.lines()
        return lines if self.scope == "data" else [x for x in lines if x["run"] == self.run_id]

    def history(self) -> list[tuple[float, float, int]]:
        """The (noise multiplier, sample rate, steps) of every release in scope."""
        return [(float(x["noise_multiplier"]), float(x["sample_rate"]), int(x["steps"]))
                for x in self.in_scope()
                if x["status"] == STATUS_TRAINED and int(x.get("steps") or 0) > 0]

    def epsilon(self, delta: float, accountant: str) -> float:
        """Epsilon spent so far (in scope) at ``delta``."""
        from strategies.accounting import epsilon  # Opacus: only when a site uses DP

        return epsilon(self.history(), delta, accountant)

    def run_noise_multiplier(self, mechanism: str) -> float | None:
        """The noise multiplier this run already trained with (kept across a restart)."""
        for line in reversed(self.lines()):
            if (line["run"] == self.run_id and line["mechanism"] == mechanism
                    and line["status"] == STATUS_TRAINED):
                return float(line["noise_multiplier"])
        return None

    def append(self, **fields: Any) -> dict[str, Any]:
        """Add one line (site, fingerprint, run, scope and time are filled in); return it."""
        line = {"site": self.site, "fingerprint": self.fingerprint, "run": self.run_id,
                "scope": self.scope, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        with self._locked():
            old = self.path.read_text() if self.path.exists() else ""
            if old and not old.endswith("\n"):
                old += "\n"
            atomic_write_text(self.path, old + json.dumps(line, sort_keys=True) + "\n")
        return line

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # two SuperNodes sharing a state folder must not lose each other's lines
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
