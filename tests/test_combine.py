"""surgery combine against independent references: the float64 dense weighted sum and its truncated SVD, PEFT's
`add_weighted_adapter(combination_type="cat")` (exact) and `peft.utils.merge_utils` (TIES, magnitude pruning)."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery import FixedRank, SurgeryError, load_adapter
from surgery.combine import combine
from surgery_cli.main import main

from .conftest import KOHYA_FIXTURE, lora_pair, tree_digest, write_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoHaConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

from .test_merge import load, logits, random_lora, tiny_llama  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def dense(adapter, name):
    m = adapter.modules.get(name)
    return None if m is None else m.delta(torch.float64)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A tiny Llama and two real PEFT LoRAs on it: r=8 on q,v (alpha 16) and r=4 on q,k (alpha 4, rsLoRA)."""
    d = tmp_path_factory.mktemp("combine")
    tiny_llama().save_pretrained(d / "base")
    random_lora(load(d / "base"), d / "a", targets=["q_proj", "v_proj"], seed=1)
    random_lora(load(d / "base"), d / "b", targets=["q_proj", "k_proj"], seed=2, r=4, lora_alpha=4, use_rslora=True)
    return d


def test_sum_is_exact_and_equals_peft_cat(two, tmp_path):
    a, b = load_adapter(two / "a"), load_adapter(two / "b")
    r = run("combine", two / "a", two / "b", "--weight", "0.7", "--weight", "0.3", "-o", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    c = load_adapter(tmp_path / "c")
    assert set(c.modules) == set(a.modules) | set(b.modules)
    for name, m in c.modules.items():  # the float64 dense Σ wᵢΔWᵢ; a missing module is a zero update
        ref = sum(w * d for w, d in ((0.7, dense(a, name)), (0.3, dense(b, name))) if d is not None)
        assert torch.allclose(m.delta(), ref, atol=1e-6 * float(ref.abs().max()))
    q = next(x for x in doc["modules"] if x["name"].endswith("layers.0.self_attn.q_proj"))
    assert q["input_ranks"] == [8, 4] and q["new_rank"] == 12 and q["rel_error"] < 1e-6
    # PEFT's own exact combination of the same adapters, through its model
    model = PeftModel.from_pretrained(load(two / "base"), two / "a", adapter_name="a")
    model.load_adapter(two / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "cat", combination_type="cat")
    model.set_adapter("cat")
    ours = PeftModel.from_pretrained(load(two / "base"), tmp_path / "c").eval()
    assert torch.allclose(logits(ours), logits(model.eval()), atol=1e-4)


def test_truncated_sum_is_the_optimal_truncation(two):
    a, b = load_adapter(two / "a"), load_adapter(two / "b")
    c, report = combine([a, b], [1.0, -0.5], FixedRank(4), device="cpu")
    for name, m in c.modules.items():
        ref = sum(w * d for w, d in ((1.0, dense(a, name)), (-0.5, dense(b, name))) if d is not None)
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        assert m.rank == 4 and torch.allclose(m.delta(), best, atol=1e-5 * float(ref.abs().max()))
        rep = next(r for r in report.modules if r.name == name)
        exact_err = float(S[4:].square().sum().sqrt() / S.square().sum().sqrt())
        assert rep.rel_error == pytest.approx(exact_err, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("method,sign", [("ties", "total"), ("ties", "frequency"), ("magnitude-prune", "total")])
def test_sparsifying_methods_equal_peft_merge_utils(two, method, sign):
    a, b = load_adapter(two / "a"), load_adapter(two / "b")
    c, report = combine([a, b], [0.6, 0.9], None, method=method, density=0.3, majority_sign=sign, device="cpu")
    for name, m in c.modules.items():
        deltas = [d.float() for d in (dense(a, name), dense(b, name)) if d is not None]
        ws = torch.tensor([w for w, d in ((0.6, dense(a, name)), (0.9, dense(b, name))) if d is not None])
        ref = merge_utils.ties(deltas, ws, 0.3, sign) if method == "ties" else \
            merge_utils.magnitude_prune(deltas, ws, 0.3)
        assert torch.allclose(m.delta().float(), ref, atol=1e-5 * float(ref.abs().max())), name
        assert next(r for r in report.modules if r.name == name).kept_fraction == pytest.approx(0.3, abs=0.01)


def test_dare_is_seeded_and_density_one_is_the_sum(two, tmp_path):
    args = ["combine", two / "a", two / "b", "--method", "dare-ties", "--density", "0.5", "--rank", "6"]
    assert run(*args, "-o", tmp_path / "x").exit_code == 0 and run(*args, "-o", tmp_path / "y").exit_code == 0
    assert tree_digest(tmp_path / "x") == tree_digest(tmp_path / "y")
    assert run(*args, "--seed", "1", "-o", tmp_path / "z").exit_code == 0
    assert tree_digest(tmp_path / "x") != tree_digest(tmp_path / "z")
    a, b = load_adapter(two / "a"), load_adapter(two / "b")
    full, _ = combine([a, b], None, None, method="dare-linear", density=1.0, device="cpu")
    exact, _ = combine([a, b], None, None, device="cpu")
    for n in exact.modules:
        assert torch.allclose(full.modules[n].delta(), exact.modules[n].delta(), atol=1e-5)
    _, rep = combine([a, b], None, FixedRank(2), method="dare-linear", density=0.25, device="cpu")
    assert all(abs(r.kept_fraction - 0.25) < 0.02 for r in rep.modules)


def test_weight_map_and_subtraction(two):
    a = load_adapter(two / "a")
    zero, _ = combine([a, a], [1.0, -1.0], None, device="cpu")
    assert all(float(m.delta().abs().max()) < 1e-6 for m in zero.modules.values())
    c, _ = combine([a, a], [1.0, 1.0], None, weight_map=[(r"layers\.0\.", 0.0), ("v_proj", 3.0)], device="cpu")
    for name, m in c.modules.items():
        factor = 0.0 if "layers.0." in name else 3.0 if "v_proj" in name else 1.0
        assert torch.allclose(m.delta(), 2 * factor * dense(a, name), atol=1e-6)


def test_loha_and_lora_combine_through_the_module_protocol(tmp_path):
    base = tiny_llama()
    loha = get_peft_model(base, LoHaConfig(r=2, alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in loha.named_parameters():
            if "hada_" in n:
                p.normal_(0, 0.3)
    loha.save_pretrained(tmp_path / "loha")
    tiny_llama().save_pretrained(tmp_path / "base")
    random_lora(load(tmp_path / "base"), tmp_path / "lora", targets=["q_proj"])
    h, lo = load_adapter(tmp_path / "loha"), load_adapter(tmp_path / "lora")
    r = run("combine", tmp_path / "loha", tmp_path / "lora", "--weight", "0.5", "--weight", "2", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    c = load_adapter(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for name, m in c.modules.items():
        assert torch.allclose(m.delta(), 0.5 * dense(h, name) + 2 * dense(lo, name), atol=1e-5)


def test_bad_inputs_are_one_line_and_write_nothing(two, tmp_path):
    pairs = {"model.layers.0.self_attn.q_proj": lora_pair(48, 40, 4)}  # another model's q_proj
    write_peft(tmp_path / "other", pairs, r=4, alpha=4)
    write_peft(tmp_path / "dora", {"model.layers.0.self_attn.q_proj": lora_pair(48, 48, 4)}, r=4, alpha=4,
               extra={"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(48)},
               config={"use_dora": True})
    before = tree_digest(two)
    cases = [
        ([two / "a", tmp_path / "other"], "has ΔW [48, 40] (weight) but an earlier adapter's is [48, 48]"),
        ([two / "a", tmp_path / "dora"], "cannot be combined linearly"),
        ([two / "a", two / "b", "--method", "ties", "--density", "1.5"], "needs a density in (0, 1]"),
        ([two / "a", two / "b", "--density", "0.5"], "--density goes with"),
        ([two / "a", KOHYA_FIXTURE], "different namings"),
    ]
    for args, message in cases:
        r = run("combine", *args, "-o", tmp_path / "out")
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "out").exists()
    r = run("combine", two / "a", two / "b", "--weight", "1", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "1 --weight values for 2 adapters" in r.output
    with pytest.raises(SurgeryError, match="at least two"):
        combine([load_adapter(two / "a")])
    assert tree_digest(two) == before and not (tmp_path / "out").exists()


def test_kohya_and_peft_mix_with_base(two, tmp_path):
    """A kohya file and a PEFT adapter of one model: names resolved against the base's weights."""
    assert run("convert", two / "b", "--to", "kohya", "-o", tmp_path / "b.safetensors").exit_code == 0
    r = run("combine", two / "a", tmp_path / "b.safetensors", "--base", two / "base", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    a, b, c = load_adapter(two / "a"), load_adapter(two / "b"), load_adapter(tmp_path / "c")
    assert set(c.modules) == set(a.modules) | set(b.modules)
    for name, m in c.modules.items():
        ref = sum(d for d in (dense(a, name), dense(b, name)) if d is not None)
        assert torch.allclose(m.delta(), ref, atol=1e-5 * float(ref.abs().max()))


def test_bad_weight_map_and_convert_options_are_one_line(two, tmp_path):
    r = run("combine", two / "a", two / "b", "--weight-map", "(=2", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "--weight-map entry '(=2': bad regex '('" in r.output
    for bad in ("q_proj=x", "q_proj=nan", "q_proj=inf"):  # nan and inf reached the SVD (a 'factor' error line)
        r = run("combine", two / "a", two / "b", "--weight-map", bad, "-o", tmp_path / "out")
        assert r.exit_code == 1 and f"expected REGEX=WEIGHT with a finite weight, got '{bad}'" in r.output
    r = run("convert", two / "a", "--to", "tera", "--energy", "0.9", "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "--energy, --budget and --format go with --to lora" in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def both(d, wa, wb):
    """PEFT running adapters d/a and d/b on d/base at once, each scaled by its weight (lora_B's bias included)."""
    ref = PeftModel.from_pretrained(load(d / "base"), d / "a", adapter_name="a")
    ref.load_adapter(d / "b", adapter_name="b")
    ref.base_model.set_adapter(["a", "b"])
    for mod in ref.modules():
        for name, w in (("a", wa), ("b", wb)):
            if isinstance(getattr(mod, "scaling", None), dict) and name in mod.scaling:
                mod.scaling[name] *= w
    return ref.eval()


def test_loras_on_the_embedding_and_head_carry_peft_s_copy_of_the_base_tables(tmp_path):
    """PEFT saves the base's own embedding / head beside a LoRA on them (save_embedding_layers): the combined
    adapter carries that copy once, and inputs whose copies differ (vocabularies resized apart) are refused."""
    tiny_llama().save_pretrained(tmp_path / "base")
    random_lora(load(tmp_path / "base"), tmp_path / "a", targets=["embed_tokens", "lm_head", "q_proj"], seed=1)
    random_lora(load(tmp_path / "base"), tmp_path / "b", targets=["embed_tokens", "v_proj"], seed=2, r=4)
    r = run("combine", tmp_path / "a", tmp_path / "b", "--weight", "0.5", "--weight", "-1", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    saved = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert {k for k in saved if "base_layer" in k} == {f"base_model.model.{p}.base_layer.weight"
                                                       for p in ("model.embed_tokens", "lm_head")}
    ours = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "c").eval()
    assert torch.allclose(logits(ours), logits(both(tmp_path, 0.5, -1)), atol=1e-4)
    sd = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    sd["base_model.model.model.embed_tokens.base_layer.weight"][-1] += 1  # a new token's row, initialised apart
    save_file(sd, str(tmp_path / "b" / "adapter_model.safetensors"))
    r = run("combine", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "d")
    assert r.exit_code == 1 and "its copy of the base's base_model.model.model.embed_tokens.base_layer.weight " \
        "differs from" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "d").exists()


def test_sum_carries_bias_parts(tmp_path):
    """PEFT's lora_B.bias and LyCORIS's diff_b add to the layer's bias linearly: combined, never dropped."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    random_lora(load(tmp_path / "base"), tmp_path / "a", targets=["q_proj", "v_proj"], seed=1, lora_bias=True)
    random_lora(load(tmp_path / "base"), tmp_path / "b", targets=["q_proj"], seed=2, r=4, lora_alpha=4, lora_bias=True)
    r = run("combine", tmp_path / "a", tmp_path / "b", "--weight", "0.7", "--weight", "0.3", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["lora_bias"] is True
    ours = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "c").eval()
    assert torch.allclose(logits(ours), logits(both(tmp_path, 0.7, 0.3)), atol=1e-4)
    # LyCORIS full modules: diff and diff_b summed, written as a full module again in a kohya file
    g = torch.Generator().manual_seed(3)
    files = []
    for i in range(2):
        sd = {"lora_unet_q.diff": torch.randn(6, 5, generator=g), "lora_unet_q.diff_b": torch.randn(6, generator=g)}
        save_file(sd, str(tmp_path / f"full{i}.safetensors"))
        files.append(sd)
    r = run("combine", tmp_path / "full0.safetensors", tmp_path / "full1.safetensors", "--weight", "2", "--weight",
            "-1", "-o", tmp_path / "f.safetensors")
    assert r.exit_code == 0, r.output
    out = load_file(str(tmp_path / "f.safetensors"))
    assert torch.allclose(out["lora_unet_q.diff_b"], 2 * files[0]["lora_unet_q.diff_b"] - files[1]["lora_unet_q.diff_b"],
                          atol=1e-6)
    assert torch.allclose(out["lora_unet_q.diff"], 2 * files[0]["lora_unet_q.diff"] - files[1]["lora_unet_q.diff"],
                          atol=1e-5)
