"""LoHa and LoKr updates are low-rank in disguise: their exact LoRA forms and SVDs (methods.md §6).

- Tucker convs (LyCORIS `lora_mid`, `hada_t1/t2`, `lokr_t2`; PEFT `use_effective_conv2d`) fold into a rank-r pair.
- LoHa `(B₁A₁) ⊙ (B₂A₂) = (B₁ • B₂)(A₁ᵀ • A₂ᵀ)ᵀ`, `•` the face-splitting (row-wise Kronecker) product: rank r₁r₂.
- LoKr `kron(W₁, W₂) = (U₁⊗U₂)(Σ₁⊗Σ₂)(V₁⊗V₂)ᵀ`: its SVD from the two factors' SVDs, the k largest σ products.

Every function takes and returns 2-D torch tensors (conv kernels flattened into the columns as
`W.flatten(1)` does: in·kh·kw), the LoKr SVDs also batches of them; nothing here forms the dense ΔW.
"""
from __future__ import annotations

import torch

from .linalg import SVD, lowrank_svd


def tucker_pair(t: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA pair of a Tucker-2 conv `Σᵢⱼ up[i, o] · t[i, j, h, w] · down[j, c]`.

    t (r, r', kh, kw), up (r, out), down (r', in) as LyCORIS and PEFT store them (`einsum("i j ..., j r, i p ->
    p r ...", t, down, up)`) → B (out, r), A (r, in·kh·kw) with A[i, (c, h, w)] = Σⱼ t[i, j, h, w] · down[j, c].
    """
    A = torch.einsum("ij...,jc->ic...", t, down)  # (r, in, kh, kw)
    return up.T, A.reshape(A.shape[0], -1)


def face_split(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: X (m, p), Y (m, q) → (m, p·q) with [i, (a, b)] = X[i, a] · Y[i, b]."""
    return (X[:, :, None] * Y[:, None, :]).reshape(X.shape[0], -1)


def hadamard_lora(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor):
    """An exact LoRA (B (out, r₁r₂), A (r₁r₂, in)) of the LoHa update `(B₁ @ A₁) ⊙ (B₂ @ A₂)`."""
    return face_split(B1, B2), face_split(A1.T, A2.T).T


def kron_svd(f1: SVD, f2: SVD, k: int | None = None) -> SVD:
    """SVD of `kron(W₁, W₂)` from thin SVDs of W₁ (…, l, m) and W₂ (…, k₂, n) (leading dimensions: a batch).

    S holds every product σᵢ(W₁)·σⱼ(W₂), descending (exactly the spectrum); U (…, l·k₂, k) and Vh (…, k, m·n)
    only the k leading directions (default: all), each the Kronecker product of the factors' vectors.
    """
    r2 = f2.S.shape[-1]
    S = (f1.S.unsqueeze(-1) * f2.S.unsqueeze(-2)).flatten(-2)  # (…, r₁·r₂), index i·r₂ + j
    S, order = torch.sort(S, dim=-1, descending=True, stable=True)
    top = order[..., : S.shape[-1] if k is None else min(k, S.shape[-1])]  # (…, k)
    i, j = top // r2, top % r2
    U1 = f1.U.gather(-1, i.unsqueeze(-2).expand(*f1.U.shape[:-1], -1))  # (…, l, k): U₁[a, i_t]
    U2 = f2.U.gather(-1, j.unsqueeze(-2).expand(*f2.U.shape[:-1], -1))  # (…, k₂, k)
    U = (U1.unsqueeze(-2) * U2.unsqueeze(-3)).flatten(-3, -2)  # (…, l·k₂, k): [(a, b), t] = U₁[a,i]·U₂[b,j]
    V1 = f1.Vh.gather(-2, i.unsqueeze(-1).expand(*i.shape, f1.Vh.shape[-1]))  # (…, k, m)
    V2 = f2.Vh.gather(-2, j.unsqueeze(-1).expand(*j.shape, f2.Vh.shape[-1]))  # (…, k, n)
    return SVD(U, S, (V1.unsqueeze(-1) * V2.unsqueeze(-2)).flatten(-2))  # Vh (…, k, m·n)


def lokr_svd(half1: tuple, half2: tuple, scale: float) -> SVD:
    """Exact SVD of `scale · kron(W₁, W₂)` from its halves (B, A) with W = B @ A, A None for a full half (or
    batches of them, stacked): `kron_svd` of the halves' SVDs, the scale's sign in U."""
    U, S, Vh = kron_svd(factor_svd(*half1), factor_svd(*half2))
    return SVD(U * (1.0 if scale >= 0 else -1.0), S * abs(scale), Vh)


def factor_svd(B: torch.Tensor, A: torch.Tensor | None = None) -> SVD:
    """Thin SVD of a LoKr half (or a batch of them): `B @ A` (a decomposed factor, O((m + n) r²)) or a full
    matrix B."""
    if A is None:
        return SVD(*torch.linalg.svd(B, full_matrices=False))
    return lowrank_svd(B, A)
