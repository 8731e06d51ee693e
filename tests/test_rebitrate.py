"""Bitrate is a prefix: ``restore --bitrate`` decodes the first stages; ``rebitrate`` writes them as a new archive."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import archive
from pipeline.cli import EXIT_ERROR, EXIT_PARTIAL
from pipeline.codec.windows import Joiner
from tests import audio_factory as af
from tests.content import spectrogram_similarity

# (relative path, seconds, rate, channels, kind): short; the first has two 1 s windows
FILES = [("a_chirp_24k.wav", 1.3, 24000, 1, "chirp"), ("sub/b_noise_16k_st.wav", 0.7, 16000, 2, "noise"),
         ("sub/c_sine_44k.flac", 0.5, 44100, 1, "sine")]


@pytest.fixture(scope="module")
def arc12(tmp_path_factory, ray_cluster):
    """A 12 kbps archive of FILES (and one input that is not audio: failed, never carried over)."""
    from pipeline.cli import main
    root = tmp_path_factory.mktemp("rebitrate")
    src, dest = root / "src", root / "a12"
    for rel, secs, rate, ch, kind in FILES:
        af.write(src / rel, secs, rate, ch, kind=kind)
    af.not_audio(src / "bad/not_audio.wav")
    code = main(["encode", str(src), str(dest), "--bitrate", "12", "--quality-sample", "0", "--window-seconds",
                 "1", "--json"], out=io.StringIO())
    assert code == EXIT_PARTIAL
    return src, dest


def _read_all(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): sf.read(p, dtype="int16")[0] for p in sorted(folder.rglob("*.wav"))}


def _windows(dest: Path, entry) -> list[np.ndarray]:
    rec = archive.require_record(str(dest))
    return [c for _, c in archive.read_file_codes(str(dest), entry, rec.codec)]


def _codes(dest: Path, entry) -> np.ndarray:
    return np.concatenate(_windows(dest, entry), axis=2)


def _decode(codec, windows: list[np.ndarray], entry, k: int) -> np.ndarray:
    """The first ``k`` stages of each window, decoded as restore feeds them (window by window)."""
    j = Joiner(codec, entry.codec_samples, channels=entry.channels)
    out = [b for w in windows for b in j.feed(w[:, :k])] + list(j.finish())
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("kbps,k", [(6, 8), (1.5, 2)])
def test_rebitrate_is_the_prefix_of_the_codes(arc12, cli, tmp_path, kbps, k):
    src, dest = arc12
    new = tmp_path / f"a{kbps}"
    s = cli.json("rebitrate", dest, new, "--bitrate", str(kbps))
    assert (s["files_total"], s["files_rebitrated"], s["files_skipped"], s["files_failed"]) == (3, 3, 0, 0)
    assert s["n_q"] == k and s["source_n_q"] == 16 and s["bitrate_kbps"] == kbps
    assert 0 < s["bytes_after"] < s["bytes_before"]

    v = cli.json("verify", new, "--deep")
    assert v["ok"] and v["files_checked"] == 3
    info = cli.json("inspect", new)
    assert info["bitrate_kbps"] == kbps and info["codec"]["n_q"] == k and info["files_archived"] == 3
    assert info["archive_bytes"] < cli.json("inspect", dest)["archive_bytes"]

    _, old_entries = archive.open_archive(str(dest))
    _, new_entries = archive.open_archive(str(new))
    assert set(new_entries) == {e.source for e in old_entries.values() if e.status == "archived"}
    codec = archive.load_codec(str(new), archive.require_record(str(new)))
    for source, e in new_entries.items():
        o = old_entries[source]
        for f in ("relpath", "size", "content_hash", "duration_s", "sample_rate", "channels", "frames",
                  "codec_samples", "codec_frames", "n_windows", "file_id"):
            assert getattr(e, f) == getattr(o, f), f
        assert e.archive_bytes < o.archive_bytes and o.n_windows >= (2 if e.duration_s > 1 else 1)
        np.testing.assert_array_equal(_codes(new, e), _codes(dest, o)[:, :k])
        np.testing.assert_array_equal(_decode(codec, _windows(new, e), e, k), _decode(codec, _windows(dest, o), o, k))

    out_new, out_prefix, out_full = tmp_path / "o_new", tmp_path / "o_prefix", tmp_path / "o_full"
    cli.json("restore", new, out_new, "--format", "wav")
    cli.json("restore", dest, out_prefix, "--format", "wav", "--bitrate", str(kbps))
    cli.json("restore", dest, out_full, "--format", "wav")
    a, b, full = _read_all(out_new), _read_all(out_prefix), _read_all(out_full)
    assert sorted(a) == sorted(b) == sorted(f.replace(".flac", ".wav") for f, *_ in FILES)
    for rel in a:
        np.testing.assert_array_equal(a[rel], b[rel])
        assert a[rel].shape == full[rel].shape and not np.array_equal(a[rel], full[rel])
    # ... and what they decode to is still the ORIGINAL's sound (equal decodes of equal codes prove the prefix, not
    # that it decodes to anything): its spectrogram (measured: chirp 0.50 at 6 kbps / 0.38 at 1.5, sine 0.91 / 0.85;
    # 100 ms late: 0.25 / 0.18 and 0.77 / 0.70, a wrong rate or noise lower still; white noise has no pattern to
    # score, its level is what it can show) and its level (the lowest rung loses most: chirp 0.13 of the original)
    floor = {"chirp": 0.3, "sine": 0.8}
    for rel, secs, rate, ch, kind in FILES:
        orig = sf.read(src / rel, always_2d=True)[0]
        back = a[rel.replace(".flac", ".wav")].reshape(orig.shape[0], -1) / 32768.0
        assert back.shape == orig.shape, rel
        if kind in floor:
            assert spectrogram_similarity(orig, back, rate) > floor[kind], (rel, kbps)
        for c in range(ch):
            level = float(np.sqrt(np.mean(back[:, c] ** 2) / np.mean(orig[:, c] ** 2)))
            assert (0.2 if k >= 8 else 0.1) < level < 1.5, (rel, c, kbps, level)
    # the 24 kHz mono file is not resampled: its restored samples are the direct decode of the prefix, as 16-bit PCM
    e = next(e for e in new_entries.values() if e.relpath == "a_chirp_24k.wav")
    direct = _decode(codec, _windows(dest, old_entries[e.source]), e, k)[0]
    got = sf.read(out_new / "a_chirp_24k.wav", dtype="float32")[0]
    pcm = sf.read(io.BytesIO(_as_wav(np.clip(direct[: e.frames], -1, 1), 24000)), dtype="float32")[0]
    np.testing.assert_array_equal(got, pcm)


def _as_wav(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_rebitrate_resumes_selects_and_grows_by_encode(arc12, cli, tmp_path):
    src, dest = arc12
    new = tmp_path / "a6"
    s = cli.json("rebitrate", dest, new, "sub/*", "--bitrate", "6")
    assert (s["files_total"], s["files_rebitrated"]) == (2, 2)
    assert sorted(r["relpath"] for r in cli.json("ls", new)) == ["sub/b_noise_16k_st.wav", "sub/c_sine_44k.flac"]
    s = cli.json("rebitrate", dest, new, "--bitrate", "6", "--commit-every", "1")
    assert (s["files_total"], s["files_rebitrated"], s["files_skipped"]) == (3, 1, 2)
    s = cli.json("rebitrate", dest, new, "--bitrate", "6")
    assert (s["files_rebitrated"], s["files_skipped"], s["bytes_written"]) == (0, 3, 0)
    assert cli.json("inspect", new)["generations"] == 2
    assert cli.json("verify", new, "--deep")["ok"]
    # another rate into the same NEW_DEST is refused, naming its rate
    code, _ = cli("rebitrate", dest, new, "--bitrate", "3")
    assert code == EXIT_ERROR and "6 kbps" in cli.last_err
    # encode adds to the rebitrated archive at its rate (with the weights it carries)
    more = tmp_path / "more"
    af.write(more / "d_new.wav", 0.5, 22050, 1, kind="chirp")
    e = cli.json("encode", more, new, "--bitrate", "6", "--quality-sample", "0")
    assert e["files_archived"] == 1
    rows = {r["relpath"]: r for r in cli.json("ls", new)}
    assert sorted(rows) == ["a_chirp_24k.wav", "d_new.wav", "sub/b_noise_16k_st.wav", "sub/c_sine_44k.flac"]
    info = cli.json("inspect", new)
    assert info["files_archived"] == 4 and info["bitrate_kbps"] == 6
    out = cli.json("restore", new, tmp_path / "o", "--format", "wav")
    assert len(out) == 4 and cli.json("verify", new, "--deep")["ok"]
    # the file encode added and a rebitrated one both decode to their originals' sound at 6 kbps (measured: 0.47 /
    # 0.50, level 0.26; 100 ms late or a wrong rate: <= 0.25, half the level: 0.13)
    for folder, rel, rate in ((more, "d_new.wav", 22050), (src, "a_chirp_24k.wav", 24000)):
        orig = sf.read(folder / rel, always_2d=True)[0]
        back = sf.read(tmp_path / "o" / rel, always_2d=True)[0]
        assert back.shape == orig.shape, rel
        assert spectrogram_similarity(orig, back, rate) > 0.35, rel
        assert 0.2 < float(np.sqrt(np.mean(back ** 2) / np.mean(orig ** 2))) < 1.5, rel


def test_a_rate_above_the_archive_is_refused(arc12, cli, tmp_path):
    src, dest = arc12
    for cmd in (("rebitrate", dest, tmp_path / "a24"), ("restore", dest, tmp_path / "o")):
        code, _ = cli(*cmd, "--bitrate", "24")
        assert code == EXIT_ERROR
        assert "the archive is at 12 kbps" in cli.last_err and "--bitrate 24" in cli.last_err
    assert not (tmp_path / "a24").exists() and not (tmp_path / "o").exists()
    code, _ = cli("rebitrate", dest, tmp_path / "a5", "--bitrate", "5")  # not on the ladder
    assert code == EXIT_ERROR and "ladder" in cli.last_err
    code, _ = cli("rebitrate", dest, dest, "--bitrate", "6")  # in place: not this command
    assert code == EXIT_ERROR and "NEW_DEST is DEST" in cli.last_err


def test_a_damaged_source_file_is_recorded_failed_and_retried(arc12, cli, tmp_path):
    import shutil
    src, dest = arc12
    copy, new = tmp_path / "a12", tmp_path / "a6"
    shutil.copytree(dest, copy)
    shard = next(copy.glob("shards/*/*.parquet"))
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    code, out = cli("rebitrate", copy, new, "--bitrate", "6", "--json")
    assert code == EXIT_PARTIAL
    s = json.loads(out)
    assert s["files_failed"] >= 1 and all("damaged" in f["reason"] for f in s["failures"])
    assert {r["status"] for r in cli.json("ls", new)} >= {"failed"}
    shard.write_bytes(good)  # repaired from a replica: the re-run copies what failed
    s = cli.json("rebitrate", copy, new, "--bitrate", "6")
    assert s["files_failed"] == 0 and s["files_rebitrated"] + s["files_skipped"] == 3
    assert cli.json("inspect", new)["files_archived"] == 3 and cli.json("verify", new, "--deep")["ok"]


def test_24_kbps_band_gains_through_the_archive(ray_cluster, cli, tmp_path):
    """24 kbps = 16 RVQ stages + 16 band-gain stages (release 7): windowed by the pipeline, the codes are those of
    one whole-signal encode; the gains bring each band's energy closer to the original's than the 16 stages
    alone; and a rebitrate to 12 kbps is still the plain prefix."""
    from pipeline.codec.windows import encode_array
    src, dest = tmp_path / "src", tmp_path / "a24"
    af.write(src / "noise.wav", 2.5, 24000, 1, kind="noise")
    af.write(src / "chirp.wav", 2.0, 24000, 1, kind="chirp")
    s = cli.json("encode", src, dest, "--bitrate", "24", "--quality-sample", "0", "--window-seconds", "1")
    assert s["files_archived"] == 2
    rec = archive.require_record(str(dest))
    codec = archive.load_codec(str(dest), rec)
    assert rec.codec.n_q == 32 and codec.band_gains is not None and codec.band_gains.base == 16
    _, entries = archive.open_archive(str(dest))
    out24, out12 = tmp_path / "o24", tmp_path / "o12"
    cli.json("restore", dest, out24, "--format", "wav")
    cli.json("restore", dest, out12, "--format", "wav", "--bitrate", "12")
    bg = codec.band_gains
    for e in entries.values():
        x = sf.read(src / e.relpath, dtype="float32")[0]
        codes = _codes(dest, e)
        whole = encode_array(codec, x[None], 32, window_frames=100000)
        assert codes.shape == whole.shape and (codes == whole).mean() >= 0.999, e.relpath

        def band_error(y):
            g = bg.gains_db(codec.frames_of(x), codec.frames_of(y))[0, :, 1:len(x) // codec.hop_length]
            return float(g.clamp(-20, 20).abs().mean())
        e24 = band_error(sf.read(out24 / e.relpath, dtype="float32")[0])
        e12 = band_error(sf.read(out12 / e.relpath, dtype="float32")[0])
        assert e24 < 0.6 * e12, (e.relpath, e24, e12)  # measured: chirp 5.1 vs 11.6 dB, noise 0.55 vs 3.5
    new = tmp_path / "a12"
    cli.json("rebitrate", dest, new, "--bitrate", "12")
    assert cli.json("verify", new, "--deep")["ok"]
    _, new_entries = archive.open_archive(str(new))
    for source, e in new_entries.items():
        np.testing.assert_array_equal(_codes(new, e), _codes(dest, entries[source])[:, :16])
