"""TeRA: a Tucker-like tensor-network adapter (methods.md §3; this project's specification, docs/tera.md).

ΔW (d_out × d_in) is tensorized row-major into 𝒲 of shape (J1..JP, I1..IQ) and written as
    𝒲 = scale · 𝒢 ×_1 (Λ1 U1) ×_2 … ×_N (ΛN UN),     N = P + Q modes of sizes n_1..n_N,
with a random core 𝒢 (R1..RN) and factors U_n (n_n × R_n) frozen and regenerated from a seed (shared by every
module with the same ranks / the same (n_n, R_n)), and only the diagonals λ_n (n_n,) trained per module.
The tensor algebra goes through tensorly with the torch backend.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from .adapter import PEFT_PREFIX as PREFIX, Adapter, LoraModule, TensorLike, materialize
from .device import seeded
from .errors import SurgeryError
from .layers import linear_shape, one_fan_in_fan_out, replace_linears
from .linalg import SVD, randomized_svd, split_factors
from .rank import numerical_rank



def _torch_backend(fn):
    """Run `fn` with tensorly's torch backend, without changing the caller's global backend (~8 µs a call).
    tensorly is imported on first use, so commands that never touch TeRA do not pay its import time."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import tensorly

        with tensorly.backend_context("pytorch"):
            return fn(*args, **kwargs)

    return wrapper

FORMAT_VERSION = "surgery-tera/1"
MAX_CORE_BYTES = 1 << 30  # a float32 core above 1 GiB is refused


def factorize(n: int, order: int) -> tuple[int, ...]:
    """Near-balanced factors of n, at most `order` of them, descending: primes, largest first, each given to the
    factor with the smallest product so far (4096 → 16·16·16, 11008 → 43·16·16). Factors equal to 1 are dropped,
    so a prime n gives (n,): that dimension falls back to fewer modes."""
    if n < 1 or order < 1:
        raise SurgeryError(f"cannot factorize {n} into {order} modes")
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    bins = [1] * min(order, len(primes) or 1)  # more modes than prime factors would all be 1
    for q in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= q
    out = tuple(sorted((b for b in bins if b > 1), reverse=True))
    return out or (1,)


@dataclass(frozen=True)
class TeraSpec:
    """The frozen structure of one module: output modes J, input modes I, one rank per mode, the seed."""

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    seed: int

    @classmethod
    def for_shape(cls, out_features: int, in_features: int, order: int = 3, core_rank: int = 8, seed: int = 0):
        for flag, v in (("--order", order), ("--core-rank", core_rank)):
            if v < 1:
                raise SurgeryError(f"{flag} must be at least 1, got {v}")
        J, I = factorize(out_features, order), factorize(in_features, order)
        ranks = tuple(min(core_rank, n) for n in J + I)
        spec = cls(J, I, ranks, seed)
        if spec.core_bytes > MAX_CORE_BYTES:
            raise SurgeryError(f"a TeRA core of shape {list(ranks)} needs {spec.core_bytes / 2**30:.1f} GiB; "
                               "lower --core-rank or --order")
        return spec

    @property
    def modes(self) -> tuple[int, ...]:
        return self.out_modes + self.in_modes

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def core_bytes(self) -> int:
        return 4 * math.prod(self.ranks)

    @property
    def max_rank(self) -> int:
        """rank(ΔW) for non-zero λ's and Gaussian factors (almost surely): min(Π R_out, Π R_in)."""
        P = len(self.out_modes)
        return min(math.prod(self.ranks[:P]), math.prod(self.ranks[P:]))

    def to_json(self) -> dict:
        return {"out_modes": list(self.out_modes), "in_modes": list(self.in_modes), "ranks": list(self.ranks)}


@lru_cache(maxsize=64)
def shared_core(seed: int, ranks: tuple[int, ...]) -> torch.Tensor:
    """𝒢 (R1..RN) ~ N(0, 1), float32, drawn on the CPU from `torch.Generator().manual_seed(h)`,
    h = (seed·0x9E3779B1 + crc32("core:R1x…xRN")) mod 2⁶³."""
    g = seeded(seed, "core:" + "x".join(map(str, ranks)))
    return torch.randn(ranks, generator=g, dtype=torch.float32)


@lru_cache(maxsize=256)
def shared_factor(seed: int, n: int, rank: int) -> torch.Tensor:
    """U (n × R) ~ N(0, 1/n), float32, drawn like the core with crc32("factor:NxR")."""
    g = seeded(seed, f"factor:{n}x{rank}")
    return torch.randn(n, rank, generator=g, dtype=torch.float32) / math.sqrt(n)


def shared(spec: TeraSpec, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(core, [U_n]) for a spec, regenerated bit-identically on the CPU, then moved."""
    core = shared_core(spec.seed, spec.ranks).to(device, dtype)
    return core, [shared_factor(spec.seed, n, r).to(device, dtype) for n, r in zip(spec.modes, spec.ranks)]


def init_lambdas(spec: TeraSpec) -> tuple[torch.Tensor, ...]:
    """λ_n = 1 for n < N and λ_N = 0: ΔW = 0 exactly at the start (as VeRA zeroes λ_b)."""
    lams = [torch.ones(n) for n in spec.modes]
    lams[-1] = torch.zeros(spec.modes[-1])
    return tuple(lams)


@_torch_backend
def tera_delta(lambdas: Sequence[torch.Tensor], core: torch.Tensor, factors: Sequence[torch.Tensor],
               spec: TeraSpec, scale: float = 1.0) -> torch.Tensor:
    """Dense ΔW (d_out, d_in) = scale · reshape(𝒢 ×_n (Λ_n U_n))."""
    import tensorly as tl

    full = tl.tucker_to_tensor((core, [lam[:, None] * U for lam, U in zip(lambdas, factors)]))  # (J.., I..)
    return scale * full.reshape(spec.out_features, spec.in_features)


@_torch_backend
def tera_forward(x: torch.Tensor, lambdas: Sequence[torch.Tensor], core: torch.Tensor,
                 factors: Sequence[torch.Tensor], spec: TeraSpec, scale: float = 1.0) -> torch.Tensor:
    """x @ ΔWᵀ for x (…, d_in) without forming ΔW: contract the input modes with (Λ_q U_q), then the core,
    then the output modes with (Λ_p U_p). Cost O(batch · Σ n_n R · Π R) instead of O(batch · d_out · d_in)."""
    from tensorly import tenalg

    P, Q = len(spec.out_modes), len(spec.in_modes)
    lead = x.shape[:-1]
    z = x.reshape(-1, *spec.in_modes)  # (b, I1..IQ)
    M = [lam[:, None] * U for lam, U in zip(lambdas, factors)]  # (n_n, R_n)
    z = tenalg.multi_mode_dot(z, [m.T for m in M[P:]], modes=list(range(1, Q + 1)))  # (b, R_in..)
    z = torch.tensordot(z, core, dims=(list(range(1, Q + 1)), list(range(P, P + Q))))  # (b, R_out..)
    z = tenalg.multi_mode_dot(z, M[:P], modes=list(range(1, P + 1)))  # (b, J1..JP)
    return scale * z.reshape(*lead, spec.out_features)


@_torch_backend
def fit_lambdas(target: torch.Tensor, spec: TeraSpec, iters: int = 50, scale: float = 1.0,
                tol: float = 1e-7) -> tuple[tuple[torch.Tensor, ...], float]:
    """Least-squares λ's for a dense target ΔW (d_out, d_in), by alternating closed-form updates.

    𝒲 is multilinear in the λ's: with the others fixed, 𝒲 = T ×_n Λ_n scales the mode-n slices of T, so
    λ_n[i] = ⟨T_i, X_i⟩ / ⟨T_i, T_i⟩. Starts from λ = 1; at the end the modes are rescaled to one RMS (the
    product, hence ΔW, unchanged), which keeps later gradient steps on the λ's well conditioned.
    Returns (λ's, relative error ‖X − 𝒲‖ / ‖X‖).
    """
    import tensorly as tl

    X = target.to(torch.float32).reshape(spec.modes) / scale
    core, factors = shared(spec, torch.float32, X.device)
    lams = [torch.ones(n, device=X.device) for n in spec.modes]
    norm = float(X.norm())
    if norm == 0.0:
        return tuple(torch.zeros(n) for n in spec.modes), 0.0
    err = prev = float("inf")
    for _ in range(iters):
        for n in range(len(spec.modes)):
            mats = [U if m == n else lam[:, None] * U for m, (lam, U) in enumerate(zip(lams, factors))]
            T = tl.tucker_to_tensor((core, mats))
            Tn, Xn = T.movedim(n, 0).reshape(spec.modes[n], -1), X.movedim(n, 0).reshape(spec.modes[n], -1)
            den = Tn.square().sum(1)
            lams[n] = torch.where(den > 0, (Tn * Xn).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))
        W = tl.tucker_to_tensor((core, [lam[:, None] * U for lam, U in zip(lams, factors)]))
        err = float((X - W).norm()) / norm
        if prev - err < tol * max(err, 1e-12):
            break
        prev = err
    rms = [float(lam.square().mean().sqrt()) for lam in lams]
    if all(r > 0 for r in rms):  # balance the modes (same RMS, same product) so no λ is tiny next to huge ones
        g = math.exp(sum(math.log(r) for r in rms) / len(rms))
        lams = [lam * (g / r) for lam, r in zip(lams, rms)]
    return tuple(lam.cpu() for lam in lams), err


def tera_svd(lambdas: Sequence[torch.Tensor], spec: TeraSpec, scale: float = 1.0,
             dtype=torch.float64) -> SVD:
    """Exact thin SVD of ΔW from its Kronecker structure: mat(ΔW) = (⊗_p M_p) 𝒢_(out×in) (⊗_q M_q)ᵀ with
    M_n = Λ_n U_n = Q_n R_n, so ΔW = (⊗Q_p) [(⊗R_p) 𝒢 (⊗R_q)ᵀ] (⊗Q_q)ᵀ and only the small middle matrix
    (ΠR_out × ΠR_in) is decomposed; d_out × d_in is never formed."""
    P = len(spec.out_modes)
    core, factors = shared(spec, dtype)
    qr = [torch.linalg.qr(lam.to(dtype)[:, None] * U) for lam, U in zip(lambdas, factors)]

    def kron(mats):
        out = mats[0]
        for m in mats[1:]:
            out = torch.kron(out, m)
        return out

    G = core.reshape(math.prod(spec.ranks[:P]), -1)
    C = scale * kron([r for _, r in qr[:P]]) @ G @ kron([r for _, r in qr[P:]]).T
    Uc, S, Vch = torch.linalg.svd(C, full_matrices=False)
    return SVD(kron([q for q, _ in qr[:P]]) @ Uc, S, Vch @ kron([q for q, _ in qr[P:]]).T)


# ---------------------------------------------------------------- adapters


@dataclass(frozen=True)
class TeraModule:
    """One TeRA update `ΔW = scale · reshape(𝒢 ×_n (Λ_n U_n))` (this module): trainable λ's, one per mode
    (out modes, then in modes), and the frozen structure `spec` whose core and factors come from its seed."""

    lambdas: tuple[TensorLike, ...]
    spec: TeraSpec
    scale: float = 1.0
    kind: str = "linear"
    bias = None  # no lora_B.bias, no DoRA magnitude: merge code treats TeRA like a plain linear LoRA
    magnitude = None
    dora = False
    dora_axis = "out"
    algo = "tera"

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

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

    def lowrank(self, dtype=torch.float32, device="cpu"):
        return None  # its exact SVD (below) is cheaper than any pair

    def svd(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        """Exact thin SVD of ΔW from the Kronecker structure (tera_svd), never forming ΔW."""
        return SVD(*(t.to(device) for t in tera_svd([materialize(l) for l in self.lambdas], self.spec, self.scale,
                                                    dtype)))

    def delta(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> torch.Tensor:
        core, factors = shared(self.spec, dtype, device)
        lams = [materialize(l).to(device, dtype) for l in self.lambdas]
        return tera_delta(lams, core, factors, self.spec, self.scale)


@dataclass(frozen=True)
class ConvertedModule:
    name: str
    shape: tuple[int, int]
    detail: str  # TeRA modes × ranks, or the LoRA rank
    params: int
    energy_kept: float
    rel_error: float


# PEFT LoraConfig fields that say where a LoRA sits; carried through LoRA → TeRA → LoRA
PLACEMENT = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save",
             "task_type")


def to_tera(adapter, *, order: int = 3, core_rank: int = 8, seed: int = 0, iters: int = 50,
            progress=None):
    """LoRA adapter → TeRA adapter by a least-squares fit of each module's λ's (a lossy projection: a TeRA
    module has Σ n_n numbers). Returns (adapter, [ConvertedModule]) with the energy honestly reported."""
    if iters < 0:
        raise SurgeryError(f"--iters must be ≥ 0, got {iters}")
    for name, m in adapter.modules.items():
        if not isinstance(m, LoraModule) or m.kind != "linear" or m.dora:
            what = "a TeRA module" if not isinstance(m, LoraModule) else "DoRA" if m.dora else m.kind
            raise SurgeryError(f"module {name}: {what} cannot be converted to TeRA (linear LoRA modules only)")
    specs = {n: TeraSpec.for_shape(m.out_features, m.in_features, order, core_rank, seed)
             for n, m in adapter.modules.items()}
    modules, report = {}, []
    for name, m in adapter.modules.items():
        target = m.delta(torch.float32)
        lams, err = fit_lambdas(target, specs[name], iters)
        if not math.isfinite(err):  # ‖ΔW‖² past float32's range: the fit would write zeros
            raise SurgeryError(f"{adapter.source or 'adapter'}: module {name}: its update overflows the float32 "
                               f"fit (scale {m.scale:g})")
        modules[name] = TeraModule(lams, specs[name], 1.0)
        report.append(ConvertedModule(name, (m.out_features, m.in_features), _describe(specs[name]),
                                      sum(specs[name].modes), 1.0 - err * err, err))
        if progress:
            progress(name)
    config = {"order": order, "core_rank": core_rank, "name_style": "kohya" if adapter.format == "kohya" else "peft",
              "base_model_name_or_path": adapter.config.get("base_model_name_or_path")}
    if adapter.config.get("fan_in_fan_out"):  # GPT-2's Conv1D bases store (in, out): merges transpose ΔW
        config["fan_in_fan_out"] = True
    placement = {k: adapter.config[k] for k in PLACEMENT if adapter.config.get(k) is not None}
    if placement:  # where the LoRA sat in the model, for the way back (PEFT needs it to load a LoRA again)
        config["lora_placement"] = placement
    out = Adapter(modules=modules, format="tera", passthrough=adapter.passthrough, config=config,
                  metadata={}, source=adapter.source)
    return out, report


def to_lora(adapter, rank: int | None = None, progress=None):
    """TeRA adapter → LoRA per module by the exact SVD of `tera_svd` (dense randomized SVD when the Kronecker
    middle matrix would be larger than 4096²): at rank `rank` (an upper bound: a module of lower rank keeps its
    own), or without one exactly, at each ΔW's numerical rank (a dense SVD where the Kronecker route is too
    large). Returns (adapter, [ConvertedModule])."""
    if rank is not None and rank < 1:
        raise SurgeryError(f"rank must be at least 1, got {rank}")
    modules, report = {}, []
    for name, m in adapter.modules.items():
        if not isinstance(m, TeraModule):
            raise SurgeryError(f"module {name} is not a TeRA module")
        shape = (m.out_features, m.in_features)
        lams = [materialize(l) for l in m.lambdas]
        P = len(m.spec.out_modes)
        if max(math.prod(m.spec.ranks[:P]), math.prod(m.spec.ranks[P:])) <= 4096:
            svd = tera_svd(lams, m.spec, m.scale)
            total = float(svd.S.square().sum())
        else:
            D = m.delta(torch.float32)
            if rank is None:
                svd = SVD(*torch.linalg.svd(D, full_matrices=False))
            else:
                g = seeded(m.spec.seed, name)
                svd = randomized_svd(lambda X: D @ X, lambda Y: D.T @ Y, shape, min(rank, *shape), generator=g)
            total = float(D.double().square().sum())
        k = max(numerical_rank(svd.S, shape), 1) if rank is None else min(rank, len(svd.S))
        B, A = split_factors(svd, k)
        kept = float(svd.S[:k].double().square().sum())
        modules[name] = LoraModule(A=A.float().contiguous(), B=B.float().contiguous(), scale=1.0)
        report.append(ConvertedModule(name, (m.out_features, m.in_features), f"rank {k}", k * (m.out_features + m.in_features),
                                      kept / total if total else 1.0,
                                      math.sqrt(max(total - kept, 0.0) / total) if total else 0.0))
        if progress:
            progress(name)
    kohya = adapter.config.get("name_style") == "kohya"
    r = rank or max(m.rank for m in modules.values())
    config = {} if kohya else {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "lora_dropout": 0.0,
        "rank_pattern": {}, "alpha_pattern": {},  # (target_modules: the writer's exact list, or the LoRA's own)
        "fan_in_fan_out": bool(adapter.config.get("fan_in_fan_out")), "bias": "none", "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        **(adapter.config.get("lora_placement") or {})}
    return Adapter(modules=modules, format="kohya" if kohya else "peft", passthrough=adapter.passthrough,
                   config=config, metadata={}, source=adapter.source), report


def _describe(spec: TeraSpec) -> str:
    out = "·".join(map(str, spec.out_modes)) + " × " + "·".join(map(str, spec.in_modes))
    return f"{out}, R={'·'.join(map(str, spec.ranks))}"


def fresh_adapter(shapes: dict, *, order: int = 3, core_rank: int = 8, seed: int = 0, base: str | None = None,
                  fan_in_fan_out: bool = False):
    """A zero-update TeRA adapter ({module name: (out, in)}): λ_N = 0, every other λ = 1. `fan_in_fan_out`: the
    base stores these weights (in, out) (GPT-2's Conv1D), as PEFT's flag of that name says."""

    modules = {}
    for name, (o, i) in shapes.items():
        spec = TeraSpec.for_shape(o, i, order, core_rank, seed)
        modules[name] = TeraModule(init_lambdas(spec), spec, 1.0)
    config = {"order": order, "core_rank": core_rank, "name_style": "peft", "base_model_name_or_path": base}
    if fan_in_fan_out:
        config["fan_in_fan_out"] = True
    return Adapter(modules=modules, format="tera", config=config)


# ---------------------------------------------------------------- torch modules


class TeRALinear(torch.nn.Module):
    """A frozen `nn.Linear` (or GPT-2 `Conv1D`) plus a TeRA update applied in tensorized form (ΔW is never formed).

    Only the λ's are trainable; the base weight and the shared core/factors have `requires_grad=False` (the
    shared tensors are non-persistent buffers, regenerated from the seed, and the same objects across modules).
    """

    def __init__(self, base: torch.nn.Module, spec: TeraSpec, lambdas=None, scale: float = 1.0):
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise SurgeryError(f"TeRALinear wraps an nn.Linear or Conv1D, not {type(base).__name__}")
        if (spec.out_features, spec.in_features) != shape[:2]:
            raise SurgeryError(f"TeRA spec {spec.out_features}×{spec.in_features} does not fit a layer of "
                               f"{shape[1]} inputs and {shape[0]} outputs")
        self.fan_in_fan_out = shape[2]
        self.base, self.spec, self.scale = base, spec, scale
        for p in base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        core, factors = shared(spec, torch.float32, dev)
        self.register_buffer("core", core, persistent=False)
        for n, U in enumerate(factors):
            self.register_buffer(f"factor{n}", U, persistent=False)
        lams = lambdas if lambdas is not None else init_lambdas(spec)
        self.lambdas = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.as_tensor(l, dtype=torch.float32).to(dev).clone()) for l in lams])

    @property
    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{n}") for n in range(len(self.spec.modes))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # tensordot has no autocast rule: run it in float32
            delta = tera_forward(x.float(), list(self.lambdas), self.core, self.factors, self.spec, self.scale)
        return self.base(x) + delta.to(x.dtype)


def attach_tera(model: torch.nn.Module, pattern: str, *, adapter=None, order: int = 3, core_rank: int = 8,
                seed: int = 0) -> dict[str, TeRALinear]:
    """Replace every `nn.Linear` (or GPT-2 `Conv1D`) whose name matches `pattern` (re.search) by a TeRALinear —
    fresh, or with the λ's of `adapter` (a TeRA Adapter whose module names are `base_model.model.<name>` or
    `<name>`)."""
    def make(name, mod):
        if adapter is None:
            out_features, in_features, _ = linear_shape(mod)
            return TeRALinear(mod, TeraSpec.for_shape(out_features, in_features, order, core_rank, seed))
        m = adapter.modules.get(PREFIX + name) or adapter.modules.get(name)
        return None if m is None else TeRALinear(mod, m.spec, [materialize(l) for l in m.lambdas], m.scale)

    return replace_linears(model, pattern, make)


def adapter_from_model(model: torch.nn.Module, base: str | None = None):
    """The TeRA Adapter of a model's TeRALinear modules (to save with `save_adapter`)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TeRALinear)}
    modules = {PREFIX + n: TeraModule(tuple(l.detach().cpu().clone() for l in m.lambdas), m.spec, m.scale)
               for n, m in layers.items()}
    specs = [m.spec for m in modules.values()]
    config = {"name_style": "peft", "base_model_name_or_path": base,
              "order": max(len(s.out_modes) for s in specs) if specs else None}
    if one_fan_in_fan_out(layers):
        config["fan_in_fan_out"] = True
    return Adapter(modules=modules, format="tera", config=config)
