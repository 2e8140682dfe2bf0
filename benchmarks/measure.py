"""Timing and peak memory of a command as a whole process, for the benchmark scripts.

A child forked from a large parent inherits the parent's resident-set high-water mark across exec, so the
command is started from a small launcher process and its own `ru_maxrss` is read there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"status": status, "maxrss_kb": usage.ru_maxrss, "stderr": p.stderr.read().decode()[-2000:]}))
"""


def timed(cmd: list[str], clean: list[Path] = (), sync: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of `cmd`; `clean` paths are removed first and, with `sync`, dirty pages
    flushed, outside the timing (so that a multi-GB write does not pay for the one before it)."""
    for p in clean:
        shutil.rmtree(p, ignore_errors=True) if Path(p).is_dir() else Path(p).unlink(missing_ok=True)
    if sync:
        os.sync()
    # as installed: bytecode cached (pip compiles it; an environment that forbids writing it would make every
    # run recompile the checkout's sources, ~0.15 s that no user pays)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=True,
                         env=env)
    wall = time.perf_counter() - t0
    res = json.loads(out.stdout)
    if res["status"]:
        raise SystemExit(f"{cmd[:4]} failed: {res['stderr']}")
    return wall, res["maxrss_kb"] / 1024


def alternate(cmds: dict[str, list[str]], repeats: int, clean: list[Path] = (),
              sync: bool = False) -> dict[str, tuple[float, float, list[float]]]:
    """Run each command `repeats` times, alternating so that all see the same page cache (the first once more
    beforehand, to warm it): name → (median wall s, peak RSS MiB, every wall). `clean`, `sync`: as `timed`, before
    each run."""
    import statistics

    def run(cmd):
        return timed(cmd, clean, sync)

    run(next(iter(cmds.values())))
    runs: dict[str, list] = {k: [] for k in cmds}
    for _ in range(repeats):
        for k, cmd in cmds.items():
            runs[k].append(run(cmd))
    return {k: (statistics.median(w for w, _ in v), max(r for _, r in v), [w for w, _ in v]) for k, v in runs.items()}


def report(med: dict, ours: str, floor: str = "floor") -> None:
    """Print `alternate`'s medians, peak RSS and runs, and the ratio of `ours` to `floor`."""
    for k, (w, rss, walls) in med.items():
        print(f"  {k:8s} median {w:6.2f} s   peak RSS {rss:6.0f} MB   runs: " + ", ".join(f"{x:.2f}" for x in walls))
    print(f"  ratio {ours} / I/O floor: {med[ours][0] / med[floor][0]:.2f}×")


def parser(*flags: str):
    """The benchmarks' shared arguments (--workdir, --repeats, --device) and their own store-true `flags`."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    for flag in flags:
        ap.add_argument(flag, action="store_true")
    return ap


def llama_1b(vocab: int = 2048):
    """The Llama-3.2-1B shapes (hidden 2048, intermediate 8192, 16 layers; vocabulary cut to `vocab`, which no
    adapter touches), bf16, weights uninitialised (allocated, not drawn: the benchmarks time adapters)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to_empty(device="cpu").to(torch.bfloat16)
