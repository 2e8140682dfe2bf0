"""TeRA against dense float64 algebra, the real transformers library, and its own file format."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from surgery import SurgeryError, load_adapter, save_adapter
from surgery.tera import TeraModule
from surgery.tera import (TeRALinear, TeraSpec, adapter_from_model, attach_tera, factorize, fit_lambdas,
                          init_lambdas, shared, tera_delta, to_lora, to_tera)
from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE, dense_truncation, lora_pair, write_peft


def rand_lams(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) + 0.5 for n in spec.modes]


@pytest.mark.parametrize("n,order,want", [(4096, 3, (16, 16, 16)), (11008, 3, (43, 16, 16)), (4099, 3, (4099,)),
                                          (768, 2, (32, 24)), (1, 3, (1,)), (6, 3, (3, 2))])
def test_factorize_table(n, order, want):
    assert factorize(n, order) == want


@given(n=st.integers(1, 50000), order=st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_factorize_properties(n, order):
    f = factorize(n, order)
    assert math.prod(f) == n and len(f) <= order and list(f) == sorted(f, reverse=True)
    # more modes than prime factors: one per prime (--order 10³⁰ allocated a list of that many)
    assert factorize(n, 10**30) == factorize(n, 64) == tuple(sorted(prime_factors(n), reverse=True) or [1])


def prime_factors(n: int) -> list[int]:
    """n's prime factors with multiplicity, by trial division (an independent reference)."""
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@pytest.mark.parametrize("out_f,in_f,R", [(24, 30, 2), (24, 30, 3), (64, 32, 4)])
def test_rank_is_product_of_ranks(out_f, in_f, R):
    spec = TeraSpec.for_shape(out_f, in_f, order=3, core_rank=R)
    core, factors = shared(spec, torch.float64)
    D = tera_delta(rand_lams(spec), core, factors, spec)
    assert torch.linalg.matrix_rank(D).item() == spec.max_rank == min(
        math.prod(spec.ranks[:len(spec.out_modes)]), math.prod(spec.ranks[len(spec.out_modes):]))


def test_fresh_adapter_is_exactly_zero():
    spec = TeraSpec.for_shape(64, 48, core_rank=4)
    core, factors = shared(spec)
    assert torch.count_nonzero(tera_delta(init_lambdas(spec), core, factors, spec)) == 0


def test_shared_factors_regenerate_bit_identically():
    a = shared(TeraSpec.for_shape(64, 48, core_rank=4, seed=3))
    shared.__wrapped__ if hasattr(shared, "__wrapped__") else None
    from surgery.tera import shared_core, shared_factor

    shared_core.cache_clear()
    shared_factor.cache_clear()
    b = shared(TeraSpec.for_shape(64, 48, core_rank=4, seed=3))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    c = shared(TeraSpec.for_shape(64, 48, core_rank=4, seed=4))
    assert not torch.equal(a[0], c[0])


def test_forward_matches_dense_and_trains_only_lambdas():
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 64)
    W0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    spec = TeraSpec.for_shape(64, 48, core_rank=4)
    layer = TeRALinear(base, spec, lambdas=[l.float() for l in rand_lams(spec)])
    x = torch.randn(5, 7, 48)
    core, factors = shared(spec, torch.float64)
    D = tera_delta([l.double() for l in layer.lambdas], core, factors, spec)
    want = x.double() @ (W0.double() + D).T + b0.double()
    assert torch.allclose(layer(x).double(), want, atol=1e-5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [f"lambdas.{i}" for i in range(6)]
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    core_before = layer.core.clone()
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    assert all(l.grad is not None for l in layer.lambdas)
    assert torch.equal(base.weight, W0) and torch.equal(base.bias, b0) and torch.equal(layer.core, core_before)
    assert base.weight.grad is None and not layer.core.requires_grad


def test_fit_recovers_a_tera_target_and_reports_its_error():
    spec = TeraSpec.for_shape(32, 24, core_rank=3)
    core, factors = shared(spec)
    target = tera_delta([l.float() for l in rand_lams(spec, 1)], core, factors, spec)
    lams, err = fit_lambdas(target, spec, iters=300)
    fitted = tera_delta(lams, core, factors, spec)
    measured = float((fitted - target).norm() / target.norm())
    assert err == pytest.approx(measured, abs=1e-6) and err < 1e-3


def test_lora_tera_lora_round_trip_energies(tmp_path):
    B, A = lora_pair(32, 24, 8, seed=2)
    d = write_peft(tmp_path / "l", {"m.q_proj": (B, A)}, r=8, alpha=8)
    lora = load_adapter(d)
    tera, rep = to_tera(lora, core_rank=4, iters=30)
    X = lora.modules["base_model.model.m.q_proj"].delta()
    W = tera.modules["base_model.model.m.q_proj"].delta()
    assert rep[0].rel_error == pytest.approx(float((X - W).norm() / X.norm()), abs=1e-5)
    assert rep[0].energy_kept == pytest.approx(1 - rep[0].rel_error ** 2)
    back, rep2 = to_lora(tera, 5)
    S = torch.linalg.svdvals(W)
    assert rep2[0].energy_kept == pytest.approx(float(S[:5].square().sum() / S.square().sum()), rel=1e-6)
    got = back.modules["base_model.model.m.q_proj"].delta()
    U, S_, Vh = torch.linalg.svd(W)
    assert torch.allclose(got, (U[:, :5] * S_[:5]) @ Vh[:5], atol=1e-5)


def test_file_round_trip_saved_factors_and_errors(tmp_path):
    spec = TeraSpec.for_shape(32, 24, core_rank=3, seed=7)
    lams = tuple(l.float() for l in rand_lams(spec))
    from surgery import Adapter

    a = Adapter(modules={"base_model.model.m.q_proj": TeraModule(lams, spec, 0.5)}, format="tera")
    save_adapter(a, tmp_path / "t.safetensors", save_factors=True)
    back = load_adapter(tmp_path / "t.safetensors")
    m = back.modules["base_model.model.m.q_proj"]
    assert m.spec == spec and m.scale == 0.5 and torch.allclose(m.delta(), a.modules["base_model.model.m.q_proj"].delta())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["surgery_tera"])["format_version"] == "surgery-tera/1"
    # a tampered shared factor is caught
    key = next(k for k in tensors if k.startswith("tera_shared.factor."))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(SurgeryError, match="does not match"):
        load_adapter(tmp_path / "bad.safetensors")
    # λ's without the config
    save_file({k: v for k, v in tensors.items() if "lambda" in k}, str(tmp_path / "noconf.safetensors"))
    with pytest.raises(SurgeryError, match="no 'surgery_tera' config"):
        load_adapter(tmp_path / "noconf.safetensors")


def test_refusals():
    with pytest.raises(SurgeryError, match="GiB"):
        TeraSpec.for_shape(32768, 32768, order=3, core_rank=32)  # core 32⁶ floats = 4 GiB
    eB, eA = lora_pair(10, 50, 4)
    from surgery import Adapter, LoraModule

    a = Adapter(modules={"emb": LoraModule(A=eA, B=eB, scale=1.0, kind="embedding")}, format="peft")
    with pytest.raises(SurgeryError, match="embedding cannot be converted"):
        to_tera(a)


def test_merge_equals_model_with_tera_attached(tmp_path):
    transformers = pytest.importorskip("transformers")
    from surgery.merge import merge

    base = FIXTURES / "tiny-llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    layers = attach_tera(model, r"self_attn\.(q|v)_proj|mlp\.down_proj", core_rank=4, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            for lam in layer.lambdas:
                lam.copy_(torch.randn(lam.shape, generator=g) * 0.5 + 1)
    save_adapter(adapter_from_model(model, str(base)), tmp_path / "t.safetensors")
    merge(base, [load_adapter(tmp_path / "t.safetensors")], tmp_path / "merged", device="cpu")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 256, (2, 9), generator=g)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    # and a model re-attached from the file computes the same
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    attach_tera(fresh, r".", adapter=load_adapter(tmp_path / "t.safetensors"))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-5)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_convert_init_inspect(tmp_path):
    r = run("convert", PEFT_FIXTURE, "--to", "tera", "-o", tmp_path / "t.safetensors", "--core-rank", "4",
            "--iters", "10", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert len(doc["modules"]) == 14 and all(0 <= m["energy_kept"] <= 1 for m in doc["modules"])
    r = run("inspect", tmp_path / "t.safetensors", "--spectrum")
    assert r.exit_code == 0 and "TeRA modules" in r.output and "trainable" in r.output
    r = run("convert", tmp_path / "t.safetensors", "--to", "lora", "--rank", "4", "-o", tmp_path / "l")
    assert r.exit_code == 0 and all(m.rank == 4 for m in load_adapter(tmp_path / "l").modules.values())
    r = run("convert", PEFT_FIXTURE, "--to", "peft-file", "-o", tmp_path / "f.safetensors")
    assert r.exit_code == 0 and load_adapter(tmp_path / "f.safetensors").format == "peft-file"
    r = run("init-tera", FIXTURES / "tiny-llama", "--targets", "q_proj", "-o", tmp_path / "i.safetensors")
    assert r.exit_code == 0 and "2 TeRA modules" in r.output
    fresh = load_adapter(tmp_path / "i.safetensors")
    assert all(float(m.delta().abs().max()) == 0 for m in fresh.modules.values())
    for args, message in ((["convert", PEFT_FIXTURE, "--to", "lora", "--rank", "2", "-o", tmp_path / "x"], "already a LoRA adapter"),
                          (["init-tera", FIXTURES / "tiny-llama", "--targets", "nothing", "-o", tmp_path / "x"], "no 2-D weight")):
        r = run(*args)
        assert r.exit_code == 1 and message in r.output, (args, r.output)
        assert not (tmp_path / "x").exists()
    # squeeze takes a TeRA adapter through its exact LoRA form: the rank-2 truncation of each ΔW
    r = run("squeeze", tmp_path / "t.safetensors", "--rank", "2", "-o", tmp_path / "s")
    assert r.exit_code == 0 and "exact LoRA form" in r.output, r.output
    tera, small = load_adapter(tmp_path / "t.safetensors"), load_adapter(tmp_path / "s")
    for name, m in tera.modules.items():
        torch.testing.assert_close(small.modules[name].delta(), dense_truncation(m.delta(), 2), rtol=1e-4, atol=1e-6)


def test_gpt2_conv1d_weights(tmp_path):
    """GPT-2 stores its Conv1D weights (in, out). init-tera took the stored shape for (out, in), and LoRA ↔ TeRA
    dropped fan_in_fan_out: a TeRA module of c_proj (square) merged its ΔW untransposed, silently. Now init-tera
    reads (out, in) and states fan_in_fan_out as PEFT does, and both conversions keep it: our merge of the TeRA
    file equals PeftModel's merge_and_unload of its exact LoRA, and of a fan_in_fan_out LoRA's TeRA fit."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from surgery.merge import merge

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    targets = r"attn\.c_(attn|proj)"
    r = run("init-tera", tmp_path / "gpt2", "--targets", targets, "--core-rank", 4, "-o", tmp_path / "t0.safetensors")
    assert r.exit_code == 0, r.output
    fresh = load_adapter(tmp_path / "t0.safetensors")
    assert fresh.config["fan_in_fan_out"] is True
    assert fresh.modules["base_model.model.transformer.h.0.attn.c_attn"].shape == (96, 32)  # (out, in)
    g = torch.Generator().manual_seed(1)
    lams = {n: [torch.randn(k, generator=g) * 0.3 + 1 for k in m.spec.modes] for n, m in fresh.modules.items()}
    trained = fresh.with_modules({n: TeraModule(lams[n], m.spec, m.scale) for n, m in fresh.modules.items()})
    save_adapter(trained, tmp_path / "t.safetensors")
    assert run("convert", tmp_path / "t.safetensors", "--to", "lora", "-o", tmp_path / "lora").exit_code == 0

    def peft_merged(adapter_dir):
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
        return peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()

    want = peft_merged(tmp_path / "lora")
    # exactly the TeRA's modules (target_modules `c_proj` also meant mlp.c_proj: PEFT put a LoRA layer there too)
    wrapped = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                                             tmp_path / "lora")
    assert {n for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)} == set(fresh.modules)
    merge(tmp_path / "gpt2", [load_adapter(tmp_path / "t.safetensors")], tmp_path / "m", device="cpu")
    got = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(tmp_path / "gpt2" / "model.safetensors")
    changed = [k for k in got if "attn.c_" in k and k.endswith(".weight")]

    def check(got, want):  # ΔW's float32 rounding apart (a transposed ΔW is off by its own size)
        assert len(changed) == 4
        for k in changed:
            delta = (got[k] - base[k]).norm()
            assert delta > 0.1 and (got[k] - want[k]).norm() <= 1e-5 * delta, k

    check(got, want)
    # a fan_in_fan_out LoRA → TeRA keeps the flag: its merge equals PEFT's merge of the TeRA's own exact LoRA
    r = run("convert", tmp_path / "lora", "--to", "tera", "--core-rank", 4, "-o", tmp_path / "fit.safetensors")
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "fit.safetensors").config["fan_in_fan_out"] is True
    assert run("convert", tmp_path / "fit.safetensors", "--to", "lora", "-o", tmp_path / "fit-lora").exit_code == 0
    merge(tmp_path / "gpt2", [load_adapter(tmp_path / "fit.safetensors")], tmp_path / "m2", device="cpu")
    check(load_file(tmp_path / "m2" / "model.safetensors"), peft_merged(tmp_path / "fit-lora"))
    # one adapter states one fan_in_fan_out: Conv1D and Linear weights together are refused
    r = run("init-tera", tmp_path / "gpt2", "--targets", "c_attn|wte", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 1 and "matches Conv1D weights, stored (in, out)" in r.output
