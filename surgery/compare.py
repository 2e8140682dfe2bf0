"""What an adapter change does to a causal LM's predictions (`surgery compare`).

The base model runs with adapter A merged in memory (this project's merge maths: `merge.plan_merge` and
`merge.changed_tensor`, no PEFT at run time) and then with adapter B (or alone), on the same texts, one text per
line, each tokenized as the model's tokenizer does by default. Over every predicted token (position t predicts
token t + 1): the mean KL(p_A ‖ p_B) of the next-token distributions in nats, the top-1 agreement and each side's
perplexity, in float64 from the logits; per text and over all texts (token-weighted).
"""
from __future__ import annotations

import math
import os
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .adapter import Adapter
from .device import resolve_device
from .errors import SurgeryError


@dataclass(frozen=True)
class TextComparison:
    text: int  # line number among the non-empty lines (0-based)
    tokens: int  # predicted tokens
    kl: float  # mean KL(p_A ‖ p_B), nats
    top1_agreement: float
    perplexity_a: float
    perplexity_b: float
    kl_by_position: tuple[float, ...]


@dataclass(frozen=True)
class Comparison:
    texts: tuple[TextComparison, ...]
    notes: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.texts)

    def _mean(self, values) -> float:
        return sum(v * t.tokens for v, t in zip(values, self.texts)) / self.tokens if self.tokens else 0.0

    @property
    def kl(self) -> float:
        return self._mean(t.kl for t in self.texts)

    @property
    def top1_agreement(self) -> float:
        return self._mean(t.top1_agreement for t in self.texts)

    def perplexity(self, side: str) -> float:
        return math.exp(self._mean(math.log(getattr(t, f"perplexity_{side}")) for t in self.texts))

    def to_dict(self) -> dict:
        return {"kl": self.kl, "top1_agreement": self.top1_agreement, "perplexity_a": self.perplexity("a"),
                "perplexity_b": self.perplexity("b"), "tokens": self.tokens,
                "texts": [asdict(t) for t in self.texts], "notes": list(self.notes)}


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _causal_lm(model_dir, dtype: torch.dtype, device):
    """(tokenizer, model) of a local causal LM: the class its config names, else AutoModelForCausalLM."""
    try:
        import transformers
    except ImportError:
        raise SurgeryError("surgery compare needs transformers: pip install 'surgery[capture]'") from None
    from transformers.utils import logging as hf_logging

    from .capture import _model_class

    cls = _model_class(model_dir)
    if cls is transformers.AutoModel or not cls.__name__.endswith("ForCausalLM"):
        cls = transformers.AutoModelForCausalLM
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = cls.from_pretrained(model_dir, local_files_only=True, dtype=dtype).eval()
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{model_dir}: not a local transformers causal LM with a tokenizer "
                           f"({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return tok, model.to(device)


class _Weights:
    """Puts an adapter's merged tensors into a loaded model and takes them out again (from the checkpoint), so that
    one copy of the model serves both sides. A tensor the merge creates (an lm_head tied to the embedding) gets
    a parameter of its own and the tie back afterwards."""

    def __init__(self, model, ck, compute: torch.dtype, device):
        self.model, self.ck, self.compute, self.device = model, ck, compute, device
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.changed: dict[str, torch.nn.Parameter | None] = {}

    def _slot(self, name: str):
        module, _, attr = name.rpartition(".")
        return self.model.get_submodule(module), attr

    def apply(self, adapter: Adapter) -> list[str]:
        from .merge import changed_tensor, plan_merge, source

        plan = plan_merge(self.ck, [adapter], [1.0])
        if plan.vocab:
            raise SurgeryError(f"{adapter.source}: resizes the vocabulary ({plan.vocab[0]} → {plan.vocab[1]} rows), "
                               "which the loaded model cannot change in place; compare the merged model instead")
        for name, change in plan.changes.items():
            p = self.params.get(name)
            if p is None:
                raise SurgeryError(f"{adapter.source}: changes {name}, which the loaded model has no parameter of "
                                   "(transformers loads this base's tensors renamed or fused, as MoE experts); "
                                   "compare runs on bases loaded as stored: merge it and evaluate the merged model")
            spec = source(self.ck, plan, name)
            if tuple(spec.shape) != tuple(p.shape):
                raise SurgeryError(f"{self.ck.root}: {name} is {list(spec.shape)} on disk but {list(p.shape)} in "
                                   "the loaded model; compare needs the checkpoint's own layout")
            t, _ = changed_tensor(spec, change, name in plan.transposed, p.dtype, self.compute, self.device)
            if not torch.isfinite(t).all():
                raise SurgeryError(f"{adapter.source}: merging into {name} gives NaN or Inf in {p.dtype}")
            with torch.no_grad():
                if change.source is not None:  # untie: the merged head is its own tensor
                    module, attr = self._slot(name)
                    self.changed[name] = getattr(module, attr)
                    setattr(module, attr, torch.nn.Parameter(t.to(p.device), requires_grad=False))
                else:
                    self.changed[name] = None
                    p.copy_(t)
        return list(plan.notes)

    def restore(self) -> None:
        from .io.checkpoint import read_tensor

        with torch.no_grad():
            for name, tied in self.changed.items():
                if tied is not None:
                    module, attr = self._slot(name)
                    setattr(module, attr, tied)
                else:
                    p = self.params[name]
                    p.copy_(read_tensor(self.ck.tensors[name]).to(p.dtype))
        self.changed = {}


def _one_text(i: int, target: torch.Tensor, lpa: torch.Tensor, lpb: torch.Tensor) -> TextComparison:
    """The figures of one text from both sides' log-probabilities (T, V), float64, and the tokens predicted (T,)."""
    kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp_min(0.0)  # (T,)
    nll_a = -lpa.gather(-1, target[:, None])[:, 0]
    nll_b = -lpb.gather(-1, target[:, None])[:, 0]
    return TextComparison(
        text=i, tokens=int(target.numel()), kl=float(kl.mean()),
        top1_agreement=float((lpa.argmax(-1) == lpb.argmax(-1)).double().mean()),
        perplexity_a=math.exp(float(nll_a.mean())), perplexity_b=math.exp(float(nll_b.mean())),
        kl_by_position=tuple(float(x) for x in kl))


def compare(model_dir: str | os.PathLike, a: Adapter, b: Adapter | None, texts: str | os.PathLike, *,
            device: str = "auto", dtype: str = "float32", max_tokens: int = 512,
            progress: Callable[[str], None] | None = None) -> Comparison:
    """Next-token predictions of `model_dir` with adapter `a` against `b` (None: the base alone) on `texts`.

    dtype: the model's weights and activations (merged weights rounded once to it); log-probabilities in float64.
    max_tokens: each text's tokens are cut to this many (or to the model's position table; a note says how many
    texts were cut). Memory: the model once (the adapters' tensors are merged into it and read back from the
    checkpoint afterwards), plus side A's logits for every text (tokens × vocabulary, in the model's dtype).
    """
    from .capture import check_vocabulary, cut_note, read_texts, text_length
    from .io.checkpoint import open_checkpoint
    from .io.hub import resolve

    model_dir = resolve(model_dir)
    if dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    if max_tokens < 2:
        raise SurgeryError(f"--max-tokens must be at least 2 (one predicted token), got {max_tokens}")
    lines = read_texts(texts)
    dev = resolve_device(device)
    ck = open_checkpoint(model_dir)
    if ck.quant is not None:
        raise SurgeryError(f"{model_dir}: a quantized base; compare runs on float bases (merge it first)")
    tok, model = _causal_lm(model_dir, DTYPES[dtype], dev)
    compute = torch.float64 if dtype == "float64" else torch.float32
    length, why = text_length(model, max_tokens, "--max-tokens")
    encoded, cut = [], 0
    for i, line in enumerate(lines):
        ids = tok(line, return_tensors="pt")["input_ids"]
        cut += ids.shape[1] > length
        if (ids := ids[:, :length]).shape[1] >= 2:
            encoded.append((i, ids))
    if not encoded:
        raise SurgeryError(f"{texts}: no text has two tokens or more (nothing to predict)")
    check_vocabulary(model, max(int(ids.max()) for _, ids in encoded), model_dir)
    weights = _Weights(model, ck, compute, dev)
    notes = cut_note(cut, len(lines), length, why)

    def logits(adapter: Adapter | None):
        try:
            if adapter is not None:
                notes.extend(weights.apply(adapter))
            with torch.no_grad():
                for i, ids in encoded:
                    yield i, ids[0, 1:], model(input_ids=ids.to(dev)).logits[0, :-1].cpu()
        finally:
            weights.restore()

    side_a = list(logits(a))  # as the model gives them: the same model gives the same bits on both sides
    results = []
    with closing(logits(b)) as side_b:
        for (i, target, la), (_, _, lb) in zip(side_a, side_b):
            results.append(_one_text(i, target, torch.log_softmax(la.double(), -1), torch.log_softmax(lb.double(), -1)))
            if progress:
                progress(str(i))
    return Comparison(tuple(results), tuple(dict.fromkeys(notes)))
