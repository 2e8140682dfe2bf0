"""LoHa, LoKr and Tucker convs: the exact SVDs against float64 dense ones (hypothesis), and every operation
against the real PEFT (LoHaConfig / LoKrConfig, convert_to_lora) and lycoris-lora (create_lycoris) forwards."""
import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from surgery import Exact, SurgeryError, load_adapter, save_adapter, squeeze
from surgery.hadamard_kron import factor_svd, hadamard_lora, kron_svd, tucker_pair
from surgery.merge import base_shapes, merge
from surgery_cli.main import main

from .conftest import tree_digest

peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402


def dense_svals(M):
    return torch.linalg.svdvals(M.double())


# ---------------------------------------------------------------- the mathematics (float64 dense references)

dims = st.integers(1, 7)


@settings(max_examples=40, deadline=None)
@given(dims, dims, st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_face_splitting_lora_is_the_hadamard_product(out_f, in_f, r1, r2, seed):
    g = torch.Generator().manual_seed(seed)
    B1, A1, B2, A2 = (torch.randn(s, generator=g, dtype=torch.float64)
                      for s in ((out_f, r1), (r1, in_f), (out_f, r2), (r2, in_f)))
    B, A = hadamard_lora(B1, A1, B2, A2)
    assert B.shape == (out_f, r1 * r2) and A.shape == (r1 * r2, in_f)
    assert torch.allclose(B @ A, (B1 @ A1) * (B2 @ A2), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(dims, dims, dims, dims, st.integers(1, 3), st.booleans(), st.integers(0, 2**16))
def test_kronecker_svd_equals_the_dense_svd(l, m, k, n, r, decomposed, seed):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(l, m, generator=g, dtype=torch.float64)
    B2, A2 = torch.randn(k, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    f2 = factor_svd(B2, A2) if decomposed else factor_svd(B2 @ A2)
    K = torch.kron(W1, B2 @ A2)
    U, S, Vh = kron_svd(factor_svd(W1), f2)
    ref, tol = dense_svals(K), 1e-10 * max(1.0, float(dense_svals(K)[0]))
    c = min(len(S), len(ref))  # the shorter spectrum is the other's leading part; the rest is zero
    assert torch.allclose(S[:c], ref[:c], atol=tol)
    assert float(torch.cat([S[c:], ref[c:]]).abs().sum()) <= tol * 10
    assert torch.allclose((U * S) @ Vh, K, atol=tol)
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-10)
    kk = min(2, len(S))  # the k leading directions alone are the best rank-k approximation
    U2, S2, Vh2 = kron_svd(factor_svd(W1), f2, k=kk)
    Ud, Sd, Vhd = torch.linalg.svd(K, full_matrices=False)
    err = torch.linalg.matrix_norm(K - (U2 * S2[:kk]) @ Vh2)
    assert err == pytest.approx(float(Sd[kk:].square().sum().sqrt()), abs=10 * tol)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), dims, dims, st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_tucker_pair_is_lycoris_rebuild(r, r2, out_f, in_f, kh, kw, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(r, r2, kh, kw, generator=g, dtype=torch.float64)
    up, down = torch.randn(r, out_f, generator=g, dtype=torch.float64), torch.randn(r2, in_f, generator=g, dtype=torch.float64)
    B, A = tucker_pair(t, up, down)
    ref = torch.einsum("i j ..., j r, i p -> p r ...", t, down, up)  # lycoris.functional.general.rebuild_tucker
    assert torch.allclose((B @ A).reshape(ref.shape), ref, atol=1e-12)


# ---------------------------------------------------------------- PEFT's LoHa / LoKr


class Net(torch.nn.Module):
    """A linear, a 3×3 conv and a 1×1 conv: every layer kind LoHa/LoKr have."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 96)
        self.conv = torch.nn.Conv2d(32, 48, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(48, 16, 1)

    def forward(self, x, y):
        return self.fc(x), self.conv1(self.conv(y))


X, Y = torch.randn(5, 64, generator=torch.Generator().manual_seed(7)), torch.randn(
    2, 32, 6, 6, generator=torch.Generator().manual_seed(8))


def base_net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def outputs(net):
    with torch.no_grad():
        return [o.double() for o in net(X, Y)]


def close(a, b, tol=2e-5):
    return all(torch.allclose(x, y, atol=tol * max(1.0, float(y.abs().max()))) for x, y in zip(a, b))


def randomize(model, names, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_base(net, path):
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def load_merged(path):
    net = Net().eval()
    net.load_state_dict(load_file(str(path)), strict=True)
    return net


PEFT_CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["fc", "conv", "conv1"]),
    "loha-effective": lambda: LoHaConfig(r=4, alpha=6, target_modules=["fc", "conv", "conv1"], use_effective_conv2d=True),
    "lokr": lambda: LoKrConfig(r=4, alpha=3, target_modules=["fc", "conv", "conv1"]),
    "lokr-both": lambda: LoKrConfig(r=2, alpha=3, target_modules=["fc", "conv", "conv1"], decompose_both=True,
                                    decompose_factor=4),
    "lokr-effective": lambda: LoKrConfig(r=2, alpha=5, target_modules=["fc", "conv", "conv1"],
                                         use_effective_conv2d=True, decompose_factor=2),
}


@pytest.fixture(params=sorted(PEFT_CONFIGS))
def peft_adapter(request, tmp_path):
    model = get_peft_model(base_net(), PEFT_CONFIGS[request.param]())
    randomize(model, ("hada_", "lokr_"))
    model.save_pretrained(tmp_path / "adapter")
    save_base(base_net(), tmp_path / "base.safetensors")
    return request.param, tmp_path, outputs(model.eval())


def test_peft_adapter_reads_merges_and_converts_exactly(peft_adapter):
    name, d, ref = peft_adapter
    a = load_adapter(d / "adapter")
    assert {m.algo for m in a.modules.values()} == {name.split("-")[0]}
    if name.endswith("effective"):
        assert any("t1" in m.tensors or "t2" in m.tensors for m in a.modules.values())
    # merge equals PEFT's forward with the adapter attached
    merge(d / "base.safetensors", [a], d / "merged.safetensors", device="cpu")
    assert close(outputs(load_merged(d / "merged.safetensors")), ref)
    # the exact LoRA (no rule) loads in PEFT as a LoRA and reproduces the forward
    lora, report = squeeze(a, Exact(), device="cpu", shapes=base_shapes(a, d / "base.safetensors"))
    assert all(r.rel_error < 1e-6 for r in report.modules) and any("became LoRA" in w for w in report.warnings)
    save_adapter(lora, d / "lora")
    cfg = json.loads((d / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "alpha" not in cfg and cfg["target_modules"]
    assert close(outputs(PeftModel.from_pretrained(base_net(), d / "lora").eval()), ref)
    # the lossless layout round trip keeps the kind and loads in PEFT with the same forward
    save_adapter(a, d / "again")
    assert json.loads((d / "again" / "adapter_config.json").read_text())["peft_type"] == name.split("-")[0].upper()
    assert close(outputs(PeftModel.from_pretrained(base_net(), d / "again").eval()), ref)


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_rank_k_equals_peft_convert_to_lora(tmp_path, name):
    """`--rank k` = PEFT's convert_to_lora(model, k) (dense ΔW + full SVD there, linear layers only)."""
    from peft import convert_to_lora

    cfg = PEFT_CONFIGS[name]()
    cfg.target_modules = {"fc"}
    model = get_peft_model(base_net(), cfg)
    randomize(model, ("hada_", "lokr_"))
    model.save_pretrained(tmp_path / "adapter")
    lora_cfg, state = convert_to_lora(model, 3)
    B, A = state["base_model.model.fc.lora_B.weight"].double(), state["base_model.model.fc.lora_A.weight"].double()
    r = CliRunner().invoke(main, ["squeeze", str(tmp_path / "adapter"), "--rank", "3", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    ours = load_adapter(tmp_path / "s").modules["base_model.model.fc"].delta()
    assert torch.allclose(ours, B @ A * lora_cfg.lora_alpha / lora_cfg.r, atol=1e-5 * float(ours.abs().max()))


def test_peft_lokr_to_lycoris_layout_loads_in_lycoris(tmp_path):
    model = get_peft_model(base_net(), PEFT_CONFIGS["lokr"]())
    randomize(model, ("lokr_",))
    model.save_pretrained(tmp_path / "adapter")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "adapter"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert r.exit_code == 0, r.output
    sd = {k.replace("lora_", "lycoris_", 1): v for k, v in load_file(str(tmp_path / "k.safetensors")).items()}
    assert any(k.endswith(".lokr_w1") for k in sd) and not any("lora_down" in k for k in sd)
    net = base_net()
    lyco, _ = create_lycoris_from_weights(1.0, "", net, weights_sd=sd)
    lyco.apply_to()
    assert close(outputs(net), outputs(model.eval()))


# ---------------------------------------------------------------- LyCORIS files


LYCORIS = {
    "locon": dict(algo="locon"), "locon-tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"), "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4), "lokr-tucker-both": dict(algo="lokr", factor=4, use_tucker=True,
                                                                  decompose_both=True),
    "lokr-full": dict(algo="lokr", factor=8, full_matrix=True),
    "loha-dora": dict(algo="loha", dora_wd=True), "lokr-dora-in": dict(algo="lokr", factor=4, dora_wd=True,
                                                                     wd_on_output=False),
    "locon-dora": dict(algo="locon", dora_wd=True),
}


def lycoris_file(path, kw, dtype=torch.float32):
    """A trained-looking LyCORIS network on Net (random factors), saved as LyCORIS saves; its forward outputs."""
    net = base_net()
    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"], "target_name": []})
    lyco = create_lycoris(net, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, **kw)
    lyco.apply_to()
    randomize(lyco, ("",), seed=2, std=0.2)
    if kw.get("dora_wd"):  # dora_scale: the base norms, perturbed
        with torch.no_grad():
            for mod in lyco.loras:
                mod.dora_scale.mul_(1.1)
    lyco.save_weights(str(path), dtype, {})
    return outputs(net), lyco


@pytest.mark.parametrize("name", sorted(LYCORIS))
def test_lycoris_merge_and_lora_equal_its_forward(tmp_path, name):
    ref, _ = lycoris_file(tmp_path / "x.safetensors", LYCORIS[name])
    save_base(base_net(), tmp_path / "base.safetensors")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "x.safetensors"),
                                  "-o", str(tmp_path / "m.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert close(outputs(load_merged(tmp_path / "m.safetensors")), ref)
    if "dora" in name:
        return  # a DoRA's LoRA form is exact only as ΔW; its magnitude normalises W + ΔW (checked by the merge)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "x.safetensors"), "--to", "lora", "--base",
                                  str(tmp_path / "base.safetensors"), "-o", str(tmp_path / "l.safetensors"), "--json"])
    if name.startswith("locon"):
        assert r.exit_code == 1 and "already a LoRA adapter" in r.output
        return
    assert r.exit_code == 0, r.output
    assert all(m["rel_error"] < 1e-6 for m in json.loads(r.stdout)["modules"])
    sd = load_file(str(tmp_path / "l.safetensors"))
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    net = base_net()  # the converted LoRA, loaded by LyCORIS as a plain LoCon, reproduces the original forward
    lyco, _ = create_lycoris_from_weights(1.0, "", net, weights_sd=sd)
    lyco.apply_to()
    assert close(outputs(net), ref)


@pytest.mark.parametrize("name", ["locon", "locon-tucker", "loha"])
def test_alpha_zero_means_alpha_r_as_lycoris_reads_it_with_a_note(tmp_path, name):
    """`.alpha` 0 is alpha = r for kohya and LyCORIS, scale 0 for ComfyUI and diffusers: read as LyCORIS does, and
    said once on stderr; a file with real alphas gets no such note."""
    lycoris_file(tmp_path / "x.safetensors", LYCORIS[name])
    sd = load_file(str(tmp_path / "x.safetensors"))
    save_file({k: torch.zeros_like(v) if k.endswith(".alpha") else v for k, v in sd.items()},
              str(tmp_path / "z.safetensors"))
    net = base_net()
    lyco, _ = create_lycoris_from_weights(1.0, "", net, weights_sd=load_file(str(tmp_path / "z.safetensors")))
    lyco.apply_to()
    save_base(base_net(), tmp_path / "base.safetensors")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "z.safetensors"),
                                  "-o", str(tmp_path / "m.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert close(outputs(load_merged(tmp_path / "m.safetensors")), outputs(net))
    assert r.stderr.count("note: z.safetensors: alpha 0 in lycoris_conv and 2 more, read as alpha = r") == 1
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 0 and "alpha 0" not in r.output


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_scale_zero_is_written_as_zero_factors_not_alpha_zero(tmp_path, kind):
    """A PEFT adapter with alpha 0 does nothing; its kohya/LyCORIS file must do nothing in every loader, so it may
    not hold `.alpha` 0 (alpha = r to LyCORIS): zero factors with alpha = r. Checked through LyCORIS's loader."""
    cfg = (LoraConfig(r=4, lora_alpha=0, target_modules=["fc", "conv", "conv1"]) if kind == "lora" else
           LoHaConfig(r=4, alpha=0, target_modules=["fc", "conv", "conv1"]))
    model = get_peft_model(base_net(), cfg)
    randomize(model, ("lora_", "hada_"))
    model.save_pretrained(tmp_path / "adapter")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "adapter"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert r.exit_code == 0, r.output
    sd = load_file(str(tmp_path / "k.safetensors"))
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {4.0}
    assert all(float(m.delta().abs().max()) == 0 for m in load_adapter(tmp_path / "k.safetensors").modules.values())
    net = base_net()
    lyco, _ = create_lycoris_from_weights(1.0, "", net, weights_sd={k.replace("lora_", "lycoris_", 1): v
                                                                     for k, v in sd.items()})
    lyco.apply_to()
    assert len(lyco.loras) == 3 and close(outputs(net), outputs(base_net()))


def test_loha_merge_follows_the_forward_not_lycoris_merge_to(tmp_path):
    """lycoris-lora 4.1.3's LoHa merge_to applies alpha/r twice; our merge (and ComfyUI) follow its forward."""
    ref, lyco = lycoris_file(tmp_path / "x.safetensors", LYCORIS["loha"])
    save_base(base_net(), tmp_path / "base.safetensors")
    merge(tmp_path / "base.safetensors", [load_adapter(tmp_path / "x.safetensors")], tmp_path / "m.safetensors",
          device="cpu")
    assert close(outputs(load_merged(tmp_path / "m.safetensors")), ref)
    mod = next(m for m in lyco.loras if m.lora_name == "lycoris_fc")
    twice = mod.get_diff_weight(shape=mod.shape)[0].double()
    once = load_adapter(tmp_path / "x.safetensors").modules["lycoris_fc"].delta()
    assert mod.scale == 0.5 and torch.allclose(twice, once * mod.scale, atol=1e-6)


def test_lycoris_squeeze_bf16_and_mixed_file(tmp_path):
    """A file mixing LoCon, LoHa, LoKr and full diff modules (as LyCORIS presets and its extractor write), bf16."""
    parts = {}
    for name, keep in (("locon-tucker", "lycoris_conv."), ("loha", "lycoris_fc."), ("lokr", "lycoris_conv1.")):
        lycoris_file(tmp_path / f"{name}.safetensors", LYCORIS[name], torch.bfloat16)
        parts.update({k: v for k, v in load_file(str(tmp_path / f"{name}.safetensors")).items() if k.startswith(keep)})
    parts["lycoris_extra.diff"] = torch.randn(8, 6).to(torch.bfloat16)
    save_file(parts, str(tmp_path / "mixed.safetensors"))
    before = tree_digest(tmp_path / "mixed.safetensors")
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "mixed.safetensors"), "--json", "--spectrum"])
    assert r.exit_code == 0, r.output
    doc = {m["name"]: m for m in json.loads(r.stdout)["modules"]}
    assert {n: m["type"] for n, m in doc.items()} == {"lycoris_conv": "lora", "lycoris_fc": "loha",
                                                       "lycoris_conv1": "lokr", "lycoris_extra": "diff"}
    assert doc["lycoris_fc"]["factors"] == {"w1_a": [96, 4], "w1_b": [4, 64], "w2_a": [96, 4], "w2_b": [4, 64]}
    assert doc["lycoris_fc"]["rank"] == 16 and doc["lycoris_fc"]["numerical_rank"] == 16
    assert doc["lycoris_extra"]["numerical_rank"] == 6 and doc["lycoris_conv1"]["weight_shape"] == [16, 48]
    a = load_adapter(tmp_path / "mixed.safetensors")
    for n, m in a.modules.items():  # exact singular values, no dense ΔW, against the dense float64 SVD
        ref = dense_svals(m.delta())
        got = torch.tensor(doc[n]["singular_values"], dtype=torch.float64)[: len(ref)]
        assert torch.allclose(got, ref[: len(got)], atol=1e-5 * float(ref[0]))
    r = CliRunner().invoke(main, ["squeeze", str(tmp_path / "mixed.safetensors"), "--rank", "4", "--json",
                                  "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    small = load_adapter(tmp_path / "s.safetensors")
    assert {m.algo for m in small.modules.values()} == {"lora"} and {m.rank for m in small.modules.values()} == {4}
    assert all(m.dtype == torch.bfloat16 for m in small.modules.values())
    for n, m in a.modules.items():  # the optimal rank-4 truncation of each (rounded once to bf16)
        U, S, Vh = torch.linalg.svd(m.delta(), full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        assert torch.linalg.matrix_norm(small.modules[n].delta() - best) <= 2e-2 * torch.linalg.matrix_norm(best)
    assert tree_digest(tmp_path / "mixed.safetensors") == before


def test_bad_lokr_merge_and_writes_are_one_line(tmp_path):
    lycoris_file(tmp_path / "x.safetensors", LYCORIS["lokr"])
    save_file({"fc.weight": torch.randn(96, 60), "conv.weight": torch.randn(48, 32, 3, 3),
               "conv1.weight": torch.randn(16, 48, 1, 1)}, str(tmp_path / "base.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "x.safetensors"),
                                  "-o", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 1 and "module lycoris_fc (lokr) has ΔW of shape [96, 64] but base tensor fc.weight of " \
                                f"{tmp_path / 'base.safetensors'} has shape [96, 60]" in r.output and not (tmp_path / "m.safetensors").exists()
    a = load_adapter(tmp_path / "x.safetensors")
    with pytest.raises(SurgeryError, match="cannot convert kohya to peft without the base model"):
        save_adapter(a, tmp_path / "p", format="peft")
    from surgery.adapter import LoraModule

    loha = load_adapter(_peft_loha(tmp_path))
    mixed = loha.with_modules(dict(loha.modules) | {"base_model.model.q": LoraModule(torch.randn(2, 4),
                                                                                      torch.randn(3, 2), 1.0)})
    with pytest.raises(SurgeryError, match="a PEFT adapter holds one algorithm; this one has loha, lora modules"):
        save_adapter(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


def _peft_loha(tmp_path):
    model = get_peft_model(base_net(), PEFT_CONFIGS["loha"]())
    randomize(model, ("hada_",))
    model.save_pretrained(tmp_path / "loha")
    return tmp_path / "loha"


def test_unknown_peft_type_is_named(tmp_path):
    d = _peft_loha(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "OFT"}))
    with pytest.raises(SurgeryError, match="peft_type 'OFT' is not read by surgery"):
        load_adapter(d)


def test_full_diff_has_no_peft_form(tmp_path):
    save_file({"lycoris_fc.diff": torch.randn(8, 6)}, str(tmp_path / "d.safetensors"))
    a = load_adapter(tmp_path / "d.safetensors")
    renamed = a.with_modules({"base_model.model.fc": a.modules["lycoris_fc"]}, format="peft")
    with pytest.raises(SurgeryError, match="PEFT has no form for a diff module"):
        save_adapter(renamed, tmp_path / "p.safetensors", format="peft-file")
    assert not (tmp_path / "p.safetensors").exists()
