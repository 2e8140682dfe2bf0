"""TeRA forward/backward step against a rank-64 LoRA on a 4096×4096 linear layer (issue: TeRA).

    python benchmarks/bench_tera.py [--tokens 4096] [--repeats 7] [--device cpu|cuda] [--dtype float32|bfloat16]

One step = forward of the frozen base layer plus the adapter, a scalar loss, backward to the adapter's
trainable tensors only. TeRA: 3+3 modes (16·16·16), core rank 8 (rank(ΔW) = 512, 96 trainable numbers);
LoRA: rank 64 (524,288 trainable numbers), ΔW applied as x Aᵀ Bᵀ. Both in one run, alternating; medians.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from surgery.tera import TeRALinear, TeraSpec
from surgery.train import LoRALinear


def step(layer, x, sync):
    out = layer(x)
    out.float().square().mean().backward()
    sync()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    base = torch.nn.Linear(4096, 4096, bias=False).to(dev, dt)
    lora = LoRALinear(base, 64, A=torch.randn(64, 4096) / 64, B=torch.randn(4096, 64) * 0.01)
    layers = {"lora r=64": lora.to(dev, dt),
              "tera 16³×16³ R=8": TeRALinear(base, TeraSpec.for_shape(4096, 4096, 3, 8, 0)).to(dev),
              "base only": base}
    x = torch.randn(args.tokens, 4096, device=dev, dtype=dt, requires_grad=False)
    times = {k: [] for k in layers}
    for layer in layers.values():
        for p in layer.parameters():
            p.grad = None
        step(layer, x, sync) if any(p.requires_grad for p in layer.parameters()) else None
    for _ in range(args.repeats):
        for k, layer in layers.items():
            t0 = time.perf_counter()
            if any(p.requires_grad for p in layer.parameters()):
                step(layer, x, sync)
            else:
                with torch.no_grad():
                    layer(x)
                sync()
            times[k].append(time.perf_counter() - t0)
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {dev}, "
          f"{args.dtype}, {args.tokens} tokens, 4096×4096")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        trainable = sum(p.numel() for p in layers[k].parameters() if p.requires_grad)
        print(f"  {k:18s} {v:8.1f} ms  (trainable {trainable:,})")
    print(f"  step ratio tera / lora: {med['tera 16³×16³ R=8'] / med['lora r=64']:.2f}×")


if __name__ == "__main__":
    main()
