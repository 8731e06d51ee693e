"""Bin spreading (``pipeline/codec/binspread.py``) and ``neural_rvq`` weights that carry it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.archive import weights as archive_weights
from pipeline.codec import registry
from pipeline.codec.binspread import BinSpread
from pipeline.codec.neural import NeuralRvqCodec
from pipeline.codec.windows import decode_array, encode_array
from pipeline.errors import CodecUnavailableError
from tests.test_bandgain import RATE, signal, tiny, with_gains

K0 = 107  # 4012.5 Hz: the shipped release's first spread bin


def test_spread_fills_a_comb_and_keeps_energy_and_signs():
    torch.manual_seed(0)
    c = torch.randn(2, 320, 5)
    comb = c.clone()
    comb[:, K0:] = 0.0
    comb[:, K0::4] = 2.0 * torch.sign(c[:, K0::4])  # one bin in four carries the band (the decoder's comb)
    out = BinSpread(K0, 9, 320)(comb)
    assert torch.equal(out[:, :K0], comb[:, :K0])  # below the first bin: untouched
    hi = out[:, K0 + 8: 320 - 8] ** 2
    assert float(hi.min()) > 0.3 and float(hi.max()) < 1.7  # every bin now near the band's mean energy (1.0)
    assert torch.allclose((out[:, K0:] ** 2).sum(1), (comb[:, K0:] ** 2).sum(1), rtol=0.1)  # energy kept
    nz = comb[:, K0:] != 0
    assert torch.equal(torch.sign(out[:, K0:])[nz], torch.sign(comb[:, K0:])[nz])  # a sign never flips
    flat = torch.sign(c) * 0.5  # an even spectrum comes back as it was
    assert torch.allclose(BinSpread(K0, 9, 320)(flat), flat)


@pytest.mark.parametrize("first,width,match", [(K0, 8, "odd"), (K0, 1, "odd"), (K0, 65, "odd"),
                                               (0, 9, "first bin"), (316, 9, "first bin")])
def test_invalid_spreads_are_refused(first, width, match):
    with pytest.raises(ValueError, match=match):
        BinSpread(first, width, 320)


def spread(c: NeuralRvqCodec, first: int = 200, width: int = 9) -> NeuralRvqCodec:
    c.set_bin_spread(first, width)
    return c


def test_spread_changes_only_the_decoded_bins_above_it_and_windows_exactly():
    plain, c = tiny(), spread(tiny())
    assert plain.checkpoint_hash() != c.checkpoint_hash()
    x = signal(2.0, seed=2)
    codes = encode_array(c, x, 6)
    assert np.array_equal(codes, encode_array(plain, x, 6))  # codes do not change
    a, b = decode_array(plain, codes, x.shape[1]), decode_array(c, codes, x.shape[1])
    inside = slice(1, x.shape[1] // c.hop_length)  # frames a re-analysis gives back exactly (TDAC)
    fa, fb = plain.frames_of(a[0])[..., inside], c.frames_of(b[0])[..., inside]
    assert torch.allclose(fa[:, :200], fb[:, :200], atol=1e-5 * float(fa.abs().max()))
    assert not torch.allclose(fa[:, 200:], fb[:, 200:], atol=1e-3 * float(fa.abs().max()))
    # a comb the decoder leaves is evened out: the bins' energies vary less across the spread range
    ea, eb = (fa[0, 205:315] ** 2).mean(-1), (fb[0, 205:315] ** 2).mean(-1)
    assert float(eb.std() / eb.mean()) < float(ea.std() / ea.mean())
    yb = decode_array(c, codes, x.shape[1], window_frames=23)
    assert np.abs(yb - b).max() <= 1e-5 * np.abs(b).max()


def test_band_gains_are_coded_against_the_spread_base():
    c = spread(with_gains(), first=150, width=5)
    x = signal(2.0, seed=4)
    full = encode_array(c, x, 7)
    base = decode_array(c, full[:, :4], x.shape[1])[0]
    inside = slice(1, x.shape[1] // c.hop_length)
    bg = c.band_gains
    want = bg.quantize(bg.gains_db(c.frames_of(x[0]), c.frames_of(base)))[0, :, inside]
    got = bg.decode_db(torch.from_numpy(full[:, 4:]))[0, :, inside]
    assert torch.equal(got, torch.gather(bg.levels, 1, want))
    assert np.array_equal(full[:, :4], encode_array(with_gains(), x, 4))  # the base's codes as without spread


def test_spread_travels_in_checkpoints_decode_only_and_archive_weights(tmp_path):
    c = spread(with_gains())
    torch.save({"model": c.state_dict()}, tmp_path / "w.pt")
    back = NeuralRvqCodec(width=32, latent_dim=8, dilations=(1, 2), n_q=8, codebook_size=64)
    back.load_weights(torch.load(tmp_path / "w.pt", weights_only=True))
    assert back.checkpoint_hash() == c.checkpoint_hash() and int(back.bin_spread.first_bin) == 200
    x = signal(1.0)
    codes = encode_array(c, x, 7)
    d = spread(with_gains()).for_decoding(7)
    assert np.array_equal(decode_array(d, codes, x.shape[1]), decode_array(c, codes, x.shape[1]))
    torch.manual_seed(3)
    full = NeuralRvqCodec().eval()
    full.set_bin_spread(K0, 9)
    got = archive_weights.from_bytes(archive_weights.to_bytes(full), "neural_rvq", full.checkpoint_hash(), "test")
    assert got.checkpoint_hash() == full.checkpoint_hash() and int(got.bin_spread.width) == 9
    assert c.clear_bin_spread() and c.checkpoint_hash() == with_gains().checkpoint_hash()  # without: as before


def test_a_spread_limited_to_low_rungs_leaves_the_others_and_the_gain_base_alone(tmp_path):
    """``max_stages`` (codec version 5, release 9): only decodes of at most that many RVQ stages are spread."""
    plain = with_gains()
    c = with_gains()
    c.set_bin_spread(200, 9, max_stages=2)
    assert c.checkpoint_hash() not in (plain.checkpoint_hash(), spread(with_gains()).checkpoint_hash())
    x = signal(2.0, seed=5)
    full = encode_array(c, x, 7)  # 4 RVQ stages + 3 band-gain stages
    assert np.array_equal(full, encode_array(plain, x, 7))  # the gains' base (4 stages) is not spread
    inside = slice(1, x.shape[1] // c.hop_length)
    for k in (2, 4, 7):
        a, b = decode_array(plain, full[:, :k], x.shape[1]), decode_array(c, full[:, :k], x.shape[1])
        if k <= 2:
            fa, fb = plain.frames_of(a[0])[..., inside], c.frames_of(b[0])[..., inside]
            assert not torch.allclose(fa[:, 200:], fb[:, 200:], atol=1e-3 * float(fa.abs().max()))
        else:
            assert np.array_equal(a, b), k
    torch.save({"model": c.state_dict()}, tmp_path / "w.pt")
    back = with_gains()
    back.load_weights(torch.load(tmp_path / "w.pt", weights_only=True))
    assert back.checkpoint_hash() == c.checkpoint_hash() and int(back.bin_spread.max_stages) == 2
    d = back.for_decoding(7)
    assert np.array_equal(decode_array(d, full[:, :2], x.shape[1]), decode_array(c, full[:, :2], x.shape[1]))
    for bad in (0, 9, -1):
        crafted = dict(c.state_dict(), **{"bin_spread.max_stages": torch.tensor(bad)})
        with pytest.raises(CodecUnavailableError, match="bin spread"):
            with_gains().load_weights({"model": crafted}, "crafted.pt")


def test_crafted_spreads_are_refused():
    sd = dict(spread(tiny()).state_dict())
    for key, value in (("bin_spread.width", torch.tensor(8)), ("bin_spread.first_bin", torch.tensor(-3)),
                       ("bin_spread.width", torch.tensor(10 ** 6))):
        bad = dict(sd, **{key: value})
        with pytest.raises(CodecUnavailableError, match="bin spread"):
            tiny().load_weights({"model": bad}, "crafted.pt")
    del sd["bin_spread.width"]
    with pytest.raises(CodecUnavailableError, match="bin spread"):
        tiny().load_weights({"model": sd}, "crafted.pt")


def test_decode_rules_job_sets_and_removes_them(tmp_path):
    from jobs import set_decode_rules
    r6 = registry.WEIGHTS_DIR / "neural_rvq-011c0d1d.pt"
    out = set_decode_rules.main(["--weights", str(r6), "--out", str(tmp_path / "s.pt"), "--spread-from-hz", "5000",
                                 "--spread-width", "7", "--dither", "8:2000,16:1800,32:2500"])
    c, plain = registry.load("neural_rvq", out), registry.load("neural_rvq", r6)
    assert (int(c.bin_spread.first_bin), int(c.bin_spread.width)) == (134, 7)  # 134 x 37.5 Hz = 5025 Hz
    assert c.dither_cutoffs.pairs() == ((8, 2000.0), (16, 1800.0), (32, 2500.0))
    keys = set(plain.state_dict())
    assert set(c.state_dict()) - keys == {"bin_spread.first_bin", "bin_spread.width", "dither_cutoffs.table"}
    assert all(torch.equal(c.state_dict()[k], plain.state_dict()[k]) for k in keys)  # nothing else changed
    assert registry.read_weights(out)["config"]["bin_spread"]["width"] == 7
    # an option left out keeps what the input has; removing both gives the input's hash back
    only = set_decode_rules.main(["--weights", str(out), "--out", str(tmp_path / "o.pt"), "--no-dither-table"])
    back = registry.load("neural_rvq", only)
    assert back.dither_cutoffs is None and int(back.bin_spread.width) == 7
    low = set_decode_rules.main(["--weights", str(only), "--out", str(tmp_path / "l.pt"), "--spread-max-stages", "2"])
    lc = registry.load("neural_rvq", low)
    assert (int(lc.bin_spread.first_bin), int(lc.bin_spread.width), int(lc.bin_spread.max_stages)) == (134, 7, 2)
    assert lc.bin_spread.applies(2) and not lc.bin_spread.applies(4)
    assert registry.read_weights(low)["config"]["bin_spread"]["max_stages"] == 2
    every = set_decode_rules.main(["--weights", str(low), "--out", str(tmp_path / "e.pt"), "--spread-max-stages", "0"])
    assert registry.load("neural_rvq", every).checkpoint_hash() == back.checkpoint_hash()  # 0: every rate again
    off = set_decode_rules.main(["--weights", str(only), "--out", str(tmp_path / "off.pt"), "--no-spread"])
    assert registry.load("neural_rvq", off).checkpoint_hash() == plain.checkpoint_hash()
    assert not {"bin_spread", "dither_cutoffs"} & set(registry.read_weights(off)["config"])
    for bad, match in ((["--spread-width", "4"], "spread-width"), (["--dither", "8:2000,4:1000"], "dither"),
                       (["--dither", "8:2000"], "dither"), (["--dither", "eight"], "stage:Hz"), ([], "nothing to set")):
        with pytest.raises(SystemExit, match=match):
            set_decode_rules.main(["--weights", str(r6), "--out", str(tmp_path / "x.pt"), *bad])


def test_dither_cutoffs_move_where_the_signs_change_and_travel_with_the_weights(tmp_path):
    c = tiny()
    x = signal(2.0, seed=3)
    codes = torch.from_numpy(encode_array(c, x, 6))
    n = codes.shape[2] - sum(c.decode_context) + 1
    first = lambda s: int((s[0] != 1).any(-1).nonzero()[0])  # noqa: E731  (the first bin that ever flips)
    built_in = c.dither(codes, n)
    c.set_dither_cutoffs([(4, 1000.0), (8, 4000.0)])  # 6 stages: from 4 kHz instead of 1.5 kHz
    moved = c.dither(codes, n)
    k0 = int(np.ceil(4000 * 2 * c.hop_length / RATE))
    assert bool((moved[:, :k0] == 1).all()) and torch.equal(moved[:, k0:], built_in[:, k0:])
    assert first(built_in) == int(np.ceil(1500 * 2 * c.hop_length / RATE)) and first(moved) == k0
    sd = c.state_dict()
    back = tiny()
    back.load_weights({"model": sd})
    assert back.dither_cutoffs.pairs() == c.dither_cutoffs.pairs() and back.checkpoint_hash() == c.checkpoint_hash()
    for table in ([[4, 1000.0]], [[8, 1000.0], [4, 500.0]], [[8, 99999.0]], [[8.5, 1000.0]], [[8, 1000, 3]]):
        with pytest.raises(CodecUnavailableError, match="dither cutoffs"):
            tiny().load_weights({"model": dict(sd, **{"dither_cutoffs.table": torch.tensor(table)})}, "crafted.pt")
    assert c.clear_dither_cutoffs() and c.checkpoint_hash() == tiny().checkpoint_hash()


def test_shipped_release_spreads_its_high_bins_where_its_decoder_leaves_a_comb():
    c = registry.load("neural_rvq")
    if c.bin_spread is None:
        pytest.skip("the shipped weights carry no bin spread")
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32)[None]  # white noise: every bin has energy
    want = (c.frames_of(x[0])[0, :, 2:-2] ** 2).mean(-1)
    k0 = int(c.bin_spread.first_bin) + 8
    rungs = [k for k in (2, 8, 32) if c.bin_spread.applies(k)]
    assert 2 in rungs  # the 1.5 kbps decoder (release 8's in release 9) leaves a comb: it is spread
    for k in rungs:
        got = (c.frames_of(decode_array(c, encode_array(c, x, k), x.shape[1])[0])[0, :, 2:-2] ** 2).mean(-1)
        # release 7 (no spread) left 84 % of these bins more than 20 dB under the original's energy
        assert float((got[k0:300] < 0.1 * want[k0:300]).float().mean()) < 0.1, k
