"""Merging adapters into base checkpoints, streamed tensor by tensor (formats.md §1.5, §3.1).

`plan_merge` maps every adapter module to the base tensors it changes (names resolved against the base's key
list) and checks shapes from headers alone; `merged_weight` is the per-tensor maths; `merge` streams the base,
writing each output shard one tensor at a time: untouched tensors are copied as raw bytes, changed ones are
`W + Σ wᵢ ΔWᵢ` formed in float32 (or float64) on the chosen device and rounded once to the stored dtype.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .adapter import Adapter, ExpertsModule, LoraModule, adapter_list, check_scaled, check_weights, materialize
from .device import Scratch, resolve_device, storage_dtype, compute_dtype as _compute_dtype
from .errors import SurgeryError, listed
from .io import check_output, gguf_file, hub
from .io import experts as expert_layout
from .io.experts import Param, Piece
from .io.jsonfile import field, read_object
from .io.loaded import on_disk
from .io.peft import PREFIX
from .io.checkpoint import (Checkpoint, Pipeline, TensorSpec, copy_entry, copy_file, copy_side_files, files_below,
                            index_name, is_pipeline, open_pipeline, open_weight_sets, prefetch, read_stored,
                            read_tensor, weights_name)
from .io.names import (DENOISERS, Placement, base_targets, component_name, missing_error, place, resized_table,
                       TIED_EMBEDDING, VOCAB_TABLE, weight_key)
from .io.safetensors_file import Entry, atomic_output, tensor_entry, write_shard
from .linalg import all_finite

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- per-tensor maths


def weight_delta(m: LoraModule, shape: Sequence[int], fan_in_fan_out: bool, dtype, device) -> torch.Tensor:
    """ΔW laid out like the base tensor: embedding tables get ΔWᵀ, convs the kernel shape, GPT-2 `Conv1D`
    (fan_in_fan_out) ΔWᵀ."""
    d = m.delta(dtype, device)  # (out, in_flat)
    if m.kind == "embedding" or fan_in_fan_out:
        d = d.T
    return d.reshape(tuple(shape))


class SharedFactors:
    """An expert parameter's stacked factors, read once for all the on-disk tensors they change (one per expert,
    or per expert and gate/up half) and dropped after the last of them: one parameter's factors in memory."""

    def __init__(self, m: ExpertsModule, uses: int):
        self.m, self.uses, self.held, self.lock = m, uses, None, threading.Lock()

    def take(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            if self.held is None or self.held[0].dtype != dtype or self.held[0].device != torch.device(device):
                self.held = tuple(t.contiguous() for t in self.m.stacked(dtype, device))  # B_e: one block each
            held, self.uses = self.held, self.uses - 1
            if self.uses <= 0:
                self.held = None
            return held


@dataclass(frozen=True)
class ExpertPart:
    """One on-disk tensor's share of an expert parameter's ΔW (surgery.io.experts.Piece)."""

    factors: SharedFactors
    piece: Piece
    bias = None
    magnitude = None


def add_expert_delta_(acc: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, piece: Piece) -> None:
    """acc += alpha · ΔW's share `piece`, B (E, out, r), A (E, r, in): the fused parameter (E, out, in) — or
    (E, in, out) transposed — by one batched GEMM; one expert's slice of it by one GEMM."""
    t = piece.param.transposed
    if piece.expert is None:
        acc.baddbmm_(A.transpose(1, 2), B.transpose(1, 2), alpha=alpha) if t else acc.baddbmm_(B, A, alpha=alpha)
        return
    lhs, rhs = (A[piece.expert].T, B[piece.expert].T) if t else (B[piece.expert], A[piece.expert])  # (d1, r), (r, d2)
    cut = slice(piece.start, piece.stop)
    lhs, rhs = (lhs[cut], rhs) if piece.dim == 0 else (lhs, rhs[:, cut])
    acc.addmm_(lhs, rhs, alpha=alpha)


def add_delta_(acc: torch.Tensor, m: LoraModule, w: float, fan_in_fan_out: bool = False) -> None:
    """acc += w · ΔW in place, laid out like the base tensor; for LoRA one fused GEMM
    (`addmm_`, alpha = w · scale), so ΔW is never materialised as a separate tensor."""
    if isinstance(m, ExpertPart):
        add_expert_delta_(acc, *m.factors.take(acc.dtype, acc.device), w * m.factors.m.scale, m.piece)
        return
    if not isinstance(m, LoraModule):
        acc += w * weight_delta(m, acc.shape, fan_in_fan_out, acc.dtype, acc.device)
        return
    B, A = m.factors(acc.dtype, acc.device)  # (out, r), (r, in_flat)
    if m.kind == "embedding" or fan_in_fan_out:
        acc.addmm_(A.T, B.T, alpha=w * m.scale)  # acc (in, out) += (B @ A)ᵀ
    else:
        acc.view(acc.shape[0], -1).addmm_(B, A, alpha=w * m.scale)


def dora_columns(m: LoraModule, fan_in_fan_out: bool) -> bool:
    """Whether a DoRA magnitude scales the stored tensor's columns: LyCORIS's per-input-column magnitude, or PEFT's
    per-output one on a tensor stored (in, out) — an embedding table (one per embedding dimension) or a GPT-2
    Conv1D, as PEFT's DoraEmbeddingVariant and fan_in_fan_out merges transpose it."""
    return (m.dora_axis == "in") != (m.kind == "embedding" or fan_in_fan_out)


def merged_weight(W: torch.Tensor, parts: Sequence[tuple[LoraModule, float]], *, fan_in_fan_out: bool = False,
                  out_dtype: torch.dtype | None = None, compute: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", scratch: Scratch | None = None,
                  dora: str = "peft") -> torch.Tensor:
    """`W + Σ wᵢ ΔWᵢ` in `compute` precision, rounded once to `out_dtype` (default W's dtype).

    DoRA (one adapter, weight 1): `m / ‖W + ΔW‖_row · (W + ΔW)`, norms over every dim but the first, as PEFT's
    `DoraLinearVariant.merge` and its conv variant do — per stored column instead where `dora_columns` says so;
    `dora="lycoris"`: LyCORIS's `weight_decompose`, the norm + float32 eps. With `scratch`, the result lives in a
    reused buffer.
    """
    scratch = scratch or Scratch(device)
    acc = scratch.get("acc", W.shape, compute, device).copy_(W)
    for m, w in parts:
        add_delta_(acc, m, w, fan_in_fan_out)
    dora_modules = [m for m, _ in parts if m.magnitude is not None]
    if dora_modules:
        mag = materialize(dora_modules[0].magnitude).to(device=device, dtype=compute)
        eps = torch.finfo(torch.float32).eps if dora == "lycoris" else 0.0
        if dora_columns(dora_modules[0], fan_in_fan_out):  # one norm per stored column (over rows and kernel)
            norm = acc.transpose(0, 1).reshape(acc.shape[1], -1).norm(dim=1) + eps
            acc *= (mag.reshape(-1) / norm).reshape((1, -1) + (1,) * (acc.dim() - 2))
        else:
            norm = acc.reshape(acc.shape[0], -1).norm(dim=1) + eps
            acc *= (mag.reshape(-1) / norm).reshape((-1,) + (1,) * (acc.dim() - 1))
    out_dtype = out_dtype or W.dtype
    if out_dtype == compute and acc.device.type == "cpu":
        return acc
    return scratch.get("out", W.shape, out_dtype).copy_(acc)


def changed_tensor(spec: TensorSpec, change: Change, transposed: bool, out_dtype: torch.dtype,
                   compute: torch.dtype, device, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A base tensor with its `change` applied, in `out_dtype` (a replacement, a bias plus Σ w·s·lora_B.bias, a
    weight plus its adapters' ΔW, or trainable tokens' rows written over it), and the base tensor it was made from
    (None for a replacement)."""
    if change.kind == "replace":
        return _with_rows(materialize(change.replacement).to(out_dtype), change.rows), None
    scratch = scratch or Scratch(device)
    base = read_tensor(spec, scratch.get("read", (spec.nbytes,), torch.uint8))
    if change.kind == "rows":
        return _with_rows(base.to(out_dtype, copy=True), change.rows), base
    if change.kind == "bias":
        acc = base.to(device, compute)
        for m, w in change.parts:
            acc += w * m.scale * materialize(m.bias).to(device, compute)
        return acc.to(out_dtype), base
    if change.base_rows:
        base = _with_rows(base.clone(), change.base_rows)
    return merged_weight(base, change.parts, fan_in_fan_out=transposed, out_dtype=out_dtype, compute=compute,
                         device=device, scratch=scratch, dora=change.dora), base


def _with_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """`t` with PEFT trainable tokens' rows written over it (their values, not deltas: PEFT's index_copy)."""
    for index, values in rows:
        t.index_copy_(0, torch.tensor(index, device=t.device), materialize(values).to(t.device, t.dtype))
    return t


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Change:
    """What happens to one base tensor: adapter modules (with weights) add to it, or it is created from `source`."""

    parts: tuple[tuple[LoraModule, float], ...]
    kind: str = "weight"  # "weight" | "bias" | "replace" | "rows"
    source: str | None = None  # for a tensor created from a tied one
    replacement: object = None  # kind "replace": PEFT modules_to_save tensor that takes the base tensor's place
    dora: str = "peft"  # how a DoRA magnitude rescales: "peft" (lora_magnitude_vector) or "lycoris" (dora_scale)
    rows: tuple = ()  # PEFT trainable tokens: (row indices, their new values (n, dim)), written over the result
    base_rows: tuple = ()  # the same, written over `source` first: a head created from an embedding with tokens


@dataclass(frozen=True)
class MergePlan:
    changes: Mapping[str, Change]  # base tensor name → change
    notes: tuple[str, ...]
    untie: bool = False  # config.json's tie_word_embeddings must become false
    transposed: frozenset[str] = frozenset()  # weights stored (in, out): GPT-2 Conv1D with fan_in_fan_out
    vocab: tuple[int, int, object] | None = None  # (old, new rows, the adapter): a resized vocabulary


def placed(adapter: Adapter, ck: Checkpoint) -> Placement:
    """The adapter's modules at the base module paths they update (surgery.io.names.place); an adapter that is
    already on the base's names (`name_style: base`, as a pipeline merge hands each component) stays as it is;
    a GGUF adapter (llama.cpp's names and q/k row order) is first taken back to the base's, by its config.json."""
    if adapter.format == gguf_file.FORMAT:
        adapter = gguf_file.from_gguf(adapter, ck.root if ck.is_dir else ck.root.parent)
    if adapter.config.get("name_style") == "base":
        keys = {(None, n): m for n, m in adapter.modules.items()}
        return Placement(modules=keys, origin={k: [k[1]] for k in keys},
                         missing={n: "no base tensor of that name" for n in adapter.modules
                                  if weight_key(ck.tensors, n) not in ck.tensors})
    return place(adapter, [(component_name(ck), ck)])


def base_shapes(adapter: Adapter, base: str | Path) -> dict[str, tuple[int, ...]]:
    """{module name: the base weight's shape} from the base checkpoint's headers — the kernel size that LoHa/LoKr
    factors stored flattened do not say (needed to write a conv LoRA that PEFT and kohya loaders take)."""
    targets = base_targets(base)
    p = place(adapter, targets)
    cks = dict(targets)
    out = {}
    for (c, path), names in p.origin.items():
        if len(names) == 1 and p.modules[(c, path)] is adapter.modules.get(names[0]):
            ck = cks.get(c) or next(iter(cks.values()))
            out[names[0]] = tuple(ck.tensors[weight_key(ck.tensors, path)].shape)
    return out


def _fits(m, shape: Sequence[int], fan_in_fan_out: bool) -> bool:
    """Whether a module's ΔW fits a base tensor of `shape`: exactly for LoRA; LoHa/LoKr/diff factors flatten a
    conv kernel into their columns (and a Conv1d's Tucker core is stored (r, r, k, 1)), so they fit any base
    tensor of the same (out, in·kernel)."""
    shape = tuple(shape)
    if m.kind == "embedding" or fan_in_fan_out:
        return shape == (m.in_features, m.out_features)
    if m.algo != "lora":
        return len(shape) >= 2 and (shape[0], math.prod(shape[1:])) == (m.out_features, m.in_features)
    return shape == m.shape


def _tied_source(ck: Checkpoint, path: str) -> str | None:
    """For `…lm_head(.weight)` missing from a base that ties it to its input embedding: that embedding's name."""
    if not tied(ck) or path.removesuffix(".weight").split(".")[-1] != "lm_head":
        return None
    emb = [k for k in ck.tensors if TIED_EMBEDDING.search(k)]
    return emb[0] if len(emb) == 1 else None


def tied(ck: Checkpoint) -> bool:
    """The base's config.json says its output head is its input embedding — also by leaving the key out, for a
    language model: transformers writes it only where it differs from its base default (true), which is how
    Gemma's and GPT-2's configs say it."""
    cfg = ck.config()
    archs = cfg.get("architectures") if isinstance(cfg.get("architectures"), list) else []
    lm = any(isinstance(a, str) and a.endswith(LM_ARCHITECTURES) for a in archs)
    return field(cfg, "tie_word_embeddings", "bool", ck.config_path, lm)


LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
OUTPUT_HEAD = re.compile(r"(^|\.)lm_head\.weight$")


def plan_merge(ck: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float],
               allow_missing: bool = False, skip_modules_to_save: bool = False) -> MergePlan:
    """Which base tensors change and how, checked against the base's headers before any tensor is read."""
    changes: dict[str, list] = {}
    biases: dict[str, list] = {}
    dora_styles: dict[str, str] = {}  # base tensor → "lycoris" for a LyCORIS dora_scale (PEFT's otherwise)
    created: dict[str, str] = {}
    notes: list[str] = []
    for adapter, w in zip(adapters, weights):
        adapter.check_plain("a merge into the base")
        fan = bool(adapter.config.get("fan_in_fan_out", False))
        where = str(adapter.source)
        if adapter.format == gguf_file.FORMAT:  # llama.cpp's names back to the base's (experts fused as it loads)
            adapter = gguf_file.from_gguf(adapter, ck.root if ck.is_dir else ck.root.parent)
        experts = {n: m for n, m in adapter.modules.items() if m.kind == "experts"}
        if experts:
            for key, part in _expert_parts(ck, experts, where, allow_missing, notes):
                changes.setdefault(key, []).append((part, w, False))
            adapter = adapter.with_modules({n: m for n, m in adapter.modules.items() if n not in experts})
        p = placed(adapter, ck)
        found = {weight_key(ck.tensors, k[1]): (p.origin[k][0], m) for k, m in p.modules.items()}  # tensor → (name, ΔW)
        missing = list(p.missing)
        for name in list(missing):  # an lm_head absent from the file because it is tied to the embedding
            path = name.removeprefix(PREFIX)
            if (emb := _tied_source(ck, path)) is not None:
                created[f"{path}.weight"] = emb
                found[f"{path}.weight"] = (name, adapter.modules[name])
                missing.remove(name)
                notes.append(f"{path}.weight is tied to {emb} in the base; the merged model gets its own "
                             "lm_head.weight and tie_word_embeddings is set to false")
        if missing and not allow_missing:
            raise missing_error(ck.root, {n: p.missing[n] for n in missing})
        if missing:
            notes.append(f"{where}: {len(missing)} module(s) without a base tensor were skipped: {', '.join(missing[:5])}")
        notes.extend(p.notes)
        for key, (name, m) in found.items():
            spec = ck.tensors.get(created.get(key, key))
            if spec.torch_dtype not in FLOATS:
                hint = ("; a float8 checkpoint without scales (as ComfyUI stores them) is a cast of its bf16/fp16 "
                        "original: merge into that") if spec.torch_dtype.is_floating_point else ""
                raise SurgeryError(f"{ck.root}: base tensor {key} has dtype {spec.dtype}; only float16/bfloat16/"
                                   f"float32/float64 bases can be merged into{hint}")
            if not _fits(m, spec.shape, fan):
                want = list(m.shape[::-1] if m.kind == "embedding" or fan else m.shape)
                raise SurgeryError(f"{where}: module {name} ({m.algo}) has ΔW of shape {want} but base tensor {key} "
                                   f"of {ck.root} has shape {list(spec.shape)}")
            if m.magnitude is not None:
                if w != 1.0 or len(adapters) > 1:
                    raise SurgeryError(f"{where}: DoRA module {name} can only be merged alone, with weight 1 (its "
                                       "magnitude rescales the merged weight)")
                if math.prod(m.magnitude.shape) != spec.shape[1 if dora_columns(m, fan) else 0]:
                    raise SurgeryError(f"{where}: module {name}: DoRA magnitude of shape {list(m.magnitude.shape)} "
                                       f"does not fit base tensor {key} {list(spec.shape)}")
                if adapter.format == "kohya":
                    dora_styles[key] = "lycoris"
            changes.setdefault(key, []).append((m, w, fan))
            if m.bias is not None:
                bias = key[: -len("weight")] + "bias"  # `.bias`, or nn.MultiheadAttention's `in_proj_bias`
                if bias not in ck.tensors:
                    raise SurgeryError(f"{where}: module {name} has lora_B.bias but the base has no {bias}")
                biases.setdefault(bias, []).append((m, w))
    if tied(ck) and not any(OUTPUT_HEAD.search(k) for k in ck.tensors):
        for key in changes:
            if TIED_EMBEDDING.search(key):
                notes.append(f"{key} is tied to the output head in the base: the merged update changes the output "
                             "head too (as PEFT's merge_and_unload does; the adapter's own forward changes only the "
                             "input embeddings)")
    replaced, vocab, tokens = _modules_to_save(ck, adapters, weights, created, notes, skip_modules_to_save)
    for key, parts in changes.items():
        if key in replaced or key in tokens:
            raise SurgeryError(f"{key}: both a LoRA module and a modules_to_save tensor or trainable tokens target it")
        if len({fan for _, _, fan in parts}) > 1:
            raise SurgeryError(f"{key}: adapters disagree on fan_in_fan_out")
        if any(m.magnitude is not None for m, _, _ in parts) and len(parts) > 1:
            raise SurgeryError(f"{key}: a DoRA module cannot be merged together with other adapters")
    # a head untied from an embedding with trainable tokens starts from the embedding's new rows: PEFT ties the
    # token adapter to the head, and runs the head's LoRA on top of it
    plan = {k: Change(tuple((m, w) for m, w, _ in p), "weight", created.get(k), dora=dora_styles.get(k, "peft"),
                      base_rows=tokens.get(created.get(k), ()))
            for k, p in changes.items()}
    plan.update({k: Change(tuple(p), "bias") for k, p in biases.items()})
    plan.update({k: Change((), "replace", source=created.get(k), replacement=t, rows=tokens.get(k, ()))
                 for k, t in replaced.items()})
    plan.update({k: Change((), "rows", rows=r) for k, r in tokens.items() if k not in replaced})
    fans = frozenset(k for k, p in changes.items() if p[0][2])
    tables = [k for k in plan if (TIED_EMBEDDING.search(k) or OUTPUT_HEAD.search(k)) and not created.get(k)]
    stored_head = tied(ck) and tables and any(OUTPUT_HEAD.search(k) for k in ck.tensors)
    if stored_head:  # transformers then reads both stored tables, vLLM the embedding alone: say untied
        notes.append(f"the base stores its output head though tie_word_embeddings is true, and {listed(tables)} "
                     "change: tie_word_embeddings is set to false, so that every loader reads the two tables written "
                     "(vLLM would take the head from the embedding, transformers reads both)")
    return MergePlan(plan, tuple(notes), untie=bool(created) or bool(stored_head), transposed=fans, vocab=vocab)


def _expert_parts(ck: Checkpoint, experts: Mapping[str, ExpertsModule], where: str, allow_missing: bool,
                  notes: list) -> list[tuple[str, ExpertPart]]:
    """(on-disk tensor, its share of an expert parameter's ΔW) for every expert module, placed by the base's
    model type (surgery.io.experts) and checked against the parameter's shape (experts, out, in)."""
    lay = expert_layout.layout(ck)
    out, missing = [], {}
    for name, m in experts.items():
        path = name.removeprefix(PREFIX)
        param = lay.params.get(path)
        if param is None or path not in lay.pieces:
            missing[name] = f"the {lay.model_type} model has no such expert parameter" if param is None else \
                "no tensor of the base holds it"
            continue
        if param.delta_shape != m.shape:
            raise SurgeryError(f"{where}: expert parameter {name} has ΔW of {m.experts} experts × {m.out_features} × "
                               f"{m.in_features} but the base's {path} is {' × '.join(map(str, param.delta_shape))} "
                               "(experts × out × in): made for another model?")
        pieces = lay.pieces[path]
        shared = SharedFactors(m, len(pieces))
        for key, piece in pieces:
            if ck.tensors[key].torch_dtype not in FLOATS:
                raise SurgeryError(f"{ck.root}: base tensor {key} has dtype {ck.tensors[key].dtype}; only float16/"
                                   "bfloat16/float32/float64 bases can be merged into")
            out.append((key, ExpertPart(shared, piece)))
    if missing and not allow_missing:
        raise missing_error(ck.root, missing)
    if missing:
        notes.append(f"{where}: {len(missing)} expert parameter(s) without a base tensor were skipped: "
                     f"{', '.join(list(missing)[:5])}")
    return out


def _modules_to_save(ck: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], created: dict,
                     notes: list, skip: bool = False) -> tuple[dict, tuple | None]:
    """PEFT `modules_to_save` tensors (`base_model.model.<path>`) replace the base's `<path>` as in PEFT's
    unload; `….base_layer.weight` / `….original_module.weight` copies saved by `save_embedding_layers` are the
    base's own and are skipped, and a wrapper's `<m>.modules_to_save.weight` beside the plain `<m>.weight` it also
    saves is skipped too (PEFT loads the plain one). A replacement cannot be scaled or undone, so a weight ≠ 1 is
    refused unless `skip` (then none is applied). Returns the replacements; where they resize the vocabulary,
    (old rows, new rows, adapter) (`_resized`); and trainable tokens' rows by base tensor (`_token_rows`)."""
    replaced, resized, tokens = {}, {}, {}
    for adapter, w in zip(adapters, weights):
        if adapter.format == "kohya":
            continue
        paths = {k.removeprefix(PREFIX) for k in adapter.passthrough}
        for key, t in adapter.passthrough.items():
            path = key.removeprefix(PREFIX)
            if ".base_layer." in path or ".original_module." in path:  # the base's own table, unless resized
                path = re.sub(r"\.(token_adapter\.)?(base_layer|original_module)\.", ".", path)
                stored = on_disk(ck, path)
                if path in paths or stored not in ck.tensors or tuple(t.shape) == tuple(ck.tensors[stored].shape):
                    continue
            if ".modules_to_save." in path:
                path = path.replace(".modules_to_save.", ".")
                if path in paths:
                    continue
            if skip:
                notes.append(f"{adapter.source}: {key} (modules_to_save) skipped; the base's {path} is kept")
                continue
            if w != 1:
                raise SurgeryError(f"{adapter.source}: carries whole tensors ({key}: modules_to_save, or changed "
                                   f"tensors extract --carry-changed kept), which replace base tensors and cannot be "
                                   f"scaled by --weight {w:g} or undone; pass --skip-modules-to-save to merge only "
                                   "its LoRA modules")
            if path.endswith(TOKENS):
                tokens.setdefault(on_disk(ck, path.removesuffix(TOKENS) + ".weight"), []).append((adapter, key, t))
                continue
            path = on_disk(ck, path)  # a base stored under other names than the model PEFT saved it from
            like = path if path in ck.tensors else _tied_source(ck, path)
            if like is None:
                raise SurgeryError(f"{adapter.source}: {key} replaces a tensor the base does not have ({path})")
            shape, base_shape = list(t.shape), list(ck.tensors[like].shape)
            if shape != base_shape:
                if not (resized_table(path, shape, base_shape) and base_shape[0] == _vocab_size(ck)):
                    raise SurgeryError(f"{adapter.source}: {key} has shape {shape}, base {like} {base_shape}")
                resized[path] = (base_shape[0], shape[0], adapter)
            if path in replaced:
                raise SurgeryError(f"{path}: replaced by two adapters' modules_to_save")
            replaced[path] = t
            if like != path:
                created[path] = like
                notes.append(f"{path} (modules_to_save) is written as its own tensor; tie_word_embeddings is set "
                             "to false")
    rows = {k: tuple(_token_rows(ck, k, *e, replaced) for e in v) for k, v in tokens.items()}
    for key, parts in rows.items():  # several adapters' tokens on one table: disjoint, as PEFT's merge demands
        if sum(len(i) for i, _ in parts) != len({j for i, _ in parts for j in i}):
            raise SurgeryError(f"{key}: the adapters' trainable tokens overlap; PEFT merges only disjoint ones")
    return replaced, _resized(ck, resized, notes), rows


TOKENS = ".token_adapter.trainable_tokens_delta"  # PEFT trainable tokens: the new values of some rows


def _token_rows(ck: Checkpoint, key: str, adapter: Adapter, saved: str, values, replaced: Mapping) -> tuple:
    """(indices, values) of PEFT trainable tokens for base tensor `key`: the indices from the config's
    `trainable_token_indices` (a list: the input embedding's; a dict: by module name), checked against the table."""
    where, module = f"{adapter.source}: {saved}", key.removesuffix(".weight")
    spec = ck.tensors.get(key)
    if spec is None:
        raise SurgeryError(f"{where}: replaces rows of a tensor the base does not have ({key})")
    indices = adapter.config.get("trainable_token_indices")
    if isinstance(indices, dict):
        found = [v for k, v in indices.items() if module == k or module.endswith("." + k)]
        indices = found[0] if len(found) == 1 else None
    rows = replaced[key].shape[0] if key in replaced else spec.shape[0]
    if not (isinstance(indices, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < rows
                                              for i in indices) and len(set(indices)) == len(indices)):
        raise SurgeryError(f"{where}: trainable_token_indices gives no distinct rows of {key} ({rows} rows) for it")
    if tuple(values.shape) != (len(indices), spec.shape[1]):
        raise SurgeryError(f"{where}: shape {list(values.shape)}, but {len(indices)} token(s) of {key}'s "
                           f"{spec.shape[1]} columns")
    return tuple(indices), values


def _vocab_size(ck: Checkpoint) -> int | None:
    """config.json's vocab_size (or its text_config's, as multimodal models keep it)."""
    cfg = ck.config() if ck.is_dir else {}  # a single-file output has no config.json to update
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    value = cfg.get("vocab_size", text.get("vocab_size"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _resized(ck: Checkpoint, resized: Mapping[str, tuple], notes: list) -> tuple | None:
    """A vocabulary resized by `modules_to_save` tables (PEFT's `save_embedding_layers`, which PEFT turns on when
    the embeddings were resized for added tokens): as PEFT loads it — on a base resized first — every vocabulary
    table of the base (input embedding, untied output head) must get the new rows, else the model is inconsistent."""
    if not resized:
        return None
    sizes = {(old, new) for old, new, _ in resized.values()}
    if len(sizes) > 1:
        raise SurgeryError(f"modules_to_save resize the vocabulary to different sizes: {', '.join(sorted(resized))}")
    (old, new), adapter = sizes.pop(), next(iter(resized.values()))[2]
    tables = [k for k in ck.tensors if VOCAB_TABLE.search(k) and ck.tensors[k].shape[0] == old]
    if kept := [k for k in tables if k not in resized]:
        raise SurgeryError(f"{adapter.source}: resizes the vocabulary from {old} to {new} rows "
                           f"({', '.join(sorted(resized))}) but leaves the base's {listed(kept)} at {old}")
    notes.append(f"the vocabulary is resized from {old} to {new} rows by {adapter.source}'s {', '.join(sorted(resized))}"
                 " (modules_to_save); config.json's vocab_size is set to it")
    return old, new, adapter


# ---------------------------------------------------------------- streaming


@dataclass(frozen=True)
class MergeReport:
    output: str
    tensors_merged: int
    tensors_created: int
    tensors_copied: int
    shards: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...] = ()
    quantized: Mapping | None = None  # a quantized base: method, how it was written, adapter_survived (--requantize)

    def to_dict(self) -> dict:
        return dict(self.__dict__, notes=list(self.notes), quantized=self.quantized)


def _parse_size(text: str | int | None) -> int | None:
    """'5GB' → 5·10⁹ bytes, '2GiB' → 2·2³⁰ (an int as it is); at least one byte (0 wrote one shard per
    tensor)."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    elif m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", str(text).upper()):  # GiB → GIB
        size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2) or "_"))
    else:
        raise SurgeryError(f"shard size {text!r}: expected e.g. 5GB, 500MB, 2GiB")
    if size < 1:
        raise SurgeryError(f"shard size {text!r}: must be at least one byte (e.g. 5GB)")
    return size


def _shards(ck: Checkpoint, sizes: Mapping[str, int], shard_size: int | None,
            place: Mapping[str, TensorSpec]) -> list[tuple[str, list[str]]]:
    """Output shard names and their tensors (in `sizes`' order): the base's split — each tensor in the shard of
    the base tensor `place` gives it —, or a greedy re-split."""
    if shard_size is None:
        groups = {s: [] for s in ck.shards}
        for name in sizes:  # a created tensor (an untied lm_head) goes to the first shard
            groups[place[name].path.name if name in place else ck.shards[0]].append(name)
        return list(groups.items())
    out, cur, used = [], [], 0
    for name in sizes:
        if cur and used + sizes[name] > shard_size:
            out.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += sizes[name]
    out.append(cur)
    if len(out) == 1:
        return [(weights_name(ck.stem, ck.variant), out[0])]
    return [(weights_name(ck.stem, ck.variant, (i + 1, len(out))), names) for i, names in enumerate(out)]


def _model_folder(folder: Path) -> bool:
    """Whether an existing output folder may be replaced whole: empty, or a model / pipeline folder (an earlier
    merge, a downloaded model) and not a git repository."""
    names = {p.name for p in folder.iterdir()}
    return not names or ".git" not in names and bool(
        names & {"config.json", "model_index.json"} or any(n.endswith(".safetensors") for n in names))


def _weights(weights: Sequence[float] | None, adapters: Sequence[Adapter]) -> list[float]:
    """One finite weight per adapter (default 1 each)."""
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise SurgeryError(f"{len(weights)} --weight values for {len(adapters)} adapters")
    weights = check_weights(weights, "--weight values")
    for a, w in zip(adapters, weights):
        for name, m in a.modules.items():
            check_scaled(name, m, w)
    return weights


def merge(base: str | Path, adapters: Sequence[Adapter], out: str | Path, *, weights: Sequence[float] | None = None,
          dtype: str | torch.dtype | None = None, device: str | torch.device = "auto",
          compute_dtype: torch.dtype = torch.float32, shard_size: str | int | None = None,
          allow_missing: bool = False, skip_modules_to_save: bool = False, force: bool = False,
          requantize: bool = False, progress: Callable[[str], None] | None = None) -> MergeReport:
    """Write `base` with every adapter merged (`W + Σ wᵢ ΔWᵢ`) to `out`, in the base's layout: one file, a model
    or component folder, or a diffusers pipeline (each module merged into its component, the rest copied).

    A quantized base (FP8 block-scaled, MXFP4; surgery.io.quant) whose quantized weights change is written
    dequantized in its model dtype, the whole model (one quantization_config cannot cover a half-quantized
    checkpoint); `requantize` keeps its layout instead — changed weights quantized again with fresh scales,
    the rest byte for byte — and the report says how much of the adapter survived that.

    Memory: one tensor at a time (plus the adapters' factors). The output appears only when complete.
    """
    t0 = time.perf_counter()
    adapters = adapter_list(adapters, "merge")
    weights, compute_dtype = _weights(weights, adapters), _compute_dtype(compute_dtype)
    base = hub.resolve(base)
    if gguf_file.is_gguf(base):
        return merge_gguf(base, adapters, out, weights=weights, dtype=dtype, device=device,
                          compute_dtype=compute_dtype, shard_size=shard_size, allow_missing=allow_missing, force=force,
                          progress=progress)
    pipeline = open_pipeline(base) if is_pipeline(base) else None
    sets = None if pipeline else open_weight_sets(base)
    ck = None if pipeline else sets[0]
    root = pipeline.root if pipeline else ck.root
    out = Path(out)
    if os.path.realpath(out) == os.path.realpath(root):  # (realpath: a symlink loop is the loop, refused below)
        raise SurgeryError(f"{out}: is the base itself; write the merged model elsewhere")
    check_output(out, [base] + [a.source for a in adapters if a.source is not None], force=True)  # nor inside one
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise SurgeryError(f"{out}: exists and is not empty; choose a new path or pass --force")
    if out.is_dir() and not _model_folder(out):  # --force swaps the whole folder: never a home or a repository
        raise SurgeryError(f"{out}: exists and is not a model folder (no config.json, model_index.json or "
                           "safetensors in it); --force replaces only an earlier model, choose another path")
    is_dir = pipeline is not None or ck.is_dir
    if is_dir == (out.suffix == ".safetensors"):
        raise SurgeryError(f"{out}: the base is {'a directory' if is_dir else 'one file'}; "
                           f"give {'a directory' if is_dir else 'a .safetensors file'}")
    if shard_size is not None and not is_dir:
        raise SurgeryError("--shard-size needs a model directory as the base (a single file stays one file)")
    opts = dict(device=resolve_device(device), sdtype=storage_dtype(dtype), compute_dtype=compute_dtype,
                shard_size=_parse_size(shard_size), progress=progress, requantize=requantize, survival=[])
    if requantize and (ck is None or ck.quant is None):
        raise SurgeryError(f"--requantize: {root} is not a quantized checkpoint (FP8 block-scaled or MXFP4)")
    if requantize and ck.quant.method == "compressed-tensors":
        raise SurgeryError(f"--requantize: {root} is a compressed-tensors checkpoint, whose scales come from an "
                           "observer surgery does not reproduce; merge without --requantize (written dequantized)")
    if requantize and opts["sdtype"] is not None:
        raise SurgeryError("--requantize keeps the base's quantized layout and dtypes; drop --dtype")
    notes: list[str] = []
    if pipeline is not None:
        plans, notes = _plan_pipeline(pipeline, adapters, weights, allow_missing)
    else:
        plans = {None: [(c, plan_merge(c, adapters, weights, allow_missing, skip_modules_to_save)) for c in sets]}
    _check_variant_dtypes([c for pairs in plans.values() for c, _ in pairs], opts["sdtype"])
    counts = dict(merged=0, created=0, copied=0, shards=0, total=0, dequantized=0)
    with atomic_output(out, is_dir=is_dir, replace=True) as tmp:
        for component, pairs in plans.items():
            target = tmp / component if component else tmp
            if component:
                target.mkdir()
            for c, plan in pairs:
                result = _write_checkpoint(c, plan, target, **opts)
                for k, v in result.items():
                    counts[k] += v
                notes.extend(plan.notes)
            if is_dir:
                notes.extend(_finish_folder([c for c, _ in pairs], pairs[0][1], target,
                                            out if component is None else out / component, opts["sdtype"],
                                            dequantized=bool(result["dequantized"])))
            if component or len(pairs) > 1:
                variants = ", ".join(c.variant or "plain" for c, _ in pairs)
                notes.append(f"{component or out}: {result['merged']} tensor(s) merged, {result['copied']} copied"
                             + (f", in each of its weight sets ({variants})" if len(pairs) > 1 else ""))
        if pipeline is not None:
            done = {pipeline.root / c for c in plans}
            for p in sorted(pipeline.root.iterdir()):
                if p in done or p.name.startswith(".") or os.path.realpath(p) == os.path.realpath(out):
                    continue
                for f in files_below(p):
                    (tmp / f.relative_to(pipeline.root)).parent.mkdir(parents=True, exist_ok=True)
                    copy_file(f, tmp / f.relative_to(pipeline.root))
                if p.name in pipeline.components:
                    counts["copied"] += len(pipeline.components[p.name].tensors)
    quantized = _quantized_report(ck, counts["dequantized"], opts, notes) if ck is not None and ck.quant else None
    return MergeReport(str(out), counts["merged"], counts["created"], counts["copied"], counts["shards"],
                       counts["total"], round(time.perf_counter() - t0, 3), tuple(dict.fromkeys(notes)), quantized)


def _quantized_report(ck: Checkpoint, dequantized: int, opts: dict, notes: list) -> dict:
    """What a quantized base became, with a note saying why; with --requantize, how much of the adapter survived:
    1 − ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖ per weight and over all of them (1: arrived exactly; 0: as far from the
    intended weights as the unmerged base)."""
    method = {"compressed-tensors": "compressed-tensors FP8"}.get(ck.quant.method, ck.quant.method.upper())
    if dequantized:
        dt = str(opts["sdtype"] or ck.quant.dtype).removeprefix("torch.")
        notes.append(f"the {method} base is written dequantized, in {dt} (quantization_config removed): a LoRA-sized "
                     f"ΔW is mostly below {method}'s rounding step, so re-quantizing would erase most of it; "
                     "--requantize keeps the quantized layout and reports how much of the adapter survives")
        return {"method": ck.quant.method, "written": dt}
    survival = opts["survival"]
    if not survival:
        notes.append(f"the adapters change no {method} weight: they are copied as they are (quantization_config kept)")
        return {"method": ck.quant.method, "written": ck.quant.method}
    modules = [{"name": n, "adapter_survived": _survived(e, d), "delta_norm": math.sqrt(d)} for n, e, d in survival]
    overall = _survived(sum(e for _, e, _ in survival), sum(d for _, _, d in survival))
    notes.append(f"{len(modules)} weight(s) re-quantized to {method}: adapter_survived {overall:.3f} (1: the merged "
                 "weights arrived exactly; 0: as far from them as the unmerged base)")
    return {"method": ck.quant.method, "written": ck.quant.method, "adapter_survived": overall, "modules": modules}


def _survived(err2: float, delta2: float) -> float:
    return 1.0 - math.sqrt(err2 / delta2) if delta2 > 0 else 1.0


def _plan_pipeline(pipeline: Pipeline, adapters: Sequence[Adapter], weights: Sequence[float],
                   allow_missing: bool) -> tuple[dict[str, tuple[Checkpoint, MergePlan]], list[str]]:
    """Each adapter's modules sent to the pipeline component they update, then one merge plan per component;
    and the notes of the placement (splits, fusions, skipped modules)."""
    targets = list(pipeline.components.items())
    per: dict[str, list[tuple[Adapter, float]]] = {}
    notes = []
    for a, w in zip(adapters, weights):
        if a.passthrough and a.format != "kohya":
            keys = ", ".join(sorted(a.passthrough)[:3])
            raise SurgeryError(f"{a.source}: carries non-LoRA tensors ({keys}) that a pipeline merge has no place for")
        p = place(a, targets)
        for name, wanted in p.absent.items():  # a component that is there, but not in safetensors
            for c in pipeline.classes:
                if c not in pipeline.components and (c == wanted or (wanted == "denoiser" and c in DENOISERS)):
                    raise SurgeryError(f"{pipeline.root / c}: holds no safetensors weights (module {name} is for it); "
                                       "convert it to safetensors first — surgery never unpickles")
        if p.missing and not allow_missing:
            raise missing_error(a.source or pipeline.root, p.missing)
        if p.missing:
            notes.append(f"{a.source}: {len(p.missing)} module(s) without a base tensor were skipped: "
                         f"{', '.join(list(p.missing)[:5])}")
        notes.extend(p.notes)
        by_component: dict[str, dict] = {}
        for (c, path), m in p.modules.items():
            by_component.setdefault(c, {})[path] = m
        for c, modules in by_component.items():
            sub = a.with_modules(modules, passthrough={}, config={
                "name_style": "base", "fan_in_fan_out": bool(a.config.get("fan_in_fan_out"))})
            per.setdefault(c, []).append((sub, w))
    plans = {}
    for c, pairs in per.items():
        plans[c] = [(ck, plan_merge(ck, [a for a, _ in pairs], [w for _, w in pairs]))
                    for ck in open_weight_sets(pipeline.root / c, pipeline.components[c])]
    return plans, notes


DTYPE_VARIANTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _check_variant_dtypes(checkpoints: Sequence[Checkpoint], sdtype: torch.dtype | None) -> None:
    """`--dtype` must not store another dtype under a variant named for one (`….fp16.safetensors` in bfloat16)."""
    for c in checkpoints:
        if sdtype is not None and DTYPE_VARIANTS.get(c.variant, sdtype) != sdtype:
            raise SurgeryError(f"{c.root}: its weight variant {c.variant} would be stored as "
                               f"{str(sdtype).removeprefix('torch.')}; merge without --dtype, or keep only the "
                               "weight set you want in the base folder")


def _write_checkpoint(ck: Checkpoint, plan: MergePlan, target: Path, *, device, sdtype, compute_dtype,
                      shard_size: int | None, progress, requantize: bool = False,
                      survival: list | None = None) -> dict[str, int]:
    """Stream `ck` with `plan` applied into `target` (a folder for a directory base, else the file), shard by
    shard, one tensor at a time, with its index where the shard names need one; untouched tensors are copied as
    raw bytes.

    A quantized base (surgery.io.quant) whose quantized weights the plan changes is written dequantized: every
    quantized weight in the model's dtype (`ck.quant.dtype`, or `sdtype`), its scales dropped. With `requantize`
    the changed weights are quantized again in the base's own layout (fresh scales) and everything else is copied
    as it is; `survival` receives (name, ‖Q(W+ΔW) − (W+ΔW)‖², ‖ΔW‖²) per changed quantized weight."""
    dev = device
    scratches = itertools.cycle([Scratch(dev), Scratch(dev)])  # tensor i is written while i + 1 is made
    # the worker making tensors leaves one core to the writer (OpenMP's team size is per OS thread): on 2 cores,
    # 2 threads of conversions beside the writer's page-cache copies ran 1.4× slower end to end (MoE experts)
    cores = torch.get_num_threads()
    threads = max(1, cores - 1)
    dequantize = ck.quant is not None and not requantize and any(
        source(ck, plan, n).codec is not None for n in plan.changes)

    def out_dtype(spec: TensorSpec) -> torch.dtype:
        if spec.codec is not None:
            return sdtype or ck.quant.dtype
        return sdtype if sdtype is not None and spec.torch_dtype in FLOATS else spec.torch_dtype

    def computed(name: str, change: Change, spec: TensorSpec, odt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The output tensor in `odt`, and the base tensor it was made from."""
        torch.set_num_threads(threads)
        base = products = None
        if change is None:
            t = read_tensor(spec).to(odt)
        elif change.kind == "weight" and (products := streamable(name, change, spec)) is not None:
            torch.set_num_threads(cores)  # in cache, compute-bound: every core (1.12× on an 8-layer FP8 merge)
            t = _streamed(spec, products, compute_dtype, next(scratches), odt)  # finiteness checked block by block
        else:
            t, base = changed_tensor(spec, change, name in plan.transposed, odt, compute_dtype, dev, next(scratches))
        if products is None and not all_finite(t):
            if base is not None and not all_finite(base):
                raise SurgeryError(f"{spec.path}: base tensor {spec.name} already holds NaN or Inf; the base is "
                                   "broken, not the merge")
            raise SurgeryError(f"{name}: the merge produced NaN or Inf (overflow in {odt}?)")
        if progress and change is not None:
            progress(name)
        return t.cpu(), base

    def streamable(name: str, change: Change, spec: TensorSpec) -> list | None:
        """The change as row-sliceable products when it can be formed a block of rows at a time (plain LoRA parts,
        CPU, a base stored plain or with per-block-row scales), else None."""
        if torch.device(dev).type != "cpu" or spec.codec is not None and spec.codec.rows is None or change.base_rows:
            return None
        return _row_products(change.parts, name in plan.transposed, compute_dtype, dev)

    def entry(name: str) -> Entry:
        change, spec = plan.changes.get(name), source(ck, plan, name)
        odt = out_dtype(spec)
        if change is None and odt == spec.torch_dtype and spec.codec is None:
            return copy_entry(spec)
        shape = change.replacement.shape if change is not None and change.kind == "replace" else spec.shape
        return tensor_entry(name, lambda: computed(name, change, spec, odt)[0], odt, tuple(shape))

    def requantized(name: str) -> list[Entry]:
        """A changed quantized weight's values and scale, made once (W + ΔW in `compute_dtype`, quantized once)."""
        spec = ck.tensors[name]
        change = plan.changes[name]
        if change.kind != "weight":
            raise SurgeryError(f"{name}: replaced by a modules_to_save tensor; it cannot be re-quantized "
                               "(merge without --requantize)")
        values, scale = spec.parts[:2]

        def make():
            products = streamable(name, change, spec)
            if products is not None:  # compute-bound: every core (the writer mostly waits on the disk)
                torch.set_num_threads(cores)
                out = _streamed_requantized(spec, products, compute_dtype, next(scratches), survival)
                if progress:
                    progress(name)
                return out
            return _requantize(spec, *computed(name, change, spec, compute_dtype), survival)

        pair = Once(make, 2)
        return [tensor_entry(values.name, lambda: pair.take(0), values.torch_dtype, values.shape),
                replace(tensor_entry(scale.name, lambda: pair.take(1), scale.torch_dtype, scale.shape),
                        after=values.name)]

    if dequantize or ck.quant is None:
        names = list(ck.tensors) + [n for n, c in plan.changes.items() if c.source]
        made = {n: [entry(n)] for n in names}
        place = dict(ck.tensors)
    else:  # the stored tensors: quantized ones copied as they are, or re-quantized where the plan changes them
        owned = {p.name: q for q, spec in ck.tensors.items() for p in spec.parts}
        changed = {q for q in plan.changes if ck.tensors.get(q) is not None and ck.tensors[q].codec is not None}
        names = list(ck.stored) + [n for n, c in plan.changes.items() if c.source]
        made = {}
        for n in names:
            q = owned.get(n)
            if q in changed and n == ck.tensors[q].parts[0].name:
                for e in requantized(q):
                    made[e.name] = [e]
            elif q is not None:
                made.setdefault(n, [copy_entry(ck.stored[n])])
            else:
                made[n] = [entry(n)]
        place = dict(ck.stored)
    sizes = {n: made[n][0].nbytes for n in names}
    groups = _shards(ck, sizes, shard_size, place)
    total = 0
    folder = target if ck.is_dir else target.parent
    weight_map = {}
    for shard, group in groups:
        prefetch([place[n] for n in group if n in place])
        meta = ck.metadata.get(shard) or next(iter(ck.metadata.values()), None)
        total += write_shard(folder / shard if ck.is_dir else target, [e for n in group for e in made[n]], meta)
        weight_map.update({n: shard for n in group})
    if ck.is_dir and (len(groups) > 1 or ck.index is not None or groups[0][0] != weights_name(ck.stem, ck.variant)):
        content = {"metadata": {**(ck.index or {}).get("metadata", {}), "total_size": total},
                   "weight_map": dict(sorted(weight_map.items()))}
        (folder / index_name(ck.stem, ck.variant)).write_text(json.dumps(content, indent=2) + "\n")
    merged = sum(1 for c in plan.changes.values() if not c.source)
    return dict(merged=merged, created=sum(1 for c in plan.changes.values() if c.source),
                copied=len(ck.tensors) - merged, shards=len(groups), total=total, dequantized=int(dequantize))


ROW_BLOCK = 1 << 20  # float32 elements per block of rows of a streamed merge (4 MiB: its passes stay in cache)


def _row_products(parts, transposed: bool, dtype: torch.dtype, device) -> list | None:
    """Each part as (lhs (rows, r), rhs (r, cols), alpha) with lhs @ rhs laid out like the base tensor's rows
    (flattened to 2-D), when every part is a plain LoRA; else None (DoRA, LoHa, LoKr, experts: whole tensors)."""
    out = []
    for m, w in parts:
        if not isinstance(m, LoraModule) or m.magnitude is not None:
            return None
        B, A = m.factors(dtype, device)  # (out, r), (r, in_flat)
        out.append((A.T, B.T, w * m.scale) if m.kind == "embedding" or transposed else (B, A, w * m.scale))
    return out


def _rows(spec: TensorSpec, products: list, compute: torch.dtype, scratch: Scratch, emit: Callable) -> None:
    """W + Σ αᵢ lhsᵢ @ rhsᵢ formed one block of rows at a time (about ROW_BLOCK values: each pass over it —
    decoding, the GEMM, rounding, quantizing — runs in cache rather than over the whole tensor in memory); each
    block goes to `emit(r0, r1, acc)`, which says whether what it made of the block is finite."""
    rows, cols = spec.shape[0], math.prod(spec.shape[1:])
    codec = spec.codec
    unit = codec.rows if codec is not None else 1
    step = max(unit, ROW_BLOCK // max(cols, 1) // unit * unit)
    raw = scratch.get("read", (spec.nbytes,), torch.uint8)  # a quantized weight's spans its stored values
    if codec is not None:
        values, scale = read_stored(spec, raw)

        def load(r0, r1, out):
            return codec.decode(values[r0:r1], scale[codec.scale_rows(r0, r1)], out, scratch.get)
    else:
        W = read_tensor(spec, raw).reshape(rows, cols)

        def load(r0, r1, out):
            return out.copy_(W[r0:r1])
    accs = scratch.get("rows", (step, cols), compute)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        acc = load(r0, r1, accs[: r1 - r0])
        for lhs, rhs, alpha in products:
            acc.addmm_(lhs[r0:r1], rhs, alpha=alpha)
        if not emit(r0, r1, acc):  # a block not finite: the base's fault, or the merge's
            if not all_finite(load(r0, r1, torch.empty_like(acc))):
                raise SurgeryError(f"{spec.path}: base tensor {spec.name} already holds NaN or Inf; the base is "
                                   "broken, not the merge")
            raise SurgeryError(f"{spec.name}: the merge produced NaN or Inf (overflow in the stored dtype?)")


def _streamed(spec: TensorSpec, products: list, compute: torch.dtype, scratch: Scratch,
              odt: torch.dtype) -> torch.Tensor:
    """The merged tensor in `odt` (a reused buffer), made a block of rows at a time."""
    out = scratch.get("out", (spec.shape[0], math.prod(spec.shape[1:])), odt)
    _rows(spec, products, compute, scratch, lambda r0, r1, acc: all_finite(out[r0:r1].copy_(acc)))
    return out.view(spec.shape)


def _streamed_requantized(spec: TensorSpec, products: list, compute: torch.dtype, scratch: Scratch,
                          survival: list | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged weight quantized again in its codec, a block of rows at a time (each block's scales are its
    own); the survival terms: ‖Q(W+ΔW) − (W+ΔW)‖² summed over the blocks, ‖ΔW‖² from the factors."""
    values, scale = spec.parts[:2]
    codec, err = spec.codec, [0.0]
    q_out = torch.empty(values.shape, dtype=values.torch_dtype)
    s_out = torch.empty(scale.shape, dtype=scale.torch_dtype)

    def emit(r0, r1, acc):
        try:
            _, s = codec.encode(acc, scale.torch_dtype, q_out[r0:r1], scratch.get)
        except ValueError:
            return False
        s_out[codec.scale_rows(r0, r1)] = s
        if survival is not None:  # Q(W + ΔW) − (W + ΔW), row by row
            Q = codec.decode(q_out[r0:r1], s, scratch.get("requantized", tuple(acc.shape), torch.float32), scratch.get)
            err[0] += _rows_sq(Q.sub_(acc))
        return True

    _rows(spec, products, compute, scratch, emit)
    if survival is not None:
        survival.append((spec.name, err[0], _products_sq(products)))
    return q_out, s_out


def _products_sq(products: list) -> float:
    """‖Σ αᵢ Lᵢ Rᵢ‖²_F in float64 from the factors: Σᵢⱼ αᵢαⱼ tr((LᵢᵀLⱼ)(RⱼRᵢᵀ)), r × r products only."""
    total = 0.0
    for a, b in itertools.product(products, repeat=2):
        (La, Ra, alpha), (Lb, Rb, beta) = a, b
        total += alpha * beta * float(((La.double().T @ Lb.double()) * (Ra.double() @ Rb.double().T)).sum())
    return total


def _rows_sq(x: torch.Tensor) -> float:
    """‖x‖² of a block of rows: float32 row norms, summed in float64."""
    return float(torch.linalg.vector_norm(x, dim=1).double().square().sum())


def source(ck: Checkpoint, plan: MergePlan, name: str) -> TensorSpec:
    """The base tensor an output tensor starts from (a created lm_head starts from its tied embedding)."""
    change = plan.changes.get(name)
    return ck.tensors[change.source] if change and change.source else ck.tensors[name]


class Once:
    """A value made on the first of `uses` takes and dropped after the last."""

    def __init__(self, make: Callable, uses: int):
        self.make, self.uses, self.held, self.lock = make, uses, None, threading.Lock()

    def take(self, i: int):
        with self.lock:
            if self.held is None:
                self.held = self.make()
            held, self.uses = self.held, self.uses - 1
            if self.uses <= 0:
                self.held = None
            return held[i]


def _requantize(spec: TensorSpec, merged: torch.Tensor, W: torch.Tensor,
                survival: list | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scale) of the merged weight in the base's codec, scales in the base's scale dtype; and the
    survival terms: ‖Q(W+ΔW) − (W+ΔW)‖² and ‖ΔW‖² in float64, W the dequantized base."""
    values, scale = spec.parts[:2]
    q, s = spec.codec.encode(merged, scale.torch_dtype)
    s = s.reshape(scale.shape)
    if survival is not None:
        survival.append((spec.name, _sq_dist(spec.codec.decode(q, s), merged), _sq_dist(merged, W)))
    return q.reshape(values.shape), s


def _sq_dist(a: torch.Tensor, b: torch.Tensor, rows: int = 1 << 22) -> float:
    """‖a − b‖² summed in float64, a few million elements at a time."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float((a[i:i + rows].double() - b[i:i + rows].double()).square().sum()) for i in range(0, len(a), rows))


def _finish_folder(sets: Sequence[Checkpoint], plan: MergePlan, folder: Path, shown: Path,
                   sdtype: torch.dtype | None, dequantized: bool = False) -> list[str]:
    """The rest of a merged model folder: its other files copied (not the weight sets just written, nor weights in
    other formats, which would be stale), config.json updated for an untied head, a new dtype, or a quantized
    base written dequantized (its quantization_config removed, its dtype the one written)."""
    ck = sets[0]
    skip = {n for c in sets for n in c.shards + (index_name(c.stem, c.variant),)}
    root, o = ck.root.resolve(), shown.resolve()  # an output inside the base (base/merged): not copied into itself
    left_out = copy_side_files(ck.root, folder, skip=skip, skip_dirs={o.relative_to(root)} if o.is_relative_to(root)
                               else set())
    notes = [f"not copied (other weight formats would hold unmerged weights): {', '.join(left_out)}"] if left_out else []
    if dequantized and sdtype is None:
        sdtype = ck.quant.dtype
    if plan.vocab:
        notes.append(_take_tokenizer(plan.vocab, folder))
    if (plan.untie or plan.vocab or sdtype is not None or dequantized) and (folder / "config.json").exists():
        cfg = read_object(folder / "config.json")
        if plan.untie:
            cfg["tie_word_embeddings"] = False
        if plan.vocab:
            (cfg if "vocab_size" in cfg else cfg["text_config"])["vocab_size"] = plan.vocab[1]
        if dequantized:
            cfg.pop("quantization_config", None)
        if sdtype is not None:  # transformers loads at this dtype: it must be the stored one (diffusers has none)
            name = str(sdtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg or (key == "torch_dtype" and ck.stem == "model"):
                    cfg[key] = name
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return notes


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def _take_tokenizer(vocab: tuple, folder: Path) -> str:
    """With a resized vocabulary the base's tokenizer lacks the added tokens: the adapter folder's tokenizer (a
    trainer saves it beside the adapter) replaces it whole, or a note says it must be added."""
    old, new, adapter = vocab
    src = Path(adapter.source) if adapter.source is not None else None
    files = [f for f in TOKENIZER_FILES if src is not None and src.is_dir() and (src / f).is_file()]
    if not set(files) & {"tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt"}:
        # no vocabulary of its own (a chat template alone, say): the base's is kept whole
        return (f"the base's tokenizer was copied: it does not know the vocabulary's {new - old:+d} row(s); put the "
                "tokenizer the adapter was trained with beside the merged model")
    for f in TOKENIZER_FILES:
        (folder / f).unlink(missing_ok=True)
    for f in files:
        copy_file(src / f, folder / f)
    return f"the tokenizer is {src}'s ({', '.join(files)}), which knows the resized vocabulary; the base's is left out"


# ---------------------------------------------------------------- GGUF models (llama-export-lora)


def merge_gguf(base: str | Path, adapters: Sequence[Adapter], out: str | Path, *,
               weights: Sequence[float] | None = None, dtype=None, device: str | torch.device = "auto",
               compute_dtype: torch.dtype = torch.float32, shard_size=None, allow_missing: bool = False,
               force: bool = False, progress: Callable[[str], None] | None = None) -> MergeReport:
    """What `llama-export-lora` does: a GGUF model with the adapters merged, streamed one tensor at a time.

    Adapters are taken to llama.cpp's naming and layout for this base (`gguf_file.to_gguf`; a GGUF adapter as it
    is). F32 / F16 / BF16 tensors: `W + Σ wᵢ ΔWᵢ` in float32, rounded once; Q8_0: dequantized, merged and
    re-quantized (the error that adds is reported); other types are refused. Metadata and untouched tensors are
    copied byte for byte.
    """
    t0 = time.perf_counter()
    base, out = Path(base), Path(out)
    weights = _weights(weights, adapters)
    if storage_dtype(dtype) is not None or shard_size is not None:
        raise SurgeryError(f"{base}: a GGUF model keeps each tensor's type and stays one file; merge without "
                           "--dtype and --shard-size")
    if out.suffix.lower() != gguf_file.SUFFIX:
        raise SurgeryError(f"{out}: the base is a GGUF model; give a .gguf output")
    check_output(out, [base] + [a.source for a in adapters if a.source is not None], force=force)
    reader = gguf_file.open_reader(base)
    info = gguf_file.base_info(base, reader)
    refs = gguf_file.tensor_refs(reader, base)
    parts: dict[str, list[tuple[LoraModule, float]]] = {}
    notes = []
    for a, w in zip(adapters, weights):
        a.check_plain("a merge into the base")
        named = gguf_file.to_gguf(a, info, allow_missing)
        notes += [n for n in named.notes if n not in a.notes]
        for name, m in named.modules.items():
            key = name + ".weight"
            if key not in refs:
                if not allow_missing:
                    raise SurgeryError(f"{a.source}: module {name} has no tensor {key} in {base} (--allow-missing "
                                       "skips it)")
                notes.append(f"{a.source}: {name} skipped (no tensor {key} in the base)")
                continue
            if tuple(refs[key].shape) != (shape := gguf_file.weight_shape(m)):
                raise SurgeryError(f"{a.source}: {name} updates a {shape} weight, but {base} has {key} "
                                   f"{tuple(refs[key].shape)} (an adapter for another model?)")
            if m.kind == "experts":  # the whole (E, out, in) tensor, one batched GEMM
                m = ExpertPart(SharedFactors(m, 1), Piece(Param(key, m.shape, False, ())))
            parts.setdefault(key, []).append((m, w))
    for key in parts:
        if gguf_file.type_name(refs[key].qtype) not in gguf_file.TYPES:
            raise SurgeryError(f"{base}: tensor {key} is {gguf_file.type_name(refs[key].qtype)}, which surgery does "
                               f"not re-quantize as llama.cpp does; merge into an {', '.join(gguf_file.TYPES)} model")
    dev = resolve_device(device)
    error = {"q": 0.0, "delta": 0.0, "n": 0}
    largest = max(r.nbytes for r in refs.values())
    # reused read buffers and scratch, two sets: write_file makes the next tensor while it writes this one
    sets = [(np.empty(largest, np.uint8), Scratch(dev)) for _ in range(2)]

    def merged(key: str, buffer: np.ndarray, scratch: Scratch) -> Callable:
        def make():
            ref = refs[key]
            W = ref.tensor(buffer)
            kind = gguf_file.type_name(ref.qtype)
            new = merged_weight(W, parts[key], out_dtype=gguf_file.FLOATS.get(kind, torch.float32), compute=compute_dtype,
                                device=dev, scratch=scratch).cpu()
            if not all_finite(new):
                raise SurgeryError(f"{base}: merging into {key} gives NaN or Inf")
            data = gguf_file.encode(new, ref.qtype)
            if kind == "q8_0":
                back = torch.from_numpy(gguf_file.decode(data, ref.qtype)).reshape(new.shape).double()
                error["q"] += float((back - new.double()).square().sum())
                error["delta"] += float((new.double() - W.double()).square().sum())
                error["n"] += 1
            if progress:
                progress(key)
            return data
        return make

    tensors = [gguf_file.Planned(t.name, refs[t.name].shape, t.tensor_type,
                                 merged(t.name, *sets[i % 2]) if t.name in parts else
                                 (lambda t=t: t.data.view(np.uint8).reshape(-1)))  # the mapped bytes, as they are
               for i, t in enumerate(reader.tensors)]
    with atomic_output(out, is_dir=False) as tmp:
        gguf_file.write_file(tmp, reader, gguf_file.copied_fields(reader), tensors)
    if error["n"]:
        notes.append(f"{error['n']} Q8_0 tensor(s) re-quantized: the rounding error is "
                     f"{math.sqrt(error['q'] / error['delta']) if error['delta'] else 0.0:.2%} of the merged "
                     "update's norm (‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖)")
    return MergeReport(str(out), len(parts), 0, len(reader.tensors) - len(parts), 1, out.stat().st_size,
                       round(time.perf_counter() - t0, 3), tuple(notes))
