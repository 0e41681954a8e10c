"""`ortft federate local`: a whole federation on this machine, with Flower's own deployment runtime.

Starts Flower's SuperLink and one SuperNode per shard as separate processes, each in its own process
group, every one listening on 127.0.0.1 at ports chosen at run time; runs the app with `flwr run`;
stops every group at the end (also on errors and Ctrl-C). FLWR_HOME is a temporary folder; Flower's
runtime dependency installation stays off (the app is the installed ortft package).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FederationConfig, default_of
from ..errors import ConfigError, RunError
from ..fsutil import write_text_atomic
from .appdir import toml_table, write_app

LOOPBACK = "127.0.0.1"
CONNECTION = "ortft-local"
# Every process of a local federation carries this in its environment (inherited by the helpers Flower
# starts). Flower starts `flower-superexec` in a new session (its own process group), so stopping our
# groups is not enough: the marker finds those helpers, and the apps they run, to stop them too.
MARKER = "ORTFT_FEDERATION"
ROLE = "ORTFT_FEDERATION_ROLE"


def marked_processes(marker: str | None, role: str | None = None) -> list[int]:
    """PIDs whose environment holds MARKER=marker (any marker if None: every local federation's) and ROLE=role
    if given; Linux /proc only."""
    prefix = f"{MARKER}=".encode()
    wanted = prefix + marker.encode() if marker is not None else None
    wanted_role = f"{ROLE}={role}".encode() if role else None
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        marked = wanted in environ if wanted is not None else any(item.startswith(prefix) for item in environ)
        if marked and (wanted_role is None or wanted_role in environ):
            found.append(int(entry.name))
    return found


def stop_marked(marker: str, role: str | None = None, grace: float = 5.0) -> None:
    """SIGTERM the process groups of every marked process, wait up to `grace` s, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        pids = marked_processes(marker, role)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(pid), sig)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and marked_processes(marker, role):
            time.sleep(0.2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RunError(f"{what} exited with code {process.returncode} while starting", hint="see its log in the run folder's logs/")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise RunError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:.0f} s", hint="see its log in the run folder's logs/")


def _bin(name: str) -> str:
    """A console script of this environment (flower-superlink, flower-supernode, flwr)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"Flower's `{name}` is not installed", hint="pip install 'ortft[federated]'")
    return found


@dataclass
class Node:
    name: str
    config_file: Path
    port: int
    log_path: Path
    process: subprocess.Popen | None = None


@dataclass
class LocalCluster:
    """SuperLink + SuperNodes on loopback. Use as a context manager: every process group is stopped on exit."""

    work: Path
    log_dir: Path
    env: dict = field(default_factory=dict)
    marker: str = ""
    superlink_port: int = 0
    superlink: subprocess.Popen | None = None
    nodes: list[Node] = field(default_factory=list)
    others: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, log_dir: Path) -> LocalCluster:
        work = Path(tempfile.mkdtemp(prefix="ortft-flwr-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        cluster = cls(work=work, log_dir=log_dir)
        home = work / "flwr-home"
        home.mkdir()
        cluster.superlink_port = free_port()
        write_text_atomic(home / "config.toml",
                          f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                          f'address = "{LOOPBACK}:{cluster.superlink_port}"\ninsecure = true\n')
        cluster.marker = uuid.uuid4().hex
        # Flower's processes find each other's console scripts (flower-superexec, ...) on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        cluster.env = dict(os.environ, FLWR_HOME=str(home), PYTHONUNBUFFERED="1", PATH=path, **{MARKER: cluster.marker})
        return cluster

    def _spawn(self, argv: list[str], log_path: Path, role: str) -> subprocess.Popen:
        handle = open(log_path, "ab")
        try:
            # Own session = own process group: stopping the group also stops the flower-superexec
            # helpers (and the ServerApp/ClientApp processes) that a SuperLink or SuperNode starts.
            return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(self.env, **{ROLE: role}), cwd=self.work, start_new_session=True)
        finally:
            handle.close()

    def start_superlink(self) -> None:
        argv = [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                "--database", ":flwr-in-memory:", "--host", LOOPBACK, "--port", str(self.superlink_port)]
        self.superlink = self._spawn(argv, self.log_dir / "superlink.log", "superlink")
        wait_for_port(self.superlink_port, self.superlink, "the SuperLink")

    def add_node(self, name: str, node_config: dict) -> Node:
        config_file = self.work / f"node-{len(self.nodes)}-{name}.toml"
        write_text_atomic(config_file, toml_table(node_config))
        node = Node(name=name, config_file=config_file, port=free_port(), log_path=self.log_dir / f"supernode-{name}.log")
        self.nodes.append(node)
        return node

    def start_node(self, node: Node) -> None:
        # The SuperNode's own API (for its ClientApp processes) listens on 127.0.0.1 at a free port; it
        # installs no dependencies at run time (that needs --allow-runtime-dependency-installation).
        node.port = free_port()
        argv = [_bin("flower-supernode"), "--insecure", "--superlink", f"{LOOPBACK}:{self.superlink_port}",
                "--host", LOOPBACK, "--port", str(node.port), "--node-config", str(node.config_file)]
        node.process = self._spawn(argv, node.log_path, f"supernode-{node.name}")

    def kill_node(self, node: Node, sig: int = signal.SIGKILL) -> None:
        """Stop a SuperNode and everything it started (its superexec helper, its ClientApp), like a device dying."""
        stop_group(node.process, sig=sig, grace=0.0 if sig == signal.SIGKILL else 5.0)
        stop_marked(self.marker, f"supernode-{node.name}", grace=0.0 if sig == signal.SIGKILL else 5.0)

    def kill_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Stop the SuperLink and what it started (its superexec helper, the ServerApp)."""
        stop_group(self.superlink, sig=sig, grace=0.0 if sig == signal.SIGKILL else 5.0)
        stop_marked(self.marker, "superlink", grace=0.0 if sig == signal.SIGKILL else 5.0)

    def run_app(self, app_dir: Path, run_config: dict, log_name: str = "flwr-run.log") -> subprocess.Popen:
        config_file = self.work / f"run-config-{len(self.others)}.toml"
        write_text_atomic(config_file, toml_table(run_config))
        argv = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(config_file)]
        process = self._spawn(argv, self.log_dir / log_name, "flwr-run")
        self.others.append(process)
        return process

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in [self.superlink, *(n.process for n in self.nodes), *self.others] if p is not None]

    def stop(self) -> None:
        for process in reversed(self.processes()):
            stop_group(process)
        stop_marked(self.marker)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_group(process: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal a process's whole group, wait up to `grace` s, then SIGKILL the group."""
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=grace if grace > 0 else 1.0)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group's other members (superexec helpers, apps)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5.0)


@dataclass
class LocalSettings:
    bundle: str
    shards: list[str]
    out: str
    valid: list[str] | None = None
    valid_fraction: float | None = None
    node_bundles: list[str] | None = None  # per shard; default: the server's bundle
    threads: int | None = None
    min_nodes: int | None = None  # default: every shard
    run_config: dict = field(default_factory=dict)  # rounds, local-steps, strategy, lr, ... (FederationConfig's run-config keys)


def node_configs(settings: LocalSettings) -> list[tuple[str, dict]]:
    if not settings.shards:
        raise ConfigError("give at least one --shard")
    if settings.valid and len(settings.valid) != len(settings.shards):
        raise ConfigError(f"{len(settings.valid)} --valid files for {len(settings.shards)} --shard files",
                          hint="give one --valid per --shard (same order), or --valid-fraction")
    if settings.valid and settings.valid_fraction:
        raise ConfigError("give --valid or --valid-fraction, not both")
    names: list[str] = []
    result = []
    for index, shard in enumerate(settings.shards):
        name = Path(shard).stem or f"shard{index}"
        if name in names:
            name = f"{name}-{index}"
        names.append(name)
        config = {"partition-id": index, "name": name, "data": str(Path(shard).resolve()),
                  "bundle": str(Path((settings.node_bundles or [settings.bundle] * len(settings.shards))[index]).resolve())}
        if settings.valid:
            config["valid"] = str(Path(settings.valid[index]).resolve())
        if settings.valid_fraction:
            config["valid-fraction"] = float(settings.valid_fraction)
        if settings.threads:
            config["threads"] = int(settings.threads)
        result.append((name, config))
    return result


def server_run_config(settings: LocalSettings) -> dict:
    config = dict(settings.run_config)
    config["bundle"] = str(Path(settings.bundle).resolve())
    config["out"] = str(Path(settings.out).resolve())
    config["min-nodes"] = int(settings.min_nodes or len(settings.shards))
    return config


def run_local(settings: LocalSettings, echo=print) -> dict:
    """The whole local federation; returns the last round's metrics record."""
    from .. import run as runs
    from . import require_flower
    from .runfolder import read_rounds

    require_flower()
    out = Path(settings.out)
    resume = bool(settings.run_config.get("resume"))
    if not resume and runs.is_run_dir(out):
        raise RunError(f"{out} already holds a run", hint="continue it with --resume, or choose another --out")
    nodes = node_configs(settings)
    run_config = server_run_config(settings)
    rounds = int(run_config.get("rounds", default_of(FederationConfig, "rounds")))
    out.mkdir(parents=True, exist_ok=True)
    with LocalCluster.create(out / "logs") as cluster:
        app_dir = write_app(cluster.work / "app")
        cluster.start_superlink()
        echo(f"SuperLink on {LOOPBACK}:{cluster.superlink_port} (FLWR_HOME={cluster.env['FLWR_HOME']})")
        for name, config in nodes:
            cluster.start_node(cluster.add_node(name, config))
            echo(f"SuperNode {name}: {config['data']}")
        process = cluster.run_app(app_dir, run_config)
        process.wait()
    records = [r for r in read_rounds(out) if r.get("event") in ("round", "base")]
    done = max((r["round"] for r in records), default=0)
    if done < rounds:
        raise RunError(f"the federation stopped after round {done} of {rounds}",
                       hint=f"see {out / 'logs'} (flwr-run.log, superlink.log, supernode-*.log); --resume continues")
    return records[-1]
