"""Structure of the deploy manifests (PyYAML only; no cluster): kinds, API versions, GPU group, entrypoints."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def subcommand_options(cmd: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[cmd]
    return {o for a in sub._actions for o in a.option_strings}


def test_raycluster_cpu_head_autoscaling_gpu_workers():
    (rc,) = docs("raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert {"metrics": 8080}.items() <= {p.get("name"): p["containerPort"] for p in head["ports"]}.items()
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > gpu["minReplicas"]
    pod = gpu["template"]["spec"]
    c = pod["containers"][0]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    for g in spec["workerGroupSpecs"]:
        ports = {p.get("name"): p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]}
        assert ports.get("metrics") == 8080
        assert g["rayStartParams"]["metrics-export-port"] == "8080"


@pytest.mark.parametrize("name,module,cmd", [("rayjob-encode.yaml", "jobs.encode", "encode"),
                                             ("rayjob-restore.yaml", "jobs.restore", "restore")])
def test_rayjob_entrypoints_name_real_modules_and_options(name, module, cmd):
    (job,) = docs(name)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    (rc,) = docs("raycluster.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", module]
    assert importlib.util.find_spec(module) is not None
    known = subcommand_options(cmd)
    opts = [a.split("=", 1)[0] for a in argv[3:] if a.startswith("--")]
    assert opts and all(o in known for o in opts), set(opts) - known
    build_parser().parse_args([cmd, *argv[3:]])  # parses as the CLI would


def test_train_rayjob_gives_every_worker_a_gpu_and_the_shared_run_dir():
    """The training RayJob: its entrypoint parses with train_codec's own parser; the GPU group is fixed at
    --workers replicas (the driver reads the cluster's GPUs when it starts); every pod mounts the one
    ReadWriteMany claim that holds --run-dir, --cache and --out (rank 0 checkpoints, all ranks resume)."""
    from pipeline import train as train_codec
    pvc, job = docs("rayjob-train.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train_codec"]
    args = train_codec.build_parser().parse_args(argv[3:])
    assert args.resume and args.data.startswith("s3://")
    spec = job["spec"]["rayClusterSpec"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == gpu["replicas"] == gpu["maxReplicas"] == args.workers
    pod = gpu["template"]["spec"]
    c = pod["containers"][0]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert float(c["resources"]["limits"]["cpu"]) >= args.worker_cpus
    for p in (spec["headGroupSpec"]["template"]["spec"], pod):
        claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in p["volumes"]}
        (mount,) = [m for m in p["containers"][0]["volumeMounts"] if claim.get(m["name"]) == pvc["metadata"]["name"]]
        for path in (args.run_dir, args.cache, args.out):
            assert str(path).startswith(mount["mountPath"] + "/"), path


def test_podmonitors_scrape_head_and_workers_metrics_port():
    pms = docs("podmonitors.yaml")
    assert {d["kind"] for d in pms} == {"PodMonitor"}
    assert all(d["apiVersion"] == "monitoring.coreos.com/v1" for d in pms)
    types = {d["spec"]["selector"]["matchLabels"]["ray-node-type"] for d in pms}
    assert types == {"head", "worker"}
    assert all(e["port"] == "metrics" for d in pms for e in d["spec"]["podMetricsEndpoints"])


def test_dockerfile_variants():
    text = (K8S.parent / "Dockerfile").read_text()
    assert "rayproject/ray" in text and "download.pytorch.org/whl/cpu" in text and "cu1" in text


def test_the_code_ray_uploads_with_a_job_stays_under_its_cap():
    """`ray job submit --working-dir` / `audioarc ... --address http://...` upload the repository minus
    WORKING_DIR_EXCLUDES, and Ray refuses a runtime env package over 100 MiB (HTTP 413). Archives carry their own
    weights, so only the current release ships (earlier ones live in deploy/weights/, not uploaded): the upload
    stays far under the cap, with room for the next release."""
    import fnmatch
    import subprocess

    from pipeline.cluster import PACKAGE_ROOT, WORKING_DIR_EXCLUDES
    files = subprocess.run(["git", "ls-files"], cwd=PACKAGE_ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\n")

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        return any(fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(p, pat) for p in parts)
                   for pat in WORKING_DIR_EXCLUDES)
    size = sum((PACKAGE_ROOT / f).stat().st_size for f in files if f and not excluded(f))
    assert size < 50 * 2**20, f"{size / 2**20:.1f} MiB would be uploaded with a Ray job (cap 100 MiB)"
    import torch
    files = sorted((PACKAGE_ROOT / "pipeline/codec/weights").glob("*.pt"))
    shipped = {p.name: p.stat().st_size for p in files}
    full = [p.name for p in files if "delta_of" not in torch.load(p, weights_only=True, map_location="cpu")]
    assert full == ["mdct_rvq.pt", "neural_rvq.pt"]  # one full checkpoint per codec: the current one
    # the rest: deltas, of a few tensors (KiB) or of one shared decoder (release 8 over 9: 3.8 MiB)
    assert all(n < 5 * 2**20 for name, n in shipped.items() if name not in full), shipped
    assert sum(n for name, n in shipped.items() if name not in full) < 8 * 2**20, shipped
