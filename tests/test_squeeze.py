"""squeeze against float64 dense references, read back from the files it writes."""
import json

import pytest
import torch

from surgery.adapter import materialize
from surgery import Budget, Energy, FixedRank, SurgeryError, load_adapter, parse_rank_map, save_adapter, squeeze

from .conftest import KOHYA_FIXTURE, dense_truncation, lora_pair, write_peft


def deltas(adapter):
    return {n: m.delta() for n, m in adapter.modules.items()}


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("method", ["exact", "rsvd"])
def test_squeeze_equals_dense_truncation(adapter_dir, tmp_path, k, method):
    a = load_adapter(adapter_dir)
    small, report = squeeze(a, FixedRank(k), method=method, device="cpu")
    save_adapter(small, tmp_path / "out")
    back = load_adapter(tmp_path / "out")
    ref = deltas(a)
    tol = 1e-5 if method == "exact" else 1e-4
    for r in report.modules:
        m = back.modules[r.name]
        assert m.rank == k and r.new_rank == k and r.old_rank == 8
        want = dense_truncation(ref[r.name], k)
        got = m.delta()
        assert float((got - want).norm() / ref[r.name].norm()) < tol
        measured = float((ref[r.name] - got).norm() / ref[r.name].norm())
        assert r.rel_error == pytest.approx(measured, abs=1e-5)
        S = torch.linalg.svdvals(ref[r.name])
        assert r.energy_kept == pytest.approx(float(S[:k].square().sum() / S.square().sum()), abs=1e-6)
        assert r.params_after == k * (m.in_features + m.out_features)


def test_full_rank_squeeze_is_lossless(adapter_dir):
    a = load_adapter(adapter_dir)
    full, report = squeeze(a, FixedRank(8), device="cpu")
    for name, d in deltas(a).items():
        assert float((full.modules[name].delta() - d).norm() / d.norm()) < 1e-6
    assert all(r.rel_error < 1e-6 and r.energy_kept == pytest.approx(1.0) for r in report.modules)


def test_eckart_young_optimal(adapter_dir):
    a = load_adapter(adapter_dir)
    small, report = squeeze(a, FixedRank(3), device="cpu")
    g = torch.Generator().manual_seed(0)
    for r in report.modules:
        d = a.modules[r.name].delta()
        S = torch.linalg.svdvals(d)
        assert r.rel_error == pytest.approx(float(S[3:].square().sum().sqrt() / S.square().sum().sqrt()), rel=1e-5)
        for _ in range(5):  # no other rank-3 matrix does better
            U, _, Vh = torch.linalg.svd(d + 0.1 * torch.randn(d.shape, generator=g, dtype=torch.float64))
            other = U[:, :3] @ U[:, :3].T @ d
            assert float((d - other).norm() / d.norm()) >= r.rel_error - 1e-9


def test_energy_rule_keeps_threshold(adapter_dir):
    a = load_adapter(adapter_dir)
    _, report = squeeze(a, Energy(0.9), device="cpu")
    for r in report.modules:
        assert r.energy_kept >= 0.9 - 1e-9
        d = a.modules[r.name].delta()
        S2 = torch.linalg.svdvals(d).square()
        assert r.new_rank == 1 or float(S2[: r.new_rank - 1].sum() / S2.sum()) < 0.9


def test_budget_rule(adapter_dir):
    a = load_adapter(adapter_dir)
    budget = 400
    small, report = squeeze(a, Budget(budget), device="cpu")
    assert report.params_after <= budget
    uniform, ureport = squeeze(a, FixedRank(1), device="cpu")
    assert ureport.params_after <= budget
    assert report.rel_error < ureport.rel_error
    with pytest.raises(SurgeryError, match="too small"):
        squeeze(a, Budget(50), device="cpu")


def test_rank_map_heterogeneous(adapter_dir, tmp_path):
    a = load_adapter(adapter_dir)
    small, report = squeeze(a, parse_rank_map(["mlp=2", "q_proj=5"]), device="cpu")
    ranks = {r.name.split(".")[-1]: r.new_rank for r in report.modules}
    assert ranks == {"q_proj": 5, "v_proj": 8, "up_proj": 2, "down_proj": 2}
    save_adapter(small, tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    from peft.utils.other import get_pattern_key

    for name, m in load_adapter(tmp_path / "o").modules.items():
        key = name.removeprefix("base_model.model.")
        r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), key), cfg["r"])
        alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), key), cfg["lora_alpha"])
        assert r == m.rank and alpha / r == pytest.approx(2.0)


def test_rank_above_current_is_an_upper_bound_and_nonpositive_refused(adapter_dir):
    """--rank K bounds the rank, as kohya's resize: modules already at rank ≤ K are kept as they are, and listed."""
    a = load_adapter(adapter_dir)
    small, report = squeeze(a, FixedRank(9), device="cpu")
    for n, m in a.modules.items():
        assert small.modules[n].rank == 8 and torch.equal(small.modules[n].B, materialize(m.B))
    assert all(r.rel_error == 0.0 for r in report.modules) and any("4 module(s) already" in w for w in report.warnings)
    with pytest.raises(SurgeryError, match="at least 1"):
        squeeze(a, FixedRank(0), device="cpu")
    small, report = squeeze(a, parse_rank_map("q_proj=12,v_proj=3"), device="cpu")  # the docstring's string form
    assert [small.modules[n].rank for n in sorted(a.modules)] == [8, 8, 8, 3]
    assert any("1 module(s) already" in w and "q_proj" in w for w in report.warnings)
    with pytest.raises(SurgeryError, match="energy"):
        squeeze(a, Energy(1.5), device="cpu")


def test_nan_factor_names_module(tmp_path):
    B, A = lora_pair(8, 8, 4)
    B[2, 1] = float("nan")
    d = write_peft(tmp_path / "nan", {"m.bad_proj": (B, A), "m.ok_proj": lora_pair(8, 8, 4)}, r=4, alpha=4)
    with pytest.raises(SurgeryError, match="m.bad_proj.*NaN"):
        squeeze(load_adapter(d), FixedRank(2), device="cpu")


def test_deterministic_bytes(adapter_dir, tmp_path):
    a = load_adapter(adapter_dir)
    for method in ("exact", "rsvd"):
        outs = []
        for i in range(2):
            small, _ = squeeze(a, FixedRank(3), method=method, seed=5, device="cpu")
            save_adapter(small, tmp_path / f"{method}{i}")
            outs.append((tmp_path / f"{method}{i}" / "adapter_model.safetensors").read_bytes())
        assert outs[0] == outs[1]


def test_dtypes_and_float64_compute(tmp_path):
    pairs = {"l.q_proj": tuple(t.to(torch.bfloat16) for t in lora_pair(32, 48, 8, seed=3))}
    d = write_peft(tmp_path / "bf", pairs, r=8, alpha=8)
    a = load_adapter(d)
    keep, _ = squeeze(a, FixedRank(4), device="cpu")
    assert keep.modules["base_model.model.l.q_proj"].A.dtype == torch.bfloat16
    f32, _ = squeeze(a, FixedRank(4), dtype="float32", compute_dtype="float64", device="cpu")
    m = f32.modules["base_model.model.l.q_proj"]
    assert m.A.dtype == torch.float32
    ref = dense_truncation(a.modules["base_model.model.l.q_proj"].delta(), 4)
    assert float((m.delta() - ref).norm() / ref.norm()) < 1e-6
    # bf16 storage: one rounding, so the error is bf16's relative precision, not more
    k = keep.modules["base_model.model.l.q_proj"]
    assert float((k.delta() - ref).norm() / ref.norm()) < 2e-2


def test_conv_kohya_squeeze(tmp_path):
    a = load_adapter(KOHYA_FIXTURE)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert a.modules[conv].kind == "conv"
    small, report = squeeze(a, FixedRank(3), device="cpu")
    save_adapter(small, tmp_path / "k.safetensors")
    back = load_adapter(tmp_path / "k.safetensors")
    m = back.modules[conv]
    assert tuple(m.A.shape) == (3, 16, 3, 3) and tuple(m.B.shape) == (32, 3, 1, 1)
    ref = dense_truncation(a.modules[conv].delta(), 3)
    assert float((m.delta() - ref).norm() / ref.norm()) < 2e-3  # fp16 storage


def test_dora_embedding_bias_and_passthrough(tmp_path):
    B, A = lora_pair(16, 12, 6, seed=1)
    eB, eA = lora_pair(10, 50, 6, seed=2)  # embedding: A (r, num_embeddings), B (dim, r)
    magnitude = torch.rand(16)
    head = torch.randn(7, 10)
    extra = {
        "base_model.model.m.q_proj.lora_magnitude_vector": magnitude,
        "base_model.model.embed.lora_embedding_A": eA,
        "base_model.model.embed.lora_embedding_B": eB,
        "base_model.model.embed.lora_magnitude_vector": torch.rand(10),  # PEFT's DoRA: every module has one
        "base_model.model.score.weight": head,
    }
    d = write_peft(tmp_path / "d", {"m.q_proj": (B, A)}, r=6, alpha=12, extra=extra,
                   config={"use_dora": True, "target_modules": ["q_proj", "embed"], "modules_to_save": ["score"]})
    a = load_adapter(d)
    assert a.modules["base_model.model.embed"].kind == "embedding"
    assert a.modules["base_model.model.m.q_proj"].dora
    small, report = squeeze(a, FixedRank(2), device="cpu")
    assert any("DoRA" in w for w in report.warnings)
    save_adapter(small, tmp_path / "o")
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert torch.equal(t["base_model.model.m.q_proj.lora_magnitude_vector"], magnitude)
    assert torch.equal(t["base_model.model.score.weight"], head)
    assert t["base_model.model.embed.lora_embedding_A"].shape == (2, 50)
    assert t["base_model.model.embed.lora_embedding_B"].shape == (10, 2)


def test_zero_update_squeezes_to_zero(tmp_path):
    B = torch.zeros(8, 4)
    A = torch.randn(4, 8)
    d = write_peft(tmp_path / "z", {"m.q_proj": (B, A)}, r=4, alpha=8)
    small, report = squeeze(load_adapter(d), Energy(0.95), device="cpu")
    m = small.modules["base_model.model.m.q_proj"]
    assert m.rank == 1 and torch.isfinite(m.A).all() and float(m.delta().abs().max()) == 0.0
    assert report.modules[0].rel_error == 0.0


@pytest.mark.cuda
def test_cuda_agrees_with_cpu(adapter_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a = load_adapter(adapter_dir)
    cpu, _ = squeeze(a, FixedRank(3), device="cpu")
    gpu, _ = squeeze(a, FixedRank(3), device="cuda")
    for n in a.modules:
        d = cpu.modules[n].delta()
        assert float((gpu.modules[n].delta() - d).norm() / d.norm()) < 1e-5
