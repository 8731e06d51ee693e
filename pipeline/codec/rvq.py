"""Residual vector quantization: a stack of codebooks, each quantizing the residual of the one before.

Any prefix of the stack can be used to encode or decode (fewer stages = lower bitrate). Encoding is
greedy, stage by stage, except that a quantizer with ``pair_search = k`` encodes exactly two stages
jointly: the pair (one of the ``k`` nearest first-stage entries, the best second-stage entry for it)
with the smallest total error, a lower error than greedy at the same bitrate.
"""
from __future__ import annotations

import torch
from torch import nn


class ResidualVQ(nn.Module):
    """``n_q`` codebooks of ``codebook_size`` vectors of ``dim`` dimensions.

    Tensors: ``x: [B, D, F] float32`` (D = dim, F = frames), ``codes: [B, K, F] int64``.
    """

    def __init__(self, dim: int, codebook_size: int, n_q: int):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.n_q = n_q
        self.register_buffer("codebooks", torch.zeros(n_q, codebook_size, dim))
        self.pair_search = 0  # see set_pair_search; no state until set, so older checkpoints hash as before

    def set_pair_search(self, k: int) -> None:
        """Encode exactly two stages jointly over the ``k`` nearest first-stage entries (0: greedy). Kept as a
        buffer, so it travels with the weights and is part of the checkpoint hash (it changes the codes)."""
        if not 0 <= k <= self.codebook_size:
            raise ValueError(f"pair_search must be in [0, {self.codebook_size}], got {k}")
        if "pair_search_k" not in self._buffers:
            self.register_buffer("pair_search_k", torch.zeros((), dtype=torch.int64))
        self.pair_search_k.fill_(k)
        self.pair_search = k

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "pair_search_k"
        if key in state_dict:  # a checkpoint that encodes two stages jointly
            self.set_pair_search(int(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    NEAREST_ROWS = 256  # on the CPU, distances [rows, K] in cache-sized blocks (a 2250-row window: 27 % faster)

    @staticmethod
    def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """``x: [N, D]``, ``codebook: [K, D]`` -> index of the nearest entry ``[N] int64`` (L2)."""
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row; one fused multiply-add
        # (the same distances, bit for bit, as ||c||^2 - 2 (x @ c.T) computed in two steps)
        norms, cbt = codebook.pow(2).sum(1), codebook.t()
        if x.device.type != "cpu":  # (as it was: under autocast an addmm would round the norms to half precision)
            return (norms[None, :] - 2.0 * (x @ cbt)).argmin(dim=1)
        rows = ResidualVQ.NEAREST_ROWS
        if x.shape[0] <= rows:
            return torch.addmm(norms, x, cbt, alpha=-2.0).argmin(dim=1)
        out = torch.empty(x.shape[0], dtype=torch.int64)
        for i in range(0, x.shape[0], rows):
            out[i:i + rows] = torch.addmm(norms, x[i:i + rows], cbt, alpha=-2.0).argmin(dim=1)
        return out

    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        n_q = self.n_q if n_q is None else n_q
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q must be in [1, {self.n_q}], got {n_q}")
        b, d, f = x.shape
        residual = x.permute(0, 2, 1).reshape(b * f, d)
        if n_q == 2 and self.pair_search:
            return self._encode_pair(residual, self.pair_search).reshape(b, f, 2).permute(0, 2, 1).contiguous()
        codes = []
        for q in range(n_q):
            idx = self.nearest(residual, self.codebooks[q])
            residual = residual - self.codebooks[q][idx]
            codes.append(idx)
        return torch.stack(codes, dim=1).reshape(b, f, n_q).permute(0, 2, 1).contiguous()

    def _encode_pair(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``x: [N, D]`` -> ``[N, 2]``: per row, the (first, second) entries minimising
        ``||x - c1 - c2||^2`` over the ``k`` first-stage entries nearest to ``x``."""
        c1, c2 = self.codebooks[0], self.codebooks[1]
        # ||x - c1_i - c2_j||^2 = ||x - c1_i||^2 + ||c2_j||^2 - 2 x.c2_j + 2 c1_i.c2_j: with the cross products
        # c1.c2 computed once, each candidate costs a row gather instead of a matrix product
        cross = c1 @ c2.t()  # [K, K]
        n1, n2 = c1.pow(2).sum(1), c2.pow(2).sum(1)
        out = []
        for xs in x.split(128):  # [rows, k, codebook_size] distances: small chunks stay in cache (6x faster)
            d1 = n1[None, :] - 2.0 * (xs @ c1.t())  # ||x - c1_i||^2 - ||x||^2
            d1k, top = d1.topk(min(k, c1.shape[0]), dim=1, largest=False)  # [n, k]
            d2 = n2[None, None, :] - 2.0 * ((xs @ c2.t())[:, None, :] - cross[top])  # [n, k, K]
            d2min, j = d2.min(-1)
            best = (d1k + d2min).argmin(1, keepdim=True)  # [n, 1]
            out.append(torch.cat([top.gather(1, best), j.gather(1, best)], 1))
        return torch.cat(out) if out else x.new_zeros((0, 2), dtype=torch.int64)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        b, k, f = codes.shape
        if k > self.n_q:
            raise ValueError(f"codes have {k} stages but this RVQ has {self.n_q}")
        out = torch.zeros(b, f, self.dim, dtype=self.codebooks.dtype, device=codes.device)
        for q in range(k):
            out = out + self.codebooks[q][codes[:, q, :]]
        return out.permute(0, 2, 1)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++-style seeding on a subsample. ``x: [N, D]`` -> ``[k, D]``.

    Empty clusters are re-seeded from the points farthest from their centroid, so every entry is used.
    """
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} vectors, got {n}")
    # k-means++ seeding on a subsample (cheap and spreads the initial centroids)
    sub = x[torch.randperm(n, generator=g)[: min(n, 20 * k)]]
    centroids = [sub[torch.randint(len(sub), (1,), generator=g)].squeeze(0)]
    d2 = (sub - centroids[0]).pow(2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum().clamp_min(1e-12)
        i = torch.multinomial(probs, 1, generator=g).item()
        centroids.append(sub[i])
        d2 = torch.minimum(d2, (sub - sub[i]).pow(2).sum(1))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cat([ResidualVQ.nearest(chunk, c) for chunk in x.split(65536)])
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new_c = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():
            err = (x - new_c[assign]).pow(2).sum(1)
            far = err.topk(int(empty.sum())).indices
            new_c[empty] = x[far]
        c = new_c
    return c


@torch.no_grad()
def kmeans_random(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd k-means seeded with ``k`` random points (with replacement when there are fewer, jittered), empty
    clusters re-seeded the same way: cheap to start and defined for any N (a training run's codebook init).
    ``x: [N, D]`` -> ``[k, D]``."""
    n = x.shape[0]
    pick = torch.randint(n, (k,), generator=gen) if n < k else torch.randperm(n, generator=gen)[:k]
    scale = x.std().clamp_min(1e-6)
    c = x[pick] + 1e-2 * scale * torch.randn(k, x.shape[1], generator=gen)
    for _ in range(iters):
        idx = ResidualVQ.nearest(x, c)
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            r = torch.randint(n, (int(empty.sum()),), generator=gen)
            c[empty] = x[r] + 1e-2 * scale * torch.randn(len(r), x.shape[1], generator=gen)
    return c


def fit_residual_kmeans(x: torch.Tensor, codebook_size: int, n_q: int, iters: int = 20, seed: int = 0,
                        log=None, gen: torch.Generator | None = None) -> torch.Tensor:
    """Residual k-means: codebook q is k-means on what stages ``< q`` left. ``x: [N, D]`` -> ``[n_q, K, D]``.

    Without ``gen``: ``kmeans`` (k-means++ seeding, farthest-point re-seeding; the MDCT codec's codebooks, fitted
    on millions of frames). With ``gen``: ``kmeans_random`` drawing from it (the neural trainer's init)."""
    residual = x.clone()
    books = []
    for q in range(n_q):
        c = (kmeans(residual, codebook_size, iters=iters, seed=seed + q) if gen is None
             else kmeans_random(residual, codebook_size, iters, gen))
        idx = torch.cat([ResidualVQ.nearest(chunk, c) for chunk in residual.split(65536)])
        residual = residual - c[idx]
        books.append(c)
        if log is not None:
            used = torch.bincount(idx, minlength=codebook_size).float()
            p = used / used.sum()
            ent = -(p[p > 0] * p[p > 0].log2()).sum().item()
            log(f"stage {q + 1}/{n_q}: residual energy {residual.pow(2).mean().item():.5f}, "
                f"utilisation {ent / torch.log2(torch.tensor(float(codebook_size))).item():.3f}")
    return torch.stack(books)
