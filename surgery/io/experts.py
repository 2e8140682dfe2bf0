"""Where a model's expert parameters live on disk (formats.md §1.2, "MoE bases").

transformers 5 holds a MoE layer's experts fused in memory — `mlp.experts.gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I), or (E, in, out) for a module marked `is_transposed` (gpt-oss) — but each model type keeps
its checkpoint's layout: one tensor per expert (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3: `experts.N.gate_proj.weight`;
Mixtral: `block_sparse_moe.experts.N.w1.weight`), the fused tensor itself (gpt-oss), or transposed (Qwen3-VL-MoE).
The map between the two is transformers' own conversion mapping for the model type; the orientation and the
parameters' registration order come from the model built from the base's config.json on the meta device (no
weights are read). transformers is an optional dependency, needed only where a base's expert tensors are placed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..adapter import PEFT_PREFIX, LoraModule, experts_module
from ..errors import SurgeryError
from .checkpoint import Checkpoint
from .loaded import conversion


@dataclass(frozen=True)
class Param:
    """An expert parameter of the model, oriented as the checkpoint stores it: as the model holds it in memory,
    or, where transformers transposes it on loading (Qwen3-VL-MoE), the other way round."""

    path: str  # model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, int, int]  # (E, out, in), or (E, in, out) when transposed
    transposed: bool  # stored (E, in, out): is_transposed (gpt-oss), or transposed on loading
    nesting: tuple[str, ...]  # the owning module's 3-D parameters in registration order (PEFT's nesting order)

    @property
    def delta_shape(self) -> tuple[int, int, int]:
        """(E, out, in): ΔW as the adapter's factors give it."""
        E, a, b = self.shape
        return (E, b, a) if self.transposed else (E, a, b)


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor's share of an expert parameter: the whole fused parameter (`expert` None), or expert
    `expert`'s (d1, d2) slice `[start:stop]` along `dim` (0 or 1) of the parameter's per-expert layout."""

    param: Param
    expert: int | None = None
    dim: int = 0
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Layout:
    model_type: str
    params: Mapping[str, Param]  # in-memory parameter path → Param
    pieces: Mapping[str, tuple[tuple[str, Piece], ...]]  # parameter path → (on-disk key, Piece) …


def layout(ck: Checkpoint) -> Layout:
    """The base's expert parameters and the on-disk tensors each is made of (checked: every expert's slice
    once, the slices tiling the parameter)."""
    if not ck.config_path.exists():
        raise SurgeryError(f"{ck.root}: expert (MoE) adapters need the base's config.json (its model type decides "
                           "where the experts are stored)")
    model, renamings, converters, loading = conversion(ck)
    model_type = model.config.model_type
    params = {}
    for owner_name, owner in model.named_modules():
        own = [(n, p) for n, p in owner.named_parameters(recurse=False)]
        nesting = tuple(n for n, p in own if p.dim() == 3)
        for n, p in own:
            if p.dim() == 3:
                path = f"{owner_name}.{n}" if owner_name else n
                params[path] = Param(path, tuple(p.shape), bool(getattr(owner, "is_transposed", False)), nesting)
    found: dict[str, list] = {}
    for key, spec in ck.tensors.items():
        renamed, pattern = loading.rename_source_key(key, renamings, converters)
        if renamed not in params:
            continue
        param = params[renamed]
        if pattern is None:
            if tuple(spec.shape) != param.shape:
                raise SurgeryError(f"{ck.root}: tensor {key} has shape {list(spec.shape)}, the model's {renamed} "
                                   f"{list(param.shape)}")
            found.setdefault(renamed, []).append((key, Piece(param)))
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        ops = list(conv.operations)
        if len(ops) == 1 and isinstance(ops[0], loading.Transpose) and {ops[0].dim0, ops[0].dim1} == {1, 2}:
            # the fused parameter stored (E, in, out) (Qwen3-VL-MoE): as transformers does, transposed only where
            # the shapes differ (check_dims)
            E, d1, d2 = param.shape
            stored = tuple(spec.shape)
            flipped = stored != param.shape or not ops[0].check_dims
            if stored != ((E, d2, d1) if flipped else param.shape):
                raise SurgeryError(f"{ck.root}: tensor {key} has shape {list(stored)}, the model's {renamed} "
                                   f"{list(param.shape)} (stored transposed)")
            if flipped:
                param = params[renamed] = Param(renamed, stored, not param.transposed, param.nesting)
            found.setdefault(renamed, []).append((key, Piece(param)))
            continue
        found.setdefault(renamed, []).append((key, _expert_piece(ck, key, spec.shape, param, conv, pattern, model_type,
                                                                  loading)))
    pieces = {p: _tiled(ck, params[p], found[p]) for p in found}
    return Layout(model_type, params, pieces)


def _expert_piece(ck, key, shape, param: Param, conv, pattern: str, model_type: str, loading) -> Piece:
    """The slice of one expert that a per-expert tensor holds, read from the converter's operations: the
    experts stacked (MergeModulelist on dim 0), then the source patterns concatenated in their order."""
    ops = list(conv.operations)
    merge_ok = ops and isinstance(ops[0], loading.MergeModulelist) and ops[0].dim == 0
    concat = ops[1] if len(ops) == 2 and isinstance(ops[1], loading.Concatenate) else None
    if not merge_ok or len(ops) > 2 or (len(ops) == 2 and concat is None) or (concat and concat.dim not in (1, 2)):
        what = ", ".join(type(o).__name__ for o in ops)
        raise SurgeryError(f"{ck.root}: model type {model_type} stores {param.path} through transformers operations "
                           f"({what}) that surgery does not invert; its expert adapters cannot be placed")
    stem = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(stem, key)
    if m is None or len(shape) != 2:
        raise SurgeryError(f"{ck.root}: tensor {key} does not look like one expert's weight ({pattern})")
    group = conv.source_patterns.index(pattern)
    dim = concat.dim - 1 if concat else 0
    return Piece(param, int(m.group(1)), dim, group, None)  # start: the group's index until _tiled sizes it


def _tiled(ck: Checkpoint, param: Param, found: list) -> tuple[tuple[str, Piece], ...]:
    """Offsets of the per-expert slices (the source groups in order along the concatenated dim), checked to tile
    every expert of the parameter exactly once."""
    if len(found) == 1 and found[0][1].expert is None:
        return tuple(found)
    E, d1, d2 = param.shape
    out = []
    by_expert: dict[int, dict[int, tuple[str, Piece]]] = {}
    for key, p in found:
        by_expert.setdefault(p.expert, {})[p.start] = (key, p)
    if sorted(by_expert) != list(range(E)):
        raise SurgeryError(f"{ck.root}: {param.path} has {E} experts but the checkpoint holds tensors for experts "
                           f"{sorted(by_expert)[:8]}…")
    for e, groups in sorted(by_expert.items()):
        offset = 0
        for g in sorted(groups):
            key, p = groups[g]
            shape = tuple(ck.tensors[key].shape)
            size = shape[p.dim]
            other = shape[1 - p.dim]
            if other != (d1, d2)[1 - p.dim]:
                raise SurgeryError(f"{ck.root}: tensor {key} {list(shape)} does not fit {param.path} {list(param.shape)}")
            out.append((key, Piece(param, e, p.dim, offset, offset + size)))
            offset += size
        if offset != (d1, d2)[groups[next(iter(groups))][1].dim]:
            raise SurgeryError(f"{ck.root}: expert {e}'s tensors of {param.path} do not add up to its shape")
    return tuple(out)


def check_format(adapter, fmt: str) -> None:
    """Expert parameters have a form in PEFT files (`target_parameters`) and llama.cpp's (`ffn_*_exps` tensors)
    only; other formats refuse them."""
    name = next((n for n, m in adapter.modules.items() if m.kind == "experts"), None)
    if name is not None and fmt not in ("peft", "peft-file", "gguf"):
        raise SurgeryError(f"module {name} is a LoRA on MoE expert tensors, which {fmt} files have no place for; "
                           "write PEFT (--to peft), or per-expert modules with --to peft --base MODEL --expert-modules")


def on_layout(adapter, ck: Checkpoint, split: bool = False):
    """(the adapter's other modules, its expert modules placed on `ck`'s model): expert parameters kept as
    ExpertsModules (PEFT's `target_parameters`, what PEFT loads on transformers 5), per-expert LoRA modules on
    the checkpoint's own expert tensors (`experts.N.gate_proj`, as vLLM and transformers-4 PEFT name them)
    joined into them exactly — gate and up blocks side by side, rank Σ — or, with `split`, every expert
    parameter cut into those per-expert modules (for a base that stores experts one tensor each)."""
    lay = layout(ck)
    on_disk = {key: (path, piece) for path, pieces in lay.pieces.items() for key, piece in pieces
               if piece.expert is not None}
    experts, joined, rest = {}, {}, {}
    for name, m in adapter.modules.items():
        path = name.removeprefix(PEFT_PREFIX)
        if m.kind == "experts":
            param = lay.params.get(path)
            if param is None or param.delta_shape != m.shape:
                have = "no such parameter" if param is None else f"{' × '.join(map(str, param.delta_shape))}"
                raise SurgeryError(f"{adapter.source}: expert parameter {name} ({' × '.join(map(str, m.shape))}, "
                                   f"experts × out × in) does not fit the {lay.model_type} model of {ck.root} ({have})")
            experts[path] = m
        elif m.algo == "lora" and m.kind == "linear" and f"{path}.weight" in on_disk:
            ppath, piece = on_disk[f"{path}.weight"]
            joined.setdefault(ppath, {}).setdefault(piece.expert, []).append((piece, m))
        else:
            rest[name] = m
    out = {}
    for path, by_expert in joined.items():  # per-expert modules → one ExpertsModule per parameter
        param = lay.params[path]
        _, d_out, d_in = param.delta_shape
        Bs, As = [], []
        for e in range(param.shape[0]):
            parts = by_expert.get(e, [])
            r = sum(m.rank for _, m in parts) or 1
            B, A, at = torch.zeros(d_out, r), torch.zeros(r, d_in), 0
            for piece, m in parts:
                b, a = m.factors(torch.float32)
                cols = slice(at, at + m.rank)
                if piece.dim == 0:
                    B[piece.start:piece.stop, cols], A[cols] = b * m.scale, a
                else:
                    B[:, cols], A[cols, piece.start:piece.stop] = b * m.scale, a
                at += m.rank
            Bs.append(B)
            As.append(A)
        dtype = next(iter(by_expert.values()))[0][1].dtype
        experts[path] = experts_module((), Bs, As, 1.0, dtype)
    owners: dict[str, set] = {}
    for path in experts:
        owners.setdefault(path.rsplit(".", 1)[0], set()).add(path.rsplit(".", 1)[1])
    for path, m in experts.items():
        owner = path.rsplit(".", 1)[0]
        nesting = tuple(p for p in lay.params[path].nesting if p in owners[owner])
        m = type(m)(A=m.A, B=m.B, scale=m.scale, experts=m.experts, nesting=nesting)
        if not split:
            out[PEFT_PREFIX + path] = m
            continue
        pieces = lay.pieces[path]
        if any(p.expert is None for _, p in pieces):
            raise SurgeryError(f"{ck.root}: the {lay.model_type} model stores {path} as one fused tensor, so its "
                               "only PEFT form is target_parameters (no per-expert modules exist)")
        B, A = m.stacked(torch.float32)
        for key, p in pieces:
            b, a = B[p.expert], A[p.expert]
            b, a = (b[p.start:p.stop], a) if p.dim == 0 else (b, a[:, p.start:p.stop])
            out[PEFT_PREFIX + key.removesuffix(".weight")] = LoraModule(
                A=a.to(m.dtype).contiguous(), B=b.to(m.dtype).contiguous(), scale=m.scale)
    return adapter.with_modules(rest), out
