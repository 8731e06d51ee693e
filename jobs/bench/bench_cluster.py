"""Encode throughput vs codec actors and vs nodes (prints JSON lines; not a test).

    python -m jobs.bench.bench_cluster [--files 8 --seconds 60 --parts ceiling,actors,nodes]

* actors: one local Ray node (this machine), the same corpus encoded with --actors 1 then 2 (warm driver,
  one generation, fixed pools); speedup = x_realtime(2) / x_realtime(1).
* ceiling: the codec alone (no Ray) in 1 process, then in 2 processes at once; their summed speed over the
  single one is what this machine allows 2 actors at best (shared caches, memory bandwidth, VM neighbours).
* nodes: a loopback cluster (jobs.tools.loopback_cluster) with 1 node vs 2 nodes, the encode run as a driver
  subprocess (``python -m jobs.encode --address``), default actor count (1 per CPU of the cluster).
Every line carries the 1-minute load average before/after, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf


def corpus(root: Path, files: int, seconds: float, rate: int = 24000) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        t = np.arange(int(seconds * rate)) / rate
        x = 0.2 * np.sin(2 * np.pi * (220 + 30 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(root / f"f{i:03d}.wav"), x.astype(np.float32), rate)
    return root


def load() -> float:
    return round(os.getloadavg()[0], 2)


def bench_actors(src: Path, work: Path, counts: list[int], window: float) -> list[dict]:
    from pipeline.encode import EncodeConfig, run_encode
    from pipeline.runtime import init_ray
    init_ray()
    import ray
    out = []
    run_encode(EncodeConfig(src=str(src), dest=str(work / "warm"), actors=1, window_seconds=window,
                            commit_every=10_000, quality=None))
    for n in counts:
        l0 = load()
        s = run_encode(EncodeConfig(src=str(src), dest=str(work / f"a{n}"), actors=n, window_seconds=window,
                                    commit_every=10_000, quality=None))
        out.append({"part": "actors", "actors": n, "x_realtime": s.x_realtime, "wall_s": s.wall_seconds,
                    "audio_s": s.audio_seconds, "cpus": ray.cluster_resources().get("CPU"),
                    "load1_before": l0, "load1_after": load()})
        print(json.dumps(out[-1]), flush=True)
    ray.shutdown()
    return out


CEILING_CHILD = "from jobs.bench.bench_pipeline import codec_speed; print(codec_speed('neural_rvq', 8, seconds=60))"


def bench_ceiling() -> dict:
    root = str(Path(__file__).resolve().parents[2])

    def run(n):
        ps = [subprocess.Popen([sys.executable, "-c", CEILING_CHILD], cwd=root, stdout=subprocess.PIPE, text=True)
              for _ in range(n)]
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in ps]

    one, two = run(1), run(2)
    out = {"part": "ceiling", "codec_x_1_process": round(one[0], 1), "codec_x_2_processes": [round(v, 1) for v in two],
           "ceiling_2_vs_1": round(sum(two) / one[0], 2), "load1": load()}
    print(json.dumps(out), flush=True)
    return out


def bench_nodes(src: Path, work: Path, window: float) -> list[dict]:
    from jobs.tools.loopback_cluster import LoopbackCluster
    out = []
    for workers in (0, 1):
        with LoopbackCluster(workers=workers, cpus_per_node=2) as c:
            env = dict(c.env, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                          c.env.get("PYTHONPATH", "")]))
            for rep in ("warm", "run"):
                l0 = load()
                r = subprocess.run([sys.executable, "-m", "jobs.encode", str(src), str(work / f"n{workers}{rep}"),
                                    "--address", c.address, "--window-seconds", str(window),
                                    "--commit-every", "10000", "--quality-sample", "0", "--json"],
                                   env=env, capture_output=True, text=True, timeout=1200)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr[-3000:])
                s = json.loads(r.stdout[r.stdout.index("{"):])
                if rep == "run":
                    out.append({"part": "nodes", "nodes": 1 + workers, "x_realtime": s["x_realtime"],
                                "wall_s": s["wall_seconds"], "actors": s["placement"]["max_actors"],
                                "actor_nodes": len(s["placement"]["nodes"]), "load1_before": l0,
                                "load1_after": load()})
                    print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--window-seconds", type=float, default=30.0)
    ap.add_argument("--parts", default="ceiling,actors,nodes")
    a = ap.parse_args(argv)
    print(json.dumps({"cores": os.cpu_count(), "load1": load(), "files": a.files, "seconds_each": a.seconds}))
    with tempfile.TemporaryDirectory(prefix="aarc-bench-") as d:
        src = corpus(Path(d) / "src", a.files, a.seconds)
        res = []
        if "ceiling" in a.parts:
            bench_ceiling()
        if "actors" in a.parts:
            r = bench_actors(src, Path(d), [1, 2], a.window_seconds)
            res += r
            print(json.dumps({"actors_speedup_2_vs_1": round(r[1]["x_realtime"] / r[0]["x_realtime"], 2)}))
        if "nodes" in a.parts:
            r = bench_nodes(src, Path(d), a.window_seconds)
            print(json.dumps({"nodes_speedup_2_vs_1": round(r[1]["x_realtime"] / r[0]["x_realtime"], 2)}))


if __name__ == "__main__":
    main()
