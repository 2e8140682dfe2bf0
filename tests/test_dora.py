"""DoRA across formats: PEFT's `lora_magnitude_vector` ((out,), convs (1, out, 1, 1)) and LyCORIS's `dora_scale`
((out, 1, …) per output row, (1, in, …) per input column) converted into each other's layout, every direction
checked against the target library's own forward — on a square conv, where reading a magnitude on the wrong axis
still fits the shapes."""
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery_cli.main import main

from .conftest import tree_digest
from .test_hadamard_kron import close

peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
Y = torch.randn(2, 12, 6, 6, generator=torch.Generator().manual_seed(8))


class SquareNet(torch.nn.Module):
    """A linear and a square 3×3 conv (12 → 12 channels)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 24)
        self.conv = torch.nn.Conv2d(12, 12, 3, padding=1)

    def forward(self, x, y):
        return self.fc(x), self.conv(y)


def net(seed=0):
    torch.manual_seed(seed)
    return SquareNet().eval()


def outputs(model):
    with torch.no_grad():
        return [o.double() for o in model(X, Y)]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def randomized(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "magnitude" in n or "dora_scale" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))  # trained away from the base norms
    return model


def lycoris_forward(path, rename=None):
    """The forward of SquareNet with a LyCORIS file applied by LyCORIS itself (names renamed to its own first)."""
    sd = load_file(str(path))
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    model = net()
    lyco, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=sd)
    lyco.apply_to()
    return outputs(model)


@pytest.fixture
def base(tmp_path):
    save_file({k: v.contiguous() for k, v in net().state_dict().items()}, str(tmp_path / "base.safetensors"))
    return tmp_path / "base.safetensors"


def test_peft_dora_to_kohya_loads_in_lycoris_and_back(tmp_path, base):
    model = randomized(get_peft_model(net(), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["fc", "conv"],
                                                        init_lora_weights=False)), 3)
    ref = outputs(model)
    model.save_pretrained(tmp_path / "p")
    r = run("convert", tmp_path / "p", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert r.exit_code == 0, r.output
    k = load_file(str(tmp_path / "k.safetensors"))
    assert k["lora_conv.dora_scale"].shape == (12, 1, 1, 1) and k["lora_fc.dora_scale"].shape == (24, 1)
    assert close(lycoris_forward(tmp_path / "k.safetensors", lambda key: "lycoris_" + key[len("lora_"):]), ref)
    # and back to PEFT (kohya names resolved on the base): PEFT's forward again
    r = run("convert", tmp_path / "k.safetensors", "--to", "peft", "--base", base, "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert close(outputs(PeftModel.from_pretrained(net(), tmp_path / "back")), ref)


def _lycoris_dora(path, on_output=True):
    LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"], "target_name": []})
    model = net()
    lyco = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, algo="locon",
                          dora_wd=True, wd_on_output=on_output)
    lyco.apply_to()
    randomized(lyco, 4)
    lyco.save_weights(str(path), torch.float32, {})
    return outputs(model)


@pytest.mark.parametrize("to", ["peft", "peft-file"])
def test_lycoris_dora_to_peft_equals_lycoris(tmp_path, base, to):
    ref = _lycoris_dora(tmp_path / "l.safetensors")
    out = tmp_path / ("p" if to == "peft" else "p.safetensors")
    r = run("convert", tmp_path / "l.safetensors", "--to", to, "--base", base, "-o", out)
    assert r.exit_code == 0, r.output
    if to == "peft":  # PEFT's own loader: magnitudes in its layout and use_dora set
        assert close(outputs(PeftModel.from_pretrained(net(), out)), ref)
        t = load_file(str(out / "adapter_model.safetensors"))
        assert t["base_model.model.conv.lora_magnitude_vector"].shape == (1, 12, 1, 1)
    else:  # the single file (diffusers' form) is checked through PEFT by the real-loader fixture; its layout here
        t = load_file(str(out))
        assert t["base_model.model.conv.lora_magnitude_vector"].shape == (1, 12, 1, 1)
        assert t["base_model.model.fc.lora_magnitude_vector"].shape == (24,)
    # and a merge of the converted adapter is LyCORIS's forward
    r = run("merge", base, out, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    merged = net()
    merged.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert close(outputs(merged), ref)


def test_per_input_dora_has_no_peft_form(tmp_path, base):
    ref = _lycoris_dora(tmp_path / "l.safetensors", on_output=False)
    before = tree_digest(tmp_path / "l.safetensors")
    r = run("convert", tmp_path / "l.safetensors", "--to", "peft", "--base", base, "-o", tmp_path / "p")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "per input column" in r.output
    assert not (tmp_path / "p").exists() and tree_digest(tmp_path / "l.safetensors") == before
    # kohya → kohya keeps it, in its own (1, in, …) layout (LyCORIS 4.1.3's loader cannot rebuild such a module
    # from a file — it assumes wd_on_output — so its in-memory forward is the reference), and the merge follows it
    r = run("squeeze", tmp_path / "l.safetensors", "--rank", "3", "-o", tmp_path / "s.safetensors")
    assert r.exit_code == 0, r.output
    assert load_file(str(tmp_path / "s.safetensors"))["lycoris_conv.dora_scale"].shape == (1, 12, 1, 1)
    r = run("merge", base, tmp_path / "l.safetensors", "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    merged = net()
    merged.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert close(outputs(merged), ref)


def test_dora_config_must_agree_with_the_tensors(tmp_path):
    model = randomized(get_peft_model(net(), LoraConfig(r=2, use_dora=True, target_modules=["fc", "conv"])), 5)
    model.save_pretrained(tmp_path / "p")
    sd = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    del sd["base_model.model.fc.lora_magnitude_vector"]
    save_file(sd, str(tmp_path / "p" / "adapter_model.safetensors"))
    r = run("inspect", tmp_path / "p")
    assert r.exit_code == 1 and "no lora_magnitude_vector although use_dora is true" in r.output
