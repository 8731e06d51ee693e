"""Quality sampling: metrics behave, the stratified sampler is reproducible, gates trip, the report renders."""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import quality
from pipeline.cli import EXIT_OK, EXIT_QUALITY
from pipeline.errors import ConfigError
from pipeline.manifest import ARCHIVED, FAILED, ManifestEntry
from tests import audio_factory as af

RATE = 24000


def music(seconds=3.0, seed=0):
    return (af.tone(seconds, RATE, kind="chirp", amp=0.3) + af.tone(seconds, RATE, kind="noise", amp=0.02,
                                                                    seed=seed)).T


def test_identical_signal_scores_perfectly():
    x = music()
    m = quality.compare(x, x.copy(), RATE)
    assert m["mel"] == pytest.approx(0.0, abs=1e-6)
    assert m["si_sdr"] >= 99
    assert m["lufs_diff"] == pytest.approx(0.0, abs=1e-6)
    assert m["clipping_added"] == 0
    assert m["bandwidth_ratio"] == pytest.approx(1.0)


def test_known_degradations_rank_in_order():
    x = music()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    p = float(np.mean(x ** 2))
    by_snr = {snr: quality.compare(x, x + noise * np.sqrt(p / 10 ** (snr / 10)), RATE) for snr in (30, 20, 10)}
    assert by_snr[30]["mel"] < by_snr[20]["mel"] < by_snr[10]["mel"]
    assert by_snr[30]["si_sdr"] > by_snr[20]["si_sdr"] > by_snr[10]["si_sdr"]
    assert by_snr[20]["si_sdr"] == pytest.approx(20, abs=1.0)
    from scipy.signal import butter, sosfilt
    low = sosfilt(butter(8, 2000, fs=RATE, output="sos"), x).astype(np.float32)
    assert quality.compare(x, low, RATE)["bandwidth_ratio"] < 0.5
    quiet = quality.compare(x, x * 0.5, RATE)
    assert quiet["lufs_diff"] == pytest.approx(-6.02, abs=0.1)
    assert quiet["si_sdr"] >= 99  # scale-invariant
    assert quality.compare(x, np.clip(x * 4, -1, 1), RATE)["clipping_added"] > 0.01


def test_speech_like_heuristic():
    t = np.arange(3 * RATE) / RATE
    voiced = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12))
    syllables = voiced * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    assert quality.speech_like(syllables[None].astype(np.float32), RATE)
    assert not quality.speech_like(af.tone(3, RATE).T, RATE)  # steady tone
    assert not quality.speech_like(af.tone(3, RATE, kind="noise").T, RATE)  # wideband noise


def entries(n=60):
    rng = random.Random(0)
    out = []
    for i in range(n):
        folder = ["speech", "music", "radio"][i % 3]
        out.append(ManifestEntry(source=f"/src/{folder}/f{i}.wav", relpath=f"{folder}/f{i}.wav", file_id=i, size=1,
                                 content_hash="h", status=ARCHIVED if i % 10 else FAILED,
                                 duration_s=rng.choice([5, 30, 300]), sample_rate=rng.choice([16000, 44100]),
                                 channels=1 + i % 2))
    return out


def test_stratified_sample_is_reproducible_and_covers_strata():
    es = entries()
    a = quality.sample_manifest(es, 20, seed=7)
    assert [e.source for e in a] == [e.source for e in quality.sample_manifest(list(reversed(es)), 20, seed=7)]
    assert [e.source for e in a] != [e.source for e in quality.sample_manifest(es, 20, seed=8)]
    assert len(a) == 20 and all(e.status == ARCHIVED for e in a)
    strata = {quality.stratum(e) for e in es if e.status == ARCHIVED}
    big = quality.sample_manifest(es, len(strata), seed=7)
    assert {quality.stratum(e) for e in big} == strata  # n >= strata: every stratum represented
    assert len(quality.sample_manifest(es, 1000, seed=7)) == sum(e.status == ARCHIVED for e in es)


def test_streaming_sampler_does_not_depend_on_order():
    es = entries(200)

    def run(order):
        s = quality.StreamingSampler(0.05, seed=3)
        taken = [e.source for e in order if s.offer(e)]
        return sorted(taken + [e.source for e in s.leftovers()])

    shuffled = es[:]
    random.Random(5).shuffle(shuffled)
    assert run(es) == run(shuffled)
    chosen = run(es)
    strata = {quality.stratum(e) for e in es if e.status == ARCHIVED}
    assert {quality.stratum(e) for e in es if e.source in chosen} == strata


def test_streaming_sampler_measures_small_jobs_whole():
    """The default 2 % of a 24-file job is 0-1 files: a minimum of 20 (all of a smaller job) comes first."""
    def run(es, order, **kw):
        s = quality.StreamingSampler(0.02, seed=0, **kw)
        return sorted([e.source for e in order if s.offer(e)] + [e.source for e in s.leftovers()])

    from dataclasses import replace
    small = [replace(e, relpath=f"f{i}.wav", duration_s=30, sample_rate=44100, channels=2)  # one stratum
             for i, e in enumerate(e for e in entries(30) if e.status == ARCHIVED)][:24]
    assert len(run(small, small)) <= 2  # the fraction alone: what the report showed before
    assert len(run(small, small, min_files=20)) == 20
    assert len(run(small[:12], small[:12], min_files=20)) == 12  # a smaller job: every file
    big = entries(400)
    shuffled = big[:]
    random.Random(2).shuffle(shuffled)
    chosen = run(big, big, min_files=20)
    assert chosen == run(big, shuffled, min_files=20) and len(chosen) >= 20  # still order-independent
    assert len(set(chosen)) == len(chosen)


def test_gate_parsing():
    gates = quality.parse_gates("mel<=1.2, stoi>=0.7")
    assert [str(g) for g in gates] == ["mel<=1.2", "stoi>=0.7"]
    assert gates[0].passes({"mel": 1.0}) and not gates[0].passes({"mel": 1.5})
    assert gates[1].passes({"stoi": None})  # not measured: no verdict
    with pytest.raises(ConfigError, match="mel<=1.2"):
        quality.parse_gates("loudness<3")


@pytest.fixture(scope="module")
def sampled_archive(tmp_path_factory, ray_cluster):
    from pipeline.cli import main
    root = tmp_path_factory.mktemp("q")
    src = root / "src"
    for i in range(4):
        af.write(src / f"music/m{i}.wav", 2.0, 44100, 1, kind="chirp", seed=i)
    af.write(src / "speech/s0.flac", 2.0, 16000, 2, kind="sine")
    dest = root / "arc"
    code = main(["encode", str(src), str(dest), "--quality-sample", "0.02", "--no-visqol", "--excerpt-seconds", "1.5",
                 "--window-seconds", "1", "--min-quality", "mel<=20"])
    return src, dest, code


def test_encode_samples_beside_the_job_and_reports(sampled_archive):
    import json

    import pyarrow.parquet as pq
    src, dest, code = sampled_archive
    assert code == EXIT_OK
    report = json.loads(next((dest / "reports").glob("encode-*.json")).read_text())
    q = report["quality"]
    # 2 % of 5 files would be none or one: the minimum sample (20) takes every file of a job this small
    assert q["summary"]["files_sampled"] == q["summary"]["files_archived"] == 5
    assert q["summary"]["files_bad_pairs"] == 0
    assert "mel" in q["summary"] and "compression_ratio" in q["summary"]
    t = pq.read_table(q["table"]).to_pylist()
    assert [r["kind"] for r in t].count("summary") == 1
    files = [r for r in t if r["kind"] == "file"]
    assert len(files) == q["summary"]["files_sampled"]
    assert all(r["mel"] > 0 and r["compression_ratio"] > 1 for r in files)
    assert Path(q["report"]).exists()


def test_quality_command_is_reproducible_and_records_bad_pairs(sampled_archive, cli, tmp_path):
    src, dest, _ = sampled_archive
    a = cli.json("quality", dest, "--sample", "3", "--no-visqol", "--excerpt-seconds", "1")
    b = cli.json("quality", dest, "--sample", "3", "--no-visqol", "--excerpt-seconds", "1")
    assert [f["source"] for f in a["files"]] == [f["source"] for f in b["files"]]
    assert [f["mel"] for f in a["files"]] == pytest.approx([f["mel"] for f in b["files"]])
    # an original deleted since archiving is a bad pair, recorded, not fatal
    moved = tmp_path / "m0.wav"
    shutil.move(src / "music/m0.wav", moved)
    try:
        r = cli.json("quality", dest, "music/m0.wav", "music/m1.wav", "--no-visqol", "--excerpt-seconds", "1")
    finally:
        shutil.move(moved, src / "music/m0.wav")
    errs = {Path(f["source"]).name: f["error"] for f in r["files"]}
    assert "m0.wav" in errs["m0.wav"] and errs["m1.wav"] == ""
    assert r["summary"]["files_bad_pairs"] == 1


def test_quality_gate_trips_on_a_bad_setting(tmp_path, cli):
    src = tmp_path / "src"
    for i in range(3):
        af.write(src / f"t{i}.wav", 1.5, 16000, kind="chirp", seed=i)
    code, out = cli("encode", src, tmp_path / "arc", "--bitrate", "1.5", "--quality-sample", "1",
                    "--no-visqol", "--min-quality", "si_sdr>=10")
    assert code == EXIT_QUALITY
    assert out.count("BELOW QUALITY FLOOR") == 3 and "t0.wav" in out
    rows = cli.json("ls", tmp_path / "arc")
    assert all(r["status"] == "archived" for r in rows)  # still archived and recorded
    code, _ = cli("quality", tmp_path / "arc", "--no-visqol", "--min-quality", "ratio>=1")
    assert code == EXIT_OK


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_page_tells_the_operator_what_they_need(sampled_archive):
    """Job facts, the verdict against the floors, a guide to the numbers, and excerpt players whose
    sources are real audio (original and restored, at the original's rate), worst files first."""
    import base64
    import io
    import json
    import re

    import soundfile as sf
    _, dest, _ = sampled_archive
    rep = json.loads(next((dest / "reports").glob("encode-*.json")).read_text())
    page = Path(rep["quality"]["report"]).read_text()
    for section in ("id='job'", "id='sample'", "id='gates'", "id='summary'", "id='guide'", "id='listen'",
                    "id='files'", "id='spectrograms'"):
        assert section in page, section
    assert rep["job_id"] in page and "checkpoint hash" in page and "effective bitrate" in page
    assert "Measured <b>5 of 5 archived files</b>" in page
    assert "PASSED" in page and "mel&lt;=20" in page
    assert "0.9 excellent" in page and "below 0.05 good" in page  # STOI and tones bands
    players = re.findall(r"<audio [^>]*data-kind='(original|restored)' src='data:audio/ogg;base64,([^']+)'", page)
    assert [k for k, _ in players] == ["original", "restored"] * 5
    rates = []
    for _, b64 in players:
        x, rate = sf.read(io.BytesIO(base64.b64decode(b64)))
        assert 1.0 <= len(x) / rate <= 1.6 and np.abs(x).max() > 0.01  # the 1.5 s excerpt, not silence
        rates.append(rate)
    assert set(rates) == {44100, 16000}  # at each original's rate


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/setup installs it)")
def test_report_renders_in_headless_chromium(sampled_archive, tmp_path):
    import json

    import matplotlib.image
    _, dest, _ = sampled_archive
    report = json.loads(next((dest / "reports").glob("encode-*.json")).read_text())["quality"]["report"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", f"file://{report}"], capture_output=True, text=True,
                         timeout=120).stdout
    for table in ("id=\"summary\"", "id=\"files\""):
        assert table in dom
    assert dom.count("<img") >= 4 and "data:image/png;base64," in dom
    assert dom.count("<audio") == 10 and "data:audio/ogg;base64," in dom  # the players are in the live page
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, "--window-size=1200,4000", f"--screenshot={shot}", f"file://{report}"],
                   capture_output=True, timeout=120)
    print(f"quality report screenshot: {shot}")
    img = matplotlib.image.imread(str(shot))[..., :3]
    # the histograms' bars (#44aa77) are on screen: the inline images decoded and rendered
    green = np.all(np.abs(img - np.array([0x44, 0xAA, 0x77]) / 255) < 0.06, axis=-1)
    assert green.sum() > 500
