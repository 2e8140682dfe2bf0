"""GeLoRA: intrinsic dimension of hidden states (TwoNN) and ranks from it (methods.md §4).

`nn_distances` finds each point's two nearest neighbours with blocked matrix products in float32 on the chosen
device — pruned through a low-dimensional projection when the data have a dominant subspace — and settles them
from explicit float64 differences, with error bounds deciding what must be checked, so memory stays at one block
of rows and the distances are exactly those the reference libraries compute. `two_nn` is the estimator of Facco
et al. (2017) as scikit-dimension 0.5 and DADApy compute it.
"""
from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .device import resolve_device
from .errors import SurgeryError

MIN_POINTS = 100  # below this many distinct rows the estimate is refused
BLOCK_BYTES = 1 << 28  # working memory of one step of a search: at most 256 MiB
U32 = 2.0 ** -24  # float32 unit roundoff
LOOSE = 4  # hits per row and candidate above which a block pair is selected by top-k instead


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on the CPU through numpy's BLAS (measured 2.3× faster than torch's float32 GEMM here)."""
    return torch.from_numpy(a.numpy() @ b.numpy()) if a.device.type == "cpu" else a @ b


def _refine(X: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Distances of X[rows] (b,) to their candidates X[idx] (b, c) from explicit float64 differences of the data
    as given, sorted, (b, c) float64 on the CPU: exactly 0 for duplicated rows. The candidates are gathered a few
    rows at a time into one reused buffer (on the CPU 2 MiB: it stays in cache; fresh large arrays cost page
    faults)."""
    rows, idx = rows.to(X.device), idx.to(X.device)
    (b, c), D = idx.shape, X.shape[1]
    step = max(1, (1 << 21 if X.device.type == "cpu" else BLOCK_BYTES) // (8 * D * c))
    buf = torch.empty(min(b, step) * c, D, dtype=torch.float64, device=X.device)
    out = torch.empty(b, c, dtype=torch.float64, device=X.device)
    for s in range(0, b, step):
        e = min(s + step, b)
        flat = idx[s:e].flatten()
        if X.dtype == torch.float64:
            torch.index_select(X, 0, flat, out=buf[:flat.numel()])
        else:
            buf[:flat.numel()] = X[flat]
        g = buf[:flat.numel()].view(e - s, c, D)
        out[s:e] = torch.linalg.vector_norm(g.sub_(X[rows[s:e], None]), dim=2)
    return out.cpu().sort(1).values


def _slack(D: int) -> float:
    """Bound on the float32 error of ‖x‖² + ‖y‖² − 2x·y (D-term GEMM, norms rounded), per unit of ‖x‖² + ‖y‖²."""
    return (3 * D + 16) * U32


def _settle(X: torch.Tensor, Xc: torch.Tensor, sq: torch.Tensor, idx: torch.Tensor, lower: torch.Tensor,
            floor: torch.Tensor) -> torch.Tensor:
    """Distances (N, 2) to the two nearest other rows of X (N, D), float64 on the CPU, from a search's candidates
    idx (N, c), nearest first by its approximation, with lower bounds on their squared distances, `lower` (N, c),
    and on every other row's, `floor` (N,). Xc (N, D) and sq (N,): the centred float32 rows and their squared
    norms, on the search's device.

    Each row's first two candidates are refined from explicit differences (`_refine`), the others only where
    their bound is below the refined second distance. A row where even `floor` is gets its own full search:
    every row whose float32 distance, less its error bound, is below that distance is refined. So a poor
    approximation (far-off, tight clusters) costs time, never exactness."""
    N, c = idx.shape
    r = _refine(X, torch.arange(N), idx[:, :2])
    tie = 1 + 1e-5  # room for the rounding of the comparisons themselves (float32 in the hard rows)
    again = (lower[:, 2:].double().cpu() < r[:, 1:].square() * tie).any(1).nonzero().flatten()
    if again.numel():
        r[again] = _refine(X, again, idx[again.to(idx.device)])[:, :2]
    hard = (floor.double().cpu() < r[:, 1].square() * tie).nonzero().flatten()
    dev, rows = Xc.device, max(1, BLOCK_BYTES // (4 * N))
    for s in range(0, hard.numel(), rows):
        h = hard[s:s + rows]
        hd = h.to(dev)
        lb = _mm(Xc[hd], Xc.T).mul_(-2.0).add_(sq[hd, None]).add_(sq[None])
        lb.sub_(_slack(X.shape[1]) * (sq[hd, None] + sq[None]))
        lb[torch.arange(h.numel(), device=dev), hd] = math.inf
        i, j = (lb < (r[h, 1:].square() * tie).to(lb)).nonzero().unbind(1)  # all that could beat the second
        i, j = i.to(X.device), j.to(X.device)
        d = _pair_distances(X, h.to(X.device)[i], j)
        i = i.cpu()
        o = d.argsort(stable=True)
        o = o[i[o].argsort(stable=True)]  # by row, nearest first
        start = torch.searchsorted(i[o], torch.arange(h.numel()))
        ok = torch.bincount(i, minlength=h.numel()) >= 2  # always, as the refined two qualify
        r[h[ok]] = d[o][torch.stack([start, start + 1], 1)[ok]]
    return r


def _pair_distances(X: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖X[a] − X[b]‖ (P,) from explicit differences, float64 on the CPU, a few pairs at a time."""
    out = torch.empty(a.numel(), dtype=torch.float64, device=X.device)
    step = max(1, (1 << 21 if X.device.type == "cpu" else BLOCK_BYTES) // (16 * X.shape[1]))
    for s in range(0, a.numel(), step):
        out[s:s + step] = torch.linalg.vector_norm(X[a[s:s + step]].double() - X[b[s:s + step]], dim=1)
    return out.cpu()


def _above(f: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Flat indices of the entries of f (m, n) above min(rows_i, cols_j), or above rows_i when cols is None; on
    the CPU through numpy (its nonzero is 6× faster than torch's)."""
    if f.device.type != "cpu":
        thr = rows[:, None] if cols is None else torch.minimum(rows[:, None], cols[None])
        return torch.gt(f, thr).flatten().nonzero().squeeze(1)
    f, rows = f.numpy(), rows.numpy()
    if cols is None:
        return torch.from_numpy(np.flatnonzero(f > rows[:, None]))
    m = f > rows[:, None]  # above min(rows_i, cols_j): above either, without an (m, n) threshold array
    m |= f > cols.numpy()[None]
    return torch.from_numpy(np.flatnonzero(m))


def _merge(best_v: torch.Tensor, best_i: torch.Tensor, r: torch.Tensor, c: torch.Tensor, v: torch.Tensor):
    """Fold candidates (row r, sorted; column c; score v, higher = nearer) into the per-row tables best_v / best_i
    (N, k), kept sorted best first, in place: one top-k over each touched row's table and its new candidates."""
    if r.numel() == 0:
        return
    k, dev = best_v.shape[1], r.device
    rows, counts = torch.unique_consecutive(r, return_counts=True)
    slot = torch.arange(rows.numel(), device=dev).repeat_interleave(counts)
    pos = torch.arange(r.numel(), device=dev) - (counts.cumsum(0) - counts).repeat_interleave(counts) + k
    pv = torch.full((rows.numel(), k + int(counts.max())), -math.inf, device=dev)
    pi = torch.full(pv.shape, -1, dtype=torch.long, device=dev)
    pv[:, :k], pi[:, :k] = best_v[rows], best_i[rows]
    pv[slot, pos], pi[slot, pos] = v, c
    v, t = pv.topk(k, dim=1)
    best_v[rows], best_i[rows] = v, pi.gather(1, t)


def _symmetric_search(M: torch.Tensor, k: int, block: int | None):
    """The k nearest other rows of X (N, D) by float32 GEMM, given M = [X, −‖x‖²/2, 1] (N, D + 2): their indices
    (N, k) and scores −‖x_i − x_j‖²/2 (N, k), best first.

    One GEMM per block pair I ≤ J gives f = x_i·x_j − ‖x_i‖²/2 − ‖x_j‖²/2 = −‖x_i − x_j‖²/2 for the rows of I
    and of J at once. The diagonal blocks come first: each row's k best there set its threshold (its k-th best
    score so far). In an off-diagonal block only the entries above the row's or the column's threshold can
    enter either's k best; those few are merged (tightening the thresholds) instead of selecting over whole
    rows and columns. Where they are not few (no useful threshold yet), both sides are selected by top-k.
    Memory: one block pair of scores, thresholds and mask (block² · 9 bytes)."""
    N, dev = M.shape[0], M.device
    if block is None:
        block = 2048 if dev.type == "cpu" else math.isqrt(BLOCK_BYTES // 9)
    nb = math.ceil(N / max(block, k + 1))
    edges = [round(i * N / nb) for i in range(nb + 1)]
    spans = list(zip(edges[:-1], edges[1:]))
    best_v = torch.full((N, k), -math.inf, device=dev)
    best_i = torch.full((N, k), -1, dtype=torch.long, device=dev)
    for j0, j1 in spans:
        X, a = M[j0:j1, :-2], M[j0:j1, -2].contiguous()  # (a strided broadcast is 8× slower)
        f = _mm(X, X.T).add_(a[None])  # symmetric: numpy's BLAS forms half (syrk); a_i, constant in a row, later
        f.fill_diagonal_(-math.inf)  # not its own neighbour
        n, g = j1 - j0, (j1 - j0) // k
        if g >= 2:  # each row's k best are ≥ the least of its maxima over k column groups (k distinct entries)
            floor = f[:, :k * g].view(n, k, g).amax(2).amin(1)
            hit = _above(f, torch.nextafter(floor, floor.new_full((), -math.inf)), None)  # ≥ floor
            i, j = hit // n, hit % n
            _merge(best_v, best_i, i + j0, j + j0, f.flatten()[hit] + a[i])
        else:
            v, ix = f.topk(min(k, n), dim=1)
            best_v[j0:j1, :v.shape[1]], best_i[j0:j1, :v.shape[1]] = v + a[:, None], ix + j0
    for J, (j0, j1) in enumerate(spans):
        M[j0:j1, -2:] = M[j0:j1, -2:].flip(1)  # rows of J as [x, 1, a] (for a while): M_I · M_Jᵀ = f
        for i0, i1 in spans[:J]:
            f = _mm(M[i0:i1], M[j0:j1].T)
            tau = best_v[:, -1].contiguous()  # each row's k-th best score so far
            hit = _above(f, tau[i0:i1], tau[j0:j1])
            if hit.numel() > LOOSE * k * (i1 - i0 + j1 - j0):  # thresholds too loose here:
                top = torch.zeros(f.shape, device=dev)
                top.scatter_(1, f.topk(k, dim=1).indices, 1.0).scatter_(0, f.topk(k, dim=0).indices, 1.0)
                hit = _above(top, torch.zeros(len(top), device=dev), None)  # the k best of each row and column
            i, j, v = hit // (j1 - j0) + i0, hit % (j1 - j0) + j0, f.flatten()[hit]
            for_i, for_j = v > tau[i], v > tau[j]  # a hit for row i, for row j (or both)
            o = j[for_j].argsort()  # the hits come sorted by i; the rows of I come before those of J
            _merge(best_v, best_i, torch.cat([i[for_i], j[for_j][o]]), torch.cat([j[for_i], i[for_j][o]]),
                   torch.cat([v[for_i], v[for_j][o]]))
        M[j0:j1, -2:] = M[j0:j1, -2:].flip(1)
    return best_i, best_v


def _dominant_subspace(X: torch.Tensor, mean: torch.Tensor, width: int, seed: int = 0) -> torch.Tensor | None:
    """P (D, ≤ width) float64, orthonormal: the leading right singular vectors of 4·width sampled centred rows of
    X — or None unless P holds 90 % of the variance of 4·width other sampled rows (no dominant subspace)."""
    pick = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))[:8 * width]
    S = X[pick.to(X.device)].to(mean.device, torch.float64) - mean
    S, H = S[:4 * width], S[4 * width:]
    w, U = torch.linalg.eigh(S @ S.T)  # the sample's right singular vectors, from its Gram matrix
    keep = w[-width:] > 1e-9 * w[-1]
    P = torch.linalg.qr(S.T @ U[:, -width:][:, keep]).Q
    return P if float((H @ P).square().sum()) >= 0.9 * float(H.square().sum()) else None


def _projected_search(X: torch.Tensor, Mz: torch.Tensor, c: int):
    """Candidates for `_settle` (idx (N, c), lower (N, c), floor (N,)) pruned through a projection, or None when
    the bounds prune too little (then the full search is cheaper). Mz (N, width + 3) = [ẑ, −s/2, 1], made by
    `nn_distances`.

    With ẑ = [Pᵀx, ‖x − PPᵀx‖] (in float64), LB = ‖ẑ_i − ẑ_j‖² ≤ ‖x_i − x_j‖² (Pythagoras and the reverse
    triangle inequality) is s_i + s_j − 2ẑ_i·ẑ_j with s = ‖x‖² less the float32 margin of `_slack`: a GEMM of
    width + 3 columns. A row's c smallest LB are its candidates and its (c+1)-th bounds all the others;
    `_symmetric_search` finds them. Costs N²·width/2 instead of N²·D/2 multiply-adds."""
    p, dev = min(Mz.shape[0], 256), Mz.device  # probe whether the bounds settle most of the first rows
    f = _mm(Mz[:p], torch.cat([Mz[:, :-2], Mz[:, -1:], Mz[:, -2:-1]], 1).T)  # −LB/2, as the search scores
    f[torch.arange(p, device=dev), torch.arange(p, device=dev)] = -math.inf
    v, ix = f.topk(c + 1, dim=1)
    if int((-2 * v[:, c].double().cpu() < _refine(X, torch.arange(p), ix[:, :c])[:, 1].square()).sum()) > p // 4:
        return None
    idx, v = _symmetric_search(Mz, c + 1, None)
    return idx[:, :c], -2 * v[:, :c], -2 * v[:, c]


def nn_distances(X: torch.Tensor, device: str | torch.device = "cpu", candidates: int | None = None,
                 block: int | None = None, project: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2): distances of each row of X (N, D) to its first and second nearest other rows, float64 (CPU).

    The data are centred (in float64) and cast to float32 on the chosen device. When they have a dominant
    `project`-wide subspace (`_dominant_subspace`; tried for D ≥ 4·project), the search is first pruned through
    the projection (`_projected_search`, N²·project/2 work); otherwise, or when that prunes too little, the
    float32 GEMM search over symmetric block pairs runs (`_symmetric_search`, N²·D/2; its float32 error, at most
    `_slack`, bounds the distances). Either gives candidates with bounds that hold whatever the float32 rounding,
    which `_settle` turns into the exact float64 distances of the data as given (as the reference libraries
    compute them). Memory: X in float32 plus one block of scores (≤ BLOCK_BYTES).
    """
    N, D = X.shape
    if N < 3:
        raise SurgeryError(f"TwoNN needs at least 3 points, got {N}")
    dev = resolve_device(device)
    mean = X.sum(0, dtype=torch.float64) / N
    if not torch.isfinite(mean).all() and not torch.isfinite(X).all():  # the sums first: 7× cheaper
        raise SurgeryError("contains NaN or Inf")
    lo, hi = torch.aminmax(X)  # (one pass, no |X| copy: abs().amax() cost a third of a small search)
    top = max(-float(lo), float(hi))
    if top > 2.0 ** 40 or 0 < top < 2.0 ** -40:  # the float32 squares would overflow (or underflow): the search
        e = math.frexp(top)[1]  # runs on X · 2⁻ᵉ, exactly scaled, and the distances are scaled back exactly
        r1, r2 = nn_distances(torch.ldexp(X, torch.tensor(-e)), device, candidates, block, project)
        return r1 * 2.0 ** e, r2 * 2.0 ** e
    mean = mean.to(dev)
    P = _dominant_subspace(X, mean, project) if project and D >= 4 * project and N > 8 * project else None
    M = torch.empty(N, D + 2, dtype=torch.float32, device=dev)  # [X − mean, −‖x − mean‖²/2, 1]
    Mz = None if P is None else torch.ones(N, P.shape[1] + 3, dtype=torch.float32, device=dev)  # [ẑ, −s/2, 1]
    step = max(1, (1 << 21) // (8 * D))  # a few rows at a time, in cache
    for i0 in range(0, N, step):
        x = X[i0:i0 + step].to(device=dev, dtype=torch.float64, copy=True).sub_(mean)
        sq = x.square().sum(1)
        M[i0:i0 + step, :D], M[i0:i0 + step, D] = x, sq * -0.5
        if Mz is not None:
            z = x @ P
            Mz[i0:i0 + step, :-3], Mz[i0:i0 + step, -3] = z, (sq - z.square().sum(1)).clamp_(min=0).sqrt_()
            Mz[i0:i0 + step, -2] = sq * (-0.5 * (1 - _slack(D)))  # s: ‖ẑ‖² (= ‖x‖²) less the margin
    M[:, D + 1] = 1
    Xc, sq = M[:, :D], M[:, D] * -2
    k = min(candidates or (8 if D >= 1024 else 4), N - 1)  # the float32 error bound, ∝ D, needs more to settle
    with _single_torch_thread(dev.type == "cpu"):
        found = None if Mz is None else _projected_search(X, Mz, k)
        if found is None:
            idx, v = _symmetric_search(M, k, block)
            d2, slack = -2 * v, _slack(D)
            # a row j outside the candidates has approximate d2 ≥ d2[:, -1], and ‖x_j‖² ≤ 2‖x_i‖² + 2‖x_i − x_j‖²
            found = idx, d2 - slack * (sq[:, None] + sq[idx]), (d2[:, -1] - 3 * slack * sq) / (1 + 2 * slack)
        r = _settle(X, Xc, sq, *found)
    return r[:, 0].contiguous(), r[:, 1].contiguous()


@contextmanager
def _single_torch_thread(active: bool):
    """On the CPU the GEMMs run on numpy's BLAS threads; torch's own threads, idling beside them between
    its small operations, slowed both down by 30–40 % (measured on 2 cores)."""
    old = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def id_from_mu(mu: torch.Tensor, method: str = "linear", discard: float = 0.1, legacy_cdf: bool = False) -> float:
    """TwoNN dimension from the ratios μ = r2/r1 (finite, ≥ 1), as scikit-dimension 0.5 `TwoNN` computes it.

    linear: keep the n = int(N(1 − discard)) smallest μ, F_i = i/N ((i − 1)/N with `legacy_cdf`, as
    scikit-dimension 0.3), least squares through the origin of −log(1 − F_i) on log μ_i.
    mle: (n − 1) / (Σ_{i≤n} log μ_i + (N − n) log μ_n) (Type-II censored; (N − 1)/Σ log μ with discard 0).
    """
    N = mu.numel()
    n = int(N * (1 - discard))
    if n < 2:
        raise SurgeryError("fewer than 2 points left to estimate the dimension")
    log_mu = torch.sort(mu.to(torch.float64)).values[:n].log()
    if method == "mle":
        return float((n - 1) / (log_mu.sum() + (N - n) * log_mu[-1]))
    if method != "linear":
        raise SurgeryError(f"unknown TwoNN method {method!r}; use linear or mle")
    i = torch.arange(1, n + 1, dtype=torch.float64) - (1 if legacy_cdf else 0)
    y = -torch.log1p(-i / N)
    return float((log_mu * y).sum() / log_mu.square().sum())


@dataclass(frozen=True)
class TwoNNResult:
    dimension: float
    spread: float  # standard deviation over bootstrap resamples of μ
    points: int  # distinct rows used
    duplicates: int  # repeated rows merged into their first copy before the search
    method: str
    discard: float


def distinct_rows(X: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the first copy of each distinct row of X (N, D): the rows DADApy's
    `remove_identical_points` (`np.unique(X, axis=0)`) keeps; values compare equal as numpy's do (−0.0 = 0.0).

    Rows are grouped by 8 spread-out columns; a row is compared whole only with the first of its group (and,
    in the rare group where that differs, with the others by an exact sort) — a full sort of N records of D
    values costs 5–20× more, most of it moving the records."""
    x = X.detach().cpu().contiguous().numpy()
    N, D = x.shape

    def record(a):  # rows as opaque byte records; + 0 makes −0.0 +0.0, so equal values get equal bytes
        a = np.ascontiguousarray(a + a.dtype.type(0) if a.dtype.kind == "f" else a)
        return a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()

    _, first, inverse = np.unique(record(x[:, np.linspace(0, D - 1, min(D, 8)).astype(int)]),
                                  return_index=True, return_inverse=True)  # stable: first = the first row's index
    rep = first[inverse.ravel()]  # (N,) the first row with the same key
    others = np.flatnonzero(rep != np.arange(N))
    keep = np.ones(N, dtype=bool)
    same = (x[others] == x[rep[others]]).all(1)
    keep[others[same]] = False
    rest = others[~same]  # equal key, other values: compared whole among themselves (rare)
    if rest.size:
        _, f = np.unique(record(x[rest]), return_index=True)
        keep[rest] = False
        keep[rest[f]] = True
    return torch.from_numpy(np.flatnonzero(keep))


def two_nn(X: torch.Tensor, *, method: str = "linear", discard: float = 0.1, device="cpu", bootstrap: int = 100,
           seed: int = 0, legacy_cdf: bool = False, name: str = "data") -> TwoNNResult:
    """TwoNN intrinsic dimension of the distinct rows of X (N, D), with a bootstrap spread.

    Repeated rows are merged into one copy before the neighbour search, as DADApy's `remove_identical_points`
    does (methods.md §4.1); how many were merged is reported (`duplicates`) and warned about."""
    if not isinstance(X, torch.Tensor) or X.ndim != 2 or X.shape[1] == 0:
        raise SurgeryError(f"{name}: TwoNN takes a (points, features) matrix with at least one feature, got "
                           f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    keep = distinct_rows(X) if X.shape[0] else None
    dups = 0 if keep is None else X.shape[0] - keep.numel()
    if dups:
        X = X[keep.to(X.device)]
        warnings.warn(f"{name}: merged {dups} repeated rows into one copy each ({X.shape[0]} distinct rows)")
    if X.shape[0] < MIN_POINTS:
        raise SurgeryError(f"{name}: {X.shape[0]} distinct points (after merging {dups} repeated rows); TwoNN "
                           f"needs at least {MIN_POINTS} for a stable estimate")
    try:
        r1, r2 = nn_distances(X, device)
    except SurgeryError as e:
        raise SurgeryError(f"{name}: {e}") from None
    mu = r2 / r1
    d = id_from_mu(mu, method, discard, legacy_cdf)
    g = torch.Generator().manual_seed(seed)
    boots = [id_from_mu(mu[torch.randint(0, mu.numel(), (mu.numel(),), generator=g)], method, discard, legacy_cdf)
             for _ in range(bootstrap)]
    spread = float(torch.tensor(boots).std()) if bootstrap > 1 else float("nan")
    return TwoNNResult(d, spread, int(mu.numel()), dups, method, discard)


# ---------------------------------------------------------------- GeLoRA ranks

BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def gelora_ranks(ids: Sequence[float], formula: str = "diff", min_rank: int = 1) -> list[int]:
    """Rank of block i (1..L) from the IDs d_0 (embedding output) … d_L (block outputs):
    diff: max(ceil(d_i − d_{i−1}), min_rank) (GeLoRA); max: max(ceil(max(d_i, d_{i−1})), min_rank)."""
    if formula not in ("diff", "max"):
        raise SurgeryError(f"unknown formula {formula!r}; use diff or max")
    if not all(math.isfinite(d) and d >= 0 for d in ids):
        raise SurgeryError(f"intrinsic dimensions must be finite and ≥ 0, got {', '.join(map(str, ids))}")
    if len(ids) < 2:  # d_0 alone ranks no block
        raise SurgeryError(f"GeLoRA needs the IDs of the embedding output and at least one block, got {len(ids)}")
    out = []
    for i in range(1, len(ids)):
        r = ids[i] - ids[i - 1] if formula == "diff" else max(ids[i], ids[i - 1])
        out.append(max(math.ceil(r - 1e-9), min_rank))
    return out


def block_of(name: str) -> int | None:
    """The 0-based transformer block a module belongs to (`…layers.3.…` → 3), or None."""
    m = BLOCK.findall(name)
    return int(m[-1]) if m else None


def module_ranks(names: Sequence[str], block_ranks: Sequence[int], block_prefix: str | None = None
                 ) -> dict[str, int]:
    """Every module gets the rank of its block; a module with no block, or a block beyond the IDs, is an error.
    With the captured blocks' path (`block_prefix`, e.g. `encoder.block`), a module must be in those blocks: a
    T5 decoder's `decoder.block.3` (or a vision tower's `layers.3`) is not block 3 of what was measured."""
    where = re.compile(rf"(?:^|\.){re.escape(block_prefix)}\.(\d+)(?:\.|$)") if block_prefix else None
    out, unknown = {}, []
    for n in names:
        m = where.search(n) if where else None
        b = int(m.group(1)) if m else None if where else block_of(n)
        if b is None or b >= len(block_ranks):
            unknown.append(n)
        else:
            out[n] = block_ranks[b]
    if unknown:
        blocks = f" ({block_prefix}.N)" if block_prefix else ""
        raise SurgeryError(f"cannot place module(s) in the {len(block_ranks)} blocks{blocks} of the hidden-state "
                           f"file: {', '.join(unknown[:5])}")
    return out


def fit_budget(ranks: Mapping[str, int], cost: Mapping[str, int], budget: int, min_rank: int = 1) -> dict[str, int]:
    """Scale all ranks by one factor (binary search) so Σ rank · cost ≤ budget, keeping ≥ min_rank."""
    if sum(min_rank * cost[n] for n in ranks) > budget:
        raise SurgeryError(f"budget {budget:,} is below {min_rank} rank(s) per module")
    scaled = lambda s: {n: max(min_rank, math.floor(r * s)) for n, r in ranks.items()}  # noqa: E731
    lo, hi = 0.0, 1.0
    while sum(r * cost[n] for n, r in scaled(hi).items()) <= budget and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(r * cost[n] for n, r in scaled(mid).items()) <= budget else (lo, mid)
    return scaled(lo)


@dataclass(frozen=True)
class RerankReport:
    ids: tuple[float, ...]  # d_0 (embeddings) … d_L
    block_ranks: tuple[int, ...]  # rank of block 1..L
    requested: Mapping[str, int]  # GeLoRA rank per module (after any budget)
    clipped: Mapping[str, tuple[int, int]]  # module → (requested, current): above the current rank
    expanded: bool  # clipped modules were padded up to their GeLoRA rank (else kept at their rank)
    padded: Mapping[str, int]  # module → the rank it was padded to (at most its update's full rank)
    squeeze: object  # the SqueezeReport

    @property
    def warnings(self) -> list[str]:
        """One line per clipped module: what it was asked for and what it got."""
        out = []
        for n, (r, c) in self.clipped.items():
            if n in self.padded:
                got = f"padded to {self.padded[n]}" + ("" if self.padded[n] == r else " (the full rank of its update)")
            else:
                got = f"kept at {c}" + (" (its full rank already)" if self.expanded else "")
            out.append(f"{n}: GeLoRA rank {r} is above its rank {c}; {got}")
        return out


def expand(m, k: int, generator: torch.Generator):
    """The LoRA module at rank k > its rank, ΔW unchanged and the new directions trainable, as PEFT initialises
    a LoRA: new rows of A Kaiming-uniform (±1/√in) and new columns of B zero (embedding LoRA: the reverse, A zero
    and B standard normal, as PEFT's `lora_embedding_A/B`)."""
    from dataclasses import replace

    from .adapter import materialize

    A, B = materialize(m.A), materialize(m.B)
    extra = k - m.rank
    shape_a, shape_b = (extra, *A.shape[1:]), (B.shape[0], extra, *B.shape[2:])
    if m.kind == "embedding":
        newA, newB = torch.zeros(shape_a), torch.randn(shape_b, generator=generator)
    else:
        bound = 1 / math.sqrt(m.in_features)
        newA, newB = (torch.rand(shape_a, generator=generator) * 2 - 1) * bound, torch.zeros(shape_b)
    return replace(m, A=torch.cat([A, newA.to(A.dtype)]).contiguous(),
                   B=torch.cat([B, newB.to(B.dtype)], 1).contiguous())


def rerank(adapter, ids: Sequence[float], *, formula: str = "diff", min_rank: int = 1, budget: int | None = None,
           expand_ranks: bool = False, device="auto", seed: int = 0, block_prefix: str | None = None):
    """Squeeze every LoRA module to its block's GeLoRA rank (exact SVD). Ranks above a module's current rank
    are reported, and the module kept at its rank — or, with `expand_ranks`, padded up to it (`expand`).
    `block_prefix`: the captured blocks' path (the capture's metadata), where every module must be."""
    from .device import seeded
    from .rank import PerModule
    from .squeeze import squeeze

    block_ranks = gelora_ranks(ids, formula, min_rank)
    requested = module_ranks(list(adapter.modules), block_ranks, block_prefix)
    if budget is not None:
        cost = {n: m.in_features + m.out_features for n, m in adapter.modules.items()}
        requested = fit_budget(requested, cost, budget, min_rank)
    clipped = {n: (r, adapter.modules[n].rank) for n, r in requested.items() if r > adapter.modules[n].rank}
    final = {n: min(r, adapter.modules[n].rank) for n, r in requested.items()}
    small, report = squeeze(adapter, PerModule(final), device=device, seed=seed)
    # padding past min(out, in) adds parameters, never a direction: the update's full rank is the most it takes
    padded = {n: k for n, (r, c) in clipped.items() if expand_ranks
              and (k := min(r, adapter.modules[n].out_features, adapter.modules[n].in_features)) > c}
    if padded:
        small = small.with_modules({n: expand(m, padded[n], seeded(seed, n)) if n in padded else m
                                    for n, m in small.modules.items()})
    return small, RerankReport(tuple(ids), tuple(block_ranks), requested, clipped, expand_ranks, padded, report)


def gelora_config(block_ranks: Sequence[int], block_prefix: str | None, targets: Sequence[str],
                  base: str | None = None) -> dict:
    """A PEFT LoraConfig (as a dict) to train with GeLoRA's ranks: the most common rank is `r`, every block
    whose rank differs gets `rank_pattern` / `alpha_pattern` entries (alpha = rank, scale 1) matching
    `<block_prefix>.<i>.….<target>` with PEFT's suffix-anchored regex resolution (any of layers/layer/h/blocks/
    block when the prefix is unknown)."""
    from collections import Counter

    if not targets:
        raise SurgeryError("--targets: name the module leaves to adapt, e.g. query,key,value")
    r = Counter(block_ranks).most_common(1)[0][0]
    pattern = {}
    for i, k in enumerate(block_ranks):
        if k != r:
            for t in targets:
                prefix = re.escape(block_prefix) if block_prefix else "(?:layers|layer|h|blocks|block)"
                pattern[rf"{prefix}\.{i}\..*{re.escape(t)}"] = k
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": list(targets),
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "task_type": None, "base_model_name_or_path": base}
