"""Extracting a LoRA from a fine-tuned model: each targeted weight's delta `W_ft − W_base` compressed by a
seeded randomized SVD (a dense delta is full-rank, so the exact QR-core SVD of squeeze does not apply).

The error figures are exact: ‖D‖ and the residual ‖D − U_kΣ_kV_kᵀ‖ are computed from the dense delta itself.
"""
from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .adapter import Adapter, ExpertsModule, LoraModule, TensorRef, experts_module
from .device import Scratch, per_module, resolve_device, seeded, storage_dtype
from .errors import SurgeryError, listed, regex
from .io import experts as expert_layout
from .io import hub
from .io.checkpoint import TensorSpec, is_pipeline, open_checkpoint, open_pipeline, read_tensor
from .io.loaded import Loaded, how_loaded
from .io.names import component_name, resized_table
from .io.peft import PREFIX
from .linalg import all_finite, randomized_svd, split_factors, sum_squares
from .rank import Budget, Energy, FixedRank, RankRule, budget_ranks, check_rule, numerical_rank

EMBEDDING = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings)")


@dataclass(frozen=True)
class ExtractedModule:
    name: str
    shape: tuple[int, int]
    rank: int
    energy_kept: float  # ‖D_k‖² / ‖D‖²
    rel_error: float  # ‖D − D_k‖_F / ‖D‖_F
    params: int


@dataclass(frozen=True)
class ExtractReport:
    modules: tuple[ExtractedModule, ...]
    unchanged: tuple[str, ...]  # targeted tensors identical in both models
    mismatched: tuple[str, ...]  # "name: shape a vs b" (e.g. a resized vocabulary): reported, not extracted
    untargeted_changed: tuple[str, ...]  # tensors that differ but are not in the adapter (norms, biases, …)
    warnings: tuple[str, ...] = ()
    finetuned: str = ""  # ΔW = finetuned − base, as the user named them (swapped, the file holds −ΔW)
    base: str = ""
    carried: tuple[str, ...] = ()  # carry_changed: changed tensors the adapter holds beside its LoRA modules

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def to_dict(self) -> dict:
        return {"modules": [m.__dict__ | {"shape": list(m.shape)} for m in self.modules], "params": self.params,
                "unchanged": list(self.unchanged), "mismatched": list(self.mismatched),
                "untargeted_changed": list(self.untargeted_changed), "carried": list(self.carried),
                "warnings": list(self.warnings)}


def _target_modules(modules: list[str], base_names) -> list[str] | str:
    """Leaf names (as mergekit writes) when they select exactly the extracted modules, else an exact regex."""
    paths = [m[len(PREFIX):] for m in modules]
    leaves = sorted({p.split(".")[-1] for p in paths})
    selected = {n[: -len(".weight")] for n in base_names if n.endswith(".weight")
                and n[: -len(".weight")].split(".")[-1] in leaves}
    if selected == set(paths):
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


def _pairs(finetuned, base) -> dict[str, tuple[TensorSpec, TensorSpec | None]]:
    """{tensor name: (fine-tuned spec, base spec or None)} of two checkpoints, or of two diffusers pipelines
    component by component (names `<component>.<tensor>`, for the components both hold)."""
    if is_pipeline(finetuned) != is_pipeline(base):
        raise SurgeryError(f"{finetuned if is_pipeline(finetuned) else base}: a diffusers pipeline, and the other model "
                           "is not; give two pipelines or two component folders")
    if not is_pipeline(finetuned):
        ft, bs = open_checkpoint(finetuned), open_checkpoint(base)
        return {n: (s, bs.tensors.get(n)) for n, s in ft.tensors.items()}
    ft, bs = open_pipeline(finetuned).components, open_pipeline(base).components
    return {f"{c}.{n}": (s, bs[c].tensors.get(n)) for c in ft if c in bs for n, s in ft[c].tensors.items()}


def _extractable(shape, explicit: bool) -> bool:
    """2-D weights and 1×1 convs (linear maps) by default; other conv kernels when `--targets` names them."""
    return len(shape) == 2 or len(shape) == 4 and (explicit or tuple(shape[2:]) == (1, 1))


def _svd(D: torch.Tensor, width: int, seed: int, name: str):
    return randomized_svd(lambda X: D @ X, lambda Y: D.T @ Y, tuple(D.shape), width, generator=seeded(seed, name),
                          dtype=D.dtype, device=D.device)


def _expert_tensors(base, pairs, pattern) -> dict:
    """{`<parameter>[e]`: (Param, e, its on-disk (key, Piece) …)} of the base's expert parameters that both
    models hold (surgery.io.experts; looked for where a tensor name says `experts` and the base has the
    config.json that says its model type)."""
    if not any(".experts." in n for n in pairs):
        return {}
    ck = open_checkpoint(base)
    if not ck.config_path.exists():
        return {}
    lay = expert_layout.layout(ck)
    out = {}
    for path, pieces in lay.pieces.items():
        if any(pairs.get(k, (None, None))[1] is None or tuple(pairs[k][0].shape) != tuple(pairs[k][1].shape)
               for k, _ in pieces):
            continue  # reported as mismatched by the caller's per-tensor checks
        if pattern is not None and not any(pattern.search(n) for n in [path] + [k for k, _ in pieces]):
            continue
        param = lay.params[path]
        for e in range(param.shape[0]):
            out[f"{path}[{e}]"] = (param, e, tuple((k, p) for k, p in pieces if p.expert in (None, e)))
    return out


def _expert_modules(experts: dict, found: dict, dtype: torch.dtype | None, pairs) -> dict[str, ExpertsModule]:
    """Each expert parameter's extracted experts as one ExpertsModule (scale 1; an unchanged expert is a zero
    update; ranks padded to the parameter's largest)."""
    params: dict[str, list] = {}
    for name, (param, e, pieces) in experts.items():
        params.setdefault(param.path, []).append((name, param, e, pieces))
    out = {}
    for path, items in params.items():
        if not any(n in found for n, *_ in items):
            continue
        param = items[0][1]
        out_f, in_f = param.delta_shape[1:]
        store = dtype if dtype is not None else pairs[items[0][3][0][0]][0].torch_dtype
        Bs = [found[n][0] if n in found else torch.zeros(out_f, 1) for n, *_ in items]
        As = [found[n][1] if n in found else torch.zeros(1, in_f) for n, *_ in items]
        owner = path.rsplit(".", 1)[0]
        nesting = tuple(p for p in param.nesting if f"{owner}.{p}" in params)
        out[PREFIX + path] = experts_module(nesting, Bs, As, 1.0, store)
    return out


def extract(finetuned: str | Path, base: str | Path, rule: RankRule, *, targets: str | None = None,
            max_rank: int = 128, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
            seed: int = 0, carry_changed: bool = False,
            progress: Callable[[str], None] | None = None) -> tuple[Adapter, ExtractReport]:
    """A PEFT LoRA (scale 1: lora_alpha = r per module) approximating `finetuned − base` on the targeted weights:
    by default every 2-D `.weight` but embeddings and every 1×1 conv; `targets`, a regex searched in tensor names,
    may also name embeddings and conv kernels of any size. Two diffusers pipelines give a diffusers pipeline LoRA
    over the components both hold (names, and what `targets` matches, are `<component>.…`).

    rule: FixedRank(k), Energy(τ) (smallest k ≤ max_rank with ‖D_k‖² ≥ τ‖D‖²) or Budget(P) over ranks ≤ max_rank.
    carry_changed: the changed norms and biases too, as PEFT loads them (`_carry`): PEFT then reproduces them,
    but loaders that read only LoRA modules (vLLM, llama.cpp) refuse such an adapter.
    """
    check_rule(rule, (FixedRank, Energy, Budget))
    if max_rank <= 0:  # the rule checks itself (surgery.rank)
        raise SurgeryError(f"--max-rank must be at least 1, got {max_rank}")
    dev, sdtype = resolve_device(device), storage_dtype(dtype)
    finetuned, base = hub.resolve(finetuned), hub.resolve(base)
    pattern = regex(targets, "--targets") if targets else None
    pipeline = is_pipeline(finetuned)
    pairs = _pairs(finetuned, base)  # tensor name (component-prefixed in a pipeline) → (fine-tuned, base) specs
    ck = None if pipeline else open_checkpoint(base)
    if carry_changed and (pipeline or component_name(ck) is not None):
        raise SurgeryError(f"{base}: --carry-changed writes tensors PEFT places in a transformers model; diffusers' "
                           "LoRA loaders are not made to place them, so a diffusion model's are not carried")
    experts = {} if pipeline else _expert_tensors(base, pairs, pattern)  # `param[e]` → (Param, e, (key, Piece) …)
    chosen, mismatched, untargeted, tables, carried = [], [], [], {}, []
    how = Loaded() if pipeline else how_loaded(ck)  # modules named as PEFT saves them
    loaded = how.loaded_name
    in_experts = {key for _, _, pieces in experts.values() for key, _ in pieces}
    for name, (spec, other) in pairs.items():
        if name in in_experts:
            continue
        targeted = (pattern.search(name) if pattern else not EMBEDDING.search(name)) and name.endswith(".weight") \
            and _extractable(spec.shape, explicit=pattern is not None) and spec.torch_dtype.is_floating_point
        if other is None:
            if targeted:
                mismatched.append(f"{name}: missing from the base")
            continue
        if tuple(other.shape) != tuple(spec.shape):
            if not pipeline and resized_table(name, spec.shape, other.shape) and spec.codec is None:
                tables[name] = spec
            else:
                mismatched.append(f"{name}: shape {list(spec.shape)} vs base {list(other.shape)}")
        elif targeted:
            chosen.append(name)
        elif spec.torch_dtype.is_floating_point and not torch.equal(read_tensor(spec), read_tensor(other)):
            untargeted.append(name)
    chosen += list(experts)
    if not chosen:
        raise SurgeryError(f"{finetuned}: no tensor to extract (targets {targets or 'default'} matched nothing "
                           "of the same shape in both models)")
    small = [n for n in chosen if n not in experts and isinstance(rule, FixedRank)  # from the headers
             and rule.rank > min(pairs[n][0].shape[0], math.prod(pairs[n][0].shape[1:]))]

    local = threading.local()  # each worker's reused buffers

    def delta(name: str) -> torch.Tensor:
        if name in experts:  # one expert's ΔW (out, in), assembled from its on-disk tensors
            param, e, pieces = experts[name]
            d = torch.zeros(param.shape[1:], dtype=torch.float32, device=dev)
            for key, piece in pieces:
                part = delta(key) if piece.expert is not None else delta(key)[e]
                d.narrow(piece.dim, piece.start, part.shape[piece.dim]).copy_(part)
            return d.T if param.transposed else d
        ft, bs = pairs[name]  # read into reused buffers (fresh weight-sized tensors cost page faults): d lives
        scratch = local.__dict__.setdefault("scratch", Scratch(dev))  # until the worker's next call
        d = scratch.get("d", ft.shape, torch.float32, dev)
        d.copy_(read_tensor(ft, scratch.get("read", (ft.nbytes,), torch.uint8)))
        d.sub_(scratch.get("b", bs.shape, torch.float32, dev).copy_(
            read_tensor(bs, scratch.get("read", (bs.nbytes,), torch.uint8))))
        if not all_finite(d):
            for spec in (ft, bs):  # which model is broken
                if not all_finite(read_tensor(spec)):
                    raise SurgeryError(f"{spec.path}: tensor {spec.name} holds NaN or Inf")
            raise SurgeryError(f"{name}: the delta overflows float32")
        if d.dim() == 3:  # a fused expert tensor, cut by the caller
            return d
        # PEFT embedding LoRA: B @ A = ΔWᵀ; a Conv1D stores (in, out); a conv (out, in·k)
        return d.T if EMBEDDING.search(name) or name.removesuffix(".weight") in how.transposed else d.flatten(1)

    # tensors run in parallel, each single-threaded (same bytes whatever the thread count), as many at once as a
    # quarter of the memory holds their buffers (≤ 12 bytes per element of the largest: two float32 copies + read)
    largest = max(math.prod(pairs[k][0].shape)
                  for n in chosen for k in ([p for p, _ in experts[n][2]] if n in experts else [n]))
    workers = max(1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // (12 * max(largest, 1)))
    names = dict.fromkeys(chosen)

    ranks: dict[str, int] = {}
    if isinstance(rule, Budget):
        def spectrum(name, _):
            d = delta(name)
            return _svd(d, min(max_rank, *d.shape), seed, name).S.double().cpu(), sum(d.shape)

        found = dict(zip(chosen, per_module(spectrum, names, dev, workers)))
        spectra, cost = {n: S for n, (S, _) in found.items()}, {n: c for n, (_, c) in found.items()}
        nonzero = {n: S for n, S in spectra.items() if float(S[0]) > 0}
        ranks = budget_ranks(nonzero, {n: cost[n] for n in nonzero}, rule.params)

    def one(name: str, _) -> tuple[ExtractedModule, torch.Tensor, torch.Tensor, list[str]] | None:
        """The tensor's report, factors B (out, k), A (k, in) on the CPU and warnings; None if unchanged."""
        d, notes = delta(name), []
        total = sum_squares(d)
        if total == 0.0:
            return None
        cap = min(max_rank if not isinstance(rule, FixedRank) else rule.rank, *d.shape)
        svd = _svd(d, ranks.get(name, cap), seed, name)
        if isinstance(rule, FixedRank):
            k = min(rule.rank, cap)
        elif isinstance(rule, Budget):
            k = ranks[name]
        elif rule.threshold >= 1:  # all the energy: the full numerical rank (rounding never reaches Σσ² = ‖D‖²)
            S = svd.S.double().cpu()
            k, captured = max(1, numerical_rank(S, d.shape)), float(S.square().sum())
            if k == len(S) and len(S) < min(d.shape) and captured < total * (1 - 1e-5):
                notes.append(f"{name}: its numerical rank exceeds --max-rank {max_rank} "
                             f"(kept {captured / total:.4f} of the energy)")
        else:  # energy against the true ‖D‖², not the captured part
            cum = torch.cumsum(svd.S.double().square().cpu(), 0)
            k = int((cum < rule.threshold * total * (1 - 1e-12)).sum()) + 1
            if k > len(cum):
                k = len(cum)
                notes.append(f"{name}: energy {rule.threshold} not reached within --max-rank {max_rank} "
                             f"(kept {float(cum[-1]) / total:.4f})")
        B, A = split_factors(svd, k)
        # the residual of these factors, formed in place (d is not needed afterwards): float32 entries, float64 sum
        resid = sum_squares(d.addmm_(B, A, alpha=-1))
        report = ExtractedModule(name, tuple(d.shape), k, float(svd.S[:k].double().square().sum()) / total,
                                 math.sqrt(resid / total), k * sum(d.shape))
        return report, B.cpu(), A.cpu(), notes

    modules, reports, unchanged, warnings, found = {}, [], [], [], {}
    if small:
        warnings.append(f"{len(small)} tensor(s) smaller than rank {rule.rank} extracted at their full rank: "
                        f"{listed(small)}")
    for name, done in zip(chosen, per_module(one, names, dev, workers)):
        if done is None:
            unchanged.append(name)
            continue
        report, B, A, notes = done
        reports.append(report)
        warnings.extend(notes)
        if progress:
            progress(name)
        if name in experts:
            found[name] = B, A
            continue
        k, out = report.rank, sdtype or pairs[name][0].torch_dtype
        key = (PREFIX if not pipeline else "") + loaded(name[: -len(".weight")])
        shape = pairs[name][0].shape
        kind = "embedding" if EMBEDDING.search(name) else "conv" if len(shape) == 4 else "linear"
        if kind == "conv":  # A (k, in, kh, kw), B (out, k, 1, 1): PEFT's and kohya's conv LoRA
            A, B = A.reshape((k,) + tuple(shape[1:])), B.reshape(tuple(B.shape) + (1, 1))
        modules[key] = LoraModule(A=A.to(out).contiguous(), B=B.to(out).contiguous(), scale=1.0, kind=kind)
    modules.update(_expert_modules(experts, found, sdtype, pairs))
    if not modules:
        raise SurgeryError(f"{finetuned}: the targeted tensors are identical in both models; nothing to extract")
    if pipeline:  # a diffusers pipeline LoRA: its writer gives each component its config (alpha = r)
        components = sorted({n.split(".", 1)[0] for n in modules})
        adapter = Adapter(modules=modules, format="diffusers", metadata={"format": "pt"},
                          config={f"{c}.base_model_name_or_path": str(base) for c in components})
    else:
        # experts: target_parameters (the writer's); a router too, as `<path>.weight`, as PEFT saves it
        params = sorted(n[len(PREFIX):] + ".weight" for n in modules if n[len(PREFIX):] in how.wrapped)
        plain = [n for n, m in modules.items() if m.kind != "experts" and n[len(PREFIX):] not in how.wrapped]
        fan = any(n.removesuffix(".weight") in how.transposed for n in chosen)
        targets = _target_modules(plain, [loaded(n.removesuffix(".weight")) + ".weight" for n, (_, b) in pairs.items()
                                          if b is not None]) if plain else []
        config = {"peft_type": "LORA", "base_model_name_or_path": str(base), "task_type": None, "r": 8,
                  "lora_alpha": 8, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
                  **({"target_parameters": params} if params else {}),
                  "lora_dropout": 0.0, "fan_in_fan_out": fan, "bias": "none", "use_rslora": False,
                  "use_dora": False, "inference_mode": True, "modules_to_save": None}
        adapter = Adapter(modules=modules, format="peft", config=config, metadata={"format": "pt"},
                          passthrough={PREFIX + loaded(n.removesuffix(".weight")) + ".weight":
                                       TensorRef(t.path, n, tuple(t.shape), t.torch_dtype) for n, t in tables.items()})
        if moved := sorted(p for p in how.renamed.values() if PREFIX + loaded(p) in modules):
            warnings.append(f"{len(moved)} module(s) named as transformers loads the base, not as it stores them "
                            f"({moved[0]} → {loaded(moved[0])}), as PEFT saves adapters for it")
        if tables:
            sizes = sorted({f"{pairs[n][1].shape[0]} → {t.shape[0]}" for n, t in tables.items()})
            warnings.append(f"the vocabulary is resized ({', '.join(sizes)} rows): {', '.join(tables)} carried whole, "
                            "as PEFT's save_embedding_layers saves them; load the adapter on a base resized to "
                            "match, with the fine-tuned model's tokenizer (surgery merge does both)")
        if carry_changed:
            adapter, carried = _carry(adapter, untargeted, pairs, how)
            untargeted = [n for n in untargeted if n not in carried]
            if untargeted:
                warnings.append(f"{len(untargeted)} changed tensor(s) not carried: {listed(untargeted)} (a weight: "
                                "extract it with --targets; or inside a module PEFT wraps as a parameter or whose "
                                "biases it cannot hold, or quantized)")
    return adapter, ExtractReport(tuple(reports), tuple(unchanged), tuple(mismatched), tuple(untargeted),
                                  tuple(warnings), str(finetuned), str(base), tuple(carried))


def _carry(adapter: Adapter, changed: list[str], pairs, how: Loaded):
    """(the adapter holding them, their names) for the changed vectors the LoRA does not hold that PEFT can load:
    the bias of a module the adapter holds as its `lora_B.bias` (ΔW's scale is 1, so the bias difference itself;
    PEFT's `lora_bias`), any other (a norm, an untouched module's bias) whole under `base_model.model.<its loaded
    key>` (PEFT's load_state_dict puts it in the model, as save_embedding_layers' tables go). Not carried: weights
    (2-D and up: a LoRA's to extract, and a whole copy of each would make the adapter a model), tensors of modules
    PEFT wraps otherwise (ParamWrapper: expert parameters, routers; a biased LoRA beside target_parameters, which
    PEFT refuses) and quantized ones."""
    modules, passthrough, names = dict(adapter.modules), {}, []
    loaded_key = {v: k for k, v in how.keys.items()}  # stored tensor key → the loaded model's
    params = [n[len(PREFIX):] for n, m in modules.items() if m.kind == "experts" or n[len(PREFIX):] in how.wrapped]
    wrapped = {p.rsplit(".", 1)[0] if modules[PREFIX + p].kind == "experts" else p for p in params}
    for name in changed:
        ft, bs = pairs[name]
        key = loaded_key.get(name, name)
        path, _, leaf = key.rpartition(".")  # ("", "", key) for a top-level tensor (CLIP's logit_scale)
        m = modules.get(PREFIX + path)
        if len(ft.shape) > 1 or ft.codec is not None or bs.codec is not None or path in wrapped \
                or ".experts." in name:  # a weight is the LoRA's to extract (--targets), not a whole copy's
            continue
        if m is not None and leaf == "bias" and not params and m.kind in ("linear", "conv") \
                and tuple(ft.shape) == (m.out_features,):
            d = read_tensor(ft).to(torch.float32) - read_tensor(bs).to(torch.float32)
            if not all_finite(d):
                raise SurgeryError(f"{name}: the bias difference overflows float32")
            modules[PREFIX + path] = replace(m, bias=d.to(m.dtype))
            names.append(name)
        elif m is None:  # a module the LoRA leaves alone (another tensor of a wrapped one has no place)
            passthrough[PREFIX + key] = TensorRef(ft.path, ft.name, tuple(ft.shape), ft.torch_dtype)
            names.append(name)
    return adapter.with_modules(modules, passthrough={**adapter.passthrough, **passthrough}), names
