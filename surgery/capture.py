"""Hidden states of a local Hugging Face model for intrinsic-dimension estimates (GeLoRA).

Runs the model (transformers, an optional dependency; local files only, never a download) on a text file, one
text per line, and keeps, for a seeded sample of token positions, the hidden state of every layer: the embedding
output and each block's output. Padding is excluded always; special tokens ([CLS], [SEP], BOS/EOS …) by default,
since they form tight clusters that distort TwoNN.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import resolve_device
from .errors import SurgeryError


@dataclass(frozen=True)
class Capture:
    layers: Sequence[torch.Tensor]  # (n_tokens, hidden) per layer: embeddings, then blocks 1..L
    metadata: dict


def _block_prefix(model) -> str | None:
    """Path of the ModuleList holding the transformer blocks (e.g. `encoder.layer`, `model.layers`)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > best[1]):
            best = (name, len(mod))
    return best[0] if best else None


def capture(model_dir: str | os.PathLike, texts: str | os.PathLike, *, max_tokens: int = 4096, seed: int = 0,
            keep_special: bool = False, batch_size: int = 16, max_length: int = 256,
            device: str = "auto") -> Capture:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise SurgeryError("surgery capture needs transformers: pip install 'surgery[capture]'") from None
    lines = [line.strip() for line in Path(texts).read_text().splitlines() if line.strip()] \
        if Path(texts).is_file() else None
    if not lines:
        raise SurgeryError(f"{texts}: no texts (expected a file with one text per line)")
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{model_dir}: not a local transformers model ({str(e).splitlines()[0]})") from None
    dev = resolve_device(device)
    model.to(dev)
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    per_layer: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(lines), batch_size):
            enc = tok(lines[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out = model(**{k: v.to(dev) for k, v in enc.items()}, output_hidden_states=True)
            keep = enc["attention_mask"].bool()
            if not keep_special:
                keep &= ~torch.isin(enc["input_ids"], special)
            for j, h in enumerate(out.hidden_states):
                if len(per_layer) <= j:
                    per_layer.append([])
                per_layer[j].append(h.cpu()[keep].float())
    layers = [torch.cat(chunks) for chunks in per_layer]
    n = layers[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=g)[:max_tokens].sort().values if n > max_tokens else torch.arange(n)
    metadata = {"model": str(model_dir), "texts": str(texts),
                "texts_sha256": hashlib.sha256(Path(texts).read_bytes()).hexdigest(),
                "tokens_available": n, "tokens": int(pick.numel()), "seed": seed, "special_tokens_kept": keep_special,
                "layers": len(layers), "block_prefix": _block_prefix(model)}
    return Capture(tuple(layer[pick].contiguous() for layer in layers), metadata)


def save_capture(cap: Capture, out: str | os.PathLike) -> None:
    from .io.safetensors_file import atomic_output, save_tensors

    tensors = {f"hidden.{i}": t for i, t in enumerate(cap.layers)}
    with atomic_output(Path(out), is_dir=False) as tmp:
        save_tensors(tensors, tmp, {"format": "pt", "surgery_capture": json.dumps(cap.metadata, sort_keys=True)})


class _LazyLayers(Sequence):
    """Layers of a hidden-state file, each read (and checked) only when indexed: `surgery id` holds one layer."""

    def __init__(self, path, refs):
        self.path, self.refs = path, refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t = self.refs[i].load()
        if not torch.isfinite(t).all():
            raise SurgeryError(f"{self.path}: hidden.{i} is not a finite (tokens, hidden) matrix")
        return t


def load_capture(path: str | os.PathLike) -> Capture:
    """A hidden-state file, its layers read lazily; shapes are checked from the header."""
    from .io.safetensors_file import tensor_refs

    refs, metadata = tensor_refs(path)
    n = sum(1 for k in refs if k.startswith("hidden."))
    if n == 0 or any(f"hidden.{i}" not in refs for i in range(n)):
        raise SurgeryError(f"{path}: not a hidden-state file (expected tensors hidden.0 … hidden.L)")
    layers = [refs[f"hidden.{i}"] for i in range(n)]
    for i, ref in enumerate(layers):
        if len(ref.shape) != 2 or not ref.dtype.is_floating_point:
            raise SurgeryError(f"{path}: hidden.{i} is not a finite (tokens, hidden) matrix")
    try:
        meta = json.loads(metadata.get("surgery_capture", "{}"))
    except json.JSONDecodeError:
        meta = {}
    return Capture(_LazyLayers(path, layers), meta)
