"""Grouping a file's keys into LoRA modules — shared by every format reader.

A format supplies `parse_key(key) -> (module, role, kind) | None` with role ∈ {A, B, bias, magnitude, alpha};
keys it does not claim pass through untouched.
"""
from __future__ import annotations

import math
from dataclasses import replace
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


def make_module(name: str, roles: Mapping[str, TensorRef], kind: str, scale: float, path: Path,
                dora: str = "peft") -> LoraModule:
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
    if 0 in (*A.shape[1:], B.shape[0]):
        raise SurgeryError(f"{path}: module {name} updates an empty weight (A {list(A.shape)}, B {list(B.shape)})")
    floating(path, name, A=A, B=B, bias=bias)
    module = LoraModule(A=A, B=B, scale=float(scale), kind=kind, bias=bias)
    return with_magnitude(module, roles.get("magnitude"), dora, name, path)


def floating(path: Path, name: str, **tensors) -> None:
    """A module's factors must be floating point (an integer one would be computed with, and written back, as
    integers)."""
    if bad := [f"{r} {str(t.dtype).removeprefix('torch.')}" for r, t in tensors.items()
               if t is not None and not t.dtype.is_floating_point]:
        raise SurgeryError(f"{path}: module {name}: factors must be floating point, got {', '.join(bad)}")


def with_magnitude(m, mag, layout: str, name: str, path: Path):
    """`m` with its DoRA magnitude and the axis it is on, read from the file's layout (formats.md §1.2, §3.4):
    PEFT's `lora_magnitude_vector` is per output row ((out,), or (1, out, 1, …) for convs); LyCORIS's
    `dora_scale` (out, 1, …) per output row, (1, in, …) per input column (`wd_on_out=False`)."""
    if mag is None:
        return m
    shape, n = tuple(mag.shape), math.prod(mag.shape)
    axis = "in" if layout == "lycoris" and len(shape) >= 2 and shape[0] == 1 and n > 1 else "out"
    size = m.out_features if axis == "out" else m.shape[1]
    if axis == "in" and len(shape) > 2 and len(m.shape) == 2 and size % n == 0:
        size = n  # a conv's input channels, of a module stored flattened (in · kernel columns)
    if n != size or max(shape, default=1) != n:
        raise SurgeryError(f"{path}: module {name}: DoRA magnitude of shape {list(shape)} fits neither the "
                           f"{m.out_features} outputs nor the {m.shape[1]} inputs of its ΔW {list(m.shape)}")
    if not mag.dtype.is_floating_point:
        raise SurgeryError(f"{path}: module {name}: DoRA magnitude must be floating point, got {mag.dtype}")
    return replace(m, magnitude=mag, dora_axis=axis)


KEY_PREFIX = {"loha": "hada_", "lokr": "lokr_", "diff": ""}  # on-disk key prefix of each kind's tensor roles


def stated_rank(algo: str, tensors: Mapping) -> int | None:
    """The r a LoHa / LoKr module's tensors state — LoHa's `w1_b` rows; LoKr's decomposed factor's (`w2_b` first,
    as ComfyUI) — which PEFT's config and LyCORIS's alpha divide by; None for two full LoKr factors and diffs."""
    for role in {"loha": ("w1_b",), "lokr": ("w2_b", "w1_b")}.get(algo, ()):
        if role in tensors:
            return int(tensors[role].shape[0])
    return None


def structured_algo(roles: Mapping[str, TensorRef], name: str, path: Path) -> str | None:
    """"loha" / "lokr" / "diff" from a module's role names (`hada_…`, `lokr_…`, `diff`), None for LoRA."""
    algos = {"loha" if r.startswith("hada_") else "lokr" if r.startswith("lokr_") else "diff" if r.startswith("diff")
             else "lora" for r in roles if r not in ("magnitude", "alpha")}
    if len(algos) > 1:
        raise SurgeryError(f"{path}: module {name} mixes tensors of {' and '.join(sorted(algos))}")
    algo = algos.pop() if algos else "lora"
    return None if algo == "lora" else algo


def _shape_error(path, name, what, tensors):
    have = ", ".join(f"{r} {list(t.shape)}" for r, t in sorted(tensors.items()))
    return SurgeryError(f"{path}: module {name}: {what} ({have})")


def _check_pair(path, name, tensors, n: int, rows: int | None = None):
    """Half n of a LoHa/LoKr: (rows, cols) of its rebuilt matrix; Tucker cores fix the kernel."""
    a, b, t = tensors.get(f"w{n}_a"), tensors.get(f"w{n}_b"), tensors.get(f"t{n}")
    if a is None or b is None:
        raise _shape_error(path, name, f"half {n} needs w{n}_a and w{n}_b, or a full w{n}", tensors)
    if t is not None:  # Tucker: t (r, r', *k), a (r, out), b (r', in)
        if len(t.shape) < 3 or len(a.shape) != 2 or len(b.shape) != 2 or t.shape[0] != a.shape[0] \
                or t.shape[1] != b.shape[0]:
            raise _shape_error(path, name, f"Tucker core t{n} does not compose with w{n}_a, w{n}_b", tensors)
        return a.shape[1], b.shape[1], tuple(t.shape[2:])
    if len(a.shape) != 2 or len(b.shape) < 2 or a.shape[1] != b.shape[0]:
        raise _shape_error(path, name, f"w{n}_a and w{n}_b do not compose", tensors)
    return a.shape[0], math.prod(b.shape[1:]), ()


def make_structured(name: str, algo: str, tensors: Mapping[str, TensorRef], scale: float, path: Path,
                    magnitude=None, rank_hint: int | None = None, dora: str = "peft"):
    """A validated LohaModule / LokrModule / DiffModule: factor shapes that compose, one ΔW shape."""
    from ..adapter import DiffModule, LohaModule, LokrModule

    known = {"loha": {"w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"},
             "lokr": {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"}, "diff": {"diff", "diff_b"}}[algo]
    if extra := set(tensors) - known:
        raise _shape_error(path, name, f"unexpected {algo} tensors {sorted(extra)}", tensors)
    if any(0 in t.shape for t in tensors.values()):
        raise _shape_error(path, name, "an empty tensor (a zero dimension) updates no weight", tensors)
    if algo == "diff":
        d, b = tensors.get("diff"), tensors.get("diff_b")
        if d is None or len(d.shape) < 2 or (b is not None and tuple(b.shape) != (d.shape[0],)):
            raise _shape_error(path, name, "a full update needs diff (out, in[, kernel]) and diff_b (out,)", tensors)
        return DiffModule(tensors, scale)
    if algo == "loha":
        if ("t1" in tensors) != ("t2" in tensors):
            raise _shape_error(path, name, "a Tucker LoHa needs both t1 and t2", tensors)
        h1, h2 = _check_pair(path, name, tensors, 1), _check_pair(path, name, tensors, 2)
        if h1 != h2:
            raise _shape_error(path, name, "its two Hadamard halves have different shapes", tensors)
        module = LohaModule(tensors, float(scale))
    else:
        if ("w1" in tensors) == ("w1_a" in tensors or "w1_b" in tensors):
            raise _shape_error(path, name, "W1 must be lokr_w1 or a lokr_w1_a, lokr_w1_b pair", tensors)
        if "w1" not in tensors:
            _check_pair(path, name, tensors, 1)
        elif len(tensors["w1"].shape) != 2:
            raise _shape_error(path, name, "lokr_w1 must be 2-D", tensors)
        if ("w2" in tensors) == ("w2_a" in tensors or "w2_b" in tensors) or ("t2" in tensors and "w2" in tensors):
            raise _shape_error(path, name, "W2 must be lokr_w2 or a lokr_w2_a, lokr_w2_b pair (with lokr_t2)", tensors)
        if "w2" not in tensors:
            _check_pair(path, name, tensors, 2)
        elif len(tensors["w2"].shape) < 2:
            raise _shape_error(path, name, "lokr_w2 must be at least 2-D", tensors)
        module = LokrModule(tensors, float(scale), rank_hint=rank_hint)
    floating(path, name, **tensors)
    return with_magnitude(module, magnitude, dora, name, path)
