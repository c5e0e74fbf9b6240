"""The run folder: the product's output. Every file is written atomically (temp + rename)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text variant of ``atomic_write_bytes`` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunFolder:
    """One run's folder under ``output_dir``: config, metrics, ledger, plots, model."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._jsonl: dict[str, list[str]] = {}
        self.written: set[str] = set()  # files this process wrote (e.g. has summary.json?)

    @classmethod
    def create(cls, cfg: DictConfig) -> RunFolder:
        """Make a unique ``<output_dir>/<timestamp>_<task>_<strategy>[_<privacy>]``; save config."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        parts = [stamp, cfg.task.name, cfg.strategy.name]
        if cfg.privacy.name != "none":
            parts.append(cfg.privacy.name)
        root = Path(cfg.output_dir).expanduser().resolve()
        base = root / "_".join(parts)
        path, n = base, 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        folder = cls(path)
        folder.write_text("config.yaml", OmegaConf.to_yaml(cfg))
        return folder

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        """An existing run folder (``resume=<folder>``): later writes go on where it stopped."""
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path} is not a run folder (no config.yaml)")
        return cls(path)

    def keep_rounds(self, name: str, last_round: int) -> list[dict[str, Any]]:
        """Drop the lines of a per-round JSON-lines file after ``last_round`` (a resumed run
        redoes them); return the records kept."""
        records = [json.loads(line) for line in self._existing_lines(name) if line.strip()]
        kept = [r for r in records if int(r.get("round", 0)) <= last_round]
        self._jsonl[name] = [json.dumps(r, sort_keys=True) for r in kept]
        if len(kept) != len(records):
            self.write_text(name, "".join(line + "\n" for line in self._jsonl[name]))
        return kept

    def append_chained(self, name: str, record: dict[str, Any]) -> str:
        """Append ``record`` to a hash-chained JSON-lines file (audit.jsonl) with its position
        ``seq`` and ``prev_sha256`` (SHA-256 of the previous line; 64 zeros for the first);
        return the SHA-256 of the new line."""
        lines = self._jsonl.setdefault(name, self._existing_lines(name))
        prev = hashlib.sha256(lines[-1].encode()).hexdigest() if lines else "0" * 64
        self.append_jsonl(name, {**record, "seq": len(lines), "prev_sha256": prev})
        return hashlib.sha256(self._jsonl[name][-1].encode()).hexdigest()

    def chain_head(self, name: str) -> str | None:
        """SHA-256 of the last line of a hash-chained file (None when empty)."""
        lines = self._jsonl.setdefault(name, self._existing_lines(name))
        return hashlib.sha256(lines[-1].encode()).hexdigest() if lines else None

    def write_text(self, name: str, text: str) -> Path:
        """Atomically write a text file inside the run folder."""
        target = self.path / name
        atomic_write_text(target, text)
        self.written.add(name)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        """Atomically write JSON (NaN written as null)."""
        return self.write_text(name, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")

    def append_jsonl(self, name: str, *records: dict[str, Any]) -> Path:
        """Add lines to a JSON-lines file; the whole file is rewritten atomically, once."""
        lines = self._jsonl.setdefault(name, self._existing_lines(name))
        lines.extend(json.dumps(json_safe(r), sort_keys=True) for r in records)
        return self.write_text(name, "\n".join(lines) + "\n")

    def _existing_lines(self, name: str) -> list[str]:
        target = self.path / name
        return target.read_text().splitlines() if target.exists() else []

    def save_model(self, name: str, state_dict: dict[str, Any]) -> Path:
        """Atomically save a torch state_dict (or any dict of tensors, numbers and strings)."""
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        target = self.path / name
        atomic_write_bytes(target, buffer.getvalue())
        return target
