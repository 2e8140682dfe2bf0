"""TwoNN against scikit-dimension 0.5 and DADApy; GeLoRA ranks; capture on the real all-MiniLM-L6-v2."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.spatial.distance import cdist

from surgery import SurgeryError, intrinsic, load_adapter
from surgery.intrinsic import (fit_budget, gelora_ranks, id_from_mu, module_ranks, nn_distances,
                               rerank, two_nn)
from surgery_cli.main import main

from .conftest import FIXTURES, PEFT_FIXTURE, dataset, hard_case

skdim = pytest.importorskip("skdim")
dadapy = pytest.importorskip("dadapy")


@pytest.mark.parametrize("kind", ["subspace", "sphere", "gauss"])
def test_twonn_matches_skdim_and_dadapy(kind):
    X = dataset(kind)
    t = torch.from_numpy(X)
    ours = two_nn(t, bootstrap=0)
    assert ours.dimension == pytest.approx(skdim.id.TwoNN().fit(X).dimension_, rel=1e-6)
    assert ours.dimension == pytest.approx(dadapy.Data(X).compute_id_2NN()[0], rel=1e-6)
    mle = two_nn(t, method="mle", bootstrap=0).dimension
    assert mle == pytest.approx(skdim.id.TwoNN(method="mle").fit(X).dimension_, rel=1e-6)
    mle0 = two_nn(t, method="mle", discard=0.0, bootstrap=0).dimension  # DADApy's 'ml' ignores the discard
    assert mle0 == pytest.approx(dadapy.Data(X).compute_id_2NN(algorithm="ml")[0], rel=1e-6)


def dadapy_id(X):
    """DADApy's TwoNN after its own duplicate removal (it prints what it merged)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        d = dadapy.Data(X)
        d.remove_identical_points()
        return d.compute_id_2NN()[0]


def test_repeated_rows_merged_as_dadapy_does():
    X = dataset("subspace")
    Xd = np.concatenate([X, X[:60], X[:30]])
    with pytest.warns(UserWarning, match="merged 90 repeated rows"):
        res = two_nn(torch.from_numpy(Xd), bootstrap=0)
    assert res.duplicates == 90 and res.points == len(X)
    assert res.dimension == pytest.approx(dadapy_id(Xd), rel=1e-9)
    assert res.dimension == pytest.approx(skdim.id.TwoNN().fit(np.unique(Xd, axis=0)).dimension_, rel=1e-9)


@pytest.mark.parametrize("kind", ["float", "signed-zero", "grid"])
def test_distinct_rows_equal_numpy_unique(kind):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 12)).astype(np.float32)
    X = np.concatenate([X, X[rng.integers(0, 400, 150)]])
    if kind == "signed-zero":
        X[:, 3] = 0.0
        X[rng.integers(0, len(X), 100), 3] = -0.0
    if kind == "grid":  # many rows agree on the 8 sampled columns but not elsewhere
        X = rng.integers(0, 2, size=(600, 40)).astype(np.float64)
    _, first = np.unique(X, axis=0, return_index=True)
    assert intrinsic.distinct_rows(torch.from_numpy(X)).tolist() == sorted(first.tolist())


def test_blocked_search_equals_one_block_and_legacy_cdf():
    X = torch.from_numpy(dataset("gauss", n=700))
    a, b = nn_distances(X, block=13), nn_distances(X, block=700)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    D = torch.cdist(X, X).fill_diagonal_(float("inf")).sort(dim=1).values
    assert torch.allclose(a[0], D[:, 0]) and torch.allclose(a[1], D[:, 1])
    mu = (a[1] / a[0]).numpy()
    N, n = len(mu), int(len(mu) * 0.9)
    x = np.log(np.sort(mu)[:n])
    y = -np.log(1 - np.arange(0, n) / N)  # scikit-dimension 0.3: (i − 1)/N
    assert id_from_mu(torch.from_numpy(mu), legacy_cdf=True) == pytest.approx((x @ y) / (x @ x), rel=1e-12)


@pytest.mark.parametrize("loose", [4, 0])
@pytest.mark.parametrize("kind", ["clusters-interleaved", "clusters-sorted", "clusters-subspace", "grid-ties",
                                  "offset", "tiny"])
def test_search_is_exact_on_hard_inputs(kind, loose, monkeypatch):
    """Every block size and candidate count gives the float64 cdist distances, also when every block pair is
    selected by top-k (loose = 0); the input is not modified."""
    monkeypatch.setattr(intrinsic, "LOOSE", loose)
    X = hard_case(kind, np.random.default_rng(3))
    D = np.sort(cdist(X, X) + np.diag(np.full(len(X), np.inf)), axis=1)[:, :2]
    for dtype in (torch.float64, torch.float32):
        t = torch.from_numpy(X).to(dtype)
        before = t.clone()
        ref = D if dtype == torch.float64 else np.sort(cdist(t.double().numpy(), t.double().numpy()) +
                                                        np.diag(np.full(len(X), np.inf)), axis=1)[:, :2]
        for block, cand in [(None, None), (7, 2), (64, 4), (len(X), 8)]:
            r1, r2 = nn_distances(t, block=block, candidates=cand)
            np.testing.assert_allclose(np.stack([r1, r2], 1), ref, rtol=1e-12, atol=0)
        assert torch.equal(t, before)


@pytest.mark.parametrize("kind", ["subspace", "gauss"])
def test_projected_search_is_exact(kind, monkeypatch):
    """The projection-pruned search (tried when D ≥ 4·project) gives the same distances as the full search — on
    data with a dominant subspace (pruned) and on isotropic data (not tried) — and as a float64 cdist."""
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(900, 8)) @ rng.normal(size=(8, 256)) if kind == "subspace" else rng.normal(size=(900, 256)))
    X = X + 0.01 * rng.normal(size=X.shape)
    X = np.concatenate([X, X[:30]])  # and 30 duplicated rows
    t = torch.from_numpy(X)
    widths, search = [], intrinsic._symmetric_search
    monkeypatch.setattr(intrinsic, "_symmetric_search", lambda M, k, b: widths.append(M.shape[1]) or search(M, k, b))
    pruned, full = nn_distances(t, project=16), nn_distances(t, project=0)
    assert widths[0] == (16 + 3 if kind == "subspace" else 256 + 2)  # the subspace case really was pruned
    assert torch.equal(pruned[0], full[0]) and torch.equal(pruned[1], full[1])
    D = torch.from_numpy(cdist(X, X)).fill_diagonal_(float("inf")).sort(dim=1).values  # float64 differences
    assert torch.allclose(pruned[0], D[:, 0], rtol=1e-12, atol=0) and torch.allclose(pruned[1], D[:, 1], rtol=1e-12)
    assert (pruned[0][:30] == 0).all()


@pytest.mark.parametrize("scale", [2.0 ** 70, 2.0 ** -70, 1e30])
def test_search_outside_float32_squares(scale):
    """Data whose float32 squared norms overflow (or underflow) gave NaN distances and a NaN dimension, printed as
    a result: the search runs on exactly rescaled rows; the distances are the float64 cdist's of the data as given,
    and the estimate is that of the unscaled data (bit for bit at a power-of-two scale: TwoNN is scale-free)."""
    X = torch.from_numpy(dataset("subspace", n=400) * 3).float()
    Y = (X.double() * scale).float()
    D = torch.from_numpy(cdist(Y.double().numpy(), Y.double().numpy())).fill_diagonal_(float("inf"))
    D = D.sort(dim=1).values
    r1, r2 = nn_distances(Y)
    assert torch.allclose(r1, D[:, 0], rtol=1e-12, atol=0) and torch.allclose(r2, D[:, 1], rtol=1e-12, atol=0)
    plain, scaled = two_nn(X, bootstrap=3), two_nn(Y, bootstrap=3)
    if math.frexp(scale)[0] == 0.5:
        assert scaled == plain
    assert scaled.dimension == pytest.approx(plain.dimension, rel=1e-5) and math.isfinite(scaled.dimension)


def test_refusals():
    with pytest.raises(SurgeryError, match="at least 100"):
        two_nn(torch.randn(50, 8))
    from surgery.capture import capture, capture_inputs

    for f in (capture, capture_inputs):  # batch_size 0 was range()'s ValueError, -1 ran nothing
        for size in (0, -1):
            with pytest.raises(SurgeryError, match=f"batch_size must be at least 1, got {size}"):
                f(FIXTURES / "tiny-llama", FIXTURES / "sentences.txt", batch_size=size)
    for shape in ((200, 0), (200,), (200, 3, 2)):  # were numpy/unpacking ValueErrors in the Python API
        with pytest.raises(SurgeryError, match=r"TwoNN takes a \(points, features\) matrix"):
            two_nn(torch.randn(shape))
    X = torch.randn(300, 8)
    X[5, 2] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        two_nn(X)


def test_gelora_ranks_and_mapping():
    assert gelora_ranks([4.2, 6.9, 9.6, 10.3, 9.98], "diff") == [3, 3, 1, 1]
    assert gelora_ranks([4.2, 6.9, 9.6, 10.3, 9.98], "max", min_rank=2) == [7, 10, 11, 11]
    ranks = module_ranks(["m.layers.0.q", "m.layers.1.q", "m.layers.1.mlp.up"], [3, 5])
    assert ranks == {"m.layers.0.q": 3, "m.layers.1.q": 5, "m.layers.1.mlp.up": 5}
    with pytest.raises(SurgeryError, match="m.layers.2.q"):
        module_ranks(["m.layers.2.q"], [3, 5])
    with pytest.raises(SurgeryError, match="lm_head"):
        module_ranks(["lm_head"], [3, 5])
    fitted = fit_budget({"a": 8, "b": 2}, {"a": 100, "b": 100}, 600)
    assert sum(r * 100 for r in fitted.values()) <= 600 and fitted["a"] > fitted["b"]


def test_rerank_squeezes_to_block_ranks():
    a = load_adapter(PEFT_FIXTURE)  # 2 layers, rank 16
    small, rep = rerank(a, [2.0, 7.5, 30.0], device="cpu")  # block ranks 6 and 23 (above 16: clipped)
    assert rep.block_ranks == (6, 23)
    for name, m in small.modules.items():
        assert m.rank == (6 if ".layers.0." in name else 16)
    assert len(rep.clipped) == 7 and all(v == (23, 16) for v in rep.clipped.values())
    with pytest.raises(SurgeryError, match="layers.1"):
        rerank(a, [2.0, 7.5], device="cpu")  # one block of IDs for a two-block adapter


def test_rerank_expand_pads_without_changing_the_update(tmp_path):
    """--expand: modules below their GeLoRA rank are padded to it, ΔW bit-identical, the new directions
    trainable (new A rows non-zero, new B columns zero); in PEFT the padded adapter gives the logits of the
    unpadded one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery import save_adapter

    a = load_adapter(PEFT_FIXTURE)
    kept, _ = rerank(a, [2.0, 7.5, 30.0], device="cpu")
    big, rep = rerank(a, [2.0, 7.5, 30.0], expand_ranks=True, device="cpu")
    assert rep.expanded and len(rep.clipped) == 7
    for name, m in big.modules.items():
        if ".layers.1." in name:
            assert m.rank == 23 and torch.allclose(m.delta(), kept.modules[name].delta(), rtol=0, atol=1e-12)
            assert (m.A[16:] != 0).any(dim=-1).all() and (m.B[:, 16:] == 0).all()
    again, _ = rerank(a, [2.0, 7.5, 30.0], expand_ranks=True, device="cpu")
    assert all(torch.equal(x.A, again.modules[n].A) for n, x in big.modules.items())  # seeded
    ids = torch.arange(12)[None]
    logits = {}
    for tag, adapter in (("kept", kept), ("big", big)):
        save_adapter(adapter, tmp_path / tag)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama"), tmp_path / tag)
        if tag == "big":
            assert model.base_model.model.model.layers[1].self_attn.q_proj.r["default"] == 23
        with torch.no_grad():
            logits[tag] = model(input_ids=ids).logits
    assert torch.allclose(logits["big"], logits["kept"], atol=1e-6)


def test_rerank_expand_stops_at_the_full_rank():
    """A GeLoRA rank above min(out, in) pads a module to its update's full rank, not beyond (more columns add
    parameters, never a direction; an ID file's 10⁶ once asked for a 10⁶-row A of a 64-wide layer)."""
    a = load_adapter(PEFT_FIXTURE)  # layer 1: q/o 64×64, k/v 32×64, gate/up 128×64, down 64×128, all rank 16
    big, rep = rerank(a, [2.0, 7.5, 1e6], expand_ranks=True, device="cpu")
    for name, m in a.modules.items():
        if ".layers.1." in name:
            full = min(m.out_features, m.in_features)
            assert big.modules[name].rank == rep.padded[name] == full and rep.clipped[name] == (999993, 16)
            assert torch.allclose(big.modules[name].delta(), m.delta(), rtol=0, atol=1e-5)
    assert sum("padded to 32 (the full rank of its update)" in w for w in rep.warnings) == 2
    with pytest.raises(SurgeryError, match="≥ 0"):
        gelora_ranks([3.0, -1.0])
    with pytest.raises(SurgeryError, match="at least one block, got 1"):  # rerank --config-out: an IndexError
        gelora_ranks([3.0])


def test_capture_real_minilm(minilm, tmp_path):
    from surgery.capture import capture, load_capture, save_capture

    cap = capture(minilm, FIXTURES / "sentences.txt", max_tokens=500, seed=1, device="cpu")
    assert len(cap.layers) == 7 and all(t.shape == (500, 384) for t in cap.layers)
    save_capture(cap, tmp_path / "a.safetensors")
    save_capture(capture(minilm, FIXTURES / "sentences.txt", max_tokens=500, seed=1, device="cpu"), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()  # reproducible
    with_special = capture(minilm, FIXTURES / "sentences.txt", max_tokens=10**6, keep_special=True, device="cpu")
    assert with_special.metadata["tokens_available"] == cap.metadata["tokens_available"] + 2 * 50  # [CLS], [SEP]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        results = [two_nn(t, bootstrap=20) for t in load_capture(tmp_path / "a.safetensors").layers]
    assert results[0].duplicates > 0  # same token at the same position: identical embedding-layer states
    assert all(np.isfinite(r.dimension) and 1 < r.dimension < 384 / 10 for r in results)


def test_real_minilm_capture_with_repeats_equals_dadapy(minilm, tmp_path):
    """Every text given twice repeats every layer's rows; the embedding layer repeats tokens too."""
    from surgery.capture import capture

    texts = (FIXTURES / "sentences.txt").read_text().splitlines()[:30]
    (tmp_path / "t.txt").write_text("\n".join(texts + texts[:20]) + "\n")
    cap = capture(minilm, tmp_path / "t.txt", max_tokens=10**6, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [two_nn(t, bootstrap=0) for t in cap.layers]
    for t, r in zip(cap.layers, results):
        X = t.double().numpy()
        assert r.duplicates == len(X) - len(np.unique(X, axis=0)) > 0
        assert r.dimension == pytest.approx(dadapy_id(X), rel=1e-6)
        assert r.dimension == pytest.approx(skdim.id.TwoNN().fit(np.unique(X, axis=0)).dimension_, rel=1e-6)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_capture_id_rerank_config(minilm, tmp_path):
    r = run("capture", minilm, "--texts", FIXTURES / "sentences.txt", "-o", tmp_path / "h.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = run("id", tmp_path / "h.safetensors", "--json", "--device", "cpu", "--plot", tmp_path / "id.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "id.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(r.output)
    assert len(doc["ids"]) == 7 and doc["block_prefix"] == "encoder.layer"
    (tmp_path / "ids.json").write_text(r.output)
    r = run("rerank", "--ids", tmp_path / "ids.json", "--config-out", tmp_path / "cfg.json", "--targets", "query,value")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    block_ranks = gelora_ranks(doc["ids"])
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(minilm),
                           LoraConfig(**{k: v for k, v in cfg.items() if k not in ("peft_type",)}))
    seen = 0
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            layer = int(name.split("encoder.layer.")[1].split(".")[0])
            assert mod.r["default"] == block_ranks[layer], name
            seen += 1
    assert seen == 12
    # errors: both sources, a hidden file with NaN, an adapter whose blocks exceed the file's
    assert run("rerank", "--ids", tmp_path / "ids.json", "--hidden", tmp_path / "h.safetensors",
               "--config-out", tmp_path / "x.json").exit_code == 2
    from safetensors.torch import save_file

    save_file({"hidden.0": torch.full((200, 4), float("nan"))}, str(tmp_path / "nan.safetensors"))
    r = run("id", tmp_path / "nan.safetensors")
    assert r.exit_code == 1 and "holds NaN or Inf" in r.output
    r = run("rerank", PEFT_FIXTURE, "--ids", tmp_path / "one.json", "-o", tmp_path / "out")
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    (tmp_path / "one.json").write_text(json.dumps({"ids": [3.0, 5.0]}))
    r = run("rerank", PEFT_FIXTURE, "--ids", tmp_path / "one.json", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "layers.1" in r.output and not (tmp_path / "out").exists()
    (tmp_path / "two.json").write_text(json.dumps({"ids": [2.0, 7.5, 30.0]}))
    r = run("rerank", PEFT_FIXTURE, "--ids", tmp_path / "two.json", "-o", tmp_path / "wide", "--expand", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["expanded"] is True
    assert {m.rank for m in load_adapter(tmp_path / "wide").modules.values()} == {6, 23}
    r = run("rerank", "--ids", tmp_path / "two.json", "--min-rank", 0, "--config-out", tmp_path / "r0.json",
            "--targets", "q_proj")
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output  # PEFT refuses r = 0: wrote such a config
    (tmp_path / "neg.json").write_text(json.dumps({"ids": [-5.0, 2.0, 3.0]}))  # no dimension is negative
    r = run("rerank", PEFT_FIXTURE, "--ids", tmp_path / "neg.json", "-o", tmp_path / "neg")
    assert r.exit_code == 1 and "neg.json: ids must be a non-empty list of finite numbers ≥ 0" in r.output
    assert not (tmp_path / "neg").exists()


def test_id_reads_narrow_hidden_states_widened(tmp_path):
    """A bf16 / fp8 hidden-state file (a model run in bf16) gives the IDs of its values widened to float32 (both
    were tracebacks); a layer with no features is one line."""
    from safetensors.torch import save_file

    X = torch.randn(400, 8, generator=torch.Generator().manual_seed(3)) @ torch.randn(8, 24)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        save_file({"hidden.0": X.to(dtype)}, str(tmp_path / "narrow.safetensors"))
        save_file({"hidden.0": X.to(dtype).float()}, str(tmp_path / "wide.safetensors"))
        got, want = (run("id", tmp_path / f, "--json") for f in ("narrow.safetensors", "wide.safetensors"))
        assert got.exit_code == 0, got.output
        assert json.loads(got.output)["ids"] == json.loads(want.output)["ids"]
    r = run("id", tmp_path / "wide.safetensors", "--seed", str(10**30))  # torch's generators take < 2⁶⁴: was a bug
    assert r.exit_code == 2 and "is not in the range 0<=x<=9223372036854775807" in r.output
    save_file({"hidden.0": torch.zeros(300, 0)}, str(tmp_path / "none.safetensors"))
    r = run("id", tmp_path / "none.safetensors")
    assert r.exit_code == 1 and "hidden.0 is not a finite (tokens, hidden) matrix" in r.output


def test_encoder_decoder_capture_runs_the_encoder_and_rerank_keeps_to_its_blocks(tmp_path):
    """T5: capture was a traceback ("exactly one of input_ids or inputs_embeds": the decoder has no input); BART
    fed its decoder the input shifted. The encoder alone is run — hidden states equal its own, the blocks'
    path is `encoder.block` — and decoder modules are never given the encoder's inputs or ranks: rerank placed
    `decoder.block.1` by its index alone, in the blocks measured on the encoder."""
    import shutil

    from safetensors.torch import load_file

    from .conftest import lora_pair, write_peft

    transformers = pytest.importorskip("transformers")
    tiny = FIXTURES / "tiny-llama"
    vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval()
    model.save_pretrained(tmp_path / "t5")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / f, tmp_path / "t5" / f)
    lines = [line for line in (FIXTURES / "sentences.txt").read_text().splitlines() if line.strip()][:3]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    note = "T5ForConditionalGeneration is an encoder-decoder model: its encoder (encoder) is run on the texts"
    r = run("capture", tmp_path / "t5", "--texts", tmp_path / "t.txt", "--keep-special", "-o",
            tmp_path / "h.safetensors", "--json")
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["block_prefix"] == "encoder.block" and meta["layers"] == 3 and note in meta["notes"][0]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "t5")
    want: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for line in lines:
            states = model.encoder(input_ids=tok(line, return_tensors="pt")["input_ids"], output_hidden_states=True)
            for j in range(3):
                want[j].append(states.hidden_states[j][0])
    got = load_file(tmp_path / "h.safetensors")
    for j in range(3):
        torch.testing.assert_close(got[f"hidden.{j}"], torch.cat(want[j]), rtol=1e-5, atol=1e-5)
    # module inputs: the encoder's matches, the decoder's left out and named; only decoder ones: one line
    r = run("capture", tmp_path / "t5", "--texts", tmp_path / "t.txt", "--module-inputs", "--targets",
            r"SelfAttention\.q", "-o", tmp_path / "x.safetensors", "--json")
    meta = json.loads(r.stdout)
    assert meta["modules"] == ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.0.SelfAttention.q"]
    assert meta["notes"][1].startswith("2 module(s) matching") and "(decoder.block.0.layer.0.SelfAttention.q, " \
        "decoder.block.1.layer.0.SelfAttention.q…)" in meta["notes"][1]
    r = run("capture", tmp_path / "t5", "--texts", tmp_path / "t.txt", "--module-inputs", "--targets", "decoder",
            "-o", tmp_path / "y.safetensors")
    assert r.exit_code == 1 and "would get no input: " + note in r.output and r.output.count("\n") == 1
    # rerank: modules of the captured blocks get their ranks; a decoder module is refused, not given block 1's
    (tmp_path / "ids.json").write_text(json.dumps({"ids": [2.0, 5.0, 6.0], "block_prefix": "encoder.block"}))
    enc = {f"encoder.block.{i}.layer.0.SelfAttention.q": lora_pair(32, 32, 8, seed=i) for i in range(2)}
    write_peft(tmp_path / "enc", enc, r=8, alpha=8)
    r = run("rerank", tmp_path / "enc", "--ids", tmp_path / "ids.json", "-o", tmp_path / "enc-r")
    assert r.exit_code == 0, r.output
    assert [m.rank for _, m in sorted(load_adapter(tmp_path / "enc-r").modules.items())] == [3, 1]
    write_peft(tmp_path / "both", enc | {"decoder.block.1.layer.0.SelfAttention.q": lora_pair(32, 32, 8)},
               r=8, alpha=8)
    r = run("rerank", tmp_path / "both", "--ids", tmp_path / "ids.json", "-o", tmp_path / "both-r")
    assert r.exit_code == 1 and "blocks (encoder.block.N) of the hidden-state file: base_model.model.decoder" \
        ".block.1.layer.0.SelfAttention.q" in r.output and not (tmp_path / "both-r").exists()


def test_module_inputs_of_a_module_the_run_never_calls(tmp_path, monkeypatch):
    """A targeted module the forward never calls has no rows (torch.cat of nothing was a traceback): one line,
    nothing written. Here the run is made the Llama body alone, so lm_head is never called."""
    from surgery import capture

    monkeypatch.setattr(capture, "_run_part", lambda model: (model.model, ""))
    r = run("capture", FIXTURES / "tiny-llama", "--texts", FIXTURES / "sentences.txt", "--module-inputs",
            "--targets", "lm_head", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "module(s) lm_head got no input (the model never called them)" in r.output
    assert list(tmp_path.iterdir()) == []
