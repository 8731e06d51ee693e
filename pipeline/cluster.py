"""Running on a real Ray cluster: ship the code with the job, or submit the CLI itself as a Ray job.

Two ways in (deploy/README.md):

* ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.encode SRC DEST ...``:
  the driver runs on the head node; Ray ships this repository (``working_dir``) to every worker.
* ``audioarc encode SRC DEST --address ...``:
  - ``http(s)://HEAD:8265`` (the dashboard / job server): the CLI submits itself as that Ray job
    (same ``working_dir`` upload), streams the job's output and exits with the job's exit code;
  - ``HOST:PORT`` (GCS) or ``ray://HOST:10001`` (Ray client): the driver runs here and the ``pipeline``
    package travels to the workers as a ``py_modules`` runtime env.
  Set ``AUDIOARC_SHIP_CODE=0`` when the image already has audioarc installed (nothing is uploaded).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds pipeline/ and jobs/
WORKING_DIR_EXCLUDES = [".git", ".venv", "out", ".data", "**/__pycache__", "*.egg-info", ".pytest_cache",
                        "tests", "deploy"]
# the job module per CLI command (anything else runs as python -m pipeline.cli COMMAND ...)
JOB_MODULES = {"encode": "jobs.encode", "restore": "jobs.restore"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def ship_code() -> bool:
    return os.environ.get("AUDIOARC_SHIP_CODE", "1") not in ("0", "false", "no")


def in_ray_job() -> bool:
    """True inside a driver started by ``ray job submit`` (its runtime env already ships the code)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def driver_kwargs(address: str) -> dict:
    """Extra ``ray.init`` arguments for a driver that connects to an existing cluster at ``address``."""
    if address == "local" or in_ray_job() or not ship_code():
        return {}
    import pipeline
    return {"runtime_env": {"py_modules": [pipeline],
                            "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}}


def is_job_server(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``--name VALUE`` / ``--name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def job_entrypoint(argv: list[str]) -> list[str]:
    """The ``python -m ...`` command line that runs CLI ``argv`` (minus ``--address``) as a Ray job."""
    argv = strip_option(argv, "--address")
    cmd, rest = argv[0], argv[1:]
    if cmd in JOB_MODULES:
        return ["python", "-m", JOB_MODULES[cmd], *rest]
    return ["python", "-m", "pipeline.cli", cmd, *rest]


def runtime_env() -> dict:
    env: dict = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    if ship_code():
        env.update(working_dir=str(PACKAGE_ROOT), excludes=WORKING_DIR_EXCLUDES)
    return env


def submit(argv: list[str], address: str, poll_s: float = 1.0, out=None) -> int:
    """Submit CLI ``argv`` as a Ray job at ``address`` (http://HEAD:8265), stream its output, return its exit
    code (1 if the job failed without one; 130 if interrupted, after stopping the job)."""
    import shlex

    from ray.job_submission import JobSubmissionClient
    out = out or sys.stdout
    client = JobSubmissionClient(address)
    entry = shlex.join(job_entrypoint(argv))
    job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env())
    print(f"audioarc: submitted Ray job {job_id} to {address}: {entry}", file=sys.stderr)
    shown = 0
    try:
        while True:
            status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                out.write(logs[shown:])
                out.flush()
                shown = len(logs)
            if status in TERMINAL:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"audioarc: stopped Ray job {job_id}; re-run to resume", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is None:
        code = 0 if status == "SUCCEEDED" else 1
    if status != "SUCCEEDED":
        print(f"audioarc: Ray job {job_id} {status}: {info.message or ''}".rstrip(), file=sys.stderr)
    return int(code)
