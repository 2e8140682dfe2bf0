"""MoE expert adapters on a Qwen3-30B-A3B-shaped layer stack (issue: MoE expert adapters).

    python benchmarks/bench_moe.py [--workdir DIR] [--repeats 3] [--layers 2]

Makes (once) a Qwen3-MoE checkpoint of Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of intermediate 768,
32 heads of 128, 4 KV heads, vocab 151936) with `--layers` layers, bf16, in Qwen3-MoE's own on-disk layout (one
tensor per expert: 384 expert tensors a layer, shards of 2 GB), and a rank-16 float32 PEFT LoRA on
`mlp.experts.gate_up_proj` and `mlp.experts.down_proj` (`target_parameters`). Then times, each as a whole process,
alternating, outputs removed and dirty pages flushed before each run:

  squeeze: the adapter's load+save floor (safetensors load_file + save_file) against
           `surgery squeeze LORA --rank 8 --device cpu` (exact per-expert QR-core SVDs);
  merge:   the base's load+save floor (each shard load_file + save_file) against
           `surgery merge BASE LORA -o OUT --device cpu` (every expert's ΔW added to its gate/up/down tensors).
Medians, ratios and peak RSS.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from measure import alternate, parser  # noqa: E402

H, I, E, HEADS, KV, D, V, R = 2048, 768, 128, 32, 4, 128, 151936, 16

FLOOR = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(exist_ok=True)
for f in sorted(src.glob("*.safetensors")):
    save_file(load_file(str(f)), str(dst / f.name), metadata={"format": "pt"})
"""


def make(work: Path, layers: int) -> tuple[Path, Path]:
    import transformers
    from safetensors.torch import save_file

    base, lora = work / f"base-{layers}", work / f"lora-{layers}"
    g = torch.Generator().manual_seed(0)
    if not (base / "config.json").exists():
        base.mkdir(parents=True, exist_ok=True)
        shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
        for l in range(layers):
            p = f"model.layers.{l}."
            shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                           p + "self_attn.q_proj.weight": (HEADS * D, H), p + "self_attn.k_proj.weight": (KV * D, H),
                           p + "self_attn.v_proj.weight": (KV * D, H), p + "self_attn.o_proj.weight": (H, HEADS * D),
                           p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
                           p + "mlp.gate.weight": (E, H)})
            for e in range(E):
                shapes.update({f"{p}mlp.experts.{e}.gate_proj.weight": (I, H), f"{p}mlp.experts.{e}.up_proj.weight": (I, H),
                               f"{p}mlp.experts.{e}.down_proj.weight": (H, I)})
        shard, size, n, index = {}, 0, 0, {}
        names = list(shapes)

        def flush():
            nonlocal shard, size, n
            n += 1
            save_file(shard, str(base / f"part-{n}.safetensors"), metadata={"format": "pt"})
            index.update({k: f"part-{n}.safetensors" for k in shard})
            shard, size = {}, 0

        for name in names:
            shard[name] = (torch.randn(shapes[name], generator=g) * 0.02).to(torch.bfloat16)
            size += shard[name].numel() * 2
            if size > 2e9:
                flush()
        if shard:
            flush()
        total = len(index)
        final = {}
        for i in range(1, n + 1):  # transformers' shard names
            new = f"model-{i:05d}-of-{n:05d}.safetensors"
            (base / f"part-{i}.safetensors").rename(base / new)
            final.update({k: new for k, v in index.items() if v == f"part-{i}.safetensors"})
        (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": final}))
        assert len(final) == total
        transformers.Qwen3MoeConfig(
            vocab_size=V, hidden_size=H, intermediate_size=6144, moe_intermediate_size=I, num_hidden_layers=layers,
            num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=D, num_experts=E, num_experts_per_tok=8,
            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, torch_dtype="bfloat16",
        ).save_pretrained(base)
    if not (lora / "adapter_config.json").exists():
        lora.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for l in range(layers):
            p = f"base_model.model.model.layers.{l}.mlp.experts."
            tensors[p + "base_layer.lora_A.weight"] = torch.randn(R * E, H, generator=g) / H ** 0.5  # gate_up
            tensors[p + "base_layer.lora_B.weight"] = torch.randn(2 * I, R * E, generator=g) * 1e-3
            tensors[p + "lora_A.weight"] = torch.randn(R * E, I, generator=g) / I ** 0.5  # down
            tensors[p + "lora_B.weight"] = torch.randn(H, R * E, generator=g) * 1e-3
        save_file(tensors, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
        (lora / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 2 * R, "lora_dropout": 0.0,
            "target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}))
    return base, lora


def main() -> None:
    ap = parser()
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.workdir or "/tmp/bench_moe")
    work.mkdir(parents=True, exist_ok=True)
    base, lora = make(work, args.layers)
    os.environ["HF_HUB_OFFLINE"] = "1"
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"base: Qwen3-30B-A3B shapes, {args.layers} layers, {size / 1e9:.2f} GB bf16, "
          f"{3 * E * args.layers} expert tensors; adapter rank {R} on gate_up_proj + down_proj of every layer "
          f"({(lora / 'adapter_model.safetensors').stat().st_size / 1e6:.0f} MB f32)")
    surgery = [sys.executable, "-m", "surgery_cli.main"]
    outs = [work / n for n in ("sq-floor", "sq", "m-floor", "merged")]
    sq = alternate({
        "floor": [sys.executable, "-c", FLOOR, str(lora), str(outs[0])],
        "surgery": surgery + ["squeeze", str(lora), "--rank", "8", "--device", "cpu", "-o", str(outs[1])]},
        args.repeats, clean=outs, sync=True)
    mg = alternate({
        "floor": [sys.executable, "-c", FLOOR, str(base), str(outs[2])],
        "surgery": surgery + ["merge", str(base), str(lora), "-o", str(outs[3]), "--device", "cpu"]},
        args.repeats, clean=outs, sync=True)
    for title, res in (("squeeze --rank 8 (adapter load+save floor)", sq), ("merge (base load+save floor)", mg)):
        print(title + ":")
        for k, (w, rss, walls) in res.items():
            print(f"  {k:8s} median {w:6.2f} s   peak RSS {rss:6.0f} MB   runs: " + ", ".join(f"{x:.2f}" for x in walls))
        print(f"  ratio surgery / floor: {res['surgery'][0] / res['floor'][0]:.2f}×")


if __name__ == "__main__":
    main()
