"""Error paths of the later commands: one `error:` line, exit status 1, nothing written, inputs untouched."""
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE, lora_pair, small_vocab_model, tree_digest, write_peft


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


def _mts_missing(tmp_path, extra=None):
    B, A = lora_pair(64, 64, 4)
    extra = extra or {"base_model.model.classifier.weight": torch.zeros(3, 64)}
    return write_peft(tmp_path / "mts", {"model.layers.0.self_attn.q_proj": (B, A)}, r=4, alpha=4, extra=extra)


def _tokens(tmp_path, indices=None, name="tok", table="model.embed_tokens"):
    B, A = lora_pair(64, 64, 4)
    extra = {f"base_model.model.{table}.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)}
    return write_peft(tmp_path / name, {"model.layers.0.self_attn.q_proj": (B, A)}, r=4, alpha=4, extra=extra,
                      config={"trainable_token_indices": indices})


DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that Python's parser cannot descend


def _peft(tmp_path, config=None, extra=None, keys=None, name="bad"):
    """A small PEFT directory; `config` entries override its adapter_config.json (a str replaces the whole file)."""
    B, A = lora_pair(8, 6, 2)
    d = write_peft(tmp_path / name, {"m.q_proj": (B, A)}, r=2, alpha=4, extra=extra,
                   config=config if isinstance(config, dict) else None)
    if isinstance(config, str):
        (d / "adapter_config.json").write_text(config)
    if keys is not None:
        save_file(keys, str(d / "adapter_model.safetensors"))
    return d


def _raw_file(path, header: bytes) -> Path:
    """A safetensors file with the given header bytes and no tensors."""
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def _kohya(tmp_path, extra=None, bad=None, name="k.safetensors"):
    B, A = lora_pair(8, 6, 2)
    sd = {"lora_unet_q.lora_down.weight": A, "lora_unet_q.lora_up.weight": B, "lora_unet_q.alpha": torch.tensor(1.0)}
    sd.update(extra or {})
    if bad:
        sd[bad] = sd[bad].clone()
        sd[bad].view(-1)[0] = float("nan")
    save_file(sd, str(tmp_path / name))
    return tmp_path / name


def _lokr_nan(tmp_path):
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    w1[0, 0] = float("inf")
    save_file({"lora_unet_q.lokr_w1": w1, "lora_unet_q.lokr_w2": w2}, str(tmp_path / "lokr.safetensors"))
    return tmp_path / "lokr.safetensors"


def _model(tmp_path, config):
    """tiny-llama's weights under a config.json of our making."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes((FIXTURES / "tiny-llama" / "model.safetensors").read_bytes())
    (d / "config.json").write_text(config)
    return d


def _dora_conv(tmp_path):
    """A conv base (48, 32, 3, 3) and a LyCORIS LoHa on it, stored flattened, whose per-input-column dora_scale
    (1, 96, 1, 1) fits its 288 flattened columns (96 · 3) but not the base's 32 input channels."""
    g = torch.Generator().manual_seed(0)
    save_file({"conv.weight": torch.randn(48, 32, 3, 3, generator=g)}, str(tmp_path / "convbase.safetensors"))
    save_file({"lycoris_conv.hada_w1_a": torch.randn(48, 2, generator=g), "lycoris_conv.hada_w1_b":
               torch.randn(2, 288, generator=g), "lycoris_conv.hada_w2_a": torch.randn(48, 2, generator=g),
               "lycoris_conv.hada_w2_b": torch.randn(2, 288, generator=g), "lycoris_conv.alpha": torch.tensor(2.0),
               "lycoris_conv.dora_scale": torch.rand(1, 96, 1, 1, generator=g) + 1}, str(tmp_path / "d.safetensors"))
    return [tmp_path / "convbase.safetensors", tmp_path / "d.safetensors"]


def _empty_inputs(tmp_path, shape=(0, 64)):
    """A module-inputs file whose one module (layer 0's q_proj, 64 features) has `shape` of inputs."""
    name = "model.layers.0.self_attn.q_proj"
    save_file({f"input.{name}": torch.zeros(shape)}, str(tmp_path / "acts.safetensors"),
              {"surgery_module_inputs": json.dumps({"modules": [name]})})
    return tmp_path / "acts.safetensors"


def _nan_base(tmp_path, fp8=False):
    """The bundled base with a NaN in one weight, or (fp8) its 2-D weights cast to scale-less float8."""
    from safetensors.torch import load_file

    sd = load_file(str(FIXTURES / "tiny-llama" / "model.safetensors"))
    key = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    sd[key][0, 0] = float("nan")
    if fp8:
        sd = {k: v.nan_to_num().to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in sd.items()}
    d = tmp_path / "nanbase"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text((FIXTURES / "tiny-llama" / "config.json").read_text())
    return d


def _pipeline(tmp_path, index):
    d = tmp_path / "pipe"
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(index)
    return d


CASES = {
    # wrong-shaped or hostile JSON: one line naming the file (and the key)
    "config-list": (lambda p: ["inspect", _peft(p, "[1, 2]")], "adapter_config.json: expected a JSON object"),
    "config-deep": (lambda p: ["inspect", _peft(p, DEEP)], "adapter_config.json: JSON nested too deeply"),
    "header-deep": (lambda p: ["inspect", _raw_file(p / "deep.safetensors", ('{"__metadata__":' + DEEP + "}").encode())],
                    "deep.safetensors: corrupt safetensors header (JSON nested too deeply)"),
    "metadata-deep": (lambda p: ["inspect", _raw_file(p / "meta.safetensors", json.dumps(
        {"__metadata__": {"lora_adapter_metadata": DEEP}, "m.lora_A.weight": {"dtype": "F32", "shape": [0, 2],
         "data_offsets": [0, 0]}, "m.lora_B.weight": {"dtype": "F32", "shape": [2, 0], "data_offsets": [0, 0]}}).encode())],
        "meta.safetensors: metadata lora_adapter_metadata: JSON nested too deeply"),
    "model-index-deep": (lambda p: ["merge", _pipeline(p, DEEP), PEFT_FIXTURE, "-o", p / "out"],
                         "model_index.json: JSON nested too deeply"),
    "model-index-list": (lambda p: ["merge", _pipeline(p, "[]"), PEFT_FIXTURE, "-o", p / "out"],
                         "model_index.json: expected a JSON object"),
    "base-config-list": (lambda p: ["merge", _model(p, "[1]"), PEFT_FIXTURE, "-o", p / "out"],
                         "config.json: expected a JSON object"),
    "base-config-type": (lambda p: ["merge", _model(p, '{"tie_word_embeddings": "yes"}'), PEFT_FIXTURE, "-o",
                                    p / "out"], "config.json: tie_word_embeddings must be true or false"),
    "rank-pattern-regex": (lambda p: ["squeeze", _peft(p, {"rank_pattern": {"(": 2}}), "--rank", "1", "-o", p / "out"],
                           "rank_pattern pattern '(' must be a valid regular expression"),
    "alpha-string": (lambda p: ["squeeze", _peft(p, {"lora_alpha": "sixteen"}), "--rank", "1", "-o", p / "out"],
                     "lora_alpha must be a finite number"),
    "alpha-nan": (lambda p: ["convert", _peft(p, {"lora_alpha": float("nan")}), "--to", "peft-file", "-o",
                             p / "out"], "lora_alpha must be a finite number"),
    "r-float": (lambda p: ["inspect", _peft(p, {"r": 2.5})], "r must be a positive whole number"),
    "alpha-null": (lambda p: ["combine", _peft(p, {"lora_alpha": None}), PEFT_FIXTURE, "-o", p / "out"],
                   "lora_alpha is null"),
    "control-characters": (lambda p: ["squeeze", _kohya(p, extra={"lora_unet_a\x1b[2J\nb.lora_down.weight":
                                                                  torch.ones(2, 6)}), "--rank", "1", "-o",
                                       p / "o.safetensors"],
                           "module lora_unet_a\\x1b[2J\\nb is missing"),  # a broken file's name, escaped
    "control-characters-peft": (lambda p: ["inspect", _peft(p, extra={"base_model.model.m\n.lora_A.weight":
                                                                      torch.ones(2, 6)})],
                                "module base_model.model.m\\n is missing"),
    "r-null": (lambda p: ["squeeze", _peft(p, {"r": None}), "--rank", "1", "-o", p / "out"], "r is null"),
    # a kohya .alpha is checked on every module, a full diff's too (which ignores it)
    "kohya-alpha-shape": (lambda p: ["squeeze", _kohya(p, extra={"lora_unet_d.diff": torch.ones(8, 6),
                                                                 "lora_unet_d.alpha": torch.ones(2)}),
                                     "--rank", "1", "-o", p / "out"],
                          "k.safetensors: module lora_unet_d: alpha must hold one number, has shape [2]"),
    "kohya-alpha-inf": (lambda p: ["squeeze", _kohya(p, extra={"lora_unet_q.alpha": torch.tensor(float("inf"))}),
                                   "--rank", "1", "-o", p / "out"], "k.safetensors: tensor lora_unet_q.alpha holds NaN or Inf"),
    "peft-type-contradicts": (lambda p: ["convert", _peft(p, {"peft_type": "LOKR"}, keys={
        "base_model.model.m.q_proj.hada_w1_a": torch.ones(8, 2), "base_model.model.m.q_proj.hada_w1_b": torch.ones(2, 6),
        "base_model.model.m.q_proj.hada_w2_a": torch.ones(8, 2), "base_model.model.m.q_proj.hada_w2_b": torch.ones(2, 6)}),
        "--to", "kohya", "-o", p / "out.safetensors"], "peft_type LOKR but tensor base_model.model.m.q_proj.hada_w1_a "
                                                        "is LOHA's"),
    # non-finite values: refused wherever they are read, naming the file and the tensor (so the module)
    "convert-nan": (lambda p: ["convert", _peft(p, keys={"base_model.model.m.q_proj.lora_A.weight": torch.ones(2, 6),
                                                          "base_model.model.m.q_proj.lora_B.weight": torch.full(
                                                              (8, 2), float("nan"))}), "--to", "kohya", "-o",
                               p / "out.safetensors"], "tensor base_model.model.m.q_proj.lora_B.weight holds NaN"),
    "spectrum-nan": (lambda p: ["inspect", _kohya(p, bad="lora_unet_q.lora_down.weight"), "--spectrum"],
                     "k.safetensors: tensor lora_unet_q.lora_down.weight holds NaN or Inf"),
    "lokr-inf": (lambda p: ["squeeze", _lokr_nan(p), "--rank", "1", "-o", p / "out.safetensors"],
                 "lokr.safetensors: tensor lora_unet_q.lokr_w1 holds NaN or Inf"),
    "dora-inf": (lambda p: ["convert", _peft(p, {"use_dora": True}, extra={
        "base_model.model.m.q_proj.lora_magnitude_vector": torch.tensor([float("inf")] * 8)}), "--to", "peft-file",
        "-o", p / "out.safetensors"], "tensor base_model.model.m.q_proj.lora_magnitude_vector holds NaN or Inf"),
    # values a written dtype cannot hold: refused, not written as Inf (every input was checked when read)
    "fold-overflow": (lambda p: ["convert", _peft(p, keys={"base_model.model.m.q_proj.lora_A.weight": torch.ones(
        2, 6, dtype=torch.float16), "base_model.model.m.q_proj.lora_B.weight": torch.full((8, 2), 4e4).half()}), "--to",
        "peft-file", "-o", p / "out.safetensors"], "tensor base_model.model.m.q_proj.lora_B.weight: its values "
                                                   "overflow float16"),  # scale 2 folded into B: 8e4 → Inf
    "dtype-overflow": (lambda p: ["squeeze", _kohya(p, extra={"lora_unet_q.lora_up.weight": torch.full((8, 2), 1e11)}),
                                  "--rank", "2", "--dtype", "float16", "-o", p / "out.safetensors"],  # kept
                       "tensor lora_unet_q.lora_up.weight: its values overflow float16"),
    "gguf-overflow": (lambda p: ["convert", _peft(p, {"target_modules": ["v_proj"]}, keys={
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.ones(2, 64),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.full((32, 2), 1e6)}), "--to", "gguf",
        "--base", FIXTURES / "tiny-llama", "--dtype", "f16", "-o", p / "out.gguf"],
                      "tensor blk.0.attn_v.weight.lora_b: its values overflow float16"),
    "gguf-q8-overflow": (lambda p: ["convert", _peft(p, {"target_modules": ["v_proj"]}, keys={
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.full((2, 64), 1e7),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.ones(32, 2)}), "--to", "gguf",
        "--base", FIXTURES / "tiny-llama", "--dtype", "q8_0", "-o", p / "out.gguf"],
                      "tensor blk.0.attn_v.weight.lora_a: its values overflow float16"),  # Q8_0's block scale
    "int-factor": (lambda p: ["squeeze", _peft(p, keys={"base_model.model.m.q_proj.lora_A.weight": torch.ones(
        2, 6, dtype=torch.int8), "base_model.model.m.q_proj.lora_B.weight": torch.ones(8, 2)}), "--rank", "1", "-o",
        p / "out"], "module base_model.model.m.q_proj: factors must be floating point, got A int8"),
    "tera-int-lambda": (lambda p: ["squeeze", _tera_file(p, lambda m, t: t.update(
        {k: v.to(torch.int32) + 2 for k, v in t.items() if ".tera_lambda." in k})), "--rank", "1", "-o", p / "out"],
                        "factors must be floating point, got λ0 int32"),
    # PEFT configs whose factors are more than a plain update of the base's layers: kept PEFT, refused elsewhere
    "alora-merge": (lambda p: ["merge", FIXTURES / "tiny-llama", _peft(p, {"alora_invocation_tokens": [5, 6]}), "-o",
                               p / "out"], "alora_invocation_tokens [5, 6]: an activated LoRA"),
    "alora-kohya": (lambda p: ["convert", _peft(p, {"alora_invocation_tokens": [5]}), "--to", "kohya", "-o",
                               p / "out.safetensors"], "which the kohya format cannot express"),
    "alora-peft-file": (lambda p: ["squeeze", _peft(p, {"alora_invocation_tokens": [5]}), "--rank", "1", "-o",
                                   p / "out.safetensors"], "which the peft-file format cannot express"),
    "qalora-merge": (lambda p: ["merge", FIXTURES / "tiny-llama", _peft(p, {"use_qalora": True}), "-o", p / "out"],
                     "use_qalora True: a QA-LoRA"),
    "arrow-squeeze": (lambda p: ["squeeze", _peft(p, {"arrow_config": {"top_k": 3}}), "--rank", "1", "-o", p / "out"],
                      "arrow_config: an Arrow router"),
    # KaSA: PEFT truncates the base's SVD by r when it loads it, and puts lora_diag between A and B (even a squeeze,
    # which changes r, changes the base PEFT builds)
    "kasa-squeeze": (lambda p: ["squeeze", _peft(p, {"kasa_config": {"beta": 1e-4}}, extra={
        "base_model.model.m.q_proj.lora_diag": torch.ones(2)}), "--rank", "1", "-o", p / "out"],
                     "kasa_config: a KaSA adapter"),
    "variant-tensor": (lambda p: ["squeeze", _peft(p, extra={"base_model.model.m.q_proj.lora_diag": torch.ones(2)}),
                                  "--rank", "1", "-o", p / "out"],
                       "tensor base_model.model.m.q_proj.lora_diag (lora_diag) belongs to a PEFT LoRA variant"),
    "monteclora-no-config": (lambda p: ["merge", FIXTURES / "tiny-llama", _peft(p, extra={
        "base_model.model.m.q_proj.lora_monteclora_sampler.std_prior": torch.ones(2)}), "-o", p / "out"],
                             "(lora_monteclora_sampler) belongs to a PEFT LoRA variant"),
    "bdlora-blocks": (lambda p: ["squeeze", _peft(p, {"use_bdlora": {"target_modules_bd_b": ["q_proj"],
                                                                     "nblocks": 3}}), "--rank", "1", "-o", p / "out"],
                      "block-diagonal lora_B of shape [8, 2] is not 3 blocks stacked"),
    "bdlora-nblocks": (lambda p: ["squeeze", _peft(p, {"use_bdlora": {"target_modules_bd_a": ["q_proj"]}}), "--rank",
                                  "1", "-o", p / "out"], "use_bdlora must be an object with a positive integer nblocks"),
    "replication-combine": (lambda p: ["combine", _peft(p, {"layer_replication": [[0, 1], [0, 1]]}),
                                       _peft(p, name="b2"), "-o", p / "out"], "layer_replication [[0, 1], [0, 1]]"),
    "combine-ties-nan": (lambda p: ["combine", _kohya(p, bad="lora_unet_q.lora_up.weight"),
                                    _kohya(p, name="k2.safetensors"), "--method", "ties", "--density", "0.5", "-o",
                                    p / "out.safetensors"], "k.safetensors: tensor lora_unet_q.lora_up.weight holds"),
    "dora-magnitude-base": (lambda p: ["merge", *_dora_conv(p), "-o", p / "out.safetensors"],
                            "DoRA magnitude of shape [1, 96, 1, 1] does not fit base tensor conv.weight"),
    "bdlora-both": (lambda p: ["squeeze", _peft(p, {"use_bdlora": {"target_modules_bd_a": ["q_proj"],
                                                                   "target_modules_bd_b": ["m."], "nblocks": 2}}),
                               "--rank", "1", "-o", p / "out"], "matches both target_modules_bd_a and"),
    "merge-base-fp8": (lambda p: ["merge", _nan_base(p, fp8=True), PEFT_FIXTURE, "-o", p / "out"],
                       "a float8 checkpoint without scales (as ComfyUI stores them) is a cast"),
    "merge-base-nan": (lambda p: ["merge", _nan_base(p), PEFT_FIXTURE, "-o", p / "out"],
                       "base tensor model.layers.0.self_attn.q_proj.weight already holds NaN or Inf"),
    "combine-bias-ties": (lambda p: ["combine", _peft(p, {"lora_bias": True}, extra={"base_model.model.m.q_proj.lora_B.bias": torch.ones(8)}),
                                     _peft(p, name="b2"), "--method", "ties", "--density", "0.5", "-o", p / "out"],
                          "bias part (lora_B.bias / diff_b), which ties has no rule for"),

    "combine-dare-overflow": (lambda p: ["combine", PEFT_FIXTURE, PEFT_FIXTURE, "--method", "dare-linear", "--density",
                                         "1e-300", "-o", p / "out"],  # was a traceback in the SVD of Inf
                              "the dare-linear result overflows float32 (density 1e-300)"),
    "merge-weight-nan": (lambda p: ["merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "--weight", "nan", "-o",
                                    p / "out"], "--weight values must be finite numbers within float32's range"),
    "merge-shard-size-0": (lambda p: ["merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "--shard-size", "0", "-o",
                                      p / "out"], "shard size '0': must be at least one byte"),  # a shard per tensor
    # a weight past float32, or a weight × scale past it, was a traceback in the GEMM forming ΔW
    "merge-weight-1e39": (lambda p: ["merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "--weight", "1e39", "-o",
                                     p / "out"], "(|w| ≤ 3.4e+38), got [1e+39]"),
    "merge-weight-scale": (lambda p: ["merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "--weight", "3e38", "-o",
                                      p / "out"], "weight 3e+38 × scale 2 is beyond float32's range"),
    "combine-weight-map-scale": (lambda p: ["combine", PEFT_FIXTURE, PEFT_FIXTURE, "--weight", "1e30", "--weight",
                                            "1", "--weight-map", "q_proj=1e30", "-o", p / "out"],
                                 "self_attn.q_proj: weight 1e+60 × scale 2 is beyond float32's range"),
    "empty-lora": (lambda p: ["squeeze", _peft(p, keys={"base_model.model.m.q_proj.lora_A.weight": torch.zeros(2, 0),
                                                          "base_model.model.m.q_proj.lora_B.weight": torch.zeros(0, 2)}),
                              "--rank", "1", "-o", p / "out"], "updates an empty weight (A [2, 0], B [0, 2])"),
    "empty-loha": (lambda p: ["inspect", "--spectrum", _kohya(p, extra={
        "lora_unet_e.hada_w1_a": torch.zeros(0, 2), "lora_unet_e.hada_w1_b": torch.zeros(2, 6),
        "lora_unet_e.hada_w2_a": torch.zeros(0, 2), "lora_unet_e.hada_w2_b": torch.zeros(2, 6)})],
                   "module lora_unet_e: an empty tensor (a zero dimension) updates no weight"),  # were tracebacks
    "empty-experts": (lambda p: ["inspect", _peft(p, {"target_modules": [], "target_parameters": ["mlp.experts.down_proj"]},
                                                  keys={"base_model.model.m.mlp.experts.lora_A.weight": torch.zeros(0, 6),
                                                        "base_model.model.m.mlp.experts.lora_B.weight": torch.zeros(8, 0)})],
                      "lora_A [0, 6] and lora_B [8, 0] are not PEFT's (r·E, in) and (out, r·E)"),  # 0 experts: a bug
    "capture-no-texts": (lambda p: ["capture", FIXTURES / "tiny-llama", "--texts", p / "none.txt", "-o", p / "out"],
                         "no texts"),
    "capture-binary-texts": (lambda p: ["capture", FIXTURES / "tiny-llama", "--texts", FIXTURES /
                                        "kohya-lora-tiny.safetensors", "-o", p / "out"], "not UTF-8 text"),
    "compare-binary-texts": (lambda p: ["compare", FIXTURES / "tiny-llama", PEFT_FIXTURE, "--texts", FIXTURES /
                                        "kohya-lora-tiny.safetensors"], "not UTF-8 text"),
    "squeeze-no-tokens": (lambda p: ["squeeze", PEFT_FIXTURE, "--rank", "4", "--activations", _empty_inputs(p),
                                     "-o", p / "out"], "acts.safetensors: the inputs of module "
                                                       "model.layers.0.self_attn.q_proj are empty (shape (0, 64))"),
    "tune-no-features": (lambda p: ["tune", PEFT_FIXTURE, "--teacher", PEFT_FIXTURE, "--activations",
                                    _empty_inputs(p, (5, 0)), "-o", p / "out"], "are empty (shape (5, 0))"),
    "tune-lr": (lambda p: ["tune", PEFT_FIXTURE, "--teacher", PEFT_FIXTURE, "--activations", _empty_inputs(p, (5, 64)),
                           "--lr", "1e308", "-o", p / "out"], "--lr is relative to each tensor's RMS and must be in "
                                                               "(0, 1], got 1e+308"),
    "capture-max-tokens": (lambda p: ["capture", FIXTURES / "tiny-llama", "--texts", FIXTURES / "sentences.txt",
                                      "--max-tokens", "-1", "-o", p / "out.safetensors"],
                           "--max-tokens must be at least 1, got -1"),  # wrote all tokens but one
    "capture-not-a-model": (lambda p: ["capture", p, "--texts", FIXTURES / "sentences.txt", "-o", p / "out"],
                            "not a local transformers model"),
    "id-discard": (lambda p: ["id", FIXTURES / "tiny-llama" / "model.safetensors", "--discard", "1.5"], "--discard"),
    "id-not-hidden": (lambda p: ["id", FIXTURES / "kohya-lora-tiny.safetensors"], "not a hidden-state file"),
    "tera-version": (lambda p: ["inspect", _tera_file(p, _version)], "surgery-tera/99"),
    "tera-lambda": (lambda p: ["inspect", _tera_file(p, _short_lambda)], "λ 0 missing or not of shape"),
    "to-lora-rank": (lambda p: ["convert", _tera_file(p, lambda m, t: None), "--to", "lora", "--rank", "0",
                                "-o", p / "out"], "at least 1"),
    "init-tera-core-rank": (lambda p: ["init-tera", FIXTURES / "tiny-llama", "--targets", "q_proj", "--core-rank", "0",
                                       "-o", p / "out.safetensors"], "--core-rank must be at least 1, got 0"),
    "to-tera-core-rank": (lambda p: ["convert", PEFT_FIXTURE, "--to", "tera", "--core-rank", "0", "-o", p / "out"],
                          "--core-rank must be at least 1, got 0"),
    "to-tera-order": (lambda p: ["convert", PEFT_FIXTURE, "--to", "tera", "--order", "-3", "-o", p / "out"],
                      "--order must be at least 1, got -3"),
    "to-tera-iters": (lambda p: ["convert", PEFT_FIXTURE, "--to", "tera", "--iters", "-1", "-o", p / "out"],
                      "--iters must be ≥ 0, got -1"),
    "extract-max-rank": (lambda p: ["extract", FIXTURES / "tiny-llama", FIXTURES / "tiny-llama", "--energy", "0.9",
                                    "--max-rank", "0", "-o", p / "out"], "--max-rank must be at least 1, got 0"),
    "extract-regex": (lambda p: ["extract", FIXTURES / "tiny-llama", FIXTURES / "tiny-llama", "--rank", "2",
                                 "--targets", "[", "-o", p / "out"], "--targets: bad regex '[': unterminated"),
    "target-modules-regex": (lambda p: ["squeeze", _peft(p, {"target_modules": "(q_proj"}), "--rank", "1", "-o",
                                        p / "out"], "target_modules must be a valid regular expression"),
    "init-tera-regex": (lambda p: ["init-tera", FIXTURES / "tiny-llama", "--targets", "(", "-o", p / "out"],
                        "bad regex"),
    "shard-size": (lambda p: ["merge", FIXTURES / "tiny-llama", PEFT_FIXTURE, "-o", p / "out", "--shard-size",
                              "lots"], "shard size"),
    "mts-missing": (lambda p: ["merge", FIXTURES / "tiny-llama", _mts_missing(p), "-o", p / "out"],
                    "replaces a tensor the base does not have"),
    "tokens-no-indices": (lambda p: ["merge", FIXTURES / "tiny-llama", _tokens(p), "-o", p / "out"],
                          "trainable_token_indices gives no distinct rows of model.embed_tokens.weight (256 rows)"),
    "tokens-past-the-table": (lambda p: ["merge", FIXTURES / "tiny-llama", _tokens(p, [3, 256]), "-o", p / "out"],
                              "trainable_token_indices gives no distinct rows"),
    "tokens-overlap": (lambda p: ["merge", FIXTURES / "tiny-llama", _tokens(p, [1, 2]), _tokens(p, [2, 3], "t2"),
                                  "-o", p / "out"], "the adapters' trainable tokens overlap"),
    "tokens-no-table": (lambda p: ["merge", FIXTURES / "tiny-llama", _tokens(p, [1, 2], table="model.norm_out"),
                                   "-o", p / "out"], "replaces rows of a tensor the base does not have (model.norm_out"),
    "resize-two-sizes": (lambda p: ["merge", FIXTURES / "tiny-llama", _mts_missing(p, {
        "base_model.model.model.embed_tokens.weight": torch.zeros(258, 64),
        "base_model.model.lm_head.weight": torch.zeros(259, 64)}), "-o", p / "out"],
                         "modules_to_save resize the vocabulary to different sizes"),
    "capture-vocab": (lambda p: ["capture", small_vocab_model(p / "m"), "--texts", FIXTURES / "sentences.txt", "-o",
                                 p / "out.safetensors"], "its tokenizer gives token id"),
    "tokens-count": (lambda p: ["merge", FIXTURES / "tiny-llama", _tokens(p, [1, 2, 3]), "-o", p / "out"],
                     "shape [2, 64], but 3 token(s) of model.embed_tokens.weight's 64 columns"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_paths(tmp_path, case):
    make_args, message = CASES[case]
    args = [str(a) for a in make_args(tmp_path)]
    inputs = {a: tree_digest(Path(a)) for a in args if Path(a).exists()}
    files = sorted(tmp_path.rglob("*"))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = [l for l in r.output.splitlines() if l.strip() and not l.startswith("wrote")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert sorted(tmp_path.rglob("*")) == files  # nothing written, not even a temporary file
    assert {a: tree_digest(Path(a)) for a in inputs} == inputs


TF32_PROBE = """
import sys, torch
from surgery import FixedRank, SurgeryError, load_adapter, squeeze
from surgery.device import resolve_device
{setup}
calls = [lambda: resolve_device(torch.device("cuda")),
         lambda: squeeze(load_adapter(sys.argv[1]), FixedRank(2), device=torch.device("cuda"))]
for call in calls[:{n}]:
    try:
        call()
        print("accepted")
    except SurgeryError as e:
        print("refused:", e)
print(resolve_device("cpu"), resolve_device(torch.device("cuda"), exact=False))
"""


@pytest.mark.parametrize("setup", ["torch.set_float32_matmul_precision('high')",
                                   "torch.backends.cuda.matmul.allow_tf32 = True",
                                   "torch.backends.fp32_precision = 'tf32'", "env", ""])
def test_tf32_matmuls_on_cuda_are_refused_not_used(setup):
    """A process whose CUDA float32 matmuls are TF32 (a training script's usual setting, by either of torch's
    APIs, or torch's override variable) gets one clear refusal from the maths, before any CUDA work; the CPU and a
    model's forward pass (capture: exact=False) are unaffected. A fresh process each: the settings are global."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="1" if setup == "env" else "0")
    probe = TF32_PROBE.format(setup="" if setup == "env" else setup, n=2 if setup else 1)
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", probe, str(PEFT_FIXTURE)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    *verdicts, last = r.stdout.strip().splitlines()
    assert last == "cpu cuda"
    if not setup:
        assert verdicts == ["accepted"]
        return
    setting = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" if setup == "env" else "torch.backends.cuda.matmul"
    assert len(verdicts) == 2 and all(v.startswith("refused: --device cuda: this process runs CUDA float32 matmuls "
                                                   f"in TF32 ({setting}") for v in verdicts), verdicts
    assert "fp32_precision = 'ieee'" in verdicts[0] and "\n" not in verdicts[0]


@pytest.mark.parametrize("error, line", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                 "7.79 GiB of which 1.02 GiB is free. Of the allocated memory 5.10 GiB is allocated "
                                 "by PyTorch. If reserved but unallocated memory is large try setting "
                                 "PYTORCH_CUDA_ALLOC_CONF=…"),
     "error: out of GPU memory (tried to allocate 2.00 GiB on GPU 0); free the GPU, or use --device cpu"),
    (MemoryError(), "error: out of memory (try --device cpu, a smaller --shard-size or fewer adapters)")])
def test_out_of_memory_is_one_line_not_a_bug_report(tmp_path, monkeypatch, error, line):
    """A GPU too small for the job (torch's OOM is a RuntimeError, which read as 'a bug in surgery' with a
    traceback) or a host out of memory: one line, exit 1, nothing written."""
    import sys

    sq = sys.modules["surgery.squeeze"]  # the module (the package's `squeeze` is the function)

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(sq, "resolve_device", boom)
    r = CliRunner().invoke(main, ["squeeze", str(PEFT_FIXTURE), "--rank", "2", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.strip() == line and not (tmp_path / "o").exists()


def test_a_cuda_ordinal_past_the_last_device_is_refused():
    """`--device cuda:N` beyond the machine's GPUs: one line saying how many there are (it was torch's 'invalid
    device ordinal' traceback at the first use)."""
    from surgery import SurgeryError
    from surgery.device import resolve_device

    n = torch.cuda.device_count()
    with pytest.raises(SurgeryError, match=rf"^--device cuda:{n + 1}: this machine has {n} CUDA device"):
        resolve_device(torch.device(f"cuda:{n + 1}"))


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_devices_other_than_cpu_and_cuda_are_one_line(tmp_path, device):
    """The maths run on the CPU or CUDA (float64 Grams, cuSOLVER batches); another torch device was accepted and
    failed deep inside as a bug report. A model's forward pass (capture: exact=False) may use any device."""
    from surgery.device import resolve_device

    r = CliRunner().invoke(main, ["squeeze", str(PEFT_FIXTURE), "--rank", "2", "--device", device, "-o",
                                  str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.strip() == f"error: --device {device}: surgery's maths run on cpu or cuda[:N]"
    assert not (tmp_path / "o").exists() and resolve_device(device, exact=False).type == device


def test_python_api_device_and_precision_arguments(tmp_path):
    """The Python API's device as torch's ordinal shorthand (3 → cuda:3) or a wrong type, and a compute precision
    by name or narrower than float32: were AttributeError / TypeError deep inside, or float16 maths."""
    from surgery import FixedRank, SurgeryError, load_adapter, squeeze
    from surgery.device import resolve_device
    from surgery.merge import merge

    for device, message in ([None, "device None: use 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device"],
                            [2.5, "device 2.5: use"]):
        with pytest.raises(SurgeryError, match=re.escape(message)):
            resolve_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(SurgeryError, match="no CUDA device is available"):
            resolve_device(3)
    adapter = load_adapter(PEFT_FIXTURE)
    report = merge(FIXTURES / "tiny-llama", [adapter], tmp_path / "m", compute_dtype="float64", device="cpu")
    assert report.tensors_merged == 14
    for bad in (torch.float16, "bfloat16"):
        with pytest.raises(SurgeryError, match="unknown compute precision"):
            merge(FIXTURES / "tiny-llama", [adapter], tmp_path / "n", compute_dtype=bad, device="cpu")
        with pytest.raises(SurgeryError, match="unknown compute precision"):
            squeeze(adapter, FixedRank(2), compute_dtype=bad, device="cpu")
    assert not (tmp_path / "n").exists()
    from surgery.io.names import on_base  # the README's naming call with a format that names nothing: a KeyError

    for fmt in ("tera", None):
        with pytest.raises(SurgeryError, match=re.escape(f"names in format {fmt!r}: use peft, peft-file, kohya")):
            on_base(adapter, FIXTURES / "tiny-llama", fmt)
