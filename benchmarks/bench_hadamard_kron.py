"""LoHa / LoKr → rank-8 LoRA on Llama-7B module shapes, and PEFT's convert_to_lora on the Llama-1B shape (issue 13).

    python benchmarks/bench_hadamard_kron.py [--workdir DIR] [--repeats 3] [--device cpu] [--skip-peft]

Makes two PEFT adapters over the 224 linear modules of Llama-7B (hidden 4096, intermediate 11008, 32 layers), bf16:
a LoHa with r = 16 and a LoKr with decompose_factor 16 (W₁ full, W₂ = w2_a @ w2_b of rank 16). Times, in one run
and as whole processes (interpreter and imports included), alternating so that both see the same page cache:
  (a) the I/O floor: safetensors `load_file` of the adapter + `save_file` of tensors shaped like the rank-8 result;
  (b) `surgery squeeze DIR --rank 8 -o OUT`.
Then, unless --skip-peft, the Llama-1B shape (hidden 2048, intermediate 8192, 16 layers; vocabulary cut to 2048,
which no adapter touches): PEFT's `convert_to_lora(model, 8)` on the loaded PeftModel (dense ΔW + full SVD per
module) against `surgery squeeze` of the same saved LoHa as a whole process, and the largest difference of their
ΔW over all modules (relative to the largest |ΔW|).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import alternate, llama_1b, parser, report, timed  # noqa: E402

LAYERS, HIDDEN, INTER, R, FACTOR, K = 32, 4096, 11008, 16, 16, 8
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def factorization(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS / PEFT `factorization(dim, factor)` for a factor dividing dim: (smaller, larger)."""
    m, n = factor, dim // factor
    return (m, n) if m <= n else (n, m)


def make(path: Path, algo: str) -> int:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).bfloat16()  # noqa: E731
    tensors = {}
    for layer in range(LAYERS):
        for mod, (o, i) in MODULES.items():
            n = f"base_model.model.model.layers.{layer}.{mod}"
            if algo == "loha":
                for h in (1, 2):
                    tensors[f"{n}.hada_w{h}_a"], tensors[f"{n}.hada_w{h}_b"] = rnd(o, R), rnd(R, i)
            else:
                (l, k), (m, nn) = factorization(o, FACTOR), factorization(i, FACTOR)
                tensors[f"{n}.lokr_w1"] = rnd(l, m)
                tensors[f"{n}.lokr_w2_a"], tensors[f"{n}.lokr_w2_b"] = rnd(k, R), rnd(R, nn)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": algo.upper(), "r": R, "alpha": R, "target_modules": sorted(m.split(".")[1] for m in MODULES),
           "rank_pattern": {}, "alpha_pattern": {}, "task_type": "CAUSAL_LM"}
    if algo == "lokr":
        cfg.update(decompose_factor=FACTOR, decompose_both=False)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return (path / "adapter_model.safetensors").stat().st_size


FLOOR = """
import sys, torch
from safetensors.torch import load_file, save_file
src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = load_file(src)
out, mods = {}, {n.rsplit(".", 1)[0] for n in t}
for m in mods:  # a rank-k LoRA shaped like the result: (out, k), (k, in)
    if m + ".hada_w1_a" in t:
        o, i = t[m + ".hada_w1_a"].shape[0], t[m + ".hada_w1_b"].shape[1]
    else:
        o = t[m + ".lokr_w1"].shape[0] * t[m + ".lokr_w2_a"].shape[0]
        i = t[m + ".lokr_w1"].shape[1] * t[m + ".lokr_w2_b"].shape[1]
    out[m + ".lora_B.weight"] = torch.zeros(o, k, dtype=torch.bfloat16)
    out[m + ".lora_A.weight"] = torch.zeros(k, i, dtype=torch.bfloat16)
save_file(out, dst, metadata={"format": "pt"})
"""


def peft_comparison(work: Path, device: str) -> None:
    """convert_to_lora on the loaded 1B PeftModel vs surgery squeeze of the saved LoHa, same shapes."""
    from peft import LoHaConfig, convert_to_lora, get_peft_model

    from surgery import load_adapter

    model = llama_1b()
    targets = sorted(m.split(".")[1] for m in MODULES)
    model = get_peft_model(model, LoHaConfig(r=R, alpha=R, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hada_" in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    d = work / "loha-1b"
    model.save_pretrained(d)
    t0 = time.perf_counter()
    _, state = convert_to_lora(model, K)
    peft_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "surgery_cli.main", "squeeze", str(d), "--rank", str(K), "-o", str(work / "loha-1b-r8"),
           "--device", device, "--force"]
    ours_s = statistics.median(timed(cmd)[0] for _ in range(3))
    ours = load_adapter(work / "loha-1b-r8")
    worst = 0.0
    for name, m in ours.modules.items():
        B, A = state[f"{name}.lora_B.weight"].double(), state[f"{name}.lora_A.weight"].double()
        ref = B @ A  # convert_to_lora folds the scale (lora_alpha = r)
        worst = max(worst, float((m.delta() - ref).abs().max() / ref.abs().max()))
    print(f"Llama-1B LoHa r={R}, {len(ours.modules)} modules → rank {K}:")
    print(f"  PEFT convert_to_lora (model loaded, in process): {peft_s:6.2f} s")
    print(f"  surgery squeeze (whole process, median of 3):    {ours_s:6.2f} s   ratio PEFT / surgery "
          f"{peft_s / ours_s:.1f}×")
    print(f"  largest |ΔW_surgery − ΔW_PEFT| / max|ΔW_PEFT| over all modules: {worst:.2e}")


def main():
    args = parser("--skip-peft").parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="surgery-bench-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")
    for algo in ("loha", "lokr"):
        d = work / f"{algo}-7b"
        size = (d / "adapter_model.safetensors").stat().st_size if (d / "adapter_model.safetensors").exists() \
            else make(d, algo)
        floor = [sys.executable, "-c", FLOOR, str(d / "adapter_model.safetensors"), str(work / "floor.safetensors"),
                 str(K)]
        ours = [sys.executable, "-m", "surgery_cli.main", "squeeze", str(d), "--rank", str(K), "-o",
                str(work / f"{algo}-r8"), "--device", args.device, "--force"]
        med = alternate({"floor": floor, "squeeze": ours}, args.repeats)
        print(f"{algo}: {size / 1e6:.0f} MB bf16, {LAYERS * len(MODULES)} modules → rank {K}")
        report(med, "squeeze")
    if not args.skip_peft:
        peft_comparison(work, args.device)


if __name__ == "__main__":
    main()
