"""Squeezed adapters load in the real PEFT library and produce the mathematically expected model.

Reference: PEFT's own `get_delta_weight` of the original adapter, truncated by a dense float64 SVD, added to a
plain copy of the base model (DoRA: PEFT's weight-norm formula with the original magnitude).
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from surgery import Energy, FixedRank, load_adapter, parse_rank_map, save_adapter, squeeze  # noqa: E402

from .conftest import dense_truncation  # noqa: E402
from .real_loaders import vllm_deltas  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def load_base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()


def make_adapter(base_dir, out, targets=TARGETS, **cfg):
    """A real PEFT LoRA with random (non-zero) factors and decaying spectra, saved with save_pretrained."""
    model = get_peft_model(load_base(base_dir), LoraConfig(target_modules=targets, lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, mod in model.named_parameters():
            if any(f"{f}." in name for f in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
                r = mod.shape[0] if "lora_A" in name or "embedding_A" in name else mod.shape[1]
                decay = 0.8 ** torch.arange(r, dtype=torch.float32)
                noise = torch.randn(mod.shape, generator=g) * 0.3
                mod.copy_(noise * (decay if "_B" in name else decay[:, None]))
            if "magnitude" in name:
                mod.mul_(1 + 0.1 * torch.rand(mod.shape, generator=g))
    model.save_pretrained(out)
    return model


def expected_model(base_dir, peft_model, ranks):
    """Base with each module's PEFT delta replaced by its float64 best rank-k approximation."""
    base = load_base(base_dir)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if not hasattr(mod, "get_delta_weight") or "default" not in getattr(mod, "lora_A", {}) and \
                    "default" not in getattr(mod, "lora_embedding_A", {}):
                continue
            path = name.removeprefix("base_model.model.")
            delta = mod.get_delta_weight("default").double()
            k = ranks(path)
            approx = dense_truncation(delta, k)
            W = params[f"{path}.weight"]
            new = W.double() + approx
            if getattr(mod, "use_dora", {}).get("default"):
                m = mod.lora_magnitude_vector["default"].weight.double()
                new = (m / new.norm(dim=1)).unsqueeze(1) * new
            W.copy_(new.to(W.dtype))
    return base


def logits(model, seed=0):
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


CASES = {
    "fixed": (dict(r=8, lora_alpha=16), FixedRank(4), lambda p: 4),
    "rank-map-rslora": (dict(r=8, lora_alpha=12, use_rslora=True), parse_rank_map(["mlp=2", r"q_proj=6,embed=3"]),
                        lambda p: 2 if "mlp" in p else 6 if "q_proj" in p else 3 if "embed" in p else 8),
    "dora": (dict(r=8, lora_alpha=8, use_dora=True, targets=TARGETS[:-1]), FixedRank(5), lambda p: 5),  # no embeddings
}


@pytest.mark.parametrize("case", list(CASES))
def test_squeezed_adapter_loads_in_peft_with_expected_outputs(base_dir, tmp_path, case):
    cfg, rule, ranks = CASES[case]
    original = make_adapter(base_dir, tmp_path / "orig", **cfg)
    small, report = squeeze(load_adapter(tmp_path / "orig"), rule, device="cpu")
    save_adapter(small, tmp_path / "squeezed")
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "squeezed").eval()
    want = logits(expected_model(base_dir, original, ranks))
    got = logits(loaded)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), float((got - want).abs().max())
    # and the squeeze really changed something: the untruncated model differs
    assert not torch.allclose(logits(original), want, atol=1e-3)
    if case == "dora":
        assert any("DoRA" in w for w in report.warnings)


def test_energy_squeeze_of_bundled_fixture_loads_in_peft(tmp_path):
    from .conftest import FIXTURES, PEFT_FIXTURE

    small, report = squeeze(load_adapter(PEFT_FIXTURE), Energy(0.95), device="cpu")
    assert len({m.new_rank for m in report.modules}) > 1  # heterogeneous ranks
    save_adapter(small, tmp_path / "s")
    base = load_base(FIXTURES / "tiny-llama")
    original = PeftModel.from_pretrained(copy.deepcopy(base), PEFT_FIXTURE).eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "s").eval()
    k = {r.name.removeprefix("base_model.model."): r.new_rank for r in report.modules}
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    want = expected_model(FIXTURES / "tiny-llama", original, lambda p: k[p])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, want(input_ids=ids).logits, atol=2e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_modules_of_several_scales_are_written_at_one_so_vllm_reads_what_peft_reads(base_dir, tmp_path, rslora):
    """A PEFT adapter whose rank_pattern has no alpha_pattern (q_proj at r 4, scale 16/4; the others at 16/8) means
    another update to vLLM, which scales every module by lora_alpha / r. Squeezed, its directory states one scale
    (the odd modules' ratio folded into B): vLLM's reading, PEFT's (the autouse check) and the truncation agree."""
    targets = ["q_proj", "v_proj", "up_proj"]
    original = make_adapter(base_dir, tmp_path / "orig", targets=targets, r=8, lora_alpha=16,
                            rank_pattern={"q_proj": 4}, use_rslora=rslora)
    a = load_adapter(tmp_path / "orig")
    assert len({m.scale for m in a.modules.values()}) == 2
    assert any(not torch.allclose(d, a.modules[n].delta(torch.float64))
               for n, d in vllm_deltas(tmp_path / "orig").items())  # the input itself: vLLM ≠ PEFT
    small, _ = squeeze(a, FixedRank(3), device="cpu")
    save_adapter(small, tmp_path / "s")
    back = load_adapter(tmp_path / "s")
    assert len({m.scale for m in back.modules.values()}) == 1
    theirs = vllm_deltas(tmp_path / "s")
    assert set(theirs) == set(small.modules) and len(theirs) == 6
    for n, d in theirs.items():
        mine = small.modules[n].delta(torch.float64)
        assert torch.allclose(d, mine, atol=1e-6 * float(mine.abs().max())), n
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "s").eval()
    want = logits(expected_model(base_dir, original, lambda p: 3))
    assert torch.allclose(logits(loaded), want, atol=2e-4, rtol=1e-4)


def test_parent_of_named_adapters_names_them(base_dir, tmp_path):
    """PEFT saves an adapter not named "default" under `<dir>/<name>/`: pointing at `<dir>` names the subfolders."""
    model = get_peft_model(load_base(base_dir), LoraConfig(target_modules=["q_proj"], r=4), adapter_name="style")
    model.add_adapter("tone", LoraConfig(target_modules=["v_proj"], r=2))
    model.save_pretrained(tmp_path / "saved", selected_adapters=["style", "tone"])
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match=r"not a PEFT adapter directory .*it holds style/, tone/: name one$"):
        load_adapter(tmp_path / "saved")
    assert load_adapter(tmp_path / "saved" / "tone").modules  # and the named one reads


def test_an_activated_lora_is_squeezed_as_a_peft_adapter_and_stays_activated(base_dir, tmp_path):
    """aLoRA (`alora_invocation_tokens`): PEFT applies the update only from the invocation tokens on. Squeezed into
    a PEFT directory it keeps its config, and PEFT runs it as it runs a hand-built aLoRA of the float64 rank-3
    truncations: the base's logits before the invocation, the truncated adapter's after. Merges and other formats
    refuse it (tests/test_errors.py)."""
    import json

    from safetensors.torch import save_file

    original = make_adapter(base_dir, tmp_path / "a", targets=["q_proj", "k_proj", "v_proj"], r=8, lora_alpha=16,
                            alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    from click.testing import CliRunner

    from surgery_cli.main import main

    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "a")])
    assert "alora_invocation_tokens [5, 6]: an activated LoRA" in r.output and "stays a PEFT adapter" in r.output
    small, _ = squeeze(load_adapter(tmp_path / "a"), FixedRank(3), device="cpu")
    save_adapter(small, tmp_path / "s")
    assert load_adapter(tmp_path / "s").config["alora_invocation_tokens"] == [5, 6]
    tensors = {}  # the reference: each PEFT delta's float64 truncation, as an aLoRA of scale 1
    for name, mod in original.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            U, S, Vh = torch.linalg.svd(mod.get_delta_weight("default").double())
            tensors[f"{name}.lora_B.weight"] = (U[:, :3] * S[:3]).float().contiguous()
            tensors[f"{name}.lora_A.weight"] = Vh[:3].float().contiguous()
    (tmp_path / "ref").mkdir()
    save_file(tensors, str(tmp_path / "ref" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text()) | {"r": 3, "lora_alpha": 3}
    (tmp_path / "ref" / "adapter_config.json").write_text(json.dumps(cfg))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ours = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "s").eval()(input_ids=ids).logits
        ref = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "ref").eval()(input_ids=ids).logits
        base = load_base(base_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[:, :4], base[:, :4], rtol=0, atol=1e-6)  # before the invocation: the base
    assert not torch.allclose(ours[:, 6:], base[:, 6:], atol=1e-3)


VARIANTS = {  # PEFT LoRA variants that run and merge as a plain LoRA once their factors are read as PEFT merges them
    "bdlora": lambda: {"use_bdlora": peft.tuners.lora.config.BdLoraConfig(
        target_modules_bd_a=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
        target_modules_bd_b=["o_proj", "down_proj"], nblocks=2)},
    "velora": lambda: {"velora_config": peft.tuners.lora.config.VeloraConfig(num_groups=4, init_type="random")},
    "monteclora": lambda: {"monteclora_config": peft.tuners.lora.config.MontecloraConfig()},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_that_merge_as_plain_loras_are_squeezed_and_merged_as_peft_merges_them(base_dir, tmp_path,
                                                                                         variant):
    """BD-LoRA stores its block-diagonal factor as the blocks stacked (A (r, in/nb) or B (out, r/nb)); VeLoRA and
    MonteCLoRA save training-only state per module (a rank-sized sampler for MonteCLoRA). PEFT merges all three as
    the plain scale·B·A. Squeezed, each loads in PEFT (once the MonteCLoRA sampler of the old rank made it refuse
    the file; BD-LoRA's dense factors were refused) as the float64 truncation of PEFT's merged update, and merge
    equals PEFT's merge_and_unload (the extra tensors were refused as replacing tensors the base does not have)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from surgery_cli.main import main

    targets = TARGETS[:-1]
    make_adapter(base_dir, tmp_path / "a", targets=targets, r=8, lora_alpha=16, **VARIANTS[variant]())
    with torch.no_grad():
        merged = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "a").eval().merge_and_unload()
    base = dict(load_base(base_dir).named_parameters())
    r = CliRunner().invoke(main, ["merge", str(base_dir), str(tmp_path / "a"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    ours = load_file(tmp_path / "m" / "model.safetensors")
    for name, w in merged.state_dict().items():
        torch.testing.assert_close(ours[name], w, rtol=0, atol=1e-6)

    r = CliRunner().invoke(main, ["squeeze", str(tmp_path / "a"), "--rank", "3", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0 and ("BD-LoRA" if variant == "bdlora" else "training-only state") in r.output, r.output
    reference = load_base(base_dir)
    with torch.no_grad():
        for name, w in reference.named_parameters():
            if any(f".{t}." in name for t in targets):
                delta = merged.state_dict()[name].double() - base[name].double()
                w.copy_((base[name].double() + dense_truncation(delta, 3)).float())
    loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "s").eval()
    assert loaded.peft_config["default"].use_bdlora is None
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=2e-4)


def test_a_vera_adapter_is_refused_with_peft_s_route_to_a_lora_that_then_merges_as_it(base_dir, tmp_path):
    """VeRA (shared random A/B sliced to each module's in/out, per-module λ's) is not read: its modules' input
    sizes are not in the file. The refusal names PEFT's save_as_lora, and that route works: the LoRA it writes (at
    rank r, exact) merges as PEFT merges the VeRA adapter."""
    from peft import PeftModel, VeraConfig, save_as_lora
    from safetensors.torch import load_file

    from surgery.errors import SurgeryError
    from surgery.merge import merge

    model = get_peft_model(load_base(base_dir), VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "vera_lambda" in n:
            p.data.normal_()
    model.save_pretrained(tmp_path / "vera")
    with pytest.raises(SurgeryError, match=r"peft_type 'VERA' is not read by surgery .*peft\.save_as_lora"):
        load_adapter(tmp_path / "vera")
    vera = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "vera")
    save_as_lora(tmp_path / "lora", vera, rank=8)
    want = {k: v for k, v in vera.merge_and_unload().state_dict().items()}
    merge(base_dir, [load_adapter(tmp_path / "lora")], tmp_path / "merged", device="cpu")
    got = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert len(changed) == 3 * 2 and all(k.endswith((".q_proj.weight", ".v_proj.weight", ".down_proj.weight"))
                                         for k in changed)
    for k in changed:
        delta = (want[k] - base[k]).norm()
        assert (got[k] - want[k]).norm() <= 1e-5 * delta, k
