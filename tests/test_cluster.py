"""A real 2-node Ray cluster on loopback (head 127.0.0.2 + worker 127.0.0.3, `ray start`), jobs submitted with
`ray job submit` as subprocesses, so the session's local Ray node (other tests) is untouched."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from jobs.tools.loopback_cluster import HEAD_IP, RAY, LoopbackCluster
from tests import audio_factory as af

pytest.importorskip("aiohttp_cors", reason="the job server needs ray[default] (pip install -e .[test])")
pytest.importorskip("opencensus", reason="the job server needs ray[default] (pip install -e .[test])")

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".git", ".deps", "tests", "deploy", "out", "**/__pycache__"]


@pytest.fixture(scope="module")
def cluster():
    c = LoopbackCluster(workers=1, cpus_per_node=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()  # always: kills exactly this cluster's processes (marked pids), never `ray stop`


def corpus(root: Path, n: int) -> Path:
    for i in range(n):
        af.write(root / f"d{i % 2}" / f"s{i}.wav", 1.0 + (i % 3), 16000, freq=220.0 + 40 * i)
    return root


def submit(c: LoopbackCluster, src: Path, dest: Path, *extra: str, wait: bool = True):
    cmd = [RAY, "job", "submit", "--address", c.dashboard, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
           "python", "-m", "jobs.encode", str(src), str(dest), "--window-seconds", "1", "--commit-every", "2",
           "--quality-sample", "0", "--json", *extra]
    if wait:
        return subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def manifest_rows(dest: Path) -> list[dict]:
    """Every committed catalog row (not merged)."""
    from pipeline.archive import catalog
    return catalog.table(str(dest)).to_pylist()


def latest_report(dest: Path) -> dict:
    return json.loads(sorted((dest / "reports").glob("encode-*.json"))[-1].read_text())


def test_job_submit_spreads_codec_actors_over_both_nodes(cluster, tmp_path):
    src, dest = corpus(tmp_path / "src", 16), tmp_path / "arc"
    # 5 actors x 0.5 CPU = 2.5 CPUs > one node's 2: the pool must span both nodes (SPREAD alone is best-effort)
    # batches of 1 window: ~46 batches, so work reaches actors on both nodes (with 8 files, ~23 batches, all of them
    # once went to the first actor up, on a loaded machine, before the other four had started)
    r = submit(cluster, src, dest, "--actors", "5", "--commit-every", "8", "--batch-windows", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = latest_report(dest)
    assert (s["files_total"], s["files_archived"], s["files_failed"]) == (16, 16, 0)
    nodes = {n["node_id"]: n["node_ip"] for n in cluster.nodes()}
    used = s["placement"]["nodes"]
    assert len(used) == 2 and set(used) <= set(nodes), (used, nodes)
    assert {nodes[n] for n in used} == {HEAD_IP, cluster.worker_ips[0]} == {"127.0.0.2", "127.0.0.3"}
    assert sum(v["windows"] for v in used.values()) >= 8


def test_worker_node_killed_mid_job_every_input_once(cluster, tmp_path):
    src, dest = corpus(tmp_path / "src", 10), tmp_path / "arc"
    p = submit(cluster, src, dest, "--actors", "2", wait=False)
    t = time.time()
    while not (dest / "catalog/_delta_log/00000000000000000001.json").exists() and time.time() - t < 300 \
            and p.poll() is None:
        time.sleep(0.5)  # first generation committed: the job is mid-way
    assert p.poll() is None, "the job ended before the first generation was committed"
    killed = cluster.kill_node(cluster.worker_ips[0])
    out = p.communicate(timeout=900)[0]
    first_rc = p.returncode
    if first_rc != 0:  # the job may fail on the lost node; a re-run (head only) must resume and finish
        r = submit(cluster, src, dest, "--actors", "1")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = manifest_rows(dest)
    latest: dict[str, dict] = {}
    for row in rows:
        if row["relpath"] not in latest or row["generation"] > latest[row["relpath"]]["generation"]:
            latest[row["relpath"]] = row
    srcs = sorted(str(f.relative_to(src)) for f in src.rglob("*.wav"))
    assert sorted(latest) == srcs
    assert all(v["status"] == "archived" for v in latest.values()), [v for v in latest.values()
                                                                     if v["status"] != "archived"]
    archived = [row["relpath"] for row in rows if row["status"] == "archived"]
    assert sorted(archived) == srcs, "an input was archived twice (or never)"
    print(f"killed raylet {killed}; first run exit {first_rc}; {len(rows)} manifest rows\n{out[-1500:]}")


def test_cli_address_http_submits_itself_as_a_ray_job(cluster, tmp_path):
    import os
    import sys
    src, dest = corpus(tmp_path / "src", 3), tmp_path / "arc"
    env = dict(cluster.env, PYTHONPATH=os.pathsep.join([str(ROOT), cluster.env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "encode", str(src), str(dest), "--address",
                        cluster.dashboard, "--window-seconds", "1", "--quality-sample", "0", "--json"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted Ray job" in r.stderr
    s = latest_report(dest)
    assert (s["files_total"], s["files_archived"]) == (3, 3)
    assert "python -m jobs.encode" in r.stderr and "--address" not in r.stderr.split("jobs.encode", 1)[1]
