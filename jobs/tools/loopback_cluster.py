"""A real multi-node Ray cluster on one machine, loopback only (tests and benchmarks).

    python -m jobs.tools.loopback_cluster up      # prints the addresses; Ctrl-C tears it down

Head on 127.0.0.2, workers on 127.0.0.3, 127.0.0.4, ... (all of 127.0.0.0/8 reaches ``lo`` on Linux), each a
separate raylet with its own object store, started with ``ray start`` and every port chosen free and bound to
that node's loopback address. A private ``--temp-dir`` keeps it apart from any other Ray on the machine.

Teardown never uses ``ray stop`` (that kills every Ray process of the user, other people's clusters
included): every process the cluster spawns inherits a marker environment variable, and teardown signals
exactly the pids that carry it.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "AUDIOARC_LOOPBACK_CLUSTER"
# Not 127.0.0.1: with multi-node enabled, Ray replaces a "localhost" node IP (127.0.0.1, ::1) with the machine's
# routable address (services.resolve_ip_for_localhost), so the head would advertise a real interface.
HEAD_IP = "127.0.0.2"
RAY = str(Path(sys.executable).with_name("ray"))


def free_port(host: str, avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid and port < 60000:
            avoid.add(port)
            return port


def free_range(host: str, n: int, avoid: set[int]) -> tuple[int, int]:
    for _ in range(200):
        lo = random.randrange(20000, 29000)
        ports = range(lo, lo + n)
        if any(p in avoid for p in ports):
            continue
        ok = True
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            avoid.update(ports)
            return lo, lo + n - 1
    raise RuntimeError("no free worker port range")


def _node_ports(host: str, used: set[int]) -> list[str]:
    lo, hi = free_range(host, 60, used)
    args = []
    for opt in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"):
        args += [opt, str(free_port(host, used))]
    return args + ["--min-worker-port", str(lo), "--max-worker-port", str(hi)]


@dataclass
class LoopbackCluster:
    workers: int = 1
    cpus_per_node: int = 2
    memory_bytes: int = 2 << 30
    object_store_bytes: int = 200 << 20
    temp_dir: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    env: dict = field(default_factory=dict)
    worker_ips: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def _ray(self, *args: str, timeout: float = 180, **env) -> None:
        r = subprocess.run([RAY, *args], env=dict(self.env, **env), capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args[:2])} failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}")

    def start(self) -> "LoopbackCluster":
        self.temp_dir = self.temp_dir or tempfile.mkdtemp(prefix="aarc-", dir="/tmp")  # short: socket paths
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
                        # "0" here disables multi-node clusters on every OS (ray_constants.ENABLE_RAY_CLUSTER)
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
                        # token auth with a per-cluster token in the environment (never ~/.ray/auth_token)
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        **{MARKER: self.temp_dir})
        self.env.pop("RAY_ADDRESS", None)
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        # the cluster must get the code from the job's runtime env, not from this checkout on PYTHONPATH
        root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in self.env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and os.path.realpath(p) != root)
        used: set[int] = set()
        self.gcs_port = free_port(HEAD_IP, used)
        self.dashboard_port = free_port(HEAD_IP, used)
        common = ["--num-cpus", str(self.cpus_per_node), "--num-gpus", "0", "--memory", str(self.memory_bytes),
                  "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats"]
        try:
            self._ray("start", "--head", "--node-ip-address", HEAD_IP, "--port", str(self.gcs_port),
                      "--dashboard-host", HEAD_IP, "--dashboard-port", str(self.dashboard_port),
                      "--include-dashboard", "true", "--ray-client-server-port", str(free_port(HEAD_IP, used)),
                      "--temp-dir", self.temp_dir, *common, *_node_ports(HEAD_IP, used))
            # NOTE: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (needed for a second node) Ray 2.60's gRPC servers
            # listen on all interfaces even with --node-ip-address 127.x; with "0" on the head the worker cannot
            # join. Token auth (random per-cluster token) guards them; tear down promptly.
            for i in range(self.workers):
                ip = f"127.0.0.{3 + i}"
                self._ray("start", "--address", self.address, "--node-ip-address", ip, *common,
                          *_node_ports(ip, used))
                self.worker_ips.append(ip)
            self.wait_nodes(1 + self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def nodes(self) -> list[dict]:
        """Alive nodes, from the state API (no driver connection)."""
        import json
        import urllib.request
        req = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=1000&detail=1",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.load(r)["data"]["result"]
        rows = data["result"] if isinstance(data, dict) else data
        return [n for n in rows if n.get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        t = time.time()
        while True:
            try:
                nodes = self.nodes()
                if len(nodes) >= n:
                    return nodes
            except Exception as e:  # noqa: BLE001 - dashboard still starting
                nodes, err = [], e
            if time.time() - t > timeout:
                raise TimeoutError(f"{len(nodes)} of {n} nodes alive after {timeout:.0f} s "
                                   f"({locals().get('err')!r})")
            time.sleep(1)

    def pids(self) -> list[int]:
        """Every live process of this cluster (they all inherit the marker variable)."""
        want = f"{MARKER}={self.temp_dir}".encode()
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if want in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:
                continue
        return out

    def raylet_pid(self, ip: str) -> int:
        for pid in self.pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"/raylet") and f"--node_ip_address={ip}".encode() in cmd:
                return pid
        raise LookupError(f"no raylet for {ip}")

    def kill_node(self, ip: str) -> int:
        pid = self.raylet_pid(ip)
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self, grace: float = 10) -> None:
        if not self.temp_dir:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            t = time.time()
            while self.pids() and time.time() - t < grace:
                time.sleep(0.2)
        left = self.pids()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"loopback cluster processes still alive: {left}")

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["up"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args(argv)
    with LoopbackCluster(workers=a.workers, cpus_per_node=a.cpus) as c:
        print(f"GCS {c.address}  dashboard/jobs {c.dashboard}  temp {c.temp_dir}  workers {c.worker_ips}",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
