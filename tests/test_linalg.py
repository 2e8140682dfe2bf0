import ast
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.linalg import (gram64, lora_operator, lowrank_frobenius_sq, lowrank_svd, randomized_svd,
                            split_factors)

from .conftest import dense_truncation, lora_pair


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("m,n,r", [(64, 48, 8), (10, 200, 16), (200, 10, 16), (5, 7, 12)])
def test_lowrank_svd_matches_dense_float64(m, n, r):
    B, A = rand((m, r), 0), rand((r, n), 1)
    dense = 0.75 * (B.double() @ A.double())
    S_ref = torch.linalg.svdvals(dense)
    svd = lowrank_svd(B, A, 0.75)
    p = min(m, n, r)
    assert torch.allclose(svd.S.double()[:p], S_ref[:p], rtol=1e-5, atol=1e-5 * float(S_ref[0]))
    for k in range(1, p + 1):
        approx = (svd.U[:, :k] * svd.S[:k]) @ svd.Vh[:k]
        ref = dense_truncation(dense, k)
        assert float((approx.double() - ref).norm() / dense.norm()) < 1e-5


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(1, 10), scale=st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3),
       seed=st.integers(0, 2**16))
def test_lowrank_svd_property_float64(m, n, r, scale, seed):
    B, A = rand((m, r), seed, torch.float64), rand((r, n), seed + 1, torch.float64)
    svd = lowrank_svd(B, A, scale)
    dense = scale * (B @ A).numpy()
    S_ref = np.linalg.svd(dense, compute_uv=False)
    p = min(m, n, r)
    np.testing.assert_allclose(svd.S.numpy()[:p], S_ref[:p], rtol=1e-9, atol=1e-9 * max(S_ref[0], 1))
    np.testing.assert_allclose((svd.U * svd.S) @ svd.Vh, dense, atol=1e-9 * max(S_ref[0], 1))
    # the re-split factors reproduce the truncation with the module's scale
    k = max(1, p // 2)
    Bk, Ak = split_factors(svd, k, scale)
    np.testing.assert_allclose(scale * (Bk @ Ak).numpy(), dense_truncation(torch.from_numpy(dense), k).numpy(),
                               atol=1e-8 * max(S_ref[0], 1))


def test_zero_and_rank_deficient_factors_give_no_nan():
    B = torch.zeros(20, 6)
    A = rand((6, 30), 3)
    svd = lowrank_svd(B, A, 2.0)
    assert torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()
    assert float(svd.S.abs().max()) == 0.0
    Bk, Ak = split_factors(svd, 3, 2.0)
    assert torch.isfinite(Bk).all() and float((Bk @ Ak).abs().max()) == 0.0
    B = rand((20, 6), 4)
    B[:, 3:] = B[:, :3]  # rank 3 product
    svd = lowrank_svd(B, A)
    assert torch.isfinite(svd.U).all() and float(svd.S[3:].max()) < 1e-4 * float(svd.S[0])


def test_batched_equals_loop():
    B, A = rand((4, 32, 8), 5), rand((4, 8, 24), 6)
    batched = lowrank_svd(B, A, 1.5)
    for i in range(4):
        one = lowrank_svd(B[i], A[i], 1.5)
        assert torch.allclose(batched.S[i], one.S, rtol=1e-5)


def test_randomized_svd_close_to_exact_and_seeded():
    B, A = lora_pair(300, 200, 64, decay=0.8, seed=7)
    mm, rm = lora_operator(B, A, 1.0)
    exact = lowrank_svd(B, A)
    k = 8
    r1 = randomized_svd(mm, rm, (300, 200), k, generator=torch.Generator().manual_seed(0))
    r2 = randomized_svd(mm, rm, (300, 200), k, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1.S, r2.S) and torch.equal(r1.U, r2.U)
    assert torch.allclose(r1.S, exact.S[:k], rtol=1e-4)
    # ΔW_k is an orthogonal projection of ΔW: ‖ΔW − ΔW_k‖² = ‖ΔW‖² − ‖Σ_k‖²
    dense = (B.double() @ A.double())
    approx = (r1.U.double() * r1.S.double()) @ r1.Vh.double()
    err2 = float((dense - approx).norm() ** 2)
    pred = lowrank_frobenius_sq(B, A) - float(r1.S.double().square().sum())
    assert err2 == pytest.approx(pred, rel=1e-3)


def test_power_iterations_matter_on_flat_spectrum():
    B, A = lora_pair(400, 400, 64, decay=0.97, seed=8)
    mm, rm = lora_operator(B, A, 1.0)
    exact = float(lowrank_svd(B, A).S[:8].square().sum())
    got = {q: float(randomized_svd(mm, rm, (400, 400), 8, power_iters=q,
                                   generator=torch.Generator().manual_seed(1)).S.square().sum()) for q in (0, 2)}
    assert exact - got[2] < exact - got[0]
    assert got[2] <= exact * (1 + 1e-5)


def test_frobenius_from_grams():
    B, A = rand((50, 7), 9), rand((7, 33), 10)
    assert lowrank_frobenius_sq(B, A, -1.5) == pytest.approx(float((1.5 * B.double() @ A.double()).norm() ** 2), rel=1e-10)


def test_split_factors_negative_scale():
    B, A = rand((9, 4), 11, torch.float64), rand((4, 7), 12, torch.float64)
    svd = lowrank_svd(B, A, -3.0)
    Bk, Ak = split_factors(svd, 4, -3.0)
    assert torch.allclose(-3.0 * Bk @ Ak, -3.0 * B @ A, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 24), n_in=st.integers(2, 24), r=st.integers(1, 8), n=st.integers(1, 40),
       seed=st.integers(0, 2**16), deficient=st.booleans())
def test_output_truncation_is_the_float64_optimum(m, n_in, r, n, seed, deficient):
    """ΔW_k = U_k U_kᵀ ΔW reaches the float64 optimum of ‖X(ΔW_k − ΔW)ᵀ‖ (the tail singular values of X ΔWᵀ),
    with fewer samples than inputs and rank-deficient X too, and is never worse than plain truncation there."""
    from surgery.linalg import input_factor, output_factors, output_svd

    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n_in, generator=g, dtype=torch.float64)
    X = torch.randn(n, n_in, generator=g, dtype=torch.float64) * torch.rand(n_in, generator=g, dtype=torch.float64) * 3
    if deficient:
        X[:, : n_in // 2] = 0.0
    s, dW = 0.7, 0.7 * B @ A
    M = X @ dW.T  # (n, m): outputs
    S_ref = torch.linalg.svdvals(M)
    out = output_svd(B, A, X if seed % 2 else input_factor(X), s)  # X itself, or R of its QR
    assert torch.allclose(out.S[: len(S_ref)], S_ref[: len(out.S)], atol=1e-10 * (1 + float(S_ref[0])))
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    for k in range(1, len(out.S) + 1):
        Bk, Ak = output_factors(B, A, out, k)
        err = float((X @ (Bk @ Ak - dW).T).norm())
        best = float(S_ref[k:].square().sum().sqrt())
        assert err == pytest.approx(best, abs=1e-7 * (1 + float(S_ref[0])))
        plain = float((X @ (U[:, :k] * S[:k] @ Vh[:k] - dW).T).norm())
        assert err <= plain + 1e-9 * (1 + float(S_ref[0]))


def test_output_truncation_with_white_inputs_is_plain_truncation():
    from surgery.linalg import output_factors, output_svd

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    X = torch.linalg.qr(torch.randn(30, 10, generator=g, dtype=torch.float64)).Q * 2.0  # XᵀX = 4 I
    Bk, Ak = output_factors(B, A, output_svd(B, A, X, 1.5), 2)
    U, S, Vh = torch.linalg.svd(1.5 * B @ A)
    assert torch.allclose(Bk @ Ak, U[:, :2] * S[:2] @ Vh[:2], atol=1e-10)


def test_r_factor_gram_path_is_as_accurate_as_a_float32_qr():
    """The float64-Gram Cholesky R of a tall float32 M: RᵀR = MᵀM to float32's resolution of M, singular values
    as a float32 Householder QR gives them (down to ε₃₂·σ₁), and the QR fallback for a rank-deficient M."""
    from surgery.linalg import r_factor

    g = torch.Generator().manual_seed(0)
    for decay in (0.5, 0.9, 1.0):
        U = torch.linalg.qr(torch.randn(3000, 40, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
        M = ((U * decay ** torch.arange(40, dtype=torch.float64)) @ V.T).float()
        S_true = torch.linalg.svdvals(M.double())
        S_qr = torch.linalg.svdvals(torch.linalg.qr(M, mode="r").R.double())
        tol = 4 * torch.finfo(torch.float32).eps * float(S_true[0])
        assert float((S_qr - S_true).abs().max()) <= tol
        for stored in (M, M.T.contiguous().T):  # M row-major, or Mᵀ row-major (a LoRA A seen as Aᵀ)
            R = r_factor(stored)
            assert float((torch.linalg.svdvals(R) - S_true).abs().max()) <= tol
            if decay > 0.5:  # the Gram path (0.5 is numerically rank-deficient: QR), exact to float64 rounding
                torch.testing.assert_close(R.T @ R, M.double().T @ M.double(), rtol=0, atol=1e-13)
    M = torch.randn(500, 8, generator=g)
    M[:, 3] = 0  # rank-deficient: Cholesky fails, QR answers
    R = r_factor(M)
    torch.testing.assert_close(R.T @ R, (M.T @ M).double(), rtol=1e-5, atol=1e-4)


def test_per_module_runs_workers_on_one_blas_thread_and_restores_the_thread_counts():
    """Each CPU worker computes single-threaded (torch's pool and numpy's BLAS, which `gram64` uses); afterwards
    both counts are as the caller left them — restoring the BLAS limit must not reset torch's OpenMP count."""
    from threadpoolctl import threadpool_info

    from surgery.device import per_module

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before_torch, before_blas = torch.get_num_threads(), blas_threads()
    seen = list(per_module(lambda n, m: (torch.get_num_threads(), blas_threads()), {"a": 0, "b": 1},
                           torch.device("cpu")))
    assert all(t == 1 and all(b == 1 for b in bl) for t, bl in seen)
    assert torch.get_num_threads() == before_torch and blas_threads() == before_blas


def test_import_resolves_every_vml_kernel_before_any_worker_runs():
    """`import surgery` calls each unary op ATen sends to oneMKL's VML (the list in aten/src/ATen/cpu/vml.h) on a
    float32 and a float64 tensor, on the importing thread: concurrent first calls can run a low-accuracy kernel
    (pytorch/pytorch#188792; once seen here as a two-thread `extract` whose factors' √σ were ~1000 ulp off). Watched
    through a TorchFunctionMode in a fresh process, since this one has imported surgery already."""
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    script = """
import threading, torch
from torch.overrides import TorchFunctionMode
seen = set()
class Watch(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and isinstance(args[0], torch.Tensor):
            main = threading.current_thread() is threading.main_thread()
            seen.add((getattr(func, "__name__", ""), str(args[0].dtype), main))
        return func(*args, **(kwargs or {}))
with Watch():
    import surgery
print(sorted(seen))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    seen = ast.literal_eval(out.strip())
    aten_vml = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin", "sqrt",
                "tan", "tanh", "trunc")
    for name in aten_vml:
        for dtype in ("torch.float32", "torch.float64"):
            assert (name, dtype, True) in seen, f"{name} ({dtype}) not resolved at import"


def test_gram64_matches_a_float64_gram_in_both_layouts():
    """Both layouts, sizes up and down (the thread's reused buffer): each Gram is its own, none a view of it."""
    g = torch.Generator().manual_seed(3)
    grams = []
    for m, r in ((2000, 48), (300, 20), (4000, 64)):
        M = torch.randn(m, r, generator=g)
        ref = M.double().T @ M.double()
        for stored in (M, M.T.contiguous().T):
            G = gram64(stored)
            assert G.dtype == torch.float64 and torch.equal(G, G.T)
            torch.testing.assert_close(G, ref, rtol=1e-13, atol=1e-10)
            grams.append((G, G.clone()))
    assert all(torch.equal(G, kept) for G, kept in grams)
