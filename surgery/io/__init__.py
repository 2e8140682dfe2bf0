"""Adapter formats at the edge: `load_adapter(path)` detects and reads, `save_adapter(adapter, out)` writes.

One registry, filled by explicit `register` calls below, maps a format name to its reader and writer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

from ..adapter import Adapter
from ..errors import SurgeryError
from . import kohya, peft, tera_file
from .safetensors_file import PICKLE_SUFFIXES, pickle_error, read_header


class Format(NamedTuple):
    name: str
    read: Callable[[Path], Adapter]
    write: Callable[[Adapter, Path], None]
    is_dir: bool
    description: str


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt


register(Format("peft", peft.read_dir, peft.write_dir, True,
                "PEFT directory: adapter_model.safetensors + adapter_config.json"))
register(Format("peft-file", peft.read_file, peft.write_file, False,
                "one PEFT-keyed .safetensors; config (if any) in metadata lora_adapter_metadata"))
register(Format("kohya", kohya.read, kohya.write, False,
                "kohya-ss / LyCORIS LoCon .safetensors: lora_down / lora_up / alpha"))
register(Format("tera", tera_file.read, tera_file.write, False,
                "surgery's TeRA tensor-network adapter (.safetensors, docs/tera.md)"))


def detect(path: str | os.PathLike) -> str:
    """The format name of an adapter on disk, from its layout and key names (headers only)."""
    path = Path(path)
    if path.is_dir():
        return "peft"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    if path.name == peft.WEIGHTS and (path.parent / peft.CONFIG).exists():
        return "peft"
    header, metadata = read_header(path)
    if tera_file.is_tera(header, metadata):
        return "tera"
    if any(kohya.parse_key(k) or kohya.unsupported(k) for k in header):
        if any(peft.parse_key(k) for k in header):
            raise SurgeryError(f"{path}: mixes kohya (lora_down/lora_up) and PEFT (lora_A/lora_B) keys")
        return "kohya"
    if any(peft.parse_key(k) for k in header):
        return "peft-file"
    raise SurgeryError(f"{path}: no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys)")


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter lazily: headers and configs now, tensors when an operation asks for them."""
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"{path}: no such file or directory")
    fmt = detect(path)
    if fmt == "peft" and path.is_file():
        path = path.parent
    return FORMATS[fmt].read(path)


def _convert_names(adapter: Adapter, fmt: str) -> Adapter:
    """Module names for another format; only name-preserving conversions are possible without the base model."""
    pair = (adapter.format, fmt)
    if pair[0] == pair[1] or set(pair) == {"peft", "peft-file"}:
        return adapter
    if "tera" in pair:
        raise SurgeryError(f"cannot write a {adapter.format} adapter as {fmt}: use surgery convert --to "
                           f"{'lora' if adapter.format == 'tera' else 'tera'}")
    if adapter.passthrough:
        keys = ", ".join(sorted(adapter.passthrough)[:3])
        raise SurgeryError(f"cannot write {fmt}: the adapter carries non-LoRA tensors ({keys}, …) that {fmt} has no place for")
    if fmt == "kohya":
        modules = {kohya_name(n): m for n, m in adapter.modules.items()}
        if len(modules) != len(adapter.modules):
            raise SurgeryError("cannot write kohya: two module paths map to the same kohya name")
        return adapter.with_modules(modules, config={}, metadata={})
    raise SurgeryError(
        f"cannot convert {adapter.format} to {fmt}: kohya's underscore names cannot be mapped back to module paths "
        "without the base model's key list"
    )


def kohya_name(name: str) -> str:
    """PEFT/diffusers module path → kohya name, as diffusers' `convert_state_dict_to_kohya` does."""
    name = name.removeprefix(peft.PREFIX)
    for src, dst in (("text_encoder_2.", "lora_te2."), ("text_encoder.", "lora_te1."), ("unet.", "lora_unet.")):
        if name.startswith(src):
            name = dst + name[len(src):]
            break
    else:
        name = "lora_unet." + name if name.startswith(("down_blocks", "up_blocks", "mid_block")) else "lora." + name
    return name.replace(".", "_")


def save_adapter(adapter: Adapter, out: str | os.PathLike, format: str | None = None, force: bool = False,
                 **options) -> Path:
    """Write `adapter` atomically as `format` (default: its own). Refuses to overwrite its source unless `force`.
    `options` go to the format's writer (tera: save_factors)."""
    fmt = format or adapter.format
    if fmt not in FORMATS:
        raise SurgeryError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    out = Path(out)
    if spec.is_dir and out.suffix == ".safetensors":
        raise SurgeryError(f"{out}: format {fmt} is a directory; give a directory or --format peft-file")
    if not spec.is_dir and out.is_dir():
        raise SurgeryError(f"{out}: is a directory but format {fmt} writes one file; give a .safetensors path")
    if adapter.source is not None and not force and _same_place(adapter.source, out, spec.is_dir):
        raise SurgeryError(f"{out}: is the input itself; choose another output or pass --force to replace it")
    spec.write(_convert_names(adapter, fmt), out, **options)
    return out


def _files(path: Path, is_dir: bool) -> set[Path]:
    path = path.resolve()
    return {path / peft.WEIGHTS, path / peft.CONFIG} if is_dir else {path}


def _same_place(source: Path, out: Path, is_dir: bool) -> bool:
    """Would writing `out` replace a file the adapter was read from?"""
    return bool(_files(Path(source), Path(source).is_dir()) & _files(out, is_dir))
