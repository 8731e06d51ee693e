"""`audioarc tune`: sample and split a library by name, fine-tune from the release, score base vs tuned on the
held-out part at every rung, keep the tuned weights only when they are better."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.content import spectrogram_similarity

# a tiny budget: 3 steps of 2 short segments, 2 validation segments, 2 s scored per held-out file
TINY = ("--minutes", "2", "--steps", "3", "--batch", "2", "--seg-frames", "48", "--val-segments", "2",
        "--eval-seconds", "2")


def rich(seconds: float, rate: int, f0: float, am: float, seed: int) -> np.ndarray:
    """A harmonic tone with vibrato, a syllable-like envelope and a little noise: audio the codec handles as it
    would real sound (pure sines are not: their empty mel bands make silence score better than any decode)."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * f0 * k * t + 3 * np.sin(2 * np.pi * 5 * t) / k) / k for k in range(1, 12))
    x = x * (0.55 + 0.45 * np.sin(2 * np.pi * am * t)) + 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def library(root: Path) -> Path:
    """Six files of 1.7-2 s in two folders (voice-like at 24 kHz WAV, music-like at 16 kHz FLAC)."""
    import soundfile as sf
    for i in range(3):
        for folder, rate, secs, f0, am, ext in (("voice", 24000, 2.0, 120 + 40 * i, 4.0, "wav"),
                                                ("music", 16000, 1.7 + 0.1 * i, 220 + 70 * i, 0.5, "flac")):
            p = root / "lib" / folder / f"{folder[0]}{i}.{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(p), rich(secs, rate, f0, am, seed=i), rate)
    return root / "lib"


def test_sample_and_split_are_by_name():
    from pipeline.tune import split, stratified_sample
    items = [(f"{d}/f{i}.wav", None) for d in ("a", "b") for i in range(20)] + [("c/only.wav", None)]
    sizes = [1000] * 40 + [10 ** 6]
    s = stratified_sample(items, sizes, 9, seed=0)
    assert len(s) == 9 and s == stratified_sample(items, sizes, 9, seed=0)
    assert {rel.split("/")[0] for rel, _ in s} == {"a", "b", "c"}  # every stratum represented
    assert stratified_sample(items, sizes, 9, seed=1) != s
    tune, held = split(items, 0.2)
    assert tune and held and not {r for r, _ in tune} & {r for r, _ in held}
    # a file's part depends on its name only: more files elsewhere do not move it
    _, held_more = split(items + [(f"z/x{i}.wav", None) for i in range(30)], 0.2)
    assert {r for r, _ in held} <= {r for r, _ in held_more}


def test_config_is_validated():
    from pipeline.errors import ConfigError
    from pipeline.tune import TuneConfig
    for bad in ({"minutes": 0}, {"heldout_fraction": 1.0}, {"base": "mdct_rvq"}, {"max_files": 1},
                {"workers": 2, "ray": False}, {"lr": -1.0}, {"base_weights": "/no/such.pt"}):
        with pytest.raises(ConfigError):
            TuneConfig(**{"src": "x", "minutes": 1, **bad})


def test_tune_flow_table_split_and_weights(cli, tmp_path, monkeypatch):
    from pipeline.codec import registry
    monkeypatch.chdir(tmp_path)
    src = library(tmp_path)
    work = tmp_path / "work"
    rep = cli.json("tune", src, *TINY, "--heldout-fraction", "0.3", "--work-dir", work, "--keep-work", "--force")
    assert rep["kept"] is True and rep["better"] == (rep["mean_mel"]["tuned"] < rep["mean_mel"]["base"])
    # every rung, base and tuned
    assert [r["kbps"] for r in rep["rungs"]] == [1.5, 3.0, 6.0, 12.0, 24.0]
    assert [r["n_q"] for r in rep["rungs"]] == [2, 4, 8, 16, 32]
    for r in rep["rungs"]:
        assert np.isfinite(r["base_mel"]) and np.isfinite(r["tuned_mel"])
    assert rep["mean_mel"]["base"] == pytest.approx(np.mean([r["base_mel"] for r in rep["rungs"]]))
    # held-out files are never in the training folder nor in what the trainer cached
    files = rep["files"]
    assert files["library"] == files["sampled"] == 6 and len(files["tuning"]) + len(files["heldout"]) == 6
    assert files["tuning"] and files["heldout"] and files["scored"]
    data = Path(rep["work_dir"]) / "data"
    staged = [p for p in data.rglob("*") if p.is_file()]
    held = {os.path.realpath(src / h) for h in files["heldout"]}
    assert len(staged) == len(files["tuning"]) and not {os.path.realpath(p) for p in staged} & held
    names = np.load(Path(rep["work_dir"]) / "train_24k.npz")["names"]
    assert len(names) == len(files["tuning"]) and not {os.path.realpath(n) for n in names} & held
    # the report beside the weights; the weights load as a normal neural_rvq checkpoint, not the base
    w = Path(rep["weights"])
    assert w.exists() and w.parent == tmp_path and w.name.startswith("tuned-")
    assert json.loads(w.with_suffix(".json").read_text())["rungs"] == rep["rungs"]
    tuned = registry.load("neural_rvq", w)
    assert tuned.checkpoint_hash() == rep["tuned_hash"]
    assert rep["same_as_base"] == (rep["tuned_hash"] == rep["base_hash"])  # 3 steps may not beat the release
    if rep["same_as_base"]:
        assert not rep["better"]
    assert rep["base_hash"] == registry.load("neural_rvq").checkpoint_hash()
    # the table
    code, out = cli("tune", src, *TINY, "--out", tmp_path / "t2.pt", "--heldout-fraction", "0.3")
    assert code == 0 and "base mel" in out and "tuned STOI" in out and "24 kbps" in out and "1.5 kbps" in out
    assert ("kept:" in out) == (tmp_path / "t2.pt").exists()
    assert not list(tmp_path.glob(".audioarc-tune-*"))  # scratch removed
    # an archive made with the tuned weights carries them: it restores without them
    dest = tmp_path / "arc"
    s = cli.json("encode", src / "voice", dest, "--codec-weights", w, "--quality-sample", "0")
    assert s["files_archived"] == 3
    assert cli.json("inspect", dest)["codec"]["checkpoint_hash"] == rep["tuned_hash"]
    back = cli.json("restore", dest, tmp_path / "back", "--format", "wav")
    assert len(back) == 3
    # decoded by the tuned weights it carries: the voice's sound (measured: spectrogram 0.75-0.80, 100 ms late
    # <= 0.62) at its level (0.97-0.98)
    for r in back:
        orig, rate = sf.read(r["source"])
        got, rate2 = sf.read(r["path"])
        assert rate2 == rate and got.shape == orig.shape, r["source"]
        assert spectrogram_similarity(orig, got, rate) > 0.68, r["source"]
        assert 0.7 < float(np.sqrt(np.mean(got ** 2) / np.mean(orig ** 2))) < 1.4, r["source"]


def test_worse_weights_are_refused(cli_noray, tmp_path):
    src = library(tmp_path)
    out = tmp_path / "tuned.pt"
    # a destructive fine-tune: a huge learning rate wrecks the weights
    rep = cli_noray.json("tune", src, *TINY, "--lr", "1000", "--out", out)
    assert rep["kept"] is False and rep["weights"] is None and rep["message"].startswith("refused")
    assert not out.exists()
    assert json.loads((tmp_path / "tuned.json").read_text())["kept"] is False
    assert rep["mean_mel"]["tuned"] is None or rep["mean_mel"]["tuned"] >= rep["mean_mel"]["base"]


def test_weights_worse_on_the_heldout_files_are_refused(cli_noray, tmp_path, monkeypatch):
    """Whatever the trainer hands back is scored on the held-out files: weights that sound worse there (here the
    release with its decoder perturbed, as a fine-tune that overfits its tuning part) are refused."""
    import torch
    from pipeline import train as train_codec

    def overfit(argv):
        from pipeline.codec import registry
        codec = registry.load("neural_rvq", argv[argv.index("--init-from") + 1])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for k, v in codec.state_dict().items():
                if k.startswith("decoder.") and v.is_floating_point() and v.numel() > 1:
                    v += 0.05 * v.std() * torch.randn(v.shape, generator=g)
        torch.save({"model": codec.state_dict()}, argv[argv.index("--out") + 1])

    monkeypatch.setattr(train_codec, "main", overfit)
    src = library(tmp_path)
    rep = cli_noray.json("tune", src, *TINY, "--out", tmp_path / "t.pt")
    assert rep["kept"] is False and not rep["same_as_base"] and rep["message"].startswith("refused")
    assert rep["mean_mel"]["tuned"] > rep["mean_mel"]["base"]
    assert not (tmp_path / "t.pt").exists()
