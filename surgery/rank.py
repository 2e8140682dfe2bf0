"""Choosing target ranks from singular values (methods.md §2.3).

Every rule maps {module: spectrum} to {module: rank}; spectra are 1-D float64 tensors, descending.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union, get_args

import torch

from .errors import SurgeryError, regex


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class FixedRank:
    rank: int

    def __post_init__(self):
        if not (_is_int(self.rank) and self.rank >= 1):
            raise SurgeryError(f"rank must be a whole number of at least 1, got {self.rank!r}")


@dataclass(frozen=True)
class Energy:
    """Smallest k with Σ_{i≤k} σ_i² ≥ threshold · Σ σ_i² (PEFT `convert_to_lora`'s float rank)."""

    threshold: float

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0):
            raise SurgeryError(f"energy threshold must be in (0, 1], got {self.threshold!r}")


@dataclass(frozen=True)
class Budget:
    """One parameter budget (A and B entries) for the whole adapter."""

    params: int

    def __post_init__(self):
        if not (_is_int(self.params) and self.params > 0):
            raise SurgeryError(f"budget must be a positive whole number of parameters, got {self.params!r}")


@dataclass(frozen=True)
class RankMap:
    """Ordered (regex, rank) pairs; the first `re.search` match wins, unmatched modules keep their rank."""

    rules: tuple[tuple[str, int], ...]

    def __post_init__(self):  # the Python API's RankMap too (a bad pattern was re.error at the first module)
        for pattern, rank in self.rules:
            regex(pattern, f"rank map entry {pattern!r}={rank!r}")
            if not _is_int(rank):
                raise SurgeryError(f"rank map entry {pattern!r}={rank!r}: the rank must be a whole number")

    def rank_for(self, name: str) -> int | None:
        for pattern, rank in self.rules:
            if re.search(pattern, name):
                return rank
        return None


@dataclass(frozen=True)
class PerModule:
    """An explicit rank per module name (e.g. GeLoRA's); modules not listed keep their rank."""

    ranks: Mapping[str, int]

    def __post_init__(self):  # (a rank of 2.5 or "3" was a TypeError deep in a slice)
        if bad := next(((n, r) for n, r in self.ranks.items() if not _is_int(r)), None):
            raise SurgeryError(f"module {bad[0]}: the rank must be a whole number, got {bad[1]!r}")


@dataclass(frozen=True)
class Exact:
    """Each ΔW's numerical rank (σ > σ₁ · max(out, in) · ε_float32): an exact LoRA of a LoHa/LoKr, nothing lost."""


RankRule = Union[FixedRank, Energy, Budget, RankMap, PerModule, Exact]


def check_rule(rule, allowed: tuple[type, ...] = get_args(RankRule)) -> None:
    """A rule of one of the `allowed` types: a bare 4 (for FixedRank(4)) was a TypeError deep inside."""
    if not isinstance(rule, allowed):
        raise SurgeryError(f"rank rule {rule!r}: expected one of {', '.join(t.__name__ for t in allowed)}, "
                           "e.g. FixedRank(8) or Energy(0.95)")


def numerical_rank(S: torch.Tensor, shape) -> int:
    """How many σ exceed σ₁ · max(shape) · ε_float32: the rank a float32 computation resolves (0 for ΔW = 0)."""
    tol = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps if len(S) else 0.0
    return int((S > tol).sum())

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}


def parse_count(text: str) -> int:
    """'2M' → 2_000_000, '1.5k' → 1500, '350000' → 350000 (decimal suffixes K, M, G)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", text)
    if not m:
        raise SurgeryError(f"budget {text!r}: expected a number with an optional K/M/G suffix, e.g. 2M")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).upper()]))


def parse_rank_map(specs: str | Sequence[str]) -> RankMap:
    """'mlp=8,attn=4' (and/or repeated specs) → RankMap((('mlp', 8), ('attn', 4)))."""
    if isinstance(specs, str):
        specs = [specs]
    rules = []
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            pattern, sep, rank = item.rpartition("=")
            if not sep or not pattern or not rank.strip().lstrip("-").isdigit():
                raise SurgeryError(f"rank map entry {item!r}: expected REGEX=RANK, e.g. 'mlp=8,attn=4'")
            regex(pattern, f"rank map entry {item!r}")
            rules.append((pattern, int(rank)))
    if not rules:
        raise SurgeryError("rank map is empty: expected REGEX=RANK entries, e.g. 'mlp=8,attn=4'")
    return RankMap(tuple(rules))


def energy_rank(S: torch.Tensor, threshold: float) -> int:
    """Smallest k ≥ 1 keeping `threshold` of the energy Σσ² (a zero spectrum gives 1)."""
    cum = torch.cumsum(S.double().square(), 0)
    total = float(cum[-1]) if len(cum) else 0.0  # the same summation as cum, so τ = 1 is reachable
    if total == 0.0:
        return 1
    k = int(torch.searchsorted(cum, torch.tensor([threshold * total], dtype=cum.dtype)).item()) + 1
    return min(k, S.numel())


def budget_ranks(
    spectra: Mapping[str, torch.Tensor], cost: Mapping[str, int], budget: int, min_rank: int = 1
) -> dict[str, int]:
    """Greedy spend of `budget` on the directions with the largest σ²/cost (cost = in + out per rank).

    Every module starts at `min_rank`; σ is descending per module, so a module's candidates are taken as a
    prefix and the result never exceeds the budget.
    """
    base = sum(min_rank * cost[n] for n in spectra)
    if base > budget:
        raise SurgeryError(
            f"budget {budget:,} parameters is too small: rank {min_rank} on each of the {len(spectra)} "
            f"modules already needs {base:,}"
        )
    ranks = {n: min(min_rank, S.numel()) for n, S in spectra.items()}
    left = budget - sum(ranks[n] * cost[n] for n in spectra)
    heap = [(-float(S[ranks[n]]) ** 2 / cost[n], n) for n, S in spectra.items() if S.numel() > ranks[n]]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if cost[n] > left:
            continue  # every later candidate of this module costs the same: it is done
        left -= cost[n]
        ranks[n] += 1
        S = spectra[n]
        if S.numel() > ranks[n]:
            heapq.heappush(heap, (-float(S[ranks[n]]) ** 2 / cost[n], n))
    return ranks


def check_rank(name: str, rank: int, current: int) -> int:
    """A target rank as an upper bound, as kohya's resize reads `--new_rank`: a module already at a rank ≤ it keeps
    its rank (the caller keeps it unchanged and lists it)."""
    if rank <= 0:
        raise SurgeryError(f"module {name}: rank must be at least 1, got {rank}")
    return min(rank, current)
