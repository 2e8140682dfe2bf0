"""kohya-ss / LyCORIS LoCon single-file LoRA (formats.md §3.1, §3.4).

Keys `<name>.lora_down.weight` (A), `<name>.lora_up.weight` (B), `<name>.alpha` (0-dim or [1]; missing or 0
means alpha = r), `<name>.dora_scale` (DoRA). Scale = alpha / r. Names are kohya's underscore names
(`lora_unet_…_to_q`, `lora_te1_…`), kept as they are.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from ..adapter import Adapter, materialize
from ..errors import SurgeryError
from .modules import group_keys, make_module
from .safetensors_file import atomic_output, save_tensors, tensor_refs

_KEY = re.compile(r"^(?P<m>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|dora_scale|lora_mid\.weight)$")
_ROLE = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", "dora_scale": "magnitude",
         "lora_mid.weight": "mid"}
_UNSUPPORTED = re.compile(r"\.(hada_w1_a|lokr_w1|lokr_w1_a|a1\.weight|oft_blocks|oft_diag)$")


def unsupported(key: str) -> bool:
    """A LyCORIS network other than LoRA/LoCon (LoHa, LoKr, GLoRA, OFT)."""
    return bool(_UNSUPPORTED.search(key))


def parse_key(key: str):
    m = _KEY.match(key)
    return (m["m"], _ROLE[m["role"]], "linear") if m else None


def read(path: Path) -> Adapter:
    refs, metadata = tensor_refs(path)
    for key in refs:
        if unsupported(key):
            raise SurgeryError(f"{path}: {key} belongs to a LyCORIS LoHa/LoKr/GLoRA/OFT network; only LoRA/LoCon is supported")
    parts, kinds, passthrough = group_keys(refs, parse_key, path)
    modules = {}
    for name in sorted(parts):
        roles = parts[name]
        if "mid" in roles:
            raise SurgeryError(f"{path}: module {name} is a LyCORIS Tucker conv (lora_mid), which is not supported yet")
        rank = roles["A"].shape[0] if "A" in roles and roles["A"].shape else 0
        alpha = _alpha(roles.pop("alpha", None), rank, name, path)
        modules[name] = make_module(name, roles, "linear", alpha / rank if rank else 1.0, path)
    if not modules:
        raise SurgeryError(f"{path}: no LoRA tensors found (expected keys like <name>.lora_down.weight)")
    return Adapter(modules=modules, format="kohya", passthrough=passthrough, metadata=metadata, source=path)


def _alpha(ref, rank: int, name: str, path: Path) -> float:
    if ref is None:
        return float(rank)
    if ref.numel() != 1:
        raise SurgeryError(f"{path}: module {name}: alpha must hold one number, has shape {list(ref.shape)}")
    value = float(materialize(ref).reshape(()).double())
    if value != value or value in (float("inf"), float("-inf")):
        raise SurgeryError(f"{path}: module {name}: alpha is {value}")
    return value or float(rank)  # kohya: alpha 0 or None means alpha = dim


def _alpha_tensor(value: float, dtype: torch.dtype) -> torch.Tensor:
    """0-dim alpha in the factor dtype when that holds it exactly, else float32 (loaders call .item())."""
    t = torch.tensor(value, dtype=dtype if dtype.is_floating_point else torch.float32)
    return t if float(t) == value else torch.tensor(value, dtype=torch.float32)


def write(adapter: Adapter, out: Path) -> None:
    tensors = {k: materialize(v) for k, v in adapter.passthrough.items()}
    ranks, alphas = set(), set()
    for name, m in adapter.modules.items():
        if m.kind == "embedding":
            raise SurgeryError(f"module {name}: embedding LoRAs have no kohya form; write --format peft")
        if m.bias is not None:
            raise SurgeryError(f"module {name}: lora_B.bias has no kohya form; write --format peft")
        alpha = m.scale * m.rank
        tensors[f"{name}.lora_down.weight"] = materialize(m.A)
        tensors[f"{name}.lora_up.weight"] = materialize(m.B)
        tensors[f"{name}.alpha"] = _alpha_tensor(alpha, m.dtype)
        if m.magnitude is not None:
            tensors[f"{name}.dora_scale"] = materialize(m.magnitude)
        ranks.add(m.rank)
        alphas.add(float(tensors[f"{name}.alpha"]))
    metadata = dict(adapter.metadata)
    if any(k.startswith("ss_") for k in metadata) or adapter.format != "kohya":
        metadata["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        metadata["ss_network_alpha"] = _fmt(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    if "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:
        metadata.update(_addnet_hashes(tensors, metadata))
    with atomic_output(out, is_dir=False) as tmp:
        save_tensors(tensors, tmp, metadata)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _addnet_hashes(tensors, metadata) -> dict[str, str]:
    """kohya's `precalculate_safetensors_hashes`: sha256 of the data after the header of a re-serialisation
    that keeps only `ss_*` metadata, and the legacy 8-hex hash of bytes 0x100000..0x110000."""
    blob = save_bytes({k: v.contiguous() for k, v in tensors.items()},
                      metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + n:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
    }
