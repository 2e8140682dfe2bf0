"""The in-memory adapter model that every operation transforms.

An `Adapter` is a value: named LoRA modules (each a factor pair with one normalised `scale`), the tensors no
operation touches (DoRA magnitudes live on their module; `modules_to_save`, trainable tokens … pass through),
and the format's config and metadata. Large tensors read from disk stay `TensorRef`s until an operation needs
them, so a 70B adapter is planned from headers and streamed one module at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Union

import torch
from safetensors import safe_open

KINDS = ("linear", "conv", "embedding")


@dataclass(frozen=True)
class TensorRef:
    """A tensor still on disk: `key` inside the safetensors file `path`, read on `load()`."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.key)

    def numel(self) -> int:
        return math.prod(self.shape)


TensorLike = Union[torch.Tensor, TensorRef]


def materialize(t: TensorLike) -> torch.Tensor:
    """The tensor itself, reading it from disk if it is still a reference."""
    return t.load() if isinstance(t, TensorRef) else t


@dataclass(frozen=True)
class LoraModule:
    """One LoRA update `ΔW = scale · B @ A`.

    linear:    A (r, in),          B (out, r)
    conv:      A (r, in, *kernel), B (out, r, 1, …)   (ΔW = B.flatten(1) @ A.flatten(1), reshaped)
    embedding: A (r, num_embeddings), B (embedding_dim, r)  (the embedding table gets ΔWᵀ)
    `bias` is PEFT's `lora_B.bias` (out,) and `magnitude` a DoRA magnitude vector; both ride along unchanged.
    """

    A: TensorLike
    B: TensorLike
    scale: float
    kind: str = "linear"
    bias: TensorLike | None = None
    magnitude: TensorLike | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

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

    def num_params(self, rank: int | None = None) -> int:
        """Factor parameters (A and B) at `rank` (default: the current rank)."""
        r = self.rank if rank is None else rank
        return r * (self.in_features + self.out_features)

    def factors(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """(B (out, r), A (r, in)) as 2-D matrices in `dtype` on `device`."""
        A = materialize(self.A).to(device=device, dtype=dtype)
        B = materialize(self.B).to(device=device, dtype=dtype)
        return B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        """Dense ΔW (out, in) = scale · (B @ A), in PEFT's order of operations (product, then scale)."""
        B, A = self.factors(dtype, device)
        return (B @ A) * self.scale


@dataclass(frozen=True)
class Adapter:
    """An adapter checkpoint as a value.

    modules:     module name (as the format writes it, e.g. `base_model.model.model.layers.0.mlp.up_proj`
                 or kohya's `lora_unet_..._to_q`) → LoraModule
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


@dataclass(frozen=True)
class TeraModule:
    """One TeRA update `ΔW = scale · reshape(𝒢 ×_n (Λ_n U_n))` (surgery.tera): trainable λ's, one per mode
    (out modes, then in modes), and the frozen structure `spec` whose core and factors come from its seed."""

    lambdas: tuple[TensorLike, ...]
    spec: "TeraSpec"  # noqa: F821 — surgery.tera.TeraSpec (kept out of the import graph of the data model)
    scale: float = 1.0
    kind: str = "linear"
    bias = None  # no lora_B.bias, no DoRA magnitude: merge code treats TeRA like a plain linear LoRA
    magnitude = None
    dora = False

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def rank(self) -> int:
        """rank(ΔW) for non-zero λ's: min(Π R_out, Π R_in)."""
        return self.spec.max_rank

    @property
    def dtype(self) -> torch.dtype:
        return self.lambdas[0].dtype

    def num_params(self, rank: int | None = None) -> int:
        return sum(self.spec.modes)

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        from .tera import shared, tera_delta

        core, factors = shared(self.spec, dtype, device)
        lams = [materialize(l).to(device, dtype) for l in self.lambdas]
        return tera_delta(lams, core, factors, self.spec, self.scale)
