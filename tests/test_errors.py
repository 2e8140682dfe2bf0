"""Error paths of the later commands: one `error:` line, exit status 1, nothing written, inputs untouched."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE, lora_pair, tree_digest, write_peft


def _tera_file(tmp_path, mutate):
    r = CliRunner().invoke(main, ["init-tera", str(FIXTURES / "tiny-llama"), "--targets", "q_proj", "-o",
                                  str(tmp_path / "ok.safetensors")])
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "ok.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    mutate(meta, tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    return tmp_path / "bad.safetensors"


def _version(meta, tensors):
    cfg = json.loads(meta["surgery_tera"])
    cfg["format_version"] = "surgery-tera/99"
    meta["surgery_tera"] = json.dumps(cfg)


def _short_lambda(meta, tensors):
    key = next(k for k in tensors if k.endswith(".tera_lambda.0"))
    tensors[key] = tensors[key][:-1].clone()


def _mts_missing(tmp_path):
    B, A = lora_pair(64, 64, 4)
    extra = {"base_model.model.classifier.weight": torch.zeros(3, 64)}
    return write_peft(tmp_path / "mts", {"model.layers.0.self_attn.q_proj": (B, A)}, r=4, alpha=4, extra=extra)


def _tokens(tmp_path):
    B, A = lora_pair(64, 64, 4)
    extra = {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)}
    return write_peft(tmp_path / "tok", {"model.layers.0.self_attn.q_proj": (B, A)}, r=4, alpha=4, extra=extra)


CASES = {
    "capture-no-texts": (lambda p: ["capture", FIXTURES / "tiny-llama", "--texts", p / "none.txt", "-o", p / "out"],
                         "no texts"),
    "capture-not-a-model": (lambda p: ["capture", p, "--texts", FIXTURES / "sentences.txt", "-o", p / "out"],
                            "not a local transformers model"),
    "id-discard": (lambda p: ["id", FIXTURES / "tiny-llama" / "model.safetensors", "--discard", "1.5"], "--discard"),
    "id-not-hidden": (lambda p: ["id", FIXTURES / "kohya-lora-tiny.safetensors"], "not a hidden-state file"),
    "tera-version": (lambda p: ["inspect", _tera_file(p, _version)], "surgery-tera/99"),
    "tera-lambda": (lambda p: ["inspect", _tera_file(p, _short_lambda)], "λ 0 missing or not of shape"),
    "to-lora-rank": (lambda p: ["convert", _tera_file(p, lambda m, t: None), "--to", "lora", "--rank", "0",
                                "-o", p / "out"], "at least 1"),
    "init-tera-regex": (lambda p: ["init-tera", FIXTURES / "tiny-llama", "--targets", "(", "-o", p / "out"],
                        "bad regex"),
    "shard-size": (lambda p: ["merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "-o", p / "out", "--shard-size",
                              "lots"], "shard size"),
    "mts-missing": (lambda p: ["merge", FIXTURES / "tiny-llama", _mts_missing(p), "-o", p / "out"],
                    "replaces a tensor the base does not have"),
    "trainable-tokens": (lambda p: ["merge", FIXTURES / "tiny-llama", _tokens(p), "-o", p / "out"],
                         "trainable tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_paths(tmp_path, case):
    make_args, message = CASES[case]
    args = [str(a) for a in make_args(tmp_path)]
    inputs = {a: tree_digest(Path(a)) for a in args if Path(a).exists()}
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = [l for l in r.output.splitlines() if l.strip() and not l.startswith("wrote")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not (tmp_path / "out").exists()
    assert {a: tree_digest(Path(a)) for a in inputs} == inputs
