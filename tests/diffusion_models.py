"""Tiny real diffusers models and pipelines made in the test (diffusers, transformers), and LoRA files for them
in kohya / diffusers layouts — the bases and adapters of tests/test_diffusion.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch

diffusers = __import__("pytest").importorskip("diffusers")


def sd_unet(seed=0, sdxl=False):
    """A UNet2DConditionModel shaped like SD 1.x (two blocks) or SDXL (three, attention in the last two,
    text_time added conditioning, layers_per_block 2)."""
    torch.manual_seed(seed)
    if sdxl:
        return diffusers.UNet2DConditionModel(
            block_out_channels=(8, 16, 32), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=16, norm_num_groups=4,
            attention_head_dim=(2, 4, 8), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 12)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, norm_num_groups=4, attention_head_dim=2)


def text_encoder(seed=0, hidden=12):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      projection_dim=hidden)
    return transformers.CLIPTextModel(cfg)


def flux(seed=0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                            attention_head_dim=4, num_attention_heads=2, joint_attention_dim=8,
                                            pooled_projection_dim=6, guidance_embeds=True, axes_dims_rope=(2, 2))


def wan(seed=0):
    """A WanTransformer3DModel with image conditioning (cross-attention k_img / v_img)."""
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4, text_dim=8,
        freq_dim=8, ffn_dim=16, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        image_dim=6, added_kv_proj_dim=8, rope_max_seq_len=32)


def save_pipeline(root: Path, components: dict) -> Path:
    """A pipeline folder: model_index.json, each component saved by its own library, and the side folders
    (scheduler, tokenizer) that are copied as they are."""
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    for name, model in components.items():
        model.save_pretrained(root / name, safe_serialization=True)
        lib = "transformers" if "text_encoder" in name else "diffusers"
        index[name] = [lib, type(model).__name__]
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["safety_checker"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def linear_modules(model, pattern) -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} of the model's Linear / Conv2d layers whose path matches `pattern`."""
    import re

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and re.search(pattern, name):
            out[name] = tuple(mod.weight.shape)
    return out


def kohya_lora(shapes: dict, prefix: str, seed: int, rank=2, alpha=1.0, dtype=torch.float32, names=None):
    """kohya tensors for modules of `shapes` ({path: weight shape}), named prefix + path with '_' (or `names`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, shape in shapes.items():
        name = (names or {}).get(path, prefix + path.replace(".", "_"))
        kernel = shape[2:]
        out[f"{name}.lora_down.weight"] = (torch.randn((rank, shape[1]) + kernel, generator=g) * 0.3).to(dtype)
        out[f"{name}.lora_up.weight"] = (torch.randn((shape[0], rank) + (1,) * len(kernel), generator=g) * 0.3).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out
