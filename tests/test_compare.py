"""`surgery compare`: KL, top-1 agreement and perplexities of the bundled tiny Llama with two adapters (or one and
the base), equal to the same quantities computed from PeftModel's float64 logits."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE, lora_pair, small_vocab_model, write_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
MODEL = FIXTURES / "tiny-llama"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def peft_logprobs(adapter, texts):
    """[(targets, log p (T, V))] per text from PeftModel in float64 (None: the base model alone)."""
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float64).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).double().eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"][:, :40]
            out.append((ids[0, 1:], torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)))
    return out


def reference(a, b, texts) -> dict:
    per = []
    for (t, la), (_, lb) in zip(peft_logprobs(a, texts), peft_logprobs(b, texts)):
        per.append({"tokens": t.numel(), "kl": float((la.exp() * (la - lb)).sum(-1).mean()),
                    "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
                    "perplexity_a": math.exp(float(-la.gather(-1, t[:, None]).mean())),
                    "perplexity_b": math.exp(float(-lb.gather(-1, t[:, None]).mean()))})
    n = sum(p["tokens"] for p in per)
    mean = lambda k: sum(p[k] * p["tokens"] for p in per) / n  # noqa: E731
    return {"per": per, "tokens": n, "kl": mean("kl"), "top1_agreement": mean("top1_agreement"),
            "perplexity_a": math.exp(sum(math.log(p["perplexity_a"]) * p["tokens"] for p in per) / n),
            "perplexity_b": math.exp(sum(math.log(p["perplexity_b"]) * p["tokens"] for p in per) / n)}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    lines = [line for line in (FIXTURES / "sentences.txt").read_text().splitlines() if line.strip()][:6]
    path = tmp_path_factory.mktemp("texts") / "t.txt"
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # an empty line is skipped
    return path, lines


def check(doc, ref):
    for key in ("kl", "top1_agreement", "perplexity_a", "perplexity_b"):
        assert doc[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert doc["tokens"] == ref["tokens"]
    for mine, theirs in zip(doc["texts"], ref["per"]):
        for key in theirs:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key


def test_two_adapters_and_the_base_equal_peft_in_float64(texts, tmp_path):
    path, lines = texts
    squeezed = tmp_path / "r2"
    assert run("squeeze", PEFT_FIXTURE, "--rank", 2, "-o", squeezed).exit_code == 0
    r = run("compare", MODEL, PEFT_FIXTURE, squeezed, "--texts", path, "--dtype", "float64", "--max-tokens", 40,
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    check(doc, reference(PEFT_FIXTURE, squeezed, lines))
    assert doc["kl"] > 1e-4 and len(doc["texts"]) == 6 and [t["text"] for t in doc["texts"]] == list(range(6))
    assert all(len(t["kl_by_position"]) == t["tokens"] for t in doc["texts"])
    # B omitted: against the base model alone
    r = run("compare", MODEL, PEFT_FIXTURE, "--texts", path, "--dtype", "float64", "--max-tokens", 40,
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    check(json.loads(r.stdout), reference(PEFT_FIXTURE, None, lines))


def test_an_adapter_against_itself_and_the_table(texts, tmp_path):
    path, _ = texts
    r = run("compare", MODEL, PEFT_FIXTURE, PEFT_FIXTURE, "--texts", path, "--device", "cpu", "--json")
    doc = json.loads(r.stdout)
    assert doc["kl"] == pytest.approx(0, abs=1e-12) and doc["top1_agreement"] == 1.0
    assert doc["perplexity_a"] == doc["perplexity_b"]
    r = run("compare", MODEL, PEFT_FIXTURE, "--texts", path, "--device", "cpu", "--dtype", "bfloat16")
    assert r.exit_code == 0 and "top-1 agreement" in r.output and "the base alone" in r.output


def test_plot(texts, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = texts
    r = run("compare", MODEL, PEFT_FIXTURE, "--texts", path, "--device", "cpu", "--plot", tmp_path / "kl.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "kl.png").read_bytes().startswith(b"\x89PNG")


def test_bad_inputs_one_line(texts, tmp_path):
    path, _ = texts
    (tmp_path / "empty.txt").write_text("\n\n")
    wrong = write_peft(tmp_path / "wrong", {"model.layers.0.self_attn.q_proj": lora_pair(32, 64, 4)}, r=4, alpha=4)
    small = small_vocab_model(tmp_path / "small-vocab")  # another model's tokenizer: ids past the table
    other = write_peft(tmp_path / "other", {"model.layers.7.self_attn.q_proj": lora_pair(64, 64, 4)}, r=4, alpha=4)
    for args, msg in [
        ((small, PEFT_FIXTURE, "--texts", path), "its tokenizer gives token id"),
        ((MODEL, PEFT_FIXTURE, "--texts", tmp_path / "empty.txt"), "no texts"),
        ((MODEL, wrong, "--texts", path), "shape"),
        # compare has no --allow-missing: the line names the commands that have it
        ((MODEL, other, "--texts", path), "layers.7.self_attn.q_proj (no base tensor of that name) (merge and convert"),
        ((MODEL, PEFT_FIXTURE, "--texts", path, "--max-tokens", 1), "at least 2"),
        ((FIXTURES / "peft-lora-tiny-llama", PEFT_FIXTURE, "--texts", path), "peft-lora-tiny-llama"),
    ]:
        r = run("compare", *args, "--device", "cpu")
        assert r.exit_code == 1 and r.output.startswith("error:") and msg in r.output, r.output
        assert r.output.count("\n") == 1, r.output


ARCHITECTURES = {  # tiny configs with a 24-row position table (RoBERTa/XLM-R: 26 past the padding index)
    "GPT2LMHeadModel": ("GPT2Config", dict(n_positions=24, n_embd=32, n_layer=1, n_head=2)),
    "BertModel": ("BertConfig", dict(max_position_embeddings=24)),
    "RobertaModel": ("RobertaConfig", dict(max_position_embeddings=26, pad_token_id=1)),
    "OPTForCausalLM": ("OPTConfig", dict(max_position_embeddings=24, ffn_dim=64, word_embed_proj_dim=32)),
    "BioGptForCausalLM": ("BioGptConfig", dict(max_position_embeddings=24)),
    "CLIPTextModel": ("CLIPTextConfig", dict(max_position_embeddings=24)),
    "LlamaForCausalLM": ("LlamaConfig", dict(max_position_embeddings=24)),  # rotary: no limit
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_position_limit_is_where_the_model_fails(arch):
    """position_limit against the model itself: a text of `limit` tokens runs, one more is an error inside it."""
    from surgery.capture import position_limit

    config_name, extra = ARCHITECTURES[arch]
    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = getattr(transformers, config_name)(**(small | extra))
    model = getattr(transformers, arch)(config).eval()

    def runs(n):
        try:
            with torch.no_grad():
                model(input_ids=torch.full((1, n), 5))
            return True
        except (IndexError, RuntimeError, ValueError):
            return False

    limit = position_limit(model)
    if arch == "LlamaForCausalLM":
        assert limit is None and runs(60)
    else:
        assert limit == 24 and runs(24) and not runs(25)


def test_position_limit_of_composite_models():
    """A vision tower's position table (Llava's CLIP: 17 patches) does not limit the text; BART's two tables
    (encoder and decoder, offset 2) do, as its forward shows."""
    from surgery.capture import position_limit

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    llava = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**small, image_size=32, patch_size=8),
        text_config=transformers.LlamaConfig(vocab_size=100, **small)))
    assert position_limit(llava) is None
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40)).eval()
    assert position_limit(bart) == 40
    with torch.no_grad():
        bart(input_ids=torch.full((1, 40), 5))
        with pytest.raises(IndexError):
            bart(input_ids=torch.full((1, 41), 5))


def test_texts_past_a_learned_position_table_are_cut_with_a_note(tmp_path):
    """A GPT-2 with 32 positions and texts of ~70 tokens: compare and capture were an IndexError inside the model;
    each text is now cut to 32 tokens (as compare --max-tokens 32 cuts it), with a note saying how many were."""
    import shutil

    model_dir = tmp_path / "gpt2"
    vocab = json.loads((MODEL / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=2,
                                                         n_head=4)).save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / f, model_dir / f)
    adapter = write_peft(tmp_path / "lora", {"transformer.h.0.attn.c_attn": lora_pair(192, 64, 4)}, r=4, alpha=4,
                         config={"fan_in_fan_out": True})
    lines = [line for line in (FIXTURES / "sentences.txt").read_text().splitlines() if line.strip()][:4]
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(lines + ["short"]) + "\n")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tok(line)["input_ids"]) for line in lines + ["short"]]
    assert sum(n > 32 for n in lengths) == 4 and lengths[-1] < 32
    r = run("compare", model_dir, adapter, "--texts", texts, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [t["tokens"] for t in doc["texts"]] == [min(n, 32) - 1 for n in lengths]
    assert doc["notes"] == ["4 of 5 texts were cut to their first 32 tokens (the model's 32 positions)"]
    assert "note: 4 of 5 texts were cut" in r.stderr
    cut = run("compare", model_dir, adapter, "--texts", texts, "--device", "cpu", "--json", "--max-tokens", 32)
    assert {k: v for k, v in json.loads(cut.stdout).items() if k != "notes"} == {
        k: v for k, v in doc.items() if k != "notes"}
    r = run("capture", model_dir, "--texts", texts, "--keep-special", "-o", tmp_path / "h.safetensors", "--json")
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["tokens_available"] == sum(min(n, 32) for n in lengths) and meta["max_length"] == 32
    assert meta["notes"] == ["4 of 5 texts were cut to their first 32 tokens (the model's 32 positions)"]
    # no limit of the model's (rotary): a --max-length past the tokenizer's machine integers was an OverflowError
    r = run("capture", MODEL, "--texts", texts, "--max-length", 10 ** 20, "-o", tmp_path / "l.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["notes"] == [], r.output
    # below the model's limit --max-length cuts, and says so; GPT-2's linear layers are Conv1D (weight (in, out)),
    # whose inputs --module-inputs now captures (it found "no nn.Linear module"): as hooks on the model see them
    r = run("capture", model_dir, "--texts", texts, "--max-length", 8, "--module-inputs", "-o",
            tmp_path / "x.safetensors", "--json")
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["tokens_available"] == sum(min(n, 8) for n in lengths) == meta["tokens"]
    assert meta["notes"] == ["4 of 5 texts were cut to their first 8 tokens (--max-length)"]
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    seen = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Conv1D":
            mod.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0][0]))
    with torch.no_grad():
        for line in lines + ["short"]:
            model(input_ids=tok(line, return_tensors="pt")["input_ids"][:, :8])
    captured = load_file(tmp_path / "x.safetensors")
    assert sorted(meta["modules"]) == sorted(seen) and len(seen) == 8
    for name, xs in seen.items():
        key = f"input.{name}" if f"input.{name}" in captured else f"input.{meta['shared'][name]}"
        torch.testing.assert_close(captured[key], torch.cat(xs), rtol=1e-5, atol=1e-5)
