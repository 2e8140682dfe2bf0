"""`surgery` commands: each parses options, calls one library function and prints.

Errors from the library (`SurgeryError`) become one `error: …` line on stderr and exit status 1.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import sys
from pathlib import Path

import click
import torch

from surgery import (Budget, Energy, Exact, FixedRank, SurgeryError, load_adapter, parse_count, parse_rank_map,
                     save_adapter, squeeze)
from surgery.errors import regex
from surgery.io import FORMATS, check_output, default_output
from surgery.io.gguf_file import TYPES as GGUF_TYPES
from surgery.io.safetensors_file import atomic_output
from surgery.combine import METHODS as COMBINE_METHODS
from surgery.squeeze import METHODS
from surgery.squeeze import spectra as compute_spectra

from .render import (_table, combine_table, convert_table, extract_table, inspect_json, inspect_table, printable,
                     squeeze_table, survival_table)


class Group(click.Group):
    """Every command's one error path: bad input and OS failures are one `error:` line and exit status 1; a
    traceback only for a bug, with a line asking for a report."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except SurgeryError as e:
            click.echo(f"error: {printable(str(e))}", err=True)
        except BrokenPipeError:  # `surgery … | head`: the reader left early; nothing to say, as `yes | head`
            with contextlib.suppress(OSError, ValueError):  # (and no second failure flushing stdout at exit)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)  # 128 + SIGPIPE: what a shell shows for a writer the closed pipe ended
        except OSError as e:
            where = " → ".join(str(f) for f in (e.filename, e.filename2) if f)
            click.echo(f"error: {printable(where + ': ' if where else '')}{e.strerror or e}", err=True)
        except MemoryError:
            click.echo("error: out of memory (try --device cpu, a smaller --shard-size or fewer adapters)", err=True)
        except torch.cuda.OutOfMemoryError as e:  # a RuntimeError, and torch's message runs to several sentences
            asked = re.search(r"Tried to allocate ([\d.]+ \w+)", str(e))
            gpu = re.search(r"GPU (\d+)", str(e))
            what = " ".join(filter(None, (asked and f"tried to allocate {asked[1]}", gpu and f"on GPU {gpu[1]}")))
            click.echo(f"error: out of GPU memory{f' ({what})' if what else ''}; free the GPU, or use --device cpu",
                       err=True)
        except Exception:
            import traceback

            traceback.print_exc()
            click.echo("error: this is a bug in surgery; please report it with the command line and the traceback "
                       "above", err=True)
        ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgery")
def main():
    """Model surgery on adapter checkpoints (PEFT, kohya/LyCORIS, diffusers, llama.cpp GGUF)."""


def _not_empty(ptype: click.ParamType, value, param, ctx) -> None:
    """A path argument or option is never "" (`-o ""` meant "no -o", and the result went beside the input)."""
    if value == "":
        ptype.fail("an empty path (an unset shell variable?)", param, ctx)


class Source(click.ParamType):
    """A local path, or a Hugging Face repo id (`org/name`, `org/name@revision`) taken to its local snapshot
    (surgery.io.hub): from the cache, or downloaded unless HF_HUB_OFFLINE is set; a local path always wins."""

    name = "path"

    def __init__(self, role: str | None):
        self.role = role  # None: the command resolves it once it knows what it reads (resolve_model)

    def convert(self, value, param, ctx):
        from surgery.io.hub import resolve

        _not_empty(self, value, param, ctx)
        revision = (ctx.meta if ctx else {}).get(REVISION)
        if revision and value is not None and os.path.lexists(value):  # a local path always wins
            click.echo(f"note: {value}: a local path, read as it is (--revision {revision} applies to Hub repo ids)",
                       err=True)
        if value is None or self.role is None:
            return value
        return resolve(value, revision, self.role)


class _Path(click.Path):
    """A path option, never empty."""

    def convert(self, value, param, ctx):
        _not_empty(self, value, param, ctx)
        return super().convert(value, param, ctx)


ADAPTER, MODEL, REVISION = Source("adapter"), Source("model"), "surgery.revision"
PATH = _Path(path_type=str)


def resolve_model(value, role: str):
    """A MODEL argument left to the command (`Source(None)`), taken to its local path or snapshot for `role`."""
    from surgery.io.hub import resolve

    return None if value is None else resolve(value, click.get_current_context().meta.get(REVISION), role)


def revision_option(f):
    return click.option("--revision", is_eager=True, expose_value=False,
                        callback=lambda ctx, _, value: ctx.meta.__setitem__(REVISION, value),
                        help="Branch, tag or commit of the inputs named by Hugging Face repo ids (or write "
                             "org/name@revision).")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")(f)


def load(path, alpha=None):
    """`load_adapter`, with every note its reader made (an assumed scale, …) printed as one line on stderr."""
    a = load_adapter(path, alpha)
    for note in a.notes:
        click.echo(f"note: {note}", err=True)
    return a


def output_option(f):
    return click.option("-o", "--output", "out", type=PATH,
                        help="Where to write: a .safetensors path is one file, any other path a PEFT directory "
                             "(default: beside the input, named after what was done).")(f)


def alpha_option(f):
    return click.option("--alpha", type=float, help="lora_alpha of a PEFT-keyed file without a config (default: "
                                                     "alpha = r, scale 1, with a note).")(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="Replace an existing output (never an input).")(f)


def output_for(adapter, tag: str, fmt: str | None, source=None) -> Path:
    """The default output of `adapter` (read from `source`): beside it, in `fmt`'s layout (default: the input's)."""
    return default_output(source or adapter.source, tag, fmt or adapter.format)


def folds(adapter, out, fmt) -> bool:
    """Whether the output at `out` is a single file that stores scales in its factors (so computed factors take
    them before their one rounding)."""
    from surgery.io import output_format

    try:
        return output_format(adapter, out, fmt) in ("peft-file", "diffusers")
    except SurgeryError:
        return False  # save_adapter says why, after the work is planned


def base_option(names: bool = False):
    """--base; `names`: the command also names modules after the base's tensors (convert --to …), and resolves a
    repo id itself (GGUF names need only its config.json)."""
    return click.option("--base", type=Source(None) if names else MODEL,
                        help="The base model (file, folder, diffusers component or pipeline): " + (
                            "--to diffusers/peft/kohya name modules after its tensors; " if names else "")
                        + "LoHa/LoKr convs stored flattened get their kernel sizes from it.")


def base_shapes_of(adapter, base):
    """The base's weight shapes for the adapter's LoHa/LoKr modules (None without --base)."""
    if base is None:
        return None
    from surgery.merge import base_shapes

    return base_shapes(adapter, base)


DEVICE_HELP = "Where the maths runs: auto (CUDA when present), cpu, cuda or cuda:N."


def device_option(f):
    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(f)


SEED = click.IntRange(0, 2**63 - 1)  # what torch.Generator.manual_seed takes; TeRA's formula reduces mod 2⁶³ anyway


def compute_options(stored: str = "the written factors (keep: the input's)", seed: bool = True):
    """--device, --dtype (the storage dtype of `stored`) and, for commands that draw random numbers, --seed."""
    def decorate(f):
        if seed:
            f = click.option("--seed", type=SEED, default=0, show_default=True,
                             help="Seed of the random draws (randomized SVD, DARE masks).")(f)
        f = click.option("--dtype", type=click.Choice(["keep", "float32", "bfloat16", "float16"]), default="keep",
                         show_default=True, help=f"Storage dtype of {stored}.")(f)
        return device_option(f)
    return decorate


def progress_bar(length: int | None, label: str):
    """A click progress bar on stderr when it is a terminal (a counter when the length is unknown), else a no-op."""
    if not sys.stderr.isatty():
        return _Silent()
    if length is None:
        return _Counter(label)
    return click.progressbar(length=length, label=label, file=sys.stderr)


def emit(doc: dict, table: str, path, warnings, as_json: bool) -> None:
    """A command's result: JSON (with the output path) or the human table, then warnings on stderr."""
    if as_json:
        click.echo(json.dumps(doc | {"output": str(path)}, indent=2))
    else:
        click.echo(table)
        click.echo(f"wrote {path}")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def rank_rule(rank, energy, budget, rank_map=()):
    """The one rank rule the user chose (a usage error unless exactly one is given)."""
    chosen = [o for o, v in (("--rank", rank), ("--energy", energy), ("--budget", budget),
                             ("--rank-map", rank_map or None)) if v is not None]
    if len(chosen) != 1:
        names = "--rank, --energy, --budget" + (", --rank-map" if rank_map is not None else "")
        raise click.UsageError(f"give exactly one of {names}" + (f" (got {', '.join(chosen)})" if chosen else ""))
    return (FixedRank(rank) if rank is not None else Energy(energy) if energy is not None
            else Budget(parse_count(budget)) if budget is not None else parse_rank_map(rank_map))


def rule_tag(rank, energy, budget, rank_map=()) -> str:
    """The output-name tag of a rank rule: r4, e0.95, b2M, map ("" when none was given)."""
    return (f"r{rank}" if rank is not None else f"e{energy:g}" if energy is not None
            else f"b{budget}" if budget is not None else "map" if rank_map else "")


class _Counter:
    def __init__(self, label):
        self.label, self.n = label, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        click.echo("", err=True)
        return False

    def update(self, n):
        self.n += n
        click.echo(f"\r{self.label}: {self.n} done", nl=False, err=True)


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


@main.command()
@revision_option
@click.argument("adapter", type=ADAPTER)
@click.option("--spectrum", is_flag=True, help="Also compute each module's singular values (exact, no dense ΔW).")
@click.option("--plot", type=PATH,
              help="With --spectrum: draw σᵢ/σ₁ of every module to this picture (.png, .svg, .pdf, …; needs "
                   "surgery[plot]).")
@json_option
def inspect(adapter, spectrum, plot, as_json):
    """Show an adapter's format, modules, ranks, scales and sizes."""
    if plot and not spectrum:
        raise click.UsageError("--plot goes with --spectrum")
    if plot:
        from .plot import check_plot

        check_plot(plot, [adapter])  # a missing matplotlib or a bad path is said before the work
    a = load(adapter)
    spectra = None
    if spectrum and a.format == "tera":  # float64, as TeRA's own exact SVD computes it
        spectra = {n: m.svd().S for n, m in a.modules.items()}
    elif spectrum:
        spectra = compute_spectra(a)
    elif experts := {n: m for n, m in a.modules.items() if m.kind == "experts"}:  # their per-expert ranks
        spectra = compute_spectra(a.with_modules(experts))
    if plot:
        from .plot import plot_spectrum

        plot_spectrum(spectra, plot, f"{Path(adapter).name}: {a.format} adapter, {len(a.modules)} modules")
    click.echo(json.dumps(inspect_json(a, spectra, spectrum), indent=2) if as_json
               else inspect_table(a, spectra, spectrum))
    if plot:
        click.echo(f"wrote {plot}", err=as_json)


@main.command(name="squeeze")
@revision_option
@click.argument("adapter", type=ADAPTER)
@output_option
@click.option("--rank", type=int, help="One target rank for every module.")
@click.option("--energy", type=float, help="Keep this fraction of each module's energy Σσ² (e.g. 0.95).")
@click.option("--budget", help="Total factor parameters for the whole adapter, e.g. 2M, 500K.")
@click.option("--rank-map", multiple=True, help="REGEX=RANK[,REGEX=RANK…]; first re.search match wins; "
              "unmatched modules keep their rank. Repeatable.")
@click.option("--min-rank", type=int, default=1, show_default=True, help="Lowest rank --energy/--budget may give.")
@click.option("--method", type=click.Choice(METHODS), default="exact", show_default=True,
              help="exact: QR + small SVD of the LoRA product; rsvd: seeded randomized SVD.")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Arithmetic precision of the factorisation.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="Output format (default: the output path's layout, in the input's naming).")
@click.option("--activations", type=PATH,
              help="Module inputs from surgery capture --module-inputs: truncate each captured module optimally for "
                   "its inputs (ranks from σ(ΔW Xᵀ)); the report gives output errors beside plain truncation's.")
@base_option()
@force_option
@alpha_option
@compute_options()
@json_option
def squeeze_cmd(adapter, out, rank, energy, budget, rank_map, min_rank, method, precision, activations, fmt, base,
                force, alpha, device, dtype, seed, as_json):
    """Compress a LoRA to lower ranks (LoRA-Squeeze, post-hoc)."""
    rule = rank_rule(rank, energy, budget, rank_map)
    if activations and method != "exact":
        raise click.UsageError("--activations gives the exact output-space truncation; drop --method rsvd")
    a = load(adapter, alpha)
    inputs = None
    if activations:
        from surgery.capture import load_inputs, match_inputs

        inputs = match_inputs(a, load_inputs(activations))
        if not inputs:
            raise SurgeryError(f"{activations}: holds the inputs of none of {adapter}'s linear modules")
    if a.format == "tera":  # through its exact LoRA form
        from surgery.tera import to_lora

        click.echo("note: a TeRA adapter is squeezed through its exact LoRA form and written as a LoRA", err=True)
        a = to_lora(a)[0]
        fmt = fmt or ("kohya" if a.format == "kohya" else "peft")
    out = out or output_for(a, rule_tag(rank, energy, budget, rank_map), fmt)
    with progress_bar(len(a.modules), "squeeze") as bar:
        small, report = squeeze(a, rule, method=method, device=device, dtype=dtype, compute_dtype=precision,
                                seed=seed, min_rank=min_rank, progress=lambda _: bar.update(1),
                                shapes=base_shapes_of(a, base), fold=folds(a, out, fmt), inputs=inputs)
    path = save_adapter(small, out, format=fmt, force=force, inputs=[p for p in (base, activations) if p],
                        base=naming_base(out, base, small))
    emit(report.to_dict(), squeeze_table(report), path, report.warnings, as_json)


def naming_base(out, base, adapter=None):
    """The base that names the output's modules where GGUF is on one side (llama.cpp's names follow the
    architecture), else None."""
    gguf = str(out).lower().endswith(".gguf") or (adapter is not None and adapter.format == "gguf")
    return base if gguf else None


@main.command(name="combine")
@revision_option
@click.argument("adapters", nargs=-1, required=True, type=ADAPTER)
@output_option
@click.option("--weight", "weights", type=float, multiple=True, help="One per adapter (default 1); negative subtracts.")
@click.option("--rank", type=int, help="Rank of every combined module (default: the exact combination).")
@click.option("--energy", type=float, help="Keep this fraction of each combined module's Σσ².")
@click.option("--budget", help="Total factor parameters of the result, e.g. 2M.")
@click.option("--rank-map", multiple=True, help="REGEX=RANK[,REGEX=RANK…]; first re.search match wins.")
@click.option("--method", type=click.Choice(list(COMBINE_METHODS)), default="sum", show_default=True,
              help="sum: Σ wᵢΔWᵢ exactly; ties / dare-* / magnitude-prune: PEFT's merge_utils on the dense deltas.")
@click.option("--density", type=float, help="Fraction of entries kept by the sparsifying methods, in (0, 1].")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="ties / dare-ties: elect each entry's sign by the sum of the deltas (total) or by a count of signs "
                   "(frequency), as PEFT's majority_sign_method.")
@click.option("--weight-map", multiple=True, help="REGEX=W[,REGEX=W…]: scale matching modules' weights too.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="Output format (default: the output path's layout, in the first input's naming).")
@click.option("--base", type=MODEL,
              help="Resolve module names against this model's tensors (a pipeline or component folder: diffusers "
                   "naming; else PEFT's), so kohya, PEFT and diffusers inputs mix.")
@force_option
@compute_options()
@json_option
def combine_cmd(adapters, out, weights, rank, energy, budget, rank_map, method, density, majority_sign, weight_map,
                fmt, base, force, device, dtype, seed, as_json):
    """Combine several adapters into one: an exact weighted sum (or TIES / DARE / magnitude pruning), at any rank."""
    from surgery.combine import combine

    if len(adapters) < 2:
        raise click.UsageError("give at least two adapters")
    if weights and len(weights) != len(adapters):
        raise click.UsageError(f"{len(weights)} --weight values for {len(adapters)} adapters")
    tag = rule_tag(rank, energy, budget, rank_map)
    rule = rank_rule(rank, energy, budget, rank_map) if tag else None
    inputs = [load(a) for a in adapters]
    with progress_bar(None, "combine") as bar:
        new, report = combine(inputs, list(weights) or None, rule, method=method, density=density,
                              majority_sign=majority_sign, weight_map=_weight_map(weight_map), seed=seed,
                              device=device, dtype=dtype, base=base, progress=lambda _: bar.update(1))
    path = save_adapter(new, out or output_for(inputs[0], "-".join(filter(None, ("combined", tag))), fmt),
                        format=fmt, force=force, inputs=adapters, base=base)
    emit(report.to_dict(), combine_table(report), path, report.warnings, as_json)


def _weight_map(items) -> list[tuple[str, float]]:
    """REGEX=W entries, comma-separated and repeatable, each regex checked."""
    out = []
    for part in (p for item in items for p in item.split(",") if p.strip()):
        pattern, _, w = part.rpartition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = math.nan
        if not pattern or not math.isfinite(weight):
            raise SurgeryError(f"--weight-map: expected REGEX=WEIGHT with a finite weight, got {part!r}")
        out.append((regex(pattern, f"--weight-map entry {part!r}").pattern, weight))
    return out


@main.command(name="merge")
@revision_option
@click.argument("base", type=MODEL)
@click.argument("adapters", nargs=-1, required=True, type=ADAPTER)
@click.option("-o", "--output", "out", required=True, type=PATH,
              help="Output directory (sharded base), .safetensors file (single-file base) or .gguf (GGUF model).")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight per adapter, in order (default 1; -1 un-merges).")
@click.option("--shard-size", help="Re-split the output into shards of at most this size (e.g. 5GB).")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision in which W + ΔW is formed before the one rounding.")
@click.option("--allow-missing", is_flag=True, help="Skip (and report) adapter modules that have no tensor in the "
              "base (a GGUF model: or on a weight llama.cpp adapts none of).")
@click.option("--skip-modules-to-save", is_flag=True,
              help="Keep the base's tensors where an adapter carries modules_to_save (needed with --weight ≠ 1).")
@click.option("--requantize", is_flag=True,
              help="FP8/MXFP4 base: keep its quantized layout (changed weights quantized again, fresh scales) and "
                   "report how much of the adapter survived; by default it is written dequantized.")
@force_option
@click.option("--alpha", "alphas", type=float, multiple=True,
              help="lora_alpha per adapter, in order, for PEFT-keyed files without a config (0 = not given).")
@compute_options("the merged weights (keep: each tensor's own)", seed=False)
@json_option
def merge_cmd(base, adapters, out, weights, shard_size, precision, allow_missing, skip_modules_to_save, requantize,
              force, alphas, device, dtype, as_json):
    """Merge adapters into a base checkpoint, streaming one tensor at a time."""
    from surgery.device import compute_dtype
    from surgery.merge import merge

    if alphas and len(alphas) != len(adapters):
        raise click.UsageError(f"{len(alphas)} --alpha values for {len(adapters)} adapters")
    loaded = [load(a, (alphas[i] or None) if alphas else None) for i, a in enumerate(adapters)]
    with progress_bar(sum(len(a.modules) for a in loaded), "merge") as bar:
        report = merge(base, loaded, out, weights=weights or None, dtype=dtype, device=device,
                       compute_dtype=compute_dtype(precision), shard_size=shard_size, allow_missing=allow_missing,
                       skip_modules_to_save=skip_modules_to_save, force=force, requantize=requantize,
                       progress=lambda _: bar.update(1))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        if report.quantized and "modules" in report.quantized:
            click.echo(survival_table(report.quantized))
        click.echo(f"merged {report.tensors_merged} tensors ({report.tensors_created} created, "
                   f"{report.tensors_copied} copied unchanged) into {report.shards} shard(s), "
                   f"{report.bytes_written / 1e6:,.1f} MB in {report.seconds:.1f} s → {report.output}")
    for n in report.notes:
        click.echo(f"note: {n}", err=True)


@main.command(name="extract")
@revision_option
@click.argument("finetuned", type=MODEL)
@click.argument("base", type=MODEL)
@click.option("-o", "--output", "out", required=True, type=PATH, help="Adapter to write.")
@click.option("--rank", type=int, help="One rank for every module.")
@click.option("--energy", type=float, help="Smallest rank (≤ --max-rank) keeping this fraction of each delta's energy.")
@click.option("--budget", help="Total factor parameters, e.g. 20M (ranks ≤ --max-rank).")
@click.option("--max-rank", type=int, default=128, show_default=True, help="Cap for --energy and --budget.")
@click.option("--targets", help="Regex searched in tensor names (default: every 2-D .weight but embeddings, and "
                                "1×1 convs; a regex may name embeddings and conv kernels of any size).")
@click.option("--format", "fmt", type=click.Choice(["peft", "peft-file", "kohya", "diffusers"]),
              help="Output format (default: peft-file for a .safetensors path, else a PEFT directory; two diffusers "
                   "pipelines give a diffusers pipeline LoRA file).")
@click.option("--carry-changed", is_flag=True,
              help="Also carry the changed norms and biases, as PEFT loads them: the extracted modules' biases as "
                   "lora_B.bias, the others whole (PEFT formats only; vLLM and llama.cpp refuse such an adapter).")
@force_option
@compute_options()
@json_option
def extract_cmd(finetuned, base, out, rank, energy, budget, max_rank, targets, fmt, carry_changed, force, device,
                dtype, seed, as_json):
    """Extract a LoRA from a fine-tuned model: randomized SVD of W_ft − W_base per targeted weight."""
    from surgery.extract import extract

    rule = rank_rule(rank, energy, budget)
    if carry_changed and fmt in ("kohya", "diffusers"):
        raise click.UsageError(f"--carry-changed writes PEFT's forms (lora_B.bias, whole tensors); --format {fmt} "
                               "has no place for them")
    with progress_bar(None, "extract") as bar:
        adapter, report = extract(finetuned, base, rule, targets=targets, max_rank=max_rank, device=device,
                                  dtype=dtype, seed=seed, carry_changed=carry_changed,
                                  progress=lambda _: bar.update(1))
    if fmt == "kohya" and adapter.format == "diffusers":  # kohya's names for each component, from the base
        from surgery.io.names import on_base

        adapter = on_base(adapter, base, "kohya")
    path = save_adapter(adapter, out, format=fmt, force=force, inputs=(finetuned, base), base=naming_base(out, base))
    emit(report.to_dict(), extract_table(report), path, report.warnings, as_json)


@main.command(name="convert")
@revision_option
@click.argument("adapter", type=ADAPTER)
@click.option("--to", "to",
              type=click.Choice(["tera", "lora", "peft", "peft-file", "kohya", "diffusers", "gguf"]),
              help="tera: fit a TeRA adapter to a LoRA; lora: a LoRA from a TeRA, LoHa, LoKr or full-diff adapter "
                   "(exact without a rule); peft/peft-file/kohya/diffusers/gguf: lossless layout and naming "
                   "conversion (with --base, names follow the base's tensors; gguf: llama.cpp's, from the base's "
                   "config.json or GGUF model). Default: from -o's suffix (.gguf).")
@output_option
@click.option("--rank", type=int, help="--to lora: the largest LoRA rank (default: each ΔW's exact rank).")
@click.option("--energy", type=float, help="--to lora from LoHa/LoKr: keep this fraction of each module's Σσ².")
@click.option("--budget", help="--to lora from LoHa/LoKr: total factor parameters, e.g. 2M.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="--to lora: output format (default: the output path's layout, in the input's naming).")
@base_option(names=True)
@device_option
@click.option("--order", type=int, default=3, show_default=True, help="--to tera: modes per dimension.")
@click.option("--core-rank", type=int, default=8, show_default=True, help="--to tera: rank of every mode.")
@click.option("--iters", type=int, default=50, show_default=True, help="--to tera: alternating LS sweeps.")
@click.option("--save-factors", is_flag=True, help="--to tera: store the shared core and factors in the file.")
@force_option
@alpha_option
@click.option("--seed", type=SEED, default=0, show_default=True, help="--to tera: seed of the shared factors.")
@click.option("--allow-missing", is_flag=True, help="--base: skip (and report) modules that match no base tensor "
              "(--to gguf: or on a weight llama.cpp adapts none of).")
@click.option("--dtype", type=click.Choice(GGUF_TYPES),
              help="--to gguf: tensor type of the factors (default: the adapter's; q8_0 rows that are not whole "
                   "blocks of 32 are stored f16, as llama.cpp's converter does).")
@click.option("--expert-modules", is_flag=True,
              help="--to peft --base: MoE experts as per-expert modules named like the base's expert tensors "
                   "(experts.N.gate_proj, for vLLM / transformers-4 loaders) instead of target_parameters.")
@json_option
def convert_cmd(adapter, to, out, rank, energy, budget, fmt, base, device, order, core_rank, iters, save_factors, force,
                alpha, seed, allow_missing, dtype, expert_modules, as_json):
    """Convert LoHa/LoKr/TeRA to LoRA, LoRA to TeRA, or between file layouts and namings (GGUF included)."""
    from surgery.tera import to_lora, to_tera

    if to is None:
        if out is None or not out.lower().endswith(".gguf"):
            raise click.UsageError("give --to (or an -o path ending in .gguf)")
        to = "gguf"
    if to != "lora" and rank is not None:
        raise click.UsageError("--rank goes with --to lora (without it, a TeRA adapter converts exactly)")
    base = resolve_model(base, "config" if to == "gguf" else "model")
    if dtype is not None and to != "gguf":
        raise click.UsageError("--dtype goes with --to gguf")
    if expert_modules and (base is None or to not in ("peft", "peft-file")):
        raise click.UsageError("--expert-modules goes with --to peft/peft-file and --base MODEL")
    a = load(adapter, alpha)
    if to in ("peft", "peft-file", "kohya", "diffusers", "gguf"):
        notes = []
        if base is not None:
            from surgery.io.names import on_base

            read = set(a.notes)  # printed by load
            a = on_base(a, base, to, allow_missing=allow_missing, expert_modules=expert_modules)
            notes = [n for n in a.notes if n not in read]
        elif to == "gguf" and a.format != "gguf":
            raise SurgeryError(f"{adapter}: --to gguf needs --base MODEL (its folder, a folder holding its "
                               "config.json, or a GGUF model): llama.cpp's tensor names follow the architecture")
        path = save_adapter(a, out or output_for(a, to.removesuffix("-file"), to, source=adapter), format=to,
                            force=force, inputs=[base] if base else (), **({"dtype": dtype} if dtype else {}))
        if as_json:
            click.echo(json.dumps({"output": str(path), "notes": notes}))
        else:
            for n in notes:
                click.echo(f"note: {n}", err=True)
            click.echo(f"wrote {path}")
        return
    if to == "lora" and a.format != "tera":
        if all(m.algo == "lora" for m in a.modules.values()):
            raise SurgeryError(f"{adapter}: is already a LoRA adapter (surgery squeeze changes its ranks)")
        tag = rule_tag(rank, energy, budget)
        rule = rank_rule(rank, energy, budget) if tag else Exact()
        out = out or output_for(a, "-".join(filter(None, ("lora", tag))), fmt)
        with progress_bar(len(a.modules), "convert to lora") as bar:
            new, report = squeeze(a, rule, device=device, progress=lambda _: bar.update(1),
                                  shapes=base_shapes_of(a, base), fold=folds(a, out, fmt))
        path = save_adapter(new, out, format=fmt, force=force, inputs=[base] if base else ())
        emit(report.to_dict(), squeeze_table(report), path, report.warnings, as_json)
        return
    if energy is not None or budget is not None or fmt is not None:
        raise click.UsageError("--energy, --budget and --format go with --to lora from a LoHa/LoKr adapter")
    with progress_bar(len(a.modules), f"convert to {to}") as bar:
        if to == "tera":
            if a.format == "tera":
                raise SurgeryError(f"{adapter}: is already a TeRA adapter")
            new, report = to_tera(a, order=order, core_rank=core_rank, seed=seed, iters=iters,
                                  progress=lambda _: bar.update(1))
        else:
            if a.format != "tera":
                raise SurgeryError(f"{adapter}: is not a TeRA adapter (use --to peft/kohya for LoRA formats)")
            new, report = to_lora(a, rank, progress=lambda _: bar.update(1))
    path = save_adapter(new, out or output_for(new, "tera" if to == "tera" else "-".join(
                            filter(None, ("lora", rank and f"r{rank}"))), new.format,
                                               source=a.source),
                        force=force, **({"save_factors": save_factors} if to == "tera" else {}))
    if as_json:
        click.echo(json.dumps({"output": str(path), "modules": [r.__dict__ | {"shape": list(r.shape)} for r in report]},
                              indent=2))
    else:
        click.echo(convert_table(report))
        click.echo(f"wrote {path}")


@main.command(name="init-tera")
@revision_option
@click.argument("base", type=MODEL)
@click.option("--targets", required=True, help="Regex searched in the base's 2-D weight names.")
@click.option("-o", "--output", "out", required=True, type=PATH, help="A .safetensors file.")
@click.option("--order", type=int, default=3, show_default=True)
@click.option("--core-rank", type=int, default=8, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--save-factors", is_flag=True,
              help="Store the shared core and factors in the file too (they are regenerated from the seed otherwise).")
@force_option
@json_option
def init_tera_cmd(base, targets, out, order, core_rank, seed, save_factors, force, as_json):
    """A fresh zero-update TeRA adapter for the linear weights of a base checkpoint."""
    from surgery.io.checkpoint import open_checkpoint
    from surgery.io.loaded import how_loaded
    from surgery.tera import fresh_adapter

    ck = open_checkpoint(base)
    pattern = regex(targets, "--targets")
    stored = {n[: -len(".weight")]: tuple(s.shape) for n, s in ck.tensors.items()
              if n.endswith(".weight") and len(s.shape) == 2 and pattern.search(n)}
    if not stored:
        raise SurgeryError(f"{base}: no 2-D weight matches {targets!r}")
    conv1d = {n for n in stored if n in how_loaded(ck).transposed}  # GPT-2's Conv1D: stored (in, out)
    if conv1d and len(conv1d) < len(stored):
        raise SurgeryError(f"{base}: --targets {targets!r} matches Conv1D weights, stored (in, out) ({min(conv1d)}), "
                           f"and others ({min(set(stored) - conv1d)}): an adapter states one fan_in_fan_out, as PEFT "
                           "does; target one kind")
    shapes = {f"base_model.model.{n}": shape[::-1] if conv1d else shape for n, shape in stored.items()}
    a = fresh_adapter(shapes, order=order, core_rank=core_rank, seed=seed, base=str(base),
                      fan_in_fan_out=bool(conv1d))
    path = save_adapter(a, out, force=force, inputs=(base,), save_factors=save_factors)
    if as_json:
        click.echo(json.dumps({"output": str(path), "modules": len(shapes), "trainable": a.num_params()}, indent=2))
    else:
        click.echo(f"wrote {path}: {len(shapes)} TeRA modules, {a.num_params():,} trainable λ entries")


@main.command(name="capture")
@revision_option
@click.argument("model_dir", type=MODEL)
@click.option("--texts", required=True, type=PATH, help="A text file, one text per line.")
@click.option("-o", "--output", "out", required=True, type=PATH,
              help="The .safetensors file to write (hidden states, or module inputs for surgery tune).")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Token positions sampled (seeded).")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Tokens kept of each text (longer ones are cut, with a note; at most the model's positions).")
@click.option("--module-inputs", is_flag=True,
              help="Save the inputs of the linear modules (for surgery tune) instead of the hidden states.")
@click.option("--targets", help="--module-inputs: regex of the module paths (default: every linear module inside "
                                "the transformer blocks).")
@click.option("--keep-special/--drop-special", default=None,
              help="Keep [CLS]/[SEP]/BOS/EOS tokens (default: dropped for hidden states, kept for module inputs).")
@force_option
@device_option
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the token sample.")
@json_option
def capture_cmd(model_dir, texts, out, max_tokens, max_length, module_inputs, targets, keep_special, force, device,
                seed, as_json):
    """Save the hidden states of every layer (or the inputs of the linear modules) of a local transformers model
    on a text file."""
    from surgery.capture import capture, capture_inputs, save_capture, save_inputs

    if targets and not module_inputs:
        raise click.UsageError("--targets goes with --module-inputs")
    check_output(out, [model_dir, texts], force)
    if module_inputs:
        cap = capture_inputs(model_dir, texts, targets=targets, max_tokens=max_tokens, seed=seed,
                             keep_special=keep_special is not False, max_length=max_length, device=device)
        save_inputs(cap, out)
        what = f"inputs of {len(cap.inputs)} modules"
    else:
        cap = capture(model_dir, texts, max_tokens=max_tokens, seed=seed, keep_special=bool(keep_special),
                      max_length=max_length, device=device)
        save_capture(cap, out)
        what = f"{len(cap.layers)} layers"
    if cap.metadata["pad"] != "pad":
        click.echo(f"note: batches were padded with {'EOS' if cap.metadata['pad'] == 'eos' else 'token id 0'}, the "
                   "tokenizer having no pad token of its own (padding is masked and never sampled)", err=True)
    for note in cap.metadata["notes"]:
        click.echo(f"note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(dict(cap.metadata, output=str(out)), indent=2))
        return
    click.echo(f"wrote {out}: {what} × {cap.metadata['tokens']} tokens (of {cap.metadata['tokens_available']} "
               f"non-padding{'' if cap.metadata['special_tokens_kept'] else ', non-special'}; {cap.metadata['model_class']})")


@main.command(name="tune")
@revision_option
@click.argument("student", type=ADAPTER)
@click.option("--teacher", required=True, type=ADAPTER, help="The adapter to match.")
@click.option("--activations", required=True, type=PATH,
              help="Module inputs from surgery capture --module-inputs.")
@click.option("-o", "--output", "out", required=True, type=PATH)
@click.option("--steps", type=int, default=200, show_default=True, help="Adam steps per module (full batch).")
@click.option("--lr", type=float, default=1e-2, show_default=True,
              help="Relative step size: each tensor moves by about lr × its starting RMS per step.")
@force_option
@device_option
@json_option
def tune_cmd(student, teacher, activations, out, steps, lr, force, device, as_json):
    """Distil TEACHER into STUDENT module by module on captured inputs: min ‖X(ΔW_s − ΔW_t)ᵀ‖², training only
    the student's LoRA factors or TeRA λ's; per-module relative output error before and after."""
    from surgery.capture import load_inputs
    from surgery.distill import tune

    s, t, inputs = load(student), load(teacher), load_inputs(activations)
    with progress_bar(len(s.modules), "tune") as bar:
        new, report = tune(s, t, inputs, steps=steps, lr=lr, device=device,
                           progress=lambda _: bar.update(1))
    path = save_adapter(new, out, force=force, inputs=(teacher, activations))
    rows = [[r.name, str(r.tokens), f"{r.before:.4g}", f"{r.after:.4g}", r.start, str(r.best_step)] for r in report]
    table = _table(["module", "tokens", "error before", "error after", "start", "best step"], rows, {1, 2, 3, 5})
    emit({"modules": [r.__dict__ for r in report]}, table, path, [], as_json)


@main.command(name="compare")
@revision_option
@click.argument("model", type=MODEL)
@click.argument("a", type=ADAPTER)
@click.argument("b", required=False, type=ADAPTER)
@click.option("--texts", required=True, type=PATH, help="A text file, one text per line.")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Tokens kept of each text.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "float64"]), default="float32",
              show_default=True, help="The model's weights and activations (merged weights rounded once to it).")
@click.option("--plot", type=PATH,
              help="Draw the mean KL by token position to this picture (.png, .svg, .pdf, …).")
@device_option
@json_option
def compare_cmd(model, a, b, texts, max_tokens, dtype, plot, device, as_json):
    """What changing adapter A for B (or for nothing: the base alone) does to a causal LM's next-token
    predictions on the texts: mean KL(p_A ‖ p_B) in nats, top-1 agreement, each side's perplexity."""
    from surgery.compare import compare

    if plot:
        from .plot import check_plot

        check_plot(plot, [model, a, texts] + ([b] if b else []))
    first, second = load(a), load(b) if b else None
    result = compare(model, first, second, texts, device=device, dtype=dtype, max_tokens=max_tokens)
    doc = result.to_dict() | {"model": str(model), "a": str(a), "b": str(b) if b else None}
    if plot:
        from .plot import plot_kl

        plot_kl(result.texts, plot)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        rows = [[str(t.text + 1), str(t.tokens), f"{t.kl:.4g}", f"{t.top1_agreement:.4f}", f"{t.perplexity_a:.4g}",
                 f"{t.perplexity_b:.4g}"] for t in result.texts]
        click.echo(_table(["text", "tokens", "KL (nats)", "top-1 agree", "ppl A", "ppl B"], rows,
                          right={0, 1, 2, 3, 4, 5}))
        click.echo(f"\nall {doc['tokens']} predicted tokens: KL(p_A ‖ p_B) {doc['kl']:.4g} nats, top-1 agreement "
                   f"{doc['top1_agreement']:.4f}, perplexity A {doc['perplexity_a']:.4g}, B {doc['perplexity_b']:.4g}"
                   f" (B = {b or 'the base alone'})")
    if plot:
        click.echo(f"wrote {plot}", err=as_json)
    for n in result.notes:
        click.echo(f"note: {n}", err=True)


def _ids(hidden, method, discard, device, seed, legacy_cdf=False):
    import warnings

    from surgery.capture import load_capture
    from surgery.intrinsic import two_nn

    cap = load_capture(hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicates are reported in the table instead
        return cap, [two_nn(layer, method=method, discard=discard, device=device, seed=seed, legacy_cdf=legacy_cdf,
                            name=f"{hidden}: hidden.{i}") for i, layer in enumerate(cap.layers)]


@main.command(name="id")
@click.argument("hidden", type=PATH)
@click.option("--method", type=click.Choice(["linear", "mle"]), default="linear", show_default=True)
@click.option("--discard", type=float, default=0.1, show_default=True, help="Fraction of the largest μ discarded.")
@click.option("--legacy-cdf", is_flag=True, help="F_i = (i−1)/N as scikit-dimension 0.3 (default i/N, as 0.5).")
@click.option("--plot", type=PATH,
              help="Save the ID profile as a picture (.png, .svg, .pdf, …; needs surgery[plot]).")
@device_option
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the bootstrap spread.")
@json_option
def id_cmd(hidden, method, discard, legacy_cdf, plot, device, seed, as_json):
    """TwoNN intrinsic dimension of every layer of a hidden-state file."""
    if not 0 <= discard < 1:
        raise SurgeryError(f"--discard must be in [0, 1), got {discard}")
    if plot:
        from .plot import check_plot

        check_plot(plot, [hidden])
    cap, results = _ids(hidden, method, discard, device, seed, legacy_cdf)
    doc = {"ids": [r.dimension for r in results], "layers": [r.__dict__ for r in results],
           "block_prefix": cap.metadata.get("block_prefix")}
    if plot:
        from .plot import plot_ids

        plot_ids(results, plot)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    rows = [[str(i), f"{r.dimension:.3f}", f"±{r.spread:.3f}", str(r.points), str(r.duplicates)]
            for i, r in enumerate(results)]
    click.echo(_table(["layer", "ID", "spread", "points", "repeated rows merged"], rows, right={0, 1, 2, 3, 4}))
    click.echo(f"(TwoNN {method}, discard {discard}; layer 0 is the embedding output; spread = bootstrap std)")


@main.command(name="rerank")
@revision_option
@click.argument("adapter", required=False, type=ADAPTER)
@click.option("--hidden", type=PATH, help="Hidden-state file from surgery capture.")
@click.option("--ids", "ids_file", type=PATH, help="IDs from surgery id --json.")
@click.option("-o", "--output", "out", type=PATH, help="Re-ranked adapter.")
@click.option("--formula", type=click.Choice(["diff", "max"]), default="diff", show_default=True,
              help="diff: ceil(d_i − d_{i−1}) (GeLoRA); max: ceil(max(d_i, d_{i−1})).")
@click.option("--min-rank", type=click.IntRange(min=1), default=1, show_default=True,
              help="Lowest rank a block gets (PEFT refuses r = 0).")
@click.option("--budget", help="Scale the ranks to this many factor parameters (e.g. 2M).")
@click.option("--expand", is_flag=True, help="Pad modules whose GeLoRA rank is above their rank up to it (ΔW "
                                             "unchanged; new A rows random, new B columns zero, as PEFT inits).")
@click.option("--config-out", type=PATH, help="Write a PEFT LoraConfig JSON to train with.")
@click.option("--target-modules", "--targets", "targets",
              help="--config-out: PEFT's target_modules, comma-separated module leaves, e.g. query,key,value (a list, "
                   "not the regex --targets of extract/capture/init-tera).")
@click.option("--method", type=click.Choice(["linear", "mle"]), default="linear", show_default=True)
@device_option
@click.option("--seed", type=SEED, default=0, show_default=True)
@force_option
@json_option
def rerank_cmd(adapter, hidden, ids_file, out, formula, min_rank, budget, expand, config_out, targets, method, device,
               seed, force, as_json):
    """GeLoRA: ranks per block from the intrinsic dimensions of the hidden states."""
    from surgery.intrinsic import gelora_config, gelora_ranks, rerank

    if (hidden is None) == (ids_file is None):
        raise click.UsageError("give exactly one of --hidden, --ids")
    if (adapter is None) != (out is None) or (adapter is None and config_out is None):
        raise click.UsageError("give ADAPTER with -o OUT, and/or --config-out with --targets")
    inputs = [p for p in (adapter, hidden, ids_file) if p]
    if config_out:
        check_output(config_out, inputs + ([out] if out else []), force)
    block_prefix = None
    if hidden:
        cap, results = _ids(hidden, method, 0.1, device, seed)
        ids, block_prefix = [r.dimension for r in results], cap.metadata.get("block_prefix")
    else:
        from surgery.io.jsonfile import check, read_object

        doc = read_object(Path(ids_file))
        ids = [float(x) for x in check(doc.get("ids"), "dimension list", ids_file, "ids")]
        block_prefix = doc.get("block_prefix") if isinstance(doc.get("block_prefix"), str) else None
    doc = {"ids": ids, "block_ranks": gelora_ranks(ids, formula, min_rank)}
    warnings, raw = [], gelora_ranks(ids, formula, 0)
    if raw and all(r < min_rank for r in raw):
        warnings.append(f"--min-rank {min_rank} raised every block's GeLoRA rank (from {', '.join(map(str, raw))}): "
                        "the IDs do not set the ranks here")
    if config_out:  # built (and checked) before anything is written
        cfg = gelora_config(doc["block_ranks"], block_prefix,
                            [t.strip() for t in (targets or "").split(",") if t.strip()])
    if adapter:
        small, rep = rerank(load(adapter), ids, formula=formula, min_rank=min_rank,
                            budget=parse_count(budget) if budget else None, expand_ranks=expand, device=device,
                            seed=seed, block_prefix=block_prefix)
        path = save_adapter(small, out, force=force, inputs=inputs + ([config_out] if config_out else []))
        doc.update(rep.squeeze.to_dict(), clipped={n: list(v) for n, v in rep.clipped.items()},
                   expanded=rep.expanded, padded=dict(rep.padded), output=str(path))
        warnings += list(rep.squeeze.warnings) + rep.warnings
    if config_out:
        with atomic_output(Path(config_out), is_dir=False) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        doc["config"] = str(config_out)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo("IDs: " + ", ".join(f"{d:.2f}" for d in ids))
        click.echo("block ranks: " + ", ".join(map(str, doc["block_ranks"])))
        if adapter:
            click.echo(squeeze_table(rep.squeeze))
            click.echo(f"wrote {out}")
        if config_out:
            click.echo(f"wrote {config_out}")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def run() -> None:
    """The `surgery` console script: `main`, with every object the imports made (torch's, ~170,000) frozen out of
    the cyclic garbage collector first — a full collection walks them all, and Python's teardown at exit did so
    for 0.3–0.5 s of every command (docs/benchmarks.md). They stay alive as imported modules do anyway."""
    gc.freeze()
    main()


if __name__ == "__main__":
    run()
