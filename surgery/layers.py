"""Swapping a torch model's linear layers (`nn.Linear`, GPT-2's `Conv1D`) for adapter layers (TeRALinear,
LoRALinear)."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .errors import SurgeryError, regex


def linear_shape(mod: torch.nn.Module) -> tuple[int, int, bool] | None:
    """(out, in, fan_in_fan_out) of a linear layer — `nn.Linear`, or transformers' `Conv1D` (GPT-2), whose weight
    is stored (in, out) — else None. The adapter's factors are (out, in)-shaped either way; a merge transposes ΔW
    where fan_in_fan_out, as PEFT's flag of that name says."""
    if isinstance(mod, torch.nn.Linear):
        return mod.out_features, mod.in_features, False
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
        return mod.weight.shape[1], mod.weight.shape[0], True
    return None


def one_fan_in_fan_out(layers: Mapping[str, torch.nn.Module], what: str = "the model's adapter layers wrap") -> bool:
    """The fan_in_fan_out that adapter layers ({path: layer with a `fan_in_fan_out` attribute}) share: True where
    they wrap GPT-2 Conv1D layers. Both kinds cannot be one adapter: its file states one flag, as PEFT's does."""
    kinds = {layer.fan_in_fan_out: name for name, layer in reversed(layers.items())}
    if len(kinds) > 1:
        raise SurgeryError(f"{what} Conv1D layers, stored (in, out) ({kinds[True]}), and nn.Linear ones "
                           f"({kinds[False]}): an adapter states one fan_in_fan_out for all its modules, as PEFT's "
                           "does")
    return bool(kinds) and next(iter(kinds))


def replace_linears(model: torch.nn.Module, pattern: str,
                    make: Callable[[str, torch.nn.Module], torch.nn.Module | None]) -> dict[str, torch.nn.Module]:
    """Replace every linear layer (`linear_shape`) whose path matches `pattern` (re.search) by `make(path, layer)`
    (skipped when it returns None; the new layer has a `fan_in_fan_out` attribute); {path: new layer}. No match
    at all, or Conv1D and nn.Linear layers together, is an error, with the model as it was."""
    found = regex(pattern, "pattern")  # (a bad one was re.error from the first module)
    matches = [(name, mod) for name, mod in model.named_modules() if linear_shape(mod) and found.search(name)]
    frozen = {p: p.requires_grad for _, mod in matches for p in mod.parameters()}  # the new layers freeze them
    made = {name: layer for name, mod in matches if (layer := make(name, mod)) is not None}
    try:
        if not made:
            raise SurgeryError(f"no nn.Linear or Conv1D module matches {pattern!r}")
        one_fan_in_fan_out(made, f"pattern {pattern!r} matches")
    except SurgeryError:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        raise
    for name, layer in made.items():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], layer)
    return made
