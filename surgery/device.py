"""Where the maths runs and in which precision: the user's `--device` / `--dtype` choices, resolved once."""
from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

from .errors import SurgeryError

CUDA_WORKERS = 4  # streams kept busy at once on a GPU (per_module)
M, T = TypeVar("M"), TypeVar("T")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# the unary ops ATen hands to oneMKL's vector maths (VML) for float32/float64 (aten/src/ATen/cpu/vml.h)
VML_OPS = (torch.sqrt, torch.exp, torch.log, torch.log2, torch.log10, torch.sin, torch.cos, torch.tan, torch.asin,
           torch.acos, torch.atan, torch.tanh, torch.erf, torch.erfc, torch.erfinv, torch.trunc)


def resolve_vml() -> None:
    """Call every VML op once, here, before any thread runs one: VML picks each function's kernel on its first call,
    and first calls made at once from several threads (`per_module`'s workers, torch's intra-op threads) can run a
    low-accuracy kernel for one of them (oneMKL 2024.2, the one torch's wheels bundle; pytorch/pytorch#188792).
    Seen here: one run of `extract` with two threads wrote factors whose √σ were 160–1440 ulp off."""
    if torch.backends.mkl.is_available():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((2,), 0.5, dtype=dtype)
            for op in VML_OPS:
                op(x)


resolve_vml()  # at import: before any worker thread exists (~7 ms, mostly loading the kernels a first call loads)


def resolve_device(name: str | torch.device = "auto", exact: bool = True) -> torch.device:
    """'auto' → CUDA when present, else CPU. Errors: CUDA asked for without one, an ordinal past the last GPU, and
    with `exact` (the maths, not a model's forward pass) a device other than cpu/cuda or TF32 CUDA matmuls
    (`tf32_setting`)."""
    if isinstance(name, int) and not isinstance(name, bool):  # torch's own shorthand: an ordinal is a GPU
        name = f"cuda:{name}"
    if isinstance(name, torch.device):
        dev = name
    elif not isinstance(name, str):
        raise SurgeryError(f"device {name!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device")
    elif name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise SurgeryError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise SurgeryError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= (n := torch.cuda.device_count()):
        raise SurgeryError(f"--device {dev}: this machine has {n} CUDA device{'s' if n != 1 else ''}"
                           + (f" (cuda:0 … cuda:{n - 1})" if n > 1 else " (cuda:0)" if n else ""))
    if not exact or dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise SurgeryError(f"--device {dev}: surgery's maths run on cpu or cuda[:N]")
    if setting := tf32_setting():
        raise SurgeryError(f"--device {dev}: this process runs CUDA float32 matmuls in TF32 ({setting}), ~1e-3 "
                           "relative; surgery's maths need full float32: set torch.backends.cuda.matmul.fp32_precision "
                           "= 'ieee' (or torch.set_float32_matmul_precision('highest')) for the call, or use the CPU")
    return dev


def tf32_setting() -> str | None:
    """The torch setting that makes CUDA float32 matmuls TF32 (10-bit mantissas), if any. Common in training
    scripts; it would break the exactness every operation promises and the TwoNN search's error bounds. Refused
    rather than switched off: changing the user's global flags from a library would mix torch's legacy and new
    precision APIs, after which torch raises on the legacy reads."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "").upper() in ("1", "ON", "YES", "TRUE", "Y"):
        return "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set"  # torch's own override, ahead of every setting
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch ≥ 2.9: the effective cuBLAS setting, either API
    if precision is None:
        return "torch.backends.cuda.matmul.allow_tf32 = True" if matmul.allow_tf32 else None
    return None if precision in ("none", "ieee") else (f"torch.backends.cuda.matmul.fp32_precision = {precision!r}, "
                                                        "e.g. from torch.set_float32_matmul_precision('high')")


def storage_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'keep'/None → None (each tensor keeps its dtype), else the named float dtype."""
    if name is None or name == "keep":
        return None
    if isinstance(name, torch.dtype):
        return name
    if name not in STORAGE_DTYPES:
        raise SurgeryError(f"unknown dtype {name!r}; use keep, {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def seeded(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one named draw, h = (seed · 0x9E3779B1 + crc32(key)) mod 2⁶³: results depend on
    neither the order of the draws nor the device used later (docs/tera.md fixes this formula for TeRA files)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (2**63))


def compute_dtype(name: str | torch.dtype) -> torch.dtype:
    """float32 or float64, by name or as a torch dtype: the maths never run narrower."""
    dtype = COMPUTE_DTYPES.get(name) if isinstance(name, str) else name
    if dtype not in COMPUTE_DTYPES.values():
        raise SurgeryError(f"unknown compute precision {name!r}; use float32 or float64")
    return dtype


class Scratch:
    """Flat buffers reused from tensor to tensor: page-faulting a fresh 100 MB tensor costs several times the
    arithmetic done in it (measured: 38 ms vs 5 ms for one bf16 → f32 conversion of 8192×2048). For work on a
    CUDA `device`, the host buffers are pinned: weights are read straight into page-locked memory and cross to the
    device (and back) by DMA at full bandwidth, not through the driver's pageable staging copies."""

    def __init__(self, device: str | torch.device = "cpu"):
        self._bufs: dict[str, torch.Tensor] = {}
        self.pinned = torch.device(device).type == "cuda"

    def get(self, tag: str, shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
        n = math.prod(shape)
        b = self._bufs.get(tag)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
            pin = self.pinned and torch.device(device).type == "cpu"
            b = self._bufs[tag] = torch.empty(max(n, 1), dtype=dtype, device=device, pin_memory=pin)
        return b[:n].view(tuple(shape))


def to_device(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` on `device`. A CPU tensor bound for CUDA is pinned and sent as stored (a bf16 factor moves
    half the bytes of its float32 form), asynchronously on the current stream, and converted there: the copy
    overlaps the other workers' kernels (`per_module`) instead of stalling the host on pageable memory."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device=device, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True).to(dtype)


def per_module(fn: Callable[[str, M], T], modules: Mapping[str, M], device: torch.device,
               workers: int | None = None) -> Iterator[T]:
    """`fn(name, module)` for every module, results in order; at most `workers` at once (a memory bound).

    On the CPU, modules run in parallel, one per intra-op thread, each computed single-threaded (a lone module
    too): the tall-skinny QRs here scale far better across modules than inside one (measured 1.7× on 2 cores),
    and a module's result does not depend on the thread count (tests/test_determinism.py). On CUDA, a few
    workers, each on its own stream: one module's reading, pinned upload and download overlap the others'
    kernels, and a worker waiting for its own results (a rank, a report figure) stalls no other stream — the
    device is not left idle between modules. Memory: one module per worker. An item may be a batch of modules
    (squeeze and spectra on a GPU: `squeeze._batches`).
    Used by squeeze, combine, spectra and extract.
    """
    threads, cuda = torch.get_num_threads(), device.type == "cuda"

    def start():
        if cuda:
            torch.cuda.set_stream(torch.cuda.Stream(device))  # the current stream is per thread
        else:
            # OpenMP's thread count is per OS thread: a worker starts from OMP_NUM_THREADS, not from the caller's,
            # and an SVD's blocking (so its rounding) follows it — each worker sets its own
            torch.set_num_threads(1)

    def run(item):
        out = fn(*item)
        if cuda:  # handed over complete: no kernel of this worker's stream still writing into it
            torch.cuda.current_stream().synchronize()
        return out

    blas = None
    if not cuda:  # numpy's BLAS too (linalg.gram64): its own threads would fight the workers for the cores
        blas = threadpool_limits(1, user_api="blas")
        torch.set_num_threads(1)
    n = min(CUDA_WORKERS if cuda else threads, len(modules), workers or len(modules))
    pool = ThreadPoolExecutor(max(1, n), initializer=start)
    try:
        yield from pool.map(run, modules.items())
    finally:  # on an error, modules not yet started are dropped
        pool.shutdown(wait=True, cancel_futures=True)
        if blas is not None:  # restores every pool threadpoolctl saw, OpenMP's too: before torch's own count
            blas.restore_original_limits()
        torch.set_num_threads(threads)
