"""GeLoRA: intrinsic dimension of hidden states (TwoNN) and ranks from it (methods.md §4).

`nn_distances` finds each point's two nearest neighbours with blocked matrix products in float32 on the chosen
device — pruned exactly through a low-dimensional projection when the data have a dominant subspace — and
recomputes the candidates' distances from explicit differences, so memory stays at one block of rows and results
match the reference libraries. `two_nn` is the
estimator of Facco et al. (2017) as scikit-dimension 0.5 and DADApy compute it.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .device import resolve_device
from .errors import SurgeryError

MIN_POINTS = 100  # below this (after dropping duplicates) the estimate is refused
BLOCK_BYTES = 1 << 28  # one block of squared distances: at most 256 MiB


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; on the CPU through numpy's BLAS (measured 2.3× faster than torch's float32 GEMM here)."""
    return torch.from_numpy(a.numpy() @ b.numpy()) if a.device.type == "cpu" else a @ b


def _refine(X: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Distances of X[rows] (b,) to their candidates X[idx] (b, c) from explicit differences, sorted, (b, c) float64
    on the CPU: exactly 0 for duplicated rows, ~1e-7 relative otherwise."""
    rows, idx = rows.to(X.device), idx.to(X.device)
    x = X[rows]
    return torch.stack([torch.linalg.vector_norm(X[idx[:, j]].sub_(x), dim=1) for j in range(idx.shape[1])],
                       1).double().cpu().sort(1).values


def _symmetric_search(X: torch.Tensor, k: int, block: int | None) -> torch.Tensor:
    """The k nearest other rows of X (N, D) by ‖x‖² + ‖y‖² − 2xyᵀ over block pairs I ≤ J only (each product serves
    the rows of I and of J): (N, k) indices. Memory: one block pair (≤ BLOCK_BYTES)."""
    N = X.shape[0]
    sq = X.square().sum(1)
    if block is None:  # one block when the whole matrix fits, else square block pairs of ≤ BLOCK_BYTES
        block = N if 4 * N * N <= BLOCK_BYTES else max(k + 1, min(math.isqrt(BLOCK_BYTES // 4), math.ceil(N / 4)))
    starts = list(range(0, N, block))
    found: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in starts]  # per row block: (d2, idx)
    for a, i0 in enumerate(starts):
        i1 = min(i0 + block, N)
        for b in range(a, len(starts)):
            j0, j1 = starts[b], min(starts[b] + block, N)
            d2 = _mm(X[i0:i1], X[j0:j1].T)
            d2.mul_(-2.0).add_(sq[i0:i1, None]).add_(sq[None, j0:j1])
            if a == b:
                d2.fill_diagonal_(float("inf"))  # not its own neighbour
            kk = min(k, j1 - j0 - (a == b))
            if kk > 0:
                v, ix = d2.topk(kk, dim=1, largest=False)
                found[a].append((v.cpu(), ix.cpu() + j0))
            if a != b:
                v, ix = d2.T.topk(min(k, i1 - i0), dim=1, largest=False)
                found[b].append((v.cpu(), ix.cpu() + i0))
    out = []
    for f in found:
        vals = torch.cat([v for v, _ in f], 1)
        out.append(torch.cat([ix for _, ix in f], 1).gather(1, vals.topk(k, dim=1, largest=False).indices))
    return torch.cat(out)


def _projected_search(X: torch.Tensor, width: int, c: int, seed: int = 0) -> torch.Tensor | None:
    """Exact distances (N, 2) to the two nearest other rows of X (N, D), pruned by a projection, or None when the
    projection prunes too little (then the full search is cheaper).

    P (D, width) spans the leading right singular vectors of 4·width sampled rows; unless it holds 90 % of the
    variance, pruning is not tried. With ẑ = [Pᵀx, ‖x − PPᵀx‖], LB = ‖ẑ_i − ẑ_j‖² ≤ ‖x_i − x_j‖² (Pythagoras and the
    reverse triangle inequality); less a float32 rounding margin of 1e-4·(‖x_i‖² + ‖x_j‖²), it is one GEMM of
    width + 3 columns. Each row's c smallest LB are refined exactly; the row is settled when its (c+1)-th LB is at
    least the refined second distance, as nothing left out can be nearer. Unsettled rows get the full search.
    Costs N²·width instead of N²·D multiply-adds.
    """
    N, D = X.shape
    g = torch.Generator().manual_seed(seed)
    sample = X[torch.randperm(N, generator=g)[:4 * width].to(X.device)].double()
    P = torch.linalg.svd(sample, full_matrices=False).Vh[:width].T.to(X)  # (D, width), orthonormal
    Z = _mm(X, P)
    sq, zs = X.square().sum(1), Z.square().sum(1)
    if float(zs.sum()) < 0.9 * float(sq.sum()):  # no dominant subspace: the bounds could not prune
        return None
    Zh = torch.cat([Z, (sq.double() - zs.double()).clamp_(min=0).sqrt().to(X)[:, None]], 1)  # ‖ẑ‖² = ‖x‖²
    s = (1 - 1e-4) * sq  # ‖ẑ‖² less the margin
    one = torch.ones_like(s)
    left = torch.cat([Zh, s[:, None], one[:, None]], 1)  # left_i · right_j = s_i + s_j − 2 ẑ_i·ẑ_j
    right = torch.cat([-2 * Zh, one[:, None], s[:, None]], 1).T.contiguous()
    r12 = torch.empty(N, 2, dtype=torch.float64)
    hard = []
    rows = max(1, min(N, BLOCK_BYTES // (4 * N)))
    starts = [0, *range(min(rows, 256), N, rows)]  # a first small block probes whether pruning works
    for i0, i1 in zip(starts, [*starts[1:], N]):
        lb = _mm(left[i0:i1], right)
        lb[torch.arange(i1 - i0, device=X.device), torch.arange(i0, i1, device=X.device)] = float("inf")
        v, ix = lb.topk(c + 1, dim=1, largest=False)
        exact = _refine(X, torch.arange(i0, i1), ix[:, :c])
        r12[i0:i1] = exact[:, :2]
        unsettled = (v[:, c].clamp(min=0).double().cpu() < exact[:, 1].square() * (1 + 1e-5)).nonzero().flatten()
        if i0 == 0 and unsettled.numel() > (i1 - i0) // 4:
            return None
        hard.append(unsettled + i0)
    hard = torch.cat(hard)
    for h0 in range(0, hard.numel(), rows):
        h = hard[h0:h0 + rows].to(X.device)
        d2 = _mm(X[h], X.T).mul_(-2.0).add_(sq[h, None]).add_(sq[None])
        d2[torch.arange(h.numel(), device=X.device), h] = float("inf")
        r12[h.cpu()] = _refine(X, h, d2.topk(c, dim=1, largest=False).indices)[:, :2]
    return r12


def nn_distances(X: torch.Tensor, device: str | torch.device = "cpu", candidates: int = 4,
                 block: int | None = None, project: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2): distances of each row of X (N, D) to its first and second nearest other rows, float64 (CPU).

    The data are centred (in float64) and cast to float32 on the chosen device. When D ≥ 4·project, the search is
    first pruned exactly through a `project`-wide projection (`_projected_search`: N²·project work when the data
    have a dominant subspace); otherwise, or when that prunes too little, squared distances
    come from blocked GEMMs over the symmetric block pairs (`_symmetric_search`, N²·D/2). Either way each row's
    nearest candidates are recomputed from explicit differences (`_refine`), so the results match the reference
    libraries. Memory: X in float32 plus one block of distances (≤ BLOCK_BYTES).
    """
    N, D = X.shape
    if N < 3:
        raise SurgeryError(f"TwoNN needs at least 3 points, got {N}")
    dev = resolve_device(device)
    mean = X.sum(0, dtype=torch.float64) / N
    Xc = torch.empty(N, D, dtype=torch.float32, device=dev)
    step = max(1, BLOCK_BYTES // (8 * D))
    for i0 in range(0, N, step):
        Xc[i0:i0 + step] = (X[i0:i0 + step].to(torch.float64) - mean).to(dev, torch.float32)
    k = min(candidates, N - 1)
    r = None
    if project and D >= 4 * project and N > 4 * project:
        r = _projected_search(Xc, project, max(2, k - 1))
    if r is None:
        idx = _symmetric_search(Xc, k, block)
        step = max(1, BLOCK_BYTES // (4 * D))
        r = torch.cat([_refine(Xc, torch.arange(s, min(s + step, N)), idx[s:s + step]) for s in range(0, N, step)])
    return r[:, 0].contiguous(), r[:, 1].contiguous()


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
    points: int  # points used (duplicates removed)
    duplicates: int  # points dropped because their nearest neighbour is at distance 0
    method: str
    discard: float


def two_nn(X: torch.Tensor, *, method: str = "linear", discard: float = 0.1, device="cpu", bootstrap: int = 100,
           seed: int = 0, legacy_cdf: bool = False, name: str = "data") -> TwoNNResult:
    """TwoNN intrinsic dimension of the rows of X (N, D), with a bootstrap spread; duplicates are dropped."""
    if not torch.isfinite(X).all():
        raise SurgeryError(f"{name}: contains NaN or Inf")
    r1, r2 = nn_distances(X, device)
    keep = r1 > 0
    mu = (r2[keep] / r1[keep])
    dups = int((~keep).sum())
    if dups:
        warnings.warn(f"{name}: dropping {dups} points with zero distance to their nearest neighbour (duplicates)")
    if mu.numel() < MIN_POINTS:
        raise SurgeryError(f"{name}: {mu.numel()} points after dropping {dups} duplicates; TwoNN needs at least "
                           f"{MIN_POINTS} for a stable estimate")
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
    out = []
    for i in range(1, len(ids)):
        r = ids[i] - ids[i - 1] if formula == "diff" else max(ids[i], ids[i - 1])
        out.append(max(math.ceil(r - 1e-9), min_rank))
    return out


def block_of(name: str) -> int | None:
    """The 0-based transformer block a module belongs to (`…layers.3.…` → 3), or None."""
    m = BLOCK.findall(name)
    return int(m[-1]) if m else None


def module_ranks(names: Sequence[str], block_ranks: Sequence[int]) -> dict[str, int]:
    """Every module gets the rank of its block; a module with no block, or a block beyond the IDs, is an error."""
    out, unknown = {}, []
    for n in names:
        b = block_of(n)
        if b is None or b >= len(block_ranks):
            unknown.append(n)
        else:
            out[n] = block_ranks[b]
    if unknown:
        raise SurgeryError(f"cannot place module(s) in the {len(block_ranks)} blocks of the hidden-state file: "
                           f"{', '.join(unknown[:5])}")
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
    squeeze: object  # the SqueezeReport


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
    return replace(m, A=torch.cat([A, newA.to(A.dtype)]).contiguous(), B=torch.cat([B, newB.to(B.dtype)], 1).contiguous())


def rerank(adapter, ids: Sequence[float], *, formula: str = "diff", min_rank: int = 1, budget: int | None = None,
           expand_ranks: bool = False, device="auto", seed: int = 0):
    """Squeeze every LoRA module to its block's GeLoRA rank (exact SVD). Ranks above a module's current rank
    are reported, and the module kept at its rank — or, with `expand_ranks`, padded up to it (`expand`)."""
    from .device import seeded
    from .rank import PerModule
    from .squeeze import squeeze

    block_ranks = gelora_ranks(ids, formula, min_rank)
    requested = module_ranks(list(adapter.modules), block_ranks)
    if budget is not None:
        cost = {n: m.in_features + m.out_features for n, m in adapter.modules.items()}
        requested = fit_budget(requested, cost, budget, min_rank)
    clipped = {n: (r, adapter.modules[n].rank) for n, r in requested.items() if r > adapter.modules[n].rank}
    final = {n: min(r, adapter.modules[n].rank) for n, r in requested.items()}
    small, report = squeeze(adapter, PerModule(final), device=device, seed=seed)
    if expand_ranks and clipped:
        small = small.with_modules({n: expand(m, requested[n], seeded(seed, n)) if n in clipped else m
                                    for n, m in small.modules.items()})
    return small, RerankReport(tuple(ids), tuple(block_ranks), requested, clipped, expand_ranks, report)


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
