"""Helpers shared by the deployment scripts: errors for people, Flower executables, files."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

# Every process started by these scripts inherits this: the SuperLink would otherwise run
# `uv sync` before each run and download the app's dependencies (torch with CUDA, ...).
NO_RUNTIME_INSTALL_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
# No quiet egress: Flower otherwise reports usage events to Flower's telemetry server and
# checks PyPI for updates from every SuperLink, SuperNode, SuperExec and CLI call.
NO_EGRESS_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
SECRET_BYTES = 32


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: this Python's bin folder first on PATH, because the
    SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name; runtime dependency installation, telemetry and the update
    check off (these win over the caller's environment)."""
    env = {**os.environ, **(extra or {}), **NO_RUNTIME_INSTALL_ENV, **NO_EGRESS_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class DeployError(RuntimeError):
    """A deployment step that cannot go on, with a message meant for the operator."""


def fail(message: str, code: int = 2) -> None:
    """Print ``message`` as one clear error (no traceback) and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def flower_executable(name: str) -> str:
    """Path of a Flower command (``flwr``, ``flower-superlink``, ...).

    Prefer the one next to the running Python (the project's virtual environment), so the
    scripts work without activating it; else search PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(
            f"'{name}' not found next to {sys.executable} or on PATH: install the project "
            "(pip install -e .) or activate its virtual environment"
        )
    return found


def require_file(path: Path, what: str) -> Path:
    """``path`` resolved, or DeployError naming ``what`` is missing."""
    path = path.expanduser()
    if not path.is_file():
        raise DeployError(f"{what} not found: {path}")
    return path.resolve()


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (private key) readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # also when the file existed with wider permissions


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it owner-only (0700); return it resolved."""
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path.resolve()


def ensure_secret(path: Path) -> Path:
    """The SuperExec shared secret at ``path``: created once (random, 0600), reused after;
    an existing file is narrowed to 0600. DeployError if it exists but is empty."""
    path = path.expanduser()
    if not path.exists():
        write_private(path, secrets.token_hex(SECRET_BYTES).encode())
    elif path.stat().st_size == 0:
        raise DeployError(f"{path} is empty; delete it and a new secret is generated")
    os.chmod(path, 0o600)
    return path.resolve()


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key), mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """DeployError if any of ``paths`` exists and ``force`` is not set."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DeployError(
            f"{', '.join(existing)} already exist(s); pass --force to replace (see "
            "docs/deployment.md, 'Rotating keys and certificates')"
        )


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (also ``[v6]:port``) -> (host, port); DeployError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeployError(f"address '{address}' must be host:port, e.g. superlink.example.org:9093")
    return host.strip("[]"), int(port)


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:  # type: ignore[type-arg]
    """SIGTERM ``proc`` if it still runs, wait up to ``grace_s``, then SIGKILL; reaped after."""
    if proc.poll() is None:
        proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def child_processes(parent: int) -> list[tuple[int, str, str]]:
    """``(pid, comm, state)`` of ``parent``'s child processes, read from /proc (Linux).

    ``comm`` is the kernel's (at most 15 characters) process name; ``state`` is ``Z`` for an
    exited child nobody has waited for yet (a zombie).
    """
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        state, ppid = stat[stat.rfind(")") + 2:].split()[:2]
        if int(ppid) == parent:
            children.append((int(entry.name), comm, state))
    return children
