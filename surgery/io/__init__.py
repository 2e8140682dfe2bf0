"""Adapter formats at the edge: `load_adapter(path)` detects and reads, `save_adapter(adapter, out)` writes.

One registry, filled by explicit `register` calls below, maps a format name to its reader and writer.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

from ..adapter import Adapter, adapter_list
from ..errors import SurgeryError
from ..linalg import FLOAT32_MAX
from . import diffusers, experts, gguf_file, hub, kohya, names, peft, tera_file
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
register(Format("diffusers", diffusers.read, diffusers.write, False,
                "diffusers pipeline LoRA (pytorch_lora_weights.safetensors): unet./text_encoder./transformer. keys, "
                "component-prefixed lora_adapter_metadata"))
register(Format("kohya", kohya.read, kohya.write, False,
                "kohya-ss / LyCORIS LoCon .safetensors: lora_down / lora_up / alpha"))
register(Format("tera", tera_file.read, tera_file.write, False,
                "surgery's TeRA tensor-network adapter (.safetensors, docs/tera.md)"))
register(Format("gguf", gguf_file.read, gguf_file.write, False,
                "llama.cpp / Ollama LoRA adapter (.gguf): llama.cpp's tensor names, one alpha"))


def detect(path: str | os.PathLike) -> str:
    """The format name of an adapter on disk, from its layout and key names (headers only)."""
    path = Path(path)
    if path.is_dir():
        return "peft"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    if path.suffix.lower() == gguf_file.SUFFIX or gguf_file.is_gguf(path):
        return "gguf"
    if path.name == peft.WEIGHTS and (path.parent / peft.CONFIG).exists():
        return "peft"
    header, metadata = read_header(path)
    if tera_file.is_tera(header, metadata):
        return "tera"
    kohya_keys = [k for k in header if kohya.parse_key(k) or kohya.unsupported(k)]
    peft_keys = any(peft.parse_key(k) for k in header)
    if kohya_keys and not (peft_keys and all(k.endswith(".alpha") for k in kohya_keys)):  # PEFT keys + .alpha: PEFT's
        if peft_keys:
            raise SurgeryError(f"{path}: mixes kohya (lora_down/lora_up) and PEFT (lora_A/lora_B) keys")
        return "kohya"
    if any(peft.parse_key(k) or peft.parse_structured(k) for k in header):
        return "diffusers" if diffusers.is_diffusers(header, metadata) else "peft-file"
    if diffusers.is_xlabs(header) or (any(diffusers.legacy_key(k) for k in header)
                                      and diffusers.is_diffusers(header, metadata)):
        return "diffusers"
    raise SurgeryError(f"{path}: no adapter tensors found (expected lora_A/lora_B, lora_down/lora_up, hada_* or "
                       "lokr_* keys)")


def load_adapter(path: str | os.PathLike, alpha: float | None = None) -> Adapter:
    """Read an adapter lazily: headers and configs now, tensors when an operation asks for them.

    `alpha`: the lora_alpha of a PEFT-keyed file that carries no config (scale alpha / r per module); refused
    for an adapter whose file states its own scales."""
    path = Path(hub.resolve(path, role="adapter"))
    if not path.exists():
        raise SurgeryError(f"{path}: no such file or directory")
    if path.is_dir() and not (path / peft.WEIGHTS).exists() and (path / diffusers.WEIGHTS).is_file():
        # a folder as diffusers' save_lora_weights writes it (load_lora_weights takes the folder): its one file,
        # results named after the folder
        return replace(load_adapter(path / diffusers.WEIGHTS, alpha), source=path)
    fmt = detect(path)
    if fmt == "peft" and path.is_file():
        path = path.parent
    adapter = FORMATS[fmt].read(path)
    if alpha is not None:
        if fmt != "peft-file" or adapter.config:
            raise SurgeryError(f"{path}: --alpha is for PEFT-keyed files without a config; this {fmt} adapter "
                               "states its own scales")
        if not 0 < alpha < math.inf:  # also NaN
            raise SurgeryError(f"--alpha must be a positive finite number, got {alpha}")
        modules = {n: replace(m, scale=alpha / m.rank) for n, m in adapter.modules.items()}
        number = int(alpha) if float(alpha).is_integer() else alpha
        adapter = adapter.with_modules(modules, config={"lora_alpha": number}, notes=(
            f"{path.name}: no adapter config; lora_alpha = {alpha:g} from --alpha (scale alpha / r)",))
    for name, m in adapter.modules.items():  # loaders apply the scale in float32: past its range, ΔW is Inf
        if not abs(m.scale) <= FLOAT32_MAX:
            raise SurgeryError(f"{path}: module {name}: scale {m.scale:g} (alpha / r) is beyond float32's range, "
                               "in which PEFT and the other loaders apply it")
    return adapter


def _convert_names(adapter: Adapter, fmt: str) -> Adapter:
    """Module names for another format; only name-preserving conversions are possible without the base model
    (convert --base renames through surgery.io.names.on_base)."""
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
        if adapter.config.get("fan_in_fan_out"):
            raise SurgeryError("cannot write kohya: this adapter has fan_in_fan_out = true (GPT-2 Conv1D bases), "
                               "which kohya files have no place for; a kohya file of it would merge transposed")
        modules = {kohya_name(n): m for n, m in adapter.modules.items()}
        if len(modules) != len(adapter.modules):
            raise SurgeryError("cannot write kohya: two module paths map to the same kohya name")
        return adapter.with_modules(modules, config={}, metadata=kohya.provenance(adapter.config))
    if adapter.format == "diffusers":  # → one PEFT model: only a one-component adapter, its prefix dropped
        components = {n.split(".", 1)[0] for n in adapter.modules}
        if len(components) > 1:
            raise SurgeryError(f"cannot write {fmt}: this pipeline LoRA has modules of {', '.join(sorted(components))}"
                               ", and a PEFT adapter is for one model; keep --format diffusers")
        (c,) = components
        return adapter.with_modules({n[len(c) + 1:]: m for n, m in adapter.modules.items()},
                                    config=names.split_config(adapter.config).get(c, {}),
                                    metadata={k: v for k, v in adapter.metadata.items() if k != peft.METADATA_CONFIG})
    raise SurgeryError(
        f"cannot convert {adapter.format} to {fmt} without the base model: give --base MODEL (a model, component "
        "folder or pipeline) to name the modules after its tensors"
    )


def kohya_name(name: str) -> str:
    """PEFT/diffusers module path → kohya name, as diffusers' `convert_state_dict_to_kohya` does."""
    name = name.removeprefix(peft.PREFIX)
    for src, dst in (("text_encoder_2.", "lora_te2."), ("text_encoder.", "lora_te1."), ("unet.", "lora_unet."),
                     ("transformer.", "lora_transformer.")):
        if name.startswith(src):
            name = dst + name[len(src):]
            break
    else:
        name = "lora_unet." + name if name.startswith(("down_blocks", "up_blocks", "mid_block")) else "lora." + name
    return name.replace(".", "_")


SUFFIX = ".safetensors"


def _suffix(fmt: str) -> str:
    """The file suffix of a one-file format."""
    return gguf_file.SUFFIX if fmt == "gguf" else SUFFIX


def _file_suffix(path: Path) -> str | None:
    """The suffix that makes `path` a file output (.safetensors or .gguf), or None."""
    return next((s for s in (SUFFIX, gguf_file.SUFFIX) if path.name.lower().endswith(s)), None)


def output_format(adapter: Adapter, out: str | os.PathLike, format: str | None = None, base=None) -> str:
    """The format `adapter` is written in at `out`: `format` if given (it must agree with the path), else the
    path decides — a `.gguf` path is a llama.cpp adapter, a `.safetensors` path one file (a PEFT adapter becomes
    `peft-file`, a GGUF one too when a `base` names its modules, else it needs a format), any other path a PEFT
    directory."""
    out = Path(out)
    suffix = _file_suffix(out)
    if format is not None:
        if format not in FORMATS:
            raise SurgeryError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        want = None if FORMATS[format].is_dir else _suffix(format)
        if suffix != want:
            say = f"a {want} path" if want else "a directory path (no file suffix)"
            raise SurgeryError(f"{out}: --format {format} writes {'a directory' if want is None else 'one file'}"
                               f"; give {say}, or leave --format out and the path decides")
        return format
    if suffix == gguf_file.SUFFIX:
        return "gguf"
    if adapter.format == "gguf" and base is not None:
        return "peft-file" if suffix == SUFFIX else "peft"
    if suffix == SUFFIX:
        if adapter.format == "gguf":
            raise SurgeryError(f"{out}: a GGUF adapter written as .safetensors needs --format (peft-file, kohya, …) "
                               "and --base to name its modules")
        return "peft-file" if adapter.format == "peft" else adapter.format
    if adapter.format in ("kohya", "tera", "gguf"):
        raise SurgeryError(f"{out}: a path without {SUFFIX} is written as a PEFT directory, which a {adapter.format} "
                           f"adapter cannot become here; give a {_suffix(adapter.format)} path" + (
                               " (or --base MODEL to name its modules for PEFT)" if adapter.format == "gguf" else ""))
    return "peft"


def default_output(source: str | os.PathLike, tag: str, fmt: str) -> Path:
    """Where a result in format `fmt` goes without -o: beside its input, named after what was done
    (`in.safetensors` + `r4` → `in-r4.safetensors`, `my-lora/` + `e0.95` → `my-lora-e0.95/`,
    `x.gguf` + `r8` → `x-r8.gguf`)."""
    source = hub.output_home(source)
    stem = source.name[: len(source.name) - len(_file_suffix(source) or "")]
    return source.with_name(f"{stem}-{tag}" + ("" if FORMATS[fmt].is_dir else _suffix(fmt)))


def _resolved(path: Path) -> Path:
    """`path.resolve()`, a symlink loop one line (Python < 3.13 raises RuntimeError for it)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        raise SurgeryError(f"{path}: is a symlink loop (or cannot be resolved); give another path") from None


def _same(a: Path, b: Path) -> bool:
    """Whether two resolved paths are one file or folder: equal, or the same inode by another name — a bind mount,
    a hard link, a case-insensitive filesystem's `My-Lora` for `my-lora` (macOS, Windows)."""
    try:
        return a == b or a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _under(path: Path, folder: Path) -> bool:
    """Whether resolved `path` is `folder` or inside it, by name or by inode (`_same`)."""
    return any(_same(p, folder) for p in (path, *path.parents))


def check_output(out: str | os.PathLike, inputs=(), force: bool = False) -> Path:
    """Refuse an output that is (or holds) one of `inputs`, or that would replace part of an input folder — a
    file in it, a pipeline's component folder — or add a PEFT file to one, whatever `force` says; and an existing
    output unless `force`. (An earlier result folder inside an input folder may be replaced.)"""
    out = Path(out)
    o = _resolved(out)
    if hub.in_cache(out):
        raise SurgeryError(f"{out}: is inside the Hugging Face cache; outputs never go there, choose another path")
    if out.exists() and not (out.is_file() or out.is_dir()):  # rename would put a file where /dev/null was
        raise SurgeryError(f"{out}: is not a regular file or folder (a device or a pipe); outputs are written to a new "
                           "file and renamed into place, so give a file path")
    replaces_file = out.is_symlink() or out.exists() and not out.is_dir()
    for i in inputs:
        i = _resolved(Path(i))
        inside = i.is_dir() and _under(o, i)
        part = inside and (o.name in (peft.WEIGHTS, peft.CONFIG) or replaces_file
                           or out.exists() and (i / "model_index.json").exists())  # a pipeline's component folder
        if _same(o, i) or _under(i, o) or part:
            raise SurgeryError(f"{out}: is an input of this command or part of one ({i}); choose another output")
    if (out.exists() or out.is_symlink()) and not force:
        raise SurgeryError(f"{out}: exists; choose a new path or pass --force to replace it")
    return out


def save_adapter(adapter: Adapter, out: str | os.PathLike, format: str | None = None, force: bool = False,
                 inputs=(), base: str | os.PathLike | None = None, **options) -> Path:
    """Write `adapter` atomically at `out`, in `format` or the one the path implies (`output_format`).

    Never over the adapter's own source or any of `inputs`; over an existing path only if `force`. `base`: the
    model whose tensors name the modules when the output's naming differs from the adapter's (a GGUF output
    from PEFT, PEFT from GGUF, …). `options` go to the format's writer (tera: save_factors; gguf: dtype)."""
    adapter_list([adapter], "save_adapter")  # one Adapter (a path or a list named in one line)
    fmt = output_format(adapter, out, format, base)
    if fmt != "peft":  # loaders read the other formats (a peft-file too) without PEFT's config
        adapter.check_plain(f"the {fmt} format", gguf_file.KEPT if fmt == gguf_file.FORMAT else ())
    spec = FORMATS[fmt]
    experts.check_format(adapter, fmt)
    out = check_output(out, [*inputs, *([adapter.source] if adapter.source is not None else []),
                             *([base] if base is not None else [])], force)
    if base is not None and adapter.format != fmt and {adapter.format, fmt} != {"peft", "peft-file"}:
        adapter = names.on_base(adapter, base, fmt)
    if not spec.is_dir and out.is_dir():
        raise SurgeryError(f"{out}: is a directory but format {fmt} writes one file; give another path")
    if spec.is_dir and out.exists() and not out.is_dir():
        raise SurgeryError(f"{out}: is a file but format {fmt} writes a directory; give another path")
    try:
        spec.write(_convert_names(adapter, fmt), out, **options)
    except SurgeryError as e:  # what the format cannot hold is about the input: name it
        if adapter.source is None or str(e).startswith((str(out), str(adapter.source))):
            raise
        raise SurgeryError(f"{adapter.source}: {e}") from None
    return out
