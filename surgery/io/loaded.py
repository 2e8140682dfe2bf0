"""How transformers loads a base checkpoint, where that differs from how it is stored.

transformers 5 renames a checkpoint's keys when it loads it (its conversion mapping: Llava's stored
`language_model.model.layers…` are the model's `model.language_model.layers…`, Mixtral's `block_sparse_moe.gate`
its `mlp.gate`), and PEFT saves adapters under the loaded names; some 2-D weights belong to modules PEFT can only
wrap as parameters (a MoE router: `target_parameters` `<path>.weight`); GPT-2's `Conv1D` weights are stored
(in, out). All read from the model built on the meta device from the base's config.json (no weight is read);
transformers is an optional dependency, and without it (or for a model it does not know) the base is taken as
stored.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SurgeryError
from .checkpoint import Checkpoint


def transformers_modules(where):
    """(transformers, its conversion_mapping, its core_model_loading), or one line saying how to install it."""
    try:
        import transformers
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        raise SurgeryError(f"{where}: placing expert (MoE) adapters on a base needs transformers ≥ 5, which maps "
                           "each model type's expert tensors (pip install 'surgery[moe]')") from None
    return transformers, conversion_mapping, core_model_loading


@functools.lru_cache(maxsize=4)
def meta_model(config_path: Path, mtime: float):
    """The model of `config_path` built on the meta device: its parameter names, shapes and module types."""
    transformers, _, _ = transformers_modules(config_path.parent)
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_path.parent), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SurgeryError(f"{config_path}: transformers does not know this model ({first})") from None
    archs = [getattr(transformers, a, None) for a in getattr(config, "architectures", None) or []]
    with torch.device("meta"):  # the class that saved it names the parameters as its users load them
        for cls in [a for a in archs if a is not None] + [transformers.AutoModelForCausalLM, transformers.AutoModel]:
            try:
                return cls._from_config(config) if cls in archs else cls.from_config(config)
            except (ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError, NotImplementedError):
                continue  # a class needing another package (timm, …) or other arguments: the next one
    raise SurgeryError(f"{config_path}: transformers has no model class for model_type {config.model_type!r}")


def conversion(ck: Checkpoint):
    """(the base's model on the meta device, transformers' renamings and converters of its on-disk keys, the
    transformers module defining them)."""
    _, conversion_mapping, loading = transformers_modules(ck.root)
    model = meta_model(ck.config_path, ck.config_path.stat().st_mtime)
    transforms = conversion_mapping.get_model_conversion_mapping(model)
    return (model, [t for t in transforms if isinstance(t, loading.WeightRenaming)],
            [t for t in transforms if isinstance(t, loading.WeightConverter)], loading)


@dataclass(frozen=True)
class Loaded:
    """keys: {the loaded model's tensor key: the stored one} where they differ; wrapped: loaded module paths whose
    2-D weight PEFT wraps as a parameter; transposed: stored module paths whose weight is (in, out) (Conv1D)."""

    keys: dict = field(default_factory=dict)
    wrapped: frozenset = frozenset()
    transposed: frozenset = frozenset()

    @functools.cached_property
    def renamed(self) -> dict[str, str]:
        """{the loaded model's module path: the stored one}, by their weights."""
        return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in self.keys.items()
                if k.endswith(".weight") and v.endswith(".weight")}

    def loaded_name(self, stored: str) -> str:
        """The loaded model's path of a stored module (itself where transformers keeps it)."""
        return self._stored.get(stored, stored)

    @functools.cached_property
    def _stored(self) -> dict[str, str]:
        return {v: k for k, v in self.renamed.items()}


def how_loaded(ck: Checkpoint) -> Loaded:
    """What transformers makes of the base's weights: empty without a config.json, for a model transformers ≥ 5
    does not know, or where `worth_asking` says it keeps them as stored (sparing its 2 s import). Cached per
    checkpoint."""
    if not ck.is_dir or not ck.config_path.exists() or not worth_asking(ck):
        return Loaded()
    key = (str(ck.root), ck.config_path.stat().st_mtime_ns, tuple(ck.tensors))
    if key not in _SEEN:
        if len(_SEEN) >= 4:
            _SEEN.pop(next(iter(_SEEN)))
        _SEEN[key] = _how_loaded(ck, key[2])
    return _SEEN[key]


_SEEN: dict = {}  # the last bases asked about (a merge asks per module it places)


def _how_loaded(ck: Checkpoint, keys: tuple) -> Loaded:
    try:
        model, renamings, converters, loading = conversion(ck)
        renamed = {}
        for key in keys:
            to, pattern = loading.rename_source_key(key, renamings, converters)
            if pattern is None and to != key:
                renamed[to] = key
    except Exception:  # noqa: BLE001 — transformers' internals for a model it half knows: taken as stored
        return Loaded()
    layers = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention)
    modules = dict(model.named_modules())
    conv1d = {n for n, m in modules.items() if type(m).__name__ == "Conv1D"}
    wrapped = {n for n, m in modules.items() if not isinstance(m, layers) and n not in conv1d
               and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() == 2}
    stored = Loaded(renamed).renamed  # module paths, loaded → stored
    return Loaded(renamed, frozenset(wrapped), frozenset(stored.get(n, n) for n in conv1d))


def on_disk(ck: Checkpoint, key: str) -> str:
    """The base's stored key for a tensor key of the loaded model (itself where the base has it, or where it is
    absent, not renamed: a tied output head)."""
    return key if key in ck.tensors else how_loaded(ck).keys.get(key, key)


CONV1D_NAMES = re.compile(r"\.(c_attn|c_fc|c_proj|q_attn)\.weight$")  # GPT-2's, OpenAI GPT's, ImageGPT's, …


def worth_asking(ck: Checkpoint) -> bool:
    """Whether transformers may load the base otherwise than it is stored: a composite model (a sub-model's config
    inside config.json: Llava, Qwen2-VL, Gemma 3, …), a MoE, or GPT-2-style Conv1D weights."""
    cfg = ck.config() if ck.is_dir else {}
    return (any(isinstance(v, dict) and "model_type" in v for v in cfg.values()) or any("expert" in k for k in cfg)
            or any(CONV1D_NAMES.search(k) for k in ck.tensors))
