"""Human tables and JSON documents for the CLI's output."""
from __future__ import annotations

from collections import Counter

from surgery.adapter import NOT_PLAIN, Adapter
from surgery.io import gguf_file
from surgery.rank import energy_rank, numerical_rank
from surgery.squeeze import SqueezeReport
from surgery.tera import _describe

ENERGIES = (0.9, 0.95, 0.99)


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def inspect_json(a: Adapter, spectra=None, sigmas: bool = True) -> dict:
    """`spectra` {module (an expert parameter's experts as `name[e]`): σ's}; with `sigmas` False only the expert
    parameters' numerical ranks are shown from them."""
    mods = []
    for name, m in a.modules.items():
        d = {"name": name, "type": m.algo, "kind": m.kind, "shape": [m.out_features, m.in_features],
             "weight_shape": list(m.shape), "rank": m.rank, "scale": m.scale, "dtype": _dtype(m), "dora": m.dora,
             "lora_bias": m.bias is not None and m.algo == "lora", "params": m.num_params()}
        if m.algo in ("loha", "lokr", "diff"):
            d["factors"] = {role: list(t.shape) for role, t in m.tensors.items()}
        if hasattr(m, "spec"):
            d["tera"] = m.spec.to_json()
        if m.kind == "experts":
            d["experts"] = m.experts
        if spectra is not None and m.kind == "experts":
            per = [spectra[f"{name}[{e}]"] for e in range(m.experts)]
            if sigmas:
                d["experts_singular_values"] = [[float(x) for x in S] for S in per]
            d["experts_numerical_rank"] = [numerical_rank(S, (m.out_features, m.in_features)) for S in per]
        elif spectra is not None and sigmas:
            S = spectra[name]
            d["singular_values"] = [float(x) for x in S]
            d["numerical_rank"] = numerical_rank(S, (m.out_features, m.in_features))  # of ΔW itself ("rank" is its factors' bound)
            d["rank_for_energy"] = {str(e): energy_rank(S, e) for e in ENERGIES}
        mods.append(d)
    return {
        "format": a.format, "path": str(a.source), "modules": mods, "params": a.num_params(),
        "passthrough": [{"key": k, "shape": list(t.shape), "dtype": _dtype(t)} for k, t in a.passthrough.items()],
        "config": dict(a.config), "metadata": dict(a.metadata), "notes": list(a.notes),
    }


def printable(text: str) -> str:
    """`text` with control characters escaped (names read from a broken file may hold any): nothing the terminal
    acts on, no line breaks."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _counts(values) -> str:
    return ", ".join(f"{v} ×{n}" if n > 1 else f"{v}" for v, n in sorted(Counter(values).items()))


def _kind(m) -> str:
    """`conv`, `linear`, … for LoRA; the algorithm first for the others (`loha conv`, `lokr linear`, `diff linear`)."""
    if m.algo in ("lora", "tera"):
        return m.kind
    # LyCORIS stores a non-Tucker conv's LoHa/LoKr factors flattened: its kernel is the base's to say
    kind = "2-D (linear, or conv stored flat)" if m.kind == "linear" and m.algo in ("loha", "lokr") else m.kind
    return f"{m.algo} {kind}"


def inspect_table(a: Adapter, spectra=None, sigmas: bool = True) -> str:
    mods = a.modules.values()
    lines = [
        f"{a.source}: {a.format} adapter, {len(a.modules)} modules, {a.num_params():,} "
        f"{'trainable λ entries' if a.format == 'tera' else 'factor parameters'}",
        f"kinds: {_counts(_kind(m) for m in mods)}   ranks: {_counts(m.rank for m in mods)}   "
        f"dtype: {_counts(_dtype(m) for m in mods)}",
    ]
    if a.passthrough:
        lines.append(f"pass-through tensors: {len(a.passthrough)} ({printable(', '.join(list(a.passthrough)[:4]))}"
                     f"{', …' if len(a.passthrough) > 4 else ''})")
    lines += [f"{key} {a.config[key]}: {meaning}; it stays a PEFT adapter{' or GGUF' if key in gguf_file.KEPT else ''}"
              " (merges and other formats refuse it)" for key, meaning in NOT_PLAIN.items() if a.config.get(key)]
    header = ["module", "kind", "out×in", "rank", "scale", "params"]
    if spectra is not None and sigmas:
        header += ["σ1"] + [f"r@{e:g}" for e in ENERGIES]
    rows = []
    for name, m in a.modules.items():
        shape = f"{m.experts}×{m.out_features}×{m.in_features}" if m.kind == "experts" else \
            f"{m.out_features}×{m.in_features}"
        row = [name + (" [DoRA]" if m.dora else ""), _kind(m), shape, str(m.rank), f"{m.scale:.6g}",
               f"{m.num_params():,}"]
        if spectra is not None and sigmas and m.kind == "experts":  # the largest σ₁ and rank over the experts
            per = [spectra[f"{name}[{e}]"] for e in range(m.experts)]
            row += [f"{max((float(S[0]) for S in per if len(S)), default=0):.4g}"] + [
                "max " + str(max(energy_rank(S, e) for S in per)) for e in ENERGIES]
        elif spectra is not None and sigmas:
            S = spectra[name]
            row += [f"{float(S[0]):.4g}" if len(S) else "0"] + [str(energy_rank(S, e)) for e in ENERGIES]
        rows.append(row)
    lines += ["", _table(header, rows, right=set(range(2, len(header))))]
    experts = [(n, m) for n, m in a.modules.items() if m.kind == "experts"]
    if experts:
        held = "llama.cpp ffn_*_exps tensors" if a.format == "gguf" else "PEFT target_parameters"
        lines += ["", f"expert parameters (MoE, {held}): ΔW per expert = scale · B_e @ A_e; "
                  "'out×in' is experts × out × in, 'params' all experts'"]
        for name, m in experts:
            if spectra is not None:
                per = [spectra[f"{name}[{e}]"] for e in range(m.experts)]
                ranks = [numerical_rank(S, (m.out_features, m.in_features)) for S in per]
                lines.append(f"  {name}: numerical rank per expert {_counts(ranks)}")
                if sigmas:
                    lines += [f"    expert {e}: σ = " + " ".join(f"{float(x):.4g}" for x in S[:m.rank])
                              for e, S in enumerate(per)]
    if a.format == "tera":
        lines += ["", "TeRA modules (modes out × in, ranks; 'rank' is rank(ΔW) = min(ΠR_out, ΠR_in), 'params' "
                  "the trainable λ entries):"]
        order = a.config.get("order") or 3
        for name, m in a.modules.items():
            few = [d for d, modes in ((m.out_features, m.spec.out_modes), (m.in_features, m.spec.in_modes))
                   if len(modes) < order]
            lines.append(f"  {name}: {_describe(m.spec)}" +
                         (f"  (note: {', '.join(map(str, few))} cannot be split into {order} modes; fewer used)"
                          if few else ""))
    return "\n".join(lines)


def squeeze_table(r: SqueezeReport) -> str:
    outputs = r.output_rel_error() is not None
    out = lambda e: "–" if e is None else f"{e:.3e}"  # noqa: E731
    rows = [[m.name + (" [DoRA]" if m.dora else ""), f"{m.old_rank}→{m.new_rank}", f"{m.energy_kept:.6f}",
             f"{m.rel_error:.3e}"] + ([out(m.output_rel_error), out(m.plain_output_rel_error)] if outputs else [])
            + [f"{m.params_before:,}→{m.params_after:,}"] for m in r.modules]
    head = ["module", "rank", "energy kept", "rel. error"] + (["output error", "plain's"] if outputs else [])
    table = _table(head + ["params"], rows, right=set(range(1, len(head) + 1)))
    ratio = r.params_after / r.params_before if r.params_before else 1.0
    text = (f"{table}\n\ntotal: {r.params_before:,} → {r.params_after:,} parameters ({ratio:.1%}), "
            f"relative Frobenius error over all modules {r.rel_error:.3e} ({r.method} SVD)")
    if outputs:
        text += (f"\noutput error ‖X(ΔW_k − ΔW)ᵀ‖/‖XΔWᵀ‖ on the captured inputs: {r.output_rel_error():.3e} "
                 f"(plain truncation: {r.output_rel_error(plain=True):.3e})")
    return text


def survival_table(q: dict) -> str:
    """How much of the adapter each re-quantized weight kept (merge --requantize)."""
    rows = [[m["name"], f"{m['delta_norm']:.4g}", f"{m['adapter_survived']:.4f}"] for m in q["modules"]]
    return "\n".join([_table(["weight", "‖ΔW‖", "adapter survived"], rows, right={1, 2}), "",
                      f"adapter survived, all {len(rows)} re-quantized weights: {q['adapter_survived']:.4f} "
                      f"(1 − ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖; 1: arrived exactly, 0: no closer than the unmerged base)", ""])


def extract_table(r) -> str:
    rows = [[m.name, f"{m.shape[0]}×{m.shape[1]}", str(m.rank), f"{m.energy_kept:.6f}", f"{m.rel_error:.3e}",
             f"{m.params:,}"] for m in r.modules]
    lines = [_table(["tensor", "out×in", "rank", "energy kept", "rel. error", "params"], rows, right={1, 2, 3, 4, 5}),
             "", f"total: {len(r.modules)} modules, {r.params:,} factor parameters",
             f"ΔW = {r.finetuned} (fine-tuned) − {r.base} (base); the adapter records the base as its "
             "base_model_name_or_path"]
    if r.unchanged:
        lines.append(f"unchanged (no module written): {len(r.unchanged)}")
    lines += [f"not extracted: {m}" for m in r.mismatched]
    for what, names in (("carried (--carry-changed)", r.carried),
                        ("changed but not targeted" + (", not carried" if r.carried else ""), r.untargeted_changed)):
        if names:
            lines.append(f"{what} ({len(names)}): {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
    return "\n".join(lines)


def convert_table(report) -> str:
    rows = [[r.name, f"{r.shape[0]}×{r.shape[1]}", r.detail, f"{r.params:,}", f"{r.energy_kept:.6f}",
             f"{r.rel_error:.3e}"] for r in report]
    return _table(["module", "out×in", "structure", "params", "energy kept", "rel. error"], rows, right={1, 3, 4, 5})


def combine_table(r) -> str:
    ranks = lambda rs: "+".join("–" if x is None else str(x) for x in rs)  # noqa: E731
    rows = [[m.name, ranks(m.input_ranks), str(m.new_rank), f"{m.energy_kept:.6f}", f"{m.rel_error:.3e}"]
            + ([f"{m.kept_fraction:.3f}"] if m.kept_fraction is not None else []) for m in r.modules]
    header = ["module", "input ranks", "rank", "energy kept", "rel. error"]
    if any(m.kept_fraction is not None for m in r.modules):
        header.append("entries kept")
    weights = ", ".join(f"{w:g}" for w in r.weights)
    return (f"{_table(header, rows, right=set(range(1, len(header))))}\n\n{r.method} of {len(r.weights)} adapters "
            f"(weights {weights}); errors against the exact combination")
