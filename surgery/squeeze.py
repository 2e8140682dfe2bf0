"""LoRA-Squeeze, post-hoc: re-factor each module's `ΔW = s·B@A` at a lower rank (methods.md §2).

`squeeze(adapter, rule)` is a pure function Adapter → (Adapter, SqueezeReport). Each module is read, factorised
(exact QR-core SVD by default, seeded randomized SVD on request), truncated to the rank its rule picks, and
re-split with √Σ on both sides while keeping the module's scale; factors are cast once to the storage dtype.
The reported error is exact without a dense ΔW: the dropped σ² (exact method) or the norm of the low-rank
residual from Gram matrices (rsvd). On the CPU, modules are processed in parallel (`per_module`); on a GPU,
same-shaped LoRA, LoHa and LoKr modules (and an expert parameter's experts) go in batches (`_batches`).

With captured inputs X (n, in) of a module (`inputs`), the truncation is output-aware: the rank-k ΔW_k minimising
‖X (ΔW_k − ΔW)ᵀ‖_F, U_k U_kᵀ ΔW for U_k the top-k left singular vectors of ΔW Xᵀ (linalg.output_svd), and every rank
rule reads σ(ΔW Xᵀ) instead of σ(ΔW).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from .adapter import Adapter, LoraModule, TensorLike, experts_module, fold_scale, materialize, scaled
from .device import compute_dtype as _compute_dtype
from .device import per_module, resolve_device, seeded, storage_dtype
from .errors import SurgeryError, listed
from .hadamard_kron import lokr_svd
from .linalg import (FLOAT32_MAX, SVD, CoreSVD, all_finite, core_factors, core_svd, lora_operator,
                     lowrank_frobenius_sq, output_factors, output_svd, randomized_svd, split_factors)
from .rank import (Budget, Energy, Exact, FixedRank, PerModule, RankMap, RankRule, budget_ranks, check_rank,
                   check_rule, energy_rank, numerical_rank)

METHODS = ("exact", "rsvd")
BATCH_BYTES = 1 << 28  # float32 factors of one module batch on a GPU (per_module runs CUDA_WORKERS batches at once)


@dataclass(frozen=True)
class ModuleReport:
    name: str
    kind: str
    shape: tuple[int, int]  # (out, in) of the flattened ΔW
    old_rank: int
    new_rank: int
    energy_kept: float  # ‖ΔW_k‖² / ‖ΔW‖² (1 for a zero update)
    rel_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F
    norm: float  # ‖ΔW‖_F
    params_before: int
    params_after: int
    dora: bool
    algo: str = "lora"  # what the module was: lora, loha, lokr or diff (all are LoRA afterwards)
    # with captured inputs X: ‖X(ΔW_k − ΔW)ᵀ‖ / ‖XΔWᵀ‖ of what was written, of plain truncation at the same rank,
    # and ‖XΔWᵀ‖ (None without inputs)
    output_rel_error: float | None = None
    plain_output_rel_error: float | None = None
    output_norm: float | None = None


@dataclass(frozen=True)
class SqueezeReport:
    modules: tuple[ModuleReport, ...]
    method: str
    warnings: tuple[str, ...] = ()

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def rel_error(self) -> float:
        """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over the whole adapter (all modules stacked)."""
        return _stacked((m.rel_error, m.norm) for m in self.modules)

    def output_rel_error(self, plain: bool = False) -> float | None:
        """‖X(ΔW_k − ΔW)ᵀ‖ / ‖XΔWᵀ‖ over the modules with captured inputs (stacked); `plain`: plain truncation's."""
        rows = [((m.plain_output_rel_error if plain else m.output_rel_error), m.output_norm) for m in self.modules
                if m.output_norm is not None]
        return _stacked(rows) if rows else None

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "modules": [m.__dict__ | {"shape": list(m.shape)} for m in self.modules],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "rel_error": self.rel_error,
            "output_rel_error": self.output_rel_error(),
            "plain_output_rel_error": self.output_rel_error(plain=True),
            "warnings": list(self.warnings),
        }


def _stacked(rows) -> float:
    """The relative error of modules stacked into one, from (relative error, norm) pairs."""
    rows = list(rows)
    total = sum(n * n for _, n in rows)
    return math.sqrt(sum((e * n) ** 2 for e, n in rows) / total) if total else 0.0


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not all_finite(t):
            raise SurgeryError(f"module {name}: its factors overflow to NaN or Inf in this dtype")


def _factorize(name: str, m: LoraModule, B: torch.Tensor, A: torch.Tensor, width: int, method: str, device,
               dtype, seed: int):
    """A CoreSVD (exact) or an SVD of ≥ `width` directions (rsvd) of the module's ΔW = s·B (out, r) @ A (r, in)."""
    if method == "exact":
        try:
            return core_svd(B, A, m.scale)
        except FloatingPointError as e:
            raise SurgeryError(f"module {name}: {e}") from None
    _check_finite(name, B, A)
    matmul, rmatmul = lora_operator(B, A, m.scale)
    return randomized_svd(matmul, rmatmul, (B.shape[0], A.shape[1]), width,
                          generator=seeded(seed, name), dtype=dtype, device=device)


def _out_scale(m, fold: bool) -> float:
    """The scale a squeezed module keeps: its own (1 for a zero scale), or 1 with `fold` (the factors carry it)."""
    return 1.0 if fold or m.scale == 0 else m.scale


def _folded_bias(m, fold: bool):
    """The module's lora_B.bias for its output scale: scaled by its old scale when that is folded away."""
    if not fold or m.bias is None or m.scale in (0.0, 1.0):
        return m.bias
    return scaled(m.bias, m.scale)


def _truncate(m: LoraModule, B: torch.Tensor, A: torch.Tensor, fact, k: int, out_dtype, fold: bool) -> LoraModule:
    """Module at rank k, its scale kept (or folded into the factors); zero directions pad a spectrum shorter
    than k."""
    scale = _out_scale(m, fold)
    if isinstance(fact, CoreSVD):
        B2, A2 = core_factors(B, A, fact, k, scale)  # (out, k'), (k', in)
    else:
        B2, A2 = split_factors(fact, k, scale)
    return _shaped(m, *_pad(B2, A2, k), k, out_dtype, fold)


def _shaped(m: LoraModule, B2: torch.Tensor, A2: torch.Tensor, k: int, out_dtype, fold: bool) -> LoraModule:
    """Rank-k factors B2 (out, k), A2 (k, in_flat) of LoRA module `m` as its new module: its layout (a conv's
    kernel), on the CPU in `out_dtype` (or its own), its bias, magnitude and output scale."""
    dtype = out_dtype or m.dtype
    B2 = B2.reshape((m.out_features, k) + tuple(m.B.shape[2:])).to("cpu", dtype).contiguous()
    A2 = A2.reshape((k,) + tuple(m.A.shape[1:])).to("cpu", dtype).contiguous()
    return LoraModule(A=A2, B=B2, scale=_out_scale(m, fold), kind=m.kind, bias=_folded_bias(m, fold),
                      magnitude=m.magnitude, dora_axis=m.dora_axis)


def _as_lora(m, B: torch.Tensor, A: torch.Tensor, k: int, out_dtype, shape=None, fold: bool = False) -> LoraModule:
    """Rank-k factors B (out, k), A (k, in_flat) of a LoHa/LoKr/diff module as a LoRA module (of scale
    `_out_scale`), shaped as a conv LoRA where the module (or the base weight's `shape`) gives the kernel."""
    dtype = out_dtype or m.dtype
    full = tuple(m.shape)
    if shape is not None and len(shape) > 2 and (shape[0], math.prod(shape[1:])) == (m.out_features, m.in_features):
        full = tuple(shape)
    kernel = full[2:]
    B = B.reshape((m.out_features, k) + (1,) * len(kernel)).to("cpu", dtype).contiguous()
    A = A.reshape((k,) + full[1:]).to("cpu", dtype).contiguous()
    return LoraModule(A=A, B=B, scale=_out_scale(m, fold), kind="conv" if kernel else "linear",
                      bias=_folded_bias(m, fold), magnitude=m.magnitude, dora_axis=m.dora_axis)


def _as_pair(m, B: torch.Tensor, A: torch.Tensor) -> LoraModule:
    """The LoRA module itself, or a 2-D LoRA view of another kind's exact pair (its scale, bias and magnitude)."""
    return m if m.algo == "lora" else LoraModule(A=A, B=B, scale=m.scale, bias=m.bias, magnitude=m.magnitude,
                                                 dora_axis=m.dora_axis)


def _kept(name: str, m: LoraModule, sdtype, fold: bool) -> tuple[LoraModule, ModuleReport]:
    """A LoRA module left as it is (its dtype or folded scale as asked), reported as lossless."""
    A, B = materialize(m.A), materialize(m.B)  # read once (a combined module's factors are made on reading)
    norm = math.sqrt(lowrank_frobenius_sq(B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1), m.scale))
    out = replace(m, A=A, B=B)
    out = fold_scale(out) if fold else out
    if sdtype is not None and sdtype != m.dtype:
        out = replace(out, A=out.A.to(sdtype), B=out.B.to(sdtype))
    return out, ModuleReport(name=name, kind=m.kind, shape=(m.out_features, m.in_features), old_rank=m.rank,
                             new_rank=m.rank, energy_kept=1.0, rel_error=0.0, norm=norm,
                             params_before=m.num_params(), params_after=m.num_params(), dora=m.dora)


def _pad(B: torch.Tensor, A: torch.Tensor, k: int):
    """Zero directions pad a spectrum shorter than k (B (…, out, k'), A (…, k', in))."""
    if B.shape[-1] < k:
        B = torch.nn.functional.pad(B, (0, k - B.shape[-1]))
        A = torch.nn.functional.pad(A, (0, 0, 0, k - A.shape[-2]))
    return B, A


def _target(name: str, m: LoraModule, rule: RankRule, S: torch.Tensor | None, min_rank: int) -> int:
    if isinstance(rule, Exact):
        return max(numerical_rank(S, (m.out_features, m.in_features)), 1)
    if isinstance(rule, FixedRank):
        return check_rank(name, rule.rank, m.rank)
    if isinstance(rule, (RankMap, PerModule)):
        k = rule.rank_for(name) if isinstance(rule, RankMap) else rule.ranks.get(name)
        return m.rank if k is None else check_rank(name, k, m.rank)
    if isinstance(rule, Energy):
        return min(max(energy_rank(S, rule.threshold), min_rank), m.rank)
    raise TypeError(rule)


def _exact_pair(name: str, m, cdtype, dev) -> tuple[torch.Tensor, torch.Tensor, float]:
    """An exact LoRA form (B (out, r), A (r, in), scale) of a module's ΔW: its own pair (LoRA, LoHa's
    face-splitting pair), or its SVD (LoKr, full) at the numerical rank, scale 1."""
    pair = m.lowrank(cdtype, dev)
    if pair is not None:
        _check_finite(name, *pair)
        return pair[0], pair[1], m.scale
    fact = m.svd(cdtype, dev)
    r = max(numerical_rank(fact.S, (m.out_features, m.in_features)), 1)
    return fact.U[:, :r] * fact.S[:r], fact.Vh[:r], 1.0


def output_truncation(m, X: torch.Tensor, k: int, scale: float, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B (out, k), A (k, in)), float64, of the rank-k update minimising ‖X(ΔW_k − ΔW)ᵀ‖ for module m's
    ΔW and inputs X (n, in), with `scale · B A = ΔW_k` and √Σ on both sides; zero directions pad a shorter one."""
    pair = _exact_pair("", m, torch.float32, device)
    B1, A1 = output_factors(pair[0].double(), pair[1].double(), output_svd(*pair[:2], X, pair[2]), k)
    return _pad(*core_factors(B1, A1, core_svd(B1, A1), k, scale), k)


def check_inputs(name: str, m, shape) -> None:
    """Captured inputs of `shape` fit linear module `m`: (n ≥ 1 tokens, its in_features) — checked from a file's
    header, before any work (with no tokens, every rank-k update is output-optimal, the zero one included)."""
    if m.kind != "linear":
        raise SurgeryError(f"module {name}: captured inputs apply to linear modules, this one is {m.kind}")
    if len(shape) != 2 or shape[1] != m.in_features:
        raise SurgeryError(f"module {name}: captured inputs have shape {tuple(shape)}, the module takes "
                           f"{m.in_features} features")
    if not shape[0]:
        raise SurgeryError(f"module {name}: the captured inputs hold no tokens")


def input_rows(name: str, m, X: TensorLike, dev, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A linear module's captured inputs (n, in) in `dtype` on `dev`, checked (any float storage: widened)."""
    check_inputs(name, m, tuple(X.shape))
    X = materialize(X).to(dev, dtype)
    if not all_finite(X):
        raise SurgeryError(f"module {name}: captured inputs contain NaN or Inf")
    return X


def _residual(B, A, s, B2, A2, s2) -> tuple[float, float]:
    """(‖s·B A‖², ‖s·B A − s2·B2 A2‖²) in float64 through Gram matrices (A (r, ·) may be A Xᵀ: output space)."""
    B, A, B2, A2 = (t.double() for t in (B, A, B2, A2))
    diff = lowrank_frobenius_sq(torch.cat([s * B, -s2 * B2], 1), torch.cat([A, A2], 0))
    return lowrank_frobenius_sq(B, A, s), max(diff, 0.0)  # a Gram sum of a tiny residual can round below 0


def _output_report(name: str, m, X, pair, small: LoraModule, k: int) -> ModuleReport:
    """Weight- and output-space errors of the written module `small` against ΔW = s·B A (pair), and plain
    truncation's output error at the same rank k, for inputs X (n, in)."""
    B, A, s = (pair[0].double(), pair[1].double(), pair[2])
    B2, A2 = small.factors(torch.float64, B.device)
    total, err = _residual(B, A, s, B2, A2, small.scale)
    XA, XA2 = A @ X.T, A2 @ X.T  # (r, n), (k, n)
    out_total, out_err = _residual(B, XA, s, B2, XA2, small.scale)
    Bp, Ap = core_factors(B, A, core_svd(B, A, s), k)  # plain truncation, scale 1
    _, plain_err = _residual(B, XA, s, Bp, Ap @ X.T, 1.0)
    rel = (lambda e: math.sqrt(e / out_total)) if out_total > 0 else (lambda e: 0.0)
    return ModuleReport(
        name=name, kind=m.kind, shape=(m.out_features, m.in_features), old_rank=m.rank, new_rank=k,
        energy_kept=lowrank_frobenius_sq(B2, A2, small.scale) / total if total > 0 else 1.0,
        rel_error=math.sqrt(err / total) if total > 0 else 0.0, norm=math.sqrt(total),
        params_before=m.num_params(), params_after=m.num_params(k), dora=m.dora, algo=m.algo,
        output_rel_error=rel(out_err), plain_output_rel_error=rel(plain_err), output_norm=math.sqrt(out_total))


def spectra(
    adapter: Adapter, *, method: str = "exact", device: str | torch.device = "auto",
    compute_dtype: str | torch.dtype = torch.float32, seed: int = 0, inputs: Mapping[str, TensorLike] | None = None,
) -> dict[str, torch.Tensor]:
    """{module: singular values of its ΔW (float64, CPU, descending)}, streaming over modules; an expert
    parameter's experts as `name[e]`. A module with captured inputs X in `inputs`: those of ΔW Xᵀ."""
    dev, cdtype = resolve_device(device), _compute_dtype(compute_dtype)

    def one(name: str, m) -> dict[str, torch.Tensor]:
        if m.kind == "experts":  # each expert's, as `name[e]` (in batches on a GPU)
            subs = dict(zip((f"{name}[{e}]" for e in range(m.experts)), m.per_expert(cdtype, dev)))
            if inputs and name in inputs:
                return {e: one(name, sub)[name] for e, sub in subs.items()}
            return {k: v for names in _batches(subs, batchable, dev).values() for k, v in unit(names, subs).items()}
        if inputs and name in inputs:
            B, A, scale = _exact_pair(name, m, cdtype, dev)
            return {name: output_svd(B, A, input_rows(name, m, inputs[name], dev), scale).S.cpu()}
        pair = m.lowrank(cdtype, dev)
        if pair is None:
            return {name: m.svd(cdtype, dev).S.double().cpu()}
        return {name: _factorize(name, _as_pair(m, *pair), *pair, m.rank, method, dev, cdtype, seed).S.double().cpu()}

    def unit(names: list[str], pool: Mapping) -> dict[str, torch.Tensor]:
        """A module of `pool` alone, or a batch of same-shaped ones (`_batches`): one batched core SVD, one copy
        back."""
        ms = [pool[n] for n in names]
        if len(ms) == 1:
            return one(names[0], ms[0])
        got = _batch_svd(ms, cdtype, dev)
        if got is None:  # a NaN/Inf factor: the one-module path names the module
            return {k: v for n, m in zip(names, ms) for k, v in one(n, m).items()}
        return dict(zip(names, got[0].double().cpu()))

    batchable = lambda n, m: None if method != "exact" or n in (inputs or {}) else _batch_key(m)  # noqa: E731
    units = _batches(adapter.modules, batchable, dev)
    found = {k: S for got in per_module(lambda _, names: unit(names, adapter.modules), units, dev)
             for k, S in got.items()}
    at = {n: i for i, n in enumerate(adapter.modules)}
    return dict(sorted(found.items(), key=lambda kv: at[parent(kv[0])]))  # the adapter's order


def squeeze(
    adapter: Adapter,
    rule: RankRule,
    *,
    method: str = "exact",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype = torch.float32,
    seed: int = 0,
    min_rank: int = 1,
    progress: Callable[[str], None] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    fold: bool = False,
    inputs: Mapping[str, TensorLike] | None = None,
) -> tuple[Adapter, SqueezeReport]:
    """Lower the rank of every LoRA module of `adapter` by `rule`; returns the new adapter and a report.
    LoHa, LoKr and full-diff modules become LoRA modules (their exact SVD, truncated).

    dtype: storage dtype of the new factors (None = each module's own); compute_dtype: float32 or float64.
    shapes: base weight shapes by module (merge.base_shapes) for the conv kernels flattened LoHa/LoKr factors
    do not state; without them such modules become 2-D LoRA factors.
    fold: give every new module scale 1, its scale in the factors (rounded once, as they are made) — what a
    single-file output stores anyway (surgery.io.peft.folded).
    inputs: {module: captured inputs X (n, in)} (capture.match_inputs): those modules are truncated in output
    space, optimal for X (the rule reads σ(ΔW Xᵀ)); the others plainly, and listed in a warning.
    Budget rules take two passes (spectra first, then factors) so memory stays at one module at a time.
    """
    check_rule(rule)
    if method not in METHODS:
        raise SurgeryError(f"unknown method {method!r}; use exact or rsvd")
    inputs = {n: x for n, x in (inputs or {}).items() if n in adapter.modules}
    if inputs and method != "exact":
        raise SurgeryError("captured inputs give the exact output-space truncation; --method rsvd does not apply")
    for name, m in adapter.modules.items():
        if m.algo == "tera":
            raise SurgeryError(f"module {name} is a TeRA module; squeeze works on LoRA (surgery convert --to lora)")
    if min_rank < 1:  # the rules check themselves (surgery.rank)
        raise SurgeryError(f"min rank must be at least 1, got {min_rank}")
    dev, cdtype, sdtype = resolve_device(device), _compute_dtype(compute_dtype), storage_dtype(dtype)
    modules = adapter.modules
    targets: dict[str, int] = {}
    notes = []
    if isinstance(rule, Budget):
        S = spectra(adapter, method=method, device=dev, compute_dtype=cdtype, seed=seed, inputs=inputs)
        if inputs and (plain := [n for n in S if n not in inputs]):  # σ(ΔW) on the scale of σ(ΔW Xᵀ)
            W = spectra(adapter.with_modules({n: modules[n] for n in inputs}), device=dev, compute_dtype=cdtype)
            gain = math.sqrt(sum(float(S[n].square().sum()) for n in inputs) /
                             max(sum(float(W[n].square().sum()) for n in inputs), 1e-300))
            S |= {n: S[n] * gain for n in plain}
            notes.append(f"budget: modules without captured inputs enter the budget as if their inputs were white "
                         f"with the mean gain ‖XΔWᵀ‖/‖ΔW‖ = {gain:.4g} of the others")
        cost = {n: modules[parent(n)].in_features + modules[parent(n)].out_features for n in S}
        targets = budget_ranks(S, cost, rule.params, min_rank)
    elif isinstance(rule, (FixedRank, RankMap, PerModule)):
        targets = {n: _target(n, m, rule, None, min_rank) for n, m in modules.items()}

    def target_of(name: str) -> int | None:
        """The rank the rule set in advance (None: from the spectrum); an expert `p[e]` falls back to its
        parameter p's."""
        return targets.get(name, targets.get(parent(name)))

    def one(name: str, m) -> tuple[LoraModule, ModuleReport | list[ModuleReport]]:
        if m.kind != "experts":
            return one_lora(name, m, target_of(name))
        # every expert on the LoRA path (in batches on a GPU), then one r for the parameter (PEFT's): the largest,
        # zero-padded
        subs = dict(zip((f"{name}[{e}]" for e in range(m.experts)), m.per_expert(m.dtype)))
        done = {}
        for names in _batches(subs, batchable, dev).values():
            done.update(zip(names, unit(names, subs, lambda n, sub: one_lora(n, sub, target_of(n)))))
        outs = [done[n] for n in subs]
        k = max(o.rank for o, _ in outs)
        small = experts_module(m.nesting, [o.B for o, _ in outs], [o.A for o, _ in outs], outs[0][0].scale,
                               sdtype or m.dtype)
        return small, [replace(r, params_after=o.num_params(k)) for o, r in outs]

    def one_lora(name: str, m: LoraModule, target: int | None) -> tuple[LoraModule, ModuleReport]:
        if m.algo == "lora" and target == m.rank and not isinstance(rule, Budget):
            small, report = _kept(name, m, sdtype, fold)  # already at or below the target rank: as it is
            if name not in inputs:
                return small, report
            B, A = m.factors(torch.float64, dev)
            X = input_rows(name, m, inputs[name], dev)
            out_norm = math.sqrt(lowrank_frobenius_sq(B, A @ X.T, m.scale))
            return small, replace(report, output_rel_error=0.0, plain_output_rel_error=0.0, output_norm=out_norm)
        if name in inputs:
            return output_aware(name, m, target)
        pair = m.lowrank(cdtype, dev)
        if pair is None:  # LoKr / diff: their exact SVD (hadamard_kron.kron_svd, dense for diff), then rank k
            fact = m.svd(cdtype, dev)
            k = target if target is not None else _target(name, m, rule, fact.S, min_rank)
            B2, A2 = _pad(*split_factors(SVD(fact.U[:, :k], fact.S[:k], fact.Vh[:k]), k, _out_scale(m, fold)), k)
            small = _as_lora(m, B2, A2, k, sdtype, (shapes or {}).get(name), fold)
            _check_finite(name, small.A, small.B)
            return small, _report(name, m, fact.S, k)
        B, A = pair  # LoRA, or LoHa's exact face-splitting LoRA (rank r₁r₂): the QR-core path
        lora = _as_pair(m, B, A)
        fact = _factorize(name, lora, B, A, m.rank if target is None else target, method, dev, cdtype, seed)
        k = target if target is not None else _target(name, m, rule, fact.S, min_rank)
        small = _truncate(lora, B, A, fact, k, sdtype or m.dtype, fold)
        if lora is not m:
            small = _as_lora(m, small.B, small.A, k, sdtype, (shapes or {}).get(name), fold)
        _check_finite(name, small.A, small.B)
        return small, _report(name, m, fact.S, k, None if method == "exact" else (B, A, fact))

    def output_aware(name: str, m, target: int | None) -> tuple[LoraModule, ModuleReport]:
        """ΔW_k = U_k U_kᵀ ΔW for the module's inputs X, U_k from σ(ΔW Xᵀ), re-split as `_truncate` does."""
        X = input_rows(name, m, inputs[name], dev)
        pair = _exact_pair(name, m, cdtype, dev)
        out = output_svd(pair[0], pair[1], X, pair[2])
        k = target if target is not None else _target(name, m, rule, out.S, min_rank)
        B1, A1 = output_factors(pair[0].double(), pair[1].double(), out, k)  # ΔW_k = B1 @ A1 (out, k) (k, in)
        view = LoraModule(A=A1, B=B1, scale=m.scale, bias=m.bias, magnitude=m.magnitude, dora_axis=m.dora_axis)
        small = _truncate(view, B1, A1, core_svd(B1, A1), k, sdtype or m.dtype, fold)
        if m.algo != "lora":
            small = _as_lora(m, small.B, small.A, k, sdtype, (shapes or {}).get(name), fold)
        _check_finite(name, small.A, small.B)
        return small, _output_report(name, m, X, pair, small, k)

    def batch(names: list[str], ms: list) -> list[tuple[LoraModule, ModuleReport]]:
        """Same-shaped LoRA, LoHa or LoKr modules at once (`_batches`): one batched exact factorization
        (`_batch_svd`), then the factors of each rank k, each brought back in one copy — the host waits a few
        times per batch (finiteness, spectra, each rank's factors), not per module. A factor holding NaN/Inf
        sends the batch down the one-module path, which names its module."""
        got = _batch_svd(ms, cdtype, dev)
        if got is None:
            return [one_lora(n, m, target_of(n)) for n, m in zip(names, ms)]
        spectrum, factors = got
        S = spectrum.cpu()  # (n, t): the batch's one wait before its factors
        ks = [_target(n, m, rule, S[i], min_rank) if target_of(n) is None else target_of(n)
              for i, (n, m) in enumerate(zip(names, ms))]
        done: list = [None] * len(names)
        dtype = sdtype or ms[0].dtype
        for k in sorted(set(ks)):
            at = [i for i, x in enumerate(ks) if x == k]
            B2, A2 = _pad(*factors(at, k, _out_scale(ms[0], fold)), k)
            B2, A2 = B2.to(dtype).cpu(), A2.to(dtype).cpu()
            for j, i in enumerate(at):
                B1, A1 = B2[j].clone(), A2[j].clone()  # each module its own storage, not a view of the batch
                small = _shaped(ms[i], B1, A1, k, dtype, fold) if ms[i].algo == "lora" else \
                    _as_lora(ms[i], B1, A1, k, dtype, (shapes or {}).get(names[i]), fold)
                _check_finite(names[i], small.A, small.B)
                done[i] = (small, _report(names[i], ms[i], S[i], k))
        return done

    def unit(names: list[str], pool: Mapping, alone: Callable) -> list:
        """`batch` of these modules of `pool`, or `alone(name, m)` for a lone one."""
        return batch(names, [pool[n] for n in names]) if len(names) > 1 else [alone(names[0], pool[names[0]])]

    def batchable(name: str, m) -> tuple | None:
        """`_batch_key` of a module `batch` can take: exact method, no captured inputs, not kept as it is."""
        if method != "exact" or name in inputs or (
                m.algo == "lora" and target_of(name) == m.rank and not isinstance(rule, Budget)):
            return None
        return _batch_key(m)

    units = _batches(modules, batchable, dev)
    out, reports = {}, []
    try:
        done = per_module(lambda _, names: unit(names, modules, one), units, dev)
        for names, results in zip(units.values(), done):
            for name, (small, report) in zip(names, results):
                report = report if isinstance(report, list) else [report]
                for r in report:  # loaders apply an update in float32 (or narrower): past its range it is Inf
                    # there, and its float32 SVD here gives zeros
                    if not (r.norm <= FLOAT32_MAX and math.isfinite(r.energy_kept) and math.isfinite(r.rel_error)):
                        raise SurgeryError(f"module {r.name}: its update (norm {r.norm:.3g}, scale "
                                           f"{modules[name].scale:g}) is beyond float32's range")
                out[name] = small
                reports.extend(report)
                if progress:
                    progress(name)
    except SurgeryError as e:  # name the input the module came from
        if adapter.source is None or str(e).startswith(str(adapter.source)):
            raise
        raise SurgeryError(f"{adapter.source}: {e}") from None
    warnings = list(adapter.notes) + notes
    if inputs and (plain := [n for n, m in modules.items() if n not in inputs]):
        warnings.append(f"{len(plain)} module(s) without captured inputs truncated plainly (optimal for white "
                        f"inputs): {listed(plain)}")
    kept = [r.name for r in reports if r.algo == "lora" and r.old_rank == r.new_rank and (
        isinstance(rule, FixedRank) or isinstance(rule, RankMap) and rule.rank_for(parent(r.name)) is not None)]
    padded = sorted({parent(r.name) for r in reports if parent(r.name) != r.name
                     and r.new_rank < out[parent(r.name)].rank})
    if padded:
        warnings.append(f"{len(padded)} expert parameter(s) written at their largest expert's rank, zero directions "
                        f"padding the others (PEFT and llama.cpp stack experts at one r): {listed(padded)}")
    if kept:
        warnings.append(f"{len(kept)} module(s) already at or below the target rank kept unchanged: {listed(kept)}")
    if isinstance(rule, RankMap) and (idle := [p for p, _ in rule.rules if not any(re.search(p, n) for n in modules)]):
        # a typo in a pattern would otherwise change nothing, silently
        warnings.append(f"rank map entr{'y' if len(idle) == 1 else 'ies'} {listed(map(repr, idle))} matched no "
                        "module")
    if bigger := [r.name for r in reports if r.algo != "lora" and r.params_after > r.params_before]:
        warnings.append(f"{len(bigger)} LoHa/LoKr/full module(s) became LoRA modules with more parameters than "
                        f"before ({listed(bigger)}); a lower rank keeps them smaller")
    became = Counter(m.algo for m in modules.values() if m.algo != "lora")
    if became:
        warnings.append(", ".join(f"{c} {a}" for a, c in sorted(became.items())) + " module(s) became LoRA modules: "
                        "a LoHa/LoKr/full update cannot keep its kind at a chosen rank")
    dora = [n for n, m in modules.items() if m.dora]
    if dora:
        warnings.append(
            f"{len(dora)} DoRA module(s): the magnitude vectors were trained against W + ΔW and are kept as they "
            "are, so the merged weights change by more than the LoRA truncation error reported here"
        )
    out = {n: out[n] for n in modules}  # the input's order (batches finish in theirs)
    reports.sort(key=lambda r, at={n: i for i, n in enumerate(modules)}: at[parent(r.name)])
    return adapter.with_modules(out, source=adapter.source), SqueezeReport(tuple(reports), method, tuple(warnings))


def _batches_on(device: torch.device) -> bool:
    """Whether `squeeze` takes same-shaped modules in batches: on a GPU, where one module's kernels (a QR of
    out × r, an r × r SVD) are too small to fill the device and each wait for a result stalls it; on the CPU one
    module per thread already runs at BLAS speed."""
    return device.type == "cuda"


def _batch_key(m) -> tuple | None:
    """(batch key, float32 bytes of its exact pair or SVD) of a LoRA, LoHa or LoKr module — equal keys: equal
    kinds, tensor shapes, scale and dtype, so they stack into one batch — else None."""
    if m.algo not in ("lora", "loha", "lokr") or m.kind == "experts":
        return None
    parts = {"A": m.A, "B": m.B} if m.algo == "lora" else m.tensors
    width = parts["w1_b"].shape[0] * parts["w2_b"].shape[0] if m.algo == "loha" else m.rank  # LoKr: r₁·r₂
    key = (m.algo, m.scale, m.dtype, tuple((k, tuple(t.shape)) for k, t in sorted(parts.items())))
    return key, 4 * width * (m.out_features + m.in_features)


def _stacked_pairs(ms: list, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-shaped modules' exact LoRA pairs (`lowrank`), stacked: B (n, out, r), A (n, r, in)."""
    pairs = [m.lowrank(dtype, device) for m in ms]
    return torch.stack([b for b, _ in pairs]), torch.stack([a for _, a in pairs])


def _batch_svd(ms: list, dtype: torch.dtype, device) -> tuple[torch.Tensor, Callable] | None:
    """The exact factorization of same-shaped modules' ΔW (`_batches`): (their spectra S (n, t), factors(at, k,
    scale) → the rank-k pairs B' (len(at), out, k'), A' (len(at), k', in) of the modules at indices `at`) — LoKr from
    its halves' batched SVDs (`_lokr_svds`), LoRA/LoHa from one batched core SVD of their stacked exact pairs. None
    where a factor holds NaN/Inf (the one-module path names the module)."""
    if ms[0].algo == "lokr":
        fact = _lokr_svds(ms, dtype, device)  # (n, out, K), (n, K), (n, K, in)
        return fact.S, lambda at, k, s: split_factors(SVD(*(t[at] for t in fact)), k, s)
    B, A = _stacked_pairs(ms, dtype, device)
    try:
        core = core_svd(B, A, ms[0].scale)
    except FloatingPointError:
        return None

    def factors(at: list[int], k: int, s: float):
        sub = core if len(at) == len(ms) else CoreSVD(*(t[at] for t in core[:5]), core.scale)
        return core_factors(B[at], A[at], sub, k, s)

    return core.S, factors


def _lokr_svds(ms: list, dtype: torch.dtype, device) -> SVD:
    """The exact SVDs of same-shaped LoKr modules' ΔW (`LokrModule.svd`, batched): U (n, out, K), S (n, K),
    Vh (n, K, in)."""
    halves = [m.halves(dtype, device) for m in ms]  # [((B₁, A₁), (B₂, A₂)), …]

    def stacked(i: int, j: int) -> torch.Tensor | None:
        parts = [h[i][j] for h in halves]
        return None if parts[0] is None else torch.stack(parts)

    return lokr_svd((stacked(0, 0), stacked(0, 1)), (stacked(1, 0), stacked(1, 1)), ms[0].scale)


def _batches(modules: Mapping, batchable: Callable, device: torch.device) -> dict[str, list[str]]:
    """{first module: the modules computed with it}: on a GPU (`_batches_on`), modules with equal keys from
    `batchable(name, m)` → (key, bytes) or None together, at most `BATCH_BYTES` a batch; the others alone."""
    if not _batches_on(device):
        return {n: [n] for n in modules}
    units: dict[str, list[str]] = {}
    open_: dict = {}  # key → (first module, bytes so far)
    for name, m in modules.items():
        kb = batchable(name, m)
        if kb is None:
            units[name] = [name]
            continue
        k, size = kb
        first, used = open_.get(k, (None, 0))
        if first is None or used + size > BATCH_BYTES:
            first, used = name, 0
            units[first] = []
        units[first].append(name)
        open_[k] = (first, used + size)
    return units


def parent(name: str) -> str:
    """The module a report's name belongs to: `…experts.down_proj[3]` (expert 3) → `…experts.down_proj`."""
    return name.rsplit("[", 1)[0] if name.endswith("]") else name


def _report(name: str, m: LoraModule, S: torch.Tensor, k: int, rsvd=None) -> ModuleReport:
    """Errors from the spectrum S (exact: it is complete) or, for rsvd = (B, A, its SVD), from the rank-(r+k)
    residual `[sB | −U_kΣ_k] [A; Vh_k]` through Gram matrices in float64, which avoids ‖ΔW‖² − ‖ΔW_k‖²
    cancellation."""
    s2 = S.double().square().cpu()
    kept = float(s2[:k].sum())
    if rsvd is None:
        dropped, total = float(s2[k:].sum()), float(s2.sum())
    else:
        B, A, svd = rsvd
        total = lowrank_frobenius_sq(B, A, m.scale)
        k_ = min(k, svd.S.numel())
        U, S, Vh = (t.double() for t in svd)
        dropped = lowrank_frobenius_sq(torch.cat([m.scale * B.double(), -U[:, :k_] * S[:k_]], 1),
                                       torch.cat([A.double(), Vh[:k_]], 0))
    return ModuleReport(
        name=name, kind=m.kind, shape=(m.out_features, m.in_features), old_rank=m.rank, new_rank=k,
        energy_kept=kept / total if total > 0 else 1.0,
        rel_error=math.sqrt(dropped / total) if total > 0 else 0.0, norm=math.sqrt(total),
        params_before=m.num_params(), params_after=m.num_params(k), dora=m.dora, algo=m.algo,
    )
