"""Where a model's expert parameters live on disk (formats.md §1.2, "MoE bases").

transformers 5 holds a MoE layer's experts fused in memory — `mlp.experts.gate_up_proj` (E, 2I, H) and
`down_proj` (E, H, I), or (E, in, out) for a module marked `is_transposed` (gpt-oss) — but each model type keeps
its checkpoint's layout: one tensor per expert (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3: `experts.N.gate_proj.weight`;
Mixtral: `block_sparse_moe.experts.N.w1.weight`), or the fused tensor itself (gpt-oss). The map between the two is
transformers' own conversion mapping for the model type; the orientation and the parameters' registration order
come from the model built from the base's config.json on the meta device (no weights are read). transformers is
an optional dependency, needed only where a base's expert tensors are placed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from ..errors import SurgeryError
from .checkpoint import Checkpoint


@dataclass(frozen=True)
class Param:
    """An expert parameter as the model holds it in memory."""

    path: str  # model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, int, int]  # (E, out, in), or (E, in, out) when transposed
    transposed: bool  # is_transposed: stored (E, in, out)
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


def _transformers(where):
    try:
        import transformers
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        raise SurgeryError(f"{where}: placing expert (MoE) adapters on a base needs transformers ≥ 5, which maps "
                           "each model type's expert tensors (pip install 'surgery[moe]')") from None
    return transformers, conversion_mapping, core_model_loading


@lru_cache(maxsize=4)
def _meta_model(config_path: Path, mtime: float):
    """The model of `config_path` built on the meta device: its parameter names, shapes and expert modules."""
    transformers, _, _ = _transformers(config_path.parent)
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_path.parent), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"{config_path}: transformers does not know this model ({first})") from None
    with torch.device("meta"):
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                return auto.from_config(config)
            except (ValueError, KeyError):
                continue
    raise SurgeryError(f"{config_path}: transformers has no model class for model_type {config.model_type!r}")


def layout(ck: Checkpoint) -> Layout:
    """The base's expert parameters and the on-disk tensors each is made of (checked: every expert's slice
    once, the slices tiling the parameter)."""
    if not ck.config_path.exists():
        raise SurgeryError(f"{ck.root}: expert (MoE) adapters need the base's config.json (its model type decides "
                           "where the experts are stored)")
    _, conversion_mapping, loading = _transformers(ck.root)
    model = _meta_model(ck.config_path, ck.config_path.stat().st_mtime)
    model_type = model.config.model_type
    params = {}
    for owner_name, owner in model.named_modules():
        own = [(n, p) for n, p in owner.named_parameters(recurse=False)]
        nesting = tuple(n for n, p in own if p.dim() == 3)
        for n, p in own:
            if p.dim() == 3:
                path = f"{owner_name}.{n}" if owner_name else n
                params[path] = Param(path, tuple(p.shape), bool(getattr(owner, "is_transposed", False)), nesting)
    transforms = conversion_mapping.get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, loading.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, loading.WeightConverter)]
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
