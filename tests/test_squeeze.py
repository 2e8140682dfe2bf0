"""squeeze against float64 dense references, read back from the files it writes."""
import json

import pytest
import torch

from surgery.adapter import Adapter, LohaModule, LokrModule, LoraModule, materialize
from surgery import Budget, Energy, Exact, FixedRank, SurgeryError, load_adapter, parse_rank_map, save_adapter, squeeze

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
    assert not any("rank map" in w for w in report.warnings)
    _, typo = squeeze(a, parse_rank_map(["mpl=2", "q_proj=5", "k_prj=3"]), device="cpu")
    assert "rank map entries 'mpl', 'k_prj' matched no module" in typo.warnings  # was silent
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


@pytest.fixture
def batched(monkeypatch):
    """squeeze with its GPU module batches (`_batches_on`) taken on the CPU: the path a CUDA device runs. Returns
    the batch sizes core_svd was called with (1 for a lone module); `.lokr`: those of LoKr batches."""
    import sys

    class Sizes(list):
        lokr: list

    sq = sys.modules["surgery.squeeze"]
    sizes, real, real_lokr = Sizes(), sq.core_svd, sq._lokr_svds
    sizes.lokr = []
    monkeypatch.setattr(sq, "_batches_on", lambda dev: True)
    monkeypatch.setattr(sq, "core_svd", lambda B, A, s=1.0: sizes.append(len(B) if B.dim() == 3 else 1)
                        or real(B, A, s))
    monkeypatch.setattr(sq, "_lokr_svds", lambda ms, *a: sizes.lokr.append(len(ms)) or real_lokr(ms, *a))
    return sizes


def many_modules():
    """Three layers of four shapes (two share one), a conv pair, DoRA magnitudes and a bias on some, a second
    scale on one module (alpha_pattern), bf16 factors, two LoHa (rank 6 pairs), two pairs of LoKr (a full or a
    decomposed half each, one scale negative): batches by kind, shape and scale, and lone modules."""
    g = torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    mods = {}
    for i in range(3):
        for j, (o, n) in enumerate(((24, 16), (24, 16), (40, 16), (16, 40))):
            B, A = lora_pair(o, n, 8, decay=0.5 + 0.1 * j, seed=10 * i + j)
            mods[f"layers.{i}.m{j}"] = LoraModule(
                A=A.bfloat16(), B=B.bfloat16(), scale=0.5 if (i, j) == (1, 2) else 2.0,
                magnitude=torch.rand(o, generator=g) + 0.5 if j == 1 else None,
                bias=torch.randn(o, generator=g) if (i, j) == (0, 3) else None)
    for i in range(2):
        B, A = lora_pair(12, 8 * 9, 6, seed=50 + i)
        mods[f"conv.{i}"] = LoraModule(A=A.reshape(6, 8, 3, 3).bfloat16(), B=B.reshape(12, 6, 1, 1).bfloat16(),
                                       scale=1.0, kind="conv")
        mods[f"loha.{i}"] = LohaModule(tensors={"w1_a": rnd(30, 3), "w2_a": rnd(30, 2), "w1_b": rnd(3, 20),
                                                "w2_b": rnd(2, 20)}, scale=0.7)
        mods[f"lokr.{i}"] = LokrModule(tensors={"w1": rnd(4, 3), "w2_a": rnd(6, 2), "w2_b": rnd(2, 5)}, scale=-1.2)
        mods[f"lokr.ab{i}"] = LokrModule(tensors={"w1_a": rnd(5, 2), "w1_b": rnd(2, 4), "w2": rnd(3, 7)}, scale=0.9)
    return Adapter(modules=mods, format="peft", config={"r": 8, "lora_alpha": 16})


@pytest.mark.parametrize("rule", [FixedRank(3), Energy(0.9), Exact(), parse_rank_map("layers.1=5,conv=2,m3=4"),
                                  Budget(2000)], ids=["fixed", "energy", "exact", "rank-map", "budget"])
def test_module_batches_equal_one_module_at_a_time(batched, monkeypatch, rule):
    """The GPU path's batches (stacked QR/SVD, factors by rank, one copy back per rank) give every module what the
    one-module path gives it: same ranks, reports, order, layouts, dtypes and biases; ΔW to float32 rounding."""
    import sys

    a = many_modules()
    many, rn = squeeze(a, rule, device="cpu", dtype="float32")
    assert max(batched) >= 3 and batched.lokr.count(2) >= 2  # the same-shaped modules went as batches
    monkeypatch.setattr(sys.modules["surgery.squeeze"], "_batches_on", lambda dev: False)
    one, r1 = squeeze(a, rule, device="cpu", dtype="float32")
    assert list(many.modules) == list(one.modules) == list(a.modules)
    assert [r.name for r in rn.modules] == [r.name for r in r1.modules]
    for x, y in zip(r1.modules, rn.modules):
        assert (x.new_rank, x.params_after, x.dora) == (y.new_rank, y.params_after, y.dora)
        assert y.rel_error == pytest.approx(x.rel_error, abs=1e-6) and y.norm == pytest.approx(x.norm, rel=1e-6)
    for n, m in one.modules.items():
        b = many.modules[n]
        assert (b.A.shape, b.B.shape, b.A.dtype, b.kind, b.scale) == (m.A.shape, m.B.shape, m.A.dtype, m.kind, m.scale)
        assert b.A.untyped_storage().nbytes() == b.A.numel() * 4  # its own storage, not a view of the batch
        for t in ("bias", "magnitude"):
            assert (getattr(b, t) is None) == (getattr(m, t) is None)
            assert getattr(b, t) is None or torch.equal(getattr(b, t), getattr(m, t))
        ref = a.modules[n].delta().reshape(m.out_features, -1)  # float64, from the same bf16 factors
        got = b.delta().reshape(ref.shape)
        assert float((got - m.delta().reshape(ref.shape)).norm() / ref.norm()) < 1e-5
        assert float((got - dense_truncation(ref, b.rank)).norm() / ref.norm()) < 1e-5  # Eckart–Young


def test_module_batches_split_at_their_byte_bound_and_name_a_bad_module(batched, monkeypatch):
    import sys

    a = many_modules()
    whole, _ = squeeze(a, FixedRank(3), device="cpu")
    monkeypatch.setattr(sys.modules["surgery.squeeze"], "BATCH_BYTES", 4 * 8 * (24 + 16) * 2)  # two per batch
    batched.clear()
    split, _ = squeeze(a, FixedRank(3), device="cpu")
    assert max(batched) == 2
    for n, m in whole.modules.items():  # a batch's modules do not depend on which others share it
        assert torch.equal(split.modules[n].A, m.A) and torch.equal(split.modules[n].B, m.B)
    bad = dict(a.modules)
    m = bad["layers.2.m0"]
    bad["layers.2.m0"] = LoraModule(A=m.A.clone().index_fill_(1, torch.tensor([3]), float("nan")), B=m.B,
                                    scale=m.scale)
    with pytest.raises(SurgeryError, match=r"module layers\.2\.m0: factor contains NaN"):
        squeeze(Adapter(modules=bad, format="peft", config={}), FixedRank(3), device="cpu")


def test_combine_in_module_batches(batched, tmp_path):
    from surgery.combine import combine

    pairs = {f"model.layers.{i}.self_attn.q_proj": lora_pair(32, 24, 6, seed=i) for i in range(4)}
    a = load_adapter(write_peft(tmp_path / "a", pairs, r=6, alpha=12))
    b = load_adapter(write_peft(tmp_path / "b", {k: (B.flip(0), A) for k, (B, A) in pairs.items()}, r=6, alpha=6))
    batched.clear()
    c, rep = combine([a, b], [0.7, -0.3], FixedRank(5), device="cpu")
    assert batched == [4]
    for n, m in c.modules.items():
        ref = 0.7 * a.modules[n].delta() - 0.3 * b.modules[n].delta()
        assert float((m.delta() - dense_truncation(ref, 5)).norm() / ref.norm()) < 1e-5


def test_spectra_in_module_batches(batched, monkeypatch):
    """Budget rules' first pass in batches: every module's singular values (float64, CPU), in the adapter's order."""
    import sys

    from surgery.squeeze import spectra

    a = many_modules()
    got = spectra(a, device="cpu")
    assert max(batched) >= 3 and batched.lokr == [2, 2] and list(got) == list(a.modules)
    for n, m in a.modules.items():
        want = torch.linalg.svdvals(m.delta().reshape(m.out_features, -1))[: len(got[n])]
        assert got[n].dtype == torch.float64 and got[n].device.type == "cpu"
        assert float((got[n] - want).abs().max() / want[0]) < 1e-6, n
    monkeypatch.setattr(sys.modules["surgery.squeeze"], "_batches_on", lambda dev: False)
    one = spectra(a, device="cpu")
    assert list(one) == list(got)
    assert all(torch.allclose(one[n], got[n], rtol=1e-6, atol=1e-9 * float(got[n][0])) for n in got)


@pytest.mark.parametrize("rule", [FixedRank(3), Energy(0.8), Budget(3000)], ids=["fixed", "energy", "budget"])
def test_expert_parameters_in_module_batches(batched, monkeypatch, rule):
    """An expert parameter's experts go through `batch` on a GPU (split at the byte bound here); each expert's
    truncation, the parameter's one r (the largest, zero-padded) and the per-expert reports equal the
    one-at-a-time path's; spectra of the experts too."""
    import sys

    from surgery.adapter import experts_module
    from surgery.squeeze import spectra

    sq = sys.modules["surgery.squeeze"]
    pairs = [lora_pair(24, 16, 6, decay=0.4 + 0.1 * e, seed=70 + e) for e in range(5)]
    mods = dict(many_modules().modules)
    mods["mlp.experts.gate_up_proj"] = experts_module(("gate_up_proj",), [B for B, _ in pairs], [A for _, A in pairs],
                                                      1.5, torch.float32)
    a = Adapter(modules=mods, format="peft", config={"r": 8, "lora_alpha": 16})
    monkeypatch.setattr(sq, "BATCH_BYTES", 4 * 6 * (24 + 16) * 2)  # experts two by two
    batched.clear()
    many, rn = squeeze(a, rule, device="cpu", dtype="float32")
    S_many = spectra(a, device="cpu")
    assert batched.count(2) >= 2
    monkeypatch.setattr(sq, "_batches_on", lambda dev: False)
    one, r1 = squeeze(a, rule, device="cpu", dtype="float32")
    assert list(spectra(a, device="cpu")) == list(S_many)
    assert [(r.name, r.new_rank, r.params_after) for r in rn.modules] == \
        [(r.name, r.new_rank, r.params_after) for r in r1.modules]
    x, y = many.modules["mlp.experts.gate_up_proj"], one.modules["mlp.experts.gate_up_proj"]
    assert x.A.shape == y.A.shape and x.B.shape == y.B.shape and x.scale == y.scale
    torch.testing.assert_close(x.delta(), y.delta(), rtol=0, atol=1e-5)
    ref = a.modules["mlp.experts.gate_up_proj"].delta()
    for e, r in enumerate(r for r in rn.modules if r.name.startswith("mlp.experts.gate_up_proj[")):
        torch.testing.assert_close(x.delta()[e], dense_truncation(ref[e], r.new_rank), rtol=0, atol=1e-5)
