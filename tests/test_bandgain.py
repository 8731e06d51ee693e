"""Band-gain stages (``pipeline/codec/bandgain.py``) and ``neural_rvq`` weights that carry them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.archive import weights as archive_weights
from pipeline.codec import registry
from pipeline.codec.bandgain import BandGains, bark_edges, fit_levels
from pipeline.codec.neural import NeuralRvqCodec
from pipeline.codec.windows import decode_array, encode_array
from pipeline.errors import CodecUnavailableError, IntegrityError

RATE = 24000
EDGES = torch.tensor([0, 20, 60, 140, 320])


def tiny(seed: int = 0) -> NeuralRvqCodec:
    torch.manual_seed(seed)
    c = NeuralRvqCodec(width=32, latent_dim=8, dilations=(1, 2), n_q=8, codebook_size=64).eval()
    with torch.no_grad():
        c.rvq.codebooks.normal_(0, 0.3)
    return c


def levels(n_bands: int = 4, n_levels: int = 16, span: float = 12.0) -> torch.Tensor:
    return torch.linspace(-span, span, n_levels)[None].repeat(n_bands, 1) + torch.arange(n_bands)[:, None] * 0.25


def with_gains(seed: int = 0) -> NeuralRvqCodec:
    c = tiny(seed)
    c.set_band_gains(EDGES, levels(), base_stages=4)  # 4 bands x 4 bits = 16 bits: 3 six-bit stages
    return c


def signal(seconds: float = 3.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2  # an envelope that changes frame by frame
    x = 0.2 * np.sin(2 * np.pi * (200 * t + 900 * t ** 2)) + 0.05 * env * rng.standard_normal(len(t))
    return x.astype(np.float32)[None]


def test_codes_pack_a_prefix_of_bands_and_decode_to_the_levels():
    bg = BandGains(EDGES, levels(), base_stages=4, code_bits=6)
    assert (bg.n_bands, bg.band_bits, bg.n_stages) == (4, 4, 3)
    assert [bg.bands_in(s) for s in range(4)] == [0, 1, 3, 4]
    torch.manual_seed(0)
    target = torch.randn(2, 320, 9)
    decoded = target * torch.exp(torch.randn(2, 320, 9) * 0.5)
    codes = bg.encode(target, decoded, 3)
    assert codes.shape == (2, 3, 9) and int(codes.min()) >= 0 and int(codes.max()) < 64
    want = torch.gather(bg.levels[None].expand(2, -1, -1), 2, bg.quantize(bg.gains_db(target, decoded)))
    for s in range(4):
        db = bg.decode_db(codes[:, :s])
        n = bg.bands_in(s)
        assert torch.equal(db[:, :n], want[:, :n]) and bool((db[:, n:] == 0).all()), s
    assert torch.equal(bg.encode(target, decoded, 2), codes[:, :2])  # fewer stages: a prefix of the codes
    # the scale brings each band's energy to the quantized target
    scaled = decoded * bg.scale(codes, 320)
    err_before = bg.gains_db(target, decoded).abs().mean()
    err_after = bg.gains_db(target, scaled).abs().mean()
    assert err_after < 0.5 * err_before and err_after < 1.0, (err_before, err_after)


@pytest.mark.parametrize("edges,lev,match", [
    ([0, 20, 10, 320], levels(3), "rise"),
    ([1, 20, 60, 320], levels(3), "rise"),
    (EDGES, levels(4, 12), "power of two"),
    (EDGES, levels(4).flip(1), "sorted"),
    (EDGES, levels(4) * float("nan"), "finite"),
    (EDGES, levels(4) * 100, "finite"),
    (EDGES, levels(3), "edges"),
])
def test_invalid_tables_are_refused(edges, lev, match):
    with pytest.raises(ValueError, match=match):
        BandGains(torch.as_tensor(edges), lev, base_stages=4)


def test_codec_refuses_gains_that_do_not_fit_it():
    c = tiny()
    with pytest.raises(ValueError, match="exceed"):
        c.set_band_gains(EDGES, levels(), base_stages=6)  # 6 + 3 stages > 8
    with pytest.raises(ValueError, match="bin"):
        c.set_band_gains(torch.tensor([0, 20, 60, 140, 400]), levels(), base_stages=4)


def test_gains_leave_the_lower_stages_alone_and_window_exactly():
    plain, c = tiny(), with_gains()
    assert plain.checkpoint_hash() != c.checkpoint_hash()
    x = signal()
    after = c.decoder.rf[0] * c.hop_length  # past the decoder's look-back into the padding before the file
    for k in (2, 4):  # codes and samples up to the base are those of the same weights without gains
        a = encode_array(c, x, k)
        assert np.array_equal(a, encode_array(plain, x, k))
        assert np.array_equal(decode_array(c, a, x.shape[1])[:, after:], decode_array(plain, a, x.shape[1])[:, after:])
    full = encode_array(c, x, 7, window_frames=1500)
    assert np.array_equal(full, encode_array(c, x, 7, window_frames=37))  # windows see the base's look-back
    assert np.array_equal(full[:, :4], encode_array(c, x, 4))
    for k in (5, 6):  # fewer gain stages: a prefix of the codes
        assert np.array_equal(encode_array(c, x, k), full[:, :k])
    ya = decode_array(c, full, x.shape[1], window_frames=1500)
    yb = decode_array(c, full, x.shape[1], window_frames=29)
    assert np.abs(ya - yb).max() <= 1e-5 * np.abs(ya).max()


def _band_error_db(c: NeuralRvqCodec, x: np.ndarray, y: np.ndarray) -> float:
    g = c.band_gains.gains_db(c.frames_of(x[0]), c.frames_of(y[0]))
    return float(g[..., 2:-2].abs().mean())


def test_gain_stages_bring_band_energies_to_the_original():
    c = with_gains()
    x = signal()
    full = encode_array(c, x, 7)
    errs = [_band_error_db(c, x, decode_array(c, full[:, :k], x.shape[1])) for k in (4, 5, 6, 7)]
    assert errs[3] < errs[2] < errs[0] and errs[3] < 0.3 * errs[0], errs


def test_decode_only_codec_gives_the_same_samples():
    c = with_gains()
    x = signal(2.0)
    full = encode_array(c, x, 7)
    want = {k: decode_array(c, full[:, :k], x.shape[1]) for k in (4, 7)}
    for k in (4, 7):
        d = with_gains().for_decoding(k)
        assert d.checkpoint_hash() == c.checkpoint_hash()
        assert d.band_gains is not None and np.array_equal(d.pad_codes(k), c.pad_codes(k))
        assert np.array_equal(decode_array(d, full[:, :k], x.shape[1]), want[k])


def test_band_gains_travel_in_checkpoints_and_archive_weights(tmp_path):
    c = with_gains()
    torch.save({"model": c.state_dict()}, tmp_path / "w.pt")
    back = NeuralRvqCodec(width=32, latent_dim=8, dilations=(1, 2), n_q=8, codebook_size=64)
    back.load_weights(torch.load(tmp_path / "w.pt", weights_only=True))
    assert back.checkpoint_hash() == c.checkpoint_hash() and back.encode_context == c.encode_context
    # the archive's safetensors copy (shaped by prepare_weights' default layout, then by the file's tables)
    full = with_gains_full()
    data = archive_weights.to_bytes(full)
    got = archive_weights.from_bytes(data, "neural_rvq", full.checkpoint_hash(), "test")
    assert got.checkpoint_hash() == full.checkpoint_hash()
    assert torch.equal(got.band_gains.levels, full.band_gains.levels)


def with_gains_full() -> NeuralRvqCodec:
    torch.manual_seed(3)
    c = NeuralRvqCodec().eval()
    c.set_band_gains(torch.tensor([0, 8, 32, 96, 320]), levels(4, 8), base_stages=16)  # not the default layout
    return c


def test_crafted_band_gains_are_refused(tmp_path):
    c = with_gains()
    sd = dict(c.state_dict())
    sd["band_gains.levels"] = sd["band_gains.levels"] * 1e6
    with pytest.raises(CodecUnavailableError, match="band gains"):
        tiny().load_weights({"model": sd}, "crafted.pt")
    sd = dict(c.state_dict())
    sd["band_gains.silence_codes"] = sd["band_gains.silence_codes"] + 64  # past the 64-entry codebooks
    with pytest.raises(CodecUnavailableError, match="silence codes"):
        tiny().load_weights({"model": sd}, "crafted.pt")
    sd = dict(c.state_dict())
    del sd["band_gains.edges"]
    with pytest.raises(CodecUnavailableError, match="band gains"):
        tiny().load_weights({"model": sd}, "crafted.pt")
    full = with_gains_full()
    full.band_gains.base_stages.fill_(31)  # 31 + 2 gain stages > 32 (to_bytes writes the module's tensors)
    with pytest.raises((CodecUnavailableError, IntegrityError), match="band gains"):
        archive_weights.from_bytes(archive_weights.to_bytes(full), "neural_rvq", full.checkpoint_hash(), "crafted")


def test_fit_levels_finds_the_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([-9.0, -3.0, 2.0, 8.0])
    v = centres[rng.integers(0, 4, 4000)] + 0.1 * rng.standard_normal(4000)
    g = torch.from_numpy(np.stack([v, v + 1.0]))
    lev = fit_levels(g, 4)
    assert lev.shape == (2, 4) and bool((lev[:, 1:] >= lev[:, :-1]).all())
    assert np.allclose(lev[0].numpy(), centres, atol=0.05) and np.allclose(lev[1].numpy(), centres + 1, atol=0.05)
    assert float(fit_levels(g * 10, 4).abs().max()) <= 15.0  # clipped


def test_default_layout_covers_a_frame():
    e = bark_edges(320)
    assert int(e[0]) == 0 and int(e[-1]) == 320 and len(e) == 41 and bool((e[1:] > e[:-1]).all())


@pytest.mark.parametrize("seconds", [0.3, 2.0])
def test_gains_are_coded_against_the_base_the_decoder_decodes(seconds):
    """Short clips included: at a file's start the decoder reads padding codes before the first frame, and the
    encoder codes its gains against that same base (digital silence gets the padding code, the code of silence)."""
    c = with_gains()
    x = signal(seconds, seed=4)
    x[:, int(0.1 * RATE): int(0.15 * RATE)] = 0.0  # digital silence inside the file, too
    full = encode_array(c, x, 7)
    base = decode_array(c, full[:, :4], x.shape[1])[0]
    # the frames a re-analysis of the decoded samples gives exactly (TDAC): those wholly inside the file
    inside = slice(1, x.shape[1] // c.hop_length)
    want = c.band_gains.quantize(c.band_gains.gains_db(c.frames_of(x[0]), c.frames_of(base)))[0, :, inside]
    got = c.band_gains.decode_db(torch.from_numpy(full[:, 4:]))[0, :, inside]
    lev = c.band_gains.levels
    assert torch.equal(got, torch.gather(lev, 1, want)), (got - torch.gather(lev, 1, want)).abs().max()


def test_digital_silence_gets_the_padding_code_at_every_rate():
    c, plain = with_gains(), tiny()
    x = signal(2.0, seed=5)
    x[:, RATE // 2: RATE] = 0.0
    hop = c.hop_length
    silent = [i for i in range(c.n_frames(x.shape[1])) if i * hop - hop >= RATE // 2 and i * hop + hop <= RATE]
    for k in (2, 4, 7):
        codes = encode_array(c, x, k)
        pad = c.pad_codes(k).numpy()[:min(k, 4)]
        assert (codes[0][:min(k, 4)][:, silent] == pad[:, None]).all(), k
    # the padding code is the encoder's own code of silence (stored with the tables)
    zeros = np.zeros((1, RATE), np.float32)
    assert np.array_equal(encode_array(plain, zeros, 4)[0, :, 20], c.pad_codes(4).numpy())
    assert np.array_equal(encode_array(c, x, 7)[:, :4], encode_array(c, x, 4))
    sound = [i for i in range(40) if i not in silent and i * hop + hop <= RATE // 2]
    assert np.array_equal(encode_array(c, x, 4)[:, :, sound], encode_array(plain, x, 4)[:, :, sound])


def test_shipped_release_decodes_digital_silence_as_silence():
    c = registry.load("neural_rvq")
    if c.band_gains is None:
        pytest.skip("the shipped weights carry no band gains")
    x = signal(3.0, seed=6) * 0.5
    x[:, RATE: 2 * RATE] = 0.0
    for k in (8, 32):
        y = decode_array(c, encode_array(c, x, k), x.shape[1])
        quiet = y[0, RATE + RATE // 5: 2 * RATE - RATE // 5]  # 0.2 s from the edges of the silence
        assert float(np.sqrt(np.mean(quiet ** 2))) < 1e-4, k


def test_fit_job_adds_band_gains_to_weights_without_them(tmp_path):
    from jobs import fit_band_gains
    from tests import audio_factory as af
    corpus_dir = tmp_path / "corpus"
    for i, kind in enumerate(("noise", "chirp", "sine", "noise")):
        af.write(corpus_dir / f"f{i}.wav", 1.5, 24000, 1, kind=kind, seed=i)
    r6 = registry.WEIGHTS_DIR / "neural_rvq-011c0d1d.pt"
    out = fit_band_gains.main(["--weights", str(r6), "--out", str(tmp_path / "w.pt"), "--corpus", str(corpus_dir),
                               "--other-files", "4", "--speech-files", "0", "--music-files", "0", "--levels", "4",
                               "--seconds", "1.5", "--threads", "1"])
    c = registry.load("neural_rvq", out)
    plain = registry.load("neural_rvq", r6)
    assert c.band_gains is not None and c.band_gains.base == 16 and c.band_gains.levels.shape == (40, 4)
    assert bool((c.band_gains.levels[:, 1:] >= c.band_gains.levels[:, :-1]).all())
    keys = set(plain.state_dict())
    assert set(c.state_dict()) - keys == {"band_gains.edges", "band_gains.levels", "band_gains.base_stages",
                                          "band_gains.silence_codes"}
    assert all(torch.equal(c.state_dict()[k], plain.state_dict()[k]) for k in keys)  # nothing else changed
    with pytest.raises(SystemExit, match="already carry band gains"):
        fit_band_gains.main(["--weights", str(out), "--out", str(tmp_path / "w2.pt"), "--corpus", str(corpus_dir),
                             "--other-files", "4"])


def test_a_fine_tune_drops_the_band_gains_it_would_make_stale(tmp_path):
    from pipeline import train as train_codec
    from tests.test_neural_codec import TINY_ARGS, _audio_dir
    d = _audio_dir(tmp_path)
    common = ["--data", str(d), "--cache", str(tmp_path / "c.npz"), "--no-ray", *TINY_ARGS]
    train_codec.main([*common, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "w.pt"), "--steps", "2"])
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    c = NeuralRvqCodec(**{k: state["config"][k] for k in ("width", "latent_dim", "n_q", "codebook_size")},
                       dilations=tuple(state["config"]["dilations"]))
    c.load_weights(state)
    c.set_band_gains(EDGES, levels(4, 2), base_stages=1)  # 2 stages of 4 bits: 1 RVQ + 4 bands x 1 bit
    state["model"] = c.state_dict()
    torch.save(state, tmp_path / "bg.pt")
    train_codec.main([*common, "--run-dir", str(tmp_path / "ft"), "--out", str(tmp_path / "ft.pt"), "--steps", "1",
                      "--init-from", str(tmp_path / "bg.pt")])
    assert "band gains dropped" in (tmp_path / "ft" / "train.log").read_text()
    tuned = torch.load(tmp_path / "ft.pt", weights_only=True)["model"]
    assert not any(k.startswith("band_gains.") for k in tuned)
