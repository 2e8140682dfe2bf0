"""One `surgery tune` step on a 4096×4096 module with 4096 captured tokens (issue: training step).

    python benchmarks/bench_tune.py [--device cpu|cuda] [--tokens 4096] [--steps 20] [--repeats 3]

Teacher: a rank-64 LoRA. Students: its rank-8 squeeze (Cont-Squeeze: LoRA factors train) and its TeRA fit
(3+3 modes, core rank 8: λ's train). A step = forward of X through the student, the relative output loss against
the teacher's precomputed outputs, backward, Adam. Per-step time = (time with `--steps` steps − time with 0
steps) / steps, so the shared set-up (teacher outputs, first evaluation) cancels; medians over repeats.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from surgery.adapter import Adapter, LoraModule
from surgery.distill import tune_module
from surgery.rank import FixedRank
from surgery.squeeze import squeeze
from surgery.tera import to_tera


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    teacher = LoraModule(A=torch.randn(64, 4096, generator=g) / 64, B=torch.randn(4096, 64, generator=g) / 64,
                         scale=2.0)
    adapter = Adapter(modules={"m": teacher}, format="peft")
    students = {"LoRA r=8 (Cont-Squeeze)": squeeze(adapter, FixedRank(8), device="cpu")[0].modules["m"],
                "TeRA R=8 (from the fit)": to_tera(adapter, core_rank=8)[0].modules["m"]}
    X = torch.randn(args.tokens, 4096, generator=g)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device "
          f"{args.device}, {args.tokens} tokens, 4096×4096, float32")
    for name, student in students.items():
        per_step = []
        tune_module(student, teacher, X, steps=2, device=args.device)  # warm-up
        for _ in range(args.repeats):
            t = []
            for steps in (0, args.steps):
                sync()
                t0 = time.perf_counter()
                _, before, after, *_ = tune_module(student, teacher, X, steps=steps, device=args.device)
                sync()
                t.append(time.perf_counter() - t0)
            per_step.append((t[1] - t[0]) / args.steps)
        print(f"  {name:26s} {statistics.median(per_step) * 1e3:8.1f} ms/step   error {before:.4f} → {after:.4f} "
              f"after {args.steps} steps")


if __name__ == "__main__":
    main()
