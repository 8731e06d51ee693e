"""Training machinery for ``neural_rvq``: EMA residual VQ with dead-code restart, losses, one step.

Kept out of ``neural.py`` so inference imports nothing it does not need; used by
``pipeline/train.py`` and the tests.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .mdct import perceptual_weight
from .metrics import mel7_loss, multiscale_mel_loss
from .neural import NeuralRvqCodec
from .rvq import ResidualVQ, fit_residual_kmeans


class EmaRvqTrainer:
    """Trains ``codec.rvq.codebooks`` in place: EMA of assigned residuals, k-means init, dead-code restart.

    Dead codes: a code whose EMA usage falls below ``dead_fraction`` of the expected usage
    (vectors per batch / K) is replaced by a random residual of the current batch, at most
    ``max_restarts`` codes per stage and step (rate limit), so small batches don't thrash.

    ``frozen_stages``: the first that many codebooks are never updated (neither EMA nor restarts), so their
    codes stay those of the weights the run started from (``audioarc train --keep-codes``).
    """

    def __init__(self, codec: NeuralRvqCodec, decay: float = 0.99, dead_fraction: float = 0.03,
                 max_restarts: int = 64, eps: float = 1e-5, seed: int = 0, reduce=None):
        self.codec = codec
        #: data parallel: sums a tensor over the workers in place (``torch.distributed.all_reduce``), so the
        #: EMA statistics count every worker's batch; None for one process
        self.reduce = reduce
        rvq: ResidualVQ = codec.rvq
        n_q, k, d = rvq.codebooks.shape
        self.decay, self.dead_fraction, self.max_restarts, self.eps = decay, dead_fraction, max_restarts, eps
        dev = rvq.codebooks.device
        self.ema_count = torch.ones(n_q, k, device=dev)
        self.ema_sum = rvq.codebooks.detach().clone()
        self.initialized = False
        self.usage = torch.zeros(n_q, k, device=dev)  # counts since last utilisation report
        self.gen = torch.Generator().manual_seed(seed)
        self.restarts = 0
        self.frozen_stages = 0

    def state_dict(self) -> dict:
        return {"ema_count": self.ema_count, "ema_sum": self.ema_sum, "initialized": self.initialized,
                "usage": self.usage, "restarts": self.restarts}

    def load_state_dict(self, s: dict) -> None:
        self.ema_count.copy_(s["ema_count"])
        self.ema_sum.copy_(s["ema_sum"])
        self.usage.copy_(s["usage"])
        self.initialized = bool(s["initialized"])
        self.restarts = int(s.get("restarts", 0))

    @torch.no_grad()
    def seed_from_codebooks(self, vectors_per_step: int) -> None:
        """Start from already-trained codebooks: EMA counts at the even share ``vectors_per_step / K`` and
        sums consistent with the codebooks, so the first updates neither jump nor restart live codes."""
        k = self.ema_count.shape[1]
        self.ema_count.fill_(vectors_per_step / k)
        self.ema_sum.copy_(self.codec.rvq.codebooks.detach() * self.ema_count[..., None])
        self.initialized = True

    @torch.no_grad()
    def kmeans_init(self, latents: torch.Tensor, iters: int = 6, log=None) -> None:
        """``latents: [N, D]`` -> residual k-means codebooks (needs N >= K)."""
        books = fit_residual_kmeans(latents, self.codec.codebook_size, self.codec.n_q, iters=iters, gen=self.gen)
        books[:, 0] = 0.0  # entry 0 = zero vector (the padding code; see neural.py)
        if log is not None:
            log(f"k-means init: {self.codec.n_q} stages on {len(latents)} vectors")
        self.codec.rvq.codebooks.copy_(books)
        self.ema_sum.copy_(books)
        self.ema_count.fill_(1.0)
        self.initialized = True

    def quantize(self, z: torch.Tensor, n_q_per_item: torch.Tensor, update: bool = True):
        """``z: [B, D, F]``; ``n_q_per_item: [B]`` stages used per example (quantizer dropout).

        Returns ``(zq [B, D, F] straight-through, commitment loss, codes [B, n_q, F])``. All stages are
        quantized greedily (so every codebook keeps learning); example ``b`` is reconstructed from its first
        ``n_q_per_item[b]`` stages, as inference codes them: examples at 2 stages with a quantizer that
        searches pairs (``rvq.pair_search``) from the jointly searched pair.
        """
        b, d, f = z.shape
        books = self.codec.rvq.codebooks
        n_q, k, _ = books.shape
        x = z.permute(0, 2, 1).reshape(b * f, d)
        nq_rows = n_q_per_item.to(z.device).repeat_interleave(f)  # [N]
        residual = x.detach()
        out = torch.zeros_like(x)
        commit = x.new_zeros(())
        codes = []
        quant_acc = torch.zeros_like(x)
        for q in range(n_q):
            with torch.no_grad():
                idx = ResidualVQ.nearest(residual, books[q])
                qv = books[q][idx]
            active = (nq_rows > q)
            if active.any():
                # commitment on the active rows: pull the (gradient-carrying) residual to the code
                res_grad = x - quant_acc
                commit = commit + (F.mse_loss(res_grad[active], qv[active], reduction="sum")
                                   / (active.sum() * d))
            quant_acc = quant_acc + qv
            out = torch.where(active[:, None], quant_acc, out)
            if update and self.codec.training:
                if q >= self.frozen_stages:
                    self._ema_update(q, residual, idx)
                else:  # frozen: still counted for the utilisation report
                    self.usage[q] += torch.bincount(idx, minlength=k).float()
            residual = residual - qv
            codes.append(idx)
        pair = self.codec.rvq.pair_search
        rows = (nq_rows == 2).nonzero().flatten() if pair and n_q >= 2 else None
        if rows is not None and len(rows):
            with torch.no_grad():
                pc = self.codec.rvq._encode_pair(x.detach()[rows], pair)  # [n, 2]
                out = out.index_copy(0, rows, books[0][pc[:, 0]] + books[1][pc[:, 1]])
        zq = x + (out - x).detach()
        zq = zq.reshape(b, f, d).permute(0, 2, 1)
        codes = torch.stack(codes, 1).reshape(b, f, n_q).permute(0, 2, 1)
        return zq, commit / n_q, codes

    @torch.no_grad()
    def _ema_update(self, q: int, residual: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.ema_count.shape[1]
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(self.ema_sum[q]).index_add_(0, idx, residual)
        n_vectors = float(residual.shape[0])
        if self.reduce is not None:
            self.reduce(counts)
            self.reduce(sums)
            n_vectors = float(counts.sum())
        self.usage[q] += counts
        self.ema_count[q].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum[q].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count[q].sum()
        smoothed = (self.ema_count[q] + self.eps) / (n + k * self.eps) * n
        self.codec.rvq.codebooks[q].copy_(self.ema_sum[q] / smoothed[:, None])
        self.codec.rvq.codebooks[q, 0] = 0.0  # pinned: the padding code decodes as a zero latent
        # dead-code restart (rate-limited)
        expected = n_vectors / k
        dead = (self.ema_count[q] < self.dead_fraction * expected).nonzero().flatten()
        dead = dead[dead != 0]
        if len(dead):
            dead = dead[torch.randperm(len(dead), generator=self.gen)[: self.max_restarts]]
            pick = torch.randint(residual.shape[0], (len(dead),), generator=self.gen)
            vec = residual[pick] + 1e-3 * residual.std() * torch.randn(len(dead), residual.shape[1],
                                                                        generator=self.gen)
            self.codec.rvq.codebooks[q][dead] = vec
            self.ema_count[q][dead] = expected
            self.ema_sum[q][dead] = vec * expected
            self.restarts += len(dead)

    def utilisation(self, reset: bool = True) -> list[float]:
        """Per stage: entropy of code usage since the last call / log2 K (1.0 = uniform use)."""
        k = self.usage.shape[1]
        out = []
        for q in range(self.usage.shape[0]):
            c = self.usage[q]
            tot = c.sum()
            if tot <= 0:
                out.append(0.0)
                continue
            p = c[c > 0] / tot
            out.append(float(-(p * p.log2()).sum() / math.log2(k)))
        if reset:
            self.usage.zero_()
        return out


def sample_n_q(batch: int, ladder: tuple[int, ...], rng: random.Random, p_full: float = 0.3,
               rung_weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Quantizer dropout: per example, the full stack with probability ``p_full``, else a ladder rung
    (uniformly, or in proportion to ``rung_weights``, one weight per rung of ``ladder``)."""
    if rung_weights is not None and len(rung_weights) != len(ladder):
        raise ValueError(f"rung_weights has {len(rung_weights)} entries for a ladder of {len(ladder)} rungs")
    out = []
    for _ in range(batch):
        if rng.random() < p_full:
            out.append(ladder[-1])
        elif rung_weights is None:
            out.append(rng.choice(ladder))
        else:
            out.append(rng.choices(ladder, weights=rung_weights)[0])
    return torch.tensor(out)


_BAND_CACHE: dict[tuple, torch.Tensor] = {}


def third_octave_bands(rate: int, n_fft: int, n_bands: int = 15, low_hz: float = 150.0) -> torch.Tensor:
    """``[n_bands, n_fft//2+1]`` 0/1 matrix of one-third-octave bands from ``low_hz`` centre (as STOI's)."""
    key = (rate, n_fft, n_bands, low_hz)
    if key not in _BAND_CACHE:
        freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1)
        centres = low_hz * 2.0 ** (torch.arange(n_bands) / 3.0)
        lo, hi = centres * 2 ** (-1 / 6), centres * 2 ** (1 / 6)
        _BAND_CACHE[key] = ((freqs[None] >= lo[:, None]) & (freqs[None] < hi[:, None])).float()
    return _BAND_CACHE[key]


def envelope_correlation_loss(x: torch.Tensor, y: torch.Tensor, rate: int, n_fft: int = 512, hop: int = 256,
                              win_frames: int = 36, stride: int = 12, floor: float = 1e-6) -> torch.Tensor:
    """1 - mean correlation of short-time (~384 ms) one-third-octave band envelopes of ``x`` vs ``y``.

    ``x, y: [B, T]`` float (degraded, reference). The quantity STOI averages, made differentiable:
    it rewards keeping the slow band-energy modulations that carry speech intelligibility. (band, window)
    pairs whose reference envelope does not move (norm of its deviation <= ``floor``: a silent band) are
    left out, so identical signals score 0; segments shorter than a window use one window of all frames."""
    w = torch.hann_window(n_fft, device=x.device)
    bands = third_octave_bands(rate, n_fft).to(x.device)

    def env(s):
        spec = torch.stft(s, n_fft, hop, window=w, return_complex=True).abs().pow(2)  # [B, F, N]
        return torch.sqrt(torch.einsum("kf,bfn->bkn", bands, spec) + 1e-12)  # [B, 15, N]

    ex, ey = env(x), env(y)
    n = ex.shape[2]
    win = min(win_frames, n)
    ex, ey = ex.unfold(2, win, stride), ey.unfold(2, win, stride)  # [B, 15, W, win]
    ex = ex - ex.mean(-1, keepdim=True)
    ey = ey - ey.mean(-1, keepdim=True)
    nx, ny = ex.norm(dim=-1), ey.norm(dim=-1)
    valid = ny > floor
    if not valid.any():
        return x.new_zeros(())
    corr = (ex * ey).sum(-1) / (nx * ny).clamp_min(1e-20)
    return 1.0 - corr[valid].mean()


def forward_train(codec: NeuralRvqCodec, vq: EmaRvqTrainer | None, wav: torch.Tensor, n_q_items: torch.Tensor | None,
                  w_mel: float = 1.0, w_mdct: float = 1.0, w_commit: float = 0.25, w_time: float = 0.0,
                  w_env: float = 0.0, w_mel7: float = 0.0):
    """One training forward on ``wav: [B, (F+1)*hop]`` segments (zero-padded convolutions).

    ``vq=None`` (or an uninitialised quantizer) trains the plain autoencoder (warm-up).
    Returns ``(loss, logs dict)``.
    """
    y = codec.features(wav[:, None, :])  # [B, hop, F]
    with torch.set_grad_enabled(torch.is_grad_enabled() and codec.encoder.inp.weight.requires_grad):
        z = codec.encoder(y, pad=True)  # (a frozen encoder: no graph to keep)
    commit = wav.new_zeros(())
    if vq is not None and vq.initialized:
        zq, commit, _ = vq.quantize(z, n_q_items)
    else:
        zq = z
    y_hat = decode_per_rung(codec, zq, n_q_items if vq is not None and vq.initialized else None)
    loss, logs = reconstruction_loss(codec, wav, y, y_hat, w_mel, w_mdct, w_time, w_env, w_mel7)
    loss = loss + w_commit * commit
    logs["commit"] = float(commit.detach())
    logs["loss"] = loss.item()
    return loss, logs


def decode_per_rung(codec: NeuralRvqCodec, zq: torch.Tensor, n_q_items: torch.Tensor | None) -> torch.Tensor:
    """``zq: [B, D, F]`` -> ``y_hat: [B, hop, F]`` (zero-padded convolutions): each example through the decoder
    inference uses for its stage count (``codec.decoder_for``: a rung decoder where the codec has one, else the
    shared one), so a whole-model fine-tune keeps every decoder in step with the codes it changes. A rung
    decoder frozen by the caller (no ``requires_grad``) still passes the gradient on to the encoder."""
    if n_q_items is None or not len(codec.rung_decoders):
        return codec.decoder(zq, pad=True)
    n_q_items = n_q_items.to(zq.device)
    groups = [(codec.decoder, ~torch.isin(n_q_items, torch.tensor([int(k) for k in codec.rung_decoders],
                                                                   device=zq.device)))]
    groups += [(dec, n_q_items == int(k)) for k, dec in codec.rung_decoders.items()]
    idx, parts = [], []
    for dec, sel in groups:
        i = sel.nonzero().flatten()
        if len(i):
            idx.append(i)
            parts.append(dec(zq[i], pad=True))
    order = torch.argsort(torch.cat(idx))
    return torch.cat(parts)[order]


def forward_rung_decoder(codec: NeuralRvqCodec, wav: torch.Tensor, n_q: int, w_mel: float = 1.0,
                         w_mdct: float = 1.0, w_time: float = 0.0, w_env: float = 0.0, w_mel7: float = 0.0):
    """Training forward of the dedicated decoder for ``n_q`` stages (``codec.rung_decoders[str(n_q)]``):
    the encoder and codebooks are frozen (run without gradients), so the codes are exactly what the
    shipped encoder produces and only that decoder learns. ``wav: [B, (F+1)*hop]``; returns ``(loss, logs)``."""
    with torch.no_grad():
        y = codec.features(wav[:, None, :])
        z = codec.encoder(y, pad=True)
        zq = codec.rvq.decode(codec.rvq.encode(z, n_q))
    y_hat = codec.decoder_for(n_q)(zq, pad=True)
    loss, logs = reconstruction_loss(codec, wav, y, y_hat, w_mel, w_mdct, w_time, w_env, w_mel7)
    logs["loss"] = loss.item()
    return loss, logs


def reconstruction_loss(codec: NeuralRvqCodec, wav: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor,
                        w_mel: float, w_mdct: float, w_time: float, w_env: float, w_mel7: float = 0.0):
    """Weighted reconstruction losses of decoded features ``y_hat`` against ``y`` (both ``[B, hop, F]``,
    normalised companded MDCT) and of the synthesized waveform against ``wav: [B, (F+1)*hop]``; ``w_mel7``
    weighs the 7-scale magnitude mel (``metrics.mel7_loss``: 2048-point / 320-band detail, 1.3 ms transients,
    quiet bands)."""
    hop = codec.hop_length
    # companded-domain L1 with perceptual weighting (undo the per-bin normalisation)
    w = perceptual_weight(hop, codec.sample_rate).to(wav.device)
    scale = codec.feat_scale[None, :, None]
    mdct_l1 = ((y_hat - y).abs() / scale * w[None, :, None]).mean() / w.mean()
    x_hat = codec.unfeatures(y_hat)
    rec = codec.mdct.inverse(x_hat)[:, hop:-hop]  # samples [hop, F*hop) of the segment
    ref = wav[:, hop: wav.shape[1] - hop]
    n = min(rec.shape[1], ref.shape[1])
    rec, ref = rec[:, :n], ref[:, :n]
    mel = multiscale_mel_loss(rec, ref, codec.sample_rate)
    loss = w_mel * mel + w_mdct * mdct_l1
    logs = {"mel": mel.item(), "mdct": mdct_l1.item()}
    if w_time > 0:
        t = (rec - ref).abs().mean()
        loss = loss + w_time * t
        logs["time"] = t.item()
    if w_env > 0:
        e = envelope_correlation_loss(rec, ref, codec.sample_rate)
        loss = loss + w_env * e
        logs["env"] = e.item()
    if w_mel7 > 0:
        m7 = mel7_loss(rec, ref, codec.sample_rate)
        loss = loss + w_mel7 * m7
        logs["mel7"] = m7.item()
    return loss, logs


@torch.no_grad()
def collect_latents(codec: NeuralRvqCodec, batches, max_vectors: int = 20000) -> torch.Tensor:
    vecs = []
    for wav in batches:
        z = codec.encoder(codec.features(wav[:, None, :]), pad=True)
        vecs.append(z.permute(0, 2, 1).reshape(-1, z.shape[1]))
    v = torch.cat(vecs)
    if len(v) > max_vectors:
        v = v[torch.randperm(len(v))[:max_vectors]]
    return v
