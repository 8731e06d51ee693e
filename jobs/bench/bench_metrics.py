"""Metric emission overhead on encode throughput: ``python -m jobs.bench.bench_metrics [--files N] [--seconds S]``.

Two measurements on one local Ray node:

1. end to end: the same synthetic corpus encoded with metrics (Ray metrics in workers + the driver's
   endpoint, scraped every second) and without (``emit_metrics=False``, no endpoint), alternating, ``--reps``
   times each; throughput = audio seconds / wall seconds, medians compared. On a small shared machine the
   run-to-run noise is usually larger than the effect, so also:
2. the cost of what the code adds per unit of work, timed in a Ray worker: the metric updates of one codec
   batch and of one decoded file, against the measured encode time of one batch / decode time of one file.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def make_corpus(root: Path, files: int, seconds: float) -> None:
    import numpy as np
    import soundfile as sf
    rng = np.random.default_rng(0)
    for i in range(files):
        rate = (16000, 24000, 44100, 48000)[i % 4]
        t = np.arange(int(rate * seconds)) / rate
        x = 0.3 * np.sin(2 * np.pi * (220 + 30 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(root / f"f{i:03d}.flac"), x.astype(np.float32), rate)


def scrape_while(url_box: list, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if url_box:
            try:
                urllib.request.urlopen(url_box[0], timeout=2).read()
            except OSError:
                pass


def end_to_end(src: Path, work: Path, reps: int, window: float) -> dict[str, list[float]]:
    from pipeline.encode import EncodeConfig, run_encode
    out: dict[str, list[float]] = {"on": [], "off": []}
    runs = ["off", "on"] * reps
    runs = ["on"] + runs  # warm-up (codec load, worker start), not counted
    for i, mode in enumerate(runs):
        on = mode == "on"
        cfg = EncodeConfig(src=str(src), dest=str(work / f"arc{i}"), window_seconds=window,
                           metrics_port=0 if on else None, emit_metrics=on)
        box: list = []
        stop = threading.Event()
        th = threading.Thread(target=scrape_while, args=(box, stop), daemon=True)
        th.start()
        s = run_encode(cfg, on_metrics=box.append)
        stop.set()
        th.join()
        rt = s.audio_seconds / s.wall_seconds
        if i > 0:
            out[mode].append(rt)
        print(f"  run {i} metrics={mode:3} {s.audio_seconds:.0f} s audio in {s.wall_seconds:.2f} s "
              f"= {rt:.2f}x realtime{'  (warm-up)' if i == 0 else ''}", flush=True)
    return out


def micro() -> dict:
    """Per-batch / per-file metric cost vs the work it rides on, measured inside a Ray worker."""
    import ray

    @ray.remote(num_cpus=0.5)
    def measure() -> dict:
        import numpy as np
        import torch

        from pipeline import telemetry as metrics
        from pipeline.codec import registry
        torch.set_num_threads(1)
        em = metrics.Emitter({"job_id": "bench", "codec": "mdct_rvq", "bitrate": "6"})
        n = 2000
        t = time.perf_counter()
        for _ in range(n):  # what CodecActor.__call__ adds per batch
            em.inc("audioarc_audio_seconds_in", 4.0, stage="encode")
            em.inc("audioarc_audio_seconds_out", 4.0, stage="encode")
            em.inc("audioarc_files_out", 1, stage="encode")
            em.observe("audioarc_encode_batch_seconds", 0.1)
            em.observe("audioarc_encode_batch_windows", 4)
        per_batch = (time.perf_counter() - t) / n
        t = time.perf_counter()
        for _ in range(n):  # what decode_file adds per file
            em.inc("audioarc_files_in", stage="decode")
            em.inc("audioarc_bytes_read", 12345)
            em.inc("audioarc_files_out", stage="decode")
            em.inc("audioarc_audio_seconds_out", 3.0, stage="decode")
            em.observe("audioarc_decode_file_seconds", 0.2)
        per_file = (time.perf_counter() - t) / n
        codec = registry.load("mdct_rvq", None)
        n_q = codec.n_q_for_kbps(6.0)
        length = int(round(codec.frame_rate)) * codec.hop_length + sum(codec.encode_context)  # 1 s windows
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 1, length)).astype(np.float32) * 0.1)
        with torch.inference_mode():
            codec.encode(x, n_q)
            t = time.perf_counter()
            for _ in range(5):
                codec.encode(x, n_q)
        batch_1s = (time.perf_counter() - t) / 5
        return {"per_batch_s": per_batch, "per_file_s": per_file, "encode_batch_4x1s_s": batch_1s}

    return ray.get(measure.remote())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per file")
    ap.add_argument("--reps", type=int, default=2, help="end-to-end runs per mode")
    ap.add_argument("--window-seconds", type=float, default=5.0)
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args()
    from pipeline.runtime import init_ray
    init_ray()
    m = micro()
    # default batch: 4 windows of --window-seconds; cost of the codec scales ~linearly with window length
    batch_s = m["encode_batch_4x1s_s"] * a.window_seconds
    print(f"metric updates: {m['per_batch_s'] * 1e6:.1f} us per codec batch, {m['per_file_s'] * 1e6:.1f} us per "
          f"decoded file; one codec batch (4 x {a.window_seconds:g} s) takes {batch_s * 1e3:.1f} ms "
          f"-> {100 * m['per_batch_s'] / batch_s:.3f}% of encode time")
    if a.skip_e2e:
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        make_corpus(src, a.files, a.seconds)
        print(f"end to end: {a.files} files x {a.seconds:g} s, {a.reps} runs per mode")
        r = end_to_end(src, Path(tmp), a.reps, a.window_seconds)
    on, off = statistics.median(r["on"]), statistics.median(r["off"])
    print(f"median throughput: with metrics {on:.2f}x realtime, without {off:.2f}x "
          f"-> overhead {100 * (off - on) / off:+.1f}% (runs: on {['%.2f' % x for x in r['on']]}, "
          f"off {['%.2f' % x for x in r['off']]})")


if __name__ == "__main__":
    main()
