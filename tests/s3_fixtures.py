"""Shared S3 fixtures: one SeaweedFS server per test session, tiny synthetic audio, Ray started once.

Loaded for the whole session by ``tests/conftest.py``.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
          "AUDIOARC_S3_ENDPOINT", "AWS_PROFILE", "AWS_SESSION_TOKEN")


def clear_s3_cache() -> None:
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def devs3(tmp_path_factory):
    """A running SeaweedFS S3 server; its credentials are in os.environ for the whole session."""
    from pipeline.devs3 import DevS3, find_weed
    try:
        find_weed()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SeaweedFS not available: {e}")
    saved = {k: os.environ.get(k) for k in S3_ENV}
    s3 = DevS3(str(tmp_path_factory.mktemp("devs3")))
    s3.start()
    for k in S3_ENV:
        os.environ.pop(k, None)
    os.environ.update(s3.env())
    clear_s3_cache()
    try:
        yield s3
    finally:
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_s3_cache()


@pytest.fixture(scope="session")
def ray_s3(devs3, ray_cluster):
    """The session's Ray node; conftest starts it after the S3 env is set, so workers get it."""
    yield ray_cluster


def write_tones(root, n: int, seconds: float = 2.0) -> list[str]:
    """``n`` short sine files at assorted rates/channels under local folder ``root``."""
    import soundfile as sf
    os.makedirs(root, exist_ok=True)
    rates = [(16000, 1), (44100, 2), (48000, 1), (22050, 1), (32000, 2)]
    out = []
    for i in range(n):
        sr, ch = rates[i % len(rates)]
        t = np.arange(int(sr * (seconds + 0.25 * (i % 3)))) / sr
        x = np.stack([0.3 * np.sin(2 * np.pi * (200 + 37 * i + 50 * c) * t) for c in range(ch)], 1)
        sub = "a" if i % 2 else "b"
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        p = os.path.join(root, sub, f"tone{i:03d}.{'flac' if i % 2 else 'wav'}")
        sf.write(p, x.astype(np.float32), sr)
        out.append(p)
    return out


@pytest.fixture
def s3_prefix(devs3):
    """A fresh s3:// prefix in the dev bucket."""
    return f"s3://{devs3.bucket}/t-{uuid.uuid4().hex[:8]}"


def upload_tree(local_root: str, url: str) -> None:
    from pipeline import storage
    fs, path = storage.fs_and_path(url)
    fs.put(local_root.rstrip("/") + "/", path, recursive=True)
