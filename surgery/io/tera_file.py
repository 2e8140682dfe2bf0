"""The TeRA adapter file (`surgery-tera/1`, docs/tera.md): one safetensors file.

Tensors: `<module>.tera_lambda.<n>` (n_n,) for every mode n (output modes first), and with `--save-factors`
`tera_shared.core.<R1x…xRN>` and `tera_shared.factor.<n>x<R>`. Metadata `surgery_tera` holds the JSON config:
{"format_version", "seed", "scale", "order", "core_rank", "modules": {name: {"out_modes", "in_modes", "ranks"}},
plus provenance keys}. Saved shared tensors are checked against the seed on load.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..adapter import Adapter, materialize
from ..errors import SurgeryError
from ..tera import FORMAT_VERSION, TeraModule, TeraSpec, shared_core, shared_factor
from . import jsonfile
from .modules import floating
from .safetensors_file import atomic_output, save_tensors, tensor_refs

META = "surgery_tera"
_LAMBDA = re.compile(r"^(?P<m>.+)\.tera_lambda\.(?P<n>\d+)$")


def is_tera(keys, metadata) -> bool:
    return META in metadata or any(_LAMBDA.match(k) for k in keys)


def read(path: Path) -> Adapter:
    refs, metadata = tensor_refs(path)
    if META not in metadata:
        raise SurgeryError(f"{path}: TeRA tensors but no '{META}' config in the metadata; the file is incomplete")
    where = f"{path}: metadata {META}"
    config = jsonfile.parse_object(metadata[META], where)
    if config.get("format_version") != FORMAT_VERSION:
        raise SurgeryError(f"{path}: TeRA format {config.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    seed = jsonfile.check(config.get("seed"), "int", where, "seed")
    scale = jsonfile.field(config, "scale", "number", where, 1.0)
    specs = config.get("modules")
    if not isinstance(specs, dict) or not all(isinstance(s, dict) for s in specs.values()):
        raise SurgeryError(f"{where}: modules must map module names to their modes and ranks")
    modules, passthrough = {}, {}
    for name, s in specs.items():
        dims = [jsonfile.check(s.get(k), "positive int list", where, f"modules[{name!r}].{k}")
                for k in ("out_modes", "in_modes", "ranks")]
        if len(dims[2]) != len(dims[0]) + len(dims[1]) or any(r > n for r, n in zip(dims[2], dims[0] + dims[1])):
            raise SurgeryError(f"{where}: module {name}: ranks {dims[2]} do not fit its modes {dims[0] + dims[1]}")
        spec = TeraSpec(tuple(dims[0]), tuple(dims[1]), tuple(dims[2]), seed)
        lams = []
        for n, size in enumerate(spec.modes):
            ref = refs.get(f"{name}.tera_lambda.{n}")
            if ref is None or tuple(ref.shape) != (size,):
                raise SurgeryError(f"{path}: module {name}: λ {n} missing or not of shape [{size}]")
            lams.append(ref)
        floating(path, name, **{f"λ{n}": t for n, t in enumerate(lams)})
        modules[name] = TeraModule(tuple(lams), spec, scale)
    for key, ref in refs.items():
        if key.startswith("tera_shared."):
            _verify_shared(path, key, ref, seed)
        elif not (_LAMBDA.match(key) and _LAMBDA.match(key)["m"] in specs):
            passthrough[key] = ref
    return Adapter(modules=modules, format="tera", passthrough=passthrough, config=config, metadata=metadata,
                   source=path)


def _verify_shared(path: Path, key: str, ref, seed: int) -> None:
    kind, dims = key.split(".")[1], tuple(int(d) for d in key.split(".")[2].split("x"))
    want = shared_core(seed, dims) if kind == "core" else shared_factor(seed, *dims)
    if not torch.equal(materialize(ref).to(torch.float32), want):
        raise SurgeryError(f"{path}: saved {key} does not match the one regenerated from seed {seed}")


def write(adapter: Adapter, out: Path, save_factors: bool = False) -> None:
    tensors, specs = {k: materialize(v) for k, v in adapter.passthrough.items()}, {}
    seeds, scales = set(), set()
    for name, m in adapter.modules.items():
        if not isinstance(m, TeraModule):
            raise SurgeryError(f"module {name} is a LoRA; convert it first (surgery convert --to tera)")
        specs[name] = m.spec.to_json()
        seeds.add(m.spec.seed)
        scales.add(m.scale)
        for n, lam in enumerate(m.lambdas):
            tensors[f"{name}.tera_lambda.{n}"] = materialize(lam).contiguous()
        if save_factors:
            tensors[f"tera_shared.core.{'x'.join(map(str, m.spec.ranks))}"] = shared_core(m.spec.seed, m.spec.ranks)
            for n, r in zip(m.spec.modes, m.spec.ranks):
                tensors[f"tera_shared.factor.{n}x{r}"] = shared_factor(m.spec.seed, n, r)
    if len(seeds) != 1 or len(scales) != 1:
        raise SurgeryError("a TeRA file holds modules of one seed and one scale")
    config = {k: v for k, v in adapter.config.items() if k not in ("modules", "seed", "scale", "format_version")}
    config.update(format_version=FORMAT_VERSION, seed=seeds.pop(), scale=scales.pop(), modules=specs)
    metadata = {"format": "pt", META: json.dumps(config, sort_keys=True)}
    with atomic_output(out, is_dir=False) as tmp:
        save_tensors(tensors, tmp, metadata)
