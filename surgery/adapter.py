"""The in-memory adapter model that every operation transforms.

An `Adapter` is a value: named LoRA modules (each a factor pair with one normalised `scale`), the tensors no
operation touches (DoRA magnitudes live on their module; `modules_to_save`, trainable tokens … pass through),
and the format's config and metadata. Large tensors read from disk stay `TensorRef`s until an operation needs
them, so a 70B adapter is planned from headers and streamed one module at a time.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence, Union

import torch
from safetensors import safe_open

from .device import to_device
from .errors import SurgeryError
from .linalg import SVD, all_finite, lowrank_svd

KINDS = ("linear", "conv", "embedding")  # LoraModule's; ExpertsModule's kind is "experts"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for module paths (formats.md §1.2)


@dataclass(frozen=True)
class TensorRef:
    """A tensor still on disk: `key` inside the safetensors file `path`, read on `load()`. A floating-point
    tensor holding NaN or Inf is refused there, naming the file and the tensor: no command computes with one,
    copies one into an output or prints one.

    `offset` (of its bytes in the file) and `stamp` ((mtime_ns, size) of the file whose header gave it), when the
    reader knows them: the bytes are then read directly, without opening the file through safetensors, whose
    header parse costs 0.15–0.4 ms per tensor of a 448-tensor adapter. A file
    changed since is read through safetensors again."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = field(default=None, compare=False)
    stamp: tuple[int, int] | None = field(default=None, compare=False)

    def load(self) -> torch.Tensor:
        t = self._direct()
        if t is None:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(self.key)
        if t.is_floating_point() and not all_finite(t):
            raise SurgeryError(f"{self.path}: tensor {self.key} holds NaN or Inf")
        return t

    def _direct(self) -> torch.Tensor | None:
        if self.offset is None:
            return None
        with open(self.path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            if (st.st_mtime_ns, st.st_size) != self.stamp:
                return None
            t = torch.empty(self.shape, dtype=self.dtype)
            view, done = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
            f.seek(self.offset)
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    return None  # truncated since: safetensors names the problem
                done += n
        return t

    def numel(self) -> int:
        return math.prod(self.shape)


TensorLike = Union[torch.Tensor, TensorRef]


def materialize(t: TensorLike) -> torch.Tensor:
    """The tensor itself, reading it from disk if it is still a reference."""
    return t if isinstance(t, torch.Tensor) else t.load()


@dataclass(frozen=True)
class LoraModule:
    """One LoRA update `ΔW = scale · B @ A`.

    linear:    A (r, in),          B (out, r)
    conv:      A (r, in, *kernel), B (out, r, 1, …)   (ΔW = B.flatten(1) @ A.flatten(1), reshaped)
    embedding: A (r, num_embeddings), B (embedding_dim, r)  (the embedding table gets ΔWᵀ)
    `bias` is PEFT's `lora_B.bias` (out,) and `magnitude` a DoRA magnitude vector; both ride along unchanged.
    `dora_axis`: which norms the magnitude replaces — "out" (one per output row: PEFT, LyCORIS's default) or "in"
    (one per input column: LyCORIS's `wd_on_out=False`). The magnitude keeps the shape its file gave it; each
    writer gives it its own format's layout.
    """

    A: TensorLike
    B: TensorLike
    scale: float
    kind: str = "linear"
    bias: TensorLike | None = None
    magnitude: TensorLike | None = None
    dora_axis: str = "out"
    algo = "lora"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """ΔW's shape as the base layer stores it before any transpose: (out, in) or (out, in, *kernel)."""
        return (self.out_features,) + tuple(int(s) for s in self.A.shape[1:])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        """Columns of the flattened ΔW (in · kernel size for conv)."""
        return math.prod(int(s) for s in self.A.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def lowrank(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """The exact pair (B, A) of ΔW / scale that every module kind offers where it has one: its factors."""
        return self.factors(dtype, device)

    def num_params(self, rank: int | None = None) -> int:
        """Factor parameters (A and B) at `rank` (default: the current rank)."""
        r = self.rank if rank is None else rank
        return r * (self.in_features + self.out_features)

    def factors(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """(B (out, r), A (r, in)) as 2-D matrices in `dtype` on `device`."""
        A, B = to_device(materialize(self.A), device, dtype), to_device(materialize(self.B), device, dtype)
        return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """Dense ΔW (out, in) = scale · (B @ A), in PEFT's order of operations (product, then scale)."""
        B, A = self.factors(dtype, device)
        return (B @ A) * self.scale


@dataclass(frozen=True)
class ExpertsModule:
    """LoRA on a 3-D expert parameter (PEFT `target_parameters`, formats.md §1.2): for each of E experts
    `ΔW_e = scale · B_e @ A_e`, (out, in) — one LoRA per expert, stored stacked in PEFT's own layout:

    A (r·E, in):  rows grouped by expert, A_e = A[e·r:(e+1)·r]             (PEFT: reshape(E, r, in))
    B (out, r·E): columns grouped by rank, B_e = B[:, e::E]                (PEFT: reshape(out, r, E))
    The base parameter holds ΔW as (E, out, in), or (E, in, out) for a module marked `is_transposed` (gpt-oss);
    that is the base's business (surgery.io.experts), not the adapter's. `nesting`: the owning module's targeted
    parameters in registration order — PEFT nests one wrapper per parameter, the first registered innermost, and
    the file's keys say where (`experts.base_layer.lora_A.weight` is the inner one).
    """

    A: TensorLike
    B: TensorLike
    scale: float
    experts: int
    nesting: tuple[str, ...] = ()
    kind = "experts"
    algo = "lora"
    bias = None  # PEFT's ParamWrapper refuses lora_bias and DoRA
    magnitude = None
    dora = False
    dora_axis = "out"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0]) // self.experts

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, out, in): ΔW per expert, before any transpose the base applies."""
        return self.experts, self.out_features, self.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def num_params(self, rank: int | None = None) -> int:
        r = self.rank if rank is None else rank
        return self.experts * r * (self.in_features + self.out_features)

    def lowrank(self, dtype=torch.float32, device="cpu"):
        return None  # E pairs, not one: see stacked()

    def stacked(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """(B (E, out, r), A (E, r, in)) in `dtype` on `device`."""
        return unpack_experts(to_device(materialize(self.B), device, dtype), to_device(materialize(self.A), device, dtype),
                              self.experts)

    def per_expert(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[LoraModule]:
        """The E LoRA modules (B_e, A_e, scale) — what every LoRA operation runs on, one expert at a time."""
        B, A = self.stacked(dtype, device)
        B = B.contiguous()  # one copy of the parameter's B: B_e is otherwise a column every r·E floats
        return [LoraModule(A=A[e], B=B[e], scale=self.scale) for e in range(self.experts)]

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """Dense ΔW (E, out, in) = scale · B_e @ A_e, PEFT's einsum `o r e, e r i -> e o i`."""
        B, A = self.stacked(dtype, device)
        return torch.bmm(B, A) * self.scale


def unpack_experts(B: torch.Tensor, A: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stacked factors B (out, r·E), A (r·E, in) → (B (E, out, r), A (E, r, in))."""
    if A.shape[0] % experts or B.shape[1] != A.shape[0]:
        raise ValueError(f"factors {list(B.shape)}, {list(A.shape)} do not hold {experts} experts")
    return B.reshape(B.shape[0], -1, experts).permute(2, 0, 1), A.reshape(experts, -1, A.shape[1])


def pack_experts(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (E, out, r), A (E, r, in)) → PEFT's stacked (B (out, r·E), A (r·E, in)), contiguous."""
    E, out, r = B.shape
    return B.permute(1, 2, 0).reshape(out, r * E).contiguous(), A.reshape(E * r, A.shape[2]).contiguous()


def experts_module(nesting: tuple[str, ...], Bs, As, scale: float, dtype: torch.dtype) -> ExpertsModule:
    """An ExpertsModule from per-expert factors B_e (out, r_e), A_e (r_e, in); ranks that differ are padded with
    zero directions to the largest (PEFT has one r per parameter)."""
    k = max(int(a.shape[0]) for a in As)
    B = torch.stack([torch.nn.functional.pad(b, (0, k - b.shape[1])) for b in Bs])
    A = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, k - a.shape[0])) for a in As])
    B, A = pack_experts(B.to(dtype), A.to(dtype))
    return ExpertsModule(A=A, B=B, scale=scale, experts=len(As), nesting=nesting)


@dataclass(frozen=True)
class Adapter:
    """An adapter checkpoint as a value.

    modules:     module name (as the format writes it, e.g. `base_model.model.model.layers.0.mlp.up_proj`
                 or kohya's `lora_unet_..._to_q`) → LoraModule (or LoHa/LoKr/diff/TeRA); an expert
                 parameter's LoRA by the parameter's path (`…mlp.experts.gate_up_proj`) → ExpertsModule
    passthrough: on-disk key → tensor that no operation changes (modules_to_save, trainable tokens, …)
    format:      "peft" (directory), "peft-file" (one .safetensors) or "kohya"
    config:      PEFT's adapter_config.json (or diffusers' embedded copy); {} for kohya
    metadata:    the safetensors `__metadata__` (str → str)
    source:      the file or directory it was read from (None when built in memory)
    notes:       what the reader had to assume (e.g. a missing config), for reports
    """

    modules: Mapping[str, LoraModule]
    format: str
    passthrough: Mapping[str, TensorLike] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    source: Path | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("modules", "passthrough", "config", "metadata"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def with_modules(self, modules: Mapping[str, LoraModule], **changes) -> "Adapter":
        return replace(self, modules=modules, **changes)

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values())

    def check_plain(self, what: str, keep: tuple[str, ...] = ()) -> None:
        """Refuse, where `what` would apply the factors as a plain update of the base's own layers, an adapter
        whose PEFT config makes them something else (`NOT_PLAIN`; those in `keep`: `what` says it too)."""
        for key, meaning in NOT_PLAIN.items():
            if key not in keep and (value := self.config.get(key)):
                raise SurgeryError(f"{self.source}: {key} {value}: {meaning}, which {what} cannot express; keep it "
                                   "a PEFT adapter")


# PEFT config keys whose (non-empty) value makes an adapter's factors more than a plain update of the base's layers
NOT_PLAIN = {"alora_invocation_tokens": "an activated LoRA (PEFT applies it only after these tokens)",
             "layer_replication": "an adapter of a model PEFT builds from repeated base layers",
             "use_qalora": "a QA-LoRA (PEFT pools each input in groups before A, and merges none)"}


def adapter_list(adapters, where: str) -> list[Adapter]:
    """`adapters` — one Adapter or a sequence of them — as a list; anything else (a path: `load_adapter` reads
    one) is named in one line rather than failing deep inside `where`."""
    items = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    if bad := next((a for a in items if not isinstance(a, Adapter)), None):
        raise SurgeryError(f"{where}: expected Adapter objects, got {type(bad).__name__} {bad!r:.80} (surgery."
                           "load_adapter(path) reads one)")
    return items


def check_weights(weights: Sequence[float], label: str) -> list[float]:
    """Weights as floats a float32 computation holds (finite, |w| ≤ 3.4e38: 1e39 overflowed deep inside)."""
    top = torch.finfo(torch.float32).max
    try:
        out = [float(w) for w in weights]
    except (TypeError, ValueError):
        out = [math.nan]
    if not all(math.isfinite(w) and abs(w) <= top for w in out):
        raise SurgeryError(f"{label} must be finite numbers within float32's range (|w| ≤ {top:.3g}), got "
                           f"{list(weights)}")
    return out


def check_scaled(name: str, module, weight: float) -> None:
    """weight · the module's scale is ΔW's coefficient in float32: one past its range was a traceback in a GEMM."""
    if abs(weight * module.scale) > torch.finfo(torch.float32).max:
        raise SurgeryError(f"module {name}: weight {weight:g} × scale {module.scale:g} is beyond float32's range, "
                           "in which the update is formed")


class _Structured:
    """What LoHa, LoKr and full-diff modules share: their tensors by role (the LyCORIS/PEFT names without the
    `hada_` / `lokr_` prefix), one `scale`, the ΔW shape, and an exact SVD without a dense ΔW where the
    structure gives one (surgery.hadamard_kron)."""

    bias = None

    def get(self, role: str, dtype=torch.float32, device="cpu") -> torch.Tensor | None:
        t = self.tensors.get(role)
        return None if t is None else materialize(t).to(device=device, dtype=dtype)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def num_params(self, rank: int | None = None) -> int:
        """Stored parameters; at `rank`, those of the LoRA it becomes when squeezed."""
        if rank is not None:
            return rank * (self.in_features + self.out_features)
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def lowrank(self, dtype=torch.float32, device="cpu"):
        """An exact LoRA pair (B, A) of ΔW / scale where one is cheaper than the exact SVD; None otherwise."""
        return None


def _half(m, n: int, dtype, device):
    """(B (rows, r), A (r, cols)) of half `n` ∈ {1, 2}: a w{n}_a @ w{n}_b pair, its Tucker form folded, or a full
    w{n} as (w{n}.flatten(1), None)."""
    from .hadamard_kron import tucker_pair

    full = m.get(f"w{n}", dtype, device)
    if full is not None:
        return full.reshape(full.shape[0], -1), None
    a, b, t = (m.get(r, dtype, device) for r in (f"w{n}_a", f"w{n}_b", f"t{n}"))
    if t is not None:
        return tucker_pair(t, a, b)
    return a, b.reshape(b.shape[0], -1)


@dataclass(frozen=True)
class LohaModule(_Structured):
    """LoHa: `ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`, flattened (out, in·kh·kw).

    tensors: w1_a (out, r), w1_b (r, in_flat), w2_a, w2_b alike; Tucker convs instead w{n}_a (r, out),
    w{n}_b (r, in) and cores t1, t2 (r, r, kh, kw). magnitude: a LyCORIS `dora_scale`.
    """

    tensors: Mapping[str, TensorLike]
    scale: float
    magnitude: TensorLike | None = None
    dora_axis: str = "out"
    algo = "loha"

    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @property
    def kind(self) -> str:
        return "conv" if "t1" in self.tensors else "linear"

    @property
    def shape(self) -> tuple[int, ...]:
        t = self.tensors
        if "t1" in t:
            return (int(t["w1_a"].shape[1]), int(t["w1_b"].shape[1])) + tuple(int(s) for s in t["t1"].shape[2:])
        return int(t["w1_a"].shape[0]), math.prod(int(s) for s in t["w1_b"].shape[1:])

    @property
    def rank(self) -> int:
        """The rank bound of ΔW: r₁·r₂ (capped by its shape)."""
        r1, r2 = (int(self.tensors[f"w{n}_b"].shape[0]) for n in (1, 2))
        return min(r1 * r2, self.out_features, self.in_features)

    def lowrank(self, dtype=torch.float32, device="cpu"):
        """The face-splitting LoRA (B (out, r₁r₂), A (r₁r₂, in)) of ΔW / scale (hadamard_kron.hadamard_lora)."""
        from .hadamard_kron import hadamard_lora

        return hadamard_lora(*_half(self, 1, dtype, device), *_half(self, 2, dtype, device))

    def svd(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """Exact thin SVD of ΔW via its face-splitting LoRA: O((out + in)(r₁r₂)²)."""
        return lowrank_svd(*self.lowrank(dtype, device), self.scale)

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        (B1, A1), (B2, A2) = _half(self, 1, dtype, device), _half(self, 2, dtype, device)
        return (B1 @ A1) * (B2 @ A2) * self.scale


@dataclass(frozen=True)
class LokrModule(_Structured):
    """LoKr: `ΔW = scale · kron(W₁, W₂)`, flattened (l·k, m·n·kh·kw).

    tensors: W₁ as w1 (l, m) or w1_a (l, r) @ w1_b (r, m); W₂ as w2 (k, n[, kh, kw]), w2_a (k, r) @ w2_b
    (r, n·kh·kw), or Tucker t2 (r, r, kh, kw) with w2_a (r, k), w2_b (r, n). `rank_hint`: PEFT's r for a
    module whose factors are both full (its tensors do not say it). magnitude: a LyCORIS `dora_scale`.
    """

    tensors: Mapping[str, TensorLike]
    scale: float
    magnitude: TensorLike | None = None
    rank_hint: int | None = None
    dora_axis: str = "out"
    algo = "lokr"

    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def _dims(self):
        """(l, m, k, n, kernel) of the two halves."""
        t = self.tensors
        l, m = (t["w1"].shape if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1]))
        if "w2" in t:
            k, n, kernel = t["w2"].shape[0], t["w2"].shape[1], tuple(t["w2"].shape[2:])
        elif "t2" in t:
            k, n, kernel = t["w2_a"].shape[1], t["w2_b"].shape[1], tuple(t["t2"].shape[2:])
        else:
            k, n, kernel = t["w2_a"].shape[0], math.prod(t["w2_b"].shape[1:]), ()
        return int(l), int(m), int(k), int(n), tuple(int(s) for s in kernel)

    @property
    def kind(self) -> str:
        return "conv" if self._dims()[4] else "linear"

    @property
    def shape(self) -> tuple[int, ...]:
        l, m, k, n, kernel = self._dims()
        return (l * k, m * n) + kernel

    @property
    def rank(self) -> int:
        """rank(W₁) · rank(W₂) bounds: each half's decomposed r, else its smaller side."""
        t, (l, m, k, n, kernel) = self.tensors, self._dims()
        r1 = int(t["w1_b"].shape[0]) if "w1_b" in t else min(l, m)
        r2 = int(t["w2_b"].shape[0]) if "w2_b" in t else min(k, n * math.prod(kernel))
        return r1 * r2

    def halves(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """((B₁, A₁), (B₂, A₂)): W₁ = B₁ @ A₁ and W₂ = B₂ @ A₂ as 2-D pairs, A None where the half is full."""
        return _half(self, 1, dtype, device), _half(self, 2, dtype, device)

    def svd(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """Exact SVD of ΔW from the SVDs of its two halves (hadamard_kron.lokr_svd)."""
        from .hadamard_kron import lokr_svd

        return lokr_svd(*self.halves(dtype, device), self.scale)

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        (B1, A1), (B2, A2) = self.halves(dtype, device)
        W1 = B1 if A1 is None else B1 @ A1
        W2 = B2 if A2 is None else B2 @ A2
        return torch.kron(W1, W2) * self.scale


@dataclass(frozen=True)
class DiffModule(_Structured):
    """A full update as LyCORIS's extractor writes it where low rank does not pay: `ΔW = diff` (out, in[, kernel]),
    `diff_b` (out,) added to the bias."""

    tensors: Mapping[str, TensorLike]
    scale: float = 1.0
    magnitude = None
    dora_axis = "out"
    algo = "diff"

    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @property
    def bias(self):
        return self.tensors.get("diff_b")

    @property
    def kind(self) -> str:
        return "conv" if len(self.tensors["diff"].shape) > 2 else "linear"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensors["diff"].shape)

    @property
    def rank(self) -> int:
        return min(self.out_features, self.in_features)

    def svd(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """Dense SVD: a full update has no structure to use."""
        D = self.get("diff", dtype, device)
        U, S, Vh = torch.linalg.svd(D.reshape(D.shape[0], -1) * self.scale, full_matrices=False)
        return SVD(U, S, Vh)

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        D = self.get("diff", dtype, device)
        return D.reshape(D.shape[0], -1) * self.scale


# the tensor each kind's scale folds into: ΔW is linear in it (LoHa/LoKr: in their first half)
_FOLD_ROLE = {"loha": ("w1_a",), "lokr": ("w1", "w1_a"), "diff": ("diff",)}


def scaled(t: TensorLike, s: float) -> torch.Tensor:
    """`s · t` computed in float32 (float64 for float64 tensors) and rounded once to t's dtype."""
    t = materialize(t)
    return (t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) * s).to(t.dtype)


def fold_scale(m, to: float = 1.0):
    """The same update with its scale folded into the factors down to scale `to` (≠ 0) — 1 for files whose loaders
    may read the factors alone (alpha = r): B (and PEFT's lora_B.bias) of a LoRA, LoHa's w1_a, LoKr's W₁, a diff
    and its bias times scale / to. One rounding of the scaled tensor; exact when that is a power of two. A DoRA
    magnitude is unchanged: it rescales W + ΔW, which is the same ΔW."""
    if m.scale == to or m.algo == "tera":
        return m
    s = m.scale / to
    if m.kind == "experts":
        return replace(m, B=scaled(m.B, s), scale=to)
    if m.algo == "lora":
        return replace(m, B=scaled(m.B, s), bias=None if m.bias is None else scaled(m.bias, s), scale=to)
    tensors = dict(m.tensors)
    role = next(r for r in _FOLD_ROLE[m.algo] if r in tensors)
    tensors[role] = scaled(tensors[role], s)
    if m.algo == "diff" and "diff_b" in tensors:
        tensors["diff_b"] = scaled(tensors["diff_b"], s)
    return replace(m, tensors=tensors, scale=to)
