"""Merge and extract benchmark on a llama-1B-shaped checkpoint (issue: streaming surgery).

    python benchmarks/bench_merge.py [--workdir DIR] [--repeats 3]

Makes a bf16 LlamaForCausalLM checkpoint (hidden 2048, intermediate 8192, 16 layers, vocab 32000; 2.4 GB in
3 shards) and a rank-64 PEFT LoRA on every linear layer, then times, each as a whole process, alternating:
  (a) the I/O floor: safetensors `load_file` + `save_file` of every shard;
  (b) `surgery merge BASE ADAPTER -o OUT`;
  (c) the PEFT route: `from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`;
and, once, `surgery extract MERGED BASE --rank 64` against a dense float32 `torch.linalg.svd` of one delta of
each shape, extrapolated to all 112 modules (mergekit's method). Medians, ratios and peak RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import timed  # noqa: E402
from safetensors.torch import save_file

H, I, L, V, R = 2048, 8192, 16, 32000, 64
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H), "self_attn.v_proj": (H, H),
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def make(work: Path) -> tuple[Path, Path]:
    base, lora = work / "base", work / "lora"
    if (base / "config.json").exists() and (lora / "adapter_config.json").exists():
        return base, lora
    base.mkdir(parents=True, exist_ok=True)
    lora.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).bfloat16()  # noqa: E731
    names = ["model.embed_tokens.weight"]
    for layer in range(L):
        p = f"model.layers.{layer}."
        names += [p + m + ".weight" for m in SHAPES] + [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    shards, cur, index = [], {}, {}
    per = len(names) // 3 + 1
    for i, n in enumerate(names):
        if n.endswith("layernorm.weight") or n == "model.norm.weight":
            cur[n] = torch.ones(H, dtype=torch.bfloat16)
        elif "embed" in n or "lm_head" in n:
            cur[n] = rnd(V, H)
        else:
            cur[n] = rnd(*SHAPES[n.split(".", 3)[3].rsplit(".", 1)[0]])
        if len(cur) == per or i == len(names) - 1:
            shards.append(cur)
            cur = {}
    total = 0
    for i, t in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(t, str(base / fname), metadata={"format": "pt"})
        index.update({n: fname for n in t})
        total += sum(x.numel() * 2 for x in t.values())
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": V,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu"}))
    write_lora(lora, L, SHAPES, R, 2 * R, rnd)
    return base, lora


def write_lora(lora: Path, layers: int, shapes: dict, rank: int, alpha: float, rnd, b_scale: float = 1.0) -> None:
    """A PEFT LoRA directory over `shapes` ({"self_attn.q_proj": (out, in), …}) of every layer, factors from
    `rnd(*shape)`, B times `b_scale`."""
    t = {}
    for layer in range(layers):
        for m, (o, i) in shapes.items():
            p = f"base_model.model.model.layers.{layer}.{m}"
            t[p + ".lora_A.weight"] = rnd(rank, i)
            t[p + ".lora_B.weight"] = rnd(o, rank) * b_scale
    save_file(t, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "task_type": "CAUSAL_LM", "bias": "none",
        "target_modules": sorted(m.split(".")[1] for m in shapes), "lora_dropout": 0.0, "fan_in_fan_out": False}))


FLOOR = """
import sys, pathlib
from safetensors.torch import load_file, save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir(exist_ok=True)
for shard in sorted(src.glob("*.safetensors")):
    save_file(load_file(str(shard)), str(dst / shard.name), metadata={"format": "pt"})
"""
PEFT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="1GB")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="surgery-merge-bench-"))
    base, lora = make(work)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards) / 2**20
    cmds = {"floor": [sys.executable, "-c", FLOOR, str(base), str(work / "floor")],
            "surgery": [sys.executable, "-m", "surgery_cli.main", "merge", str(base), str(lora), "-o",
                        str(work / "merged"), "--device", "cpu"]}
    if not args.skip_peft:
        cmds["peft"] = [sys.executable, "-c", PEFT, str(base), str(lora), str(work / "peft")]
    outputs = {"floor": work / "floor", "surgery": work / "merged", "peft": work / "peft"}
    timed(cmds["floor"], [outputs["floor"]])
    runs = {k: [] for k in cmds}
    for _ in range(args.repeats):
        for k, c in cmds.items():
            runs[k].append(timed(c, [outputs[k]]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"base: {sum(s.stat().st_size for s in shards) / 1e9:.2f} GB bf16 in {len(shards)} shards "
          f"(largest {largest:.0f} MiB); adapter rank {R} on {L * len(SHAPES)} modules")
    med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"  {k:8s} median {med[k]:6.2f} s  peak RSS {max(r for _, r in v):6.0f} MiB  runs "
              + ", ".join(f"{w:.2f}" for w, _ in v))
    print(f"  surgery / floor: {med['surgery'] / med['floor']:.2f}×" +
          (f"   peft / surgery: {med['peft'] / med['surgery']:.2f}×" if "peft" in med else ""))
    print(f"  surgery peak RSS − largest shard: {max(r for _, r in runs['surgery']) - largest:.0f} MiB")
    if not args.skip_extract:
        w, rss = timed([sys.executable, "-m", "surgery_cli.main", "extract", str(work / "merged"), str(base),
                        "--rank", str(R), "-o", str(work / "extracted"), "--device", "cpu"], [work / "extracted"])
        from surgery.io.checkpoint import open_checkpoint, read_tensor
        ft, bs = open_checkpoint(work / "merged"), open_checkpoint(base)
        dense = 0.0
        for m in SHAPES:
            n = f"model.layers.0.{m}.weight"
            d = read_tensor(ft.tensors[n]).float() - read_tensor(bs.tensors[n]).float()
            t0 = time.perf_counter()
            torch.linalg.svd(d, full_matrices=False)
            dense += (time.perf_counter() - t0) * L
        print(f"  extract --rank {R}: {w:.1f} s, peak RSS {rss:.0f} MiB; dense SVD per module, extrapolated: "
              f"{dense:.0f} s ({dense / w:.1f}×)")


if __name__ == "__main__":
    main()
