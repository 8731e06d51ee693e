"""The README's first command: fetch a small real corpus from Debian packages and archive it."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import corpus


def prepare_corpus(src: Path, n_files: int) -> str:
    """Copy ``n_files`` real recordings (speech + music) into ``src``; synthetic audio if Debian is unreachable."""
    if src.exists() and any(src.rglob("*.*")):
        return "existing"
    try:
        root = corpus.fetch(["fillets-ng-data-cs", "singularity-music"])
        files = corpus.audio_files(root)
        music = [f for f in files if corpus.kind_of(f) == "music"][: max(1, n_files // 6)]
        speech = [f for f in files if corpus.kind_of(f) == "speech"][: n_files - len(music)]
        for f in music + speech:
            dst = src / corpus.kind_of(f) / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        return f"{len(music)} music + {len(speech)} speech files from Debian packages"
    except Exception as e:  # noqa: BLE001 - offline machines get generated audio instead
        print(f"could not fetch the Debian corpus ({e}); generating synthetic audio instead", file=sys.stderr)
        import numpy as np
        import soundfile as sf
        rng = np.random.default_rng(0)
        for i in range(n_files):
            rate = [16000, 22050, 44100, 48000][i % 4]
            t = np.arange(int(rate * (2 + i % 5))) / rate
            x = 0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
            dst = src / f"synthetic_{i:03d}.flac"
            dst.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(dst), x.astype(np.float32), rate)
        return f"{n_files} synthetic files"


def run_demo(workdir: str, n_files: int, run_command) -> int:
    """Prepare the corpus and archive it with ``run_command(argv) -> exit code`` (the CLI's own ``main``)."""
    wd = Path(workdir).resolve()
    src, dest = wd / "src", wd / "archive"
    what = prepare_corpus(src, n_files)
    print(f"corpus: {src} ({what})")
    code = run_command(["encode", str(src), str(dest), "--bitrate", "6"])
    exe = _executable()
    print("\nnext:")
    for cmd in (f"ls {dest}", f"inspect {dest}", f"verify {dest}", f"restore {dest} {wd / 'restored'}"):
        print(f"  {exe} {cmd}")
    return code


def _executable() -> str:
    """How to run audioarc again from here: the script this process runs as (e.g. .venv/bin/audioarc)."""
    import os
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "audioarc":
        found = shutil.which("audioarc")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return "audioarc"  # on PATH
        return os.path.relpath(argv0) if not os.path.relpath(argv0).startswith("..") else argv0
    return f"{sys.executable} -m pipeline.cli"
