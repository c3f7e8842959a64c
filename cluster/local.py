"""A real multi-node Ray cluster on one machine, for tests and benchmarks: a head and workers started
as separate `ray start --block` child processes, each in its own process group, with its own temp dir
and its own ports, so it never touches another Ray cluster on the machine. `stop()` ends exactly the
process groups it started (never `ray stop`, which ends every Ray process of the user)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from offside.errors import OffsideError

WORKER_PORTS_PER_NODE = 60
MARKER_ENV = "OFFSIDE_LOCAL_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(size: int, taken: set[int]) -> tuple[int, int]:
    """A run of `size` free ports that avoids `taken` (worker ports must be a contiguous range)."""
    for _ in range(200):
        start = random.randrange(20000, 60000 - size)
        ports = range(start, start + size)
        if not taken.intersection(ports) and all(_port_free(p) for p in ports):
            taken.update(ports)
            return start, start + size - 1
    raise OffsideError(f"no {size} consecutive free ports found")


@dataclass
class LocalCluster:
    """`auth_token`: None starts the cluster with RAY_AUTH_MODE=disabled, a string with token auth."""

    auth_token: str | None = None
    object_store_bytes: int = 150 * 1024**2
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="offray-", dir="/tmp")))
    processes: list[subprocess.Popen] = field(default_factory=list)
    dashboard_port: int = 0
    gcs_port: int = 0
    _taken: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        """The Jobs API / dashboard URL."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        """The environment of every node (and of clients that talk to it)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env["RAY_AUTH_MODE"] = "token" if self.auth_token else "disabled"
        if self.auth_token:
            env["RAY_AUTH_TOKEN"] = self.auth_token
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Ray code that looks for "the" cluster (e.g. Train's placement-group cleaner) would otherwise
        # find every Ray instance on the machine and give up.
        env["RAY_ADDRESS"] = self.gcs_address
        env[MARKER_ENV] = str(self.temp_dir)  # inherited by every process of this cluster, jobs included
        # the job driver and its workers find this interpreter's scripts first
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _ports(self) -> list[str]:
        ports = {name: self._port() for name in ("node-manager", "object-manager", "dashboard-agent-listen",
                                                 "dashboard-agent-grpc", "metrics-export", "runtime-env-agent")}
        low, high = free_port_range(WORKER_PORTS_PER_NODE, self._taken)
        flags = [f"--{name}-port={port}" for name, port in ports.items()]
        return [*flags, f"--min-worker-port={low}", f"--max-worker-port={high}"]

    def _port(self) -> int:
        port = free_port()
        while port in self._taken:
            port = free_port()
        self._taken.add(port)
        return port

    def _start(self, name: str, args: list[str], attempts: int = 2) -> None:
        """Starts one node and waits until the cluster has it. `ray start` gives a raylet 30 s to
        register, which a loaded machine can miss: a node that exits during start-up is retried."""
        ray = str(Path(sys.executable).parent / "ray")
        for attempt in range(1, attempts + 1):
            log = open(self.temp_dir / f"{name}.log", "ab")
            cmd = [ray, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                   f"--object-store-memory={self.object_store_bytes}", *self._ports(), *args]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
            self.processes.append(proc)
            try:
                self.wait_for_nodes(len(self.processes))
                return
            except OffsideError:
                if proc.poll() is None or attempt == attempts:
                    raise
                self.processes.remove(proc)
                _end_group(proc)

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> "LocalCluster":
        self.gcs_port, self.dashboard_port = self._port(), self._port()
        self._start("head", ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir / 'ray'}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={self._port()}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                             f"--resources={json.dumps(resources or {})}"])
        return self

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> "LocalCluster":
        name = f"worker{len(self.processes)}"
        # A node of its own temp dir: nodes sharing one would share runtime-env dirs, and one node's
        # garbage collection would delete a working dir another node's job is running in.
        self._start(name, [f"--address={self.gcs_address}", f"--temp-dir={self.temp_dir / name}", f"--num-cpus={num_cpus}",
                           "--num-gpus=0", f"--resources={json.dumps(resources or {})}"])
        return self

    def _get(self, path: str):
        request = urllib.request.Request(self.address + path)
        if self.auth_token:
            request.add_header("Authorization", f"Bearer {self.auth_token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict]:
        """Alive nodes as the dashboard reports them (node id, resources)."""
        data = self._get("/nodes?view=summary")["data"]["summary"]
        return [n for n in data if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise OffsideError(f"ray start exited with {proc.returncode}; see {self.temp_dir}/*.log")
            try:
                if len(self.nodes()) >= count:
                    return
            except (OSError, KeyError, ValueError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        raise OffsideError(f"Ray cluster did not reach {count} nodes in {timeout_s:.0f}s; see {self.temp_dir}/*.log")

    def stop(self) -> None:
        """Ends the process groups this cluster started, workers first, then any stray process of this
        cluster that left the group (job drivers and workers run in sessions of their own)."""
        for proc in reversed(self.processes):
            _end_group(proc)
        for pid in _pids_of(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.processes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _end_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _pids_of(temp_dir: str) -> list[int]:
    """Processes whose command line names the cluster's temp dir or whose environment carries its
    marker; only this user's processes are readable."""
    marker = f"{MARKER_ENV}={temp_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (entry / "cmdline").read_bytes() or marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
