"""Readers and writers: key variants, configs, kohya alpha, corrupt files, atomic and safe writes."""
import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery import FixedRank, SurgeryError, detect, load_adapter, save_adapter, squeeze
from surgery.io import peft as peft_io
from surgery.io.safetensors_file import read_header
from surgery_cli.main import main

from .conftest import KOHYA_FIXTURE, PEFT_FIXTURE, lora_pair, tree_digest, write_peft


@pytest.mark.parametrize("prefix,adapter_name", [("base_model.model.", None), ("", None), ("base_model.model.", "default")])
def test_peft_key_variants(tmp_path, prefix, adapter_name):
    pairs = {"model.layers.0.q_proj": lora_pair(8, 6, 4)}
    d = write_peft(tmp_path / "a", pairs, r=4, alpha=8, prefix=prefix, adapter_name=adapter_name)
    a = load_adapter(d)
    (name,) = a.modules
    assert name == f"{prefix}model.layers.0.q_proj"
    assert a.modules[name].scale == 2.0 and not a.passthrough
    save_adapter(a, tmp_path / "o")
    keys = set(load_file(str(tmp_path / "o" / "adapter_model.safetensors")))  # PEFT loads only prefixed keys
    assert keys == {"base_model.model.model.layers.0.q_proj.lora_A.weight",
                    "base_model.model.model.layers.0.q_proj.lora_B.weight"}


def test_rank_alpha_patterns_and_rslora(tmp_path):
    pairs = {"model.layers.0.q_proj": lora_pair(8, 6, 4), "model.layers.1.q_proj": lora_pair(8, 6, 2, seed=1)}
    cfg = {"rank_pattern": {"layers.1.q_proj": 2}, "alpha_pattern": {"layers.1.q_proj": 3}, "use_rslora": True}
    a = load_adapter(write_peft(tmp_path / "a", pairs, r=4, alpha=8, config=cfg))
    assert a.modules["base_model.model.model.layers.0.q_proj"].scale == pytest.approx(8 / 2)
    assert a.modules["base_model.model.model.layers.1.q_proj"].scale == pytest.approx(3 / math.sqrt(2))
    small, _ = squeeze(a, FixedRank(1), device="cpu")
    save_adapter(small, tmp_path / "o")
    back = load_adapter(tmp_path / "o")  # the same updates, at one scale (vLLM reads no alpha_pattern)
    assert len({m.scale for m in back.modules.values()}) == 1
    for n, m in small.modules.items():
        assert torch.allclose(back.modules[n].delta(torch.float64), m.delta(torch.float64), rtol=1e-6, atol=1e-7)


def test_config_rank_mismatch(tmp_path):
    d = write_peft(tmp_path / "a", {"m.q_proj": lora_pair(8, 6, 4)}, r=8, alpha=8)
    with pytest.raises(SurgeryError, match="rank 4 in its tensors but the config gives r=8"):
        load_adapter(d)


def test_written_patterns_resolve_in_peft(tmp_path):
    """Names that PEFT's unescaped patterns would confuse ('.' matches '_') are escaped."""
    from peft.utils.other import get_pattern_key

    pairs = {"model.layers_1.q": lora_pair(8, 6, 4), "model.layers.1.q": lora_pair(8, 6, 4, seed=1),
             "x.model.layers.1.q": lora_pair(8, 6, 4, seed=2), "y.q": lora_pair(8, 6, 4, seed=3)}
    a = load_adapter(write_peft(tmp_path / "a", pairs, r=4, alpha=4))
    ranks = {"base_model.model.model.layers_1.q": 1, "base_model.model.model.layers.1.q": 2,
             "base_model.model.x.model.layers.1.q": 3, "base_model.model.y.q": 3}
    modules = {n: squeeze(a, FixedRank(ranks[n]), device="cpu")[0].modules[n] for n in a.modules}
    cfg = peft_io.updated_config(a.with_modules(modules))
    for n, k in ranks.items():
        key = n.removeprefix("base_model.model.")
        assert cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), key), cfg["r"]) == k
        assert cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), key), cfg["lora_alpha"]) == k


def test_peft_file_with_and_without_config(tmp_path):
    B, A = lora_pair(8, 6, 4)
    save_file({"m.q_proj.lora_A.weight": A, "m.q_proj.lora_B.weight": B}, str(tmp_path / "bare.safetensors"))
    a = load_adapter(tmp_path / "bare.safetensors")
    assert a.format == "peft-file" and a.modules["m.q_proj"].scale == 1.0 and a.notes
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2, "peft_type": "LORA",
                                                        "target_modules": ["q_proj"]})}
    save_file({"m.q_proj.lora_A.weight": A, "m.q_proj.lora_B.weight": B}, str(tmp_path / "d.safetensors"), metadata=meta)
    a = load_adapter(tmp_path / "d.safetensors")
    assert a.modules["m.q_proj"].scale == 0.5 and not a.notes
    small, _ = squeeze(a, FixedRank(2), device="cpu")
    save_adapter(small, tmp_path / "o.safetensors")
    back = load_adapter(tmp_path / "o.safetensors")
    # a single file holds its scale in the factors (alpha = r): read with or without its config, the same ΔW
    assert back.modules["m.q_proj"].rank == 2 and back.modules["m.q_proj"].scale == 1.0
    assert back.config["lora_alpha"] == back.config["r"] == 2
    assert torch.allclose(back.modules["m.q_proj"].delta(), small.modules["m.q_proj"].delta(), atol=1e-6)


def test_format_conversions(tmp_path):
    a = load_adapter(PEFT_FIXTURE)
    save_adapter(a, tmp_path / "f.safetensors", format="peft-file")
    b = load_adapter(tmp_path / "f.safetensors")
    assert b.format == "peft-file" and set(b.modules) == set(a.modules)
    for n in a.modules:  # scale 2 (a power of two) folded into B: exact
        assert b.modules[n].scale == 1.0 and a.modules[n].scale == 2.0
        assert torch.equal(b.modules[n].factors()[0], 2 * a.modules[n].factors()[0])
        assert torch.equal(b.modules[n].delta(), a.modules[n].delta())
    save_adapter(a, tmp_path / "k.safetensors", format="kohya")
    k = load_adapter(tmp_path / "k.safetensors")
    assert "lora_model_layers_0_self_attn_q_proj" in k.modules
    n = "base_model.model.model.layers.0.self_attn.q_proj"
    assert torch.allclose(k.modules["lora_model_layers_0_self_attn_q_proj"].delta(), a.modules[n].delta())
    with pytest.raises(SurgeryError, match="base model"):
        save_adapter(load_adapter(KOHYA_FIXTURE), tmp_path / "p", format="peft")


def test_kohya_round_trip_and_alpha(tmp_path):
    a = load_adapter(KOHYA_FIXTURE)
    assert a.format == "kohya" and all(m.scale == 0.5 for m in a.modules.values())
    save_adapter(a, tmp_path / "same.safetensors")
    src, dst = load_file(str(KOHYA_FIXTURE)), load_file(str(tmp_path / "same.safetensors"))
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    assert all(dst[k].shape == () and dst[k].dtype == torch.float16 for k in dst if k.endswith(".alpha"))
    small, _ = squeeze(a, FixedRank(3), device="cpu")
    save_adapter(small, tmp_path / "s.safetensors")
    t = load_file(str(tmp_path / "s.safetensors"))
    assert float(t["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.5  # scale 0.5 kept at rank 3
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert meta["ss_network_module"] == "networks.lora"


def test_kohya_alpha_variants(tmp_path):
    B, A = lora_pair(8, 6, 4, dtype=torch.float16)
    t = {"n1.lora_up.weight": B, "n1.lora_down.weight": A, "n1.alpha": torch.tensor([2.0]),  # LyCORIS [1] shape
         "n2.lora_up.weight": B.clone(), "n2.lora_down.weight": A.clone(),  # no alpha: scale 1
         "n3.lora_up.weight": B.clone(), "n3.lora_down.weight": A.clone(), "n3.alpha": torch.tensor(0.0)}  # 0: alpha = r
    save_file(t, str(tmp_path / "k.safetensors"))
    a = load_adapter(tmp_path / "k.safetensors")
    assert [a.modules[n].scale for n in ("n1", "n2", "n3")] == [0.5, 1.0, 1.0]
    # a scale whose alpha fp16 cannot hold exactly is written as float32
    small, _ = squeeze(a.with_modules({"n1": a.modules["n1"].__class__(A=A, B=B, scale=1 / 3)}), FixedRank(2), device="cpu")
    save_adapter(small, tmp_path / "o.safetensors")
    o = load_file(str(tmp_path / "o.safetensors"))
    assert o["n1.alpha"].dtype == torch.float32 and float(o["n1.alpha"]) / 2 == pytest.approx(1 / 3, rel=1e-7)


def test_kohya_hash_metadata_recomputed(tmp_path):
    B, A = lora_pair(8, 6, 4, dtype=torch.float16)
    save_file({"n.lora_up.weight": B, "n.lora_down.weight": A, "n.alpha": torch.tensor(4.0).half()},
              str(tmp_path / "k.safetensors"), metadata={"ss_network_dim": "4", "sshs_model_hash": "stale"})
    small, _ = squeeze(load_adapter(tmp_path / "k.safetensors"), FixedRank(2), device="cpu")
    save_adapter(small, tmp_path / "o.safetensors")
    import hashlib
    from safetensors.torch import save as to_bytes

    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    blob = to_bytes(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    n = struct.unpack("<Q", blob[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest() != "stale"


@pytest.mark.parametrize("keys,message", [
    ({"n.hada_w1_a": (4, 2)}, "n: half 1 needs w1_a and w1_b"),
    ({"n.hada_w1_a": (8, 4), "n.hada_w1_b": (4, 6), "n.hada_w2_a": (8, 4), "n.hada_w2_b": (3, 6)},
     "n: w2_a and w2_b do not compose"),
    ({"n.hada_w1_a": (8, 4), "n.hada_w1_b": (4, 6), "n.hada_w2_a": (8, 4), "n.hada_w2_b": (4, 5)},
     "n: its two Hadamard halves have different shapes"),
    ({"n.lokr_w1": (2, 2), "n.lokr_w1_a": (2, 1)}, "W1 must be lokr_w1 or a lokr_w1_a, lokr_w1_b pair"),
    ({"n.lokr_w1": (2, 2), "n.lokr_w2_a": (4, 2), "n.lokr_w2_b": (2, 3), "n.lokr_t2": (2, 3, 3, 3)},
     "Tucker core t2 does not compose"),
    ({"n.lora_up.weight": (8, 4, 1, 1), "n.lora_down.weight": (4, 6, 1, 1), "n.lora_mid.weight": (4, 3, 3, 3)},
     r"lora_mid \[4, 3, 3, 3\] does not compose"),
    ({"n.lora_up.weight": (8, 4), "n.hada_w1_a": (8, 4)}, "n mixes tensors of loha and lora"),
    ({"n.a1.weight": (4, 4)}, "belongs to GLoRA"),
    ({"n.oft_blocks": (4, 4, 4)}, "belongs to OFT"),
    ({"n.oft_R": (4, 4)}, "belongs to BOFT"),
    ({"n.on_input": ()}, "belongs to IA³"),
])
def test_lycoris_files_that_do_not_compose_or_are_not_read(tmp_path, keys, message):
    """Each bad LyCORIS file: one error naming the file, the module and what is wrong (or the algorithm)."""
    save_file({k: torch.randn(s) for k, s in keys.items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SurgeryError, match=message) as e:
        load_adapter(tmp_path / "x.safetensors")
    assert str(tmp_path / "x.safetensors") in str(e.value)


def _valid_file(tmp_path):
    B, A = lora_pair(8, 6, 4)
    p = tmp_path / "v.safetensors"
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": B}, str(p))
    return p


def _bad_files(tmp_path):
    good = _valid_file(tmp_path).read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    cases = {
        "truncated": good[:-10],
        "short": b"\x01\x02",
        "huge header": struct.pack("<Q", 10**12) + good[8:],
        "not json": struct.pack("<Q", 6) + b"{nope}" ,
        "json list": struct.pack("<Q", 8) + b"[1,2,3] ",
        "gap": good[:8] + good[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1) + good[8 + n:],
        "zip pickle": b"PK\x03\x04" + b"\x00" * 100,
        "raw pickle": b"\x80\x02" + b"\x00" * 100,
    }
    return cases


@pytest.mark.parametrize("case", ["truncated", "short", "huge header", "not json", "json list", "gap", "zip pickle", "raw pickle"])
def test_corrupt_files_are_refused(tmp_path, case):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(_bad_files(tmp_path)[case])
    with pytest.raises(SurgeryError) as e:
        load_adapter(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    assert ("pickle" in msg) == ("pickle" in case)


def test_pickle_extension_and_dirs(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02junk")
    with pytest.raises(SurgeryError, match="never unpickles"):
        load_adapter(tmp_path / "adapter_model.bin")
    with pytest.raises(SurgeryError, match="never unpickles"):
        load_adapter(tmp_path)
    with pytest.raises(SurgeryError, match="no such file"):
        load_adapter(tmp_path / "missing.safetensors")
    d = tmp_path / "noconf"
    d.mkdir()
    _valid_file(d).rename(d / "adapter_model.safetensors")
    with pytest.raises(SurgeryError, match="adapter_config.json is missing"):
        load_adapter(d)


def test_shape_mismatch_and_missing_factor(tmp_path):
    B, A = lora_pair(8, 6, 4)
    save_file({"m.q.lora_A.weight": A, "m.q.lora_B.weight": B[:, :3].contiguous()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(SurgeryError, match="m.q: A has rank 4.*B has 3 columns"):
        load_adapter(tmp_path / "x.safetensors")
    save_file({"m.q.lora_A.weight": A}, str(tmp_path / "y.safetensors"))
    with pytest.raises(SurgeryError, match="m.q is missing its B"):
        load_adapter(tmp_path / "y.safetensors")
    save_file({"something.else": A}, str(tmp_path / "z.safetensors"))
    with pytest.raises(SurgeryError, match="no adapter tensors found"):
        load_adapter(tmp_path / "z.safetensors")


def test_lazy_read_holds_references(adapter_dir):
    from surgery.adapter import TensorRef

    a = load_adapter(adapter_dir)
    assert all(isinstance(m.A, TensorRef) and isinstance(m.B, TensorRef) for m in a.modules.values())


def test_reference_reads_the_file_as_it_is_now(tmp_path):
    """A reference reads its bytes where the header said (no second header parse) only while the file is the
    one that header came from: a file rewritten at the same path (in place or replaced) is read anew."""
    from surgery.io.safetensors_file import tensor_refs

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(5.0), "x": torch.ones(3, 4, dtype=torch.bfloat16)}, str(path))
    ref = tensor_refs(path)[0]["x"]
    assert ref.offset is not None
    assert torch.equal(ref.load(), torch.ones(3, 4, dtype=torch.bfloat16))
    save_file({"x": torch.full((3, 4), 2.0, dtype=torch.bfloat16)}, str(path))  # in place, other offsets
    assert torch.equal(ref.load(), torch.full((3, 4), 2.0, dtype=torch.bfloat16))
    save_file({"a": torch.zeros(5), "x": torch.full((3, 4), 3.0, dtype=torch.bfloat16)},
              str(tmp_path / "new.safetensors"))
    (tmp_path / "new.safetensors").replace(path)
    assert torch.equal(ref.load(), torch.full((3, 4), 3.0, dtype=torch.bfloat16))


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch, adapter_dir):
    import surgery.io.peft as p

    a = load_adapter(adapter_dir)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(p, "save_tensors", boom)
    with pytest.raises(SurgeryError, match=r"out: cannot write the output \(No space left on device\)"):
        save_adapter(a, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [q.name for q in tmp_path.iterdir()] == ["adapter"]


def test_refuses_to_overwrite_input(adapter_dir, tmp_path):
    before = tree_digest(adapter_dir)
    a = load_adapter(adapter_dir)
    small, _ = squeeze(a, FixedRank(2), device="cpu")
    for force in (False, True):
        with pytest.raises(SurgeryError, match="is an input"):
            save_adapter(small, adapter_dir, force=force)
    assert tree_digest(adapter_dir) == before


def test_header_is_read_without_tensors(tmp_path):
    header, meta = read_header(_valid_file(tmp_path))
    assert set(header) == {"m.q.lora_A.weight", "m.q.lora_B.weight"} and meta == {}
    assert detect(PEFT_FIXTURE) == "peft" and detect(KOHYA_FIXTURE) == "kohya"
    assert detect(PEFT_FIXTURE / "adapter_model.safetensors") == "peft"


def test_bytes_deterministic_with_several_metadata_keys(tmp_path):
    """safetensors' own writer orders __metadata__ at random; ours sorts it (kohya files carry many ss_* keys)."""
    a = load_adapter(KOHYA_FIXTURE)
    outs = []
    for i in range(3):
        small, _ = squeeze(a, FixedRank(3), device="cpu")
        save_adapter(small, tmp_path / f"k{i}.safetensors")
        outs.append((tmp_path / f"k{i}.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    with safe_open(str(tmp_path / "k0.safetensors"), "pt") as f:  # and safetensors reads it
        assert f.metadata()["ss_network_dim"] == "3" and len(list(f.keys())) == 18


def test_float8_factors_are_read_and_written_as_stored(tmp_path):
    """A LoRA stored in float8 (as some ComfyUI users keep them) was a traceback (torch has no min/max for
    float8, and no float8 → float32 type promotion). Its factors are read as they are, and every command computes
    with their float64 values: the folded file equals scale · B @ A exactly (scale 4, a power of two), a merge
    is W + ΔW rounded once, a squeeze the float64 truncation."""
    B, A = lora_pair(24, 20, 4, decay=0.5)
    d = write_peft(tmp_path / "f8", {"m.q_proj": (B.to(torch.float8_e4m3fn), A.to(torch.float8_e4m3fn))}, r=4,
                   alpha=16)
    raw = load_file(str(d / "adapter_model.safetensors"))
    B8, A8 = (raw[f"base_model.model.m.q_proj.lora_{x}.weight"].double() for x in "BA")
    delta = 4 * B8 @ A8

    a = load_adapter(d)
    save_adapter(a, tmp_path / "f.safetensors", format="peft-file")
    out = load_file(str(tmp_path / "f.safetensors"))
    assert {t.dtype for t in out.values()} == {torch.float8_e4m3fn}
    assert torch.equal(out["base_model.model.m.q_proj.lora_B.weight"].double() @
                       out["base_model.model.m.q_proj.lora_A.weight"].double(), delta)

    W = torch.randn(24, 20, dtype=torch.float32)
    save_file({"m.q_proj.weight": W}, str(tmp_path / "base.safetensors"))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "base.safetensors"), str(d), "-o",
                                  str(tmp_path / "m.safetensors")])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["m.q_proj.weight"], (W.double() + delta).float())

    small, _ = squeeze(a, FixedRank(2), device="cpu", dtype=torch.float64, compute_dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(delta)  # (computed in float32, the truncation is 1e-7 off on some CPUs)
    assert torch.allclose(small.modules["base_model.model.m.q_proj"].delta(torch.float64),
                          U[:, :2] * S[:2] @ Vh[:2], atol=1e-12)
