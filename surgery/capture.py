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
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import resolve_device
from .errors import SurgeryError, regex
from .layers import linear_shape


@dataclass(frozen=True)
class Capture:
    layers: Sequence[torch.Tensor]  # (n_tokens, hidden) per layer: embeddings, then blocks 1..L
    metadata: dict


def read_texts(path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped: the texts `capture` and `compare` run. Read once, so a
    pipe serves too (`--texts <(grep … corpus.txt)`); not a device (/dev/zero would never end)."""
    from .io.jsonfile import read_bytes

    try:
        lines = [line.strip() for line in read_bytes(path).decode("utf-8").splitlines() if line.strip()] \
            if os.path.exists(path) and not os.path.isdir(path) else None
    except UnicodeDecodeError:
        raise SurgeryError(f"{path}: not UTF-8 text (expected a file with one text per line)") from None
    if not lines:
        raise SurgeryError(f"{path}: no texts (expected a file with one text per line)")
    return lines


def _block_prefix(model) -> str | None:
    """Path of the ModuleList holding the transformer blocks (e.g. `encoder.layer`, `model.layers`) that capture
    runs: an encoder-decoder's encoder's (`encoder.block`)."""
    run, at = _run_part(model)
    best = None
    for name, mod in run.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (best is None or len(mod) > best[1]):
            best = (name, len(mod))
    return f"{at}{best[0]}" if best else None


def _run_part(model) -> tuple[torch.nn.Module, str]:
    """What capture runs on the texts, and its path in the model (with a trailing dot): the model, or an
    encoder-decoder's (T5, BART) encoder alone — its decoder would need target texts (T5 refused to run
    without them; BART fed it the input shifted)."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return model, ""
    encoder = model.get_encoder()
    return encoder, next(name for name, mod in model.named_modules() if mod is encoder) + "."


def _runs_note(model) -> list[str]:
    part = _run_part(model)[1]
    return [f"{type(model).__name__} is an encoder-decoder model: its encoder ({part[:-1]}) is run on the texts, "
            "the decoder is not"] if part else []


def _model_class(model_dir):
    """The class the model's config.json names (`LlamaForCausalLM`, …) — the one an adapter of it was made on, so
    module paths agree (`model.layers.0.…`) — or AutoModel when it names none transformers has."""
    import transformers

    from .io.jsonfile import field, read_object

    config = Path(model_dir) / "config.json"
    names = field(read_object(config), "architectures", "str list", config, []) if config.is_file() else []
    return next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)


def _padded(tok):
    """The tokenizer, padding on the right (positions as in an unpadded run); one without a pad token (Llama,
    Mistral) pads with EOS, one without either with the token of id 0 — padded positions are masked and never
    sampled, so its value does not matter."""
    how = "pad" if tok.pad_token is not None else "eos" if tok.eos_token is not None else "id 0"
    if how != "pad":
        tok.pad_token = tok.eos_token if how == "eos" else tok.convert_ids_to_tokens(0)
    tok.padding_side = "right"
    return tok, how


def _load(model_dir, texts, device, max_tokens: int, max_length: int, batch_size: int):
    from .io.hub import resolve

    for flag, n in (("--max-tokens", max_tokens), ("--max-length", max_length), ("batch_size", batch_size)):
        if n < 1:  # a slice [:max_tokens] would take all but the last -n
            raise SurgeryError(f"{flag} must be at least 1, got {n}")
    model_dir = resolve(model_dir)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SurgeryError("surgery capture needs transformers: pip install 'surgery[capture]'") from None
    lines = read_texts(texts)
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar and load report are not ours to print
    hf_logging.set_verbosity_error()
    try:
        tok, pad = _padded(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
        model = _model_class(model_dir).from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{model_dir}: not a local transformers model ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return tok, model.to(resolve_device(device, exact=False)), lines, pad


def check_vocabulary(model, top: int, where) -> None:
    """Token ids up to `top` must be rows of the model's input embedding (else: a tokenizer of another model)."""
    if top >= (rows := model.get_input_embeddings().weight.shape[0]):
        raise SurgeryError(f"{where}: its tokenizer gives token id {top} but the model's embedding has {rows} rows "
                           "(a tokenizer of another model?)")


_POSITIONS = re.compile(r"(^|\.)(wpe|position_embeddings?|embed_positions)$")


def position_limit(model) -> int | None:
    """The most tokens a text may have in `model`: the rows of a learned absolute position table (GPT-2's `wpe`,
    BERT's `position_embeddings`; OPT/BART's past their offset of 2, RoBERTa's past its padding index) beside the
    token embedding (not a vision tower's) — a longer text was an IndexError inside the model; None for rotary,
    ALiBi and relative positions."""
    try:
        tokens = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model without one: every table counts
        tokens = None
    path = next((name for name, mod in model.named_modules() if mod is tokens), "")
    scope = path.rpartition(".")[0]  # the token embedding's parent: GPT-2's `transformer`, BERT's `embeddings`
    limits = [mod.num_embeddings - getattr(mod, "offset", 0) - (mod.padding_idx + 1 if mod.padding_idx is not None
                                                                 else 0)
              for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Embedding) and _POSITIONS.search(name) and name.startswith(scope)]
    return min(limits, default=None)


def text_length(model, requested: int, flag: str) -> tuple[int, str]:
    """Tokens kept of each text — `requested`, or the model's position limit if smaller — and why, for a note."""
    limit = position_limit(model)
    if limit is not None and limit < requested:
        return limit, f"the model's {limit} positions"
    return requested, flag


def cut_note(cut: int, total: int, length: int, why: str) -> list[str]:
    """A note for texts cut to their first `length` tokens (none when no text was)."""
    return [f"{cut} of {total} texts were cut to their first {length} tokens ({why})"] if cut else []


def _token_plan(tok, lines, *, model, where, batch_size, max_length, keep_special, max_tokens, seed):
    """[(encoding, mask of the sampled positions)] per batch, the counts and notes: each text cut to
    `max_length` tokens (or the model's position limit), padding (and by default special tokens) excluded, then
    a seeded sample of at most `max_tokens` of the remaining positions, chosen before the model runs so that only
    sampled positions are ever kept."""
    # (the tokenizer takes a machine-sized length: 10²⁰ overflowed inside it; no text has 2³⁰ tokens)
    max_length, why = text_length(model, min(max_length, 1 << 30), "--max-length")
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    encs, keeps, cut = [], [], 0
    for i in range(0, len(lines), batch_size):
        batch = lines[i:i + batch_size]
        enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        # a fast tokenizer keeps what truncation dropped; a slow one is asked again, untruncated
        cut += sum(bool(e.overflowing) for e in enc.encodings) if enc.encodings else \
            sum(len(ids) > max_length for ids in tok(batch)["input_ids"])
        check_vocabulary(model, int(enc["input_ids"].max()), where)
        keep = enc["attention_mask"].bool()
        if not keep_special:
            keep &= ~torch.isin(enc["input_ids"], special)
        encs.append(enc)
        keeps.append(keep)
    n = int(sum(int(k.sum()) for k in keeps))
    g = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=g)[:max_tokens] if n > max_tokens else torch.arange(n)] = True
    plan, at = [], 0
    for enc, keep in zip(encs, keeps):
        m = int(keep.sum())
        sel = keep.clone()
        sel[keep] = chosen[at:at + m]
        at += m
        plan.append((enc, sel))
    return plan, n, int(chosen.sum()), {"max_length": max_length,
                                        "notes": _runs_note(model) + cut_note(cut, len(lines), max_length, why)}


def _metadata(model, model_dir, texts, lines, n, k, seed, keep_special, pad) -> dict:
    """The capture's provenance; `texts_sha256` of the texts run (their lines as read_texts gives them, joined by
    newlines): from the one read, so a pipe's texts are hashed too."""
    return {"model": str(model_dir), "model_class": type(model).__name__, "pad": pad,
            "texts": str(texts),
            "texts_sha256": hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest(),
            "tokens_available": n, "tokens": k, "seed": seed, "special_tokens_kept": keep_special,
            "block_prefix": _block_prefix(model)}


def capture(model_dir: str | os.PathLike, texts: str | os.PathLike, *, max_tokens: int = 4096, seed: int = 0,
            keep_special: bool = False, batch_size: int = 16, max_length: int = 256,
            device: str = "auto") -> Capture:
    """Hidden states (embedding output, then each block's output) at a seeded sample of token positions."""
    tok, model, lines, pad = _load(model_dir, texts, device, max_tokens, max_length, batch_size)
    plan, n, k, extra = _token_plan(tok, lines, model=model, where=model_dir, batch_size=batch_size,
                                    max_length=max_length, keep_special=keep_special, max_tokens=max_tokens, seed=seed)
    dev = next(model.parameters()).device
    run = _run_part(model)[0]
    per_layer: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for enc, sel in plan:
            out = run(**{key: v.to(dev) for key, v in enc.items()}, output_hidden_states=True)
            for j, h in enumerate(out.hidden_states):
                if len(per_layer) <= j:
                    per_layer.append([])
                per_layer[j].append(h.cpu()[sel].float())
    layers = tuple(torch.cat(chunks).contiguous() for chunks in per_layer)
    metadata = _metadata(model, model_dir, texts, lines, n, k, seed, keep_special, pad) | extra | {
        "layers": len(layers)}
    return Capture(layers, metadata)


@dataclass(frozen=True)
class ModuleInputs:
    inputs: Mapping[str, torch.Tensor]  # module path → its input rows (tokens, in_features)
    metadata: dict


def capture_inputs(model_dir: str | os.PathLike, texts: str | os.PathLike, *, targets: str | None = None,
                   max_tokens: int = 4096, seed: int = 0, keep_special: bool = True, batch_size: int = 16,
                   max_length: int = 256, device: str = "auto") -> ModuleInputs:
    """The inputs of the model's `nn.Linear` (and GPT-2 `Conv1D`) modules — those matching the regex `targets`, by
    default every one inside the transformer blocks — at a seeded sample of token positions: the X of `surgery
    tune`. Special tokens are kept by default: they are real inputs of every module."""
    pattern = regex(targets, "--targets") if targets else None
    tok, model, lines, pad = _load(model_dir, texts, device, max_tokens, max_length, batch_size)
    plan, n, k, extra = _token_plan(tok, lines, model=model, where=model_dir, batch_size=batch_size,
                                    max_length=max_length, keep_special=keep_special, max_tokens=max_tokens, seed=seed)
    prefix = _block_prefix(model)
    names = [name for name, mod in model.named_modules() if linear_shape(mod)  # (GPT-2's Conv1D too: inputs alike)
             and (pattern.search(name) if pattern else prefix and name.startswith(prefix + "."))]
    if not names:
        raise SurgeryError(f"{model_dir}: no linear module matches {targets or 'the transformer blocks'!r}")
    run, at = _run_part(model)
    left = [name for name in names if not name.startswith(at)]  # an encoder-decoder's decoder modules
    if left:
        names = [name for name in names if name.startswith(at)]
        if not names:
            raise SurgeryError(f"{model_dir}: the module(s) matching {targets!r} ({', '.join(left[:3])}…) would get "
                               f"no input: {_runs_note(model)[0]}")
        extra["notes"].append(f"{len(left)} module(s) matching {targets!r} outside it are not captured "
                              f"({', '.join(left[:3])}…)")
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    state = {}

    def hook(name):
        def pre(_mod, args):  # modules fed the very same tensor (q/k/v, gate/up) share one copy of its rows
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            first, ref = state["fed"].get(key, (None, None))
            if ref is None or ref() is not x:  # a new tensor (a freed one's address reused is not the same tensor)
                first = name
                state["fed"][key] = (name, weakref.ref(x))
            rows[name].append(rows[first][-1] if first != name else x[state["sel"]].detach().float().cpu())
        return pre

    dev = next(model.parameters()).device
    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for enc, sel in plan:
                state["sel"], state["fed"] = sel.to(dev), {}
                run(**{key: v.to(dev) for key, v in enc.items()})
    finally:
        for h in handles:
            h.remove()
    if idle := [name for name in names if not rows[name]]:
        raise SurgeryError(f"{model_dir}: module(s) {', '.join(idle[:3])} got no input (the model never called them)")
    inputs = {}
    for name, chunks in rows.items():
        twin = next((o for o in inputs if all(a is b for a, b in zip(rows[o], chunks))), None)
        inputs[name] = inputs[twin] if twin else torch.cat(chunks).contiguous()
    metadata = _metadata(model, model_dir, texts, lines, n, k, seed, keep_special, pad) | extra | {"modules": names}
    return ModuleInputs(inputs, metadata)


def save_inputs(cap: ModuleInputs, out: str | os.PathLike) -> None:
    """One tensor `input.<module path>` per module; modules fed the same tensor (q/k/v, gate/up) share one copy,
    named in the metadata's `shared` map."""
    from .io.safetensors_file import atomic_output, save_tensors

    tensors, shared = {}, {}
    for name, x in cap.inputs.items():
        twin = next((key for key, y in tensors.items() if y is x), None)
        if twin is None:
            tensors[f"input.{name}"] = x
        else:
            shared[name] = twin
    meta = dict(cap.metadata, shared=shared)
    with atomic_output(Path(out), is_dir=False) as tmp:
        save_tensors(tensors, tmp, {"format": "pt", "surgery_module_inputs": json.dumps(meta, sort_keys=True)})


def load_inputs(path: str | os.PathLike) -> dict:
    """{module path: TensorRef (tokens, in_features)} of a module-inputs file, checked from the header."""
    from .io.jsonfile import check, parse_object
    from .io.safetensors_file import tensor_refs

    refs, metadata = tensor_refs(path)
    if "surgery_module_inputs" not in metadata:
        raise SurgeryError(f"{path}: not a module-inputs file (write one with surgery capture --module-inputs)")
    where = f"{path}: metadata surgery_module_inputs"
    meta = parse_object(metadata["surgery_module_inputs"], where)
    names = check(meta.get("modules", []), "str list", where, "modules")
    shared = meta.get("shared") or {}
    if not isinstance(shared, dict) or not all(isinstance(v, str) for v in shared.values()):
        raise SurgeryError(f"{where}: shared must map module names to tensor names")
    out = {}
    for name in names:
        key = shared.get(name, f"input.{name}")
        ref = refs.get(key)
        if ref is None or len(ref.shape) != 2 or not ref.dtype.is_floating_point:
            raise SurgeryError(f"{path}: no (tokens, in_features) input for module {name}")
        if not ref.shape[0] or not ref.shape[1]:
            raise SurgeryError(f"{path}: the inputs of module {name} are empty (shape {tuple(ref.shape)})")
        out[name] = ref
    return out


def input_key(name: str, inputs: Mapping) -> str | None:
    """The module path in a module-inputs file for an adapter module name (PEFT-prefixed, bare or kohya); else the
    one path that ends the name or that the name ends (`model.layers.0.…` of a *ForCausalLM adapter against
    `layers.0.…` captured with AutoModel, or the other way)."""
    from .io import kohya_name
    from .io.peft import PREFIX

    path = name.removeprefix(PREFIX)
    for p in (name, path):
        if p in inputs:
            return p
    if found := [p for p in inputs if kohya_name(p) == name]:
        return found[0]
    found = [p for p in inputs if path.endswith("." + p) or p.endswith("." + path)]
    return found[0] if len(found) == 1 else None


def match_inputs(adapter, inputs: Mapping) -> dict:
    """{adapter module name: its captured inputs} for the adapter's linear modules found in `inputs`
    (module path → (tokens, in), from `load_inputs`)."""
    keys = {name: input_key(name, inputs) for name, m in adapter.modules.items() if m.kind == "linear"}
    return {name: inputs[key] for name, key in keys.items() if key is not None}


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
        if t.dtype not in (torch.float32, torch.float64):  # bf16, fp16, fp8: widened exactly, as the maths needs
            t = t.float()
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
        if len(ref.shape) != 2 or not ref.shape[1] or not ref.dtype.is_floating_point:
            raise SurgeryError(f"{path}: hidden.{i} is not a finite (tokens, hidden) matrix")
    from .io.jsonfile import parse_object

    meta = parse_object(metadata.get("surgery_capture", "{}"), f"{path}: metadata surgery_capture")
    return Capture(_LazyLayers(path, layers), meta)
