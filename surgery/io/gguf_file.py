"""llama.cpp / Ollama GGUF LoRA adapters and GGUF models (formats.md §10), through the `gguf` package.

A GGUF adapter is read in its own naming: each module is named after the GGUF tensor it updates (`blk.0.attn_q`)
and keeps llama.cpp's layout (Llama's q/k rows permuted), so squeeze and combine work on it as it is.
`to_gguf` / `from_gguf` move an adapter between PEFT's naming and llama.cpp's through the base model's
architecture, as llama.cpp's `convert_lora_to_gguf.py` does: the `gguf` package's `TensorNameMap` for the names,
`LlamaModel.permute` on B's rows for Llama's q and k. GGUF has one alpha per file, so modules whose scale differs
from the file's get it folded into B. MoE expert tensors (`blk.0.ffn_up_exps`) hold one LoRA per expert, stacked;
they are experts modules here, split from and fused back into transformers 5's `gate_up_proj`. Tensors stay on
disk (`GgufRef`) until an operation reads them.
"""
from __future__ import annotations

import os
import re
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..adapter import PEFT_PREFIX, Adapter, ExpertsModule, LoraModule, materialize, pack_experts
from ..errors import SurgeryError, listed
from ..version import __version__
from . import jsonfile
from .safetensors_file import WRITTEN_BY, atomic_output, finite

SUFFIX = ".gguf"
MAGIC = b"GGUF"
FORMAT = "gguf"
ARCH_KEY = "general.architecture"
TYPE_KEY = "gguf.tensor_type"  # Adapter.metadata: the tensor type the factors were read in (written back so)
ALORA = "alora_invocation_tokens"  # PEFT's config key of an activated LoRA; llama.cpp's adapter.alora.invocation_tokens
KEPT = (ALORA,)  # the PEFT config a GGUF adapter holds (surgery.adapter.NOT_PLAIN: the others refused)
# what llama.cpp's adapter loader takes (llama-adapter.cpp), and what a merge writes back exactly (floats) or
# re-quantizes as llama.cpp quantizes (Q8_0)
TYPES = ("f32", "f16", "bf16", "q8_0")
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}  # GGML float types as torch dtypes


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SurgeryError("GGUF files need the gguf package: pip install 'surgery[gguf]'") from None
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    """A file that starts with GGUF's magic (whatever its name); never a pipe or device, which the peek would
    consume (or, a FIFO with no writer, wait on forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """A transformers architecture as llama.cpp converts it: its GGUF name, whether Llama's q/k row permutation
    applies (`LlamaModel.undo_permute`), and the module paths inside each block that a LoRA adapts."""

    name: str
    permute: bool
    projections: tuple[str, ...]
    tied: bool = False  # transformers' default tie_word_embeddings for the architecture
    moe: bool = False  # experts (transformers 5's fused gate_up_proj / down_proj) in `experts`
    router: str | None = "mlp.gate"  # the router, a parameter PEFT wraps by target_parameters (None: a Linear)
    experts: str = "mlp.experts"  # where a block's experts are
    fused: bool = False  # llama.cpp keeps gate_up_proj fused (ffn_gate_up_exps) rather than split
    interleaved: bool = False  # gate_up_proj's gate and up rows alternate (gpt-oss), else gate rows first
    multimodal: bool = False  # the text model of an image-text model: `model.language_model.`, its text_config
    head: bool = True  # llama.cpp applies an output-head LoRA (DeepSeek-V2/V3's graph multiplies it without)

    @property
    def linear_attention(self) -> bool:
        """Gated-delta-net blocks (Qwen3-Next, Qwen3.5), whose head counts and sizes their GGUF layout needs."""
        return any(p.startswith("linear_attn.") for p in self.projections)

    @property
    def tiled_v(self) -> bool:
        """Qwen3.5's separate in_proj_qkv / in_proj_z, whose V heads llama.cpp's converter tiles."""
        return LINEAR_ATTN[0] in self.projections

    def halves(self, rows: int) -> tuple[slice, slice]:
        """The gate and the up rows of a fused gate_up_proj ΔW with `rows` rows."""
        return (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else \
            (slice(0, rows // 2), slice(rows // 2, None))


ATTN_MLP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# MoE models with dense blocks beside their MoE ones, and shared experts (llama.cpp's ffn_*_shexp)
DENSE_AND_SHARED = ATTN_MLP + ("mlp.gate", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                               "mlp.shared_experts.down_proj")
# the router and the shared expert of Qwen2-MoE and Qwen3.5-MoE (its gate: ffn_gate_inp_shexp)
QWEN_SHARED = ("mlp.gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
               "mlp.shared_expert_gate")
# Gemma 4: its per-layer-input gate and projection too (llama.cpp's inp_gate / proj); with enable_moe_block, experts
# beside the MLP (kept fused by llama.cpp) and a Linear router
GEMMA4 = Arch("gemma4", False, ATTN_MLP + ("per_layer_input_gate", "per_layer_projection", "router.proj"), tied=True,
              moe=True, router=None, experts="experts", fused=True)
# Qwen3.5's gated-delta-net blocks beside its full-attention ones (llama.cpp's attn_qkv, attn_gate, ssm_*)
LINEAR_ATTN = tuple(f"linear_attn.{p}" for p in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"))
# Qwen3-Next's: q, k, v and z fused per K head (llama.cpp's attn_qkv + attn_gate, or ssm_in in older GGUF models)
FUSED_QKVZ = "linear_attn.in_proj_qkvz"
QWEN3NEXT_LINEAR = (FUSED_QKVZ, "linear_attn.in_proj_ba", "linear_attn.out_proj")
# DeepSeek-V2/V3 (Kimi K2, GLM-4.7-Flash): llama.cpp multiplies the latent-attention projections (q_a/q_b/kv_a/
# k_b/v_b) and the output head without adapters; the attention output, the MLPs, the router and the experts take them
DEEPSEEK = Arch("deepseek2", False, ("self_attn.o_proj",) + DENSE_AND_SHARED[4:], moe=True, head=False)
ARCHS = {  # the architectures llama.cpp's convert_lora_to_gguf.py converts by name mapping (+ Llama's permute)
    "LlamaForCausalLM": Arch("llama", True, ATTN_MLP),
    "MistralForCausalLM": Arch("llama", True, ATTN_MLP),
    "LlavaForConditionalGeneration": Arch("llama", True, ATTN_MLP, multimodal=True),  # as llama.cpp: any text model
    "Mistral3ForConditionalGeneration": Arch("mistral3", True, ATTN_MLP, tied=True, multimodal=True),  # Small 3.1+
    "GraniteForCausalLM": Arch("granite", True, ATTN_MLP),
    "SmolLM3ForCausalLM": Arch("smollm3", True, ATTN_MLP, tied=True),
    "Qwen2ForCausalLM": Arch("qwen2", False, ATTN_MLP),
    "Qwen3ForCausalLM": Arch("qwen3", False, ATTN_MLP),
    "Qwen2VLForConditionalGeneration": Arch("qwen2vl", False, ATTN_MLP, multimodal=True),
    "Qwen2_5_VLForConditionalGeneration": Arch("qwen2vl", False, ATTN_MLP, multimodal=True),
    "Qwen3VLForConditionalGeneration": Arch("qwen3vl", False, ATTN_MLP, multimodal=True),
    "Qwen3_5ForCausalLM": Arch("qwen35", False, ATTN_MLP + LINEAR_ATTN),
    "Qwen3_5ForConditionalGeneration": Arch("qwen35", False, ATTN_MLP + LINEAR_ATTN, multimodal=True),
    "GemmaForCausalLM": Arch("gemma", False, ATTN_MLP, tied=True),
    "Gemma2ForCausalLM": Arch("gemma2", False, ATTN_MLP, tied=True),
    "Gemma3ForCausalLM": Arch("gemma3", False, ATTN_MLP, tied=True),
    "Gemma3ForConditionalGeneration": Arch("gemma3", False, ATTN_MLP, tied=True, multimodal=True),
    # (not Gemma 4's per_layer_model_projection, which llama.cpp multiplies without its adapters)
    "Gemma4ForCausalLM": GEMMA4,
    "Gemma4ForConditionalGeneration": replace(GEMMA4, multimodal=True),
    "Phi3ForCausalLM": Arch("phi3", False, ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                            "mlp.down_proj")),
    "OlmoForCausalLM": Arch("olmo", True, ATTN_MLP),
    "Olmo2ForCausalLM": Arch("olmo2", False, ATTN_MLP),
    "Olmo3ForCausalLM": Arch("olmo2", False, ATTN_MLP),  # llama.cpp converts OLMo 3 as OLMo 2
    "CohereForCausalLM": Arch("command-r", False, ATTN_MLP, tied=True),
    "Cohere2ForCausalLM": Arch("cohere2", False, ATTN_MLP, tied=True),
    "SeedOssForCausalLM": Arch("seed_oss", False, ATTN_MLP),
    "Ernie4_5ForCausalLM": Arch("ernie4_5", False, ATTN_MLP, tied=True),
    "Glm4ForCausalLM": Arch("glm4", False, ATTN_MLP[:4] + ("mlp.gate_up_proj", "mlp.down_proj")),  # fused, as Phi-3
    "Exaone4ForCausalLM": Arch("exaone4", False, ATTN_MLP),
    "StableLmForCausalLM": Arch("stablelm", False, ATTN_MLP),
    "HunYuanDenseV1ForCausalLM": Arch("hunyuan-dense", False, ATTN_MLP),
    "ArceeForCausalLM": Arch("arcee", True, ATTN_MLP[:4] + ATTN_MLP[5:]),  # no gate_proj (ReLU² MLP)
    "ApertusForCausalLM": Arch("apertus", False, ATTN_MLP[:4] + ATTN_MLP[5:]),  # (xIELU MLP)
    "MixtralForCausalLM": Arch("llama", True, ATTN_MLP[:4] + ("mlp.gate",), moe=True),
    "Qwen3MoeForCausalLM": Arch("qwen3moe", False, ATTN_MLP[:4] + ("mlp.gate",), moe=True),
    "OlmoeForCausalLM": Arch("olmoe", False, ATTN_MLP[:4] + ("mlp.gate",), moe=True),
    "Glm4MoeForCausalLM": Arch("glm4moe", False, DENSE_AND_SHARED, moe=True),  # first_k_dense_replace blocks dense
    "Ernie4_5_MoeForCausalLM": Arch("ernie4_5-moe", False, DENSE_AND_SHARED, tied=True, moe=True),  # moe_layer_*
    "Qwen2MoeForCausalLM": Arch("qwen2moe", False, ATTN_MLP[:4] + QWEN_SHARED, moe=True),
    "Qwen3VLMoeForConditionalGeneration": Arch("qwen3vlmoe", False, ATTN_MLP[:4] + ("mlp.gate",), moe=True,
                                               multimodal=True),
    "Qwen3_5MoeForCausalLM": Arch("qwen35moe", False, ATTN_MLP[:4] + LINEAR_ATTN + QWEN_SHARED, moe=True),
    "Qwen3_5MoeForConditionalGeneration": Arch("qwen35moe", False, ATTN_MLP[:4] + LINEAR_ATTN + QWEN_SHARED,
                                               moe=True, multimodal=True),
    "Qwen3NextForCausalLM": Arch("qwen3next", False, ATTN_MLP[:4] + QWEN3NEXT_LINEAR + QWEN_SHARED, moe=True),
    "DeepseekV2ForCausalLM": DEEPSEEK,
    "DeepseekV3ForCausalLM": DEEPSEEK,
    "Glm4MoeLiteForCausalLM": DEEPSEEK,  # GLM-4.7-Flash, as llama.cpp converts it
    "GptOssForCausalLM": Arch("gpt-oss", False, ATTN_MLP[:4] + ("mlp.router",), moe=True, router="mlp.router",
                              interleaved=True),
}
# a GGUF model names its architecture only: llama's covers Mixtral's experts and router too; a text-only model's
# names where there is one (gemma3), else the image-text model's (qwen2vl)
BY_NAME = {a.name: a for a in ARCHS.values() if a.multimodal} | {
    a.name: a for a in ARCHS.values() if a.name != "llama" and not a.multimodal} | {
    "llama": Arch("llama", True, ATTN_MLP + ("mlp.gate",), moe=True)}
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")  # llama.cpp's ffn_{gate,up,down}_exps, one 3-D tensor each
QKVZ_PARTS = (".attn_qkv", ".attn_gate")  # Qwen3-Next's in_proj_qkvz as llama.cpp's converter splits it
QKV = ("attn_q", "attn_k", "attn_v")  # in this order in a fused attn_qkv (llama.cpp's --fuse-qkv)


@dataclass(frozen=True)
class Base:
    """What naming an adapter for llama.cpp needs of its base model: the architecture, the block and head counts
    (for the permutation), the GGUF shapes of its weights when they are known (a config-only folder has none),
    and whether it has an output head of its own (`output.weight`) — a tied one takes no LoRA in llama.cpp."""

    where: str
    arch: Arch
    blocks: int
    heads: int
    kv_heads: int
    shapes: Mapping[str, tuple[int, ...]] | None
    has_output: bool
    experts: int = 0  # per MoE layer
    linear: tuple[int, int, int, int] | None = None  # linear attention's K heads, V heads, K and V head sizes
    head_dims: tuple[int, int] | None = None  # a GGUF model's key and value head sizes

    @property
    def text(self) -> str:
        """Where the text model's blocks and embeddings are, as transformers 5 loads the model (PEFT's names)."""
        return "model.language_model." if self.arch.multimodal else "model."

    def tensor_map(self):
        gguf = _gguf()
        enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch.name)
        return gguf.get_tensor_name_map(enum, self.blocks)

    def names(self) -> dict[str, str]:
        """{GGUF module name: HF module path} of every module a LoRA can adapt here (Qwen3-Next's in_proj_qkvz:
        two GGUF modules, where the base splits it)."""
        tmap = self.tensor_map()
        paths = [f"{self.text}embed_tokens"] + [f"{self.text}layers.{i}.{p}" for i in range(self.blocks)
                                                for p in self.arch.projections + self._expert_parts()]
        if self.has_output and self.arch.head:
            paths.append("lm_head")
        return {t: p for p in paths if (g := tmap.get_name(text_path(p))) for t in self.split_targets(p, g)}

    def split_targets(self, path: str, target: str) -> tuple[str, ...]:
        """The GGUF module(s) of the module at `path` (named `target` by the tensor map): Qwen3-Next's in_proj_qkvz
        is attn_qkv and attn_gate, as llama.cpp's converter splits it, unless the base keeps it whole (ssm_in, as
        GGUF models converted before that split do)."""
        if not path.endswith(FUSED_QKVZ) or (self.shapes is not None and target + ".weight" in self.shapes):
            return (target,)
        return tuple(target.replace(".ssm_in", part) for part in QKVZ_PARTS)

    def fused_qkv(self, target: str) -> str | None:
        """The GGUF tensor that holds `target` (blk.N.attn_q / _k / _v) in a GGUF model converted with llama.cpp's
        --fuse-qkv (blk.N.attn_qkv: q rows, then k, then v), else None. Not Phi-3's (its attn_qkv is qkv_proj's)
        nor a gated-delta-net block's (in_proj_qkv's)."""
        blk, _, part = target.rpartition(".")
        if part not in QKV or self.head_dims is None or target + ".weight" in self.shapes or \
                f"{blk}.ssm_out.weight" in self.shapes or "self_attn.qkv_proj" in self.arch.projections:
            return None
        return f"{blk}.attn_qkv" if f"{blk}.attn_qkv.weight" in self.shapes else None

    def qkv_rows(self, fused: str, known: Mapping[str, int]) -> list[int]:
        """The q, k and v row counts of the fused tensor `fused`: those of `known` parts as given, k's and v's from
        the KV heads and head sizes, q's the rest (a gated attention's q is twice its heads' size); checked against
        its shape."""
        total = self.shapes[fused + ".weight"][0]
        k_dim, v_dim = self.head_dims
        k, v = known.get(QKV[1], self.kv_heads * k_dim), known.get(QKV[2], self.kv_heads * v_dim)
        rows = [known.get(QKV[0], total - k - v), k, v]
        if sum(rows) != total or min(rows) < 1:
            raise SurgeryError(f"{self.where}: {fused} has {total} rows, not the {' + '.join(map(str, rows))} of its "
                               "q, k and v")
        return rows

    @property
    def fused(self) -> bool:
        """Experts' gate and up rows in one GGUF tensor (ffn_gate_up_exps): the architecture's way (Gemma 4), or a
        GGUF model converted so (llama.cpp's --fuse-gate-up-exps: gate rows, then up rows)."""
        return self.arch.fused or any(k.endswith(".ffn_gate_up_exps.weight") for k in self.shapes or ())

    def _expert_parts(self) -> tuple[str, ...]:
        parts = ("gate_up_proj", "down_proj") if self.fused else EXPERT_PARTS
        return tuple(f"{self.arch.experts}.{p}" for p in parts) if self.arch.moe else ()


def text_path(path: str) -> str:
    """A module path of an image-text model's text part as its text-only model names it, as llama.cpp's converter
    reads it: `model.language_model.layers.0…` (transformers 5) or `language_model.model.layers.0…` (4) →
    `model.layers.0…`; other paths as they are."""
    return path.replace("language_model.", "")


_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|multi_modal_projector|visual|audio_tower)\.")


def _field(reader, key: str, where, kind=int):
    f = reader.get_field(key)
    if f is None:
        raise SurgeryError(f"{where}: GGUF metadata {key} is missing")
    return kind(f.contents())


def open_reader(path: str | os.PathLike):
    """`gguf.GGUFReader` of `path`; a truncated or corrupt file is one line naming it."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise SurgeryError(f"{path}: not a readable GGUF file ({e or type(e).__name__})") from None
    for f in reader.fields.values():  # string values decode lazily (contents()): a bad byte is a traceback later
        try:
            for i in f.data if gguf.GGUFValueType.STRING in f.types else ():
                f.parts[i].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise SurgeryError(f"{path}: GGUF metadata {f.name} is not UTF-8 text") from None
    return reader


def base_info(base: str | os.PathLike, reader=None) -> Base:
    """The `Base` of a GGUF model file (`reader`: its `GGUFReader`, if open already) or a Hugging Face model
    folder (only its config.json is needed; its weights' shapes are checked where they are present)."""
    path = Path(base)
    if not path.exists():
        raise SurgeryError(f"{path}: no such file or directory")
    if path.is_file() and is_gguf(path):
        reader = reader or open_reader(path)
        if (t := reader.get_field("general.type")) is not None and t.contents() == "adapter":
            raise SurgeryError(f"{path}: is a GGUF adapter, not a model; give the base model as --base")
        name = _field(reader, ARCH_KEY, path, str)
        if name not in BY_NAME:
            raise SurgeryError(f"{path}: architecture {name!r} is not one surgery converts LoRA for (supported: "
                               f"{', '.join(sorted(BY_NAME))})")
        heads = _field(reader, f"{name}.attention.head_count", path)
        kv = reader.get_field(f"{name}.attention.head_count_kv")
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
        experts = reader.get_field(f"{name}.expert_count")
        if name == "glm4" and reader.get_field(f"{name}.rope.dimension_sections") is not None:
            raise _mrope(path)
        linear = None
        if BY_NAME[name].linear_attention:  # as llama.cpp's converter writes them
            k_heads, v_heads, k_dim, inner = (_field(reader, f"{name}.ssm.{k}", path) for k in (
                "group_count", "time_step_rank", "state_size", "inner_size"))
            linear = _linear(k_heads, v_heads, k_dim, inner // max(v_heads, 1), path)
        k_dim, v_dim = (reader.get_field(f"{name}.attention.{k}_length") for k in ("key", "value"))
        k_dim = _field(reader, f"{name}.embedding_length", path) // heads if k_dim is None else int(k_dim.contents())
        return Base(str(path), BY_NAME[name], _field(reader, f"{name}.block_count", path), heads,
                    int(kv.contents()) if kv is not None else heads, shapes, "output.weight" in shapes,
                    int(experts.contents()) if experts is not None else 0, linear,
                    (k_dim, int(v_dim.contents()) if v_dim is not None else k_dim))
    config_path = (path if path.is_dir() else path.parent) / "config.json"
    if not config_path.is_file():
        raise SurgeryError(f"{path}: no config.json (the base model's config names its architecture for GGUF)")
    config = jsonfile.read_object(config_path)
    archs = jsonfile.field(config, "architectures", "str list", config_path, default=[])
    arch = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if arch is None:
        raise SurgeryError(f"{config_path}: architecture {', '.join(archs) or '(none)'} is not one surgery converts "
                           f"LoRA to GGUF for (supported: {', '.join(ARCHS)})")
    top = config
    if arch.multimodal:  # the text model's numbers (older Qwen2-VL configs keep them at the top)
        config = jsonfile.field(top, "text_config", "object", config_path, default=top)
    rope = [config.get(k) for k in ("rope_parameters", "rope_scaling")]
    if arch.name == "glm4" and any(isinstance(r, dict) and "mrope_section" in r for r in rope):
        raise _mrope(config_path)
    blocks, heads = (jsonfile.field(config, k, "positive int", config_path)
                     for k in ("num_hidden_layers", "num_attention_heads"))
    if blocks is None or heads is None:
        raise SurgeryError(f"{config_path}: num_hidden_layers and num_attention_heads are needed for GGUF names")
    kv = jsonfile.field(config, "num_key_value_heads", "positive int", config_path, default=heads)
    experts, expert_shapes = _experts(arch, blocks, config, config_path)
    linear = None
    if arch.linear_attention:
        sizes = [jsonfile.field(config, f"linear_{k}", "positive int", config_path) for k in (
            "num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim")]
        if None in sizes:
            raise SurgeryError(f"{config_path}: linear_num_key_heads, linear_num_value_heads, linear_key_head_dim "
                               "and linear_value_head_dim are needed for the linear-attention layers' GGUF layout")
        linear = _linear(*sizes, config_path)
    shapes = None
    if path.is_file() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        from .checkpoint import open_checkpoint

        ck = open_checkpoint(path)
        stored = {text_path(k): t for k, t in ck.tensors.items() if not _VISION.search(k)}
        b = Base(str(path), arch, blocks, heads, kv, None, "lm_head.weight" in stored, experts, linear)
        tmap = b.tensor_map()
        shapes = {name + ".weight": tuple(t.shape) for k, t in stored.items()
                  if k.endswith(".weight") and (name := tmap.get_name(k[: -len(".weight")])) is not None}
        shapes |= expert_shapes  # however the checkpoint stores them (per expert, fused, MXFP4 blocks)
        for key in [k for k in shapes if k.endswith(".ssm_in.weight") and FUSED_QKVZ in arch.projections]:
            rows, cols = shapes.pop(key)  # (llama.cpp's converter splits Qwen3-Next's in_proj_qkvz)
            z = linear[1] * linear[3]
            qkv, gate = (key.replace(".ssm_in", part) for part in QKVZ_PARTS)
            shapes |= {qkv: (rows - z, cols), gate: (z, cols)}
        has_output = b.has_output
    else:
        has_output = not jsonfile.field(top, "tie_word_embeddings", "bool", config_path, default=arch.tied)
    return Base(str(path), arch, blocks, heads, kv, shapes, has_output, experts, linear)


def _linear(k_heads: int, v_heads: int, k_dim: int, v_dim: int, where) -> tuple[int, int, int, int]:
    if k_heads < 1 or v_dim < 1 or v_heads % k_heads:
        raise SurgeryError(f"{where}: {v_heads} linear-attention V heads do not group over {k_heads} K heads")
    return k_heads, v_heads, k_dim, v_dim


def _mrope(where) -> SurgeryError:
    """GLM-4 with multimodal RoPE sections: llama.cpp's converter reorders the rotary rows of q and k
    (`Glm4Model.normal_to_neox`), which this writer does not do; refused rather than a file it would misread."""
    return SurgeryError(f"{where}: a GLM-4 with multimodal RoPE sections (mrope_section), whose q/k rows llama.cpp "
                        "reorders; its LoRA cannot be written for llama.cpp here")


def _experts(arch: Arch, blocks: int, config: Mapping, where) -> tuple[int, dict[str, tuple[int, ...]]]:
    """A MoE config's expert count and its GGUF expert tensors' shapes (E, out, in), as llama.cpp's converter
    stacks them; (0, {}) for a dense architecture or config (Gemma 4 without enable_moe_block)."""
    if not arch.moe or config.get("enable_moe_block") is False:
        return 0, {}

    def first(*keys):
        return next((v for v in (jsonfile.field(config, k, "positive int", where) for k in keys) if v is not None),
                    None)
    count, ff, hidden = first("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), first(
        "moe_intermediate_size", "intermediate_size"), first("hidden_size")
    if None in (count, ff, hidden):
        raise SurgeryError(f"{where}: the expert count, their intermediate size and hidden_size are needed for GGUF "
                           "expert names")

    def index(key, default):
        return jsonfile.field(config, key, "int", where, default=default)

    # which blocks have experts, as transformers builds them: GLM-4.7-Flash's mlp_layer_types; GLM-4.5's
    # first_k_dense_replace leading dense blocks; ERNIE 4.5's moe_layer_start_index … moe_layer_end_index, every
    # moe_layer_interval-th
    start = max(index("first_k_dense_replace", 0), index("moe_layer_start_index", 0))
    end, step = index("moe_layer_end_index", blocks - 1), max(index("moe_layer_interval", 1), 1)
    moe = [start <= i <= end and (i + 1) % step == 0 for i in range(blocks)]
    if (types := jsonfile.field(config, "mlp_layer_types", "str list", where)) is not None:
        moe = [i < len(types) and types[i] == "sparse" for i in range(blocks)]
    parts = {"gate_up": (count, 2 * ff, hidden)} if arch.fused else {"gate": (count, ff, hidden),
                                                                        "up": (count, ff, hidden)}
    parts["down"] = (count, hidden, ff)
    return count, {f"blk.{i}.ffn_{p}_exps.weight": s for i in range(blocks) if moe[i] for p, s in parts.items()}


def _rotary(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` of a q/k weight's rows (HF's rotary halves → interleaved pairs), as an
    index: GGUF's row i is HF's row idx[i]."""
    if rows % (2 * heads):
        raise SurgeryError(f"cannot permute {rows} rows over {heads} heads")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _tiled(n: int, groups: int, per_group: int, size: int, where: str) -> torch.Tensor:
    """llama.cpp's order of Qwen3.5's linear-attention V heads (`_reorder_v_heads`): HF groups them by K head
    ([K0v0, K0v1, K1v0, K1v1]), GGUF tiles them ([K0v0, K1v0, K0v1, K1v1]) for ggml's broadcast; entry i of the
    index is the HF row (or column) that GGUF's i-th is."""
    if n != groups * per_group * size:
        raise SurgeryError(f"{where}: {n} rows/columns are not {groups * per_group} linear-attention V heads of {size}")
    return torch.arange(n).reshape(groups, per_group, size).transpose(0, 1).reshape(n)


def _reorder(base: Base, path: str, rows: int, cols: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """How llama.cpp's converter reorders the rows and columns of the weight at `path` (ΔW_gguf = ΔW[r][:, c], None:
    as they are): Llama's q/k rotary permutation; Qwen3.5's linear-attention V heads, where they outnumber K's."""
    if base.arch.permute and path.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        heads = base.heads if path.endswith("q_proj") else base.kv_heads
        return _rotary(rows, heads), None
    if not base.arch.tiled_v or ".linear_attn." not in path or base.linear[0] == base.linear[1]:
        return None, None
    k_heads, v_heads, k_dim, v_dim = base.linear
    part, per = path.rsplit(".", 1)[1], v_heads // k_heads
    if part == "in_proj_qkv":  # q and k rows as they are, then v's
        qk = 2 * k_heads * k_dim
        return torch.cat([torch.arange(qk), qk + _tiled(rows - qk, k_heads, per, v_dim, path)]), None
    if part in ("in_proj_z", "in_proj_a", "in_proj_b"):  # a row per V head channel (z), a row per V head (a, b)
        return _tiled(rows, k_heads, per, v_dim if part == "in_proj_z" else 1, path), None
    if part == "out_proj":
        return None, _tiled(cols, k_heads, per, v_dim, path)
    return None, None


def _qkvz_rows(base: Base, where: str, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's in_proj_qkvz rows as llama.cpp's converter splits them: HF's are [q, k, v, z] per K head;
    GGUF's attn_qkv holds every head's q, then every k, then every v, and attn_gate every z. The HF rows of each
    (`rows`: the module's, checked against the base's head counts)."""
    k_heads, v_heads, k_dim, v_dim = base.linear
    vz = v_heads // k_heads * v_dim
    if rows is None:
        rows = k_heads * (2 * k_dim + 2 * vz)
    elif rows != k_heads * (2 * k_dim + 2 * vz):
        raise SurgeryError(f"{where}: {rows} rows are not {k_heads} K heads' q, k (of {k_dim}), v and z (of {vz})")
    q, k, v, z = torch.arange(rows).reshape(k_heads, -1).split([k_dim, k_dim, vz, vz], 1)
    return torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)]), z.reshape(-1)


def _split(m, base: Base, path: str, target: str) -> list[tuple[str, Any]]:
    """[(GGUF module, its LoRA)] of the module at `path`: itself, or Qwen3-Next's in_proj_qkvz as attn_qkv and
    attn_gate (B's rows split, one A for both)."""
    targets = base.split_targets(path, target)
    if len(targets) == 1:
        return [(target, m)]
    return list(zip(targets, _row_blocks(m, _qkvz_rows(base, path, m.out_features))))


def _consecutive(sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive row blocks of these sizes, as indices."""
    return list(torch.arange(sum(sizes)).split(sizes))


def _row_blocks(m: LoraModule, rows: Iterable[torch.Tensor]) -> list[LoraModule]:
    """The LoRA on each block of ΔW's rows (an index each): B's rows, the same A."""
    return [replace(m, B=_Derived(m.B, lambda x, r=r: x[r], (len(r), m.rank))) for r in rows]


def _side_by_side(where: str, pieces: list, rows: list[torch.Tensor]) -> LoraModule:
    """LoRAs on row blocks of one weight (pieces[i] on its rows[i], an index; None: no update there) as one LoRA
    on the whole: one A where all have the same one (as written from one module), else their A's stacked (rank
    Σ rᵢ) and B's rows apart, block by block; scales folded into B where they differ — exact either way."""
    like = next(m for m in pieces if m is not None)
    for m, r in zip(pieces, rows):
        if m is not None and (m.kind, m.out_features, m.in_features) != ("linear", len(r), like.in_features):
            raise SurgeryError(f"{where}: a part's LoRA is {m.shape}; the base's part is {(len(r), like.in_features)}")
    given = [m for m in pieces if m is not None]
    shared = len(given) == len(pieces) and all(m.rank == like.rank and _same(m.A, like.A) for m in given[1:])
    k = like.rank if shared else sum(m.rank for m in given)

    def make():
        B, As, col = torch.zeros(sum(map(len, rows)), k), [], 0
        for m, r in ((m, r) for m, r in zip(pieces, rows) if m is not None):
            b, a = m.factors(torch.float32, "cpu")
            B[r, col: col + m.rank] = b * (m.scale / like.scale)
            if not (shared and As):
                As.append(a)
                col += 0 if shared else m.rank
        return B.to(like.dtype), torch.cat(As).to(like.dtype)
    get = _handed_out_once(make)
    return LoraModule(A=_Made(lambda: get(1), (k, like.in_features), like.dtype),
                      B=_Made(lambda: get(0), (sum(map(len, rows)), k), like.dtype), scale=like.scale)


def _reordered(m, base: Base, path: str, inverse: bool):
    """A 2-D LoRA module with B's rows and A's columns in llama.cpp's order (`inverse`: back to HF's)."""
    rows, cols = _reorder(base, path, m.out_features, m.in_features)
    if inverse:
        rows, cols = (None if i is None else torch.argsort(i) for i in (rows, cols))
    if rows is not None:
        m = replace(m, B=_Derived(m.B, lambda x: x[rows], m.B.shape))
    if cols is not None:
        m = replace(m, A=_Derived(m.A, lambda x: x[:, cols], m.A.shape))
    return m


class _Derived:
    """`fn` of a tensor, computed when read (a lazy tensor in the data model's sense): B's rows permuted, an
    embedding's A transposed."""

    def __init__(self, src, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]):
        self.src, self.fn, self.shape, self.dtype = src, fn, tuple(shape), src.dtype

    def load(self) -> torch.Tensor:
        return self.fn(materialize(self.src))

    def numel(self) -> int:
        return int(np.prod(self.shape))


class _Made(_Derived):
    """A tensor made by `make()` when read, of a known shape and dtype."""

    def __init__(self, make: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype):
        self.make, self.shape, self.dtype = make, tuple(shape), dtype

    def load(self) -> torch.Tensor:
        return self.make()


def _transposed(t) -> _Derived:
    return _Derived(t, lambda x: x.T.contiguous(), tuple(reversed(t.shape)))


def weight_shape(m) -> tuple[int, ...]:
    """The shape of the base weight a module updates, in numpy order: (out, in), an embedding table (vocab, dim)."""
    return tuple(reversed(m.shape)) if m.kind == "embedding" else tuple(m.shape)


# ---------------------------------------------------------------- naming: PEFT ⇄ llama.cpp


def _check_lora(name: str, m, what: str, token_embd: bool) -> None:
    """What llama.cpp applies: plain LoRA on linear weights and on the token embeddings."""
    if m.algo != "lora":
        raise SurgeryError(f"module {name}: a {m.algo} module has no llama.cpp form (llama.cpp applies LoRA only); "
                           "surgery convert --to lora first")
    if m.magnitude is not None:
        raise SurgeryError(f"module {name}: DoRA has no llama.cpp form (llama.cpp applies plain LoRA only)")
    if m.bias is not None:
        raise SurgeryError(f"module {name}: lora_B.bias has no llama.cpp form")
    if m.kind == "conv":
        raise SurgeryError(f"module {name}: a conv LoRA {what}")
    if m.kind == "embedding" and not token_embd:
        raise SurgeryError(f"module {name}: an embedding LoRA on a table other than the token embeddings {what}")


def _check_arch(adapter: Adapter, base: Base) -> None:
    """llama.cpp refuses an adapter of another architecture ("model arch and LoRA arch mismatch"); so do we."""
    if (arch := adapter.metadata.get(ARCH_KEY)) != base.arch.name:
        raise SurgeryError(f"{adapter.source}: is an adapter for architecture {arch}, but {base.where} is "
                           f"{base.arch.name}")


def to_gguf(adapter: Adapter, base: str | os.PathLike | Base, allow_missing: bool = False) -> Adapter:
    """The adapter in llama.cpp's naming and layout for `base` (a model folder, its config.json's folder, or a
    GGUF model): modules renamed through the architecture's `TensorNameMap`, Llama's q/k B rows permuted.
    allow_missing: a module on a weight llama.cpp adapts none of (or the base lacks) is left out with a note,
    not refused."""
    base = base if isinstance(base, Base) else base_info(base)
    if adapter.format == FORMAT:
        _check_arch(adapter, base)
        return adapter
    if adapter.format not in ("peft", "peft-file"):
        raise SurgeryError(f"cannot name a {adapter.format} adapter for llama.cpp directly; name it after the base's "
                           "tensors first (names.on_base)")
    if adapter.config.get("fan_in_fan_out"):
        raise SurgeryError("cannot write GGUF: fan_in_fan_out = true (GPT-2 Conv1D bases) is not an architecture "
                           "llama.cpp's adapters cover")
    tmap = base.tensor_map()
    adaptable = base.names()
    modules, per_expert, vision, left_out, qkv = {}, {}, [], [], {}
    for name, m in adapter.modules.items():
        path = name.removeprefix(PEFT_PREFIX)
        if _VISION.search(path):  # (an image-text model's; its GGUF model file names the text architecture only)
            vision.append(name)
            continue
        path = text_path(path)
        if m.kind == "experts" or _EXPERT.match(path):
            for target, part in _expert_targets(name, path, m, base, tmap, per_expert):
                if target in modules:
                    raise SurgeryError(f"module {name}: two modules map to GGUF tensor {target}")
                modules[target] = part
            continue
        try:
            placed = _placed(name, path, m, base, tmap, adaptable)
        except _Unadapted:
            if not allow_missing:
                raise
            left_out.append(name)
            continue
        for target, m in placed:
            into = modules
            if fused := base.fused_qkv(target):  # a part of the base's attn_qkv: joined below
                target, into = target.rsplit(".", 1)[1], qkv.setdefault(fused, {})
            if target in into:
                raise SurgeryError(f"module {name}: two modules map to GGUF tensor {target}")
            into[target] = m
    for fused, parts in qkv.items():
        rows = base.qkv_rows(fused, {p: m.out_features for p, m in parts.items()})
        modules[fused] = m = _side_by_side(fused, [parts.get(p) for p in QKV], _consecutive(rows))
        if (shape := tuple(base.shapes[fused + ".weight"])) != weight_shape(m):  # (the parts' input size)
            raise SurgeryError(f"{fused}: the q, k and v LoRAs' ΔW is {weight_shape(m)} but {base.where} has "
                               f"{fused}.weight {shape} (an adapter for another model?)")
    notes = list(adapter.notes)
    if left_out:
        notes.append(f"{len(left_out)} module(s) on weights llama.cpp adapts none of left out (--allow-missing): "
                     f"{listed(left_out)}")
    if vision:  # as llama.cpp's converter does: its runtime adapts the text model (the mmproj file takes none)
        notes.append(f"{len(vision)} module(s) of the vision tower / projector left out ({listed(vision)}): "
                     "llama.cpp applies adapters to the text model only")
    if not modules and not per_expert:
        raise SurgeryError("the adapter has no module of the text model, the only part llama.cpp adapts")
    for target, (names, experts) in per_expert.items():
        if target in modules:
            raise SurgeryError(f"module {names[0]}: two modules map to GGUF tensor {target}")
        modules[target] = _stacked(names, experts, base.experts or max(experts) + 1, notes)
    for target, m in modules.items():
        if m.kind == "experts" and (shape := _expert_shape(base, target, m)) != m.shape:
            raise SurgeryError(f"GGUF tensor {target}: the adapter's experts' ΔW is {m.shape} but {base.where} has "
                               f"{shape or 'no such tensor'} (an adapter for another model?)")
    rest = dict(adapter.passthrough)
    for key in [k for k in rest if k.endswith(".base_layer.weight")]:
        # PEFT's save_embedding_layers copy of the base's own table: the base has it (llama.cpp's converter skips
        # it too), unless it was resized
        path = key.removeprefix(PEFT_PREFIX)[: -len(".base_layer.weight")]
        target = tmap.get_name(text_path(path))
        if PEFT_PREFIX + path not in adapter.modules or target is None:
            continue
        shape = None if base.shapes is None else base.shapes.get(target + ".weight")
        if shape is not None and tuple(shape) != tuple(rest[key].shape):
            raise SurgeryError(f"{key}: {tuple(rest[key].shape)}, but {base.where} has {target}.weight "
                               f"{tuple(shape)} (resized embeddings have no llama.cpp adapter form)")
        del rest[key]
        notes.append(f"{key}: the base's own weight, saved beside the LoRA by PEFT; not written (the base has it)")
    if rest:
        raise SurgeryError(f"cannot write GGUF: the adapter carries non-LoRA tensors ({listed(sorted(rest))}), which "
                           "llama.cpp adapters have no place for")
    return Adapter(modules=modules, format=FORMAT, config={k: v for k in KEPT if (v := adapter.config.get(k))},
                   source=adapter.source, notes=tuple(notes), metadata={ARCH_KEY: base.arch.name})


class _Unadapted(SurgeryError):
    """A module on a weight that llama.cpp adapts none of in this base, or that the base lacks."""


def _placed(name: str, path: str, m, base: Base, tmap, adaptable: Mapping[str, str]) -> list[tuple[str, Any]]:
    """[(GGUF module, its LoRA in llama.cpp's layout)] of a 2-D module at `path`, checked against the base."""
    target = tmap.get_name(path)
    _check_lora(name, m, "has no llama.cpp form", target == "token_embd")
    if path == "lm_head" and (target is None or not base.has_output):
        raise _Unadapted(f"module {name}: the base ties its output head to the embeddings, and llama.cpp applies no "
                         "LoRA to a tied head (llama.cpp issue 9065)")
    if target == "token_embd" and not base.has_output:
        raise _Unadapted(f"module {name}: the base ties its output head to the token embeddings, and llama.cpp would "
                         "apply this LoRA to the head too (and fail there: GGML_ASSERT(ggml_can_mul_mat)); leave the "
                         "module out (--allow-missing)")
    if target is None:
        raise _Unadapted(f"module {name}: no {base.arch.name} GGUF tensor for {path} in llama.cpp's tensor map")
    if "norm" in target.rsplit(".", 1)[-1]:
        raise _Unadapted(f"module {name}: {target} is a norm vector, which llama.cpp does not adapt")
    placed = _split(_reordered(m, base, path, inverse=False), base, path, target)
    for target, m in placed:
        if target not in adaptable:  # llama.cpp would load the tensors and multiply without them
            raise _Unadapted(f"module {name}: llama.cpp applies no LoRA to {base.arch.name}'s {target} (its graph "
                             "multiplies that weight without adapters); leave the module out (--allow-missing)")
        shape = None if base.shapes is None else base.shapes.get(target + ".weight")
        if base.shapes is not None and shape is None and not base.fused_qkv(target):
            raise _Unadapted(f"module {name}: {base.where} has no tensor {target}.weight")
        if shape is not None and tuple(shape) != weight_shape(m):
            raise SurgeryError(f"module {name}: ΔW is {weight_shape(m)} but {base.where} has {target}.weight "
                               f"{tuple(shape)} (an adapter for another model?)")
    return placed


def _expert_shape(base: Base, target: str, m: ExpertsModule) -> tuple[int, ...] | None:
    """The (E, out, in) shape of the base's expert tensor `target` as far as the base says it: a model's tensor
    (None when it has none), or for a folder holding only config.json, its expert count with the adapter's sizes."""
    if base.shapes is not None:
        shape = base.shapes.get(target + ".weight")
        return None if shape is None else tuple(shape)
    return (base.experts or m.experts,) + tuple(m.shape[1:])


_EXPERT = re.compile(r"^(?P<owner>.+\.experts)\.(?P<e>\d+)\.(?P<part>\w+)$")  # a per-expert module (transformers 4)


def _expert_targets(name: str, path: str, m, base: Base, tmap, per_expert: dict) -> list[tuple[str, ExpertsModule]]:
    """The GGUF expert tensors (`blk.N.ffn_{gate,up,down}_exps`) an expert module updates, as llama.cpp's converter
    lays them out: a fused `gate_up_proj` parameter split into its gate and up rows (one A for both);
    a per-expert module (`experts.3.gate_proj`, Mixtral's `experts.3.w1`) collected into `per_expert` to be
    stacked with its siblings."""
    _check_lora(name, m, "has no llama.cpp form", False)
    if m.kind != "experts":
        hit = _EXPERT.match(path)
        target = tmap.get_name(f"{hit['owner']}.{hit['part']}")
        if target is None or not target.endswith("_exps"):
            raise SurgeryError(f"module {name}: no GGUF expert tensor for {path} in llama.cpp's tensor map")
        if base.fused and not target.endswith("_down_exps"):
            raise SurgeryError(f"module {name}: {base.where} keeps its experts' gate and up in one tensor "
                               "(ffn_gate_up_exps), which per-expert modules are not joined into here; convert the "
                               "adapter to PEFT's fused form first (surgery convert --to peft --base <HF model>)")
        names, experts = per_expert.setdefault(target, ([], {}))
        names.append(name)
        experts[int(hit["e"])] = m
        return []
    owner, param = path.rsplit(".", 1)
    parts = ("gate_proj", "up_proj") if param == "gate_up_proj" and not base.fused else (param,)
    targets = [tmap.get_name(f"{owner}.{p}") for p in parts]
    if param not in EXPERT_PARTS + ("gate_up_proj",) or None in targets:
        raise SurgeryError(f"expert parameter {name}: llama.cpp's adapters have no tensor for {param} (they adapt "
                           f"{', '.join(EXPERT_PARTS)} and fused gate_up_proj)")
    m = replace(m, nesting=())  # GGUF has a tensor per part, nothing nested
    if len(parts) == 1:
        return [(targets[0], m)]
    if m.out_features % 2:
        raise SurgeryError(f"expert parameter {name}: {m.out_features} rows do not split into gate and up halves")
    half = m.out_features // 2
    return [(t, replace(m, B=_Derived(m.B, lambda x, cut=cut: x[cut], (half, m.B.shape[1]))))
            for t, cut in zip(targets, base.arch.halves(m.out_features))]


def _stacked(names: list[str], experts: Mapping[int, LoraModule], count: int, notes: list) -> ExpertsModule:
    """Per-expert modules as one expert tensor's factors: ranks padded with zero directions to the largest, each
    expert's scale folded into its B where they differ, experts the adapter lacks zero (exact)."""
    if max(experts) >= count:
        raise SurgeryError(f"module {names[0]}: expert {max(experts)}, but the base has {count} experts")
    like = next(iter(experts.values()))
    if any(m.shape != like.shape for m in experts.values()):
        raise SurgeryError(f"module {names[0]}: its experts' ΔW shapes differ")
    k, scale = max(m.rank for m in experts.values()), like.scale
    out_f, in_f = like.out_features, like.in_features
    if len(experts) < count:
        notes.append(f"{names[0]}: {count - len(experts)} of {count} experts have no LoRA: zero updates there")

    def make(part: str) -> torch.Tensor:
        B = torch.zeros(count, out_f, k)
        A = torch.zeros(count, k, in_f)
        for e, m in experts.items():
            b, a = m.factors(torch.float32, "cpu")
            B[e, :, : m.rank], A[e, : m.rank] = b * (m.scale / scale), a
        return pack_experts(B, A)[part == "A"].to(like.dtype)
    return ExpertsModule(A=_Made(lambda: make("A"), (count * k, in_f), like.dtype),
                         B=_Made(lambda: make("B"), (out_f, k * count), like.dtype), scale=scale, experts=count)


def from_gguf(adapter: Adapter, base: str | os.PathLike | Base) -> Adapter:
    """A GGUF adapter in PEFT's naming for `base`: names mapped back through the architecture, the permutation
    undone. The config says alpha per module (rank_pattern/alpha_pattern where they differ)."""
    base = base if isinstance(base, Base) else base_info(base)
    _check_arch(adapter, base)
    paths = base.names()
    modules, unknown, split = {}, [], {}
    for name, m in _qkv_split(adapter.modules, base).items():
        path = paths.get(name)
        if path is None:
            unknown.append(name)
            continue
        shape = _expert_shape(base, name, m) if m.kind == "experts" else \
            None if base.shapes is None else base.shapes.get(name + ".weight")
        if shape is None and base.shapes is not None and not base.fused_qkv(name):  # (llama.cpp would not load it)
            raise SurgeryError(f"{adapter.source}: {base.where} has no tensor {name}.weight (an adapter for another "
                               "model?)")
        if shape is not None and tuple(shape) != weight_shape(m):
            raise SurgeryError(f"{adapter.source}: {name} updates a {weight_shape(m)} weight, but {base.where} has "
                               f"{tuple(shape)} (an adapter for another model?)")
        if (m.kind == "experts") != (".experts." in path):
            raise SurgeryError(f"{adapter.source}: {name} is {'an expert' if m.kind == 'experts' else 'a 2-D'} "
                               f"LoRA, but {path} is {'not ' if m.kind == 'experts' else ''}an expert tensor")
        if path.endswith(FUSED_QKVZ) and name.endswith(QKVZ_PARTS):
            split.setdefault(path, [None, None])[name.endswith(QKVZ_PARTS[1])] = m
            continue
        if m.kind != "experts":
            m = _reordered(m, base, path, inverse=True)
        modules[PEFT_PREFIX + path] = m
    for path, pieces in split.items():
        modules[PEFT_PREFIX + path] = _side_by_side(path, pieces, _qkvz_rows(base, path))  # (attn_qkv, attn_gate)
    if unknown:
        raise SurgeryError(f"{adapter.source}: no {base.arch.name} module of {base.where} for GGUF tensor(s) "
                           f"{listed(unknown)}")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.where),
              **{k: v for k in KEPT if (v := adapter.config.get(k))}}
    if base.arch.moe:
        modules = _fused_experts(modules, base.arch)
        # transformers 5's MoE routers are parameters of a router module, which PEFT wraps by target_parameters
        if routers := [f"{n.removeprefix(PEFT_PREFIX)}.weight" for n in modules
                       if base.arch.router and n.endswith("." + base.arch.router)]:
            config["target_parameters"] = routers
    return Adapter(modules=modules, format="peft", config=config, source=adapter.source, notes=adapter.notes)


def _qkv_split(modules: Mapping[str, Any], base: Base) -> dict[str, Any]:
    """The modules, a LoRA on a fused attn_qkv of the base (llama.cpp's --fuse-qkv) as its q, k and v parts: B's
    rows, and only the directions each part's B uses (written side by side, each part gets its own rank back; a
    part with none is no module)."""
    out = {}
    for name, m in modules.items():
        parts = [name.replace(".attn_qkv", f".{p}") for p in QKV]
        if not name.endswith(".attn_qkv") or base.fused_qkv(parts[0]) != name:
            out[name] = m
            continue
        if m.kind != "linear" or weight_shape(m) != tuple(base.shapes[name + ".weight"]):
            raise SurgeryError(f"{name}: a {weight_shape(m)} LoRA, but {base.where} has {name}.weight "
                               f"{tuple(base.shapes[name + '.weight'])}")
        B = materialize(m.B)  # (out, r), small
        for part, rows in zip(parts, _consecutive(base.qkv_rows(name, {}))):
            if len(cols := B[rows].ne(0).any(0).nonzero().flatten()):
                out[part] = replace(m, B=B[rows][:, cols].contiguous(),
                                    A=_Derived(m.A, lambda x, c=cols: x[c], (len(cols), m.in_features)))
    return out


def _fused_experts(modules: Mapping, arch: Arch) -> dict:
    """GGUF's separate gate and up expert tensors as transformers 5's fused `experts.gate_up_proj` parameter
    (its gate and up rows as `Arch.halves` says): one A where both halves have the same one (as written from a
    fused parameter), else the two LoRAs side by side (rank r_gate + r_up, B block-diagonal; a missing half a zero
    update) — exact either way. Each experts module's parameters nest in registration order (gate_up_proj inside
    down_proj), as PEFT wraps them."""
    out, halves = {}, {}
    for name, m in modules.items():
        owner, part = name.rsplit(".", 1)
        if m.kind == "experts" and part in ("gate_proj", "up_proj"):
            halves.setdefault(owner, {})[part] = m
        else:
            out[name] = m
    for owner, pair in halves.items():
        gate, up = pair.get("gate_proj"), pair.get("up_proj")
        if gate is not None and up is not None and (gate.experts, gate.in_features, gate.out_features) != \
                (up.experts, up.in_features, up.out_features):
            raise SurgeryError(f"{owner}: the gate and up expert tensors' LoRAs do not pair ({gate.shape} and "
                               f"{up.shape})")
        like = gate or up
        E, half = like.experts, like.out_features
        shared = gate is not None and up is not None and gate.rank == up.rank and _same(gate.A, up.A)
        k = like.rank if shared else sum(m.rank for m in (gate, up) if m is not None)

        def make(gate=gate, up=up, like=like, E=E, half=half, k=k, shared=shared):
            B, As, col = torch.zeros(E, 2 * half, k), [], 0
            for m, rows in [(m, rows) for m, rows in zip((gate, up), arch.halves(2 * half)) if m is not None]:
                B_, A_ = m.stacked()
                B[:, rows, col: col + m.rank] = B_ * (m.scale / like.scale)
                if not (shared and As):  # a shared A once, its columns of B side by side otherwise
                    As.append(A_)
                    col += 0 if shared else m.rank
            return tuple(t.to(like.dtype) for t in pack_experts(B, torch.cat(As, 1)))

        get = _handed_out_once(make)
        out[f"{owner}.gate_up_proj"] = ExpertsModule(
            A=_Made(lambda get=get: get(1), (E * k, like.in_features), like.dtype),
            B=_Made(lambda get=get: get(0), (2 * half, k * E), like.dtype), scale=like.scale, experts=E)
    for owner in {n.rsplit(".", 1)[0] for n, m in out.items() if m.kind == "experts"}:
        nest = tuple(p for p in ("gate_up_proj", "down_proj") if f"{owner}.{p}" in out)
        for p in nest:
            out[f"{owner}.{p}"] = replace(out[f"{owner}.{p}"], nesting=nest)
    return out


def _same(a, b) -> bool:
    """Whether two factors hold the same numbers (a GGUF file's: the same bytes)."""
    a_src, b_src = getattr(a, "src", None), getattr(b, "src", None)
    if isinstance(a_src, GgufRef) and isinstance(b_src, GgufRef):
        return a_src.qtype == b_src.qtype and np.array_equal(a_src.raw(), b_src.raw())
    return torch.equal(materialize(a), materialize(b))


def _handed_out_once(make: Callable[[], tuple]) -> Callable[[int], torch.Tensor]:
    """get(i) → make()[i], `make` run once for the tuple's parts read one after the other."""
    held: dict = {}

    def get(i: int):
        if i not in held:
            held.clear()
            held.update(enumerate(make()))
        return held.pop(i)
    return get


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class GgufRef:
    """A tensor still in a GGUF file: `nbytes` at byte `offset`, of GGML type `qtype`, read on `load()` in its own
    float dtype or dequantized to float32 (numpy order: `shape` is ggml's ne reversed). NaN and Inf are refused
    there, naming the file and tensor."""

    path: Path
    key: str
    shape: tuple[int, ...]
    qtype: int
    offset: int
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return FLOATS.get(type_name(self.qtype), torch.float32)

    def raw(self, buffer: np.ndarray | None = None) -> np.ndarray:
        """The tensor's bytes, read into `buffer` (a reused uint8 array: fresh pages cost more than the copy)."""
        data = np.empty(self.nbytes, np.uint8) if buffer is None or buffer.size < self.nbytes else \
            buffer[: self.nbytes]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(memoryview(data)) != self.nbytes:
                raise SurgeryError(f"{self.path}: tensor {self.key} is cut short (a truncated file)")
        return data

    def tensor(self, buffer: np.ndarray | None = None) -> torch.Tensor:
        """The tensor in its own float dtype (F16, BF16, F32), or dequantized to float32; unchecked."""
        data = self.raw(buffer)
        if type_name(self.qtype) in FLOATS:  # the bytes as they are
            return torch.from_numpy(data).view(self.dtype).reshape(self.shape)
        return torch.from_numpy(np.ascontiguousarray(decode(data, self.qtype))).reshape(self.shape)

    def load(self) -> torch.Tensor:
        t = self.tensor()
        if not torch.isfinite(t).all():
            raise SurgeryError(f"{self.path}: tensor {self.key} holds NaN or Inf")
        return t

    def numel(self) -> int:
        return int(np.prod(self.shape))


def tensor_refs(reader, path: Path) -> dict[str, GgufRef]:
    return {t.name: GgufRef(path, t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type),
                            int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}


def type_name(qtype: int) -> str:
    return _gguf().GGMLQuantizationType(qtype).name.lower()


def read(path: Path) -> Adapter:
    """A llama.cpp LoRA adapter: `<tensor>.weight.lora_a` (r, in) and `.lora_b` (out, r) pairs, scale
    alpha / r per module (alpha 0: scale 1, as llama.cpp's loader does)."""
    gguf = _gguf()
    reader = open_reader(path)
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "adapter":
        raise SurgeryError(f"{path}: is a GGUF model, not an adapter (general.type = "
                           f"{kind.contents() if kind is not None else 'missing'}); merge adapters into it with "
                           "surgery merge")
    if (t := reader.get_field(gguf.Keys.Adapter.TYPE)) is None or t.contents() != "lora":
        raise SurgeryError(f"{path}: GGUF adapter type {t.contents() if t is not None else '(missing)'}; surgery "
                           "reads LoRA adapters")
    config = {}
    if (f := reader.get_field(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS)) is not None:  # an activated LoRA
        tokens = f.contents()
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise SurgeryError(f"{path}: {f.name} = {tokens!r:.60} is not a list of token ids")
        config[ALORA] = tokens
    arch = _field(reader, ARCH_KEY, path, str)
    alpha = _field(reader, gguf.Keys.Adapter.LORA_ALPHA, path, float)
    if not np.isfinite(alpha) or alpha < 0:
        raise SurgeryError(f"{path}: adapter.lora.alpha = {alpha} is not a valid alpha")
    refs = tensor_refs(reader, path)
    pairs: dict[str, dict[str, GgufRef]] = {}
    for key, ref in refs.items():
        stem, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b") or not stem.endswith(".weight"):
            raise SurgeryError(f"{path}: tensor {key} is not a LoRA factor (.weight.lora_a / .weight.lora_b)")
        if type_name(ref.qtype) not in TYPES:
            raise SurgeryError(f"{path}: tensor {key} has type {type_name(ref.qtype)}; llama.cpp adapters hold "
                               f"{', '.join(TYPES)}")
        pairs.setdefault(stem[:-len(".weight")], {})[part] = ref
    modules = {}
    for name, p in pairs.items():
        if set(p) != {"lora_a", "lora_b"}:
            raise SurgeryError(f"{path}: {name} has {next(iter(p))} without its pair")
        a, b = p["lora_a"], p["lora_b"]
        if 0 in (*a.shape, *b.shape):
            raise SurgeryError(f"{path}: {name} has an empty factor (lora_a {a.shape}, lora_b {b.shape})")
        if len(a.shape) == 3 or len(b.shape) == 3:  # an expert tensor's: (E, r, in) and (E, out, r)
            E, r = a.shape[0], a.shape[1]
            if len(a.shape) != 3 or len(b.shape) != 3 or b.shape[0] != E or b.shape[2] != r:
                raise SurgeryError(f"{path}: {name} has lora_a {a.shape} and lora_b {b.shape}, which do not pair "
                                   "(expected (experts, r, in) and (experts, out, r))")
            modules[name] = ExpertsModule(
                A=_Derived(a, lambda x: x.reshape(-1, x.shape[-1]), (E * r, a.shape[2])),
                B=_Derived(b, lambda x: x.permute(1, 2, 0).reshape(x.shape[1], -1), (b.shape[1], r * E)),
                scale=alpha / r if alpha else 1.0, experts=E)
            continue
        embd = name == "token_embd"  # lora_a stored transposed, (vocab, r): llama.cpp gathers its rows
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1 if embd else 0] != b.shape[1]:
            raise SurgeryError(f"{path}: {name} has lora_a {a.shape} and lora_b {b.shape}, which do not pair "
                               f"(expected {'(vocab, r)' if embd else '(r, in)'} and (out, r))")
        r = b.shape[1]
        modules[name] = LoraModule(A=_transposed(a) if embd else a, B=b, scale=alpha / r if alpha else 1.0,
                                   kind="embedding" if embd else "linear")
    if not modules:
        raise SurgeryError(f"{path}: a GGUF adapter without LoRA tensors")
    types = Counter(type_name(r.qtype) for r in refs.values())
    return Adapter(modules=modules, format=FORMAT, source=path, config=config,
                   metadata={ARCH_KEY: arch, TYPE_KEY: types.most_common(1)[0][0]})


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class Planned:
    """One tensor of a GGUF file to be written: name, numpy shape, GGML type, and how to make its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        block, size = _gguf().GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) * size // block


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """A float tensor as the bytes of GGML type `qtype`, rounded once: floats as torch rounds them (what llama.cpp's
    converter stores), Q8_0 through the `gguf` package's reference quantizer, which matches llama.cpp's."""
    if (kind := type_name(qtype)) in FLOATS:
        return t.to(FLOATS[kind]).contiguous().view(torch.uint8).numpy()
    return _gguf().quants.quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def decode(data: np.ndarray, qtype) -> np.ndarray:
    """A quantized GGML type's bytes as float32 (numpy order), by the `gguf` package's dequantizer."""
    return _gguf().quants.dequantize(data, qtype).astype(np.float32, copy=False)


def copied_fields(reader) -> list[tuple[str, Any, Any, Any]]:
    """Every metadata field of a GGUF file as `write_file` takes them (the writer adds the architecture and the
    GGUF.* header fields itself), as gguf-py's gguf_new_metadata.py copies them."""
    gguf = _gguf()
    fields = []
    for f in reader.fields.values():
        if f.name == ARCH_KEY or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        fields.append((f.name, f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None))
    return fields


def write_file(out: Path, like, fields: Iterable[tuple[str, Any, Any, Any]], tensors: list[Planned]) -> None:
    """A GGUF file streamed tensor by tensor: header, `fields` (key, value, type, sub_type), tensor infos, then
    each tensor's bytes as `make()` gives them, the next one made while this one is written (so a `make` may not
    reuse the buffer of the one before it; two tensors in memory at a time). `like`: the architecture name, or
    a `GGUFReader` whose architecture and data alignment the file keeps."""
    gguf = _gguf()
    arch = like if isinstance(like, str) else _field(like, ARCH_KEY, out, str)
    writer = gguf.GGUFWriter(out, arch)
    if not isinstance(like, str):
        writer.data_alignment = like.alignment
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with ThreadPoolExecutor(1) as pool:  # the next tensor is made while this one is written
        ahead = pool.submit(tensors[0].make) if tensors else None
        for i, t in enumerate(tensors):
            data = ahead.result()
            if i + 1 < len(tensors):
                ahead = pool.submit(tensors[i + 1].make)
            if data.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: {data.nbytes} bytes made, {t.nbytes} planned")
            writer.write_tensor_data(data)
    writer.close()


def _alpha(modules: Mapping[str, LoraModule]) -> float:
    """The file's one alpha: the most common scale · r (ties: the first module's), so most modules keep their
    factors as they are."""
    counts = Counter(m.scale * m.rank for m in modules.values())
    top = max(counts.values())
    return next(a for a in (m.scale * m.rank for m in modules.values()) if counts[a] == top)


def write(adapter: Adapter, out: Path, dtype: str | None = None) -> None:
    """A llama.cpp LoRA adapter file. `dtype`: f32 | f16 | bf16 | q8_0 (default: the factors' dtype's, Q8_0 for
    float32 factors of an adapter read as Q8_0); Q8_0 rows that are not whole blocks of 32 fall back to F16, as
    llama.cpp's converter does. Per-module scales that the one alpha cannot express are folded into B (float32,
    rounded once)."""
    gguf = _gguf()
    arch = adapter.metadata.get(ARCH_KEY)
    if adapter.format != FORMAT or arch is None:
        raise SurgeryError("writing GGUF needs the base model's architecture: give --base MODEL (its folder, "
                           "config.json's folder or a GGUF model)")
    if dtype is not None and dtype not in TYPES:
        raise SurgeryError(f"GGUF adapter tensor type {dtype!r}: choose one of {', '.join(TYPES)}")
    for name, m in adapter.modules.items():
        _check_lora(name, m, "has no llama.cpp form", name == "token_embd")
    alpha = _alpha(adapter.modules)
    stored = adapter.metadata.get(TYPE_KEY)  # Q8_0 factors read as float32 are written back as Q8_0
    tensors = []
    for name, m in adapter.modules.items():
        fold = m.scale * m.rank / alpha if alpha else m.scale
        kind = dtype or ("q8_0" if stored == "q8_0" and m.dtype == torch.float32 else
                         next((k for k, d in FLOATS.items() if d == m.dtype), "f32"))
        A, B = _layout(m)
        for part, t, scale in (("lora_a", A, 1.0), ("lora_b", B, fold)):
            shape = tuple(int(s) for s in t.shape)
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16
            tensors.append(Planned(f"{name}.weight.{part}", shape, qtype, _maker(f"{name}.weight.{part}", t, scale,
                                                                                  qtype)))
    fields = [(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER, gguf.GGUFValueType.STRING, None),
              (gguf.Keys.Adapter.TYPE, "lora", gguf.GGUFValueType.STRING, None),
              (gguf.Keys.Adapter.LORA_ALPHA, float(alpha), gguf.GGUFValueType.FLOAT32, None),
              (WRITTEN_BY, __version__, gguf.GGUFValueType.STRING, None)]
    if tokens := adapter.config.get(ALORA):  # applied from its invocation tokens on, as PEFT applies it
        fields.append((gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in tokens], gguf.GGUFValueType.ARRAY,
                       gguf.GGUFValueType.UINT32))
    with atomic_output(out, is_dir=False) as tmp:
        write_file(tmp, arch, fields, tensors)


def _layout(m) -> tuple[Any, Any]:
    """A module's (lora_a, lora_b) as llama.cpp holds them: the token embeddings' A transposed (vocab, r); an
    expert tensor's stacked, (E, r, in) and (E, out, r)."""
    if m.kind == "embedding":
        return _transposed(m.A), m.B
    if m.kind == "experts":
        E, r = m.experts, m.rank
        return (_Derived(m.A, lambda x: x.reshape(E, r, -1), (E, r, m.in_features)),
                _Derived(m.B, lambda x: x.reshape(x.shape[0], r, E).permute(2, 0, 1).contiguous(),
                         (E, m.out_features, r)))
    return m.A, m.B


def _maker(name: str, t, scale: float, qtype) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        if isinstance(t, GgufRef) and scale == 1.0 and t.qtype == qtype:
            return t.raw()  # the file's own bytes: nothing to round
        x = materialize(t)
        if scale != 1.0:
            x = x.to(torch.float32) * scale
        if (kind := type_name(qtype)) in FLOATS:
            x = finite(name, x.to(FLOATS[kind]))
        else:  # Q8_0's float16 block scales (a block's largest |x| / 127) must stay finite
            finite(name, (x.abs().amax().float() / 127).half())
        return encode(x, qtype)
    return make
