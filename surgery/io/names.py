"""Adapter module names resolved against a base model's key list (formats.md §3; docs/formats.md "Names").

`place(adapter, targets)` gives every module the base module path it updates, per component of a diffusers
pipeline. A module is first routed to its component by its prefix (kohya `lora_unet_`, `lora_te1_`, …; diffusers
`unet.`, `transformer.`, `text_encoder_2.`, …), then matched in that component by, in order:
1. its own path (PEFT/diffusers dotted paths, with or without extra leading parts; kohya's underscore names against
   the base's names with dots made underscores — '.'→'_' is lossy, so the base decides);
2. SD/SDXL's original (SGM) block names ↔ diffusers' block names, both sides mapped to diffusers' spelling as
   diffusers' `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key` do (`layers_per_block` from the
   component's config.json);
3. Flux's original (BFL) names ↔ diffusers' names, the fused projections (`img_attn.qkv`, `txt_attn.qkv`,
   `single_blocks.N.linear1`) split into or fused from the separate ones exactly (surgery.fuse), the row split
   read from the base's shapes.
Modules that match nothing are returned with the reason, never dropped.
"""
from __future__ import annotations

import re
from pathlib import Path
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ..adapter import PEFT_PREFIX, Adapter
from ..errors import SurgeryError, listed
from .. import fuse
from . import experts, gguf_file, hub, jsonfile
from .loaded import how_loaded
from .checkpoint import Checkpoint, is_pipeline, open_checkpoint, open_pipeline
from .kohya import provenance

DENOISER = "denoiser"  # the pipeline's unet or transformer
DENOISERS = ("unet", "transformer", "prior")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# kohya / LyCORIS / ComfyUI name prefixes → the component they address (longest first)
KOHYA_ROUTES = (("lora_prior_unet_", "prior"), ("lora_unet_", DENOISER), ("lora_transformer_", DENOISER),
                ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_3"),
                ("lora_te_", "text_encoder"), ("lycoris_", None), ("lora_", None))
# ComfyUI's dotted prefixes (its "generic" LoRA keys: `diffusion_model.<key>`, `text_encoders.clip_l.transformer.…`)
COMFY_ROUTES = (("diffusion_model.", DENOISER), ("text_encoders.clip_l.transformer.", "text_encoder"),
                ("text_encoders.clip_g.transformer.", "text_encoder_2"),
                ("text_encoders.t5xxl.transformer.", "text_encoder_3"))
# where each component lives inside the original single-file checkpoints (SD 1/2, SDXL, ComfyUI Flux)
ORIGINAL_PREFIXES = {DENOISER: ("model.diffusion_model.",),
                     "text_encoder": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.",
                                      "cond_stage_model.model."),
                     "text_encoder_2": ("conditioner.embedders.1.model.",)}
_EMBEDDINGS = "embed_tokens|wte|word_embeddings|embed_in"  # a language model's input embedding, as models name it
TIED_EMBEDDING = re.compile(rf"(^|\.)({_EMBEDDINGS})\.weight$")  # the table a tied output head shares
VOCAB_TABLE = re.compile(rf"(^|\.)({_EMBEDDINGS}|lm_head|embed_out)\.weight$")  # every table with a row per token


def resized_table(name: str, shape: Sequence[int], base_shape: Sequence[int]) -> bool:
    """A vocabulary table (input embedding, output head) whose rows differ from the base's: tokens were added
    (`resize_token_embeddings`), the row width is the same."""
    return bool(VOCAB_TABLE.search(name)) and len(shape) == len(base_shape) == 2 and shape[0] != base_shape[0] \
        and shape[1] == base_shape[1]


def route(name: str, kohya: bool) -> tuple[str | None, str]:
    """(component or None, the name inside it): `lora_te2_text_model_…` → ('text_encoder_2', 'text_model_…'),
    `unet.down_blocks.0…` → ('denoiser', 'down_blocks.0…'), `base_model.model.x` → (None, 'x')."""
    if kohya:
        for prefix, component in KOHYA_ROUTES:
            if name.startswith(prefix):
                return component, name[len(prefix):]
        return None, name
    name = name.removeprefix(PEFT_PREFIX)
    for prefix, component in COMFY_ROUTES:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    head, _, rest = name.partition(".")
    if rest and head in DENOISERS[:2]:
        return DENOISER, rest
    if rest and head in TEXT_ENCODERS + DENOISERS[2:]:
        return head, rest
    return None, name


def is_kohya(adapter: Adapter) -> bool:
    """kohya's underscore names: a kohya file, or PEFT-style keys on them (`lora_unet_…_proj_in.lora_A.weight`, which
    ComfyUI reads too)."""
    return adapter.format == "kohya" or adapter.config.get("name_style") == "kohya" or bool(adapter.modules) and all(
        "." not in n and n.startswith(("lora_", "lycoris_")) for n in adapter.modules)


# ---------------------------------------------------------------- SGM (original SD/SDXL UNet) block names

_RESNET = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"),
           ("skip_connection", "conv_shortcut"))
_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
        "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
        "input_blocks_0_0": "conv_in", "out_2": "conv_out", "out_0": "conv_norm_out"}
_SGM = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.*))?$")
_MIDDLE = re.compile(r"^middle_block_(\d+)(?:_(.*))?$")


def _resnet(rest: str) -> str:
    for old, new in _RESNET:
        if rest == old or rest.startswith(old + "_"):
            return new + rest[len(old):]
    return rest


def sgm_to_diffusers(u: str, layers_per_block: int = 2) -> str:
    """An underscored SGM UNet name in diffusers' spelling (underscored): `input_blocks_4_1_proj_in` →
    `down_blocks_1_attentions_0_proj_in`, `middle_block_2_in_layers_2` → `mid_block_resnets_1_conv1`, as diffusers'
    `_maybe_map_sgm_blocks_to_diffusers`; names of other layouts come back unchanged."""
    for top, new in _TOP.items():
        if u == top or u.startswith(top + "_"):
            return new + u[len(top):]
    if m := _MIDDLE.match(u):
        head = ("mid_block_resnets_0", "mid_block_attentions_0", "mid_block_resnets_1")[min(int(m[1]), 2)]
        rest = _resnet(m[2] or "")
        return f"{head}_{rest}" if rest else head
    m = _SGM.match(u)
    if not m:
        return u
    kind, i, j, rest = m[1], int(m[2]), int(m[3]), _resnet(m[4] or "")
    n = layers_per_block + 1
    if kind == "input_blocks":
        if rest.startswith("op"):
            head, rest = f"down_blocks_{(i - 1) // n}_downsamplers_0", "conv" + rest[2:]
        else:
            head = f"down_blocks_{(i - 1) // n}_{('resnets', 'attentions')[min(j, 1)]}_{(i - 1) % n}"
    elif rest == "conv" or j == 2:  # an output block's upsampler
        head = f"up_blocks_{i // n}_upsamplers_0"
    else:
        head = f"up_blocks_{i // n}_{('resnets', 'attentions')[min(j, 1)]}_{i % n}"
    return f"{head}_{rest}" if rest else head


# ---------------------------------------------------------------- fused original layouts ↔ diffusers names: Flux (BFL)

def _thirds(out, inp):
    return [out // 3] * 3


def _linear1(out, inp):  # q, k, v of the hidden size, then the MLP input
    return [inp, inp, inp, out - 3 * inp]


def _halves(out, inp):
    return [out // 2] * 2


def _one(out, inp):
    return [out]


_D = "transformer_blocks.{n}."
_S = "single_transformer_blocks.{n}."
# (BFL path, its row blocks from its (out, in), [(diffusers path, the BFL row blocks it holds, in order)])
FLUX: tuple[tuple[str, Callable, tuple[tuple[str, tuple[int, ...]], ...]], ...] = (
    ("double_blocks.{n}.img_attn.qkv", _thirds, ((_D + "attn.to_q", (0,)), (_D + "attn.to_k", (1,)),
                                                 (_D + "attn.to_v", (2,)))),
    ("double_blocks.{n}.txt_attn.qkv", _thirds, ((_D + "attn.add_q_proj", (0,)), (_D + "attn.add_k_proj", (1,)),
                                                 (_D + "attn.add_v_proj", (2,)))),
    ("double_blocks.{n}.img_attn.proj", _one, ((_D + "attn.to_out.0", (0,)),)),
    ("double_blocks.{n}.txt_attn.proj", _one, ((_D + "attn.to_add_out", (0,)),)),
    ("double_blocks.{n}.img_mlp.0", _one, ((_D + "ff.net.0.proj", (0,)),)),
    ("double_blocks.{n}.img_mlp.2", _one, ((_D + "ff.net.2", (0,)),)),
    ("double_blocks.{n}.txt_mlp.0", _one, ((_D + "ff_context.net.0.proj", (0,)),)),
    ("double_blocks.{n}.txt_mlp.2", _one, ((_D + "ff_context.net.2", (0,)),)),
    ("double_blocks.{n}.img_mod.lin", _one, ((_D + "norm1.linear", (0,)),)),
    ("double_blocks.{n}.txt_mod.lin", _one, ((_D + "norm1_context.linear", (0,)),)),
    ("single_blocks.{n}.linear1", _linear1, ((_S + "attn.to_q", (0,)), (_S + "attn.to_k", (1,)),
                                             (_S + "attn.to_v", (2,)), (_S + "proj_mlp", (3,)))),
    ("single_blocks.{n}.linear2", _one, ((_S + "proj_out", (0,)),)),
    ("single_blocks.{n}.modulation.lin", _one, ((_S + "norm.linear", (0,)),)),
    ("img_in", _one, (("x_embedder", (0,)),)),
    ("txt_in", _one, (("context_embedder", (0,)),)),
    ("time_in.in_layer", _one, (("time_text_embed.timestep_embedder.linear_1", (0,)),)),
    ("time_in.out_layer", _one, (("time_text_embed.timestep_embedder.linear_2", (0,)),)),
    ("vector_in.in_layer", _one, (("time_text_embed.text_embedder.linear_1", (0,)),)),
    ("vector_in.out_layer", _one, (("time_text_embed.text_embedder.linear_2", (0,)),)),
    ("guidance_in.in_layer", _one, (("time_text_embed.guidance_embedder.linear_1", (0,)),)),
    ("guidance_in.out_layer", _one, (("time_text_embed.guidance_embedder.linear_2", (0,)),)),
    ("final_layer.linear", _one, (("proj_out", (0,)),)),
    # BFL's final modulation is (shift, scale); diffusers' norm_out.linear (scale, shift)
    ("final_layer.adaLN_modulation.1", _halves, (("norm_out.linear", (1, 0)),)),
)


def _pattern(path: str) -> re.Pattern:
    """A path template as a regex over underscored names (dots and underscores alike)."""
    return re.compile("^" + re.escape(path.replace(".", "_")).replace(r"\{n\}", r"(?P<n>\d+)") + "$")


# OpenCLIP text encoders inside the original SD 2.x / SDXL single files (`cond_stage_model.model.`,
# `conditioner.embedders.1.model.`) ↔ transformers' CLIP (diffusers' `convert_open_clip_checkpoint`): q, k, v are
# thirds of nn.MultiheadAttention's `attn.in_proj_weight`
OPEN_CLIP = tuple(
    (f"transformer.resblocks.{{n}}.{o}", sizes, tuple((t + h, k) for h, k in hf))
    for t in ("text_model.encoder.layers.{n}.", "encoder.layers.{n}.")  # transformers 4 / 5 CLIPTextModel paths
    for o, sizes, hf in (("attn.in_proj", _thirds, (("self_attn.q_proj", (0,)), ("self_attn.k_proj", (1,)),
                                                     ("self_attn.v_proj", (2,)))),
                         ("attn.out_proj", _one, (("self_attn.out_proj", (0,)),)),
                         ("mlp.c_fc", _one, (("mlp.fc1", (0,)),)), ("mlp.c_proj", _one, (("mlp.fc2", (0,)),))))
# Wan 2.x original names (Wan-AI, musubi-tuner `lora_unet_blocks_0_self_attn_q`, ComfyUI) ↔ diffusers'
# WanTransformer3DModel, renames only (diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`)
_W = "blocks.{n}."
WAN = tuple((o, _one, ((d, (0,)),)) for o, d in (
    *((f"{_W}{a}.{x}", f"{_W}{b}.{y}") for a, b in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for x, y in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    (_W + "cross_attn.k_img", _W + "attn2.add_k_proj"), (_W + "cross_attn.v_img", _W + "attn2.add_v_proj"),
    (_W + "ffn.0", _W + "ffn.net.0.proj"), (_W + "ffn.2", _W + "ffn.net.2"), ("head.head", "proj_out"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2")))
# (original-layout path, row blocks, parts) of every table: the original layouts and diffusers' / transformers' own
LAYOUTS = FLUX + OPEN_CLIP + WAN
_FROM_FUSED = [(_pattern(b), b, sizes, parts) for b, sizes, parts in LAYOUTS]
_FROM_SEPARATE = [(_pattern(d), b, sizes, parts, k) for b, sizes, parts in LAYOUTS for k, (d, _) in enumerate(parts)]
_OPEN_CLIP_PATHS = [_pattern(b) for b, *_ in OPEN_CLIP]


def weight_key(tensors: Mapping, path: str) -> str:
    """The base tensor a module path's ΔW goes to: `path.weight`, or nn.MultiheadAttention's `path_weight`
    (`attn.in_proj_weight`, OpenCLIP's fused q/k/v) where that is what the base holds."""
    key = f"{path}.weight"
    return key if key in tensors or f"{path}_weight" not in tensors else f"{path}_weight"


# ---------------------------------------------------------------- one component's names


class _Names:
    """The module paths of one checkpoint (or of the part under one original-layout prefix), by spelling."""

    def __init__(self, ck: Checkpoint, prefix: str = ""):
        self.ck, self.prefix = ck, prefix
        self.shapes = {k[len(prefix): -len(".weight")]: tuple(s.shape) for k, s in ck.tensors.items()
                       if k.startswith(prefix) and k.endswith((".weight", "attn.in_proj_weight"))}
        self.dotted = {p: [p] for p in self.shapes}
        self.underscored = defaultdict(list)
        for p in self.shapes:
            self.underscored[p.replace(".", "_")].append(p)
        self._canonical = None

    def find(self, local: str, kohya: bool, drop: bool = False) -> list[str]:
        """Paths for a name (kohya's underscored or a dotted path): exact; the base's path with extra leading parts;
        the name with extra leading parts — for kohya names only when `drop` (the last resort: kohya's
        `text_model_encoder_…` on a CLIP saved without `text_model.`), as underscores make it loose."""
        sep, table = ("_", self.underscored) if kohya else (".", self.dotted)
        if local in table:
            return table[local]
        found = [p for u, ps in table.items() if u.endswith(sep + local) for p in ps]
        if found or (kohya and not drop):
            return found
        parts = local.split(sep)
        for i in range(1, len(parts)):
            if (u := sep.join(parts[i:])) in table:
                return table[u]
        return []

    def canonical(self, u: str) -> list[str]:
        """Paths whose SGM-or-diffusers name, in diffusers' spelling, is `u`'s."""
        if self._canonical is None:
            lpb = jsonfile.field(self.ck.config(), "layers_per_block", "positive int", self.ck.config_path, 2) \
                if self.ck.is_dir else 2
            self._lpb = lpb
            self._canonical = defaultdict(list)
            for uu, ps in self.underscored.items():
                self._canonical[sgm_to_diffusers(uu, lpb)].extend(ps)
        return self._canonical.get(sgm_to_diffusers(u, self._lpb), [])

    def full(self, path: str) -> str:
        return self.prefix + path

    def renamed(self, local: str) -> list[str]:
        """The on-disk path of a module the loaded model holds under another name (surgery.io.loaded)."""
        if not hasattr(self, "_renamed"):
            self._renamed = {} if self.prefix else how_loaded(self.ck).renamed
        return [self._renamed[local]] if local in self._renamed else []


@dataclass
class Placement:
    """modules: (component, base module path) → module; origin: the same key → the adapter names it came from;
    missing: adapter name → why it has no place; notes: what was transformed."""

    modules: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)  # the same key → the path inside its component (no file prefix)
    absent: dict = field(default_factory=dict)  # adapter name → the component it is for, which the base lacks
    missing: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def component_name(ck: Checkpoint) -> str | None:
    """A component folder's role from its name (unet/, text_encoder_2/, …) or config class; None if unknown."""
    folder = (ck.root if ck.is_dir else ck.root.parent).name
    if folder in DENOISERS + TEXT_ENCODERS:
        return folder
    cls = jsonfile.field(ck.config(), "_class_name", "str", ck.config_path, "") if ck.is_dir else ""
    return "unet" if "UNet" in cls else "transformer" if cls.endswith("Transformer2DModel") else None


def _targets_for(component: str | None, targets: Sequence[tuple[str | None, Checkpoint]], cache: dict):
    """The (component, names) to search for a module routed to `component`: the matching components of a
    pipeline; in an original single file, the component's own part (`model.diffusion_model.`, …) if it has one."""
    out = []
    for name, ck in targets:
        if name is not None:
            if component is None or component == name or (component == DENOISER and name in DENOISERS[:2]):
                out.append((name, _names(ck, "", cache)))
            continue
        groups = cache.setdefault(("groups", id(ck)), _original_parts(ck))
        if component in groups:
            out.append((component, _names(ck, groups[component], cache)))
        elif not groups or component is None:
            out.append((component, _names(ck, "", cache)))
    if not out and component == "text_encoder_3":  # kohya's `lora_te3_` is the T5: Flux's text_encoder_2
        out = [(name, _names(ck, "", cache)) for name, ck in targets if _is_t5(name, ck)]
    return out


def _is_t5(component: str | None, ck: Checkpoint) -> bool:
    """A T5 text encoder (kohya and ComfyUI call it `lora_te3_` whatever its folder: Flux's text_encoder_2)."""
    return component in TEXT_ENCODERS and "T5EncoderModel" in architectures(ck)


def _is_clip(ck: Checkpoint) -> bool:
    """A transformers CLIP text encoder (transformers 5 saves it without the `text_model.` of kohya's names)."""
    return any(a.startswith("CLIPText") for a in architectures(ck))


def architectures(ck: Checkpoint) -> list[str]:
    """transformers' `architectures` of a component's config.json ([] without one)."""
    return jsonfile.field(ck.config(), "architectures", "str list", ck.config_path, [])


def _original_parts(ck: Checkpoint) -> dict[str, str]:
    """{component: key prefix} of an original-layout single file (SD 1/2, SDXL, ComfyUI); {} for other layouts."""
    heads = {k.split(".", 1)[0] for k in ck.tensors}
    if not heads & {"model", "cond_stage_model", "conditioner"}:
        return {}
    found = {}
    for component, prefixes in ORIGINAL_PREFIXES.items():
        for p in prefixes:
            if any(k.startswith(p) for k in ck.tensors):
                found[component] = p
                break
    return found


def _names(ck: Checkpoint, prefix: str, cache: dict) -> _Names:
    if (id(ck), prefix) not in cache:
        cache[(id(ck), prefix)] = _Names(ck, prefix)
    return cache[(id(ck), prefix)]


def place(adapter: Adapter, targets: Sequence[tuple[str | None, Checkpoint]]) -> Placement:
    """Every module of `adapter` at the base module path(s) it updates; `targets` are (component name or None,
    checkpoint) — one for a single base, one per component for a pipeline."""
    kohya, out, cache, renamed = is_kohya(adapter), Placement(), {}, []
    fused: dict = defaultdict(dict)  # (component, names, BFL path) → {part index: (name, module)}
    components = {c for c, _ in targets if c}
    for name, m in adapter.modules.items():
        component, local = route(name, kohya)
        if component is None and not kohya and (head := local.split(".", 1))[0] in components and len(head) > 1:
            component, local = head  # a component the pipeline names beyond the usual ones (Wan 2.2's transformer_2)
        found = _targets_for(component, targets, cache)
        if not found:
            have = ", ".join(c for c, _ in targets if c) or "none"
            out.missing[name] = f"a {component} module, and this base has no {component} (its components: {have})"
            out.absent[name] = component
            continue
        hits = [(c, n, p) for c, n in found for p in n.find(local, kohya)]
        if not hits:
            u = local.replace(".", "_")
            hits = [(c, n, p) for c, n in found for p in n.canonical(u)]
        if len(hits) > 1:
            shown = " / ".join(sorted(f"{c}/{n.full(p)}" if c else n.full(p) for c, n, p in hits)[:3])
            raise SurgeryError(f"module {name} matches several base tensors ({shown})")
        if hits:
            c, n, p = hits[0]
            _put(out, c, n, p, m, name)
            continue
        if _other_layout(out, fused, name, m, local, found):
            continue
        if not kohya and len(hits := [(c, n, p) for c, n in found for p in n.renamed(local)]) == 1:
            _put(out, *hits[0], m, name)
            renamed.append((local, hits[0][1].full(hits[0][2])))
            continue
        hits = [(c, n, p) for c, n in found for p in n.find(local, kohya, drop=True)] if kohya else []
        if len(hits) == 1:
            _put(out, *hits[0], m, name)
        else:
            out.missing[name] = "no base tensor of that name" if not hits else \
                f"matches several base tensors ({' / '.join(sorted(n.full(p) for _, n, p in hits)[:3])})"
    for (c, n, path, sizes, blocks), parts in fused.items():
        _fuse(out, c, n, path, sizes, blocks, parts)
    if renamed:
        out.notes.append(f"{len(renamed)} module(s) named as transformers loads the base placed on the tensors it "
                         f"stores them as ({renamed[0][0]} is {renamed[0][1]})")
    return out


def _put(out: Placement, c, n: _Names, path: str, m, name: str) -> tuple:
    key = (c, n.full(path))
    if key in out.modules:
        raise SurgeryError(f"modules {out.origin[key][0]} and {name} both update base tensor {key[1]}.weight")
    out.modules[key], out.origin[key], out.local[key] = m, [name], path
    return key


def _other_layout(out: Placement, fused, name: str, m, local: str, found) -> bool:
    """Place a module across an original ↔ diffusers layout (Flux BFL, OpenCLIP): split a fused one, or collect a
    part for fusing."""
    u = local.replace(".", "_")
    for c, n in found:
        for pattern, bfl, sizes, parts in _FROM_FUSED:
            if not (g := pattern.match(u)):
                continue
            paths = [d.format(n=g.groupdict().get("n")) for d, _ in parts]
            if not all(p in n.shapes for p in paths):
                continue
            blocks = [n.shapes[p][0] // len(k) for p, (_, k) in zip(paths, parts)]
            size = {k[i]: blocks[j] for j, (_, k) in enumerate(parts) for i in range(len(k))}
            starts = [sum(size[i] for i in range(b)) for b in range(len(size))]
            if sum(size.values()) != m.out_features:
                raise SurgeryError(f"module {name}: its ΔW has {m.out_features} rows but base tensors "
                                   f"{', '.join(paths)} have {sum(size.values())} together (a LoRA for another model?)")
            for p, (_, k) in zip(paths, parts):
                rows = torch.cat([torch.arange(starts[i], starts[i] + size[i]) for i in k])
                _put(out, c, n, p, m if len(paths) == 1 and k == (0,) else _rows(name, m, rows), name)
            if len(paths) > 1 or parts[0][1] != (0,):
                out.notes.append(f"{name}: split exactly into {', '.join(paths)}")
            return True
        for pattern, bfl, sizes, parts, k in _FROM_SEPARATE:
            if not (g := pattern.match(u)):
                continue
            path = bfl.format(n=g.groupdict().get("n"))
            if path not in n.shapes:
                continue
            if len(parts) == 1 and parts[0][1] == (0,):
                _put(out, c, n, path, m, name)
            else:
                fused[(c, n, path, sizes, parts)][k] = (name, m)
            return True
    return False


def _rows(name, m, rows):
    try:
        return fuse.take_rows(m, rows)
    except ValueError as e:
        raise SurgeryError(f"module {name}: {e}") from None


def _fuse(out: Placement, c, n: _Names, path: str, sizes, blocks, parts: Mapping[int, tuple[str, object]]) -> None:
    """The separate projections' modules as one LoRA of the fused weight (rows of absent ones stay zero)."""
    out_f, in_f = n.shapes[path][0], n.shapes[path][1]
    size = sizes(out_f, in_f)
    starts = [sum(size[:i]) for i in range(len(size))]
    stack = []
    for k, (name, m) in sorted(parts.items()):
        rows = torch.cat([torch.arange(starts[i], starts[i] + size[i]) for i in blocks[k][1]])
        if m.out_features != len(rows) or m.in_features != in_f:
            raise SurgeryError(f"module {name}: ΔW {m.out_features}×{m.in_features} does not fit rows of base tensor "
                               f"{weight_key(n.ck.tensors, n.full(path))} {list(n.shapes[path])} (a LoRA for another "
                               "model?)")
        stack.append((m, rows))
    names = [name for _, (name, _) in sorted(parts.items())]
    try:
        module = fuse.stack_rows(stack, out_f)
    except ValueError as e:
        raise SurgeryError(f"modules {', '.join(names)}: {e}") from None
    out.origin[_put(out, c, n, path, module, names[0])] = names
    out.notes.append(f"{', '.join(names)}: fused exactly into {n.full(path)} (rank {module.rank})")


def base_targets(base: str | Path) -> list[tuple[str | None, Checkpoint]]:
    """(component, checkpoint) pairs of a base: one per component of a pipeline, else the one checkpoint."""
    base = hub.resolve(base)
    if is_pipeline(base):
        return list(open_pipeline(base).components.items())
    ck = open_checkpoint(base)
    return [(component_name(ck), ck)]


def missing_error(where, missing: Mapping[str, str]) -> SurgeryError:
    """One line naming the modules that have no place in the base, grouped by why."""
    by_reason: dict[str, list[str]] = {}
    for name, why in missing.items():
        by_reason.setdefault(why, []).append(name)
    parts = [f"{listed(names)} ({why})" for why, names in by_reason.items()]
    return SurgeryError(f"{where}: adapter module(s) without a base tensor: {'; '.join(parts)} "
                        "(merge and convert skip them with --allow-missing)")


def kohya_prefix(component: str | None, two_text_encoders: bool) -> str:
    """kohya's name prefix for a component: SD 1/2 `lora_te_`, SDXL `lora_te1_`/`lora_te2_`; `lora_unet_` for a UNet
    and for the original single files' denoiser (Flux BFL names, as sd-scripts writes them); `lora_transformer_`
    for a diffusers transformer's names (OneTrainer's, which ComfyUI and diffusers read)."""
    if component in (DENOISER, "unet"):
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if two_text_encoders else "lora_te_"
    if component in TEXT_ENCODERS:
        return f"lora_te{component[-1]}_"
    return {"transformer": "lora_transformer_", "prior": "lora_prior_unet_", None: "lora_"}.get(
        component, f"lora_{component}_")


def on_base(adapter: Adapter, base, fmt: str, allow_missing: bool = False, expert_modules: bool = False) -> Adapter:
    """The adapter with every module named after the base tensor it updates, in `fmt`'s naming: diffusers
    `<component>.<path>`, PEFT `base_model.model.<path>` (one component), kohya `lora_unet_<path with _>`,
    llama.cpp's GGUF tensor names (the base a model folder, its config.json's folder or a GGUF model), …
    MoE experts (PEFT only): expert parameters and per-expert modules in the form PEFT loads on the model with
    transformers 5 (`target_parameters`), or with `expert_modules` per-expert modules (surgery.io.experts)."""
    if fmt not in ("peft", "peft-file", "kohya", "diffusers", gguf_file.FORMAT):  # (was a KeyError inside)
        raise SurgeryError(f"names in format {fmt!r}: use peft, peft-file, kohya, diffusers or gguf")
    experts.check_format(adapter, fmt)
    if fmt in ("peft", "peft-file") and not gguf_file.is_gguf(base) and (
            expert_modules or any(".experts." in n for n in adapter.modules)):
        targets = base_targets(base)
        if len(targets) == 1 and targets[0][0] is None:
            adapter, placed = experts.on_layout(adapter, targets[0][1], split=expert_modules)
            out = on_base(adapter, base, fmt, allow_missing) if adapter.modules else replace(adapter, format=fmt)
            config = {k: v for k, v in out.config.items() if k not in ("target_modules", "target_parameters")}
            return out.with_modules({**out.modules, **placed}, config=config)  # the writer targets them exactly
    if fmt == gguf_file.FORMAT:
        if adapter.format not in ("peft", "peft-file", fmt):
            adapter = on_base(adapter, base, "peft", allow_missing)
        return gguf_file.to_gguf(adapter, base, allow_missing)
    if adapter.format == gguf_file.FORMAT:
        adapter = gguf_file.from_gguf(adapter, base)
        return replace(adapter, format=fmt) if fmt in ("peft", "peft-file") else on_base(adapter, base, fmt)
    targets = base_targets(base)
    if fmt == "diffusers" and any(c is None for c, _ in targets):
        raise SurgeryError(f"{base}: is not a diffusers model folder, and diffusers names are a diffusers model's "
                           "module paths; give the pipeline or a component folder (unet/, transformer/, …)")
    p = place(adapter, targets)
    if p.missing and not allow_missing:
        raise missing_error(adapter.source or base, p.missing)
    if open_clip := sorted(path for path in p.local.values()
                           if any(r.match(path.replace(".", "_")) for r in _OPEN_CLIP_PATHS)):
        raise SurgeryError(f"{base}: {open_clip[0]} is OpenCLIP's layout, which no adapter names (they name "
                           "transformers' CLIP modules); give the diffusers pipeline as --base")
    components = {c for c, _ in p.modules}
    if fmt in ("peft", "peft-file") and len(components) > 1:
        raise SurgeryError(f"a PEFT adapter is for one model, and this one updates {', '.join(sorted(map(str, components)))}"
                           " of the pipeline; write --to diffusers, or give one component folder as --base")
    two = any(c == "text_encoder_2" for c, _ in targets) or "text_encoder_2" in components
    t5 = {c for c, ck in targets if _is_t5(c, ck)}
    clip = {c for c, ck in targets if c in TEXT_ENCODERS and _is_clip(ck)}
    # PEFT names a module as the loaded model does (surgery.io.loaded), which may not be how the base stores it
    loaded = {c: how_loaded(ck) for c, ck in targets} if fmt in ("peft", "peft-file") else {}
    modules = {}
    for key, m in p.modules.items():
        c, path = key[0], p.local[key]
        if fmt == "diffusers":
            name = f"{c}.{path}"
        elif fmt == "kohya":
            if c in clip and not path.startswith("text_model."):
                path = "text_model." + path  # kohya / ComfyUI name CLIP's modules as transformers 4 did
            name = ("lora_te3_" if c in t5 else kohya_prefix(c, two)) + path.replace(".", "_")
        else:
            name = PEFT_PREFIX + loaded[c].loaded_name(path)
        modules[name] = m
    configs = component_configs(adapter)
    if fmt == "diffusers":
        config = {f"{c}.{k}": v for c in {n.split(".", 1)[0] for n in modules} for k, v in configs.get(c, {}).items()}
    elif fmt == "kohya" or adapter.format == "kohya":
        config = {}
    else:
        config = next((configs[c] for c in components if c in configs), next(iter(configs.values()), {}))
    notes = tuple(adapter.notes) + tuple(p.notes) + tuple(
        f"{n}: skipped ({why})" for n, why in p.missing.items())
    metadata = adapter.metadata if fmt == adapter.format else {}
    if fmt == "kohya":
        metadata = {**metadata, **provenance(adapter.config)}
    return Adapter(modules=modules, format=fmt, passthrough={}, config=config, metadata=metadata,
                   source=adapter.source, notes=notes)


def split_config(config: Mapping[str, Any]) -> dict[str, dict]:
    """{component: its config} from a prefixed config (`unet.r` → {'unet': {'r': …}})."""
    out: dict[str, dict] = {}
    for k, v in config.items():
        c, _, key = k.partition(".")
        out.setdefault(c, {})[key] = v
    return out


def component_configs(adapter: Adapter) -> dict[str, dict]:
    """Each component's starting config: a diffusers adapter's own; a PEFT one's placement-free settings for all."""
    if adapter.format == "diffusers":
        return split_config(adapter.config)
    keep = {k: v for k, v in adapter.config.items()
            if k not in ("target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                         "modules_to_save", "name_style", "base_model_name_or_path")}
    return {c: dict(keep) for c in DENOISERS + TEXT_ENCODERS}
