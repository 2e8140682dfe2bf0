"""Merging a kohya LoRA into an SD-1.5-shaped diffusers pipeline (issue: diffusion models).

    python benchmarks/bench_diffusion.py [--workdir DIR] [--repeats 3]

Makes a pipeline folder — `unet/` (UNet2DConditionModel with SD 1.5's config, 860M parameters, fp16, 1.7 GB),
`text_encoder/` (CLIP-L text model, 123M, fp16), `model_index.json`, scheduler and tokenizer files — and a rank-32
kohya LoRA on kohya's default targets (every attention projection, proj_in/out, the feed-forwards, the text
encoder's q/k/v/out and MLP), fp16. Then times, each as a whole process, alternating:
  (a) the I/O floor: safetensors `load_file` + `save_file` of each component's weights;
  (b) `surgery merge PIPELINE LORA -o OUT`;
  (c) diffusers' route: `from_pretrained` of both components, its kohya converter, `load_lora_adapter` /
      `load_lora_into_text_encoder`, `fuse_lora` (PEFT merge), `unload_lora`, `save_pretrained`.
Medians, ratios and peak RSS (ru_maxrss).
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import alternate, parser, report  # noqa: E402

R = 32
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _filled(model):
    """fp16 weights drawn small (uninitialised memory could hold NaN, which the merge refuses)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02)
    return model.to(torch.float16)


def make(work: Path) -> tuple[Path, Path]:
    import diffusers
    import transformers
    from safetensors.torch import save_file

    pipe, lora = work / "pipe", work / "lora.safetensors"
    if (pipe / "model_index.json").exists() and lora.exists():
        return pipe, lora
    unet = _filled(diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8))
    te = _filled(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)))
    unet.save_pretrained(pipe / "unet")
    te.save_pretrained(pipe / "text_encoder")
    for d, f in (("scheduler", "scheduler_config.json"), ("tokenizer", "vocab.json")):
        (pipe / d).mkdir()
        (pipe / d / f).write_text("{}")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}))
    g = torch.Generator().manual_seed(1)
    state = {}
    for prefix, model, targets in (("lora_unet_", unet, UNET_TARGETS), ("lora_te_text_model_", te, TE_TARGETS)):
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(targets):
                k = prefix + name.replace(".", "_")
                w = mod.weight
                state[f"{k}.lora_down.weight"] = (torch.randn((R,) + tuple(w.shape[1:]), generator=g) * 0.01).half()
                state[f"{k}.lora_up.weight"] = (torch.randn((w.shape[0], R) + (1,) * (w.dim() - 2), generator=g)
                                                * 0.01).half()
                state[f"{k}.alpha"] = torch.tensor(16.0, dtype=torch.float16)
    save_file(state, str(lora))
    return pipe, lora


FLOOR = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
pipe, out = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(pipe.glob("*/*.safetensors")):
    (out / f.parent.name).mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(f)), str(out / f.parent.name / f.name), metadata={"format": "pt"})
"""

DIFFUSERS = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
import diffusers, transformers
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
pipe, lora, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
unet = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet", torch_dtype=torch.float16)
te = transformers.CLIPTextModel.from_pretrained(pipe / "text_encoder", dtype=torch.float16)
sd, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(lora))
unet.load_lora_adapter({k: v for k, v in sd.items() if k.startswith("unet.")}, prefix="unet", network_alphas=alphas)
StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
    {k: v for k, v in sd.items() if k.startswith("text_encoder.")}, alphas, te, prefix="text_encoder")
unet.fuse_lora()
unet.unload_lora()
from peft.tuners.tuners_utils import BaseTunerLayer
for m in te.modules():
    if isinstance(m, BaseTunerLayer):
        m.merge()
state = {k.replace(".base_layer", ""): v for k, v in te.state_dict().items() if "lora_" not in k}
unet.save_pretrained(out / "unet")
te2 = transformers.CLIPTextModel(te.config).half()
te2.load_state_dict(state)
te2.save_pretrained(out / "text_encoder")
"""


def main() -> None:
    args = parser().parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-diffusion-"))
    pipe, lora = make(work)
    outs = {k: work / f"out-{k}" for k in ("floor", "surgery", "diffusers")}
    cmds = {
        "floor": [sys.executable, "-c", FLOOR, str(pipe), str(outs["floor"])],
        "surgery": [sys.executable, "-m", "surgery_cli.main", "merge", str(pipe), str(lora), "-o",
                    str(outs["surgery"]), "--force", "--device", args.device],
        "diffusers": [sys.executable, "-c", DIFFUSERS, str(pipe), str(lora), str(outs["diffusers"])],
    }
    size = sum(f.stat().st_size for f in pipe.rglob("*.safetensors")) / 1e9
    print(f"SD-1.5-shaped pipeline, {size:.2f} GB of fp16 weights; kohya LoRA rank {R}, "
          f"{lora.stat().st_size / 1e6:.0f} MB; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for p in outs.values():
        shutil.rmtree(p, ignore_errors=True)
    med = alternate(cmds, args.repeats)
    report(med, "surgery")
    print(f"  ratio diffusers / surgery: {med['diffusers'][0] / med['surgery'][0]:.2f}×")


if __name__ == "__main__":
    main()
