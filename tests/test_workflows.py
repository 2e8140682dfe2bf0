"""A new user's workflows end to end from the CLI: the Cont-Squeeze flow on a causal LM whose tokenizer has no pad
token (Llama/Mistral-style) with a PEFT LoRA made on *ForCausalLM; extract's record of which model was the base;
TeRA → LoRA without a rank; rerank's --min-rank warning."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from surgery import load_adapter
from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE
from .test_merge import load, random_lora, tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """tiny Llama with a byte-level BPE tokenizer trained on the fixture sentences: BOS/EOS, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("llm")
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train([str(FIXTURES / "sentences.txt")], trainers.BpeTrainer(vocab_size=128,
                                                                    special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    assert tok.pad_token is None
    tiny_llama().save_pretrained(d / "llm")
    tok.save_pretrained(d / "llm")
    random_lora(load(d / "llm"), d / "lora", targets=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16)
    return d


def test_cont_squeeze_flow_on_a_causal_lm_without_pad_token(causal_lm, tmp_path):
    d = causal_lm
    r = run("capture", d / "llm", "--texts", FIXTURES / "sentences.txt", "--module-inputs", "-o",
            tmp_path / "acts.safetensors", "--max-tokens", "600")
    assert r.exit_code == 0, r.output
    assert "padded with EOS" in r.stderr and "LlamaForCausalLM" in r.stdout and "[transformers]" not in r.output
    names = json.loads(__import__("safetensors").safe_open(str(tmp_path / "acts.safetensors"), "pt").metadata()
                       ["surgery_module_inputs"])["modules"]
    assert "model.layers.0.self_attn.q_proj" in names  # the paths of the adapter's model class
    r = run("squeeze", d / "lora", "--rank", "2", "-o", tmp_path / "small")
    assert r.exit_code == 0, r.output
    r = run("tune", tmp_path / "small", "--teacher", d / "lora", "--activations", tmp_path / "acts.safetensors",
            "-o", tmp_path / "tuned", "--steps", "30", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["modules"]
    assert len(rows) == len(load_adapter(d / "lora").modules) == 6
    assert all(m["after"] <= m["before"] for m in rows) and any(m["after"] < m["before"] for m in rows)
    # hidden states too, and an adapter captured on AutoModel's paths still matches by suffix
    r = run("capture", d / "llm", "--texts", FIXTURES / "sentences.txt", "-o", tmp_path / "h.safetensors",
            "--max-tokens", "300", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pad"] == "eos"


def test_tune_matches_module_paths_by_suffix():
    from surgery.capture import input_key as _match

    inputs = {"layers.0.self_attn.q_proj": 0, "layers.1.self_attn.q_proj": 1}
    assert _match("base_model.model.model.layers.0.self_attn.q_proj", inputs) == "layers.0.self_attn.q_proj"
    assert _match("base_model.model.model.layers.2.self_attn.q_proj", inputs) is None
    assert _match("base_model.model.self_attn.q_proj", inputs) is None  # two candidates: no guess


def test_extract_records_which_model_was_the_base(tmp_path):
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    for args, recorded in (((tmp_path / "tuned", tmp_path / "base"), tmp_path / "base"),
                           ((tmp_path / "base", tmp_path / "tuned"), tmp_path / "tuned")):  # swapped: −ΔW, said
        out = tmp_path / f"x-{recorded.name}"
        r = run("extract", *args, "--rank", "1", "-o", out)
        assert r.exit_code == 0, r.output
        assert f"ΔW = {args[0]} (fine-tuned) − {args[1]} (base)" in r.output
        assert load_adapter(out).config["base_model_name_or_path"] == str(recorded)
    r = run("extract", tmp_path / "tuned", tmp_path / "base", "--rank", "1", "--format", "kohya", "-o",
            tmp_path / "k.safetensors")
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "k.safetensors").metadata["ss_sd_model_name"] == str(tmp_path / "base")


def test_tera_to_lora_without_rank_is_exact(tmp_path):
    r = run("convert", PEFT_FIXTURE, "--to", "tera", "--iters", "5", "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 0, r.output
    r = run("convert", tmp_path / "t.safetensors", "--to", "lora", "-o", tmp_path / "l", "--json")
    assert r.exit_code == 0, r.output
    t, lo = load_adapter(tmp_path / "t.safetensors"), load_adapter(tmp_path / "l")
    for name, m in t.modules.items():  # every direction a float32 computation resolves: exact to float32 rounding
        ref = m.delta(torch.float64)
        err = torch.linalg.norm(lo.modules[name].delta(torch.float64) - ref) / torch.linalg.norm(ref)
        assert err < 1e-4, name  # the dropped σ are below σ₁·max(out, in)·ε_float32 each
    r = run("convert", tmp_path / "t.safetensors", "--to", "kohya", "--rank", "4", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "--rank goes with --to lora" in r.output


def test_rerank_warns_when_min_rank_sets_every_block(tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps({"ids": [3.0, 3.5, 4.0]}))
    r = run("rerank", "--ids", tmp_path / "ids.json", "--min-rank", "4", "--config-out", tmp_path / "c.json",
            "--target-modules", "q_proj")
    assert r.exit_code == 0, r.output
    assert "--min-rank 4 raised every block's GeLoRA rank (from 1, 1)" in r.stderr
    r = run("rerank", "--ids", tmp_path / "ids.json", "--min-rank", "1", "--config-out", tmp_path / "d.json",
            "--target-modules", "q_proj")
    assert r.exit_code == 0 and "raised every block" not in r.stderr
