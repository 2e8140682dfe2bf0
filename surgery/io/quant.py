"""Quantized bases (formats.md §11): which stored tensors hold each quantized weight, and the codecs between
them and the weight's values.

- FP8 block-scaled (`quant_method: fp8`; DeepSeek-V3/R1, Qwen3-*-FP8): `w` float8_e4m3fn (…, R, C) and its
  `scale_inv` (…, ⌈R/b0⌉, ⌈C/b1⌉) for `weight_block_size` [b0, b1] (edge blocks partial; one scale: per tensor).
  W = q · scale_inv per block. Scales are float32, or powers of two (`scale_fmt: ue8m0`; stored as float32,
  float8_e8m0fnu, or E8M0 bytes).
- MXFP4 (`quant_method: mxfp4`; gpt-oss's experts): `p_blocks` uint8 (E, R, G, 16), two FP4 E2M1 values a byte
  (low nibble first), and `p_scales` uint8 (E, R, G), one E8M0 exponent 2^(s−127) per 32 values (OCP MX v1.0).
  The weight transformers loads is the dequantized (E, R, 32·G) transposed to (E, 32·G, R).

Decoding is one correctly rounded float32 product per value (exact for power-of-two scales) and matches
transformers' dequantizers bit for bit; encoding is transformers' FP8 quantizer (amax/448 per block, or its power
of two) extended to partial edge blocks, and the OCP MX conversion for MXFP4 (shared exponent ⌊log2 amax⌋ − 2,
elements rounded to nearest even, saturated at ±6). The functions are pure; `scheme` plans from names, dtypes and
shapes only. compressed-tensors' FP8 checkpoints are read too (`_compressed_tensors_weights`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..errors import SurgeryError

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 magnitudes by code; bit 3 is the sign
FP8_SCALES = ("weight_scale_inv", "scale", "qscale_weight")  # the names transformers accepts for `x.weight`'s scale
ACTIVATION_SCALES = ("activation_scale", "input_scale")  # static activation scales: belong to the quantized module
SUPPORTED = ("fp8", "mxfp4", "compressed-tensors")
CT_FORMATS = ("float-quantized", "naive-quantized")  # compressed-tensors formats that store FP8 weights as they are
_UNSUPPORTED_NAMES = (  # signs of a quantization method in tensor names, for checkpoints without a config
    (("qweight", "qzeros", "g_idx"), "GPTQ/AWQ"),
    (("absmax", "quant_map", "quant_state", "SCB", "nested_absmax"), "bitsandbytes"),
    (("weight_packed", "weight_zero_point", "weight_global_scale"), "compressed-tensors"),
)


# ---------------------------------------------------------------- codecs (pure functions over tensors)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """A scale tensor as float32: float32/bf16 values, float8_e8m0fnu powers of two, or E8M0 bytes 2^(s−127)."""
    if scale.dtype == torch.uint8:
        return torch.ldexp(torch.ones(scale.shape, dtype=torch.float32), scale.to(torch.int32) - 127)
    return scale.to(torch.float32)


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(…, R, C) viewed as (…, R', b0, C', b1), zero-padded to whole blocks where the block does not divide it."""
    b0, b1 = block
    if x.shape[-1] % b1 or x.shape[-2] % b0:
        x = F.pad(x, (0, -x.shape[-1] % b1, 0, -x.shape[-2] % b0))
    return x.unflatten(-1, (-1, b1)).unflatten(-3, (-1, b0))


def _unblock(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `_blocks`: (…, R', b0, C', b1) → (…, R, C), padding cut."""
    x = x.flatten(-2).flatten(-3, -2)
    return x[..., : shape[-2], : shape[-1]]


Buffers = Callable[[str, tuple, torch.dtype], torch.Tensor]  # (tag, shape, dtype) → a buffer reused between calls


def _new(tag: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _e4m3_over_256(q: torch.Tensor, buffers: Buffers = _new) -> torch.Tensor:
    """float8_e4m3fn codes as float16 values q / 2⁸, exactly (subnormals included): the sign bit moved to bit 15,
    exponent and mantissa to bits 13…7 — three integer passes instead of torch's slow float8 → float32 cast.
    NaN codes (0x7F, 0xFF) come out finite: the caller checks for them."""
    h = buffers("e4m3", tuple(q.shape), torch.int16).copy_(q.view(torch.int8))  # sign-extended: bits 15 and 14
    h <<= 7
    h &= -16385  # ~0x4000
    return h.view(torch.float16)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   out: torch.Tensor | None = None, buffers: Buffers = _new) -> torch.Tensor:
    """W = q · scale per block, float32 (…, R, C), one rounding per value; into `out` when given (`buffers` for
    the temporaries). `block` None: one scale for the whole tensor. A row slice of q decodes with the matching
    rows of its scales when it starts on a block boundary."""
    s = scale_values(scale)
    if q.numel() and (int(q.view(torch.uint8).amax()) == 0xFF or int(q.view(torch.int8).amax()) == 0x7F):
        w = fp8_dequantize_exact(q, s, block)  # NaN codes (0xFF, 0x7F): the exact cast makes them NaN
        return out.copy_(w) if out is not None else w
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    w, s = out.copy_(_e4m3_over_256(q, buffers)), s * 256.0  # (q / 2⁸) · (s · 2⁸): q · s, rounded once
    if block is None:
        return w.mul_(s.reshape(()))
    if q.shape[-2] % block[0] or q.shape[-1] % block[1]:  # partial edge blocks
        return w.copy_(_unblock(_blocks(w, block) * s.unsqueeze(-1).unsqueeze(-3), q.shape))
    # each row times its blocks' scales: (…, R, C/b1, b1) · (…, R, C/b1, 1)
    w.unflatten(-1, (-1, block[1])).mul_(s.repeat_interleave(block[0], dim=-2).unsqueeze(-1))
    return w


def fp8_dequantize_exact(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """fp8_dequantize by torch's own float8 → float32 cast (the reference; NaN codes stay NaN)."""
    s = scale_values(scale)
    if block is None:
        return q.to(torch.float32) * s.reshape(())
    return _unblock(_blocks(q.to(torch.float32), block) * s.unsqueeze(-1).unsqueeze(-3), q.shape).contiguous()


def fp8_quantize(w: torch.Tensor, block: tuple[int, int] | None, pow2: bool = False,
                 scale_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                 buffers: Buffers = _new) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn (…, R, C), scale_inv) as transformers' `Fp8Quantize` makes them: per block
    scale = 448 / amax (1 for an all-zero block), scale_inv = 1 / scale — a power of two ⌈·⌉ for UE8M0, the
    forward scale then its exact reciprocal —, q = clamp(w · scale, ±448) rounded to e4m3; partial edge blocks
    scaled by their own amax. `block` None: one scale for the tensor (a 0-D or 1-element scale). q into `out`
    when given. NaN or Inf in w: ValueError."""
    wf = w.to(torch.float32)
    v = _blocks(wf, block) if block is not None else wf
    if block is not None:  # = |v|.amax over each block, without a |v| copy; the contiguous axis first
        amax = torch.maximum(v.amax(dim=-1).amax(dim=-2), v.amin(dim=-1).amin(dim=-2).neg())
    else:
        amax = torch.maximum(v.amax(), v.amin().neg())
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("NaN or Inf among the values to quantize")
    nonzero = amax > 0
    scales = torch.where(nonzero, FP8_MAX / torch.where(nonzero, amax, torch.ones_like(amax)), torch.ones_like(amax))
    inv = 1.0 / scales
    if pow2:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inv
    # |w · scale| ≤ 448·(1 + 2⁻²³) by construction, which e4m3 rounds to 448: transformers' clamp to ±448 changes
    # nothing, so it is left out
    x = torch.mul(v, scales.unsqueeze(-1).unsqueeze(-3) if block is not None else scales,
                  out=buffers("scaled", tuple(v.shape), torch.float32))
    x = _unblock(x, w.shape) if block is not None else x
    q = out.copy_(x) if out is not None else x.to(torch.float8_e4m3fn).contiguous()
    if scale_dtype == torch.uint8:  # E8M0 bytes
        return q, (torch.frexp(inv)[1] - 1 + 127).to(torch.uint8)
    return q, inv.to(scale_dtype)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(…, R, G, 16) packed E2M1 codes + (…, R, G) E8M0 exponents → float32 (…, R, 32·G), value 2j of a block
    in byte j's low nibble (transformers' `convert_moe_packed_tensors`, before its transpose)."""
    lut = torch.tensor(E2M1 + tuple(-x for x in E2M1), dtype=torch.float32)
    b = blocks.to(torch.uint8)
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)  # (…, R, G, 32)
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """x (float32, already divided by its block's scale) to FP4 E2M1 codes: round to nearest, ties to the even
    code (even mantissa), magnitudes above 6 saturated, the sign kept (−0 included)."""
    grid = torch.tensor(E2M1, dtype=torch.float32)
    a = x.abs().clamp(max=6.0).contiguous()
    lo = (torch.bucketize(a, grid, right=True) - 1).clamp(0, 7)
    hi = (lo + 1).clamp(max=7)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    code = torch.where(up, hi, lo)
    return (code | (torch.signbit(x).long() << 3)).to(torch.uint8)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (…, R, K), K a multiple of 32 → (blocks uint8 (…, R, K/32, 16), scales uint8 (…, R, K/32)) by the
    OCP MX v1.0 conversion (§6.3): shared exponent X = ⌊log2 amax⌋ − emax(E2M1) = ⌊log2 amax⌋ − 2 (clamped to
    E8M0's −127…127; −127 for an all-zero block), each element v/2^X rounded to FP4 E2M1, ties to even."""
    v = w.to(torch.float32).unflatten(-1, (-1, 32))  # (…, R, G, 32)
    amax = v.abs().amax(dim=-1)
    e = torch.where(amax > 0, torch.frexp(amax)[1] - 1 - 2, torch.full_like(amax, -127, dtype=torch.int32))
    e = e.clamp(-127, 127)
    codes = _e2m1_codes(torch.ldexp(v, -e.unsqueeze(-1)))  # (…, R, G, 32)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (e + 127).to(torch.uint8)


# ---------------------------------------------------------------- what a checkpoint stores


@dataclass(frozen=True)
class Codec:
    """How one quantized weight is stored. method "fp8": `block` (b0, b1), or None for one scale; `pow2` for
    UE8M0 scales; `rounding`: the products rounded to this dtype (compressed-tensors multiplies in its scales'
    dtype). method "mxfp4": the weight is the transpose of the decoded (…, R, 32·G)."""

    method: str
    block: tuple[int, int] | None = None
    pow2: bool = False
    rounding: torch.dtype | None = None

    def decode(self, values: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
               buffers: Buffers = _new) -> torch.Tensor:
        """The weight's values in float32, in its logical layout (into `out` when given)."""
        if self.method == "fp8":
            w = fp8_dequantize(values, scale, self.block, out, buffers)
            return w.copy_(w.to(self.rounding)) if self.rounding is not None else w
        w = mxfp4_dequantize(values, scale).transpose(-1, -2)
        return out.copy_(w) if out is not None else w.contiguous()

    @property
    def rows(self) -> int | None:
        """What a block of a 2-D weight's rows must be a multiple of to be decoded and encoded alone (its scales
        `scale_rows(r0, r1)`); None: only whole (one scale for the tensor, or MXFP4's transposed layout)."""
        return self.block[0] if self.method == "fp8" and self.block is not None else None

    def scale_rows(self, r0: int, r1: int) -> slice:
        return slice(r0 // self.block[0], -(-r1 // self.block[0]))

    def encode(self, w: torch.Tensor, scale_dtype: torch.dtype, out: torch.Tensor | None = None,
               buffers: Buffers = _new) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, scale) for the weight `w` (logical layout), scales stored in `scale_dtype`; FP8 values into
        `out` when given. NaN or Inf in w: ValueError."""
        if self.method == "fp8":
            return fp8_quantize(w, self.block, self.pow2, scale_dtype, out, buffers)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("NaN or Inf among the values to quantize")
        return mxfp4_quantize(w.transpose(-1, -2))


@dataclass(frozen=True)
class Quantized:
    """A quantized weight: its logical name and shape, codec, and stored tensors (values, scale, then others
    that belong to it, e.g. a static activation scale)."""

    name: str
    shape: tuple[int, ...]
    codec: Codec
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Scheme:
    method: str  # "fp8" | "mxfp4" | "compressed-tensors" (its FP8 weights)
    dtype: torch.dtype  # the model's own dtype (config's torch_dtype), which dequantized weights are written in
    weights: Mapping[str, Quantized]  # logical name → how it is stored


def _method_name(qc: Mapping) -> str:
    method = str(qc.get("quant_method", "unknown")).lower()
    if method == "bitsandbytes":
        return "bitsandbytes " + ("4-bit" if qc.get("load_in_4bit") else "8-bit" if qc.get("load_in_8bit") else "")
    return method


def _refuse(where, method: str) -> SurgeryError:
    return SurgeryError(f"{where}: quantized with {method.strip()}, which surgery cannot read yet (it reads FP8 — "
                        "block-scaled, or compressed-tensors float-quantized — and MXFP4 checkpoints); dequantize it "
                        "to bf16/fp16 first")


def scheme(config: Mapping, tensors: Mapping[str, tuple[str, tuple[int, ...]]], where) -> Scheme | None:
    """The quantization of a checkpoint from its config.json (`quantization_config`) and its tensors' names,
    dtype codes and shapes; None for an unquantized one. Unsupported methods, and stored tensors that do not fit
    together (a missing or misshapen scale), are one-line errors."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        for signs, method in _UNSUPPORTED_NAMES:
            hit = next((n for n in tensors if n.rsplit(".", 1)[-1] in signs or f".{signs[0]}." in n), None)
            if hit is not None:
                raise _refuse(where, f"{method} (tensor {hit})")
        scaled = next((n for n, (d, _) in tensors.items() if d.startswith("F8_") and _fp8_scale(n, tensors)), None)
        if scaled or any(n.endswith("_blocks") and f"{n[:-7]}_scales" in tensors for n in tensors):
            raise SurgeryError(f"{where}: holds quantized weights ({scaled or 'MXFP4 _blocks/_scales'}) but no "
                               "config.json with their quantization_config beside it (the block size is unknown)")
        return None
    method = _method_name(qc)
    if method not in SUPPORTED:
        raise _refuse(where, method)
    dtype = _model_dtype(config)
    if method == "fp8":
        weights = _fp8_weights(qc, tensors, where)
    elif method == "mxfp4":
        weights = _mxfp4_weights(tensors, where)
    else:
        weights = _compressed_tensors_weights(qc, tensors, where)
    return Scheme(method, dtype, weights)


def _model_dtype(config: Mapping) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def _activation_scales(stem: str, tensors: Mapping) -> tuple[str, ...]:
    """A quantized module's static activation scales: stored with its weight, dropped with it when dequantized."""
    return tuple(f"{stem}.{a}" for a in ACTIVATION_SCALES if f"{stem}.{a}" in tensors)


def _fp8_scale(name: str, tensors: Mapping) -> str | None:
    stem = name[: -len(".weight")] if name.endswith(".weight") else None
    cands = [f"{stem}.{s}" for s in FP8_SCALES] if stem is not None else [f"{name}_scale_inv"]
    return next((c for c in cands if c in tensors), None)


def _fp8_weights(qc: Mapping, tensors: Mapping, where) -> dict[str, Quantized]:
    block = qc.get("weight_block_size") or (128, 128)
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise SurgeryError(f"{where}: quantization_config.weight_block_size must be two positive integers, "
                           f"got {block!r}")
    pow2 = str(qc.get("scale_fmt", "")).lower() == "ue8m0"
    out = {}
    for name, (dtype, shape) in tensors.items():
        if dtype == "F8_E5M2":
            raise SurgeryError(f"{where}: {name} is float8_e5m2; only e4m3 FP8 checkpoints are read")
        if dtype != "F8_E4M3":
            continue
        scale = _fp8_scale(name, tensors)
        if scale is None:
            stem = name.removesuffix(".weight")
            raise SurgeryError(f"{where}: FP8 weight {name} has no scale ({stem}.weight_scale_inv, or .scale / "
                               f".qscale_weight) for module {stem}; the checkpoint is incomplete")
        sdtype, sshape = tensors[scale]
        if sdtype not in ("F32", "BF16", "F16", "F8_E8M0", "U8") or len(shape) < 2:
            raise SurgeryError(f"{where}: {scale} ({sdtype} {list(sshape)}) is not a block scale of the FP8 weight "
                               f"{name} {list(shape)}")
        grid = tuple(shape[:-2]) + (math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
        if tuple(sshape) != grid and math.prod(sshape) != 1:
            raise SurgeryError(f"{where}: scale {scale} has shape {list(sshape)}, but FP8 weight {name} "
                               f"{list(shape)} in blocks of {list(block)} needs {list(grid)}")
        codec = Codec("fp8", tuple(block) if tuple(sshape) == grid else None, pow2 or sdtype in ("F8_E8M0", "U8"))
        parts = (name, scale) + _activation_scales(name.removesuffix(".weight"), tensors)
        out[name] = Quantized(name, tuple(shape), codec, parts)
    return out


def _mxfp4_weights(tensors: Mapping, where) -> dict[str, Quantized]:
    out = {}
    for name, (dtype, shape) in tensors.items():
        if not name.endswith("_blocks"):
            continue
        base, scale = name[: -len("_blocks")], name[: -len("_blocks")] + "_scales"
        if scale not in tensors:
            raise SurgeryError(f"{where}: MXFP4 weight {name} has no scale tensor {scale}; the checkpoint is "
                               "incomplete")
        sdtype, sshape = tensors[scale]
        if dtype != "U8" or sdtype != "U8" or len(shape) != 4 or shape[-1] != 16 or tuple(sshape) != tuple(shape[:-1]):
            raise SurgeryError(f"{where}: {name} ({dtype} {list(shape)}) and {scale} ({sdtype} {list(sshape)}) are not "
                               "MXFP4 blocks (E, R, G, 16) uint8 with scales (E, R, G) uint8")
        E, R, G, _ = shape
        out[base] = Quantized(base, (E, 32 * G, R), Codec("mxfp4"), (name, scale))
    return out


def _compressed_tensors_weights(qc: Mapping, tensors: Mapping, where) -> dict[str, Quantized]:
    """compressed-tensors' FP8 checkpoints (`float-quantized`): `x.weight` float8_e4m3fn and `x.weight_scale` per
    tensor, per output channel (R, 1), per group (R, C/g) or per block (⌈R/b0⌉, ⌈C/b1⌉), symmetric; W = q · scale
    computed in the scale's dtype, as its `dequantize` does. Other formats (packed ints, NVFP4, …) and zero points
    are refused."""
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
    if qc.get("format") not in CT_FORMATS + ("mixed-precision",) or not groups:
        raise _refuse(where, f"compressed-tensors {qc.get('format')}")
    for g in groups:
        w = g.get("weights") or {}
        fmt = g.get("format") or qc.get("format")
        if fmt not in CT_FORMATS or w.get("type") != "float" or w.get("num_bits") != 8:
            raise _refuse(where, f"compressed-tensors {fmt} ({w.get('num_bits')}-bit {w.get('type')} weights)")
    args = [g.get("weights") or {} for g in groups]
    blocks = [tuple(w["block_structure"]) for w in args if w.get("block_structure")]
    blocks += [(1, w["group_size"]) for w in args if w.get("group_size")]
    out = {}
    for name, (dtype, shape) in tensors.items():
        if dtype != "F8_E4M3":
            continue
        stem = name.removesuffix(".weight")
        scale, zero = f"{stem}.weight_scale", f"{stem}.weight_zero_point"
        if scale not in tensors:
            raise SurgeryError(f"{where}: FP8 weight {name} has no scale ({scale}) for module {stem}; the checkpoint "
                               "is incomplete")
        if zero in tensors:
            raise _refuse(where, f"compressed-tensors asymmetric FP8 ({zero})")
        sdtype, sshape = tensors[scale]
        R, C = shape[-2], shape[-1]
        grid = {tuple(shape[:-2]) + (math.ceil(R / b0), math.ceil(C / b1)): (b0, b1) for b0, b1 in
                [(1, C)] + blocks}
        if math.prod(sshape) == 1:
            block = None
        elif tuple(sshape) in grid and len(shape) >= 2:
            block = grid[tuple(sshape)]
        else:
            raise SurgeryError(f"{where}: scale {scale} has shape {list(sshape)}, which is no per-tensor, per-channel, "
                               f"group or block scale of FP8 weight {name} {list(shape)}")
        if sdtype not in ("F32", "BF16", "F16"):
            raise SurgeryError(f"{where}: scale {scale} is {sdtype}; expected float32, bfloat16 or float16")
        rounding = {"BF16": torch.bfloat16, "F16": torch.float16}.get(sdtype)  # float32: no extra rounding
        parts = (name, scale) + _activation_scales(stem, tensors)
        out[name] = Quantized(name, tuple(shape), Codec("fp8", block, False, rounding), parts)
    return out
