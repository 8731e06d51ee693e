"""EnCodec adapters with random weights of the real architecture (the pretrained checkpoints cannot be
fetched here): architecture and ladder, checkpoint loading, windowed coding seams, determinism, and a
round trip through the archive. Skipped only when the ``encodec`` package is not installed."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.codec import registry
from pipeline.codec.windows import decode_array, encode_array
from pipeline.errors import CodecUnavailableError
from tests import audio_factory as af

if importlib.util.find_spec("encodec") is None:
    pytest.skip("encodec is not installed (pip install --no-deps encodec==0.1.1 einops)", allow_module_level=True)

from pipeline.codec import encodec_adapter as ea  # noqa: E402

# measured with jobs/tools/encodec_context.py (random weights, 1 s context each side): windowed vs whole-signal
SEAM_DECODE_REL = 1e-4  # max |difference| / output RMS, any sample (measured < 1e-5)
SEAM_CODES_DIFF = 0.005  # fraction of codes that differ (near-tie flips; measured <= 0.0003)


@pytest.fixture(scope="module")
def weights24(tmp_path_factory):
    """Random weights of the real 24 kHz architecture saved two ways: ``{"model": sd}`` and a plain sd."""
    torch.set_num_threads(1)
    sd = ea.random_state_dict(ea.Encodec24kCodec, seed=0)
    d = tmp_path_factory.mktemp("w24")
    wrapped, plain = d / "encodec24_wrapped.pt", d / "encodec24_plain.th"
    torch.save({"model": sd}, wrapped)
    torch.save(sd, plain)
    return wrapped, plain


@pytest.fixture(scope="module")
def codec24(weights24):
    return registry.load("encodec_24khz", weights24[0])


def test_architecture_and_ladder(codec24):
    c = codec24
    assert 14.8e6 < c.n_params() < 14.9e6  # EnCodec 24 kHz: 14.85 M parameters
    assert (c.sample_rate, c.hop_length, c.frame_rate, c.codebook_size, c.n_q, c.channels) == \
        (24000, 320, 75.0, 1024, 32, 1)
    assert c.ladder() == {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
    assert tuple(sorted(c.ladder())) == c.target_bandwidths  # EnCodec's own bandwidths
    assert c.n_q_for_kbps(6) == 8
    with pytest.raises(ValueError, match="ladder"):
        c.n_q_for_kbps(5)
    assert c.decode_context[1] == 0 and c.encode_context[1] == 0  # causal: no extra frames per file
    assert c.n_frames(24000) == 75


def test_missing_or_wrong_weights_name_the_fix(tmp_path):
    with pytest.raises(CodecUnavailableError, match=r"--codec-weights PATH.*encodec_24khz-d7cc33bc\.th"):
        registry.load("encodec_24khz")
    with pytest.raises(CodecUnavailableError, match="not found at .*--codec-weights"):
        registry.load("encodec_24khz", tmp_path / "nope.th")
    other = tmp_path / "other.th"
    torch.save({"model": {"encoder.model.0.conv.conv.bias": torch.zeros(3)}}, other)
    with pytest.raises(CodecUnavailableError, match="not a encodec_24khz checkpoint"):
        registry.load("encodec_24khz", other)
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CodecUnavailableError, match="not a readable checkpoint"):
        registry.load("encodec_24khz", junk)


def test_plain_and_wrapped_state_dicts_load_alike(weights24, codec24):
    plain = registry.load("encodec_24khz", weights24[1])
    assert plain.checkpoint_hash() == codec24.checkpoint_hash()
    assert plain.checkpoint_hash() != registry.load("encodec_24khz", _save(ea.random_state_dict(
        ea.Encodec24kCodec, seed=1), weights24[1].parent / "seed1.th")).checkpoint_hash()
    # the keys are EnCodec's own (EncodecModel.state_dict()), so the official files load unchanged
    model = ea._build("24")
    assert set(model.state_dict()) == set(codec24.state_dict())


def _save(sd, path):
    torch.save(sd, path)
    return path


def test_encode_shapes_and_code_ranges(codec24):
    x = af.tone(1.3, 24000, kind="chirp").T  # not a whole number of frames
    codes = encode_array(codec24, x, 8)
    assert codes.shape == (1, 8, codec24.n_frames(x.shape[1])) == (1, 8, 98)
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < 1024
    assert len(np.unique(codes[0, 0])) > 5  # the data-initialised codebooks are really used
    y = decode_array(codec24, codes, x.shape[1])
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    stereo = np.stack([x[0], 0.5 * x[0]])  # the pipeline codes channels as a batch
    assert encode_array(codec24, stereo, 4).shape == (2, 4, 98)


def test_windowed_coding_matches_whole_signal_at_the_seams(codec24):
    """1 s windows vs one window over the whole signal: codes agree but for rare near-ties, and the
    decoded audio agrees everywhere to the measured bound, with no spike at the window joins."""
    x = ea.probe_audio(6.0, 24000, seed=3)
    whole, win = 10 ** 6, 75
    a, b = encode_array(codec24, x, 8, whole), encode_array(codec24, x, 8, win)
    assert np.mean(a != b) <= SEAM_CODES_DIFF
    ya, yb = decode_array(codec24, a, x.shape[1], whole), decode_array(codec24, a, x.shape[1], win)
    rms = float(np.sqrt(np.mean(ya ** 2)))
    d = np.abs(ya - yb)[0]
    assert d.max() <= SEAM_DECODE_REL * rms
    hop = codec24.hop_length
    for j in range(win, a.shape[-1], win):  # around each join: no discontinuity beyond the signal's own
        s = slice(j * hop - 4, j * hop + 4)
        assert np.abs(np.diff(yb[0, s])).max() <= np.abs(np.diff(ya[0, s])).max() + SEAM_DECODE_REL * rms


def test_codec_is_deterministic(codec24, weights24):
    x = af.tone(1.0, 24000, kind="noise").T
    a = encode_array(codec24, x, 16)
    np.testing.assert_array_equal(a, encode_array(registry.load("encodec_24khz", weights24[1]), x, 16))
    np.testing.assert_array_equal(decode_array(codec24, a, x.shape[1]), decode_array(codec24, a, x.shape[1]))


def test_start_of_file_decodes_from_the_silence_code(codec24):
    pad = codec24.pad_codes(8)
    assert pad.shape == (8,) and pad.dtype == torch.int64
    silence = encode_array(codec24, np.zeros((1, 24000), np.float32), 8)
    np.testing.assert_array_equal(silence[0, :, -1], pad.numpy())


def test_encodec_imports_without_torchaudio():
    ph = ea._TorchaudioPlaceholder("torchaudio")
    with pytest.raises(ImportError, match="torchaudio is not installed"):
        ph.load  # noqa: B018 - attribute access is what raises
    ea.import_encodec()
    assert "encodec" in sys.modules
    ta = sys.modules.get("torchaudio")
    assert not isinstance(ta, ea._TorchaudioPlaceholder)  # the placeholder is gone again


def test_missing_encodec_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "encodec", None)  # `import encodec` now fails
    with pytest.raises(CodecUnavailableError, match=r"pip install --no-deps encodec==0\.1\.1 einops"):
        ea.Encodec24kCodec()


def test_codecs_lists_encodec_as_needing_weights(cli_noray):
    rows = {r["name"]: r for r in cli_noray.json("codecs")}
    r = rows["encodec_24khz"]
    assert r["needs_weights"] and "encodec_24khz-d7cc33bc.th" in r["weights"]
    assert r["bitrates_kbps"] == [1.5, 3.0, 6.0, 12.0, 24.0] and r["frame_rate"] == 75.0
    code, out = cli_noray("codecs")
    assert code == 0 and "needs --codec-weights" in out


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _encodec_own(weights, x: np.ndarray, rate: int, kbps: float) -> tuple[np.ndarray, np.ndarray]:
    """What EnCodec itself (``EncodecModel.encode/decode``, whole signal, not audioarc's windowed adapter) makes
    of ``[T, C]`` audio at ``rate``: its codes ``[C, K, F]`` of the signal resampled to 24 kHz, and its decode
    resampled back to ``[T, C]`` at ``rate``. An independent reference for what restore writes."""
    from pipeline import audio
    model = ea._build("24")
    model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    model.set_target_bandwidth(kbps)
    y = audio.resample(np.ascontiguousarray(x.T, dtype=np.float32), rate, 24000)
    with torch.inference_mode():
        ((codes, _),) = model.encode(torch.from_numpy(y)[:, None])  # channels as a batch, as the pipeline does
        z = model.decode([(codes, None)])[:, 0, :y.shape[1]].numpy()
    return codes.numpy(), audio.fit_length(audio.resample(z, 24000, rate), x.shape[0]).T


# -- through the archive --------------------------------------------------------------------------
def test_round_trip_through_the_archive(tmp_path, cli, weights24, codec24):
    src, dest = tmp_path / "src", tmp_path / "arc"
    files = {"a_16k.wav": af.write(src / "a_16k.wav", 1.5, 16000, 1, kind="sine"),
             "b_44k_stereo.flac": af.write(src / "b_44k_stereo.flac", 1.1, 44100, 2, kind="chirp")}
    w = str(weights24[0])
    s = cli.json("encode", src, dest, "--codec", "encodec_24khz", "--codec-weights", w, "--window-seconds", "1",
                 "--no-visqol", "--quality-sample", "1")
    assert s["files_archived"] == 2 and s["files_failed"] == 0 and s["codec"] == "encodec_24khz"
    assert s["quality"]["summary"]["files_bad_pairs"] == 0  # quality sampling decodes with the same weights
    d = cli.json("inspect", dest)
    assert d["codec"]["name"] == "encodec_24khz"
    assert d["codec"]["checkpoint_hash"] == codec24.checkpoint_hash()
    out = cli.json("restore", dest, tmp_path / "out", "--format", "wav", "--codec-weights", w)
    assert len(out) == 2
    from pipeline import archive
    rec, entries = archive.open_archive(str(dest))
    entry = {e.relpath: e for e in entries.values()}
    for pair in out:
        name = pair["source"].rsplit("/", 1)[1]
        orig, o_rate = sf.read(str(files[name]), always_2d=True)
        back, b_rate = sf.read(pair["path"], always_2d=True)
        assert b_rate == o_rate and back.shape == orig.shape, name
        # what went in is what EnCodec itself makes of the ORIGINAL: the archive holds its codes (EnCodec
        # reflects the first samples, the adapter sees silence: the first 0.3 s may differ; another file's or
        # channel's codes agree ~4%), and restore writes its decode, in time (100 ms late scores ~0.3).
        # Random weights decode to about the same sound whatever the codes, so the audio cannot tell the
        # channels apart; the codes do.
        want_codes, want = _encodec_own(weights24[0], orig, o_rate, d["bitrate_kbps"])
        got = np.concatenate([c for _, c in archive.read_file_codes(str(dest), entry[name], rec.codec)], axis=2)
        assert got.shape == want_codes.shape, name
        assert np.mean(got[..., 23:] == want_codes[..., 23:]) > 0.98, name
        lead = o_rate // 10  # the start decodes from different codes: alike (~0.999), past it ~0.999999
        for c in range(orig.shape[1]):
            assert np.corrcoef(want[:, c], back[:, c])[0, 1] > 0.99, (name, c)
            assert np.corrcoef(want[lead:, c], back[lead:, c])[0, 1] > 0.9999, (name, c)
            assert _rms(back[:, c]) == pytest.approx(_rms(want[:, c]), rel=0.01), (name, c)
    # the archive carries the checkpoint it was made with: restoring needs no --codec-weights
    again = cli.json("restore", dest, tmp_path / "o2", "--format", "wav")
    for a, b in zip(sorted(out, key=lambda p: p["source"]), sorted(again, key=lambda p: p["source"])):
        np.testing.assert_array_equal(sf.read(a["path"])[0], sf.read(b["path"])[0])
    code, _ = cli("encode", src, tmp_path / "arc2", "--codec", "encodec_24khz")  # a new archive needs it
    assert code == 1 and "--codec-weights" in cli.last_err


# -- 48 kHz: joint stereo, 1 s segments, gains beside the codes -----------------------------------
@pytest.fixture(scope="module")
def weights48(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("w48") / "encodec48.th"
    torch.save(ea.random_state_dict(ea.Encodec48kCodec, seed=0), path)
    return path


@pytest.fixture(scope="module")
def codec48(weights48):
    return registry.load("encodec_48khz", weights48)


def test_48k_architecture_and_ladder(codec48):
    c = codec48
    assert 14.8e6 < c.n_params() < 14.9e6
    assert (c.sample_rate, c.channels, c.codebook_size, c.n_q, c.segment_frames, c.side_gains) == \
        (48000, 2, 1024, 16, 150, True)
    assert c.ladder() == {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}
    assert tuple(sorted(c.ladder())) == c.target_bandwidths
    assert c.hop_length * c.segment_frames == 47550  # segment stride; segments are 48000 samples
    assert c.n_frames(48000 * 3) == 455


def test_48k_codes_do_not_depend_on_the_windows(codec48):
    """Segments are coded independently, as EnCodec does: any window cut gives the same codes, gains and
    decoded samples (to float rounding: the segments are batched differently)."""
    x = ea.probe_audio(3.2, 48000, channels=2, seed=4)
    a, ga = encode_array(codec48, x, 4, window_frames=150, with_gains=True)
    b, gb = encode_array(codec48, x, 4, window_frames=1500, with_gains=True)
    assert a.shape == (1, 4, codec48.n_frames(x.shape[1])) and ga.shape == (1, 4)
    assert np.mean(a != b) <= 0.002  # a near-tie may flip with the last bit of a batched convolution
    np.testing.assert_array_equal(ga, gb)
    assert a.min() >= 0 and a.max() < 1024
    ya = decode_array(codec48, a, x.shape[1], window_frames=150, gains=ga)
    yb = decode_array(codec48, a, x.shape[1], window_frames=1500, gains=ga)
    assert ya.shape == x.shape
    np.testing.assert_allclose(ya, yb, atol=1e-5 * float(np.sqrt(np.mean(ya ** 2))))
    with pytest.raises(ValueError, match="with_gains"):
        encode_array(codec48, x, 4)
    with pytest.raises(ValueError, match="gains"):
        decode_array(codec48, a, x.shape[1])


def test_48k_segment_matches_encodec_itself(codec48, weights48):
    """One 1 s segment: the adapter's codes and audio are EnCodec's own (``EncodecModel.encode/decode``
    with the same weights), but for the gain, which the adapter rounds to float16 before normalising."""
    model = ea._build("48")
    model.load_state_dict(torch.load(weights48, weights_only=True))
    model.set_target_bandwidth(6.0)
    x = torch.from_numpy(ea.probe_audio(1.0, 48000, channels=2, seed=5))[None]
    with torch.inference_mode():
        ref_codes, scale = model.encode(x)[0]  # its first segment: x[:, :, :48000]
        ref = model._decode_frame((ref_codes, scale))
        codes, gains = codec48.encode_with_gains(x, 4)  # 150 frames = 150 * 317 + 450 samples
        pad, none = torch.zeros(1, 4, 150, dtype=torch.int64), torch.zeros(1, 1)  # no segment before it
        y = codec48.decode_with_gains(torch.cat([pad, codes], -1), torch.cat([none, gains], 1))
        y_own = codec48.decode_with_gains(torch.cat([pad, ref_codes], -1), torch.cat([none, scale.view(1, 1)], 1))
    n = y.shape[-1]
    assert n == 47550  # the segment's own samples; the last 450 are crossfaded with the next segment
    np.testing.assert_array_equal(y_own.numpy(), ref[..., :n].numpy())  # EnCodec's frame, decoded alike
    assert float(gains[0, 0]) == pytest.approx(float(scale), rel=2 ** -11)  # float16
    assert (codes == ref_codes).float().mean() >= 0.98  # the float16 gain may flip a rare near-tie
    rel = float((y - ref[..., :n]).abs().max() / ref.pow(2).mean().sqrt())
    assert rel < (3e-3 if torch.equal(codes, ref_codes) else 0.05)  # float16 gain: <= 2^-11 of the level


def test_48k_decoding_applies_the_stored_gains(codec48):
    x = ea.probe_audio(2.5, 48000, channels=2, seed=6)
    codes, gains = encode_array(codec48, x, 8, with_gains=True)
    y1 = decode_array(codec48, codes, x.shape[1], gains=gains)
    y2 = decode_array(codec48, codes, x.shape[1], gains=gains * 2)
    np.testing.assert_allclose(y2, 2 * y1, rtol=1e-5, atol=1e-7)
    mono = decode_array(codec48, codes, x.shape[1], gains=gains, channels=1)
    np.testing.assert_allclose(mono[0], y1.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_48k_round_trip_through_the_archive(tmp_path, cli, weights48):
    """Stereo in/out, mono in/out, a 6-channel file refused with the reason, and the gains: a quiet and a
    loud copy of the same stereo signal restore at the same level ratio as the originals."""
    import pyarrow.parquet as pq

    from pipeline.cli import EXIT_PARTIAL
    src, dest = tmp_path / "src", tmp_path / "arc"
    loud = ea.probe_audio(2.3, 48000, channels=2, seed=8).T
    files = {"loud.wav": loud, "quiet.wav": 0.05 * loud}
    for name, x in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(src / name), x, 48000, subtype="FLOAT")
    af.write(src / "mono_44k.flac", 1.2, 44100, 1, kind="chirp")
    six = af.write(src / "surround.wav", 0.5, 48000, 6)
    w = str(weights48)
    code, out = cli("encode", src, dest, "--codec", "encodec_48khz", "--codec-weights", w, "--window-seconds", "1",
                    "--quality-sample", "1", "--no-visqol", "--json")
    assert code == EXIT_PARTIAL
    s = json.loads(out)
    assert s["files_archived"] == 3 and s["files_failed"] == 1
    q = s["quality"]["summary"]
    assert q["files_measured"] == 3 and q["files_bad_pairs"] == 0  # quality decodes stereo and mono alike
    rows = {r["relpath"]: r for r in cli.json("ls", dest)}
    assert rows["surround.wav"]["status"] == "failed"
    reason = rows["surround.wav"]["reason"]
    assert str(six) in reason and "6 channels" in reason and "mono codec" in reason
    assert all(rows[n]["status"] == "archived" for n in ("loud.wav", "quiet.wav", "mono_44k.flac"))
    d = cli.json("inspect", dest)
    assert d["format_version"] == "2.0" and d["codec"]["name"] == "encodec_48khz" and d["bitrate_kbps"] == 6.0
    shards = list((dest / "shards").rglob("*.parquet"))
    t = pq.read_table(shards[0])
    assert set(t["channels"].to_pylist()) == {1}  # one joint-stereo code stream per file
    assert all(g is not None and len(g) % 2 == 0 for g in t["gains"].to_pylist())
    out = {p["source"].rsplit("/", 1)[1]: p["path"] for p in
           cli.json("restore", dest, tmp_path / "out", "--format", "wav", "--codec-weights", w)}
    assert set(out) == {"loud.wav", "quiet.wav", "mono_44k.flac"}
    back = {n: sf.read(p, always_2d=True) for n, p in out.items()}
    assert back["loud.wav"][0].shape == loud.shape and back["loud.wav"][1] == 48000
    y, rate = back["mono_44k.flac"]
    assert rate == 44100 and y.shape == sf.read(str(src / "mono_44k.flac"), always_2d=True)[0].shape
    rms = {n: float(np.sqrt(np.mean(back[n][0] ** 2))) for n in ("loud.wav", "quiet.wav")}
    assert rms["loud.wav"] / rms["quiet.wav"] == pytest.approx(20.0, rel=0.02)
