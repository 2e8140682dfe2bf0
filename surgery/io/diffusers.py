"""diffusers' pipeline LoRA file, `pytorch_lora_weights.safetensors` as `save_lora_weights` writes it (formats.md §3.2).

Keys are PEFT's with the component in front (`unet.down_blocks.0….lora_A.weight`, `text_encoder.…`,
`transformer.…`); metadata `lora_adapter_metadata` holds each component's LoraConfig (or LoKrConfig) with its keys
prefixed the same way (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, …), which `load_lora_adapter(file,
prefix=component)` strips. Without it, diffusers gives every module alpha = r (scale 1), and so does this reader.
The adapter keeps the prefixed names and the prefixed config as they are on disk.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from ..adapter import Adapter
from ..errors import SurgeryError
from .. import fuse
from . import jsonfile, peft
from .modules import make_module
from .names import DENOISERS, TEXT_ENCODERS, component_configs, split_config
from ..version import __version__
from .safetensors_file import WRITTEN_BY, atomic_output, save_tensors, tensor_refs

COMPONENTS = DENOISERS + TEXT_ENCODERS
WEIGHTS = "pytorch_lora_weights.safetensors"


def component(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS and "." in key else None


# diffusers' pre-PEFT layouts (≤ 0.24): attention processors (`attn1.processor.to_q_lora.down.weight`), text-encoder
# `to_q_lora` / `lora_linear_layer`, LoRACompatibleLinear's `.lora.down`; renamed as diffusers' own
# UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT tables do (its loaders still take them), scale 1
_LEGACY = re.compile(r"^(?P<c>[^.]+)\.(?P<path>.+?)(?:\.processor)?\.(?:(?P<proj>to_[qkv]|to_out)_lora|lora_linear_layer|lora)"
                     r"\.(?P<role>down|up)\.weight$")


def legacy_key(key: str) -> str | None:
    """The PEFT key of a legacy diffusers LoRA key, or None: `unet.….attn1.processor.to_out_lora.up.weight` →
    `unet.….attn1.to_out.0.lora_B.weight`; `text_encoder.….self_attn.to_q_lora.down.weight` → `….q_proj.lora_A.weight`."""
    m = _LEGACY.match(key)
    if not m or m["c"] not in COMPONENTS:
        return None
    path, proj = m["path"], m["proj"]
    if proj:
        te = m["c"] in TEXT_ENCODERS
        path += "." + ("out_proj" if te else "to_out.0") if proj == "to_out" else "." + (f"{proj[-1]}_proj" if te else proj)
    return f"{m['c']}.{path}.lora_{'A' if m['role'] == 'down' else 'B'}.weight"


def is_diffusers(header: Mapping, metadata: Mapping[str, str]) -> bool:
    """A PEFT-keyed file whose config is component-prefixed, or that has no config and every module under a
    component prefix."""
    raw = metadata.get(peft.METADATA_CONFIG)
    if raw is not None:
        try:
            config = jsonfile.parse(raw, "")
        except SurgeryError:
            return False  # not diffusers' config: the PEFT-file reader says what is wrong with it
        return isinstance(config, dict) and bool(config) and all(component(k) for k in config)
    keys = [k for k in header if peft.parse_key(k) or peft.parse_structured(k) or legacy_key(k)]
    return bool(keys) and all(component(k) for k in keys)


# XLabs' Flux LoRAs (x-flux): `double_blocks.N.processor.qkv_lora1.down.weight`, …; scale 1. Mapped as diffusers'
# `_convert_xlabs_flux_lora_to_diffusers` does: a qkv LoRA splits exactly into q, k, v (down shared, up in thirds)
_XLABS = re.compile(r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\."
                    r"(?P<lora>qkv_lora[12]?|proj_lora[12]?)\.(?P<role>down|up)\.weight$")
_XLABS_PARTS = {  # (block kind, lora) → the diffusers paths it updates, in row order
    ("double", "qkv_lora1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double", "qkv_lora2"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("double", "proj_lora1"): ("attn.to_out.0",), ("double", "proj_lora2"): ("attn.to_add_out",),
    ("single", "qkv_lora"): ("attn.to_q", "attn.to_k", "attn.to_v"), ("single", "proj_lora"): ("proj_out",)}


def is_xlabs(header: Mapping) -> bool:
    return any(_XLABS.match(k) for k in header)


def _read_xlabs(path: Path, refs, metadata) -> Adapter:
    roles: dict[tuple, dict] = {}
    for key, ref in refs.items():
        m = _XLABS.match(key)
        if not m or (m["kind"], m["lora"]) not in _XLABS_PARTS:
            raise SurgeryError(f"{path}: {key} is not an XLabs Flux LoRA key that surgery knows")
        roles.setdefault((m["kind"], m["n"], m["lora"]), {})["A" if m["role"] == "down" else "B"] = ref
    modules = {}
    for (kind, n, lora), pair in sorted(roles.items()):
        block = f"transformer.{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{n}."
        module = make_module(f"{kind}_blocks.{n}.{lora}", pair, "linear", 1.0, path)
        parts = _XLABS_PARTS[(kind, lora)]
        if module.out_features % len(parts):
            raise SurgeryError(f"{path}: {kind}_blocks.{n}.{lora}: {module.out_features} rows do not split into "
                               f"{len(parts)} equal projections")
        size = module.out_features // len(parts)
        for i, part in enumerate(parts):
            modules[block + part] = module if len(parts) == 1 else fuse.take_rows(module, range(i * size, (i + 1) * size))
    return Adapter(modules=modules, format="diffusers", config={}, metadata=metadata, source=path, notes=(
        f"{path.name}: XLabs Flux LoRA, read as diffusers' converter maps it (scale 1; qkv split into q, k, v)",))


def read(path: Path) -> Adapter:
    refs, metadata = tensor_refs(path)
    if is_xlabs(refs):
        return _read_xlabs(path, refs, metadata)
    legacy = {k: new for k in refs if (new := legacy_key(k))}
    if legacy:
        if clash := set(legacy.values()) & set(refs):
            raise SurgeryError(f"{path}: holds both legacy and PEFT keys for {sorted(clash)[0]}")
        refs = {legacy.get(k, k): ref for k, ref in refs.items()}
    configs = split_config(jsonfile.parse_object(metadata[peft.METADATA_CONFIG], f"{path}: metadata "
                                                 f"{peft.METADATA_CONFIG}")) if peft.METADATA_CONFIG in metadata else {}
    by_component: dict[str, dict] = {}
    passthrough = {}
    for k, ref in refs.items():
        c = component(k)
        if c is None:
            passthrough[k] = ref
        else:
            by_component.setdefault(c, {})[k[len(c) + 1:]] = ref
    modules, notes = {}, []
    for c, sub in sorted(by_component.items()):
        config = configs.get(c)
        if configs and config is None:
            raise SurgeryError(f"{path}: {peft.METADATA_CONFIG} has no {c}.* entries for the {c} modules")
        mods, rest, _, more = peft.read_modules(sub, config, path, f"{path} ({c})")
        modules.update({f"{c}.{n}": m for n, m in mods.items()})
        passthrough.update({f"{c}.{k}": v for k, v in rest.items()})
        notes.extend(f"{c}: {n}" for n in more)
    if legacy:
        notes.append(f"{path.name}: legacy diffusers LoRA keys ({next(iter(legacy))}) read as diffusers renames them")
    flat = {f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}
    return Adapter(modules=modules, format="diffusers", passthrough=passthrough, config=flat, metadata=metadata,
                   source=path, notes=tuple(notes))


def write(adapter: Adapter, out: Path) -> None:
    """Component-prefixed keys and `lora_adapter_metadata`, one config per component (surgery.io.peft
    `updated_config`, so PEFT's resolution gives every module its own rank and alpha back). Scales are folded
    into the factors (alpha = r): diffusers' `load_lora_adapter` without `use_safetensors=True` and ComfyUI read
    no metadata."""
    if adapter.passthrough:
        keys = ", ".join(sorted(adapter.passthrough)[:3])
        raise SurgeryError(f"cannot write diffusers: the adapter carries non-LoRA tensors ({keys}) that diffusers "
                           "has no place for")
    groups: dict[str, dict] = {}
    for name, m in adapter.modules.items():
        c = component(name)
        if c is None and re.match(rf"({'|'.join(COMPONENTS)})_\d+\.", name):  # Wan 2.2's transformer_2
            raise SurgeryError(f"cannot write diffusers: module {name} is in component {name.split('.')[0]}, which "
                               f"diffusers' LoRA files have no prefix for (its loaders read {', '.join(COMPONENTS)}); "
                               "write that component's modules on their own, as PEFT (--to peft)")
        if c is None:
            raise SurgeryError(f"cannot write diffusers: module {name} has no component prefix (unet., "
                               "transformer., text_encoder., …); give --base MODEL to name it")
        if m.algo not in ("lora", "lokr"):
            raise SurgeryError(f"cannot write diffusers: module {name} is {m.algo}, and diffusers loads LoRA and LoKr "
                               "only (make it LoRA first: surgery convert --to lora)")
        groups.setdefault(c, {})[name[len(c) + 1:]] = m
    starts = component_configs(adapter)
    tensors, config = {}, {}
    for c, modules in sorted(groups.items()):
        modules, start = peft.folded(modules, starts.get(c, {}))  # diffusers may read the file without metadata
        sub = Adapter(modules=modules, format="peft", config=start)
        config.update({f"{c}.{k}": v for k, v in peft.updated_config(sub).items()})
        for name, m in modules.items():
            tensors.update({f"{c}.{k}": t for k, t in peft.make_keys(name, m).items()})
    metadata = {k: v for k, v in adapter.metadata.items() if not k.startswith("ss_") and k != peft.METADATA_CONFIG}
    metadata.update({"format": "pt", peft.METADATA_CONFIG: json.dumps(config, sort_keys=True), WRITTEN_BY: __version__})
    with atomic_output(out, is_dir=False) as tmp:
        save_tensors(tensors, tmp, metadata)
