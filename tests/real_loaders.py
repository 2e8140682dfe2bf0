"""Every model a test writes is loaded back with the real library: PEFT adapters with `PeftModel.from_pretrained`
on a skeleton base built from the adapter's own shapes (so an adapter for any model can be checked), merged
transformers models with `from_pretrained` (no missing or unexpected keys).

PEFT's loaded update of every module must equal ours (`delta()`), which checks keys, shapes and the scale PEFT
resolves from r / lora_alpha / rank_pattern / alpha_pattern / use_rslora."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

MAX_PARAMS = 60_000_000  # larger skeletons are not built (none of the tests writes one)


def _skeleton(adapter):
    """A torch module tree holding, at every module path of `adapter`, a base layer of the matching type/shape."""
    from surgery.adapter import LoraModule
    from surgery.io.peft import PREFIX

    root = torch.nn.Module()
    fan = bool(adapter.config.get("fan_in_fan_out"))
    layers = {}
    experts = {}  # owner path → {parameter: (E, out, in)}: PEFT's target_parameters wrap 3-D parameters
    for name, m in adapter.modules.items():
        if m.kind == "experts":
            owner, param = name.removeprefix(PREFIX).rsplit(".", 1)
            experts.setdefault(owner, {p: (m.experts, 1, 1) for p in m.nesting})[param] = m.shape
    for owner, params in experts.items():
        layer = torch.nn.Module()
        for p, shape in params.items():  # registration order = the nesting order
            layer.register_parameter(p, torch.nn.Parameter(torch.zeros(shape)))
        layers[owner] = layer
    for name, m in adapter.modules.items():
        shape = tuple(getattr(m, "shape", ()) or ())
        if m.kind == "experts":
            continue
        if isinstance(m, LoraModule) and m.kind == "embedding":
            layer = torch.nn.Embedding(m.in_features, m.out_features)
        elif isinstance(m, LoraModule) and m.kind == "conv" or len(shape) == 4:
            kernel = tuple(m.A.shape[2:]) if isinstance(m, LoraModule) else shape[2:]
            layer = torch.nn.Conv2d(m.in_features // math.prod(kernel), m.out_features, kernel)
        elif fan:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(m.out_features, m.in_features)
        else:
            layer = torch.nn.Linear(m.in_features, m.out_features)
        layers[name.removeprefix(PREFIX)] = layer
    for key, t in adapter.passthrough.items():  # modules_to_save: a layer holding the saved weight's shape
        path = key.removeprefix(PREFIX)
        if ".base_layer." in path or "token_adapter" in path or not path.endswith(".weight"):
            return None
        path = path[: -len(".weight")]
        if path not in layers:
            layers[path] = torch.nn.Linear(t.shape[-1], t.shape[0], bias=False) if len(t.shape) == 2 else None
        if layers[path] is None:
            return None
    if sum(p.numel() for layer in layers.values() for p in layer.parameters()) > MAX_PARAMS:
        return None
    for path, layer in layers.items():
        parent = root
        *parts, leaf = path.split(".")
        for part in parts:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    root.prepare_inputs_for_generation = None  # what PeftModelForCausalLM (task_type CAUSAL_LM) takes from a model
    return root


def check_peft_loads(path: Path) -> None:
    """Load the PEFT adapter at `path` (a directory or a PEFT-keyed file) with PEFT; compare every module's update."""
    from peft import PeftModel

    from surgery import load_adapter
    from surgery.io.safetensors_file import read_header

    adapter = load_adapter(path)
    if adapter.config.get("layer_replication"):
        return  # PEFT builds the replicated layers of a Llama-like model only, not of the skeleton
    if adapter.format == "diffusers":  # each component as diffusers' load_lora_adapter(file, prefix=c) reads it
        _check_components(path, adapter)
        return
    root = _skeleton(adapter)
    if root is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(path)
        weights = d if d.is_file() else d / "adapter_model.safetensors"
        if d.is_file() or not all(k.startswith("base_model.model.") for k in read_header(weights)[0]):
            # a single file or prefix-less keys: loaded as transformers' / diffusers' load_adapter do, prefixed
            from safetensors.torch import load_file, save_file

            d = Path(tmp)
            state = {k if k.startswith("base_model.model.") else "base_model.model." + k: v
                     for k, v in load_file(str(weights)).items()}
            save_file(state, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(json.dumps(dict(adapter.config)))
        config = json.loads((d / "adapter_config.json").read_text())
        if isinstance(config.get("target_modules"), str) and config["target_modules"] == "all-linear":
            return
        model = PeftModel.from_pretrained(root, d)
    ours = {n.removeprefix("base_model.model."): m for n, m in adapter.modules.items()}
    seen = set()
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "parameter_name"):  # a ParamWrapper: `…experts(.base_layer)*` wraps one parameter
            while name.endswith(".base_layer"):
                name = name.removesuffix(".base_layer")
            name = f"{name}.{mod.parameter_name}" if f"{name}.{mod.parameter_name}" in ours or name not in ours else name
            if name not in ours or not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                continue
        if hasattr(mod, "get_delta_weight") and name in ours:
            seen.add(name)
            variant = getattr(mod, "lora_variant", {}).get("default")
            if hasattr(variant, "_get_bdlora_delta_weight"):  # BD-LoRA: what its merge adds, from the blocks
                theirs = variant._get_bdlora_delta_weight(mod, "default").detach().double()
            else:
                theirs = mod.get_delta_weight("default").detach().double()
            mine = ours[name].delta(torch.float64)
            if isinstance(mod, torch.nn.Module) and type(mod).__name__ == "Embedding":
                mine = mine.T
            elif adapter.config.get("fan_in_fan_out"):
                mine = mine.T
            theirs = theirs.reshape(mine.shape)
            tol = 1e-5 * max(1.0, float(mine.abs().max()))
            assert torch.allclose(theirs, mine, atol=tol, equal_nan=True), f"{path}: module {name}: PEFT's update differs from ours"
    assert seen == set(ours), f"{path}: PEFT did not load modules {sorted(set(ours) - seen)[:5]}"


def check_transformers_loads(path: Path) -> None:
    """Load a merged model directory with transformers, each of its weight sets (plain, `fp16`, …); no weight may
    be missing or unexpected."""
    import transformers

    from surgery.errors import SurgeryError
    from surgery.io.checkpoint import open_weight_sets

    try:
        variants = [ck.variant for ck in open_weight_sets(path)]
    except SurgeryError:
        return  # refused by our reader (a test's bad input)
    config = json.loads((path / "config.json").read_text())
    if "model_type" not in config or not (config.get("architectures") or []):
        return
    cls = getattr(transformers, config["architectures"][0], None)
    if cls is None:
        return
    for variant in variants:
        _, info = cls.from_pretrained(path, output_loading_info=True, variant=variant)
        assert not info["missing_keys"] and not info["unexpected_keys"], f"{path} ({variant}): {info}"


def _check_components(path: Path, adapter) -> None:
    """A diffusers pipeline LoRA: per component, the keys and the metadata with the prefix stripped (what
    `load_lora_adapter(file, prefix=c)` hands PEFT) as one PEFT-keyed file, checked as above."""
    from safetensors.torch import load_file, save_file

    from surgery.io.names import split_config
    from surgery.io.peft import METADATA_CONFIG

    state = load_file(str(path))
    configs = split_config(adapter.config)
    with tempfile.TemporaryDirectory() as tmp:
        for c in sorted({k.split(".", 1)[0] for k in state}):
            f = Path(tmp) / f"{c}.safetensors"
            save_file({k[len(c) + 1:]: v for k, v in state.items() if k.startswith(c + ".")}, str(f),
                      metadata={"format": "pt", METADATA_CONFIG: json.dumps(configs[c])})
            check_peft_loads(f)


_PAIR = (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight"),
         ("lora_embedding_A", "lora_embedding_B"))


def check_blind(path: Path) -> None:
    """A single file surgery wrote, read as loaders that read no metadata and no config do (ComfyUI; diffusers'
    `load_lora_adapter` without `use_safetensors=True`): each LoRA pair's update is up.flatten(1) @ down.flatten(1)
    times `{x}.alpha` / rank where the file has an `.alpha`, else times 1 (alpha = r). It must equal ours."""
    from safetensors.torch import load_file

    from surgery import load_adapter

    adapter = load_adapter(path)
    state = load_file(str(path))
    checked = 0
    for key, down in state.items():
        for a, b in _PAIR:
            if not key.endswith("." + a) or "lora_mid" in key:
                continue
            name = key[: -len(a) - 1]
            if name not in adapter.modules or f"{name}.lora_mid.weight" in state:
                continue
            up = state[f"{name}.{b}"].double()
            alpha = state.get(f"{name}.alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            theirs = up.flatten(1) @ down.double().flatten(1) * scale
            mine = adapter.modules[name].delta(torch.float64)
            tol = 1e-5 * max(1.0, float(mine.abs().max()))
            assert torch.allclose(theirs, mine, atol=tol), f"{path}: module {name} means another update without " \
                                                           "its metadata"
            checked += 1
    assert checked or not any(k.endswith(pair[0]) for k in state for pair in _PAIR), f"{path}: no module compared"


def vllm_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each linear module's update as vLLM reads a PEFT directory (`vllm/lora/peft_helper.py`, `PEFTHelper`): one
    scale for every module, `lora_alpha / r` (`/ √r` with use_rslora) from the config's globals — vLLM ignores
    rank_pattern and alpha_pattern and takes each module's rank from its tensors. float64, keyed like `delta()`."""
    from safetensors.torch import load_file

    config = json.loads((Path(path) / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    return {k.removesuffix(".lora_A.weight"): state[k.replace("lora_A", "lora_B")].double() @ A.double() * scale
            for k, A in state.items() if k.endswith(".lora_A.weight")}
