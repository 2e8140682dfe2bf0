"""Bytes in and out: validated safetensors headers, lazy tensor references, atomic writes.

The header is parsed and checked here (cheaply, before any tensor is read) so that a corrupt, truncated or
pickled file gets one message that names it, instead of a deserializer's stack trace.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..adapter import TensorRef
from ..errors import SurgeryError
from ..linalg import all_finite

MAX_HEADER = 100_000_000
WRITTEN_BY = "surgery_version"  # metadata key of the single-file adapters surgery writes (their scales are folded
# where a loader may read no config: tests/real_loaders.py holds every such file to it)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
        "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def pickle_error(path: Path) -> SurgeryError:
    return SurgeryError(
        f"{path}: this is a pickle checkpoint (torch.save); surgery never unpickles files because loading one "
        "can run arbitrary code. Convert it once, in an environment you trust: python -c \"import torch; "
        "from safetensors.torch import save_file; "
        f"save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\""
    )


def check_regular(path: Path) -> None:
    """Refuse a pipe, FIFO or device (`<(cat x)`, /dev/stdin): inputs are read by offset and memory-mapped, which
    a stream cannot give, and opening a FIFO with no writer would wait forever."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise SurgeryError(f"{path}: is not a regular file (a pipe or a device); save it to a file first")


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Validated header of a safetensors file: ({name: {dtype, shape, data_offsets}}, metadata)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    if not path.exists():
        raise SurgeryError(f"{path}: no such file or directory")
    if path.is_dir():
        raise SurgeryError(f"{path}: is a directory, expected a .safetensors file")
    check_regular(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
        if n is None or n > MAX_HEADER or 8 + n > size or head[8:9] not in (b"{", b" "):
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x01\x02\x03\x04\x05"):
                raise pickle_error(path)
        if n is None:
            raise SurgeryError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        if n > MAX_HEADER or 8 + n > size:
            raise SurgeryError(
                f"{path}: corrupt or truncated safetensors file (header claims {n:,} bytes, file has {size:,})"
            )
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SurgeryError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    except RecursionError:
        raise SurgeryError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise SurgeryError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SurgeryError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SurgeryError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise SurgeryError(f"{path}: tensor {name!r} has dtype {dtype}, which surgery does not handle")
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * BITS[dtype] // 8 or begin < 0:
            raise SurgeryError(f"{path}: corrupt safetensors header: tensor {name!r} has a wrong byte range")
        spans.append((begin, end))
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise SurgeryError(f"{path}: corrupt safetensors header: tensor byte ranges overlap or leave gaps")
        cursor = end
    if 8 + n + cursor != size:
        raise SurgeryError(
            f"{path}: truncated or corrupt safetensors file: tensors need {8 + n + cursor:,} bytes, file has {size:,}"
        )
    return header, metadata


def tensor_refs(path: str | os.PathLike) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Lazy references to every tensor of a validated file, plus its metadata; nothing is read yet. Each knows
    where its bytes lie in this version of the file (`TensorRef.offset`, `stamp`)."""
    path = Path(os.path.realpath(path))  # (a symlink loop stays itself: read_header says it is missing)
    before = os.stat(path) if path.exists() else None
    header, metadata = read_header(path)
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
        after = os.fstat(f.fileno())
    stamp = (after.st_mtime_ns, after.st_size)
    same = stamp == (before.st_mtime_ns, before.st_size)
    refs = {
        name: TensorRef(path, name, tuple(int(s) for s in info["shape"]), DTYPES[info["dtype"]],
                        offset=start + info["data_offsets"][0] if same else None, stamp=stamp)
        for name, info in sorted(header.items())
    }
    return refs, metadata


CODES = {v: k for k, v in DTYPES.items()}
ALIGN = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
         "U16": 2}


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """Write a safetensors file deterministically (safetensors' own writer orders `__metadata__` at random),
    every float tensor checked by `finite`."""
    write_shard(path, [tensor_entry(k, (lambda k=k, t=t: finite(k, t)), t.dtype, tuple(t.shape))
                       for k, t in tensors.items()], metadata)


def finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, refused if it holds NaN or Inf: every input is checked when read, so one here is a value that a scale
    folded into it or a narrower --dtype pushed beyond its dtype's range."""
    if t.is_floating_point() and not all_finite(t):
        raise SurgeryError(f"tensor {name}: its values overflow {str(t.dtype).removeprefix('torch.')} (a scale "
                           "folded into them, or a narrower dtype asked for, gives NaN or Inf)")
    return t


Producer = Callable[[object], None]  # writes exactly the entry's bytes to the open file


@dataclass(frozen=True)
class Entry:
    """One tensor of a file being written: either `make()` computes it, or `write(f)` copies its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Producer | None = None
    make: Callable[[], torch.Tensor] | None = None
    after: str | None = None  # produced right after this entry of the same file (its file place is unchanged)


def tensor_entry(name: str, make: Callable[[], torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> Entry:
    """A computed tensor, made only when its turn to be written comes (or while the one before is written)."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()

    def checked() -> torch.Tensor:
        t = make()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise AssertionError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
        return t

    return Entry(name, CODES[dtype], tuple(shape), nbytes, make=checked)


def write_all(f, data) -> None:
    """Write every byte of `data` to the unbuffered file `f`: one `write()` moves at most 2,147,479,552 bytes on
    Linux (and fewer on a full disk, where the next call raises ENOSPC), so loop until done."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        n = f.write(view[done:])
        if not n:
            raise OSError(28, "No space left on device", getattr(f, "name", None))
        done += n


def _write_tensor(f, t: torch.Tensor) -> None:
    if t.numel():
        write_all(f, t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def write_shard(path: Path, entries: Iterable[Entry], metadata: Mapping[str, str] | None) -> int:
    """Stream a safetensors file: header first (tensors ordered as safetensors orders them: alignment, then
    name; header padded with spaces to 8 bytes; metadata keys sorted), then each entry's bytes. The next computed
    entry is made in a worker thread while the current one is written (so `make`s run one at a time, in order,
    and at most two results are alive). Returns the data size."""
    entries = sorted(entries, key=lambda e: (-ALIGN.get(e.dtype, 1), e.name))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))  # sorted: same input, same bytes
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    data = 8 + len(blob)
    order = _production_order(entries)
    with open(path, "wb", buffering=0) as f, ThreadPoolExecutor(1) as pool:  # unbuffered: see copy_entry
        write_all(f, len(blob).to_bytes(8, "little"))
        write_all(f, blob)
        made = {}
        submit = lambda i: made.setdefault(i, pool.submit(order[i].make)) \
            if i < len(order) and order[i].make else None  # noqa: E731
        submit(0)
        for i, e in enumerate(order):
            submit(i + 1)
            start = data + header[e.name]["data_offsets"][0]
            if f.tell() != start:
                f.seek(start)
            _write_tensor(f, made.pop(i).result()) if e.make else e.write(f)
            if f.tell() - start != e.nbytes:
                raise AssertionError(f"{e.name}: wrote {f.tell() - start} bytes, planned {e.nbytes}")
    return offset


def _production_order(entries: list[Entry]) -> list[Entry]:
    """File order, but an entry with `after` right behind that entry (a re-quantized weight's scale is made
    with its values, and the file's alignment order would put the float32 scale long before them)."""
    names = {e.name for e in entries}
    behind: dict[str, list[Entry]] = {}
    for e in entries:
        if e.after in names:
            behind.setdefault(e.after, []).append(e)
    order = []
    for e in entries:
        if e.after not in names:
            order.append(e)
            order.extend(behind.get(e.name, ()))
    return order


@contextlib.contextmanager
def atomic_output(out: Path, is_dir: bool, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to write into; rename it over `out` only if the block succeeds.

    A directory output that already exists keeps its other files (the new ones are renamed into it one by one),
    unless `replace`: then the whole directory is swapped for the new one. An OS failure while writing (no
    permission, full disk, a file where a folder must be) is a SurgeryError naming `out`, with nothing left.
    A symbolic link is written through, as `cp` does: a folder linked to another disk gets the files (the
    temporary beside them), the link stays.
    """
    out = Path(out)
    real = Path(os.path.realpath(out)) if out.is_symlink() else out
    try:
        with _atomic(real, is_dir, replace) as target:
            yield target
    except OSError as e:
        if e.filename is not None and not _within(e.filename, real):
            raise  # not the output's failure (e.g. reading an input inside the block)
        short = e.errno is None and "requested and" in str(e)  # numpy's tofile (the GGUF writer) cut short
        why = f"a short write, the disk full? {e}" if short else e.strerror or e
        raise SurgeryError(f"{out}: cannot write the output ({why})") from None


def _replace_contents(out: Path, new: Path) -> None:
    """A mount point's entries replaced by those of `new` (a folder inside it): the old ones set aside in it, the
    new ones renamed in, the old ones deleted — or, on any failure (a signal too), put back. `lost+found` stays."""
    old = Path(tempfile.mkdtemp(prefix=".surgery.", suffix=".old", dir=out))
    aside, moved = [], []
    try:
        for e in sorted(out.iterdir()):
            if e not in (new, old) and e.name != "lost+found":
                os.replace(e, old / e.name)
                aside.append(e.name)
        for f in sorted(new.iterdir()):
            os.replace(f, out / f.name)
            moved.append(f.name)
    except BaseException:
        for name in moved:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        for name in aside:
            os.replace(old / name, out / name)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _is_mount(folder: Path) -> bool:
    """Whether `folder` is a mount point. os.path.ismount compares devices, so a bind mount of a folder of the same
    filesystem (`mount --bind`, a container's volume on its host's disk) reads as a plain folder, and renames into or
    out of it fail (EXDEV, EBUSY): Linux lists every mount point in /proc/self/mountinfo (spaces as \\040)."""
    if os.path.ismount(folder):
        return True
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
    except OSError:
        return False
    real, octal = os.fsencode(os.path.realpath(folder)), re.compile(rb"\\([0-7]{3})")
    return any(len(f) > 4 and octal.sub(lambda m: bytes([int(m[1], 8)]), f[4]) == real
               for f in (line.split(b" ") for line in lines))


def _sibling(out: Path) -> str:
    """The prefix of `out`'s hidden temporary siblings: its name, cut to 40 characters so that a name near the
    filesystem's 255-byte limit still leaves room (`.<name>.<random>.tmp` was "File name too long")."""
    return f".{out.name[:40]}."


def _within(path, out: Path) -> bool:
    """Whether `path` is `out`, a folder above it, or inside its temporary sibling."""
    p, o = Path(path).resolve(), out.resolve()
    return o.is_relative_to(p) or p.is_relative_to(o.parent) and p.relative_to(o.parent).parts[0].startswith(
        (o.name, _sibling(o)))


@contextlib.contextmanager
def _atomic(out: Path, is_dir: bool, replace: bool) -> Iterator[Path]:
    out = Path(os.path.abspath(out))  # "." or "x/..": a name to put the temporary sibling beside
    parent = out.parent
    above = next(p for p in (parent, *parent.parents) if p.exists() or p == p.parent)
    if not above.is_dir():
        raise NotADirectoryError(20, f"{above} is a file, not a folder", str(above))
    parent.mkdir(parents=True, exist_ok=True)
    # a folder that is a mount point (a Docker volume, a disk's root) cannot be renamed, nor files renamed into it
    # from the parent's filesystem: the temporary folder goes inside it
    mount = is_dir and out.is_dir() and _is_mount(out)
    tmp = Path(tempfile.mkdtemp(prefix=".surgery." if mount else _sibling(out), suffix=".tmp",
                                dir=out if mount else parent))
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):  # (a filesystem without modes, FAT, keeps its own)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output directory's mode
    try:
        target = tmp if is_dir else tmp / out.name
        yield target
        if not is_dir:
            os.replace(target, out)
        elif out.exists() and not replace:
            if not out.is_dir():
                raise SurgeryError(f"{out}: exists and is not a directory")
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
        elif mount:
            _replace_contents(out, tmp)
        else:
            old = None
            try:
                if out.exists():
                    old = Path(tempfile.mkdtemp(prefix=_sibling(out), suffix=".old", dir=parent))
                    os.replace(out, old / "x")
                os.replace(tmp, out)
            except BaseException:  # (a signal between the renames too): the previous output back in its place
                if old is not None and (old / "x").exists() and not out.exists():
                    os.replace(old / "x", out)
                raise
            finally:
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
