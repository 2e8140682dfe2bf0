"""surgery.train (adapter-only steps, In-Squeeze on our layers and on real PEFT models, export) and
surgery.distill (`tune`), against float64 references and the real PEFT / transformers libraries."""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from surgery import SurgeryError, load_adapter, save_adapter
from surgery.adapter import Adapter, LoraModule
from surgery.distill import tune, tune_module
from surgery.tera import attach_tera, to_tera
from surgery.train import InSqueeze, TrainStep, attach_lora, lora_adapter, lora_sites, squeeze_model
from surgery_cli.main import main

from .conftest import FIXTURES, dense_truncation, lora_pair, tree_digest

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 16))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_train_step_moves_only_adapter_tensors_and_lowers_the_loss(amp):
    model, teacher = mlp(0), mlp(1)
    attach_lora(model, r"^0$", rank=4, alpha=8, seed=3)
    tera = attach_tera(model, r"^2$", core_rank=4, seed=5)
    shared_before = [t.clone() for t in [tera["2"].core, *tera["2"].factors]]
    before = snapshot(model)
    X = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    Y = teacher(X).detach()
    step = TrainStep(model, lr=1e-2, amp=amp)
    losses = [step.step(lambda: (model(X) - Y).float().square().mean()) for _ in range(60)]
    assert losses[-1] < 0.7 * losses[0]
    after = snapshot(model)
    trained = {"0.A", "0.B", "2.lambdas.0", "2.lambdas.1", "2.lambdas.2", "2.lambdas.3", "2.lambdas.4",
               "2.lambdas.5"}
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same == (k not in trained), k
    assert all(torch.equal(a, b) for a, b in zip(shared_before, [tera["2"].core, *tera["2"].factors]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained


def test_squeeze_model_is_the_exact_truncation_and_resets_optimizer_state():
    model = mlp()
    layers = attach_lora(model, r"^(0|2)$", rank=16, alpha=32)
    for i, layer in enumerate(layers.values()):
        B, A = lora_pair(64, 64, 16, decay=0.8, seed=i)
        layer.A.data, layer.B.data = A, B
    step = TrainStep(model, lr=1e-3)
    X = torch.randn(32, 64)
    step.step(lambda: model(X).square().mean())
    ref = {n: dense_truncation(l.scale * (l.B.double() @ l.A.double()).detach(), 4) for n, l in layers.items()}
    assert all(len(step.optimizer.state[p]) > 0 for l in layers.values() for p in (l.A, l.B))
    done = squeeze_model(model, 4, step.optimizer)
    assert [(d.from_rank, d.to_rank) for d in done] == [(16, 4), (16, 4)]
    for n, l in layers.items():
        assert l.A.shape == (4, 64) and l.B.shape == (64, 4) and l.scale == 2.0
        assert torch.allclose(l.scale * (l.B.double() @ l.A.double()), ref[n], atol=1e-6)
        assert all(p not in step.optimizer.state or not step.optimizer.state[p] for p in (l.A, l.B))
    step.step(lambda: model(X).square().mean())  # the optimizer carries on with the new shapes
    assert squeeze_model(model, 8) == []  # never raises a rank


def test_training_api_arguments_are_checked():
    """The training API's bad arguments, each one line: a bad pattern (re.error), rank 0 (ZeroDivisionError) or
    2.5 (TypeError in torch.empty) for attach_lora; a rank of 2.5 for squeeze_model (TypeError in a slice); a
    negative or NaN learning rate (torch's ValueError). A numpy integer rank is a rank."""
    import numpy as np

    for pattern, rank, message in [("((", 4, "pattern: bad regex '(('"), ("0", 0, "got 0"), ("0", 2.5, "got 2.5")]:
        with pytest.raises(SurgeryError, match=re.escape(message)):
            attach_lora(mlp(), pattern, rank)
    model = mlp()
    attach_lora(model, r"^0$", rank=8)
    with pytest.raises(SurgeryError, match=re.escape("0: rank must be a whole number of at least 1, got 2.5")):
        squeeze_model(model, 2.5)
    assert [s.to_rank for s in squeeze_model(model, np.int64(4))] == [4]
    for lr in (-1.0, float("nan")):
        with pytest.raises(SurgeryError, match="learning rate must be a finite number ≥ 0"):
            TrainStep(model, lr=lr)


def test_in_squeeze_plan():
    s = InSqueeze(64, 8, 400)
    assert s.plan == [(100, 32), (200, 16), (300, 8)]
    assert [s.rank_at(k) for k in (0, 99, 100, 250, 400)] == [64, 64, 32, 16, 8]
    assert InSqueeze(32, 4, 40, squeezes=2).plan == [(13, 11), (26, 4)]
    with pytest.raises(SurgeryError, match="target rank < source rank"):
        InSqueeze(4, 8, 100)
    with pytest.raises(SurgeryError, match="need at least"):
        InSqueeze(64, 8, 3)


def tiny_llama():
    return transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama").float()


def test_in_squeeze_on_a_peft_model_recovers_and_exports(tmp_path):
    """Distil a planted rank-16 teacher into a PEFT LoRA annealed 16 → 2: after every squeeze the loss goes
    back below where the squeeze left it, and the exported rank-2 adapter loads in PEFT with the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    teacher = get_peft_model(tiny_llama(), cfg)
    g = torch.Generator().manual_seed(0)
    for site in lora_sites(teacher).values():
        site.B.data = 0.3 * torch.randn(site.B.shape, generator=g)
    student = get_peft_model(tiny_llama(), cfg)
    ids = torch.randint(0, 256, (8, 24), generator=g)
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    step = TrainStep(student, lr=5e-3)
    schedule = InSqueeze(16, 2, 160)
    loss_fn = lambda: (student(input_ids=ids).logits - target).square().mean()  # noqa: E731
    losses, after_squeeze = {}, {}
    for k in range(1, 161):
        losses[k] = step.step(loss_fn)
        if schedule.on_step(student, step.optimizer, k):
            with torch.no_grad():
                after_squeeze[k] = float(loss_fn())
    assert list(after_squeeze) == [s for s, _ in schedule.plan] == [40, 80, 120]
    for s, end in zip(after_squeeze, [80, 120, 160]):
        assert losses[end] < 0.8 * after_squeeze[s], (s, after_squeeze[s], losses[end])  # recovered
    assert {s.A.shape[0] for s in lora_sites(student).values()} == {2}
    assert student.peft_config["default"].r == 2
    save_adapter(lora_adapter(student), tmp_path / "ours")
    student.save_pretrained(tmp_path / "peft")  # PEFT's own writer sees the synced config too
    with torch.no_grad():
        want = student(input_ids=ids).logits
        for d in ("ours", "peft"):
            loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / d)
            assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5), d
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["r"] == 2


def test_in_squeeze_trainer_callback(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=100)
    schedule = InSqueeze(8, 2, 12)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[schedule.trainer_callback()]).train()
    assert {s.A.shape[0] for s in lora_sites(model).values()} == {2}
    assert model.peft_config["default"].r == 2 and model.peft_config["default"].lora_alpha == 2


def lowrank_inputs(n, d, seed):
    """Inputs with a strongly non-white covariance: the plain SVD truncation is not the optimum for them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.logspace(0, -2, d)


def test_tune_cont_squeeze_beats_the_svd_truncation_and_never_worsens():
    B, A = lora_pair(48, 32, 12, decay=0.85, seed=4)
    teacher = LoraModule(A=A, B=B, scale=2.0)
    core = dense_truncation(teacher.delta(), 3)
    U, S, Vh = torch.linalg.svd(core)
    student = LoraModule(A=(S[:3, None].sqrt() * Vh[:3]).float(), B=(U[:, :3] * S[:3].sqrt()).float(), scale=1.0)
    X = lowrank_inputs(512, 32, 0)
    tuned, before, after, best, start = tune_module(student, teacher, X, steps=300, lr=1e-2)
    assert after < 0.9 * before and tuned.rank == 3 and start == "closed form"
    M = X.double() @ teacher.delta().T
    ref = torch.linalg.norm(X.double() @ (tuned.delta() - teacher.delta()).T) / torch.linalg.norm(M)
    assert float(ref) == pytest.approx(after, rel=1e-4)  # the reported error is the written module's
    S = torch.linalg.svdvals(M)  # the float64 optimum at rank 3: Adam from the closed form cannot beat it
    assert after == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-4)
    same, b2, a2, best2, start2 = tune_module(teacher, teacher, X, steps=20)  # already exact: kept as it is
    assert same is teacher and a2 == b2 == pytest.approx(0, abs=1e-7) and best2 == 0 and start2 == "given"


def test_tune_refines_a_lora_to_tera_conversion(tmp_path):
    pairs = {f"base_model.model.layers.{i}.proj": lora_pair(64, 64, 16, decay=0.8, seed=i) for i in range(2)}
    teacher = Adapter(modules={n: LoraModule(A=A, B=B, scale=1.0) for n, (B, A) in pairs.items()}, format="peft")
    student, _ = to_tera(teacher, core_rank=4)
    inputs = {n.removeprefix("base_model.model."): lowrank_inputs(256, 64, 1) for n in pairs}
    tuned, report = tune(student, teacher, inputs, steps=150, device="cpu")
    for r in report:
        assert r.after < r.before
    for n, m in tuned.modules.items():
        assert m.spec == student.modules[n].spec  # only the λ's moved
    with pytest.raises(SurgeryError, match="no captured inputs"):
        tune(student, teacher, {}, steps=1)
    with pytest.raises(SurgeryError, match="the captured inputs hold no tokens"):  # was a silent no-op
        tune(student, teacher, {n: x[:0] for n, x in inputs.items()}, steps=1)
    narrow = {n: x.to(torch.float8_e4m3fn) for n, x in inputs.items()}  # fp8 storage: widened (was a traceback)
    got, want = (tune(student, teacher, xs, steps=3, device="cpu")[0] for xs in (narrow, {
        n: x.float() for n, x in narrow.items()}))
    assert all(torch.equal(l, k) for n, m in got.modules.items() for l, k in zip(m.lambdas, want.modules[n].lambdas))
    name = next(iter(pairs))
    bad = teacher.with_modules({**teacher.modules, name: LoraModule(A=pairs[name][1] * float("nan"),
                                                                    B=pairs[name][0], scale=1.0)})
    with pytest.raises(SurgeryError, match=f"module {name}: the teacher's outputs are not finite"):
        tune(student, bad, inputs, steps=1)
    with pytest.raises(SurgeryError, match="not in the teacher"):
        tune(student, teacher.with_modules({}), inputs, steps=1)
    B, A = lora_pair(32, 64, 4)
    other = teacher.with_modules({**teacher.modules, name: LoraModule(A=A, B=B, scale=1.0)})
    with pytest.raises(SurgeryError, match="student 64×64 vs teacher 32×64"):
        tune(student, other, inputs, steps=1)
    B, A = lora_pair(64, 64, 4)
    conv = teacher.with_modules({**teacher.modules, name: LoraModule(A=A[:, :, None, None], B=B[:, :, None, None],
                                                                     scale=1.0, kind="conv")})
    with pytest.raises(SurgeryError, match="the teacher is a conv module"):
        tune(student, conv, inputs, steps=1)
    with pytest.raises(SurgeryError, match="features"):
        tune(student, teacher, {k: v[:, :10] for k, v in inputs.items()}, steps=1)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_capture_module_inputs_and_tune_on_minilm(minilm, tmp_path):
    r = run("capture", minilm, "--texts", FIXTURES / "sentences.txt", "--module-inputs", "--max-tokens", 300,
            "-o", tmp_path / "acts.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output
    from surgery.capture import load_inputs

    acts = load_inputs(tmp_path / "acts.safetensors")
    assert len(acts) == 36 and acts["encoder.layer.0.attention.self.query"].shape == (300, 384)
    assert acts["encoder.layer.5.output.dense"].shape == (300, 1536)
    q, k = (acts[f"encoder.layer.0.attention.self.{m}"].load() for m in ("query", "key"))
    assert torch.equal(q, k)  # q/k/v are fed the same tensor: stored once, read for each
    # the captured rows are the real inputs: the query layer applied to them gives the model's own outputs
    model = transformers.AutoModel.from_pretrained(minilm).eval()
    assert torch.isfinite(q).all() and q.std() > 0.1
    with torch.no_grad():
        out = model.encoder.layer[0].attention.self.query(q)
    assert out.shape == (300, 384)

    names = ["attention.self.query", "attention.self.value", "output.dense"]
    pairs = {f"encoder.layer.{i}.{n}": lora_pair(384, 1536 if n == "output.dense" else 384, 16, decay=0.8, seed=i)
             for i in range(6) for n in names}
    pairs = {k: (B, A) for k, (B, A) in pairs.items()}
    from .conftest import write_peft

    write_peft(tmp_path / "teacher", pairs, r=16, alpha=16)
    assert run("squeeze", tmp_path / "teacher", "--rank", 2, "-o", tmp_path / "student").exit_code == 0
    digest = tree_digest(tmp_path / "student")
    r = run("tune", tmp_path / "student", "--teacher", tmp_path / "teacher", "--activations",
            tmp_path / "acts.safetensors", "-o", tmp_path / "tuned", "--steps", 40, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert len(doc["modules"]) == 18 and all(m["after"] <= m["before"] for m in doc["modules"])
    assert sum(m["after"] < m["before"] for m in doc["modules"]) >= 12
    assert tree_digest(tmp_path / "student") == digest
    tuned = load_adapter(tmp_path / "tuned")
    assert {m.rank for m in tuned.modules.values()} == {2}
    # bad input: activations without the modules' inputs → one error line, nothing written
    r = CliRunner().invoke(main, ["capture", str(minilm), "--texts", str(FIXTURES / "sentences.txt"),
                                  "--module-inputs", "--targets", r"layer\.0\.", "-o", str(tmp_path / "a0.safetensors"),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["tune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                                  "--activations", str(tmp_path / "a0.safetensors"), "-o", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "no captured inputs" in r.output and not (tmp_path / "bad").exists()
    r = CliRunner().invoke(main, ["tune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                                  "--activations", str(tmp_path / "teacher" / "adapter_model.safetensors"),
                                  "-o", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "not a module-inputs file" in r.output
    r = CliRunner().invoke(main, ["capture", str(minilm), "--texts", str(FIXTURES / "sentences.txt"),
                                  "--module-inputs", "--targets", "(", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "bad regex" in r.output and not (tmp_path / "x.safetensors").exists()
    r = CliRunner().invoke(main, ["capture", str(minilm), "--texts", str(FIXTURES / "sentences.txt"),
                                  "--targets", "query", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "--targets goes with --module-inputs" in r.output
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("kind", ["lora", "tera"])
def test_training_on_gpt2_conv1d_layers(tmp_path, kind):
    """GPT-2's linear layers are Conv1D (weight stored (in, out)): attach_lora / attach_tera said "no nn.Linear
    module matches", so TeRA (which only this library trains) could not be trained on GPT-2 at all. They wrap
    Conv1D now, and the exported adapter states fan_in_fan_out: `surgery merge` of it (and, for LoRA, PEFT's
    loader) gives the logits of the trained model. Conv1D and nn.Linear layers in one pattern are refused with the
    model left as it was: one adapter file states one fan_in_fan_out."""
    from surgery.tera import adapter_from_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    before = snapshot(model)
    with pytest.raises(SurgeryError, match=r"matches Conv1D layers, stored \(in, out\) \(transformer.h.0.attn.c_attn\)"
                                           r", and nn.Linear ones \(lm_head\)"):
        attach_lora(model, r"c_attn|lm_head", rank=4)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert all(p.requires_grad for p in model.parameters())
    targets = r"attn\.c_(attn|proj)|mlp\.c_fc"
    layers = attach_lora(model, targets, rank=4, alpha=8) if kind == "lora" else attach_tera(model, targets, core_rank=4)
    assert len(layers) == 6
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    step = TrainStep(model, lr=5e-2)
    losses = [step.step(lambda: model(ids, labels=ids).loss) for _ in range(5)]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        want = model(ids).logits
    adapter = lora_adapter(model, str(tmp_path / "gpt2")) if kind == "lora" else adapter_from_model(model)
    assert adapter.config["fan_in_fan_out"] is True
    out = tmp_path / ("lora" if kind == "lora" else "t.safetensors")
    save_adapter(adapter, out)
    r = run("merge", tmp_path / "gpt2", out, "-o", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        base_logits = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-4)
        assert (want - base_logits).abs().max() > 1e-2  # the training moved the outputs
        if kind == "lora":
            loaded = peft.PeftModel.from_pretrained(
                transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), out).eval()
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-4)
            # target_modules select exactly the trained layers (`c_proj` alone also meant mlp.c_proj: PEFT put a
            # LoRA layer there too and warned of missing keys)
            assert {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)} == set(layers)


def test_adapter_layers_refuse_what_they_cannot_wrap():
    """Each one line: a pattern matching no linear layer; LoRALinear / TeRALinear around a layer that is neither
    nn.Linear nor Conv1D; a model whose layers, attached by separate calls, wrap both kinds (one adapter file states
    one fan_in_fan_out) — refused when it is exported."""
    from surgery.tera import TeRALinear, TeraSpec, adapter_from_model
    from surgery.train import LoRALinear

    with pytest.raises(SurgeryError, match=re.escape("no nn.Linear or Conv1D module matches 'nothing'")):
        attach_lora(mlp(), "nothing", rank=2)
    with pytest.raises(SurgeryError, match="LoRALinear wraps an nn.Linear or Conv1D, not Conv2d"):
        LoRALinear(torch.nn.Conv2d(4, 4, 3), rank=2)
    with pytest.raises(SurgeryError, match="TeRALinear wraps an nn.Linear or Conv1D, not Embedding"):
        TeRALinear(torch.nn.Embedding(8, 4), TeraSpec.for_shape(4, 8, 3, 2, 0))
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), transformers.pytorch_utils.Conv1D(32, 32))
    attach_lora(model, "^0$", rank=2)
    attach_lora(model, "^1$", rank=2)
    with pytest.raises(SurgeryError, match=r"wrap Conv1D layers, stored \(in, out\) \(1\), and nn.Linear ones \(0\)"):
        lora_adapter(model)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), transformers.pytorch_utils.Conv1D(32, 32))
    attach_tera(model, "^0$", core_rank=2)
    attach_tera(model, "^1$", core_rank=2)
    with pytest.raises(SurgeryError, match=r"wrap Conv1D layers, stored \(in, out\) \(1\), and nn.Linear ones \(0\)"):
        adapter_from_model(model)
