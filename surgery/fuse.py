"""Fused and separate projections: one update of several row blocks of a weight, and back (formats.md §3.2).

A base that stores q, k, v (and an MLP input) as one fused weight — Flux's original `img_attn.qkv`,
`single_blocks.N.linear1` — and one that stores them apart hold the same ΔW in different rows. A LoRA of the fused
weight splits exactly into one per row block (A shared, B's rows taken), and LoRAs of the blocks fuse exactly into
one of rank Σrᵢ (A stacked, B block-diagonal). Nothing here is approximate; squeeze a fused result to shrink it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .adapter import LohaModule, LoraModule, materialize


def exact_pair(m) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (out, k), A (k, in_flat), scale) with ΔW = scale · B @ A: a module's own factors or exact pair, else its
    exact SVD (B = U·S, A = Vᴴ, scale 1), in float32."""
    pair = m.lowrank(torch.float32)
    if pair is not None:
        return pair[0], pair[1], m.scale
    U, S, Vh = m.svd(torch.float32)
    return U * S, Vh, 1.0


def _rows_magnitude(m, rows: torch.Tensor):
    mag = m.magnitude
    if mag is None:
        return None
    if m.dora_axis != "out":
        raise ValueError("a DoRA magnitude per input column cannot be split by output rows")
    mag = materialize(mag)
    flat = mag.reshape(-1)[rows]  # one entry per output row, in the file's layout (PEFT (1, out, 1, 1) too)
    return flat.reshape([len(rows) if s == m.out_features else s for s in mag.shape]).contiguous()


def take_rows(m, rows: Sequence[int] | torch.Tensor):
    """The module of ΔW[rows]: a LoRA keeps A and takes B's rows (and its bias's, DoRA magnitude's); a LoHa takes
    both halves' w_a rows; any other kind becomes its exact LoRA pair first, stored in its dtype."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    if m.algo == "lora":
        B = materialize(m.B)[rows].contiguous()
        bias = None if m.bias is None else materialize(m.bias)[rows].contiguous()
        return LoraModule(A=m.A, B=B, scale=m.scale, kind=m.kind, bias=bias, magnitude=_rows_magnitude(m, rows),
                          dora_axis=m.dora_axis)
    if m.algo == "loha" and "t1" not in m.tensors:
        tensors = dict(m.tensors)
        for role in ("w1_a", "w2_a"):
            tensors[role] = materialize(tensors[role])[rows].contiguous()
        return LohaModule(tensors, m.scale, _rows_magnitude(m, rows))
    if m.magnitude is not None:
        raise ValueError(f"a DoRA {m.algo} module cannot be split by rows")
    B, A, scale = exact_pair(m)
    return LoraModule(A=A.to(m.dtype).contiguous(), B=B[rows].to(m.dtype).contiguous(), scale=scale)


def stack_rows(parts: Sequence[tuple[object, torch.Tensor]], out_features: int) -> LoraModule:
    """One LoRA of an (out_features, in) weight whose rows `rowsᵢ` get part i's ΔW and the others none.

    A = [A₁; A₂; …] (Σrᵢ, in), B (out_features, Σrᵢ) with Bᵢ in rows rowsᵢ and columns of part i. LoRA parts of
    one scale and dtype keep their values bit for bit; otherwise each scale is folded into its B (float32, rounded
    once to the first part's dtype) and the fused scale is 1."""
    if any(m.bias is not None or m.magnitude is not None for m, _ in parts):
        raise ValueError("LoRA biases and DoRA magnitudes cannot be fused across projections")
    dtype = parts[0][0].dtype
    kinds = {m.kind for m, _ in parts}
    plain = (all(m.algo == "lora" for m, _ in parts) and len({m.scale for m, _ in parts}) == 1
             and len({m.dtype for m, _ in parts}) == 1 and len(kinds) == 1)
    As, Bs = [], []
    for m, rows in parts:
        if plain:
            B, A = materialize(m.B), materialize(m.A)
        else:
            B, A, scale = exact_pair(m)
            B, A = (B * scale).to(dtype), A.to(dtype)
        As.append(A)
        Bs.append((B.reshape(B.shape[0], -1), rows))
    A = torch.cat([a.reshape((a.shape[0],) + tuple(As[0].shape[1:])) for a in As])
    B = torch.zeros(out_features, A.shape[0], dtype=dtype)
    col = 0
    for b, rows in Bs:
        B[rows, col:col + b.shape[1]] = b
        col += b.shape[1]
    if A.dim() > 2:  # conv: B as a 1×1 kernel
        B = B.reshape(B.shape + (1,) * (A.dim() - 2))
    return LoraModule(A=A.contiguous(), B=B, scale=parts[0][0].scale if plain else 1.0,
                      kind=kinds.pop() if plain else ("conv" if A.dim() > 2 else "linear"))
