"""Content checks for restored audio: does it hold the original's sound, not just its shape?"""
from __future__ import annotations

import numpy as np
from scipy.signal import stft


def spectrogram_similarity(orig: np.ndarray, back: np.ndarray, rate: int) -> float:
    """Correlation of the two signals' log-magnitude spectrograms (~21 ms frames, up to 8 kHz), per channel, the
    lowest: a faithful decode scores near 1, silence, noise or another file's audio near 0. ``[T]`` or ``[T, C]``."""
    o, b = (np.atleast_2d(np.asarray(x, np.float64).T) for x in (orig, back))
    n = max(64, int(2 ** np.round(np.log2(rate * 0.021))))
    worst = 1.0
    for c in range(o.shape[0]):
        f, _, so = stft(o[c], rate, nperseg=n)
        _, _, sb = stft(b[c], rate, nperseg=n)
        keep = f <= min(8000.0, rate / 2)
        lo, lb = (20 * np.log10(np.abs(s[keep]) + 1e-4).ravel() for s in (so, sb))
        if lo.std() == 0 or lb.std() == 0:  # silence on one side: similar only if both are
            worst = min(worst, 1.0 if lo.std() == lb.std() == 0 and np.allclose(lo, lb) else 0.0)
            continue
        worst = min(worst, float(np.corrcoef(lo, lb)[0, 1]))
    return worst
