"""Grouping a file's keys into LoRA modules — shared by every format reader.

A format supplies `parse_key(key) -> (module, role, kind) | None` with role ∈ {A, B, bias, magnitude, alpha};
keys it does not claim pass through untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

from ..adapter import KINDS, LoraModule, TensorRef
from ..errors import SurgeryError

ParsedKey = Optional[tuple[str, str, str]]


def group_keys(
    refs: Mapping[str, TensorRef], parse_key: Callable[[str], ParsedKey], path: Path
) -> tuple[dict[str, dict[str, TensorRef]], dict[str, str], dict[str, TensorRef]]:
    """→ ({module: {role: ref}}, {module: kind}, passthrough {key: ref}); a role seen twice is an error."""
    parts: dict[str, dict[str, TensorRef]] = {}
    kinds: dict[str, str] = {}
    passthrough: dict[str, TensorRef] = {}
    for key, ref in refs.items():
        parsed = parse_key(key)
        if parsed is None:
            passthrough[key] = ref
            continue
        module, role, kind = parsed
        roles = parts.setdefault(module, {})
        if role in roles:
            raise SurgeryError(
                f"{path}: module {module} has two {role} tensors ({roles[role].key} and {key}); "
                "a file with several adapters is not supported, split it first"
            )
        roles[role] = ref
        if kind != "linear":
            kinds[module] = kind
    return parts, kinds, passthrough


def make_module(name: str, roles: Mapping[str, TensorRef], kind: str, scale: float, path: Path) -> LoraModule:
    """A validated LoraModule from its tensors: both factors present, ranks and shapes consistent."""
    A, B = roles.get("A"), roles.get("B")
    if A is None or B is None:
        have = ", ".join(sorted(roles))
        raise SurgeryError(f"{path}: module {name} is missing its {'A (down)' if A is None else 'B (up)'} factor (has {have})")
    if kind == "linear" and len(A.shape) > 2:
        kind = "conv"
    assert kind in KINDS
    r = A.shape[0] if A.shape else 0
    if len(A.shape) < 2 or len(B.shape) < 2:
        raise SurgeryError(f"{path}: module {name}: factors must be at least 2-D, got A {list(A.shape)}, B {list(B.shape)}")
    if B.shape[1] != r:
        raise SurgeryError(
            f"{path}: module {name}: A has rank {r} (shape {list(A.shape)}) but B has {B.shape[1]} columns "
            f"(shape {list(B.shape)}); grouped convolutions are not supported"
        )
    if kind == "conv" and (len(B.shape) != len(A.shape) or any(s != 1 for s in B.shape[2:])):
        raise SurgeryError(f"{path}: module {name}: conv B must be a 1×1 kernel shaped like A, got {list(B.shape)}")
    if kind != "conv" and (len(A.shape) != 2 or len(B.shape) != 2):
        raise SurgeryError(f"{path}: module {name}: shapes A {list(A.shape)}, B {list(B.shape)} are not a LoRA pair")
    bias = roles.get("bias")
    if bias is not None and tuple(bias.shape) != (B.shape[0],):
        raise SurgeryError(f"{path}: module {name}: lora_B.bias has shape {list(bias.shape)}, expected [{B.shape[0]}]")
    if r == 0:
        raise SurgeryError(f"{path}: module {name} has rank 0")
    return LoraModule(A=A, B=B, scale=float(scale), kind=kind, bias=bias, magnitude=roles.get("magnitude"))
