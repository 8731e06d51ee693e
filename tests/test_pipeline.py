"""End to end through the CLI on a shared local Ray node: encode, ls, inspect, restore, resume, failures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import archive
from pipeline.cli import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
from tests import audio_factory as af
from tests.content import spectrogram_similarity

# (relative path, seconds, rate, channels, kind, format)
GOOD = [
    ("music/a_sine_44k.wav", 3.5, 44100, 1, "sine", None),
    ("music/b_stereo_48k.flac", 2.2, 48000, 2, "chirp", None),
    ("speech/c_8k.wav", 1.3, 8000, 1, "sine", None),
    ("speech/d_16k_3ch.wav", 1.0, 16000, 3, "sine", None),
    ("e_tiny_22k.ogg", 0.5, 22050, 1, "chirp", "OGG"),
    ("f_one_frame.wav", 0.004, 24000, 1, "noise", None),  # shorter than one codec frame
    ("g_silence.flac", 1.0, 32000, 1, "silence", None),
]


def make_corpus(root: Path, bad: bool = True) -> dict[str, Path]:
    files = {}
    for rel, secs, rate, ch, kind, fmt in GOOD:
        files[rel] = af.write(root / rel, secs, rate, ch, kind=kind, fmt=fmt, subtype="VORBIS" if fmt else None)
    if bad:
        files["bad/not_audio.wav"] = af.not_audio(root / "bad/not_audio.wav")
        files["bad/empty.flac"] = af.empty(root / "bad/empty.flac")
        files["bad/truncated.wav"] = af.truncated(root / "bad/truncated.wav")
        files["bad/zero_length.wav"] = af.zero_length(root / "bad/zero_length.wav")
    return files


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, ray_cluster):
    """A corpus with good and bad inputs, archived once for the module (window 1 s: several windows/file)."""
    from pipeline.cli import main
    root = tmp_path_factory.mktemp("enc")
    src, dest = root / "src", root / "archive"
    files = make_corpus(src)
    code = main(["encode", str(src), str(dest), "--window-seconds", "1", "--json"])
    return src, dest, files, code


def test_encode_summary_and_exit_code(encoded, capsys):
    src, dest, files, code = encoded
    assert code == EXIT_PARTIAL  # finished, some inputs failed
    reports = list((dest / "reports").glob("encode-*.json"))
    assert len(reports) == 1
    s = json.loads(reports[0].read_text())
    for key in ("archive", "files_total", "files_archived", "files_failed", "audio_seconds", "source_bytes",
                "archive_bytes", "bitrate_kbps", "compression_ratio", "wall_seconds"):
        assert key in s
    assert s["files_total"] == len(files)
    assert s["files_archived"] == len(GOOD)
    assert s["files_failed"] == 4
    assert s["audio_seconds"] == pytest.approx(sum(g[1] for g in GOOD), abs=0.01)
    assert s["bitrate_kbps"] == 6.0


def test_manifest_accounts_for_every_input(encoded, cli):
    src, dest, files, _ = encoded
    rows = cli.json("ls", dest)
    assert sorted(r["relpath"] for r in rows) == sorted(files)
    by = {r["relpath"]: r for r in rows}
    for rel, secs, rate, ch, *_ in GOOD:
        r = by[rel]
        assert r["status"] == "archived", r
        assert (r["sample_rate"], r["channels"]) == (rate, ch)
        assert r["frames"] == sf.info(str(files[rel])).frames
        assert r["archive_bytes"] > 0
    reasons = {rel: by[rel]["reason"] for rel in files if rel.startswith("bad/")}
    assert all(by[rel]["status"] == "failed" for rel in reasons)
    assert "not a readable audio file" in reasons["bad/not_audio.wav"]
    assert "empty file" in reasons["bad/empty.flac"]
    assert "truncated" in reasons["bad/truncated.wav"]
    assert "zero-length" in reasons["bad/zero_length.wav"]
    for rel, reason in reasons.items():
        assert str(files[rel]) in reason  # the message names the file
    codes = {rel: by[rel]["reason_code"] for rel in reasons}  # carried from where it was raised, not parsed
    assert codes == {"bad/not_audio.wav": "not_audio", "bad/empty.flac": "empty", "bad/truncated.wav": "truncated",
                     "bad/zero_length.wav": "zero_length"}
    assert all(by[rel]["reason_code"] == "" for rel, *_ in GOOD)


def test_inspect(encoded, cli):
    _, dest, files, _ = encoded
    d = cli.json("inspect", dest)
    assert d["format"] == "audioarc" and d["format_version"] == archive.FORMAT_VERSION
    from pipeline.codec.registry import DEFAULT_CODEC
    assert d["codec"]["name"] == DEFAULT_CODEC and len(d["codec"]["checkpoint_hash"]) == 16
    assert (d["files"], d["files_archived"], d["files_failed"]) == (len(files), len(GOOD), 4)
    assert d["compression_ratio"] > 5


def test_restore_all_exact_frames_channels_rate(encoded, cli, tmp_path):
    src, dest, files, _ = encoded
    out = cli.json("restore", dest, tmp_path / "out", "--format", "wav")
    assert len(out) == len(GOOD)
    for pair in out:
        rel = str(Path(pair["source"]).relative_to(src))
        orig, o_rate = sf.read(str(files[rel]), always_2d=True)
        back, b_rate = sf.read(pair["path"], always_2d=True)
        assert pair["path"].endswith(".wav")
        assert b_rate == o_rate and back.shape == orig.shape, rel
        # every file's content comes back (noise, silence or another file's audio scores near 0; a one-frame
        # file has no spectrogram to compare, its length is what it can hold)
        kind = next(g[4] for g in GOOD if g[0] == rel)
        rms_o, rms_b = (float(np.sqrt(np.mean(x ** 2))) for x in (orig, back))
        if kind == "silence":
            assert rms_b < 1e-3, rel
        elif orig.shape[0] >= 2048:
            assert 0.2 < rms_b / rms_o < 2.5, (rel, rms_o, rms_b)  # (a fast chirp loses some of its top)
            assert spectrogram_similarity(orig, back, o_rate) > 0.35, rel
        if rel.startswith("music/a_sine"):  # a steady tone comes back recognisably: same pitch, similar level
            spec_o, spec_b = (np.abs(np.fft.rfft(x[:, 0])) for x in (orig, back))
            assert abs(int(spec_o.argmax()) - int(spec_b.argmax())) <= 2  # bins of 1/3.5 Hz
            assert 0.5 < rms_b / rms_o < 2.0


def test_restore_one_file_by_pattern(encoded, cli, tmp_path):
    _, dest, files, _ = encoded
    out = cli.json("restore", dest, tmp_path / "one", "speech/c_*")
    assert [Path(p["path"]).name for p in out] == ["c_8k.flac"]
    assert [p.name for p in (tmp_path / "one").rglob("*") if p.is_file()] == ["c_8k.flac"]
    # and it is that file's audio (its length, rate and 440 Hz tone), not another entry's codes under its name
    orig, o_rate = sf.read(str(files["speech/c_8k.wav"]), always_2d=True)
    back, b_rate = sf.read(out[0]["path"], always_2d=True)
    assert b_rate == o_rate and back.shape == orig.shape
    spec_o, spec_b = (np.abs(np.fft.rfft(x[:, 0])) for x in (orig, back))
    assert abs(int(spec_o.argmax()) - int(spec_b.argmax())) <= 2  # bins of 1/1.3 Hz
    assert spectrogram_similarity(orig, back, o_rate) > 0.35
    code, _ = cli("restore", dest, tmp_path / "none", "no/such/*")
    assert code == EXIT_ERROR


def test_resume_skips_unchanged_and_reencodes_changed(tmp_path, cli):
    src, dest = tmp_path / "src", tmp_path / "arc"
    files = make_corpus(src, bad=False)
    first = cli.json("encode", src, dest)
    assert first["files_archived"] == len(GOOD) and first["files_skipped"] == 0
    again = cli.json("encode", src, dest)
    assert again["files_skipped"] == len(GOOD)
    assert again["generation"] == first["generation"]  # nothing new was committed
    af.write(files["speech/c_8k.wav"], 2.0, 8000, 1, freq=660.0)  # content changes
    af.write(src / "new/h.wav", 1.0, 16000)
    third = cli.json("encode", src, dest)
    assert third["files_skipped"] == len(GOOD) - 1
    assert third["files_archived"] == len(GOOD) + 1
    rows = cli.json("ls", dest)
    assert len(rows) == len({r["source"] for r in rows}) == len(GOOD) + 1  # nothing duplicated
    c = next(r for r in rows if r["relpath"] == "speech/c_8k.wav")
    assert c["frames"] == 16000 and c["generation"] == third["generation"]


def test_interrupted_job_leftovers_are_invisible_and_cleaned(tmp_path, cli):
    src, dest = tmp_path / "src", tmp_path / "arc"
    af.write(src / "x.wav", 1.0, 16000)
    cli.json("encode", src, dest, "--quality-sample", "0")
    # what a job killed mid-way leaves: its claim on generation 2, a half-written shard, its lease (dead pid)
    (dest / "_gens/g000002.json").write_text(json.dumps({"job_id": "dead"}))
    (dest / "_jobs").mkdir(exist_ok=True)
    (dest / "_jobs/dead.json").write_text(json.dumps({"job_id": "dead", "host": "elsewhere", "pid": 1,
                                                      "heartbeat": 0}))
    p = dest / "shards/g000002/part-00000.parquet"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"garbage from a dead job")
    assert cli.json("inspect", dest)["files"] == 1  # readers only see what the catalog committed
    assert cli.json("verify", dest)["ok"]
    af.write(src / "y.wav", 1.0, 16000)
    s = cli.json("encode", src, dest, "--quality-sample", "0")
    assert s["files_archived"] == 2
    assert not (dest / "shards/g000002").exists() and not (dest / "_jobs").exists()
    shards = sorted(p.relative_to(dest).as_posix() for p in (dest / "shards").rglob("*.parquet"))
    assert shards == ["shards/g000001/part-00000.parquet", "shards/g000003/part-00000.parquet"]
    assert len(cli.json("restore", dest, tmp_path / "out")) == 2
    assert not (dest / "_staging").exists()


def test_commit_every_makes_several_generations(tmp_path, cli):
    src, dest = tmp_path / "src", tmp_path / "arc"
    for i in range(5):
        af.write(src / f"f{i}.wav", 0.5, 16000, freq=200 + 50 * i)
    s = cli.json("encode", src, dest, "--commit-every", "2")
    assert s["files_archived"] == 5
    assert cli.json("inspect", dest)["generations"] == 3


def test_restore_refuses_an_archive_of_another_codec_checkpoint(tmp_path, cli):
    src, dest = tmp_path / "src", tmp_path / "arc"
    af.write(src / "x.wav", 0.5, 16000)
    cli.json("encode", src, dest)
    rec = json.loads((dest / "archive.json").read_text())
    rec["codec"]["checkpoint_hash"] = "0123456789abcdef"
    (dest / "archive.json").write_text(json.dumps(rec))
    code, _ = cli("restore", dest, tmp_path / "o")
    assert code == EXIT_ERROR
    assert "0123456789abcdef" in cli.last_err and "weights" in cli.last_err
    assert not (tmp_path / "o").exists()
    code, _ = cli("encode", src, dest)  # adding to it with another checkpoint is refused too
    assert code == EXIT_ERROR


OLD_RELEASES = Path(__file__).resolve().parent.parent / "deploy" / "weights"


@pytest.mark.parametrize("old", ["neural_rvq-12874cf9.pt", "neural_rvq-3bc8f5ac.pt"])
def test_archive_of_an_earlier_release_restores_and_grows_without_weights(tmp_path, cli, old):
    """Releases no longer shipped in the package (release 5, and release 3 as a delta over it): the archive carries
    the weights, so nothing else is needed to restore it or add to it."""
    from pipeline.codec import registry
    old = OLD_RELEASES / old
    old_hash = registry.load("neural_rvq", old).checkpoint_hash()
    assert old_hash != registry.load("neural_rvq").checkpoint_hash()  # a real upgrade, not the same file
    assert registry.shipped_weights_for(registry.load("neural_rvq", old).record(8)) is None  # not installed
    src, dest = tmp_path / "src", tmp_path / "arc"
    af.write(src / "a.wav", 0.5, 16000)
    cli.json("encode", src, dest, "--codec-weights", old, "--quality-sample", "0")  # made by the earlier release
    assert json.loads((dest / "archive.json").read_text())["codec"]["checkpoint_hash"] == old_hash
    out = cli.json("restore", dest, tmp_path / "o", "--format", "wav")  # no --codec-weights: the archive's own
    assert len(out) == 1 and sf.info(out[0]["path"]).frames == 8000
    # and it is the input's sound, decoded by that release: same pitch, similar level, in time (measured: spectrogram
    # 0.88, level 0.74-0.81; 100 ms late: 0.75, half the level: 0.37-0.41, a wrong rate moves the pitch)
    orig, back = (sf.read(str(p), always_2d=True)[0] for p in (src / "a.wav", out[0]["path"]))
    spec_o, spec_b = (np.abs(np.fft.rfft(x[:, 0])) for x in (orig, back))
    assert abs(int(spec_o.argmax()) - int(spec_b.argmax())) <= 2  # bins of 2 Hz
    assert 0.5 < float(np.sqrt(np.mean(back ** 2) / np.mean(orig ** 2))) < 1.5
    assert spectrogram_similarity(orig, back, 16000) > 0.82
    af.write(src / "b.wav", 0.5, 16000)
    s = cli.json("encode", src, dest, "--quality-sample", "0")  # adding to it keeps using the checkpoint that made it
    assert s["files_archived"] == 2
    assert json.loads((dest / "archive.json").read_text())["codec"]["checkpoint_hash"] == old_hash


def test_bitrate_must_match_the_archive_and_the_ladder(tmp_path, cli):
    src, dest = tmp_path / "src", tmp_path / "arc"
    af.write(src / "x.wav", 0.5, 16000)
    cli.json("encode", src, dest, "--bitrate", "3")
    assert cli.json("inspect", dest)["bitrate_kbps"] == 3.0
    code, _ = cli("encode", src, dest, "--bitrate", "6")
    assert code == EXIT_ERROR and "--bitrate 3" in cli.last_err
    code, _ = cli("encode", src, tmp_path / "other", "--bitrate", "5")
    assert code == EXIT_ERROR and "ladder" in cli.last_err


def test_job_that_cannot_run_exits_1(tmp_path, cli):
    code, _ = cli("encode", tmp_path / "does-not-exist", tmp_path / "arc")
    assert code == EXIT_ERROR and "does-not-exist" in cli.last_err
    (tmp_path / "emptydir").mkdir()
    code, _ = cli("encode", tmp_path / "emptydir", tmp_path / "arc")
    assert code == EXIT_ERROR and "no audio files" in cli.last_err


def test_all_good_inputs_exit_0(tmp_path, cli):
    af.write(tmp_path / "src/x.wav", 0.5, 16000)
    code, _ = cli("encode", tmp_path / "src", tmp_path / "arc")
    assert code == EXIT_OK


def test_codecs_lists_ladder(cli_noray):
    rows = cli_noray.json("codecs")
    mdct = next(r for r in rows if r["name"] == "mdct_rvq")
    assert 6.0 in mdct["bitrates_kbps"] and mdct["frame_rate"] == 75.0


def test_json_stdout_stays_clean_while_ray_prints_cluster_warnings(tmp_path, cli):
    """Ray's driver thread prints cluster warnings ("(raylet) WARNING: ...") to sys.stdout whenever they
    arrive; `audioarc encode --json | jq` must still get one JSON document, the warnings on stderr."""
    import threading

    import ray
    from ray._private.utils import publish_error_to_driver

    af.write(tmp_path / "src" / "x.wav", 1.0, 16000)
    gcs = ray._private.worker.global_worker.gcs_client
    stop = threading.Event()

    def warn() -> None:  # what the raylet does, e.g. when it starts many worker processes
        while not stop.is_set():
            publish_error_to_driver("worker_pool_large", "WARNING: test cluster warning", gcs)
            stop.wait(0.05)

    t = threading.Thread(target=warn, daemon=True)
    t.start()
    try:
        # the warnings reach the driver asynchronously: on a loaded machine a short job may finish before the
        # first one lands, so encode again (another archive) until one is seen; stdout must parse every time
        for i in range(4):
            s = cli.json("encode", tmp_path / "src", tmp_path / f"arc{i}", "--quality-sample", "0")
            err = cli.last_err
            rows = cli.json("ls", tmp_path / f"arc{i}")
            assert s["files_archived"] == 1 and [r["status"] for r in rows] == ["archived"]
            if "test cluster warning" in err:
                break
    finally:
        stop.set()
        t.join()
    assert "test cluster warning" in err  # not lost: the user still sees them


def test_a_ray_codec_actor_reports_progress_in_few_actor_calls(tmp_path, ray_cluster):
    """A Ray codec actor sums its batches' counts and reports them when a file completes or
    ``PROGRESS_EVERY_S`` has passed: one actor task (which Ray records as a task event) per report, not one per
    window, and the counts still add up; a progress object in the same process gets every batch."""
    import time

    from pipeline.codec import registry
    from pipeline.encode import stages
    from pipeline.encode.inprocess import to_batch

    class CountingProgress(stages.Progress):
        calls = 0

        def add(self, **kw):
            self.calls += 1
            super().add(**kw)

        def n_calls(self):
            return self.calls

    src = af.write(tmp_path / "long.wav", 40.0, 24000, kind="chirp")
    info = registry.load("neural_rvq").info()
    rows = list(stages.decode_file({"source": str(src), "file_id": 7, "size": src.stat().st_size, "prev_hash": "",
                                    "version": ""}, info, 75))  # 1 s windows
    windows = sum(r["kind"] == stages.WINDOW for r in rows)
    assert windows >= 40 and rows[-1]["kind"] == stages.INFO
    remote = ray_cluster.remote(num_cpus=0)(CountingProgress).remote()
    local = CountingProgress()
    for progress in (remote, local):
        actor = stages.CodecActor("neural_rvq", None, info.checkpoint_hash, 8, "cpu", 1, progress=progress)
        t0 = time.monotonic()
        for r in rows:  # one row a batch: the window batches of a long file, then its info row
            actor(to_batch([r]))
        elapsed = time.monotonic() - t0
        get = (lambda m: ray_cluster.get(getattr(remote, m).remote())) if progress is remote \
            else (lambda m: getattr(local, m)())
        files, seconds = get("get")
        assert files == 1 and seconds == pytest.approx(windows, abs=1.0)  # every window counted, the file once
        assert get("stages")["codec_forward"] > 0
        if progress is remote:
            assert get("n_calls") <= elapsed / stages.PROGRESS_EVERY_S + 2 < windows
        else:
            assert get("n_calls") == len(rows)
