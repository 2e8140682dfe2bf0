"""kohya-ss / LyCORIS LoCon single-file LoRA (formats.md §3.1, §3.4).

Keys `<name>.lora_down.weight` (A), `<name>.lora_up.weight` (B), `<name>.alpha` (0-dim or [1]; missing or 0
means alpha = r), `<name>.dora_scale` (DoRA). Scale = alpha / r. Names are kohya's underscore names
(`lora_unet_…_to_q`, `lora_te1_…`), kept as they are.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes

from ..adapter import Adapter, DiffModule, fold_scale, materialize, scaled
from ..errors import SurgeryError, listed
from .modules import KEY_PREFIX, group_keys, make_module, make_structured, stated_rank, structured_algo
from ..version import __version__
from .safetensors_file import WRITTEN_BY, atomic_output, save_tensors, tensor_refs

# LoRA roles after any name; LoHa/LoKr ones only after kohya's dot-free names (dotted paths are PEFT's keys)
_KEY = re.compile(r"^(?:(?P<m>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|dora_scale|"
                  r"diff|diff_b)|(?P<m2>[^.]+)\.(?P<role2>hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t[12])))\Z",
                  re.DOTALL)  # any character in a name (one a broken file holds is refused by name, not passed on)
_ROLE = {"lora_down.weight": "A", "lora_up.weight": "B", "lora_mid.weight": "mid", "alpha": "alpha",
         "dora_scale": "magnitude"}
# LyCORIS algorithms this reader does not take, by a key each writes
_UNSUPPORTED = {"a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "oft_blocks": "OFT",
                "oft_diag": "OFT", "oft_R": "BOFT", "boft_R": "BOFT", "on_input": "IA³", "w_norm": "a norm-layer diff",
                "b_norm": "a norm-layer diff", "bias_indices": "a sparse-bias residual", "bias_values": "a sparse-bias residual"}


def unsupported(key: str) -> str | None:
    """The name of the LyCORIS algorithm a key belongs to, if this reader does not take it."""
    leaf = key.split(".", 1)[-1]
    return _UNSUPPORTED.get(leaf)


def parse_key(key: str):
    m = _KEY.match(key)
    if not m:
        return None
    role = m["role"] or m["role2"]
    return m["m"] or m["m2"], _ROLE.get(role, role), "linear"


def read(path: Path) -> Adapter:
    """A kohya / LyCORIS file: LoRA/LoCon (Tucker `lora_mid` folded in), LoHa, LoKr and full `diff` modules."""
    refs, metadata = tensor_refs(path)
    for key in refs:
        if (algo := unsupported(key)) is not None:
            raise SurgeryError(f"{path}: {key} belongs to {algo}, which surgery does not read (LoRA/LoCon, LoHa, "
                               "LoKr and full diff modules only)")
    parts, kinds, passthrough = group_keys(refs, parse_key, path)
    modules, zero_alpha, no_alpha = {}, [], []
    for name in sorted(parts):
        roles = dict(parts[name])
        alpha = _alpha(roles.pop("alpha", None), name, path)
        magnitude = roles.pop("magnitude", None)
        algo = structured_algo(roles, name, path)
        if algo is None:
            modules[name] = _lora(name, roles, alpha, magnitude, path)
            scaled_by_alpha = modules[name].algo == "lora"  # a full diff ignores it
        else:
            tensors = {r.removeprefix(KEY_PREFIX[algo]): t for r, t in roles.items()}
            dim = stated_rank(algo, tensors)  # LyCORIS / ComfyUI divide alpha by it; None: scale 1
            scale = 1.0 if dim is None else (alpha or dim) / dim
            modules[name] = make_structured(name, algo, tensors, scale, path, magnitude=magnitude, dora="lycoris")
            scaled_by_alpha = dim is not None
        if scaled_by_alpha and not alpha:
            (no_alpha if alpha is None else zero_alpha).append(name)
    if not modules:
        raise SurgeryError(f"{path}: no LoRA tensors found (expected keys like <name>.lora_down.weight)")
    notes = []
    if zero_alpha:
        notes.append(f"{path.name}: alpha 0 in {listed(zero_alpha, 1)}, read as alpha = r (scale 1) as kohya and LyCORIS "
                     "read it; ComfyUI, A1111 and diffusers apply such a module with scale 0 (no effect)")
    if no_alpha and any(r.get("alpha") is not None for r in parts.values()):
        notes.append(f"{path.name}: no .alpha for {listed(no_alpha, 1)} while other modules have one: read as alpha = r "
                     "(scale 1) as kohya, LyCORIS and ComfyUI read it; diffusers gives such a module the most "
                     "common alpha of the others")
    return Adapter(modules=modules, format="kohya", passthrough=passthrough, metadata=metadata, source=path,
                   notes=tuple(notes))


def _lora(name, roles, alpha, magnitude, path):
    if "mid" in roles:  # Tucker conv: fold mid into down, an exact rank-r LoCon (methods.md §6)
        mid, down = roles.pop("mid"), roles.get("A")
        if down is None or len(mid.shape) != 4 or len(down.shape) != 4 or mid.shape[1] != down.shape[0]:
            raise SurgeryError(f"{path}: module {name}: lora_mid {list(mid.shape)} does not compose with lora_down "
                               f"{list(down.shape) if down is not None else 'missing'}")
        roles["A"] = _TuckerDown(mid, down)
    rank = roles["A"].shape[0] if "A" in roles and roles["A"].shape else 0
    scale = (alpha or rank) / rank if rank else 1.0
    return make_module(name, roles | ({"magnitude": magnitude} if magnitude is not None else {}), "linear", scale, path,
                       dora="lycoris")


class _TuckerDown:
    """lora_down (r, in, kh, kw) rebuilt from a Tucker pair: A[i, c, h, w] = Σⱼ mid[i, j, h, w] · down[j, c, 0, 0]."""

    def __init__(self, mid, down):
        self.mid, self.down = mid, down
        self.shape = (mid.shape[0], down.shape[1], *mid.shape[2:])
        self.dtype = mid.dtype

    def load(self):
        from ..hadamard_kron import tucker_pair

        mid, down = materialize(self.mid), materialize(self.down)
        _, A = tucker_pair(mid.float(), torch.eye(mid.shape[0]), down.float().flatten(1))
        return A.reshape(self.shape).to(self.dtype)

    def numel(self):
        return math.prod(self.shape)


def _alpha(ref, name: str, path: Path) -> float | None:
    """The `.alpha` a module states (None: no key; NaN/Inf are refused by `materialize`); kohya and LyCORIS read
    None or 0 as alpha = r."""
    if ref is None:
        return None
    if ref.numel() != 1:
        raise SurgeryError(f"{path}: module {name}: alpha must hold one number, has shape {list(ref.shape)}")
    return float(materialize(ref).reshape(()).double())


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
        if m.algo == "lora" and m.bias is not None:
            m = as_diff(m)  # LoCon has no bias; a LyCORIS full module carries ΔW and the bias exactly
        own, dim = _module_tensors(name, m)
        alpha = _alpha_tensor(m.scale * dim if dim is not None else 1.0, m.dtype)
        if alpha == 0:  # kohya and LyCORIS would read alpha = r, ComfyUI and diffusers scale 0: fold it, alpha = r
            own, dim = _module_tensors(name, fold_scale(m))
            alpha = _alpha_tensor(float(dim), m.dtype)
        tensors.update(own)
        if dim is not None or m.algo == "lokr":  # LyCORIS's loader wants an alpha even where it fixes scale 1
            tensors[f"{name}.alpha"] = alpha
            alphas.add(float(alpha))
        if m.magnitude is not None:
            tensors[f"{name}.dora_scale"] = dora_scale(m)
        ranks.add(dim if dim is not None else m.rank)
    metadata = dict(adapter.metadata)
    if any(k.startswith("ss_") for k in metadata) or adapter.format != "kohya":
        metadata["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        metadata["ss_network_alpha"] = _fmt(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    metadata[WRITTEN_BY] = __version__
    if "sshs_model_hash" in metadata or "sshs_legacy_hash" in metadata:
        metadata.update(_addnet_hashes(tensors, metadata))
    with atomic_output(out, is_dir=False) as tmp:
        save_tensors(tensors, tmp, metadata)


def provenance(config) -> dict[str, str]:
    """kohya's metadata for the model an adapter was made on (`ss_sd_model_name`), from a PEFT config's
    `base_model_name_or_path` (or a diffusers one's `<component>.base_model_name_or_path`)."""
    bases = sorted(str(v) for k, v in config.items() if k.endswith("base_model_name_or_path") and v)
    return {"ss_sd_model_name": bases[0]} if bases else {}


def as_diff(m):
    """A LoRA with a bias part (PEFT's lora_B.bias, a combined diff_b) as the LyCORIS full module of the same update:
    `diff` = ΔW (out, in[, kernel]) and `diff_b` = scale · bias, computed in float32 and rounded once."""
    if m.magnitude is not None:
        raise SurgeryError("a DoRA LoRA with a lora_B.bias has no kohya/LyCORIS form; write --format peft")
    diff = m.delta(torch.float32).reshape(m.shape).to(m.dtype).contiguous()
    return DiffModule({"diff": diff, "diff_b": scaled(m.bias, m.scale).to(m.dtype)})


def dora_scale(m) -> torch.Tensor:
    """A DoRA magnitude in LyCORIS's layout (formats.md §3.4): (out, 1, …) per output row, (1, in, …) per input
    column, with as many dims as the weight (PEFT's (out,) and (1, out, 1, 1) are reshaped, not reinterpreted)."""
    mag = materialize(m.magnitude)
    dims = max(2, len(m.shape), mag.dim())
    return mag.reshape((-1,) + (1,) * (dims - 1) if m.dora_axis == "out" else (1, -1) + (1,) * (dims - 2)).contiguous()


def _module_tensors(name: str, m) -> tuple[dict, int | None]:
    """A module's LyCORIS keys and the `dim` its alpha is divided by (None: the format fixes the scale at 1, and a
    scale ≠ 1 is folded into the first factor, computed in float32 and rounded once)."""
    if m.algo == "lora":
        return {f"{name}.lora_down.weight": materialize(m.A), f"{name}.lora_up.weight": materialize(m.B)}, m.rank
    if m.algo not in ("loha", "lokr", "diff"):
        raise SurgeryError(f"module {name}: a {m.algo} module has no kohya/LyCORIS form")
    dim = stated_rank(m.algo, m.tensors)
    if dim is None:
        m = fold_scale(m)
    tensors = {role: materialize(t) for role, t in m.tensors.items()}
    return {f"{name}.{KEY_PREFIX[m.algo]}{role}": t.contiguous() for role, t in tensors.items()}, dim


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
