"""The in-process executor: the same stages as the Ray pipeline in one process, the same archive; bounded memory,
decoder errors surfaced, and ``--executor auto`` choosing it only when there is no cluster to use."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests import audio_factory as af
from tests.content import spectrogram_similarity


def _corpus(root):
    """Mono 16 kHz, stereo 44.1 kHz, 8 kHz in a sub-folder, a 70 s file (three 30 s windows), a broken file."""
    import soundfile as sf
    from tests.test_tune import rich
    src = root / "src"
    (src / "deep").mkdir(parents=True)
    sf.write(str(src / "mono16k.wav"), rich(4.0, 16000, 150.0, 4.0, seed=0), 16000)
    sf.write(str(src / "stereo44k.flac"), np.stack([rich(3.0, 44100, 220.0, 0.5, seed=2),
                                                    rich(3.0, 44100, 330.0, 2.0, seed=3)], axis=1), 44100)
    sf.write(str(src / "deep/telephone8k.wav"), rich(2.5, 8000, 120.0, 4.0, seed=4), 8000)
    sf.write(str(src / "long.flac"), rich(70.0, 24000, 180.0, 3.0, seed=1), 24000)
    af.not_audio(src / "broken.wav")
    return src


def _codes(dest):
    from pipeline import archive
    from pipeline.archive.shards import read_file_windows
    rec = archive.require_record(str(dest))
    out = {}
    for e in archive.Archive(str(dest), rec).iter_latest():
        if e.status == "archived":
            out[e.relpath] = [(fs, c) for fs, c, _ in read_file_windows(str(dest), e, rec.codec)]
    return out


def test_local_executor_writes_the_archive_the_ray_pipeline_writes(cli, tmp_path):
    import soundfile as sf
    src = _corpus(tmp_path)
    a = cli.json("encode", src, tmp_path / "local", "--executor", "local", "--quality-sample", "0", expect=3)
    b = cli.json("encode", src, tmp_path / "ray", "--executor", "ray", "--quality-sample", "0", expect=3)
    assert a["placement"]["executor"] == "local" and b["placement"]["executor"] == "ray"
    assert a["placement"]["threads"] >= 1
    for s in (a, b):  # where the time went, by stage, whichever executor ran them
        st = s["stage_seconds"]
        assert set(st) == {"fetch", "decode", "resample", "windowing", "codec_forward", "packing",
                           "listing_and_planning", "shard_write", "commit", "quality", "idle", "wall"}
        assert all(v >= 0 for v in st.values()) and st["codec_forward"] > 0 and st["decode"] > 0
        assert st["codec_forward"] < st["wall"] and st["commit"] > 0
    for s in (a, b):
        assert (s["files_total"], s["files_archived"], s["files_failed"]) == (5, 4, 1)
        assert [f["source"].endswith("broken.wav") for f in s["failures"]] == [True]
    ca, cb = _codes(tmp_path / "local"), _codes(tmp_path / "ray")
    assert sorted(ca) == sorted(cb) == ["deep/telephone8k.wav", "long.flac", "mono16k.wav", "stereo44k.flac"]
    for rel in ca:  # the same windows and the same codes, whichever executor ran the stages
        assert [fs for fs, _ in ca[rel]] == [fs for fs, _ in cb[rel]], rel
        for (_, x), (_, y) in zip(ca[rel], cb[rel]):
            assert x.shape == y.shape and np.mean(x == y) > 0.999, rel
    assert len(ca["long.flac"]) == 3
    # what went in comes back: every file, its length, its channels and its content
    assert cli("verify", tmp_path / "local", "--deep")[0] == 0
    code, _ = cli("restore", tmp_path / "local", tmp_path / "back", "--format", "wav")
    assert code == 0
    for rel in ca:
        orig, rate = sf.read(str(src / rel), always_2d=True)
        back, rate2 = sf.read(str(tmp_path / "back" / rel).rsplit(".", 1)[0] + ".wav", always_2d=True)
        assert rate2 == rate and back.shape == orig.shape, rel
        assert spectrogram_similarity(orig, back, rate) > 0.6, rel
    # a re-run in-process skips everything unchanged, reading no audio
    again = cli.json("encode", src, tmp_path / "local", "--executor", "local", "--quality-sample", "0", expect=3)
    assert again["files_skipped"] == 4 and again["files_archived"] == 4


def test_local_executor_runs_quality_sampling(cli, tmp_path):
    src = _corpus(tmp_path)
    s = cli.json("encode", src, tmp_path / "arc", "--executor", "local", "--quality-sample", "1.0",
                 "--quality-min-files", "1", expect=3)
    assert s["placement"]["executor"] == "local"
    q = s["quality"]["summary"]
    assert q["files_sampled"] == q["files_measured"] == 4


def test_a_fresh_process_encodes_without_ray(tmp_path):
    """``auto`` with no cluster: the job never imports Ray (no start-up cost), and the archive is complete."""
    src = tmp_path / "src"
    af.write(src / "a.wav", 2.0, 16000, kind="chirp")
    af.write(src / "b.flac", 1.0, 44100, channels=2, kind="chirp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    probe = ("import sys, json; from pipeline.cli import main; rc = main(sys.argv[1:]); "
             "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules}), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", probe, "encode", str(src), str(tmp_path / "arc"), "--quality-sample",
                        "0", "--json"], capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    import json
    tail = json.loads(p.stderr.strip().splitlines()[-1])
    summary = json.loads(p.stdout)
    assert tail == {"rc": 0, "ray": False}
    assert summary["files_archived"] == 2 and summary["placement"]["executor"] == "local"


def test_auto_chooses_ray_only_when_there_is_a_cluster_to_use(monkeypatch):
    from pipeline.encode import EncodeConfig, choose_executor
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as in a fresh process: Ray not imported
    base = EncodeConfig(src="a", dest="b")
    assert choose_executor(base, cuda=False) == "local"
    assert choose_executor(base, cuda=True) == "ray"  # a GPU wants the Ray decode fleet beside it
    from dataclasses import replace
    assert choose_executor(replace(base, gpus_per_actor=0), cuda=True) == "local"
    for kw in ({"address": "ray://head:10001"}, {"actors": 2}, {"max_actors": 4}, {"gpus_per_actor": 0.5}):
        assert choose_executor(replace(base, **kw), cuda=False) == "ray", kw
    assert choose_executor(replace(base, executor="ray"), cuda=False) == "ray"
    assert choose_executor(replace(base, executor="local"), cuda=True) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_executor(base, cuda=False) == "ray"
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match="--executor"):
        EncodeConfig(src="a", dest="b", executor="spark").validate()
    with pytest.raises(ConfigError, match="drop --address"):
        EncodeConfig(src="a", dest="b", executor="local", address="x:1").validate()


def _rows(fid: int, windows: int, samples: int):
    from pipeline.encode.stages import _row
    for k in range(windows):
        yield _row("win", fid, k, k * 10, 10, 1, np.zeros(samples, np.float32).tobytes())
    yield _row("info", fid, info="{}")


@pytest.mark.parametrize("encoders", [1, 3])
def test_stream_is_bounded_in_memory_and_keeps_every_row(encoders):
    """A 'file' of 400 windows passes through while at most the buffer and a batch per codec thread are held at
    once; with several codec threads every row still comes out once, and the batches were encoded in parallel."""
    from pipeline.encode import inprocess
    made = [0]
    lock = threading.Lock()
    held = {"now": 0, "max": 0}
    busy = {"now": 0, "max": 0}

    def decode(item):
        for r in _rows(item["file_id"], item["windows"], 1000):
            with lock:
                made[0] += 1
                held["now"] += 1
                held["max"] = max(held["max"], held["now"])
            yield r

    def encode(batch):
        with lock:
            busy["now"] += 1
            busy["max"] = max(busy["max"], busy["now"])
        time.sleep(0.002)
        with lock:
            held["now"] -= len(batch["kind"])
            busy["now"] -= 1
        return batch

    items = [{"file_id": 1, "windows": 400}, {"file_id": 2, "windows": 3}, {"file_id": 3, "windows": 0}]
    # 4000-byte windows: a buffer of 8 windows' bytes, batches of 4 windows
    out = list(inprocess.stream(items, decode, encode, batch_samples=4000, decoders=2, encoders=encoders,
                                queue_bytes=8 * 4000))
    kinds = [k for b in out for k in b["kind"]]
    fids = [int(f) for b in out for f, k in zip(b["file_id"], b["kind"]) if k == "info"]
    assert len(kinds) == made[0] == 400 + 3 + 3 and sorted(fids) == [1, 2, 3]
    assert held["max"] <= 8 + 4 * encoders + 2 + 2  # queue + a batch per codec thread + a row in each decoder's hand
    seqs = [int(s) for b in out for s, f, k in zip(b["seq"], b["file_id"], b["kind"]) if k == "win" and f == 1]
    if encoders == 1:
        assert seqs == list(range(400))  # one file's windows in order
    else:
        assert sorted(seqs) == list(range(400))  # each once, in the order they were done
        assert busy["max"] > 1


def test_stream_raises_what_a_decoder_raised():
    from pipeline.encode import inprocess

    def decode(item):
        yield from _rows(item["file_id"], 2, 10)
        if item["file_id"] == 2:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(inprocess.stream([{"file_id": i} for i in range(5)], decode, lambda b: b, batch_samples=10 ** 6))


def test_default_threads_use_every_core():
    """(codec threads, torch threads each, decoder threads): one single-threaded codec thread per core up to 8."""
    from pipeline.encode import inprocess
    assert inprocess.default_threads(2) == (2, 1, 1)
    assert inprocess.default_threads(16) == (8, 2, 4)
    assert inprocess.default_threads(1) == (1, 1, 1)
    assert inprocess.default_threads(6) == (6, 1, 1)


@pytest.mark.parametrize("where", ["decoder", "encoder"])
def test_stream_stops_every_thread_when_one_fails(where):
    """A failure in a decoder or a codec thread is raised in the caller, and no thread is left behind."""
    from pipeline.encode import inprocess
    before = {t.name for t in threading.enumerate()}

    def decode(item):
        yield from _rows(item["file_id"], 20, 1000)
        if where == "decoder" and item["file_id"] == 3:
            raise RuntimeError("disk on fire")

    def encode(batch):
        if where == "encoder" and 3 in set(int(f) for f in batch["file_id"]):
            raise ValueError("codec on fire")
        return batch

    with pytest.raises((RuntimeError, ValueError), match="on fire"):
        list(inprocess.stream([{"file_id": i} for i in range(50)], decode, encode, batch_samples=2000,
                              decoders=2, encoders=3, queue_bytes=8 * 1000))
    deadline = time.time() + 5
    while time.time() < deadline and any(t.name.startswith("audioarc-") and t.name not in before
                                         for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("audioarc-") and t.name not in before]


def test_heap_trimmer_hands_memory_back_at_most_once_per_interval():
    from pipeline.encode.stages import HeapTrimmer
    t = HeapTrimmer(every_s=0.2)
    if t._trim is None:
        pytest.skip("no glibc malloc_trim here")
    real, calls = t._trim, []
    t._trim = lambda pad: calls.append(pad) or real(pad)
    threads = [threading.Thread(target=lambda: [t.maybe() for _ in range(200)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == []  # the interval has not passed since it was made
    time.sleep(0.25)
    threads = [threading.Thread(target=lambda: [t.maybe() for _ in range(200)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert calls == [0]  # one trim for 800 calls from four threads


ENTRYPOINT = """
import atexit, gc, sys
atexit.register(lambda: print(f"frozen at exit: {gc.get_freeze_count()}", file=sys.stderr, flush=True))
sys.argv = ["audioarc", *sys.argv[1:]]
from pipeline.cli import main
rc = main()
print(f"main returned {rc} frozen {gc.get_freeze_count()}", file=sys.stderr, flush=True)
sys.exit(rc)
"""


def test_the_process_entrypoint_exits_normally_and_skips_only_the_final_collection(tmp_path):
    """As the process entrypoint, ``main`` returns the command's code with its --json results complete, and the
    heap is frozen only once every other exit handler (Ray's shutdown, the Arrow GC pass) has run: the
    interpreter's final collections then skip the torch and Arrow objects."""
    import json
    src = tmp_path / "src"
    af.write(src / "a.wav", 2.0, 16000, kind="chirp")
    (src / "empty.wav").write_bytes(b"")  # a failed input: exit code 3
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", ENTRYPOINT, "encode", str(src), str(tmp_path / "arc"),
                        "--quality-sample", "0", "--json"], capture_output=True, text=True, env=env,
                       cwd=os.getcwd(), timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["files_archived"] == 1 and summary["files_failed"] == 1
    assert "main returned 3 frozen 0" in r.stderr  # nothing frozen while the command runs
    frozen = int(r.stderr.split("frozen at exit: ")[1].split()[0])  # the handler registered first runs last
    assert frozen > 10000, r.stderr[-2000:]


DECODE_ONLY = """
import sys
from pipeline.codec.identity import CodecInfo
from pipeline.encode.stages import INFO, WINDOW, FileInfo, decode_file
geom = CodecInfo(name="probe", version="1", checkpoint_hash=None, sample_rate=24000, hop_length=320,
                 codebook_size=1024, n_q=8, kbps_per_stage=0.75, ladder_n_q=(8,), encode_context=(160, 160),
                 decode_context=(2, 2))
rows = list(decode_file({"source": sys.argv[1], "file_id": 1, "size": 1, "prev_hash": "", "version": ""}, geom, 75))
info = FileInfo.from_json(rows[-1]["info"])
print(sum(r["kind"] == WINDOW for r in rows), rows[-1]["kind"] == INFO, info.status, info.codec_samples,
      "torch" in sys.modules)
"""


def test_decode_stage_cuts_windows_without_importing_torch(tmp_path):
    """A Ray decode worker runs ``decode_file`` alone: it must not pay torch's import (seconds of CPU and a few
    hundred MiB per worker) for a stage that only reads, resamples and cuts windows."""
    af.write(tmp_path / "a.flac", 2.5, 44100, channels=2, kind="chirp")
    r = subprocess.run([sys.executable, "-c", DECODE_ONLY, str(tmp_path / "a.flac")], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    windows, last_is_info, status, samples, torch_loaded = r.stdout.split()
    assert int(windows) == 3 and last_is_info == "True"  # 2.5 s at 75 frames/s: windows of 1 s
    assert status == "archived" and int(samples) == 60000  # 2.5 s at the codec's 24 kHz
    assert torch_loaded == "False"
