"""The timing half of benchmarks/gpu.sh: every GPU workload against the same command on the CPU and against the
I/O floor, in one run, as whole processes (interpreter and imports included), with a markdown table and raw JSON.

    python benchmarks/gpu_suite.py [--out DIR] [--workdir DIR] [--repeats 1]
    python benchmarks/gpu_suite.py --check      # no CUDA needed: every piece the suite calls exists

Inputs are the other benchmarks' synthetic ones (bench_squeeze, bench_merge, bench_combine, bench_hadamard_kron),
sized to finish in well under 5 minutes on one H100 with 16 cores: a 7B-shaped r64 adapter (320 MB), a
Llama-1B-shaped bf16 base (2.5 GB) with an r64 LoRA, two 7B-shaped r64 adapters, LoHa r16 / LoKr 7B-shaped
adapters, TwoNN on 20,000 × 2048 and a `tune` step on 4096 tokens of a 4096 × 4096 module. The TwoNN and tune rows
are timed in process (no file I/O: no floor); the others are whole `surgery` commands.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_combine  # noqa: E402
import bench_hadamard_kron  # noqa: E402
import bench_merge  # noqa: E402
import bench_squeeze  # noqa: E402
from measure import timed  # noqa: E402

PY = sys.executable
SURGERY = [PY, "-m", "surgery_cli.main"]

READ_BOTH = """
import sys
from pathlib import Path
from safetensors.torch import load_file
for d in sys.argv[1:]:
    for f in sorted(Path(d).glob("*.safetensors")):
        load_file(f)
"""

TWONN = """
import json, sys, time, torch
from surgery.intrinsic import two_nn
g = torch.Generator().manual_seed(0)
X = torch.cos(torch.randn(20000, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 2048, generator=g,
              dtype=torch.float64))
two_nn(X[:2000], device=sys.argv[1], bootstrap=0)  # warm-up (CUDA context, kernels)
if sys.argv[1].startswith("cuda"):
    torch.cuda.synchronize()
t0 = time.perf_counter()
d = two_nn(X, device=sys.argv[1], bootstrap=0).dimension
print(json.dumps({"seconds": time.perf_counter() - t0, "dimension": d}))
"""

TUNE = """
import json, sys, time, torch
from surgery.adapter import LoraModule
from surgery.distill import tune_module
g = torch.Generator().manual_seed(0)
teacher = LoraModule(A=torch.randn(64, 4096, generator=g) / 64, B=torch.randn(4096, 64, generator=g) / 64, scale=2.0)
student = LoraModule(A=torch.randn(8, 4096, generator=g) / 64, B=torch.zeros(4096, 8), scale=1.0)
X = torch.randn(4096, 4096, generator=g)
dev = sys.argv[1]
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
tune_module(student, teacher, X, steps=2, device=dev)
t = []
for steps in (0, 20):
    sync(); t0 = time.perf_counter()
    tune_module(student, teacher, X, steps=steps, device=dev)
    sync(); t.append(time.perf_counter() - t0)
print(json.dumps({"seconds": (t[1] - t[0]) / 20}))
"""


def workloads(work: Path) -> list[dict]:
    """name → how to make its inputs, its floor (or None) and its command on a device."""
    sq = la = work / "7b-a"  # the squeeze input is also the first combine input
    lb = work / "7b-b"
    base, lora = work / "m" / "base", work / "m" / "lora"
    loha, lokr = work / "loha-7b", work / "lokr-7b"
    merged = work / "merged-ref"

    def make_merge():
        bench_merge.make(work / "m")
        if not merged.exists():
            subprocess.run(SURGERY + ["merge", str(base), str(lora), "-o", str(merged), "--device", "cpu"], check=True,
                           capture_output=True)

    return [
        dict(name="squeeze 7B-shaped r64 → r8", make=lambda: bench_squeeze.make_adapter(sq, 1),
             floor=[PY, "-c", bench_squeeze.FLOOR, str(sq / "adapter_model.safetensors"), str(work / "f.safetensors"),
                    "8"],
             run=lambda dev, out: SURGERY + ["squeeze", str(sq), "--rank", "8", "-o", str(out), "--device", dev]),
        dict(name="merge Llama-1B-shaped + r64", make=make_merge,
             floor=[PY, "-c", bench_merge.FLOOR, str(base), str(work / "f")],
             run=lambda dev, out: SURGERY + ["merge", str(base), str(lora), "-o", str(out), "--device", dev]),
        dict(name="extract 1B-shaped pair, rank 64", make=make_merge,
             floor=[PY, "-c", READ_BOTH, str(merged), str(base)],
             run=lambda dev, out: SURGERY + ["extract", str(merged), str(base), "--rank", "64", "-o", str(out),
                                             "--device", dev]),
        dict(name="combine two 7B-shaped r64 → r64",
             make=lambda: [bench_squeeze.make_adapter(p, s) for p, s in ((la, 1), (lb, 2))],
             floor=[PY, "-c", bench_combine.FLOOR, str(la / "adapter_model.safetensors"),
                    str(lb / "adapter_model.safetensors"), str(work / "f.safetensors")],
             run=lambda dev, out: SURGERY + ["combine", str(la), str(lb), "--rank", "64", "-o", str(out), "--device",
                                             dev]),
        dict(name="LoHa r16 7B-shaped → LoRA r8", make=lambda: bench_hadamard_kron.make(loha, "loha"),
             floor=[PY, "-c", bench_hadamard_kron.FLOOR, str(loha / "adapter_model.safetensors"),
                    str(work / "f.safetensors"), "8"],
             run=lambda dev, out: SURGERY + ["squeeze", str(loha), "--rank", "8", "-o", str(out), "--device", dev]),
        dict(name="LoKr 7B-shaped → LoRA r8", make=lambda: bench_hadamard_kron.make(lokr, "lokr"),
             floor=[PY, "-c", bench_hadamard_kron.FLOOR, str(lokr / "adapter_model.safetensors"),
                    str(work / "f.safetensors"), "8"],
             run=lambda dev, out: SURGERY + ["squeeze", str(lokr), "--rank", "8", "-o", str(out), "--device", dev]),
        dict(name="TwoNN N = 20,000 × 2048 (in process)", make=lambda: None, floor=None,
             run=lambda dev, out: [PY, "-c", TWONN, dev], inproc=True),
        dict(name="one tune step, 4096 tokens, 4096² r64 → r8 (in process)", make=lambda: None, floor=None,
             run=lambda dev, out: [PY, "-c", TUNE, dev], inproc=True),
    ]


def check() -> int:
    """Without CUDA: say so, and prove every piece the suite calls exists (so CI keeps it runnable)."""
    work = Path(tempfile.mkdtemp(prefix="gpu-suite-check-"))
    try:
        items = workloads(work)
        for w in items:
            assert callable(w["make"]) and callable(w["run"]), w["name"]
            cmd = w["run"]("cuda", work / "out")
            if cmd[:3] == SURGERY:
                from surgery_cli.main import main as cli

                params = {p.name for p in cli.commands[cmd[3]].params}
                assert {"device", "out"} <= params, f"surgery {cmd[3]}: no --device / -o"
            else:
                compile(cmd[2], w["name"], "exec")
        # the CUDA tests' bodies, "cpu" in place of "cuda": a device window is not spent on a broken test
        tests = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                str(HERE.parent / "tests" / "test_cuda.py")], capture_output=True, text=True,
                               cwd=HERE.parent, env=dict(os.environ, SURGERY_TEST_DEVICE="cpu"))
        summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
        assert tests.returncode == 0 and " passed" in summary, tests.stdout[-3000:] + tests.stderr[-3000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = summary.split(" passed")[0].split()[-1]
    print(f"no CUDA device: the GPU suite needs one; checked {len(items)} workloads, and its {n} CUDA tests passed "
          "with the CPU in the GPU's place")
    return 0


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.CalledProcessError):
        import torch

        return torch.cuda.get_device_name(0)


def measure(cmd: list[str], clean: list[Path], inproc: bool) -> float:
    """Seconds of `cmd`: its own in-process figure (`inproc`), else the whole process, `clean` removed first."""
    if inproc:
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
    return timed(cmd, clean)[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or HERE / "out"))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--device", default="cuda", help="the device column (cpu: a dry run of the suite's plumbing)")
    ap.add_argument("--only", help="run the workloads whose name contains this text")
    args = ap.parse_args()
    import torch

    if args.check or args.device.startswith("cuda") and not torch.cuda.is_available():
        return check()
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    args.out.mkdir(parents=True, exist_ok=True)
    head = (f"{device_name() if args.device.startswith('cuda') else 'dry run on the CPU'}; {platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; whole processes, "
            f"median of {args.repeats} after a warm-up run")
    chosen = [w for w in workloads(work) if not args.only or args.only in w["name"]]
    if not chosen:
        sys.exit(f"error: no workload's name contains {args.only!r}")
    rows = []
    for w in chosen:
        res = {"name": w["name"]}
        try:  # one failing workload costs its row, not the table (a device window may be the only one)
            t0 = time.perf_counter()
            w["make"]()
            res["make_s"] = time.perf_counter() - t0
            clean = [work / "f", work / "f.safetensors", work / "out"]
            for label, cmd in (("floor", w["floor"]), ("cpu", w["run"]("cpu", work / "out")),
                               ("cuda", w["run"](args.device, work / "out"))):
                if cmd is None:
                    continue
                measure(cmd, clean, w.get("inproc", False))  # warm-up: page cache, CUDA context and kernels
                res[label] = statistics.median(measure(cmd, clean, w.get("inproc", False))
                                               for _ in range(args.repeats))
        except (Exception, SystemExit) as e:
            err = e.stderr if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
            res["error"] = " ".join(str(err).split())[-300:].replace("|", "/")  # one table cell
        rows.append(res)
        print(json.dumps(res), flush=True)
        write(args.out, head, rows, time.perf_counter() - t_start)  # after every row: a killed run leaves its rows
    print((args.out / "gpu_suite.md").read_text(), end="")
    return int(any("error" in r for r in rows))


def write(out: Path, head: str, rows: list[dict], total: float) -> None:
    """gpu_suite.md (the table for docs/benchmarks.md) and gpu_suite.json (the raw rows) under `out`."""
    lines = [f"GPU suite: {head}", "", "| work | I/O floor | CPU | CUDA | CUDA / floor | CPU / CUDA |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        unit = (lambda s: f"{s * 1e3:.1f} ms") if "tune" in r["name"] else (lambda s: f"{s:.2f} s")
        cells = [f"{r['floor']:.2f} s" if "floor" in r else "–"]
        cells += [unit(r[k]) if k in r else "–" for k in ("cpu", "cuda")]
        cells.append(f"{r['cuda'] / r['floor']:.2f}×" if {"cuda", "floor"} <= r.keys() else "–")
        cells.append(f"{r['cpu'] / r['cuda']:.1f}×" if {"cpu", "cuda"} <= r.keys() else "–")
        if "error" in r:
            cells[-1] += f" failed: {r['error']}"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"total wall time of the suite (inputs made included): {total:.0f} s"]
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_suite.json").write_text(json.dumps({"head": head, "device": head.split(";")[0],
                                                    "cores": os.cpu_count(), "total_s": total, "rows": rows},
                                                   indent=2))


if __name__ == "__main__":
    sys.exit(main())
