"""Several adapters into one (methods.md §5): an exact weighted sum in the factors' own space, or PEFT's
sparsifying merges (TIES, DARE, magnitude pruning) on each module's dense deltas, then any squeeze rank rule.

`combine(adapters, weights, rule, method)` is a pure function → (Adapter, CombineReport), streamed module by
module: `sum` stacks `[w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]` (rank Σrᵢ, nothing lost) and truncates it with the
QR-core SVD of the stacked factors; the sparsifying methods hold one module's dense deltas at a time.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch

from .adapter import (PEFT_PREFIX, Adapter, DiffModule, ExpertsModule, LoraModule, adapter_list, check_scaled,
                      check_weights, materialize, pack_experts)
from .device import resolve_device, seeded, storage_dtype
from .errors import SurgeryError
from .linalg import all_finite
from .rank import Exact, RankRule
from .squeeze import SqueezeReport, parent, squeeze

METHODS = ("sum", "ties", "dare-linear", "dare-ties", "magnitude-prune")
SIGNS = ("total", "frequency")


@dataclass(frozen=True)
class CombineModuleReport:
    name: str
    input_ranks: tuple[int | None, ...]  # per input; None where the input lacks the module (a zero update)
    new_rank: int
    energy_kept: float  # of the combination ‖ΔW‖² kept by the output's rank
    rel_error: float  # ‖ΔW_out − ΔW_combination‖_F / ‖ΔW_combination‖_F
    kept_fraction: float | None  # sparsifying methods: the fraction of the inputs' entries kept by the pruning


@dataclass(frozen=True)
class CombineReport:
    modules: tuple[CombineModuleReport, ...]
    method: str
    weights: tuple[float, ...]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"method": self.method, "weights": list(self.weights), "warnings": list(self.warnings),
                "modules": [m.__dict__ | {"input_ranks": list(m.input_ranks)} for m in self.modules]}


class _Lazy:
    """A tensor made on `load()` (a stacked factor), shaped and typed in advance, like a TensorRef."""

    def __init__(self, make: Callable[[], torch.Tensor], shape, dtype):
        self.make, self.shape, self.dtype = make, tuple(shape), dtype

    def load(self) -> torch.Tensor:
        return self.make()

    def numel(self) -> int:
        return math.prod(self.shape)


def width(m) -> int:
    """Columns of a module's exact LoRA form: its rank, r₁·r₂ for a LoHa's face-splitting pair."""
    if m.algo == "loha":
        return int(m.tensors["w1_b"].shape[0]) * int(m.tensors["w2_b"].shape[0])
    return m.rank


def exact_pair(m, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, width), A (width, in_flat)) with ΔW = B @ A exactly, the scale folded in: LoRA's factors,
    LoHa's face-splitting pair, else the leading `width` triplets of the module's exact SVD (LoKr, diff, TeRA),
    zero-padded where the spectrum is shorter."""
    pair = m.lowrank(dtype, device)
    if pair is not None:
        return pair[0] * m.scale, pair[1]
    U, S, Vh = m.svd(dtype, device)
    k = width(m)
    B, A = (U * S)[:, :k], Vh[:k]
    return torch.nn.functional.pad(B, (0, k - B.shape[1])), torch.nn.functional.pad(A, (0, 0, 0, k - A.shape[0]))


def _stored_pair(m, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, scale) with ΔW = scale · B @ A: a LoRA's factors in their stored dtype (not converted yet), else
    `exact_pair` in float32 with scale 1."""
    if m.algo == "lora":
        return (*m.factors(m.dtype, device), m.scale)
    return (*exact_pair(m, torch.float32, device), 1.0)


def bias_sum(present) -> torch.Tensor | None:
    """Σ wᵢ sᵢ bᵢ (float32) of the modules' bias parts — PEFT's `lora_B.bias`, LyCORIS's `diff_b` — which add
    to the base layer's bias linearly; None when no module has one."""
    parts = [(m, w) for m, w in present if m.bias is not None]
    if not parts:
        return None
    return sum(w * m.scale * materialize(m.bias).float() for m, w in parts)


def _check(adapters: Sequence[Adapter], weights, method, density, majority_sign):
    if len(adapters) < 2:
        raise SurgeryError("combine needs at least two adapters")
    if len(weights) != len(adapters):
        raise SurgeryError(f"{len(weights)} weights for {len(adapters)} adapters")
    if method not in METHODS:
        raise SurgeryError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "sum" and density is not None:
        raise SurgeryError("--density goes with ties, dare-linear, dare-ties and magnitude-prune")
    if method != "sum" and (density is None or not 0 < density <= 1):
        raise SurgeryError(f"method {method} needs a density in (0, 1], got {density}")
    if majority_sign not in SIGNS:
        raise SurgeryError(f"majority sign must be total or frequency, got {majority_sign!r}")
    naming = {a.format if a.format in ("kohya", "diffusers") else "peft" for a in adapters}
    if len(naming) > 1:
        raise SurgeryError(f"the adapters use different namings ({' and '.join(sorted(naming))}); give --base MODEL "
                           "to resolve them all against the base's weights")
    for a in adapters:
        a.check_plain("combine")
        if dora := [n for n, m in a.modules.items() if m.dora]:
            raise SurgeryError(f"{a.source}: DoRA module {dora[0]}: its magnitude rescales W + ΔW, so DoRA adapters "
                               "cannot be combined linearly")
        for n, m in a.modules.items() if method != "sum" else ():
            if m.bias is not None:
                raise SurgeryError(f"{a.source}: module {n} has a bias part (lora_B.bias / diff_b), which "
                                   f"{method} has no rule for; combine it with --method sum")
            if m.kind == "experts":
                raise SurgeryError(f"{a.source}: expert parameter {n}: {method} has no per-expert form in "
                                   "surgery; combine expert adapters with --method sum")
        if replaced := [k for k in a.passthrough if not _BASE_COPY.search(k)]:
            raise SurgeryError(f"{a.source}: carries non-LoRA tensors ({replaced[0]}, e.g. modules_to_save), "
                               "which replace base tensors and cannot be weighted")
    fans = {bool(a.config.get("fan_in_fan_out")) for a in adapters}
    if len(fans) > 1:
        raise SurgeryError("the adapters disagree on fan_in_fan_out")


# the base's own table that PEFT's save_embedding_layers stores beside a LoRA on an embedding or head
_BASE_COPY = re.compile(r"\.(base_layer|original_module)\.weight$")


def _base_copies(adapters: Sequence[Adapter]) -> dict:
    """The `save_embedding_layers` copies of base tables the inputs carry (PEFT loads them over the base's own),
    one per key; inputs that carry different copies (vocabularies resized apart) are refused."""
    out: dict = {}
    for a in adapters:
        for key, t in a.passthrough.items():
            t = materialize(t)
            if key in out and (out[key][1].shape != t.shape or not torch.equal(out[key][1], t)):
                raise SurgeryError(f"{a.source}: its copy of the base's {key} differs from {out[key][0]}'s "
                                   "(vocabularies resized apart?), so one combined adapter cannot carry both")
            out.setdefault(key, (a.source, t))
    return {k: t for k, (_, t) in out.items()}


def _shapes(adapters: Sequence[Adapter]) -> dict[str, tuple]:
    """{module: (kind, ΔW shape)} over every input, in first-seen order; the same module must agree."""
    seen: dict[str, tuple] = {}
    for a in adapters:
        for name, m in a.modules.items():
            key = (m.kind, tuple(m.shape)) if m.kind == "experts" else \
                ("embedding" if m.kind == "embedding" else "weight", (m.out_features, m.in_features))
            if name in seen and seen[name][:2] != key:
                raise SurgeryError(f"{a.source}: module {name} has ΔW {list(key[1])} ({key[0]}) but an earlier "
                                   f"adapter's is {list(seen[name][1])} ({seen[name][0]}): made for another model?")
            seen.setdefault(name, key + (m,))
    return seen


def on_base_names(adapters: Sequence[Adapter], base) -> list[Adapter]:
    """Each adapter with its modules renamed to the base weights they update, as `merge` resolves them —
    diffusers names (`unet.<path>`) for a pipeline or component folder, PEFT's (`base_model.model.<path>`)
    otherwise — so kohya, PEFT and diffusers adapters of one model share one naming. With a GGUF input or base,
    llama.cpp's naming (`gguf_file.to_gguf`)."""
    from .io.gguf_file import is_gguf
    from .io.names import base_targets, on_base

    if is_gguf(base) or any(a.format == "gguf" for a in adapters):
        return [on_base(a, base, "gguf") for a in adapters]
    fmt = "diffusers" if all(c is not None for c, _ in base_targets(base)) else "peft"
    return [on_base(a, base, fmt) for a in adapters]


def module_weights(name: str, weights: Sequence[float], weight_map: Sequence[tuple[str, float]]) -> list[float]:
    """The inputs' weights for one module, times the first `weight_map` factor whose regex searches the name."""
    factor = next((w for pattern, w in weight_map if re.search(pattern, name)), 1.0)
    return [w * factor for w in weights]


def sparsify(deltas: torch.Tensor, weights: torch.Tensor, method: str, density: float, majority_sign: str,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """PEFT's `peft.utils.merge_utils` on stacked dense deltas (n, out, in) → (merged (out, in), kept fraction).

    magnitude-prune: each delta keeps its int(density·numel) largest |entries|, then Σ wᵢΔᵢ; ties: that pruning,
    the sign elected per entry from the pruned unweighted deltas (sum, or sign count), the weighted mean over the
    agreeing inputs; dare-linear: Bernoulli(density) masks from `generator`, rescaled by 1/density, then Σ wᵢΔᵢ;
    dare-ties: DARE masks with the TIES election. density 1 prunes nothing, as PEFT's.
    """
    if density < 1:
        if method in ("ties", "magnitude-prune"):
            flat = deltas.reshape(len(deltas), -1)
            k = int(density * flat.shape[1])
            mask = torch.zeros_like(flat)
            mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
            deltas = (flat * mask).reshape(deltas.shape)
        else:
            keep = torch.bernoulli(torch.full(deltas.shape, density, dtype=torch.float64), generator=generator)
            deltas = deltas * keep.to(deltas) / density
    kept = float((deltas != 0).sum()) / max(1, deltas.numel())
    w = weights.reshape((-1,) + (1,) * (deltas.dim() - 1)).to(deltas)
    if method in ("ties", "dare-ties"):
        sign = deltas.sign()
        votes = deltas.sum(0) if majority_sign == "total" else sign.sum(0)
        agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(deltas)
        return (deltas * w * agree).sum(0) / agree.sum(0).clamp(min=1), kept
    return (deltas * w).sum(0), kept


def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, rule: RankRule | None = None, *,
            method: str = "sum", density: float | None = None, majority_sign: str = "total",
            weight_map: Sequence[tuple[str, float]] = (), seed: int = 0, device: str | torch.device = "auto",
            base: str | None = None,
            dtype: str | torch.dtype | None = None, progress: Callable[[str], None] | None = None,
            ) -> tuple[Adapter, CombineReport]:
    """One adapter holding the combination of `adapters` (weights default to 1; negative ones subtract).

    rule None keeps the exact combination (sum: rank Σrᵢ; the sparsifying methods: each result's numerical
    rank); a rule truncates it optimally. A module missing from an input is a zero update there. `base`: names
    resolved against that checkpoint's weights (PEFT naming), so kohya and PEFT inputs mix. The output
    has the first input's format (a TeRA first input gives a PEFT LoRA) and names; factors are stored in
    `dtype` (default: the first input's factor dtype), computed in float32.
    """
    adapters = adapter_list(adapters, "combine")
    weights = [1.0] * len(adapters) if weights is None else check_weights(weights, "weights")
    if base is not None:
        adapters = on_base_names(adapters, base)
    _check(adapters, weights, method, density, majority_sign)
    shapes, dev = _shapes(adapters), resolve_device(device)
    store = storage_dtype(dtype) or next(iter(adapters[0].modules.values())).dtype
    modules, kept = {}, {}
    for name, (kind, shape, _) in shapes.items():
        out_f, in_f = shape[-2:]
        present = [(a.modules[name], w) for a, w in zip(adapters, module_weights(name, weights, weight_map))
                   if name in a.modules]
        for m, w in present:
            check_scaled(name, m, w)
        if kind == "experts":
            modules[name] = _stacked_experts(name, present, dev)
        elif method == "sum":  # [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …], made once when squeeze reads the module
            held: dict = {}

            def stacked(part, present=present, held=held):
                if part not in held:  # the first of the two reads makes both; each is handed out once
                    pairs = [_stored_pair(m, dev) for m, _ in present]
                    # concatenated as stored, converted once, each input's w·s on its columns: one pass each
                    cols = torch.cat([torch.full((B.shape[1],), w * s, dtype=torch.float32, device=dev)
                                      for (B, _, s), (_, w) in zip(pairs, present)])
                    held["B"] = torch.cat([B for B, _, _ in pairs], 1).to(torch.float32).mul_(cols)
                    held["A"] = torch.cat([A for _, A, _ in pairs], 0).to(torch.float32)
                return held.pop(part)

            r = sum(width(m) for m, _ in present)
            modules[name] = LoraModule(A=_Lazy(lambda s=stacked: s("A"), (r, in_f), torch.float32),
                                       B=_Lazy(lambda s=stacked: s("B"), (out_f, r), torch.float32), scale=1.0,
                                       kind=kind if kind == "embedding" else "linear", bias=bias_sum(present))
        else:  # one module's dense deltas at a time, when squeeze reads it; the result is a full update
            def merged(name=name, present=present):
                D = torch.stack([m.delta(torch.float32, dev) for m, _ in present])
                out, kept[name] = sparsify(D, torch.tensor([w for _, w in present], dtype=torch.float64), method,
                                           density, majority_sign, seeded(seed, name))
                if not all_finite(out):  # DARE's 1/density rescaling past float32's range
                    raise SurgeryError(f"module {name}: the {method} result overflows float32 (density {density:g})")
                return out
            modules[name] = DiffModule({"diff": _Lazy(merged, (out_f, in_f), torch.float32)})
        if progress:
            progress(name)
    first = adapters[0]
    exact = first.with_modules(modules, format="peft" if first.format == "tera" else first.format,
                               config=_config(adapters, modules), passthrough=_base_copies(adapters), source=None,
                               notes=())
    small, rep = squeeze(exact, rule or Exact(), device=dev, dtype=store)
    small = small.with_modules({n: _shaped(m, shapes[n], store) for n, m in small.modules.items()})
    reports = tuple(CombineModuleReport(
        name=r.name, input_ranks=tuple(a.modules[parent(r.name)].rank if parent(r.name) in a.modules else None
                                       for a in adapters),
        new_rank=r.new_rank, energy_kept=r.energy_kept, rel_error=r.rel_error, kept_fraction=kept.get(r.name))
        for r in rep.modules)
    notes = [n for a in adapters for n in a.notes]
    return small, CombineReport(reports, method, tuple(weights), tuple(notes + _warnings(rep)))


def _stacked_experts(name: str, present, dev) -> ExpertsModule:
    """Per expert `[w₁s₁B₁ₑ | w₂s₂B₂ₑ | …] · [A₁ₑ; A₂ₑ; …]` (rank Σrᵢ, exact), stacked in PEFT's layout when
    squeeze reads it."""
    like = present[0][0]
    if other := next((m for m, _ in present if m.nesting != like.nesting), None):
        raise SurgeryError(f"expert parameter {name}: the adapters target different parameters on its module "
                           f"({', '.join(like.nesting)} vs {', '.join(other.nesting)}), which PEFT nests differently")
    r, E = sum(m.rank for m, _ in present), like.experts
    held: dict = {}

    def stacked(part):
        if part not in held:
            pairs = [m.stacked(torch.float32, dev) for m, _ in present]
            held["B"], held["A"] = pack_experts(torch.cat([w * m.scale * B for (B, _), (m, w) in zip(pairs, present)], 2),
                                                torch.cat([A for _, A in pairs], 1))
        return held.pop(part)

    return ExpertsModule(A=_Lazy(lambda: stacked("A"), (r * E, like.in_features), torch.float32),
                         B=_Lazy(lambda: stacked("B"), (like.out_features, r * E), torch.float32), scale=1.0,
                         experts=E, nesting=like.nesting)


def _shaped(m: LoraModule, seen: tuple, dtype: torch.dtype) -> LoraModule:
    """A combined module in its first input's layout: a conv LoRA where that input states the kernel; its
    summed bias stored in `dtype`."""
    kind, _, like = seen
    if m.bias is not None:
        m = replace(m, bias=materialize(m.bias).to(dtype))
    if kind == "embedding":
        return LoraModule(A=m.A, B=m.B, scale=m.scale, kind="embedding")
    if like.kind != "conv" or len(like.shape) < 3:
        return m
    k = m.rank
    return LoraModule(A=materialize(m.A).reshape((k,) + tuple(like.shape[1:])),
                      B=materialize(m.B).reshape((m.out_features, k) + (1,) * (len(like.shape) - 2)),
                      scale=m.scale, kind="conv", bias=m.bias)


def _config(adapters: Sequence[Adapter], modules: Mapping) -> dict:
    """The first PEFT input's config, targeting exactly the combined modules (every input's placement)."""
    config = next((dict(a.config) for a in adapters if a.config and a.format != "tera"), {})
    placement = ("layers_to_transform", "layers_pattern", "exclude_modules", "rank_pattern", "alpha_pattern")
    if adapters[0].format == "diffusers":  # component-prefixed: the writer targets each component's modules
        return {k: v for k, v in config.items() if k.split(".", 1)[-1] not in placement + ("target_modules",)}
    for key in placement:
        config.pop(key, None)
    if adapters[0].format != "kohya":
        config["target_modules"] = sorted(n.removeprefix(PEFT_PREFIX) for n, m in modules.items()
                                          if m.kind != "experts")
    return config


def _warnings(rep: SqueezeReport) -> list[str]:
    return [w for w in rep.warnings if "became LoRA" not in w]
