"""Same input and seed, same bytes out, whatever the thread count: every seeded command run in a fresh process under
OMP_NUM_THREADS / MKL_NUM_THREADS 1 and 2, outputs compared byte for byte."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from .conftest import FIXTURES, KOHYA_FIXTURE, PEFT_FIXTURE
from .test_merge import tiny_llama

pytestmark = [pytest.mark.no_real_load,  # byte comparisons; the files are checked by the loaders elsewhere
              pytest.mark.slow]  # two whole processes per command


def _conv_kohya(path, seed):
    """A kohya LoCon with 3×3 convs and linears (the shapes whose dense SVDs once followed the thread count)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for j in range(3):
        sd[f"lora_unet_c{j}.lora_down.weight"] = torch.randn(4, 32, 3, 3, generator=g)
        sd[f"lora_unet_c{j}.lora_up.weight"] = torch.randn(48, 4, 1, 1, generator=g)
        sd[f"lora_unet_c{j}.alpha"] = torch.tensor(2.0)
        sd[f"lora_unet_l{j}.lora_down.weight"] = torch.randn(4, 64, generator=g)
        sd[f"lora_unet_l{j}.lora_up.weight"] = torch.randn(96, 4, generator=g)
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, minilm):
    d = tmp_path_factory.mktemp("det")
    _conv_kohya(d / "k0.safetensors", 0)
    _conv_kohya(d / "k1.safetensors", 1)
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    base.save_pretrained(d / "base")
    tuned.save_pretrained(d / "tuned")
    return d, minilm


def _run(args, threads: int, cwd) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "surgery_cli.main", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr


COMMANDS = {  # name → (arguments with {d} the inputs folder and {o} the output, output suffix)
    "squeeze-rsvd": (["squeeze", KOHYA_FIXTURE, "--rank", "3", "--method", "rsvd", "--seed", "5", "--device", "cpu"],
                     ".safetensors"),
    "combine-dare-ties": (["combine", "{d}/k0.safetensors", "{d}/k1.safetensors", "--method", "dare-ties",
                           "--density", "0.5", "--seed", "5", "--device", "cpu"], ".safetensors"),
    "combine-ties": (["combine", "{d}/k0.safetensors", "{d}/k1.safetensors", "--method", "ties", "--density", "0.5",
                      "--rank", "3", "--device", "cpu"], ".safetensors"),
    "extract": (["extract", "{d}/tuned", "{d}/base", "--rank", "4", "--seed", "5", "--device", "cpu"], ".safetensors"),
    "to-tera": (["convert", PEFT_FIXTURE, "--to", "tera", "--seed", "5", "--iters", "5"], ".safetensors"),
    "init-tera": (["init-tera", "{d}/base", "--targets", "q_proj", "--seed", "5"], ".safetensors"),
    "capture": (["capture", "{m}", "--texts", FIXTURES / "sentences.txt", "--max-tokens", "300", "--seed", "5",
                 "--device", "cpu"], ".safetensors"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_same_bytes_with_one_and_two_threads(inputs, name, tmp_path):
    d, minilm = inputs
    args, suffix = COMMANDS[name]
    outs = []
    for threads in (1, 2):
        out = tmp_path / f"out{threads}{suffix}"
        _run([str(a).format(d=d, m=minilm) for a in args] + ["-o", out], threads, tmp_path)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1], f"{name}: outputs differ between 1 and 2 threads"
