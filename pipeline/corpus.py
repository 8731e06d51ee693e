"""Real audio corpora from Debian packages (fetched with apt-get download + dpkg-deb -x, no install).

Used to train and evaluate codecs and for the README's demo job; a deterministic hash split keeps
a held-out part that training never sees.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .audio import AUDIO_EXTENSIONS  # noqa: E402,F401 - one list for every reader

#: package -> kind of content
PACKAGES: dict[str, str] = {
    "singularity-music": "music",
    "fretsonfire-songs-muldjord": "music",
    "planetblupi-music-ogg": "music",
    "fillets-ng-data-cs": "speech",
    "klettres-data": "speech",
}


def default_cache() -> Path:
    return Path(os.environ.get("AUDIOARC_CORPUS_DIR", Path.home() / ".cache" / "audioarc" / "corpus"))


def fetch(packages: list[str] | None = None, cache: Path | None = None, log=print) -> Path:
    """Download and unpack ``packages`` under ``cache``; returns ``cache``. Already-unpacked ones are kept."""
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    for pkg in packages or list(PACKAGES):
        target = cache / pkg
        if (target / ".done").exists():
            continue
        debs = cache / "_debs"
        debs.mkdir(exist_ok=True)
        log(f"fetching Debian package {pkg} ...")
        subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True, capture_output=True)
        deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
        if target.exists():
            shutil.rmtree(target)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        (target / ".done").write_text(deb.name)
        deb.unlink()
    return cache


def audio_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def is_heldout(path: Path | str, fraction: float = 0.1) -> bool:
    """Deterministic split on the file name's hash: ``fraction`` of files are held out."""
    h = int(hashlib.sha1(str(Path(path).name).encode() + str(Path(path).parent.name).encode()).hexdigest(), 16)
    return (h % 1000) < fraction * 1000


def kind_of(path: Path | str) -> str:
    for pkg, kind in PACKAGES.items():
        if pkg in str(path):
            return kind
    return "other"
