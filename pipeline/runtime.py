"""The process runtime: Ray start-up (a cluster, or a local node on loopback, with the storage env), Ray's log lines,
and lean read-side processes (no pandas, memory handed back: ``lean_process``)."""
from __future__ import annotations

import logging
import os
import re
import sys
import time

from . import storage

# -- pandas kept out of light commands --------------------------------------------------------------
class _NoPandas:
    """An import finder that reports pandas as not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r} (kept out of this process)", name=name)
        return None


_NO_PANDAS = _NoPandas()


def keep_pandas_out() -> None:
    """From now on ``import pandas`` fails in this process until Ray starts (Ray Data needs it). pyarrow imports
    pandas (~45 MiB) only to ask whether an argument is a DataFrame and goes on without it; ``restore``, ``ls``
    and ``inspect`` never use it, so their process entrypoint calls this."""
    if "pandas" not in sys.modules and _NO_PANDAS not in sys.meta_path:
        sys.meta_path.insert(0, _NO_PANDAS)


def lean_process() -> None:
    """A ``restore`` / ``ls`` / ``inspect`` process: pandas kept out (``keep_pandas_out``); pyarrow on the C
    library's allocator instead of its mimalloc pool (which keeps a catalog lookup's freed pages resident); and
    that allocator returning every freed block over 128 KiB to the system at once (``heap_for_decoding`` ends
    it), so the catalog lookup's and the model load's transients are gone before the decode starts."""
    keep_pandas_out()
    import pyarrow as pa
    if pa.default_memory_pool().backend_name != "system" and not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())
    global _lean
    _lean = True
    _mmap_threshold(128 << 10)


def heap_for_decoding() -> None:
    """After ``lean_process`` (elsewhere nothing happens): blocks up to 32 MiB come from the reused heap again (a
    decoder's activations: each a fresh mapping would slow decoding by 15-25 %, measured)."""
    if _lean:
        _mmap_threshold(32 << 20)


_lean = False  # lean_process was called


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _mmap_threshold(n: int) -> None:
    """glibc only (elsewhere nothing happens): blocks of at least ``n`` bytes get their own mapping, unmapped
    when freed (a fixed threshold: glibc's dynamic one creeps up and keeps freed model-sized blocks resident)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, n)
    except (OSError, AttributeError):  # not glibc (musl, ...): its own policy stands
        pass


def _let_pandas_in() -> None:
    if _NO_PANDAS in sys.meta_path:
        sys.meta_path.remove(_NO_PANDAS)


# -- Ray's own log lines ------------------------------------------------------------------------------
# Ray prints to the driver's terminal from Python loggers ("ray", "ray.data": start-up warnings, "Dataset ...
# execution finished") and from its C++ core worker, which writes error-level lines to file descriptor 2
# (e.g. core_worker.cc's note on actors with constructor arguments in the object store, which every Ray Data
# actor pool has). None of them is about the job, so the CLI sends them to a log file and names it in the
# summary; ``--verbose`` (or AUDIOARC_RAY_LOGS=1) shows them on the terminal as before.
_LOG: dict = {}
KEEP_LOGS = 50


def log_dir() -> str:
    return os.environ.get("AUDIOARC_LOG_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "audioarc", "logs")


def ray_log_path() -> str | None:
    """The file Ray's log lines go to in this process (None: they go to the terminal)."""
    return _LOG.get("path")


def log_stream():
    """A text stream into the log file while Ray's lines are routed there (else None): the CLI points
    sys.stdout at it while a command runs, where Ray's driver thread prints "(raylet) ..." lines."""
    return _LOG.get("stream")


def route_ray_logs(name: str) -> str:
    """From now on Ray's log lines in this process go to ``log_dir()/<name>-<time>-<pid>.log`` instead of the
    terminal: file descriptor 2 (native code) is that file, ``sys.stderr`` stays the terminal for audioarc's
    own messages, and the Python "ray*" loggers write to the file. For the CLI entrypoint only (it changes
    process-wide state); returns the path. Idempotent."""
    if _LOG.get("path"):
        return _LOG["path"]
    d = log_dir()
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        return ""
    try:  # keep the newest KEEP_LOGS of ours (never another program's files in that folder)
        ours = re.compile(r"[a-z-]+-\d{8}T\d{6}-\d+\.log")
        old = sorted((e for e in os.scandir(d) if ours.fullmatch(e.name)), key=lambda e: e.stat().st_mtime)
        for e in old[:max(0, len(old) - KEEP_LOGS + 1)]:
            os.unlink(e.path)
    except OSError:
        pass
    path = os.path.join(d, f"{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}.log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:  # no writable log folder: leave the terminal as it is
        return ""
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2
        os.close(fd)
        return ""
    os.dup2(fd, 2)
    os.close(fd)
    # the old sys.stderr object now writes to the file (fd 2): whoever holds it (sys.stdout while a CLI
    # command runs, where Ray's driver thread prints "(raylet) ..." lines) writes there
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    _LOG["stream"] = sys.stderr
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=enc, errors="backslashreplace")
    _LOG["path"] = path
    _route_python_loggers()
    return path


def _route_python_loggers() -> None:
    """Console handlers of the "ray" loggers -> the log file (they write to sys.stderr at emit time)."""
    path = _LOG.get("path")
    if not path:
        return
    if "handler" not in _LOG:
        h = logging.FileHandler(path, encoding="utf-8")
        h.setLevel(logging.INFO)
        h.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
        _LOG["handler"] = h
    fh = _LOG["handler"]
    names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
    for n in names:
        lg = logging.getLogger(n)
        console = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                   and not isinstance(h, logging.FileHandler)]
        for h in console:
            lg.removeHandler(h)
        if (console or n == "ray") and fh not in lg.handlers:
            lg.addHandler(fh)


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local single node on loopback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _let_pandas_in()
    import ray
    if ray.is_initialized():
        return
    _route_python_loggers()  # the "ray" logger exists once ray is imported: its start-up warnings go there
    addr = address or os.environ.get("RAY_ADDRESS") or "local"
    verbose = bool(os.environ.get("AUDIOARC_RAY_LOGS"))
    kwargs = {"include_dashboard": False, "log_to_driver": verbose,
              "logging_level": "INFO" if verbose or ray_log_path() else "WARNING"}
    # workers (possibly on other machines) must reach the same object store with the same credentials;
    # the values travel in the runtime env and are never printed
    env = {k: os.environ[k] for k in storage.STORAGE_ENV_VARS if os.environ.get(k)}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if addr == "local":
        kwargs["_node_ip_address"] = "127.0.0.1"
        # no task events: the GCS would keep one for every task and actor call of the job (up to 100,000 by
        # default; measured: its private memory 45.9 -> 58.2 MiB over one 60-minute input in 1 s windows, flat
        # at 45.4 without); the job runs no dashboard that would show them (see deploy/k8s for a cluster's GCS)
        os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
        if os.environ.get("AUDIOARC_RAY_METRICS_PORT"):  # fixed metrics export port (see dashboards/README.md)
            kwargs["_metrics_export_port"] = int(os.environ["AUDIOARC_RAY_METRICS_PORT"])
    from .cluster import driver_kwargs
    extra = driver_kwargs(addr)  # ship the package to the cluster's workers (runtime env)
    if "runtime_env" in extra and "runtime_env" in kwargs:  # keep both: shipped code and storage env vars
        rt = dict(extra.pop("runtime_env"))
        rt["env_vars"] = {**rt.get("env_vars", {}), **kwargs["runtime_env"]["env_vars"]}
        kwargs["runtime_env"] = rt
    kwargs.update(extra)
    ray.init(address=addr, **kwargs)
    import ray.data
    _route_python_loggers()  # again: ray.init and ray.data configure their own console handlers
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
