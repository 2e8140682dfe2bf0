"""Merge into an FP8 block-scaled base (issue 24): a 7B-shaped checkpoint and a rank-64 LoRA.

    python benchmarks/bench_quant.py [--workdir DIR] [--repeats 3] [--layers 32]

Makes a Llama-7B-shaped FP8 checkpoint as DeepSeek-V3 and Qwen3-*-FP8 store them (hidden 4096, intermediate
11008, 32 layers, vocab 32000; every linear weight float8_e4m3fn with float32 `weight_scale_inv` per 128×128
block, embeddings and norms bf16; ~7.0 GB in 5 shards) and a rank-64 PEFT LoRA on all 224 linear modules, then
times, each as a whole process, alternating, with dirty pages flushed before each run:
  (a) the I/O floor: safetensors `load_file` + `save_file` of every shard of the same files;
  (b) the I/O floor of the default's output: `load_file`, each FP8 tensor's bytes written twice over as a bf16
      tensor of its shape (no arithmetic; scales dropped: the same bytes as (c) writes, 1.9× the base),
      `save_file`;
  (c) `surgery merge BASE LORA -o OUT` — the default: the whole model written dequantized, bf16;
  (d) `surgery merge BASE LORA -o OUT --requantize` — FP8 kept, fresh scales, the survival report.
Medians, ratios to the floors, peak RSS (ru_maxrss), and (d)'s adapter_survived figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import FLOOR, write_lora  # noqa: E402  (FLOOR: load_file + save_file of every shard)
from measure import alternate  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

H, I, V, R, BLOCK = 4096, 11008, 32000, 64, 128
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H), "self_attn.v_proj": (H, H),
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def _fp8(shape, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes (no NaN code) and per-block scales of a weight ~ N(0, 0.02²)-sized."""
    codes = torch.randint(0, 0x7F, shape, generator=g, dtype=torch.uint8)
    codes |= torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7
    grid = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    return codes.view(torch.float8_e4m3fn), torch.rand(grid, generator=g) * 1e-4 + 5e-5


def make(work: Path, layers: int) -> tuple[Path, Path]:
    base, lora = work / "base", work / "lora"
    if (base / "config.json").exists() and (lora / "adapter_config.json").exists():
        return base, lora
    base.mkdir(parents=True, exist_ok=True)
    lora.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    bf16 = lambda *s: (torch.randn(*s, generator=g) * 0.02).bfloat16()  # noqa: E731
    groups = [list(range(i, min(i + -(-layers // 4), layers))) for i in range(0, layers, -(-layers // 4))]
    index, total = {}, 0
    nshards = len(groups) + 1
    for s, group in enumerate(groups + [None]):
        t = {}
        if group is None:
            t = {"model.embed_tokens.weight": bf16(V, H), "lm_head.weight": bf16(V, H),
                 "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
        else:
            for layer in group:
                p = f"model.layers.{layer}."
                for m, shape in SHAPES.items():
                    t[p + m + ".weight"], t[p + m + ".weight_scale_inv"] = _fp8(shape, g)
                for n in ("input_layernorm", "post_attention_layernorm"):
                    t[p + n + ".weight"] = torch.ones(H, dtype=torch.bfloat16)
        name = f"model-{s + 1:05d}-of-{nshards:05d}.safetensors"
        save_file(t, str(base / name), metadata={"format": "pt"})
        index.update({n: name for n in t})
        total += sum(x.numel() * x.element_size() for x in t.values())
        del t
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": index}))
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": V,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]}}))
    write_lora(lora, layers, SHAPES, R, R, bf16, b_scale=0.05)
    return base, lora


FLOOR_BF16 = """
import sys, pathlib, torch
from safetensors.torch import load_file, save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir(exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    t = load_file(str(shard))
    t = {k: torch.cat((v.view(torch.uint8), v.view(torch.uint8)), -1).view(torch.bfloat16)
         if v.dtype == torch.float8_e4m3fn else v for k, v in t.items() if not k.endswith("_scale_inv")}
    save_file(t, str(dst / shard.name), metadata={"format": "pt"})
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="surgery-quant-bench-"))
    base, lora = make(work, args.layers)
    merge = [sys.executable, "-m", "surgery_cli.main", "merge", str(base), str(lora), "--device", "cpu"]
    cmds = {"floor": [sys.executable, "-c", FLOOR, str(base), str(work / "out")],
            "floor (bf16 bytes)": [sys.executable, "-c", FLOOR_BF16, str(base), str(work / "out")],
            "merge (bf16 out)": merge + ["-o", str(work / "out")],
            "merge --requantize": merge + ["-o", str(work / "out"), "--requantize"]}
    res = alternate(cmds, args.repeats, clean=[work / "out"], sync=True)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"base: {size / 1e9:.2f} GB FP8 (block {BLOCK}) in {len(list(base.glob('*.safetensors')))} shards, "
          f"{args.layers} layers; adapter rank {R} on {args.layers * len(SHAPES)} modules")
    floor = res["floor"][0]
    for k, (med, rss, walls) in res.items():
        print(f"  {k:20s} median {med:6.2f} s  {med / floor:5.2f}× floor  peak RSS {rss:6.0f} MiB  runs "
              + ", ".join(f"{w:.2f}" for w in walls))
    print(f"  merge (bf16 out) / floor (bf16 bytes): {res['merge (bf16 out)'][0] / res['floor (bf16 bytes)'][0]:.2f}×")
    r = subprocess.run(merge + ["-o", str(work / "out"), "--requantize", "--json", "--force"], capture_output=True,
                       text=True, check=True)
    q = json.loads(r.stdout)["quantized"]
    from surgery import load_adapter
    from surgery.io.checkpoint import open_checkpoint, read_tensor

    W = read_tensor(open_checkpoint(base).tensors["model.layers.0.self_attn.q_proj.weight"])
    d = load_adapter(lora).modules["base_model.model.model.layers.0.self_attn.q_proj"].delta()
    print(f"  ‖ΔW‖ / ‖W‖ of layer 0's q_proj: {float(d.norm() / W.norm()):.4f}")
    print(f"  --requantize: adapter_survived {q['adapter_survived']:.4f} over {len(q['modules'])} weights "
          f"(min {min(m['adapter_survived'] for m in q['modules']):.4f}, "
          f"max {max(m['adapter_survived'] for m in q['modules']):.4f})")


if __name__ == "__main__":
    main()
