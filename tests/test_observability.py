"""Metrics: the names dashboards and alerts use exist; promtool accepts the rules and config; a real
Prometheus scrapes a running encode job and agrees with the job's own summary."""
from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline import monitor
from pipeline import telemetry as metrics

DASH = Path(__file__).resolve().parent.parent / "dashboards"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "Inf", "NaN"}


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for f in sorted(DASH.glob("*.json")):
        for p in json.loads(f.read_text())["panels"]:
            for t in p.get("targets", []):
                out.append((f"{f.name}: {p['title']} [{t['refId']}]", t["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DASH / "alerts.yml").read_text())
    return [(f"alerts.yml: {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, durations removed)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range / subquery durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        if m.group(2) or m.group(1) in PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(m.group(1))
    return names


def instantiate(expr: str, job_id: str = ".*") -> str:
    """A Grafana expression as Prometheus would get it."""
    return (expr.replace("$__rate_interval", "30s").replace("$__range", "5m").replace("$job_id", job_id))


def test_metric_names_parser():
    assert metric_names('sum by (le) (rate(ray_x_bucket{a="b"}[5m])) / clamp_min(y, 1e-9) > 0.05') == \
        {"ray_x_bucket", "y"}
    assert metric_names("time() - max by (job_id) (z) and on (job_id) w") == {"z", "w"}


def test_exported_names_follow_exporter_rules():
    names = metrics.exported_names()
    assert "ray_audioarc_files_out_total" in names  # Ray: ray_ prefix, counters _total
    assert {"ray_audioarc_encode_batch_seconds_bucket", "ray_audioarc_encode_batch_seconds_sum",
            "ray_audioarc_encode_batch_seconds_count"} <= names
    assert "audioarc_job_files_total" in names and "audioarc_job_backlog_files" in names  # driver: no prefix
    assert "audioarc_quality" in names and "audioarc_quality_gate_violations" in names
    assert all(s.name.startswith(metrics.PREFIX) for s in metrics.SPECS.values())
    assert all(set(metrics.JOB_LABELS) <= set(s.labels) for s in metrics.SPECS.values()
               if s.name != "audioarc_storage_retries")


def test_every_dashboard_and_alert_metric_is_exported():
    known = metrics.exported_names() | metrics.RAY_NODE_METRICS
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) > 20
    unknown = {(where, n) for where, e in exprs for n in metric_names(e) if n not in known}
    assert not unknown, f"metrics used but not exported: {sorted(unknown)}"
    used = {n for _, e in exprs for n in metric_names(e)}
    for must in ("ray_node_cpu_utilization", "audioarc_job_backlog_files", "audioarc_quality_gate_violations",
                 "audioarc_job_eta_seconds", "audioarc_job_compression_ratio"):
        assert must in used


def test_dashboards_dir_is_found_or_named(tmp_path, monkeypatch):
    from pipeline.errors import ConfigError
    monkeypatch.delenv("AUDIOARC_DASHBOARDS", raising=False)
    assert monitor.dashboards_dir() == DASH  # a checkout: beside pipeline/
    monkeypatch.setenv("AUDIOARC_DASHBOARDS", str(tmp_path))
    with pytest.raises(ConfigError, match="AUDIOARC_DASHBOARDS"):
        monitor.dashboards_dir()  # no alerts.yml there: a clear error, not a FileNotFoundError later
    (tmp_path / "alerts.yml").write_text("groups: []\n")
    assert monitor.dashboards_dir() == tmp_path


def test_failure_classes():
    c = metrics.classify_failure
    assert c("x: not a readable audio file (bad)") == "not_audio"
    assert c("x: empty file (0 bytes); remove it") == "empty"
    assert c("x: truncated audio: the data chunk announces") == "truncated"
    assert c("x: zero-length audio (the file has a header but no samples)") == "zero_length"
    assert c("reading s3://b/x: still failing after 6 attempts: 503") == "storage"
    assert c("whatever", storage_error=True) == "storage"
    assert c("x: unexpected KeyError while decoding") == "other"


def test_driver_endpoint_and_linger():
    dm = metrics.DriverMetrics("jid", "mdct_rvq", 6.0)
    port = dm.serve("127.0.0.1", 0)
    try:
        dm.progress(3, 10, 12.5, {"a": time.time()})
        dm.finished()
        assert not dm.linger(0.2)  # nobody scraped: gives up after 0.2 s
        for _ in range(2):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert dm.linger(5)
        assert 'audioarc_job_files_listed{bitrate="6",codec="mdct_rvq",job_id="jid"} 10.0' in body
        assert "audioarc_job_running" in body
    finally:
        dm.close()


@pytest.fixture(scope="module")
def prom_bin():
    try:
        return monitor.fetch_prometheus()
    except RuntimeError as e:
        pytest.skip(f"no prometheus binary: {e}")


def test_promtool_checks_rules_and_config(prom_bin, tmp_path):
    r = monitor.promtool("check", "rules", str(DASH / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    r = monitor.promtool("check", "config", str(DASH / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    gen = monitor.render_config(tmp_path, {"driver": [str(tmp_path / "d.json")], "ray": [str(tmp_path / "r.json")]})
    r = monitor.promtool("check", "config", str(gen))
    assert r.returncode == 0, r.stdout + r.stderr


def _wait(fn, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last is not None and last is not False:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def test_prometheus_scrapes_a_real_job(tmp_path, cli, prom_bin):
    from tests.test_pipeline import GOOD, make_corpus
    src, dest, wd = tmp_path / "src", tmp_path / "archive", tmp_path / "prom"
    files = make_corpus(src)
    dport = monitor.free_port()
    ray_targets = monitor.ray_metrics_targets()
    assert ray_targets, ("the local Ray node has no metrics agent (MetricsExportPort -1): the project needs "
                         "ray[default] (pyproject); pip install 'ray[default]' into this venv")
    cfg = monitor.render_config(wd, {}, "1s", static={"driver": [f"127.0.0.1:{dport}"], "ray": ray_targets})
    prom = monitor.Prometheus(cfg, wd, bindir=prom_bin).wait_ready()
    try:
        s = cli.json("encode", src, dest, "--window-seconds", "1", "--metrics-port", dport,
                     "--metrics-linger", "20", "--quality-sample", "0.2", "--no-visqol", "--excerpt-seconds", "1",
                     expect=3)
        jid = s["job_id"]
        assert s["files_archived"] == len(GOOD) and s["files_failed"] == 4
        J = f'job_id="{jid}"'

        def last(q):  # the driver's endpoint is gone now: read its last samples
            return prom.scalar(f"sum(last_over_time({q}[5m]))")
        # driver (job-level, exact)
        assert last(f'audioarc_job_files_total{{{J},status="archived"}}') == s["files_archived"]
        assert last(f'audioarc_job_files_total{{{J},status="failed"}}') == s["files_failed"]
        assert last(f'audioarc_job_audio_seconds_total{{{J}}}') == pytest.approx(s["audio_seconds"], abs=0.01)
        assert last(f'audioarc_job_files_listed{{{J}}}') == len(files)
        assert last(f'audioarc_job_running{{{J}}}') == 0
        assert last(f'audioarc_job_compression_ratio{{{J}}}') == pytest.approx(s["compression_ratio"], rel=0.01)
        for reason in ("not_audio", "empty", "truncated", "zero_length"):
            assert last(f'audioarc_job_failures_total{{{J},reason="{reason}"}}') == 1
        # the quality sample's fidelity, as in the job's summary
        q = s["quality"]["summary"]
        assert last(f'audioarc_quality_files_sampled{{{J}}}') == q["files_sampled"]
        assert last(f'audioarc_quality{{{J},metric="mel",stat="median"}}') == pytest.approx(q["mel"]["median"])
        # Ray metrics from the decode tasks / codec actors (reported to the node agent every 2 s here)
        _wait(lambda: last(f'ray_audioarc_files_out_total{{{J},stage="decode"}}') == s["files_archived"],
              90, "decode files_out in Prometheus")
        assert last(f'ray_audioarc_audio_seconds_out_total{{{J},stage="decode"}}') == \
            pytest.approx(s["audio_seconds"], abs=0.01)
        assert last(f'ray_audioarc_files_in_total{{{J},stage="decode"}}') == len(files)
        assert last(f'ray_audioarc_failures_total{{{J}}}') == 4
        _wait(lambda: last(f'ray_audioarc_encode_batch_seconds_count{{{J}}}'), 60, "encode batches")
        _wait(lambda: prom.query("ray_node_cpu_utilization"), 60, "Ray's node metrics (ray_node_cpu_utilization)")
        # every dashboard panel and alert expression evaluates
        values = {}
        for where, expr in dashboard_exprs() + alert_exprs():
            q = instantiate(expr, jid)
            d = prom.api("query", query=q)
            assert d["status"] == "success", (where, q, d)
            values[where] = [(r["metric"], r["value"][1]) for r in d["data"]["result"]][:4]
        (tmp_path / "panel_values.json").write_text(json.dumps(values, indent=1))
        print(f"\npanel values for job {jid} (job summary {s['audio_seconds']} s audio, {s['wall_seconds']} s):")
        for k, v in values.items():
            print(f"  {k}: {v}")
        rules = prom.api("rules")["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == {"AudioarcJobStalled", "AudioarcFailureRateHigh",
                                              "AudioarcFidelityBelowFloor"}
        assert all(r["health"] in ("ok", "unknown") for r in rules), rules
    finally:
        prom.stop()


def test_monitor_command_discovers_a_session(tmp_path, cli_noray, prom_bin):
    """`audioarc monitor --once` on a session dir advertising a driver endpoint: Prometheus scrapes it."""
    dm = metrics.DriverMetrics("mon", "mdct_rvq", 6.0)
    dport = dm.serve("127.0.0.1", 0)
    sess = tmp_path / "session"
    sess.mkdir()
    (sess / monitor.DRIVER_SD).write_text(json.dumps([{"targets": [f"127.0.0.1:{dport}"]}]))
    (sess / monitor.RAY_SD).write_text(json.dumps([{"labels": {"job": "ray"}, "targets": []}]))
    port = monitor.free_port()
    try:
        code, out = cli_noray("monitor", "--port", port, "--ray-session", sess, "--workdir", tmp_path / "wd",
                              "--once")
    finally:
        dm.close()
    assert code == 0, cli_noray.last_err
    assert f"prometheus: http://127.0.0.1:{port}" in out
    assert f"target audioarc-driver http://127.0.0.1:{dport}/metrics: up" in out
