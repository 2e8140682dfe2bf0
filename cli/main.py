"""`surgery` commands: each parses options, calls one library function and prints.

Errors from the library (`SurgeryError`) become one `error: …` line on stderr and exit status 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from surgery import (Budget, Energy, FixedRank, SurgeryError, load_adapter, parse_count, parse_rank_map,
                     save_adapter, squeeze)
from surgery.io import FORMATS
from surgery.squeeze import METHODS
from surgery.squeeze import spectra as compute_spectra

from .render import convert_table, extract_table, inspect_json, inspect_table, squeeze_table


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SurgeryError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgery")
def main():
    """Model surgery on safetensors adapter checkpoints (PEFT, kohya/diffusers)."""


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")(f)


def compute_options(f):
    """--device, --dtype, --seed: shared by every command that computes."""
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed for randomized methods.")(f)
    f = click.option("--dtype", type=click.Choice(["keep", "float32", "bfloat16", "float16"]), default="keep",
                     show_default=True, help="Storage dtype of the written factors.")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when present), cpu, cuda or cuda:N.")(f)
    return f


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
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--spectrum", is_flag=True, help="Also compute each module's singular values (exact, no dense ΔW).")
@json_option
def inspect(adapter, spectrum, as_json):
    """Show an adapter's format, modules, ranks, scales and sizes."""
    a = load_adapter(adapter)
    spectra = None
    if spectrum and a.format == "tera":
        from surgery.tera import tera_svd

        spectra = {n: tera_svd([l.load() if hasattr(l, "load") else l for l in m.lambdas], m.spec, m.scale).S
                   for n, m in a.modules.items()}
    elif spectrum:
        spectra = compute_spectra(a)
    click.echo(json.dumps(inspect_json(a, spectra), indent=2) if as_json else inspect_table(a, spectra))


@main.command(name="squeeze")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Output directory (peft) or file (peft-file, kohya).")
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
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), help="Output format (default: the input's).")
@click.option("--force", is_flag=True, help="Allow the output to replace the input.")
@compute_options
@json_option
def squeeze_cmd(adapter, out, rank, energy, budget, rank_map, min_rank, method, precision, fmt, force,
                device, dtype, seed, as_json):
    """Compress a LoRA to lower ranks (LoRA-Squeeze, post-hoc)."""
    rule = rank_rule(rank, energy, budget, rank_map)
    a = load_adapter(adapter)
    with progress_bar(len(a.modules), "squeeze") as bar:
        small, report = squeeze(a, rule, method=method, device=device, dtype=dtype, compute_dtype=precision,
                                seed=seed, min_rank=min_rank, progress=lambda _: bar.update(1))
    path = save_adapter(small, out, format=fmt, force=force)
    emit(report.to_dict(), squeeze_table(report), path, report.warnings, as_json)


@main.command(name="merge")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Output directory (sharded base) or .safetensors file (single-file base).")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Weight per adapter, in order (default 1; -1 un-merges).")
@click.option("--shard-size", help="Re-split the output into shards of at most this size (e.g. 5GB).")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Precision in which W + ΔW is formed before the one rounding.")
@click.option("--allow-missing", is_flag=True, help="Skip adapter modules that have no tensor in the base.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@compute_options
@json_option
def merge_cmd(base, adapters, out, weights, shard_size, precision, allow_missing, force, device, dtype, seed,
              as_json):
    """Merge adapters into a base checkpoint, streaming one tensor at a time."""
    from surgery.device import compute_dtype
    from surgery.merge import merge

    loaded = [load_adapter(a) for a in adapters]
    with progress_bar(sum(len(a.modules) for a in loaded), "merge") as bar:
        report = merge(base, loaded, out, weights=weights or None, dtype=dtype, device=device,
                       compute_dtype=compute_dtype(precision), shard_size=shard_size, allow_missing=allow_missing,
                       force=force, progress=lambda _: bar.update(1))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"merged {report.tensors_merged} tensors ({report.tensors_created} created, "
                   f"{report.tensors_copied} copied unchanged) into {report.shards} shard(s), "
                   f"{report.bytes_written / 1e6:,.1f} MB in {report.seconds:.1f} s → {report.output}")
    for n in report.notes:
        click.echo(f"note: {n}", err=True)


@main.command(name="extract")
@click.argument("finetuned", type=click.Path(path_type=str))
@click.argument("base", type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Adapter to write.")
@click.option("--rank", type=int, help="One rank for every module.")
@click.option("--energy", type=float, help="Smallest rank (≤ --max-rank) keeping this fraction of each delta's energy.")
@click.option("--budget", help="Total factor parameters, e.g. 20M (ranks ≤ --max-rank).")
@click.option("--max-rank", type=int, default=128, show_default=True, help="Cap for --energy and --budget.")
@click.option("--targets", help="Regex searched in tensor names (default: every 2-D .weight but embeddings).")
@click.option("--format", "fmt", type=click.Choice(["peft", "peft-file", "kohya"]), default="peft",
              show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@compute_options
@json_option
def extract_cmd(finetuned, base, out, rank, energy, budget, max_rank, targets, fmt, force, device, dtype, seed,
                as_json):
    """Extract a LoRA from a fine-tuned model: randomized SVD of W_ft − W_base per targeted weight."""
    from surgery.extract import extract

    rule = rank_rule(rank, energy, budget)
    with progress_bar(None, "extract") as bar:
        adapter, report = extract(finetuned, base, rule, targets=targets, max_rank=max_rank, device=device,
                                  dtype=dtype, seed=seed, progress=lambda _: bar.update(1))
    out_path = Path(out)
    if out_path.exists() and not force:
        raise SurgeryError(f"{out}: exists; choose a new path or pass --force")
    path = save_adapter(adapter, out_path, format=fmt, force=force)
    emit(report.to_dict(), extract_table(report), path, report.warnings, as_json)


@main.command(name="convert")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--to", "to", required=True, type=click.Choice(["tera", "lora", "peft", "peft-file", "kohya"]),
              help="tera: fit a TeRA adapter to a LoRA; lora: a rank-K LoRA from a TeRA adapter; "
                   "peft/peft-file/kohya: lossless LoRA format conversion.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str))
@click.option("--rank", type=int, help="--to lora: the LoRA rank.")
@click.option("--order", type=int, default=3, show_default=True, help="--to tera: modes per dimension.")
@click.option("--core-rank", type=int, default=8, show_default=True, help="--to tera: rank of every mode.")
@click.option("--iters", type=int, default=50, show_default=True, help="--to tera: alternating LS sweeps.")
@click.option("--save-factors", is_flag=True, help="--to tera: store the shared core and factors in the file.")
@click.option("--force", is_flag=True, help="Allow the output to replace the input.")
@click.option("--seed", type=int, default=0, show_default=True, help="--to tera: seed of the shared factors.")
@json_option
def convert_cmd(adapter, to, out, rank, order, core_rank, iters, save_factors, force, seed, as_json):
    """Convert between LoRA and TeRA, or between LoRA file formats."""
    from surgery.tera import to_lora, to_tera

    a = load_adapter(adapter)
    if to in ("peft", "peft-file", "kohya"):
        path = save_adapter(a, out, format=to, force=force)
        click.echo(json.dumps({"output": str(path)}) if as_json else f"wrote {path}")
        return
    if (to == "lora") != (rank is not None):
        raise click.UsageError("--rank is needed with --to lora, and only there")
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
    path = save_adapter(new, out, force=force, **({"save_factors": save_factors} if to == "tera" else {}))
    if as_json:
        click.echo(json.dumps({"output": str(path), "modules": [r.__dict__ | {"shape": list(r.shape)} for r in report]},
                              indent=2))
    else:
        click.echo(convert_table(report))
        click.echo(f"wrote {path}")


@main.command(name="init-tera")
@click.argument("base", type=click.Path(path_type=str))
@click.option("--targets", required=True, help="Regex searched in the base's 2-D weight names.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str))
@click.option("--order", type=int, default=3, show_default=True)
@click.option("--core-rank", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-factors", is_flag=True)
def init_tera_cmd(base, targets, out, order, core_rank, seed, save_factors):
    """A fresh zero-update TeRA adapter for the linear weights of a base checkpoint."""
    import re

    from surgery.io.checkpoint import open_checkpoint
    from surgery.tera import fresh_adapter

    ck = open_checkpoint(base)
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise SurgeryError(f"--targets {targets!r}: bad regex: {e}") from None
    shapes = {f"base_model.model.{n[: -len('.weight')]}": tuple(s.shape) for n, s in ck.tensors.items()
              if n.endswith(".weight") and len(s.shape) == 2 and pattern.search(n)}
    if not shapes:
        raise SurgeryError(f"{base}: no 2-D weight matches {targets!r}")
    a = fresh_adapter(shapes, order=order, core_rank=core_rank, seed=seed, base=str(base))
    path = save_adapter(a, out, save_factors=save_factors)
    click.echo(f"wrote {path}: {len(shapes)} TeRA modules, {a.num_params():,} trainable λ entries")


if __name__ == "__main__":
    main()
