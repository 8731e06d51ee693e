"""Shared fixtures: one local Ray node for the whole test session, CLI runner, synthetic corpora."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # workers -> metrics agent (default 10 s)

pytest_plugins = ["tests.s3_fixtures"]


@pytest.fixture(scope="session")
def ray_cluster(request):
    """One local Ray node (loopback) shared by every test of the session.

    The session's S3 server is started first, so its credentials are in the environment when Ray
    starts and reach the workers through the runtime env; without SeaweedFS only the S3 tests skip.
    """
    import ray

    from pipeline.encode import init_ray
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
