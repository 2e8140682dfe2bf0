"""LoHa and LoKr updates are low-rank in disguise: their exact LoRA forms and SVDs (methods.md §6).

- Tucker convs (LyCORIS `lora_mid`, `hada_t1/t2`, `lokr_t2`; PEFT `use_effective_conv2d`) fold into a rank-r pair.
- LoHa `(B₁A₁) ⊙ (B₂A₂) = (B₁ • B₂)(A₁ᵀ • A₂ᵀ)ᵀ`, `•` the face-splitting (row-wise Kronecker) product: rank r₁r₂.
- LoKr `kron(W₁, W₂) = (U₁⊗U₂)(Σ₁⊗Σ₂)(V₁⊗V₂)ᵀ`: its SVD from the two factors' SVDs, the k largest σ products.

Every function takes and returns 2-D torch tensors (conv kernels flattened into the columns as
`W.flatten(1)` does: in·kh·kw); nothing here forms the dense ΔW.
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
    """SVD of `kron(W₁, W₂)` from thin SVDs of W₁ (l, m) and W₂ (k₂, n).

    S holds every product σᵢ(W₁)·σⱼ(W₂), descending (exactly the spectrum); U (l·k₂, k) and Vh (k, m·n) only the
    k leading directions (default: all), each the Kronecker product of the factors' vectors.
    """
    S = (f1.S[:, None] * f2.S[None, :]).reshape(-1)  # (r₁·r₂,), index i·r₂ + j
    S, order = torch.sort(S, descending=True, stable=True)
    top = order[: S.numel() if k is None else min(k, S.numel())]
    i, j = top // f2.S.numel(), top % f2.S.numel()
    U = (f1.U[:, None, i] * f2.U[None, :, j]).reshape(-1, top.numel())  # (l·k₂, k): [(a, b), t] = U₁[a,i]·U₂[b,j]
    Vh = (f1.Vh[i, :, None] * f2.Vh[j, None, :]).reshape(top.numel(), -1)  # (k, m·n)
    return SVD(U, S, Vh)


def factor_svd(B: torch.Tensor, A: torch.Tensor | None = None) -> SVD:
    """Thin SVD of a LoKr half: `B @ A` (a decomposed factor, O((m + n) r²)) or a full matrix B."""
    if A is None:
        return SVD(*torch.linalg.svd(B, full_matrices=False))
    return lowrank_svd(B, A)
