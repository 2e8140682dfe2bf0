"""Where results go: default names beside the input, the path decides the layout, no input replaced, no existing
output replaced without --force; and the spectrum picture. Through CliRunner and the installed script."""
import builtins
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

from surgery import load_adapter
from surgery_cli.main import main
from surgery_cli.plot import adapter_rank, module_type

from .conftest import KOHYA_FIXTURE, PEFT_FIXTURE, tree_digest

PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def inputs(tmp_path):
    shutil.copytree(PEFT_FIXTURE, tmp_path / "my-lora")
    shutil.copy(KOHYA_FIXTURE, tmp_path / "in.safetensors")
    return tmp_path


@pytest.mark.parametrize("args, name, fmt", [
    (["in.safetensors", "--rank", "4"], "in-r4.safetensors", "kohya"),
    (["my-lora", "--energy", "0.95"], "my-lora-e0.95", "peft"),
    (["my-lora/", "--budget", "10K"], "my-lora-b10K", "peft"),
    (["my-lora", "--rank-map", "mlp=2"], "my-lora-map", "peft"),
    (["my-lora/adapter_model.safetensors", "--rank", "4"], "my-lora-r4", "peft"),
    (["my-lora", "--rank", "4", "--format", "kohya"], "my-lora-r4.safetensors", "kohya"),
])
def test_squeeze_default_names(inputs, monkeypatch, args, name, fmt):
    monkeypatch.chdir(inputs)
    before = {p: tree_digest(inputs / p) for p in ("my-lora", "in.safetensors")}
    r = run("squeeze", *args, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(f"wrote {name}") and load_adapter(inputs / name).format == fmt
    assert {p: tree_digest(inputs / p) for p in before} == before  # inputs byte-identical
    r = run("squeeze", *args, "--device", "cpu")  # the second time the output exists
    assert r.exit_code == 1 and "exists" in r.output and "--force" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert run("squeeze", *args, "--device", "cpu", "--force").exit_code == 0


@pytest.mark.parametrize("src, to, name, fmt", [
    ("my-lora", "kohya", "my-lora-kohya.safetensors", "kohya"),
    ("my-lora", "peft-file", "my-lora-peft.safetensors", "peft-file"),
    ("my-lora", "tera", "my-lora-tera.safetensors", "tera"),
])
def test_convert_default_names(inputs, monkeypatch, src, to, name, fmt):
    monkeypatch.chdir(inputs)
    r = run("convert", src, "--to", to, *(["--iters", "2"] if to == "tera" else []))
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(f"wrote {name}") and load_adapter(inputs / name).format == fmt
    if to == "tera":
        r = run("convert", name, "--to", "lora", "--rank", "4")
        assert r.exit_code == 0, r.output
        assert load_adapter(inputs / "my-lora-tera-lora-r4").format == "peft"


def test_the_path_decides_the_layout(inputs):
    r = run("squeeze", inputs / "my-lora/adapter_model.safetensors", "--rank", "4", "-o", inputs / "small.safetensors")
    assert r.exit_code == 0, r.output
    a = load_adapter(inputs / "small.safetensors")
    assert a.format == "peft-file" and all(m.rank == 4 for m in a.modules.values())
    # its config travels in the file's metadata; the scale is in the factors (alpha = r), as every loader reads it
    assert a.config["lora_alpha"] == a.config["r"] == 4 and a.notes == ()
    r = run("squeeze", inputs / "small.safetensors", "--rank", "2", "-o", inputs / "dir-out")
    assert r.exit_code == 0 and load_adapter(inputs / "dir-out").format == "peft"
    r = run("squeeze", inputs / "in.safetensors", "--rank", "2", "-o", inputs / "k-dir")
    assert r.exit_code == 1 and "PEFT directory" in r.output and not (inputs / "k-dir").exists()


@pytest.mark.parametrize("fmt, out", [("peft", "x.safetensors"), ("kohya", "x-dir"), ("peft-file", "y")])
def test_format_contradicting_the_path(inputs, fmt, out):
    r = run("squeeze", inputs / "my-lora", "--rank", "4", "--format", fmt, "-o", inputs / out)
    assert r.exit_code == 1 and f"--format {fmt}" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (inputs / out).exists()


def test_installed_script_runs_the_design_card_line(inputs):
    exe = shutil.which("surgery")
    if exe is None:
        pytest.skip("the surgery script is not installed")
    p = subprocess.run([exe, "squeeze", "in.safetensors", "--rank", "4"], cwd=inputs, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("wrote in-r4.safetensors") and (inputs / "in-r4.safetensors").exists()
    p = subprocess.run([exe, "squeeze", "in.safetensors", "--rank", "4"], cwd=inputs, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("error: in-r4.safetensors: exists")


def test_spectrum_plot(inputs):
    out = inputs / "spectrum.png"
    r = run("inspect", inputs / "my-lora", "--spectrum", "--plot", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    from PIL import Image  # matplotlib's own dependency

    with Image.open(out) as im:
        assert im.size == (960, 600)
    r = run("inspect", KOHYA_FIXTURE, "--spectrum", "--plot", inputs / "k.png")
    assert r.exit_code == 0 and (inputs / "k.png").read_bytes()[:8] == PNG
    assert run("inspect", KOHYA_FIXTURE, "--plot", inputs / "z.png").exit_code == 2
    # the suffix names the format (PNG bytes went under any name), written the same bytes run after run
    magic = {".svg": b"<?xml", ".pdf": b"%PDF", ".jpg": b"\xff\xd8\xff", "": PNG}  # no suffix: PNG
    for suffix, head in magic.items():
        for i in (1, 2):
            assert run("inspect", KOHYA_FIXTURE, "--spectrum", "--plot", inputs / f"{i}{suffix}").exit_code == 0
        assert (inputs / f"1{suffix}").read_bytes()[:len(head)] == head
        assert (inputs / f"1{suffix}").read_bytes() == (inputs / f"2{suffix}").read_bytes(), suffix
    r = run("inspect", KOHYA_FIXTURE, "--spectrum", "--plot", inputs / "k.eps")
    assert r.exit_code == 1 and "--plot writes png, pdf, svg" in r.output and not (inputs / "k.eps").exists()


def test_spectrum_plot_without_matplotlib(inputs, monkeypatch):
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    r = run("inspect", inputs / "my-lora", "--spectrum", "--plot", inputs / "s.png")
    assert r.exit_code == 1 and "surgery[plot]" in r.output and not (inputs / "s.png").exists()


def test_adapter_rank_and_module_types():
    g = torch.Generator().manual_seed(0)
    spectra = {f"m{i}": torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
               for i, n in enumerate((16, 16, 8, 3))}
    total = sum(float(S.square().sum()) for S in spectra.values())
    for e in (0.5, 0.9, 0.95, 0.99, 1.0):
        brute = next(k for k in range(1, 17)
                     if sum(float(S[:k].square().sum()) for S in spectra.values()) >= e * total * (1 - 1e-12))
        assert adapter_rank(spectra, e) == brute
    assert [module_type(n) for n in (
        "base_model.model.model.layers.0.self_attn.q_proj", "lora_unet_mid_block_attentions_0_to_out_0",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1", "transformer.h.0.attn.c_attn", "lora_unet_x_conv1")] == \
        ["q_proj", "to_out_0", "fc1", "c_attn", "conv1"]
