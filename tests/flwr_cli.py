"""Helpers for tests that drive the real `flwr` CLI against a local simulation SuperLink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.deploy_harness import free_port

VENV_BIN = Path(sys.executable).parent


def flwr_env(flwr_home: Path, port: int) -> dict[str, str]:
    """Environment for an isolated `flwr run`: own FLWR_HOME, own ports, no runtime installs."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FEDCLINIC_PORT": str(port),
        "VENV": str(VENV_BIN.parent),
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def superlink_pids(port: int) -> list[int]:
    """PIDs of live flower-superlink processes serving ``port``."""
    out = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}( |$)"],
                         capture_output=True, text=True, check=False).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        if state != "Z":  # a zombie is already dead
            pids.append(pid)
    return pids


def stop_superlink(port: int, grace_s: float = 10.0) -> None:
    """Terminate (then kill) the SuperLink on ``port`` and wait until it is gone."""
    for pid in superlink_pids(port):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while superlink_pids(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in superlink_pids(port):
        os.kill(pid, signal.SIGKILL)
