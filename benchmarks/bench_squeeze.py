"""Squeeze benchmark on a synthetic adapter with Llama-7B module shapes (issue: foundation).

    python benchmarks/bench_squeeze.py [--workdir DIR] [--repeats 3] [--rank 8] [--device cpu]

Makes a PEFT adapter (hidden 4096, intermediate 11008, 32 layers × 7 target modules, rank 64, bf16, singular
values decaying as 0.9^i; 320 MB) and times, in one run, each as a whole process (interpreter and imports
included), alternating so that both see the same page cache:
  (a) the I/O floor: safetensors `load_file` of every tensor + `save_file` of tensors shaped like the result;
  (b) `surgery squeeze DIR --rank 8 -o OUT`;
and in this process (c) a dense float32 `torch.linalg.svd` of ΔW for one module of each shape, extrapolated to
all 224 modules (what PEFT's convert_to_lora / kohya resize / mergekit do). Reports medians, the ratio b/a and
peak RSS (ru_maxrss of each child).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import alternate  # noqa: E402
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS, RANK = 4096, 11008, 32, 64
SHAPES = {  # module → (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def make_adapter(path: Path, seed: int = 0) -> int:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    root = (0.9 ** torch.arange(RANK, dtype=torch.float32)).sqrt()
    tensors = {}
    for layer in range(LAYERS):
        for mod, (o, i) in SHAPES.items():
            name = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{name}.lora_B.weight"] = (torch.randn(o, RANK, generator=g) / o**0.5 * root).bfloat16()
            tensors[f"{name}.lora_A.weight"] = (root[:, None] * torch.randn(RANK, i, generator=g) / i**0.5).bfloat16()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted(m.split(".")[1] for m in SHAPES),
           "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return (path / "adapter_model.safetensors").stat().st_size


FLOOR = """
import sys
from safetensors.torch import load_file, save_file
src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = load_file(src)
out = {n: (v[:k] if ".lora_A." in n else v[:, :k]).contiguous() for n, v in t.items()}
save_file(out, dst, metadata={"format": "pt"})
"""


def dense_svd_estimate(adapter: Path, device: str) -> float:
    """Seconds for a dense SVD of ΔW of one module per shape, scaled to all modules."""
    from safetensors import safe_open

    total = 0.0
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for mod, shape in SHAPES.items():
            name = f"base_model.model.model.layers.0.{mod}"
            B = f.get_tensor(f"{name}.lora_B.weight").float().to(device)
            A = f.get_tensor(f"{name}.lora_A.weight").float().to(device)
            t0 = time.perf_counter()
            torch.linalg.svd(B @ A, full_matrices=False)
            if device == "cuda":
                torch.cuda.synchronize()
            total += (time.perf_counter() - t0) * LAYERS
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="surgery-bench-"))
    adapter = work / "adapter-7b-r64"
    size = make_adapter(adapter) if not (adapter / "adapter_model.safetensors").exists() else \
        (adapter / "adapter_model.safetensors").stat().st_size
    floor_cmd = [sys.executable, "-c", FLOOR, str(adapter / "adapter_model.safetensors"), str(work / "floor.safetensors"),
                 str(args.rank)]
    surgery_cmd = [sys.executable, "-m", "surgery_cli.main", "squeeze", str(adapter), "--rank", str(args.rank),
                   "-o", str(work / "squeezed"), "--device", args.device, "--force"]
    med = alternate({"floor": floor_cmd, "squeeze": surgery_cmd}, args.repeats)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")
    print(f"adapter: {size / 1e6:.0f} MB bf16, {LAYERS * len(SHAPES)} modules, rank {RANK} → {args.rank}")
    for k, (w, r, walls) in med.items():
        print(f"  ({'a' if k == 'floor' else 'b'}) {k:8s} median {w:6.2f} s   peak RSS {r:7.0f} MB "
              f"({r / (size / 2**20):.2f}× adapter)   runs: "
              + ", ".join(f"{w:.2f}" for w in walls))
    print(f"  ratio squeeze / I/O floor: {med['squeeze'][0] / med['floor'][0]:.2f}×")
    if not args.skip_dense:
        est = dense_svd_estimate(adapter, args.device)
        print(f"  (c) dense torch.linalg.svd per module, extrapolated: {est:.0f} s "
              f"({est / med['squeeze'][0]:.0f}× the squeeze)")


if __name__ == "__main__":
    main()
