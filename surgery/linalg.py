"""SVDs of low-rank products without forming the dense matrix.

`lowrank_svd` is exact (methods.md §2.1); `randomized_svd` is Halko–Martinsson–Tropp (2011) Algorithm 4.4
written against `x ↦ M x` and `y ↦ Mᵀ y`, so it takes a LoRA, a sum of LoRAs or a dense delta alike.
"""
from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import torch

from .device import Scratch


class SVD(NamedTuple):
    """Thin SVD `M = U diag(S) Vh`: U (m, k), S (k,) descending, Vh (k, n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> SVD:
    """Exact thin SVD of `scale · B @ A` for B (m, r), A (r, n), in O((m + n) r²).

    B = Qb Rb, Aᵀ = Qa Ra, core C = scale · Rb Raᵀ (r×r) = Uc Σ Vcᵀ, so M = (Qb Uc) Σ (Qa Vc)ᵀ.
    Works batched over leading dimensions and for r > m or r > n (reduced QR keeps the core small).
    """
    Qb, Rb = torch.linalg.qr(B)  # (…, m, p), (…, p, r)
    Qa, Ra = torch.linalg.qr(A.transpose(-1, -2))  # (…, n, q), (…, q, r)
    core = scale * (Rb @ Ra.transpose(-1, -2))  # (…, p, q)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    return SVD(Qb @ Uc, S, Vch @ Qa.transpose(-1, -2))


class CoreSVD(NamedTuple):
    """SVD of `scale · B @ A` kept in its small core: B = Qb Rb, Aᵀ = Qa Ra, scale · Rb Raᵀ = Uc diag(S) Vch.

    Rb (…, p, r), Ra (…, q, r), Uc (…, p, t), S (…, t), Vch (…, t, q), all float64 (leading dimensions: a batch of
    modules); the Q factors are never formed.
    """

    Rb: torch.Tensor
    Ra: torch.Tensor
    Uc: torch.Tensor
    S: torch.Tensor
    Vch: torch.Tensor
    scale: float


FLOAT32_MAX = torch.finfo(torch.float32).max  # loaders apply updates in float32 (or narrower): the largest they hold


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in `t`, in one reduction pass (they propagate into the min/max; 8× cheaper than
    `isfinite(t).all()`, which writes a mask)."""
    if t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: torch has no aminmax for it
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def r_factor(M: torch.Tensor) -> torch.Tensor:
    """R (…, min(m, r), r), float64, with RᵀR = MᵀM, for M (…, m, r).

    A tall float32 M on the CPU: the Cholesky factor of its Gram matrix formed in float64 (`gram64`) — as accurate
    as a float32 Householder QR (the Gram's rounding, ε₆₄·σ₁², sits below float32's resolution of M, ε₃₂·σ₁) and
    faster on the CPU (a symmetric rank-k update instead of Householder panels). Falls back to QR when the Gram is
    not numerically positive definite (a rank-deficient M) or M is float64 / batched / on another device."""
    if M.dim() == 2 and M.dtype == torch.float32 and M.device.type == "cpu" and M.shape[0] >= 2 * M.shape[1]:
        L, info = torch.linalg.cholesky_ex(gram64(M))
        if int(info) == 0:
            return L.T
    return torch.linalg.qr(M, mode="r").R.double()


_local = threading.local()


def gram64(M: torch.Tensor) -> torch.Tensor:
    """MᵀM (r, r) in float64 for M (m, r) on the CPU: numpy's `X @ X.T` on X = Mᵀ, which its BLAS runs as a
    symmetric rank-k update (half a GEMM's flops; numpy's OpenBLAS was also the faster BLAS on the benchmark
    machine, docs/benchmarks.md). Either layout of M; callers in `per_module` workers get one BLAS thread each.
    X is converted, in M's own layout, into a buffer this thread reuses from call to call (a `Scratch` kept as
    long as the thread lives — `per_module`'s workers, one operation): writing into a fresh multi-MB tensor costs
    the kernel's zeroing of every page first, more than the conversion itself (combine: ~200k → ~100k page
    faults, about half its system time)."""
    m, r = M.shape
    flat = _local.__dict__.setdefault("scratch", Scratch()).get("gram64", (m * r,), torch.float64)
    if M.T.is_contiguous():  # a LoRA A, as stored: X (r, m) row-major
        X = flat.view(r, m).copy_(M.T).numpy()
    else:
        X = flat.view(m, r).copy_(M).numpy().T
    return torch.from_numpy(X @ X.T)


def core_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> CoreSVD:
    """Singular values of `scale · B @ A` (B (…, m, r), A (…, r, n); leading dimensions: a batch of modules) from
    R factors (`r_factor`): O((m + n) r²), no Q formed.

    Raises FloatingPointError if a factor holds NaN/Inf (which always reaches its R).
    """
    Rb = r_factor(B)  # (…, p, r), p = min(m, r)
    Ra = r_factor(A.mT)  # (…, q, r), q = min(n, r)
    if not (all_finite(Rb) and all_finite(Ra)):
        raise FloatingPointError("factor contains NaN or Inf")
    Uc, S, Vch = torch.linalg.svd(scale * (Rb @ Ra.mT), full_matrices=False)
    return CoreSVD(Rb, Ra, Uc, S, Vch, scale)


def core_factors(B: torch.Tensor, A: torch.Tensor, core: CoreSVD, k: int, scale: float = 1.0):
    """Rank-k factors (B' (…, m, k), A' (…, k, n)) with `scale · B' @ A'` = the best rank-k approximation of ΔW.

    U_k = ΔW V_k Σ_k⁻¹ = s·B Raᵀ Vc_k Σ_k⁻¹ and V_kᵀ = s·Σ_k⁻¹ Uc_kᵀ Rb A, so with √Σ on each side
    B' = s·B (Raᵀ Vc_k Σ_k^-½) / √|scale|, A' = s·(Σ_k^-½ Uc_kᵀ Rb) A / √|scale| · sign(scale): two thin
    products with r×k matrices, no inverse of R. Directions with σ at round-off level are set to zero — decided
    on the device, so nothing here waits for it (a batch of modules: one launch per product).
    """
    if scale == 0:
        raise ValueError("scale must be non-zero")
    S = core.S[..., :k]
    tol = core.S[..., :1] * max(B.shape[-2], A.shape[-1], B.shape[-1]) * torch.finfo(B.dtype).eps  # (…, 1)
    inv_root = torch.where(S > tol, S.clamp_min(1e-300).rsqrt(), torch.zeros_like(S))  # (…, k)
    c = core.scale / abs(scale) ** 0.5
    Xb = c * (core.Ra.mT @ core.Vch[..., :k, :].mT) * inv_root.unsqueeze(-2)  # (…, r, k)
    Ya = (c * (1.0 if scale > 0 else -1.0)) * inv_root.unsqueeze(-1) * (core.Uc[..., :k].mT @ core.Rb)  # (…, k, r)
    return B @ Xb.to(B.dtype), Ya.to(A.dtype) @ A


def randomized_svd(
    matmul: Callable[[torch.Tensor], torch.Tensor],
    rmatmul: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SVD:
    """Rank-`rank` randomized SVD of an m×n operator given `matmul(X) = M X` and `rmatmul(Y) = Mᵀ Y`.

    Gaussian test matrix drawn on the CPU from `generator` (so every device sees the same draw), `power_iters`
    subspace iterations with QR re-orthonormalisation between them (Halko et al. 2011, Alg. 4.4).
    Returns U (m, k), S (k,), Vh (k, n) with k = min(rank, m, n).
    """
    m, n = shape
    k = min(rank, m, n)
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    Q = torch.linalg.qr(matmul(omega)).Q  # (m, width)
    for _ in range(power_iters):
        Z = torch.linalg.qr(rmatmul(Q)).Q  # (n, width)
        Q = torch.linalg.qr(matmul(Z)).Q  # (m, width)
    small = rmatmul(Q).transpose(0, 1)  # Qᵀ M: (width, n)
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return SVD((Q @ Us)[:, :k], S[:k], Vh[:k])


def lora_operator(B: torch.Tensor, A: torch.Tensor, scale: float):
    """(matmul, rmatmul) of M = scale · B @ A for `randomized_svd`, never forming M."""
    return (lambda X: scale * (B @ (A @ X))), (lambda Y: scale * (A.transpose(0, 1) @ (B.transpose(0, 1) @ Y)))


def sum_squares(x: torch.Tensor) -> float:
    """Σ x² as a float: BLAS dots of 256-element slices (float32 error ~1e-9 relative here, no temporary the size
    of x), summed in float64 — 5–10× faster than squaring a float64 copy of a weight-sized x."""
    flat = x.reshape(-1)
    n = flat.numel() // 256 * 256
    head = flat[:n].view(-1, 1, 256)
    tail = flat[n:].double()
    return float(torch.bmm(head, head.transpose(1, 2)).sum(dtype=torch.float64) + tail.dot(tail))


def lowrank_frobenius_sq(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> float:
    """‖scale · B @ A‖_F² from the two r×r Gram matrices, in float64."""
    B64, A64 = B.double(), A.double()
    return float(scale * scale * ((B64.T @ B64) * (A64 @ A64.T)).sum())


def split_factors(svd: SVD, k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B' (m, k), A' (k, n)) with `scale · B' @ A' = U_k Σ_k Vh_k`, √(Σ/|scale|) on both sides.

    Keeping the module's scale (rather than folding it into the factors) keeps alpha's learning-rate
    meaning for further training; the factors absorb the rest.
    """
    if scale == 0:
        raise ValueError("scale must be non-zero")
    root = (svd.S[..., :k] / abs(scale)).sqrt()
    sign = 1.0 if scale > 0 else -1.0
    B = sign * svd.U[..., :, :k] * root.unsqueeze(-2)
    A = root.unsqueeze(-1) * svd.Vh[..., :k, :]
    return B, A


class OutputSVD(NamedTuple):
    """The SVD of a LoRA's outputs on given inputs, M = scale · B @ A @ Xᵀ (m, n), in factored form: M's left
    singular vectors are Qb @ Uc (Qb (m, p) the thin Q of B, Uc (p, min(p, q))), its singular values S."""

    Qb: torch.Tensor  # (m, p)
    Rb: torch.Tensor  # (p, r)
    Uc: torch.Tensor  # (p, p)
    S: torch.Tensor  # (p,)
    scale: float


def input_factor(X: torch.Tensor) -> torch.Tensor:
    """R of X's QR (min(n, in), in), float64: RᵀR = XᵀX, so it stands for captured inputs X (n, in) in
    `output_svd` at a size independent of n."""
    return torch.linalg.qr(X.double(), mode="r").R


def output_svd(B: torch.Tensor, A: torch.Tensor, F: torch.Tensor, scale: float = 1.0) -> OutputSVD:
    """Singular values and left vectors of M = scale · B A Xᵀ (m, n) given F with FᵀF = XᵀX (X itself, or
    `input_factor(X)`): with B = Qb Rb and (A Fᵀ)ᵀ = Qc Rc, M = Qb (s Rb Rcᵀ) Qcᵀ up to an orthogonal factor on the
    right, so one small SVD of s·Rb Rcᵀ (p × r) gives them — by QRs, never squaring X (its small singular values
    keep their digits; n < in and rank-deficient X included). O((m + n) r²); neither ΔW nor M is formed."""
    Qb, Rb = torch.linalg.qr(B.double())  # (m, p), (p, r)
    Rc = torch.linalg.qr((A.double() @ F.double().T).T, mode="r").R  # (q, r): (A Fᵀ)ᵀ = Qc Rc
    Uc, S, _ = torch.linalg.svd(scale * (Rb @ Rc.T), full_matrices=False)
    return OutputSVD(Qb, Rb, Uc, S, scale)


def output_factors(B: torch.Tensor, A: torch.Tensor, out: OutputSVD, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-k ΔW_k minimising ‖X (ΔW_k − ΔW)ᵀ‖_F: ΔW_k = U_k U_kᵀ ΔW, U_k M's top-k left singular vectors
    (Eckart–Young in output space; the error is √Σ_{i>k} σᵢ² of `out.S`). As factors with scale 1:
    B' = U_k = Qb Uc_k (m, k), A' = U_kᵀ · s B A = s (Uc_kᵀ Rb) A (k, in) — since Qbᵀ B = Rb."""
    Uk = out.Uc[:, :k]
    return (out.Qb @ Uk).to(B.dtype), (out.scale * (Uk.T @ out.Rb)).to(A.dtype) @ A
