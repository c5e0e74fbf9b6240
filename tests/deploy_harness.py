"""A real Flower deployment on 127.0.0.1 for tests: SuperLink (TLS + SuperNode auth) and
hospital SuperNodes, set up only through ``scripts/deploy``, and torn down by PID.

Every process started here (and everything it starts: flower-superexec, flwr-serverapp,
flwr-clientapp) carries the environment variable ``FEDCLINIC_DEPLOY_TAG=<uuid>``, so that
teardown can find and stop each of them by PID and then prove that none is left. Each
top-level process gets its own session (process group), so one hospital can be killed as a
whole, as a crashed machine would be.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "scripts" / "deploy"
PYTHON = sys.executable
TAG_VAR = "FEDCLINIC_DEPLOY_TAG"
CONNECTION = "fedclinic"

# site name -> the hospital's UCI file in shared/data/heart_disease
HEART_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}


def free_port(taken: set[int] | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now and not in ``taken`` (which it joins)."""
    taken = set() if taken is None else taken
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def port_is_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:``port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def deploy_env() -> dict[str, str]:
    """Environment for a test consortium: no runtime installs, no telemetry, unbuffered
    output, this Python's bin folder first on PATH (Flower starts flower-superexec,
    flwr-serverapp and flwr-clientapp by name), and no FLWR_HOME (each process gets its own)."""
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    env.pop("FLWR_HOME", None)
    return env


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.5) -> None:
    """Poll ``check`` until true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(interval)


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours
        return b""


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    stat = _read_proc(pid, "stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"


class ProcessRunner:
    """Start processes in their own sessions with a unique tag; stop all of them by PID."""

    def __init__(self, log_dir: Path, base_env: dict[str, str]) -> None:
        self.tag = uuid.uuid4().hex
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**base_env, TAG_VAR: self.tag}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` (its own process group), output to ``<log_dir>/<name>.log``."""
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})}, cwd=cwd or REPO, start_new_session=True,
            )
        self.procs[name], self.logs[name] = proc, log
        return proc

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        return self.logs[name].read_text(errors="replace")

    def signal_group(self, name: str, sig: int) -> None:
        """Send ``sig`` to the whole process group of ``name`` (a hospital machine)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)

    def tagged_pids(self) -> list[int]:
        """PIDs of live processes carrying this runner's tag (found via /proc/<pid>/environ)."""
        marker = f"{TAG_VAR}={self.tag}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                environ = _read_proc(int(entry.name), "environ")
                if marker in environ.split(b"\0") and _alive(int(entry.name)):
                    pids.append(int(entry.name))
        return sorted(pids)

    def describe(self, pids: list[int]) -> list[str]:
        """``pid: command line`` for each pid (for failure messages)."""
        lines = []
        for pid in pids:
            command = _read_proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid}: {command[:200]}")
        return lines

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM every started group, then every tagged process; SIGKILL what remains."""
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.signal_group(name, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Flower's own children (a detached flower-superexec, flwr-serverapp/-clientapp)
        # leave our process groups or outlive their parent: stop them by PID too.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.tagged_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            try:
                wait_for("tagged processes to exit", lambda: not self.tagged_pids(), 10.0, 0.2)
            except TimeoutError:
                continue
        for proc in self.procs.values():  # reap, so no zombie is left either
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@dataclass
class Federation:
    """One consortium on localhost, set up with scripts/deploy."""

    root: Path
    data_dir: Path
    runner: ProcessRunner
    ports: set[int] = field(default_factory=set)
    link_port: int = 0
    node_ids: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The SuperLink's host:port."""
        return f"127.0.0.1:{self.link_port}"

    @property
    def certs(self) -> Path:
        """Folder with ca.crt, server.pem, server.key."""
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        """Folder with the hospitals' key pairs."""
        return self.root / "keys"

    @property
    def workdir(self) -> Path:
        """The SuperLink's (and so the ServerApp's) working directory."""
        return self.root / "superlink-workdir"

    @property
    def user_home(self) -> Path:
        """FLWR_HOME of the researcher who submits runs (holds config.toml)."""
        return self.root / "flwr-home-user"

    @property
    def registry(self) -> Path:
        """The site registry of node_keys.py: its default, registry.json in FLWR_HOME."""
        return self.user_home / "registry.json"

    def run_script(self, name: str, *args: str | Path, timeout: float = 90
                   ) -> subprocess.CompletedProcess[str]:
        """Run ``scripts/deploy/<name>.py args`` as the coordinating centre (FLWR_HOME)."""
        command = [PYTHON, str(DEPLOY / f"{name}.py"), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**self.runner.env, "FLWR_HOME": str(self.user_home)},
                              check=False)

    def script(self, name: str, *args: str | Path, timeout: float = 90) -> str:
        """Run ``scripts/deploy/<name>.py args``; return its output; AssertionError if it fails."""
        done = self.run_script(name, *args, timeout=timeout)
        assert done.returncode == 0, f"{name} {args} failed:\n{done.stdout}{done.stderr}"
        return done.stdout

    def make_pki(self, sites: list[str], unregistered: list[str]) -> None:
        """CA, SuperLink certificate for 127.0.0.1/localhost, one key pair per site."""
        self.script("pki", "ca", "--out", self.certs)
        self.script("pki", "server", "--ca-dir", self.certs, "--out", self.certs,
                    "--host", "localhost", "--ip", "127.0.0.1")
        for site in [*sites, *unregistered]:
            self.script("node_keys", "create", "--out", self.keys, "--site", site)

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink through scripts/deploy/superlink.py; wait until TLS answers."""
        self.link_port = free_port(self.ports)
        self.runner.start("superlink", [
            PYTHON, str(DEPLOY / "superlink.py"), "--certs", str(self.certs),
            "--state-dir", str(self.root / "superlink-state"), "--workdir", str(self.workdir),
            "--host", "127.0.0.1", "--port", str(self.link_port),
        ], env={"FLWR_HOME": str(self.root / "flwr-home-superlink")})
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))

        def tls_up() -> bool:
            proc = self.runner.procs["superlink"]
            if proc.poll() is not None:
                raise RuntimeError(f"SuperLink exited:\n{self.runner.log('superlink')}")
            try:
                with socket.create_connection(("127.0.0.1", self.link_port), timeout=2) as raw, \
                        context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return True
            except OSError:
                return False

        wait_for("SuperLink TLS endpoint", tls_up, timeout)
        self.script("connection", "--name", CONNECTION, "--address", self.address,
                    "--ca", self.certs / "ca.crt")

    def register(self, sites: list[str]) -> None:
        """Register the sites' public keys (in parallel: each `flwr` call imports Flower)."""
        procs = {
            site: subprocess.Popen(
                [PYTHON, str(DEPLOY / "node_keys.py"), "register", str(self.keys / f"{site}.pub"),
                 "--connection", CONNECTION, "--flwr-home", str(self.user_home)],  # registry too
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.runner.env,
            )
            for site in sites
        }
        for site, proc in procs.items():
            out, _ = proc.communicate(timeout=90)
            assert proc.returncode == 0, f"registering {site} failed:\n{out}"
        registry = json.loads(self.registry.read_text())
        self.node_ids.update({s: int(registry[s]["node_id"]) for s in sites})

    def start_supernode(
        self, name: str, site: str, *, key: Path | None = None, ca: Path | None = None,
        data_path: Path | None = None, extra: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A hospital's SuperNode through scripts/deploy/supernode.py (bounded retries)."""
        command = [
            PYTHON, str(DEPLOY / "supernode.py"), "--superlink", self.address,
            "--ca", str(ca or self.certs / "ca.crt"),
            "--key", str(key or self.keys / site),
            "--data-path", str(data_path or self.data_dir / HEART_FILES[site]),
            "--site-name", site, "--device", "cpu",
            "--runtime-port", str(free_port(self.ports)),
            "--max-retries", "3", "--max-wait-time", "15", *(extra or []),
        ]
        return self.runner.start(name, command,
                                 env={"FLWR_HOME": str(self.root / f"flwr-home-{name}")})

    def wait_connected(self, names: list[str], timeout: float = 90) -> None:
        """Wait until each SuperNode has logged its node id (it is then online)."""
        def connected() -> bool:
            for name in names:
                if self.runner.procs[name].poll() is not None:
                    raise RuntimeError(f"SuperNode {name} exited:\n{self.runner.log(name)}")
            return all("SuperNode ID:" in self.runner.log(n) for n in names)

        wait_for(f"SuperNodes {', '.join(names)} connected", connected, timeout)

    def submit(self, name: str, overrides: str, app: Path = REPO) -> subprocess.Popen[bytes]:
        """``flwr run`` (via scripts/deploy/submit.py --stream) in the background."""
        return self.runner.start(name, [
            PYTHON, str(DEPLOY / "submit.py"), "--connection", CONNECTION, "--stream",
            "--app", str(app), "--overrides", overrides,
        ], env={"FLWR_HOME": str(self.user_home)})

    def zombies(self, program: str) -> list[str]:
        """``pid (parent pid)`` of each zombie among this runner's processes' descendants
        whose name starts like ``program`` (/proc/<pid>/comm holds 15 characters)."""
        roots = {p.pid for p in self.runner.procs.values()}
        parents: dict[int, int] = {}
        states: dict[int, tuple[str, str]] = {}
        for entry in Path("/proc").iterdir():
            stat = _read_proc(int(entry.name), "stat") if entry.name.isdigit() else b""
            if stat:
                comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
                fields = stat.rsplit(b")", 1)[-1].split()
                parents[int(entry.name)] = int(fields[1])
                states[int(entry.name)] = (fields[0].decode(), comm)

        def descends(pid: int) -> bool:
            while pid in parents and pid not in roots and pid > 1:
                pid = parents[pid]
            return pid in roots

        return [f"{pid} (parent {parents[pid]})" for pid, (state, comm) in sorted(states.items())
                if state == "Z" and program[:15].startswith(comm) and descends(pid)]


def run_folder(output_dir: Path) -> Path | None:
    """The single run folder under ``output_dir`` (None while it does not exist)."""
    folders = [p for p in output_dir.glob("*") if p.is_dir()] if output_dir.is_dir() else []
    assert len(folders) <= 1, f"more than one run folder in {output_dir}: {folders}"
    return folders[0] if folders else None


def process_cwd(runner: ProcessRunner, program: str) -> Path | None:
    """Working directory of the tagged process whose command line mentions ``program``."""
    for pid in runner.tagged_pids():
        if program.encode() in _read_proc(pid, "cmdline"):
            try:
                return Path(os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                return None
    return None
