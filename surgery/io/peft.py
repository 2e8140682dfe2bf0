"""PEFT LoRA: a directory (`adapter_model.safetensors` + `adapter_config.json`) or one PEFT-keyed file.

Keys (formats.md §1.2): `<m>.lora_A.weight`, `<m>.lora_B.weight`, `<m>.lora_B.bias`, `<m>.lora_embedding_A/B`,
`<m>.lora_magnitude_vector`; an adapter name left inside (`lora_A.default.weight`) is accepted and dropped on write.
Scale per module: `alpha / r` (or `alpha / √r` with rsLoRA) resolved through `rank_pattern` / `alpha_pattern`
exactly as PEFT's `get_pattern_key` does; writers emit a paired entry for every module that differs from the
globals, and check that PEFT's resolution gives every module its own rank back.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..adapter import PEFT_PREFIX, Adapter, ExpertsModule, LoraModule, fold_scale, materialize
from ..errors import SurgeryError
from ..version import __version__
from . import hub, jsonfile
from .modules import KEY_PREFIX, floating, group_keys, make_module, make_structured, stated_rank
from .safetensors_file import WRITTEN_BY, atomic_output, save_tensors, tensor_refs

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = PEFT_PREFIX
METADATA_CONFIG = "lora_adapter_metadata"  # diffusers: the LoraConfig as JSON inside the file

_ROLE = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
_KEY = re.compile(
    r"^(?P<m>.+?)\.(?:"
    r"(?P<lin>lora_A|lora_B)(?:\.[^.]+)?\.(?P<leaf>weight|bias)"
    r"|(?P<emb>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?"
    r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?"
    r")\Z", re.DOTALL  # any character in a name: one a broken file holds is refused by name, not passed on
)


_STRUCTURED = re.compile(r"^(?P<m>.+?)\.(?P<role>hada_(?:w[12]_[ab]|t[12])|lokr_(?:w[12](?:_[ab])?|t[12]))"
                         r"(?:\.[^.]+)?\Z", re.DOTALL)
TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}  # peft_type → module algorithm
ALPHA_KEY = {"lora": "lora_alpha", "loha": "alpha", "lokr": "alpha"}  # the config's name for alpha


def parse_structured(key: str):
    """`…q_proj.hada_w1_a` → ('…q_proj', 'w1_a', 'linear') for PEFT LoHa / LoKr keys."""
    m = _STRUCTURED.match(key)
    return (m["m"], m["role"].split("_", 1)[1], "linear") if m else None


def key_algo(key: str) -> str | None:
    """The algorithm a PEFT tensor key belongs to: lora, loha, lokr (None for others)."""
    if parse_key(key):
        return "lora"
    m = _STRUCTURED.match(key)
    return None if not m else "loha" if m["role"].startswith("hada_") else "lokr"


def parse_key(key: str):
    """`…q_proj.lora_A.default.weight` → ('…q_proj', 'A', 'linear'); None for keys that are not LoRA's."""
    m = _KEY.match(key)
    if not m:
        return None
    if m["lin"]:
        role = _ROLE[m["lin"]]
        if m["leaf"] == "bias":
            if role != "B":
                return None
            role = "bias"
        return m["m"], role, "linear"
    if m["emb"]:
        return m["m"], _ROLE[m["emb"]], "embedding"
    return m["m"], "magnitude", "linear"


def make_keys(name: str, module: LoraModule) -> dict[str, torch.Tensor]:
    """The on-disk tensors of one module (materialised)."""
    if module.algo in ("loha", "lokr"):
        prefix = KEY_PREFIX[module.algo]
        return {f"{name}.{prefix}{role}": materialize(t).contiguous() for role, t in module.tensors.items()}
    if module.algo != "lora":
        raise SurgeryError(f"module {name}: PEFT has no form for a {module.algo} module; write a kohya/LyCORIS file "
                           "or convert it with surgery convert --to lora")
    if module.kind == "experts":
        a, b = expert_keys(name, module)
        return {a: materialize(module.A), b: materialize(module.B)}
    if module.kind == "embedding":
        out = {f"{name}.lora_embedding_A": module.A, f"{name}.lora_embedding_B": module.B}
    else:
        out = {f"{name}.lora_A.weight": module.A, f"{name}.lora_B.weight": module.B}
    if module.bias is not None:
        out[f"{name}.lora_B.bias"] = module.bias
    out = {k: materialize(v) for k, v in out.items()}
    if module.magnitude is not None:
        out[f"{name}.lora_magnitude_vector"] = magnitude_tensor(name, module)
    return out


def magnitude_tensor(name: str, m) -> torch.Tensor:
    """A DoRA magnitude in PEFT's layout (formats.md §1.2): (out,) for linear and embedding layers, (1, out, 1, …)
    for convs. LyCORIS's per-input-column DoRA (`wd_on_out=False`) has no PEFT form."""
    if m.dora_axis != "out":
        raise SurgeryError(f"module {name}: its DoRA magnitude is per input column (LyCORIS wd_on_out=False), "
                           "which PEFT and diffusers cannot express; keep a kohya/LyCORIS file")
    mag = materialize(m.magnitude)
    return mag.reshape((1, -1) + (1,) * (len(m.A.shape) - 2) if m.kind == "conv" else (-1,)).contiguous()


def pattern_key(patterns, key: str):
    """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def config_key(name: str) -> str:
    """The name PEFT matches rank/alpha patterns against: the module path without `base_model.model.`."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def rank_alpha(config: Mapping[str, Any], name: str, alpha_key: str = "lora_alpha") -> tuple[int, float]:
    """(r, alpha) of module `name` as PEFT resolves them through rank_pattern / alpha_pattern."""
    key = config_key(name)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    p = pattern_key(rank_pattern, key)
    r = rank_pattern[p] if p is not None else config.get("r", 8)
    p = pattern_key(alpha_pattern, key)
    return int(r), float(alpha_pattern[p] if p is not None else config.get(alpha_key, 8))


def _scale_of(config: Mapping[str, Any], name: str, rank: int | None, where: str, alpha_key="lora_alpha") -> float:
    """alpha / r (alpha / √r with rsLoRA); `rank` from the tensors must be the configured r (None: unknown)."""
    r, alpha = rank_alpha(config, name, alpha_key)
    rank = r if rank is None else rank
    if int(r) != rank:
        raise SurgeryError(
            f"{where}: module {name} has rank {rank} in its tensors but the config gives r={r} "
            "(PEFT would refuse to load it); fix r / rank_pattern"
        )
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read(weights: Path, config: Mapping[str, Any] | None, fmt: str, where: str) -> Adapter:
    refs, metadata = tensor_refs(weights)
    modules, passthrough, config, notes = read_modules(refs, config, weights, where)
    return Adapter(modules=modules, format=fmt, passthrough=passthrough, config=config, metadata=metadata,
                   source=weights.parent if fmt == "peft" else weights, notes=tuple(notes))


def check_config(config: Mapping[str, Any], where) -> None:
    """Every config value surgery reads, of the type PEFT gives it (one line naming the file and key if not)."""
    ptype = jsonfile.field(config, "peft_type", "str", where, "LORA")
    alpha_key = ALPHA_KEY.get(TYPES.get(ptype), "lora_alpha")
    for key in ("r", alpha_key):  # PEFT's scale is alpha / r: a null one fails there
        if key in config and config[key] is None:
            raise SurgeryError(f"{where}: {key} is null; PEFT needs a number there (its scale is alpha / r)")
    jsonfile.field(config, "r", "positive int", where)
    jsonfile.field(config, alpha_key, "number", where)
    jsonfile.patterns(config, "rank_pattern", "positive int", where)
    jsonfile.patterns(config, "alpha_pattern", "number", where)
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "use_effective_conv2d"):
        jsonfile.field(config, key, "bool", where)
    jsonfile.field(config, "target_modules", "regex" if isinstance(config.get("target_modules"), str) else "str list",
                   where)  # a string is a regex PEFT matches whole module paths with
    jsonfile.field(config, "modules_to_save", "str list", where)
    init = config.get("init_lora_weights")
    if config.get("arrow_config"):
        raise SurgeryError(f"{where}: arrow_config: an Arrow router, which sends each token through the top-k of the "
                           "task LoRAs PEFT's create_arrow_model loads with it; squeeze, merge or combine those")
    if config.get("kasa_config"):
        raise SurgeryError(f"{where}: kasa_config: a KaSA adapter, whose B·diag(lora_diag)·A updates a base PEFT rewrites "
                           "when it loads it (each weight less its r smallest singular components); keep it a PEFT "
                           "adapter")
    if isinstance(init, str) and init.lower().startswith(REBUILT_BASE):
        raise SurgeryError(f"{where}: init_lora_weights {init!r}: PEFT rewrites the base weights when it loads this "
                           "adapter, so its factors update that rewritten base, not the model (vLLM and llama.cpp "
                           "read them as an update to the model); convert it to a plain LoRA with PEFT first "
                           "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")


# PEFT's inits that rewrite the base weights (peft/tuners/lora/layer.py, update_layer), which from_pretrained
# runs again: the base minus the initial factors (PiSSA, CorDA, OLoRA, LoRA-GA) or quantized (LoftQ)
REBUILT_BASE = ("pissa", "corda", "olora", "lora_ga", "loftq")

# PEFT LoRA variants whose extra per-module tensors serve training only (VeLoRA's projection of the compressed
# activations, MonteCLoRA's variational sampler): PEFT runs them in eval mode and merges them as the plain scale·B·A
_TRAINING_ONLY = {"velora_config": "lora_velora_embed", "monteclora_config": "lora_monteclora_sampler"}
_MODULE_TENSOR = re.compile(r"^(?P<m>.+?)\.(?P<what>lora_[A-Za-z_]+)(?:\.|\Z)", re.DOTALL)


def _training_only(parts, passthrough, config, weights: Path, where):
    """(passthrough, config, notes) without the training-only variants' tensors and config keys; any other
    `<module>.lora_*` tensor of a LoRA module belongs to a PEFT variant surgery does not know (KaSA's lora_diag, a
    future one), whose update is not scale·B·A: refused."""
    dropped = [v for v in _TRAINING_ONLY if (config or {}).get(v)]
    owned = {k: m["what"] for k in passthrough if (m := _MODULE_TENSOR.match(k)) and m["m"] in parts}
    for key, what in owned.items():
        if not any(what == _TRAINING_ONLY[v] for v in dropped):
            raise SurgeryError(f"{where}: tensor {key} ({what}) belongs to a PEFT LoRA variant surgery does not read "
                               "(its update is more than scale·B·A); keep it a PEFT adapter")
    if not dropped:
        return passthrough, config, []
    note = (f"{weights.name}: {', '.join(dropped)}: training-only state; read as the plain LoRA PEFT runs and merges, "
            "and written without it (set it again to train on with it)")
    return ({k: v for k, v in passthrough.items() if k not in owned}, {**config, **dict.fromkeys(dropped)}, [note])


def _block_diagonal(parts, kinds, config, weights: Path, where):
    """(parts, config, notes) with BD-LoRA's block-diagonal factors (PEFT `use_bdlora`) made dense: PEFT stores
    such a factor as its nblocks blocks stacked, A (r, in/nb) or B (out, r/nb), and merges
    torch.block_diag(*factor.chunk(nb)) — a plain LoRA factor of the same rank, written as one."""
    bd = config["use_bdlora"]
    nb = bd.get("nblocks") if isinstance(bd, dict) else None
    if not isinstance(nb, int) or isinstance(nb, bool) or nb < 1:
        raise SurgeryError(f"{where}: use_bdlora must be an object with a positive integer nblocks, got {bd!r}")
    patterns = {role: bd.get(f"target_modules_bd_{role.lower()}") or [] for role in ("A", "B")}
    parts = dict(parts)
    for name, roles in parts.items():
        key = config_key(name)  # PEFT: `pattern in target_name`, the module's path in the base model
        hit = [role for role, ps in patterns.items() if any(p in key for p in ps)]
        if kinds.get(name, "linear") != "linear" or not hit or hit[0] not in roles:
            continue
        if len(hit) > 1:
            raise SurgeryError(f"{where}: module {name} matches both target_modules_bd_a and target_modules_bd_b")
        t = roles[hit[0]]
        if len(t.shape) != 2 or t.shape[0] % nb:
            raise SurgeryError(f"{where}: module {name}: block-diagonal lora_{hit[0]} of shape {list(t.shape)} is not "
                               f"{nb} blocks stacked")
        parts[name] = {**roles, hit[0]: torch.block_diag(*materialize(t).chunk(nb, 0))}
    note = (f"{weights.name}: BD-LoRA (use_bdlora): its block-diagonal factors read as the dense ones PEFT merges, and "
            "written as a plain LoRA")
    return parts, {**config, "use_bdlora": None}, [note]


def read_modules(refs, config: Mapping[str, Any] | None, weights: Path, where: str):
    """(modules, passthrough, config, notes) of PEFT-keyed tensors under one config (None: scale 1, noted)."""
    if config is not None:
        check_config(config, where)
    ptype = (config or {}).get("peft_type", "LORA")
    if ptype not in TYPES:
        raise SurgeryError(f"{where}: peft_type {ptype!r} is not read by surgery (LORA, LOHA and LOKR are); for the "
                           "methods PEFT converts (VeRA, FourierFT, VB-LoRA, MiSS, …), peft.save_as_lora(out, "
                           "model, rank) writes the loaded model's adapter as a LoRA, which surgery reads")
    algo = TYPES[ptype]
    for key in refs:  # a config naming one algorithm over another's tensors means two adapters to two readers
        found = key_algo(key)
        if found is not None and found != algo:
            raise SurgeryError(f"{where}: peft_type {ptype} but tensor {key} is {found.upper()}'s; fix the config's "
                               "peft_type or the tensors")
    alphas = {k.removesuffix(".alpha"): ref for k, ref in refs.items() if k.endswith(".alpha")}
    refs = {k: ref for k, ref in refs.items() if not k.endswith(".alpha")}
    parts, kinds, passthrough = group_keys(refs, parse_key if algo == "lora" else parse_structured, weights)
    if not parts:
        what = "<module>.lora_A.weight" if algo == "lora" else f"<module>.{'hada_w1_a' if algo == 'loha' else 'lokr_w1'}"
        raise SurgeryError(f"{weights}: no {ptype} tensors found (expected keys like {what})")
    passthrough, config, notes = _training_only(parts, passthrough, config, weights, where)
    if alphas:
        _check_alpha_keys(alphas, parts, config, where)
        modules = {}
        for n in sorted(parts):
            m = make_module(n, parts[n], kinds.get(n, "linear"), 1.0, weights)
            modules[n] = replace(m, scale=_alpha_value(alphas[n], n, where) / m.rank)
        note = (f"{weights.name}: scales from its per-module .alpha keys (alpha / r, as diffusers and ComfyUI read "
                "them)")
        return modules, passthrough, updated_config(Adapter(modules=modules, format="peft")), [note]
    assumed = config is None
    if assumed:
        notes.append(f"{weights.name}: no adapter config found; assuming lora_alpha = r (scale 1) for every module")
        config = {}
    modules = {}
    if config.get("target_parameters"):
        if algo != "lora":
            raise SurgeryError(f"{where}: target_parameters with peft_type {ptype}: PEFT has them for LoRA only")
        modules, consumed = _expert_modules(parts, config, weights, where)
        parts = {n: roles for n, roles in parts.items() if n not in consumed}
    elif any(n.endswith(".base_layer") for n in parts):
        n = next(n for n in parts if n.endswith(".base_layer"))
        raise SurgeryError(f"{where}: module {n} is a nested LoRA (PEFT's target_parameters) but the config has no "
                           "target_parameters")
    if algo == "lora" and config.get("use_bdlora"):
        parts, config, more = _block_diagonal(parts, kinds, config, weights, where)
        notes += more
    for name in sorted(parts):
        if algo != "lora":
            modules[name] = _structured(name, algo, parts[name], config, weights, where)
            continue
        rank = parts[name]["A"].shape[0] if "A" in parts[name] else 0
        scale = 1.0 if assumed else _scale_of(config, name, rank, where)
        modules[name] = make_module(name, parts[name], kinds.get(name, "linear"), scale, weights)
    modules = dict(sorted(modules.items()))
    if not assumed:
        _check_dora(modules, config, where)
        if not config.get("lora_bias") and (biased := [n for n, m in modules.items() if m.bias is not None]):
            notes.append(f"{weights.name}: {biased[0]} and others carry lora_B.bias but the config has no lora_bias "
                         "(as mergekit writes them): PEFT would ignore them, surgery applies them")
    return modules, passthrough, config, notes


# parameter names of transformers' MoE experts modules in their registration order (gate_up_proj before down_proj
# in every `@use_experts_implementation` class of transformers 5; gpt-oss adds the biases after each), which is
# the order PEFT nests ParamWrappers in: the first registered is innermost
REGISTRATION = ("gate_proj", "up_proj", "gate_up_proj", "gate_up_proj_bias", "w1", "w3", "down_proj",
                "down_proj_bias", "w2")


def targets_parameter(path: str, targets) -> bool:
    """PEFT's match of a parameter path (`model.layers.0.mlp.experts.down_proj`) against `target_parameters`."""
    return any(path == t or path.endswith("." + t) for t in targets)


def targets_module(key: str, target_modules) -> bool:
    """PEFT's match of a module path against target_modules: a regex the whole path matches, else a name it is
    or ends with."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith("." + t) for t in target_modules or [])


def _owner(name: str) -> tuple[str, int]:
    """`…experts.base_layer.base_layer` → ('…experts', 2): the module and how deep its wrapper is nested."""
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name[: -len(".base_layer")], depth + 1
    return name, depth


def nesting_order(owner: str, names, where) -> tuple[str, ...]:
    """The targeted parameters of one module in registration order (PEFT's nesting order)."""
    names = list(dict.fromkeys(names))
    if len(names) > 1 and any(n not in REGISTRATION for n in names):
        raise SurgeryError(f"{where}: module {owner} has several targeted parameters ({', '.join(names)}) whose "
                           "nesting order PEFT takes from the model's code, unknown to surgery for these names")
    return tuple(sorted(names, key=lambda n: REGISTRATION.index(n) if n in REGISTRATION else 0))


def _expert_modules(parts, config, weights: Path, where) -> tuple[dict[str, ExpertsModule | LoraModule], set]:
    """{parameter path: ExpertsModule} of PEFT's `target_parameters` keys: a module targeted for n parameters
    holds n nested wrappers (`…experts.lora_A.weight` the outermost, `…experts.base_layer.lora_A.weight` the
    next); E = A's rows / the parameter's resolved r. A 2-D `weight` target is an ordinary linear LoRA.
    Also returns the file's module names read here."""
    targets = list(config["target_parameters"])
    out, consumed = {}, set()
    levels = Counter(_owner(n)[0] for n in parts)  # wrappers per module in the file: one per parameter it has
    for name in sorted(parts):
        owner, depth = _owner(name)
        key = config_key(owner)
        matched = [t for t in targets if targets_parameter(f"{key}.{t.rsplit('.', 1)[-1]}", [t])]
        # a bare name (all-linear's `gate_up_proj`) matches every module's path, but PEFT wraps only the
        # parameters a module has: those the entries naming it give (`gate.weight`), none of a target_modules one
        named = [t for t in matched if "." in t]
        if len(matched) > levels[owner] and len(named) == levels[owner]:
            matched = named
        if not named and levels[owner] == 1 and targets_module(key, config.get("target_modules")):
            matched = []
        names = [t.rsplit(".", 1)[-1] for t in matched]
        if not names:
            if depth:
                raise SurgeryError(f"{where}: module {name} is a nested LoRA but no target_parameters entry matches "
                                   f"{key}")
            continue  # a target_modules module
        order = nesting_order(owner, names, where)
        if depth >= len(order):
            raise SurgeryError(f"{where}: module {name} is nested {depth} deep but target_parameters gives {key} only "
                               f"{len(order)} parameter(s) ({', '.join(order)})")
        param = order[len(order) - 1 - depth]
        roles = parts[name]
        consumed.add(name)
        if param == "weight" and len(order) == 1:
            rank = roles["A"].shape[0] if "A" in roles else None
            # PEFT resolves its r and alpha by the parameter's path (`…mlp.gate.weight`)
            out[owner] = make_module(owner, roles, "linear", _scale_of(config, f"{owner}.weight", rank, where), weights)
            continue
        path = f"{owner}.{param}"
        A, B = roles.get("A"), roles.get("B")
        if A is None or B is None or set(roles) - {"A", "B"}:
            raise SurgeryError(f"{where}: expert parameter {path} needs exactly lora_A.weight and lora_B.weight "
                               f"(has {', '.join(sorted(roles))}; PEFT's ParamWrapper takes no bias or DoRA)")
        r, alpha = rank_alpha(config, path)
        if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] % r or B.shape[1] != A.shape[0] or 0 in (
                *A.shape, B.shape[0]):
            raise SurgeryError(f"{where}: expert parameter {path}: lora_A {list(A.shape)} and lora_B {list(B.shape)} "
                               f"are not PEFT's (r·E, in) and (out, r·E) for its r={r}")
        floating(weights, path, A=A, B=B)
        scale = float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
        out[path] = ExpertsModule(A=A, B=B, scale=scale, experts=A.shape[0] // r, nesting=order)
    return out, consumed


def expert_keys(name: str, m: ExpertsModule) -> tuple[str, str]:
    """The lora_A / lora_B keys of an expert parameter: its module, one `.base_layer` per wrapper outside it."""
    owner, param = name.rsplit(".", 1)
    depth = len(m.nesting) - 1 - m.nesting.index(param)
    stem = owner + ".base_layer" * depth
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def _check_dora(modules, config, where) -> None:
    """PEFT gives every module of a `use_dora` adapter a magnitude (initialised from the base weight when the file
    lacks it) and ignores magnitudes without `use_dora`: a file that disagrees with its config means different
    updates to PEFT and to loaders that read its tensors."""
    use_dora = bool(config.get("use_dora"))  # its type checked by check_config
    odd = sorted(n for n, m in modules.items() if (m.magnitude is None) == use_dora)
    if odd:
        what = "has no lora_magnitude_vector although use_dora is true" if use_dora else \
            "has a lora_magnitude_vector although use_dora is false (PEFT would ignore it)"
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise SurgeryError(f"{where}: module {odd[0]}{more} {what}")


def _check_alpha_keys(alphas, parts, config, where) -> None:
    """PEFT keys with kohya-style `<module>.alpha` scalars (diffusers' "network alphas"): every module needs one,
    and nothing else may state the scale (without a config the modules are LoRA's)."""
    if config is not None:
        raise SurgeryError(f"{where}: has both a config and per-module .alpha keys ({next(iter(alphas))}.alpha); "
                           "which scale is meant is unclear")
    if stray := sorted(set(alphas) - set(parts)):
        raise SurgeryError(f"{where}: .alpha key for {stray[0]}, which has no lora_A/lora_B tensors")
    if without := sorted(set(parts) - set(alphas)):
        more = f" and {len(without) - 1} more" if len(without) > 1 else ""
        raise SurgeryError(f"{where}: per-module .alpha keys, but none for {without[0]}{more} (diffusers and ComfyUI "
                           "would give it different scales)")


def _alpha_value(ref, name, where) -> float:
    value = float(materialize(ref).reshape(-1)[0].double()) if ref.numel() == 1 else float("nan")
    if not math.isfinite(value) or value <= 0:
        raise SurgeryError(f"{where}: module {name}: alpha must be one positive number, got "
                           f"{value if ref.numel() == 1 else list(ref.shape)}")
    return value


def _structured(name, algo, tensors, config, weights, where):
    """A PEFT LoHa / LoKr module: scale alpha / r (no rsLoRA in PEFT's LoHa/LoKr), r checked against the tensors
    where they state it (LoHa: w1_b; LoKr: its decomposed factor — both full: PEFT's r is kept as a hint)."""
    scale = _scale_of(config, name, stated_rank(algo, tensors), where, ALPHA_KEY[algo])
    return make_structured(name, algo, tensors, scale, weights, rank_hint=rank_alpha(config, name)[0])


def read_dir(path: Path) -> Adapter:
    weights, cfg = path / WEIGHTS, path / CONFIG
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            from .safetensors_file import pickle_error

            raise pickle_error(path / "adapter_model.bin")
        inside = sorted(p.parent.name + "/" for p in path.glob(f"*/{WEIGHTS}"))
        files = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", ".gguf"))
        hint = ""
        if any((path / f).exists() for f in ("model_index.json", "config.json")) and not inside:
            hint = "; it is a model (a base for merge/extract/--base), not an adapter"
        elif inside or files:  # a collection, or a run's checkpoint-N/ folders: name one
            held = [*files, *inside]
            hint = (f"; it holds {', '.join(held[:6])}{', …' if len(held) > 6 else ''}: name one" +
                    (" (after the repo id: org/name/<that path>)" if hub.cached_repo(path) else ""))
        raise SurgeryError(f"{path}: not a PEFT adapter directory (no {WEIGHTS}){hint}")
    if not cfg.exists():
        raise SurgeryError(f"{path}: {CONFIG} is missing (PEFT needs it for r and lora_alpha)")
    return _read(weights, jsonfile.read_object(cfg), "peft", str(cfg))


def read_file(path: Path) -> Adapter:
    from .safetensors_file import read_header

    _, metadata = read_header(path)
    config = None
    if METADATA_CONFIG in metadata:
        config = jsonfile.parse_object(metadata[METADATA_CONFIG], f"{path}: metadata {METADATA_CONFIG}")
    return _read(path, config, "peft-file", f"{path}")


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# config keys that say where an adapter sits, whatever its algorithm (kept when LoHa/LoKr becomes LoRA)
PLACEMENT = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
             "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")


def peft_rank(m) -> int:
    """The r PEFT gives a module: LoRA's rank; LoHa's w1_b rows; LoKr's decomposed factor's rows, or for two full
    factors the config's r it was read with (else the smallest r for which PEFT keeps W₂ full)."""
    if m.algo == "lora":
        return m.rank
    if (r := stated_rank(m.algo, m.tensors)) is not None:
        return r
    if m.rank_hint is not None:
        return m.rank_hint
    _, _, k, n, _ = m._dims()
    return math.ceil(max(k, n) / 2)


def updated_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter's config with r, alpha and paired rank/alpha patterns rewritten for its modules.

    alpha = scale · r (scale · √r with rsLoRA), so the file's scale is the module's scale; the most common
    (rank, alpha) pair becomes the global one and every other module gets an entry in both patterns. The
    peft_type follows the modules (a LoHa squeezed to LoRA gets a LORA config keeping its placement).
    """
    algos = {m.algo for m in adapter.modules.values()}
    if len(algos) > 1 or not algos <= set(ALPHA_KEY):
        raise SurgeryError(f"a PEFT adapter holds one algorithm; this one has {', '.join(sorted(algos))} modules "
                           "(write a kohya/LyCORIS file, or convert --to lora)")
    algo = algos.pop()
    dora = {m.magnitude is not None for m in adapter.modules.values()}
    if True in dora and (len(dora) > 1 or algo != "lora"):
        name = next(n for n, m in adapter.modules.items() if m.magnitude is not None)
        raise SurgeryError(f"module {name}: PEFT's use_dora is one switch for every module of an adapter (and LoRA's "
                           "only), so " + ("this mix of DoRA and plain modules" if algo == "lora" else
                                           f"a DoRA {algo} module") + " has no PEFT form; keep a kohya/LyCORIS file")
    ptype = next(t for t, a in TYPES.items() if a == algo)
    config = dict(adapter.config)
    if config.get("peft_type", "LORA") != ptype:
        config = {k: v for k, v in config.items() if k in PLACEMENT}
    config["peft_type"] = ptype
    rslora = bool(config.get("use_rslora")) and algo == "lora"
    pairs = {}
    for name, m in adapter.modules.items():
        r = peft_rank(m)
        pairs[name] = (r, _number(m.scale * (math.sqrt(r) if rslora else r)))
    (r, alpha), _ = Counter(sorted(pairs.values())).most_common(1)[0]
    wrapped = config.get("target_parameters") or []  # a 2-D weight PEFT wraps as a parameter (a MoE router)
    keyed = {(k + ".weight" if targets_parameter(k + ".weight", wrapped) else k): pa
             for k, pa in ((config_key(n), pa) for n, pa in pairs.items())}
    entries = _pattern_entries(keyed, (r, alpha))
    config.update({"r": r, ALPHA_KEY[algo]: alpha, "rank_pattern": {p: keyed[k][0] for p, k in entries.items()},
                   "alpha_pattern": {p: keyed[k][1] for p, k in entries.items()}})
    if algo == "lora":
        config["use_dora"] = True in dora
        config["lora_bias"] = any(m.bias is not None for m in adapter.modules.values())
        if config["use_dora"] and config["lora_bias"]:
            raise SurgeryError("a DoRA adapter with lora_B.bias tensors has no PEFT form (PEFT refuses lora_bias "
                               "with use_dora); keep the input's format")
    if algo != "lora":
        config["use_effective_conv2d"] = any("t1" in m.tensors or "t2" in m.tensors for m in adapter.modules.values())
    experts = {n: m for n, m in adapter.modules.items() if m.kind == "experts"}
    if experts:
        if config.get("use_dora") or config.get("lora_bias"):
            raise SurgeryError("PEFT's target_parameters take neither DoRA nor lora_B.bias, so this adapter's mix of "
                               "expert parameters and DoRA/biased modules has no PEFT form")
        config["target_parameters"] = _target_parameters(adapter.modules, config.get("target_parameters"))
        config["lora_dropout"] = 0.0  # PEFT's ParamWrapper refuses dropout
    if not config.get("target_modules"):  # PEFT refuses a config without targets; these are exact
        config["target_modules"] = sorted(config_key(n) for n in adapter.modules if n not in experts and
                                          not targets_parameter(f"{config_key(n)}.weight", wrapped))
    return config


def _target_parameters(modules, given) -> list[str]:
    """The input's `target_parameters` where they target exactly each module's nesting (so PEFT nests the wrappers
    as the keys say), else every parameter path — the experts', and the 2-D weights they wrapped (a router's)."""
    owners = {n.rsplit(".", 1)[0]: m.nesting for n, m in modules.items() if m.kind == "experts"}
    if given and all(tuple(p for p in nest if targets_parameter(f"{config_key(o)}.{p}", given)) == nest
                     for o, nest in owners.items()):
        return list(given)
    wrapped = [f"{config_key(n)}.weight" for n, m in modules.items()
               if m.kind != "experts" and targets_parameter(f"{config_key(n)}.weight", given or [])]
    return sorted([f"{config_key(o)}.{p}" for o, nest in owners.items() for p in nest] + wrapped)


def _pattern_entries(keyed: Mapping[str, tuple], default: tuple) -> dict[str, str]:
    """{pattern: module key}, ordered so that PEFT's first-match resolution gives every module its own value.

    A pattern also matches any module whose path ends with it, so such modules get an entry of their own,
    longest first; if '.'-as-wildcard still confuses two names, the patterns are regex-escaped.
    """
    special = [k for k, pa in keyed.items() if pa != default]
    for escape in (False, True):
        entries = {(re.escape(k) if escape else k): k for k in special}
        while True:
            order = sorted(entries, key=lambda p: (-len(p), p))
            caught = [k for k in keyed if k not in entries.values() and pattern_key(order, k) is not None]
            if not caught:
                break
            entries.update({(re.escape(k) if escape else k): k for k in caught})
        entries = {p: entries[p] for p in order}
        if all(keyed[entries[p]] == pa for k, pa in keyed.items() if (p := pattern_key(order, k)) is not None):
            break
    return entries


def _tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {k: materialize(v) for k, v in adapter.passthrough.items()}
    modules = dict(adapter.modules)
    if any(m.bias is not None for m in modules.values()):  # lora_bias = true gives every module a lora_B.bias
        modules = {n: m if m.bias is not None or m.algo != "lora" else
                   replace(m, bias=torch.zeros(m.out_features, dtype=m.dtype)) for n, m in modules.items()}
    for name, module in modules.items():
        for k, t in make_keys(name, module).items():
            if k in tensors:
                raise SurgeryError(f"module {name}: key {k} collides with a pass-through tensor")
            tensors[k] = t
    return tensors


def one_scale(modules: Mapping[str, Any]) -> dict:
    """The LoRA modules of a PEFT directory at one scale: vLLM gives every module `lora_alpha / r` (`/ √r`) and
    ignores `alpha_pattern`, so a module whose scale differs from the most common nonzero one gets the ratio
    folded into its B (`fold_scale`); `rank_pattern` still gives each its own rank."""
    scales = [m.scale for m in modules.values() if m.algo == "lora"]
    if len(set(scales)) < 2:
        return dict(modules)
    common = Counter(s for s in scales if s != 0).most_common(1)[0][0]
    return {n: fold_scale(m, common) if m.algo == "lora" else m for n, m in modules.items()}


def write_dir(adapter: Adapter, out: Path) -> None:
    """`adapter_model.safetensors` (metadata `{"format": "pt"}` + the input's) and `adapter_config.json`; every
    LoRA module at one scale (`one_scale`), so that vLLM reads the update PEFT reads.

    Keys get PEFT's `base_model.model.` prefix where the input had none: `PeftModel.from_pretrained` silently
    leaves prefix-less tensors unloaded (a zero adapter), while transformers' `load_adapter` takes both."""
    adapter = adapter.with_modules(one_scale(adapter.modules))
    tensors = {k if k.startswith(PREFIX) else PREFIX + k: t for k, t in _tensors(adapter).items()}
    config = updated_config(adapter)
    metadata = {k: v for k, v in adapter.metadata.items() if k != METADATA_CONFIG}
    metadata["format"] = "pt"
    with atomic_output(out, is_dir=True) as tmp:
        save_tensors(tensors, tmp / WEIGHTS, metadata)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def folded(modules: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(modules, config) of a single file, which loaders may read without its config (ComfyUI, diffusers'
    `load_lora_adapter` without `use_safetensors=True`) and so with alpha = r: every scale folded into the
    factors, alpha = r written, no rsLoRA."""
    return {n: fold_scale(m) for n, m in modules.items()}, {k: v for k, v in config.items() if k != "use_rslora"}


def write_file(adapter: Adapter, out: Path) -> None:
    """One PEFT-keyed file; the scales folded into the factors (`folded`), the config (alpha = r) in metadata
    `lora_adapter_metadata` as diffusers writes it."""
    modules, config = folded(adapter.modules, adapter.config)
    adapter = adapter.with_modules(modules, config=config)
    tensors = _tensors(adapter)
    config = updated_config(adapter)
    metadata = dict(adapter.metadata)
    metadata.update({"format": "pt", WRITTEN_BY: __version__})
    metadata[METADATA_CONFIG] = json.dumps(config, sort_keys=True)
    with atomic_output(out, is_dir=False) as tmp:
        save_tensors(tensors, tmp, metadata)
