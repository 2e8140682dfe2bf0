"""Pictures for the CLI (matplotlib, the `plot` extra), in the format the path names: the ID profile, the
singular-value spectrum and compare's KL by position."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from surgery import SurgeryError

ENERGIES = (0.9, 0.95, 0.99)
_TYPE = re.compile(r"(?:^|[._])((?:q|k|v|o|gate|up|down)_proj|to_(?:q|k|v|out(?:_0)?)|query|key|value|dense|"
                   r"fc1|fc2|c_attn|c_proj|c_fc|w1|w2|w3|proj_in|proj_out|proj|lm_head|embed_tokens)$")


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError("--plot needs matplotlib: pip install 'surgery[plot]'") from None
    return plt


# formats written byte-identically run after run (no time stamp; SVG ids from a fixed salt); PostScript's creation
# date cannot be left out
FORMATS = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}, "jpg": None, "jpeg": None, "webp": None,
           "tif": None, "tiff": None, "gif": None}


def picture_format(path) -> str:
    """The picture format `path`'s suffix names (png without one): what matplotlib writes there, never PNG bytes
    under an .svg or .pdf name."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    if suffix not in FORMATS:
        raise SurgeryError(f"{path}: --plot writes {', '.join(FORMATS)} pictures (by the suffix), not .{suffix}")
    return suffix


def check_plot(path, inputs) -> None:
    """Before the work: matplotlib is there, the suffix names a picture format, the path is a new output."""
    from surgery.io import check_output

    pyplot()
    check_output(path, inputs, force=True)
    picture_format(path)


def _save(plt, fig, path) -> None:
    """Write `fig` at `path` in the format its suffix names, atomically (an unwritable path is one error line),
    and free it."""
    from surgery.io.safetensors_file import atomic_output

    fig.tight_layout()
    try:
        with atomic_output(Path(path), is_dir=False) as tmp:
            fmt = picture_format(path)
            with plt.rc_context({"svg.hashsalt": "surgery"}):
                fig.savefig(tmp, dpi=120, format=fmt, metadata=FORMATS[fmt])
    finally:
        plt.close(fig)


def module_type(name: str) -> str:
    """q_proj, to_k, fc1, …: the layer type a module name ends with (PEFT dotted or kohya underscored)."""
    m = _TYPE.search(name)
    return m[1] if m else re.split(r"[._]", name)[-1]


def adapter_rank(spectra: dict[str, torch.Tensor], energy: float) -> int:
    """The smallest K with which one `--rank K` for every module keeps `energy` of the adapter's Σσ²."""
    depth = max((len(S) for S in spectra.values()), default=0)
    kept = torch.zeros(depth, dtype=torch.float64)
    for S in spectra.values():
        e = S.double().square()
        kept[: len(e)] += e.cumsum(0)
        kept[len(e):] += e.sum()
    total = float(kept[-1]) if depth else 0.0
    return int((kept < energy * total * (1 - 1e-12)).sum()) + 1 if total > 0 else 0


def plot_spectrum(spectra: dict[str, torch.Tensor], path, title: str) -> None:
    """σᵢ/σ₁ (log) against i for every module, one colour per module type, with the adapter-wide ranks that keep
    90/95/99 % of the energy marked."""
    plt = pyplot()
    groups = defaultdict(list)
    for name, S in spectra.items():
        if len(S) and float(S[0]) > 0:
            groups[module_type(name)].append(S.double() / S[0])
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for c, (kind, curves) in enumerate(sorted(groups.items())):
        for j, s in enumerate(curves):
            ax.plot(range(1, len(s) + 1), s.clamp_min(1e-12).numpy(), color=colours(c % colours.N), alpha=0.55,
                    lw=1.2, label=f"{kind} ({len(curves)})" if j == 0 else None)
    for e, style in zip(ENERGIES, (":", "--", "-.")):
        k = adapter_rank(spectra, e)
        ax.axvline(k, color="black", ls=style, lw=1, label=f"rank {k} keeps {e:.0%} of the energy")
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σᵢ / σ₁ (each module)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower left", ncols=2)
    _save(plt, fig, path)


def plot_ids(results, path) -> None:
    """The TwoNN ID of every layer, with its bootstrap spread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(range(len(results)), [r.dimension for r in results], yerr=[r.spread for r in results], marker="o")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("TwoNN intrinsic dimension")
    _save(plt, fig, path)


def plot_kl(texts, path) -> None:
    """KL(p_A ‖ p_B) by token position, averaged over the texts long enough to reach it (surgery compare)."""
    plt = pyplot()
    depth = max(len(t.kl_by_position) for t in texts)
    sums, counts = [0.0] * depth, [0] * depth
    for t in texts:
        for i, v in enumerate(t.kl_by_position):
            sums[i] += v
            counts[i] += 1
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(1, depth + 1), [s / c for s, c in zip(sums, counts)])
    ax.set_xlabel("predicted token position")
    ax.set_ylabel("mean KL(p_A ‖ p_B), nats")
    _save(plt, fig, path)
