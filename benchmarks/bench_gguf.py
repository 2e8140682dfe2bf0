"""GGUF benchmark on the Llama-3.2-1B shape (issue: llama.cpp and Ollama).

    python benchmarks/bench_gguf.py [--workdir DIR] [--repeats 3]

Makes (once) the config.json of a LlamaForCausalLM of Llama-3.2-1B's shape (hidden 2048, intermediate 8192,
16 layers, 32 heads, 8 KV heads, vocab 128256, tied embeddings), a rank-64 float32 PEFT LoRA on all 7 projections
of every layer (112 modules), a random F16 GGUF model of that shape (2.47 GB, llama.cpp's names) and the LoRA as
GGUF. Then times, each as a whole process, alternating:

  convert: (a) llama.cpp's `convert_lora_to_gguf.py LORA --base CFG` (f32, its default) against
           (b) `surgery convert LORA --base CFG -o OUT.gguf` (f32: the adapter's dtype);
  merge:   (c) the load+save floor of the F16 model (gguf-py: GGUFReader, then GGUFWriter writing every tensor, as
           its gguf_new_metadata.py copies a file) against
           (d) `surgery merge MODEL.gguf LORA.gguf -o OUT.gguf --device cpu`.
Outputs removed and dirty pages flushed (`sync`) before each run, outside the timing. Medians, ratios and peak
RSS (ru_maxrss).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from measure import alternate, parser  # noqa: E402

H, I, L, HEADS, KV, V, R = 2048, 8192, 16, 32, 8, 128256, 64
D = H // HEADS
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (KV * D, H), "self_attn.v_proj": (KV * D, H),
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}

FLOOR = """
import sys, gguf
reader = gguf.GGUFReader(sys.argv[1])
writer = gguf.GGUFWriter(sys.argv[2], reader.get_field("general.architecture").contents())
for f in reader.fields.values():
    if f.name == "general.architecture" or f.name.startswith("GGUF."):
        continue
    sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
for t in reader.tensors:
    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for t in reader.tensors:
    writer.write_tensor_data(t.data)
writer.close()
"""


def make(work: Path) -> tuple[Path, Path, Path]:
    import gguf
    from safetensors.torch import save_file

    cfg, lora, model = work / "cfg", work / "lora", work / "model-f16.gguf"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D,
        "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16"}))
    g = torch.Generator().manual_seed(0)
    if not (lora / "adapter_config.json").exists():
        lora.mkdir(exist_ok=True)
        tensors = {}
        for layer in range(L):
            for m, (o, i) in SHAPES.items():
                p = f"base_model.model.model.layers.{layer}.{m}"
                tensors[p + ".lora_A.weight"] = torch.randn(R, i, generator=g) / i ** 0.5
                tensors[p + ".lora_B.weight"] = torch.randn(o, R, generator=g) * 1e-3
        save_file(tensors, str(lora / "adapter_model.safetensors"), metadata={"format": "pt"})
        (lora / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 2 * R,
            "target_modules": sorted(m.split(".")[1] for m in SHAPES), "base_model_name_or_path": str(cfg)}))
    if not model.exists():
        w = gguf.GGUFWriter(model, "llama")
        w.add_block_count(L)
        w.add_context_length(131072)
        w.add_embedding_length(H)
        w.add_feed_forward_length(I)
        w.add_head_count(HEADS)
        w.add_head_count_kv(KV)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
        for layer in range(L):
            shapes.update({f"blk.{layer}.{GGUF_NAMES[m]}.weight": s for m, s in SHAPES.items()})
            shapes.update({f"blk.{layer}.attn_norm.weight": (H,), f"blk.{layer}.ffn_norm.weight": (H,)})
        rng = np.random.default_rng(0)
        for name, s in shapes.items():
            dt = np.float32 if len(s) == 1 else np.float16
            w.add_tensor_info(name, s, np.dtype(dt), int(np.prod(s)) * np.dtype(dt).itemsize,
                              gguf.GGMLQuantizationType.F32 if len(s) == 1 else gguf.GGMLQuantizationType.F16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, s in shapes.items():
            w.write_tensor_data(np.ones(s, np.float32) if len(s) == 1
                                else (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16))
        w.close()
    return cfg, lora, model


def main() -> None:
    args = parser().parse_args()
    work = Path(args.workdir or "/tmp/bench_gguf")
    work.mkdir(parents=True, exist_ok=True)
    cfg, lora, model = make(work)
    from tests.llama_cpp import sources

    script = sources() / "convert_lora_to_gguf.py"
    surgery = [sys.executable, "-m", "surgery_cli.main"]
    adapter = work / "lora.gguf"
    if not adapter.exists():
        import subprocess

        subprocess.run(surgery + ["convert", str(lora), "--base", str(cfg), "-o", str(adapter)], check=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model {model.stat().st_size / 1e9:.2f} GB F16, adapter rank {R} on {7 * L} modules "
          f"({(lora / 'adapter_model.safetensors').stat().st_size / 1e6:.0f} MB f32)")
    outs = [work / n for n in ("theirs.gguf", "ours.gguf", "floor.gguf", "merged.gguf")]
    conv = alternate({
        "llama.cpp": [sys.executable, str(script), str(lora), "--base", str(cfg), "--outfile", str(outs[0]),
                      "--outtype", "f32"],
        "surgery": surgery + ["convert", str(lora), "--base", str(cfg), "-o", str(outs[1])]},
        args.repeats, clean=outs, sync=True)
    print("convert a rank-64 LoRA to GGUF (whole processes):")
    for k, (w, rss, walls) in conv.items():
        print(f"  {k:10s} median {w:6.2f} s   peak RSS {rss:6.0f} MB   runs: " + ", ".join(f"{x:.2f}" for x in walls))
    print(f"  ratio llama.cpp / surgery: {conv['llama.cpp'][0] / conv['surgery'][0]:.2f}×")
    merge = alternate({
        "floor": [sys.executable, "-c", FLOOR, str(model), str(outs[2])],
        "surgery": surgery + ["merge", str(model), str(adapter), "-o", str(outs[3]), "--device", "cpu"]},
        args.repeats, clean=outs, sync=True)
    print("merge into an F16 GGUF model (whole processes):")
    for k, (w, rss, walls) in merge.items():
        print(f"  {k:10s} median {w:6.2f} s   peak RSS {rss:6.0f} MB   runs: " + ", ".join(f"{x:.2f}" for x in walls))
    print(f"  ratio surgery / load+save floor: {merge['surgery'][0] / merge['floor'][0]:.2f}×")


if __name__ == "__main__":
    main()
