"""GGUF (llama.cpp / Ollama) adapters and models, with llama.cpp itself as the reference: its converters make the
base models and the adapters we compare with, and its runtime computes the logits (tests/llama_cpp.py)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow  # llama.cpp's converters and runtime on some forty architectures
gguf = pytest.importorskip("gguf")

from surgery import load_adapter, save_adapter  # noqa: E402
from surgery.errors import SurgeryError  # noqa: E402

from . import llama_cpp as L  # noqa: E402

ARCHS = ["LlamaForCausalLM", "MistralForCausalLM", "GraniteForCausalLM", "SmolLM3ForCausalLM", "Qwen2ForCausalLM",
         "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
         "Gemma3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaForConditionalGeneration",
         "Qwen3VLForConditionalGeneration", "Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration",
         "Phi3ForCausalLM",
         "OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM",
         "SeedOssForCausalLM", "Ernie4_5ForCausalLM", "ArceeForCausalLM", "ApertusForCausalLM", "Glm4ForCausalLM",
         "Exaone4ForCausalLM", "StableLmForCausalLM", "HunYuanDenseV1ForCausalLM"]
PHI3 = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LINEAR = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]  # Qwen3.5's gated delta net
NO_GATE = {"ArceeForCausalLM", "ApertusForCausalLM"}  # up_proj → activation → down_proj


def surgery(*args, ok: bool = True):
    """The CLI in process (a subprocess per call would double this file's run time): exit code, stdout, stderr."""
    from click.testing import CliRunner

    from surgery_cli.main import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    r.returncode = r.exit_code
    if ok and r.returncode:
        raise AssertionError(f"surgery {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r


def peft_lora(model_dir: Path, out: Path, targets, seed: int = 1, **config) -> Path:
    """A PEFT LoRA with random (non-zero) A and B on `targets`, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    m = L.load_model(model_dir)
    torch.manual_seed(seed)
    pm = get_peft_model(m, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": targets,
                                         "init_lora_weights": False, **config}))
    pm.save_pretrained(out)
    return out


class Case:
    def __init__(self, root: Path, arch: str):
        self.root, self.arch = root, arch
        self.hf = L.model(arch, root / "hf")
        self.base = L.convert_model(self.hf, root / "base-f32.gguf")
        self.targets = {"Phi3ForCausalLM": PHI3, "Glm4ForCausalLM": ALL7[:4] + PHI3[2:]}.get(
            arch, [t for t in ALL7 if t != "gate_proj"] if arch in NO_GATE else
            ALL7 + LINEAR if arch.startswith("Qwen3_5") else ALL7)
        self.lora = peft_lora(self.hf, root / "lora", self.targets)
        self.ref = L.hf_logits(self.hf, self.lora)
        self.hf_base = L.hf_logits(self.hf)


def _made_once(kind, tmp_path_factory):
    """get(arch) → one `kind` case per architecture for the module's tests."""
    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = kind(tmp_path_factory.mktemp(arch), arch)
        return made[arch]
    return get


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _made_once(Case, tmp_path_factory)


def close(a, b) -> float:
    return float(np.abs(a - b).max())


def _same_updates(want: Path, got: Path, ranks: bool = False) -> None:
    """Two adapters with the same modules and every ΔW equal to float32 round-off (`ranks`: at the same ranks)."""
    a, b = load_adapter(want), load_adapter(got)
    assert b.modules.keys() == a.modules.keys()
    for n, m in a.modules.items():
        assert not ranks or b.modules[n].rank == m.rank, n
        torch.testing.assert_close(b.modules[n].delta(), m.delta(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_runs_our_gguf_as_it_runs_its_own_converters(cases, arch, tmp_path):
    """PEFT LoRA → `surgery convert --base` → llama.cpp: its logits equal PEFT's on the HF model as closely as
    llama.cpp's own convert_lora_to_gguf.py's file does (same run); and the two files are the same adapter."""
    c = cases(arch)
    theirs = L.convert_lora(c.lora, c.hf, tmp_path / "theirs.gguf")
    ours = tmp_path / "ours.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", ours)  # the suffix picks the layout
    l_ours, l_theirs = L.logits(c.base, ours), L.logits(c.base, theirs)
    effect = close(c.ref, c.hf_base)
    assert effect > 1.0  # the adapter changes the logits a lot
    assert close(l_ours, c.ref) <= close(l_theirs, c.ref) + 1e-5
    assert close(l_ours, l_theirs) <= 1e-5 * effect
    assert close(l_ours, c.ref) < 2e-3 * effect  # llama.cpp (f32) and transformers agree (Gemma's softcaps: 1e-3)
    r, t = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert {x.name for x in r.tensors} == {x.name for x in t.tensors}
    for key in ("general.type", "adapter.type", "general.architecture"):
        assert r.get_field(key).contents() == t.get_field(key).contents()


def test_per_module_scales_are_folded_where_one_alpha_cannot_say_them(cases, tmp_path):
    """rank_pattern / alpha_pattern / rsLoRA: GGUF has one alpha, so each module's scale goes into its factors;
    llama.cpp's own converter takes the global alpha for every module (so its file is wrong here)."""
    c = cases("LlamaForCausalLM")
    lora = peft_lora(c.hf, tmp_path / "mixed", ALL7, r=8, lora_alpha=8, use_rslora=True,
                     rank_pattern={"q_proj": 4, "down_proj": 12}, alpha_pattern={"v_proj": 3, "down_proj": 40})
    ref = L.hf_logits(c.hf, lora)
    ours = tmp_path / "mixed.gguf"
    surgery("convert", lora, "--to", "gguf", "--base", c.hf, "-o", ours)
    theirs = L.convert_lora(lora, c.hf, tmp_path / "theirs.gguf")
    effect = close(ref, c.hf_base)
    assert close(L.logits(c.base, ours), ref) < 1e-5 * effect
    assert close(L.logits(c.base, theirs), ref) > 100 * close(L.logits(c.base, ours), ref)


def test_config_only_base_and_gguf_base_name_the_same(cases, tmp_path):
    """--base may be a folder holding only config.json, or the GGUF model: the same file either way."""
    c = cases("LlamaForCausalLM")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    shutil.copy(c.hf / "config.json", cfg)
    files = []
    for i, base in enumerate((c.hf, cfg, c.base)):
        files.append(tmp_path / f"{i}.gguf")
        surgery("convert", c.lora, "--base", base, "-o", files[-1])
    tensors = [{t.name: np.array(t.data) for t in gguf.GGUFReader(f).tensors} for f in files]
    for other in tensors[1:]:
        assert other.keys() == tensors[0].keys()
        assert all(np.array_equal(other[k], tensors[0][k]) for k in other)


def test_gguf_to_peft_round_trip(cases, tmp_path):
    """PEFT → GGUF → PEFT: every ΔW equal to float rounding (permutation undone, names mapped back), and PeftModel
    loads the result with the original's logits."""
    c = cases("LlamaForCausalLM")
    g = tmp_path / "a.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", g)
    back = tmp_path / "back"
    surgery("convert", g, "--to", "peft", "--base", c.hf, "-o", back)
    a, b = load_adapter(c.lora), load_adapter(back)
    assert a.modules.keys() == b.modules.keys()
    for n, m in a.modules.items():
        torch.testing.assert_close(b.modules[n].delta(), m.delta(), rtol=0, atol=1e-6)
    assert close(L.hf_logits(c.hf, back), c.ref) < 1e-4
    # the Python API does the same
    api = save_adapter(load_adapter(g), tmp_path / "api.safetensors", format="peft-file", base=c.hf)
    for n, m in load_adapter(api).modules.items():
        torch.testing.assert_close(m.delta(), a.modules[n].delta(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch, vision", [("Gemma3ForConditionalGeneration", 3),
                                          ("Qwen2_5_VLForConditionalGeneration", 3),
                                          ("LlavaForConditionalGeneration", 6),
                                          ("Mistral3ForConditionalGeneration", 7)])
def test_image_text_model_s_text_adapter(cases, tmp_path, arch, vision):
    """Gemma 3 4B and up, Qwen2.5-VL, LLaVA and Mistral Small 3.1+ (Mistral3, for which llama.cpp's own LoRA
    converter writes a model file rather than an adapter) are image-text models (the text model under
    `model.language_model.`, its sizes in text_config), and their PEFT adapters (all-linear) cover the vision
    tower too. Written for llama.cpp, the text model's modules are named as its converter names them, the tower's
    are left out with a note (llama.cpp adapts the text model only; its converter drops them too); back to PEFT,
    the names are the image-text model's, and PeftModel and a merge into the HF model give llama.cpp's logits."""
    c = cases(arch)
    g = tmp_path / "a.gguf"
    r = surgery("convert", c.lora, "--base", c.hf, "-o", g)
    assert f"{vision} module(s) of the vision tower / projector left out" in r.stderr
    surgery("convert", c.lora, "--base", c.base, "-o", tmp_path / "b.gguf")  # the GGUF model names the same
    assert {t.name: np.array(t.data).tobytes() for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors} == \
        {t.name: np.array(t.data).tobytes() for t in gguf.GGUFReader(g).tensors}
    back = tmp_path / "back"
    surgery("convert", g, "--to", "peft", "--base", c.hf, "-o", back)
    a, b = load_adapter(c.lora), load_adapter(back)
    text = {n for n in a.modules if ".language_model." in n}
    assert b.modules.keys() == text and len(text) == 2 * 7
    for n in text:
        torch.testing.assert_close(b.modules[n].delta(), a.modules[n].delta(), rtol=0, atol=1e-6)
    effect = close(c.ref, c.hf_base)
    runtime = L.logits(c.base, g)
    assert close(L.hf_logits(c.hf, back), runtime) < 2e-3 * effect
    surgery("merge", c.hf, g, "-o", tmp_path / "merged")
    assert close(L.hf_logits(tmp_path / "merged"), runtime) < 2e-3 * effect


def test_image_text_refusals_are_one_line_and_write_nothing(cases, tmp_path):
    """An image-text adapter on the vision tower alone has nothing llama.cpp adapts, and a config whose text_config
    is not an object has no text model's sizes: each one `error:` line, exit 1, nothing written."""
    c = cases("Gemma3ForConditionalGeneration")
    a = load_adapter(c.lora)
    vision = a.with_modules({n: m for n, m in a.modules.items() if ".vision_tower." in n})
    save_adapter(vision, tmp_path / "vision")
    out = tmp_path / "out.gguf"
    _one_line_error(surgery("convert", tmp_path / "vision", "--base", c.hf, "-o", out, ok=False),
                    "no module of the text model")
    config = json.loads((c.hf / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "text_config": [1]}))
    _one_line_error(surgery("convert", c.lora, "--base", tmp_path / "bad", "-o", out, ok=False),
                    "text_config must be an object")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad", "vision"]


def test_qwen3_5_linear_attention_v_heads_in_llama_cpp_s_order(cases, tmp_path, monkeypatch):
    """Qwen3.5's gated-delta-net layers have more V heads than K heads; llama.cpp's converter reorders them from
    HF's grouped order to a tiled one (rows of in_proj_qkv's V part, in_proj_z, in_proj_a/b; columns of out_proj). A
    LoRA on those layers alone: ours runs in llama.cpp as PEFT runs it, named without the reorder it would not; back
    to PEFT (through the HF folder or the GGUF model as base) every ΔW is the original's; merged into the GGUF model
    (PEFT's file or ours) it equals the adapter applied at run time."""
    from surgery.io import gguf_file

    c = cases("Qwen3_5ForCausalLM")
    lora = peft_lora(c.hf, tmp_path / "linear", LINEAR, seed=3)
    ref = L.hf_logits(c.hf, lora)
    effect = close(ref, c.hf_base)
    ours = tmp_path / "ours.gguf"
    surgery("convert", lora, "--base", c.hf, "-o", ours)
    runtime = L.logits(c.base, ours)
    assert close(runtime, ref) < 1e-5 * effect
    with monkeypatch.context() as m:  # the same names in HF's order: another model
        m.setattr(gguf_file, "_reorder", lambda *a: (None, None))
        surgery("convert", lora, "--base", c.hf, "-o", tmp_path / "naive.gguf")
    assert close(L.logits(c.base, tmp_path / "naive.gguf"), ref) > 0.05 * effect
    for i, base in enumerate((c.hf, c.base)):
        surgery("convert", ours, "--to", "peft", "--base", base, "-o", tmp_path / f"back{i}")
        _same_updates(lora, tmp_path / f"back{i}")
    for i, adapter in enumerate((lora, ours)):
        merged = tmp_path / f"merged{i}.gguf"
        surgery("merge", c.base, adapter, "-o", merged)
        assert close(L.logits(merged), runtime) < 1e-5 * effect
    config = json.loads((c.hf / "config.json").read_text())  # a config-only base without the head counts
    for i, (change, says) in enumerate([({"linear_num_value_heads": None}, "linear_num_value_heads"),
                                        ({"linear_num_value_heads": 3},
                                         "3 linear-attention V heads do not group over 2"),
                                        ({"linear_value_head_dim": 4}, "32 rows/columns are not 4 linear-attention V "
                                                                      "heads of 4")]):  # (no shapes to check first)
        (tmp_path / f"cfg{i}").mkdir()
        (tmp_path / f"cfg{i}" / "config.json").write_text(json.dumps({k: v for k, v in {**config, **change}.items()
                                                                      if v is not None}))
        _one_line_error(surgery("convert", lora, "--base", tmp_path / f"cfg{i}", "-o", tmp_path / "x.gguf", ok=False),
                        says)
    assert not (tmp_path / "x.gguf").exists()
    # attn_qkv is in_proj_qkv's in a gated-delta-net block; on the full-attention block 1 the model has none (it was
    # read as layers.1.linear_attn.in_proj_qkv, a module the model lacks)
    rng = np.random.default_rng(1)
    odd = _gguf_adapter(tmp_path / "odd.gguf", arch="qwen35", tensors={
        "blk.1.attn_qkv.weight.lora_a": rng.standard_normal((4, 64), dtype=np.float32),
        "blk.1.attn_qkv.weight.lora_b": rng.standard_normal((64, 4), dtype=np.float32)})
    for base in (c.base, c.hf):
        _one_line_error(surgery("convert", odd, "--to", "peft", "--base", base, "-o", tmp_path / "p", ok=False),
                        "has no tensor blk.1.attn_qkv.weight")
    assert not (tmp_path / "p").exists()


def _truncated_peft(lora: Path, out: Path, rank: int) -> Path:
    """The optimal rank-`rank` truncation of every ΔW (float64 SVD of the dense product), as a PEFT adapter."""
    a = load_adapter(lora)
    tensors = {}
    for n, m in a.modules.items():
        U, S, Vh = torch.linalg.svd(m.delta(torch.float64), full_matrices=False)
        tensors[f"{n}.lora_B.weight"] = (U[:, :rank] * S[:rank]).float().contiguous()
        tensors[f"{n}.lora_A.weight"] = Vh[:rank].float().contiguous()
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((lora / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_llama_cpp_written_adapter_squeezed_loads_with_the_optimal_truncation(cases, tmp_path):
    """llama.cpp's converter's file → surgery squeeze --rank 4 → still GGUF, and llama.cpp gives the logits of the
    optimal rank-4 truncation (PEFT on HF with the float64 SVD truncation)."""
    c = cases("LlamaForCausalLM")
    theirs = L.convert_lora(c.lora, c.hf, tmp_path / "theirs.gguf")
    r = surgery("inspect", theirs)
    assert "gguf adapter" in r.stdout and "blk.0.attn_q" in r.stdout  # GGUF names without --base
    surgery("squeeze", theirs, "--rank", "4")
    small = tmp_path / "theirs-r4.gguf"
    assert [t.shape.tolist() for t in gguf.GGUFReader(small).tensors if t.name == "blk.0.attn_q.weight.lora_a"] \
        == [[64, 4]]
    ref = L.hf_logits(c.hf, _truncated_peft(c.lora, tmp_path / "trunc", 4))
    assert close(ref, c.ref) > 0.1  # the truncation matters
    assert close(L.logits(c.base, small), ref) < 1e-4 * close(ref, c.hf_base)


def test_q8_0_adapter_matches_llama_cpp_converter(cases, tmp_path):
    """--dtype q8_0: the same tensor types and bytes as convert_lora_to_gguf.py --outtype q8_0 (Q8_0 where rows
    are whole blocks of 32, F16 for B's rank-8 rows); read back, it keeps q8_0 when squeezed."""
    c = cases("LlamaForCausalLM")
    ours = tmp_path / "q8.gguf"
    surgery("convert", c.lora, "--to", "gguf", "--base", c.hf, "--dtype", "q8_0", "-o", ours)
    theirs = L.convert_lora(c.lora, c.hf, tmp_path / "theirs.gguf", "q8_0")
    o = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert {n: x.tensor_type.name for n, x in o.items()} == {n: x.tensor_type.name for n, x in t.items()}
    assert {x.tensor_type.name for x in o.values()} == {"Q8_0", "F16"}
    assert all(np.array_equal(np.array(o[n].data), np.array(t[n].data)) for n in o)
    assert close(L.logits(c.base, ours), L.logits(c.base, theirs)) < 1e-6
    surgery("squeeze", ours, "--rank", "6", "-o", tmp_path / "q8-r6.gguf")
    types = {x.tensor_type.name for x in gguf.GGUFReader(tmp_path / "q8-r6.gguf").tensors}
    assert types == {"Q8_0", "F16"}
    f32 = tmp_path / "f32.gguf"  # an f32 adapter squeezed with --dtype float16 is stored F16
    surgery("convert", c.lora, "--base", c.hf, "-o", f32)
    surgery("squeeze", f32, "--rank", "6", "--dtype", "float16", "-o", tmp_path / "h.gguf")
    assert {x.tensor_type.name for x in gguf.GGUFReader(tmp_path / "h.gguf").tensors} == {"F16"}


def test_combine_gguf_and_peft_into_gguf(cases, tmp_path):
    """combine a.gguf b/ --base → both.gguf = the sum of both updates in llama.cpp (reference: PEFT with the two
    adapters' factors stacked, built by hand)."""
    c = cases("Qwen2ForCausalLM")
    a = tmp_path / "a.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", a)
    b = peft_lora(c.hf, tmp_path / "b", ["q_proj", "v_proj", "down_proj"], seed=7, r=4, lora_alpha=4)
    both = tmp_path / "both.gguf"
    surgery("combine", a, b, "--base", c.hf, "-o", both)
    A, B = load_adapter(c.lora), load_adapter(b)
    tensors = {}
    for n, m in A.modules.items():
        Bs, As = [m.scale * m.factors()[0]], [m.factors()[1]]
        if n in B.modules:
            Bs.append(B.modules[n].scale * B.modules[n].factors()[0])
            As.append(B.modules[n].factors()[1])
        tensors[f"{n}.lora_B.weight"] = torch.cat(Bs, 1).contiguous()
        tensors[f"{n}.lora_A.weight"] = torch.cat(As, 0).contiguous()
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file(tensors, str(ref_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((c.lora / "adapter_config.json").read_text())
    ranks = {n.removeprefix("base_model.model."): t.shape[0] for n, t in
             ((k[: -len(".lora_A.weight")], v) for k, v in tensors.items() if k.endswith("lora_A.weight"))}
    cfg.update(r=8, lora_alpha=8, rank_pattern=ranks, alpha_pattern=ranks)
    (ref_dir / "adapter_config.json").write_text(json.dumps(cfg))
    ref = L.hf_logits(c.hf, ref_dir)
    assert close(ref, c.ref) > 0.1
    assert close(L.logits(c.base, both), ref) < 1e-5 * close(ref, c.hf_base)


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merge_into_gguf_model_equals_the_adapter_applied_at_run_time(cases, tmp_path, outtype):
    """surgery merge model.gguf lora/ → llama.cpp's logits of the merged model equal llama.cpp's with the adapter
    applied at run time (f32 exactly up to float sums; f16 to one rounding of W + ΔW; Q8_0 re-quantized, its error
    reported); metadata and untouched tensors are copied byte for byte."""
    c = cases("LlamaForCausalLM")
    base = c.base if outtype == "f32" else L.convert_model(c.hf, tmp_path / f"base-{outtype}.gguf", outtype)
    adapter = tmp_path / "a.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", adapter)
    merged = tmp_path / "merged.gguf"
    r = surgery("merge", base, c.lora, "-o", merged)
    assert ("re-quantized" in r.stderr) == (outtype == "q8_0")
    runtime, effect = L.logits(base, adapter), close(c.ref, c.hf_base)
    if outtype == "q8_0":  # one more Q8_0 rounding of W + ΔW: about what quantizing the base once costs
        assert close(L.logits(merged), runtime) < 1.5 * close(runtime, L.logits(c.base, adapter))
    else:
        assert close(L.logits(merged), runtime) < {"f32": 1e-5, "f16": 2e-3}[outtype] * effect
    src, dst = gguf.GGUFReader(base), gguf.GGUFReader(merged)
    assert [f.name for f in src.fields.values()] == [f.name for f in dst.fields.values()]
    for f in src.fields.values():
        if not f.name.startswith("GGUF."):
            assert f.contents() == dst.get_field(f.name).contents(), f.name
    changed = 0
    for s, d in zip(src.tensors, dst.tensors):
        assert (s.name, s.tensor_type, s.shape.tolist()) == (d.name, d.tensor_type, d.shape.tolist())
        same = np.array_equal(np.array(s.data), np.array(d.data))
        changed += not same
        assert same == (not s.name.startswith("blk.") or "norm" in s.name), s.name
    assert changed == 14


# ---------------------------------------------------------------- bad input: one line, exit 1, nothing written


def _one_line_error(r, *needles):
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line_and_writes_nothing(cases, tmp_path, tmp_path_factory):
    c = cases("LlamaForCausalLM")
    out = tmp_path / "out.gguf"
    good = tmp_path / "good.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", good)
    # no --base where one is needed
    _one_line_error(surgery("convert", c.lora, "-o", out, ok=False), "--base")
    _one_line_error(surgery("convert", good, "--to", "peft", "-o", tmp_path / "p", ok=False), "--base")
    # an adapter for another model's shapes
    other = L.model("LlamaForCausalLM", tmp_path / "other", seed=3)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=48, head_dim=8)
    (other / "config.json").write_text(json.dumps(cfg))
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
                                  ).save_pretrained(other)
    _one_line_error(surgery("convert", c.lora, "--base", other, "-o", out, ok=False), "another model")
    _one_line_error(surgery("convert", good, "--to", "peft", "--base", other, "-o", tmp_path / "p", ok=False),
                    "another model")
    # truncated and corrupt GGUF files
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 3])
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    key = data.index(b"general.architecture") + len(b"general.architecture") + 4 + 8  # value type, string length
    (tmp_path / "latin1.gguf").write_bytes(data[:key] + b"\xff" + data[key + 1:])  # a string value not UTF-8
    _one_line_error(surgery("combine", tmp_path / "latin1.gguf", good, "-o", out, ok=False), "latin1.gguf",
                    "general.architecture", "UTF-8")
    for bad in ("trunc.gguf", "corrupt.gguf", "latin1.gguf"):
        _one_line_error(surgery("inspect", tmp_path / bad, ok=False), bad)
        _one_line_error(surgery("squeeze", tmp_path / bad, "--rank", "2", "-o", out, ok=False), bad)
    _one_line_error(surgery("merge", c.base, tmp_path / "trunc.gguf", "-o", out, ok=False), "trunc.gguf")
    _one_line_error(surgery("merge", tmp_path / "trunc.gguf", c.lora, "-o", out, ok=False), "trunc.gguf")
    # an unsupported architecture
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    _one_line_error(surgery("convert", c.lora, "--base", gpt2, "-o", out, ok=False), "GPT2LMHeadModel")
    # a base tensor type surgery does not re-quantize (Q4_0), named
    q4 = tmp_path / "q4.gguf"
    reader = gguf.GGUFReader(c.base)
    from surgery.io import gguf_file

    def q4_0(t):
        if t.name == "blk.0.attn_q.weight":
            data = gguf.quants.quantize(np.array(t.data, dtype=np.float32), gguf.GGMLQuantizationType.Q4_0)
            return gguf_file.Planned(t.name, tuple(reversed(t.shape.tolist())), gguf.GGMLQuantizationType.Q4_0,
                                     lambda d=data: d)
        return gguf_file.Planned(t.name, tuple(reversed(t.shape.tolist())), t.tensor_type,
                                 lambda d=np.array(t.data): d)
    gguf_file.write_file(q4, reader, gguf_file.copied_fields(reader), [q4_0(t) for t in reader.tensors])
    _one_line_error(surgery("merge", q4, c.lora, "-o", out, ok=False), "q4_0", "blk.0.attn_q.weight")
    # targets llama.cpp cannot apply: DoRA, a norm vector, a tied output head (Gemma)
    dora = peft_lora(c.hf, tmp_path / "dora", ["q_proj"], use_dora=True)
    _one_line_error(surgery("convert", dora, "--base", c.hf, "-o", out, ok=False), "DoRA")
    g = cases("Gemma2ForCausalLM")
    head = peft_lora(g.hf, tmp_path / "head", ["q_proj", "lm_head"])
    _one_line_error(surgery("convert", head, "--base", g.hf, "-o", out, ok=False), "lm_head", "tied")
    norm = tmp_path_factory.mktemp("bad") / "norm"  # outside tmp_path: PEFT itself cannot load it
    shutil.copytree(c.lora, norm)
    t = load_file(str(norm / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.input_layernorm.lora_A.weight"] = torch.randn(8, 64)
    t["base_model.model.model.layers.0.input_layernorm.lora_B.weight"] = torch.randn(64, 8)
    save_file(t, str(norm / "adapter_model.safetensors"), metadata={"format": "pt"})
    _one_line_error(surgery("convert", norm, "--base", c.hf, "-o", out, ok=False), "norm")
    assert not out.exists() and not (tmp_path / "p").exists()
    assert not any(p.name.startswith(".out.gguf") for p in tmp_path.iterdir())


def test_python_api(cases, tmp_path):
    """load_adapter / save_adapter(base=…): the same file as the CLI's, and a GGUF adapter read back as it was."""
    c = cases("LlamaForCausalLM")
    out = save_adapter(load_adapter(c.lora), tmp_path / "api.gguf", base=c.hf)
    cli = tmp_path / "cli.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", cli)
    assert [np.array(t.data).tobytes() for t in gguf.GGUFReader(out).tensors] == \
        [np.array(t.data).tobytes() for t in gguf.GGUFReader(cli).tensors]
    a = load_adapter(out)
    assert a.format == "gguf" and len(a.modules) == 14
    m = a.modules["blk.0.attn_v"]
    assert m.rank == 8 and m.scale == 2.0 and m.shape == (32, 64)
    with pytest.raises(SurgeryError, match="--base"):
        save_adapter(load_adapter(c.lora), tmp_path / "nobase.gguf")


def test_squeeze_and_extract_write_gguf_with_a_base(cases, tmp_path):
    """squeeze LORA --base MODEL -o x.gguf and extract FT BASE -o x.gguf name their output for llama.cpp: its
    logits equal the adapter's applied at run time from the converted file."""
    import transformers
    from peft import PeftModel

    c = cases("LlamaForCausalLM")
    ft = tmp_path / "ft"
    m = transformers.AutoModelForCausalLM.from_pretrained(c.hf, dtype=torch.float32)
    PeftModel.from_pretrained(m, c.lora).merge_and_unload().save_pretrained(ft)
    converted = tmp_path / "a.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", converted)
    runtime, effect = L.logits(c.base, converted), close(c.ref, c.hf_base)
    surgery("squeeze", c.lora, "--rank", "8", "--base", c.hf, "-o", tmp_path / "sq.gguf")
    surgery("extract", ft, c.hf, "--rank", "8", "-o", tmp_path / "ex.gguf")
    assert close(L.logits(c.base, tmp_path / "sq.gguf"), runtime) < 1e-6 * effect
    assert close(L.logits(c.base, tmp_path / "ex.gguf"), runtime) < 1e-5 * effect


def test_token_embedding_lora(cases, tmp_path):
    """A LoRA on embed_tokens (PEFT also saves the base table beside it): llama.cpp's token_embd layout (lora_a
    transposed), as its converter writes it; back to PEFT and merged into the GGUF model, the same logits. On a base
    whose head is tied to the embeddings, one line (llama.cpp would crash on the file)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    c = cases("LlamaForCausalLM")
    m = transformers.AutoModelForCausalLM.from_pretrained(c.hf, dtype=torch.float32)
    torch.manual_seed(2)
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_embedding_B" in n:  # PEFT starts it at zero even so
                p.normal_(0, 0.5)
    lora = tmp_path / "elora"
    pm.save_pretrained(lora)
    ref = L.hf_logits(c.hf, lora)
    ours, theirs = tmp_path / "e.gguf", L.convert_lora(lora, c.hf, tmp_path / "theirs.gguf")
    surgery("convert", lora, "--base", c.hf, "-o", ours)
    runtime, effect = L.logits(c.base, ours), close(ref, c.hf_base)
    assert effect > 1.0
    assert close(runtime, L.logits(c.base, theirs)) <= 1e-6 * effect
    assert close(runtime, ref) < 1e-5 * effect
    surgery("convert", ours, "--to", "peft", "--base", c.hf, "-o", tmp_path / "back")
    assert close(L.hf_logits(c.hf, tmp_path / "back"), ref) < 1e-5 * effect
    surgery("merge", c.base, ours, "-o", tmp_path / "merged.gguf")
    assert close(L.logits(tmp_path / "merged.gguf"), runtime) < 1e-5 * effect
    # a base whose output head is the token embeddings (Gemma 3): llama.cpp applies a token_embd LoRA there too and
    # aborts the process, so the module is refused (or left out with --allow-missing)
    g = cases("Gemma3ForCausalLM")
    pm = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(g.hf, dtype=torch.float32), LoraConfig(
        r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "tied")
    for base in (g.hf, g.base):
        _one_line_error(surgery("convert", tmp_path / "tied", "--base", base, "-o", tmp_path / "t.gguf", ok=False),
                        "embed_tokens", "ties its output head to the token embeddings", "--allow-missing")
    assert not (tmp_path / "t.gguf").exists()
    surgery("convert", tmp_path / "tied", "--base", g.base, "--allow-missing", "-o", tmp_path / "t.gguf")
    written = {t.name for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    assert "blk.0.attn_q.weight.lora_a" in written and not any(n.startswith("token_embd") for n in written)
    assert np.isfinite(L.logits(g.base, tmp_path / "t.gguf")).all()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3_5ForCausalLM"])
def test_gguf_model_with_fused_qkv(cases, tmp_path, arch):
    """A GGUF model converted with llama.cpp's --fuse-qkv keeps each block's q, k and v rows (Llama's q and k
    permuted; Qwen3.5's gated q twice its heads' size, in its full-attention blocks only) in one tensor (attn_qkv),
    and llama.cpp looks its adapter up by that name: given such a model as base, the q, k and v LoRAs are written as
    one, side by side (a missing one a zero block), and llama.cpp runs it with PeftModel's logits — on all three or
    on q and v only (PEFT's default targets); back to PEFT every ΔW is the original's; merged into that model, the
    run-time adapter's logits."""
    c = cases(arch)
    fused = L.convert_model(c.hf, tmp_path / "fused.gguf", "f32", "--fuse-qkv")
    names = {t.name for t in gguf.GGUFReader(fused).tensors}
    assert "blk.1.attn_qkv.weight" in names and "blk.1.attn_q.weight" not in names
    qv = peft_lora(c.hf, tmp_path / "qv", ["q_proj", "v_proj", "down_proj"], seed=4)
    for i, (lora, ref) in enumerate([(c.lora, c.ref), (qv, L.hf_logits(c.hf, qv))]):
        ours = tmp_path / f"ours{i}.gguf"
        surgery("convert", lora, "--base", fused, "-o", ours)
        written = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        assert "blk.1.attn_qkv.weight.lora_a" in written and not any(".attn_q.w" in n or ".attn_v.w" in n
                                                                      for n in written)
        assert list(written["blk.1.attn_qkv.weight.lora_a"].shape) == [64, 24 if i == 0 else 16]  # (ne: in, Σ r)
        effect = close(ref, c.hf_base)
        runtime = L.logits(fused, ours)
        assert close(runtime, ref) < 1e-5 * effect
        surgery("convert", ours, "--to", "peft", "--base", fused, "-o", tmp_path / f"back{i}")
        # (k_proj's zero block in the q + v file: no module; each part its own directions of the side-by-side A)
        _same_updates(lora, tmp_path / f"back{i}", ranks=True)
        surgery("merge", fused, ours, "-o", tmp_path / f"merged{i}.gguf")
        assert close(L.logits(tmp_path / f"merged{i}.gguf"), runtime) < 1e-5 * effect
    if arch != "LlamaForCausalLM":
        return
    # parts that do not fit the fused tensor, either way: one line, nothing written
    from surgery.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(5)
    for name, shapes, says in [
            ("rows", {"q_proj": (96, 64), "v_proj": (32, 64)}, "has 128 rows, not the 96 + 32 + 32 of its q, k and v"),
            ("cols", {"q_proj": (64, 48), "v_proj": (32, 64)},
             "a part's LoRA is (32, 64); the base's part is (32, 48)"),
            ("all-cols", {"q_proj": (64, 48), "v_proj": (32, 48)}, "ΔW is (128, 48) but")]:
        save_adapter(Adapter(modules={f"base_model.model.model.layers.0.self_attn.{k}": LoraModule(
            A=torch.randn(4, i, generator=g), B=torch.randn(o, 4, generator=g), scale=1.0) for k, (o, i) in
            shapes.items()}, format="peft", config={"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                    "target_modules": sorted(shapes)}), tmp_path / name)
        _one_line_error(surgery("convert", tmp_path / name, "--base", fused, "-o", tmp_path / "x.gguf", ok=False),
                        "blk.0.attn_qkv", says)
    rng = np.random.default_rng(2)
    wrong = _gguf_adapter(tmp_path / "wrong.gguf", tensors={
        "blk.0.attn_qkv.weight.lora_a": rng.standard_normal((4, 64), dtype=np.float32),
        "blk.0.attn_qkv.weight.lora_b": rng.standard_normal((96, 4), dtype=np.float32)})
    _one_line_error(surgery("convert", wrong, "--to", "peft", "--base", fused, "-o", tmp_path / "x", ok=False),
                    "blk.0.attn_qkv: a (96, 64) LoRA, but")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x").exists()


def test_activated_lora(cases, tmp_path):
    """An activated LoRA (PEFT's alora_invocation_tokens: applied from its invocation tokens on) is llama.cpp's
    adapter.alora.invocation_tokens: our file is its converter's, key and tensors; llama.cpp run as its server runs
    an aLoRA (the tokens before the invocation without the adapter) gives PeftModel's logits; back to PEFT, squeezed,
    the tokens stay. Merged into a model, combined, or written where no loader reads the tokens: one line."""
    c = cases("LlamaForCausalLM")
    lora = peft_lora(c.hf, tmp_path / "alora", ["q_proj", "v_proj", "down_proj"], alora_invocation_tokens=[71, 120],
                     task_type="CAUSAL_LM")  # (TOKENS[2:4]: PEFT applies it from position 2 on)
    ref = L.hf_logits(c.hf, lora)
    assert close(ref[:2], c.hf_base[:2]) == 0
    effect = close(ref, c.hf_base)
    ours = tmp_path / "ours.gguf"
    surgery("convert", lora, "--base", c.hf, "-o", ours)
    theirs = L.convert_lora(lora, c.hf, tmp_path / "theirs.gguf")
    key = "adapter.alora.invocation_tokens"
    assert gguf.GGUFReader(ours).get_field(key).contents() == gguf.GGUFReader(theirs).get_field(key).contents() \
        == [71, 120]
    o, t = ({x.name: np.array(x.data) for x in gguf.GGUFReader(f).tensors} for f in (ours, theirs))
    assert o.keys() == t.keys() and all(np.allclose(o[n], t[n], rtol=0, atol=1e-6) for n in o)
    assert close(L.logits(c.base, ours, activate_at=2), ref) < 1e-5 * effect
    assert close(L.logits(c.base, ours), ref) > 0.1 * effect  # (applied everywhere, another model)
    surgery("convert", ours, "--to", "peft", "--base", c.hf, "-o", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["alora_invocation_tokens"] == [71, 120]
    assert close(L.hf_logits(c.hf, tmp_path / "back"), ref) < 1e-5 * effect
    surgery("squeeze", ours, "--rank", "4", "-o", tmp_path / "small.gguf")
    assert gguf.GGUFReader(tmp_path / "small.gguf").get_field(key).contents() == [71, 120]
    assert "alora_invocation_tokens [71, 120]: an activated LoRA" in surgery("inspect", ours).output
    x = tmp_path / "x"
    for args in (("merge", c.base, ours, "-o", x.with_suffix(".gguf")), ("merge", c.base, lora, "-o", x.with_suffix(
            ".gguf")), ("merge", c.hf, ours, "-o", x), ("combine", ours, c.lora, "--base", c.hf, "-o", x.with_suffix(
            ".gguf")), ("convert", ours, "--to", "peft-file", "--base", c.hf, "-o", x.with_suffix(".safetensors"))):
        _one_line_error(surgery(*args, ok=False), "alora_invocation_tokens", "activated LoRA")
    assert not any(p.name.startswith("x") for p in tmp_path.iterdir())


def _gguf_adapter(path: Path, fields=None, tensors=None, arch: str = "llama") -> Path:
    """A hand-made GGUF adapter: llama.cpp's adapter fields (overridable; None drops one) and {name: array}."""
    from surgery.io import gguf_file

    T = gguf.GGUFValueType
    base = {"general.type": ("adapter", T.STRING), "adapter.type": ("lora", T.STRING),
            "adapter.lora.alpha": (16.0, T.FLOAT32)}
    base.update(fields or {})
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = {"blk.0.attn_v.weight.lora_a": rng.standard_normal((8, 64), dtype=np.float32),
                   "blk.0.attn_v.weight.lora_b": rng.standard_normal((32, 8), dtype=np.float32)}
    planned = [gguf_file.Planned(n, a.shape, gguf.GGMLQuantizationType.F32, lambda a=a: a) for n, a in tensors.items()]
    gguf_file.write_file(path, arch, [(k, v, t, T.UINT32 if t == T.ARRAY else None)
                                      for k, (v, t) in base.items() if v is not None], planned)
    return path


def test_every_gguf_refusal_is_one_line_and_writes_nothing(cases, tmp_path):
    """Each GGUF error path fed its bad input: one `error:` line naming the problem, exit 1 (2 for usage errors),
    no output left behind."""
    c = cases("LlamaForCausalLM")
    T = gguf.GGUFValueType
    good = _gguf_adapter(tmp_path / "good.gguf")
    rng = np.random.default_rng(1)
    bad = {
        "not-an-adapter": (_gguf_adapter(tmp_path / "m.gguf", {"general.type": ("model", T.STRING)}), "not an adapter"),
        "not-lora": (_gguf_adapter(tmp_path / "t.gguf", {"adapter.type": ("control_vector", T.STRING)}),
                     "control_vector"),
        "alora": (_gguf_adapter(tmp_path / "al.gguf", {"adapter.alora.invocation_tokens": ("x", T.STRING)}),
                  "is not a list of token ids"),  # (an activated LoRA's tokens: test_activated_lora)
        "alpha": (_gguf_adapter(tmp_path / "al2.gguf", {"adapter.lora.alpha": (-1.0, T.FLOAT32)}), "alpha"),
        "no-alpha": (_gguf_adapter(tmp_path / "al3.gguf", {"adapter.lora.alpha": (None, None)}), "adapter.lora.alpha"),
        "other-tensor": (_gguf_adapter(tmp_path / "o.gguf", tensors={"blk.0.attn_v.weight": np.ones((32, 64),
                                                                                                  np.float32)}),
                         "not a LoRA factor"),
        "unpaired": (_gguf_adapter(tmp_path / "u.gguf", tensors={
            "blk.0.attn_v.weight.lora_a": rng.standard_normal((8, 64), dtype=np.float32)}), "without its pair"),
        "mispaired": (_gguf_adapter(tmp_path / "mp.gguf", tensors={
            "blk.0.attn_v.weight.lora_a": rng.standard_normal((8, 64), dtype=np.float32),
            "blk.0.attn_v.weight.lora_b": rng.standard_normal((32, 4), dtype=np.float32)}), "do not pair"),
        "empty": (_gguf_adapter(tmp_path / "e.gguf", tensors={}), "without LoRA tensors"),
        "empty-factor": (_gguf_adapter(tmp_path / "z.gguf", tensors={  # were tracebacks (alpha / 0, 0×0 modules)
            "blk.0.attn_v.weight.lora_a": np.zeros((0, 64), np.float32),
            "blk.0.attn_v.weight.lora_b": np.zeros((32, 0), np.float32)}), "has an empty factor"),
        "no-experts": (_gguf_adapter(tmp_path / "z3.gguf", tensors={
            "blk.0.ffn_up_exps.weight.lora_a": np.zeros((0, 8, 64), np.float32),
            "blk.0.ffn_up_exps.weight.lora_b": np.zeros((0, 32, 8), np.float32)}), "has an empty factor"),
        "model-as-adapter": (c.base, "not an adapter"),
    }
    out = tmp_path / "out.gguf"
    for name, (path, needle) in bad.items():
        r = surgery("squeeze", path, "--rank", "2", "-o", out, ok=False)
        _one_line_error(r, needle)
    # a GGUF adapter of another architecture, by name and by merge
    qwen = _gguf_adapter(tmp_path / "qwen.gguf", arch="qwen2")
    _one_line_error(surgery("merge", c.base, qwen, "-o", out, ok=False), "architecture qwen2")
    _one_line_error(surgery("convert", qwen, "--to", "peft", "--base", c.hf, "-o", tmp_path / "p", ok=False),
                    "architecture qwen2")
    # bases that cannot name modules
    _one_line_error(surgery("convert", c.lora, "--base", good, "-o", out, ok=False), "GGUF adapter, not a model")
    gpt2 = _gguf_adapter(tmp_path / "gpt2.gguf", {"general.type": ("model", T.STRING)}, arch="gpt2")
    _one_line_error(surgery("convert", c.lora, "--base", gpt2, "-o", out, ok=False), "'gpt2'")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(surgery("convert", c.lora, "--base", empty, "-o", out, ok=False), "no config.json")
    (tmp_path / "nolayers").mkdir()
    (tmp_path / "nolayers" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    _one_line_error(surgery("convert", c.lora, "--base", tmp_path / "nolayers", "-o", out, ok=False),
                    "num_hidden_layers")
    # GLM-4 with multimodal RoPE: llama.cpp reorders its q/k rows (normal_to_neox), which we do not: refused
    (tmp_path / "glm").mkdir()
    (tmp_path / "glm" / "config.json").write_text(json.dumps({
        "architectures": ["Glm4ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
        "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12]}}))
    _one_line_error(surgery("convert", c.lora, "--base", tmp_path / "glm", "-o", out, ok=False), "mrope_section")
    glm = _gguf_adapter(tmp_path / "glm.gguf", {"general.type": ("model", T.STRING), "glm4.block_count": (2, T.UINT32),
                                                "glm4.attention.head_count": (4, T.UINT32),
                                                "glm4.rope.dimension_sections": ([8, 12, 12, 0], T.ARRAY)}, arch="glm4")
    _one_line_error(surgery("convert", c.lora, "--base", glm, "-o", out, ok=False), "mrope_section")
    # merge options a GGUF model cannot take; a module the base lacks
    _one_line_error(surgery("merge", c.base, good, "-o", out, "--dtype", "float16", ok=False), "--dtype")
    _one_line_error(surgery("merge", c.base, good, "-o", tmp_path / "m.safetensors", ok=False), ".gguf output")
    far = _gguf_adapter(tmp_path / "far.gguf", tensors={
        "blk.9.attn_v.weight.lora_a": rng.standard_normal((8, 64), dtype=np.float32),
        "blk.9.attn_v.weight.lora_b": rng.standard_normal((32, 8), dtype=np.float32)})
    _one_line_error(surgery("merge", c.base, far, "-o", out, ok=False), "blk.9.attn_v", "--allow-missing")
    # outputs a GGUF adapter cannot become without --format / --base
    _one_line_error(surgery("squeeze", good, "--rank", "2", "-o", tmp_path / "s.safetensors", ok=False), "--format")
    _one_line_error(surgery("squeeze", good, "--rank", "2", "-o", tmp_path / "d", ok=False), ".gguf path")
    # usage errors
    r = surgery("convert", c.lora, "--base", c.hf, "-o", tmp_path / "x.safetensors", ok=False)
    assert r.returncode == 2 and "--to" in r.stderr
    r = surgery("convert", c.lora, "--to", "peft", "--dtype", "q8_0", "-o", tmp_path / "p", ok=False)
    assert r.returncode == 2 and "--dtype goes with --to gguf" in r.stderr
    assert not out.exists() and not (tmp_path / "p").exists() and not (tmp_path / "d").exists()
    assert not any(p.name.startswith((".out.gguf", ".p.", ".d.", ".s.safetensors", ".x.safetensors"))
                   for p in tmp_path.iterdir())
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "s.safetensors").exists()


# ---------------------------------------------------------------- MoE experts: llama.cpp's ffn_*_exps tensors


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]  # experts and router


FUSED_ON_DISK = {"Qwen3VLMoeForConditionalGeneration"}


class MoeCase:
    """A tiny MoE model (transformers 5: experts fused in memory, stored per expert), its GGUF by llama.cpp, and a
    PEFT adapter on attention, the experts and the router (`target_parameters`; Qwen2-MoE's shared expert too),
    which llama.cpp's own converter does not take: its reference file is converted from the same adapter written
    as per-expert modules (`experts.N.gate_proj`, transformers 4's names)."""

    def __init__(self, root: Path, arch: str):
        self.hf = L.model(arch, root / "hf")
        self.base = L.convert_model(self.hf, root / "base-f32.gguf")
        shared = ["shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate"] \
            if arch.startswith(("Qwen2Moe", "Qwen3_5Moe")) else []  # (PEFT turns GLM-4.5's / ERNIE's
        # *_proj targets into experts')
        shared += LINEAR if arch.startswith("Qwen3_5") else []
        self.lora = peft_lora(self.hf, root / "lora", ATTN + shared, target_parameters=EXPERT_PARAMS, r=4,
                              lora_alpha=8)
        self.ref = L.hf_logits(self.hf, self.lora)
        self.hf_base = L.hf_logits(self.hf)
        self.per_expert = None  # Qwen3-VL-MoE stores its experts fused: no per-expert form, no llama.cpp reference
        if arch not in FUSED_ON_DISK:
            self.per_expert = root / "per-expert"
            surgery("convert", self.lora, "--to", "peft", "--base", self.hf, "--expert-modules", "-o", self.per_expert)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _made_once(MoeCase, tmp_path_factory)


DENSE_FIRST = ["Glm4MoeForCausalLM", "Ernie4_5_MoeForCausalLM"]  # block 0 dense, a shared expert
MOE_ARCHS = ["Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM",
             "Glm4MoeForCausalLM", "Ernie4_5_MoeForCausalLM", "Qwen3_5MoeForCausalLM",
             "Qwen3_5MoeForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_adapter_runs_in_llama_cpp_as_peft_runs_it(moe, arch, tmp_path):
    """A PEFT MoE adapter (experts fused gate_up_proj / down_proj and the router by target_parameters) →
    `surgery convert --base` → llama.cpp gives PeftModel's logits, and the file is the one llama.cpp's converter
    writes from the per-expert form, tensor for tensor (gate and up split, experts stacked (E, r, in) and
    (E, out, r)); per-expert modules convert to the same file; a GGUF model as --base names the same."""
    c = moe(arch)
    ours = tmp_path / "ours.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", ours)
    effect = close(c.ref, c.hf_base)
    assert effect > 1.0
    assert close(L.logits(c.base, ours), c.ref) < 1e-5 * effect
    o = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert {"blk.1.ffn_up_exps.weight.lora_b", "blk.1.ffn_gate_inp.weight.lora_a"} <= o.keys()
    assert list(o["blk.1.ffn_gate_exps.weight.lora_a"].shape) == [64, 4, 4]  # ne: in, r, E
    shown = surgery("inspect", ours).stdout
    assert "expert parameters (MoE, llama.cpp ffn_*_exps tensors)" in shown
    assert re.search(r"blk\.1\.ffn_down_exps +experts +4×64×\d+ +4 ", shown), shown
    if c.per_expert is None:
        return
    theirs = L.convert_lora(c.per_expert, c.hf, tmp_path / "theirs.gguf")
    assert close(L.logits(c.base, theirs), c.ref) < 1e-5 * effect
    t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert o.keys() == t.keys()
    for n in o:
        assert np.allclose(np.array(o[n].data), np.array(t[n].data), rtol=0, atol=1e-6), n
    for other in (c.per_expert, None):
        again = tmp_path / f"again{other is None}.gguf"
        surgery("convert", other or c.lora, "--base", c.hf if other else c.base, "-o", again)
        assert {n: np.array(x.data).tobytes() for n, x in ((x.name, x) for x in gguf.GGUFReader(again).tensors)} \
            == {n: np.array(x.data).tobytes() for n, x in o.items()}


@pytest.mark.parametrize("arch", DENSE_FIRST)
def test_dense_block_and_shared_expert(moe, tmp_path, arch):
    """GLM-4.5's and ERNIE 4.5's leading dense block (`mlp.{gate,up,down}_proj` → ffn_gate/up/down) and shared
    experts (`mlp.shared_experts.*` → ffn_*_shexp), which PEFT 0.21 cannot target on transformers 5 (it turns every
    *_proj target into the routed experts' parameters): an adapter on them written by hand is the file llama.cpp's
    converter writes, tensor for tensor, and llama.cpp runs it with the logits of the HF model it is merged into."""
    from surgery.adapter import Adapter, LoraModule

    c = moe(arch)
    shared = {"Glm4MoeForCausalLM": 32, "Ernie4_5_MoeForCausalLM": 48}[arch]  # (L.MOE's expert sizes × 1 shared)
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.mlp.gate_proj": (96, 64), "model.layers.0.mlp.up_proj": (96, 64),
              "model.layers.0.mlp.down_proj": (64, 96), "model.layers.1.mlp.shared_experts.gate_proj": (shared, 64),
              "model.layers.1.mlp.shared_experts.up_proj": (shared, 64),
              "model.layers.1.mlp.shared_experts.down_proj": (64, shared)}
    modules = {f"base_model.model.{n}": LoraModule(A=torch.randn(4, i, generator=g) * 0.3,
                                                     B=torch.randn(o, 4, generator=g) * 0.3, scale=2.0)
               for n, (o, i) in shapes.items()}
    save_adapter(Adapter(modules=modules, format="peft", config={
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted(shapes)}), tmp_path / "lora")
    ours, theirs = tmp_path / "ours.gguf", L.convert_lora(tmp_path / "lora", c.hf, tmp_path / "theirs.gguf")
    surgery("convert", tmp_path / "lora", "--base", c.hf, "-o", ours)
    o = {t.name: np.array(t.data) for t in gguf.GGUFReader(ours).tensors}
    t = {t.name: np.array(t.data) for t in gguf.GGUFReader(theirs).tensors}
    assert o.keys() == t.keys() and {"blk.0.ffn_gate.weight.lora_a", "blk.1.ffn_down_shexp.weight.lora_b"} <= o.keys()
    assert all(np.array_equal(o[n], t[n]) for n in o)
    surgery("merge", c.hf, tmp_path / "lora", "-o", tmp_path / "merged")
    want = L.hf_logits(tmp_path / "merged")
    effect = close(want, c.hf_base)
    assert effect > 1.0 and close(L.logits(c.base, ours), want) < 1e-5 * effect
    # and back: the same modules under their HF names
    surgery("convert", ours, "--to", "peft", "--base", c.hf, "-o", tmp_path / "back")
    back = load_adapter(tmp_path / "back")
    assert back.modules.keys() == modules.keys()
    for n, m in modules.items():
        torch.testing.assert_close(back.modules[n].delta(), m.delta(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", *DENSE_FIRST,
                                  "Qwen3_5MoeForCausalLM"])
def test_moe_gguf_back_to_peft_merged_and_squeezed(moe, arch, tmp_path):
    """llama.cpp's MoE adapter file → PEFT (gate and up expert tensors fused back into gate_up_proj, the router
    wrapped by target_parameters): PeftModel gives the original's logits; merged into the GGUF model and into the
    HF model, it gives them too; gate and up LoRAs without a common A fuse side by side, as llama.cpp runs them;
    squeezed, llama.cpp runs each expert's optimal truncation."""
    c = moe(arch)
    theirs = L.convert_lora(c.per_expert, c.hf, tmp_path / "theirs.gguf")
    back = tmp_path / "back"
    surgery("convert", theirs, "--to", "peft", "--base", c.hf, "-o", back)
    config = json.loads((back / "adapter_config.json").read_text())
    moe_blocks = [1] if arch in DENSE_FIRST else [0, 1]
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{i}.{p}" for i in moe_blocks
                                                         for p in EXPERT_PARAMS)
    effect = close(c.ref, c.hf_base)
    assert close(L.hf_logits(c.hf, back), c.ref) < 1e-6 * effect
    merged = tmp_path / "merged.gguf"
    surgery("merge", c.base, theirs, "-o", merged)
    assert close(L.logits(merged), c.ref) < 1e-5 * effect
    surgery("merge", c.hf, theirs, "-o", tmp_path / "merged-hf")
    assert close(L.hf_logits(tmp_path / "merged-hf"), c.ref) < 1e-5 * effect
    # gate and up tensors that do not share an A (one missing, one of another rank): fused side by side, exactly
    from surgery.io import gguf_file

    missing = "blk.1.ffn_up_" if arch in DENSE_FIRST else "blk.0.ffn_gate_"
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(theirs).tensors if not x.name.startswith(missing)}
    for part in ("a", "b"):
        name = f"blk.1.ffn_gate_exps.weight.lora_{part}"
        t[name] = t[name][:, :3].copy() if part == "a" else t[name][..., :3].copy()
    odd = tmp_path / "odd.gguf"
    alpha = gguf.GGUFReader(theirs).get_field("adapter.lora.alpha").contents()
    gguf_file.write_file(odd, gguf.GGUFReader(theirs).get_field("general.architecture").contents(), [
        ("general.type", "adapter", gguf.GGUFValueType.STRING, None),
        ("adapter.type", "lora", gguf.GGUFValueType.STRING, None),
        ("adapter.lora.alpha", alpha, gguf.GGUFValueType.FLOAT32, None)],
        [gguf_file.Planned(n, a.shape, gguf.GGMLQuantizationType.F32, lambda a=a: a) for n, a in t.items()])
    surgery("convert", odd, "--to", "peft", "--base", c.hf, "-o", tmp_path / "odd")
    runtime = L.logits(c.base, odd)
    assert close(runtime, c.ref) > 0.005 * effect  # the file differs from the adapter (≫ the 1e-5 below)
    assert close(L.hf_logits(c.hf, tmp_path / "odd"), runtime) < 1e-5 * effect
    # squeeze: each expert of each tensor truncated to rank 2, checked against the float64 SVD of the file's ΔW_e
    small = tmp_path / "small.gguf"
    surgery("squeeze", theirs, "--rank", "2", "-o", small)
    big, sq = ({t.name: np.array(t.data, np.float64) for t in gguf.GGUFReader(f).tensors} for f in (theirs, small))
    alpha = [gguf.GGUFReader(f).get_field("adapter.lora.alpha").contents() for f in (theirs, small)]
    for name in [n[: -len(".lora_a")] for n in big if "_exps" in n and n.endswith(".lora_a")]:
        a, b = big[name + ".lora_a"], big[name + ".lora_b"]  # (E, r, in), (E, out, r)
        d = torch.from_numpy(alpha[0] / a.shape[1] * b @ a)
        U, S, Vh = torch.linalg.svd(d)
        want = U[..., :2] * S[..., None, :2] @ Vh[..., :2, :]
        got = torch.from_numpy(alpha[1] / 2 * sq[name + ".lora_b"] @ sq[name + ".lora_a"])
        assert sq[name + ".lora_a"].shape[1] == 2
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_qwen3_next_in_proj_qkvz_split_as_llama_cpp_splits_it(tmp_path):
    """Qwen3-Next fuses q, k, v and z per K head in in_proj_qkvz; llama.cpp's converter splits it into attn_qkv
    (every head's q, then k, then v) and attn_gate (z), where GGUF models converted before that split keep it whole
    (ssm_in). llama.cpp's own LoRA converter converts no Qwen3-Next adapter (it asserts MTP layers), so PeftModel is
    the reference: a LoRA on every projection (gated delta net, attention, experts, router, shared expert) runs in
    llama.cpp with its logits on either form of the base, named after it; back to PEFT every ΔW is the original's;
    merged into either GGUF model it equals the adapter applied at run time, into the HF model PeftModel's logits;
    squeezed (attn_qkv and attn_gate no longer sharing an A), back to PEFT it is the file llama.cpp runs."""
    hf = L.model("Qwen3NextForCausalLM", tmp_path / "hf")
    split, whole = (L.convert_model(hf, tmp_path / f"{n}.gguf", qkvz_whole=n == "whole") for n in ("split", "whole"))
    lora = peft_lora(hf, tmp_path / "lora", ATTN + ["in_proj_qkvz", "in_proj_ba", "out_proj", "shared_expert.up_proj",
                                                   "shared_expert_gate"], target_parameters=EXPERT_PARAMS, r=4,
                     lora_alpha=8)
    ref = L.hf_logits(hf, lora)
    effect = close(ref, L.hf_logits(hf))
    assert effect > 1.0
    for base, model, names in [(hf, split, ["attn_qkv", "attn_gate"]), (split, split, ["attn_qkv", "attn_gate"]),
                               (whole, whole, ["ssm_in"])]:
        ours = tmp_path / f"{base.stem}-{model.stem}.gguf"
        surgery("convert", lora, "--base", base, "-o", ours)
        written = {t.name for t in gguf.GGUFReader(ours).tensors if t.name.startswith("blk.0.")}
        assert {f"blk.0.{n}.weight.lora_{x}" for n in names for x in "ab"} <= written
        assert not {f"blk.0.{n}.weight.lora_a" for n in ("attn_qkv", "attn_gate", "ssm_in") if n not in names} & written
        runtime = L.logits(model, ours)
        assert close(runtime, ref) < 1e-5 * effect
        surgery("convert", ours, "--to", "peft", "--base", base, "-o", tmp_path / f"back-{base.stem}")
        _same_updates(lora, tmp_path / f"back-{base.stem}", ranks=True)
        if base is not hf:
            merged = tmp_path / f"merged-{base.stem}.gguf"
            surgery("merge", base, ours, "-o", merged)
            assert close(L.logits(merged), runtime) < 1e-5 * effect
    surgery("merge", hf, tmp_path / "split-split.gguf", "-o", tmp_path / "merged-hf")  # (the GGUF file into HF's)
    assert close(L.hf_logits(tmp_path / "merged-hf"), ref) < 1e-5 * effect
    small = tmp_path / "small.gguf"
    surgery("squeeze", tmp_path / "split-split.gguf", "--rank", "2", "-o", small)
    surgery("convert", small, "--to", "peft", "--base", split, "-o", tmp_path / "small")
    assert load_adapter(tmp_path / "small").modules["base_model.model.model.layers.0.linear_attn.in_proj_qkvz"].rank \
        == 4  # (attn_qkv's two directions beside attn_gate's)
    assert close(L.hf_logits(hf, tmp_path / "small"), L.logits(split, small)) < 1e-5 * effect
    config = json.loads((hf / "config.json").read_text())  # a config-only base whose head counts do not fit
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**config, "linear_num_key_heads": 1}))
    _one_line_error(surgery("convert", lora, "--base", tmp_path / "cfg", "-o", tmp_path / "x.gguf", ok=False),
                    "96 rows are not 1 K heads' q, k (of 8), v and z (of 32)")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_model_with_fused_gate_up_experts(moe, tmp_path):
    """A GGUF model converted with llama.cpp's --fuse-gate-up-exps keeps each block's expert gate and up rows in one
    tensor (ffn_gate_up_exps), and llama.cpp looks its adapter up by that name: given such a model as base, the
    experts' gate_up_proj LoRA is written whole, and llama.cpp runs it with PeftModel's logits; back to PEFT, every
    ΔW is the original's; merged into that model, the run-time adapter's logits. Per-expert modules, which would
    need joining, are one line."""
    c = moe("Qwen3_5MoeForCausalLM")
    fused = L.convert_model(c.hf, tmp_path / "fused.gguf", "f32", "--fuse-gate-up-exps")
    names = {t.name for t in gguf.GGUFReader(fused).tensors}
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    ours = tmp_path / "ours.gguf"
    surgery("convert", c.lora, "--base", fused, "-o", ours)
    written = {t.name for t in gguf.GGUFReader(ours).tensors}
    assert {"blk.0.ffn_gate_up_exps.weight.lora_a", "blk.1.ffn_down_exps.weight.lora_b"} <= written
    assert not any("ffn_gate_exps" in n or "ffn_up_exps" in n for n in written)
    effect = close(c.ref, c.hf_base)
    runtime = L.logits(fused, ours)
    assert close(runtime, c.ref) < 1e-5 * effect
    surgery("convert", ours, "--to", "peft", "--base", fused, "-o", tmp_path / "back")
    _same_updates(c.lora, tmp_path / "back")
    surgery("merge", fused, ours, "-o", tmp_path / "merged.gguf")
    assert close(L.logits(tmp_path / "merged.gguf"), runtime) < 1e-5 * effect
    _one_line_error(surgery("convert", c.per_expert, "--base", fused, "-o", tmp_path / "x.gguf", ok=False),
                    "ffn_gate_up_exps", "surgery convert --to peft")
    assert not (tmp_path / "x.gguf").exists()


def test_experts_stored_transposed(moe, tmp_path):
    """Qwen3-VL-MoE checkpoints store the fused experts (E, in, out), which transformers transposes on loading:
    merged into the HF checkpoint the experts keep that layout and transformers loads PeftModel's logits from it;
    extracted back from it, each expert's ΔW is the adapter's; the GGUF file (llama.cpp's logits = PeftModel's)
    comes back to PEFT with PeftModel's logits and merges into the GGUF model so."""
    from safetensors import safe_open

    c = moe("Qwen3VLMoeForConditionalGeneration")
    effect = close(c.ref, c.hf_base)
    merged = tmp_path / "merged"
    surgery("merge", c.hf, c.lora, "-o", merged)
    assert close(L.hf_logits(merged), c.ref) < 1e-5 * effect
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    with safe_open(c.hf / "model.safetensors", "pt") as a, safe_open(merged / "model.safetensors", "pt") as b:
        assert a.get_slice(key).get_shape() == b.get_slice(key).get_shape() == [4, 64, 48]
    surgery("extract", merged, c.hf, "--rank", "4", "--targets", r"experts", "-o", tmp_path / "x")
    want, got = load_adapter(c.lora).modules, load_adapter(tmp_path / "x").modules
    experts = [n for n in want if n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n]
    assert len(experts) == 4 and set(experts) <= got.keys()
    for n in experts:
        torch.testing.assert_close(got[n].delta(), want[n].delta(), rtol=0, atol=1e-5)
    g = tmp_path / "a.gguf"
    surgery("convert", c.lora, "--base", c.hf, "-o", g)
    surgery("convert", g, "--to", "peft", "--base", c.hf, "-o", tmp_path / "back")
    assert close(L.hf_logits(c.hf, tmp_path / "back"), c.ref) < 1e-5 * effect
    surgery("merge", c.base, g, "-o", tmp_path / "merged.gguf")
    assert close(L.logits(tmp_path / "merged.gguf"), c.ref) < 1e-5 * effect
    bad = tmp_path / "bad"  # an expert tensor of neither orientation: one line, nothing written
    shutil.copytree(c.hf, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[key] = tensors[key][:, :, :40].contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(surgery("merge", bad, c.lora, "-o", tmp_path / "m2", ok=False),
                    f"tensor {key} has shape [4, 64, 40], the model's")
    assert not (tmp_path / "m2").exists()
    shutil.rmtree(bad)  # (not a model for the after-test load check)


def _peft_merged_in_llama_cpp(hf: Path, lora: Path, out: Path) -> np.ndarray:
    """llama.cpp's logits of PEFT's merge_and_unload of `lora` into `hf`, converted by llama.cpp's converter: the
    reference where tiny models run apart in llama.cpp and transformers (the same llama.cpp graph on both sides)."""
    from peft import PeftModel

    PeftModel.from_pretrained(L.load_model(hf), lora).merge_and_unload().save_pretrained(out)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(hf / f, out)
    return L.logits(L.convert_model(out, out.with_suffix(".gguf")))


def test_gpt_oss_adapter_runs_in_llama_cpp_as_peft_merges_it(tmp_path):
    """gpt-oss (experts fused on disk, gate and up rows alternating, the router `mlp.router`): a PEFT adapter on
    attention, experts and router → GGUF → llama.cpp at run time gives the logits llama.cpp gives for PEFT's
    merge_and_unload of it (converted by llama.cpp's own converter; the same llama.cpp graph on both sides, since
    tiny gpt-oss models differ between llama.cpp and transformers by their rope); merged into the GGUF model it
    does too; and back to PEFT it is the same adapter."""
    hf = L.model("GptOssForCausalLM", tmp_path / "hf")
    base = L.convert_model(hf, tmp_path / "base.gguf")
    lora = peft_lora(hf, tmp_path / "lora", ATTN, target_parameters=["mlp.experts.gate_up_proj",
                                                                      "mlp.experts.down_proj", "mlp.router.weight"],
                     r=4, lora_alpha=8)
    ref = _peft_merged_in_llama_cpp(hf, lora, tmp_path / "merged")
    effect = close(ref, L.logits(base))
    assert effect > 1.0
    ours = tmp_path / "ours.gguf"
    surgery("convert", lora, "--base", hf, "-o", ours)
    assert close(L.logits(base, ours), ref) < 1e-5 * effect
    surgery("merge", base, lora, "-o", tmp_path / "ours-merged.gguf")
    assert close(L.logits(tmp_path / "ours-merged.gguf"), ref) < 1e-5 * effect
    surgery("convert", ours, "--to", "peft", "--base", hf, "-o", tmp_path / "back")
    want = L.hf_logits(hf, lora)
    assert close(L.hf_logits(hf, tmp_path / "back"), want) < 1e-6 * close(want, L.hf_logits(hf))


GEMMA4_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24)


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeLiteForCausalLM"])
def test_deepseek_adapter_where_llama_cpp_applies_it(tmp_path, arch):
    """DeepSeek-V2/V3 (Kimi K2) and GLM-4.7-Flash (llama.cpp's deepseek2): llama.cpp multiplies the latent-attention
    projections and the output head without adapters; it adapts the attention output, the MLPs, the router and the
    experts. A PEFT adapter on those →
    GGUF: llama.cpp's converter's file from the per-expert form, tensor for tensor, and at run time the logits
    llama.cpp gives for PEFT's merge_and_unload (tiny V3 / GLM models run apart in llama.cpp and transformers);
    a hand-made one on the dense block and the shared expert: its converter's file too, and the merged GGUF
    model's logits. A module on q_a/q_b/kv_a/kv_b or the head is one line, nothing written; with --allow-missing it
    is left out with a note, in convert and merge alike. Back to PEFT, every ΔW is the original's."""
    from surgery.adapter import Adapter, LoraModule

    hf = L.model(arch, tmp_path / "hf")
    base = L.convert_model(hf, tmp_path / "base.gguf")
    lora = peft_lora(hf, tmp_path / "lora", ["o_proj"], target_parameters=EXPERT_PARAMS, r=4, lora_alpha=8)
    ours = tmp_path / "ours.gguf"
    surgery("convert", lora, "--base", hf, "-o", ours)
    surgery("convert", lora, "--to", "peft", "--base", hf, "--expert-modules", "-o", tmp_path / "per-expert")
    theirs = L.convert_lora(tmp_path / "per-expert", hf, tmp_path / "theirs.gguf")
    o, t = ({x.name: np.array(x.data) for x in gguf.GGUFReader(f).tensors} for f in (ours, theirs))
    assert o.keys() == t.keys() and {"blk.0.attn_output.weight.lora_a", "blk.1.ffn_gate_exps.weight.lora_b",
                                     "blk.1.ffn_gate_inp.weight.lora_a"} <= o.keys()
    assert all(np.allclose(o[n], t[n], rtol=0, atol=1e-6) for n in o)
    ref = _peft_merged_in_llama_cpp(hf, lora, tmp_path / "merged")
    effect = close(ref, L.logits(base))
    assert effect > 1.0 and close(L.logits(base, ours), ref) < 1e-5 * effect
    # the dense block and the shared expert (PEFT on transformers 5 turns *_proj targets into the experts'), and
    # modules on weights llama.cpp adapts none of
    g = torch.Generator().manual_seed(3)
    shapes = {"model.layers.0.mlp.gate_proj": (96, 64), "model.layers.0.mlp.down_proj": (64, 96),
              "model.layers.1.mlp.shared_experts.up_proj": (32, 64), "model.layers.1.self_attn.o_proj": (64, 64)}
    unadapted = {"model.layers.0.self_attn.q_a_proj": (24, 64), "model.layers.1.self_attn.kv_b_proj": (128, 16),
                 "lm_head": (L.tokenizer(hf), 64)}
    modules = {f"base_model.model.{n}": LoraModule(A=torch.randn(4, i, generator=g) * 0.3,
                                                     B=torch.randn(o, 4, generator=g) * 0.3, scale=2.0)
               for n, (o, i) in (shapes | unadapted).items()}
    for name, chosen in (("hand", shapes), ("all", shapes | unadapted)):
        save_adapter(Adapter(modules={k: m for k, m in modules.items() if k.split(".", 2)[2] in chosen},
                             format="peft", config={"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                    "target_modules": sorted(chosen)}), tmp_path / name)
    for n in unadapted:
        save_adapter(Adapter(modules={f"base_model.model.{n}": modules[f"base_model.model.{n}"]}, format="peft",
                             config={"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [n]}),
                     tmp_path / "one")
        what = {"lm_head": "output", "kv_b_proj": "attn_kv_b", "q_a_proj": "attn_q_a"}[n.rsplit(".", 1)[-1]]
        _one_line_error(surgery("convert", tmp_path / "one", "--base", base, "-o", tmp_path / "x.gguf", ok=False),
                        "llama.cpp applies no LoRA to deepseek2's ", what, "--allow-missing")
        shutil.rmtree(tmp_path / "one")
    _one_line_error(surgery("merge", base, tmp_path / "all", "-o", tmp_path / "x.gguf", ok=False),
                    "llama.cpp applies no LoRA to deepseek2")
    assert not (tmp_path / "x.gguf").exists()
    hand = tmp_path / "hand.gguf"
    r = surgery("convert", tmp_path / "all", "--base", hf, "--allow-missing", "-o", hand)
    assert "3 module(s) on weights llama.cpp adapts none of left out" in r.output + r.stderr
    o = {x.name: np.array(x.data) for x in gguf.GGUFReader(hand).tensors}
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(
        L.convert_lora(tmp_path / "hand", hf, tmp_path / "hand-theirs.gguf")).tensors}
    assert o.keys() == t.keys() == {f"blk.{n}.weight.lora_{x}" for n in ("0.ffn_gate", "0.ffn_down", "1.ffn_up_shexp",
                                                                         "1.attn_output") for x in "ab"}
    assert all(np.array_equal(o[n], t[n]) for n in o)
    surgery("merge", base, tmp_path / "all", "--allow-missing", "-o", tmp_path / "hand-merged.gguf")
    runtime = L.logits(base, hand)
    assert close(L.logits(tmp_path / "hand-merged.gguf"), runtime) < 1e-5 * close(runtime, L.logits(base))
    for adapter, file in ((lora, ours), (tmp_path / "hand", hand)):
        surgery("convert", file, "--to", "peft", "--base", base, "-o", tmp_path / f"back-{file.stem}")
        _same_updates(adapter, tmp_path / f"back-{file.stem}")


@pytest.mark.parametrize("arch, moe", [("Gemma4ForCausalLM", {}), ("Gemma4ForConditionalGeneration", {}),
                                       ("Gemma4ForCausalLM", GEMMA4_MOE)])
def test_gemma4_adapter_runs_in_llama_cpp_as_peft_merges_it(tmp_path, arch, moe):
    """Gemma 4 (a sliding and a full-attention block of another head size, per-layer inputs; 26B-A4B's experts
    beside the MLP): a PEFT adapter on attention, MLP, the per-layer-input gate and projection (and the router and
    the experts, which llama.cpp keeps fused: ffn_gate_up_exps) → GGUF is llama.cpp's converter's file tensor for
    tensor (where it reads the adapter: not target_parameters), and llama.cpp runs it with the logits it gives for
    PEFT's merge_and_unload (converted by its own converter; the same llama.cpp graph on both sides, since tiny
    Gemma 4 models run apart in llama.cpp and transformers); merged into the GGUF model it does too, and back to
    PEFT it is the same adapter. A LoRA on per_layer_model_projection, which llama.cpp multiplies without
    adapters, is refused (one line, nothing written) rather than written to be ignored."""
    hf = L.model(arch, tmp_path / "hf", **moe)
    base = L.convert_model(hf, tmp_path / "base.gguf")
    targets = ALL7 + ["per_layer_input_gate", "per_layer_projection"] + ["router.proj"] * bool(moe)
    # (the text model's: PEFT cannot wrap the vision tower's clippable linears)
    lora = peft_lora(hf, tmp_path / "lora", rf".*language_model.*\.({'|'.join(targets)})" if "Conditional" in arch
                     else targets, **({"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]} if moe
                                      else {}))
    ref = _peft_merged_in_llama_cpp(hf, lora, tmp_path / "merged")
    effect = close(ref, L.logits(base))
    assert effect > 1.0
    ours = tmp_path / "ours.gguf"
    surgery("convert", lora, "--base", hf, "-o", ours)
    o = {t.name: np.array(t.data) for t in gguf.GGUFReader(ours).tensors}
    assert "blk.1.inp_gate.weight.lora_a" in o and "blk.0.proj.weight.lora_b" in o
    if moe:
        assert o["blk.1.ffn_gate_up_exps.weight.lora_b"].shape == (4, 48, 8)  # (E, 2I, r): gate and up fused
        assert "blk.0.ffn_gate_inp.weight.lora_a" in o and "blk.0.ffn_down_exps.weight.lora_a" in o
    else:
        theirs = L.convert_lora(lora, hf, tmp_path / "theirs.gguf")
        t = {t.name: np.array(t.data) for t in gguf.GGUFReader(theirs).tensors}
        assert o.keys() == t.keys() and all(np.array_equal(o[n], t[n]) for n in o)
    # (float32 sums; with experts, llama.cpp's run-time LoRA and merged weights round apart and routing near a tie
    # between the 2nd and 3rd expert magnifies that: measured up to 1e-4 of the effect, while the merge is exact)
    assert close(L.logits(base, ours), ref) < (3e-4 if moe else 3e-5) * effect
    surgery("merge", base, lora, "-o", tmp_path / "ours-merged.gguf")
    assert close(L.logits(tmp_path / "ours-merged.gguf"), ref) < 3e-5 * effect
    surgery("convert", ours, "--to", "peft", "--base", hf, "-o", tmp_path / "back")
    a, b = load_adapter(lora), load_adapter(tmp_path / "back")
    assert a.modules.keys() == b.modules.keys() and len(a.modules) == 2 * (9 + 3 * bool(moe))
    for n, m in a.modules.items():
        torch.testing.assert_close(b.modules[n].delta(), m.delta(), rtol=0, atol=1e-6)
    if moe:  # PEFT loads it back as it was; merged into the HF model (experts stored fused) it is PeftModel's
        want = L.hf_logits(hf, lora)
        assert close(L.hf_logits(hf, tmp_path / "back"), want) < 1e-6 * close(want, L.hf_logits(hf))
        surgery("merge", hf, lora, "-o", tmp_path / "merged-hf")
        assert close(L.hf_logits(tmp_path / "merged-hf"), want) < 1e-5 * close(want, L.hf_logits(hf))
    whole = peft_lora(hf, tmp_path / "whole", r".*(per_layer_model_projection|language_model.*q_proj)")
    _one_line_error(surgery("convert", whole, "--base", hf, "-o", tmp_path / "x.gguf", ok=False),
                    "llama.cpp applies no LoRA to gemma4's per_layer_model_proj")
    assert not (tmp_path / "x.gguf").exists()


def test_moe_q8_0_missing_experts_and_bad_inputs(moe, tmp_path):
    """--dtype q8_0 writes llama.cpp's converter's bytes for expert tensors too; per-expert modules for some of the
    experts only are stacked with zero updates for the others (noted); an adapter for a model with other expert
    counts, and expert factors that do not pair, are one line and write nothing."""
    c = moe("Qwen3MoeForCausalLM")
    some = tmp_path / "some"
    shutil.copytree(c.per_expert, some)
    sd = load_file(str(some / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if ".experts.3." not in k}, str(some / "adapter_model.safetensors"))
    full, part = tmp_path / "full.gguf", tmp_path / "part.gguf"
    surgery("convert", c.per_expert, "--base", c.hf, "-o", full)
    r = surgery("convert", some, "--base", c.hf, "-o", part)
    assert "1 of 4 experts have no LoRA: zero updates there" in r.stderr
    f = {t.name: np.array(t.data) for t in gguf.GGUFReader(full).tensors}
    p = {t.name: np.array(t.data) for t in gguf.GGUFReader(part).tensors}
    assert f.keys() == p.keys()
    for n in f:
        if "_exps" in n:
            assert not p[n][3].any() and np.array_equal(p[n][:3], f[n][:3]), n
        else:
            assert np.array_equal(p[n], f[n]), n
    ours = tmp_path / "q8.gguf"
    surgery("convert", c.lora, "--base", c.hf, "--dtype", "q8_0", "-o", ours)
    theirs = L.convert_lora(c.per_expert, c.hf, tmp_path / "theirs.gguf", "q8_0")
    o = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert o.keys() == t.keys()
    assert all(o[n].tensor_type == t[n].tensor_type and np.array_equal(np.array(o[n].data), np.array(t[n].data))
               for n in o)
    out = tmp_path / "out.gguf"
    six = tmp_path / "six"
    six.mkdir()
    cfg = json.loads((c.hf / "config.json").read_text())
    (six / "config.json").write_text(json.dumps(cfg | {"num_experts": 6}))
    _one_line_error(surgery("convert", c.lora, "--base", six, "-o", out, ok=False), "blk.0.ffn_", "(6, ")
    _one_line_error(surgery("convert", ours, "--to", "peft", "--base", six, "-o", tmp_path / "p", ok=False),
                    "another model")
    rng = np.random.default_rng(0)
    for a, b in (((4, 2, 64), (4, 32, 3)), ((4, 2, 64), (32, 2))):
        bad = _gguf_adapter(tmp_path / "bad.gguf", arch="qwen3moe", tensors={
            "blk.0.ffn_up_exps.weight.lora_a": rng.standard_normal(a, dtype=np.float32),
            "blk.0.ffn_up_exps.weight.lora_b": rng.standard_normal(b, dtype=np.float32)})
        _one_line_error(surgery("squeeze", bad, "--rank", "1", "-o", out, ok=False), "(experts, r, in)")
    assert not out.exists() and not (tmp_path / "p").exists()


def test_every_architecture_s_tie_default_is_transformers():
    """A base given as its config.json alone has an output matrix unless tie_word_embeddings says otherwise, and a
    config that leaves the key out means the config class's default: each architecture's `tied` must be it."""
    import transformers

    from surgery.io.gguf_file import ARCHS

    for arch, a in ARCHS.items():
        cls = getattr(transformers, {"Gemma3ForCausalLM": "Gemma3TextConfig"}.get(
            arch, arch.replace("ForCausalLM", "Config").replace("ForConditionalGeneration", "Config")))
        assert cls().tie_word_embeddings == a.tied, arch
