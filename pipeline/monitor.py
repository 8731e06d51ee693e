"""Local monitoring: fetch a standalone Prometheus (Debian package, unpacked, not installed as a service),
discover a local job's endpoints, start Prometheus (and Grafana when installed) pointed at them.

Endpoints of a local job (see dashboards/README.md):
* the encode driver's job metrics (``encode --metrics-port``), advertised in
  ``<ray session>/audioarc_driver_sd.json`` while the job runs;
* each Ray node's metrics agent (``ray.nodes()[i]["MetricsExportPort"]``), advertised in Ray's
  ``<ray session>/prom_metrics_service_discovery.json`` (written by Ray's dashboard head, or by the
  driver for a local node started without it).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("AUDIOARC_CACHE", Path.home() / ".cache" / "audioarc"))
CHECKOUT_DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"  # beside pipeline/ in a checkout
DRIVER_SD = "audioarc_driver_sd.json"
RAY_SD = "prom_metrics_service_discovery.json"


def dashboards_dir() -> Path:
    """The dashboards/ folder (alert rules, Grafana provisioning and dashboard) that ``audioarc monitor`` uses:
    ``$AUDIOARC_DASHBOARDS`` when set, else the one beside ``pipeline/`` in a source checkout. It is not part of
    the installed package, so an installed audioarc needs the variable (or a checkout)."""
    env = os.environ.get("AUDIOARC_DASHBOARDS")
    d = Path(env).expanduser() if env else CHECKOUT_DASHBOARDS
    if not (d / "alerts.yml").is_file():
        from .errors import ConfigError
        where = f"AUDIOARC_DASHBOARDS={env}" if env else f"{d} (beside pipeline/ in a source checkout)"
        raise ConfigError(f"no audioarc dashboards folder at {where}: it holds alerts.yml and the Grafana "
                          f"provisioning; set AUDIOARC_DASHBOARDS to the dashboards/ folder of an audioarc checkout")
    return d


# -- the Prometheus binary ------------------------------------------------------------------------
def fetch_prometheus(cache_dir: Path | str | None = None) -> Path:
    """Directory holding ``prometheus`` and ``promtool``: PATH, the cache, or Debian's package unpacked
    into the cache (``apt-get download prometheus && dpkg-deb -x``; runs ``apt-get update`` once if the
    package is unknown). Raises RuntimeError with the reason when none can be had."""
    on_path = shutil.which("prometheus"), shutil.which("promtool")
    if all(on_path):
        return Path(on_path[0]).parent
    root = Path(cache_dir) if cache_dir else CACHE / "prometheus"
    bindir = root / "usr" / "bin"
    if (bindir / "prometheus").exists() and (bindir / "promtool").exists():
        return bindir
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError("prometheus not found and no apt-get/dpkg-deb to fetch it; put prometheus and "
                           "promtool on PATH")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        def download():
            return subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True,
                                  text=True, timeout=300)
        r = download()
        if r.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            r = download()
        debs = glob.glob(os.path.join(tmp, "prometheus_*.deb"))
        if r.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download prometheus failed: {r.stderr.strip()[-500:]}")
        subprocess.run(["dpkg-deb", "-x", debs[0], str(root)], check=True, timeout=300)
    if not (bindir / "prometheus").exists():
        raise RuntimeError(f"{debs[0]} did not contain usr/bin/prometheus")
    return bindir


# -- discovery ------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def ray_session_dir() -> Path | None:
    """The session dir of the Ray node this process is connected to (None if not connected)."""
    try:
        import ray
        if not ray.is_initialized():
            return None
        return Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
    except Exception:  # noqa: BLE001
        return None


def ray_metrics_targets() -> list[str]:
    """host:port of every alive Ray node's metrics agent (connected process only)."""
    import ray
    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
            if n.get("Alive", n.get("alive")) and n.get("MetricsExportPort", -1) > 0]


def advertise(driver_url: str, job_id: str) -> list[Path]:
    """Called by the encode driver: write file_sd files into the Ray session dir (the driver endpoint, and
    Ray's node endpoints when Ray's dashboard head does not). Returns the files it wrote (to remove)."""
    sess = ray_session_dir()
    if sess is None:
        return []
    written = []
    u = urllib.parse.urlparse(driver_url)
    p = sess / DRIVER_SD
    _write_json_atomic(p, [{"targets": [u.netloc]}])
    written.append(p)
    rp = sess / RAY_SD
    targets = ray_metrics_targets()
    if targets and not rp.exists():
        _write_json_atomic(rp, [{"labels": {"job": "ray"}, "targets": targets}])
    return written


def session_targets(session: Path | str) -> dict[str, list[str]]:
    """What a session dir advertises: {"driver": [...], "ray": [...]} (Ray's ports files as a fallback)."""
    s = Path(session)
    out: dict[str, list[str]] = {"driver": [], "ray": []}
    for key, name in (("driver", DRIVER_SD), ("ray", RAY_SD)):
        try:
            for group in json.loads((s / name).read_text()):
                out[key] += group.get("targets", [])
        except (OSError, ValueError):
            pass
    if not out["ray"]:
        for f in s.glob("metrics_export_port_*"):
            try:
                out["ray"].append(f"127.0.0.1:{int(f.read_text().strip())}")
            except ValueError:
                pass
    return out


# -- Prometheus -----------------------------------------------------------------------------------
def render_config(workdir: Path, sd_files: dict[str, list[str]], scrape_interval: str = "5s",
                  static: dict[str, list[str]] | None = None, rules: bool = True) -> Path:
    """A prometheus.yml in ``workdir`` with the same jobs as dashboards/prometheus.yml."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = ["global:", f"  scrape_interval: {scrape_interval}", f"  evaluation_interval: {scrape_interval}"]
    if rules:
        shutil.copy(dashboards_dir() / "alerts.yml", workdir / "alerts.yml")
        lines += ["rule_files:", "  - alerts.yml"]
    lines.append("scrape_configs:")
    for job in ("audioarc-driver", "ray"):
        key = "driver" if job == "audioarc-driver" else "ray"
        lines += [f"  - job_name: {job}"]
        files = (sd_files or {}).get(key, [])
        if files:
            lines += ["    file_sd_configs:", "      - refresh_interval: 1s", "        files:"]
            lines += [f"          - {json.dumps(str(f))}" for f in files]
        st = (static or {}).get(key, [])
        if st:
            lines += ["    static_configs:", f"      - targets: {json.dumps(st)}"]
        if not files and not st:
            lines += ["    static_configs:", "      - targets: []"]
    p = workdir / "prometheus.yml"
    p.write_text("\n".join(lines) + "\n")
    return p


class Prometheus:
    """A Prometheus process on 127.0.0.1:port with its TSDB in workdir; stop() ends it."""

    def __init__(self, config: Path, workdir: Path, port: int | None = None, host: str = "127.0.0.1",
                 bindir: Path | None = None):
        self.bindir = bindir or fetch_prometheus()
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [str(self.bindir / "prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address={host}:{self.port}",
             "--web.enable-lifecycle", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def wait_ready(self, timeout: float = 30) -> "Prometheus":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout} s")

    def api(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
            return json.loads(r.read())

    def query(self, promql: str) -> list[dict]:
        d = self.api("query", query=promql)
        if d.get("status") != "success":
            raise RuntimeError(f"{promql}: {d}")
        return d["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        r = self.query(promql)
        return float(r[0]["value"][1]) if r else None

    def targets(self) -> list[dict]:
        return self.api("targets")["data"]["activeTargets"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(fetch_prometheus() / "promtool"), *args], capture_output=True, text=True,
                          timeout=60)


# -- audioarc monitor -----------------------------------------------------------------------------
def start_grafana(workdir: Path, prom_url: str, port: int) -> subprocess.Popen | None:
    """grafana-server with audioarc's provisioning (datasource -> prom_url, the dashboard), if installed."""
    exe = shutil.which("grafana-server") or shutil.which("grafana")
    if not exe:
        return None
    prov = workdir / "grafana" / "provisioning"
    dash = dashboards_dir()
    for sub in ("datasources", "dashboards"):
        (prov / sub).mkdir(parents=True, exist_ok=True)
        text = (dash / "provisioning" / sub / "audioarc.yml").read_text()
        text = text.replace("http://127.0.0.1:9090", prom_url).replace("/etc/grafana/dashboards/audioarc", str(dash))
        (prov / sub / "audioarc.yml").write_text(text)
    home = next((p for p in ("/usr/share/grafana", "/usr/local/share/grafana") if Path(p).exists()), None)
    args = [exe] + (["server"] if exe.endswith("/grafana") else []) + (["--homepath", home] if home else [])
    env = dict(os.environ, GF_PATHS_PROVISIONING=str(prov), GF_PATHS_DATA=str(workdir / "grafana" / "data"),
               GF_PATHS_LOGS=str(workdir / "grafana" / "logs"), GF_SERVER_HTTP_ADDR="127.0.0.1",
               GF_SERVER_HTTP_PORT=str(port), GF_AUTH_ANONYMOUS_ENABLED="true",
               GF_AUTH_ANONYMOUS_ORG_ROLE="Viewer", GF_ANALYTICS_REPORTING_ENABLED="false")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_monitor(port: int = 9090, ray_session: str | None = None, workdir: str | None = None,
                grafana_port: int = 3000, driver: list[str] | None = None, once: bool = False) -> int:
    sess = Path(ray_session or "/tmp/ray/session_latest")
    wd = Path(workdir or CACHE / "monitor")
    sd = {"driver": [str(sess / DRIVER_SD)], "ray": [str(sess / RAY_SD)]}
    cfg = render_config(wd, sd, "5s", static={"driver": driver or []})
    prom = Prometheus(cfg, wd, port=port).wait_ready()
    graf = start_grafana(wd, prom.url, grafana_port)
    print(f"prometheus: {prom.url}  (config {cfg}; targets from {sess})")
    found = session_targets(sess)
    print(f"  driver endpoints now: {found['driver'] or 'none yet (start encode with --metrics-port)'}")
    print(f"  ray node endpoints now: {found['ray'] or 'none yet'}")
    if graf:
        print(f"grafana:    http://127.0.0.1:{grafana_port}/d/audioarc-encode")
    else:
        print("grafana:    not installed (grafana-server not on PATH); import dashboards/audioarc.json by hand")
    sys.stdout.flush()
    if once:  # let it scrape every target once (at most 30 s), show what it sees, stop
        deadline = time.time() + 30
        while time.time() < deadline and (not prom.targets() or any(t["health"] == "unknown"
                                                                       for t in prom.targets())):
            time.sleep(0.5)
        for t in prom.targets():
            print(f"  target {t['labels'].get('job')} {t['scrapeUrl']}: {t['health']}")
    try:
        while not once and prom.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        prom.stop()
        if graf:
            graf.terminate()
    return 0
