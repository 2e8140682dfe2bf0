"""Model checkpoints on disk: one `.safetensors` file, a Hugging Face directory with `model.safetensors` or
`model.safetensors.index.json` and shards (formats.md §7), a diffusers component folder (the same with the stem
`diffusion_pytorch_model`), or a diffusers pipeline (`model_index.json` + component folders).

`open_checkpoint` plans from headers only (names, dtypes, shapes, byte ranges; every shard validated);
`read_tensor` reads one tensor; `write_shard` streams a safetensors file tensor by tensor, so memory stays at one
tensor, and copies untouched tensors as raw bytes (bit-identical, no conversion).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import SurgeryError
from . import hub, jsonfile, quant
from .safetensors_file import DTYPES, PICKLE_SUFFIXES, Entry, check_regular, pickle_error, read_header, write_all

STEMS = ("model", "diffusion_pytorch_model")  # transformers' and diffusers' weight file stems
INDEX = "model.safetensors.index.json"
PIPELINE_INDEX = "model_index.json"
WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".h5", ".msgpack", ".onnx", ".gguf", ".safetensors")
# a weight set's entry file: `model.safetensors`, `diffusion_pytorch_model.fp16.safetensors`,
# `model.safetensors.index.json`, `diffusion_pytorch_model.safetensors.index.fp16.json` (variants as diffusers and
# transformers name them: `_add_variant`)
_ENTRY = re.compile(rf"^({'|'.join(STEMS)})(?:\.safetensors\.index(?:\.(\w+))?\.json|(?:\.(\w+))?\.safetensors)$")


def index_name(stem: str, variant: str | None = None) -> str:
    return f"{stem}.safetensors.index{f'.{variant}' if variant else ''}.json"


def weights_name(stem: str, variant: str | None = None, part: tuple[int, int] | None = None) -> str:
    """`model.safetensors`, `model.fp16.safetensors`, `model-00001-of-00002.safetensors`,
    `model.fp16-00001-of-00002.safetensors`."""
    name = stem + (f".{variant}" if variant else "")
    return name + (f"-{part[0]:05d}-of-{part[1]:05d}" if part else "") + ".safetensors"


def weight_sets(folder: Path) -> list[tuple[str, str | None]]:
    """The (stem, variant) weight sets a model folder holds, the plain one (variant None) first: diffusers
    pipelines often carry the same weights twice (`diffusion_pytorch_model.safetensors` and `….fp16.safetensors`)."""
    found = set()
    for p in folder.iterdir() if folder.is_dir() else ():
        m = _ENTRY.match(p.name)
        if m:
            found.add((m.group(1), m.group(2) or m.group(3)))
    return sorted(found, key=lambda sv: (sv[1] is not None, sv[1] or "", STEMS.index(sv[0])))


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: `path`, absolute byte range [begin, end), safetensors dtype code, shape. A quantized
    weight (surgery.io.quant) is read through `codec` from its stored `parts` (values, scale, …), as float32 of
    its logical shape; its path and byte range are those of its values."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    codec: quant.Codec | None = None
    parts: tuple["TensorSpec", ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint planned from its headers.

    root: the file or directory; shards: shard file names in order; tensors: name → spec, in shard order then
    file order, a quantized weight once under its logical name (its scales not listed); metadata: shard → its
    `__metadata__`; index: the index JSON (None for one file); stored: name → spec of every tensor as stored;
    quant: how its quantized weights are stored (None: not quantized).
    """

    root: Path
    shards: tuple[str, ...]
    tensors: Mapping[str, TensorSpec]
    metadata: Mapping[str, Mapping[str, str]]
    index: Mapping | None
    stem: str = "model"  # weight file stem of a directory: "model" or diffusers' "diffusion_pytorch_model"
    variant: str | None = None  # the weight variant of a directory (`fp16` for `model.fp16.safetensors`)
    stored: Mapping[str, TensorSpec] | None = None
    quant: quant.Scheme | None = None

    @property
    def is_dir(self) -> bool:
        return self.root.is_dir()

    def shard_of(self, name: str) -> str:
        return self.tensors[name].path.name

    @property
    def config_path(self) -> Path:
        return (self.root if self.is_dir else self.root.parent) / "config.json"

    def config(self) -> dict:
        """config.json beside the weights, or {} (read once: planning a merge asks for it per tensor)."""
        return self._config

    @functools.cached_property
    def _config(self) -> dict:
        return jsonfile.read_object(self.config_path) if self.config_path.exists() else {}


def open_checkpoint(path: str | os.PathLike, variant: str | None = "") -> Checkpoint:
    """Plan a single-file or sharded checkpoint; a missing shard or a tensor missing from its shard is an error.
    In a folder, `variant` picks the weight set (None: the plain one); by default the plain one, else the first."""
    root = Path(hub.resolve(path))
    if not root.exists():
        raise SurgeryError(f"{root}: no such file or directory")
    stem = "model"
    if not root.is_dir():
        check_regular(root)
    if root.is_file():
        if root.suffix.lower() in PICKLE_SUFFIXES:
            raise pickle_error(root)
        shards, index, variant = [root.name], None, None
        folder = root.parent
    else:
        folder = root
        if (root / PIPELINE_INDEX).exists():
            raise SurgeryError(f"{root}: is a diffusers pipeline ({PIPELINE_INDEX}); give one of its component "
                               "folders (unet/, transformer/, text_encoder/, …)")
        sets = [sv for sv in weight_sets(root) if variant == "" or sv[1] == variant]
        if not sets:
            pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise pickle_error(root / pickles[0])
            if (root / "adapter_config.json").exists() or (root / "adapter_model.safetensors").exists():
                raise SurgeryError(f"{root}: is a PEFT adapter, not a model (merge takes BASE ADAPTER…, extract "
                                   "FINETUNED BASE)")
            raise SurgeryError(f"{root}: no model.safetensors, diffusion_pytorch_model.safetensors or their "
                               ".index.json")
        stem, variant = sets[0]
        index_path = root / index_name(stem, variant)
        if index_path.exists():
            index = jsonfile.read_object(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise SurgeryError(f"{index_path}: not a valid safetensors index (weight_map must map tensor names "
                                   "to shard file names)")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise SurgeryError(f"{root}: shard(s) listed in {index_path.name} are missing: {', '.join(missing)}")
        else:
            shards, index = [weights_name(stem, variant)], None
    tensors, metadata = {}, {}
    for shard in shards:
        p = folder / shard  # as listed: a Hub cache snapshot links it to a blob of another name
        header, meta = read_header(p)
        metadata[shard] = meta
        start = 8 + _header_len(p)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if name in tensors:
                raise SurgeryError(f"{root}: tensor {name} appears in two shards")
            b, e = info["data_offsets"]
            tensors[name] = TensorSpec(name, p, info["dtype"], tuple(info["shape"]), start + b, start + e)
    if index is not None:
        for name, shard in index["weight_map"].items():
            if name not in tensors or tensors[name].path.name != shard:
                raise SurgeryError(f"{root}: {index_name(stem, variant)} maps {name} to {shard}, which does not "
                                   "contain it")
    config_path = folder / "config.json"
    config = jsonfile.read_object(config_path) if config_path.exists() else {}
    scheme = quant.scheme(config, {n: (s.dtype, s.shape) for n, s in tensors.items()}, root)
    return Checkpoint(root, tuple(shards), _logical(tensors, scheme), metadata, index, stem, variant, tensors, scheme)


def _logical(stored: dict[str, TensorSpec], scheme: quant.Scheme | None) -> dict[str, TensorSpec]:
    """The tensors as the model holds them: each quantized weight once, under its logical name, at its values'
    place in the order; its scales not listed."""
    if scheme is None:
        return stored
    owned = {p: q for q in scheme.weights.values() for p in q.parts}
    out = {}
    for name, spec in stored.items():
        q = owned.get(name)
        if q is None:
            out[name] = spec
        elif name == q.parts[0]:
            out[q.name] = TensorSpec(q.name, spec.path, "F32", q.shape, spec.begin, spec.end, q.codec,
                                     tuple(stored[p] for p in q.parts))
    return out


def open_weight_sets(path: str | os.PathLike, opened: Checkpoint | None = None) -> list[Checkpoint]:
    """Every weight set of a model folder (the plain one and each variant), or the one file; `opened`, a set
    already planned, is reused."""
    root = Path(path)
    first = opened or open_checkpoint(root)
    if not first.is_dir:
        return [first]
    return [first] + [open_checkpoint(root, v) for v in dict.fromkeys(v for _, v in weight_sets(root))
                      if v != first.variant]


@dataclass(frozen=True)
class Pipeline:
    """A diffusers pipeline folder: its components with safetensors weights (folder name → checkpoint, in
    `model_index.json` order) and the class each component is (`UNet2DConditionModel`, `CLIPTextModel`, …)."""

    root: Path
    components: Mapping[str, Checkpoint]
    classes: Mapping[str, str]


def is_pipeline(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / PIPELINE_INDEX).is_file()


def open_pipeline(path: str | os.PathLike) -> Pipeline:
    """Plan every component of a pipeline that holds safetensors weights (the others are copied as they are)."""
    root = Path(path)
    index = jsonfile.read_object(root / PIPELINE_INDEX)
    entries = {k: v for k, v in index.items() if not k.startswith("_")}
    components, classes = {}, {}
    for name, value in entries.items():
        folder = root / name
        if not (isinstance(value, list) and len(value) == 2 and value[1] and folder.is_dir()):
            continue
        classes[name] = str(value[1])
        if weight_sets(folder):
            components[name] = open_checkpoint(folder)
    if not components:
        raise SurgeryError(f"{root}: no component of this pipeline holds safetensors weights")
    return Pipeline(root, components, classes)


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


class _OpenFiles:
    """A few shard files kept open between reads, keyed by path and the file's identity (inode, mtime, size: a file
    replaced at the same path is opened anew). One descriptor per shard lets the kernel's readahead follow the
    sequential reads of a streamed merge: reopening per tensor reads each small tensor cold (measured: 3 MB expert
    tensors, 5.5–7 ms each reopened vs 2.1 ms through one descriptor)."""

    def __init__(self, size: int = 8):
        self.size, self.files, self.lock = size, OrderedDict(), threading.Lock()

    def read_into(self, path: Path, offset: int, view: memoryview) -> int:
        st = os.stat(path)
        key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        with self.lock:
            f = self.files.pop(key, None) or open(path, "rb", buffering=0)
            self.files[key] = f
            while len(self.files) > self.size:
                self.files.popitem(last=False)[1].close()
            f.seek(offset)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    break
                done += got
            return done


_FILES = _OpenFiles()


def prefetch(specs) -> None:
    """Ask the kernel to start reading these tensors' bytes now (posix_fadvise WILLNEED, per file over the range
    they span), so that a streamed merge computes one tensor while the disk brings the next ones: reading then
    overlaps the maths instead of preceding it. Only a hint; the page cache, not this process, holds the bytes."""
    spans: dict[Path, list[int]] = {}
    for spec in specs:
        for part in spec.parts or (spec,):
            lo_hi = spans.setdefault(part.path, [part.begin, part.end])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], part.begin), max(lo_hi[1], part.end)
    for path, (lo, hi) in spans.items():
        if hi > lo and hasattr(os, "posix_fadvise"):
            with open(path, "rb") as f, contextlib.suppress(OSError):  # a filesystem without it: no hint
                os.posix_fadvise(f.fileno(), lo, hi - lo, os.POSIX_FADV_WILLNEED)


def read_tensor(spec: TensorSpec, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor, read with `readinto` calls until complete (one call moves at most ~2 GiB on Linux; no mmap
    kept) — into `buffer` (a flat uint8 CPU tensor of at least `spec.nbytes`) when given, so that repeated reads
    reuse memory instead of page-faulting new memory. A quantized weight: its values in float32, decoded."""
    if spec.codec is not None:
        return spec.codec.decode(*read_stored(spec, buffer))
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=spec.torch_dtype)
    raw = buffer[: spec.nbytes] if buffer is not None else torch.empty(spec.nbytes, dtype=torch.uint8)
    if _FILES.read_into(spec.path, spec.begin, memoryview(raw.numpy())) < spec.nbytes:
        raise SurgeryError(f"{spec.path}: truncated while reading {spec.name}")
    return raw.view(spec.torch_dtype).reshape(spec.shape)


def read_stored(spec: TensorSpec, buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized weight's stored values (into `buffer`, as read_tensor) and its scale, which must be finite."""
    values, scale = read_tensor(spec.parts[0], buffer), read_tensor(spec.parts[1])
    if not bool(torch.isfinite(quant.scale_values(scale)).all()):
        raise SurgeryError(f"{spec.parts[1].path}: scale {spec.parts[1].name} of {spec.name} holds NaN or Inf")
    return values, scale


# copy_file_range refuses these where the kernel cannot copy between the two files: another filesystem (EXDEV,
# Linux ≥ 5.19 — an output on another disk than the base), a filesystem or kernel without it
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
COPY_CHUNK = 1 << 24


def copy_entry(spec: TensorSpec) -> Entry:
    """An untouched tensor: its bytes copied from the input file as they are — in the kernel (copy_file_range)
    where it can, else through a 16 MiB buffer (another filesystem, macOS, Windows)."""

    def write(f):
        kernel = hasattr(os, "copy_file_range")
        with open(spec.path, "rb") as src:
            offset, left = spec.begin, spec.nbytes
            while left:
                if kernel:
                    try:
                        n = os.copy_file_range(src.fileno(), f.fileno(), left, offset)
                    except OSError as e:
                        if e.errno not in _NO_KERNEL_COPY:
                            raise
                        kernel = False
                        continue
                else:
                    src.seek(offset)  # (not os.pread: Windows has none)
                    chunk = src.read(min(left, COPY_CHUNK))
                    write_all(f, chunk)
                    n = len(chunk)
                if n <= 0:
                    raise SurgeryError(f"{spec.path}: could not read {spec.name} (file changed while copying?)")
                offset += n
                left -= n

    return Entry(spec.name, spec.dtype, spec.shape, spec.nbytes, write=write)


def files_below(src: Path) -> list[Path]:
    """Every file below `src` (links followed, hidden entries skipped), sorted; a symbolic link that loops or leads
    back into a folder above it is the input's problem, said in one line."""
    out, seen = [], set()

    def walk(d: Path, ancestors: tuple) -> None:
        try:
            real = d.resolve(strict=True)
            entries = sorted(d.iterdir())
        except (OSError, RuntimeError) as e:
            raise SurgeryError(f"{d}: cannot be read as a folder of the input ({getattr(e, 'strerror', None) or e})") \
                from None
        if real in ancestors:
            raise SurgeryError(f"{d}: symbolic link loop in the input (it leads back to {real}); remove the link")
        for p in entries:
            if p.name.startswith("."):
                continue
            if p.is_symlink() and not p.exists():
                raise SurgeryError(f"{p}: broken or looping symbolic link in the input ({os.readlink(p)})")
            if p.is_dir():
                walk(p, ancestors + (real,))
            elif p not in seen:
                seen.add(p)
                out.append(p)

    if not src.is_dir():  # a link to a file, or a broken one
        if not src.exists():
            raise SurgeryError(f"{src}: broken or looping symbolic link in the input ({os.readlink(src)})")
        return [src]
    walk(src, ())
    return out


def copy_file(src: Path, dst: Path) -> None:
    """`src`'s bytes to `dst` (links followed), with its times and mode where the filesystem keeps them (FAT
    refuses chmod, and a copy should not fail for it)."""
    shutil.copyfile(src, dst)
    with contextlib.suppress(OSError):
        shutil.copystat(src, dst)


def copy_side_files(src: Path, dst: Path, skip: set[str], skip_dirs: set[Path] = frozenset()) -> list[str]:
    """Copy the non-weight files of a model directory (config, tokenizer, …), sub-folders included but
    `skip_dirs` (relative paths); returns the weight files in other formats that were left out (they would hold
    stale weights)."""
    left_out = []
    for p in files_below(src):
        rel = p.relative_to(src)
        if str(rel) in skip:
            continue
        if any(rel.is_relative_to(d) for d in skip_dirs):
            continue
        if p.suffix.lower() in WEIGHT_SUFFIXES:
            left_out.append(str(rel))
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_file(p, dst / rel)
    return left_out
