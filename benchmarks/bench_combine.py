"""Combine benchmark (issue 14): two 7B-shaped rank-64 bf16 LoRAs into one rank-64 LoRA, and PEFT's
add_weighted_adapter(combination_type="svd") on the Llama-1B shape.

    python benchmarks/bench_combine.py [--workdir DIR] [--repeats 3] [--device cpu] [--skip-peft]

(a) the I/O floor: a process that `load_file`s both adapters and `save_file`s one rank-64 result;
(b) `surgery combine A B --rank 64 -o OUT` (exact: QR-core SVD of the stacked rank-128 factors), whole process;
alternating, same run. Then, unless --skip-peft, on the Llama-1B shape (hidden 2048, intermediate 8192, 16 layers,
vocabulary cut to 2048) with two rank-16 LoRAs on all 7 projections: PEFT's `add_weighted_adapter([a, b],
[1, 1], "svd", combination_type="svd", svd_rank=16)` on the loaded model (dense ΔW + full SVD per module) against
`surgery combine --rank 16` of the saved adapters as a whole process, and the largest difference of their ΔW.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_squeeze import LAYERS, RANK, SHAPES, make_adapter  # noqa: E402
from measure import alternate, llama_1b, parser, report, timed  # noqa: E402

FLOOR = """
import sys
from safetensors.torch import load_file, save_file
a, b, dst = load_file(sys.argv[1]), load_file(sys.argv[2]), sys.argv[3]
save_file({n: v.clone() for n, v in a.items()}, dst, metadata={"format": "pt"})
"""


def peft_comparison(work: Path, device: str) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from surgery import load_adapter

    model = llama_1b()
    targets = sorted(m.split(".")[1] for m in SHAPES)
    for name, seed in (("a", 1), ("b", 2)):
        m = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        m.save_pretrained(work / f"1b-{name}")
        model = m.unload()
    pm = PeftModel.from_pretrained(model, work / "1b-a", adapter_name="a")
    pm.load_adapter(work / "1b-b", adapter_name="b")
    t0 = time.perf_counter()
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "svd", combination_type="svd", svd_rank=16)
    peft_s = time.perf_counter() - t0
    print(f"  PEFT add_weighted_adapter(svd), model loaded, in process: {peft_s:7.2f} s", flush=True)
    cmd = [sys.executable, "-m", "surgery_cli.main", "combine", str(work / "1b-a"), str(work / "1b-b"), "--rank", "16",
           "-o", str(work / "1b-c"), "--device", device, "--force"]
    ours_s = statistics.median(timed(cmd)[0] for _ in range(3))
    ours = load_adapter(work / "1b-c")
    worst = 0.0
    for name, m in ours.modules.items():
        layer = pm.base_model.model.get_submodule(name.removeprefix("base_model.model."))
        ref = layer.get_delta_weight("svd").double()
        worst = max(worst, float((m.delta() - ref).abs().max() / ref.abs().max()))
    print(f"Llama-1B, two rank-16 LoRAs on {len(ours.modules)} modules → rank 16:")
    print(f"  surgery combine --rank 16, whole process (median of 3):  {ours_s:7.2f} s   ratio {peft_s / ours_s:.0f}×")
    print(f"  largest |ΔW_surgery − ΔW_PEFT| / max|ΔW_PEFT| over all modules: {worst:.2e}")


def main():
    args = parser("--skip-peft").parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="surgery-bench-"))
    for name, seed in (("a", 1), ("b", 2)):
        if not (work / f"7b-{name}" / "adapter_model.safetensors").exists():
            make_adapter(work / f"7b-{name}", seed)
    a, b = (work / f"7b-{n}" for n in "ab")
    floor = [sys.executable, "-c", FLOOR, str(a / "adapter_model.safetensors"), str(b / "adapter_model.safetensors"),
             str(work / "floor.safetensors")]
    ours = [sys.executable, "-m", "surgery_cli.main", "combine", str(a), str(b), "--rank", str(RANK),
            "-o", str(work / "7b-c"), "--device", args.device, "--force"]
    med = alternate({"floor": floor, "combine": ours}, args.repeats)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}")
    print(f"two 7B-shaped rank-{RANK} bf16 adapters ({LAYERS * len(SHAPES)} modules each) → rank {RANK}")
    report(med, "combine")
    if not args.skip_peft:
        peft_comparison(work, args.device)


if __name__ == "__main__":
    main()
