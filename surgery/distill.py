"""Layer-wise distillation of one adapter into another (`surgery tune`).

For each module, with X (n, in) its captured inputs, minimise the relative output error
‖X (ΔW_student − ΔW_teacher)ᵀ‖² / ‖X ΔW_teacherᵀ‖² over the student's trainable tensors only (LoRA A/B, or TeRA
λ's with the shared core and factors frozen), full batch, Adam. Uses: refine a LoRA → TeRA conversion beyond the
closed-form fit; Cont-Squeeze on checkpoints (student the squeezed LoRA, teacher the original). The best iterate
is kept, and a module whose rounded result is not better than where it started is left unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from .adapter import Adapter, TensorLike, materialize
from .capture import input_key
from .tera import TeraModule
from .device import resolve_device
from .errors import SurgeryError
from .squeeze import check_inputs, input_rows, output_truncation


@dataclass(frozen=True)
class TunedModule:
    name: str
    tokens: int
    before: float  # relative output error of the student as given
    after: float  # … of what is written (never above `before`)
    best_step: int  # 0: the starting point was kept
    start: str = "given"  # where Adam started: the student as given, or (LoRA) the output-optimal truncation


def _unsupported(m) -> str | None:
    """What a module is when tune cannot train it (a conv/embedding or DoRA LoRA), else None."""
    if isinstance(m, TeraModule) or (m.kind == "linear" and not m.dora):
        return None
    return "DoRA" if m.dora else m.kind


def _forward(m, device) -> tuple[list[torch.nn.Parameter], Callable[[torch.Tensor], torch.Tensor]]:
    """(trainable float32 tensors, X ↦ X ΔWᵀ) for a linear LoRA or TeRA module."""
    if isinstance(m, TeraModule):
        from .tera import shared, tera_forward

        core, factors = shared(m.spec, torch.float32, device)
        lams = [torch.nn.Parameter(materialize(l).to(device, torch.float32).clone()) for l in m.lambdas]
        return lams, lambda X: tera_forward(X, list(lams), core, factors, m.spec, m.scale)
    if _unsupported(m):
        raise SurgeryError(f"a {_unsupported(m)} module: tune handles linear LoRA and TeRA modules")
    B, A = (torch.nn.Parameter(t.clone()) for t in m.factors(torch.float32, device))
    return [B, A], lambda X: (X @ A.T) @ B.T * m.scale


def _written(m, params: list[torch.Tensor]):
    """The module with its trainable tensors replaced (rounded once to the module's storage dtype)."""
    if isinstance(m, TeraModule):
        return replace(m, lambdas=tuple(p.detach().to("cpu", m.dtype).clone() for p in params))
    B, A = (p.detach().to("cpu", m.dtype) for p in params)
    return replace(m, B=B.reshape(tuple(m.B.shape)).contiguous(), A=A.reshape(tuple(m.A.shape)).contiguous())


def tune_module(student, teacher, X: torch.Tensor, *, steps: int = 200, lr: float = 1e-2, device="cpu"):
    """(tuned student module, before, after, best step, start) for one module; X (n, in). A LoRA student starts
    from the output-optimal rank-r truncation of the teacher (squeeze --activations) when that is better than
    the student as given; Adam goes on from there (it can only help through rounding).

    `lr` is relative: each tensor's Adam step is lr × its starting RMS (1 for an all-zero tensor), so one value
    suits LoRA factors and TeRA λ's of any scale. Nothing is random: same inputs, same result.
    """
    dev = resolve_device(device)
    X = X.to(dev, torch.float32)
    with torch.no_grad():
        _, teach = _forward(teacher, dev)
        Yt = teach(X)
    norm = float(Yt.square().sum())
    if not math.isfinite(norm):
        raise SurgeryError("the teacher's outputs are not finite (NaN/Inf in its tensors)")
    if norm == 0:
        return student, 0.0, 0.0, 0, "given"

    def rel(m) -> float:
        with torch.no_grad():
            return math.sqrt(float((_forward(m, dev)[1](X) - Yt).square().sum()) / norm)

    before = rel(student)
    if not math.isfinite(before):
        raise SurgeryError("the student's tensors contain NaN or Inf")
    start, origin = student, "given"
    if not isinstance(student, TeraModule):  # a LoRA student starts from the closed-form optimum at its rank
        closed = _written(student, output_truncation(teacher, X.double(), student.rank, student.scale, dev))
        if rel(closed) < before:
            start, origin = closed, "closed form"
    params, run = _forward(start, dev)
    groups = [{"params": [p], "lr": lr * (float(p.detach().square().mean().sqrt()) or 1.0)} for p in params]
    opt = torch.optim.Adam(groups)
    best_loss, best, best_step = math.inf, None, 0
    for step in range(steps + 1):
        loss = (run(X) - Yt).square().sum() / norm
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        if value < best_loss:
            best_loss, best, best_step = value, [p.detach().clone() for p in params], step
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = start if best_step == 0 else _written(student, best)
    after = rel(out)
    return (out, before, after, best_step, origin) if after < before else (student, before, before, 0, "given")


def tune(student: Adapter, teacher: Adapter, inputs: Mapping[str, TensorLike], *, steps: int = 200,
         lr: float = 1e-2, device="auto", progress=None) -> tuple[Adapter, list[TunedModule]]:
    """Distil `teacher` into `student` module by module on the captured inputs (module path → (n, in))."""
    if steps < 0:
        raise SurgeryError(f"--steps must be ≥ 0, got {steps}")
    if not 0 < lr <= 1:  # a step of more than a tensor's RMS overshoots (and 1e308 × RMS overflows float32)
        raise SurgeryError(f"--lr is relative to each tensor's RMS and must be in (0, 1], got {lr}")
    plan = []
    for name, m in student.modules.items():
        t = teacher.modules.get(name)
        if t is None:
            raise SurgeryError(f"module {name}: not in the teacher adapter")
        key = input_key(name, inputs)
        if key is None:
            raise SurgeryError(f"module {name}: no captured inputs for it (capture them with --module-inputs)")
        if (t.out_features, t.in_features) != (m.out_features, m.in_features):
            raise SurgeryError(f"module {name}: student {m.out_features}×{m.in_features} vs teacher "
                               f"{t.out_features}×{t.in_features}")
        for who, mod in (("student", m), ("teacher", t)):
            if _unsupported(mod):
                raise SurgeryError(f"module {name}: the {who} is a {_unsupported(mod)} module; "
                                   "tune handles linear LoRA and TeRA modules")
        check_inputs(name, m, tuple(inputs[key].shape))
        plan.append((name, m, t, key))
    modules, report = dict(student.modules), []
    for name, m, t, key in plan:
        X = input_rows(name, m, inputs[key], "cpu", torch.float32)
        try:
            new, before, after, best, origin = tune_module(m, t, X, steps=steps, lr=lr, device=device)
        except SurgeryError as e:
            raise SurgeryError(f"module {name}: {e}") from None
        modules[name] = new
        report.append(TunedModule(name, X.shape[0], before, after, best, origin))
        if progress:
            progress(name)
    return student.with_modules(modules), report
