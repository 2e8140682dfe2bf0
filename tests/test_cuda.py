"""CPU/GPU agreement of every operation with a CUDA path (`pytest -m cuda`, run first by benchmarks/gpu.sh on a lent
device): squeeze (exact and output-aware), extract, combine, merge, LoHa/LoKr → LoRA, TwoNN search, TeRA forward and
`tune`. Each runs the same call with device "cpu" and "cuda" and compares the results (float32 maths: agreement
to ~1e-5 relative; the TwoNN distances are settled exactly on the CPU, so they agree bit for bit), and the device's
runs give the same bytes run after run; the CLI's GPU-only refusals (a missing ordinal, TF32) are one line.
SURGERY_TEST_DEVICE=cpu runs the same bodies with "cpu" in place of "cuda" (benchmarks/gpu_suite.py --check does, so
that a device window is not spent on a broken test)."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery import Energy, FixedRank, load_adapter, parse_rank_map, squeeze
from surgery.adapter import Adapter, LohaModule, LokrModule, LoraModule

from .conftest import dataset, hard_case, lora_pair, write_peft

DEV = os.environ.get("SURGERY_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
              pytest.mark.no_real_load]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def same_deltas(x: Adapter, y: Adapter, tol: float = 1e-5) -> None:
    assert x.modules.keys() == y.modules.keys()
    for n in x.modules:
        assert rel(x.modules[n].delta(), y.modules[n].delta()) < tol, n


@pytest.fixture
def pairs():
    return {f"model.layers.{i}.{m}": lora_pair(96, 64, 12, decay=0.8, seed=10 * i + j)
            for i in range(2) for j, m in enumerate(("self_attn.q_proj", "mlp.up_proj"))}


@pytest.mark.parametrize("rule", [FixedRank(4), Energy(0.9), parse_rank_map("q_proj=6,up_proj=3")])
def test_squeeze(pairs, tmp_path, rule):  # on CUDA the four same-shaped modules go as one batch (by rank)
    a = load_adapter(write_peft(tmp_path / "a", pairs, r=12, alpha=24))
    cpu, rc = squeeze(a, rule, device="cpu")
    gpu, rg = squeeze(a, rule, device=DEV)
    same_deltas(gpu, cpu)
    assert [m.new_rank for m in rc.modules] == [m.new_rank for m in rg.modules]
    X = {n: torch.randn(200, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(0, -2, 64)
         for n in a.modules}
    cpu, rc = squeeze(a, rule, device="cpu", inputs=X)
    gpu, rg = squeeze(a, rule, device=DEV, inputs=X)
    same_deltas(gpu, cpu)
    for c, g in zip(rc.modules, rg.modules):
        assert g.output_rel_error == pytest.approx(c.output_rel_error, rel=1e-5)


def test_loha_lokr_to_lora():
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mods = {"loha": LohaModule(tensors={"w1_a": rnd(40, 4), "w1_b": rnd(4, 30), "w2_a": rnd(40, 4),
                                        "w2_b": rnd(4, 30)}, scale=0.5),
            "lokr": LokrModule(tensors={"w1": rnd(4, 5), "w2_a": rnd(10, 3), "w2_b": rnd(3, 6)}, scale=1.5),
            "loha2": LohaModule(tensors={"w1_a": rnd(40, 4), "w1_b": rnd(4, 30), "w2_a": rnd(40, 4),
                                         "w2_b": rnd(4, 30)}, scale=0.5),  # with the first: one batch on the device
            "lokr2": LokrModule(tensors={"w1": rnd(4, 5), "w2_a": rnd(10, 3), "w2_b": rnd(3, 6)}, scale=1.5)}
    a = Adapter(modules=mods, format="peft", config={"r": 4, "lora_alpha": 4})
    cpu, _ = squeeze(a, FixedRank(6), device="cpu")
    gpu, _ = squeeze(a, FixedRank(6), device=DEV)
    same_deltas(gpu, cpu, 1e-4)


def test_combine(pairs, tmp_path):
    from surgery.combine import combine

    a = load_adapter(write_peft(tmp_path / "a", pairs, r=12, alpha=24))
    b = load_adapter(write_peft(tmp_path / "b", {k: (B.flip(0), A) for k, (B, A) in pairs.items()}, r=12, alpha=12))
    for rule, method in ((FixedRank(8), "sum"), (None, "sum"), (FixedRank(8), "ties")):
        kw = {"density": 0.5} if method == "ties" else {}
        cpu, _ = combine([a, b], [0.7, 0.3], rule, method=method, device="cpu", **kw)
        gpu, _ = combine([a, b], [0.7, 0.3], rule, method=method, device=DEV, **kw)
        same_deltas(gpu, cpu, 1e-4)


@pytest.fixture
def checkpoints(pairs, tmp_path):
    """A tiny base, the same base fine-tuned by the LoRA of `pairs`, and that LoRA."""
    g = torch.Generator().manual_seed(3)
    base = {f"{n}.weight": torch.randn(96, 64, generator=g) for n in pairs}
    save_file(base, str(tmp_path / "base.safetensors"))
    lora = write_peft(tmp_path / "lora", pairs, r=12, alpha=24)
    tuned = {k: v + 2.0 * pairs[k[: -len(".weight")]][0] @ pairs[k[: -len(".weight")]][1] for k, v in base.items()}
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", lora


def test_merge(checkpoints, tmp_path):
    from surgery.merge import merge

    base, _, lora = checkpoints
    merge(base, [load_adapter(lora)], tmp_path / "cpu.safetensors", device="cpu")
    merge(base, [load_adapter(lora)], tmp_path / "gpu.safetensors", device=DEV)
    c, g = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "gpu.safetensors")
    assert c.keys() == g.keys() and all(rel(g[k], c[k]) < 1e-6 for k in c)


def test_extract(checkpoints):
    from surgery.extract import extract

    base, tuned, _ = checkpoints
    cpu, rc = extract(tuned, base, FixedRank(8), device="cpu", seed=1)
    gpu, rg = extract(tuned, base, FixedRank(8), device=DEV, seed=1)
    same_deltas(gpu, cpu, 1e-4)
    for c, g in zip(rc.modules, rg.modules):
        assert g.rel_error == pytest.approx(c.rel_error, rel=1e-4, abs=1e-6)


def test_twonn_search_and_estimate():
    from surgery.intrinsic import nn_distances, two_nn

    g = torch.Generator().manual_seed(4)
    X = torch.randn(3000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 256, generator=g, dtype=torch.float64)
    cpu, gpu = nn_distances(X), nn_distances(X, device=DEV)
    assert torch.equal(cpu[0], gpu[0]) and torch.equal(cpu[1], gpu[1])
    assert two_nn(X, device=DEV).dimension == two_nn(X, device="cpu").dimension


@pytest.mark.parametrize("kind", ["subspace", "clusters-interleaved", "clusters-subspace", "grid-ties", "offset"])
def test_twonn_search_hard_cases(kind):
    """Full and pruned search (D ≥ 128: pruning tried), ties, duplicates, far offsets: the CPU's distances."""
    from surgery.intrinsic import nn_distances

    X = dataset(kind, n=3000) if kind == "subspace" else hard_case(kind, np.random.default_rng(3))
    t = torch.from_numpy(np.pad(X, ((0, 0), (0, 200))) if kind == "subspace" else X)
    cpu, gpu = nn_distances(t), nn_distances(t, device=DEV)
    assert torch.equal(cpu[0], gpu[0]) and torch.equal(cpu[1], gpu[1])


def test_tera_forward_and_tune():
    from surgery.distill import tune_module
    from surgery.tera import TeraSpec, shared, tera_forward, to_tera

    spec = TeraSpec.for_shape(64, 48, core_rank=4)
    lams = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(spec.modes)]
    x = torch.randn(8, 48)
    core, factors = shared(spec)
    cpu = tera_forward(x, lams, core, factors, spec)
    core_c, factors_c = shared(spec, device=DEV)
    assert torch.allclose(tera_forward(x.to(DEV), [l.to(DEV) for l in lams], core_c, factors_c, spec).cpu(), cpu,
                          atol=1e-5)
    B, A = lora_pair(64, 48, 10, decay=0.8, seed=5)
    teacher = LoraModule(A=A, B=B, scale=1.0)
    X = torch.randn(256, 48, generator=torch.Generator().manual_seed(6)) * torch.logspace(0, -2, 48)
    student = LoraModule(A=A[:3].clone(), B=B[:, :3].clone(), scale=1.0)
    c = tune_module(student, teacher, X, steps=30, device="cpu")
    g = tune_module(student, teacher, X, steps=30, device=DEV)
    assert g[2] == pytest.approx(c[2], rel=1e-3) and g[4] == c[4]
    tera = to_tera(Adapter(modules={"m": teacher}, format="peft"), core_rank=4)[0].modules["m"]
    c = tune_module(tera, teacher, X, steps=30, device="cpu")
    g = tune_module(tera, teacher, X, steps=30, device=DEV)
    assert g[2] == pytest.approx(c[2], rel=1e-3)


def test_squeeze_expert_parameter():
    """An expert parameter's experts in one GPU batch agree with the CPU's one-at-a-time path."""
    from surgery.adapter import experts_module

    pairs = [lora_pair(96, 64, 12, decay=0.7 + 0.02 * e, seed=80 + e) for e in range(8)]
    m = experts_module(("gate_up_proj",), [B for B, _ in pairs], [A for _, A in pairs], 2.0, torch.float32)
    a = Adapter(modules={"mlp.experts.gate_up_proj": m}, format="peft", config={"r": 12, "lora_alpha": 24})
    for rule in (FixedRank(4), Energy(0.9)):
        cpu, rc = squeeze(a, rule, device="cpu")
        gpu, rg = squeeze(a, rule, device=DEV)
        same_deltas(gpu, cpu)
        assert [r.new_rank for r in rc.modules] == [r.new_rank for r in rg.modules]


def test_same_bytes_run_after_run(tmp_path):
    """Same input, same bytes out on the device too: modules of several shapes on 4 streams at once, same-shaped
    ones in batches (squeeze, combine), extract's weights in parallel workers."""
    from surgery import save_adapter
    from surgery.combine import combine
    from surgery.extract import extract

    shapes = {"q_proj": (256, 192), "k_proj": (64, 192), "up_proj": (512, 192), "down_proj": (192, 512)}
    pairs = {f"model.layers.{i}.{m}": lora_pair(*s, 24, decay=0.9, seed=7 * i + j)
             for i in range(3) for j, (m, s) in enumerate(shapes.items())}
    a = load_adapter(write_peft(tmp_path / "a", pairs, r=24, alpha=48))
    b = load_adapter(write_peft(tmp_path / "b", {k: (B.flip(0), A) for k, (B, A) in pairs.items()}, r=24, alpha=24))
    base = {f"{n}.weight": torch.randn(*s, generator=torch.Generator().manual_seed(5)) for n, s in
            ((n, shapes[n.rsplit(".", 1)[1]]) for n in pairs)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v + pairs[k[:-7]][0] @ pairs[k[:-7]][1] for k, v in base.items()}, str(tmp_path / "t.safetensors"))
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        save_adapter(squeeze(a, Energy(0.8), device=DEV)[0], out / "s")
        save_adapter(combine([a, b], [0.6, 0.4], FixedRank(16), device=DEV)[0], out / "c")
        save_adapter(extract(tmp_path / "t.safetensors", tmp_path / "base.safetensors", FixedRank(8), device=DEV,
                             seed=3)[0], out / "e")
        runs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))})
    assert len(runs[0]) == 3 and [str(f) for f in runs[0] if runs[0][f] != runs[1].get(f)] == []


def test_cli_refuses_a_missing_gpu_ordinal_and_tf32_in_one_line(tmp_path, monkeypatch):
    """On a GPU machine (where `--device cuda:N` gets past 'no CUDA device'): an ordinal past the last GPU, and
    TF32 forced by torch's override variable, are one line each, exit 1, nothing written."""
    from click.testing import CliRunner

    from surgery_cli.main import main

    from .conftest import PEFT_FIXTURE

    if DEV != "cuda":
        pytest.skip("reaches these refusals only with CUDA present")
    n = torch.cuda.device_count()
    for env, device, message in ((None, f"cuda:{n}", f"error: --device cuda:{n}: this machine has {n} CUDA device"),
                                 ("1", "cuda", "error: --device cuda: this process runs CUDA float32 matmuls in TF32 "
                                               "(TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set)")):
        if env:
            monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", env)
        r = CliRunner().invoke(main, ["squeeze", str(PEFT_FIXTURE), "--rank", "2", "--device", device, "-o",
                                      str(tmp_path / "o")])
        assert r.exit_code == 1 and r.output.startswith(message) and r.output.count("\n") == 1, r.output
        assert not (tmp_path / "o").exists()
