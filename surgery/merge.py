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
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .adapter import Adapter, LoraModule, materialize
from .device import resolve_device, storage_dtype
from .errors import SurgeryError
from .io import check_output
from .io.peft import PREFIX
from .io.checkpoint import (INDEX, SINGLE, Checkpoint, TensorSpec, copy_entry, copy_side_files, open_checkpoint,
                            read_tensor)
from .io.safetensors_file import Entry, atomic_output, tensor_entry, write_shard

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_",
                  "lycoris_", "lora_")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TIED_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


# ---------------------------------------------------------------- per-tensor maths


def weight_delta(m: LoraModule, shape: Sequence[int], fan_in_fan_out: bool, dtype, device) -> torch.Tensor:
    """ΔW laid out like the base tensor: embedding tables get ΔWᵀ, convs the kernel shape, GPT-2 `Conv1D`
    (fan_in_fan_out) ΔWᵀ."""
    d = m.delta(dtype, device)  # (out, in_flat)
    if m.kind == "embedding" or fan_in_fan_out:
        d = d.T
    return d.reshape(tuple(shape))


def add_delta_(acc: torch.Tensor, m: LoraModule, w: float, fan_in_fan_out: bool = False) -> None:
    """acc += w · ΔW in place, laid out like the base tensor; for LoRA one fused GEMM
    (`addmm_`, alpha = w · scale), so ΔW is never materialised as a separate tensor."""
    if not isinstance(m, LoraModule):
        acc += w * weight_delta(m, acc.shape, fan_in_fan_out, acc.dtype, acc.device)
        return
    B, A = m.factors(acc.dtype, acc.device)  # (out, r), (r, in_flat)
    if m.kind == "embedding" or fan_in_fan_out:
        acc.addmm_(A.T, B.T, alpha=w * m.scale)  # acc (in, out) += (B @ A)ᵀ
    else:
        acc.view(acc.shape[0], -1).addmm_(B, A, alpha=w * m.scale)


class Scratch:
    """Flat buffers reused from tensor to tensor: page-faulting a fresh 100 MB tensor costs several times the
    arithmetic done in it (measured: 38 ms vs 5 ms for one bf16 → f32 conversion of 8192×2048)."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, tag: str, shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
        n = math.prod(shape)
        b = self._bufs.get(tag)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
            b = self._bufs[tag] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return b[:n].view(tuple(shape))


def merged_weight(W: torch.Tensor, parts: Sequence[tuple[LoraModule, float]], *, fan_in_fan_out: bool = False,
                  out_dtype: torch.dtype | None = None, compute: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", scratch: Scratch | None = None,
                  dora: str = "peft") -> torch.Tensor:
    """`W + Σ wᵢ ΔWᵢ` in `compute` precision, rounded once to `out_dtype` (default W's dtype).

    DoRA (one adapter, weight 1): `m / ‖W + ΔW‖_row · (W + ΔW)`, norms over every dim but the first, as PEFT's
    `DoraLinearVariant.merge` and its conv variant do; `dora="lycoris"`: LyCORIS's `weight_decompose`, the norm
    + float32 eps per output row or, for a `dora_scale` of shape (1, in, …), per input column. With `scratch`,
    the result lives in a reused buffer.
    """
    scratch = scratch or Scratch()
    acc = scratch.get("acc", W.shape, compute, device).copy_(W)
    for m, w in parts:
        add_delta_(acc, m, w, fan_in_fan_out)
    mags = [m.magnitude for m, _ in parts if m.magnitude is not None]
    if mags:
        mag = materialize(mags[0]).to(device=device, dtype=compute)
        on_input = dora == "lycoris" and mag.dim() > 1 and mag.shape[0] == 1 and mag.numel() == acc.shape[1] > 1
        eps = torch.finfo(torch.float32).eps if dora == "lycoris" else 0.0
        if on_input:  # (1, in, …): one norm per input channel, over the output rows and the kernel
            norm = acc.transpose(0, 1).reshape(acc.shape[1], -1).norm(dim=1) + eps
            acc *= (mag.reshape(-1) / norm).reshape((1, -1) + (1,) * (acc.dim() - 2))
        else:
            norm = acc.reshape(acc.shape[0], -1).norm(dim=1) + eps
            acc *= (mag.reshape(-1) / norm).reshape((-1,) + (1,) * (acc.dim() - 1))
    out_dtype = out_dtype or W.dtype
    if out_dtype == compute and acc.device.type == "cpu":
        return acc
    return scratch.get("out", W.shape, out_dtype).copy_(acc)


def all_finite(t: torch.Tensor) -> bool:
    """One reduction pass: NaN and ±Inf propagate into the min/max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Change:
    """What happens to one base tensor: adapter modules (with weights) add to it, or it is created from `source`."""

    parts: tuple[tuple[LoraModule, float], ...]
    kind: str = "weight"  # "weight" | "bias" | "replace"
    source: str | None = None  # for a tensor created from a tied one
    replacement: object = None  # kind "replace": PEFT modules_to_save tensor that takes the base tensor's place
    dora: str = "peft"  # how a DoRA magnitude rescales: "peft" (lora_magnitude_vector) or "lycoris" (dora_scale)


@dataclass(frozen=True)
class MergePlan:
    changes: Mapping[str, Change]  # base tensor name → change
    notes: tuple[str, ...]
    untie: bool = False  # config.json's tie_word_embeddings must become false
    transposed: frozenset[str] = frozenset()  # weights stored (in, out): GPT-2 Conv1D with fan_in_fan_out


def _peft_candidates(path: str, weights: set[str]) -> list[str]:
    """Base weight names for a PEFT module path: exact, base with an extra prefix, or adapter with one."""
    if f"{path}.weight" in weights:
        return [f"{path}.weight"]
    found = [k for k in weights if k.endswith(f".{path}.weight")]
    if found:
        return found
    parts = path.split(".")
    for i in range(1, len(parts)):
        if (k := ".".join(parts[i:]) + ".weight") in weights:
            return [k]
    return []


def _kohya_candidates(name: str, underscored: Mapping[str, list[str]]) -> list[str]:
    """kohya's `lora_unet_a_b_c` against the base's names with dots made underscores ('.'→'_' is lossy)."""
    for prefix in KOHYA_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    exact = underscored.get(name, [])
    if exact:
        return exact
    return [k for u, ks in underscored.items() if u.endswith("_" + name) for k in ks]


def resolve(adapter: Adapter, ck: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """{module name: base weight name} and the modules that match nothing; several matches are an error."""
    weights = {n for n in ck.tensors if n.endswith(".weight")}
    underscored: dict[str, list[str]] = {}
    for k in weights:
        underscored.setdefault(k[: -len(".weight")].replace(".", "_"), []).append(k)
    found, missing, ambiguous = {}, [], []
    for name in adapter.modules:
        if adapter.format == "kohya" or adapter.config.get("name_style") == "kohya":
            cands = _kohya_candidates(name, underscored)
        else:
            cands = _peft_candidates(name.removeprefix(PREFIX), weights)
        if len(cands) == 1:
            found[name] = cands[0]
        elif cands:
            ambiguous.append(f"{name} ({' / '.join(sorted(cands)[:3])})")
        else:
            missing.append(name)
    if ambiguous:
        raise SurgeryError(f"{ck.root}: adapter modules match several base tensors: {'; '.join(ambiguous[:5])}")
    return found, missing


def base_shapes(adapter: Adapter, base: str | Path) -> dict[str, tuple[int, ...]]:
    """{module name: the base weight's shape} from the base checkpoint's headers — the kernel size that LoHa/LoKr
    factors stored flattened do not say (needed to write a conv LoRA that PEFT and kohya loaders take)."""
    ck = open_checkpoint(base)
    found, _ = resolve(adapter, ck)
    return {name: tuple(ck.tensors[key].shape) for name, key in found.items()}


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
    if not ck.config().get("tie_word_embeddings", False) or path.removesuffix(".weight").split(".")[-1] != "lm_head":
        return None
    emb = [k for k in ck.tensors if TIED_EMBEDDING.search(k)]
    return emb[0] if len(emb) == 1 else None


def plan_merge(ck: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float],
               allow_missing: bool = False, skip_modules_to_save: bool = False) -> MergePlan:
    """Which base tensors change and how, checked against the base's headers before any tensor is read."""
    changes: dict[str, list] = {}
    biases: dict[str, list] = {}
    dora_styles: dict[str, str] = {}  # base tensor → "lycoris" for a LyCORIS dora_scale (PEFT's otherwise)
    created: dict[str, str] = {}
    notes: list[str] = []
    for adapter, w in zip(adapters, weights):
        fan = bool(adapter.config.get("fan_in_fan_out", False))
        where = str(adapter.source)
        found, missing = resolve(adapter, ck)
        for name in list(missing):  # an lm_head absent from the file because it is tied to the embedding
            path = name.removeprefix(PREFIX)
            if (emb := _tied_source(ck, path)) is not None:
                created[f"{path}.weight"] = emb
                found[name] = f"{path}.weight"
                missing.remove(name)
                notes.append(f"{path}.weight is tied to {emb} in the base; the merged model gets its own "
                             "lm_head.weight and tie_word_embeddings is set to false")
        if missing and not allow_missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise SurgeryError(f"{ck.root}: no base tensor for adapter module(s) {shown} "
                               "(pass --allow-missing to skip them)")
        if missing:
            notes.append(f"{where}: {len(missing)} module(s) without a base tensor were skipped: {', '.join(missing[:5])}")
        for name, key in found.items():
            m = adapter.modules[name]
            spec = ck.tensors.get(created.get(key, key))
            if spec.torch_dtype not in FLOATS:
                raise SurgeryError(f"{ck.root}: base tensor {key} has dtype {spec.dtype}; only float16/bfloat16/"
                                   "float32/float64 bases can be merged into")
            if not _fits(m, spec.shape, fan):
                want = list(m.shape[::-1] if m.kind == "embedding" or fan else m.shape)
                raise SurgeryError(f"{where}: module {name} ({m.algo}) has ΔW of shape {want} but base tensor {key} "
                                   f"has shape {list(spec.shape)}")
            if m.magnitude is not None and adapter.format == "kohya":
                n = math.prod(m.magnitude.shape)
                if n not in (spec.shape[0], spec.shape[1]) or max(m.magnitude.shape) != n:
                    raise SurgeryError(f"{where}: module {name}: dora_scale of shape {list(m.magnitude.shape)} fits "
                                       f"neither axis of base tensor {key} {list(spec.shape)}")
                dora_styles[key] = "lycoris"
            if m.magnitude is not None and (w != 1.0 or len(adapters) > 1 or fan or m.kind == "embedding"):
                raise SurgeryError(f"{where}: DoRA module {name} can only be merged alone, with weight 1, into a "
                                   "linear or conv layer (its magnitude rescales the merged weight)")
            changes.setdefault(key, []).append((m, w, fan))
            if m.bias is not None:
                bias = key[: -len(".weight")] + ".bias"
                if bias not in ck.tensors:
                    raise SurgeryError(f"{where}: module {name} has lora_B.bias but the base has no {bias}")
                biases.setdefault(bias, []).append((m, w))
    if ck.config().get("tie_word_embeddings", False) and not any(k.endswith("lm_head.weight") for k in ck.tensors):
        for key in changes:
            if TIED_EMBEDDING.search(key):
                notes.append(f"{key} is tied to the output head in the base: the merged update changes the output "
                             "head too (as PEFT's merge_and_unload does; the adapter's own forward changes only the "
                             "input embeddings)")
    replaced = _modules_to_save(ck, adapters, weights, created, notes, skip_modules_to_save)
    for key, parts in changes.items():
        if key in replaced:
            raise SurgeryError(f"{key}: both a LoRA module and a modules_to_save tensor target it")
        if len({fan for _, _, fan in parts}) > 1:
            raise SurgeryError(f"{key}: adapters disagree on fan_in_fan_out")
        if any(m.magnitude is not None for m, _, _ in parts) and len(parts) > 1:
            raise SurgeryError(f"{key}: a DoRA module cannot be merged together with other adapters")
    plan = {k: Change(tuple((m, w) for m, w, _ in p), "weight", created.get(k), dora=dora_styles.get(k, "peft"))
            for k, p in changes.items()}
    plan.update({k: Change(tuple(p), "bias") for k, p in biases.items()})
    plan.update({k: Change((), "replace", source=created.get(k), replacement=t) for k, t in replaced.items()})
    fans = frozenset(k for k, p in changes.items() if p[0][2])
    return MergePlan(plan, tuple(notes), untie=bool(created), transposed=fans)


def _modules_to_save(ck: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], created: dict,
                     notes: list, skip: bool = False) -> dict:
    """PEFT `modules_to_save` tensors (`base_model.model.<path>`) replace the base's `<path>` as in PEFT's
    unload; `….base_layer.weight` copies saved by `save_embedding_layers` are the base's own and are skipped.
    A replacement cannot be scaled or undone, so a weight ≠ 1 is refused unless `skip` (then none is applied)."""
    replaced = {}
    for adapter, w in zip(adapters, weights):
        if adapter.format == "kohya":
            continue
        for key, t in adapter.passthrough.items():
            path = key.removeprefix(PREFIX)
            if ".base_layer." in path:
                continue
            if skip:
                notes.append(f"{adapter.source}: {key} (modules_to_save) skipped; the base's {path} is kept")
                continue
            if w != 1:
                raise SurgeryError(f"{adapter.source}: carries modules_to_save ({key}), which replace base tensors "
                                   f"and cannot be scaled by --weight {w:g} or undone; pass --skip-modules-to-save "
                                   "to merge only its LoRA modules")
            if "trainable_tokens" in path:
                raise SurgeryError(f"{adapter.source}: {key}: merging trainable tokens is not supported yet")
            like = path if path in ck.tensors else _tied_source(ck, path)
            if like is None:
                raise SurgeryError(f"{adapter.source}: {key} replaces a tensor the base does not have ({path})")
            if tuple(t.shape) != tuple(ck.tensors[like].shape):
                raise SurgeryError(f"{adapter.source}: {key} has shape {list(t.shape)}, base {like} "
                                   f"{list(ck.tensors[like].shape)}")
            if path in replaced:
                raise SurgeryError(f"{path}: replaced by two adapters' modules_to_save")
            replaced[path] = t
            if like != path:
                created[path] = like
                notes.append(f"{path} (modules_to_save) is written as its own tensor; tie_word_embeddings is set "
                             "to false")
    return replaced


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

    def to_dict(self) -> dict:
        return dict(self.__dict__, notes=list(self.notes))


def _parse_size(text: str | int | None) -> int | None:
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text.upper())
    if not m:
        raise SurgeryError(f"shard size {text!r}: expected e.g. 5GB, 500MB, 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2) or "_"))


def _shards(ck: Checkpoint, sizes: Mapping[str, int], shard_size: int | None) -> list[tuple[str, list[str]]]:
    """Output shard names and their tensors: the base's split, or a greedy re-split in the base's order."""
    if shard_size is None:
        groups = {s: [] for s in ck.shards}
        for name, spec in ck.tensors.items():
            groups[spec.path.name].append(name)
        extra = [n for n in sizes if n not in ck.tensors]
        if extra:
            groups[next(iter(groups))].extend(extra)
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
        return [("model.safetensors", out[0])]
    return [(f"model-{i + 1:05d}-of-{len(out):05d}.safetensors", names) for i, names in enumerate(out)]


def merge(base: str | Path, adapters: Sequence[Adapter], out: str | Path, *, weights: Sequence[float] | None = None,
          dtype: str | torch.dtype | None = None, device: str | torch.device = "auto",
          compute_dtype: torch.dtype = torch.float32, shard_size: str | int | None = None,
          allow_missing: bool = False, skip_modules_to_save: bool = False, force: bool = False,
          progress: Callable[[str], None] | None = None) -> MergeReport:
    """Write `base` with every adapter merged (`W + Σ wᵢ ΔWᵢ`) to `out`, in the base's layout.

    Memory: one tensor at a time (plus the adapters' factors). The output appears only when complete.
    """
    t0 = time.perf_counter()
    ck = open_checkpoint(base)
    out = Path(out)
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise SurgeryError(f"{len(weights)} --weight values for {len(adapters)} adapters")
    if out.resolve() == ck.root.resolve():
        raise SurgeryError(f"{out}: is the base itself; write the merged model elsewhere")
    check_output(out, [a.source for a in adapters if a.source is not None], force=True)  # never an adapter
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise SurgeryError(f"{out}: exists and is not empty; choose a new path or pass --force")
    if ck.is_dir == (out.suffix == ".safetensors"):
        raise SurgeryError(f"{out}: the base is {'a directory' if ck.is_dir else 'one file'}; "
                           f"give {'a directory' if ck.is_dir else 'a .safetensors file'}")
    if shard_size is not None and not ck.is_dir:
        raise SurgeryError("--shard-size needs a model directory as the base (a single file stays one file)")
    plan = plan_merge(ck, adapters, weights, allow_missing, skip_modules_to_save)
    dev, sdtype = resolve_device(device), storage_dtype(dtype)
    scratches = itertools.cycle([Scratch(), Scratch()])  # tensor i is written while i + 1 is made

    def source(name: str) -> TensorSpec:
        """The base tensor an output tensor starts from (a created lm_head starts from its tied embedding)."""
        change = plan.changes.get(name)
        return ck.tensors[change.source] if change and change.source else ck.tensors[name]

    def out_dtype(spec: TensorSpec) -> torch.dtype:
        return sdtype if sdtype is not None and spec.torch_dtype in FLOATS else spec.torch_dtype

    def entry(name: str) -> Entry:
        change, spec = plan.changes.get(name), source(name)
        odt = out_dtype(spec)
        if change is None:
            if odt == spec.torch_dtype:
                return copy_entry(spec)
            return tensor_entry(name, lambda: read_tensor(spec).to(odt), odt, spec.shape)

        def make() -> torch.Tensor:
            if change.kind == "replace":
                t = materialize(change.replacement).to(odt)
            elif change.kind == "bias":
                b = read_tensor(spec)
                acc = b.to(dev, compute_dtype)
                for m, w in change.parts:
                    acc += w * m.scale * materialize(m.bias).to(dev, compute_dtype)
                t = acc.to(odt)
            else:
                scratch = next(scratches)
                W = read_tensor(spec, scratch.get("read", (spec.nbytes,), torch.uint8))
                t = merged_weight(W, change.parts, fan_in_fan_out=name in plan.transposed, out_dtype=odt,
                                  compute=compute_dtype, device=dev, scratch=scratch, dora=change.dora)
            if not all_finite(t):
                raise SurgeryError(f"{name}: the merge produced NaN or Inf (overflow in {odt}?)")
            if progress:
                progress(name)
            return t.cpu()

        return tensor_entry(name, make, odt, spec.shape)

    names = list(ck.tensors) + [n for n, c in plan.changes.items() if c.source]
    sizes = {n: math.prod(source(n).shape) * torch.empty(0, dtype=out_dtype(source(n))).element_size() for n in names}
    groups = _shards(ck, sizes, _parse_size(shard_size))
    total = 0
    notes = list(plan.notes)
    with atomic_output(out, is_dir=ck.is_dir, replace=True) as tmp:
        folder = tmp if ck.is_dir else tmp.parent
        weight_map = {}
        for shard, names in groups:
            target = tmp if not ck.is_dir else folder / shard
            meta = ck.metadata.get(shard) or next(iter(ck.metadata.values()), None)
            total += write_shard(target, [entry(n) for n in names], meta)
            weight_map.update({n: shard for n in names})
        if ck.is_dir:
            if len(groups) > 1 or ck.index is not None or groups[0][0] != SINGLE:  # shard names need it
                index = {"metadata": {**(ck.index or {}).get("metadata", {}), "total_size": total},
                         "weight_map": dict(sorted(weight_map.items()))}
                (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            root, o = ck.root.resolve(), out.resolve()  # an output inside the base (base/merged): not copied into itself
            left_out = copy_side_files(ck.root, folder, skip=set(ck.shards) | {INDEX},
                                       skip_dirs={o.relative_to(root)} if o.is_relative_to(root) else set())
            if left_out:
                notes.append(f"not copied (other weight formats would hold unmerged weights): {', '.join(left_out)}")
            if (plan.untie or sdtype is not None) and (folder / "config.json").exists():
                cfg = json.loads((folder / "config.json").read_text())
                if plan.untie:
                    cfg["tie_word_embeddings"] = False
                if sdtype is not None:  # transformers loads at this dtype: it must be the stored one
                    name = str(sdtype).removeprefix("torch.")
                    for key in ("torch_dtype", "dtype"):
                        if key in cfg or key == "torch_dtype":
                            cfg[key] = name
                (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    merged = sum(1 for c in plan.changes.values() if not c.source)
    return MergeReport(str(out), merged, sum(1 for c in plan.changes.values() if c.source),
                       len(ck.tensors) - merged, len(groups), total, round(time.perf_counter() - t0, 3), tuple(notes))
