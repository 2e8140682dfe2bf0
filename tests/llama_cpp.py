"""llama.cpp as the reference for GGUF: tiny transformers models with a real SentencePiece tokenizer, converted by
llama.cpp's own `convert_hf_to_gguf.py`, adapters converted by its `convert_lora_to_gguf.py`, and logits from
llama.cpp itself (`llama-cpp-python`).

llama.cpp's Python converters ship in the `llama-cpp-python` source distribution (they are not on PyPI as a
package): `sources()` takes them from $LLAMA_CPP_DIR, else downloads that sdist once into ~/.cache/surgery.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import FIXTURES

VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp the tests run and convert with
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "surgery"


def sources() -> Path:
    """The llama.cpp source tree (convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/)."""
    if os.environ.get("LLAMA_CPP_DIR"):
        return Path(os.environ["LLAMA_CPP_DIR"])
    root = CACHE / f"llama-cpp-python-{VERSION}"
    tree = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (tree / "convert_lora_to_gguf.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
        with tarfile.open(root / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"llama_cpp_python-{VERSION}/vendor/llama.cpp/")
                       and m.name.endswith((".py", ".txt", ".json", ".toml"))]
            tar.extractall(root, members=members, filter="data")
    return tree


def tokenizer(folder: Path) -> int:
    """A SentencePiece model trained on fixtures/sentences.txt, with byte fallback (llama.cpp needs a newline
    byte token), written as `tokenizer.model`; returns its vocabulary size."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(input=str(FIXTURES / "sentences.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=320, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False,
                                   num_threads=1, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()


SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6)


def model(arch: str, folder: Path, seed: int = 0, **text) -> Path:
    """A tiny random `arch` (LlamaForCausalLM, Qwen2ForCausalLM, …) with the SentencePiece tokenizer, saved as
    transformers saves it (float32 safetensors); `text`: more settings of its (text) config."""
    import transformers

    vocab = tokenizer(folder)
    stem = arch.replace("ForCausalLM", "").replace("ForConditionalGeneration", "")  # the (text) model's config
    config_cls = getattr(transformers, {"Llava": "LlamaConfig", "Mistral3": "MistralConfig"}.get(stem) or (
        stem + "TextConfig" if hasattr(transformers, stem + "TextConfig") else stem + "Config"))
    extra = dict(head_dim=16, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch.startswith("Gemma"):
        extra.update(tie_word_embeddings=True, query_pre_attn_scalar=16, sliding_window=32)
        if arch.startswith("Gemma3"):
            extra.update(rope_scaling=None)
        if arch.startswith("Gemma4"):  # a sliding and a full-attention block (its own head size), per-layer inputs
            extra.update(global_head_dim=32, layer_types=["sliding_attention", "full_attention"],
                         hidden_size_per_layer_input=16, vocab_size_per_layer_input=vocab)
    if arch.startswith("Cohere"):  # llama.cpp's command-r / cohere2 have no output matrix: tied, as the real ones;
        # logits unscaled (the default 1/16 would hide what the adapter does); llama.cpp reads cohere2's rotary_pct
        extra.update(tie_word_embeddings=True, logit_scale=1.0, **({"rotary_pct": 1.0} if "2" in arch else {}))
    if arch == "Phi3ForCausalLM":
        extra.pop("head_dim")
        extra.update(num_key_value_heads=4, original_max_position_embeddings=64)
    if arch.startswith(("Qwen3_5", "Qwen3Next")):  # a gated-delta-net block (more V heads than K heads, as the real
        # ones; Qwen3-Next's q/k/v/z fused in in_proj_qkvz) and a full-attention one, with partial rotary
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        extra.update(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                     linear_key_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_value_head_dim=8,
                     rope_parameters=rope)
    if arch.startswith("Qwen3_5"):  # over interleaved M-RoPE sections; one MTP layer named, as the real configs do
        # (llama.cpp's LoRA converter asserts it; the weights leave it out, as transformers does)
        extra.update(mtp_num_hidden_layers=1, rope_parameters={**rope, "mrope_section": [2, 1, 1]})
    extra.update(MOE.get(arch.replace("ForConditionalGeneration", "ForCausalLM"), {}))  # (an image-text MoE: its text
    # model's)
    config = config_cls(vocab_size=vocab, **{**SMALL, **extra, **text})
    if arch == "Gemma3ForConditionalGeneration":  # Gemma 3 4B and up: the text model beside a tiny SigLIP tower
        config = transformers.Gemma3Config(
            text_config=config.to_dict(), tie_word_embeddings=True, mm_tokens_per_image=4,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8))
    if arch == "Mistral3ForConditionalGeneration":  # Mistral Small 3.1+: a Mistral text model, a Pixtral tower
        config = transformers.Mistral3Config(
            text_config={**config.to_dict(), "model_type": "mistral", "sliding_window": None},
            image_token_index=vocab - 1,
            vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, head_dim=16, image_size=32, patch_size=8))
    if arch == "Gemma4ForConditionalGeneration":  # beside a one-layer vision tower
        config = transformers.Gemma4Config(
            text_config=config.to_dict(), tie_word_embeddings=True, audio_config=None,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=16, patch_size=8, position_embedding_size=64))
    if arch == "LlavaForConditionalGeneration":  # LLaVA 1.5: a Llama text model and a one-layer CLIP tower
        config = transformers.LlavaConfig(
            text_config={**config.to_dict(), "model_type": "llama"}, image_token_index=vocab - 1,
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                               projection_dim=32))
    if arch == "Qwen2_5_VLForConditionalGeneration":  # the text model (M-RoPE sections over head_dim / 2) and a
        # one-block vision tower
        text = {**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3]}}
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, tie_word_embeddings=False,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[0]))
    if arch.startswith("Qwen3VL"):  # interleaved M-RoPE whose sections llama.cpp lays out as
        # transformers does (each section at least as long as the ones after it), and a two-block tower
        text = {**config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [3, 3, 2], "mrope_interleaved": True}}
        config = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(
            text_config=text, tie_word_embeddings=False,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                               deepstack_visual_indexes=[0]))
    if arch.startswith("Qwen3_5") and arch.endswith("ForConditionalGeneration"):
        config = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(
            text_config=config.to_dict(), tie_word_embeddings=False,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64))
    torch.manual_seed(seed)
    m = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in m.parameters():  # weights large enough that every layer matters to the logits
            if p.dim() == 2:
                p.normal_(0, 0.2)
    m.save_pretrained(folder, safe_serialization=True)
    if arch == "Qwen3VLMoeForConditionalGeneration":  # its experts stored as the released checkpoints store them,
        # (E, in, out), which llama.cpp's converter expects and transformers transposes on loading
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        save_file({k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in tensors.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                                     "tokenizer_class": "LlamaTokenizer"}))
    return folder


_MLA = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16, head_dim=8, num_key_value_heads=4)  # (llama.cpp's converter splits kv_b_proj over
# num_key_value_heads; it takes a missing q_lora_rank for DeepSeek-V2-Lite's, by its 27 layers only)
# tiny MoE models: 4 experts, 2 per token (Qwen2-MoE with a shared expert)
MOE = {"MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
       "Qwen3MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   norm_topk_prob=True),  # as real Qwen3-MoE models (llama.cpp assumes it)
       # llama.cpp's OLMoE: no GQA (k_norm over all heads) and its converter's fixed norm eps, as the real ones
       "OlmoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32, num_key_value_heads=4,
                                rms_norm_eps=1e-5),
       # GLM-4.5: block 0 dense (first_k_dense_replace), a shared expert, sigmoid routing; no MTP layer
       "Glm4MoeForCausalLM": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                  num_nextn_predict_layers=0),
       # ERNIE 4.5: block 0 dense, a shared expert (llama.cpp reads its size as intermediate_size / kv heads)
       "Ernie4_5_MoeForCausalLM": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=48, moe_num_shared_experts=1,
                                       moe_layer_start_index=1, moe_layer_end_index=1, moe_layer_interval=1),
       # DeepSeek-V3 (Kimi K2): multi-head latent attention (q and kv through low-rank projections), block 0 dense, a
       # shared expert, sigmoid routing with its bias; no MTP layer. DeepSeek-V2: softmax routing
       "DeepseekV3ForCausalLM": dict(_MLA, n_group=1, topk_group=1, num_nextn_predict_layers=0),
       "DeepseekV2ForCausalLM": _MLA,
       "Glm4MoeLiteForCausalLM": dict(_MLA, n_group=1, topk_group=1, num_nextn_predict_layers=0),  # GLM-4.7-Flash
       "Qwen2MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48),
       "Qwen3VLMoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),  # (not square:
       # transformers transposes its stored experts only where the shapes tell)
       "Qwen3NextForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48),
       "Qwen3_5MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=48),
       "GptOssForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                                 layer_types=["sliding_attention", "full_attention"])}
# The converters run as scripts, with one change: llama.cpp's converters for some architectures (Qwen MoE, gpt-oss,
# GLM-4, EXAONE 4, HunYuan, StableLM) ask for a BPE tokenizer (they know the real ones by hash), while these tiny
# models carry a SentencePiece one, which they are made to read instead; the vocabulary is not what any test here is
# about.
_RUN = """import runpy, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion.base import TextModel
TextModel._set_vocab_gpt2 = TextModel._set_vocab_sentencepiece
import importlib
for module, cls in [("glm", "Glm4Model"), ("glm", "Glm4MoeModel"), ("exaone", "Exaone4Model"),
                    ("hunyuan", "HunYuanModel"), ("stablelm", "StableLMModel"), ("gemma", "Gemma4Model"),
                    ("glm", "Glm4MoeLiteModel")]:  # their own vocabulary readers
    setattr(getattr(importlib.import_module("conversion." + module), cls), "set_vocab",
            TextModel._set_vocab_sentencepiece)
if sys.argv[2] == "--qkvz-whole":  # Qwen3-Next's in_proj_qkvz as one ssm_in, as llama.cpp's converter wrote it
    # before splitting it into attn_qkv and attn_gate (GGUF models of that time still load so)
    from conversion.qwen import Qwen3NextModel
    split = Qwen3NextModel.modify_tensors
    Qwen3NextModel.modify_tensors = lambda self, data, name, bid: (
        super(Qwen3NextModel, self).modify_tensors(data, name, bid) if "in_proj_qkvz" in name
        else split(self, data, name, bid))
    del sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(script: str, *args, qkvz_whole: bool = False) -> None:
    r = subprocess.run([sys.executable, "-c", _RUN, str(sources()), *["--qkvz-whole"] * qkvz_whole,
                        str(sources() / script), *map(str, args)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        raise AssertionError(f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def convert_model(folder: Path, out: Path, outtype: str = "f32", *flags: str, qkvz_whole: bool = False) -> Path:
    """llama.cpp's GGUF of the model (`flags`: more of its converter's options); without the MTP layers a config
    names (Qwen3-Next's converter assumes them) but the tiny model has no weights for."""
    mtp = any(k in (folder / "config.json").read_text() for k in ("mtp_num_hidden_layers", "Qwen3Next"))
    run_script("convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype, *["--no-mtp"] * mtp, *flags,
               qkvz_whole=qkvz_whole)
    return out


def convert_lora(lora: Path, base: Path, out: Path, outtype: str = "f32") -> Path:
    run_script("convert_lora_to_gguf.py", lora, "--base", base, "--outfile", out, "--outtype", outtype)
    return out


TOKENS = [1, 40, 71, 120, 5, 250, 33, 17, 90, 210, 64, 3]


def logits(model_path: Path, lora: Path | None = None, tokens=TOKENS, scale: float = 1.0,
           activate_at: int = 0) -> np.ndarray:
    """llama.cpp's logits for every position of `tokens` (float32 KV cache: the default f16 cache alone moves the
    logits by ~1e-3 of an adapter's effect; weight repacking off: it crashes on tiny models on these CPUs).
    activate_at: the adapter set only from that token on, as llama.cpp's server runs an activated LoRA (the tokens
    before its invocation evaluated without it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def no_repack():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = no_repack
    try:
        llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, lora_scale=scale,
                              logits_all=True, n_ctx=64, n_batch=64, n_threads=1, verbose=False,
                              type_k=low.GGML_TYPE_F32, type_v=low.GGML_TYPE_F32, seed=0)
    finally:
        low.llama_model_default_params = default
    if activate_at:
        adapters = (low.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        for part, s in ((tokens[:activate_at], 0.0), (tokens[activate_at:], scale)):
            low.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(s))
            llm.eval(list(part))
    else:
        llm.eval(list(tokens))
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return out


def load_model(model_dir: Path):
    """The float32 transformers model of a folder: a causal LM, or an image-text one (Qwen2.5-VL is not among
    AutoModelForCausalLM's)."""
    import transformers

    archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures", [])
    auto = transformers.AutoModelForImageTextToText if any(a.endswith("ForConditionalGeneration") for a in archs) \
        else transformers.AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.float32)


def hf_logits(model_dir: Path, lora: Path | None = None, tokens=TOKENS) -> np.ndarray:
    """transformers' (and PEFT's) float32 logits for the same tokens."""
    m = load_model(model_dir).eval()
    if lora is not None:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, lora).eval()
    with torch.no_grad():
        return m(torch.tensor([list(tokens)])).logits[0].double().numpy()
