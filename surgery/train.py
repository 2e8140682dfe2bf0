"""Training side (methods.md §2.4, §3): an adapter-only training step, In-Squeeze (rank annealing during
training, for PEFT models and this project's own layers), and the trained adapter as an `Adapter` to save.

Only adapter tensors train: LoRA A/B (`LoRALinear`, PEFT `LoraLayer`) or TeRA λ's (`TeRALinear`); everything
else is frozen. A squeeze during training keeps ΔW's best rank-k part exactly (R-only QR core SVD in float64),
keeps the scale (alpha moves with the rank), and resets the optimizer state of the squeezed factors.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .adapter import PEFT_PREFIX as PREFIX, Adapter, LoraModule
from .errors import SurgeryError
from .layers import linear_shape, one_fan_in_fan_out, replace_linears
from .linalg import core_factors, core_svd
from .tera import TeRALinear


class LoRALinear(torch.nn.Module):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`) plus `scale · B @ A` (A (r, in) Kaiming-uniform from `generator`,
    B (out, r) zero, as PEFT initialises them), factors trained in float32."""

    def __init__(self, base: torch.nn.Module, rank: int, scale: float = 1.0, A=None, B=None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise SurgeryError(f"LoRA rank must be at least 1, got {rank}")
        shape = linear_shape(base)
        if shape is None:
            raise SurgeryError(f"LoRALinear wraps an nn.Linear or Conv1D, not {type(base).__name__}")
        out_features, in_features, self.fan_in_fan_out = shape
        self.base, self.scale = base, scale
        for p in base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        if A is None:
            A = torch.empty(rank, in_features)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B = torch.zeros(out_features, rank) if B is None else B
        self.A = torch.nn.Parameter(torch.as_tensor(A, dtype=torch.float32).to(dev).clone())
        self.B = torch.nn.Parameter(torch.as_tensor(B, dtype=torch.float32).to(dev).clone())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (((x.to(self.A.dtype) @ self.A.T) * self.scale) @ self.B.T).to(x.dtype)


def attach_lora(model: torch.nn.Module, pattern: str, rank: int, *, alpha: float | None = None,
                seed: int = 0) -> dict[str, LoRALinear]:
    """Replace every `nn.Linear` (or GPT-2 `Conv1D`) whose name matches `pattern` (re.search) by a LoRALinear of
    `rank`, scale alpha / rank (1 without alpha); A is drawn from (seed, module name)."""
    from .device import seeded
    from .rank import FixedRank

    FixedRank(rank)  # a whole number ≥ 1 (0 divided by zero, 2.5 failed in torch.empty)
    return replace_linears(model, pattern, lambda name, mod: LoRALinear(mod, rank, (alpha or rank) / rank,
                                                                        generator=seeded(seed, name)))


# ---------------------------------------------------------------- the LoRA layers of a model


@dataclass
class _Site:
    """One LoRA layer of a model, PEFT's or ours, seen as (A (r, in), B (out, r), scale) parameters."""

    layer: torch.nn.Module
    A: torch.nn.Parameter
    B: torch.nn.Parameter
    scale: float
    adapter: str | None = None  # PEFT's adapter name

    def set_rank(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """New factors of rank k = A.shape[0], in place (the Parameter objects stay), scale unchanged."""
        k = A.shape[0]
        self.A.data, self.B.data = A.to(self.A), B.to(self.B)
        self.A.grad = self.B.grad = None
        if self.adapter is not None:  # PEFT: nn.Linear shapes, r, and alpha so that alpha/r (or /√r) keeps scale
            a = self.adapter
            self.layer.lora_A[a].out_features = self.layer.lora_B[a].in_features = k
            self.layer.r[a] = k
            rs = self.layer.use_rslora.get(a, False)
            self.layer.lora_alpha[a] = self.scale * (math.sqrt(k) if rs else k)


def lora_sites(model: torch.nn.Module) -> dict[str, _Site]:
    """Every LoRA layer of `model` by module path: this project's LoRALinear and PEFT's linear LoRA layers
    (the active adapter). Conv and embedding LoRA and DoRA are refused: the in-training squeeze is linear-only."""
    sites = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            sites[name] = _Site(mod, mod.A, mod.B, mod.scale)
        elif hasattr(mod, "lora_A") and hasattr(mod, "scaling") and isinstance(mod.lora_A, torch.nn.ModuleDict):
            for a in getattr(mod, "active_adapters", ["default"]):
                if a not in mod.lora_A:
                    continue
                if not isinstance(mod.lora_A[a], torch.nn.Linear) or getattr(mod, "use_dora", {}).get(a):
                    raise SurgeryError(f"{name}: only linear, non-DoRA LoRA layers can be squeezed in training")
                sites[name] = _Site(mod, mod.lora_A[a].weight, mod.lora_B[a].weight, float(mod.scaling[a]), a)
    return sites


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's trainable tensors — A/B of LoRALinear, TeRA λ's, PEFT's `lora_*` tensors (A/B, embedding
    LoRA, DoRA magnitudes) — after freezing every other parameter of `model`."""
    ours = {id(p) for m in model.modules() if isinstance(m, (LoRALinear, TeRALinear))
            for n, p in m.named_parameters() if not n.startswith("base.")}
    keep = [p for n, p in model.named_parameters() if id(p) in ours or "lora_" in n]
    if not keep:
        raise SurgeryError("the model has no LoRA or TeRA layers to train")
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return keep


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in ("bf16", "fp16"):
        raise SurgeryError(f"unknown mixed-precision mode {amp!r}; use auto, bf16, fp16 or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


class TrainStep:
    """One optimizer step on the adapter's tensors only: autocast (bf16, or fp16 with loss scaling, on CUDA by
    default), gradient-norm clipping, AdamW. `step(loss_fn)` runs `loss_fn()` (a scalar) and returns its value."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, *, clip: float | None = 1.0, amp: str = "auto",
                 weight_decay: float = 0.0):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise SurgeryError(f"learning rate must be a finite number ≥ 0, got {lr!r}")
        self.model, self.clip = model, clip
        self.params = adapter_parameters(model)
        self.device = self.params[0].device
        self.amp = _amp_dtype(amp, self.device)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = loss_fn()
        self.scaler.scale(loss).backward()
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ---------------------------------------------------------------- squeezing during training


@dataclass(frozen=True)
class Squeezed:
    name: str
    from_rank: int
    to_rank: int
    energy: float  # ‖ΔW_k‖² / ‖ΔW‖²


def squeeze_model(model: torch.nn.Module, rank: int | Mapping[str, int], optimizer=None) -> list[Squeezed]:
    """Squeeze every LoRA layer above `rank` (or its entry of a {module path: rank} map) to its best rank-k
    approximation, exactly and in place; the optimizer's state for the squeezed factors is dropped."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    done = []
    with torch.no_grad():
        for name, site in lora_sites(model).items():
            k = rank.get(name) if isinstance(rank, Mapping) else rank
            if k is None:
                continue
            if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:  # (2.5: a TypeError in a slice)
                raise SurgeryError(f"{name}: rank must be a whole number of at least 1, got {k!r}")
            k = int(k)
            r = site.A.shape[0]
            if k >= r:
                continue
            B, A = site.B.double(), site.A.double()
            if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
                raise SurgeryError(f"{name}: LoRA factors contain NaN or Inf")
            core = core_svd(B, A, site.scale)
            B2, A2 = core_factors(B, A, core, k, site.scale)
            total = float(core.S.square().sum())
            site.set_rank(A2, B2)
            if opt is not None:
                for p in (site.A, site.B):
                    opt.state.pop(p, None)
            done.append(Squeezed(name, r, k, float(core.S[:k].square().sum()) / total if total else 1.0))
    _sync_peft_config(model)
    return done


def _sync_peft_config(model) -> None:
    """Keep a PeftModel's config (r, lora_alpha, rank_pattern, alpha_pattern) true to its layers' ranks."""
    if not hasattr(model, "peft_config"):
        return
    from .io.peft import updated_config

    active = {site.adapter for site in lora_sites(model).values()}
    for a, cfg in model.peft_config.items():
        if a not in active:
            continue
        new = updated_config(lora_adapter(model, adapter_name=a, copy=False))
        for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):
            setattr(cfg, key, new[key])


@dataclass(frozen=True)
class InSqueeze:
    """In-Squeeze: anneal every LoRA layer from `source_rank` to `target_rank` over `total_steps`.

    Defaults (methods.md §2.4): `squeezes` = round(log2(source / target)) (at least 1), geometric ranks
    source·(target/source)^(i/n), and n + 1 equal step segments, the i-th squeeze after step i·total/(n + 1).
    Call `on_step(model, optimizer, step)` after each optimizer step (`step` = steps done), or use
    `trainer_callback()` with a transformers Trainer.
    """

    source_rank: int
    target_rank: int
    total_steps: int
    squeezes: int | None = None

    def __post_init__(self):
        if not 1 <= self.target_rank < self.source_rank:
            raise SurgeryError(f"In-Squeeze needs 1 ≤ target rank < source rank, got {self.source_rank} → "
                               f"{self.target_rank}")
        n = self.squeezes or max(1, round(math.log2(self.source_rank / self.target_rank)))
        if n < 1 or self.total_steps < n + 1:
            raise SurgeryError(f"{n} squeezes need at least {n + 1} steps, got {self.total_steps}")
        object.__setattr__(self, "squeezes", n)

    @property
    def plan(self) -> list[tuple[int, int]]:
        """[(after step, rank)], ranks strictly decreasing to the target."""
        n, s, t = self.squeezes, self.source_rank, self.target_rank
        out, prev = [], s
        for i in range(1, n + 1):
            r = t if i == n else min(prev - 1, max(t + n - i, round(s * (t / s) ** (i / n))))
            out.append((i * self.total_steps // (n + 1), r))
            prev = r
        return out

    def rank_at(self, step: int) -> int:
        """The rank in force after `step` steps."""
        r = self.source_rank
        for s, k in self.plan:
            if step >= s:
                r = k
        return r

    def on_step(self, model, optimizer, step: int) -> list[Squeezed]:
        for s, k in self.plan:
            if step == s:
                return squeeze_model(model, k, optimizer)
        return []

    def trainer_callback(self):
        """A `transformers.TrainerCallback` that squeezes at the planned global steps."""
        from transformers import TrainerCallback

        schedule = self

        class InSqueezeCallback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                schedule.on_step(model, optimizer, state.global_step)

        return InSqueezeCallback()


# ---------------------------------------------------------------- export


def _target_modules(model: torch.nn.Module, paths: set[str]) -> list[str]:
    """The modules' last names (as PEFT users write them) where PEFT's name match of those selects exactly these
    modules, else their paths: `c_proj` of GPT-2's attention alone would also put LoRA layers on mlp.c_proj."""
    leaves, inside = {p.rsplit(".", 1)[-1] for p in paths}, tuple(p + "." for p in paths)
    outside = (n for n, _ in model.named_modules() if n not in paths and not n.startswith(inside))
    return sorted(paths if any(n.rsplit(".", 1)[-1] in leaves for n in outside) else leaves)


def lora_adapter(model: torch.nn.Module, base: str | None = None, adapter_name: str | None = None,
                 copy: bool = True):
    """The LoRA Adapter of a model's LoRA layers (PEFT names, fp32 CPU copies — or, with copy=False, views of the
    live parameters, enough for ranks and scales), to save with `save_adapter`."""
    modules, layers = {}, {}
    for name, site in lora_sites(model).items():
        if adapter_name is not None and site.adapter != adapter_name:
            continue
        key = name if name.startswith(PREFIX) else PREFIX + name
        A, B = (t.detach().float().cpu().clone() if copy else t.detach() for t in (site.A, site.B))
        modules[key], layers[name] = LoraModule(A=A, B=B, scale=site.scale), site.layer
    if not modules:
        raise SurgeryError("the model has no LoRA layers")
    if hasattr(model, "peft_config"):
        cfg = model.peft_config[adapter_name or next(iter(model.peft_config))].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
        config["peft_type"] = "LORA"
    else:
        config = {"peft_type": "LORA", "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
                  "target_modules": _target_modules(model, set(layers)),
                  "fan_in_fan_out": one_fan_in_fan_out(layers), "task_type": None, "base_model_name_or_path": base}
    if base is not None:
        config["base_model_name_or_path"] = base
    return Adapter(modules=modules, format="peft", config=config)
