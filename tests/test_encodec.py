"""EnCodec adapters with random weights of the real architecture (the pretrained checkpoints cannot be
fetched here): architecture and ladder, checkpoint loading, windowed coding seams, determinism, and a
round trip through the archive. Skipped only when the ``encodec`` package is not installed."""
from __future__ import annotations

import importlib.util
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

# measured with jobs/encodec_context.py (random weights, 1 s context each side): windowed vs whole-signal
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
    for pair in out:
        name = pair["source"].rsplit("/", 1)[1]
        orig, o_rate = sf.read(str(files[name]), always_2d=True)
        back, b_rate = sf.read(pair["path"], always_2d=True)
        assert b_rate == o_rate and back.shape == orig.shape, name
        assert np.isfinite(back).all()
    code, _ = cli("restore", dest, tmp_path / "o2")  # the archive's codec needs its checkpoint
    assert code == 1 and "--codec-weights" in cli.last_err and "encodec_24khz" in cli.last_err
    assert not (tmp_path / "o2").exists()
    code, _ = cli("encode", src, tmp_path / "arc2", "--codec", "encodec_24khz")
    assert code == 1 and "--codec-weights" in cli.last_err
