"""What ``audioarc tune`` buys on narrow libraries the release never saw.

    python -m jobs.bench.bench_tune [--minutes 12] [--libraries speech-en music-fillets] [--threads 1] [--work DIR]

Two libraries are built from Debian's ``fillets-ng-data`` (the release trained on the Czech voice package
``fillets-ng-data-cs`` and on other games' music, never on this one):

* ``speech-en``: the English voice lines (``sound/<level>/en/*.ogg``), one folder per level;
* ``music-fillets``: the game's 15 ambient music tracks (``music/*.ogg``).

Each is tuned by ``audioarc tune LIB --minutes M`` in its own process (as a user runs it); the script prints the
per-rung table tune prints (base vs tuned log-mel distance and STOI on held-out files the fine-tune never saw),
the lowest rung at which tuned matches the base at 6 kbps, and the CPU minutes the process spent.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "fillets-ng-data"


def build_libraries(cache: Path, work: Path) -> dict[str, Path]:
    """The two libraries as folders of symlinks under ``work`` (relative paths keep the level as a folder)."""
    from pipeline import corpus
    root = corpus.fetch([PACKAGE], cache) / PACKAGE / "usr/share/games/fillets-ng"
    libs = {"speech-en": work / "speech-en", "music-fillets": work / "music-fillets"}
    for p in sorted((root / "sound").glob("*/en/*.ogg")):
        dest = libs["speech-en"] / p.parent.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            os.symlink(p, dest)
    for p in sorted((root / "music").glob("*.ogg")):
        dest = libs["music-fillets"] / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            os.symlink(p, dest)
    return libs


def run_tune(lib: Path, out: Path, args) -> tuple[dict, float, float]:
    """(report, wall seconds, CPU seconds of the tune process and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    cmd = [sys.executable, "-m", "pipeline.cli", "tune", str(lib), "--minutes", f"{args.minutes:g}", "--out",
           str(out), "--threads", str(args.threads), "--max-files", str(args.max_files), "--json",
           "--eval-seconds", f"{args.eval_seconds:g}"]
    if args.lr:
        cmd += ["--lr", f"{args.lr:g}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        sys.exit(f"tune {lib} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout), wall, cpu


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0, help="training budget of each tune")
    ap.add_argument("--libraries", nargs="+", default=["speech-en", "music-fillets"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-files", type=int, default=400)
    ap.add_argument("--eval-seconds", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=None, help="(default: tune's)")
    ap.add_argument("--cache", type=Path, default=None, help="Debian package cache (default: the corpus cache)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    from pipeline import corpus
    from pipeline.tune import format_table
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    libs = build_libraries(args.cache or corpus.default_cache(), work)
    results = {}
    for name in args.libraries:
        lib = libs[name]
        n = sum(1 for _ in lib.rglob("*.ogg"))
        print(f"\n== {name}: {n} files ({lib}); tune --minutes {args.minutes:g} --threads {args.threads}", flush=True)
        rep, wall, cpu = run_tune(lib, work / f"{name}.pt", args)
        print(format_table(rep))
        print(f"process: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (training {rep['train']['wall_seconds'] / 60:.1f}"
              f" min wall, {rep['train']['steps']} steps)", flush=True)
        results[name] = {"report": rep, "wall_s": wall, "cpu_s": cpu}
    (work / "bench_tune.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nreports: {work / 'bench_tune.json'}")


if __name__ == "__main__":
    main()
