#!/usr/bin/env python3
"""Flower's ``flower-superexec`` for a hospital's SuperNode, with finished ClientApps reaped.

    python scripts/deploy/superexec.py --insecure --runtime-api-address 127.0.0.1:9094 \\
        --parent-pid <flower-supernode pid>

Takes exactly ``flower-superexec``'s arguments (``supernode.py`` starts it next to
``flower-supernode --isolation process``). Flower 1.42's SuperExec starts one
``flwr-clientapp`` process per message and never waits for it, so every finished one stays a
zombie until the next one starts. Here a thread reaps each exited ``flwr-clientapp`` child by
PID (only those: no other child's exit status is taken from Flower).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_processes

CLIENTAPP_COMM = "flwr-clientapp"  # /proc/<pid>/comm of Flower's ClientApp process
REAP_INTERVAL_S = 0.5


def exited_clientapps(parent: int) -> list[int]:
    """PIDs of ``parent``'s children that are exited ``flwr-clientapp`` processes (zombies)."""
    return [
        pid for pid, comm, state in child_processes(parent)
        if state == "Z" and CLIENTAPP_COMM.startswith(comm)
    ]


def reap_once() -> list[int]:
    """Reap this process's exited flwr-clientapp children; return their PIDs."""
    reaped = []
    for pid in exited_clientapps(os.getpid()):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
    return reaped


def reap_forever(interval_s: float = REAP_INTERVAL_S) -> None:
    """``reap_once`` every ``interval_s`` seconds."""
    while True:
        reap_once()
        time.sleep(interval_s)


def main() -> None:
    """Start the reaper, then run Flower's SuperExec with this command line's arguments."""
    from flwr.supercore.cli import flower_superexec

    threading.Thread(target=reap_forever, name="clientapp-reaper", daemon=True).start()
    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
