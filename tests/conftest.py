"""Shared fixtures: one local Ray node for the whole test session, CLI runner, synthetic corpora."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # workers -> metrics agent (default 10 s)
# decompressed codec weights are cached per session, not in the user's ~/.cache (codec.packing)
if "AUDIOARC_WEIGHTS_CACHE" not in os.environ:
    _WEIGHTS_CACHE = os.environ["AUDIOARC_WEIGHTS_CACHE"] = tempfile.mkdtemp(prefix="audioarc-weights-cache-")

pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture(scope="session")
def ray_cluster(request):
    """One local Ray node (loopback) shared by every test of the session.

    The session's S3 server is started first, so its credentials are in the environment when Ray
    starts and reach the workers through the runtime env; without SeaweedFS only the S3 tests skip.
    """
    import ray

    from pipeline.runtime import init_ray
    try:
        request.getfixturevalue("devs3")
    except pytest.skip.Exception:
        pass
    init_ray()
    yield ray
    ray.shutdown()


class CLI:
    """Runs ``audioarc`` in-process (sharing the session's Ray node); returns (exit code, stdout)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str]:
        import io

        from pipeline.cli import main
        self.capsys.readouterr()
        out = io.StringIO()  # the command's own stdout: the session's Ray driver thread never writes here
        code = main([str(a) for a in args], out=out)
        self.last_err = self.capsys.readouterr().err
        return code, out.getvalue()

    def json(self, *args: str, expect: int | tuple[int, ...] = 0):
        code, out = self(*args, "--json")
        ok = (expect,) if isinstance(expect, int) else expect
        assert code in ok, f"exit {code}, stderr: {self.last_err[-2000:]}"
        return json.loads(out)


@pytest.fixture
def cli(capsys, ray_cluster):
    return CLI(capsys)


@pytest.fixture
def cli_noray(capsys):
    return CLI(capsys)


# -- CI cannot go green while a capability goes untested ---------------------------------------------
# A test skips when something it needs is missing (the weed binary, Prometheus, Chromium, encodec, ffmpeg,
# ViSQOL, ...). On a developer's machine that is a skip; in CI (CI=true) it fails the run, naming what is missing,
# because .ci/setup installs all of it. Tests whose skip is a property of the machine, not of the setup, say so
# with ``@pytest.mark.machine_dependent``.
def pytest_configure(config):
    config.addinivalue_line("markers", "machine_dependent: may skip in CI (e.g. needs a GPU or a umask)")


def pytest_unconfigure(config):
    if "_WEIGHTS_CACHE" in globals():
        shutil.rmtree(_WEIGHTS_CACHE, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes") \
            and item.get_closest_marker("machine_dependent") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (f"skipped in CI, so a capability went untested: {reason}. "
                        f".ci/setup installs what the test needs; fix the install step, or mark the test "
                        f"machine_dependent if the skip is about the machine")
