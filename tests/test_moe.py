"""MoE expert adapters (PEFT `target_parameters`) against the real libraries: tiny Qwen3-MoE, gpt-oss, Mixtral and
DeepSeek-V3 models built by transformers from configs, adapters made and loaded by PEFT, merged models loaded by transformers.
References: PeftModel's logits and `get_delta_weight`, float64 per-expert SVDs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from surgery import load_adapter  # noqa: E402
from surgery.io.peft import PREFIX  # noqa: E402

from .conftest import FIXTURES  # noqa: E402
from .test_gguf import surgery  # noqa: E402

BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KINDS = ["qwen3_moe", "gpt_oss", "mixtral", "deepseek_v3"]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _config(kind: str, **over):
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=32, moe_intermediate_size=12, num_experts=4,
                                          decoder_sparse_step=1, mlp_only_layers=[])
    elif kind == "gpt_oss":
        cfg = transformers.GptOssConfig(**common, intermediate_size=12, num_local_experts=3,
                                        layer_types=["sliding_attention", "full_attention"])
    elif kind == "deepseek_v3":  # a dense first layer, then routed + shared experts; MLA attention
        common = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}
        cfg = transformers.DeepseekV3Config(**common, num_key_value_heads=2, intermediate_size=32,
                                            moe_intermediate_size=12, n_routed_experts=4, n_shared_experts=1,
                                            first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8,
                                            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_group=1,
                                            topk_group=1)
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=12, num_local_experts=4)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _model(kind: str, path: Path, dtype=torch.float32, **over) -> Path:
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(_config(kind, **over)).to(dtype)
    m.save_pretrained(path)
    return path


def _lora(model_dir: Path, out: Path, seed: int = 1, **config) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config.setdefault("target_modules", [])
    config.setdefault("target_parameters", BOTH)
    get_peft_model(base, LoraConfig(init_lora_weights=False, **config)).save_pretrained(out)
    return out


def _peft_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter)(IDS).logits


def _logits(model_dir: Path) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {k: _model(k, root / k) for k in KINDS}


def _peft_deltas(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{parameter path: PEFT's ΔW (E, out, in)} of every ParamWrapper (gpt-oss's (E, in, out) transposed back)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "parameter_name"):
            owner = name
            while owner.endswith(".base_layer"):
                owner = owner.removesuffix(".base_layer")
            d = mod.get_delta_weight("default").detach().double()
            out[f"{owner}.{mod.parameter_name}"] = d.transpose(1, 2) if mod.get_base_layer().is_transposed else d
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_read_is_peft_delta(models, tmp_path, kind):
    """Every expert's ΔW as PEFT forms it (its asymmetric grouping, nesting and swap), with rsLoRA and patterns."""
    lora = _lora(models[kind], tmp_path / "a", r=3, lora_alpha=5, use_rslora=kind == "mixtral",
                 rank_pattern={"model.layers.1.mlp.experts.down_proj": 2},
                 alpha_pattern={"model.layers.1.mlp.experts.down_proj": 7})
    a = load_adapter(lora)
    theirs = _peft_deltas(models[kind], lora)
    assert set(theirs) == {n.removeprefix(PREFIX) for n in a.modules}
    for name, m in a.modules.items():
        assert m.kind == "experts" and m.nesting == ("gate_up_proj", "down_proj")
        assert torch.allclose(m.delta(), theirs[name.removeprefix(PREFIX)], atol=1e-6)
    assert a.modules[PREFIX + "model.layers.1.mlp.experts.down_proj"].rank == 2


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_peftmodel(models, tmp_path, kind):
    """merge writes each expert's ΔW into the base's own layout (per-expert files, gate/up halves, fused and
    transposed); transformers loads it with no missing/unexpected keys and gives PeftModel's logits. DeepSeek-V3:
    beside ordinary modules (its dense layer's and shared experts' gate_proj and up_proj)."""
    lora = _lora(models[kind], tmp_path / "a", r=2, lora_alpha=4,
                 target_modules=["gate_proj", "up_proj"] if kind == "deepseek_v3" else [])
    out = tmp_path / "merged"
    surgery("merge", models[kind], lora, "-o", out)
    ref, base = _peft_logits(models[kind], lora), _logits(models[kind])
    got = _logits(out)
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(got, ref, atol=2e-5), float((got - ref).abs().max())


def test_merge_with_target_modules_and_bf16(tmp_path):
    """Expert parameters beside ordinary target_modules; a bf16 base: W + ΔW in float32, rounded once."""
    from safetensors.torch import load_file

    model = _model("qwen3_moe", tmp_path / "bf16", dtype=torch.bfloat16)
    lora = _lora(model, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    a = load_adapter(lora)
    assert {m.kind for m in a.modules.values()} == {"experts", "linear"}
    out = tmp_path / "merged"
    surgery("merge", model, lora, "-o", out)
    W, M = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    d = a.modules[PREFIX + "model.layers.0.mlp.experts.gate_up_proj"].delta()
    for e in range(4):
        for half, rows in (("gate_proj", slice(0, 12)), ("up_proj", slice(12, 24))):
            key = f"model.layers.0.mlp.experts.{e}.{half}.weight"
            ref = (W[key].double() + d[e, rows]).to(torch.bfloat16)
            assert (M[key].float() != ref.float()).float().mean() < 0.01  # one rounding (float32 sum ≈ float64's)
            ulp = ref.float().abs() * 2 ** -7 + 1e-30
            assert ((M[key].float() - ref.float()).abs() <= ulp).all()
    q = a.modules[PREFIX + "model.layers.0.self_attn.q_proj"].delta()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(M[key], (W[key].double() + q).to(torch.float32).to(torch.bfloat16))
    assert torch.equal(M["model.layers.0.mlp.gate.weight"], W["model.layers.0.mlp.gate.weight"])


def test_squeeze_per_expert(models, tmp_path):
    """--rank K: every expert truncated to its float64 SVD's best rank K; --energy: per-expert ranks, written at
    their maximum (PEFT's one r per parameter), the rest zero-padded; PEFT loads both."""
    lora = _lora(models["qwen3_moe"], tmp_path / "a", r=4, lora_alpha=8)
    a = load_adapter(lora)
    surgery("squeeze", lora, "--rank", 2, "-o", tmp_path / "r2")
    b = load_adapter(tmp_path / "r2")
    theirs = _peft_deltas(models["qwen3_moe"], tmp_path / "r2")
    for name, m in a.modules.items():
        U, S, Vh = torch.linalg.svd(m.delta(), full_matrices=False)
        best = (U[..., :2] * S[..., None, :2]) @ Vh[..., :2, :]
        assert b.modules[name].rank == 2
        assert torch.allclose(theirs[name.removeprefix(PREFIX)], best, atol=1e-5)
    r = surgery("squeeze", lora, "--energy", 0.9, "-o", tmp_path / "e", "--json")
    report = json.loads(r.stdout)
    per = {}
    for mod in report["modules"]:
        per.setdefault(mod["name"].rsplit("[", 1)[0], []).append(mod["new_rank"])
    e = load_adapter(tmp_path / "e")
    assert all(e.modules[n].rank == max(ks) for n, ks in per.items())
    assert all(len(ks) == 4 for ks in per.values())


def test_combine_per_expert(models, tmp_path):
    a = _lora(models["gpt_oss"], tmp_path / "a", seed=1, r=2, lora_alpha=4)
    b = _lora(models["gpt_oss"], tmp_path / "b", seed=2, r=3, lora_alpha=3, use_rslora=True)
    surgery("combine", a, b, "--weight", 1, "--weight", -0.5, "-o", tmp_path / "c")
    A, B, C = load_adapter(a), load_adapter(b), load_adapter(tmp_path / "c")
    theirs = _peft_deltas(models["gpt_oss"], tmp_path / "c")
    for name in A.modules:
        ref = A.modules[name].delta() - 0.5 * B.modules[name].delta()
        assert C.modules[name].rank == 5
        assert torch.allclose(theirs[name.removeprefix(PREFIX)], ref, atol=1e-5)
    # with a rank rule: each expert's best rank-2 approximation of the exact sum (float64), as PEFT loads it
    surgery("combine", a, b, "--weight", 1, "--weight", -0.5, "--rank", 2, "-o", tmp_path / "c2")
    theirs = _peft_deltas(models["gpt_oss"], tmp_path / "c2")
    for name in A.modules:
        ref = (A.modules[name].delta() - 0.5 * B.modules[name].delta()).double()
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        best = U[..., :2] @ torch.diag_embed(S[..., :2]) @ Vh[..., :2, :]
        assert load_adapter(tmp_path / "c2").modules[name].rank == 2
        assert torch.allclose(theirs[name.removeprefix(PREFIX)].double(), best, atol=1e-5)
    r = surgery("combine", a, b, "--method", "ties", "--density", 0.5, "-o", tmp_path / "t", ok=False)
    assert r.returncode == 1 and f"{a}: expert parameter" in r.stderr and "--method sum" in r.stderr
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_extract_expert_parameters(models, tmp_path, kind):
    """extract FT BASE: per-expert differences written as target_parameters, which PEFT loads on the model
    (per-expert module names would load as nothing on transformers 5) and which give the fine-tuned logits."""
    lora = _lora(models[kind], tmp_path / "a", r=2, lora_alpha=4)
    ft = tmp_path / "ft"
    surgery("merge", models[kind], lora, "-o", ft)
    surgery("extract", ft, models[kind], "--rank", 2, "-o", tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["target_parameters"]
    got = _peft_logits(models[kind], tmp_path / "x")
    assert torch.allclose(got, _logits(ft), atol=5e-5)
    assert (got - _logits(models[kind])).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_convert_expert_modules_round_trip(models, tmp_path, kind):
    """--expert-modules: per-expert LoRA modules on the base's own tensors (gate/up rows of the fused ΔW); back
    to target_parameters exactly (gate and up blocks side by side)."""
    lora = _lora(models[kind], tmp_path / "a", r=2, lora_alpha=4)
    surgery("convert", lora, "--to", "peft", "--base", models[kind], "--expert-modules", "-o", tmp_path / "m")
    a, m = load_adapter(lora), load_adapter(tmp_path / "m")
    assert all(x.kind == "linear" for x in m.modules.values()) and len(m.modules) == 2 * 4 * 3
    first = "block_sparse_moe.experts.1.w3" if kind == "mixtral" else "mlp.experts.1.up_proj"
    gate_up = a.modules[PREFIX + "model.layers.0.mlp.experts.gate_up_proj"].delta()
    half = gate_up.shape[1] // 2
    assert torch.allclose(m.modules[PREFIX + f"model.layers.0.{first}"].delta(), gate_up[1, half:], atol=1e-6)
    surgery("convert", tmp_path / "m", "--to", "peft", "--base", models[kind], "-o", tmp_path / "back")
    back = load_adapter(tmp_path / "back")
    for name, x in a.modules.items():
        assert torch.allclose(back.modules[name].delta(), x.delta(), atol=1e-6)
    assert torch.allclose(_peft_logits(models[kind], tmp_path / "back"), _peft_logits(models[kind], lora), atol=2e-5)


def test_inspect_per_expert(models, tmp_path):
    lora = _lora(models["qwen3_moe"], tmp_path / "a", r=3, lora_alpha=3)
    a = load_adapter(lora)
    info = json.loads(surgery("inspect", lora, "--spectrum", "--json").stdout)
    for mod in info["modules"]:
        m = a.modules[mod["name"]]
        assert mod["kind"] == "experts" and mod["experts"] == 4 and mod["rank"] == 3
        ref = torch.linalg.svdvals(m.delta())
        assert torch.allclose(torch.tensor(mod["experts_singular_values"], dtype=torch.float64), ref[:, :3], atol=1e-6)
        assert mod["experts_numerical_rank"] == [3] * 4
    text = surgery("inspect", lora, "--spectrum").stdout
    assert "4×24×16" in text and "numerical rank per expert 3 ×4" in text and "expert 3: σ = " in text
    text = surgery("inspect", lora).stdout  # per-expert ranks without --spectrum, no σ's
    assert "numerical rank per expert 3 ×4" in text and "σ = " not in text


@pytest.mark.no_real_load  # its bases are made wrong on purpose; nothing is written
def test_bad_inputs(models, tmp_path):
    """Another expert count, an unknown model type, a parameter the base lacks, a format without a place for
    experts: one line, exit 1, nothing written."""
    lora = _lora(models["qwen3_moe"], tmp_path / "a", r=2, lora_alpha=4)
    other = _model("qwen3_moe", tmp_path / "e3", num_experts=3)
    cases = {
        "merge": (["merge", other, lora, "-o", tmp_path / "o1"], "made for another model"),
        "convert": (["convert", lora, "--to", "kohya", "-o", tmp_path / "o2.safetensors"], "no place for"),
        "dense": (["merge", _model("mixtral", tmp_path / "mx"), _lora(models["gpt_oss"], tmp_path / "g", r=2,
                                                                       lora_alpha=2), "-o", tmp_path / "o3"],
                  "made for another model"),
    }
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(cfg | {"model_type": "qwen9_moe"}))
    cases["unknown"] = (["merge", unknown, lora, "-o", tmp_path / "o4"], "transformers does not know")
    dense = _model("mixtral", tmp_path / "mx2")
    (dense / "config.json").write_text(json.dumps(json.loads((dense / "config.json").read_text())
                                                  | {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    cases["lacks"] = (["merge", dense, lora, "-o", tmp_path / "o5"], "no such expert parameter")
    half = tmp_path / "half"  # a 2-D `weight` in target_parameters with its lora_A missing
    half.mkdir()
    save_file({f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)},
              str(half / "adapter_model.safetensors"))
    (half / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                          "target_modules": [],
                                                          "target_parameters": ["self_attn.q_proj.weight"]}))
    cases["half"] = (["squeeze", half, "--rank", 1, "-o", tmp_path / "o6"], "missing its A (down) factor")
    for what, (args, says) in cases.items():
        r = surgery(*args, ok=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and says in lines[0], (what, r.stderr)
        assert not Path(args[-1]).exists(), what
    # compare loads the base with transformers, which holds Mixtral's per-expert tensors fused: one line saying so
    mixtral = _model("mixtral", tmp_path / "mxt", vocab_size=256)
    for f in (FIXTURES / "tiny-llama").glob("tokenizer*"):
        (mixtral / f.name).write_bytes(f.read_bytes())
    r = surgery("compare", mixtral, _lora(mixtral, tmp_path / "b", r=2, lora_alpha=4), "--texts",
                FIXTURES / "sentences.txt", "--max-tokens", 8, ok=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "renamed or fused, as MoE experts" in lines[0], r.stderr


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_an_all_linear_adapter_merges_and_extracts_as_peft_loads_it(models, tmp_path, kind):
    """PEFT's `all-linear` on a MoE targets the router as `gate.weight` and the experts by bare parameter names
    (`gate_up_proj`), which match every module's path: each module takes only the parameters its wrappers in the
    file say it has (the router's `gate.weight`, none for q_proj). Mixtral stores its router as
    `block_sparse_moe.gate` while the model (and PEFT's adapter) call it `mlp.gate`: merge places it by
    transformers' renaming, and extract names it as PEFT does, so that a rank_pattern entry for it (rank 4 < 8:
    the router has 4 rows) reaches PEFT. Before, merge refused the adapter (`mlp.gate has several targeted
    parameters`, then `no base tensor`) and PEFT refused the extracted one (size mismatch)."""
    lora = _lora(models[kind], tmp_path / "a", r=4, lora_alpha=8, target_modules="all-linear", target_parameters=None)
    config = json.loads((lora / "adapter_config.json").read_text())
    assert "gate.weight" in config["target_parameters"] and "gate_up_proj" in config["target_parameters"]
    a = load_adapter(lora)
    assert a.modules[PREFIX + "model.layers.0.mlp.gate"].kind == "linear"
    assert a.modules[PREFIX + "model.layers.0.self_attn.q_proj"].kind == "linear"
    ft = tmp_path / "ft"
    surgery("merge", models[kind], lora, "-o", ft)
    ref = _peft_logits(models[kind], lora)
    assert (ref - _logits(models[kind])).abs().max() > 1e-2
    assert torch.allclose(_logits(ft), ref, atol=2e-5), float((_logits(ft) - ref).abs().max())
    surgery("extract", ft, models[kind], "--rank", 8, "-o", tmp_path / "x")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"model.layers.{i}.mlp.gate.weight": 4 for i in range(2)}
    assert torch.allclose(_peft_logits(models[kind], tmp_path / "x"), _logits(ft), atol=5e-5)


def test_extract_carries_changed_tensors_peft_can_load(models, tmp_path):
    """extract --carry-changed on gpt-oss: a changed final norm and router bias are carried whole (PEFT loads them
    into the model); a changed expert bias lives in the experts module PEFT wraps as a parameter (ParamWrapper),
    where no tensor of the adapter can reach it: named as not carried. PEFT's logits are the fine-tuned model's
    but for that bias."""
    from safetensors.torch import load_file

    base = models["gpt_oss"]
    ft, kept = tmp_path / "ft", tmp_path / "kept"
    surgery("merge", base, _lora(base, tmp_path / "a", r=2, lora_alpha=4), "-o", ft)
    sd = load_file(str(ft / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    changed = ["model.norm.weight", "model.layers.0.mlp.router.bias", "model.layers.1.mlp.experts.gate_up_proj_bias"]
    original = {k: sd[k].clone() for k in changed}
    sd.update({k: sd[k] + 0.3 * torch.randn(sd[k].shape, generator=g) for k in changed})
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    r = surgery("extract", ft, base, "--rank", 2, "--carry-changed", "-o", tmp_path / "x", "--json")
    rep = json.loads(r.stdout)
    assert sorted(rep["carried"]) == sorted(changed[:2]) and rep["untargeted_changed"] == changed[2:]
    assert any("not carried: " + changed[2] in w for w in rep["warnings"]), rep["warnings"]
    import shutil

    shutil.copytree(ft, kept)
    save_file({**sd, changed[2]: original[changed[2]]}, str(kept / "model.safetensors"), metadata={"format": "pt"})
    got = _peft_logits(base, tmp_path / "x")
    assert torch.allclose(got, _logits(kept), atol=5e-5) and (got - _logits(ft)).abs().max() > 1e-3
