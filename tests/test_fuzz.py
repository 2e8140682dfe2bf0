"""A bounded, seeded fuzz over the newer surfaces — LoHa / LoKr / Tucker LyCORIS files, DoRA (PEFT and LyCORIS),
diffusers pipeline files with per-component configs, GGUF adapters with MoE expert tensors, combine's methods,
merge — each input mutated (header bytes,
dtypes and shapes, metadata and config values, tensor values, missing or renamed keys) and run through a command
in its own process. The contract: exit 0 with a readable, finite result, or exit 1 with exactly one `error:` line
that names the input; never a traceback; nothing written on failure; inputs untouched."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import tree_digest

pytestmark = pytest.mark.no_real_load  # mutated inputs; the contract below is what is checked
CASES = 48
SEED = int(os.environ.get("SURGERY_FUZZ_SEED", 21))  # another: SURGERY_FUZZ_SEED=N pytest -m slow tests/test_fuzz.py


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(d: Path) -> dict[str, Path]:
    """The clean inputs, one per surface, and a base for merge (fc (96, 64), conv (48, 32, 3, 3))."""
    g = _g(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    save_file({"fc.weight": r(96, 64), "conv.weight": r(48, 32, 3, 3)}, str(d / "base.safetensors"))
    save_file({"lycoris_fc.hada_w1_a": r(96, 4), "lycoris_fc.hada_w1_b": r(4, 64), "lycoris_fc.hada_w2_a": r(96, 4),
               "lycoris_fc.hada_w2_b": r(4, 64), "lycoris_fc.alpha": torch.tensor(2.0),
               "lycoris_conv.hada_t1": r(4, 4, 3, 3), "lycoris_conv.hada_w1_a": r(4, 48), "lycoris_conv.hada_w1_b":
               r(4, 32), "lycoris_conv.hada_t2": r(4, 4, 3, 3), "lycoris_conv.hada_w2_a": r(4, 48),
               "lycoris_conv.hada_w2_b": r(4, 32), "lycoris_conv.alpha": torch.tensor(3.0)}, str(d / "loha.safetensors"))
    save_file({"lycoris_fc.lokr_w1": r(8, 8), "lycoris_fc.lokr_w2_a": r(12, 2), "lycoris_fc.lokr_w2_b": r(2, 8),
               "lycoris_fc.alpha": torch.tensor(1.0), "lycoris_fc.dora_scale": r(96, 1).abs() + 1},
              str(d / "lokr.safetensors"))
    save_file({"lycoris_conv.lora_down.weight": r(4, 32, 1, 1), "lycoris_conv.lora_mid.weight": r(4, 4, 3, 3),
               "lycoris_conv.lora_up.weight": r(48, 4, 1, 1), "lycoris_conv.alpha": torch.tensor(2.0),
               "lycoris_conv.dora_scale": r(48, 1, 1, 1).abs() + 1, "lycoris_fc.lora_down.weight": r(4, 64),
               "lycoris_fc.lora_up.weight": r(96, 4), "lycoris_fc.alpha": torch.tensor(8.0)},
              str(d / "locon.safetensors"))
    p = d / "peft-dora"
    p.mkdir()
    save_file({"base_model.model.fc.lora_A.weight": r(4, 64), "base_model.model.fc.lora_B.weight": r(96, 4),
               "base_model.model.fc.lora_magnitude_vector": r(96).abs() + 1}, str(p / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
                                                       "target_modules": ["fc"]}))
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"to_k": 2}, "unet.alpha_pattern": {"to_k": 3},
              "unet.peft_type": "LORA", "unet.target_modules": ["to_q", "to_k"], "text_encoder.r": 2,
              "text_encoder.lora_alpha": 1, "text_encoder.peft_type": "LORA", "text_encoder.target_modules": ["q_proj"]}
    save_file({"unet.blk.to_q.lora_A.weight": r(4, 16), "unet.blk.to_q.lora_B.weight": r(16, 4),
               "unet.blk.to_k.lora_A.weight": r(2, 16), "unet.blk.to_k.lora_B.weight": r(16, 2),
               "text_encoder.l.q_proj.lora_A.weight": r(2, 8), "text_encoder.l.q_proj.lora_B.weight": r(8, 2)},
              str(d / "diffusers.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    pipe = d / "pipeline"  # a diffusers pipeline base for the diffusers file: its unet holds blk.to_q / blk.to_k
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                           "layers_per_block": 1}))
    save_file({"blk.to_q.weight": r(16, 16), "blk.to_k.weight": r(16, 16), "blk.norm.weight": r(16)},
              str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    _gguf_adapter(d / "adapter.gguf", r)
    return {n: d / f for n, f in (("loha", "loha.safetensors"), ("lokr", "lokr.safetensors"),
                                  ("locon", "locon.safetensors"), ("peft-dora", "peft-dora"),
                                  ("diffusers", "diffusers.safetensors"), ("pipeline", "pipeline"),
                                  ("gguf", "adapter.gguf"))}


def _gguf_adapter(path: Path, r) -> None:
    """A llama.cpp adapter (qwen3moe) with a linear module and an expert tensor ((E, r, in) / (E, out, r))."""
    gguf = pytest.importorskip("gguf")
    from surgery.io import gguf_file

    tensors = {"blk.0.attn_q.weight.lora_a": r(4, 16), "blk.0.attn_q.weight.lora_b": r(16, 4),
               "blk.0.ffn_up_exps.weight.lora_a": r(3, 2, 16), "blk.0.ffn_up_exps.weight.lora_b": r(3, 8, 2)}
    T = gguf.GGUFValueType
    gguf_file.write_file(path, "qwen3moe", [("general.type", "adapter", T.STRING, None),
                                            ("adapter.type", "lora", T.STRING, None),
                                            ("adapter.lora.alpha", 8.0, T.FLOAT32, None)],
                         [gguf_file.Planned(n, tuple(t.shape), gguf.GGMLQuantizationType.F32,
                                            lambda t=t: t.numpy().view(np.uint8).reshape(-1))
                          for n, t in tensors.items()])


# ---------------------------------------------------------------- mutations of one safetensors file or config

def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def m_truncate(path, rng):
    raw = path.read_bytes()
    path.write_bytes(raw[: rng.randrange(1, len(raw))])


def m_flip_header_byte(path, rng):
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + rng.randrange(n)] = rng.choice(b'{}[]":,0x\x00\xff')
    path.write_bytes(bytes(raw))


def m_dtype(path, rng):
    header, data = _header(path)
    key = rng.choice([k for k in header if k != "__metadata__"])
    header[key]["dtype"] = rng.choice(["F16", "I32", "BOOL", "F99", "U8"])
    _write_header(path, header, data)


def m_shape(path, rng):
    header, data = _header(path)
    key = rng.choice([k for k in header if k != "__metadata__"])
    shape = header[key]["shape"]
    header[key]["shape"] = rng.choice([shape[::-1], shape[:-1], shape + [1], [0] + shape[1:], [-1] + shape[1:]])
    _write_header(path, header, data)


def m_metadata(path, rng):
    header, data = _header(path)
    meta = header.setdefault("__metadata__", {})
    key = "lora_adapter_metadata" if "lora_adapter_metadata" in meta or rng.random() < 0.5 else "ss_network_dim"
    meta[key] = rng.choice(["[1, 2]", '"x"', "3", "{", "[" * 5000 + "]" * 5000, json.dumps({"unet.r": "four"}),
                            json.dumps({"unet.lora_alpha": float("nan"), "unet.r": 4}),
                            json.dumps({"unet.rank_pattern": {"(": 2}}), json.dumps({"peft_type": "LOHA"})])
    _write_header(path, header, data)


def _tensors_mutation(fn):
    def mutate(path, rng):
        sd = load_file(str(path))
        meta = _header(path)[0].get("__metadata__")
        fn(sd, rng)
        save_file(sd, str(path), metadata=meta)
    return mutate


def _nan(sd, rng):
    key = rng.choice([k for k, v in sd.items() if v.is_floating_point() and v.numel()])
    sd[key] = sd[key].clone()
    sd[key].view(-1)[rng.randrange(sd[key].numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])


def _drop(sd, rng):
    del sd[rng.choice(sorted(sd))]


def _rename(sd, rng):
    key = rng.choice(sorted(sd))
    new = key.replace("w1", "w3").replace("lora_A", "lora_C").replace("down", "dwn").replace("alpha", "alpha2") \
        .replace("dora_scale", "hada_w1_a").replace("lokr_w1", "hada_w1_a").replace("mid", "lora_up")
    sd[new if new != key else key + ".x"] = sd.pop(key)


def _reshape(sd, rng):
    key = rng.choice(sorted(k for k, v in sd.items() if v.numel() > 1))
    sd[key] = sd[key].reshape(-1)[: max(1, sd[key].numel() // 2)].clone()


def m_json_file(path, rng):
    """A pipeline's model_index.json or a component's config.json replaced by a wrong-shaped or hostile value."""
    f = rng.choice([path / "model_index.json", path / "unet" / "config.json"])
    doc = json.loads(f.read_text())
    doc[rng.choice(sorted(doc))] = rng.choice([None, "x", -1, 2.5, [1], {"a": 1}, True])
    f.write_text(json.dumps(doc) if rng.random() < 0.7 else rng.choice(["[]", '"s"', "[" * 5000 + "]" * 5000, "{"]))


def m_config(path, rng):
    cfg = path / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    key = rng.choice(["r", "lora_alpha", "use_dora", "rank_pattern", "peft_type", "target_modules", "alpha_pattern"])
    doc[key] = rng.choice([None, "x", -1, 0, 2.5, float("inf"), [1], {"(": 1}, {"fc": "a"}, "LOKR", True])
    text = json.dumps(doc) if rng.random() < 0.8 else rng.choice(["[]", '"s"', "[" * 5000 + "]" * 5000, "{"])
    cfg.write_text(text)


def m_bytes(path, rng):
    """A few bytes anywhere, or in the first KiB (a GGUF file's header, metadata and tensor infos)."""
    raw = bytearray(path.read_bytes())
    span = len(raw) if rng.random() < 0.5 else min(1024, len(raw))
    for _ in range(rng.randint(1, 6)):
        raw[rng.randrange(span)] = rng.randrange(256)
    path.write_bytes(bytes(raw))


GGUF_MUTATIONS = {"truncate": m_truncate, "bytes": m_bytes}
FILE_MUTATIONS = {"truncate": m_truncate, "header-byte": m_flip_header_byte, "dtype": m_dtype, "shape": m_shape,
                  "metadata": m_metadata, "nan": _tensors_mutation(_nan), "drop-key": _tensors_mutation(_drop),
                  "rename-key": _tensors_mutation(_rename), "reshape": _tensors_mutation(_reshape)}


def _commands(kind: str, f: Path, clean: Path, base: Path, out: Path) -> list[list]:
    if kind == "pipeline":  # the base is what was mutated
        lora = f.parents[1] / "diffusers.safetensors"
        return [["merge", f, lora, "--allow-missing", "-o", out],
                ["convert", lora, "--to", "kohya", "--base", f, "--allow-missing", "-o", out.with_suffix(".safetensors")]]
    cmds = [["inspect", f, "--spectrum"], ["squeeze", f, "--rank", "1" if kind == "gguf" else "2", "-o", out],
            ["combine", f, clean, "--method", "ties", "--density", "0.7", "-o", out],
            ["combine", f, clean, "--weight", "1", "--weight", "-0.5", "-o", out]]
    if kind in ("loha", "lokr"):
        cmds.append(["convert", f, "--to", "lora", "--base", base, "-o", out])
    if kind not in ("diffusers", "gguf"):
        cmds.append(["merge", base, f, "-o", out.with_suffix(".safetensors")])
        cmds.append(["convert", f, "--to", "kohya" if kind == "peft-dora" else "peft-file", "--base", base, "-o",
                     out.with_suffix(".safetensors")])
    return cmds


def _cases(d: Path, clean: dict[str, Path]) -> list[tuple[str, list, Path, Path]]:
    rng = random.Random(SEED)
    cases = []
    for i in range(CASES):
        kind = rng.choice(sorted(clean))
        src = clean[kind]
        case = d / f"case{i:02d}"
        case.mkdir()
        target = case / src.name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, target)
        if kind == "pipeline":  # its JSON files, or its unet's weights
            name, mutate = ("json", m_json_file) if rng.random() < 0.5 else rng.choice(sorted(FILE_MUTATIONS.items()))
            mutate(target if name == "json" else target / "unet" / "diffusion_pytorch_model.safetensors", rng)
        elif src.is_dir():  # its config, or its weights file
            name, mutate = ("config", m_config) if rng.random() < 0.5 else rng.choice(sorted(FILE_MUTATIONS.items()))
            mutate(target if name == "config" else target / "adapter_model.safetensors", rng)
        else:
            name, mutate = rng.choice(sorted((GGUF_MUTATIONS if kind == "gguf" else FILE_MUTATIONS).items()))
            mutate(target, rng)
        out = case / {"peft-dora": "out", "pipeline": "out", "gguf": "out.gguf"}.get(kind, "out.safetensors")
        cmd = rng.choice(_commands(kind, target, clean[kind], d / "base.safetensors", out))
        cases.append((f"{kind}/{name}/{cmd[0]}", cmd, target, case))
    return cases


def _run(cmd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "surgery_cli.main", *map(str, cmd)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow  # a whole process per mutated input
def test_mutated_inputs_keep_the_contract(tmp_path):
    clean = _inputs(tmp_path)
    cases = _cases(tmp_path, clean)
    digests = {case: {p: tree_digest(p) for p in (target, *clean.values(), tmp_path / "base.safetensors")}
               for _, _, target, case in cases}
    before = {case: sorted(p.name for p in case.iterdir()) for _, _, _, case in cases}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _run(c[1]), cases))
    failures, outcomes = [], {"ok": 0, "refused": 0}
    from surgery import load_adapter
    from surgery.adapter import materialize

    for (label, cmd, target, case), r in zip(cases, results):
        lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith(("note:", "warning:"))]
        if r.returncode == 0:
            outcomes["ok"] += 1
            out = next((Path(a) for a in cmd if str(a).startswith(str(case / "out"))), None)
            if out is not None and cmd[0] != "merge":  # a result our reader takes, every tensor finite
                a = load_adapter(out)
                for m in a.modules.values():
                    for t in (getattr(m, "A", None), getattr(m, "B", None), *getattr(m, "tensors", {}).values()):
                        if t is not None:
                            assert torch.isfinite(materialize(t)).all(), f"{label}: non-finite output"
            if out is not None and cmd[0] == "merge":  # no NaN made; a broken base tensor it does not touch is
                # copied byte for byte, as every untouched tensor is
                base = Path(cmd[1])
                given = {k: v for f in (sorted(base.rglob("*.safetensors")) if base.is_dir() else [base])
                         for k, v in load_file(str(f)).items()}
                for f in sorted(out.rglob("*.safetensors")) if out.is_dir() else [out]:
                    for k, t in load_file(str(f)).items():
                        same = k in given and t.dtype == given[k].dtype and t.shape == given[k].shape and \
                            torch.equal(t.contiguous().view(torch.uint8), given[k].contiguous().view(torch.uint8))
                        assert torch.isfinite(t).all() or same, f"{label}: merged NaN in {k}"
        elif r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") \
                and "Traceback" not in r.stderr and (target.name in lines[0] or case.name in lines[0]):
            outcomes["refused"] += 1
            if sorted(p.name for p in case.iterdir()) != before[case]:
                failures.append(f"{label}: refused but wrote {sorted(p.name for p in case.iterdir())}")
        else:
            failures.append(f"{label}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        for p, digest in digests[case].items():
            if tree_digest(p) != digest:
                failures.append(f"{label}: input {p} was modified")
    assert not failures, "\n".join(failures)
    assert outcomes["refused"] > CASES // 3, outcomes  # the mutations do reach the checks
