"""Diffusion models: diffusers pipelines and component folders as bases, diffusers' own LoRA files, kohya SD /
SDXL (SGM) / Flux (BFL) names — every merge checked against diffusers' own loading (`load_lora_adapter`, after its
kohya converters where the input is kohya) or, where diffusers cannot read a file, a float64 dense reference."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery_cli.main import main
from surgery import load_adapter
from surgery.errors import SurgeryError
from surgery.io.names import WAN
from surgery.merge import merge

from .conftest import hub_snapshot, tree_digest
from .diffusion_models import (diffusers, flux, kohya_lora, linear_modules, save_pipeline, sd_unet, wan,
                               text_encoder)

from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_kohya_flux_lora_to_diffusers, _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers)
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
import transformers  # noqa: E402

UNET_TARGETS = r"attn[12]\.to_|proj_in|proj_out|ff\.net|conv1|conv2|time_emb_proj"
TE_TARGETS = r"_proj$|fc[12]"


def _fused(model):
    """A model with its loaded LoRA merged by PEFT, as a plain state dict."""
    for mod in model.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge()
    return {re.sub(r"\.base_layer", "", k): v for k, v in model.state_dict().items() if "lora_" not in k}


def _assert_merged(ours: dict, ref: dict, base: dict, changed_at_least: int):
    """Every tensor within 1e-5 of the adapter's effect on it; the expected number of tensors changed."""
    changed = 0
    for k, v in ours.items():
        effect = (ref[k].double() - base[k].double()).abs().max().item()
        err = (v.double() - ref[k].double()).abs().max().item()
        assert err <= 1e-5 * max(effect, 1e-12) + 1e-7, f"{k}: off by {err:g} (effect {effect:g})"
        changed += effect > 0
    assert changed >= changed_at_least
    assert set(ours) == set(base)


def _kohya_reference(sd, unet, te=None):
    """diffusers' own reading of a kohya SD file: its converter, then load_lora_adapter / the text encoder loader."""
    new, alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    unet.load_lora_adapter({k: v for k, v in new.items() if k.startswith("unet.")}, prefix="unet", network_alphas=alphas)
    if te is not None:
        StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
            {k: v for k, v in new.items() if k.startswith("text_encoder.")}, alphas, te, prefix="text_encoder")


@pytest.fixture
def sd(tmp_path):
    """A tiny SD 1.x pipeline and a kohya LoRA for its UNet and text encoder (alpha ≠ rank)."""
    unet, te = sd_unet(), text_encoder()
    pipe = save_pipeline(tmp_path / "pipe", {"unet": unet, "text_encoder": te})
    state = kohya_lora(linear_modules(unet, UNET_TARGETS), "lora_unet_", 1, rank=3, alpha=1.5)
    te_paths = linear_modules(te, TE_TARGETS)  # kohya names them `lora_te_text_model_…` (transformers 4 paths)
    state.update(kohya_lora(te_paths, "", 2, rank=2, alpha=4.0,
                            names={p: "lora_te_" + ("" if p.startswith("text_model.") else "text_model_")
                                   + p.replace(".", "_") for p in te_paths}))
    save_file(state, str(tmp_path / "kohya.safetensors"))
    return pipe, tmp_path / "kohya.safetensors", state, unet, te


def test_pipeline_merge_equals_diffusers_and_copies_the_rest(sd, tmp_path):
    pipe, lora, state, unet, te = sd
    r = CliRunner().invoke(main, ["merge", str(pipe), str(lora), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    ref_unet, ref_te = sd_unet(), text_encoder()
    _kohya_reference(state, ref_unet, ref_te)
    _assert_merged(load_file(tmp_path / "out/unet/diffusion_pytorch_model.safetensors"), _fused(ref_unet),
                   unet.state_dict(), 40)
    _assert_merged(load_file(tmp_path / "out/text_encoder/model.safetensors"), _fused(ref_te), te.state_dict(), 12)
    for f in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (pipe / f).read_bytes()
    # the arguments swapped (the adapter first): one line that says which is which
    r = CliRunner().invoke(main, ["merge", str(lora), str(pipe), "-o", str(tmp_path / "swapped.safetensors")])
    assert r.exit_code == 1 and "it is a model (a base for merge" in r.output, r.output
    assert not (tmp_path / "swapped.safetensors").exists()
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out/unet")  # loads as diffusers' own
    assert torch.equal(merged.conv_in.weight, unet.conv_in.weight)
    # the same pipeline as the Hub cache holds it (every file a symlink to a blob): the same bytes out, no links
    snap = hub_snapshot(pipe, tmp_path / "hub")
    r = CliRunner().invoke(main, ["merge", str(snap), str(lora), "-o", str(tmp_path / "from-snap")])
    assert r.exit_code == 0, r.output
    assert tree_digest(tmp_path / "from-snap") == tree_digest(tmp_path / "out")
    assert not any(p.is_symlink() for p in (tmp_path / "from-snap").rglob("*"))
    # kohya's names with PEFT's factor keys (`lora_unet_….lora_A.weight` + `.alpha`, as ComfyUI reads them): the same
    ab = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in state.items()}
    save_file(ab, str(tmp_path / "ab.safetensors"))
    merge(pipe, [load_adapter(tmp_path / "ab.safetensors")], tmp_path / "from-ab")
    assert tree_digest(tmp_path / "from-ab") == tree_digest(tmp_path / "out")


@pytest.mark.parametrize("case", ["zero", "missing"])
def test_alpha_zero_or_missing_is_scale_one_here_and_other_in_diffusers_as_the_note_says(sd, tmp_path, case):
    """A kohya module with `.alpha` 0, or without the `.alpha` the others have: kohya's rule (alpha = r) here, as
    the note on stderr says, which also says what diffusers does instead — checked through diffusers' own reading:
    scale 0, or the others' alpha (1.5) over the rank (3)."""
    pipe, _, state, unet, _ = sd
    name, path = "lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in.weight"
    odd = dict(state, **{f"{name}.alpha": torch.tensor(0.0)})
    if case == "missing":
        del odd[f"{name}.alpha"]
    save_file(odd, str(tmp_path / "z.safetensors"))
    base = unet.state_dict()
    w = base[path].double()
    delta = (odd[f"{name}.lora_up.weight"].double().flatten(1) @ odd[f"{name}.lora_down.weight"].double().flatten(1))
    delta = delta.reshape(w.shape)
    ref = sd_unet()
    _kohya_reference({k: v for k, v in odd.items() if k.startswith("lora_unet_")}, ref)
    theirs = _fused(ref)[path].double()
    assert torch.allclose(theirs, w + (0.0 if case == "zero" else 0.5) * delta, atol=1e-6)
    r = CliRunner().invoke(main, ["merge", str(pipe / "unet"), str(tmp_path / "z.safetensors"), "-o",
                                  str(tmp_path / "m"), "--device", "cpu", "--allow-missing"])
    assert r.exit_code == 0, r.output
    said = {"zero": f"alpha 0 in {name}, read as alpha = r (scale 1)",
            "missing": f"no .alpha for {name} while other modules have one: read as alpha = r (scale 1)"}[case]
    assert r.stderr.count(said) == 1 and r.stderr.count("read as alpha = r") == 1, r.stderr
    assert ("diffusers apply such a module with scale 0" if case == "zero" else
            "diffusers gives such a module the most common alpha of the others") in r.stderr
    m = load_file(str(next((tmp_path / "m").glob("*.safetensors"))))
    assert torch.allclose(m[path].double(), w + delta, atol=1e-6)


def test_component_folder_sharded_keeps_its_layout(sd, tmp_path):
    pipe, lora, state, unet, _ = sd
    unet.save_pretrained(tmp_path / "unet-sharded", max_shard_size="60KB")
    index = "diffusion_pytorch_model.safetensors.index.json"
    shards = sorted(p.name for p in (tmp_path / "unet-sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "unet-sharded" / index).exists()
    a = load_adapter(lora)
    with pytest.raises(SurgeryError, match="lora_te_.*text_encoder"):  # text-encoder modules: not this component
        merge(tmp_path / "unet-sharded", [a], tmp_path / "m")
    report = merge(tmp_path / "unet-sharded", [a], tmp_path / "m", allow_missing=True)
    assert any("skipped" in n for n in report.notes)
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    assert json.loads((tmp_path / "m" / index).read_text())["weight_map"].keys() == \
        json.loads((tmp_path / "unet-sharded" / index).read_text())["weight_map"].keys()
    merge(pipe, [a], tmp_path / "whole")
    one = load_file(tmp_path / "whole/unet/diffusion_pytorch_model.safetensors")
    many = {}
    for s in shards:
        many.update(load_file(tmp_path / "m" / s))
    assert all(torch.equal(one[k], many[k]) for k in one)
    diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "m")


def test_weight_variants_are_each_merged(sd, tmp_path):
    """A pipeline as the Hub serves it: the UNet twice (plain float32 and `fp16`), the text encoder only as a sharded
    `fp16` variant. Every weight set is merged (none left stale for `from_pretrained(variant=…)`), names kept."""
    pipe, lora, state, unet, te = sd
    unet.half().save_pretrained(pipe / "unet", variant="fp16")
    unet.float()
    shutil.rmtree(pipe / "text_encoder")
    te.half().save_pretrained(pipe / "text_encoder", variant="fp16", max_shard_size="4KB")
    te.float()
    te_files = sorted(p.name for p in (pipe / "text_encoder").iterdir())
    assert "model.safetensors.index.fp16.json" in te_files and "model.safetensors" not in te_files
    r = CliRunner().invoke(main, ["merge", str(pipe), str(lora), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "in each of its weight sets (plain, fp16)" in r.output
    assert sorted(p.name for p in (tmp_path / "out/text_encoder").iterdir()) == te_files
    assert load_file(tmp_path / "out/unet/diffusion_pytorch_model.fp16.safetensors")["conv_in.weight"].dtype == torch.float16
    ref_unet, ref_te = sd_unet(), text_encoder()
    _kohya_reference(state, ref_unet, ref_te)
    ref_u, ref_t = _fused(ref_unet), _fused(ref_te)
    _assert_merged(load_file(tmp_path / "out/unet/diffusion_pytorch_model.safetensors"), ref_u, unet.state_dict(), 40)
    for got, ref, base in ((diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out/unet", variant="fp16"),
                            ref_u, unet.state_dict()),
                           (transformers.CLIPTextModel.from_pretrained(tmp_path / "out/text_encoder", variant="fp16"),
                            ref_t, te.state_dict())):
        changed = 0
        for k, v in got.state_dict().items():
            effect = (ref[k] - base[k]).abs().max().item()
            # the fp16 set starts from fp16 weights: one fp16 rounding of the base, one of the result
            tol = 2 * 2.0 ** -10 * ref[k].abs().max().item()
            assert (v.float() - ref[k]).abs().max().item() <= tol, k
            changed += effect > 10 * tol  # where a stale (unmerged) copy would be far off
        assert changed >= 12
    # --dtype that would put bfloat16 under the fp16 name: one line, nothing written
    r = CliRunner().invoke(main, ["merge", str(pipe), str(lora), "-o", str(tmp_path / "bf"), "--dtype", "bfloat16"])
    assert r.exit_code == 1 and "variant fp16 would be stored as bfloat16" in r.output
    assert not (tmp_path / "bf").exists()


def _diffusers_lora_file(tmp_path, unet, te, seed=3):
    """A pipeline LoRA as diffusers' save_lora_weights writes it, with rank/alpha patterns in its metadata."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in", "conv1"],
                      rank_pattern={"proj_in": 2}, alpha_pattern={"conv1": 3}, init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "out_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, te)  # (transformers' add_adapter wants a newer PEFT)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "dlora", unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return tmp_path / "dlora" / "pytorch_lora_weights.safetensors"


def test_diffusers_file_is_read_merged_and_written_back(sd, tmp_path):
    pipe, _, _, unet, te = sd
    lora_unet, lora_te = sd_unet(), text_encoder()
    f = _diffusers_lora_file(tmp_path, lora_unet, lora_te)
    a = load_adapter(f)
    assert a.format == "diffusers" and any(n.startswith("text_encoder.") for n in a.modules)
    r = CliRunner().invoke(main, ["inspect", str(f), "--json"])
    assert r.exit_code == 0, r.output
    merge(pipe, [a], tmp_path / "out")
    _assert_merged(load_file(tmp_path / "out/unet/diffusion_pytorch_model.safetensors"), _fused(lora_unet),
                   unet.state_dict(), 8)
    _assert_merged(load_file(tmp_path / "out/text_encoder/model.safetensors"), _fused(lora_te), te.state_dict(), 4)
    # squeeze writes the same layout back, and diffusers loads it with the scales we computed
    r = CliRunner().invoke(main, ["squeeze", str(f), "--rank", "2", "-o", str(tmp_path / "sq.safetensors")])
    assert r.exit_code == 0, r.output
    sq = load_adapter(tmp_path / "sq.safetensors")
    assert sq.format == "diffusers"
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "sq.safetensors"), "pt").metadata()
                      ["lora_adapter_metadata"])
    assert "unet.r" in meta and "text_encoder.lora_alpha" in meta
    fresh = sd_unet()
    fresh.load_lora_adapter(str(tmp_path / "sq.safetensors"), prefix="unet", use_safetensors=True)  # reads the metadata
    for name, mod in fresh.named_modules():
        if isinstance(mod, BaseTunerLayer):
            theirs = mod.get_delta_weight("default_0").double()
            mine = sq.modules[f"unet.{name}"].delta(torch.float64).reshape(theirs.shape)
            assert torch.allclose(theirs, mine, atol=1e-6), name
    # the folder save_lora_weights wrote (what load_lora_weights takes) is read as its file; results beside it
    r = CliRunner().invoke(main, ["squeeze", str(f.parent), "--rank", "2"])
    assert r.exit_code == 0, r.output
    beside = f.parent.with_name(f.parent.name + "-r2.safetensors")
    assert beside.exists() and load_file(beside).keys() == load_file(tmp_path / "sq.safetensors").keys()


def test_convert_kohya_to_diffusers_and_back_with_base(sd, tmp_path):
    pipe, lora, state, unet, te = sd
    run = CliRunner().invoke
    r = run(main, ["convert", str(lora), "--to", "diffusers", "--base", str(pipe), "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    ref_unet, ref_te = sd_unet(), text_encoder()
    _kohya_reference(state, ref_unet, ref_te)
    ref_u, ref_t = _fused(ref_unet), _fused(ref_te)
    got_unet = sd_unet()  # diffusers reads our file on its own: load_lora_adapter with the prefixed metadata
    got_unet.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="unet", use_safetensors=True)
    got_te = text_encoder()
    sdict, _, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "d.safetensors"),
                                                                     return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sdict, None, got_te, prefix="text_encoder",
                                                               metadata=meta)
    _assert_merged(_fused(got_unet), ref_u, unet.state_dict(), 40)
    _assert_merged(_fused(got_te), ref_t, te.state_dict(), 12)
    # diffusers → kohya names with the base: the converter of diffusers reads them back to the same effect
    r = run(main, ["convert", str(tmp_path / "d.safetensors"), "--to", "kohya", "--base", str(pipe),
                   "-o", str(tmp_path / "k.safetensors")])
    assert r.exit_code == 0, r.output
    back, back_te = sd_unet(), text_encoder()
    k = load_file(tmp_path / "k.safetensors")
    # kohya's CLIP names keep transformers 4's `text_model_` (ComfyUI and sd-scripts look for it), whatever the base saved
    assert {n.split(".")[0] for n in k if n.startswith("lora_te")} == {
        "lora_te_text_model_" + p.removeprefix("text_model.").replace(".", "_") for p in linear_modules(te, TE_TARGETS)}
    _kohya_reference(k, back, back_te)
    _assert_merged(_fused(back), ref_u, unet.state_dict(), 40)
    _assert_merged(_fused(back_te), ref_t, te.state_dict(), 12)
    # kohya → PEFT needs one component: refused for the pipeline, fine for its unet folder
    r = run(main, ["convert", str(lora), "--to", "peft", "--base", str(pipe), "-o", str(tmp_path / "p")])
    assert r.exit_code != 0 and "one model" in r.output
    r = run(main, ["convert", str(lora), "--to", "peft", "--base", str(pipe / "unet"), "--allow-missing",
                   "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    p = load_adapter(tmp_path / "p")
    assert all(n.startswith("base_model.model.") for n in p.modules) and len(p.modules) == len(linear_modules(unet, UNET_TARGETS))
    r = run(main, ["convert", str(lora), "--to", "diffusers", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code != 0 and "--base" in r.output


def test_combine_with_a_pipeline_base_mixes_kohya_and_diffusers(sd, tmp_path):
    pipe, lora, state, unet, te = sd
    f = _diffusers_lora_file(tmp_path, sd_unet(), text_encoder())
    r = CliRunner().invoke(main, ["combine", str(lora), str(f), "--weight", "1", "--weight", "0.5", "--base", str(pipe),
                                  "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    c = load_adapter(tmp_path / "c.safetensors")
    assert c.format == "diffusers"
    merge(pipe, [c], tmp_path / "one")
    merge(pipe, [load_adapter(lora), load_adapter(f)], tmp_path / "two", weights=[1, 0.5])
    a, b = (load_file(tmp_path / d / "unet/diffusion_pytorch_model.safetensors") for d in ("one", "two"))
    base = unet.state_dict()
    for k in a:
        effect = (b[k] - base[k]).abs().max().item()
        assert (a[k] - b[k]).abs().max().item() <= 1e-5 * effect + 1e-7, k


# ---------------------------------------------------------------- SDXL: original (SGM) block names


def _to_sgm(path: str, lpb: int = 2, has_attn=lambda b: True) -> str | None:
    """diffusers UNet path → the original SGM path (the inverse of diffusers' mapping, written independently)."""
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
    if path in top:
        return top[path]
    p = path.split(".")

    def inner(rest):
        return ".".join([resnet.get(rest[0], rest[0])] + rest[1:]) if rest else ""
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op"
        i = 1 + b * (lpb + 1) + int(p[3])
        return f"input_blocks.{i}.{0 if p[2] == 'resnets' else 1}.{inner(p[4:])}"
    if p[0] == "mid_block":
        j = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        return f"middle_block.{j}.{inner(p[3:])}"
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":
            return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn(b) else 1}.conv"
        i = b * (lpb + 1) + int(p[3])
        return f"output_blocks.{i}.{0 if p[2] == 'resnets' else 1}.{inner(p[4:])}"
    return None


def test_sdxl_sgm_names_follow_diffusers_mapping(tmp_path):
    unet = sd_unet(sdxl=True)
    unet.save_pretrained(tmp_path / "unet")
    shapes = linear_modules(unet, r"attn[12]\.to_|proj_in|ff\.net\.2|conv[12]$|time_emb_proj|downsamplers|"
                                  r"upsamplers|conv_shortcut|^conv_in$|time_embedding")
    names = {p: "lora_unet_" + _to_sgm(p, has_attn=lambda b: b < 2).replace(".", "_") for p in shapes}
    state = kohya_lora(shapes, "", 5, rank=2, alpha=1.0, names=names)
    # the independent inverse above is diffusers' mapping read backwards: its converters give the paths back
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet.config)
    new, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)
    ref = sd_unet(sdxl=True)
    ref.load_lora_adapter({k: v for k, v in new.items()}, prefix="unet", network_alphas=alphas)
    assert {n for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)} == set(shapes)
    save_file(state, str(tmp_path / "sgm.safetensors"))
    merge(tmp_path / "unet", [load_adapter(tmp_path / "sgm.safetensors")], tmp_path / "m")
    _assert_merged(load_file(tmp_path / "m/diffusion_pytorch_model.safetensors"), _fused(ref), unet.state_dict(),
                   len(shapes))
    # ComfyUI's generic keys: `diffusion_model.<SGM path>.lora_A/lora_B` (no alpha: scale 1, so B carries it)
    comfy = {}
    for p in shapes:
        n = names[p]
        sgm = "diffusion_model." + _to_sgm(p, has_attn=lambda b: b < 2)
        comfy[f"{sgm}.lora_A.weight"] = state[f"{n}.lora_down.weight"]
        comfy[f"{sgm}.lora_B.weight"] = state[f"{n}.lora_up.weight"] * 0.5
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    merge(tmp_path / "unet", [load_adapter(tmp_path / "comfy.safetensors")], tmp_path / "mc")
    _assert_merged(load_file(tmp_path / "mc/diffusion_pytorch_model.safetensors"), _fused(ref), unet.state_dict(),
                   len(shapes))
    # the reverse: a diffusers-named kohya LoRA into an original single-file SDXL checkpoint (SGM key names)
    sgm_base = {f"model.diffusion_model.{_to_sgm(k[:-7], has_attn=lambda b: b < 2)}.weight": v
                for k, v in unet.state_dict().items() if k.endswith(".weight") and k[:-7] in shapes}
    save_file(sgm_base, str(tmp_path / "sdxl.safetensors"))
    save_file(kohya_lora(shapes, "lora_unet_", 5, rank=2, alpha=1.0), str(tmp_path / "dn.safetensors"))
    merge(tmp_path / "sdxl.safetensors", [load_adapter(tmp_path / "dn.safetensors")], tmp_path / "sdxl-m.safetensors")
    got = load_file(tmp_path / "sdxl-m.safetensors")
    fused = _fused(ref)
    for k, v in sgm_base.items():
        path = next(p for p in shapes if f"model.diffusion_model.{_to_sgm(p, has_attn=lambda b: b < 2)}.weight" == k)
        assert torch.allclose(got[k], fused[f"{path}.weight"], atol=1e-6), k


# ---------------------------------------------------------------- Flux: original (BFL) fused projections


def _bfl_state(model) -> dict:
    """A Flux transformer's weights in the original BFL layout (q/k/v and the MLP input fused by rows)."""
    s = {k: v for k, v in model.state_dict().items()}
    out = {}
    for n in range(len(model.transformer_blocks)):
        d = f"transformer_blocks.{n}."
        out[f"double_blocks.{n}.img_attn.qkv.weight"] = torch.cat([s[d + f"attn.to_{x}.weight"] for x in "qkv"])
        out[f"double_blocks.{n}.txt_attn.qkv.weight"] = torch.cat([s[d + f"attn.add_{x}_proj.weight"] for x in "qkv"])
        out[f"double_blocks.{n}.img_attn.proj.weight"] = s[d + "attn.to_out.0.weight"]
        out[f"double_blocks.{n}.img_mlp.0.weight"] = s[d + "ff.net.0.proj.weight"]
    for n in range(len(model.single_transformer_blocks)):
        d = f"single_transformer_blocks.{n}."
        out[f"single_blocks.{n}.linear1.weight"] = torch.cat(
            [s[d + f"attn.to_{x}.weight"] for x in "qkv"] + [s[d + "proj_mlp.weight"]])
        out[f"single_blocks.{n}.linear2.weight"] = s[d + "proj_out.weight"]
    w = s["norm_out.linear.weight"]
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat(w.chunk(2)[::-1])  # BFL: (shift, scale)
    return out


def test_flux_fused_kohya_splits_exactly_into_diffusers(tmp_path):
    model = flux()
    model.save_pretrained(tmp_path / "transformer")
    bfl = _bfl_state(model)
    shapes = {k[:-7]: tuple(v.shape) for k, v in bfl.items()}
    state = kohya_lora(shapes, "lora_unet_", 7, rank=4, alpha=2.0)
    save_file(state, str(tmp_path / "flux-kohya.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "transformer"), str(tmp_path / "flux-kohya.safetensors"),
                                  "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "m/diffusion_pytorch_model.safetensors")
    base = model.state_dict()
    # double blocks through diffusers' own converter (its single-block split is hard-coded to Flux-dev's sizes)
    double = {k: v for k, v in state.items() if "double_blocks" in k}
    ref = flux()
    ref.load_lora_adapter(_convert_kohya_flux_lora_to_diffusers(dict(double)), prefix="transformer")
    fused = _fused(ref)
    for k in [k for k in fused if k.startswith("transformer_blocks.") and not torch.equal(fused[k], base[k])]:
        effect = (fused[k] - base[k]).abs().max().item()
        assert (got[k] - fused[k]).abs().max().item() <= 1e-5 * effect, k
    # single blocks and the final modulation against the dense float64 update split by the base's rows
    h = model.inner_dim
    for n in range(2):
        up, down = (state[f"lora_unet_single_blocks_{n}_linear1.lora_{x}.weight"].double() for x in ("up", "down"))
        delta = 0.5 * up @ down
        rows = dict(zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], delta.split([h, h, h, delta.shape[0] - 3 * h])))
        for part, d in rows.items():
            key = f"single_transformer_blocks.{n}.{part}.weight"
            assert torch.allclose(got[key].double(), base[key].double() + d, atol=1e-6), key
    up, down = (state[f"lora_unet_final_layer_adaLN_modulation_1.lora_{x}.weight"].double() for x in ("up", "down"))
    d = 0.5 * up @ down
    assert torch.allclose(got["norm_out.linear.weight"].double(), base["norm_out.linear.weight"].double()
                          + torch.cat(d.chunk(2)[::-1]), atol=1e-6)
    # ComfyUI's generic keys for the same LoRA (`diffusion_model.<BFL path>.lora_A/B`, scale 1): the same merge
    comfy = {f"diffusion_model.{p}.lora_{ab}.weight": state[f"lora_unet_{p.replace('.', '_')}.lora_{ud}.weight"] * s
             for p in shapes for ab, ud, s in (("A", "down", 1.0), ("B", "up", 0.5))}
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    merge(tmp_path / "transformer", [load_adapter(tmp_path / "comfy.safetensors")], tmp_path / "mc")
    mc = load_file(tmp_path / "mc/diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(mc[k], got[k], atol=1e-6) for k in got)
    # the same file into a BFL single-file checkpoint: names as they are, no split
    save_file(bfl, str(tmp_path / "flux1.safetensors"))
    merge(tmp_path / "flux1.safetensors", [load_adapter(tmp_path / "flux-kohya.safetensors")], tmp_path / "b.safetensors")
    b = load_file(tmp_path / "b.safetensors")
    assert torch.allclose(b["single_blocks.0.linear1.weight"][:h], got["single_transformer_blocks.0.attn.to_q.weight"],
                          atol=1e-6)


def test_flux_separate_projections_fuse_exactly_into_bfl(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = flux()
    bfl = _bfl_state(model)
    save_file(bfl, str(tmp_path / "flux1.safetensors"))
    lora = flux()
    cfg = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, rank_pattern={"to_k": 3},
                     target_modules=["to_q", "to_k", "to_v", "proj_mlp", "add_q_proj", "norm_out.linear"])
    torch.manual_seed(1)
    lora.add_adapter(cfg)
    diffusers.FluxPipeline.save_lora_weights(tmp_path / "dl", transformer_lora_layers=get_peft_model_state_dict(lora),
                                             transformer_lora_adapter_metadata=cfg.to_dict())
    f = tmp_path / "dl/pytorch_lora_weights.safetensors"
    merged = _fused(lora)  # diffusers-layout weights with the LoRA merged, then laid out as BFL
    ref = _bfl_state(_load_state(flux(), merged))
    r = CliRunner().invoke(main, ["convert", str(f), "--to", "kohya", "--base", str(tmp_path / "flux1.safetensors"),
                                  "-o", str(tmp_path / "k.safetensors")])
    assert r.exit_code == 0, r.output
    k = load_adapter(tmp_path / "k.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv" in k.modules and "lora_unet_single_blocks_1_linear1" in k.modules
    assert k.modules["lora_unet_double_blocks_0_img_attn_qkv"].rank == 2 + 3 + 2  # A stacked: exact, rank Σrᵢ
    for adapter in (load_adapter(f), k):
        merge(tmp_path / "flux1.safetensors", [adapter], tmp_path / "o.safetensors", force=True)
        got = load_file(tmp_path / "o.safetensors")
        for key in bfl:
            effect = (ref[key] - bfl[key]).abs().max().item()
            assert (got[key] - ref[key]).abs().max().item() <= 1e-5 * effect + 1e-7, key
    # against a diffusers transformer folder: kohya names on diffusers paths take OneTrainer's `lora_transformer_`
    # (what ComfyUI and diffusers read; `lora_unet_` there means BFL names); diffusers' converter reads them back
    model.save_pretrained(tmp_path / "transformer")
    r = CliRunner().invoke(main, ["convert", str(f), "--to", "kohya", "--base", str(tmp_path / "transformer"),
                                  "-o", str(tmp_path / "ot.safetensors")])
    assert r.exit_code == 0, r.output
    ot = load_file(tmp_path / "ot.safetensors")
    assert ot and all(n.startswith("lora_transformer_") for n in ot)
    attn = {n: v for n, v in ot.items() if "_attn_" in n}  # the part diffusers' converter maps
    back = flux()
    back.load_lora_adapter(_convert_kohya_flux_lora_to_diffusers(attn), prefix="transformer")
    base, changed = model.state_dict(), 0
    for key, v in _fused(back).items():
        if re.search(r"attn\.(to_[qkv]|add_[qkv]_proj)\.weight", key):
            effect = (merged[key] - base[key]).abs().max().item()
            assert (v - merged[key]).abs().max().item() <= 1e-5 * effect, key
            changed += effect > 0
    assert changed == 3 * 3 + 1  # to_q/k/v of the three blocks, add_q_proj


def _load_state(model, state):
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------- LyCORIS kinds and bad inputs


def test_loha_on_a_flux_fused_projection_splits_as_loha(tmp_path):
    model = flux()
    model.save_pretrained(tmp_path / "transformer")
    h = model.inner_dim
    g = torch.Generator().manual_seed(0)
    out_f = 3 * h
    t = {f"lora_unet_double_blocks_0_img_attn_qkv.hada_{n}": torch.randn(s, generator=g)
         for n, s in (("w1_a", (out_f, 2)), ("w1_b", (2, h)), ("w2_a", (out_f, 2)), ("w2_b", (2, h)))}
    t["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(1.0)
    save_file(t, str(tmp_path / "loha.safetensors"))
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "loha.safetensors"), "--to", "kohya", "--base",
                                  str(tmp_path / "transformer"), "-o", str(tmp_path / "split.safetensors")])
    assert r.exit_code == 0, r.output
    split = load_adapter(tmp_path / "split.safetensors")
    assert {m.algo for m in split.modules.values()} == {"loha"} and len(split.modules) == 3
    merge(tmp_path / "transformer", [load_adapter(tmp_path / "loha.safetensors")], tmp_path / "m")
    got, base = load_file(tmp_path / "m/diffusion_pytorch_model.safetensors"), model.state_dict()
    g1 = t["lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a"].double() @ t["lora_unet_double_blocks_0_img_attn_qkv.hada_w1_b"].double()
    g2 = t["lora_unet_double_blocks_0_img_attn_qkv.hada_w2_a"].double() @ t["lora_unet_double_blocks_0_img_attn_qkv.hada_w2_b"].double()
    d = (g1 * g2 * 0.5).split(h)
    for x, dx in zip("qkv", d):
        key = f"transformer_blocks.0.attn.to_{x}.weight"
        assert torch.allclose(got[key].double(), base[key].double() + dx, atol=1e-5), key


def test_names_that_match_nothing_and_lora_for_another_model(sd, tmp_path):
    pipe, lora, state, unet, _ = sd
    bad = dict(state)
    bad["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    bad["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 2)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(pipe), str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "lora_unet_no_such_block_to_q" in r.output and "--allow-missing" in r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["merge", str(pipe), str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o"),
                                  "--allow-missing"])
    assert r.exit_code == 0, r.output
    other = sd_unet(sdxl=True)  # same names in places, other shapes: one clear line
    other.save_pretrained(tmp_path / "xl")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "xl"), str(lora), "-o", str(tmp_path / "o2"),
                                  "--allow-missing"])
    assert r.exit_code != 0 and "has shape" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def test_lokr_pipeline_file_reads_merges_and_loads_in_diffusers(tmp_path):
    """diffusers loads LoKr too: a component-prefixed PEFT LoKr file is read with its config, renamed on a base
    and written back, and diffusers' loader gives every module the update we compute."""
    from peft import LoKrConfig, get_peft_model_state_dict, inject_adapter_in_model

    from surgery import save_adapter
    from surgery.io.names import on_base

    unet = sd_unet()
    unet.save_pretrained(tmp_path / "unet")
    lokr = sd_unet()
    cfg = LoKrConfig(r=2, alpha=3, target_modules=["to_q", "to_v", "proj_in"], init_weights=False)
    inject_adapter_in_model(cfg, lokr)
    meta = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(lokr).items()},
              str(tmp_path / "lokr.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    a = load_adapter(tmp_path / "lokr.safetensors")
    assert a.format == "diffusers" and {m.algo for m in a.modules.values()} == {"lokr"}
    merge(tmp_path / "unet", [a], tmp_path / "m")
    _assert_merged(load_file(tmp_path / "m/diffusion_pytorch_model.safetensors"), _fused(lokr), unet.state_dict(), 10)
    save_adapter(on_base(a, tmp_path / "unet", "diffusers"), tmp_path / "back.safetensors")
    fresh = sd_unet()
    fresh.load_lora_adapter(str(tmp_path / "back.safetensors"), prefix="unet", use_safetensors=True)
    for name, mod in fresh.named_modules():
        if isinstance(mod, BaseTunerLayer):
            theirs = mod.get_delta_weight("default_0").double()
            mine = a.modules[f"unet.{name}"].delta(torch.float64).reshape(theirs.shape)
            assert torch.allclose(theirs, mine, atol=1e-6), name


def _sdxl_text_encoders_reference(state) -> dict:
    """diffusers' own reading of a kohya file's `lora_te1_` / `lora_te2_` modules into two text encoders (seeds 1, 2),
    as `StableDiffusionXLPipeline.load_lora_weights` routes them."""
    new, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    refs = {}
    for c, seed in (("text_encoder", 1), ("text_encoder_2", 2)):
        refs[c] = text_encoder(seed=seed)
        StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
            {k: v for k, v in new.items() if k.startswith(c + ".")}, alphas, refs[c], prefix=c)
    return refs


def test_sdxl_pipeline_routes_te1_and_te2_to_their_own_encoders(tmp_path):
    """Two text encoders with identical module names: `lora_te1_` / `lora_te2_` (and `text_encoder_2.`) reach
    only their own, as diffusers' converter routes them."""
    unet, te1, te2 = sd_unet(), text_encoder(seed=1), text_encoder(seed=2)
    pipe = save_pipeline(tmp_path / "pipe", {"unet": unet, "text_encoder": te1, "text_encoder_2": te2})
    state = {}
    for prefix, model, seed in (("lora_te1_", te1, 11), ("lora_te2_", te2, 12)):
        paths = linear_modules(model, TE_TARGETS)
        state.update(kohya_lora(paths, "", seed, rank=2, alpha=3.0,
                                names={p: prefix + ("" if p.startswith("text_model.") else "text_model_")
                                       + p.replace(".", "_") for p in paths}))
    save_file(state, str(tmp_path / "xl.safetensors"))
    merge(pipe, [load_adapter(tmp_path / "xl.safetensors")], tmp_path / "out")
    refs = _sdxl_text_encoders_reference(state)
    for c, model in (("text_encoder", te1), ("text_encoder_2", te2)):
        _assert_merged(load_file(tmp_path / "out" / c / "model.safetensors"), _fused(refs[c]), model.state_dict(), 12)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "xl.safetensors"), "--to", "diffusers", "--base",
                                  str(pipe), "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    names = load_adapter(tmp_path / "d.safetensors").modules
    assert sum(n.startswith("text_encoder_2.") for n in names) == sum(n.startswith("text_encoder.") for n in names) > 0


def test_flux_pipeline_t5_is_kohya_te3(tmp_path):
    """Flux's T5 is `text_encoder_2/` in diffusers but `lora_te3_` in kohya (sd-scripts, ComfyUI): read and written
    so; CLIP stays `lora_te1_`. Merged against the dense float64 update."""
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                                           num_heads=2))
    clip, fl = text_encoder(), flux()
    pipe = save_pipeline(tmp_path / "pipe", {"transformer": fl, "text_encoder": clip, "text_encoder_2": t5})
    kohya = {p: "lora_te3_" + p.replace(".", "_") for p in linear_modules(t5, r"SelfAttention\.[qv]$")}
    kohya |= {p: "lora_te1_text_model_" + p.removeprefix("text_model.").replace(".", "_")
              for p in linear_modules(clip, TE_TARGETS)}  # kohya's CLIP names (transformers 4 paths)
    state = kohya_lora(linear_modules(t5, r"SelfAttention\.[qv]$"), "", 5, rank=2, alpha=1.0, names=kohya)
    state.update(kohya_lora(linear_modules(clip, TE_TARGETS), "", 6, rank=2, alpha=1.0, names=kohya))
    save_file(state, str(tmp_path / "k.safetensors"))
    merge(pipe, [load_adapter(tmp_path / "k.safetensors")], tmp_path / "out")
    for c, model in (("text_encoder_2", t5), ("text_encoder", clip)):
        got, base = load_file(tmp_path / "out" / c / "model.safetensors"), model.state_dict()
        paths = linear_modules(model, r"SelfAttention\.[qv]$" if c == "text_encoder_2" else TE_TARGETS)
        for path in paths:
            n = kohya[path]
            up, down = (state[f"{n}.lora_{x}.weight"].double() for x in ("up", "down"))
            want = base[path + ".weight"].double() + 0.5 * up @ down
            assert torch.allclose(got[path + ".weight"].double(), want, atol=1e-6), path
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "k.safetensors"), "--to", "diffusers", "--base", str(pipe),
                                  "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    d = load_adapter(tmp_path / "d.safetensors").modules
    assert sum(n.startswith("text_encoder_2.encoder.block.0.layer.0.SelfAttention.") for n in d) == 2
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "d.safetensors"), "--to", "kohya", "--base", str(pipe),
                                  "-o", str(tmp_path / "k2.safetensors")])
    assert r.exit_code == 0, r.output
    assert set(load_file(tmp_path / "k2.safetensors")) == set(state)


def _open_clip_state(te, prefix: str) -> dict:
    """A transformers CLIP text encoder in OpenCLIP's layout, as the original SD 2.x / SDXL single files hold it
    (q, k, v fused into nn.MultiheadAttention's in_proj; diffusers' convert_open_clip_checkpoint read backwards)."""
    s = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    out = {}
    for i in range(te.config.num_hidden_layers):
        h, o = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for x in ("weight", "bias"):
            out[f"{o}attn.in_proj_{x}"] = torch.cat([s[f"{h}self_attn.{q}_proj.{x}"] for q in "qkv"])
            for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                           ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
                out[f"{o}{oc}.{x}"] = s[f"{h}{hf}.{x}"]
    out[f"{prefix}token_embedding.weight"] = s["embeddings.token_embedding.weight"]
    out[f"{prefix}positional_embedding"] = s["embeddings.position_embedding.weight"]
    return out


def test_sdxl_original_file_open_clip_encoder_takes_te2_loras(tmp_path):
    """An SDXL single file (`conditioner.embedders.0.transformer.` CLIP, `conditioner.embedders.1.model.` OpenCLIP):
    kohya's te2 q/k/v LoRAs fuse exactly into `attn.in_proj_weight`, out_proj / fc1 / fc2 are renamed — equal to
    diffusers' own reading of the file into transformers' CLIP, laid out as OpenCLIP."""
    unet, te1, te2 = sd_unet(sdxl=True), text_encoder(seed=1), text_encoder(seed=2)
    base = {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in te1.state_dict().items()}
    base.update(_open_clip_state(te2, "conditioner.embedders.1.model."))
    base.update({f"model.diffusion_model.{k}": v for k, v in list(unet.state_dict().items())[:4]})
    save_file(base, str(tmp_path / "sdxl.safetensors"))
    state = {}
    for prefix, model, seed in (("lora_te1_", te1, 21), ("lora_te2_", te2, 22)):
        paths = linear_modules(model, r"(q|k|v|out)_proj|fc[12]")
        state.update(kohya_lora(paths, "", seed, rank=2, alpha=3.0, names={
            p: prefix + "text_model_" + p.removeprefix("text_model.").replace(".", "_") for p in paths}))
    save_file(state, str(tmp_path / "xl.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "sdxl.safetensors"), str(tmp_path / "xl.safetensors"),
                                  "-o", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    assert "fused exactly into conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj" in r.output
    refs = _sdxl_text_encoders_reference(state)
    want = {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in _fused(refs["text_encoder"]).items()}
    merged_te2 = text_encoder(seed=2)
    merged_te2.load_state_dict(_fused(refs["text_encoder_2"]))
    want.update(_open_clip_state(merged_te2, "conditioner.embedders.1.model."))
    got, changed = load_file(tmp_path / "m.safetensors"), 0
    for k, v in got.items():
        ref = want.get(k, base[k])
        effect = (ref - base[k]).abs().max().item()
        assert (v - ref).abs().max().item() <= 1e-5 * effect + 1e-7, k
        changed += effect > 0
    assert changed == 6 * 2 + 4 * 2  # te1: q, k, v, out, fc1, fc2 of 2 layers; te2: in_proj, out_proj, c_fc, c_proj
    # as a naming base it is refused: OpenCLIP's fused names are read by no loader, diffusers names need diffusers'
    for to, why in (("kohya", "OpenCLIP's layout"), ("peft", "OpenCLIP's layout"), ("diffusers", "not a diffusers model")):
        r = CliRunner().invoke(main, ["convert", str(tmp_path / "xl.safetensors"), "--to", to, "--base",
                                      str(tmp_path / "sdxl.safetensors"), "-o", str(tmp_path / f"x-{to}.safetensors")])
        assert r.exit_code == 1 and why in r.output and not (tmp_path / f"x-{to}.safetensors").exists(), r.output


def test_peft_keys_with_per_module_alpha_keys(tmp_path):
    """PEFT keys with a kohya-style `<module>.alpha` each (diffusers' "network alphas", e.g. TheLastBen's Flux
    LoRAs; ComfyUI's `{x}.alpha`): scale alpha / r, as diffusers' FluxPipeline.lora_state_dict + load_lora_adapter."""
    model = flux()
    model.save_pretrained(tmp_path / "transformer")
    g = torch.Generator().manual_seed(9)
    state = {}
    for i, (path, shape) in enumerate(linear_modules(model, r"attn\.to_[qkv]$|proj_mlp").items()):
        r = 2 + i % 3
        state[f"transformer.{path}.lora_A.weight"] = torch.randn(r, shape[1], generator=g)
        state[f"transformer.{path}.lora_B.weight"] = torch.randn(shape[0], r, generator=g)
        state[f"transformer.{path}.alpha"] = torch.tensor(float(1 + i % 4))
    save_file(state, str(tmp_path / "a.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "transformer"), str(tmp_path / "a.safetensors"),
                                  "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    sd, alphas = diffusers.FluxPipeline.lora_state_dict(str(tmp_path / "a.safetensors"), return_alphas=True)
    assert len(alphas) == len(state) // 3
    ref = flux()
    ref.load_lora_adapter(sd, network_alphas=alphas, prefix="transformer")
    base = model.state_dict()
    _assert_merged(load_file(tmp_path / "m/diffusion_pytorch_model.safetensors"), _fused(ref), base, len(alphas))
    # written back (a diffusers file with its scales in the metadata), diffusers loads the same update
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "a.safetensors"), "--to", "diffusers",
                                  "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    back = flux()
    back.load_lora_adapter(str(tmp_path / "d.safetensors"), prefix="transformer", use_safetensors=True)
    _assert_merged(_fused(back), _fused(ref), base, len(alphas))
    # an alpha for some modules only: diffusers and ComfyUI would disagree on the others — one line
    del state[next(k for k in state if k.endswith(".alpha"))]
    save_file(state, str(tmp_path / "b.safetensors"))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 1 and "none for transformer_blocks.0.attn.to_q (diffusers" in r.output, r.output


def test_legacy_diffusers_keys_read_as_diffusers_renames_them(sd, tmp_path):
    """diffusers' pre-PEFT LoRA files (attention processors: `attn1.processor.to_out_lora.up.weight`; text encoder
    `self_attn.to_q_lora`): the UNet part merges as diffusers' own loader reads it, the text encoder's to q_proj /
    out_proj (its DIFFUSERS_OLD_TO_PEFT table) against the float64 update; written back as a current file."""
    pipe, _, _, unet, te = sd
    g = torch.Generator().manual_seed(4)
    state = {}
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    for proj, (o, i) in (("to_q", (8, 8)), ("to_v", (8, 8)), ("to_out", (8, 8))):
        state[f"unet.{attn}.processor.{proj}_lora.down.weight"] = torch.randn(2, i, generator=g)
        state[f"unet.{attn}.processor.{proj}_lora.up.weight"] = torch.randn(o, 2, generator=g)
    te_path = next(p for p in linear_modules(te, r"layers\.0\.self_attn\.q_proj")).removesuffix(".q_proj")
    for proj in ("to_q", "to_out"):
        state[f"text_encoder.{te_path}.{proj}_lora.down.weight"] = torch.randn(2, 12, generator=g)
        state[f"text_encoder.{te_path}.{proj}_lora.up.weight"] = torch.randn(12, 2, generator=g)
    save_file(state, str(tmp_path / "legacy.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(pipe), str(tmp_path / "legacy.safetensors"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    sdict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "legacy.safetensors"))
    ref = sd_unet()
    ref.load_lora_adapter({k: v for k, v in sdict.items() if k.startswith("unet.")}, prefix="unet",
                          network_alphas=alphas)
    _assert_merged(load_file(tmp_path / "m/unet/diffusion_pytorch_model.safetensors"), _fused(ref), unet.state_dict(), 3)
    got, base = load_file(tmp_path / "m/text_encoder/model.safetensors"), te.state_dict()
    for proj, hf in (("to_q", "q_proj"), ("to_out", "out_proj")):
        up, down = (state[f"text_encoder.{te_path}.{proj}_lora.{x}.weight"].double() for x in ("up", "down"))
        key = f"{te_path}.{hf}.weight"
        assert torch.allclose(got[key].double(), base[key].double() + up @ down, atol=1e-6), key
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "legacy.safetensors"), "--to", "diffusers",
                                  "-o", str(tmp_path / "new.safetensors")])
    assert r.exit_code == 0, r.output
    back = sd_unet()
    back.load_lora_adapter(str(tmp_path / "new.safetensors"), prefix="unet", use_safetensors=True)
    _assert_merged(_fused(back), _fused(ref), unet.state_dict(), 3)


def test_xlabs_flux_lora_reads_as_diffusers_converts_it(tmp_path):
    """XLabs' Flux LoRAs (`double_blocks.N.processor.qkv_lora1.down.weight`, …): merged into a diffusers transformer as
    diffusers' own FluxPipeline.lora_state_dict + load_lora_adapter; into the BFL single file through the exact fusion."""
    model = flux()
    model.save_pretrained(tmp_path / "transformer")
    h, g, state = model.inner_dim, torch.Generator().manual_seed(12), {}
    shapes = {"double_blocks.0.processor.qkv_lora1": (3 * h, h), "double_blocks.0.processor.qkv_lora2": (3 * h, h),
              "double_blocks.0.processor.proj_lora1": (h, h), "double_blocks.0.processor.proj_lora2": (h, h),
              "single_blocks.1.processor.qkv_lora": (3 * h, h), "single_blocks.1.processor.proj_lora": (h, 5 * h)}
    for name, (o, i) in shapes.items():
        state[f"{name}.down.weight"] = torch.randn(3, i, generator=g)
        state[f"{name}.up.weight"] = torch.randn(o, 3, generator=g)
    save_file(state, str(tmp_path / "xlabs.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "transformer"), str(tmp_path / "xlabs.safetensors"),
                                  "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    ref = flux()
    ref.load_lora_adapter(diffusers.FluxPipeline.lora_state_dict(str(tmp_path / "xlabs.safetensors")), prefix="transformer")
    fused, base = _fused(ref), model.state_dict()
    _assert_merged(load_file(tmp_path / "m/diffusion_pytorch_model.safetensors"), fused, base, 3 + 3 + 1 + 1 + 3 + 1)
    bfl = _bfl_state(model)
    bfl["double_blocks.0.txt_attn.proj.weight"] = base["transformer_blocks.0.attn.to_add_out.weight"]
    save_file(bfl, str(tmp_path / "flux1.safetensors"))
    merge(tmp_path / "flux1.safetensors", [load_adapter(tmp_path / "xlabs.safetensors")], tmp_path / "b.safetensors")
    want = _bfl_state(_load_state(flux(), fused))
    want["double_blocks.0.txt_attn.proj.weight"] = fused["transformer_blocks.0.attn.to_add_out.weight"]
    got = load_file(tmp_path / "b.safetensors")
    for k in bfl:
        effect = (want[k] - bfl[k]).abs().max().item()
        assert (got[k] - want[k]).abs().max().item() <= 1e-5 * effect + 1e-7, k


def test_wan_original_names_rename_to_diffusers(tmp_path):
    """Wan LoRAs on the original names — musubi-tuner's `lora_unet_blocks_0_self_attn_q`, ComfyUI's
    `diffusion_model.blocks.0.self_attn.q.lora_A.weight` + `.alpha` — merge into a diffusers WanTransformer3DModel as
    diffusers' WanPipeline.lora_state_dict + load_lora_adapter read them; diffusers-named ones into an original file."""
    model = wan()
    model.save_pretrained(tmp_path / "transformer")
    renames = {d.format(n=n): o.format(n=n) for o, _, ((d, _),) in WAN for n in range(2)}
    shapes = {o: tuple(model.get_submodule(d).weight.shape) for d, o in renames.items()
              if o.startswith("blocks.")}  # musubi's converter reads the blocks only
    state = kohya_lora(shapes, "lora_unet_", 13, rank=2, alpha=3.0)
    save_file(state, str(tmp_path / "musubi.safetensors"))
    comfy = {}
    for o in shapes:
        n = "lora_unet_" + o.replace(".", "_")
        for theirs, ours in (("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"), ("alpha", "alpha")):
            comfy[f"diffusion_model.{o}.{theirs}"] = state[f"{n}.{ours}"]
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    base = model.state_dict()
    for f in ("musubi", "comfy"):
        r = CliRunner().invoke(main, ["merge", str(tmp_path / "transformer"), str(tmp_path / f"{f}.safetensors"),
                                      "-o", str(tmp_path / f"m-{f}")])
        assert r.exit_code == 0, r.output
        ref = wan()
        ref.load_lora_adapter(diffusers.WanPipeline.lora_state_dict(str(tmp_path / f"{f}.safetensors")),
                              prefix="transformer")
        _assert_merged(load_file(tmp_path / f"m-{f}/diffusion_pytorch_model.safetensors"), _fused(ref), base, len(shapes))
    # the reverse: the same LoRA on diffusers' names into the original Wan file
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "musubi.safetensors"), "--to", "diffusers", "--base",
                                  str(tmp_path / "transformer"), "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    original = {f"{renames[k[:-7]]}.weight" if k[:-7] in renames else k: v for k, v in base.items()}
    save_file(original, str(tmp_path / "wan.safetensors"))
    merge(tmp_path / "wan.safetensors", [load_adapter(tmp_path / "d.safetensors")], tmp_path / "o.safetensors")
    got, fused = load_file(tmp_path / "o.safetensors"), _fused(ref)
    for d, o in renames.items():
        if o in shapes:
            assert torch.allclose(got[f"{o}.weight"], fused[f"{d}.weight"], atol=1e-6), o


def test_extract_between_two_pipelines_is_a_diffusers_lora(sd, tmp_path):
    """A fully fine-tuned pipeline against its base: planted rank-2 changes in the UNet and the text encoder come back
    as one diffusers pipeline LoRA (rank 2 recovers them), which diffusers loads and which merges back to the tuned."""
    pipe, _, _, unet, te = sd
    g = torch.Generator().manual_seed(21)
    planted = {}
    tuned_unet, tuned_te = sd_unet(), text_encoder()
    for c, model, pattern in (("unet", tuned_unet, r"attn1\.to_[qv]$|proj_in$|resnets\.0\.conv1$"),
                              ("text_encoder", tuned_te, r"(q|out)_proj$")):  # diffusers infers the TE format
                                                                              # of a kohya file from its out_proj
        for path, shape in linear_modules(model, pattern).items():  # proj_in: a 1×1 conv; conv1: 3×3
            d = (torch.randn(shape[0], 2, generator=g) @ torch.randn(2, math.prod(shape[1:]), generator=g) * 0.1)
            model.get_submodule(path).weight.data += d.reshape(shape)
            planted[f"{c}.{path}"] = d.reshape(shape)
    convs3 = {n for n, d in planted.items() if d.shape[2:] == (3, 3)}
    assert convs3 and any(d.shape[2:] == (1, 1) for d in planted.values())
    tuned = save_pipeline(tmp_path / "tuned", {"unet": tuned_unet, "text_encoder": tuned_te})
    r = CliRunner().invoke(main, ["extract", str(tuned), str(pipe), "--rank", "2", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 0, r.output
    x = load_adapter(tmp_path / "x.safetensors")  # 3×3 kernels only when --targets names them
    assert x.format == "diffusers" and set(x.modules) == set(planted) - convs3
    r = CliRunner().invoke(main, ["extract", str(tuned), str(pipe), "--rank", "2", "--targets",
                                  r"attn1\.to_|proj_in|conv1|_proj\.", "-o", str(tmp_path / "x.safetensors"), "--force"])
    assert r.exit_code == 0, r.output
    x = load_adapter(tmp_path / "x.safetensors")
    assert set(x.modules) == set(planted)
    for name, d in planted.items():
        assert torch.allclose(x.modules[name].delta(torch.float64).float().reshape(d.shape), d, atol=1e-5), name
    back = sd_unet()
    back.load_lora_adapter(str(tmp_path / "x.safetensors"), prefix="unet", use_safetensors=True)
    _assert_merged(_fused(back), tuned_unet.state_dict(), unet.state_dict(), 4)
    merge(pipe, [x], tmp_path / "m")
    for c, model, f in (("unet", tuned_unet, "diffusion_pytorch_model"), ("text_encoder", tuned_te, "model")):
        got, want = load_file(tmp_path / "m" / c / f"{f}.safetensors"), model.state_dict()
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in got), c
    r = CliRunner().invoke(main, ["extract", str(tuned), str(pipe), "--rank", "2", "--format", "kohya",
                                  "-o", str(tmp_path / "k.safetensors")])  # kohya's names, read back by diffusers
    assert r.exit_code == 0, r.output
    k = load_file(tmp_path / "k.safetensors")
    assert any(n.startswith("lora_te_text_model_") for n in k) and any(n.startswith("lora_unet_") for n in k)
    back, back_te = sd_unet(), text_encoder()
    _kohya_reference(k, back, back_te)
    _assert_merged(_fused(back_te), tuned_te.state_dict(), te.state_dict(), 4)
    r = CliRunner().invoke(main, ["extract", str(tuned), str(pipe / "unet"), "--rank", "2", "-o", str(tmp_path / "y")])
    assert r.exit_code == 1 and "give two pipelines or two component folders" in r.output
    for ft, bs in ((tuned, pipe), (tuned / "unet", pipe / "unet")):  # diffusers' loaders are not made to place them
        r = CliRunner().invoke(main, ["extract", str(ft), str(bs), "--rank", "2", "--carry-changed", "-o",
                                      str(tmp_path / "y")])
        assert r.exit_code == 1 and "a diffusion model's are not carried" in r.output and len(
            r.output.strip().splitlines()) == 1 and not (tmp_path / "y").exists(), r.output
    assert not (tmp_path / "y").exists()


def test_bad_diffusion_adapter_files_are_one_line(tmp_path):
    """Each malformed layout read this session is refused with one line naming the problem, exit 1, nothing written."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    flux_up = torch.randn(7, 2, generator=g)  # 7 rows: no three equal projections
    m = "transformer.transformer_blocks.0.attn.to_q"
    cases = {
        "alpha-and-config": ({f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B, f"{m}.alpha": torch.tensor(2.0)},
                             {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 2})},
                             "has both a config and per-module .alpha keys"),
        "stray-alpha": ({f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B, f"{m}.alpha": torch.tensor(2.0),
                         "transformer.proj_out.alpha": torch.tensor(2.0)}, None, ".alpha key for proj_out"),
        "zero-alpha": ({f"{m}.lora_A.weight": A, f"{m}.lora_B.weight": B, f"{m}.alpha": torch.tensor(0.0)}, None,
                       "alpha must be one positive number"),
        "legacy-and-peft": ({"unet.x.attn1.processor.to_q_lora.down.weight": A,
                             "unet.x.attn1.processor.to_q_lora.up.weight": B,
                             "unet.x.attn1.to_q.lora_A.weight": A, "unet.x.attn1.to_q.lora_B.weight": B}, None,
                            "holds both legacy and PEFT keys for unet.x.attn1.to_q.lora_A.weight"),
        "xlabs-unknown": ({"double_blocks.0.processor.qkv_lora1.down.weight": A,
                           "double_blocks.0.processor.qkv_lora1.up.weight": B,
                           "double_blocks.0.processor.mystery.down.weight": A}, None,
                          "double_blocks.0.processor.mystery.down.weight is not an XLabs Flux LoRA key"),
        "xlabs-rows": ({"double_blocks.0.processor.qkv_lora1.down.weight": A,
                        "double_blocks.0.processor.qkv_lora1.up.weight": flux_up}, None,
                       "7 rows do not split into 3 equal projections"),
    }
    for name, (state, meta, why) in cases.items():
        f = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone() for k, v in state.items()}, str(f), metadata=meta)
        out = tmp_path / f"{name}-out.safetensors"
        r = CliRunner().invoke(main, ["squeeze", str(f), "--rank", "1", "-o", str(out)])
        assert r.exit_code == 1 and why in r.output and r.output.count("error:") == 1, (name, r.output)
        assert not out.exists(), name


class _Pipe(StableDiffusionLoraLoaderMixin):
    """The two models an SD pipeline loads LoRAs into, with the pipeline's own `load_lora_weights`."""

    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder, self.hf_device_map = unet, text_encoder, None

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def test_diffusers_files_mean_the_same_with_and_without_their_metadata(sd, tmp_path):
    """A kohya LoRA with alpha ≠ r (scales 0.5 and 2) written as a diffusers file: diffusers' load_lora_adapter
    without use_safetensors=True reads no metadata (alpha = r), with it the metadata, and pipe.load_lora_weights its
    own way — all three must give diffusers' reading of the kohya original. So must squeeze's and combine's files."""
    pipe, lora, state, unet, te = sd
    ref_unet, ref_te = sd_unet(), text_encoder()
    _kohya_reference(state, ref_unet, ref_te)
    ref_u, ref_t = _fused(ref_unet), _fused(ref_te)
    run = CliRunner().invoke
    r = run(main, ["convert", str(lora), "--to", "diffusers", "--base", str(pipe), "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    f = str(tmp_path / "d.safetensors")
    for kwargs in ({}, {"use_safetensors": True}):
        got = sd_unet()
        got.load_lora_adapter(f, prefix="unet", **kwargs)
        _assert_merged(_fused(got), ref_u, unet.state_dict(), 40)
    p = _Pipe(sd_unet(), text_encoder())
    p.load_lora_weights(f)
    _assert_merged(_fused(p.unet), ref_u, unet.state_dict(), 40)
    _assert_merged(_fused(p.text_encoder), ref_t, te.state_dict(), 12)
    # squeeze at full rank and a combine with weights 1 and 0 are the same update, in diffusers files of their own
    r = run(main, ["squeeze", f, "--rank", "3", "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    r = run(main, ["combine", f, f, "--weight", "1", "--weight", "0", "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    for out in ("s.safetensors", "c.safetensors"):
        for kwargs in ({}, {"use_safetensors": True}):
            got = sd_unet()
            got.load_lora_adapter(str(tmp_path / out), prefix="unet", **kwargs)
            _assert_merged(_fused(got), ref_u, unet.state_dict(), 40)


def test_a_second_transformer_is_addressed_by_its_own_prefix(tmp_path):
    """Wan 2.2 pipelines hold two denoisers, `transformer` and `transformer_2`. PEFT keys under `transformer_2.`
    update that component only (they were refused: "matches several base tensors", the same path being in both);
    kohya keys, which name no component, go to `transformer`, as diffusers' load_lora_weights loads them."""
    pipe = save_pipeline(tmp_path / "pipe", {"transformer": wan(0), "transformer_2": wan(1)})
    shapes = linear_modules(wan(0), r"blocks\.0\.attn1\.to_q$")
    g = torch.Generator().manual_seed(2)
    lora = {}
    for c in ("transformer", "transformer_2"):
        for p, (o, i) in shapes.items():
            lora[f"{c}.{p}.lora_A.weight"] = torch.randn(2, i, generator=g)
            lora[f"{c}.{p}.lora_B.weight"] = torch.randn(o, 2, generator=g)
    save_file(lora, str(tmp_path / "two.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(pipe), str(tmp_path / "two.safetensors"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    for c in ("transformer", "transformer_2"):
        base = load_file(str(pipe / c / "diffusion_pytorch_model.safetensors"))
        got = load_file(str(tmp_path / "m" / c / "diffusion_pytorch_model.safetensors"))
        for p in shapes:
            want = base[f"{p}.weight"] + lora[f"{c}.{p}.lora_B.weight"] @ lora[f"{c}.{p}.lora_A.weight"]
            torch.testing.assert_close(got[f"{p}.weight"], want, rtol=0, atol=1e-6)
        assert sum(not torch.equal(got[k], base[k]) for k in base) == len(shapes)
    save_file(kohya_lora(shapes, "lora_unet_", 1), str(tmp_path / "k.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(pipe), str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "mk")])
    assert r.exit_code == 0 and "transformer: 1 tensor(s) merged" in r.output, r.output
    assert tree_digest(tmp_path / "mk" / "transformer_2") == tree_digest(pipe / "transformer_2")
    # a diffusers file has no prefix for transformer_2 (its loaders would drop those keys): one line, nothing written
    r = CliRunner().invoke(main, ["combine", str(tmp_path / "two.safetensors"), str(tmp_path / "two.safetensors"),
                                  "--base", str(pipe), "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 1 and "in component transformer_2, which diffusers' LoRA files have no prefix" in r.output
    assert not (tmp_path / "c.safetensors").exists()
