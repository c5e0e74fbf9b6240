"""A real Flower deployment for tests: the coordinating centre (SuperLink on loopback behind
the Caddy front door, TLS + SuperNode auth) and hospital SuperNodes, set up only through
``scripts/deploy``, and torn down by PID.

Where Linux network namespaces can be made (root, ``ip``), every machine is its own namespace
(``Hosts``): the centre, each hospital, an outsider, joined by veth pairs on a bridge inside the
centre's namespace, with private addresses that exist only inside these namespaces; so
"reachable" means what it means between hosts. Elsewhere everything runs on 127.0.0.1
(``Federation(hosts=None)``).

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
CONNECTION = "fedclinic"  # the centre's own route: the SuperLink's loopback Control API
PUBLIC_CONNECTION = "fedclinic-public"  # the public port (the front door): Fleet API only
CENTRE, OUTSIDER = "centre", "outsider"  # host names (namespaces) besides the hospitals
SUBNET = "10.231.0"  # exists only inside the namespaces Hosts creates

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


def _ip(*args: str) -> None:
    """Run ``ip args``; RuntimeError with its message if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """Machines as network namespaces: the centre holds a bridge (``SUBNET``.1/24); every
    other host gets a veth pair into it and its own address. Names carry the creating
    process's PID so parallel runs do not collide; ``remove`` deletes them all."""

    def __init__(self) -> None:
        self.prefix = f"fc{os.getpid()}"
        self.namespaces: dict[str, str] = {}
        self.addresses: dict[str, str] = {}

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why namespaces cannot be made here (None if they can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"fc{os.getpid()}-probe"
        try:
            _ip("netns", "add", probe)
        except (RuntimeError, OSError) as err:
            return f"cannot create a network namespace: {err}"
        _ip("netns", "del", probe)
        return None

    def add(self, host: str) -> str:
        """Create ``host``'s namespace (the centre first), linked to the bridge; its address."""
        if host in self.namespaces:
            return self.addresses[host]
        name = f"{self.prefix}-{host}"[:64]
        _ip("netns", "add", name)
        self.namespaces[host] = name
        _ip("-n", name, "link", "set", "lo", "up")
        if not self.addresses:  # the centre: the bridge and the public address
            _ip("-n", name, "link", "add", "br0", "type", "bridge")
            _ip("-n", name, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
            _ip("-n", name, "link", "set", "br0", "up")
            self.addresses[host] = f"{SUBNET}.1"
            return self.addresses[host]
        centre = next(iter(self.namespaces.values()))
        index = len(self.addresses)
        port = f"v{index}"
        _ip("-n", centre, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", name)
        _ip("-n", centre, "link", "set", port, "master", "br0", "up")
        self.addresses[host] = f"{SUBNET}.{10 + index}"
        _ip("-n", name, "addr", "add", f"{self.addresses[host]}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        return self.addresses[host]

    def prefix_for(self, host: str) -> list[str]:
        """Command prefix that runs a program on ``host`` (``ip netns exec`` keeps the PID)."""
        self.add(host)
        return ["ip", "netns", "exec", self.namespaces[host]]

    def listening(self) -> dict[str, list[str]]:
        """Host -> its listening TCP/UDP sockets (``ss``), for hosts that have any."""
        found = {}
        for host, name in self.namespaces.items():
            done = subprocess.run(["ip", "netns", "exec", name, "ss", "-Htulnp"],
                                  capture_output=True, text=True, timeout=30, check=False)
            lines = [line for line in done.stdout.splitlines() if line.strip()]
            if lines:
                found[host] = lines
        return found

    def remove(self) -> None:
        """Delete every namespace made here (their links and addresses go with them)."""
        for name in reversed(list(self.namespaces.values())):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", name)
        self.namespaces.clear()
        self.addresses.clear()


@dataclass
class Federation:
    """One consortium, set up with scripts/deploy: on separate hosts (network namespaces,
    ``hosts``) or all on 127.0.0.1 (``hosts=None``)."""

    root: Path
    data_dir: Path
    runner: ProcessRunner
    ports: set[int] = field(default_factory=set)
    link_port: int = 0  # the SuperLink, on the centre's loopback (Control API: centre only)
    public_port: int = 0  # the front door (Caddy), Fleet API only
    node_ids: dict[str, int] = field(default_factory=dict)
    hosts: Hosts | None = None

    @property
    def public_host(self) -> str:
        """The centre's address as hospitals see it."""
        return self.hosts.add(CENTRE) if self.hosts is not None else "127.0.0.1"

    @property
    def address(self) -> str:
        """The public host:port hospitals dial (the proxy)."""
        return f"{self.public_host}:{self.public_port}"

    @property
    def control_address(self) -> str:
        """The SuperLink itself, reachable only on the centre's own loopback."""
        return f"127.0.0.1:{self.link_port}"

    @property
    def state_dir(self) -> Path:
        """The SuperLink's state folder (state.db, secret, Caddyfile, PID file)."""
        return self.root / "superlink-state"

    def on(self, host: str, command: list[str]) -> list[str]:
        """``command`` as run on machine ``host`` (unchanged on loopback)."""
        return (self.hosts.prefix_for(host) if self.hosts is not None else []) + command

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
        """The site registry: node_keys.py's registry (``FEDCLINIC_REGISTRY`` points every
        script here), kept in the SuperLink's working directory so that the runs'
        ``site_registry=registry.json`` finds it."""
        return self.workdir / "registry.json"

    def run(self, command: list[str], host: str = CENTRE, timeout: float = 90,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on ``host`` as the researcher (their FLWR_HOME); wait for it."""
        return subprocess.run(self.on(host, command), capture_output=True, text=True,
                              timeout=timeout, check=False, env=self.user_env)

    @property
    def user_env(self) -> dict[str, str]:
        """Environment of the centre's and the researcher's commands."""
        return {**self.runner.env, "FLWR_HOME": str(self.user_home),
                "FEDCLINIC_REGISTRY": str(self.registry)}

    def run_script(self, name: str, *args: str | Path, timeout: float = 90,
                   host: str = CENTRE) -> subprocess.CompletedProcess[str]:
        """Run ``scripts/deploy/<name>.py args`` on ``host`` (default: the centre)."""
        return self.run([PYTHON, str(DEPLOY / f"{name}.py"), *map(str, args)], host, timeout)

    def script(self, name: str, *args: str | Path, timeout: float = 90,
               host: str = CENTRE) -> str:
        """``run_script``'s output; AssertionError if it fails."""
        done = self.run_script(name, *args, timeout=timeout, host=host)
        assert done.returncode == 0, f"{name} {args} failed:\n{done.stdout}{done.stderr}"
        return done.stdout

    def make_pki(self, sites: list[str], unregistered: list[str]) -> None:
        """CA, SuperLink certificate for the centre's public address (pki.py adds loopback),
        one key pair per site."""
        self.script("pki", "ca", "--out", self.certs)
        self.script("pki", "server", "--ca-dir", self.certs, "--out", self.certs,
                    "--host", "localhost", "--ip", self.public_host)
        for site in [*sites, *unregistered]:
            self.script("node_keys", "create", "--out", self.keys, "--site", site)

    def start_superlink(self, timeout: float = 90) -> None:
        """Start the centre through scripts/deploy/superlink.py (proxy + SuperLink + SuperExec)
        on its host; wait until it reports both listening; write two connection entries:
        ``CONNECTION`` (the centre's loopback) and ``PUBLIC_CONNECTION`` (the front door)."""
        self.link_port, self.public_port = free_port(self.ports), free_port(self.ports)
        self.runner.start("superlink", self.on(CENTRE, [
            PYTHON, str(DEPLOY / "superlink.py"), "--certs", str(self.certs),
            "--state-dir", str(self.state_dir), "--workdir", str(self.workdir),
            "--host", self.public_host, "--port", str(self.public_port),
            "--link-port", str(self.link_port),
        ]), env={"FLWR_HOME": str(self.root / "flwr-home-superlink")})

        def up() -> bool:
            if self.runner.procs["superlink"].poll() is not None:
                raise RuntimeError(f"superlink.py exited:\n{self.runner.log('superlink')}")
            return "fedclinic: front door" in self.runner.log("superlink")

        wait_for("the centre (proxy + SuperLink)", up, timeout)
        self.script("connection", "--name", CONNECTION, "--address", self.control_address,
                    "--ca", self.certs / "ca.crt")
        self.script("connection", "--name", PUBLIC_CONNECTION, "--address", self.address,
                    "--ca", self.certs / "ca.crt")

    def stop_superlink(self) -> str:
        """``superlink.py --stop`` on the centre: proxy, SuperLink and SuperExec end together."""
        return self.script("superlink", "--stop", "--state-dir", self.state_dir)

    def register(self, sites: list[str]) -> None:
        """Register the sites' public keys from the centre (in parallel: each `flwr` call
        imports Flower; node_keys.py locks the registry)."""
        procs = {
            site: subprocess.Popen(
                self.on(CENTRE, [PYTHON, str(DEPLOY / "node_keys.py"), "register",
                                 str(self.keys / f"{site}.pub"), "--connection", CONNECTION]),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.user_env,
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
        data_path: Path | None = None, extra: list[str] | None = None, host: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """A hospital's SuperNode through scripts/deploy/supernode.py (bounded retries), on
        the hospital's machine ``host`` (default: one per site), dialling the front door."""
        command = [
            PYTHON, str(DEPLOY / "supernode.py"), "--superlink", self.address,
            "--ca", str(ca or self.certs / "ca.crt"),
            "--key", str(key or self.keys / site),
            "--data-path", str(data_path or self.data_dir / HEART_FILES[site]),
            "--site-name", site, "--device", "cpu",
            "--runtime-port", str(free_port(self.ports)),
            "--state-dir", str(self.root / f"supernode-state-{name}"),
            "--max-retries", "3", "--max-wait-time", "15", *(extra or []),
        ]
        return self.runner.start(name, self.on(host or site, command),
                                 env={"FLWR_HOME": str(self.root / f"flwr-home-{name}")})

    def wait_connected(self, names: list[str], timeout: float = 90) -> None:
        """Wait until each SuperNode has logged its node id (it is then online)."""
        def connected() -> bool:
            for name in names:
                if self.runner.procs[name].poll() is not None:
                    raise RuntimeError(f"SuperNode {name} exited:\n{self.runner.log(name)}")
            return all("SuperNode ID:" in self.runner.log(n) for n in names)

        wait_for(f"SuperNodes {', '.join(names)} connected", connected, timeout)

    def submit(self, name: str, overrides: str, app: Path = REPO, *, host: str = CENTRE,
               connection: str = CONNECTION) -> subprocess.Popen[bytes]:
        """``flwr run`` (via scripts/deploy/submit.py --stream) in the background, by default
        through the centre's own route (its loopback Control API)."""
        return self.runner.start(name, self.on(host, [
            PYTHON, str(DEPLOY / "submit.py"), "--connection", connection, "--stream",
            "--app", str(app), "--overrides", overrides,
        ]), env={"FLWR_HOME": str(self.user_home)})

    def teardown(self) -> tuple[list[str], list[str]]:
        """Stop everything (the centre with ``superlink.py --stop``, the rest by PID), delete
        the namespaces; return (processes still running, ports still bound) — both empty when
        all is well."""
        if "superlink" in self.runner.procs and self.runner.procs["superlink"].poll() is None:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop_superlink()
        self.runner.stop_all()
        leftovers = self.runner.describe(self.runner.tagged_pids())
        if self.hosts is not None:
            bound = [f"{host}: {line}" for host, lines in self.hosts.listening().items()
                     for line in lines]
            self.hosts.remove()
        else:
            bound = [str(p) for p in sorted(self.ports) if not port_is_free(p)]
        return leftovers, bound

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
