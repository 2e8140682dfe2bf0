"""surgery: model surgery on safetensors adapter checkpoints.

    from surgery import load_adapter, save_adapter, squeeze, FixedRank
    adapter = load_adapter("my-lora/")
    small, report = squeeze(adapter, FixedRank(4))
    save_adapter(small, "my-lora-r4/")
"""
from .adapter import Adapter, LoraModule, TensorRef
from .errors import SurgeryError
from .io import FORMATS, detect, load_adapter, save_adapter
from .rank import Budget, Energy, Exact, FixedRank, RankMap, parse_count, parse_rank_map
from .squeeze import ModuleReport, SqueezeReport, squeeze
from .version import __version__ as __version__  # (pyproject.toml's; the writers record it)

__all__ = [
    "Adapter", "LoraModule", "TensorRef", "SurgeryError", "FORMATS", "detect", "load_adapter", "save_adapter",
    "Budget", "Energy", "Exact", "FixedRank", "RankMap", "parse_count", "parse_rank_map",
    "ModuleReport", "SqueezeReport", "squeeze",
]
