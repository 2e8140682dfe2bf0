"""Quantized bases (FP8 block-scaled, MXFP4) against independent references: transformers' own FP8 quantizer and
dequantizer and its MXFP4 unpacking, float64 per-block loops, PeftModel's adapters on the dequantized base, and
the merged checkpoints as transformers loads them."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgery.io import quant

from .conftest import tree_digest
from .test_gguf import surgery

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
BLOCK = (8, 8)


def _tf_quantizer(block, fmt=None) -> Fp8Quantize:
    return Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=block, scale_fmt=fmt)))


def _dequant64(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """W = q · s per block, block by block in float64 (partial edge blocks; exact: 4 × 24 significant bits)."""
    W = q.double().clone()
    b0, b1 = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            W[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= float(s[i, j].float())
    return W


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_fp8_codec_is_transformers(fmt):
    """Quantize: the same bytes and scales as transformers' Fp8Quantize; dequantize: bit for bit its Fp8Dequantize."""
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.02
    ref = _tf_quantizer((128, 128), fmt)._quantize_one("x.weight", w)
    q, s = quant.fp8_quantize(w, (128, 128), fmt == "ue8m0", ref["x.weight_scale_inv"].dtype)
    assert torch.equal(q.view(torch.uint8), ref["x.weight"].view(torch.uint8))
    assert s.dtype == ref["x.weight_scale_inv"].dtype and torch.equal(s.float(), ref["x.weight_scale_inv"].float())
    assert torch.equal(quant.fp8_dequantize(q, s, (128, 128)), Fp8Dequantize(None)._dequantize_one(q, s, torch.float32))
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)  # NaN codes included
    finite = every.flatten()[every.flatten().view(torch.uint8) & 0x7F != 0x7F].reshape(2, 127)
    for codes in (every, every[:, :15], finite):
        scale = torch.rand(math.ceil(codes.shape[0] / 8), math.ceil(codes.shape[1] / 8)) + 0.5
        fast, ref = quant.fp8_dequantize(codes, scale, (8, 8)), quant.fp8_dequantize_exact(codes, scale, (8, 8))
        assert torch.equal(fast.isnan(), ref.isnan()) and torch.equal(fast.nan_to_num(), ref.nan_to_num())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), b0=st.sampled_from([4, 8, 16]), b1=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**16))
def test_fp8_ragged_blocks(rows, cols, b0, b1, seed):
    """Shapes the block does not divide (DeepSeek-V3's 576 rows): partial edge blocks dequantize per the formula,
    and quantizing gives each partial block its own amax (so every block's largest value lands on ±448)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(1, generator=g)
    q, s = quant.fp8_quantize(w, (b0, b1))
    assert s.shape == (math.ceil(rows / b0), math.ceil(cols / b1))
    assert torch.equal(quant.fp8_dequantize(q, s, (b0, b1)), _dequant64(q, s, (b0, b1)).float())  # one rounding
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            assert float(q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float().abs().max()) == 448.0


def test_mxfp4_codec():
    """Dequantize: transformers' gpt-oss unpacking bit for bit; quantize (OCP MX v1.0): shared exponent
    ⌊log2 amax⌋ − 2 per 32 values, each element the nearest E2M1 value of its block's grid (ties to even code,
    saturated at ±6), checked against a float64 brute force; dequantized values quantize back to the same bytes."""
    w = torch.randn(3, 16, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    w[0, 0, :32] = 0.0  # an all-zero block
    blocks, scales = quant.mxfp4_quantize(w)
    assert blocks.shape == (3, 16, 3, 16) and scales.shape == (3, 16, 3)
    deq = quant.mxfp4_dequantize(blocks, scales)
    assert torch.equal(deq.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    v = w.double().unflatten(-1, (-1, 32))
    amax = v.abs().amax(-1)
    X = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127.0))
    assert torch.equal(scales.long() - 127, X.long())
    x = (v / torch.exp2(X).unsqueeze(-1)).abs().clamp(max=6.0)
    dist = (x.unsqueeze(-1) - grid).abs()
    best = dist.min(-1).values
    got = deq.double().unflatten(-1, (-1, 32)).abs() / torch.exp2(X).unsqueeze(-1)
    assert torch.allclose((x - got).abs(), best, atol=0, rtol=0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0])
    assert quant._e2m1_codes(ties).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 14]
    assert all(torch.equal(a, b) for a, b in zip(quant.mxfp4_quantize(deq), (blocks, scales)))


# ---------------------------------------------------------------- tiny quantized models on disk


def _llama(path: Path) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _fp8(src: Path, out: Path, fmt=None, scale_name="weight_scale_inv", edit=None) -> Path:
    """`src`'s linear weights quantized by transformers' own FP8 quantizer (block 8×8)."""
    out.mkdir(parents=True)
    tq = _tf_quantizer(BLOCK, fmt)
    tensors = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith("proj.weight"):
            for n, t in tq._quantize_one(k, v).items():
                tensors[n.replace("weight_scale_inv", scale_name)] = t
        else:
            tensors[k] = v
    if edit:
        edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK), **({"scale_fmt": fmt} if fmt else {})}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return _fp8(_llama(root / "bf16"), root / "fp8")


def _lora(model_dir: Path, out: Path, targets=("q_proj", "v_proj", "down_proj"), scale=1.0, quantized=None, **config):
    """A PEFT LoRA made and saved by PEFT on the dequantized base (float32), B scaled to a LoRA-sized ΔW."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    kw = {"quantization_config": quantized} if quantized else {}  # an explicit None loads the raw FP8 codes
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                                            **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    model.save_pretrained(out)
    return out, model


def _deltas(model) -> dict[str, torch.Tensor]:
    """{base tensor name: PEFT's ΔW in float64}."""
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "parameter_name"):
            out[f"{name.replace('.base_layer', '')}.{mod.parameter_name}"] = mod.get_delta_weight("default").double()
        elif hasattr(mod, "get_delta_weight") and hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[f"{name}.weight"] = mod.get_delta_weight("default").double()
    return out


def _stored(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _logits(path: Path, **kw) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model(IDS).logits


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """bf16 values that are `ref` rounded once (half an ulp, 2⁻⁹ relative; 2⁻⁸ allows float32's last bit)."""
    return bool(((got.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-30).all())


# ---------------------------------------------------------------- FP8 merges


def test_fp8_merge_default_is_bf16(fp8, tmp_path):
    """Default: the whole model written in its dtype (bf16), quantization_config removed; changed weights are
    dequant(W) + PeftModel's ΔW rounded once, untouched ones dequant(W) rounded once; transformers loads it with
    no missing/unexpected keys and gives PeftModel's logits within bf16 rounding; the note names --requantize."""
    lora, model = _lora(fp8, tmp_path / "lora", scale=0.05)
    r = surgery("merge", fp8, lora, "-o", tmp_path / "out")
    assert "--requantize" in r.stderr and "dequantized" in r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    base, out, deltas = _stored(fp8), _stored(tmp_path / "out"), _deltas(model)
    assert not any("scale" in k for k in out) and all(t.dtype == torch.bfloat16 for t in out.values())
    for name, t in out.items():
        if f"{name}_scale_inv" in base:
            W = _dequant64(base[name], base[f"{name}_scale_inv"], BLOCK)
            assert _within_one_rounding(t, W + deltas.get(name, 0)), name
        else:
            assert torch.equal(t, base[name])
    assert len(deltas) == 6
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.allclose(_logits(tmp_path / "out"), ref, atol=2e-2)


@pytest.mark.parametrize("fmt,scale_dtype", [(None, torch.float32), ("ue8m0", torch.float8_e8m0fnu),
                                             ("ue8m0", torch.float32)])
def test_fp8_requantize(tmp_path, fmt, scale_dtype):
    """--requantize: the FP8 layout kept (config, block, scale dtype; UE8M0 scales powers of two, float32-stored as
    DeepSeek-V3.1 does), untouched tensors byte for byte, changed ones within FP8's rounding of the float64
    merged weights; transformers loads it; the reported adapter_survived equals the float64 figure."""
    def as_float32(t):  # DeepSeek-V3.1: scale_fmt ue8m0, scales stored float32
        for k in [k for k in t if k.endswith("scale_inv")]:
            t[k] = t[k].float()
    base_dir = _fp8(_llama(tmp_path / "bf16"), tmp_path / "fp8", fmt,
                    edit=as_float32 if fmt and scale_dtype == torch.float32 else None)
    lora, model = _lora(base_dir, tmp_path / "lora", scale=0.05)
    r = surgery("merge", base_dir, lora, "-o", tmp_path / "out", "--requantize", "--json")
    report = json.loads(r.stdout)["quantized"]
    assert (tmp_path / "out" / "config.json").read_text() == (base_dir / "config.json").read_text()
    base, out, deltas = _stored(base_dir), _stored(tmp_path / "out"), _deltas(model)
    assert set(out) == set(base)
    with safe_open(base_dir / "model.safetensors", "pt") as a, safe_open(tmp_path / "out" / "model.safetensors",
                                                                        "pt") as b:
        for k in a.keys():
            if k.removesuffix("_scale_inv") not in deltas:
                assert a.get_slice(k).get_dtype() == b.get_slice(k).get_dtype()
                assert torch.equal(a.get_tensor(k).view(torch.uint8) if a.get_tensor(k).dtype != torch.float32
                                   else a.get_tensor(k), b.get_tensor(k).view(torch.uint8)
                                   if b.get_tensor(k).dtype != torch.float32 else b.get_tensor(k)), k
    err2 = d2 = 0.0
    for name, d in deltas.items():
        s = out[f"{name}_scale_inv"]
        assert out[name].dtype == torch.float8_e4m3fn and s.dtype == scale_dtype
        if fmt:
            assert torch.equal(torch.exp2(torch.log2(s.float()).round()), s.float())
        target = _dequant64(base[name], base[f"{name}_scale_inv"], BLOCK) + d
        Q = _dequant64(out[name], s, BLOCK)
        step = _dequant64(torch.ones_like(out[name], dtype=torch.float32), s, BLOCK) * 32  # e4m3: ≤ 448/16 · …
        assert bool(((Q - target).abs() <= step).all())
        err2 += float((Q - target).square().sum())
        d2 += float(d.square().sum())
        module = next(m for m in report["modules"] if m["name"] == name)
        assert module["adapter_survived"] == pytest.approx(1 - math.sqrt(float((Q - target).square().sum()) /
                                                                          float(d.square().sum())), abs=1e-4)
    assert report["adapter_survived"] == pytest.approx(1 - math.sqrt(err2 / d2), abs=1e-4)
    assert 0 < report["adapter_survived"] < 1
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.allclose(_logits(tmp_path / "out"), ref, atol=0.1)


def test_fp8_ragged_merge_and_scale_names(tmp_path):
    """DeepSeek-V3-style ragged weights (partial edge blocks, which transformers cannot load on CPU) and the scale
    names transformers accepts (`.scale`, `.qscale_weight`): merged = the float64 per-block formula + ΔW."""
    base = tmp_path / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(12, 20, generator=g), torch.randn(20, 12, generator=g)
    q1, s1 = quant.fp8_quantize(w1, BLOCK)
    q2, s2 = quant.fp8_quantize(w2, BLOCK)
    save_file({"m.a.weight": q1, "m.a.scale": s1, "m.b.weight": q2, "m.b.qscale_weight": s2,
               "m.norm.weight": torch.ones(12)}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"torch_dtype": "float32", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": list(BLOCK)}}))
    from .conftest import lora_pair, write_peft

    pairs = {"m.a": lora_pair(12, 20, 2, seed=1), "m.b": lora_pair(20, 12, 2, seed=2)}
    lora = write_peft(tmp_path / "lora", pairs, r=2, alpha=2)
    surgery("merge", base, lora, "-o", tmp_path / "out")
    out = _stored(tmp_path / "out")
    assert set(out) == {"m.a.weight", "m.b.weight", "m.norm.weight"}
    for name, q, s in (("m.a", q1, s1), ("m.b", q2, s2)):
        B, A = pairs[name]
        ref = _dequant64(q, s, BLOCK) + B.double() @ A.double()
        assert out[f"{name}.weight"].dtype == torch.float32
        assert torch.allclose(out[f"{name}.weight"].double(), ref, rtol=1e-6, atol=1e-6)
    r = surgery("merge", base, lora, "-o", tmp_path / "rq", "--requantize", "--json")
    out, report = _stored(tmp_path / "rq"), json.loads(r.stdout)["quantized"]
    assert set(out) == {"m.a.weight", "m.a.scale", "m.b.weight", "m.b.qscale_weight", "m.norm.weight"}
    for (name, q, s), scale in zip((("m.a", q1, s1), ("m.b", q2, s2)), ("scale", "qscale_weight")):
        B, A = pairs[name]
        d = B.double() @ A.double()
        target = _dequant64(q, s, BLOCK) + d
        ref_q, ref_s = quant.fp8_quantize(target.float(), BLOCK)  # each partial block by its own amax
        assert torch.allclose(out[f"{name}.{scale}"], ref_s, rtol=1e-6, atol=0)  # amax of float32 vs float64 sums
        Q = _dequant64(out[f"{name}.weight"], out[f"{name}.{scale}"], BLOCK)
        module = next(m for m in report["modules"] if m["name"] == f"{name}.weight")
        assert module["adapter_survived"] == pytest.approx(1 - float((Q - target).norm() / d.norm()), abs=1e-5)


# ---------------------------------------------------------------- MXFP4 (gpt-oss)


def _gpt_oss_mxfp4(root: Path) -> Path:
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, num_experts_per_tok=2, intermediate_size=32,
                                    num_local_experts=3, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(root / "bf16")
    out = root / "mxfp4"
    out.mkdir()
    tensors = {}
    for k, v in load_file(root / "bf16" / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[k + "_blocks"], tensors[k + "_scales"] = quant.mxfp4_quantize(v.float().transpose(1, 2))
        else:
            tensors[k] = v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((root / "bf16" / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(c))
    return out


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    return _gpt_oss_mxfp4(tmp_path_factory.mktemp("mxfp4"))


def test_mxfp4_merge(mxfp4, tmp_path):
    """gpt-oss with MXFP4 experts and an adapter on its experts (target_parameters) and q_proj: by default the
    model is written bf16 (experts dequantized as transformers does, + PeftModel's ΔW, rounded once) and loads
    with PeftModel's logits; --requantize keeps MXFP4 (blocks = the OCP conversion of the float64 merged experts'
    float32 rounding), loads with transformers' dequantizer, and reports the float64 survival figure."""
    dq = transformers.Mxfp4Config(dequantize=True)
    lora, model = _lora(mxfp4, tmp_path / "lora", targets=["q_proj"], scale=0.05, quantized=dq,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    deltas, base = _deltas(model), _stored(mxfp4)
    with torch.no_grad():
        ref = model(IDS).logits
    surgery("merge", mxfp4, lora, "-o", tmp_path / "out")
    out = _stored(tmp_path / "out")
    assert not any(k.endswith(("_blocks", "_scales")) for k in out)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    for name in [k for k in out if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        W = convert_moe_packed_tensors(base[name + "_blocks"], base[name + "_scales"], dtype=torch.float32).double()
        assert _within_one_rounding(out[name], W + deltas[name]), name
    assert torch.allclose(_logits(tmp_path / "out"), ref, atol=2e-2)

    r = surgery("merge", mxfp4, lora, "-o", tmp_path / "rq", "--requantize", "--json")
    report = json.loads(r.stdout)["quantized"]
    out = _stored(tmp_path / "rq")
    assert set(out) == set(base)
    err2 = d2 = 0.0
    for m in report["modules"]:
        name = m["name"]
        W = convert_moe_packed_tensors(base[name + "_blocks"], base[name + "_scales"], dtype=torch.float32).double()
        Q = convert_moe_packed_tensors(out[name + "_blocks"], out[name + "_scales"], dtype=torch.float32).double()
        target = W + deltas[name]
        blocks, scales = quant.mxfp4_quantize(target.float().transpose(1, 2))
        differ = (blocks != out[name + "_blocks"]).float().mean()
        assert torch.equal(scales, out[name + "_scales"]) or differ < 1e-3
        err2 += float((Q - target).square().sum())
        d2 += float(deltas[name].square().sum())
    assert len(report["modules"]) == 4
    assert report["adapter_survived"] == pytest.approx(1 - math.sqrt(err2 / d2), abs=1e-4)
    assert torch.allclose(_logits(tmp_path / "rq", quantization_config=dq), ref, atol=0.2)


def test_mxfp4_untouched_experts_copied(mxfp4, tmp_path):
    """An adapter on attention only (bf16 in gpt-oss): the MXFP4 experts are copied byte for byte and the
    quantization_config kept, so the output loads as the base does."""
    lora, model = _lora(mxfp4, tmp_path / "lora", targets=["q_proj", "v_proj"], scale=0.05,
                        quantized=transformers.Mxfp4Config(dequantize=True))
    r = surgery("merge", mxfp4, lora, "-o", tmp_path / "out")
    assert "copied as they are" in r.stderr
    base, out = _stored(mxfp4), _stored(tmp_path / "out")
    assert all(torch.equal(out[k], base[k]) for k in base if k.endswith(("_blocks", "_scales")))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((mxfp4 / "config.json").read_text())
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.allclose(_logits(tmp_path / "out", quantization_config=transformers.Mxfp4Config(dequantize=True)),
                          ref, atol=2e-2)


# ---------------------------------------------------------------- extract


def test_extract_between_fp8_checkpoints(fp8, tmp_path):
    """The fine-tuned model in FP8 too: the adapter is the float64 best rank-k of the dequantized differences
    (not of the raw FP8 codes), its factors stored float32 (FP8 cannot hold them)."""
    g = torch.Generator().manual_seed(5)
    base = _stored(fp8)

    def tuned(t):
        for k in [k for k in t if k.endswith("q_proj.weight")]:
            W = _dequant64(base[k], base[f"{k}_scale_inv"], BLOCK) + torch.randn(16, 2, generator=g,
                                                                                   dtype=torch.float64) @ \
                torch.randn(2, 16, generator=g, dtype=torch.float64) * 0.1
            t[k], t[f"{k}_scale_inv"] = _tf_quantizer(BLOCK)._quantize_one(k, W.float()).values()
    ft = _fp8(fp8.parent / "bf16", tmp_path / "ft", edit=tuned)
    surgery("extract", ft, fp8, "--rank", "2", "-o", tmp_path / "lora")
    a = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    ftt = _stored(ft)
    assert {k.split(".lora_")[0] for k in a} == {f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    for i in (0, 1):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        D = _dequant64(ftt[k], ftt[f"{k}_scale_inv"], BLOCK) - _dequant64(base[k], base[f"{k}_scale_inv"], BLOCK)
        U, S, Vh = torch.linalg.svd(D)
        best = U[:, :2] * S[:2] @ Vh[:2]
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        B, A = a[f"{p}.lora_B.weight"], a[f"{p}.lora_A.weight"]
        assert B.dtype == A.dtype == torch.float32
        assert float(S[2]) < 0.2 * float(S[1])  # a rank-2 change under FP8's rounding noise
        assert torch.allclose(B.double() @ A.double(), best, atol=1e-4 * float(S[0]))


# ---------------------------------------------------------------- bad input


def _edited(tmp_path, edit=None, config=None) -> Path:
    base = tmp_path / "bad"
    _fp8(_llama(tmp_path / "src"), base, edit=edit)
    if config is not None:
        cfg = json.loads((base / "config.json").read_text())
        cfg["quantization_config"] = config
        (base / "config.json").write_text(json.dumps(cfg))
    return base


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "missing-scale": (dict(edit=lambda t: t.pop(f"{Q}.weight_scale_inv")),
                      f"FP8 weight {Q}.weight has no scale ({Q}.weight_scale_inv"),
    "scale-shape": (dict(edit=lambda t: t.update({f"{Q}.weight_scale_inv": torch.ones(3, 2)})),
                    f"scale {Q}.weight_scale_inv has shape [3, 2]"),
    "nan-scale": (dict(edit=lambda t: t[f"{Q}.weight_scale_inv"].fill_(float("nan"))),
                  f"scale {Q}.weight_scale_inv of {Q}.weight holds NaN"),
    "bitsandbytes": (dict(config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
                     "quantized with bitsandbytes 4-bit"),
    "gptq": (dict(config={"quant_method": "gptq", "bits": 4}), "quantized with gptq"),
    "compressed-tensors": (dict(config={"quant_method": "compressed-tensors", "format": "pack-quantized"}),
                           "quantized with compressed-tensors"),
    "nan-code": (dict(edit=lambda t: t[f"{Q}.weight"].view(torch.uint8)[0, 0].fill_(0x7F)),
                 f"{Q}.weight", "holds NaN or Inf"),
    "no-config": (dict(config=None), "no config.json with their quantization_config"),
    "e5m2": (dict(edit=lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float().to(torch.float8_e5m2)})),
             f"{Q}.weight is float8_e5m2"),
    "block-size": (dict(config={"quant_method": "fp8", "weight_block_size": [0, 8]}),
                   "weight_block_size must be two positive integers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_bases(tmp_path, case):
    """One line naming the tensor (or method), exit 1, nothing written, inputs untouched."""
    kw, *messages = BAD[case]
    base = _edited(tmp_path, kw.get("edit"), kw.get("config"))
    if case == "no-config":
        cfg = json.loads((base / "config.json").read_text())
        del cfg["quantization_config"]
        (base / "config.json").write_text(json.dumps(cfg))
    from .conftest import lora_pair, write_peft

    lora = write_peft(tmp_path / "lora", {Q: lora_pair(16, 16, 2)}, r=2, alpha=2)
    digest = tree_digest(base)
    for args in (["merge", base, lora, "-o", tmp_path / "out"], ["extract", base, tmp_path / "src", "--rank", "2",
                                                                  "-o", tmp_path / "out"]):
        r = surgery(*args, ok=False)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.returncode == 1 and len(lines) == 1 and all(m in lines[0] for m in messages), r.output
        assert not (tmp_path / "out").exists()
    assert tree_digest(base) == digest


def test_requantize_needs_a_quantized_base(tmp_path):
    from .conftest import lora_pair, write_peft

    base = _llama(tmp_path / "bf16")
    lora = write_peft(tmp_path / "lora", {Q: lora_pair(16, 16, 2)}, r=2, alpha=2)
    r = surgery("merge", base, lora, "-o", tmp_path / "out", "--requantize", ok=False)
    assert r.returncode == 1 and "is not a quantized checkpoint" in r.output and not (tmp_path / "out").exists()


def test_fp8_moe_experts(tmp_path):
    """Qwen3-MoE with every expert's projections in FP8 (as Qwen3-30B-A3B-FP8 ships them) and an adapter on the fused
    expert parameters (target_parameters): the merged model, dequantized or re-quantized, loads in transformers
    with PeftModel's logits (within bf16 / FP8 rounding)."""
    from .test_moe import _model

    src = _model("qwen3_moe", tmp_path / "bf16", dtype=torch.bfloat16)
    base = tmp_path / "fp8"
    base.mkdir()
    tq = _tf_quantizer((4, 4))
    tensors = {}
    for k, v in load_file(src / "model.safetensors").items():
        tensors.update(tq._quantize_one(k, v) if k.endswith("proj.weight") else {k: v})
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [4, 4]}
    (base / "config.json").write_text(json.dumps(cfg))
    lora, model = _lora(base, tmp_path / "lora", targets=["q_proj"], scale=0.05,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with torch.no_grad():
        ref = model(IDS).logits
    surgery("merge", base, lora, "-o", tmp_path / "out")
    assert torch.allclose(_logits(tmp_path / "out"), ref, atol=2e-2)
    r = surgery("merge", base, lora, "-o", tmp_path / "rq", "--requantize", "--json")
    q = json.loads(r.stdout)["quantized"]
    assert len(q["modules"]) == 2 + 2 * 4 * 3 and 0 < q["adapter_survived"] < 1  # q_proj ×2, 4 experts × 3 per layer
    assert torch.allclose(_logits(tmp_path / "rq"), ref, atol=0.1)


# ---------------------------------------------------------------- compressed-tensors FP8


CT_STRATEGIES = {"channel": {}, "tensor": {}, "group": {"group_size": 8}, "block": {"block_structure": [8, 8]}}


def _ct_fp8(src: Path, out: Path, strategy: str) -> Path:
    """`src`'s linear weights quantized by compressed-tensors itself (minmax scales from its `calculate_qparams`,
    its `quantize`), saved in its float-quantized format with the config llm-compressor writes."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False,
                            **CT_STRATEGIES[strategy])
    out.mkdir()
    tensors = {}
    for k, v in load_file(src / "model.safetensors").items():
        if not k.endswith("proj.weight"):
            tensors[k] = v
            continue
        if strategy == "channel":
            view, dims = v, (1,)
        elif strategy == "tensor":
            view, dims = v.reshape(1, -1), (1,)
        elif strategy == "group":
            view, dims = v.unflatten(1, (-1, 8)), (2,)
        else:
            view, dims = v.unflatten(1, (-1, 8)).unflatten(0, (-1, 8)), (1, 3)
        scale, _ = calculate_qparams(view.amin(dim=dims), view.amax(dim=dims), args)
        scale = scale.reshape(v.shape[0], 1) if strategy == "channel" else scale.reshape(-1) if strategy == "tensor" \
            else scale
        tensors[k] = quantize(v, scale, None, args, dtype=torch.float8_e4m3fn)
        tensors[k.replace(".weight", ".weight_scale")] = scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(),
                                                             "input_activations": None}}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("strategy", list(CT_STRATEGIES))
def test_compressed_tensors_fp8(tmp_path, strategy):
    """compressed-tensors FP8 (per channel, tensor, group, block): decoded as its own `dequantize` (in the scale's
    dtype), merged into the whole model in bf16 with PeftModel's logits on the model transformers decompresses
    (run_compressed=False); --requantize refused in one line."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from surgery.io.checkpoint import open_checkpoint, read_tensor

    base = _ct_fp8(_llama(tmp_path / "bf16"), tmp_path / "ct", strategy)
    stored, ck = _stored(base), open_checkpoint(base)
    assert ck.quant.method == "compressed-tensors"
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, **CT_STRATEGIES[strategy])
    for name, spec in ck.tensors.items():
        if spec.codec is not None:
            ref = dequantize(stored[name], stored[name.replace(".weight", ".weight_scale")], args=args)
            assert torch.equal(read_tensor(spec), ref.float()), name
    dq = transformers.CompressedTensorsConfig(run_compressed=False)
    lora, model = _lora(base, tmp_path / "lora", scale=0.05, quantized=dq)
    with torch.no_grad():
        ref = model(IDS).logits
    surgery("merge", base, lora, "-o", tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert torch.allclose(_logits(tmp_path / "out"), ref, atol=2e-2)
    r = surgery("merge", base, lora, "-o", tmp_path / "rq", "--requantize", ok=False)
    assert r.returncode == 1 and "compressed-tensors" in r.output and not (tmp_path / "rq").exists()


def test_requantize_refuses_dtype(fp8, tmp_path):
    from .conftest import lora_pair, write_peft

    lora = write_peft(tmp_path / "lora", {Q: lora_pair(16, 16, 2)}, r=2, alpha=2)
    r = surgery("merge", fp8, lora, "-o", tmp_path / "out", "--requantize", "--dtype", "float16", ok=False)
    assert r.returncode == 1 and "drop --dtype" in r.output and not (tmp_path / "out").exists()


def test_bad_mxfp4_and_compressed_tensors_bases(mxfp4, tmp_path):
    """An MXFP4 weight without its scales, a compressed-tensors FP8 weight with a zero point: one line, exit 1,
    nothing written."""
    from .conftest import lora_pair, write_peft

    lora = write_peft(tmp_path / "lora", {Q: lora_pair(32, 32, 2)}, r=2, alpha=2)
    bad = tmp_path / "mx"
    bad.mkdir()
    tensors = _stored(mxfp4)
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((mxfp4 / "config.json").read_text())
    ct = _ct_fp8(_llama(tmp_path / "bf16"), tmp_path / "ct", "channel")
    tensors = _stored(ct)
    tensors[f"{Q}.weight_zero_point"] = torch.zeros(16, 1)
    save_file(tensors, str(ct / "model.safetensors"))
    for base, message in ((bad, "has no scale tensor model.layers.0.mlp.experts.down_proj_scales"),
                          (ct, f"asymmetric FP8 ({Q}.weight_zero_point)")):
        r = surgery("merge", base, lora, "-o", tmp_path / "out", ok=False)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.output
        assert not (tmp_path / "out").exists()
