"""Speed and memory of the EnCodec adapters on this machine's CPU.

    python -m jobs.bench.bench_encodec [--codec encodec_24khz --weights PATH --kbps 6 --threads 1 --minutes 10]

* speed: x realtime of encode and decode through the windowed helpers (``encode_array`` /
  ``decode_array``, 30 s windows as the pipeline uses), on ``--seconds`` of chirp + tone + noise;
* memory: peak RSS of a fresh process coding ``--minutes`` of audio, two ways: the whole-array helpers
  (which hold the input, codes and output arrays) and streaming (``Windower`` -> encode -> ``Joiner``,
  blocks in and out as the pipeline does; also for 1 minute, to show the peak does not grow with the
  length), against the process after loading the model.

Without ``--weights``, random weights of the real architecture (speed and memory do not depend on
the values). One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _codec(name: str, weights: str | None):
    from pipeline.codec import encodec_adapter as ea
    from pipeline.codec import registry
    if weights:
        return registry.load(name, weights)
    cls = {"encodec_24khz": ea.Encodec24kCodec, "encodec_48khz": ea.Encodec48kCodec}[name]
    return ea.random_codec(cls, 0)


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, MiB. Not ``ru_maxrss``: on Linux
    that survives exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed(codec, kbps: float, seconds: float) -> dict:
    from pipeline.codec.encodec_adapter import probe_audio
    from pipeline.codec.windows import decode_array, encode_array
    n_q = codec.n_q_for_kbps(kbps)
    wf = -(-int(30 * codec.frame_rate) // codec.segment_frames) * codec.segment_frames
    x = probe_audio(seconds, codec.sample_rate, codec.channels, seed=1)
    g = codec.side_gains
    encode_array(codec, x[:, : codec.sample_rate], n_q, wf, with_gains=g)  # warm-up
    t0 = time.perf_counter()
    out = encode_array(codec, x, n_q, wf, with_gains=g)
    t1 = time.perf_counter()
    codes, gains = out if g else (out, None)
    decode_array(codec, codes, x.shape[1], wf, gains=gains)
    t2 = time.perf_counter()
    return {"codec": codec.name, "kbps": kbps, "n_q": n_q, "seconds": seconds, "threads": torch.get_num_threads(),
            "window_s": round(wf / codec.frame_rate, 2), "encode_x_realtime": round(seconds / (t1 - t0), 2),
            "decode_x_realtime": round(seconds / (t2 - t1), 2)}


def memory(codec, kbps: float, minutes: float, mode: str) -> dict:
    """Run in a fresh process (``--memory-child``): peak RSS is per process."""
    from pipeline.codec.encodec_adapter import probe_audio
    from pipeline.codec.windows import Joiner, Windower, decode_array, encode_array
    n_q = codec.n_q_for_kbps(kbps)
    wf = -(-int(30 * codec.frame_rate) // codec.segment_frames) * codec.segment_frames
    sr, cc = codec.sample_rate, codec.channels
    n = int(minutes * 60 * sr)
    block = probe_audio(10.0, sr, cc, seed=2)  # the signal: this 10 s block repeated
    base = _rss_mb("VmRSS")  # torch, the package and the model loaded
    t0 = time.perf_counter()
    if mode == "helpers":
        x = np.tile(block, (1, -(-n // block.shape[1])))[:, :n]
        out = encode_array(codec, x, n_q, wf, with_gains=codec.side_gains)
        codes, gains = out if codec.side_gains else (out, None)
        y = decode_array(codec, codes, n, wf, gains=gains)
        assert y.shape == x.shape
    else:
        win, joiner = Windower(codec, wf, cc), Joiner(codec, n)
        done = out_n = 0

        def code(ws):
            nonlocal out_n
            for w in ws:
                with torch.inference_mode():
                    c, g = codec.encode_with_gains(torch.from_numpy(w.samples).reshape(-1, cc, w.samples.shape[1]),
                                                   n_q)
                for y in joiner.feed(c.numpy(), None if g is None else g.numpy()):
                    out_n += y.shape[1]

        while done < n:
            b = block[:, : min(block.shape[1], n - done)]
            done += b.shape[1]
            code(win.push(b))
        code(win.finish())
        for y in joiner.finish():
            out_n += y.shape[1]
        assert out_n == n
    return {"codec": codec.name, "mode": mode, "minutes": minutes, "threads": torch.get_num_threads(),
            "window_s": round(wf / codec.frame_rate, 2), "rss_after_load_mb": round(base, 1),
            "peak_rss_mb": round(_rss_mb(), 1),
            "peak_above_load_mb": round(_rss_mb() - base, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="encodec_24khz", choices=["encodec_24khz", "encodec_48khz"])
    ap.add_argument("--weights")
    ap.add_argument("--kbps", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=60.0, help="audio for the speed run")
    ap.add_argument("--minutes", type=float, default=10.0, help="audio for the memory runs")
    ap.add_argument("--memory-child", choices=["helpers", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:
        print(json.dumps(memory(_codec(a.codec, a.weights), a.kbps, a.minutes, a.memory_child)), flush=True)
        return 0
    if not a.skip_speed:
        print(json.dumps(speed(_codec(a.codec, a.weights), a.kbps, a.seconds)), flush=True)
    runs = [("stream", m) for m in sorted({min(1.0, a.minutes), a.minutes})] + [("helpers", a.minutes)]
    for mode, minutes in runs:
        cmd = [sys.executable, "-m", "jobs.bench.bench_encodec", "--memory-child", mode, "--codec", a.codec,
               "--kbps", str(a.kbps), "--threads", str(a.threads), "--minutes", str(minutes)]
        if a.weights:
            cmd += ["--weights", a.weights]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(r.stdout.strip() or json.dumps({"mode": mode, "error": r.stderr[-2000:]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
