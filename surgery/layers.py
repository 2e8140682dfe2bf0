"""Swapping a torch model's `nn.Linear` layers for adapter layers (TeRALinear, LoRALinear)."""
from __future__ import annotations

from typing import Callable

import torch

from .errors import SurgeryError, regex


def replace_linears(model: torch.nn.Module, pattern: str,
                    make: Callable[[str, torch.nn.Linear], torch.nn.Module | None]) -> dict[str, torch.nn.Module]:
    """Replace every `nn.Linear` whose path matches `pattern` (re.search) by `make(path, linear)` (skipped when
    it returns None); {path: new layer}. No match at all is an error."""
    found = regex(pattern, "pattern")  # (a bad one was re.error from the first module)
    attached = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and found.search(name):
            layer = make(name, mod)
            if layer is None:
                continue
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], layer)
            attached[name] = layer
    if not attached:
        raise SurgeryError(f"no nn.Linear module matches {pattern!r}")
    return attached
