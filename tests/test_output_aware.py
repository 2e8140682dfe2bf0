"""Output-aware squeeze (`squeeze --activations`): the rank-k ΔW_k minimising ‖X(ΔW_k − ΔW)ᵀ‖ for captured inputs
X, against the float64 optimum (tail singular values of ΔW Xᵀ from a dense SVD) on the real all-MiniLM-L6-v2's
captured inputs and on synthetic ones (white, rank-deficient, n < in); every rank rule; LoHa/LoKr/TeRA; errors."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import Budget, Energy, FixedRank, SurgeryError, load_adapter, squeeze
from surgery.adapter import Adapter, LohaModule, LokrModule, LoraModule
from surgery.rank import energy_rank
from surgery_cli.main import main

from .conftest import FIXTURES, dense_truncation, lora_pair, tree_digest, write_peft

LAYERS = ("attention.self.query", "attention.self.value", "output.dense")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def optimum(delta: torch.Tensor, X: torch.Tensor, k: int) -> float:
    """min over rank-k D of ‖X(D − ΔW)ᵀ‖ / ‖XΔWᵀ‖, float64: the tail of σ(ΔW Xᵀ) (Eckart–Young)."""
    S = torch.linalg.svdvals(delta.double() @ X.double().T)
    return float(S[k:].norm() / S.norm())


def out_error(delta: torch.Tensor, new: torch.Tensor, X: torch.Tensor) -> float:
    X = X.double()
    return float(torch.linalg.norm(X @ (new.double() - delta.double()).T) / torch.linalg.norm(X @ delta.double().T))


def adapter_of(modules: dict) -> Adapter:
    r = max(m.rank for m in modules.values() if isinstance(m, LoraModule)) if modules else 1
    return Adapter(modules=modules, format="peft", config={"r": r, "lora_alpha": r})


def coloured(n: int, d: int, seed: int, decay: float = 3.0) -> torch.Tensor:
    """Inputs whose covariance spans `decay` decades: far from white."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -decay, d, dtype=torch.float64)
            @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q).float()


@pytest.fixture(scope="module")
def minilm_case(minilm, tmp_path_factory):
    """Captured inputs of the real all-MiniLM-L6-v2 on the bundled sentences, and a rank-16 LoRA on 18 of its
    modules (a PEFT directory)."""
    from surgery.capture import capture_inputs, save_inputs

    tmp = tmp_path_factory.mktemp("minilm")
    save_inputs(capture_inputs(minilm, FIXTURES / "sentences.txt", max_tokens=400, seed=0, device="cpu"),
                tmp / "acts.safetensors")
    pairs = {f"encoder.layer.{i}.{n}": lora_pair(384, 1536 if n == "output.dense" else 384, 16, decay=0.8,
                                                 seed=10 * i + j) for i in range(6) for j, n in enumerate(LAYERS)}
    write_peft(tmp / "lora", pairs, r=16, alpha=32)
    return tmp


def test_real_minilm_squeeze_reaches_the_float64_output_optimum(minilm_case, tmp_path):
    from surgery.capture import load_inputs

    src = minilm_case / "lora"
    digest = tree_digest(src)
    r = run("squeeze", src, "--rank", 4, "--activations", minilm_case / "acts.safetensors", "-o", tmp_path / "out",
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert tree_digest(src) == digest
    acts, before, after = load_inputs(minilm_case / "acts.safetensors"), load_adapter(src), load_adapter(
        tmp_path / "out")
    gains = []
    for rep in doc["modules"]:
        name = rep["name"]
        X = acts[name.removeprefix("base_model.model.")].load()
        delta, new = before.modules[name].delta(), after.modules[name].delta()
        best = optimum(delta, X, 4)
        written = out_error(delta, new, X)
        plain = out_error(delta, dense_truncation(delta, 4), X)
        assert written == pytest.approx(best, rel=1e-4)  # the optimum, up to the float32 storage
        assert rep["output_rel_error"] == pytest.approx(written, rel=1e-6)  # the report is what was written
        assert rep["plain_output_rel_error"] == pytest.approx(plain, rel=1e-6)
        assert written <= plain * (1 + 1e-6)  # never worse than plain truncation
        assert rep["rel_error"] == pytest.approx(float((new - delta).norm() / delta.norm()), rel=1e-5)
        assert rep["new_rank"] == 4 and after.modules[name].rank == 4
        gains.append(plain - written)
    assert max(gains) > 0.05  # real activations are far from white: a clear gain somewhere
    assert doc["output_rel_error"] < doc["plain_output_rel_error"]
    # the human table gives both
    r = run("squeeze", src, "--rank", 4, "--activations", minilm_case / "acts.safetensors", "-o", tmp_path / "t",
            "--device", "cpu")
    assert r.exit_code == 0 and "output error" in r.output and "plain truncation" in r.output


def test_every_rank_rule_reads_the_output_spectrum(minilm_case, tmp_path):
    from surgery.capture import load_inputs, match_inputs

    a = load_adapter(minilm_case / "lora")
    inputs = match_inputs(a, load_inputs(minilm_case / "acts.safetensors"))
    assert len(inputs) == len(a.modules) == 18
    spectra = {n: torch.linalg.svdvals(m.delta() @ inputs[n].load().double().T) for n, m in a.modules.items()}
    _, rep = squeeze(a, Energy(0.9), inputs=inputs, device="cpu")
    for m in rep.modules:
        assert m.new_rank == energy_rank(spectra[m.name], 0.9)
        assert m.output_rel_error <= math.sqrt(0.1) + 1e-6
    budget = 40_000
    small, rep = squeeze(a, Budget(budget), inputs=inputs, device="cpu")
    assert rep.params_after <= budget
    # the greedy budget in output space keeps the largest σ(ΔW Xᵀ)²/cost: no module's first dropped direction is
    # worth more per parameter than another's last kept one
    cost = {n: m.in_features + m.out_features for n, m in a.modules.items()}
    kept = {m.name: m.new_rank for m in rep.modules}
    worst_kept = min(float(spectra[n][k - 1]) ** 2 / cost[n] for n, k in kept.items())
    best_dropped = max(float(spectra[n][k]) ** 2 / cost[n] for n, k in kept.items() if k < 16)
    assert best_dropped <= worst_kept * (1 + 1e-9) or budget - rep.params_after < max(cost.values())


def test_white_inputs_give_plain_truncation():
    B, A = lora_pair(40, 24, 8, decay=0.6, seed=3)
    m = LoraModule(A=A, B=B, scale=1.5)
    g = torch.Generator().manual_seed(0)
    X = 3.0 * torch.linalg.qr(torch.randn(100, 24, generator=g, dtype=torch.float64)).Q  # XᵀX = 9 I
    small, rep = squeeze(adapter_of({"m": m}), FixedRank(3), inputs={"m": X}, device="cpu",
                         compute_dtype="float64")
    plain, _ = squeeze(adapter_of({"m": m}), FixedRank(3), device="cpu", compute_dtype="float64")
    torch.testing.assert_close(small.modules["m"].delta(), plain.modules["m"].delta(), rtol=1e-5, atol=1e-6)
    assert rep.modules[0].output_rel_error == pytest.approx(rep.modules[0].plain_output_rel_error, rel=1e-5)
    assert rep.modules[0].output_rel_error == pytest.approx(rep.modules[0].rel_error, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(out_f=st.integers(4, 30), in_f=st.integers(4, 30), r=st.integers(1, 8), n=st.integers(1, 40),
       dep=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_optimum_for_any_inputs_rank_deficient_and_n_below_in(out_f, in_f, r, n, dep, seed):
    """n < in, duplicated / dependent input columns: the written module is still the float64 optimum and never
    worse than plain truncation in output space."""
    r = min(r, out_f, in_f)
    B, A = lora_pair(out_f, in_f, r, decay=0.7, seed=seed % 1000)
    m = LoraModule(A=A, B=B, scale=0.5)
    X = coloured(n, in_f, seed, decay=2.0).double()
    for j in range(min(dep, in_f - 1)):  # dependent columns: rank(X) < in
        X[:, j + 1] = X[:, j]
    k = max(1, r // 2)
    small, rep = squeeze(adapter_of({"m": m}), FixedRank(k), inputs={"m": X}, device="cpu",
                         compute_dtype="float64", dtype="float32")
    new = small.modules["m"]
    assert torch.isfinite(new.A).all() and torch.isfinite(new.B).all() and new.rank == k
    delta = m.delta()
    if float(torch.linalg.norm(X @ delta.T)) < 1e-12:
        return
    best = optimum(delta, X, k)
    written = out_error(delta, new.delta(), X)
    assert written <= best + 1e-5
    assert written <= out_error(delta, dense_truncation(delta, k), X) + 1e-5


def test_loha_lokr_and_fallback_modules():
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    loha = LohaModule(tensors={"w1_a": rnd(20, 3), "w1_b": rnd(3, 12), "w2_a": rnd(20, 2), "w2_b": rnd(2, 12)},
                      scale=0.7)
    lokr = LokrModule(tensors={"w1": rnd(4, 3), "w2_a": rnd(5, 2), "w2_b": rnd(2, 4)}, scale=1.3)
    B, A = lora_pair(20, 12, 6, seed=2)
    plain = LoraModule(A=A, B=B, scale=1.0)
    X = {"loha": coloured(80, 12, 1), "lokr": coloured(80, 12, 2)}
    mods = {"loha": loha, "lokr": lokr, "plain": plain}
    small, rep = squeeze(adapter_of(mods), FixedRank(3), inputs=X, device="cpu")
    by = {m.name: m for m in rep.modules}
    for name in ("loha", "lokr"):
        delta = mods[name].delta()
        assert isinstance(small.modules[name], LoraModule)
        assert out_error(delta, small.modules[name].delta(), X[name]) == pytest.approx(
            optimum(delta, X[name], 3), rel=1e-4)
        assert by[name].output_rel_error == pytest.approx(optimum(delta, X[name], 3), rel=1e-4)
    # without inputs: plain truncation, no output figures, listed
    torch.testing.assert_close(small.modules["plain"].delta(), dense_truncation(plain.delta(), 3),
                               rtol=1e-4, atol=1e-5)
    assert by["plain"].output_rel_error is None
    assert any("without captured inputs truncated plainly" in w and "plain" in w for w in rep.warnings)
    # a module already at the target rank is kept, its output error 0
    small, rep = squeeze(adapter_of({"plain": plain}), FixedRank(8), inputs={"plain": coloured(50, 12, 3)},
                         device="cpu")
    assert rep.modules[0].output_rel_error == 0.0 and small.modules["plain"].rank == 6


def test_bad_inputs_are_refused():
    B, A = lora_pair(20, 12, 6, seed=2)
    a = adapter_of({"m": LoraModule(A=A, B=B, scale=1.0)})
    with pytest.raises(SurgeryError, match="module m: captured inputs have shape"):
        squeeze(a, FixedRank(2), inputs={"m": torch.randn(30, 11)}, device="cpu")
    X = torch.randn(30, 12)
    X[3, 4] = float("nan")
    with pytest.raises(SurgeryError, match="module m: captured inputs contain NaN"):
        squeeze(a, FixedRank(2), inputs={"m": X}, device="cpu")
    with pytest.raises(SurgeryError, match="rsvd does not apply"):
        squeeze(a, FixedRank(2), inputs={"m": torch.randn(30, 12)}, method="rsvd", device="cpu")
    with pytest.raises(SurgeryError, match="module m: the captured inputs hold no tokens"):  # was a zero adapter
        squeeze(a, FixedRank(2), inputs={"m": torch.randn(0, 12)}, device="cpu")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):  # narrow storage is widened exactly (fp8 was a traceback)
        X = torch.randn(30, 12).to(dtype)
        got, want = (squeeze(a, FixedRank(2), inputs={"m": x}, device="cpu")[0].modules["m"] for x in (X, X.double()))
        assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)


def test_cli_errors_and_tera(minilm_case, tmp_path):
    src = minilm_case / "lora"
    # a hidden-state or adapter file is not a module-inputs file
    r = run("squeeze", src, "--rank", 4, "--activations", src / "adapter_model.safetensors", "-o", tmp_path / "x")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not a module-inputs file" in r.output
    # inputs of other modules only
    other = write_peft(tmp_path / "other", {"decoder.proj": lora_pair(384, 384, 4)}, r=4, alpha=4)
    r = run("squeeze", other, "--rank", 2, "--activations", minilm_case / "acts.safetensors", "-o", tmp_path / "y")
    assert r.exit_code == 1 and "holds the inputs of none" in r.output
    r = run("squeeze", src, "--rank", 4, "--activations", minilm_case / "acts.safetensors", "--method", "rsvd",
            "-o", tmp_path / "z")
    assert r.exit_code == 2 and "drop --method rsvd" in r.output
    assert not any((tmp_path / n).exists() for n in "xyz")
    # a TeRA adapter squeezes through its exact LoRA form, output-aware
    from surgery import save_adapter
    from surgery.tera import to_tera

    a = load_adapter(src)
    tera, _ = to_tera(a.with_modules({n: a.modules[n] for n in list(a.modules)[:2]}), core_rank=4)
    save_adapter(tera, tmp_path / "tera.safetensors")
    r = run("squeeze", tmp_path / "tera.safetensors", "--rank", 3, "--activations", minilm_case / "acts.safetensors",
            "-o", tmp_path / "tera-r3", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    from surgery.capture import load_inputs

    acts = load_inputs(minilm_case / "acts.safetensors")
    out = load_adapter(tmp_path / "tera-r3")
    for rep in doc["modules"]:
        X = acts[rep["name"].removeprefix("base_model.model.")].load()
        delta = tera.modules[rep["name"]].delta()
        assert out_error(delta, out.modules[rep["name"]].delta(), X) == pytest.approx(optimum(delta, X, 3), rel=1e-4)
