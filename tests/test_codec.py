"""Codec contract: MDCT reconstruction, window invariance, any-prefix decoding, ladder, registry."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.codec import load, registry
from pipeline.codec.mdct import MDCT
from pipeline.codec.windows import decode_array, encode_array
from pipeline.errors import CodecUnavailableError
from tests.audio_factory import tone


@pytest.fixture(scope="module")
def codec():
    torch.set_num_threads(1)
    return load("mdct_rvq")


def test_mdct_reconstructs_perfectly():
    m = MDCT(320)
    x = torch.randn(2, 12 * 320)
    y = m.inverse(m(x))
    assert torch.allclose(y[:, 320:-320], x[:, 320:-320], atol=1e-4)


def test_ladder_follows_formula(codec):
    ladder = codec.ladder()
    for kbps, n_q in ladder.items():
        assert kbps == pytest.approx(n_q * math.log2(codec.codebook_size) * codec.frame_rate / 1000)
    assert codec.n_q_for_kbps(6) == 8
    with pytest.raises(ValueError, match="ladder"):
        codec.n_q_for_kbps(5)


def test_windowed_encoding_is_seamless(codec):
    """Codes and decoded samples do not depend on where windows are cut (no seams)."""
    x = tone(3.1, 24000, kind="chirp").T
    a = encode_array(codec, x, 8, window_frames=1500)
    b = encode_array(codec, x, 8, window_frames=13)
    assert a.shape == (1, 8, codec.n_frames(x.shape[1]))
    np.testing.assert_array_equal(a, b)
    y1 = decode_array(codec, a, x.shape[1], window_frames=1500)
    y2 = decode_array(codec, a, x.shape[1], window_frames=7)
    assert y1.shape == x.shape
    np.testing.assert_allclose(y1, y2, atol=1e-5)


def test_more_stages_decode_closer(codec):
    """Any prefix of the stack decodes, and error falls as stages are added (trained codebooks)."""
    x = tone(2.0, 24000, kind="chirp", amp=0.2).T
    codes = encode_array(codec, x, codec.n_q)
    errs = []
    for k in (2, 4, 8, 16):
        y = decode_array(codec, codes[:, :k], x.shape[1])
        errs.append(float(np.mean((x - y) ** 2)))
    assert all(a > b for a, b in itertools.pairwise(errs)), errs  # strictly: a stage that adds nothing is a fault
    assert errs[-1] < 0.8 * errs[0] and errs[-1] < 0.75 * float(np.mean(x ** 2)), errs  # (silence: the signal's power)


def test_restored_audio_is_recognisably_the_input(codec):
    x = tone(2.0, 24000, freq=330.0).T
    y = decode_array(codec, encode_array(codec, x, 8), x.shape[1])
    assert np.corrcoef(x[0], y[0])[0, 1] > 0.8


def test_decoding_is_deterministic(codec):
    x = tone(1.0, 24000, kind="noise").T
    codes = encode_array(codec, x, 8)
    np.testing.assert_array_equal(decode_array(codec, codes, x.shape[1]), decode_array(codec, codes, x.shape[1]))


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(CodecUnavailableError, match="available codecs: .*mdct_rvq"):
        registry.load("no_such_codec")


def test_checkpoint_hash_changes_with_weights(codec):
    other = load("mdct_rvq")
    h = other.checkpoint_hash()
    assert h == codec.checkpoint_hash()
    with torch.no_grad():
        other.rvq.codebooks[0, 0, 0] += 1.0
    assert other.checkpoint_hash() != h


def test_codec_info_is_the_one_record_of_a_codec(codec):
    """``info()`` states what the codec is; the archive's record, the window cutter and `audioarc codecs` all
    read it, so they cannot disagree with the codec."""
    import pickle

    from pipeline.codec.identity import CodecInfo
    from pipeline.codec.windows import Windower
    for c in (codec, load("neural_rvq")):
        info = c.info()
        assert isinstance(info, CodecInfo) and pickle.loads(pickle.dumps(info)) == info
        assert (info.name, info.version, info.checkpoint_hash) == (c.name, c.version, c.checkpoint_hash())
        assert (info.encode_context, info.decode_context, info.channels) == (
            tuple(c.encode_context), tuple(c.decode_context), c.channels)
        assert info.bitrates_kbps() == sorted(c.ladder())
        for n_q in c.ladder_n_q:
            assert info.record(n_q) == c.record(n_q)
            assert info.record(n_q).kbps_per_channel == pytest.approx(c.kbps(n_q))
        x = tone(1.3, c.sample_rate).T
        a, b = Windower(c, 20, 1), Windower(info, 20, 1)
        wa = list(a.push(x)) + list(a.finish())
        wb = list(b.push(x)) + list(b.finish())
        assert [(w.start, w.stop) for w in wa] == [(w.start, w.stop) for w in wb]
        assert all(np.array_equal(p.samples, q.samples) for p, q in zip(wa, wb))
    rows = {r["name"]: r for r in registry.describe()}
    assert rows["neural_rvq"]["checkpoint_hash"] == load("neural_rvq").checkpoint_hash()
    assert rows["neural_rvq"]["bitrates_kbps"] == sorted(load("neural_rvq").ladder())
    with pytest.raises(ValueError, match="no weights"):
        codec.info(weights=False).record(8)


@pytest.mark.parametrize("name", ["mdct_rvq", "neural_rvq"])
def test_long_windows_decode_in_bounded_blocks_with_the_same_samples(name):
    """A window longer than the joiner's decode block is decoded in several passes, each with its context: the
    samples equal a one-pass decode (bit for bit at the default 10 s block), and no pass decodes more than a
    block, whatever window length the archive was written with."""
    from pipeline.codec.windows import DECODE_BLOCK_SECONDS, Joiner
    c = load(name)
    x = tone(25.0, c.sample_rate, kind="chirp").T
    codes = encode_array(c, x, 8, window_frames=10_000)  # one 25 s window
    passes = []
    real = c.decode

    def counting(k):
        passes.append(k.shape[-1])
        return real(k)

    out = {}
    for block in (None, DECODE_BLOCK_SECONDS, 3.0):
        j = Joiner(c, x.shape[1], block_seconds=block)
        passes.clear()
        c.decode = counting
        try:
            out[block] = np.concatenate([*j.feed(codes), *j.finish()], axis=1)
        finally:
            del c.decode
        if block is None:
            assert len(passes) <= 2  # the window in one pass (and the flush of its last frames)
        else:
            limit = math.ceil(block * c.frame_rate) + sum(c.decode_context)
            assert len(passes) >= 25 // block and max(passes) <= limit, (block, passes)
    assert out[None].shape == x.shape
    np.testing.assert_array_equal(out[DECODE_BLOCK_SECONDS], out[None])
    np.testing.assert_allclose(out[3.0], out[None], atol=1e-5)


@pytest.mark.parametrize("name", ["neural_rvq", "mdct_rvq"])
def test_a_codec_kept_for_decoding_decodes_the_same_samples_and_holds_less(name):
    """``for_decoding(n_q)`` (what a restore keeps): at every rung the same samples as the full codec, the same
    checkpoint hash and decode context (the archive's frame layout); the neural codec drops its encoder and the
    decoders and codebooks that rung does not use, and refuses to encode."""
    full = load(name)
    x = np.ascontiguousarray(tone(1.5, full.sample_rate).T)  # [1, T]
    wav = torch.from_numpy(x)[None]
    codes = encode_array(full, x, full.n_q)
    size = sum(t.numel() for t in full.state_dict().values())
    for n_q in full.ladder_n_q:
        kept = load(name).for_decoding(n_q)
        assert kept.checkpoint_hash() == full.checkpoint_hash()
        assert kept.decode_context == full.decode_context
        same = decode_array(kept, codes[:, :n_q], wav.shape[-1])
        assert np.array_equal(same, decode_array(full, codes[:, :n_q], wav.shape[-1])), n_q
        if name == "neural_rvq":
            assert sum(t.numel() for t in kept.state_dict().values()) < 0.5 * size, n_q
            with pytest.raises(RuntimeError, match="decoding only"):
                kept.encode(wav, n_q)
            if n_q < full.n_q:
                with pytest.raises(ValueError, match="stages"):  # deeper codebooks are gone
                    kept.decode(torch.zeros(1, n_q + 1, 200, dtype=torch.int64))
    with pytest.raises(ValueError, match="n_q must be"):
        load(name).for_decoding(full.n_q + 1)
