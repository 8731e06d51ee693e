"""The pipeline against a plain script, side by side in one run, its fixed costs, and its memory by file length.

    python -m jobs.bench.bench_throughput [--minutes 10 120] [--real] [--executors local ray] [--clips 10000]
        [--clip-seconds 0.5 5] [--gens-files 1000] [--commit-every 50] [--memory-minutes 3 180 1440] [--skip long one gens clips memory]

* A plain loop (soundfile decode -> soxr resample -> windows -> ``codec.encode`` with torch on every core),
  timed twice: on its own clock with the codec already loaded (``loop_x``), and as a script in a fresh process,
  start-up included (``loop_process_x``, as a user times ``python loop.py``); and ``audioarc encode --quality-sample 0`` (a fresh process: start-up,
  codec load, listing, commits included) with each ``--executors`` (``local``: in-process, the default on one
  machine; ``ray``: the Ray Data pipeline), on the same synthetic music-like FLAC files (``--minutes`` of audio in
  1-3 minute files, 44.1 kHz mono; with ``--real``, Debian game-music OGG, 44.1/48 kHz stereo): x realtime each, the ratio pipeline / loop against both loop figures, and
  the pipeline's per-stage seconds.
* A one-file job end to end (CLI in a fresh process).
* The cost of a generation boundary: the same ``--gens-files`` files with ``--commit-every`` 50 (or as given) and
  5000: files/s of each, and per boundary the wall difference over the number of extra generations.
* Small files: ``--clips`` clips of each ``--clip-seconds`` at 1.5 kbps: files/s of the pipeline and of the loop,
  and the pipeline's wall per file.
* Memory: one input of each ``--memory-minutes`` (24 kHz mono FLAC), encoded alone; the peak private memory (USS:
  Private_Clean + Private_Dirty of /proc/PID/smaps, sampled every 0.25 s) of every process of the job (the CLI
  and, under Ray, its raylet and workers), the largest per process kind; pages of Ray's object store (a
  /dev/shm file, private to the worker that wrote them when no other process mapped them) apart, as
  ``object_store_pages``: the store's memory, bounded by its budget, not a process's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def _synth(path: Path, seconds: float, rate: int, seed: int, block_s: float = 600.0) -> None:
    """Music-like test audio (a gliding tone and noise), written in blocks: any length in bounded memory."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * rate)
    part = path.with_name(path.name + ".part")  # renamed into place when complete: a killed run leaves no half file
    with sf.SoundFile(str(part), "w", rate, 1, format=path.suffix[1:].upper()) as f:
        for start in range(0, n, int(block_s * rate)):
            t = np.arange(start, min(n, start + int(block_s * rate))) / rate
            x = 0.2 * np.sin(2 * np.pi * (220 + 110 * np.sin(0.1 * t + seed)) * t) + 0.05 * rng.standard_normal(t.size)
            f.write(x.astype(np.float32))
    os.replace(part, path)


def plain_loop(files: list[Path], bitrate: float, threads: int) -> tuple[float, float]:
    """What a user's 30-line script does; returns (audio seconds, wall seconds)."""
    import torch

    from pipeline import archive, audio
    from pipeline.codec import registry
    from pipeline.codec.windows import encode_array
    torch.set_num_threads(threads)
    codec = registry.load(registry.DEFAULT_CODEC)
    n_q = codec.n_q_for_kbps(bitrate)
    t = time.perf_counter()
    secs = 0.0
    with torch.inference_mode():
        for p in files:
            x, sr = sf.read(str(p), dtype="float32", always_2d=True)
            secs += x.shape[0] / sr
            r = audio.Resampler(sr, codec.sample_rate, x.shape[1])
            y = np.concatenate([r.process(x.T), r.flush()], axis=1)
            for ch in y:
                codes = encode_array(codec, ch[None], n_q, window_frames=int(30 * codec.frame_rate))
                archive.pack_codes(np.asarray(codes), 10)
    return secs, time.perf_counter() - t


def plain_loop_process(files: list[Path], bitrate: float, threads: int) -> tuple[float, float]:
    """The same loop run as a user runs a script (``time python loop.py``): a fresh process, its imports and codec
    load inside the clock, as the pipeline's figure has them. Returns (audio seconds, wall seconds)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(str(p) for p in files))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from jobs.bench.bench_throughput import plain_loop; "
            "from pathlib import Path; files = [Path(x) for x in open(sys.argv[2]).read().split(chr(10))]; "
            "print(plain_loop(files, float(sys.argv[3]), int(sys.argv[4]))[0])")
    root = str(Path(__file__).resolve().parents[2])
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, root, f.name, str(bitrate), str(threads)],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    os.unlink(f.name)
    return float(out.stdout.strip().splitlines()[-1]), wall


def _uss_kib(pid: int) -> tuple[int, int]:
    """(private KiB of ``pid`` outside Ray's object store, private KiB of its object store mapping): the store's
    shared-memory file (``/dev/shm/plasma*``) counts as private to the one worker that wrote a page no other
    process mapped, though it is the store's memory, bounded by its own budget, not the process's."""
    own = store = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            in_store = False
            for ln in f:
                if ln[:1] in "0123456789abcdef" and "-" in ln.split(" ", 1)[0]:
                    parts = ln.split()
                    name = parts[5] if len(parts) > 5 else ""
                    in_store = name.startswith("/dev/shm/") or "plasma" in name
                elif ln.startswith(("Private_Clean:", "Private_Dirty:")):
                    kib = int(ln.split()[1])
                    if in_store:
                        store += kib
                    else:
                        own += kib
    except OSError:
        pass
    return own, store


def _tree(root: int) -> dict[int, str]:
    """pid -> command name of ``root`` and all its descendants."""
    parent, name = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            name[int(d)] = s[s.index("(") + 1:s.rindex(")")]
            parent[int(d)] = int(s[s.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        if p in name:
            out[p] = name[p]
            todo += [c for c, pp in parent.items() if pp == p]
    return out


class UssMonitor:
    """Peak USS per process kind (command name) of a process tree, sampled in a thread; the object store's pages
    (see ``_uss_kib``) apart, as the peak of their sum over the tree."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.peak, self.store = pid, every, {}, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            store = 0
            for p, n in _tree(self.pid).items():
                kind = "driver" if p == self.pid else n
                own, st = _uss_kib(p)
                self.peak[kind] = max(self.peak.get(kind, 0), own)
                store += st
            self.store = max(self.store, store)
            self.stop.wait(self.every)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        out = {k: round(v / 1024, 1) for k, v in sorted(self.peak.items(), key=lambda kv: -kv[1]) if v > 20 * 1024}
        if self.store:
            out["object_store_pages"] = round(self.store / 1024, 1)
        return out


def pipeline_run(src: Path, dest: Path, *extra: str, uss: bool = False) -> tuple[dict, float, dict | None]:
    shutil.rmtree(dest, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "encode", str(src), str(dest), "--quality-sample",
                          "0", "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mon = UssMonitor(p.pid) if uss else None
    out, err = p.communicate()
    wall = time.perf_counter() - t
    peaks = mon.finish() if mon else None
    if p.returncode != 0:
        raise RuntimeError(err[-3000:])
    return json.loads(out), wall, peaks


def _corpus(src: Path, minutes: float) -> list[Path]:
    left, i = minutes * 60, 0
    while left > 0:
        secs = min(left, 60 + 60 * (i % 3))
        p = src / f"t{i:03d}.flac"
        if not p.exists():
            _synth(p, secs, 44100, i)
        left -= secs
        i += 1
    return sorted(src.glob("*.flac"))[:i]


def _real_corpus(src: Path, minutes: float) -> list[Path]:
    """Real music from Debian's game-music packages (44.1/48 kHz stereo OGG, fetched once into the corpus cache),
    linked under ``src`` in a fixed order until ``minutes`` of audio: the issue's kind of library."""
    from pipeline import corpus
    cache = corpus.fetch([p for p, kind in corpus.PACKAGES.items() if kind == "music"])
    src.mkdir(parents=True, exist_ok=True)
    left, out = minutes * 60, []
    for i, f in enumerate(corpus.audio_files(cache)):
        if left <= 0:
            break
        if corpus.kind_of(f) != "music":
            continue
        link = src / f"r{i:03d}{f.suffix.lower()}"
        if not link.exists():
            link.symlink_to(f)
        out.append(link)
        left -= sf.info(str(f)).duration
    if left > 0:
        raise SystemExit(f"only {minutes - left / 60:.0f} minutes of real music in {cache}; ask for fewer --minutes")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[10.0])
    ap.add_argument("--executors", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--clip-seconds", type=float, nargs="+", default=[0.5])
    ap.add_argument("--gens-files", type=int, default=1000)
    ap.add_argument("--commit-every", type=int, default=50, help="the small --commit-every set against 5000")
    ap.add_argument("--memory-minutes", type=float, nargs="+", default=[3.0, 180.0])
    ap.add_argument("--real", action="store_true",
                    help="time the long runs on real music (Debian game-music OGG) instead of synthetic FLAC")
    ap.add_argument("--work", default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["long", "one", "gens", "clips", "memory"])
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-throughput-"))
    threads = len(os.sched_getaffinity(0))
    out: dict = {"cpus": threads}

    def say(key, value):
        out[key] = value
        print(json.dumps({key: value}), flush=True)

    if "long" not in args.skip:
        for minutes in args.minutes:
            src = work / (f"real-{minutes:g}" if args.real else f"music-{minutes:g}")
            files = (_real_corpus if args.real else _corpus)(src, minutes)
            a, w = plain_loop(files, 6.0, threads)
            _, wp = plain_loop_process(files, 6.0, threads)
            row = {"audio_minutes": round(a / 60, 1), "loop_x": round(a / w, 1), "loop_wall_s": round(w, 1),
                   "loop_process_x": round(a / wp, 1), "loop_process_wall_s": round(wp, 1)}
            for ex in args.executors:
                s, wall, _ = pipeline_run(src, work / "arc-music", "--executor", ex)
                row[f"{ex}_x"] = round(s["audio_seconds"] / wall, 1)
                row[f"{ex}_wall_s"] = round(wall, 1)
                row[f"{ex}_ratio"] = round((s["audio_seconds"] / wall) / (a / w), 2)  # vs the loop's own clock
                row[f"{ex}_ratio_process"] = round(wp / wall, 2)  # vs the loop as a process, start-up included
                row[f"{ex}_stages"] = s.get("stage_seconds")
            say(f"long_{minutes:g}min" + ("_real" if args.real else ""), row)
    if "one" not in args.skip:
        one = work / "one"
        _synth(one / "x.flac", 30, 44100, 0)
        say("one_file_job_s", {ex: round(pipeline_run(one, work / "arc-one", "--executor", ex)[1], 1)
                               for ex in args.executors})
    if "gens" not in args.skip:
        g = work / "gens"
        for k in range(args.gens_files):
            p = g / f"g{k:04d}.wav"
            if not p.exists():
                _synth(p, 2.0, 16000, k)
        small = args.commit_every
        _, w_small, _ = pipeline_run(g, work / "arc-gens", "--commit-every", str(small))
        _, w_big, _ = pipeline_run(g, work / "arc-gens", "--commit-every", "5000")
        extra = -(-args.gens_files // small) - 1
        say("generations", {"files": args.gens_files, f"commit_every_{small}_wall_s": round(w_small, 2),
                            f"commit_every_{small}_files_s": round(args.gens_files / w_small, 1),
                            "commit_every_5000_wall_s": round(w_big, 2),
                            "commit_every_5000_files_s": round(args.gens_files / w_big, 1),
                            "generations": extra + 1,
                            "per_boundary_s": round((w_small - w_big) / max(1, extra), 3)})
    if "clips" not in args.skip:
        for secs in args.clip_seconds:
            c = work / f"clips-{secs:g}"
            for k in range(args.clips):
                p = c / f"d{k // 1000:02d}" / f"c{k:05d}.wav"
                if not p.exists():
                    _synth(p, secs, 16000, k)
            files = sorted(c.rglob("*.wav"))[: args.clips]
            _, w = plain_loop(files, 1.5, threads)
            _, wp = plain_loop_process(files, 1.5, threads)
            s, wall, _ = pipeline_run(c, work / "arc-clips", "--bitrate", "1.5")
            say(f"clips_{secs:g}s", {"clips": len(files), "pipeline_files_s": round(s["files_archived"] / wall, 1),
                                     "loop_files_s": round(len(files) / w, 1),
                                     "loop_process_files_s": round(len(files) / wp, 1),
                                     "ratio_process": round(wp / wall, 2),
                                     "pipeline_ms_per_file": round(1000 * wall / s["files_archived"], 2),
                                     "ratio": round((s["files_archived"] / wall) / (len(files) / w), 2)})
    if "memory" not in args.skip:
        for minutes in args.memory_minutes:
            m = work / f"mem-{minutes:g}"
            if not (m / "long.flac").exists():
                _synth(m / "long.flac", minutes * 60, 24000, 7)
            row = {}
            for ex in args.executors:
                s, wall, peaks = pipeline_run(m, work / "arc-mem", "--executor", ex, uss=True)
                row[ex] = {"wall_s": round(wall, 1), "x": round(s["audio_seconds"] / wall, 1), "uss_mib": peaks}
            say(f"memory_{minutes:g}min", row)
            shutil.rmtree(work / "arc-mem", ignore_errors=True)
    print(json.dumps(out, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
